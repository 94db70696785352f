package engine_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

// TestConcurrentFirstPlacement starts many streams at the same instant:
// every object's first extent is placed by concurrent Syncs, then every
// object grows in a second round. Each must still be one extent: objects
// placing first extents at once must not pick the same goal, which left
// the loser in a small gap before another stream, outgrown at once.
func TestConcurrentFirstPlacement(t *testing.T) {
	for round := range 10 {
		dev := engine.NewMemDevice(1<<30, 4096)
		e := formatOpen(t, dev, engine.Options{CacheSize: 256 << 20})
		const objects, chunk = 16, 4 << 20
		objs := make([]*engine.Object, objects)
		buf := make([]byte, chunk)
		for i := range objs {
			var err error
			if objs[i], err = e.Create(fmt.Sprint("s", i)); err != nil {
				t.Fatal(err)
			}
			if _, err := objs[i].WriteAt(buf, 0); err != nil {
				t.Fatal(err)
			}
		}
		grow := func(off int64) {
			var wg, ready sync.WaitGroup
			start := make(chan struct{})
			for _, o := range objs {
				wg.Add(1)
				ready.Add(1)
				go func() {
					defer wg.Done()
					if off > 0 {
						if _, err := o.WriteAt(buf, off); err != nil {
							t.Error(err)
						}
					}
					ready.Done()
					<-start
					if err := o.Sync(); err != nil {
						t.Error(err)
					}
				}()
			}
			ready.Wait()
			close(start)
			wg.Wait()
		}
		grow(0)
		for k := int64(1); k < 4; k++ {
			grow(k * chunk)
		}
		for _, o := range objs {
			if x := o.Extents(); len(x) != 1 {
				t.Fatalf("round %d: %s has %d extents: %+v", round, o.Name(), len(x), x)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

package engine

import (
	"fmt"
	"sync"
	"testing"
)

// TestPlaceFreshAtomic: objects placing their first extents at the same
// moment each get one at the goal freshGoal picks for it. Without
// placeMu they computed the same goal from the same largest free extent,
// and all but one failed to claim it.
func TestPlaceFreshAtomic(t *testing.T) {
	e := mustFormatOpen(t, NewMemDevice(1<<30, 4096), Options{CacheSize: 4 << 20})
	defer e.Close()
	const objects, rounds = 8, 50
	for r := range rounds {
		objs := make([]*Object, objects)
		for i := range objs {
			o, err := e.Create(fmt.Sprintf("r%d-%d", r, i))
			if err != nil {
				t.Fatal(err)
			}
			objs[i] = o
		}
		// The write path reserves what writeback allocates.
		if err := e.space.Reserve(objects * 256); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		failed := make(chan string, objects)
		for _, o := range objs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				o.mu.Lock()
				defer o.mu.Unlock()
				if h, _ := e.placeFresh(o, 256, true); h.Len != 256 {
					failed <- o.name
				}
			}()
		}
		close(start)
		wg.Wait()
		close(failed)
		for name := range failed {
			t.Fatalf("round %d: %s found its fresh goal taken", r, name)
		}
	}
}

package engine

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// runUntilStuck runs each fn in its own goroutine in a loop for d, then
// closes e. If no call completes for 3 s it fails the test with the
// goroutines' stacks and leaves e and the goroutines as they are (closing a
// stuck engine would hang the test).
func runUntilStuck(t *testing.T, e *Engine, d time.Duration, fns ...func(r *rand.Rand)) {
	t.Helper()
	var progress atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, fn := range fns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), 9))
			for {
				select {
				case <-stop:
					return
				default:
				}
				fn(r)
				progress.Add(1)
			}
		}()
	}
	deadline := time.Now().Add(d)
	last, lastChange := progress.Load(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		if p := progress.Load(); p != last {
			last, lastChange = p, time.Now()
			continue
		}
		if time.Since(lastChange) > 3*time.Second {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Errorf("no progress for 3 s after %d calls: cache %+v\n%s", last, e.cache.Stats(), buf[:n])
			return
		}
	}
	close(stop)
	wg.Wait()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

// Writers that find writeback took some of their pages ask for more dirty
// budget; if each kept what it held while waiting, together they could
// hold the whole limit with nothing dirty left to write back.
func TestWritersDoNotHoldBudgetWhileWaiting(t *testing.T) {
	const bs, blocks = 4096, 1024
	e := mustFormatOpen(t, NewMemDevice(256<<20, bs), Options{CacheSize: 4 << 20})
	chunk := max(1, e.cache.DirtyLimitPages()/4)
	w := bytes.Repeat([]byte{1}, chunk*bs)
	var fns []func(*rand.Rand)
	for i := 0; i < 8; i++ {
		o, err := e.Create(fmt.Sprint("o", i))
		if err != nil {
			t.Fatal(err)
		}
		if err := o.Truncate(blocks * bs); err != nil {
			t.Fatal(err)
		}
		fns = append(fns, func(r *rand.Rand) {
			if _, err := o.WriteAt(w, r.Int64N(int64(blocks-chunk))*bs); err != nil {
				t.Error(err)
			}
		})
	}
	runUntilStuck(t, e, 4*time.Second, fns...)
}

// Readers wait for frames while holding their object's lock, and finishing
// a writeback batch (which frees frames) takes that lock: dirty pages and
// pages in writeback together must leave frames to read into, whatever
// DirtyLimit asks for (600 of 819 frames here).
func TestReadersAndWritebackDoNotWaitForEachOther(t *testing.T) {
	const bs, blocks = 4096, 8192
	e := mustFormatOpen(t, NewMemDevice(256<<20, bs), Options{CacheSize: 4 << 20, DirtyLimit: 600 * bs})
	a, err := e.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.Create("b")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < blocks*bs; off += int64(len(buf)) {
		if _, err := a.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Truncate(blocks * bs); err != nil {
		t.Fatal(err)
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	w := bytes.Repeat([]byte{7}, 256<<10)
	writer := func(o *Object) func(*rand.Rand) {
		return func(r *rand.Rand) {
			if _, err := o.WriteAt(w, r.Int64N(blocks-64)*bs); err != nil {
				t.Error(err)
			}
		}
	}
	reader := func(r *rand.Rand) {
		p := make([]byte, bs)
		if _, err := a.ReadAt(p, r.Int64N(blocks)*bs); err != nil {
			t.Error(err)
		}
	}
	syncer := func(*rand.Rand) {
		if err := a.Sync(); err != nil {
			t.Error(err)
		}
	}
	runUntilStuck(t, e, 4*time.Second, writer(a), writer(b), reader, reader, reader, syncer)
}

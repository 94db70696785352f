package cache

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestStress runs loads, lookups, writebacks (Insert), writes (Remove,
// RemoveRange) and bare allocations at once on a small cache and checks that
// no read ever returns data older than the last write that completed before
// it started, or another key's data.
func TestStress(t *testing.T) {
	c, err := New(Options{Size: MinSize(4096), BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	const keys = 96
	var (
		mu   sync.Mutex
		disk [keys]uint64 // what a device read returns
		// done[i] is the newest version a read of key i must see: set after
		// the Insert or Remove that made older cached data unreachable.
		done [keys]atomic.Uint64
		ver  atomic.Uint64
		// Writers of a key are serialized, as the engine's page and range
		// locks do: the cache cannot order two Inserts of the same key.
		keyMu [keys]sync.Mutex
	)
	key := func(i int) Key { return Key{Obj: uint64(i % 3), Block: int64(i)} }
	write := func(i int) uint64 {
		mu.Lock()
		defer mu.Unlock()
		v := ver.Add(1)
		disk[i] = v
		return v
	}
	read := func(i int) uint64 {
		mu.Lock()
		defer mu.Unlock()
		return disk[i]
	}
	check := func(p *Page, i int, min uint64) error {
		k, v, err := readStamp(p.Data())
		switch {
		case err != nil:
			return err
		case k != key(i):
			return fmt.Errorf("read of %v returned %v", key(i), k)
		case v < min:
			return fmt.Errorf("read of %v returned version %d, older than %d", key(i), v, min)
		}
		return nil
	}

	dur := 300 * time.Millisecond
	if testing.Short() {
		dur = 100 * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var wg sync.WaitGroup
	var failed atomic.Value
	var ops [5]atomic.Int64
	run := func(id int, f func(r *rand.Rand) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(id), 7))
			for ctx.Err() == nil {
				if err := f(r); err != nil {
					failed.CompareAndSwap(nil, err)
					cancel()
					return
				}
				ops[id%len(ops)].Add(1)
			}
		}()
	}
	for g := 0; g < 2; g++ {
		run(0+5*g, func(r *rand.Rand) error { // reader: Load
			i := r.IntN(keys)
			min := done[i].Load()
			p, err := c.Load(ctx, key(i), func(p *Page) error {
				stamp(p, key(i), read(i))
				return nil
			})
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			defer p.Release()
			return check(p, i, min)
		})
	}
	run(1, func(r *rand.Rand) error { // reader: Lookup
		i := r.IntN(keys)
		min := done[i].Load()
		if p := c.Lookup(key(i)); p != nil {
			defer p.Release()
			return check(p, i, min)
		}
		return nil
	})
	run(2, func(r *rand.Rand) error { // writeback: a new version becomes clean
		i := r.IntN(keys)
		p, err := c.Alloc(ctx)
		if err != nil {
			return nil // only the context ends it
		}
		defer p.Release()
		keyMu[i].Lock()
		defer keyMu[i].Unlock()
		v := write(i)
		stamp(p, key(i), v)
		c.Insert(key(i), p)
		for old := done[i].Load(); old < v && !done[i].CompareAndSwap(old, v); old = done[i].Load() {
		}
		return nil
	})
	run(3, func(r *rand.Rand) error { // writes that leave no clean page
		i := r.IntN(keys)
		n := 1
		if r.IntN(4) == 0 {
			n = 1 + r.IntN(keys-i)
		}
		vs := make([]uint64, n)
		for j := range vs {
			keyMu[i+j].Lock()
			defer keyMu[i+j].Unlock()
			vs[j] = write(i + j)
		}
		if n == 1 {
			c.Remove(key(i))
		} else {
			// RemoveRange works per object; keys of the range spread over 3.
			for obj := uint64(0); obj < 3; obj++ {
				c.RemoveRange(obj, int64(i), int64(n))
			}
		}
		for j, v := range vs {
			for old := done[i+j].Load(); old < v && !done[i+j].CompareAndSwap(old, v); old = done[i+j].Load() {
			}
		}
		return nil
	})
	run(4, func(r *rand.Rand) error { // dirty pages held a while, with their accounting
		n := 1 + r.IntN(4)
		if err := c.AcquireDirty(ctx, n); err != nil {
			return nil
		}
		defer c.ReleaseDirty(n)
		held := make([]*Page, 0, n)
		defer func() {
			for _, p := range held {
				p.Release()
			}
		}()
		for range n {
			p, err := c.Alloc(ctx)
			if err != nil {
				return nil
			}
			binary.LittleEndian.PutUint64(p.Data(), 0xd1d1)
			held = append(held, p)
		}
		time.Sleep(time.Duration(r.IntN(100)) * time.Microsecond)
		return nil
	})
	wg.Wait()
	if err := failed.Load(); err != nil {
		t.Fatal(err)
	}
	c.policy.Wait() // so that no callback is dropping a page while Stats reads
	st := c.Stats()
	t.Logf("ops: load %d lookup %d insert %d write %d dirty %d; %+v", ops[0].Load(), ops[1].Load(), ops[2].Load(), ops[3].Load(), ops[4].Load(), st)
	for i := range ops {
		if ops[i].Load() == 0 {
			t.Fatalf("worker kind %d made no progress", i)
		}
	}
	if st.Frames-st.FreeFrames != st.CleanPages || st.DirtyPages != 0 {
		t.Fatalf("after the run: %+v", st)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

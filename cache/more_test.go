package cache

import (
	"context"
	"encoding/binary"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"pgregory.net/rapid"
)

// TestMemoryOverhead fills a cache with clean pages and checks that the Go
// heap it uses (index, policy, page structs) stays within the budget New
// subtracts from Options.Size.
func TestMemoryOverhead(t *testing.T) {
	frames := 1 << 15
	if testing.Short() {
		frames = 1 << 12
	}
	var m0, m1, m2 runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&m0)
	c := newTestCache(t, 4096, frames, 4096)
	defer c.Close()
	runtime.GC()
	runtime.ReadMemStats(&m1)
	ctx := context.Background()
	for i := 0; i < c.CleanCapacity(); i++ {
		p, err := c.Alloc(ctx)
		if err != nil {
			t.Fatal(err)
		}
		c.Insert(Key{Obj: uint64(i % 7), Block: int64(i)}, p)
		p.Release()
		if i%4096 == 0 {
			c.policy.Wait() // keep the policy's buffer from dropping offers
		}
	}
	c.policy.Wait()
	runtime.GC()
	runtime.ReadMemStats(&m2)
	st := c.Stats()
	empty := int64(m1.HeapAlloc) - int64(m0.HeapAlloc)
	full := int64(m2.HeapAlloc) - int64(m0.HeapAlloc)
	budget := int64(FixedOverhead) + int64(frames)*FrameOverhead
	t.Logf("%d frames, %d clean pages: heap %d bytes empty, %d full (%.0f per frame, %.0f per clean page beyond empty); budget %d",
		frames, st.CleanPages, empty, full, float64(full)/float64(frames), float64(full-empty)/float64(st.CleanPages), budget)
	if st.CleanPages < c.CleanCapacity()*9/10 {
		t.Fatalf("only %d of %d pages stayed cached", st.CleanPages, c.CleanCapacity())
	}
	if full > budget {
		t.Fatalf("heap grew by %d bytes, budget %d", full, budget)
	}
}

// TestModel runs random operations against a model of what the device holds
// and checks that the cache never returns data other than the current one,
// whatever the policy chose to keep.
func TestModel(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		c, err := New(Options{Size: MinSize(4096), BlockSize: 4096})
		if err != nil {
			rt.Fatal(err)
		}
		defer c.Close()
		ctx := context.Background()
		disk := map[Key]uint64{} // the version a read from the device returns
		var version uint64
		genKey := rapid.Custom(func(t *rapid.T) Key {
			return Key{Obj: rapid.Uint64Range(0, 2).Draw(t, "obj"), Block: rapid.Int64Range(0, 40).Draw(t, "block")}
		})
		versionOf := func(p *Page) uint64 {
			return binary.LittleEndian.Uint64(p.Data()[16:])
		}
		write := func(k Key) { version++; disk[k] = version }
		rt.Repeat(map[string]func(*rapid.T){
			"insert": func(t *rapid.T) { // writeback made a page clean
				k := genKey.Draw(t, "key")
				write(k)
				p := c.TryAlloc()
				if p == nil {
					t.Fatal("TryAlloc nil with nothing held")
				}
				stamp(p, k, disk[k])
				c.Insert(k, p)
				p.Release()
			},
			"write": func(t *rapid.T) { // a write made the clean page stale
				k := genKey.Draw(t, "key")
				write(k)
				c.Remove(k)
			},
			"writeRange": func(t *rapid.T) {
				obj := rapid.Uint64Range(0, 2).Draw(t, "obj")
				start := rapid.Int64Range(0, 40).Draw(t, "start")
				n := rapid.SampledFrom([]int64{1, 5, 30, 1000}).Draw(t, "n")
				for b := start; b < start+n && b <= 40; b++ {
					write(Key{obj, b})
				}
				c.RemoveRange(obj, start, n)
			},
			"removeObject": func(t *rapid.T) {
				obj := rapid.Uint64Range(0, 2).Draw(t, "obj")
				for b := int64(0); b <= 40; b++ {
					write(Key{obj, b})
				}
				c.RemoveObject(obj)
			},
			"lookup": func(t *rapid.T) {
				k := genKey.Draw(t, "key")
				if p := c.Lookup(k); p != nil {
					if v := versionOf(p); v != disk[k] {
						t.Fatalf("Lookup(%v) version %d, device has %d", k, v, disk[k])
					}
					checkStamp(t, p, k)
					p.Release()
				}
			},
			"load": func(t *rapid.T) {
				k := genKey.Draw(t, "key")
				p, err := c.Load(ctx, k, func(p *Page) error { stamp(p, k, disk[k]); return nil })
				if err != nil {
					t.Fatal(err)
				}
				if v := versionOf(p); v != disk[k] {
					t.Fatalf("Load(%v) version %d, device has %d", k, v, disk[k])
				}
				p.Release()
			},
			"": func(t *rapid.T) {
				st := c.Stats()
				if st.Frames-st.FreeFrames != st.CleanPages {
					t.Fatalf("frames in use %d, clean pages %d, nothing held", st.Frames-st.FreeFrames, st.CleanPages)
				}
			},
		})
	})
}

func BenchmarkLookupHitParallel(b *testing.B) {
	c := newTestCache(b, 4096, 4096, 4096)
	defer c.Close()
	n := c.CleanCapacity()
	for i := 0; i < n; i++ {
		insertNew(b, c, Key{Obj: 1, Block: int64(i)})
	}
	c.policy.Wait()
	if st := c.Stats(); st.CleanPages != n {
		b.Fatalf("%d of %d pages cached", st.CleanPages, n)
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		x := uint64(len(buf)) ^ uint64(uintptr(unsafe.Pointer(&buf[0])))
		for pb.Next() {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			p := c.Lookup(Key{Obj: 1, Block: int64(x % uint64(n))})
			if p == nil {
				b.Error("miss on a cached key")
				return
			}
			copy(buf, p.Data())
			p.Release()
		}
	})
}

// BenchmarkLoadMissParallel measures the miss path: Load of keys never seen
// (the load function does nothing), so every op allocates a frame, indexes it
// and offers it to the policy, which evicts.
func BenchmarkLoadMissParallel(b *testing.B) {
	c := newTestCache(b, 4096, 4096, 4096)
	defer c.Close()
	var next atomic.Int64
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	defer reportCPU(b)()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			k := Key{Obj: 2, Block: next.Add(1)}
			p, err := c.Load(ctx, k, func(*Page) error { return nil })
			if err != nil {
				b.Error(err)
				return
			}
			p.Release()
		}
	})
}

// reportCPU reports the process's CPU time (user + system, every goroutine,
// the policy's included) per op: unlike ns/op it does not grow when other
// processes take the cores away. Use as defer reportCPU(b)().
func reportCPU(b *testing.B) func() {
	start := cpuTime()
	return func() {
		b.ReportMetric(float64(cpuTime()-start)/float64(b.N), "cpu-ns/op")
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestSpan checks that frames handed out in a row follow each other, that
// Span covers exactly their bytes, and that a cache whose frames are padded
// (blocks smaller than FrameAlign) never reports frames as following.
func TestSpan(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	defer c.Close()
	var ps []*Page
	for i := 0; i < 4; i++ {
		p, err := c.Alloc(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	for i := 1; i < len(ps); i++ {
		if !ps[i].Follows(ps[i-1]) {
			t.Fatalf("frame %d does not follow frame %d of a fresh cache", i, i-1)
		}
		if ps[i-1].Follows(ps[i]) {
			t.Fatalf("frame %d follows frame %d", i-1, i)
		}
	}
	for i, p := range ps {
		for j := range p.Data() {
			p.Data()[j] = byte(i + 1)
		}
	}
	span := ps[0].Span(len(ps))
	if len(span) != 4*4096 || cap(span) != len(span) {
		t.Fatalf("Span: len %d cap %d, want %d", len(span), cap(span), 4*4096)
	}
	for i := range span {
		if want := byte(i/4096 + 1); span[i] != want {
			t.Fatalf("Span byte %d = %d, want %d", i, span[i], want)
		}
	}
	if &ps[2].Span(1)[0] != &ps[2].Data()[0] {
		t.Fatal("Span(1) is not the page's data")
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Span past the last frame did not panic")
			}
		}()
		ps[3].Span(c.Frames() - 2)
	}()
	for _, p := range ps {
		p.Release()
	}

	small := newTestCache(t, 512, 64, 0)
	defer small.Close()
	a, err := small.Alloc(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	b, err := small.Alloc(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if b.Follows(a) || a.Follows(b) {
		t.Fatal("padded frames reported as following each other")
	}
	a.Release()
	b.Release()
}

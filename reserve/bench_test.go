package reserve

import (
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

// cpuTimer runs the benchmark timer and, alongside it, sums the CPU time of
// the benchmark's OS thread (it locks the goroutine to its thread), which it
// reports as cpu-ns/op.
type cpuTimer struct {
	b            *testing.B
	start, total time.Duration
}

func newCPUTimer(b *testing.B) *cpuTimer {
	runtime.LockOSThread()
	b.Cleanup(runtime.UnlockOSThread)
	b.ResetTimer()
	b.StopTimer()
	return &cpuTimer{b: b}
}

func (c *cpuTimer) Start() {
	c.b.StartTimer()
	c.start = threadCPU()
}

func (c *cpuTimer) Stop() {
	c.total += threadCPU() - c.start
	c.b.StopTimer()
}

func (c *cpuTimer) report() {
	if c.total > 0 {
		c.b.ReportMetric(float64(c.total.Nanoseconds())/float64(c.b.N), "cpu-ns/op")
	}
}

// fragmentedSpace returns a Space with exactly n free extents of 1..64
// blocks, each followed by one used block, so that both indexes are large
// and the by-size index has many extents of each length.
func fragmentedSpace(b *testing.B, n int) *Space {
	r := rand.New(rand.NewPCG(1, 2))
	var used []Extent
	var pos int64
	for i := 0; i < n; i++ {
		pos += r.Int64N(64) + 1
		used = append(used, Extent{Start: pos, Len: 1})
		pos++
	}
	s, err := NewSpace(pos, used)
	if err != nil {
		b.Fatal(err)
	}
	if st := s.Stats(); st.FreeExtents != n {
		b.Fatalf("%d free extents, want %d", st.FreeExtents, n)
	}
	return s
}

// allocWorkload is a fixed sequence of (want, goal) pairs: sizes 1..32 and
// goals anywhere, so allocations hit the goal rule, best fit and the
// tie-break search.
func allocWorkload(total int64) (wants, goals []int64) {
	r := rand.New(rand.NewPCG(3, 4))
	const k = 4096
	wants, goals = make([]int64, k), make([]int64, k)
	for i := range wants {
		wants[i] = r.Int64N(32) + 1
		goals[i] = r.Int64N(total)
	}
	return wants, goals
}

// BenchmarkAllocFree100kFreeExtents measures the allocator with 100,000
// free extents. Cycle is one Alloc, one Free and one Commit, after which the
// free extents are as before (the freed extent coalesces back). Alloc and
// Free time each operation on its own: batches of 1024 with the timer
// running only for that operation (Free's batch ends with the Commit that
// makes the busy extents allocatable and coalesces them, so its ns/op
// includes that work).
//
// FreeOnly and CommitOnly split Free's figure into the Free calls (the
// overlap check and the busy entry) and the Commit that coalesces them
// (per extent released).
//
// Cycle, Alloc and Free use random goals, the expensive case: a goal inside
// a free extent splits it in three, and freeing the piece merges on both
// sides. AppendAlloc and AppendFree are the writeback pattern instead: 16
// interleaved streams, each asking for the block after its previous extent.
func BenchmarkAllocFree100kFreeExtents(b *testing.B) {
	const extents = 100_000
	b.Run("Cycle", func(b *testing.B) {
		s := fragmentedSpace(b, extents)
		wants, goals := allocWorkload(s.Total())
		b.ReportAllocs()
		t := newCPUTimer(b)
		t.Start()
		for i := 0; i < b.N; i++ {
			k := i % len(wants)
			if err := s.Reserve(wants[k]); err != nil {
				b.Fatal(err)
			}
			got, err := s.Alloc(wants[k], goals[k])
			if err != nil {
				b.Fatal(err)
			}
			for _, e := range got {
				if err := s.Free(e, uint64(i)); err != nil {
					b.Fatal(err)
				}
			}
			s.Commit(uint64(i))
		}
		t.Stop()
		t.report()
		if err := s.Check(); err != nil {
			b.Fatal(err)
		}
	})

	const batch, streams = 1024, 16
	// timed says which part of each batch runs under the timer.
	type timed int
	const (
		timeAlloc      timed = iota // the Allocs
		timeFreeCommit              // the Frees and the Commit that releases them
		timeFree                    // the Frees alone
		timeCommit                  // the Commit alone (ns/op is per extent released)
	)
	run := func(b *testing.B, what timed, appendGoals bool) {
		s := fragmentedSpace(b, extents)
		wants, goals := allocWorkload(s.Total())
		var next [streams]int64 // each stream's next goal
		for i := range next {
			next[i] = goals[i]
		}
		got := make([]Extent, 0, batch)
		var seq uint64
		b.ReportAllocs()
		t := newCPUTimer(b)
		for done := 0; done < b.N; {
			m := min(batch, b.N-done)
			var sum int64
			for j := 0; j < m; j++ {
				sum += wants[(done+j)%len(wants)]
			}
			if err := s.Reserve(sum); err != nil {
				b.Fatal(err)
			}
			got = got[:0]
			if what == timeAlloc {
				t.Start()
			}
			for j := 0; j < m; j++ {
				k := (done + j) % len(wants)
				goal := goals[k]
				if appendGoals {
					goal = next[k%streams]
				}
				es, err := s.Alloc(wants[k], goal)
				if err != nil {
					b.Fatal(err)
				}
				next[k%streams] = es[len(es)-1].End()
				got = append(got, es...)
			}
			switch what {
			case timeAlloc:
				t.Stop()
			case timeFreeCommit, timeFree:
				t.Start()
			}
			seq++
			for _, e := range got {
				if err := s.Free(e, seq); err != nil {
					b.Fatal(err)
				}
			}
			switch what {
			case timeFree:
				t.Stop()
			case timeCommit:
				t.Start()
			}
			s.Commit(seq)
			if what == timeFreeCommit || what == timeCommit {
				t.Stop()
			}
			done += m
		}
		t.report()
		if err := s.Check(); err != nil {
			b.Fatal(err)
		}
		if st := s.Stats(); st.FreeExtents != extents {
			b.Fatalf("%d free extents after the run, want %d", st.FreeExtents, extents)
		}
	}
	b.Run("Alloc", func(b *testing.B) { run(b, timeAlloc, false) })
	b.Run("Free", func(b *testing.B) { run(b, timeFreeCommit, false) })
	b.Run("FreeOnly", func(b *testing.B) { run(b, timeFree, false) })
	b.Run("CommitOnly", func(b *testing.B) { run(b, timeCommit, false) })
	b.Run("AppendAlloc", func(b *testing.B) { run(b, timeAlloc, true) })
	b.Run("AppendFree", func(b *testing.B) { run(b, timeFreeCommit, true) })
}

// BenchmarkReserveUnreserveParallel measures the write path's accounting:
// one Reserve and one Unreserve per op, two goroutines on two Ps hammering
// the same word.
func BenchmarkReserveUnreserveParallel(b *testing.B) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	s, err := NewSpace(1<<30, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := s.Reserve(3); err != nil {
				b.Error(err)
				return
			}
			if err := s.Unreserve(3); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	if c := s.Counts(); c.Reserved != 0 {
		b.Fatalf("reserved %d after the run", c.Reserved)
	}
}

// BenchmarkReserveUnreserve is the uncontended cost, for comparison.
func BenchmarkReserveUnreserve(b *testing.B) {
	s, err := NewSpace(1<<30, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if err := s.Reserve(3); err != nil {
			b.Fatal(err)
		}
		if err := s.Unreserve(3); err != nil {
			b.Fatal(err)
		}
	}
}

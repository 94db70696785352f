package reserve_test

import (
	"errors"
	"io/fs"
	"math"
	"slices"
	"strings"
	"sync"
	"testing"

	"pgregory.net/rapid"

	"github.com/rawblock/rawblock/reserve"
)

func advFreeList(s *reserve.Space) []reserve.Extent {
	var out []reserve.Extent
	s.FreeExtents(func(e reserve.Extent) bool { out = append(out, e); return true })
	return out
}

func advSum(c reserve.Counts) int64 { return c.Free + c.Reserved + c.Allocated }

func TestAdvAccountantBadInput(t *testing.T) {
	a := reserve.NewAccountant(100, 60) // 40 allocated
	snap := a.Snapshot()
	if snap.Total != 100 || snap.Free != 60 || snap.Reserved != 0 || snap.Allocated != 40 {
		t.Fatalf("initial counts %+v", snap)
	}
	type call struct {
		name string
		fn   func() error
		want error
	}
	calls := []call{
		{"Reserve(-1)", func() error { return a.Reserve(-1) }, reserve.ErrInvalid},
		{"Reserve(MinInt64)", func() error { return a.Reserve(math.MinInt64) }, reserve.ErrInvalid},
		{"Reserve(61)", func() error { return a.Reserve(61) }, reserve.ErrNoSpace},
		{"Reserve(MaxInt64)", func() error { return a.Reserve(math.MaxInt64) }, reserve.ErrNoSpace},
		{"Unreserve(-1)", func() error { return a.Unreserve(-1) }, reserve.ErrInvalid},
		{"Unreserve(1)", func() error { return a.Unreserve(1) }, reserve.ErrInvalid},
		{"Unreserve(MaxInt64)", func() error { return a.Unreserve(math.MaxInt64) }, reserve.ErrInvalid},
		{"Consume(1)", func() error { return a.Consume(1) }, reserve.ErrInvalid},
		{"Consume(-5)", func() error { return a.Consume(-5) }, reserve.ErrInvalid},
		{"Release(41)", func() error { return a.Release(41) }, reserve.ErrInvalid},
		{"Release(MaxInt64)", func() error { return a.Release(math.MaxInt64) }, reserve.ErrInvalid},
		{"Release(-1)", func() error { return a.Release(-1) }, reserve.ErrInvalid},
	}
	for _, c := range calls {
		err := c.fn()
		if !errors.Is(err, c.want) {
			t.Errorf("%s = %v, want %v", c.name, err, c.want)
		}
		if c.want == reserve.ErrInvalid && !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("%s = %v, does not wrap fs.ErrInvalid", c.name, err)
		}
		if got := a.Snapshot(); got != snap {
			t.Fatalf("%s changed counts: %+v -> %+v", c.name, snap, got)
		}
		if err := a.Check(); err != nil {
			t.Fatal(err)
		}
	}
	// Zero is a no-op everywhere.
	for _, f := range []func(int64) error{a.Reserve, a.Unreserve, a.Consume, a.Release} {
		if err := f(0); err != nil {
			t.Errorf("op(0) = %v", err)
		}
	}
	if got := a.Snapshot(); got != snap {
		t.Fatalf("zero ops changed counts %+v", got)
	}
	// Exact boundary: reserve all free, then nothing more.
	if err := a.Reserve(60); err != nil {
		t.Fatal(err)
	}
	if err := a.Reserve(1); !errors.Is(err, reserve.ErrNoSpace) {
		t.Fatalf("Reserve past free: %v", err)
	}
	if err := a.Consume(60); err != nil {
		t.Fatal(err)
	}
	if c := a.Snapshot(); c.Allocated != 100 || c.Free != 0 || c.Reserved != 0 {
		t.Fatalf("after consume %+v", c)
	}
	if err := a.Release(100); err != nil {
		t.Fatal(err)
	}
	if c := a.Snapshot(); c.Free != 100 || advSum(c) != 100 {
		t.Fatalf("after release %+v", c)
	}
}

func TestAdvAccountantNewPanics(t *testing.T) {
	bad := [][2]int64{{-1, 0}, {10, 11}, {10, -1}, {reserve.MaxTotal + 1, 0}}
	for _, b := range bad {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewAccountant(%d, %d) did not panic", b[0], b[1])
				}
			}()
			reserve.NewAccountant(b[0], b[1])
		}()
	}
	// The largest total works and its limits hold.
	a := reserve.NewAccountant(reserve.MaxTotal, reserve.MaxTotal)
	if err := a.Reserve(a.MaxReserved()); err != nil {
		t.Fatal(err)
	}
	if err := a.Reserve(1); !errors.Is(err, reserve.ErrNoSpace) {
		t.Fatalf("reserve past MaxReserved: %v", err)
	}
	if err := a.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvAccountantConcurrent(t *testing.T) {
	const total = 1000
	a := reserve.NewAccountant(total, total)
	var wg sync.WaitGroup
	var stop sync.WaitGroup
	done := make(chan struct{})
	stop.Add(1)
	go func() { // observer
		defer stop.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			c := a.Snapshot()
			if advSum(c) != total || c.Free < 0 || c.Reserved < 0 || c.Allocated < 0 {
				t.Errorf("inconsistent snapshot %+v", c)
				return
			}
		}
	}()
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			var mine, alloc int64
			for i := 0; i < 5000; i++ {
				n := int64(1 + (i*7+g)%50)
				switch i % 4 {
				case 0, 1:
					if err := a.Reserve(n); err == nil {
						mine += n
					} else if !errors.Is(err, reserve.ErrNoSpace) {
						t.Error(err)
						return
					}
				case 2:
					if mine > 0 {
						k := min(n, mine)
						if err := a.Consume(k); err != nil {
							t.Error(err)
							return
						}
						mine -= k
						alloc += k
					}
				case 3:
					if alloc > 0 {
						k := min(n, alloc)
						if err := a.Release(k); err != nil {
							t.Error(err)
							return
						}
						alloc -= k
					}
					if mine > 0 {
						if err := a.Unreserve(mine); err != nil {
							t.Error(err)
							return
						}
						mine = 0
					}
				}
			}
			if mine > 0 {
				if err := a.Unreserve(mine); err != nil {
					t.Error(err)
				}
			}
			if alloc > 0 {
				if err := a.Release(alloc); err != nil {
					t.Error(err)
				}
			}
		}(g)
	}
	wg.Wait()
	close(done)
	stop.Wait()
	if c := a.Snapshot(); c.Free != total || c.Reserved != 0 {
		t.Fatalf("final %+v", c)
	}
	if err := a.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvNewAllocatorBadInput(t *testing.T) {
	cases := []struct {
		total int64
		used  []reserve.Extent
	}{
		{-1, nil},
		{reserve.MaxTotal + 1, nil},
		{100, []reserve.Extent{{Start: -1, Len: 2}}},
		{100, []reserve.Extent{{Start: 5, Len: -1}}},
		{100, []reserve.Extent{{Start: 99, Len: 2}}},
		{100, []reserve.Extent{{Start: 100, Len: 1}}},
		{100, []reserve.Extent{{Start: math.MaxInt64, Len: 1}}},
		{100, []reserve.Extent{{Start: 2, Len: math.MaxInt64}}},
		{100, []reserve.Extent{{Start: 10, Len: 10}, {Start: 19, Len: 2}}},
		{100, []reserve.Extent{{Start: 30, Len: 10}, {Start: 10, Len: 30}}}, // contains
		{100, []reserve.Extent{{Start: 10, Len: 5}, {Start: 10, Len: 5}}},   // duplicate
	}
	for _, c := range cases {
		s, err := reserve.NewAllocator(c.total, c.used)
		if !errors.Is(err, reserve.ErrInvalid) || s != nil {
			t.Errorf("NewAllocator(%d, %v) = %v, %v; want ErrInvalid", c.total, c.used, s, err)
		}
	}
	// Touching, unordered and zero-length used extents are fine.
	s, err := reserve.NewAllocator(100, []reserve.Extent{{Start: 20, Len: 5}, {Start: 0, Len: 10}, {Start: 10, Len: 10}, {Start: 50, Len: 0}, {Start: 100, Len: 0}})
	if err != nil {
		t.Fatal(err)
	}
	if c := s.Counts(); c.Allocated != 25 || c.Free != 75 || c.Total != 100 {
		t.Fatalf("counts %+v", c)
	}
	if got := advFreeList(s); !slices.Equal(got, []reserve.Extent{{Start: 25, Len: 75}}) {
		t.Fatalf("free extents %v", got)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	// Empty space.
	s0, err := reserve.NewAllocator(0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s0.Reserve(1); !errors.Is(err, reserve.ErrNoSpace) {
		t.Fatalf("reserve on empty: %v", err)
	}
	if ext, err := s0.Alloc(0, 0); err != nil || len(ext) != 0 {
		t.Fatalf("Alloc(0) on empty = %v, %v", ext, err)
	}
}

type advState struct {
	c    reserve.Counts
	free []reserve.Extent
	st   reserve.Stats
}

func advSnap(s *reserve.Space) advState {
	return advState{s.Counts(), advFreeList(s), s.Stats()}
}

func TestAdvFreeBadInput(t *testing.T) {
	s, err := reserve.NewAllocator(100, []reserve.Extent{{Start: 0, Len: 40}})
	if err != nil {
		t.Fatal(err)
	}
	// free: [40,100); busy: [10,15) after Free; held: [90,95)
	if err := s.Free(reserve.Extent{Start: 10, Len: 5}, 7); err != nil {
		t.Fatal(err)
	}
	if h := s.HoldAt(90, 5); h != (reserve.Extent{Start: 90, Len: 5}) {
		t.Fatalf("HoldAt = %v", h)
	}
	before := advSnap(s)
	bad := []reserve.Extent{
		{Start: 10, Len: 5},              // double free (busy)
		{Start: 12, Len: 1},              // inside busy
		{Start: 8, Len: 3},               // overlaps busy start
		{Start: 14, Len: 3},              // overlaps busy end
		{Start: 40, Len: 1},              // never allocated (free)
		{Start: 35, Len: 10},             // straddles allocated/free
		{Start: 0, Len: 100},             // covers everything
		{Start: 92, Len: 1},              // held
		{Start: 99, Len: 2},              // past the end
		{Start: 100, Len: 1},             // past the end
		{Start: -1, Len: 1},              // negative
		{Start: 5, Len: -1},              // negative length
		{Start: math.MaxInt64, Len: 1},   // overflow
		{Start: 1, Len: math.MaxInt64},   // overflow
		{Start: math.MinInt64, Len: 100}, // negative
	}
	for _, e := range bad {
		err := s.Free(e, 9)
		if !errors.Is(err, reserve.ErrInvalid) {
			t.Errorf("Free(%v) = %v, want ErrInvalid", e, err)
			continue
		}
		if !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Free(%v) error does not wrap fs.ErrInvalid", e)
		}
		if !strings.Contains(err.Error(), e.String()) {
			t.Errorf("Free(%v) error %q does not name the extent", e, err)
		}
		if got := advSnap(s); !advEqual(got, before) {
			t.Fatalf("Free(%v) changed state: %+v -> %+v", e, before, got)
		}
		if err := s.Check(); err != nil {
			t.Fatal(err)
		}
	}
	// Zero-length free is a no-op, even on free space.
	if err := s.Free(reserve.Extent{Start: 50, Len: 0}, 1); err != nil {
		t.Fatal(err)
	}
	if got := advSnap(s); !advEqual(got, before) {
		t.Fatal("zero-length free changed state")
	}
}

func advEqual(a, b advState) bool {
	return a.c == b.c && slices.Equal(a.free, b.free) && a.st == b.st
}

func TestAdvBusyNotReused(t *testing.T) {
	s, err := reserve.NewAllocator(20, []reserve.Extent{{Start: 0, Len: 20}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Free(reserve.Extent{Start: 5, Len: 5}, 3); err != nil {
		t.Fatal(err)
	}
	if c := s.Counts(); c.Free != 5 || c.Allocated != 15 {
		t.Fatalf("counts after free %+v", c)
	}
	if err := s.Reserve(5); err != nil {
		t.Fatal(err)
	}
	before := advSnap(s)
	_, err = s.Alloc(1, 5)
	if !errors.Is(err, reserve.ErrNoSpace) || !errors.Is(err, reserve.ErrBusy) {
		t.Fatalf("Alloc from busy = %v", err)
	}
	if got := advSnap(s); !advEqual(got, before) {
		t.Fatal("failed Alloc changed state")
	}
	s.Commit(2) // lower: releases nothing
	if _, err := s.Alloc(1, 5); !errors.Is(err, reserve.ErrBusy) {
		t.Fatalf("Alloc after Commit(2) = %v", err)
	}
	s.Commit(3)
	got, err := s.Alloc(5, 0)
	if err != nil || !slices.Equal(got, []reserve.Extent{{Start: 5, Len: 5}}) {
		t.Fatalf("Alloc after commit = %v, %v", got, err)
	}
	// Free after a covering commit is allocatable at once.
	if err := s.Free(reserve.Extent{Start: 0, Len: 2}, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(2); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Alloc(2, 0); err != nil || !slices.Equal(got, []reserve.Extent{{Start: 0, Len: 2}}) {
		t.Fatalf("Alloc of already-committed free = %v, %v", got, err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvAllocBadInput(t *testing.T) {
	s, err := reserve.NewAllocator(100, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(10); err != nil {
		t.Fatal(err)
	}
	before := advSnap(s)
	for _, w := range []int64{-1, math.MinInt64, 11, 100, 101, math.MaxInt64} {
		_, err := s.Alloc(w, 0)
		if !errors.Is(err, reserve.ErrInvalid) && !errors.Is(err, reserve.ErrNoSpace) {
			t.Errorf("Alloc(%d) = %v", w, err)
		}
		if w > 0 && w <= 100 && !errors.Is(err, reserve.ErrInvalid) {
			t.Errorf("Alloc(%d) over the reservation = %v, want ErrInvalid", w, err)
		}
		if got := advSnap(s); !advEqual(got, before) {
			t.Fatalf("Alloc(%d) changed state", w)
		}
	}
	// Odd goals are accepted.
	for _, g := range []int64{-5, math.MinInt64, 100, 1000, math.MaxInt64} {
		if err := s.Reserve(1); err != nil {
			t.Fatal(err)
		}
		ext, err := s.Alloc(1, g)
		if err != nil || len(ext) != 1 || ext[0].Len != 1 {
			t.Fatalf("Alloc(1, %d) = %v, %v", g, ext, err)
		}
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvAllocBestFitAndGoal(t *testing.T) {
	// used: everything except free extents [10,20) len10, [30,35) len5, [40,47) len7, [60,67) len7
	used := []reserve.Extent{{0, 10}, {20, 10}, {35, 5}, {47, 13}, {67, 33}}
	s, err := reserve.NewAllocator(100, used)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(6); err != nil {
		t.Fatal(err)
	}
	// best fit for 6 is a 7-extent; goal 66 is nearer to [60,67).
	got, err := s.Alloc(6, 66)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Len != 6 || got[0].Start < 60 || got[0].End() > 67 {
		t.Fatalf("best fit near goal 66: %v", got)
	}
	// goal inside a free extent with room: exactly at goal.
	if err := s.Reserve(3); err != nil {
		t.Fatal(err)
	}
	got, err = s.Alloc(3, 12)
	if err != nil || !slices.Equal(got, []reserve.Extent{{12, 3}}) {
		t.Fatalf("Alloc at goal = %v, %v", got, err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvAllocFewestPieces(t *testing.T) {
	// free extents of 3, 5, 2 blocks
	used := []reserve.Extent{{0, 10}, {13, 7}, {25, 5}, {32, 68}}
	s, err := reserve.NewAllocator(100, used)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(9); err != nil {
		t.Fatal(err)
	}
	got, err := s.Alloc(9, -1)
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, e := range got {
		sum += e.Len
	}
	if sum != 9 || len(got) != 3 {
		t.Fatalf("fewest pieces: %v", got)
	}
	if got[0] != (reserve.Extent{20, 5}) || got[1] != (reserve.Extent{10, 3}) {
		t.Fatalf("largest pieces first: %v", got)
	}
	if c := s.Counts(); c.Reserved != 0 || c.Free != 1 || c.Allocated != 99 {
		t.Fatalf("counts %+v", c)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvHeldWindows(t *testing.T) {
	s, err := reserve.NewAllocator(100, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range [][2]int64{{-1, 5}, {100, 5}, {5, 0}, {5, -1}, {math.MaxInt64, 1}} {
		if h := s.HoldAt(c[0], c[1]); h.Len != 0 {
			t.Errorf("HoldAt(%d, %d) = %v", c[0], c[1], h)
		}
	}
	h := s.HoldAt(50, 1000)
	if h != (reserve.Extent{50, 50}) {
		t.Fatalf("HoldAt(50, 1000) = %v", h)
	}
	if err := s.Reserve(100); err != nil { // held blocks count as free
		t.Fatal(err)
	}
	got, err := s.Alloc(50, 60)
	if err != nil || !slices.Equal(got, []reserve.Extent{{0, 50}}) {
		t.Fatalf("Alloc with a window = %v, %v", got, err)
	}
	if _, err := s.Alloc(1, 60); !errors.Is(err, reserve.ErrBusy) {
		t.Fatalf("Alloc into held: %v", err)
	}
	before := advSnap(s)
	for _, e := range []reserve.Extent{{40, 20}, {99, 2}, {10, 1}, {-1, 1}} {
		if err := s.ClaimHeld(e); !errors.Is(err, reserve.ErrInvalid) {
			t.Errorf("ClaimHeld(%v) = %v", e, err)
		}
		if err := s.Unhold(e); !errors.Is(err, reserve.ErrInvalid) {
			t.Errorf("Unhold(%v) = %v", e, err)
		}
		if !advEqual(advSnap(s), before) {
			t.Fatal("failed ClaimHeld/Unhold changed state")
		}
	}
	if err := s.ClaimHeld(reserve.Extent{60, 10}); err != nil {
		t.Fatal(err)
	}
	if err := s.Unhold(reserve.Extent{50, 10}); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimHeld(reserve.Extent{55, 1}); !errors.Is(err, reserve.ErrInvalid) {
		t.Fatalf("ClaimHeld of unheld: %v", err)
	}
	if c := s.Counts(); c.Allocated != 60 || c.Reserved != 40 || c.Free != 0 {
		t.Fatalf("counts %+v", c)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

// TestAdvSpaceModel checks Space against a per-block model written from the
// issue text alone.
func TestAdvSpaceModel(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		total := rapid.Int64Range(1, 200).Draw(rt, "total")
		const (
			sUsed = iota
			sFree
			sBusy
		)
		state := make([]int, total)
		busySeq := make([]uint64, total)
		for i := range state {
			state[i] = sFree
		}
		var used []reserve.Extent
		for pos := int64(0); pos < total; {
			n := rapid.Int64Range(1, total-pos).Draw(rt, "n")
			if rapid.Bool().Draw(rt, "used") {
				used = append(used, reserve.Extent{pos, n})
				for b := pos; b < pos+n; b++ {
					state[b] = sUsed
				}
			}
			pos += n
		}
		s, err := reserve.NewAllocator(total, used)
		if err != nil {
			rt.Fatal(err)
		}
		var reserved int64
		var seq, committed uint64
		count := func(st int) (n int64) {
			for _, x := range state {
				if x == st {
					n++
				}
			}
			return
		}
		runs := func() (r []reserve.Extent) {
			for b := int64(0); b < total; {
				if state[b] != sFree {
					b++
					continue
				}
				e := b
				for e < total && state[e] == sFree {
					e++
				}
				r = append(r, reserve.Extent{b, e - b})
				b = e
			}
			return
		}
		check := func() {
			c := s.Counts()
			if advSum(c) != total || c.Reserved != reserved || c.Allocated != count(sUsed) || c.Free != total-reserved-count(sUsed) {
				rt.Fatalf("counts %+v; model reserved %d used %d", c, reserved, count(sUsed))
			}
			if got, want := advFreeList(s), runs(); !slices.Equal(got, want) {
				rt.Fatalf("free extents %v, model %v", got, want)
			}
			if err := s.Check(); err != nil {
				rt.Fatal(err)
			}
		}
		check()
		for i := rapid.IntRange(1, 60).Draw(rt, "steps"); i > 0; i-- {
			switch rapid.IntRange(0, 4).Draw(rt, "op") {
			case 0:
				n := rapid.Int64Range(-1, total+1).Draw(rt, "res")
				err := s.Reserve(n)
				spend := total - count(sUsed) - reserved
				switch {
				case n < 0:
					if !errors.Is(err, reserve.ErrInvalid) {
						rt.Fatalf("Reserve(%d) = %v", n, err)
					}
				case n > spend:
					if !errors.Is(err, reserve.ErrNoSpace) {
						rt.Fatalf("Reserve(%d) with %d spendable = %v", n, spend, err)
					}
				default:
					if err != nil {
						rt.Fatalf("Reserve(%d) = %v", n, err)
					}
					reserved += n
				}
			case 1:
				n := rapid.Int64Range(0, reserved+1).Draw(rt, "unres")
				err := s.Unreserve(n)
				if n > reserved {
					if !errors.Is(err, reserve.ErrInvalid) {
						rt.Fatalf("Unreserve(%d) of %d = %v", n, reserved, err)
					}
				} else if err != nil {
					rt.Fatal(err)
				} else {
					reserved -= n
				}
			case 2:
				want := rapid.Int64Range(0, reserved+1).Draw(rt, "want")
				goal := rapid.Int64Range(-1, total).Draw(rt, "goal")
				got, err := s.Alloc(want, goal)
				free := count(sFree)
				switch {
				case want > reserved:
					if !errors.Is(err, reserve.ErrInvalid) && !errors.Is(err, reserve.ErrNoSpace) {
						rt.Fatalf("Alloc(%d) over reservation %d = %v", want, reserved, err)
					}
					if err == nil {
						rt.Fatalf("Alloc(%d) over reservation %d succeeded: %v", want, reserved, got)
					}
				case want > free:
					if !errors.Is(err, reserve.ErrBusy) || !errors.Is(err, reserve.ErrNoSpace) {
						rt.Fatalf("Alloc(%d) with %d allocatable = %v", want, free, err)
					}
				default:
					if err != nil {
						rt.Fatalf("Alloc(%d) = %v", want, err)
					}
					// Best fit: if some free run is >= want, one extent,
					// from a run of the smallest such length.
					best := int64(-1)
					for _, r := range runs() {
						if r.Len >= want && (best < 0 || r.Len < best) {
							best = r.Len
						}
					}
					var sum int64
					for _, e := range got {
						if e.Len <= 0 {
							rt.Fatalf("empty extent %v", got)
						}
						sum += e.Len
						for b := e.Start; b < e.End(); b++ {
							if b < 0 || b >= total || state[b] != sFree {
								rt.Fatalf("Alloc returned %v: block %d not allocatable", got, b)
							}
						}
					}
					if want > 0 && best > 0 {
						if len(got) != 1 {
							rt.Fatalf("Alloc(%d) = %v though a run of %d fits", want, got, best)
						}
						inGoalRun := false
						for _, r := range runs() {
							if goal >= r.Start && goal+want <= r.End() {
								inGoalRun = true
							}
						}
						if inGoalRun {
							if got[0].Start != goal {
								rt.Fatalf("Alloc(%d, goal %d) = %v, want at goal", want, goal, got)
							}
						} else {
							for _, r := range runs() {
								if r.Start <= got[0].Start && got[0].End() <= r.End() && r.Len != best {
									rt.Fatalf("Alloc(%d) = %v from run %v, best fit is %d", want, got, r, best)
								}
							}
						}
					}
					if sum != want {
						rt.Fatalf("Alloc(%d) = %v sums to %d", want, got, sum)
					}
					for _, e := range got {
						for b := e.Start; b < e.End(); b++ {
							state[b] = sUsed
						}
					}
					reserved -= want
				}
			case 3:
				st := rapid.Int64Range(-1, total).Draw(rt, "fs")
				n := rapid.Int64Range(-1, total).Draw(rt, "fn")
				e := reserve.Extent{st, n}
				sq := uint64(rapid.IntRange(0, 10).Draw(rt, "seq"))
				valid := st >= 0 && n >= 0 && st+n <= total
				if valid {
					for b := st; b < st+n; b++ {
						if state[b] != sUsed {
							valid = false
						}
					}
				}
				err := s.Free(e, sq)
				if !valid {
					if !errors.Is(err, reserve.ErrInvalid) {
						rt.Fatalf("Free(%v) = %v, want ErrInvalid", e, err)
					}
				} else {
					if err != nil {
						rt.Fatalf("Free(%v) = %v", e, err)
					}
					for b := st; b < st+n; b++ {
						if seq > 0 && sq <= committed {
							state[b] = sFree
						} else {
							state[b] = sBusy
							busySeq[b] = sq
						}
					}
				}
			case 4:
				sq := uint64(rapid.IntRange(0, 10).Draw(rt, "commit"))
				s.Commit(sq)
				seq = 1 // a commit happened
				committed = max(committed, sq)
				for b := range state {
					if state[b] == sBusy && busySeq[b] <= sq {
						state[b] = sFree
					}
				}
			}
			check()
		}
	})
}

// TestAdvHugeSpaceLengthTiers puts free extents of lengths around the
// index's internal thresholds (256, 65536) at block numbers near MaxTotal.
func TestAdvHugeSpaceLengthTiers(t *testing.T) {
	// (At MaxTotal the outstanding reservation is capped at 2^16-1, as
	// documented; 2^40 leaves room for the requests below.)
	const T = 1<<40 + 12345
	lens := []int64{65537, 255, 65535, 1, 257, 65536, 256, 1 << 39}
	// free extents laid out from the top of the space downwards, separated by used gaps
	var free []reserve.Extent
	pos := int64(T)
	for _, l := range lens {
		pos -= l
		free = append(free, reserve.Extent{Start: pos, Len: l})
		pos -= 3 // used gap
	}
	slices.SortFunc(free, func(a, b reserve.Extent) int {
		if a.Start < b.Start {
			return -1
		}
		return 1
	})
	var used []reserve.Extent
	p := int64(0)
	for _, f := range free {
		if f.Start > p {
			used = append(used, reserve.Extent{Start: p, Len: f.Start - p})
		}
		p = f.End()
	}
	if p < T {
		used = append(used, reserve.Extent{Start: p, Len: T - p})
	}
	s, err := reserve.NewAllocator(T, used)
	if err != nil {
		t.Fatal(err)
	}
	if got := advFreeList(s); !slices.Equal(got, free) {
		t.Fatalf("free %v want %v", got, free)
	}
	if lf := s.LargestFree(); lf.Len != 1<<39 {
		t.Fatalf("LargestFree %v", lf)
	}
	byLen := map[int64]reserve.Extent{}
	for _, f := range free {
		byLen[f.Len] = f
	}
	// Each exact-length request must take exactly the extent of that length (best fit).
	for _, l := range []int64{65536, 256, 65535, 255, 65537, 257, 1} {
		if err := s.Reserve(l); err != nil {
			t.Fatal(err)
		}
		got, err := s.Alloc(l, -1)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0] != byLen[l] {
			t.Fatalf("Alloc(%d) = %v, want %v", l, got, byLen[l])
		}
		if err := s.Check(); err != nil {
			t.Fatal(err)
		}
	}
	// Give them back, commit: coalescing is not possible (used gaps), lengths restored.
	for i, l := range []int64{65536, 256, 65535, 255, 65537, 257, 1} {
		if err := s.Free(byLen[l], uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	s.Commit(100)
	if got := advFreeList(s); !slices.Equal(got, free) {
		t.Fatalf("after free: %v want %v", got, free)
	}
	// Free the used gaps between the top extents and check full coalescing.
	for i := 1; i < len(free); i++ {
		gap := reserve.Extent{Start: free[i-1].End(), Len: free[i].Start - free[i-1].End()}
		if err := s.Free(gap, 200); err != nil {
			t.Fatal(err)
		}
	}
	s.Commit(200)
	got := advFreeList(s)
	if len(got) != 1 || got[0].Start != free[0].Start || got[0].End() != T {
		t.Fatalf("not coalesced: %v", got)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	c := s.Counts()
	if advSum(c) != T || c.Free != T-free[0].Start {
		t.Fatalf("counts %+v", c)
	}
	// SetMaxExtent splits a large allocation.
	if err := s.SetMaxExtent(0); !errors.Is(err, reserve.ErrInvalid) {
		t.Fatalf("SetMaxExtent(0) = %v", err)
	}
	if err := s.SetMaxExtent(1000); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(2500); err != nil {
		t.Fatal(err)
	}
	ext, err := s.Alloc(2500, T-2500)
	if err != nil {
		t.Fatal(err)
	}
	want := []reserve.Extent{{T - 2500, 1000}, {T - 1500, 1000}, {T - 500, 500}}
	if !slices.Equal(ext, want) {
		t.Fatalf("capped Alloc = %v want %v", ext, want)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvTopOfMaxTotal(t *testing.T) {
	const T = reserve.MaxTotal
	s, err := reserve.NewAllocator(T, []reserve.Extent{{0, T - 10}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(5); err != nil {
		t.Fatal(err)
	}
	got, err := s.Alloc(5, T-1)
	if err != nil || len(got) != 1 || got[0].End() > T || got[0].Start < T-10 {
		t.Fatalf("Alloc near top = %v, %v", got, err)
	}
	if err := s.Free(reserve.Extent{T - 1, 1}, 1); err == nil && got[0].End() != T {
		t.Fatal("freed a free block")
	}
	if err := s.Free(reserve.Extent{0, T - 10}, 2); err != nil {
		t.Fatal(err)
	}
	s.Commit(2)
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	if lf := s.LargestFree(); lf.Len < T-10 {
		t.Fatalf("LargestFree %v", lf)
	}
	if c := s.Counts(); advSum(c) != T {
		t.Fatalf("counts %+v", c)
	}
}

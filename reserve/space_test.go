package reserve

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
)

func newSpace(t *testing.T, total int64, used ...Extent) *Space {
	t.Helper()
	s, err := NewSpace(total, used)
	if err != nil {
		t.Fatal(err)
	}
	mustCheck(t, s)
	return s
}

func mustCheck(t *testing.T, s *Space) {
	t.Helper()
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func freeList(s *Space) []Extent {
	var out []Extent
	s.FreeExtents(func(e Extent) bool { out = append(out, e); return true })
	return out
}

func mustFree(t *testing.T, s *Space, want ...Extent) {
	t.Helper()
	if got := freeList(s); !slices.Equal(got, want) {
		t.Fatalf("free extents %v, want %v", got, want)
	}
	mustCheck(t, s)
}

// alloc reserves want blocks and allocates them.
func alloc(t *testing.T, s *Space, want, goal int64) []Extent {
	t.Helper()
	if err := s.Reserve(want); err != nil {
		t.Fatal(err)
	}
	got, err := s.Alloc(want, goal)
	if err != nil {
		t.Fatal(err)
	}
	mustCheck(t, s)
	return got
}

func wantInvalid(t *testing.T, err error, mentions ...string) {
	t.Helper()
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("error %v, want ErrInvalid", err)
	}
	for _, m := range mentions {
		if !strings.Contains(err.Error(), m) {
			t.Errorf("error %q does not mention %q", err, m)
		}
	}
}

func TestExtentString(t *testing.T) {
	if got := (Extent{Start: 7, Len: 3}).String(); got != "[7+3]" {
		t.Fatalf("String = %q", got)
	}
	if got := (Extent{Start: 7, Len: 3}).End(); got != 10 {
		t.Fatalf("End = %d", got)
	}
}

func TestNewSpace(t *testing.T) {
	s := newSpace(t, 100, Extent{50, 10}, Extent{0, 8}, Extent{8, 2}, Extent{30, 0})
	mustFree(t, s, Extent{10, 40}, Extent{60, 40})
	if st := s.Stats(); st != (Stats{Total: 100, Free: 80, Allocated: 20, Allocatable: 80, FreeExtents: 2, LargestFree: 40}) {
		t.Fatalf("Stats %+v", st)
	}
	if _, err := NewAllocator(100, nil); err != nil {
		t.Fatal(err)
	}
	// A space with nothing free, and an empty one, are valid.
	mustFree(t, newSpace(t, 10, Extent{0, 10}))
	mustFree(t, newSpace(t, 0))
}

func TestNewSpaceRejectsBadUsedExtents(t *testing.T) {
	for _, c := range []struct {
		total    int64
		used     []Extent
		mentions []string
	}{
		{100, []Extent{{10, 10}, {15, 10}}, []string{"[15+10]", "[10+10]", "overlaps"}},
		{100, []Extent{{0, 50}, {60, 5}, {20, 1}}, []string{"[20+1]", "[0+50]"}},
		{100, []Extent{{95, 10}}, []string{"[95+10]", "past the last block"}},
		{100, []Extent{{-1, 2}}, []string{"[-1+2]", "negative start"}},
		{100, []Extent{{5, -2}}, []string{"[5+-2]", "negative length"}},
		{100, []Extent{{math.MaxInt64, 1}}, []string{"overflows"}},
		{-1, nil, []string{"total -1"}},
		{MaxTotal + 1, nil, []string{"total"}},
	} {
		_, err := NewSpace(c.total, c.used)
		wantInvalid(t, err, c.mentions...)
	}
}

func TestZeroLengthAndNegative(t *testing.T) {
	s := newSpace(t, 100, Extent{0, 50})
	before := s.Stats()

	if err := s.Reserve(0); err != nil {
		t.Errorf("Reserve(0) = %v", err)
	}
	if err := s.Unreserve(0); err != nil {
		t.Errorf("Unreserve(0) = %v", err)
	}
	if got, err := s.Alloc(0, 10); err != nil || got != nil {
		t.Errorf("Alloc(0) = %v, %v; want nil, nil", got, err)
	}
	for _, e := range []Extent{{5, 0}, {0, 0}, {100, 0}} {
		if err := s.Free(e, 1); err != nil {
			t.Errorf("Free(%v) = %v, want nil (no-op)", e, err)
		}
		if err := s.ClaimHeld(e); err != nil {
			t.Errorf("ClaimHeld(%v) = %v, want nil (no-op)", e, err)
		}
		if err := s.Unhold(e); err != nil {
			t.Errorf("Unhold(%v) = %v, want nil (no-op)", e, err)
		}
	}
	// A zero-length extent is still checked for range.
	wantInvalid(t, s.Free(Extent{101, 0}, 1), "[101+0]")
	wantInvalid(t, s.Free(Extent{-1, 0}, 1), "[-1+0]")
	if h := s.HoldAt(60, 0); h != (Extent{60, 0}) {
		t.Errorf("HoldAt(60, 0) = %v", h)
	}

	wantInvalid(t, s.Reserve(-1), "negative")
	wantInvalid(t, s.Unreserve(-1), "negative")
	_, err := s.Alloc(-1, 0)
	wantInvalid(t, err, "negative")
	wantInvalid(t, s.Free(Extent{10, -1}, 1), "[10+-1]")
	wantInvalid(t, s.SetMaxExtent(0))
	if h := s.HoldAt(60, -5); h.Len != 0 {
		t.Errorf("HoldAt(60, -5) = %v", h)
	}
	if h := s.HoldAt(-1, 5); h.Len != 0 {
		t.Errorf("HoldAt(-1, 5) = %v", h)
	}
	if h := s.HoldAt(100, 5); h.Len != 0 {
		t.Errorf("HoldAt(100, 5) = %v", h)
	}

	if after := s.Stats(); after != before {
		t.Fatalf("zero-length and invalid calls changed the space: %+v -> %+v", before, after)
	}
	mustCheck(t, s)
}

// Free extents on both sides of shortLen, where the by-size index hands
// over from the packed keys to the tree of long extents, and the longest
// short length at the top of the largest space, where the packed search key
// for a goal past the end would overflow.
func TestShortAndLongFreeExtents(t *testing.T) {
	const L = shortLen
	// Free: [0+L-1], [L+L], [2L+1+L+1], [3L+3+5L], separated by used blocks.
	total := int64(8*L + 3)
	s := newSpace(t, total, Extent{L - 1, 1}, Extent{2 * L, 1}, Extent{3*L + 2, 1})
	if f := s.LargestFree(); f != (Extent{3*L + 3, 5 * L}) {
		t.Fatalf("LargestFree = %v", f)
	}
	// Best fit across the two trees: each length finds its own extent.
	for _, c := range []struct {
		want, goal int64
		got        Extent
	}{
		{L + 1, -1, Extent{2*L + 1, L + 1}},
		{L - 1, 3 * L, Extent{0, L - 1}},
		{L, -1, Extent{L, L}},
		{L + 2, 0, Extent{3*L + 3, L + 2}},
	} {
		got := alloc(t, s, c.want, c.goal)
		if !slices.Equal(got, []Extent{c.got}) {
			t.Fatalf("Alloc(%d, %d) = %v, want %v", c.want, c.goal, got, c.got)
		}
		mustCheck(t, s)
	}
	mustFree(t, s, Extent{3*L + 3 + L + 2, 4*L - 2})
	// Freeing them back coalesces across the threshold.
	for _, e := range []Extent{{2*L + 1, L + 1}, {0, L - 1}, {L, L}, {3*L + 3, L + 2}} {
		if err := s.Free(e, 1); err != nil {
			t.Fatal(err)
		}
	}
	s.Commit(1)
	mustCheck(t, s)
	mustFree(t, s, Extent{0, L - 1}, Extent{L, L}, Extent{2*L + 1, L + 1}, Extent{3*L + 3, 5 * L})

	// The top of the largest space: free extents of L-1 blocks (the
	// longest short length) and L at the very end, goal past the end.
	const top = MaxTotal
	s = newSpace(t, top, Extent{0, top - 3*L}, Extent{top - 2*L - 1, 1}, Extent{top - L - 1, 2})
	mustFree(t, s, Extent{top - 3*L, L - 1}, Extent{top - 2*L, L - 1}, Extent{top - L + 1, L - 1})
	got := alloc(t, s, L-1, top)
	if !slices.Equal(got, []Extent{{top - L + 1, L - 1}}) {
		t.Fatalf("Alloc(L-1, top) = %v", got)
	}
	got = alloc(t, s, L-2, top)
	if !slices.Equal(got, []Extent{{top - 2*L + 1, L - 2}}) {
		t.Fatalf("Alloc(L-2, top) = %v", got)
	}
	mustCheck(t, s)
}

// Extents at the very top of the largest supported space.
func TestMaximumBlockNumber(t *testing.T) {
	const total = MaxTotal
	s := newSpace(t, total, Extent{0, total - 10})
	mustFree(t, s, Extent{total - 10, 10})

	got := alloc(t, s, 4, total) // a goal past the end is clamped
	if !slices.Equal(got, []Extent{{total - 4, 4}}) {
		t.Fatalf("Alloc at the top = %v", got)
	}
	got = alloc(t, s, 6, -1)
	if !slices.Equal(got, []Extent{{total - 10, 6}}) {
		t.Fatalf("Alloc of the rest = %v", got)
	}
	mustFree(t, s)

	wantInvalid(t, s.Free(Extent{total, 1}, 1), "past the last block")
	wantInvalid(t, s.Free(Extent{total - 1, 2}, 1), "past the last block")
	wantInvalid(t, s.Free(Extent{math.MaxInt64, 1}, 1), "overflows")
	wantInvalid(t, s.Free(Extent{math.MaxInt64 - 1, math.MaxInt64}, 1), "overflows")

	if err := s.Free(Extent{total - 1, 1}, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.Free(Extent{total - 10, 9}, 1); err != nil {
		t.Fatal(err)
	}
	s.Commit(1)
	mustFree(t, s, Extent{total - 10, 10})
	if h := s.HoldAt(total-1, 5); h != (Extent{total - 1, 1}) {
		t.Fatalf("HoldAt(last block) = %v", h)
	}
	if err := s.Unhold(Extent{total - 1, 1}); err != nil {
		t.Fatal(err)
	}
	mustFree(t, s, Extent{total - 10, 10})
}

func TestAllocGoalBestFitAndFragmented(t *testing.T) {
	// Free runs: [10+5] [20+3] [30+8] [50+3] [60+40].
	s := newSpace(t, 100, Extent{0, 10}, Extent{15, 5}, Extent{23, 7}, Extent{38, 12}, Extent{53, 7})
	mustFree(t, s, Extent{10, 5}, Extent{20, 3}, Extent{30, 8}, Extent{50, 3}, Extent{60, 40})

	// Best fit: the two 3-block runs fit exactly; the one nearer goal 49 wins.
	if got := alloc(t, s, 3, 49); !slices.Equal(got, []Extent{{50, 3}}) {
		t.Fatalf("best fit near 49 = %v", got)
	}
	// Goal inside a run with room: exactly at goal, even though a smaller
	// run would fit.
	if got := alloc(t, s, 2, 62); !slices.Equal(got, []Extent{{62, 2}}) {
		t.Fatalf("goal 62 = %v", got)
	}
	mustFree(t, s, Extent{10, 5}, Extent{20, 3}, Extent{30, 8}, Extent{60, 2}, Extent{64, 36})
	// Appending: the next extent lands right after the previous one.
	if got := alloc(t, s, 5, 64); !slices.Equal(got, []Extent{{64, 5}}) {
		t.Fatalf("append at 64 = %v", got)
	}
	// Goal with no room: best fit elsewhere (4 blocks -> the 5-block run),
	// placed at its end, nearest goal 21.
	if got := alloc(t, s, 4, 21); !slices.Equal(got, []Extent{{11, 4}}) {
		t.Fatalf("best fit for 4 = %v", got)
	}
	// The allocation sits at the end of the extent nearest goal: goal 99 is
	// after [30+8], the only 8-block run, so the 7 blocks end at 38.
	if got := alloc(t, s, 7, 99); !slices.Equal(got, []Extent{{31, 7}}) {
		t.Fatalf("best fit for 7 near 99 = %v", got)
	}
	mustFree(t, s, Extent{10, 1}, Extent{20, 3}, Extent{30, 1}, Extent{60, 2}, Extent{69, 31})

	// Too fragmented for one extent: largest first, fewest extents.
	if got := alloc(t, s, 34, -1); !slices.Equal(got, []Extent{{69, 31}, {20, 3}}) {
		t.Fatalf("fragmented 34 = %v", got)
	}
	mustFree(t, s, Extent{10, 1}, Extent{30, 1}, Extent{60, 2})
	// Equal lengths: the one nearest the goal, which moves along.
	if got := alloc(t, s, 4, -1); !slices.Equal(got, []Extent{{60, 2}, {30, 1}, {10, 1}}) {
		t.Fatalf("fragmented 4 = %v", got)
	}
	mustFree(t, s)
	if st := s.Stats(); st.Allocated != 100 || st.Free != 0 || st.Reserved != 0 {
		t.Fatalf("Stats %+v", st)
	}
}

func TestLargestFree(t *testing.T) {
	s := newSpace(t, 100, Extent{0, 10}, Extent{20, 10}, Extent{40, 50})
	// Free: [10+10] [30+10] [90+10]: three of the same length.
	if got := s.LargestFree(); got != (Extent{10, 10}) {
		t.Fatalf("LargestFree = %v, want the lowest of the longest", got)
	}
	alloc(t, s, 10, 10)
	alloc(t, s, 5, 30)
	// Free: [35+5] [90+10].
	if got := s.LargestFree(); got != (Extent{90, 10}) {
		t.Fatalf("LargestFree = %v, want [90+10]", got)
	}
	if got := newSpace(t, 5, Extent{0, 5}).LargestFree(); got != (Extent{}) {
		t.Fatalf("LargestFree of a full space = %v", got)
	}
}

func TestAllocMaxExtent(t *testing.T) {
	s := newSpace(t, 100, Extent{0, 3})
	if got := s.MaxExtent(); got != DefaultMaxExtent {
		t.Fatalf("MaxExtent %d, want default %d", got, DefaultMaxExtent)
	}
	// Without a cap, one extent of exactly the length asked for, however
	// long, when a free extent holds it.
	big := newSpace(t, 1<<30)
	if got := alloc(t, big, 1<<29+5, 0); !slices.Equal(got, []Extent{{0, 1<<29 + 5}}) {
		t.Fatalf("Alloc(2^29+5) of a free 2^30 = %v, want one extent", got)
	}
	if err := s.SetMaxExtent(4); err != nil {
		t.Fatal(err)
	}
	if got := alloc(t, s, 10, -1); !slices.Equal(got, []Extent{{3, 4}, {7, 4}, {11, 2}}) {
		t.Fatalf("Alloc(10) with max 4 = %v", got)
	}
}

// Fragmented allocations take MaxExtent pieces and keep going in the run
// they are in rather than alternating between runs of equal length.
func TestAllocFragmentedStaysInOrder(t *testing.T) {
	s := newSpace(t, 40, Extent{15, 5}, Extent{35, 5})
	if err := s.SetMaxExtent(4); err != nil {
		t.Fatal(err)
	}
	got := alloc(t, s, 30, -1)
	want := []Extent{{0, 4}, {4, 4}, {8, 4}, {20, 4}, {24, 4}, {28, 4}, {32, 3}, {12, 3}}
	if !slices.Equal(got, want) {
		t.Fatalf("Alloc(30) = %v, want %v", got, want)
	}
	mustFree(t, s)
}

func TestAllocNeedsReservation(t *testing.T) {
	s := newSpace(t, 100)
	if err := s.Reserve(5); err != nil {
		t.Fatal(err)
	}
	_, err := s.Alloc(6, 0)
	wantInvalid(t, err, "only 5 reserved")
	if st := s.Stats(); st.Reserved != 5 || st.Allocatable != 100 {
		t.Fatalf("failed Alloc changed the space: %+v", st)
	}
	mustCheck(t, s)
}

func TestBusyExtentsWaitForCommit(t *testing.T) {
	s := newSpace(t, 20, Extent{0, 20})
	if err := s.Free(Extent{0, 10}, 5); err != nil {
		t.Fatal(err)
	}
	if err := s.Free(Extent{10, 10}, 6); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Free != 20 || st.Busy != 20 || st.Allocatable != 0 || st.FreeExtents != 0 {
		t.Fatalf("after Free: %+v", st)
	}
	// Busy blocks count as free, so the reservation succeeds...
	if err := s.Reserve(5); err != nil {
		t.Fatal(err)
	}
	// ...but they are not handed out before the freeing record is durable.
	_, err := s.Alloc(5, 0)
	if !errors.Is(err, ErrBusy) || !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Alloc over busy space: %v, want ErrBusy and ErrNoSpace", err)
	}
	s.Commit(4)
	if _, err := s.Alloc(5, 0); !errors.Is(err, ErrBusy) {
		t.Fatalf("Alloc after Commit(4): %v", err)
	}
	s.Commit(5)
	mustFree(t, s, Extent{0, 10})
	if got, err := s.Alloc(5, 0); err != nil || !slices.Equal(got, []Extent{{0, 5}}) {
		t.Fatalf("Alloc after Commit(5) = %v, %v", got, err)
	}
	// A double free of a busy extent names both.
	wantInvalid(t, s.Free(Extent{12, 2}, 7), "[12+2]", "[10+10]", "sequence 6")
	s.Commit(6)
	mustFree(t, s, Extent{5, 15})
	// Freed at a sequence already committed: allocatable at once, coalesced.
	if err := s.Free(Extent{0, 5}, 6); err != nil {
		t.Fatal(err)
	}
	mustFree(t, s, Extent{0, 20})
	// A commit going backwards changes nothing.
	s.Commit(2)
	mustFree(t, s, Extent{0, 20})
}

func TestFreeRejectsDoubleAndOverlappingFrees(t *testing.T) {
	s := newSpace(t, 100, Extent{0, 50})
	before := s.Stats()
	wantInvalid(t, s.Free(Extent{45, 10}, 1), "[45+10]", "free extent [50+50]")
	wantInvalid(t, s.Free(Extent{50, 1}, 1), "[50+1]", "double free")
	h := s.HoldAt(50, 5)
	wantInvalid(t, s.Free(Extent{52, 1}, 1), "[52+1]", "held window [50+5]")
	if err := s.Unhold(h); err != nil {
		t.Fatal(err)
	}
	if after := s.Stats(); after != before {
		t.Fatalf("rejected frees changed the space: %+v -> %+v", before, after)
	}
	if err := s.Free(Extent{10, 10}, 1); err != nil {
		t.Fatal(err)
	}
	wantInvalid(t, s.Free(Extent{10, 10}, 2), "[10+10]", "already freed")
	mustCheck(t, s)
}

func TestWindows(t *testing.T) {
	s := newSpace(t, 100, Extent{0, 10})
	h := s.HoldAt(20, 30)
	if h != (Extent{20, 30}) {
		t.Fatalf("HoldAt = %v", h)
	}
	mustFree(t, s, Extent{10, 10}, Extent{50, 50})
	st := s.Stats()
	if st.Held != 30 || st.Free != 90 || st.Allocatable != 60 {
		t.Fatalf("held space must stay free in the accounting: %+v", st)
	}
	// Holding again inside a window, or a used block, gets nothing.
	if h := s.HoldAt(25, 5); h.Len != 0 {
		t.Fatalf("HoldAt inside a window = %v", h)
	}
	if h := s.HoldAt(5, 5); h.Len != 0 {
		t.Fatalf("HoldAt a used block = %v", h)
	}
	// HoldAt stops at the end of the free run.
	if h := s.HoldAt(15, 100); h != (Extent{15, 5}) {
		t.Fatalf("HoldAt(15, 100) = %v", h)
	}
	// Touching windows merge: [15+35].
	if st := s.Stats(); st.Held != 35 {
		t.Fatalf("Held %d", st.Held)
	}
	// Alloc never takes held blocks.
	got := alloc(t, s, 50, 20)
	if !slices.Equal(got, []Extent{{50, 50}}) {
		t.Fatalf("Alloc beside windows = %v", got)
	}
	// Claiming needs a reservation.
	wantInvalid(t, s.ClaimHeld(Extent{20, 4}), "[20+4]", "reserved")
	if err := s.Reserve(4); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimHeld(Extent{20, 4}); err != nil {
		t.Fatal(err)
	}
	st = s.Stats()
	if st.Reserved != 0 || st.Allocated != 64 || st.Held != 31 {
		t.Fatalf("after ClaimHeld: %+v", st)
	}
	// Not inside one window.
	wantInvalid(t, s.ClaimHeld(Extent{18, 4}), "[18+4]", "held window")
	wantInvalid(t, s.Unhold(Extent{60, 1}), "[60+1]", "not in a held window")
	// Give the rest back: allocatable at once, coalesced with [10+5].
	if err := s.Unhold(Extent{15, 5}); err != nil {
		t.Fatal(err)
	}
	if err := s.Unhold(Extent{24, 26}); err != nil {
		t.Fatal(err)
	}
	mustFree(t, s, Extent{10, 10}, Extent{24, 26})
	if st := s.Stats(); st.Held != 0 || st.Free != 36 {
		t.Fatalf("after Unhold: %+v", st)
	}
}

// Check must notice broken invariants, not just pass. Each corruption keeps
// the other invariants intact (the accounting is adjusted to match) so that
// the check aimed at it is the one that fires.
func TestCheckDetectsCorruption(t *testing.T) {
	// Free space is [40+60].
	cases := []struct {
		name    string
		corrupt func(s *Space)
		want    string
	}{
		{"touching free extents", func(s *Space) {
			s.addFree(Extent{30, 10})
			s.acct.word.Add(10)
		}, "overlap or touch"},
		{"size index has another extent", func(s *Space) {
			s.deleteSize(Extent{40, 60})
			s.addSize(Extent{41, 60})
		}, "missing from the by-size index"},
		{"index lengths differ", func(s *Space) { s.addSize(Extent{5, 1}) }, "1 free extents by block, 2 by size"},
		{"counter off", func(s *Space) {
			s.freeBlocks++
			s.acct.word.Add(1)
		}, "free extents sum to 60 blocks, counter says 61"},
		{"accounting off", func(s *Space) { s.acct.word.Add(1) }, "accounting has free 61"},
		{"busy overlaps free", func(s *Space) {
			s.addBusy(busyExtent{Extent: Extent{45, 10}, seq: 9})
			s.acct.word.Add(10)
		}, "free extent [40+60] overlaps busy extent [45+10]"},
		{"busy missing from queue", func(s *Space) {
			s.byEnd.Set(1, 0|busyTag)
			s.busyBlocks++
			s.acct.word.Add(1)
		}, "1 busy extents by block, 0 in the sequence queue"},
		{"busy queue out of order", func(s *Space) {
			for _, b := range []busyExtent{{Extent: Extent{0, 1}, seq: 9, nearFree: true}, {Extent: Extent{1, 1}, seq: 8, nearFree: true}} {
				s.addBusy(b)
				s.acct.word.Add(1)
			}
		}, "out of order"},
		{"busy already committed", func(s *Space) {
			s.committed, s.anyCommit = 9, true
			s.addBusy(busyExtent{Extent: Extent{0, 1}, seq: 9})
			s.acct.word.Add(1)
		}, "already committed"},
		{"busy next to free, not marked", func(s *Space) {
			s.addBusy(busyExtent{Extent: Extent{30, 10}, seq: 9})
			s.acct.word.Add(10)
		}, "busy extent [30+10] touches [40+60] but is not marked"},
		{"stray mark", func(s *Space) { s.markNear(Extent{3, 1}) }, "no busy extent starts there"},
		{"busy in queue only", func(s *Space) {
			s.busyQueue = append(s.busyQueue, busyExtent{Extent: Extent{0, 1}, seq: 9})
			s.busyBlocks++
			s.acct.word.Add(1)
		}, "0 busy extents by block, 1 in the sequence queue"},
		{"extent in the wrong by-size tree", func(s *Space) {
			s.bySize.longLen = 10 // [40+60] now belongs in byLong
		}, "[40+60] missing from the by-size index"},
		{"held overlaps free", func(s *Space) {
			s.held.Set(90, 10)
			s.heldBlocks += 10
			s.acct.word.Add(10)
		}, "free extent [40+60] overlaps held extent [90+10]"},
		{"held windows touch", func(s *Space) {
			s.held.Set(0, 2)
			s.held.Set(2, 2)
			s.heldBlocks += 4
			s.acct.word.Add(4)
		}, "not merged"},
	}
	for _, c := range cases {
		s := newSpace(t, 100, Extent{0, 40})
		c.corrupt(s)
		err := s.Check()
		if err == nil {
			t.Errorf("%s: Check passed", c.name)
		} else if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Check said %q, want it to mention %q", c.name, err, c.want)
		}
	}
}

// addBusy puts b in the busy state as Free does, without its checks.
func (s *Space) addBusy(b busyExtent) {
	s.byEnd.Set(b.End(), b.Start|busyTag)
	s.busyQueue = append(s.busyQueue, b)
	s.busyBlocks += b.Len
}

// Concurrent writers reserve and unreserve without the lock while others
// allocate, free and commit; no block may be handed out twice.
func TestSpaceConcurrent(t *testing.T) {
	const total, workers = 1 << 14, 6
	iters := 3000
	if testing.Short() {
		iters = 500
	}
	s := newSpace(t, total, Extent{0, 64})
	owner := make([]int32, total) // who holds each block, guarded by ownerMu
	var ownerMu sync.Mutex
	var seqMu sync.Mutex
	var seq uint64
	var wg sync.WaitGroup
	for w := 1; w <= workers; w++ {
		wg.Add(1)
		go func(id int32) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(id), 7))
			var mine []Extent
			for i := 0; i < iters; i++ {
				switch op := r.IntN(10); {
				case op < 5:
					n := r.Int64N(40) + 1
					if err := s.Reserve(n); err != nil {
						if !errors.Is(err, ErrNoSpace) {
							t.Error(err)
							return
						}
						continue
					}
					use := r.Int64N(n + 1)
					got, err := s.Alloc(use, r.Int64N(total))
					if errors.Is(err, ErrBusy) {
						use = 0
					} else if err != nil {
						t.Error(err)
						return
					}
					if err := s.Unreserve(n - use); err != nil {
						t.Error(err)
						return
					}
					ownerMu.Lock()
					for _, e := range got {
						for b := e.Start; b < e.End(); b++ {
							if owner[b] != 0 {
								t.Errorf("block %d handed to %d while %d holds it", b, id, owner[b])
							}
							owner[b] = id
						}
					}
					ownerMu.Unlock()
					mine = append(mine, got...)
				case op < 8 && len(mine) > 0:
					k := r.IntN(len(mine))
					e := mine[k]
					mine = slices.Delete(mine, k, k+1)
					ownerMu.Lock()
					for b := e.Start; b < e.End(); b++ {
						owner[b] = 0
					}
					ownerMu.Unlock()
					seqMu.Lock()
					seq++
					fs := seq
					seqMu.Unlock()
					if err := s.Free(e, fs); err != nil {
						t.Error(err)
						return
					}
				default:
					seqMu.Lock()
					cs := seq
					seqMu.Unlock()
					s.Commit(cs)
					if r.IntN(20) == 0 {
						if err := s.Check(); err != nil {
							t.Error(err)
							return
						}
					}
				}
			}
			for _, e := range mine {
				ownerMu.Lock()
				for b := e.Start; b < e.End(); b++ {
					owner[b] = 0
				}
				ownerMu.Unlock()
				if err := s.Free(e, 0); err != nil {
					t.Error(err)
				}
			}
		}(int32(w))
	}
	wg.Wait()
	seqMu.Lock()
	s.Commit(seq)
	seqMu.Unlock()
	mustFree(t, s, Extent{64, total - 64})
	if st := s.Stats(); st.Reserved != 0 || st.Allocated != 64 || st.Busy != 0 {
		t.Fatalf("final Stats %+v", st)
	}
}

func TestHeldBefore(t *testing.T) {
	s, err := NewSpace(1000, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.HeldBefore(150); n != 0 {
		t.Fatalf("HeldBefore with nothing held = %d", n)
	}
	if w := s.HoldAt(100, 50); w != (Extent{100, 50}) {
		t.Fatalf("HoldAt = %v", w)
	}
	for b, want := range map[int64]int64{150: 50, 149: 0, 151: 0, 100: 0, 0: 0, 1000: 0} {
		if n := s.HeldBefore(b); n != want {
			t.Errorf("HeldBefore(%d) = %d, want %d", b, n, want)
		}
	}
}

// Space.Consume is the accounting half of Alloc: reserved blocks become
// allocated, taken from the free space, and the trees agree with the counts.
func TestSpaceConsume(t *testing.T) {
	s, err := NewAllocator(100, []Extent{{Start: 10, Len: 5}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Consume(1); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Consume without a reservation: %v, want ErrInvalid", err)
	}
	if err := s.Reserve(20); err != nil {
		t.Fatal(err)
	}
	if err := s.Consume(21); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Consume over the reservation: %v, want ErrInvalid", err)
	}
	if err := s.Consume(12); err != nil {
		t.Fatal(err)
	}
	if c := s.Counts(); c.Allocated != 17 || c.Reserved != 8 || c.Free+c.Reserved+c.Allocated != c.Total {
		t.Fatalf("counts after Consume(12): %+v", c)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	for _, n := range []int64{0, -1} {
		if err := s.Consume(n); err == nil && n < 0 {
			t.Fatalf("Consume(%d) accepted", n)
		}
	}
}

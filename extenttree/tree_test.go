package extenttree

import (
	"errors"
	"io/fs"
	"slices"
	"strings"
	"testing"
)

func seg(start, n int64, st State, phys int64) Segment {
	return Segment{Start: start, Len: n, State: st, Phys: phys}
}

func hole(start, n int64) Segment { return seg(start, n, Hole, -1) }

func mustCheck(t *testing.T, tr *Tree) {
	t.Helper()
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
}

func entriesOf(tr *Tree) []Segment {
	var out []Segment
	tr.All(func(s Segment) bool { out = append(out, s); return true })
	return out
}

func wantEntries(t *testing.T, tr *Tree, want ...Segment) {
	t.Helper()
	mustCheck(t, tr)
	if got := entriesOf(tr); !slices.Equal(got, want) {
		t.Fatalf("entries:\n got  %v\n want %v", got, want)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func mark(t *testing.T, tr *Tree, s, n, wantHoles int64) {
	t.Helper()
	h, err := tr.MarkDelalloc(s, n)
	must(t, err)
	if h != wantHoles {
		t.Fatalf("MarkDelalloc(%d, %d) = %d holes, want %d", s, n, h, wantHoles)
	}
}

func TestStateString(t *testing.T) {
	for st, want := range map[State]string{Hole: "hole", Delalloc: "delalloc", Unwritten: "unwritten", Written: "written", 9: "State(9)"} {
		if st.String() != want {
			t.Errorf("%d.String() = %q, want %q", st, st.String(), want)
		}
	}
}

func TestEmptyTree(t *testing.T) {
	tr := New()
	wantEntries(t, tr)
	if got := tr.Lookup(nil, 5, 10); !slices.Equal(got, []Segment{hole(5, 10)}) {
		t.Fatalf("Lookup on empty tree = %v", got)
	}
	if _, ok := tr.Last(); ok {
		t.Fatal("Last on empty tree reported an entry")
	}
	if e, b := tr.Count(Hole); e != 0 || b != 0 {
		t.Fatalf("Count(Hole) on empty tree = %d, %d", e, b)
	}
	freed, dropped, err := tr.Truncate(nil, 0)
	if err != nil || freed != nil || dropped != 0 || tr.Generation() != 0 {
		t.Fatalf("Truncate on empty tree = %v, %d, %v, gen %d", freed, dropped, err, tr.Generation())
	}
}

func TestSequentialAppendIsOneEntry(t *testing.T) {
	tr := New()
	for b := range int64(10000) {
		mark(t, tr, b, 1, 1)
	}
	wantEntries(t, tr, seg(0, 10000, Delalloc, -1))
	if tr.Generation() != 10000 {
		t.Fatalf("generation %d after 10000 changes", tr.Generation())
	}
	// Rewriting the tail changes nothing.
	mark(t, tr, 9990, 10, 0)
	if tr.Generation() != 10000 {
		t.Fatal("a write over delalloc blocks changed the generation")
	}
	// An append straddling the end reserves only the new part.
	mark(t, tr, 9995, 10, 5)
	wantEntries(t, tr, seg(0, 10005, Delalloc, -1))
}

func TestZeroLength(t *testing.T) {
	tr := New()
	mark(t, tr, 10, 5, 5)
	must(t, tr.SetUnwritten(10, 2, 100))
	g := tr.Generation()
	before := entriesOf(tr)
	for _, s := range []int64{0, 10, 12, 15, MaxBlock, BlockLimit} {
		mark(t, tr, s, 0, 0)
		if tr.CountHoles(s, 0) != 0 {
			t.Fatal("CountHoles of an empty range is not 0")
		}
		if got := tr.Lookup(nil, s, 0); len(got) != 0 {
			t.Fatalf("Lookup(%d, 0) = %v", s, got)
		}
		if got := tr.DelallocRanges(nil, s, 0); len(got) != 0 {
			t.Fatalf("DelallocRanges(%d, 0) = %v", s, got)
		}
		must(t, tr.SetUnwritten(s, 0, 500))
		must(t, tr.SetWritten(s, 0))
		if f, err := tr.RevertUnwritten(nil, s, 0); err != nil || f != nil {
			t.Fatalf("RevertUnwritten(%d, 0) = %v, %v", s, f, err)
		}
		must(t, tr.MapWritten(s, 0, 500))
		if f, d, err := tr.Punch(nil, s, 0); err != nil || f != nil || d != 0 {
			t.Fatalf("Punch(%d, 0) = %v, %d, %v", s, f, d, err)
		}
	}
	if tr.Generation() != g || !slices.Equal(entriesOf(tr), before) {
		t.Fatal("zero-length operations changed the tree")
	}
	mustCheck(t, tr)
}

func TestMaxBlock(t *testing.T) {
	tr := New()
	mark(t, tr, MaxBlock, 1, 1)
	mark(t, tr, MaxBlock-9, 10, 9)
	wantEntries(t, tr, seg(MaxBlock-9, 10, Delalloc, -1))
	if got := tr.DelallocRanges(nil, 0, -1); !slices.Equal(got, []Range{{MaxBlock - 9, 10}}) {
		t.Fatalf("DelallocRanges to the end = %v", got)
	}
	must(t, tr.SetUnwritten(MaxBlock-9, 10, MaxBlock-9))
	must(t, tr.SetWritten(MaxBlock-9, 10))
	if got := tr.Lookup(nil, MaxBlock-10, 11); !slices.Equal(got, []Segment{hole(MaxBlock-10, 1), seg(MaxBlock-9, 10, Written, MaxBlock-9)}) {
		t.Fatalf("Lookup at the top = %v", got)
	}
	freed, dropped, err := tr.Punch(nil, MaxBlock, 1)
	must(t, err)
	if !slices.Equal(freed, []PhysExtent{{MaxBlock, 1}}) || dropped != 0 {
		t.Fatalf("Punch(MaxBlock, 1) = %v, %d", freed, dropped)
	}
	freed, _, err = tr.Truncate(nil, BlockLimit)
	if err != nil || freed != nil {
		t.Fatalf("Truncate(BlockLimit) = %v, %v", freed, err)
	}
	freed, _, err = tr.Truncate(nil, MaxBlock-5)
	must(t, err)
	if !slices.Equal(freed, []PhysExtent{{MaxBlock - 5, 5}}) {
		t.Fatalf("Truncate(MaxBlock-5) freed %v", freed)
	}
	wantEntries(t, tr, seg(MaxBlock-9, 4, Written, MaxBlock-9))

	// One past the top is refused by everything, and changes nothing.
	g := tr.Generation()
	for name, err := range map[string]error{
		"MarkDelalloc": second(tr.MarkDelalloc(MaxBlock, 2)),
		"MarkAtLimit":  second(tr.MarkDelalloc(BlockLimit, 1)),
		"SetUnwritten": tr.SetUnwritten(MaxBlock, 2, 0),
		"SetWritten":   tr.SetWritten(BlockLimit, 1),
		"Revert":       second(tr.RevertUnwritten(nil, MaxBlock, 2)),
		"MapWritten":   tr.MapWritten(MaxBlock, 2, 0),
		"MapPhysTop":   tr.MapWritten(0, 2, MaxBlock),
		"Punch":        third(tr.Punch(nil, 1, MaxBlock+1)),
		"Truncate":     third(tr.Truncate(nil, BlockLimit+1)),
		"TruncateNeg":  third(tr.Truncate(nil, -1)),
		"NegStart":     second(tr.MarkDelalloc(-1, 1)),
		"NegLen":       second(tr.MarkDelalloc(1, -1)),
		"NegPhys":      tr.MapWritten(0, 1, -1),
		"Overflow":     second(tr.MarkDelalloc(1<<62, 1<<62)),
	} {
		if !errors.Is(err, ErrInvalid) || !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("%s: error %v, want ErrInvalid wrapping fs.ErrInvalid", name, err)
		}
	}
	if tr.Generation() != g {
		t.Fatal("refused operations changed the generation")
	}
	wantEntries(t, tr, seg(MaxBlock-9, 4, Written, MaxBlock-9))
}

func second[A any](_ A, err error) error        { return err }
func third[A, B any](_ A, _ B, err error) error { return err }

func TestInvalidRangePanicsInQueries(t *testing.T) {
	tr := New()
	for name, fn := range map[string]func(){
		"Lookup":         func() { tr.Lookup(nil, -1, 1) },
		"CountHoles":     func() { tr.CountHoles(MaxBlock, 2) },
		"HoleRuns":       func() { tr.HoleRuns(MaxBlock, 2) },
		"DelallocRanges": func() { tr.DelallocRanges(nil, BlockLimit+1, -1) },
	} {
		func() {
			defer func() {
				r := recover()
				err, ok := r.(error)
				if !ok || !errors.Is(err, ErrInvalid) {
					t.Errorf("%s: panic value %v, want an ErrInvalid error", name, r)
				}
			}()
			fn()
		}()
	}
}

func TestPunchMiddleOfWritten(t *testing.T) {
	tr := New()
	must(t, tr.MapWritten(100, 50, 1000))
	freed, dropped, err := tr.Punch([]PhysExtent{{1, 1}}, 110, 20)
	must(t, err)
	if !slices.Equal(freed, []PhysExtent{{1, 1}, {1010, 20}}) || dropped != 0 {
		t.Fatalf("Punch = %v, %d", freed, dropped)
	}
	wantEntries(t, tr, seg(100, 10, Written, 1000), seg(130, 20, Written, 1030))
	if got := tr.Lookup(nil, 95, 60); !slices.Equal(got, []Segment{
		hole(95, 5), seg(100, 10, Written, 1000), hole(110, 20), seg(130, 20, Written, 1030), hole(150, 5),
	}) {
		t.Fatalf("Lookup after punch = %v", got)
	}
	if e, b := tr.Count(Written); e != 2 || b != 30 {
		t.Fatalf("Count(Written) = %d, %d", e, b)
	}
	if e, b := tr.Count(Hole); e != 2 || b != 120 {
		t.Fatalf("Count(Hole) = %d, %d (want [0,100) and [110,130))", e, b)
	}
	// Mapping the hole back at the right place merges into one extent again.
	must(t, tr.MapWritten(110, 20, 1010))
	wantEntries(t, tr, seg(100, 50, Written, 1000))
}

func TestPunchAcrossStates(t *testing.T) {
	tr := New()
	mark(t, tr, 0, 40, 40)
	must(t, tr.SetUnwritten(10, 10, 500)) // [10,20) unwritten @500
	must(t, tr.SetUnwritten(20, 5, 510))  // contiguous: merges
	wantEntries(t, tr, seg(0, 10, Delalloc, -1), seg(10, 15, Unwritten, 500), seg(25, 15, Delalloc, -1))
	must(t, tr.SetWritten(10, 5))               // [10,15) written @500
	freed, dropped, err := tr.Punch(nil, 5, 30) // [5,35)
	must(t, err)
	// Written 500..504 and unwritten 505..514 are contiguous: one extent.
	if !slices.Equal(freed, []PhysExtent{{500, 15}}) || dropped != 5+10 {
		t.Fatalf("Punch = %v, %d", freed, dropped)
	}
	wantEntries(t, tr, seg(0, 5, Delalloc, -1), seg(35, 5, Delalloc, -1))
}

func TestTruncateInsideDelalloc(t *testing.T) {
	tr := New()
	mark(t, tr, 0, 100, 100)
	must(t, tr.SetUnwritten(0, 20, 7000))
	must(t, tr.SetWritten(0, 20))
	mark(t, tr, 200, 50, 50)
	freed, dropped, err := tr.Truncate(nil, 60)
	must(t, err)
	if freed != nil || dropped != 40+50 {
		t.Fatalf("Truncate(60) = %v, %d; want no extents, 90 delalloc", freed, dropped)
	}
	wantEntries(t, tr, seg(0, 20, Written, 7000), seg(20, 40, Delalloc, -1))
	if last, ok := tr.Last(); !ok || last != seg(20, 40, Delalloc, -1) {
		t.Fatalf("Last = %v, %v", last, ok)
	}
	// Appending right after the truncation point takes the fast path and merges.
	mark(t, tr, 60, 1, 1)
	wantEntries(t, tr, seg(0, 20, Written, 7000), seg(20, 41, Delalloc, -1))
	// Truncating inside the written extent frees its tail.
	freed, dropped, err = tr.Truncate(nil, 15)
	must(t, err)
	if !slices.Equal(freed, []PhysExtent{{7015, 5}}) || dropped != 41 {
		t.Fatalf("Truncate(15) = %v, %d", freed, dropped)
	}
	wantEntries(t, tr, seg(0, 15, Written, 7000))
}

func TestErrorsChangeNothing(t *testing.T) {
	tr := New()
	mark(t, tr, 0, 10, 10)
	must(t, tr.SetUnwritten(2, 3, 100))
	must(t, tr.MapWritten(20, 5, 300))
	before, g := entriesOf(tr), tr.Generation()
	cases := []struct {
		name  string
		err   error
		found string
	}{
		{"SetUnwritten over unwritten", tr.SetUnwritten(0, 5, 900), "found unwritten at [2, 5)"},
		{"SetUnwritten over hole", tr.SetUnwritten(8, 5, 900), "found hole at [10, 13)"},
		{"SetWritten over delalloc", tr.SetWritten(2, 4), "found delalloc at [5, 6)"},
		{"SetWritten over hole", tr.SetWritten(15, 2), "found hole at [15, 17)"},
		{"RevertUnwritten over written", second(tr.RevertUnwritten(nil, 20, 1)), "found written at [20, 21)"},
		{"MapWritten over delalloc", tr.MapWritten(9, 3, 900), "found delalloc at [9, 10)"},
		{"MapWritten over written", tr.MapWritten(24, 3, 900), "found written at [24, 25)"},
	}
	for _, c := range cases {
		if !errors.Is(c.err, ErrState) {
			t.Errorf("%s: error %v, want ErrState", c.name, c.err)
			continue
		}
		if !strings.Contains(c.err.Error(), c.found) {
			t.Errorf("%s: message %q does not say %q", c.name, c.err, c.found)
		}
	}
	if tr.Generation() != g || !slices.Equal(entriesOf(tr), before) {
		t.Fatalf("failed operations changed the tree: %v", entriesOf(tr))
	}
	mustCheck(t, tr)
}

func TestWritebackCycle(t *testing.T) {
	tr := New()
	// Three writes with gaps, then one in the middle joining two of them.
	mark(t, tr, 0, 8, 8)
	mark(t, tr, 16, 8, 8)
	mark(t, tr, 32, 8, 8)
	mark(t, tr, 4, 16, 8) // fills [8,16), touches both neighbours: merges them
	if got := tr.DelallocRanges(nil, 0, -1); !slices.Equal(got, []Range{{0, 24}, {32, 8}}) {
		t.Fatalf("DelallocRanges = %v", got)
	}
	if got := tr.DelallocRanges(nil, 10, 25); !slices.Equal(got, []Range{{10, 14}, {32, 3}}) {
		t.Fatalf("clipped DelallocRanges = %v", got)
	}
	if h := tr.CountHoles(0, 50); h != 50-32 {
		t.Fatalf("CountHoles = %d", h)
	}
	// Writeback: the first range gets one extent, fails, is retried.
	must(t, tr.SetUnwritten(0, 24, 4000))
	freed, err := tr.RevertUnwritten(nil, 0, 24)
	must(t, err)
	if !slices.Equal(freed, []PhysExtent{{4000, 24}}) {
		t.Fatalf("RevertUnwritten freed %v", freed)
	}
	wantEntries(t, tr, seg(0, 24, Delalloc, -1), seg(32, 8, Delalloc, -1))
	// Fragmented free space: two extents for one range, then written.
	must(t, tr.SetUnwritten(0, 10, 5000))
	must(t, tr.SetUnwritten(10, 14, 6000))
	must(t, tr.SetWritten(0, 24))
	wantEntries(t, tr, seg(0, 10, Written, 5000), seg(10, 14, Written, 6000), seg(32, 8, Delalloc, -1))
	// Overwriting written blocks reserves nothing and changes nothing.
	g := tr.Generation()
	mark(t, tr, 0, 24, 0)
	if tr.Generation() != g {
		t.Fatal("overwrite of written blocks changed the generation")
	}
	if e, b := tr.Count(Delalloc); e != 1 || b != 8 {
		t.Fatalf("Count(Delalloc) = %d, %d", e, b)
	}
}

func TestAllStopsEarly(t *testing.T) {
	tr := New()
	mark(t, tr, 0, 1, 1)
	mark(t, tr, 2, 1, 1)
	mark(t, tr, 4, 1, 1)
	n := 0
	tr.All(func(Segment) bool { n++; return n < 2 })
	if n != 2 {
		t.Fatalf("All visited %d entries after being told to stop at 2", n)
	}
}

// TestManyEntries exercises a tree several B-tree levels deep: every other
// block delalloc, then the gaps filled in from the middle outwards.
func TestManyEntries(t *testing.T) {
	const n = 20000
	tr := New()
	for b := int64(0); b < n; b += 2 {
		mark(t, tr, b, 1, 1)
	}
	if tr.Len() != n/2 {
		t.Fatalf("Len = %d, want %d", tr.Len(), n/2)
	}
	mustCheck(t, tr)
	for b := int64(1); b < n; b += 4 {
		must(t, tr.SetUnwritten(b-1, 1, 3*b))
	}
	mustCheck(t, tr)
	for b := int64(n/2 + 1); b < n; b += 2 {
		mark(t, tr, b, 1, 1)
		mark(t, tr, n-b, 1, 1)
	}
	mustCheck(t, tr)
	freed, dropped, err := tr.Truncate(nil, 0)
	must(t, err)
	if int64(len(freed)) != (n+3)/4 || dropped != n-(n+3)/4 {
		t.Fatalf("Truncate(0): %d extents, %d delalloc", len(freed), dropped)
	}
	wantEntries(t, tr)
}

// TestCheckDetectsCorruption breaks each invariant by hand and expects
// Check to name it.
func TestCheckDetectsCorruption(t *testing.T) {
	build := func() (*Tree, []*entry) {
		tr := New()
		mark(t, tr, 0, 10, 10)
		must(t, tr.MapWritten(20, 10, 100))
		mark(t, tr, 40, 5, 5)
		var es []*entry
		tr.bt.Ascend(func(e *entry) bool { es = append(es, e); return true })
		return tr, es
	}
	for name, c := range map[string]struct {
		breakIt func(tr *Tree, es []*entry)
		want    string
	}{
		"hole entry":      {func(_ *Tree, es []*entry) { es[0].state = Hole }, "invalid state"},
		"unknown state":   {func(_ *Tree, es []*entry) { es[0].state = 7 }, "invalid state"},
		"empty entry":     {func(_ *Tree, es []*entry) { es[2].start = 45; es[2].len = 0 }, "non-positive length"},
		"negative start":  {func(_ *Tree, es []*entry) { es[0].start = -1; es[0].len = 11 }, "outside"},
		"delalloc phys":   {func(_ *Tree, es []*entry) { es[0].phys = 5 }, "has a physical block"},
		"written no phys": {func(_ *Tree, es []*entry) { es[1].phys = -1 }, "physical blocks outside"},
		"overlap":         {func(_ *Tree, es []*entry) { es[1].start = 5; es[1].len = 25 }, "overlap"},
		"unmerged": {func(tr *Tree, es []*entry) {
			es[1].start, es[1].len, es[1].state, es[1].phys = 10, 20, Delalloc, -1
		}, "should have been merged"},
		"stats":     {func(tr *Tree, _ []*entry) { tr.stats[Written].blocks++ }, "per-state counts"},
		"last":      {func(tr *Tree, es []*entry) { tr.last = es[1] }, "cached last entry"},
		"no last":   {func(tr *Tree, _ []*entry) { tr.last = nil }, "cached last entry"},
		"sorted ok": {func(*Tree, []*entry) {}, ""},
	} {
		tr, es := build()
		c.breakIt(tr, es)
		err := tr.Check()
		if c.want == "" {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Check() = %v, want an error saying %q", name, err, c.want)
		}
	}
}

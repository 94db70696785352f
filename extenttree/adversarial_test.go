package extenttree_test

import (
	"errors"
	"io/fs"
	"math"
	"slices"
	"testing"

	"pgregory.net/rapid"

	et "github.com/rawblock/rawblock/extenttree"
)

type advBlock struct {
	st   et.State
	phys int64
}

// advModel is a per-block array over [base, base+len(b)); everything
// outside is a hole.
type advModel struct {
	base int64
	b    []advBlock
}

func (m *advModel) at(x int64) advBlock {
	if x < m.base || x >= m.base+int64(len(m.b)) {
		return advBlock{et.Hole, -1}
	}
	return m.b[x-m.base]
}

func joins(a, b advBlock, prevPhys int64) bool {
	if a.st != b.st {
		return false
	}
	switch a.st {
	case et.Hole, et.Delalloc:
		return true
	}
	return b.phys == prevPhys+1
}

// segments returns the maximal segments of [s, s+n) in the model.
func (m *advModel) segments(s, n int64) []et.Segment {
	var out []et.Segment
	for x := s; x < s+n; x++ {
		b := m.at(x)
		if k := len(out); k > 0 {
			last := &out[k-1]
			prev := advBlock{last.State, last.Phys}
			if joins(prev, b, last.Phys+last.Len-1) {
				last.Len++
				continue
			}
		}
		p := b.phys
		if b.st == et.Hole || b.st == et.Delalloc {
			p = -1
		}
		out = append(out, et.Segment{Start: x, Len: 1, State: b.st, Phys: p})
	}
	return out
}

func (m *advModel) entries() []et.Segment {
	var out []et.Segment
	for _, s := range m.segments(m.base, int64(len(m.b))) {
		if s.State != et.Hole {
			out = append(out, s)
		}
	}
	return out
}

func treeEntries(t *et.Tree) []et.Segment {
	var out []et.Segment
	t.All(func(s et.Segment) bool { out = append(out, s); return true })
	return out
}

func (m *advModel) clone() *advModel {
	return &advModel{base: m.base, b: slices.Clone(m.b)}
}

// freedPhys lists the device extents of the mapped blocks of [s, e) in
// logical order, merging physically contiguous neighbours.
func (m *advModel) freedPhys(s, e int64) (out []et.PhysExtent, dd int64) {
	for x := s; x < e; x++ {
		b := m.at(x)
		switch b.st {
		case et.Delalloc:
			dd++
		case et.Unwritten, et.Written:
			if k := len(out); k > 0 && out[k-1].End() == b.phys {
				out[k-1].Len++
			} else {
				out = append(out, et.PhysExtent{Start: b.phys, Len: 1})
			}
		}
	}
	return
}

func TestAdvTreeAgainstModel(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		const W = 48
		base := rapid.SampledFrom([]int64{0, 1 << 20, et.BlockLimit - W}).Draw(rt, "base")
		m := &advModel{base: base, b: make([]advBlock, W)}
		for i := range m.b {
			m.b[i] = advBlock{et.Hole, -1}
		}
		tr := et.New()
		physBase := rapid.SampledFrom([]int64{0, 5000, et.BlockLimit - 4*W}).Draw(rt, "physBase")
		rng := func(label string) (int64, int64) {
			s := base + rapid.Int64Range(-2, W+1).Draw(rt, label+"s")
			n := rapid.Int64Range(-1, W+2).Draw(rt, label+"n")
			return s, n
		}
		inWindow := func(s, n int64) bool {
			return s >= base && n >= 0 && s+n <= base+W && s >= 0 && s+n <= et.BlockLimit
		}
		validRange := func(s, n int64) bool {
			return s >= 0 && n >= 0 && s <= et.BlockLimit && n <= et.BlockLimit-s
		}
		all := func(s, n int64, st et.State) bool {
			for x := s; x < s+n; x++ {
				if m.at(x).st != st {
					return false
				}
			}
			return true
		}
		for step := rapid.IntRange(1, 50).Draw(rt, "steps"); step > 0; step-- {
			before := m.clone()
			gen := tr.Generation()
			op := rapid.IntRange(0, 6).Draw(rt, "op")
			s, n := rng("r")
			if !validRange(s, n) {
				// every mutating op refuses; nothing changes
				var err error
				switch op {
				case 0:
					_, err = tr.MarkDelalloc(s, n)
				case 1:
					err = tr.SetUnwritten(s, n, physBase)
				case 2:
					err = tr.SetWritten(s, n)
				case 3:
					_, err = tr.RevertUnwritten(nil, s, n)
				case 4:
					err = tr.MapWritten(s, n, physBase)
				default:
					_, _, err = tr.Punch(nil, s, n)
				}
				if !errors.Is(err, et.ErrInvalid) || !errors.Is(err, fs.ErrInvalid) {
					rt.Fatalf("op %d on invalid range [%d,+%d): %v", op, s, n, err)
				}
			} else if !inWindow(s, n) {
				continue // valid, but outside what the model tracks
			} else {
				switch op {
				case 0:
					holes, err := tr.MarkDelalloc(s, n)
					var want int64
					for x := s; x < s+n; x++ {
						if m.at(x).st == et.Hole {
							want++
							m.b[x-base] = advBlock{et.Delalloc, -1}
						}
					}
					if err != nil || holes != want {
						rt.Fatalf("MarkDelalloc(%d,%d) = %d, %v; want %d", s, n, holes, err, want)
					}
				case 1, 4:
					phys := physBase + rapid.Int64Range(0, 3*W).Draw(rt, "phys")
					var err error
					need := et.Delalloc
					if op == 1 {
						err = tr.SetUnwritten(s, n, phys)
					} else {
						need = et.Hole
						err = tr.MapWritten(s, n, phys)
					}
					if all(s, n, need) {
						if err != nil {
							rt.Fatalf("op %d (%d,%d,%d) = %v", op, s, n, phys, err)
						}
						st := et.Unwritten
						if op == 4 {
							st = et.Written
						}
						for x := s; x < s+n; x++ {
							m.b[x-base] = advBlock{st, phys + x - s}
						}
					} else if !errors.Is(err, et.ErrState) {
						rt.Fatalf("op %d (%d,%d) on wrong state = %v", op, s, n, err)
					}
				case 2:
					err := tr.SetWritten(s, n)
					if all(s, n, et.Unwritten) {
						if err != nil {
							rt.Fatal(err)
						}
						for x := s; x < s+n; x++ {
							m.b[x-base].st = et.Written
						}
					} else if !errors.Is(err, et.ErrState) {
						rt.Fatalf("SetWritten on wrong state = %v", err)
					}
				case 3:
					dst := []et.PhysExtent{{Start: 1, Len: 1}}
					got, err := tr.RevertUnwritten(dst, s, n)
					if all(s, n, et.Unwritten) {
						if err != nil {
							rt.Fatal(err)
						}
						want, _ := m.freedPhys(s, s+n)
						if !slices.Equal(got[1:], want) || got[0] != (et.PhysExtent{Start: 1, Len: 1}) {
							rt.Fatalf("RevertUnwritten(%d,%d) freed %v, want %v", s, n, got, want)
						}
						for x := s; x < s+n; x++ {
							m.b[x-base] = advBlock{et.Delalloc, -1}
						}
					} else if !errors.Is(err, et.ErrState) {
						rt.Fatalf("RevertUnwritten on wrong state = %v", err)
					}
				case 5:
					want, wantDD := m.freedPhys(s, s+n)
					got, dd, err := tr.Punch(nil, s, n)
					if err != nil || dd != wantDD || !slices.Equal(got, want) {
						rt.Fatalf("Punch(%d,%d) = %v, %d, %v; want %v, %d", s, n, got, dd, err, want, wantDD)
					}
					for x := s; x < s+n; x++ {
						m.b[x-base] = advBlock{et.Hole, -1}
					}
				case 6:
					nb := s
					want, wantDD := m.freedPhys(nb, base+W)
					got, dd, err := tr.Truncate(nil, nb)
					if err != nil || dd != wantDD || !slices.Equal(got, want) {
						rt.Fatalf("Truncate(%d) = %v, %d, %v; want %v, %d", nb, got, dd, err, want, wantDD)
					}
					for x := nb; x < base+W; x++ {
						m.b[x-base] = advBlock{et.Hole, -1}
					}
				}
			}
			// Compare everything.
			changed := !slices.Equal(before.b, m.b)
			if changed != (tr.Generation() != gen) {
				rt.Fatalf("model changed=%v but generation %d -> %d (op %d [%d,+%d))", changed, gen, tr.Generation(), op, s, n)
			}
			if err := tr.Check(); err != nil {
				rt.Fatal(err)
			}
			wantE := m.entries()
			if got := treeEntries(tr); !slices.Equal(got, wantE) {
				rt.Fatalf("entries %v, model %v", got, wantE)
			}
			if tr.Len() != len(wantE) {
				rt.Fatalf("Len %d, want %d", tr.Len(), len(wantE))
			}
			if last, ok := tr.Last(); ok != (len(wantE) > 0) || ok && last != wantE[len(wantE)-1] {
				rt.Fatalf("Last = %v %v", last, ok)
			}
			for _, st := range []et.State{et.Delalloc, et.Unwritten, et.Written} {
				var ne int
				var nb int64
				for _, e := range wantE {
					if e.State == st {
						ne++
						nb += e.Len
					}
				}
				if ge, gb := tr.Count(st); ge != ne || gb != nb {
					rt.Fatalf("Count(%v) = %d,%d want %d,%d", st, ge, gb, ne, nb)
				}
			}
			ls, ln := rng("l")
			if !inWindow(ls, ln) {
				ls, ln = base, W
			}
			want := m.segments(ls, ln)
			if got := tr.Lookup(nil, ls, ln); !slices.Equal(got, want) {
				rt.Fatalf("Lookup(%d,%d) = %v, want %v", ls, ln, got, want)
			}
			if got := tr.LookupShared(nil, ls, ln); !slices.Equal(got, want) {
				rt.Fatalf("LookupShared(%d,%d) = %v, want %v", ls, ln, got, want)
			}
			var holes, runs int64
			var dr []et.Range
			for _, sg := range want {
				if sg.State == et.Hole {
					holes += sg.Len
					runs++
				}
				if sg.State == et.Delalloc {
					dr = append(dr, et.Range{Start: sg.Start, Len: sg.Len})
				}
			}
			if h := tr.CountHoles(ls, ln); h != holes {
				rt.Fatalf("CountHoles = %d want %d", h, holes)
			}
			if h, r := tr.HoleRuns(ls, ln); h != holes || r != runs {
				rt.Fatalf("HoleRuns = %d,%d want %d,%d", h, r, holes, runs)
			}
			if got := tr.DelallocRanges(nil, ls, ln); !slices.Equal(got, dr) {
				rt.Fatalf("DelallocRanges(%d,%d) = %v want %v", ls, ln, got, dr)
			}
		}
	})
}

func TestAdvTreeEdges(t *testing.T) {
	tr := et.New()
	if got := tr.Lookup(nil, 5, 0); len(got) != 0 {
		t.Fatalf("zero-length Lookup = %v", got)
	}
	if h, err := tr.MarkDelalloc(et.MaxBlock, 1); err != nil || h != 1 {
		t.Fatalf("MarkDelalloc at MaxBlock = %d, %v", h, err)
	}
	if _, err := tr.MarkDelalloc(et.MaxBlock, 2); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("past MaxBlock: %v", err)
	}
	if _, err := tr.MarkDelalloc(et.BlockLimit, 1); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("at BlockLimit: %v", err)
	}
	if _, err := tr.MarkDelalloc(math.MaxInt64, 1); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("MaxInt64: %v", err)
	}
	if _, err := tr.MarkDelalloc(1, math.MaxInt64); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("huge len: %v", err)
	}
	if err := tr.SetUnwritten(et.MaxBlock, 1, et.MaxBlock); err != nil {
		t.Fatal(err)
	}
	if err := tr.SetWritten(et.MaxBlock, 1); err != nil {
		t.Fatal(err)
	}
	if err := tr.MapWritten(0, 1, et.MaxBlock); err != nil {
		t.Fatal(err)
	}
	if err := tr.MapWritten(1, 2, et.MaxBlock); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("phys past MaxBlock: %v", err)
	}
	if err := tr.MapWritten(1, 1, -1); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("negative phys: %v", err)
	}
	if err := tr.MapWritten(1, 1, math.MinInt64); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("MinInt64 phys: %v", err)
	}
	if _, _, err := tr.Truncate(nil, -1); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("Truncate(-1): %v", err)
	}
	if _, _, err := tr.Truncate(nil, et.BlockLimit+1); !errors.Is(err, et.ErrInvalid) {
		t.Fatalf("Truncate past limit: %v", err)
	}
	g := tr.Generation()
	if _, _, err := tr.Truncate(nil, et.BlockLimit); err != nil || tr.Generation() != g {
		t.Fatalf("Truncate(BlockLimit): %v", err)
	}
	got, dd, err := tr.Truncate(nil, 0)
	if err != nil || dd != 0 || !slices.Equal(got, []et.PhysExtent{{Start: et.MaxBlock, Len: 1}, {Start: et.MaxBlock, Len: 1}}) {
		t.Fatalf("Truncate(0) = %v %d %v", got, dd, err)
	}
	if tr.Len() != 0 {
		t.Fatal("not empty")
	}
	if _, ok := tr.Last(); ok {
		t.Fatal("Last on empty")
	}
	// Reuse after a full clear.
	if h, err := tr.MarkDelalloc(10, 5); err != nil || h != 5 {
		t.Fatal(h, err)
	}
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	// DelallocRanges with n < 0.
	if got := tr.DelallocRanges(nil, 0, -1); !slices.Equal(got, []et.Range{{Start: 10, Len: 5}}) {
		t.Fatalf("DelallocRanges(0,-1) = %v", got)
	}
}

func TestAdvSplitAndMerge(t *testing.T) {
	tr := et.New()
	if _, err := tr.MarkDelalloc(0, 100); err != nil {
		t.Fatal(err)
	}
	if err := tr.SetUnwritten(0, 100, 1000); err != nil {
		t.Fatal(err)
	}
	if err := tr.SetWritten(0, 100); err != nil {
		t.Fatal(err)
	}
	// punch the middle of a written extent
	got, dd, err := tr.Punch(nil, 40, 20)
	if err != nil || dd != 0 || !slices.Equal(got, []et.PhysExtent{{Start: 1040, Len: 20}}) {
		t.Fatalf("Punch middle = %v %d %v", got, dd, err)
	}
	if tr.Len() != 2 {
		t.Fatalf("Len %d", tr.Len())
	}
	// Refill exactly: must merge back into one entry.
	if err := tr.MapWritten(40, 20, 1040); err != nil {
		t.Fatal(err)
	}
	if tr.Len() != 1 {
		t.Fatalf("after refill, Len %d: %v", tr.Len(), treeEntries(tr))
	}
	// Truncate inside a delalloc extent.
	if _, err := tr.MarkDelalloc(100, 50); err != nil {
		t.Fatal(err)
	}
	got, dd, err = tr.Truncate(nil, 120)
	if err != nil || dd != 30 || len(got) != 0 {
		t.Fatalf("Truncate inside delalloc = %v %d %v", got, dd, err)
	}
	if c, b := tr.Count(et.Delalloc); c != 1 || b != 20 {
		t.Fatalf("delalloc %d %d", c, b)
	}
	// 1,000,000 sequential appends stay one entry.
	t2 := et.New()
	for i := int64(0); i < 1_000_000; i++ {
		if h, err := t2.MarkDelalloc(i, 1); err != nil || h != 1 {
			t.Fatal(i, h, err)
		}
	}
	if t2.Len() != 1 {
		t.Fatalf("appends: %d entries", t2.Len())
	}
	// Appends of written blocks with contiguous physical blocks merge too.
	t3 := et.New()
	for i := int64(0); i < 1000; i++ {
		if err := t3.MapWritten(i, 1, 5000+i); err != nil {
			t.Fatal(err)
		}
	}
	if t3.Len() != 1 {
		t.Fatalf("written appends: %d entries", t3.Len())
	}
	// Backwards fill merges as well.
	t4 := et.New()
	for i := int64(999); i >= 0; i-- {
		if _, err := t4.MarkDelalloc(i, 1); err != nil {
			t.Fatal(err)
		}
	}
	if t4.Len() != 1 {
		t.Fatalf("backwards: %d entries", t4.Len())
	}
	// Errors change nothing.
	g := t4.Generation()
	if err := t4.SetWritten(0, 10); !errors.Is(err, et.ErrState) {
		t.Fatal(err)
	}
	if err := t4.SetUnwritten(990, 20, 0); !errors.Is(err, et.ErrState) {
		t.Fatal(err)
	}
	if _, err := t4.RevertUnwritten(nil, 0, 1); !errors.Is(err, et.ErrState) {
		t.Fatal(err)
	}
	if err := t4.MapWritten(999, 2, 0); !errors.Is(err, et.ErrState) {
		t.Fatal(err)
	}
	if t4.Generation() != g || t4.Len() != 1 {
		t.Fatal("failed ops changed the tree")
	}
}

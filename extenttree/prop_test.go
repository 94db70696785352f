package extenttree

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// model is the obvious per-block implementation the tree is checked against:
// a state and a device block for each of n logical blocks starting at base.
// The tree may only ever hold blocks inside that window.
type model struct {
	base int64
	st   []State
	ph   []int64
}

func newModel(base int64, n int) *model {
	m := &model{base: base, st: make([]State, n), ph: make([]int64, n)}
	for i := range m.ph {
		m.ph[i] = -1
	}
	return m
}

func (m *model) end() int64 { return m.base + int64(len(m.st)) }

func (m *model) clone() *model {
	return &model{base: m.base, st: slices.Clone(m.st), ph: slices.Clone(m.ph)}
}

func (m *model) equal(o *model) bool {
	return slices.Equal(m.st, o.st) && slices.Equal(m.ph, o.ph)
}

func (m *model) set(b int64, st State, phys int64) {
	m.st[b-m.base], m.ph[b-m.base] = st, phys
}

// at returns the state and device block of logical block b (a hole outside
// the window).
func (m *model) at(b int64) (State, int64) {
	if b < m.base || b >= m.end() {
		return Hole, -1
	}
	return m.st[b-m.base], m.ph[b-m.base]
}

// all reports whether every block of [s, e) is in state st.
func (m *model) all(s, e int64, st State) bool {
	for b := s; b < e; b++ {
		if got, _ := m.at(b); got != st {
			return false
		}
	}
	return true
}

// segments is the expected Lookup of [s, e): blocks merged into maximal runs.
func (m *model) segments(s, e int64) []Segment {
	var out []Segment
	for b := s; b < e; b++ {
		st, ph := m.at(b)
		if k := len(out); k > 0 {
			l := &out[k-1]
			if l.State == st && (!st.mapped() || l.Phys+l.Len == ph) {
				l.Len++
				continue
			}
		}
		out = append(out, Segment{Start: b, Len: 1, State: st, Phys: ph})
	}
	return out
}

// entries is the expected content of the tree: the non-hole segments.
func (m *model) entries() []Segment {
	var out []Segment
	for _, s := range m.segments(m.base, m.end()) {
		if s.State != Hole {
			out = append(out, s)
		}
	}
	return out
}

// release turns the mapped blocks of [s, e) into st (Hole or Delalloc) and
// returns the device extents freed, coalesced in logical order, and how
// many Delalloc blocks were in the range.
func (m *model) release(s, e int64, st State) (freed []PhysExtent, delalloc int64) {
	for b := s; b < e; b++ {
		cur, ph := m.at(b)
		switch {
		case cur == Delalloc:
			delalloc++
		case cur.mapped():
			if k := len(freed); k > 0 && freed[k-1].End() == ph {
				freed[k-1].Len++
			} else {
				freed = append(freed, PhysExtent{Start: ph, Len: 1})
			}
		}
		if b >= m.base && b < m.end() {
			m.set(b, st, -1)
		}
	}
	return freed, delalloc
}

// runs returns the maximal runs of blocks in state st (ignoring Phys).
func (m *model) runs(st State) []Range {
	var out []Range
	for i, s := range m.st {
		if s != st {
			continue
		}
		b := m.base + int64(i)
		if k := len(out); k > 0 && out[k-1].End() == b {
			out[k-1].Len++
		} else {
			out = append(out, Range{Start: b, Len: 1})
		}
	}
	return out
}

type propState struct {
	tr       *Tree
	m        *model
	nextPhys int64
}

// drawRange draws a range inside the window (possibly empty).
func (p *propState) drawRange(t *rapid.T, label string) (int64, int64) {
	n := int64(len(p.m.st))
	s := rapid.Int64Range(0, n).Draw(t, label+"Start")
	l := rapid.Int64Range(0, min(n-s, 24)).Draw(t, label+"Len")
	return p.m.base + s, l
}

// drawIn draws a sub-range of one of the runs (nil if there are none).
func drawIn(t *rapid.T, runs []Range, label string) (int64, int64, bool) {
	if len(runs) == 0 {
		return 0, 0, false
	}
	r := rapid.SampledFrom(runs).Draw(t, label+"Run")
	off := rapid.Int64Range(0, r.Len-1).Draw(t, label+"Off")
	l := rapid.Int64Range(1, r.Len-off).Draw(t, label+"Len")
	return r.Start + off, l, true
}

// drawPhys returns device blocks for n blocks: usually fresh, sometimes
// right after the previous allocation (so neighbours can merge), sometimes
// continuing the mapped block just left of start (also a merge candidate).
func (p *propState) drawPhys(t *rapid.T, start, n int64) int64 {
	switch rapid.IntRange(0, 3).Draw(t, "physKind") {
	case 0:
		if st, ph := p.m.at(start - 1); st.mapped() && ph+1 <= BlockLimit-n {
			return ph + 1
		}
	case 1:
		if p.nextPhys > BlockLimit-n-10 {
			p.nextPhys = 0
		}
		ph := p.nextPhys + rapid.Int64Range(1, 10).Draw(t, "physGap")
		p.nextPhys = ph + n
		return ph
	case 2:
		// Near the physical limit.
		return BlockLimit - n - rapid.Int64Range(0, 3).Draw(t, "physTop")
	}
	ph := p.nextPhys
	p.nextPhys += n
	return ph
}

// expectErr checks that err matches want and that, on error, nothing changed.
func (p *propState) expectErr(t *rapid.T, op string, err error, want error, before *model, gen uint64) {
	if want == nil {
		if err != nil {
			t.Fatalf("%s: unexpected error %v", op, err)
		}
		return
	}
	if !errors.Is(err, want) {
		t.Fatalf("%s: error %v, want %v", op, err, want)
	}
	if !p.m.equal(before) {
		t.Fatalf("%s: model changed on an error (test bug)", op)
	}
	if p.tr.Generation() != gen {
		t.Fatalf("%s: generation changed on error", op)
	}
}

func (p *propState) check(t *rapid.T, before *model, gen0 uint64) {
	if err := p.tr.Check(); err != nil {
		t.Fatal(err)
	}
	// The whole window, with a block of margin on each side where possible.
	s, e := max(p.m.base-1, 0), min(p.m.end()+1, BlockLimit)
	got := p.tr.Lookup(nil, s, e-s)
	if want := p.m.segments(s, e); !slices.Equal(got, want) {
		t.Fatalf("Lookup(%d, %d):\n got  %v\n want %v", s, e-s, got, want)
	}
	var all []Segment
	p.tr.All(func(sg Segment) bool { all = append(all, sg); return true })
	want := p.m.entries()
	if !slices.Equal(all, want) {
		t.Fatalf("All:\n got  %v\n want %v", all, want)
	}
	if p.tr.Len() != len(want) {
		t.Fatalf("Len %d, want %d", p.tr.Len(), len(want))
	}
	last, ok := p.tr.Last()
	if ok != (len(want) > 0) || ok && last != want[len(want)-1] {
		t.Fatalf("Last = %v, %v; entries %v", last, ok, want)
	}
	// Expected Count: per state over the window; holes only inside
	// [0, last end), and [0, base) is a hole too.
	var span []Segment
	if ok {
		span = p.m.segments(p.m.base, last.End())
		if p.m.base > 0 {
			if span[0].State == Hole {
				span[0].Len, span[0].Start = span[0].End(), 0
			} else {
				span = append([]Segment{{Start: 0, Len: p.m.base, State: Hole, Phys: -1}}, span...)
			}
		}
	}
	for _, st := range []State{Hole, Delalloc, Unwritten, Written} {
		var we int
		var wb int64
		for _, sg := range span {
			if sg.State == st {
				we++
				wb += sg.Len
			}
		}
		ge, gb := p.tr.Count(st)
		if ge != we || gb != wb {
			t.Fatalf("Count(%v) = %d entries, %d blocks; want %d, %d", st, ge, gb, we, wb)
		}
	}
	if changed := !p.m.equal(before); changed != (p.tr.Generation() != gen0) {
		t.Fatalf("model changed: %v, generation %d -> %d", changed, gen0, p.tr.Generation())
	}
}

func TestPropertyAgainstModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		const n = 80
		base := rapid.SampledFrom([]int64{0, 1000, BlockLimit - n}).Draw(t, "base")
		p := &propState{tr: New(), m: newModel(base, n)}
		var before *model
		var gen0 uint64
		snap := func() { before, gen0 = p.m.clone(), p.tr.Generation() }

		actions := map[string]func(*rapid.T){
			"MarkDelalloc": func(t *rapid.T) {
				snap()
				s, l := p.drawRange(t, "")
				if c := p.tr.CountHoles(s, l); c != countHoles(p.m, s, s+l) {
					t.Fatalf("CountHoles(%d, %d) = %d, want %d", s, l, c, countHoles(p.m, s, s+l))
				}
				if b, r := p.tr.HoleRuns(s, l); b != countHoles(p.m, s, s+l) || r != countHoleRuns(p.m, s, s+l) {
					t.Fatalf("HoleRuns(%d, %d) = %d, %d; want %d, %d", s, l, b, r, countHoles(p.m, s, s+l), countHoleRuns(p.m, s, s+l))
				}
				var want int64
				for b := s; b < s+l; b++ {
					if st, _ := p.m.at(b); st == Hole {
						p.m.set(b, Delalloc, -1)
						want++
					}
				}
				got, err := p.tr.MarkDelalloc(s, l)
				p.expectErr(t, "MarkDelalloc", err, nil, before, gen0)
				if got != want {
					t.Fatalf("MarkDelalloc(%d, %d) = %d holes, want %d", s, l, got, want)
				}
				p.check(t, before, gen0)
			},
			"AppendDelalloc": func(t *rapid.T) {
				// Writes at and past the last entry: the fast path.
				snap()
				s := p.m.base
				if last, ok := p.tr.Last(); ok {
					s = last.Start + rapid.Int64Range(0, last.Len+3).Draw(t, "appendOff")
				}
				if s >= p.m.end() {
					return
				}
				l := rapid.Int64Range(0, min(p.m.end()-s, 8)).Draw(t, "appendLen")
				var want int64
				for b := s; b < s+l; b++ {
					if st, _ := p.m.at(b); st == Hole {
						p.m.set(b, Delalloc, -1)
						want++
					}
				}
				got, err := p.tr.MarkDelalloc(s, l)
				p.expectErr(t, "MarkDelalloc", err, nil, before, gen0)
				if got != want {
					t.Fatalf("MarkDelalloc(%d, %d) = %d holes, want %d", s, l, got, want)
				}
				p.check(t, before, gen0)
			},
			"SetUnwritten": func(t *rapid.T) {
				snap()
				s, l, ok := drawIn(t, p.m.runs(Delalloc), "su")
				if !ok || rapid.IntRange(0, 4).Draw(t, "suAny") == 0 {
					s, l = p.drawRange(t, "suAny")
				}
				ph := p.drawPhys(t, s, l)
				var want error
				if !p.m.all(s, s+l, Delalloc) {
					want = ErrState
				} else {
					for i := range l {
						p.m.set(s+i, Unwritten, ph+i)
					}
				}
				p.expectErr(t, "SetUnwritten", p.tr.SetUnwritten(s, l, ph), want, before, gen0)
				p.check(t, before, gen0)
			},
			"SetWritten": func(t *rapid.T) {
				snap()
				s, l, ok := drawIn(t, p.m.runs(Unwritten), "sw")
				if !ok || rapid.IntRange(0, 4).Draw(t, "swAny") == 0 {
					s, l = p.drawRange(t, "swAny")
				}
				var want error
				if !p.m.all(s, s+l, Unwritten) {
					want = ErrState
				} else {
					for b := s; b < s+l; b++ {
						_, ph := p.m.at(b)
						p.m.set(b, Written, ph)
					}
				}
				p.expectErr(t, "SetWritten", p.tr.SetWritten(s, l), want, before, gen0)
				p.check(t, before, gen0)
			},
			"RevertUnwritten": func(t *rapid.T) {
				snap()
				s, l, ok := drawIn(t, p.m.runs(Unwritten), "ru")
				if !ok || rapid.IntRange(0, 4).Draw(t, "ruAny") == 0 {
					s, l = p.drawRange(t, "ruAny")
				}
				var want error
				var wantFreed []PhysExtent
				if !p.m.all(s, s+l, Unwritten) {
					want = ErrState
				} else {
					wantFreed, _ = p.m.release(s, s+l, Delalloc)
				}
				prefix := []PhysExtent{{Start: 7, Len: 1}}
				got, err := p.tr.RevertUnwritten(slices.Clone(prefix), s, l)
				p.expectErr(t, "RevertUnwritten", err, want, before, gen0)
				if !slices.Equal(got, append(prefix, wantFreed...)) {
					t.Fatalf("RevertUnwritten(%d, %d) freed %v, want %v", s, l, got[1:], wantFreed)
				}
				p.check(t, before, gen0)
			},
			"MapWritten": func(t *rapid.T) {
				snap()
				s, l, ok := drawIn(t, p.m.runs(Hole), "mw")
				if !ok || rapid.IntRange(0, 4).Draw(t, "mwAny") == 0 {
					s, l = p.drawRange(t, "mwAny")
				}
				ph := p.drawPhys(t, s, l)
				var want error
				if !p.m.all(s, s+l, Hole) {
					want = ErrState
				} else {
					for i := range l {
						p.m.set(s+i, Written, ph+i)
					}
				}
				p.expectErr(t, "MapWritten", p.tr.MapWritten(s, l, ph), want, before, gen0)
				p.check(t, before, gen0)
			},
			"Punch": func(t *rapid.T) {
				snap()
				s, l := p.drawRange(t, "punch")
				wantFreed, wantDropped := p.m.release(s, s+l, Hole)
				got, dropped, err := p.tr.Punch(nil, s, l)
				p.expectErr(t, "Punch", err, nil, before, gen0)
				if !slices.Equal(got, wantFreed) || dropped != wantDropped {
					t.Fatalf("Punch(%d, %d) = %v, %d; want %v, %d", s, l, got, dropped, wantFreed, wantDropped)
				}
				p.check(t, before, gen0)
			},
			"Truncate": func(t *rapid.T) {
				snap()
				nb := p.m.base + rapid.Int64Range(0, int64(len(p.m.st))).Draw(t, "truncate")
				wantFreed, wantDropped := p.m.release(nb, p.m.end(), Hole)
				got, dropped, err := p.tr.Truncate(nil, nb)
				p.expectErr(t, "Truncate", err, nil, before, gen0)
				if !slices.Equal(got, wantFreed) || dropped != wantDropped {
					t.Fatalf("Truncate(%d) = %v, %d; want %v, %d", nb, got, dropped, wantFreed, wantDropped)
				}
				p.check(t, before, gen0)
			},
			"Lookup": func(t *rapid.T) {
				s, l := p.drawRange(t, "lookup")
				got := p.tr.Lookup(nil, s, l)
				if want := p.m.segments(s, s+l); !slices.Equal(got, want) {
					t.Fatalf("Lookup(%d, %d):\n got  %v\n want %v", s, l, got, want)
				}
				var wantDA []Range
				for _, r := range p.m.runs(Delalloc) {
					if cs, ce := max(r.Start, s), min(r.End(), s+l); cs < ce {
						wantDA = append(wantDA, Range{Start: cs, Len: ce - cs})
					}
				}
				if got := p.tr.DelallocRanges(nil, s, l); !slices.Equal(got, wantDA) {
					t.Fatalf("DelallocRanges(%d, %d) = %v, want %v", s, l, got, wantDA)
				}
				var toEnd []Range
				for _, r := range p.m.runs(Delalloc) {
					if r.End() > s {
						cs := max(r.Start, s)
						toEnd = append(toEnd, Range{Start: cs, Len: r.End() - cs})
					}
				}
				if got := p.tr.DelallocRanges(nil, s, -1); !slices.Equal(got, toEnd) {
					t.Fatalf("DelallocRanges(%d, -1) = %v, want %v", s, got, toEnd)
				}
			},
			"Invalid": func(t *rapid.T) {
				snap()
				s := rapid.SampledFrom([]int64{-1, -5, 0, p.m.base, BlockLimit - 1, BlockLimit, BlockLimit + 1}).Draw(t, "badStart")
				l := rapid.SampledFrom([]int64{-1, 1, 2, BlockLimit, 1 << 62}).Draw(t, "badLen")
				if checkRange("", s, l) == nil {
					return
				}
				errs := map[string]error{}
				_, errs["MarkDelalloc"] = p.tr.MarkDelalloc(s, l)
				errs["SetUnwritten"] = p.tr.SetUnwritten(s, l, 0)
				errs["SetWritten"] = p.tr.SetWritten(s, l)
				_, errs["RevertUnwritten"] = p.tr.RevertUnwritten(nil, s, l)
				errs["MapWritten"] = p.tr.MapWritten(s, l, 0)
				_, _, errs["Punch"] = p.tr.Punch(nil, s, l)
				if s < 0 || s > BlockLimit {
					_, _, errs["Truncate"] = p.tr.Truncate(nil, s)
				}
				for op, err := range errs {
					p.expectErr(t, fmt.Sprintf("%s(%d, %d)", op, s, l), err, ErrInvalid, before, gen0)
				}
				p.check(t, before, gen0)
			},
		}
		t.Repeat(actions)
	})
}

func countHoles(m *model, s, e int64) int64 {
	var c int64
	for b := s; b < e; b++ {
		if st, _ := m.at(b); st == Hole {
			c++
		}
	}
	return c
}

// countHoleRuns counts the maximal runs of holes in [s, e).
func countHoleRuns(m *model, s, e int64) int64 {
	var c int64
	prevHole := false
	for b := s; b < e; b++ {
		st, _ := m.at(b)
		if st == Hole && !prevHole {
			c++
		}
		prevHole = st == Hole
	}
	return c
}

// TestLookupSharedMatchesLookup checks LookupShared against Lookup on
// random trees and ranges.
func TestLookupSharedMatchesLookup(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		tr := New()
		phys := int64(1000)
		for i := rapid.IntRange(0, 40).Draw(rt, "n"); i > 0; i-- {
			s := rapid.Int64Range(0, 500).Draw(rt, "s")
			n := rapid.Int64Range(1, 30).Draw(rt, "len")
			switch rapid.IntRange(0, 2).Draw(rt, "op") {
			case 0:
				tr.MarkDelalloc(s, n)
			case 1:
				if tr.CountHoles(s, n) == n {
					tr.MapWritten(s, n, phys)
					phys += n + rapid.Int64Range(0, 2).Draw(rt, "gap")
				}
			case 2:
				tr.Punch(nil, s, n)
			}
		}
		s := rapid.Int64Range(0, 600).Draw(rt, "qs")
		n := rapid.Int64Range(0, 100).Draw(rt, "qn")
		want := tr.Lookup(nil, s, n)
		got := tr.LookupShared(nil, s, n)
		if len(want) != len(got) {
			rt.Fatalf("LookupShared %v, Lookup %v", got, want)
		}
		for i := range want {
			if want[i] != got[i] {
				rt.Fatalf("LookupShared %v, Lookup %v", got, want)
			}
		}
	})
}

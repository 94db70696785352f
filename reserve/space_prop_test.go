package reserve

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// Block states of the bitmap model.
const (
	mUsed uint8 = iota
	mFree
	mBusy
	mHeld
)

// model is the allocator as a bitmap: one state per block, plus the
// reservation count. Everything the Space keeps in trees is recomputed here
// by brute force.
type model struct {
	total     int64
	maxExtent int64
	state     []uint8
	busySeq   []uint64
	reserved  int64
	committed uint64
	anyCommit bool
	nextSeq   uint64
}

func (m *model) count(st uint8) int64 {
	var n int64
	for _, b := range m.state {
		if b == st {
			n++
		}
	}
	return n
}

func (m *model) spendable() int64 {
	return m.count(mFree) + m.count(mBusy) + m.count(mHeld) - m.reserved
}

// runs returns the maximal runs of blocks in state st, by start.
func (m *model) runs(st uint8) []Extent {
	var out []Extent
	for i := int64(0); i < m.total; {
		if m.state[i] != st {
			i++
			continue
		}
		j := i
		for j < m.total && m.state[j] == st {
			j++
		}
		out = append(out, Extent{Start: i, Len: j - i})
		i = j
	}
	return out
}

func (m *model) all(e Extent, st uint8) bool {
	for b := e.Start; b < e.End(); b++ {
		if m.state[b] != st {
			return false
		}
	}
	return true
}

func (m *model) set(e Extent, st uint8) {
	for b := e.Start; b < e.End(); b++ {
		m.state[b] = st
	}
}

func abs64(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// expectPiece is Alloc's rule for the next extent, computed by scanning
// every free run.
func (m *model) expectPiece(rem, goal int64) Extent {
	n := min(rem, m.maxExtent)
	runs := m.runs(mFree)
	if goal >= 0 {
		for _, r := range runs {
			if r.Start <= goal && goal < r.End() && r.End()-goal >= rem {
				return Extent{Start: goal, Len: n}
			}
		}
	}
	// Best fit: minimise (length, distance of the placed allocation to
	// goal, start).
	var best Extent
	var bestDist int64
	found := false
	for _, r := range runs {
		if r.Len < rem {
			continue
		}
		p := max(r.Start, min(goal, r.End()-rem))
		d := abs64(p - goal)
		if !found || r.Len < best.Len || r.Len == best.Len && (d < bestDist || d == bestDist && r.Start < best.Start) {
			best, bestDist, found = r, d, true
		}
	}
	if found {
		return Extent{Start: max(best.Start, min(goal, best.End()-rem)), Len: n}
	}
	// Largest first: maximise length, then minimise |start-goal|, start;
	// but a run starting at goal that offers as much continues there.
	for _, r := range runs {
		d := abs64(r.Start - goal)
		if !found || r.Len > best.Len || r.Len == best.Len && (d < bestDist || d == bestDist && r.Start < best.Start) {
			best, bestDist, found = r, d, true
		}
	}
	n = min(best.Len, m.maxExtent)
	for _, r := range runs {
		if r.Start == goal && r.Len >= n {
			return Extent{Start: goal, Len: n}
		}
	}
	return Extent{Start: best.Start, Len: n}
}

// minPieces is the fewest extents of at most maxExtent blocks, each inside
// one free run, that can add up to want: take the largest pieces first,
// where a run of r blocks offers r/maxExtent full pieces and one of
// r%maxExtent.
func (m *model) minPieces(want int64) int {
	var pieces []int64
	for _, r := range m.runs(mFree) {
		for l := r.Len; l > 0; l -= min(l, m.maxExtent) {
			pieces = append(pieces, min(l, m.maxExtent))
		}
	}
	slices.Sort(pieces)
	slices.Reverse(pieces)
	k := 0
	for sum := int64(0); sum < want; k++ {
		sum += pieces[k]
	}
	return k
}

// genExtent returns an extent that is, most of the time, inside a run of
// blocks in state st (so the operation should succeed), and otherwise
// arbitrary inside [0, total] (so it usually should not).
func (m *model) genExtent(t *rapid.T, st uint8, label string) Extent {
	runs := m.runs(st)
	if len(runs) > 0 && rapid.IntRange(0, 3).Draw(t, label+"Valid") > 0 {
		r := rapid.SampledFrom(runs).Draw(t, label+"Run")
		off := rapid.Int64Range(0, r.Len-1).Draw(t, label+"Off")
		l := rapid.Int64Range(1, r.Len-off).Draw(t, label+"Len")
		return Extent{Start: r.Start + off, Len: l}
	}
	start := rapid.Int64Range(0, m.total).Draw(t, label+"Start")
	return Extent{Start: start, Len: rapid.Int64Range(0, m.total-start).Draw(t, label+"Len")}
}

// wantErr fails unless err matches the model's verdict: nil when ok, else
// an error wrapping target.
func wantErr(t *rapid.T, op string, err error, ok bool, target error) {
	t.Helper()
	if ok && err != nil {
		t.Fatalf("%s: unexpected error %v", op, err)
	}
	if !ok && !errors.Is(err, target) {
		t.Fatalf("%s: got error %v, want one wrapping %v", op, err, target)
	}
}

// longerRuns raises rapid's number of actions per run (30 by default, short
// for a state machine with eight operations) unless the command line or
// RAPID_STEPS chose one.
func longerRuns(t *testing.T, steps int) {
	if testing.Short() {
		steps /= 4
	}
	rapidFlag(t, "rapid.steps", steps)
}

// rapidFlag sets one of rapid's flags for the test unless the command line
// or the environment (RAPID_CHECKS, RAPID_STEPS) chose a value.
func rapidFlag(t *testing.T, name string, v int) {
	f := flag.Lookup(name)
	env := "RAPID_" + strings.ToUpper(strings.TrimPrefix(name, "rapid."))
	if f == nil || f.Value.String() != f.DefValue || os.Getenv(env) != "" {
		return
	}
	old := f.Value.String()
	if err := f.Value.Set(strconv.Itoa(v)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Value.Set(old) })
}

func TestSpaceAgainstBitmapModel(t *testing.T) {
	longerRuns(t, 1000)
	rapid.Check(t, func(t *rapid.T) {
		total := rapid.Int64Range(1, 160).Draw(t, "total")
		var used []Extent
		for pos := int64(0); pos < total; {
			pos += rapid.Int64Range(0, 20).Draw(t, "usedGap")
			if pos >= total {
				break
			}
			l := rapid.Int64Range(0, min(12, total-pos)).Draw(t, "usedLen")
			used = append(used, Extent{Start: pos, Len: l})
			pos += l
		}
		used = rapid.Permutation(used).Draw(t, "usedOrder")
		checkSpaceAgainstModel(t, total, used, 0)
	})
}

// TestSpaceAgainstBitmapModelLarge runs the same state machine on a space
// of thousands of free extents, so that both index trees are several levels
// deep and the operations that work from a cursor meet leaf boundaries and
// fall back to full descents. Requests are capped at 64 blocks to keep the
// model's brute force affordable.
func TestSpaceAgainstBitmapModelLarge(t *testing.T) {
	checks, steps := 12, 300
	if raceEnabled {
		// One goroutine: nothing for the race detector to find.
		checks, steps = 2, 150
	}
	rapidFlag(t, "rapid.checks", checks)
	rapidFlag(t, "rapid.steps", steps)
	rapid.Check(t, func(t *rapid.T) {
		total := rapid.Int64Range(12000, 20000).Draw(t, "total")
		r := rand.New(rand.NewPCG(rapid.Uint64().Draw(t, "layoutSeed"), 1))
		var used []Extent
		for pos := r.Int64N(3); pos < total; {
			l := min(r.Int64N(3)+1, total-pos)
			used = append(used, Extent{Start: pos, Len: l})
			pos += l + r.Int64N(4) + 1
		}
		checkSpaceAgainstModel(t, total, used, 64)
	})
}

// checkSpaceAgainstModel builds a Space of total blocks with the used
// extents and runs random operations on it and on the bitmap model,
// comparing every result, error and statistic. maxN > 0 caps the blocks
// one Reserve or Alloc asks for.
func checkSpaceAgainstModel(t *rapid.T, total int64, used []Extent, maxN int64) {
	capN := func(n int64) int64 {
		if maxN > 0 {
			return min(n, maxN)
		}
		return n
	}
	m := &model{
		total:     total,
		maxExtent: rapid.Int64Range(1, 48).Draw(t, "maxExtent"),
		state:     make([]uint8, total),
		busySeq:   make([]uint64, total),
	}
	for i := range m.state {
		m.state[i] = mFree
	}
	for _, e := range used {
		m.set(e, mUsed)
	}
	// Free extents from longLen blocks up are indexed by size in the tree
	// of long extents (shortLen in production, out of reach of these
	// spaces), those below bucketLen in a tree per length, the others in
	// the packed tree: small thresholds exercise all three and the
	// hand-overs between them.
	longLen := rapid.SampledFrom([]int64{shortLen, 1, 2, 3, 5, 8, 13}).Draw(t, "longLen")
	bucketLen := min(longLen, rapid.SampledFrom([]int64{sizeBuckets + 1, 1, 2, 3, 4, 6}).Draw(t, "bucketLen"))
	s, err := newSpaceTiers(total, used, bucketLen, longLen)
	if err != nil {
		t.Fatalf("NewSpace(%d, %v): %v", total, used, err)
	}
	if err := s.SetMaxExtent(m.maxExtent); err != nil {
		t.Fatal(err)
	}

	// doAlloc calls Alloc and checks the result extent by extent against
	// the rule computed on the model's free runs.
	doAlloc := func(t *rapid.T, want int64) {
		goal := rapid.Int64Range(-2, total+1).Draw(t, "goal")
		got, err := s.Alloc(want, goal)
		switch {
		case want < 0 || want > m.reserved:
			wantErr(t, "Alloc", err, false, ErrInvalid)
			return
		case want == 0:
			if err != nil || len(got) != 0 {
				t.Fatalf("Alloc(0) = %v, %v; want nothing", got, err)
			}
			return
		case want > m.count(mFree):
			wantErr(t, "Alloc", err, false, ErrBusy)
			if !errors.Is(err, ErrNoSpace) {
				t.Fatalf("Alloc: busy error %v does not wrap ErrNoSpace", err)
			}
			return
		}
		wantErr(t, "Alloc", err, true, nil)
		if k := m.minPieces(want); len(got) != k {
			t.Fatalf("Alloc(%d, %d) = %v: %d extents, fewest possible %d", want, goal, got, len(got), k)
		}
		rem, g := want, max(-1, min(goal, total))
		for i, e := range got {
			if rem <= 0 {
				t.Fatalf("Alloc(%d, %d) = %v: more than want", want, goal, got)
			}
			if e.Len <= 0 || e.Start < 0 || e.End() > total || !m.all(e, mFree) {
				t.Fatalf("Alloc(%d, %d) = %v: extent %d %v is not allocatable in the model", want, goal, got, i, e)
			}
			if exp := m.expectPiece(rem, g); e != exp {
				t.Fatalf("Alloc(%d, %d) = %v: extent %d is %v, rule says %v (free runs %v)", want, goal, got, i, e, exp, m.runs(mFree))
			}
			m.set(e, mUsed)
			rem -= e.Len
			g = e.End()
		}
		if rem != 0 {
			t.Fatalf("Alloc(%d, %d) = %v: %d blocks short", want, goal, got, rem)
		}
		m.reserved -= want
	}

	t.Repeat(map[string]func(*rapid.T){
		"Reserve": func(t *rapid.T) {
			n := rapid.Int64Range(-1, capN(m.spendable()+2)).Draw(t, "n")
			err := s.Reserve(n)
			switch {
			case n < 0:
				wantErr(t, "Reserve", err, false, ErrInvalid)
			case n <= m.spendable():
				wantErr(t, "Reserve", err, true, nil)
				m.reserved += n
			default:
				wantErr(t, "Reserve", err, false, ErrNoSpace)
			}
		},
		"Unreserve": func(t *rapid.T) {
			n := rapid.Int64Range(-1, m.reserved+2).Draw(t, "n")
			err := s.Unreserve(n)
			switch {
			case n < 0 || n > m.reserved:
				wantErr(t, "Unreserve", err, false, ErrInvalid)
			default:
				wantErr(t, "Unreserve", err, true, nil)
				m.reserved -= n
			}
		},
		"Alloc": func(t *rapid.T) {
			doAlloc(t, rapid.Int64Range(-1, capN(m.reserved+2)).Draw(t, "want"))
		},
		// Most allocations in real use follow a reservation of the same
		// size; without this action few Allocs would succeed.
		"ReserveAlloc": func(t *rapid.T) {
			sp := m.spendable()
			if sp == 0 {
				t.Skip("nothing spendable")
			}
			n := rapid.Int64Range(1, capN(sp)).Draw(t, "n")
			if err := s.Reserve(n); err != nil {
				t.Fatalf("Reserve(%d) with %d spendable: %v", n, sp, err)
			}
			m.reserved += n
			doAlloc(t, n)
		},
		"Free": func(t *rapid.T) {
			e := m.genExtent(t, mUsed, "free")
			seq := rapid.Uint64Range(0, m.nextSeq+1).Draw(t, "seq")
			err := s.Free(e, seq)
			switch {
			case e.Len == 0:
				wantErr(t, "Free", err, true, nil)
			case !m.all(e, mUsed):
				wantErr(t, fmt.Sprintf("Free(%v)", e), err, false, ErrInvalid)
			default:
				wantErr(t, "Free", err, true, nil)
				if m.anyCommit && seq <= m.committed {
					m.set(e, mFree)
				} else {
					m.set(e, mBusy)
					for b := e.Start; b < e.End(); b++ {
						m.busySeq[b] = seq
					}
				}
				m.nextSeq = max(m.nextSeq, seq+1)
			}
		},
		"Commit": func(t *rapid.T) {
			seq := rapid.Uint64Range(0, m.nextSeq+1).Draw(t, "seq")
			s.Commit(seq)
			if !m.anyCommit || seq > m.committed {
				m.committed, m.anyCommit = seq, true
			}
			for b, st := range m.state {
				if st == mBusy && m.busySeq[b] <= seq {
					m.state[b] = mFree
				}
			}
		},
		"HoldAt": func(t *rapid.T) {
			var start int64
			if runs := m.runs(mFree); len(runs) > 0 && rapid.Bool().Draw(t, "holdValid") {
				r := rapid.SampledFrom(runs).Draw(t, "holdRun")
				start = r.Start + rapid.Int64Range(0, r.Len-1).Draw(t, "holdOff")
			} else {
				start = rapid.Int64Range(-1, total).Draw(t, "holdStart")
			}
			maxLen := rapid.Int64Range(-1, 40).Draw(t, "maxLen")
			got := s.HoldAt(start, maxLen)
			want := Extent{Start: start}
			if maxLen > 0 && start >= 0 && start < total && m.state[start] == mFree {
				for want.End() < total && want.Len < maxLen && m.state[want.End()] == mFree {
					want.Len++
				}
			}
			if got != want {
				t.Fatalf("HoldAt(%d, %d) = %v, want %v", start, maxLen, got, want)
			}
			m.set(want, mHeld)
		},
		"ClaimHeld": func(t *rapid.T) {
			e := m.genExtent(t, mHeld, "claim")
			err := s.ClaimHeld(e)
			switch {
			case e.Len == 0:
				wantErr(t, "ClaimHeld", err, true, nil)
			case !m.all(e, mHeld) || e.Len > m.reserved:
				wantErr(t, fmt.Sprintf("ClaimHeld(%v)", e), err, false, ErrInvalid)
			default:
				wantErr(t, "ClaimHeld", err, true, nil)
				m.set(e, mUsed)
				m.reserved -= e.Len
			}
		},
		"Unhold": func(t *rapid.T) {
			e := m.genExtent(t, mHeld, "unhold")
			err := s.Unhold(e)
			switch {
			case e.Len == 0:
				wantErr(t, "Unhold", err, true, nil)
			case !m.all(e, mHeld):
				wantErr(t, fmt.Sprintf("Unhold(%v)", e), err, false, ErrInvalid)
			default:
				wantErr(t, "Unhold", err, true, nil)
				m.set(e, mFree)
			}
		},
		"": func(t *rapid.T) {
			if err := s.Check(); err != nil {
				t.Fatalf("Check: %v", err)
			}
			free, busy, held, usedN := m.count(mFree), m.count(mBusy), m.count(mHeld), m.count(mUsed)
			runs := m.runs(mFree)
			var largest int64
			for _, r := range runs {
				largest = max(largest, r.Len)
			}
			want := Stats{
				Total: total, Free: free + busy + held - m.reserved, Reserved: m.reserved, Allocated: usedN,
				Busy: busy, Held: held, Allocatable: free, FreeExtents: len(runs), LargestFree: largest,
			}
			if got := s.Stats(); got != want {
				t.Fatalf("Stats = %+v, model %+v", got, want)
			}
			if c := s.Counts(); c.Free+c.Reserved+c.Allocated != c.Total || c.Free < 0 || c.Reserved < 0 || c.Allocated < 0 {
				t.Fatalf("Counts %+v break the accounting invariant", c)
			}
			var got []Extent
			s.FreeExtents(func(e Extent) bool { got = append(got, e); return true })
			if !slices.Equal(got, runs) {
				t.Fatalf("free extents %v, model's maximal free runs %v (not coalesced?)", got, runs)
			}
		},
	})
}

package reserve

import (
	"errors"
	"testing"
)

// FuzzSpace decodes the input into a sequence of operations on a small
// Space and checks each against the bitmap model of the property test:
// results, errors, and every invariant after every operation. Coverage
// guidance complements rapid's random state machine.
func FuzzSpace(f *testing.F) {
	f.Add([]byte{40, 5, 0, 20, 0, 3, 7, 5, 2, 1, 6, 3, 0, 9, 4, 10, 8, 1, 3, 12, 2})
	f.Add([]byte{64, 1, 0, 60, 1, 30, 0, 4, 2, 0, 0, 3, 0, 8, 1, 10, 0, 40, 1, 30, 10})
	f.Add([]byte{200, 16, 5, 100, 0, 90, 3, 4, 50, 1, 7, 60, 9, 6, 2, 3, 4, 5, 6, 7, 8})
	f.Fuzz(func(t *testing.T, data []byte) {
		next := func() int64 {
			if len(data) == 0 {
				return 0
			}
			b := data[0]
			data = data[1:]
			return int64(b)
		}
		total := next()%200 + 1
		m := &model{
			total:     total,
			maxExtent: next()%32 + 1,
			state:     make([]uint8, total),
			busySeq:   make([]uint64, total),
		}
		for i := range m.state {
			m.state[i] = mFree
		}
		used := Extent{Start: next() % total}
		used.Len = next() % (total - used.Start + 1)
		m.set(used, mUsed)
		// Exercise every tree of the by-size index (see
		// checkSpaceAgainstModel): per-length, packed and long.
		tiers := [][2]int64{{sizeBuckets + 1, shortLen}, {2, 3}, {4, 10}, {1, 6}, {3, 3}}[total%5]
		s, err := newSpaceTiers(total, []Extent{used}, tiers[0], tiers[1])
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SetMaxExtent(m.maxExtent); err != nil {
			t.Fatal(err)
		}
		extent := func() Extent {
			e := Extent{Start: next() % (total + 1)}
			e.Len = next() % (total - e.Start + 1)
			return e
		}
		for steps := 0; len(data) > 0 && steps < 200; steps++ {
			switch next() % 7 {
			case 0: // reserve and allocate
				n := next() % (m.spendable() + 1)
				if err := s.Reserve(n); err != nil {
					t.Fatalf("Reserve(%d) with %d spendable: %v", n, m.spendable(), err)
				}
				m.reserved += n
				goal := next() - 1
				got, err := s.Alloc(n, goal)
				switch {
				case n == 0:
					if err != nil || got != nil {
						t.Fatalf("Alloc(0) = %v, %v", got, err)
					}
				case n > m.count(mFree):
					if !errors.Is(err, ErrBusy) || !errors.Is(err, ErrNoSpace) {
						t.Fatalf("Alloc(%d) with %d allocatable: %v, want ErrBusy", n, m.count(mFree), err)
					}
				default:
					if err != nil {
						t.Fatalf("Alloc(%d, %d): %v", n, goal, err)
					}
					if k := m.minPieces(n); len(got) != k {
						t.Fatalf("Alloc(%d, %d) = %v: %d extents, fewest %d", n, goal, got, len(got), k)
					}
					rem, g := n, max(-1, min(goal, total))
					for _, e := range got {
						if exp := m.expectPiece(rem, g); e != exp || !m.all(e, mFree) {
							t.Fatalf("Alloc(%d, %d) = %v: %v where the rule says %v (free runs %v)", n, goal, got, e, exp, m.runs(mFree))
						}
						m.set(e, mUsed)
						rem, g = rem-e.Len, e.End()
					}
					m.reserved -= n
				}
			case 1: // unreserve
				n := next() % (m.reserved + 1)
				if err := s.Unreserve(n); err != nil {
					t.Fatal(err)
				}
				m.reserved -= n
			case 2: // free
				e, seq := extent(), uint64(next())
				err := s.Free(e, seq)
				switch {
				case e.Len == 0 && err == nil:
				case e.Len > 0 && m.all(e, mUsed) && err == nil:
					if m.anyCommit && seq <= m.committed {
						m.set(e, mFree)
					} else {
						m.set(e, mBusy)
						for b := e.Start; b < e.End(); b++ {
							m.busySeq[b] = seq
						}
					}
				case e.Len > 0 && !m.all(e, mUsed) && errors.Is(err, ErrInvalid):
				default:
					t.Fatalf("Free(%v) = %v; model says allocated=%v", e, err, m.all(e, mUsed))
				}
			case 3: // commit
				seq := uint64(next())
				s.Commit(seq)
				if !m.anyCommit || seq > m.committed {
					m.committed, m.anyCommit = seq, true
				}
				for b, st := range m.state {
					if st == mBusy && m.busySeq[b] <= seq {
						m.state[b] = mFree
					}
				}
			case 4: // hold
				start, maxLen := next()-1, next()-1
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
			case 5: // claim
				e := extent()
				err := s.ClaimHeld(e)
				ok := e.Len == 0 || m.all(e, mHeld) && e.Len <= m.reserved
				if ok != (err == nil) || !ok && !errors.Is(err, ErrInvalid) {
					t.Fatalf("ClaimHeld(%v) = %v; model says %v", e, err, ok)
				}
				if ok {
					m.set(e, mUsed)
					m.reserved -= e.Len
				}
			case 6: // unhold
				e := extent()
				err := s.Unhold(e)
				ok := e.Len == 0 || m.all(e, mHeld)
				if ok != (err == nil) || !ok && !errors.Is(err, ErrInvalid) {
					t.Fatalf("Unhold(%v) = %v; model says %v", e, err, ok)
				}
				if ok {
					m.set(e, mFree)
				}
			}
			if err := s.Check(); err != nil {
				t.Fatal(err)
			}
			st := s.Stats()
			free, busy, held := m.count(mFree), m.count(mBusy), m.count(mHeld)
			if st.Allocatable != free || st.Busy != busy || st.Held != held || st.Reserved != m.reserved ||
				st.Free != free+busy+held-m.reserved || st.FreeExtents != len(m.runs(mFree)) {
				t.Fatalf("Stats %+v; model free %d busy %d held %d reserved %d runs %v", st, free, busy, held, m.reserved, m.runs(mFree))
			}
		}
	})
}

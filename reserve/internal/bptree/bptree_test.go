package bptree

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// model is the tree as a sorted slice of items.
type item struct {
	k Key
	v int64
}

type model []item

func cmpKey(a, b Key) int {
	switch {
	case a.Less(b):
		return -1
	case b.Less(a):
		return 1
	}
	return 0
}

func (m model) find(k Key) (int, bool) {
	return slices.BinarySearchFunc(m, k, func(x item, k Key) int { return cmpKey(x.k, k) })
}

func (m *model) insert(k Key, v int64) bool {
	i, ok := m.find(k)
	if ok {
		return false
	}
	*m = slices.Insert(*m, i, item{k, v})
	return true
}

func (m *model) delete(k Key) (int64, bool) {
	i, ok := m.find(k)
	if !ok {
		return 0, false
	}
	v := (*m)[i].v
	*m = slices.Delete(*m, i, i+1)
	return v, true
}

// expect fails unless cursor c is at model index i (invalid for i outside
// the model).
func expect(t *rapid.T, what string, m model, c Cursor[int64], i int) {
	t.Helper()
	if i < 0 || i >= len(m) {
		if c.Valid() {
			t.Fatalf("%s: cursor at %v, model has nothing", what, c.Key())
		}
		return
	}
	if !c.Valid() {
		t.Fatalf("%s: invalid cursor, model has %v", what, m[i].k)
	}
	if c.Key() != m[i].k || c.Value() != m[i].v {
		t.Fatalf("%s: cursor at %v=%d, model has %v=%d", what, c.Key(), c.Value(), m[i].k, m[i].v)
	}
}

func drawKey(t *rapid.T, label string) Key {
	return Key{A: rapid.Uint64Range(0, 6000).Draw(t, label+"A"), B: rapid.Uint64Range(0, 3).Draw(t, label+"B")}
}

// TestTreeAgainstSortedSlice runs random operations, many of them in bulk so
// that the tree reaches three levels and merges and borrows cascade, and
// compares every answer and the whole content with a sorted slice after
// each step.
func TestTreeAgainstSortedSlice(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		var tr Tree[int64]
		var m model
		nextVal := int64(1)
		val := func() int64 { nextVal++; return nextVal }

		// pickKey draws a key of the model most of the time, else any key.
		pickKey := func(t *rapid.T, label string) Key {
			if len(m) > 0 && rapid.IntRange(0, 3).Draw(t, label+"Known") > 0 {
				return m[rapid.IntRange(0, len(m)-1).Draw(t, label+"Index")].k
			}
			return drawKey(t, label)
		}

		t.Repeat(map[string]func(*rapid.T){
			"Insert": func(t *rapid.T) {
				k, v := pickKey(t, "ins"), val()
				if got, want := tr.Insert(k, v), m.insert(k, v); got != want {
					t.Fatalf("Insert(%v) = %v, model %v", k, got, want)
				}
			},
			"InsertMany": func(t *rapid.T) {
				n := rapid.IntRange(1, 3000).Draw(t, "n")
				a := rapid.Uint64Range(0, 6000).Draw(t, "from")
				stride := rapid.Uint64Range(1, 4).Draw(t, "stride")
				order := rapid.IntRange(0, 2).Draw(t, "order")
				keys := make([]Key, n)
				for i := range keys {
					keys[i] = Key{A: a + uint64(i)*stride, B: uint64(i % 2)}
				}
				switch order {
				case 1:
					slices.Reverse(keys)
				case 2:
					r := rand.New(rand.NewPCG(uint64(n), uint64(a)))
					r.Shuffle(n, func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
				}
				for _, k := range keys {
					v := val()
					if got, want := tr.Insert(k, v), m.insert(k, v); got != want {
						t.Fatalf("Insert(%v) = %v, model %v", k, got, want)
					}
				}
			},
			"Delete": func(t *rapid.T) {
				k := pickKey(t, "del")
				v, ok := tr.Delete(k)
				mv, mok := m.delete(k)
				if ok != mok || v != mv {
					t.Fatalf("Delete(%v) = %d, %v; model %d, %v", k, v, ok, mv, mok)
				}
			},
			"DeleteMany": func(t *rapid.T) {
				if len(m) == 0 {
					t.Skip("empty")
				}
				i := rapid.IntRange(0, len(m)-1).Draw(t, "from")
				n := rapid.IntRange(1, len(m)-i).Draw(t, "n")
				keys := make([]Key, n)
				for j := range keys {
					keys[j] = m[i+j].k
				}
				if rapid.Bool().Draw(t, "shuffle") {
					r := rand.New(rand.NewPCG(uint64(n), uint64(i)))
					r.Shuffle(n, func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
				}
				for _, k := range keys {
					v, ok := tr.Delete(k)
					mv, mok := m.delete(k)
					if ok != mok || v != mv {
						t.Fatalf("Delete(%v) = %d, %v; model %d, %v", k, v, ok, mv, mok)
					}
				}
			},
			"DeleteAtMany": func(t *rapid.T) {
				// Delete a run through cursors, re-seeking after each
				// delete since a delete invalidates cursors.
				k := pickKey(t, "dat")
				n := rapid.IntRange(1, 2000).Draw(t, "n")
				for j := 0; j < n; j++ {
					c := tr.Seek(k)
					i, _ := m.find(k)
					expect(t, "Seek before DeleteAt", m, c, i)
					if !c.Valid() {
						break
					}
					tr.DeleteAt(c)
					m = slices.Delete(m, i, i+1)
				}
			},
			"Seek": func(t *rapid.T) {
				k := pickKey(t, "seek")
				i, _ := m.find(k)
				c := tr.Seek(k)
				expect(t, "Seek", m, c, i)
				steps := rapid.IntRange(0, 70).Draw(t, "steps")
				back := rapid.Bool().Draw(t, "back")
				for s := 0; s < steps && c.Valid(); s++ {
					if back {
						c.Prev()
						i--
					} else {
						c.Next()
						i++
					}
					expect(t, "cursor step", m, c, i)
				}
			},
			"Get": func(t *rapid.T) {
				k := pickKey(t, "get")
				v, ok := tr.Get(k)
				i, mok := m.find(k)
				if ok != mok || ok && v != m[i].v || tr.Has(k) != mok {
					t.Fatalf("Get(%v) = %d, %v; model has it: %v", k, v, ok, mok)
				}
			},
			"InsertNear": func(t *rapid.T) {
				k := drawKey(t, "near")
				if _, ok := m.find(k); ok {
					t.Skip("present")
				}
				v := val()
				tr.InsertNear(tr.Seek(k), k, v)
				m.insert(k, v)
			},
			"SetValue": func(t *rapid.T) {
				k := pickKey(t, "set")
				c := tr.Seek(k)
				if !c.Valid() {
					t.Skip("past the end")
				}
				v := val()
				c.SetValue(v)
				i, _ := m.find(k)
				m[i].v = v
			},
			"ReplaceKey": func(t *rapid.T) {
				if len(m) == 0 {
					t.Skip("empty")
				}
				i := rapid.IntRange(0, len(m)-1).Draw(t, "index")
				// A new key that keeps the item's place: between its
				// neighbours.
				lo, hi := Key{}, Key{A: 20000}
				if i > 0 {
					lo = m[i-1].k
				}
				if i+1 < len(m) {
					hi = m[i+1].k
				}
				k := Key{A: rapid.Uint64Range(lo.A, hi.A).Draw(t, "newA"), B: rapid.Uint64Range(0, 3).Draw(t, "newB")}
				if i > 0 && !lo.Less(k) || !k.Less(hi) {
					t.Skip("no room")
				}
				tr.ReplaceKey(tr.Seek(m[i].k), k)
				m[i].k = k
			},
			"": func(t *rapid.T) {
				if err := tr.Check(); err != nil {
					t.Fatal(err)
				}
				if tr.Len() != len(m) {
					t.Fatalf("Len %d, model %d", tr.Len(), len(m))
				}
				i := 0
				tr.Ascend(func(k Key, v int64) bool {
					if i >= len(m) || m[i].k != k || m[i].v != v {
						t.Fatalf("Ascend item %d: %v=%d, model %v", i, k, v, m[min(i, len(m)-1):min(i+1, len(m))])
					}
					i++
					return true
				})
				if i != len(m) {
					t.Fatalf("Ascend gave %d items, model %d", i, len(m))
				}
				expect(t, "Seek of the least key", m, tr.Seek(Key{}), 0)
				expect(t, "Max", m, tr.Max(), len(m)-1)
			},
		})
	})
}

// The zero Tree is empty and usable, and a tree emptied by deletes goes
// back to one leaf.
func TestZeroAndEmpty(t *testing.T) {
	var tr Tree[struct{}]
	if tr.Seek(Key{}).Valid() || tr.Max().Valid() || tr.Len() != 0 {
		t.Fatal("zero tree not empty")
	}
	if _, ok := tr.Delete(Key{}); ok {
		t.Fatal("Delete on the zero tree found something")
	}
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	for i := range uint64(10000) {
		tr.Insert(Key{A: i}, struct{}{})
	}
	if tr.height < 2 {
		t.Fatalf("10000 keys in %d inner levels; the test wants at least 2", tr.height)
	}
	// Keys added in order fill the leaves to three quarters, not half.
	leaves := 0
	for l := tr.head; l != nil; l = l.next {
		leaves++
	}
	if want := 10000/(leafCap-leafMin) + 1; leaves > want {
		t.Fatalf("10000 ordered keys in %d leaves, want at most %d", leaves, want)
	}
	for i := range uint64(10000) {
		if _, ok := tr.Delete(Key{A: i}); !ok {
			t.Fatalf("Delete(%d) missed", i)
		}
	}
	if err := tr.Check(); err != nil {
		t.Fatal(err)
	}
	if tr.height != 0 || tr.Len() != 0 || tr.Seek(Key{}).Valid() {
		t.Fatalf("emptied tree: height %d, len %d", tr.height, tr.Len())
	}
}

// Check must notice a broken tree, not just pass.
func TestCheckDetectsCorruption(t *testing.T) {
	build := func() *Tree[int64] {
		var tr Tree[int64]
		for i := range int64(500) {
			tr.Insert(Key{A: uint64(i)}, i)
		}
		return &tr
	}
	for name, corrupt := range map[string]func(*Tree[int64]){
		"keys out of order": func(tr *Tree[int64]) { tr.head.keys[0] = Key{A: 1000} },
		"count off":         func(tr *Tree[int64]) { tr.n++ },
		"chain broken":      func(tr *Tree[int64]) { tr.head.next = nil },
		"separator wrong":   func(tr *Tree[int64]) { tr.root.keys[1] = Key{} },
		"underfull leaf":    func(tr *Tree[int64]) { tr.head.next.n = 1 },
	} {
		tr := build()
		corrupt(tr)
		if err := tr.Check(); !errors.Is(err, errCheck) {
			t.Errorf("%s: Check = %v", name, err)
		}
	}
}

// Misuse of the cursor shortcuts is a panic, not a silently broken tree.
func TestShortcutMisusePanics(t *testing.T) {
	var tr Tree[int64]
	for i := range int64(200) {
		tr.Insert(Key{A: 2 * uint64(i)}, i)
	}
	mustPanic := func(name string, fn func()) {
		t.Helper()
		defer func() {
			if recover() == nil {
				t.Errorf("%s did not panic", name)
			}
		}()
		fn()
	}
	mustPanic("InsertNear at the wrong place", func() { tr.InsertNear(tr.Seek(Key{A: 101}), Key{A: 11}, 0) })
	mustPanic("InsertNear of a present key", func() { tr.InsertNear(tr.Seek(Key{A: 0}), Key{A: 0}, 0) })
	mustPanic("ReplaceKey onto a present key", func() { tr.ReplaceKey(tr.Seek(Key{A: 10}), Key{A: 300}) })
}

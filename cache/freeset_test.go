package cache

import (
	"testing"

	"pgregory.net/rapid"
)

// TestFreeSetModel checks freeSet against a plain set of frame numbers:
// take and takeN hand out members only, takeGroup whole aligned groups of
// members only (and finds one whenever one exists), and the count stays
// right.
func TestFreeSetModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		frames := rapid.IntRange(1, 700).Draw(t, "frames")
		f := newFreeSet(frames)
		model := make(map[uint32]bool, frames)
		for i := range frames {
			model[uint32(i)] = true
		}
		taken := func(i uint32) {
			if !model[i] {
				t.Fatalf("frame %d handed out but not free", i)
			}
			delete(model, i)
		}
		t.Repeat(map[string]func(*rapid.T){
			"take": func(t *rapid.T) {
				i, ok := f.take()
				if ok != (len(model) > 0) {
					t.Fatalf("take: ok %v with %d free", ok, len(model))
				}
				if ok {
					taken(i)
				}
			},
			"takeN": func(t *rapid.T) {
				n := rapid.IntRange(0, 80).Draw(t, "n")
				got := f.takeN(nil, n)
				if want := min(n, len(model)); len(got) != want {
					t.Fatalf("takeN(%d) gave %d frames with %d free", n, len(got), len(model))
				}
				for _, i := range got {
					taken(i)
				}
			},
			"takeGroup": func(t *rapid.T) {
				g := 1 << rapid.IntRange(0, 7).Draw(t, "log2 g")
				exists := false
				for s := 0; s+g <= frames && !exists; s += g {
					exists = true
					for i := s; i < s+g; i++ {
						exists = exists && model[uint32(i)]
					}
				}
				base, ok := f.takeGroup(g)
				if ok != exists {
					t.Fatalf("takeGroup(%d): ok %v, a free aligned group exists: %v", g, ok, exists)
				}
				if ok {
					if int(base)%g != 0 {
						t.Fatalf("takeGroup(%d) = %d, not aligned", g, base)
					}
					for i := base; i < base+uint32(g); i++ {
						taken(i)
					}
				}
			},
			"add": func(t *rapid.T) {
				i := uint32(rapid.IntRange(0, frames-1).Draw(t, "frame"))
				if model[i] {
					defer func() {
						if recover() == nil {
							t.Fatalf("add(%d) of a free frame did not panic", i)
						}
					}()
					f.add(i)
					return
				}
				f.add(i)
				model[i] = true
			},
			"": func(t *rapid.T) {
				if f.len() != len(model) {
					t.Fatalf("len %d, model %d", f.len(), len(model))
				}
			},
		})
	})
}

// TestFreeSetNextFit: frames come out ascending from where the last one
// was found, so frames taken one by one follow each other where the free
// ones do.
func TestFreeSetNextFit(t *testing.T) {
	f := newFreeSet(256)
	for want := range uint32(200) {
		if i, _ := f.take(); i != want {
			t.Fatalf("take %d gave frame %d", want, i)
		}
	}
	f.add(10)
	f.add(11)
	if i, _ := f.take(); i != 200 {
		t.Fatalf("after freeing 10 and 11, take gave %d; next fit continues at 200", i)
	}
	rest := f.takeN(nil, 100)
	if len(rest) != 57 || rest[54] != 255 || rest[55] != 10 || rest[56] != 11 {
		t.Fatalf("takeN wrapped wrongly: %d frames, tail %v", len(rest), rest[max(0, len(rest)-3):])
	}
}

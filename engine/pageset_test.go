package engine

import (
	"slices"
	"testing"

	"github.com/rawblock/rawblock/cache"
	"pgregory.net/rapid"
)

// TestPageSetModel checks pageSet against a map.
func TestPageSetModel(t *testing.T) {
	pages := make([]*cache.Page, 8)
	for i := range pages {
		pages[i] = new(cache.Page)
	}
	rapid.Check(t, func(rt *rapid.T) {
		var s pageSet
		model := map[int64]*cache.Page{}
		blk := rapid.Int64Range(0, 3*psChunk+5)
		for i, n := 0, rapid.IntRange(0, 300).Draw(rt, "ops"); i < n; i++ {
			b := blk.Draw(rt, "b")
			switch rapid.IntRange(0, 3).Draw(rt, "op") {
			case 0, 1:
				p := pages[rapid.IntRange(0, 7).Draw(rt, "p")]
				s.Set(b, p)
				model[b] = p
			case 2:
				if got, want := s.Delete(b), model[b]; got != want {
					rt.Fatalf("Delete(%d) = %p, want %p", b, got, want)
				}
				delete(model, b)
			case 3:
				b1 := b + rapid.Int64Range(0, 2*psChunk).Draw(rt, "n")
				s.DeleteRange(b, b1, func(x int64, p *cache.Page) {
					if model[x] != p || x < b || x >= b1 {
						rt.Fatalf("DeleteRange(%d,%d) gave %d", b, b1, x)
					}
					delete(model, x)
				})
			}
			if s.Len() != len(model) {
				rt.Fatalf("Len %d, model %d", s.Len(), len(model))
			}
			if g := s.Get(b); g != model[b] {
				rt.Fatalf("Get(%d) = %p, want %p", b, g, model[b])
			}
		}
		var want []int64
		for b := range model {
			want = append(want, b)
		}
		slices.Sort(want)
		if got := s.Blocks(nil); !slices.Equal(got, want) {
			rt.Fatalf("Blocks %v, want %v", got, want)
		}
	})
}

package reserve

import (
	"cmp"
	"slices"
	"testing"

	"pgregory.net/rapid"
)

// TestSizeIndexAgainstModel checks the by-size index alone against a sorted
// slice: lengths on both sides of every word of the bucket bitmap and of
// both thresholds, and every query's answer after every change.
func TestSizeIndexAgainstModel(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		bucketLen := rapid.SampledFrom([]int64{1, 2, 64, 65, 66, 129, sizeBuckets + 1}).Draw(t, "bucketLen")
		longLen := max(bucketLen, rapid.SampledFrom([]int64{2, 70, 200, shortLen}).Draw(t, "longLen"))
		var x sizeIndex
		x.init(bucketLen, longLen)
		var model []Extent // sorted by (Len, Start)
		order := func(a, b Extent) int {
			if c := cmp.Compare(a.Len, b.Len); c != 0 {
				return c
			}
			return cmp.Compare(a.Start, b.Start)
		}
		length := rapid.Custom(func(t *rapid.T) int64 {
			return rapid.OneOf(
				rapid.Int64Range(1, 3),
				rapid.Int64Range(62, 67),
				rapid.Int64Range(126, 131),
				rapid.Int64Range(sizeBuckets-2, sizeBuckets+2),
				rapid.Int64Range(1, longLen-1),
			).Draw(t, "len")
		})
		for i := 0; i < 200; i++ {
			l := min(length.Draw(t, "l"), longLen-1)
			e := Extent{Start: rapid.Int64Range(0, 40).Draw(t, "start"), Len: l}
			j, found := slices.BinarySearchFunc(model, e, order)
			if rapid.Bool().Draw(t, "add") {
				if dup := x.add(e); dup != found {
					t.Fatalf("add %v: dup %v, model says %v", e, dup, found)
				}
				if !found {
					model = slices.Insert(model, j, e)
				}
			} else {
				if ok := x.delete(e); ok != found {
					t.Fatalf("delete %v: %v, model says %v", e, ok, found)
				}
				if found {
					model = slices.Delete(model, j, j+1)
				}
			}
			if err := x.check(); err != nil {
				t.Fatal(err)
			}
			if x.len() != len(model) {
				t.Fatalf("len %d, model %d", x.len(), len(model))
			}
			var got []Extent
			x.scan(func(e Extent) bool { got = append(got, e); return true })
			if !slices.Equal(got, model) {
				t.Fatalf("scan %v, model %v", got, model)
			}
			m, ok := x.max()
			if ok != (len(model) > 0) || ok && m != model[len(model)-1] {
				t.Fatalf("max %v %v, model %v", m, ok, model)
			}
			q := Extent{Start: rapid.Int64Range(-1, 41).Draw(t, "goal"), Len: min(length.Draw(t, "ql"), longLen-1)}
			if x.has(e) != slices.Contains(model, e) {
				t.Fatalf("has %v disagrees with the model", e)
			}
			lo, okLo, hi, okHi := x.around(q.Len, q.Start)
			// The model's answer: hi is the first entry after (l, goal);
			// lo the one before it if it has length l.
			k, _ := slices.BinarySearchFunc(model, Extent{Start: q.Start + 1, Len: q.Len}, order)
			wantHi, wantOkHi := Extent{}, k < len(model)
			if wantOkHi {
				wantHi = model[k]
			}
			wantLo, wantOkLo := Extent{}, k > 0 && model[k-1].Len == q.Len
			if wantOkLo {
				wantLo = model[k-1]
			}
			if okHi != wantOkHi || okHi && hi != wantHi || okLo != wantOkLo || okLo && lo != wantLo {
				t.Fatalf("around(%d, %d) = lo %v %v, hi %v %v; model: lo %v %v, hi %v %v (index %v)",
					q.Len, q.Start, lo, okLo, hi, okHi, wantLo, wantOkLo, wantHi, wantOkHi, model)
			}
			f, okF := x.first(q.Len)
			k, _ = slices.BinarySearchFunc(model, Extent{Start: -1, Len: q.Len}, order)
			if okF != (k < len(model)) || okF && f != model[k] {
				t.Fatalf("first(%d) = %v %v, model %v", q.Len, f, okF, model)
			}
		}
	})
}

package extenttree

import (
	"math/rand/v2"
	"testing"
)

// BenchmarkMarkDelallocSequentialAppend: a streaming writer dirtying one
// block at a time. The tail entry grows in place: no search, no allocation,
// and the tree stays one entry.
func BenchmarkMarkDelallocSequentialAppend(b *testing.B) {
	tr := New()
	b.ReportAllocs()
	var next int64
	for b.Loop() {
		if _, err := tr.MarkDelalloc(next, 1); err != nil {
			b.Fatal(err)
		}
		next++
	}
	b.StopTimer()
	if tr.Len() != 1 {
		b.Fatalf("%d sequential appends left %d entries, want 1", next, tr.Len())
	}
	if _, blocks := tr.Count(Delalloc); blocks != next {
		b.Fatalf("tree holds %d delalloc blocks after %d appends", blocks, next)
	}
}

// BenchmarkMarkDelallocRandom1GiB: one-block writes at random offsets of a
// 1 GiB object (262,144 blocks of 4 KiB). Each pass of 262,144 writes starts
// from an empty object and leaves it about 63% dirty, fragmented into tens
// of thousands of entries (peak reported as max-entries); then it starts
// over, so the measurement is not dominated by an already-full object.
func BenchmarkMarkDelallocRandom1GiB(b *testing.B) {
	const blocks = 1 << 18
	rng := rand.New(rand.NewPCG(1, 2))
	offs := make([]int64, blocks)
	for i := range offs {
		offs[i] = rng.Int64N(blocks)
	}
	tr := New()
	b.ReportAllocs()
	i, maxEntries := 0, 0
	for b.Loop() {
		if _, err := tr.MarkDelalloc(offs[i], 1); err != nil {
			b.Fatal(err)
		}
		if i++; i == blocks {
			b.StopTimer()
			maxEntries = max(maxEntries, tr.Len())
			tr, i = New(), 0
			b.StartTimer()
		} else if i&1023 == 0 {
			maxEntries = max(maxEntries, tr.Len())
		}
	}
	b.StopTimer()
	maxEntries = max(maxEntries, tr.Len())
	if err := tr.Check(); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(maxEntries), "max-entries")
}

// BenchmarkLookupFragmented: reading 16 blocks at random offsets of a
// fragmented 1 GiB object (every other block dirty: 131,072 entries).
func BenchmarkLookupFragmented(b *testing.B) {
	const blocks = 1 << 18
	tr := New()
	for x := int64(0); x < blocks; x += 2 {
		if _, err := tr.MarkDelalloc(x, 1); err != nil {
			b.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	offs := make([]int64, 4096)
	for i := range offs {
		offs[i] = rng.Int64N(blocks - 16)
	}
	dst := make([]Segment, 0, 32)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		dst = tr.Lookup(dst[:0], offs[i&4095], 16)
		if len(dst) != 16 {
			b.Fatalf("Lookup of 16 alternating blocks gave %d segments", len(dst))
		}
		i++
	}
}

// BenchmarkWritebackCycle: the life of a sequentially written object
// flushed every 64 blocks — append, allocate the dirty tail, mark it
// written — which keeps the whole object one Written entry.
func BenchmarkWritebackCycle(b *testing.B) {
	tr := New()
	b.ReportAllocs()
	var next, flushed int64
	for b.Loop() {
		if _, err := tr.MarkDelalloc(next, 1); err != nil {
			b.Fatal(err)
		}
		next++
		if next-flushed == 64 {
			if err := tr.SetUnwritten(flushed, 64, 1000+flushed); err != nil {
				b.Fatal(err)
			}
			if err := tr.SetWritten(flushed, 64); err != nil {
				b.Fatal(err)
			}
			flushed = next
		}
	}
	b.StopTimer()
	if tr.Len() > 2 {
		b.Fatalf("writeback of a sequential object left %d entries", tr.Len())
	}
}

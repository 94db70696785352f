package engine

import (
	"math/rand/v2"
	"sync/atomic"
	"testing"
)

// BenchmarkReadCached4k: 4 KiB random reads of an object that is all in the
// page cache (the engine's hit path: object lock, cache lookup, copy).
func BenchmarkReadCached4k(b *testing.B) {
	dev := NewMemDevice(256<<20, 4096)
	e := mustFormatOpen(b, dev, Options{CacheSize: 128 << 20})
	defer e.Close()
	o, _ := e.Create("hot")
	const size = 16 << 20
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		o.WriteAt(buf, off)
	}
	if err := e.Sync(); err != nil {
		b.Fatal(err)
	}
	p := make([]byte, 4096)
	for off := int64(0); off < size; off += 4096 {
		o.ReadAt(p, off) // warm: every block cached
	}
	var seed atomic.Uint64
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 3))
		p := make([]byte, 4096)
		for pb.Next() {
			if _, err := o.ReadAt(p, rng.Int64N(size/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
	st := e.Stats()
	b.ReportMetric(float64(st.CacheHits)/float64(st.CacheHits+st.CacheMisses), "hit-ratio")
}

// BenchmarkWriteSeq4k: sequential 4 KiB appends through the write path
// (reserve, copy into the cache, record delalloc), writeback included.
func BenchmarkWriteSeq4k(b *testing.B) {
	dev := NewMemDevice(1<<30, 4096)
	e := mustFormatOpen(b, dev, Options{CacheSize: 64 << 20})
	defer e.Close()
	o, _ := e.Create("seq")
	p := make([]byte, 4096)
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := int64(i%(200<<8)) * 4096 // wrap within 800 MiB
		if _, err := o.WriteAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
}

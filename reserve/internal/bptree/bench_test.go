package bptree

import (
	"math/rand/v2"
	"testing"

	"github.com/google/btree"
)

// benchKeys returns n distinct keys in random order, spread like the
// allocator's (length, start) index: few distinct A values, B unique.
func benchKeys(n int) []Key {
	r := rand.New(rand.NewPCG(5, 6))
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = Key{A: r.Uint64N(64) + 1, B: uint64(i) * 33}
	}
	r.Shuffle(n, func(i, j int) { keys[i], keys[j] = keys[j], keys[i] })
	return keys
}

// BenchmarkSeek100k is one lookup (first key >= a random key) in a tree of
// 100,000 keys, here and in github.com/google/btree for comparison.
var benchN = 100_000

func BenchmarkSeek100k(b *testing.B) {
	n := benchN
	keys := benchKeys(n)
	probes := benchKeys(n)
	for i := range probes {
		probes[i].B++
	}
	b.Run("bptree", func(b *testing.B) {
		var t Tree[struct{}]
		for _, k := range keys {
			t.Insert(k, struct{}{})
		}
		b.ReportAllocs()
		b.ResetTimer()
		var sink uint64
		for i := 0; b.Loop(); i++ {
			if c := t.Seek(probes[i%n]); c.Valid() {
				sink += c.Key().B
			}
		}
		_ = sink
	})
	b.Run("google-btree", func(b *testing.B) {
		t := btree.NewG(32, Key.Less)
		for _, k := range keys {
			t.ReplaceOrInsert(k)
		}
		b.ReportAllocs()
		b.ResetTimer()
		var sink uint64
		for i := 0; b.Loop(); i++ {
			t.AscendGreaterOrEqual(probes[i%n], func(k Key) bool { sink += k.B; return false })
		}
		_ = sink
	})
}

// BenchmarkDeleteInsert100k removes a random key and puts it back: the
// by-size index's cost when a free extent changes length.
func BenchmarkDeleteInsert100k(b *testing.B) {
	n := benchN
	keys := benchKeys(n)
	b.Run("bptree", func(b *testing.B) {
		var t Tree[struct{}]
		for _, k := range keys {
			t.Insert(k, struct{}{})
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			k := keys[i%n]
			t.Delete(k)
			t.Insert(k, struct{}{})
		}
	})
	b.Run("google-btree", func(b *testing.B) {
		t := btree.NewG(32, Key.Less)
		for _, k := range keys {
			t.ReplaceOrInsert(k)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; b.Loop(); i++ {
			k := keys[i%n]
			t.Delete(k)
			t.ReplaceOrInsert(k)
		}
	})
}

func BenchmarkSeekSmall(b *testing.B) {
	benchN = 1000
	defer func() { benchN = 100_000 }()
	BenchmarkSeek100k(b)
}

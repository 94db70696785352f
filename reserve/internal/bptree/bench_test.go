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

// benchSeek measures one lookup (first key >= a random key that is not in
// the tree) in a tree of n keys, here and in github.com/google/btree for
// comparison.
func benchSeek(b *testing.B, n int) {
	keys := benchKeys(n)
	probes := benchKeys(n)
	for i := range probes {
		probes[i].B++
	}
	r := rand.New(rand.NewPCG(7, 8))
	r.Shuffle(n, func(i, j int) { probes[i], probes[j] = probes[j], probes[i] })
	b.Run("bptree", func(b *testing.B) {
		var t Tree[struct{}]
		for _, k := range keys {
			t.Insert(k, struct{}{})
		}
		b.ReportAllocs()
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
		var sink uint64
		for i := 0; b.Loop(); i++ {
			t.AscendGreaterOrEqual(probes[i%n], func(k Key) bool { sink += k.B; return false })
		}
		_ = sink
	})
}

// BenchmarkSeek100k is a lookup among 100,000 keys, the allocator's
// benchmark size: most of a leaf is not in cache.
func BenchmarkSeek100k(b *testing.B) { benchSeek(b, 100_000) }

// BenchmarkSeek1k is a lookup among 1,000 keys: everything in cache.
func BenchmarkSeek1k(b *testing.B) { benchSeek(b, 1000) }

// BenchmarkDeleteInsert100k removes a random key and puts it back: the
// by-size index's cost when a free extent changes length.
func BenchmarkDeleteInsert100k(b *testing.B) {
	const n = 100_000
	keys := benchKeys(n)
	b.Run("bptree", func(b *testing.B) {
		var t Tree[struct{}]
		for _, k := range keys {
			t.Insert(k, struct{}{})
		}
		b.ReportAllocs()
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
		for i := 0; b.Loop(); i++ {
			k := keys[i%n]
			t.Delete(k)
			t.ReplaceOrInsert(k)
		}
	})
}

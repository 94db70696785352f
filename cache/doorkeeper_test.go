package cache

import (
	"context"
	"testing"
)

func TestDoorkeeper(t *testing.T) {
	d := newDoorkeeper(1000)
	if len(d.bits)*64 < 8*1000 {
		t.Fatalf("%d bits for 1000 frames", len(d.bits)*64)
	}
	hs := make([]uint64, 500)
	for i := range hs {
		hs[i] = Key{Obj: 1, Block: int64(i)}.hash()
	}
	// Some false positives are in the nature of a Bloom filter: at 8
	// bits per frame and two probes, well under 5% here.
	fp := 0
	for _, h := range hs {
		if d.seen(h) {
			fp++
		}
	}
	if fp > len(hs)/20 {
		t.Fatalf("%d of %d new keys seen before they were noted", fp, len(hs))
	}
	for i, h := range hs {
		if !d.seen(h) {
			t.Fatalf("key %d not seen after it was noted", i)
		}
	}
	// Past one frame count of new keys the filter starts over: a key
	// noted before is new again (false positives aside, rare at 8 bits
	// per key).
	for i := 0; i < 1000; i++ {
		d.seen(Key{Obj: 2, Block: int64(i)}.hash())
	}
	again := 0
	for _, h := range hs {
		if d.seen(h) {
			again++
		}
	}
	if again > len(hs)/10 {
		t.Fatalf("%d of %d old keys still seen after the filter cleared", again, len(hs))
	}
}

// TestLoadAdmission: while clean pages are under their capacity every
// loaded page is cached; at capacity a key's first miss is returned but not
// cached, and its second is cached.
func TestLoadAdmission(t *testing.T) {
	c := newTestCache(t, 4096, 128, 0)
	defer c.Close()
	ctx := context.Background()
	indexed := func(k Key) bool {
		s := c.shardFor(k.hash())
		s.mu.RLock()
		defer s.mu.RUnlock()
		_, ok := s.m[k]
		return ok
	}
	load := func(k Key) {
		t.Helper()
		calls := 0
		p, err := c.Load(ctx, k, func(p *Page) error { calls++; stamp(p, k, 1); return nil })
		if err != nil || calls != 1 {
			t.Fatalf("Load %v: %v, fn called %d times", k, err, calls)
		}
		checkStamp(t, p, k)
		p.Release()
	}
	k1 := Key{Obj: 1, Block: 1}
	load(k1)
	if !indexed(k1) {
		t.Fatal("a page loaded into a cache with room was not cached")
	}
	// Clean pages at capacity (set directly: the policy evicts
	// asynchronously, which would make a real fill racy).
	c.clean.Add(c.cleanCap)
	defer c.clean.Add(-c.cleanCap)
	k2 := Key{Obj: 1, Block: 2}
	load(k2)
	if indexed(k2) {
		t.Fatal("a key's first miss in a full cache was cached")
	}
	load(k2)
	if !c.admit(k2.hash()) {
		t.Fatal("a key that missed before is not admitted")
	}
}

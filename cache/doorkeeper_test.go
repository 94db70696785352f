package cache

import (
	"context"
	"testing"

	"github.com/dgraph-io/ristretto/v2"
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

// TestRemoveLeavesPolicyEntry: Remove drops a key from the index at once
// but may leave its policy entry (counted in stale, at most a quarter of
// the capacity); inserting the key again takes the entry back, and the
// policy evicting a left-behind entry forgets it.
func TestRemoveLeavesPolicyEntry(t *testing.T) {
	c := newTestCache(t, 4096, 128, 0)
	defer c.Close()
	ctx := context.Background()
	insert := func(k Key) uint64 {
		t.Helper()
		p, err := c.Alloc(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stamp(p, k, 1)
		c.Insert(k, p)
		p.Release()
		s := c.shardFor(k.hash())
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.m[k]
	}
	k := Key{Obj: 5, Block: 1}
	insert(k)
	c.Remove(k)
	if p := c.Lookup(k); p != nil {
		t.Fatal("Lookup found a removed key")
	}
	if n := c.stale.Load(); n != 1 {
		t.Fatalf("stale = %d after one Remove, want 1", n)
	}
	insert(k)
	if n := c.stale.Load(); n != 0 {
		t.Fatalf("stale = %d after the key came back, want 0", n)
	}
	p := c.Lookup(k)
	if p == nil {
		t.Fatal("Lookup missed a key inserted again")
	}
	checkStamp(t, p, k)
	p.Release()

	// The policy evicting an entry Remove left behind.
	k2 := Key{Obj: 5, Block: 2}
	hd2 := insert(k2)
	c.Remove(k2)
	c.onPolicyEvict(&ristretto.Item[policyEntry]{Key: k2.hash(), Value: policyEntry{key: k2, handle: hd2}})
	if n := c.stale.Load(); n != 0 {
		t.Fatalf("stale = %d after the policy evicted the left-behind entry, want 0", n)
	}

	// Never more than a quarter of the capacity is left behind.
	for i := int64(0); i < 4*c.cleanCap; i++ {
		k := Key{Obj: 6, Block: i}
		insert(k)
		c.Remove(k)
		if n := c.stale.Load(); n > c.cleanCap/4 {
			t.Fatalf("stale = %d, over a quarter of the capacity %d", n, c.cleanCap)
		}
	}
	if st := c.Stats(); st.CleanPages != 1 {
		t.Fatalf("%d clean pages, want 1 (k)", st.CleanPages)
	}
}

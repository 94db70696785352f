package cache

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"

	"github.com/dgraph-io/ristretto/v2"
)

// Key names a page: an object and a block index within it.
type Key struct {
	Obj   uint64
	Block int64
}

// String formats k for messages.
func (k Key) String() string { return fmt.Sprintf("%d:%d", k.Obj, k.Block) }

// hash mixes both halves of the key through two rounds of the splitmix64
// finalizer (not linear, so no simple relation between objects and blocks
// collides). The policy knows keys only by this hash; two keys sharing it can
// at worst make the policy drop the other's page (the index keeps full keys).
func (k Key) hash() uint64 {
	return mix64(mix64(k.Obj+0x9e3779b97f4a7c15) ^ uint64(k.Block))
}

func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// shard is one part of the clean-page index.
type shard struct {
	mu sync.RWMutex
	// m maps a key to the handle (frame<<32 | generation) of its clean page;
	// the index holds one reference on each page in it.
	m map[Key]uint64
	// loads are the Loads in flight, by key.
	loads map[Key]*loadCall
	// stale holds the policy hashes of keys Remove dropped from m while
	// leaving their entry in the policy (see Remove).
	stale map[uint64]struct{}
	// Counted here rather than globally: the lock already puts this cache
	// line in the reader's core, a shared counter would bounce between cores.
	hits, misses atomic.Uint64
	_            [128 - 24 - 8 - 8 - 8 - 8 - 8]byte // two cache lines a shard: no false sharing between shards
}

func (c *Cache) shardFor(h uint64) *shard { return &c.shards[h>>(64-8)] }

// policyEntry is what the policy stores for a page: enough to find the index
// entry and check it is still the same insertion.
type policyEntry struct {
	key    Key
	handle uint64
}

// onPolicyEvict is ristretto's OnEvict callback, called from its goroutine for
// each page it evicts (and for every page when it is closed). Only an exact
// handle match drops the page, so a callback for an older insertion of the
// key does nothing.
func (c *Cache) onPolicyEvict(item *ristretto.Item[policyEntry]) {
	e := item.Value
	if e.handle == 0 {
		return
	}
	if c.dropIfCurrent(e.key, e.handle) {
		c.evictions.Add(1)
		return
	}
	c.forgetStale(e.key, item.Key)
}

// forgetStale: the policy evicted k's entry (policy hash h), which Remove
// had left behind.
func (c *Cache) forgetStale(k Key, h uint64) {
	s := c.shardFor(k.hash())
	s.mu.Lock()
	if _, ok := s.stale[h]; ok {
		delete(s.stale, h)
		c.stale.Add(-1)
	}
	s.mu.Unlock()
}

// onPolicyReject is ristretto's OnReject callback, called from its goroutine
// when it refuses an offer. Two cases look alike: TinyLFU found the page
// less valuable than what it would evict (drop it), or the key was already
// in the policy because the offer of an earlier insertion of it was still
// queued when this one was made (ristretto then rejects the later one, and
// keeps the earlier, dead handle). In the second case the policy's store holds
// the key, and setting it again updates the handle in place.
//
// (OnExit is not used: ristretto also calls it for a value replaced by Set or
// deleted by Del, which the index has always dropped already.)
func (c *Cache) onPolicyReject(item *ristretto.Item[policyEntry]) {
	e := item.Value
	if e.handle == 0 || !c.isCurrent(e.key, e.handle) {
		return
	}
	if _, stored := c.policy.GetTTL(item.Key); stored {
		c.offer(e.key, item.Key, e.handle)
		return
	}
	if c.dropIfCurrent(e.key, e.handle) {
		c.evictions.Add(1)
	}
}

func (c *Cache) isCurrent(k Key, handle uint64) bool {
	s := c.shardFor(k.hash())
	s.mu.RLock()
	h, ok := s.m[k]
	s.mu.RUnlock()
	return ok && h == handle
}

// dropIfCurrent removes k from the index if it still maps to handle.
func (c *Cache) dropIfCurrent(k Key, handle uint64) bool {
	s := c.shardFor(k.hash())
	s.mu.Lock()
	h, ok := s.m[k]
	if !ok || h != handle {
		s.mu.Unlock()
		return false
	}
	delete(s.m, k)
	p := c.page(h)
	p.indexed.Store(false)
	s.mu.Unlock()
	c.clean.Add(-1)
	p.Release()
	return true
}

// policySample: one access in policySample is reported to the policy.
const policySample = 4

// Lookup returns k's clean page with a reference, or nil.
func (c *Cache) Lookup(k Key) *Page {
	if c.closed.Load() {
		return nil
	}
	h := k.hash()
	s := c.shardFor(h)
	s.mu.RLock()
	hd, ok := s.m[k]
	if !ok {
		s.mu.RUnlock()
		// Misses count towards the key's frequency too, or a key that is not
		// admitted once could never build up the frequency to be admitted.
		if s.misses.Add(1)%policySample == 0 {
			c.policy.Get(h)
		}
		return nil
	}
	p := c.page(hd)
	p.refs.Add(1)
	s.mu.RUnlock()
	// Only for the policy's frequency sketch; the index already answered.
	// The sketch sees a uniform sample of accesses: relative frequencies,
	// which is all TinyLFU compares, are kept, and the hit path skips
	// ristretto's own store lookup most of the time.
	if s.hits.Add(1)%policySample == 0 {
		c.policy.Get(h)
	}
	return p
}

// Insert makes p the clean page of k, replacing k's previous page. The index
// takes its own reference; the caller keeps its own. A Load of k in flight is
// detached so that its older data does not replace p. Inserting a page that is
// already k's page does nothing; inserting one indexed under another key, or
// one the caller does not hold, panics.
func (c *Cache) Insert(k Key, p *Page) {
	if p == nil || p.c != c {
		panic("cache: Insert of a page that does not belong to this cache")
	}
	if p.refs.Load() <= 0 {
		panic(fmt.Sprintf("cache: Insert of frame %d, which the caller does not hold (used after Release)", p.idx))
	}
	if c.closed.Load() {
		return
	}
	h := k.hash()
	s := c.shardFor(h)
	s.mu.Lock()
	s.detachLoad(k)
	old, had := s.m[k]
	if p.indexed.Load() {
		same := had && old == p.handle()
		s.mu.Unlock()
		if same {
			return
		}
		panic(fmt.Sprintf("cache: Insert of frame %d as %v: it is already the clean page of another key", p.idx, k))
	}
	hd := c.index(s, k, p)
	var oldPage *Page
	if had {
		oldPage = c.page(old)
		oldPage.indexed.Store(false)
	}
	s.mu.Unlock()
	if oldPage != nil {
		c.clean.Add(-1)
		oldPage.Release()
	}
	c.offer(k, h, hd)
}

// index adds p under k with a new generation; s is k's shard, locked, and k is
// absent or about to be overwritten by the caller.
func (c *Cache) index(s *shard, k Key, p *Page) uint64 {
	g := p.gen.Add(1)
	if g == 0 { // handle 0 means "none" to the policy callback
		g = p.gen.Add(1)
	}
	p.refs.Add(1)
	p.indexed.Store(true)
	hd := uint64(p.idx)<<32 | uint64(g)
	s.m[k] = hd
	c.clean.Add(1)
	if len(s.stale) > 0 {
		// The offer that follows updates k's entry, if one is left.
		if h := k.hash(); s.hasStale(h) {
			delete(s.stale, h)
			c.stale.Add(-1)
		}
	}
	return hd
}

func (s *shard) hasStale(h uint64) bool {
	_, ok := s.stale[h]
	return ok
}

// offer hands a new insertion to the policy; called without locks. A dropped
// offer (the policy's buffer is full) removes the page at once, so that the
// index never holds a page the policy will not evict.
func (c *Cache) offer(k Key, h, hd uint64) {
	if !c.policy.Set(h, policyEntry{key: k, handle: hd}, 1) {
		if c.dropIfCurrent(k, hd) {
			c.evictions.Add(1)
		}
	}
}

// Remove drops k's clean page (a write made it stale) and detaches a Load of k
// in flight, whose result will then not be cached.
func (c *Cache) Remove(k Key) {
	if c.closed.Load() {
		return
	}
	h := k.hash()
	s := c.shardFor(h)
	s.mu.Lock()
	s.detachLoad(k)
	hd, ok := s.m[k]
	if !ok {
		s.mu.Unlock()
		return
	}
	delete(s.m, k)
	p := c.page(hd)
	p.indexed.Store(false)
	// The policy's entry may stay: evicting it later is a no-op (its
	// handle is not current), and a new insertion of k updates it. Telling
	// the policy at once costs more than the write that made the page
	// stale (an allocation and a send to ristretto's goroutine, which
	// blocks when that goroutine lags): random 4 KiB writes over cached
	// data through rawblockd went from 121,000 to 148,000 per second.
	// Stale entries still count against the policy's capacity, so at most
	// a quarter of it is left to them.
	keep := c.stale.Load() < c.cleanCap/4
	if keep {
		if _, dup := s.stale[h]; !dup {
			s.stale[h] = struct{}{}
			c.stale.Add(1)
		}
	}
	s.mu.Unlock()
	c.clean.Add(-1)
	p.Release()
	if !keep {
		c.policy.Del(h)
	}
}

// RemoveRange removes the clean pages of blocks [start, start+n) of obj, and
// detaches Loads of them in flight. A range that is large compared with the
// number of clean pages is done by scanning the index instead of n lookups.
func (c *Cache) RemoveRange(obj uint64, start, n int64) {
	if n <= 0 || c.closed.Load() {
		return
	}
	end := start + n
	if end < start { // overflow: up to the last block
		end = math.MaxInt64
	}
	// A lookup costs a few times what skipping an entry during a scan does.
	if n <= 64 || n <= c.clean.Load()/4 {
		for i := int64(0); i < n; i++ {
			b := start + i
			if b < start { // past the last block
				break
			}
			c.Remove(Key{Obj: obj, Block: b})
		}
		return
	}
	c.removeScan(obj, start, end)
}

// RemoveObject removes every clean page of obj, detaches its Loads in flight
// and drops its stream (see AllocStream).
func (c *Cache) RemoveObject(obj uint64) {
	if c.closed.Load() {
		return
	}
	c.removeScan(obj, math.MinInt64, math.MaxInt64)
	c.DropStream(obj)
}

// removeScan removes keys of obj with start <= Block < end (end MaxInt64
// includes MaxInt64 itself, so a whole object is covered), one shard at a time.
func (c *Cache) removeScan(obj uint64, start, end int64) {
	in := func(k Key) bool {
		return k.Obj == obj && k.Block >= start && (k.Block < end || end == math.MaxInt64)
	}
	var drop []*Page
	var hashes []uint64
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		for k := range s.loads {
			if in(k) {
				s.detachLoad(k)
			}
		}
		for k, hd := range s.m {
			if !in(k) {
				continue
			}
			delete(s.m, k)
			p := c.page(hd)
			p.indexed.Store(false)
			drop = append(drop, p)
			hashes = append(hashes, k.hash())
		}
		s.mu.Unlock()
		c.clean.Add(-int64(len(drop)))
		for _, p := range drop {
			p.Release()
		}
		for _, h := range hashes {
			c.policy.Del(h)
		}
		drop, hashes = drop[:0], hashes[:0]
	}
}

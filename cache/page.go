package cache

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
)

// Page is a handle on a referenced frame. There is one Page per frame, shared
// by all of the frame's references: Ref returns the same pointer, and each
// reference is dropped with its own Release.
type Page struct {
	c    *Cache
	data []byte
	refs atomic.Int32
	idx  uint32
	// gen is bumped every time the page is indexed, so a handle (idx, gen)
	// names one insertion and a late policy callback for an earlier one cannot
	// drop a later one.
	gen atomic.Uint32
	// indexed is set while the index holds a reference; written under the
	// shard lock of the key it is indexed under.
	indexed atomic.Bool
	_       [16]byte // pads Page to one cache line (TestLayout): refs are hot
}

// Data returns the page's bytes: len BlockSize, aligned to at least FrameAlign,
// inside the cache's arena. Valid only while the caller holds a reference.
func (p *Page) Data() []byte {
	if p.refs.Load() <= 0 {
		panic(fmt.Sprintf("cache: Page.Data on frame %d, which has no reference (used after Release)", p.idx))
	}
	return p.data
}

// Follows reports whether p's frame comes right after q's in the arena,
// with no gap between their data: pages that follow each other form one
// buffer (see Span), which a device moves in one I/O of a registered
// buffer instead of a vector of pages.
func (p *Page) Follows(q *Page) bool {
	return p.c == q.c && p.idx == q.idx+1 && p.c.stride == p.c.blockSize
}

// Span returns the data of n pages as one slice, the first being p and each
// following the one before (see Follows). The caller holds a reference to
// each of them; Span panics if p's frame is not followed by n-1 frames.
func (p *Page) Span(n int) []byte {
	if n == 1 {
		return p.Data()
	}
	c := p.c
	if n < 1 || int(p.idx)+n > len(c.pages) || c.stride != c.blockSize {
		panic(fmt.Sprintf("cache: Span of %d pages from frame %d", n, p.idx))
	}
	off := int(p.idx) * c.stride
	return c.mem[off : off+n*c.blockSize : off+n*c.blockSize]
}

// Ref adds a reference and returns p. The caller must already hold one.
func (p *Page) Ref() *Page {
	if n := p.refs.Add(1); n <= 1 {
		panic(fmt.Sprintf("cache: Page.Ref on frame %d, which had no reference (used after Release)", p.idx))
	}
	return p
}

// Release drops one reference. Releasing more often than referenced panics.
func (p *Page) Release() {
	n := p.refs.Add(-1)
	switch {
	case n > 1:
	case n == 1:
		// The index's reference may now be the only one: an Alloc waiting
		// for a frame can evict this page.
		if p.c.allocWaiters.Load() > 0 && p.indexed.Load() {
			p.c.wakeAllocWaiters()
		}
	case n == 0:
		if p.indexed.Load() {
			panic(fmt.Sprintf("cache: Page.Release on frame %d released the index's reference: a page was released more times than it was referenced", p.idx))
		}
		p.c.freeFrame(p.idx)
	default:
		panic(fmt.Sprintf("cache: Page.Release on frame %d: released more times than referenced (refs %d)", p.idx, n))
	}
}

// handle names the page's current insertion: frame index and generation.
func (p *Page) handle() uint64 { return uint64(p.idx)<<32 | uint64(p.gen.Load()) }

func (c *Cache) page(handle uint64) *Page { return &c.pages[handle>>32] }

func (c *Cache) freeFrame(idx uint32) {
	c.freeMu.Lock()
	if c.free.len()+c.reserved >= len(c.pages) {
		c.freeMu.Unlock()
		panic(fmt.Sprintf("cache: frame %d freed while the free list already holds every frame", idx))
	}
	c.free.add(idx)
	if c.waitCh != nil {
		close(c.waitCh)
		c.waitCh = nil
	}
	c.freeMu.Unlock()
}

func (c *Cache) wakeAllocWaiters() {
	c.freeMu.Lock()
	if c.waitCh != nil {
		close(c.waitCh)
		c.waitCh = nil
	}
	c.freeMu.Unlock()
}

// popFree takes a frame off the free list, or returns nil.
func (c *Cache) popFree() *Page {
	c.freeMu.Lock()
	c.reclaimForLocked(1)
	idx, ok := c.free.take()
	c.freeMu.Unlock()
	if !ok {
		return nil
	}
	return c.claim(&c.pages[idx])
}

// AllocRun appends to dst up to n frames from the free list, each with one
// reference and unspecified contents, in ascending frame order, and returns
// dst. It neither evicts nor waits: a caller that needs n frames takes the
// rest from Alloc.
//
// The free frames are searched in arena order (see freeSet), so the ones
// that neighbour each other form spans (see Follows), which a write fills
// with one read and writeback sends as one buffer. (When the free list was
// a stack, frames freed in ascending order came off it descending, and 1
// MiB NBD writes into a warm cache were read from the socket in spans of
// about two frames.)
func (c *Cache) AllocRun(dst []*Page, n int) []*Page {
	if n <= 0 || c.closed.Load() {
		return dst
	}
	c.freeMu.Lock()
	c.reclaimForLocked(n)
	var arr [512]uint32 // a 1 MiB write of 4 KiB blocks takes 257
	idxs := c.free.takeN(arr[:0], n)
	c.freeMu.Unlock()
	// Ascending even where the search wrapped around the arena's end.
	slices.Sort(idxs)
	for _, idx := range idxs {
		dst = append(dst, c.claim(&c.pages[idx]))
	}
	return dst
}

// claim gives a free (refs 0) frame its first reference.
func (c *Cache) claim(p *Page) *Page {
	if !p.refs.CompareAndSwap(0, 1) || p.indexed.Load() {
		panic(fmt.Sprintf("cache: frame %d on the free list is still in use (refs %d, indexed %v)", p.idx, p.refs.Load(), p.indexed.Load()))
	}
	return p
}

// Alloc returns a frame with one reference and unspecified contents. When no
// frame is free it evicts clean pages nobody holds, and when there are none it
// waits until a frame is released or ctx is done.
func (c *Cache) Alloc(ctx context.Context) (*Page, error) {
	for {
		if c.closed.Load() {
			return nil, ErrClosed
		}
		if p := c.tryAlloc(false); p != nil {
			return p, nil
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("cache: waiting for a free frame: %w", err)
		}
		// Register as a waiter before the full rescan: a frame freed or made
		// evictable after this point closes ch; one before it is found by
		// the rescan.
		c.freeMu.Lock()
		if c.free.len() > 0 || c.reserved > 0 {
			c.freeMu.Unlock()
			continue // popFree takes the streams' frames back
		}
		c.allocWaiters.Add(1)
		if c.waitCh == nil {
			c.waitCh = make(chan struct{})
		}
		ch := c.waitCh
		c.freeMu.Unlock()

		if p := c.evict(true); p != nil {
			c.allocWaiters.Add(-1)
			return p, nil
		}
		select {
		case <-ch:
			c.allocWaiters.Add(-1)
		case <-ctx.Done():
			c.allocWaiters.Add(-1)
			return nil, fmt.Errorf("cache: waiting for a free frame: %w", ctx.Err())
		}
	}
}

// TryAlloc is Alloc without waiting for other holders: it returns nil if no
// frame is free and no clean page can be evicted right now. It may wait
// briefly for the policy to apply the admissions it has queued.
func (c *Cache) TryAlloc() *Page {
	if c.closed.Load() {
		return nil
	}
	return c.tryAlloc(true)
}

func (c *Cache) tryAlloc(exhaustive bool) *Page {
	if p := c.popFree(); p != nil {
		return p
	}
	// More clean pages than the policy keeps means it has admissions queued
	// whose evictions will free frames. Let it catch up rather than evict
	// without it: that would throw out pages it chose to keep (a hot set
	// during a scan, say).
	if c.clean.Load() > c.cleanCap {
		c.policy.Wait()
		if p := c.popFree(); p != nil {
			return p
		}
	}
	if p := c.evict(false); p != nil {
		return p
	}
	if exhaustive {
		return c.evict(true)
	}
	return nil
}

const (
	// evictBatch is how many pages one eviction pass frees: one for the
	// caller, the rest for the free list, so that a burst of Allocs does not
	// scan once per frame.
	evictBatch = 4
	// evictScanEntries bounds the entries a sampling pass looks at.
	evictScanEntries = 64
)

// evict drops up to evictBatch clean pages that only the index holds and
// returns one of them, referenced, or nil. The policy normally keeps frames
// free; this runs when dirty and held pages have used up the reserve, or when
// the policy has not caught up. A sampling pass looks at evictScanEntries
// entries, shard after shard from a rotating start (Go's map iteration starts
// at a random entry); an exhaustive pass looks at every entry of every shard.
func (c *Cache) evict(exhaustive bool) *Page {
	var victims [evictBatch]*Page
	var hashes [evictBatch]uint64
	n := 0
	seen := 0
	start := c.evictHand.Add(1)
	for i := 0; i < numShards && n < evictBatch && (exhaustive || seen < evictScanEntries); i++ {
		s := &c.shards[(start+uint32(i))%numShards]
		s.mu.Lock()
		for k, h := range s.m {
			if !exhaustive && seen >= evictScanEntries {
				break
			}
			seen++
			p := c.page(h)
			// Lookups take references only under the read lock, so under
			// the write lock a count of 1 stays 1 unless we take it.
			if !p.refs.CompareAndSwap(1, 0) {
				continue
			}
			delete(s.m, k)
			p.indexed.Store(false)
			victims[n], hashes[n] = p, k.hash()
			n++
			if n == evictBatch {
				break
			}
		}
		s.mu.Unlock()
	}
	if n == 0 {
		return nil
	}
	c.clean.Add(-int64(n))
	c.evictions.Add(uint64(n))
	c.forcedEvictions.Add(uint64(n))
	for i := 1; i < n; i++ {
		c.freeFrame(victims[i].idx)
	}
	for i := 0; i < n; i++ {
		// Keep the policy's view in step; its callback finds nothing left to
		// drop. Called without locks: Del waits for the policy's goroutine.
		c.policy.Del(hashes[i])
	}
	return c.claim(victims[0])
}

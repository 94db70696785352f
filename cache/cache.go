// Package cache is rawblock's page cache: block-sized frames in one mmap'd
// arena, an index of clean pages, and the accounting that throttles dirty ones.
//
// Memory. The arena is allocated once and never grows; Options.Size bounds
// everything: the frames, the per-frame cost of the indexes and the policy, and
// the policy's fixed buffers. A frame is handed out again only when its
// reference count is zero, because the kernel reads into and writes from frames
// asynchronously (O_DIRECT), so a referenced frame may be under I/O.
//
// Clean pages. The authoritative index is our own sharded map Key -> frame, so
// an Insert is visible to the very next Lookup. Ristretto (TinyLFU admission,
// sampled-LFU eviction) is only the policy: every Insert is offered to it and
// every hit is reported to it; when it evicts or rejects a page, or drops the
// offer, the page leaves our map if the map still holds that exact insertion
// (a handle carries the frame and a per-insertion generation). Ristretto can
// therefore only cost a re-read, never return wrong data. Its capacity is the
// frames minus the dirty limit minus a reserve for reads in flight, so dirty
// pages never have to push out clean pages the policy chose to keep. When no
// frame is free while the index holds more than that capacity, Alloc lets the
// policy apply its queued admissions (their evictions free frames) before it
// evicts anything itself.
//
// Dirty pages are not indexed: the engine keeps them in each object's dirty set,
// pinned by its reference. The cache only counts them (AcquireDirty,
// ReleaseDirty) and makes writers wait above the dirty limit.
//
// References. Every holder of a *Page owns one reference: Alloc, Lookup and Load
// return a referenced page, Ref adds one, Release drops one. The index owns one
// more while the page is indexed. A frame whose count drops to zero returns to
// the free list. Lookup takes its reference under the shard's read lock, and
// eviction (which needs the write lock) takes a page only when the index's
// reference is the only one, so a page is never reused while someone holds it.
//
// Locks and why nothing deadlocks. The cache's locks are the shard locks, the
// free-list lock and the dirty lock. Shard locks are never nested, the
// free-list and dirty locks are leaves, and no cache lock is held while calling
// ristretto, a Load function or Options.Kick. That matters because ristretto
// calls back into the cache (to drop evicted pages) from its own goroutine and
// its Del blocks until that goroutine makes progress. Waiting happens in three
// places, and each waits only for something that needs no cache resource:
//   - Alloc waits for a Release. Every frame is free, indexed (evictable as soon
//     as readers let go), dirty (at most the dirty limit, which New keeps below
//     the frame count with a reserve to spare), or held by a reader or an
//     in-flight Load, which release it after a copy or one I/O without waiting
//     on the cache. A waiter registers, then rescans every shard, then sleeps:
//     a Release that makes a frame free or evictable after the registration
//     wakes it, and one before it is seen by the rescan, so no wake-up is lost.
//   - AcquireDirty waits for ReleaseDirty, which writeback calls after writing;
//     writeback never needs dirty credit, and Kick tells it to start.
//   - Load followers wait for the leader, which runs the load function without
//     locks and finishes the call even if the function panics.
//   - Alloc may wait for ristretto's goroutine to apply queued offers; that
//     goroutine needs nothing but a shard lock for a moment per callback.
//
// Callers must keep their side of this: pages held while waiting in Alloc or
// Load must be dirty pages covered by AcquireDirty credit, or few: all
// goroutines together should not hold more uncounted pages than the read
// reserve (Frames/16, at least 8) while they wait for more.
package cache

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"

	"github.com/dgraph-io/ristretto/v2"

	"github.com/rawblock/rawblock/iouring"
)

// Sentinel errors; the cache wraps them with detail, test with errors.Is.
var (
	// ErrClosed is returned by calls on a closed cache.
	ErrClosed = errors.New("cache: closed")
	// ErrBadOptions is returned by New for options out of range.
	ErrBadOptions = errors.New("cache: bad options")
	// ErrBusy is returned by Close while pages are still referenced, loads are
	// in flight or dirty pages are still counted.
	ErrBusy = errors.New("cache: busy")
	// ErrDirtyTooLarge is returned by AcquireDirty for a request larger than the
	// whole dirty limit; the caller must split it.
	ErrDirtyTooLarge = errors.New("cache: dirty request larger than the dirty limit")
)

// Limits.
const (
	// MinBlockSize and MaxBlockSize bound Options.BlockSize (a power of two).
	MinBlockSize = 512
	MaxBlockSize = 65536
	// MinFrames is the fewest frames a cache may have.
	MinFrames = 64
	// MaxFrames is the most frames a cache may have (frame indexes are 32-bit
	// and the handle's high half).
	MaxFrames = 1 << 30
	// FrameAlign is the alignment of every frame's data (O_DIRECT needs the
	// device's logical block size; 4096 covers every device we accept).
	FrameAlign = 4096

	// FrameOverhead is the memory budgeted per frame besides its data: the
	// Page struct (64) and free-list slot (4), our index entry, ristretto's
	// store entry (72 bytes a slot) and policy entry, and its frequency
	// sketch and doorkeeper (10 counters per page of capacity, rounded up to
	// a power of two). Go maps double as they grow, so the cost per entry
	// varies by up to 2x with the count; TestMemoryOverhead measures about
	// 340 bytes per frame with the cache full.
	FrameOverhead = 384
	// FixedOverhead is the memory budgeted for structures whose size does not
	// depend on the frame count, chiefly ristretto's set buffer (32768
	// pointers) and its 256 store shards, plus our 256 index shards.
	FixedOverhead = 512 << 10
)

const numShards = 256

// Options configure a Cache.
type Options struct {
	// Size is the memory, in bytes, for everything: frames, index overhead and
	// fixed structures. It must be at least MinSize(BlockSize).
	Size int64
	// BlockSize is the page size: a power of two, MinBlockSize..MaxBlockSize.
	BlockSize int
	// DirtyLimit is the number of dirty bytes at which AcquireDirty waits.
	// It must be below Size and at least one block; 0, or more than half of
	// the frames beyond the read reserve, means that half (see New).
	DirtyLimit int64
	// Kick, if set, is called (non-blocking, from the caller's goroutine; it
	// must not block) when dirty bytes go over the background threshold
	// (DirtyLimit/2) and whenever a writer has to wait, so the engine starts
	// writeback.
	Kick func()
}

// Cache is a page cache. All methods are safe for concurrent use.
type Cache struct {
	// Read on every hit, written only by New and Close (and allocWaiters in
	// the slow path): kept apart from the counters that change all the time.
	blockSize    int
	stride       int // distance between frames in the arena: max(BlockSize, FrameAlign)
	arena        *iouring.Arena
	mem          []byte // the arena's bytes, for Span
	pages        []Page
	policy       *ristretto.Cache[uint64, policyEntry]
	cleanCap     int64 // the policy's MaxCost: frames clean pages may hold
	reserve      int   // frames kept for reads in flight
	kick         func()
	closed       atomic.Bool
	allocWaiters atomic.Int32
	_            [64]byte

	shards [numShards]shard

	clean     atomic.Int64 // indexed pages
	stale     atomic.Int64 // policy entries left behind by Remove (see Remove)
	evictHand atomic.Uint32
	door      *doorkeeper // admission of loaded pages when full (see doorkeeper)
	_         [64]byte

	freeMu sync.Mutex
	free   freeSet
	// streams, reserved and streamTick are AllocStream's (see stream.go):
	// the frames set aside for appenders, which are free frames too.
	streams    map[uint64]*streamRun
	reserved   int
	streamTick uint64
	streamLen  int // immutable: frames a stream takes at a time; 0 = off
	// waitCh is closed (and cleared) when a frame is freed or becomes
	// evictable while allocWaiters > 0.
	waitCh chan struct{}
	_      [64]byte

	dirty dirtyState
	_     [64]byte

	evictions       atomic.Uint64
	forcedEvictions atomic.Uint64

	closeMu   sync.Mutex
	arenaOpen bool // guarded by closeMu
}

// MinSize is the smallest Options.Size New accepts for blockSize.
func MinSize(blockSize int) int64 {
	return FixedOverhead + MinFrames*(int64(max(blockSize, FrameAlign))+FrameOverhead)
}

// New creates a cache and its arena.
func New(opts Options) (*Cache, error) {
	bs := opts.BlockSize
	if bs < MinBlockSize || bs > MaxBlockSize || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("%w: BlockSize %d is not a power of two in %d..%d", ErrBadOptions, bs, MinBlockSize, MaxBlockSize)
	}
	if opts.Size <= 0 {
		return nil, fmt.Errorf("%w: Size %d must be positive", ErrBadOptions, opts.Size)
	}
	if minSize := MinSize(bs); opts.Size < minSize {
		return nil, fmt.Errorf("%w: Size %d is below the minimum %d for BlockSize %d (%d frames)", ErrBadOptions, opts.Size, minSize, bs, MinFrames)
	}
	stride := max(bs, FrameAlign)
	frames64 := (opts.Size - FixedOverhead) / (int64(stride) + FrameOverhead)
	if frames64 > MaxFrames || frames64*int64(stride) > math.MaxInt {
		return nil, fmt.Errorf("%w: Size %d gives %d frames, more than the maximum %d", ErrBadOptions, opts.Size, frames64, MaxFrames)
	}
	frames := int(frames64)
	reserve := max(8, frames/16)

	// At most half of the frames beyond the reserve may be dirty: pages in
	// writeback stop counting as dirty when their write completes but keep
	// their frames until the batch is finished (under the object's lock,
	// which a reader waiting for a frame may hold), so writers can pin as
	// many frames again. With a dirty limit at 59 % of the frames, readers,
	// writers and writeback waited for each other forever.
	maxDirty := (frames - reserve) / 2
	var dirtyPages int
	switch {
	case opts.DirtyLimit < 0:
		return nil, fmt.Errorf("%w: DirtyLimit %d is negative", ErrBadOptions, opts.DirtyLimit)
	case opts.DirtyLimit == 0:
		dirtyPages = maxDirty
	case opts.DirtyLimit >= opts.Size:
		return nil, fmt.Errorf("%w: DirtyLimit %d must be below Size %d", ErrBadOptions, opts.DirtyLimit, opts.Size)
	case opts.DirtyLimit < int64(bs):
		return nil, fmt.Errorf("%w: DirtyLimit %d is below one block (%d)", ErrBadOptions, opts.DirtyLimit, bs)
	default:
		// A larger limit is lowered to maxDirty (see DirtyLimitPages).
		dirtyPages = int(min(opts.DirtyLimit/int64(bs), int64(maxDirty)))
	}
	cleanCap := int64(frames - dirtyPages - reserve)
	if cleanCap < 1 {
		// Unreachable with MinFrames and the checks above; a broken sizing rule
		// must not produce a cache that cannot hold a clean page.
		panic(fmt.Sprintf("cache: sizing left %d clean frames (frames %d, dirty %d, reserve %d)", cleanCap, frames, dirtyPages, reserve))
	}

	arena, err := iouring.NewArena(frames * stride)
	if err != nil {
		return nil, fmt.Errorf("cache: arena of %d bytes: %w", frames*stride, err)
	}
	mem := arena.Bytes()
	if len(mem) < frames*stride {
		_ = arena.Close()
		return nil, fmt.Errorf("cache: arena is %d bytes, asked for %d", len(mem), frames*stride)
	}

	c := &Cache{
		blockSize: bs,
		stride:    stride,
		arena:     arena,
		mem:       mem,
		door:      newDoorkeeper(frames),
		pages:     make([]Page, frames),
		free:      newFreeSet(frames),
		streams:   make(map[uint64]*streamRun),
		streamLen: streamLenFor(frames),
		cleanCap:  cleanCap,
		reserve:   reserve,
		kick:      opts.Kick,
		arenaOpen: true,
	}
	for i := range c.pages {
		p := &c.pages[i]
		p.c = c
		p.idx = uint32(i)
		off := i * stride
		p.data = mem[off : off+bs : off+bs]
	}
	for i := range c.shards {
		c.shards[i].m = make(map[Key]uint64)
		c.shards[i].loads = make(map[Key]*loadCall)
		c.shards[i].stale = make(map[uint64]struct{})
	}
	limit := dirtyPages
	c.dirty.init(limit)

	c.policy, err = ristretto.NewCache(&ristretto.Config[uint64, policyEntry]{
		NumCounters:        10 * cleanCap,
		MaxCost:            cleanCap,
		BufferItems:        64,
		IgnoreInternalCost: true, // cost counts frames; the memory is budgeted by FrameOverhead
		KeyToHash:          func(h uint64) (uint64, uint64) { return h, 0 },
		OnEvict:            c.onPolicyEvict,
		OnReject:           c.onPolicyReject,
	})
	if err != nil {
		_ = arena.Close()
		return nil, fmt.Errorf("cache: policy: %w", err)
	}
	return c, nil
}

// Arena returns the arena holding every frame, so that the engine can register
// it with the device for fixed-buffer I/O.
func (c *Cache) Arena() *iouring.Arena { return c.arena }

// BlockSize returns the page size.
func (c *Cache) BlockSize() int { return c.blockSize }

// Frames returns the number of frames (pages) the arena holds.
func (c *Cache) Frames() int { return len(c.pages) }

// CleanCapacity returns how many clean pages the policy keeps at most; the
// index may briefly hold more while the policy catches up.
func (c *Cache) CleanCapacity() int { return int(c.cleanCap) }

// DirtyLimitPages returns the number of dirty pages at which AcquireDirty waits.
func (c *Cache) DirtyLimitPages() int { return c.dirty.limit }

// OverBackground reports whether the dirty pages are over the background
// writeback threshold (half the dirty limit).
func (c *Cache) OverBackground() bool {
	d := &c.dirty
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n > d.bg || len(d.queue) > 0
}

// Stats is a snapshot of the cache's counters.
type Stats struct {
	Frames, FreeFrames, CleanPages, DirtyPages int
	// CachedBytes is (Frames - FreeFrames) * BlockSize: every frame in use,
	// clean, dirty or held.
	CachedBytes, DirtyBytes int64
	// Hits and Misses count Lookup and Load results; Evictions counts clean
	// pages dropped by the policy or to make room (not by Remove).
	Hits, Misses, Evictions uint64
	// ForcedEvictions counts the evictions that Alloc made itself, without the
	// policy's choice, because no frame was free (part of Evictions).
	ForcedEvictions uint64
}

// Stats returns the cache's counters. The fields are read one after another,
// not atomically together.
func (c *Cache) Stats() Stats {
	c.freeMu.Lock()
	free := c.free.len() + c.reserved
	c.freeMu.Unlock()
	var hits, misses uint64
	for i := range c.shards {
		hits += c.shards[i].hits.Load()
		misses += c.shards[i].misses.Load()
	}
	dirty := c.DirtyPages()
	return Stats{
		Frames:          len(c.pages),
		FreeFrames:      free,
		CleanPages:      int(c.clean.Load()),
		DirtyPages:      dirty,
		CachedBytes:     int64(len(c.pages)-free) * int64(c.blockSize),
		DirtyBytes:      int64(dirty) * int64(c.blockSize),
		Hits:            hits,
		Misses:          misses,
		Evictions:       c.evictions.Load(),
		ForcedEvictions: c.forcedEvictions.Load(),
	}
}

// Close releases the arena. Every page must have been released, no Load may be
// in flight and no dirty pages counted; otherwise Close returns an error
// wrapping ErrBusy and the cache stays open. Close must not race with other
// calls. Close the devices that registered the arena first: while it is
// registered it cannot be unmapped, and Close says so (the cache is closed
// then, and a later Close retries the unmap). Later calls return ErrClosed.
func (c *Cache) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	if c.closed.Load() {
		if c.arenaOpen {
			// An earlier Close failed to unmap (the arena was still
			// registered with a device): try again.
			return c.closeArena()
		}
		return ErrClosed
	}
	// Let the policy finish applying queued admissions: an eviction it is
	// carrying out has unindexed its page but not yet dropped the index's
	// reference, which would count as held below.
	c.policy.Wait()
	held := 0
	for i := range c.pages {
		p := &c.pages[i]
		r := p.refs.Load()
		if p.indexed.Load() {
			r--
		}
		if r > 0 {
			held++
		}
	}
	loads := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		loads += len(s.loads)
		s.mu.RUnlock()
	}
	dirty := c.DirtyPages()
	if held > 0 || loads > 0 || dirty > 0 {
		return fmt.Errorf("%w: %d pages still referenced, %d loads in flight, %d dirty pages counted", ErrBusy, held, loads, dirty)
	}
	c.closed.Store(true)
	// Closing the policy clears it, which calls onPolicyEvict for every page it
	// holds; anything it did not hold yet is dropped below.
	c.policy.Close()
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		var drop []*Page
		for k, h := range s.m {
			p := c.page(h)
			p.indexed.Store(false)
			drop = append(drop, p)
			delete(s.m, k)
		}
		c.clean.Add(-int64(len(drop)))
		s.mu.Unlock()
		for _, p := range drop {
			p.Release()
		}
	}
	c.freeMu.Lock()
	c.reclaimForLocked(len(c.pages))
	free := c.free.len()
	c.freeMu.Unlock()
	if free != len(c.pages) {
		panic(fmt.Sprintf("cache: Close: %d of %d frames free after dropping the index", free, len(c.pages)))
	}
	return c.closeArena()
}

func (c *Cache) closeArena() error {
	if err := c.arena.Close(); err != nil {
		return fmt.Errorf("cache: closing arena (the cache is closed; Close again to retry): %w", err)
	}
	c.arenaOpen = false
	return nil
}

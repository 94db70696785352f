package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rawblock/rawblock/cache"
	"github.com/rawblock/rawblock/extenttree"
	"github.com/rawblock/rawblock/reserve"
)

// Object is a named, sparse, resizable byte array stored on the device.
// Its methods are safe for concurrent use. Handles stay valid until the
// object is removed; then every call returns fs.ErrNotExist.
type Object struct {
	e  *Engine
	id uint64

	// Lock order: wmu, then wbMu, then mu, then the engine's dirtyMu.
	wmu  sync.Mutex // one modifying call (write, truncate, punch, remove) at a time
	wbMu sync.Mutex // one writeback at a time; held by truncate/punch/remove so no I/O targets freed blocks
	// wbWaiting counts callers waiting for wbMu (see lockWb).
	wbWaiting atomic.Int32
	// bgActive: a background writeback of the object is running.
	bgActive atomic.Bool
	// appendRun counts the bytes appended in a row, each write starting
	// at or before the end and going past it (guarded by wmu); eager is
	// set once it reaches eagerBytes: the object is a stream, written
	// back as it grows (see streamDue) rather than when memory runs short.
	appendRun int64
	eager     atomic.Bool
	// frameBuf backs the frames in hand of the object's writes (guarded
	// by wmu); its entries are nil between writes.
	frameBuf []*cache.Page
	mu       sync.RWMutex // everything below; readers hold it shared for the whole read
	// treeMu serializes tree calls made under a shared mu: the tree's
	// read-only methods share scratch space and are not safe in parallel.
	treeMu sync.Mutex

	name string
	size int64
	// diskSize is the size the journal has been told: like XFS's on-disk
	// size, it grows only when the data below it has been written, so a
	// crash never shows stale device bytes (past an old end, or cut off by
	// a truncate) as an extension's contents. It shrinks at once.
	diskSize   int64
	tree       *extenttree.Tree
	dirty      pageSet // block -> dirty page, pinned until written back
	wb         pageSet // block -> page whose write is in flight: never modified
	removed    bool
	inDirty    bool // listed in the engine's dirty set
	dirtySince time.Time
	lastFlush  time.Time
	window     reserve.Extent // speculative preallocation after the last extent
	wbErr      error          // the last writeback failure, until every observer has reported it
	wbUnseen   uint8          // the observers (seenBy*) that have not reported wbErr
	// sizeGen and sizeOff locate this object's size operation in the
	// pending journal batch of generation sizeGen (guarded by e.jmu).
	sizeGen uint64
	sizeOff int

	raNext atomic.Int64 // block a sequential reader asks for next
	raLen  atomic.Int64 // current readahead window, in blocks; -1 after one sequential request
	ra     raBuffer     // the last readahead I/O of a sequential reader

	// cleanEnd is one past the highest block ever offered to the clean
	// cache (see offerClean): no block at or past it can have a clean
	// page, so a write there has no stale copy to remove. Appends then
	// skip a cache lookup and its shard lock per block (5 % of the CPU of
	// 4 KiB appends). Offers happen under mu (shared by readers,
	// exclusive by writeback) and writes check it under mu held
	// exclusively, so no offer can slip between the check and the write.
	cleanEnd atomic.Int64
}

// offerClean records that block b is about to be offered to the clean
// cache (an insert or a load); see cleanEnd. o.mu is held, shared or not.
func (o *Object) offerClean(b int64) {
	for {
		cur := o.cleanEnd.Load()
		if b < cur || o.cleanEnd.CompareAndSwap(cur, b+1) {
			return
		}
	}
}

// insertClean offers pg to the clean cache as block b. o.mu is held,
// shared or not.
func (o *Object) insertClean(b int64, pg *cache.Page) {
	o.offerClean(b)
	o.e.cache.Insert(o.key(b), pg)
}

// dropClean removes a clean copy of block b that a write is about to make
// stale. o.mu is held exclusively.
func (o *Object) dropClean(b int64) {
	if b < o.cleanEnd.Load() {
		o.e.cache.Remove(o.key(b))
	}
}

// raBuffer holds a sequential reader's readahead: up to two windows of
// blocks read ahead of it, asynchronously, so that the device read of the
// next window overlaps the reader's own round trips (an NBD client, a file
// system above it) instead of being added to one of its requests.
// Readahead is kept here rather than offered to the clean cache: one-pass
// sequential data would only be rejected by (or pollute) its LFU policy.
type raBuffer struct {
	mu    sync.Mutex
	valid atomic.Bool // some window is present
	w     [2]*raWindow
}

// raWindow is one readahead read of blocks [start, start+n).
type raWindow struct {
	start, n int64
	buf      *[]byte       // from the engine's buffer pool
	done     chan struct{} // closed when the read has finished
	err      error         // the read's error, set before done is closed
	// dropped: the window left the buffer while its read was in flight;
	// the read's goroutine gives buf back.
	dropped bool
}

func (w *raWindow) finished() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

// findLocked returns the window holding block b, if any.
func (r *raBuffer) findLocked(b int64) *raWindow {
	for _, w := range r.w {
		if w != nil && b >= w.start && b < w.start+w.n {
			return w
		}
	}
	return nil
}

// copyBlock hands block b's bytes to fn if a window holds it, first waiting
// for the window's read if it is in flight. It returns false if no window
// holds b or its read failed: the caller reads b itself.
func (r *raBuffer) copyBlock(b int64, shift uint, fn func(data []byte)) bool {
	if !r.valid.Load() {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		w := r.findLocked(b)
		if w == nil {
			return false
		}
		if w.finished() {
			if w.err != nil {
				return false
			}
			i := (b - w.start) << shift
			fn((*w.buf)[i : i+1<<shift])
			return true
		}
		// Wait without the lock; the window may be dropped meanwhile,
		// so look again.
		r.mu.Unlock()
		<-w.done
		r.mu.Lock()
	}
}

// reach returns the end of the run of windows that continues from block b
// (b itself when no window holds it).
func (r *raBuffer) reach(b int64) int64 {
	if !r.valid.Load() {
		return b
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for range r.w {
		w := r.findLocked(b)
		if w == nil || (w.finished() && w.err != nil) {
			break
		}
		b = w.start + w.n
	}
	return b
}

// start adds a window for blocks [start, start+n), replacing the window
// that ends first (the one the reader is done with, or the older), and
// returns it, or nil if a window already holds start. The caller reads
// the blocks and calls finish.
func (r *raBuffer) start(pool *sync.Pool, start, n int64) *raWindow {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.findLocked(start) != nil {
		return nil
	}
	i := 0
	switch {
	case r.w[0] == nil:
	case r.w[1] == nil:
		i = 1
	case r.w[1].start+r.w[1].n < r.w[0].start+r.w[0].n:
		i = 1
	}
	r.releaseLocked(pool, i)
	w := &raWindow{start: start, n: n, buf: pool.Get().(*[]byte), done: make(chan struct{})}
	r.w[i] = w
	r.valid.Store(true)
	return w
}

// finish records the result of w's read. A failed window leaves the
// buffer at once: its blocks are read by the requests that need them, which
// see the error if it persists, and a later window may cover them again.
func (r *raBuffer) finish(pool *sync.Pool, w *raWindow, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	w.err = err
	close(w.done)
	if w.dropped {
		pool.Put(w.buf)
		w.buf = nil
		return
	}
	if err != nil {
		r.releaseMatchingLocked(pool, func(x *raWindow) bool { return x == w })
	}
}

// releaseLocked empties slot i, giving its buffer back once no read uses it.
func (r *raBuffer) releaseLocked(pool *sync.Pool, i int) {
	w := r.w[i]
	if w == nil {
		return
	}
	r.w[i] = nil
	if w.finished() {
		pool.Put(w.buf)
		w.buf = nil
	} else {
		w.dropped = true
	}
}

// dropRange forgets the windows holding any of blocks [b0, b1): their
// data changed. Windows elsewhere stay: a file system's metadata writes
// (access times, its journal) must not throw away a reader's readahead.
func (r *raBuffer) dropRange(pool *sync.Pool, b0, b1 int64) {
	if !r.valid.Load() {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.releaseMatchingLocked(pool, func(w *raWindow) bool { return w.start < b1 && b0 < w.start+w.n })
}

// releaseMatchingLocked empties the slots whose window match selects and
// keeps valid in step with what is left.
func (r *raBuffer) releaseMatchingLocked(pool *sync.Pool, match func(*raWindow) bool) {
	any := false
	for i, w := range r.w {
		if w != nil && match(w) {
			r.releaseLocked(pool, i)
		}
		any = any || r.w[i] != nil
	}
	r.valid.Store(any)
}

const (
	// keepCleanPages: a writeback batch of at most this many pages leaves
	// them in the clean cache.
	keepCleanPages = 256
	// streamBlocks: a first allocation at least this long is placed as a
	// stream that will keep growing.
	streamBlocks = 32
	raMin        = 32
	// raMax caps a readahead window. 1 MiB windows read 2.8 times what an
	// ext4 tree read back through NBD needed (files end mid-window) and
	// made readers wait for reads three times as long as a 256 KiB one
	// (340 µs against 111 on a loop device): the tree's `diff -r` went
	// from 1.38-1.41 s to 0.88-1.10 s, and 8 sequential 128 KiB readers
	// from 466 to 897 MiB/s.
	raMax = 256 << 10
)

// Name returns the object's name.
func (o *Object) Name() string {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.name
}

// Size returns the object's size in bytes (0 once removed).
func (o *Object) Size() int64 {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.removed {
		return 0
	}
	return o.size
}

func (o *Object) key(b int64) cache.Key { return cache.Key{Obj: o.id, Block: b} }

func (o *Object) notExist(op string) error {
	return fmt.Errorf("%s %q: %w", op, o.name, fs.ErrNotExist)
}

func checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 {
		return fmt.Errorf("%w: %s: negative offset %d or length %d", errInvalid, op, off, n)
	}
	if off > MaxObjectSize || n > MaxObjectSize-off {
		return fmt.Errorf("%w: %s: range %d+%d exceeds the maximum object size %d", errInvalid, op, off, n, MaxObjectSize)
	}
	return nil
}

func (o *Object) markDirtyLocked() {
	if o.dirtySince.IsZero() {
		o.dirtySince = time.Now()
	}
	if !o.inDirty {
		o.inDirty = true
		o.e.dirtyMu.Lock()
		o.e.dirtyObjs[o] = struct{}{}
		o.e.dirtyMu.Unlock()
	}
}

func (o *Object) undirtyLocked() {
	o.dirtySince = time.Time{}
	if o.inDirty {
		o.inDirty = false
		o.e.dirtyMu.Lock()
		delete(o.e.dirtyObjs, o)
		o.e.dirtyMu.Unlock()
	}
}

func (o *Object) dirtyAge(now time.Time) time.Duration {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.dirtySince.IsZero() {
		return 0
	}
	return now.Sub(o.dirtySince)
}

// credits are frames and dirty-page budget obtained before taking o.mu, so
// that nothing waits for memory while holding the object lock.
type credits struct {
	e      *Engine
	pages  []*cache.Page // frames in hand: pages[head:]
	head   int
	dirty  int
	closed bool
	// stream, if set, is the object whose append this is: frames come from
	// its cache stream, in order (see cache.AllocStream).
	stream *Object
	// pos is the block the first frame in hand will be written to, a hint
	// that aligns a stream's frames with its blocks (see AllocStream).
	pos int64
}

// frames returns how many frames are in hand.
func (c *credits) frames() int { return len(c.pages) - c.head }

// grow makes sure at least n frames and n dirty credits are in hand.
func (c *credits) grow(n int) error {
	if need := n - c.dirty; need > 0 {
		// Never wait for budget while holding some, or frames taken with
		// it: writers that each held part of what they needed could
		// together hold the whole limit, with no dirty page left for
		// writeback to free, and wait forever (8 writers of 102-block
		// chunks did, holding 383 of 409 pages); frames kept without
		// budget would pin memory the dirty limit does not count. What is
		// held goes back, and all of n is waited for in one AcquireDirty.
		if c.dirty > 0 || len(c.pages) > c.head {
			c.release()
			need = n
		}
		ctx := c.e.throttleCtx()
		if err := c.e.cache.AcquireDirty(ctx, need); err != nil {
			if cause := context.Cause(ctx); cause != nil {
				return fmt.Errorf("waiting for dirty pages to be written back: %w", cause)
			}
			return fmt.Errorf("dirty page budget: %w", err)
		}
		c.dirty += need
	}
	if k := n - c.frames(); k > 0 {
		// Free frames first, in one batch and in arena order, so that a
		// write of consecutive blocks gets frames that follow each other
		// (see take).
		if c.stream != nil {
			c.pages = c.e.cache.AllocStream(c.stream.id, uint64(c.pos+int64(c.frames())), c.pages, k)
		} else {
			c.pages = c.e.cache.AllocRun(c.pages, k)
		}
	}
	for c.frames() < n {
		p, err := c.e.cache.Alloc(bgCtx)
		if err != nil {
			return fmt.Errorf("page cache: %w", err)
		}
		c.pages = append(c.pages, p)
	}
	return nil
}

// take hands out one frame and one dirty credit, in the order the cache
// gave the frames: a sequential write then gets frames that follow each
// other in the arena, which writeback sends as one buffer.
func (c *credits) take() *cache.Page {
	p := c.pages[c.head]
	c.pages[c.head] = nil
	c.head++
	if c.head == len(c.pages) {
		c.pages, c.head = c.pages[:0], 0
	}
	c.dirty--
	return p
}

func (c *credits) release() {
	for _, p := range c.pages[c.head:] {
		p.Release()
	}
	clear(c.pages[c.head:])
	c.pages, c.head = c.pages[:0], 0
	if c.dirty > 0 {
		c.e.cache.ReleaseDirty(c.dirty)
		c.dirty = 0
	}
}

// WriteAt writes p at byte offset off (io.WriterAt). The space the write
// needs is reserved before a byte is copied: if the device cannot hold it,
// WriteAt returns 0 and an error wrapping ErrNoSpace, and nothing changed.
func (o *Object) WriteAt(p []byte, off int64) (int, error) {
	e := o.e
	if err := e.enterWrite(checkRange("write", off, int64(len(p)))); err != nil {
		return 0, err
	}
	defer e.exit()
	return o.writeAt(p, off)
}

// writeAt is WriteAt inside the engine's enterWrite, on a checked range.
func (o *Object) writeAt(p []byte, off int64) (int, error) {
	e := o.e
	o.wmu.Lock()
	defer o.wmu.Unlock()
	if len(p) == 0 {
		o.mu.RLock()
		defer o.mu.RUnlock()
		if o.removed {
			return 0, o.notExist("write")
		}
		return 0, nil
	}
	bs := int64(e.bs)
	b0, b1 := off>>e.shift, (off+int64(len(p))-1)>>e.shift+1

	reserved, metaRes, oldSize, err := o.reserveWrite(b0, b1, off)
	if err != nil {
		return 0, err
	}
	defer e.unreserveLeft(&reserved)
	// The recorded blocks count in metaPending by themselves (recordLocked).
	defer e.metaPending.Add(-metaRes)

	// The frame slice is the object's, reused from write to write (wmu
	// is held): one grown per write was 4 % of the CPU of 4 KiB appends.
	cr := credits{e: e, pages: o.frameBuf[:0]}
	defer func() { o.frameBuf = cr.pages[:0] }()
	if off+int64(len(p)) > oldSize {
		// An append: its blocks get consecutive frames, whatever other
		// objects' writers take meanwhile.
		cr.stream = o
	}
	defer cr.release()
	written := 0
	// A write that starts past the end first zeroes the rest of the end's
	// block (see zeroTailLocked). wmu keeps the size from changing.
	if off > oldSize && oldSize%bs != 0 {
		cr.pos = oldSize >> e.shift
		if err := cr.grow(1); err != nil {
			return 0, fmt.Errorf("write %q at %d: %w", o.name, off, err)
		}
		o.mu.Lock()
		err := o.zeroTailLocked(off, &cr)
		o.mu.Unlock()
		if err != nil {
			return 0, fmt.Errorf("write %q at %d: %w", o.name, off, err)
		}
	}
	chunk := int64(max(1, min(writeChunkBlocks, e.cache.DirtyLimitPages()/4)))
	for cb := b0; cb < b1; {
		ce := min(cb+chunk, b1)
		for {
			o.mu.RLock()
			need := o.missingPagesLocked(cb, ce)
			o.mu.RUnlock()
			cr.pos = cb
			if err := cr.grow(need); err != nil {
				return written, fmt.Errorf("write %q at %d: %w", o.name, off, err)
			}
			o.mu.Lock()
			if o.removed {
				o.mu.Unlock()
				return written, o.notExist("write")
			}
			// Writeback may have taken pages since we counted.
			if o.missingPagesLocked(cb, ce) <= cr.frames() {
				o.ra.dropRange(&e.bufPool, cb, ce)
				break
			}
			o.mu.Unlock()
		}
		// o.mu is held.
		for b := cb; b < ce; b++ {
			bStart := b * bs
			from := max(off, bStart) - bStart
			to := min(off+int64(len(p)), bStart+bs) - bStart
			src := p[bStart+from-off : bStart+to-off]
			pg := o.dirty.Get(b)
			if pg == nil {
				pg = cr.take()
				if from != 0 || to != bs {
					if err := o.fillBaseLocked(b, pg.Data()); err != nil {
						pg.Release()
						e.cache.ReleaseDirty(1)
						// Blocks [cb, b) were copied: record them, so no
						// dirty page is left over a hole.
						reserved -= o.recordLocked(cb, b, off+int64(written), reserved)
						o.mu.Unlock()
						return written, fmt.Errorf("write %q at %d: read-modify-write: %w", o.name, off, err)
					}
				}
				o.dirty.Set(b, pg)
				o.dropClean(b)
			}
			copy(pg.Data()[from:to], src)
			written += len(src)
		}
		reserved -= o.recordLocked(cb, ce, min(off+int64(len(p)), ce*bs), reserved)
		o.mu.Unlock()
		cb = ce
		// Copying keeps the CPUs busy; move the device's queue along, or
		// its completions can wait for the scheduler (see poller).
		e.poll()
	}
	o.noteWrite(off, int64(len(p)), oldSize)
	return written, nil
}

// reserveWrite reserves the space a write of blocks [b0, b1) at off
// needs, and returns it with the object's size before the write. Holes are
// the only blocks that need new space. wmu is held: it keeps other
// modifications out, and writeback only turns delalloc into unwritten and
// written, so the count can only shrink until the write records its
// blocks.
func (o *Object) reserveWrite(b0, b1, off int64) (holes, runs, size int64, err error) {
	e := o.e
	o.mu.RLock()
	if o.removed {
		o.mu.RUnlock()
		return 0, 0, 0, o.notExist("write")
	}
	o.treeMu.Lock()
	holes, runs = o.tree.HoleRuns(b0, b1-b0)
	o.treeMu.Unlock()
	size = o.size
	o.mu.RUnlock()
	// Each hole run may become an extent of its own in the metadata.
	if err := e.metaRoom(runs); err != nil {
		return 0, 0, 0, fmt.Errorf("write %q at %d: %w", o.name, off, err)
	}
	if err := e.reserve(holes); err != nil {
		e.metaPending.Add(-runs)
		return 0, 0, 0, fmt.Errorf("write %q at %d: %w", o.name, off, err)
	}
	return holes, runs, size, nil
}

// pendingRecords counts the entries of o's map that will each become at
// least one extent record of a checkpoint but that no logged operation
// covers yet: Delalloc and Unwritten ones (see metaUsed). o.mu is held.
func (o *Object) pendingRecords() int64 {
	d, _ := o.tree.Count(extenttree.Delalloc)
	u, _ := o.tree.Count(extenttree.Unwritten)
	return int64(d + u)
}

// notePending adds the change of o's pending records since before (its
// pendingRecords then) to the engine's count. o.mu is held.
func (o *Object) notePending(before int64) {
	if d := o.pendingRecords() - before; d != 0 {
		o.e.metaPending.Add(d)
	}
}

// unreserveLeft gives back what is left of a write's reservation (*n,
// which recording the write's blocks has decreased).
func (e *Engine) unreserveLeft(n *int64) {
	if *n > 0 {
		if err := e.space.Unreserve(*n); err != nil {
			panic(fmt.Sprintf("rawblock: unreserve %d blocks after write: %v", *n, err))
		}
	}
}

// missingPagesLocked counts the blocks of [b0, b1) without a dirty page:
// the frames a write of them needs.
func (o *Object) missingPagesLocked(b0, b1 int64) int {
	n := 0
	for b := b0; b < b1; b++ {
		if o.dirty.Get(b) == nil {
			n++
		}
	}
	return n
}

// recordLocked marks blocks [b0, b1), just copied into dirty pages,
// delalloc, grows the size to end if it is larger, and returns how many
// reserved blocks that used (at most reserved: more is a broken invariant).
func (o *Object) recordLocked(b0, b1, end, reserved int64) int64 {
	if b1 <= b0 {
		return 0
	}
	before := o.pendingRecords()
	n, err := o.tree.MarkDelalloc(b0, b1-b0)
	o.notePending(before)
	if err != nil {
		o.mu.Unlock()
		panic(fmt.Sprintf("rawblock: object %q: mark delalloc %d+%d: %v", o.name, b0, b1-b0, err))
	}
	if n > reserved {
		o.mu.Unlock()
		panic(fmt.Sprintf("rawblock: object %q: write found %d new holes, only %d reserved", o.name, n, reserved))
	}
	if end > o.size {
		// The durable size follows when writeback has written the
		// data (see diskSize).
		o.size = end
	}
	o.markDirtyLocked()
	return n
}

// fillBaseLocked puts block b's current contents into buf, for a write that
// covers only part of it.
func (o *Object) fillBaseLocked(b int64, buf []byte) error {
	if pg := o.wb.Get(b); pg != nil {
		copy(buf, pg.Data())
		return nil
	}
	if pg := o.e.cache.Lookup(o.key(b)); pg != nil {
		copy(buf, pg.Data())
		pg.Release()
		return nil
	}
	var arr [1]extenttree.Segment
	seg := o.tree.Lookup(arr[:0], b, 1)[0]
	if seg.State == extenttree.Written {
		return o.e.readDev(buf, (seg.Phys+b-seg.Start)<<o.e.shift)
	}
	clear(buf)
	return nil
}

// ReadAt reads len(p) bytes at off (io.ReaderAt): fewer only at the end of
// the object, with io.EOF. Like a file's, any offset at or past the end
// reads 0 bytes and io.EOF, however large; a negative offset is
// fs.ErrInvalid.
func (o *Object) ReadAt(p []byte, off int64) (int, error) {
	e := o.e
	var argErr error
	if off < 0 {
		argErr = fmt.Errorf("%w: read: negative offset %d", errInvalid, off)
	}
	if err := e.enterRead(argErr); err != nil {
		return 0, err
	}
	defer e.exit()
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.removed {
		return 0, o.notExist("read")
	}
	if off >= o.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := min(int64(len(p)), o.size-off)
	if want == 0 {
		return 0, nil
	}
	bs := int64(e.bs)
	b0, b1 := off>>e.shift, (off+want-1)>>e.shift+1
	sizeBlocks := (o.size + bs - 1) >> e.shift

	// Readahead: a reader starting within four request lengths of where
	// the last one stopped is sequential (the slack keeps a stream
	// sequential when its client's requests arrive out of order); from
	// the second such request in a row it gets readahead windows that
	// double from four times its request up to raMax. A random reader
	// lands near the last read now and then; starting a window on one
	// such read read 430 MB from the device in a 4 s run of cached random
	// reads of a 32 MiB object, and readers waited for those windows.
	ra := int64(0)
	next, slack := o.raNext.Load(), 4*(b1-b0)
	switch l := o.raLen.Load(); {
	case b0 == 0 || b0 < next-slack || b0 > next+slack:
		o.raLen.Store(0)
	case l == 0:
		o.raLen.Store(-1) // one sequential request: wait for the next
	default:
		ra = min(max(l*2, 4*(b1-b0), raMin), raMax>>e.shift)
		o.raLen.Store(ra)
	}
	o.raNext.Store(b1)

	var arr [8]extenttree.Segment
	segs := o.tree.LookupShared(arr[:0], b0, b1-b0)
	r := readOp{o: o, p: p[:want], off: off, sequential: ra > 0}
	for _, s := range segs {
		start := max(s.Start, b0)
		for b := start; b < min(s.Start+s.Len, b1); b++ {
			if pg := o.pageLocked(b); pg != nil {
				r.copyOut(b, pg.Data())
				continue
			}
			if s.State != extenttree.Written {
				r.zero(b)
				continue
			}
			if o.ra.copyBlock(b, e.shift, func(data []byte) { r.copyOut(b, data) }) {
				continue
			}
			if pg := e.cache.Lookup(o.key(b)); pg != nil {
				r.copyOut(b, pg.Data())
				pg.Release()
				continue
			}
			r.miss(b, s.Phys+b-s.Start)
		}
		if err := r.flush(); err != nil {
			return 0, err
		}
	}
	if err := r.flush(); err != nil {
		return 0, err
	}
	if ra > 0 {
		o.readAheadLocked(b1, ra, sizeBlocks)
	}
	if want < int64(len(p)) {
		return int(want), io.EOF
	}
	return int(want), nil
}

// readAheadLocked keeps a sequential reader, whose request ended at block
// b1, ahead: when the windows already read or in flight reach less than
// ra/2 past b1, it starts reading the next ra blocks in the background.
// (Starting a whole window ahead measured worse: on an ext4 tree read back
// through NBD it read 2.7 times as much from the device.) A window covers written blocks only, contiguous on the
// device, up to the first block with a page of its own (whose data is newer
// than the device's). o.mu is held, shared.
func (o *Object) readAheadLocked(b1, ra, sizeBlocks int64) {
	e := o.e
	from := o.ra.reach(b1)
	if from-b1 >= ra/2 || from >= sizeBlocks {
		return
	}
	n := min(ra, sizeBlocks-from)
	var arr [1]extenttree.Segment
	segs := o.tree.LookupShared(arr[:0], from, n)
	if len(segs) == 0 || segs[0].State != extenttree.Written {
		return
	}
	s := segs[0]
	n = min(n, s.Start+s.Len-from)
	for i := int64(0); i < n; i++ {
		if o.pageLocked(from+i) != nil {
			n = i
			break
		}
	}
	if n == 0 {
		return
	}
	w := o.ra.start(&e.bufPool, from, n)
	if w == nil {
		return
	}
	phys := (s.Phys + from - s.Start) << e.shift
	buf := (*w.buf)[:n<<e.shift]
	// Close waits for these reads before it gives the device back.
	e.raWG.Add(1)
	go func() {
		defer e.raWG.Done()
		o.ra.finish(&e.bufPool, w, e.readDev(buf, phys))
	}()
}

func (o *Object) pageLocked(b int64) *cache.Page {
	if pg := o.dirty.Get(b); pg != nil {
		return pg
	}
	return o.wb.Get(b)
}

// readOp gathers a read's consecutive cache misses into one device I/O. A
// hit between misses needs no flush: the next miss is not contiguous with
// the pending run, so miss flushes it, and ReadAt flushes the last one.
type readOp struct {
	o        *Object
	p        []byte
	off      int64
	runStart int64 // first missed block; runLen 0 means no run
	runPhys  int64
	runLen   int64
	flushErr error // a run's read failed; reported by the next flush
	// sequential: the reader continues its last read, so a multi-block
	// run goes to the object's readahead buffer instead of the cache.
	sequential bool
}

// copyOut copies the part of block b that the read covers out of data.
func (r *readOp) copyOut(b int64, data []byte) {
	bs := int64(r.o.e.bs)
	bStart := b * bs
	from := max(r.off, bStart)
	to := min(r.off+int64(len(r.p)), bStart+bs)
	copy(r.p[from-r.off:to-r.off], data[from-bStart:to-bStart])
}

func (r *readOp) zero(b int64) {
	bs := int64(r.o.e.bs)
	bStart := b * bs
	from := max(r.off, bStart)
	to := min(r.off+int64(len(r.p)), bStart+bs)
	clear(r.p[from-r.off : to-r.off])
}

func (r *readOp) miss(b, phys int64) {
	maxRun := int64(max(maxIOBytes>>r.o.e.shift, 1))
	if r.runLen > 0 && b == r.runStart+r.runLen && phys == r.runPhys+r.runLen && r.runLen < maxRun {
		r.runLen++
		return
	}
	if r.runLen > 0 {
		// A new run starts; the old one is read first. flush only fails
		// with an I/O error, which the caller sees at its next flush.
		r.flushErr = r.flush()
	}
	r.runStart, r.runPhys, r.runLen = b, phys, 1
}

// flush reads the pending run of missed blocks: one block through the
// cache's shared load, several with one I/O into a bounce buffer whose
// blocks are then cached.
func (r *readOp) flush() error {
	if r.flushErr != nil {
		return r.flushErr
	}
	if r.runLen == 0 {
		return nil
	}
	o, e := r.o, r.o.e
	start, phys, n := r.runStart, r.runPhys, r.runLen
	r.runLen = 0
	bs := int64(e.bs)
	if n == 1 {
		o.offerClean(start)
		pg, err := e.cache.Load(bgCtx, o.key(start), func(pg *cache.Page) error {
			return e.readDev(pg.Data(), phys*bs)
		})
		if err != nil {
			return fmt.Errorf("read %q: %w", o.name, err)
		}
		if start*bs < r.off+int64(len(r.p)) {
			r.copyOut(start, pg.Data())
		}
		pg.Release()
		return nil
	}
	if !r.sequential {
		if v, ok := e.dev.(vectorDevice); ok {
			if done, err := r.readIntoFrames(v, start, phys, n); done || err != nil {
				return err
			}
		}
	}
	bufp := e.bufPool.Get().(*[]byte)
	buf := (*bufp)[:n*bs]
	if err := e.readDev(buf, phys*bs); err != nil {
		e.bufPool.Put(bufp)
		return fmt.Errorf("read %q: %w", o.name, err)
	}
	defer e.bufPool.Put(bufp)
	reqEnd := (r.off + int64(len(r.p)) + bs - 1) / bs
	if r.sequential {
		for b := start; b < min(start+n, reqEnd); b++ {
			r.copyOut(b, buf[(b-start)*bs:(b-start+1)*bs])
		}
		return nil
	}
	for i := int64(0); i < n; i++ {
		b := start + i
		data := buf[i*bs : (i+1)*bs]
		if b < reqEnd {
			r.copyOut(b, data)
		}
		if pg := e.cache.TryAlloc(); pg != nil {
			copy(pg.Data(), data)
			o.insertClean(b, pg)
			pg.Release()
		}
	}
	return nil
}

// readIntoFrames reads a run of n missed blocks straight into fresh cache
// frames with one vectored I/O and caches them. It returns done=false, and
// reads nothing, when not enough frames are free right now.
func (r *readOp) readIntoFrames(v vectorDevice, start, phys, n int64) (bool, error) {
	o, e := r.o, r.o.e
	pages := make([]*cache.Page, 0, n)
	defer func() {
		for _, pg := range pages {
			pg.Release()
		}
	}()
	bufs := make([][]byte, 0, n)
	for i := int64(0); i < n; i++ {
		pg := e.cache.TryAlloc()
		if pg == nil {
			return false, nil
		}
		pages = append(pages, pg)
		bufs = append(bufs, pg.Data())
	}
	if err := e.readvDev(v, bufs, phys<<e.shift); err != nil {
		return true, fmt.Errorf("read %q: %w", o.name, err)
	}
	bs := int64(e.bs)
	reqEnd := (r.off + int64(len(r.p)) + bs - 1) / bs
	for i, pg := range pages {
		b := start + int64(i)
		if b < reqEnd {
			r.copyOut(b, pg.Data())
		}
		o.insertClean(b, pg)
	}
	return true, nil
}

// Truncate changes the object's size. Shrinking frees the blocks past the
// new end and zeroes the tail of the last partial block, so a later
// extension reads zeros there.
func (o *Object) Truncate(size int64) error {
	e := o.e
	if err := e.enterWrite(checkRange("truncate", size, 0)); err != nil {
		return err
	}
	defer e.exit()
	o.wmu.Lock()
	defer o.wmu.Unlock()
	cr := credits{e: e}
	defer cr.release()
	// One frame for a partial block to zero: the new end's when
	// shrinking, the old end's when growing.
	if err := cr.grow(1); err != nil {
		return fmt.Errorf("truncate %q: %w", o.name, err)
	}
	o.lockWb()
	defer o.wbMu.Unlock()
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.removed {
		return o.notExist("truncate")
	}
	if size == o.size {
		return nil
	}
	if size < o.size {
		bs := int64(e.bs)
		nb := (size + bs - 1) / bs
		// The new end's block is read before anything is dropped.
		var z partialZero
		if r := size % bs; r != 0 {
			var err error
			if z, err = o.prepareZeroLocked(nb-1, r, bs, &cr); err != nil {
				return fmt.Errorf("truncate %q: %w", o.name, err)
			}
		}
		if err := o.truncateBlocksLocked(nb); err != nil {
			o.dropZero(&z)
			return err
		}
		o.applyZeroLocked(&z)
		o.releaseWindowLocked()
	} else if err := o.zeroTailLocked(size, &cr); err != nil {
		return fmt.Errorf("truncate %q: %w", o.name, err)
	}
	o.size = size
	if size < o.diskSize {
		o.diskSize = size
		e.logSize(o, false)
	} else {
		// Growing becomes durable through writeback (see diskSize),
		// after the zeroed tail of the old end's block.
		o.markDirtyLocked()
	}
	return nil
}

// zeroTailLocked zeroes the bytes from the object's end up to upTo (at most
// to the end of that block) before the size grows past them. In memory they
// are zero already; on the device that block may still hold bytes written
// past the end before a crash, or cut off by a truncate whose zeroing never
// reached the device, and growing must not bring them back.
func (o *Object) zeroTailLocked(upTo int64, cr *credits) error {
	bs := int64(o.e.bs)
	r := o.size % bs
	if r == 0 {
		return nil
	}
	b := o.size / bs
	if to := min(upTo-b*bs, bs); to > r {
		return o.zeroPartialLocked(b, r, to, cr)
	}
	return nil
}

// PunchHole makes [off, off+length) read as zeros. Whole blocks inside the
// range are freed; partial blocks at its edges are zeroed in place. The
// size does not change.
func (o *Object) PunchHole(off, length int64) error {
	e := o.e
	if err := e.enterWrite(checkRange("punch", off, length)); err != nil {
		return err
	}
	defer e.exit()
	o.wmu.Lock()
	defer o.wmu.Unlock()
	// A punch inside an extent splits it in two.
	if err := e.metaRoom(1); err != nil {
		return fmt.Errorf("punch %q: %w", o.name, err)
	}
	defer e.metaPending.Add(-1)
	cr := credits{e: e}
	defer cr.release()
	if err := cr.grow(2); err != nil {
		return fmt.Errorf("punch %q: %w", o.name, err)
	}
	o.lockWb()
	defer o.wbMu.Unlock()
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.removed {
		return o.notExist("punch")
	}
	o.ra.dropRange(&e.bufPool, off>>e.shift, (off+length-1)>>e.shift+1)
	end := min(off+length, o.size)
	if end <= off {
		return nil
	}
	bs := int64(e.bs)
	first, last := (off+bs-1)/bs, end/bs // whole blocks [first, last)
	// The partial blocks at either end (one block may be both) are read
	// before anything changes.
	var edges [2]partialZero
	defer func() {
		for i := range edges {
			o.dropZero(&edges[i])
		}
	}()
	if hb := off / bs; off%bs != 0 || end < (hb+1)*bs {
		to := min(end, (hb+1)*bs) - hb*bs
		z, err := o.prepareZeroLocked(hb, off%bs, to, &cr)
		if err != nil {
			return fmt.Errorf("punch %q: %w", o.name, err)
		}
		edges[0] = z
	}
	if end%bs != 0 && end/bs != off/bs {
		z, err := o.prepareZeroLocked(end/bs, 0, end%bs, &cr)
		if err != nil {
			return fmt.Errorf("punch %q: %w", o.name, err)
		}
		edges[1] = z
	}
	if first < last {
		before := o.pendingRecords()
		freed, dropped, err := o.tree.Punch(nil, first, last-first)
		o.notePending(before)
		if err != nil {
			panic(fmt.Sprintf("rawblock: object %q: punch %d+%d: %v", o.name, first, last-first, err))
		}
		o.freeLocked(first, last-first, freed, dropped)
		o.dirty.DeleteRange(first, last, func(_ int64, pg *cache.Page) {
			pg.Release()
			e.cache.ReleaseDirty(1)
		})
		e.cache.RemoveRange(o.id, first, last-first)
	}
	for i := range edges {
		o.applyZeroLocked(&edges[i])
	}
	return nil
}

// zeroPartialLocked zeroes bytes [from, to) of block b. A hole is already
// zero; a written block gets a dirty copy (no new space needed).
func (o *Object) zeroPartialLocked(b, from, to int64, cr *credits) error {
	z, err := o.prepareZeroLocked(b, from, to, cr)
	if err != nil {
		return err
	}
	o.applyZeroLocked(&z)
	return nil
}

// partialZero is a partial block to zero, its page made ready before the
// call that zeroes it changes anything: reading a written block is the one
// step that can fail, and Truncate and PunchHole then fail with nothing
// changed.
type partialZero struct {
	b, from, to int64
	pg          *cache.Page // nil: a hole, already zero
	own         bool        // pg is a fresh frame, not yet the dirty page
}

// prepareZeroLocked gets block b's page for zeroing [from, to): its dirty
// page, or a frame from cr holding its data.
func (o *Object) prepareZeroLocked(b, from, to int64, cr *credits) (partialZero, error) {
	z := partialZero{b: b, from: from, to: to}
	if z.pg = o.dirty.Get(b); z.pg != nil {
		return z, nil
	}
	var arr [1]extenttree.Segment
	if o.tree.Lookup(arr[:0], b, 1)[0].State == extenttree.Hole {
		return z, nil
	}
	if cr.frames() == 0 {
		panic(fmt.Sprintf("rawblock: object %q: no frame for a partial-block zero", o.name))
	}
	pg := cr.take()
	if err := o.fillBaseLocked(b, pg.Data()); err != nil {
		pg.Release()
		o.e.cache.ReleaseDirty(1)
		return z, err
	}
	z.pg, z.own = pg, true
	return z, nil
}

// applyZeroLocked zeroes what z prepared and makes its page dirty.
func (o *Object) applyZeroLocked(z *partialZero) {
	o.ra.dropRange(&o.e.bufPool, z.b, z.b+1)
	if z.pg == nil {
		return
	}
	clear(z.pg.Data()[z.from:z.to])
	if z.own {
		o.dirty.Set(z.b, z.pg)
		o.e.cache.Remove(o.key(z.b))
		o.markDirtyLocked()
		z.own = false
	}
	z.pg = nil
}

// dropZero gives back the frame of a prepared zeroing not applied.
func (o *Object) dropZero(z *partialZero) {
	if z.own {
		z.pg.Release()
		o.e.cache.ReleaseDirty(1)
	}
	z.pg, z.own = nil, false
}

// truncateBlocksLocked drops every block at and past nb: pages, delalloc
// reservations and extents. Freed extents stay busy until the checkpoint
// that no longer maps them is durable.
func (o *Object) truncateBlocksLocked(nb int64) error {
	o.ra.dropRange(&o.e.bufPool, nb, math.MaxInt64)
	before := o.pendingRecords()
	freed, dropped, err := o.tree.Truncate(nil, nb)
	o.notePending(before)
	if err != nil {
		return fmt.Errorf("truncate %q: %w", o.name, err)
	}
	o.freeLocked(nb, extenttree.BlockLimit-nb, freed, dropped)
	o.dropPagesLocked(nb)
	o.e.cache.RemoveRange(o.id, nb, max(0, (o.size+int64(o.e.bs)-1)>>o.e.shift-nb))
	return nil
}

// freeLocked gives back what [start, start+n) held: the delalloc
// reservation at once, the device extents once the journal batch recording
// the change is durable.
func (o *Object) freeLocked(start, n int64, freed []extenttree.PhysExtent, dropped int64) {
	e := o.e
	if dropped > 0 {
		if err := e.space.Unreserve(dropped); err != nil {
			panic(fmt.Sprintf("rawblock: object %q: give back %d delalloc blocks: %v", o.name, dropped, err))
		}
	}
	e.logFree(o, start, n, freed)
}

// dropPagesLocked releases dirty pages at and past block nb. No writeback
// is in flight: callers hold wbMu or the engine is closing.
func (o *Object) dropPagesLocked(nb int64) {
	n := 0
	o.dirty.DeleteRange(nb, extenttree.BlockLimit, func(_ int64, pg *cache.Page) {
		pg.Release()
		n++
	})
	if n > 0 {
		o.e.cache.ReleaseDirty(n)
	}
	if o.dirty.Len() == 0 {
		o.undirtyLocked()
	}
}

func (o *Object) releaseWindowLocked() {
	if o.window.Len > 0 {
		if err := o.e.space.Unhold(o.window); err != nil {
			panic(fmt.Sprintf("rawblock: object %q: give back window %v: %v", o.name, o.window, err))
		}
		o.window = reserve.Extent{}
	}
}

// Sync makes the object's acknowledged writes, its size and its existence
// durable. A writeback error is returned, and the pages stay dirty so a
// later Sync can succeed.
func (o *Object) Sync() error {
	e := o.e
	if err := e.enter(); err != nil {
		return err
	}
	defer e.exit()
	o.mu.RLock()
	removed := o.removed
	o.mu.RUnlock()
	if removed {
		return o.notExist("sync")
	}
	if e.readOnly {
		return nil
	}
	if err := o.writeback(false); err != nil {
		o.takeWbErr(seenByObjectSync)
		return fmt.Errorf("sync %q: %w", o.name, err)
	}
	if err := e.commit(false); err != nil {
		return fmt.Errorf("sync %q: %w", o.name, err)
	}
	if err := o.takeWbErr(seenByObjectSync); err != nil {
		return fmt.Errorf("sync %q: an earlier writeback failed (its data has been written again since): %w", o.name, err)
	}
	return nil
}

// Extents returns the object's map in logical order.
func (o *Object) Extents() []Extent {
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.removed {
		return nil
	}
	bs := int64(o.e.bs)
	var out []Extent
	o.treeMu.Lock()
	defer o.treeMu.Unlock()
	o.tree.All(func(s extenttree.Segment) bool {
		out = append(out, segmentExtent(s, bs))
		return true
	})
	return out
}

// ExtentsIn returns the part of the object's map that overlaps the byte
// range [off, off+length), in logical order, with the first and last
// extents cut to the blocks the range touches; holes are left out, as in
// Extents. Its cost follows the extents in the range, not the whole map
// (an NBD block status asks for a small window of a large export). A
// negative offset or length, or a range past MaxObjectSize, is
// fs.ErrInvalid.
func (o *Object) ExtentsIn(off, length int64) ([]Extent, error) {
	var argErr error
	if off < 0 || length < 0 || off > MaxObjectSize || length > MaxObjectSize-off {
		argErr = fmt.Errorf("extents of %q in [%d, +%d): want 0 <= offset, 0 <= length, offset+length <= %d: %w",
			o.Name(), off, length, MaxObjectSize, fs.ErrInvalid)
	}
	if err := o.e.enterRead(argErr); err != nil {
		return nil, err
	}
	defer o.e.exit()
	o.mu.RLock()
	defer o.mu.RUnlock()
	if o.removed {
		return nil, o.notExist("extents")
	}
	if length == 0 {
		return nil, nil
	}
	bs := int64(o.e.bs)
	first, end := off/bs, (off+length+bs-1)/bs
	o.treeMu.Lock()
	segs := o.tree.Lookup(nil, first, end-first)
	o.treeMu.Unlock()
	out := make([]Extent, 0, len(segs))
	for _, s := range segs {
		if s.State != extenttree.Hole {
			out = append(out, segmentExtent(s, bs))
		}
	}
	return out, nil
}

// segmentExtent is the public form of an extent tree segment.
func segmentExtent(s extenttree.Segment, bs int64) Extent {
	x := Extent{Offset: s.Start * bs, Length: s.Len * bs, Physical: -1}
	switch s.State {
	case extenttree.Delalloc:
		x.State = Delalloc
	case extenttree.Unwritten:
		x.State, x.Physical = Unwritten, s.Phys*bs
	case extenttree.Written:
		x.State, x.Physical = Written, s.Phys*bs
	}
	return x
}

// wpage is one page of a writeback batch.
type wpage struct {
	blk, phys int64
	pg        *cache.Page
	uncounted bool // its dirty budget was released when its write completed
}

// writeback writes every dirty page of the object: delalloc ranges first
// get one allocation each, the data goes out in large I/Os, and then the
// ranges are marked written and the pages clean. The device flush that makes
// them durable is commit's, which precedes any checkpoint that maps them.
//
// With stream set (background writeback under memory pressure) the pass
// goes on while the object's writers keep dirtying pages: each time enough
// new pages are dirty, they are allocated and sent as another batch while
// the earlier ones are still in flight, so the device does not wait for
// one batch's last I/Os, its completion and the next batch's collection
// (a sixth of a sequential 1 MiB writer's time when every pass was one
// batch). Batches complete in order, and a batch never holds a block that
// an earlier one is still writing: two writes of one physical block in
// flight could land in either order. The pass ends when pressure drops and
// the object no longer streams, after maxStreamBatches if every background
// writer is busy, or when someone else waits for wbMu (Sync, truncate,
// punch, remove).
func (o *Object) writeback(stream bool) error {
	o.lockWb()
	defer o.wbMu.Unlock()
	limit, minPages := 0, 0
	var prog chan struct{}
	if stream {
		// Batches of an eighth of the dirty limit, up to streamDepth in
		// flight: their frames stay pinned until they complete, on top
		// of the dirty pages writers go on making.
		limit = o.e.eagerPages()
		minPages = max(limit/2, 1)
		prog = make(chan struct{}, 1)
	}
	b, err := o.startBatch(true, limit, prog)
	if b == nil || err != nil {
		return err
	}
	queue := []*wbBatch{b}
	started, failed := 1, error(nil)
	tryMore := stream
	for len(queue) > 0 {
		for tryMore && failed == nil && len(queue) < streamDepth && o.dirtyPages() >= minPages &&
			o.keepStreaming() && (started < maxStreamBatches || !o.e.bgWritersBusy()) {
			// A batch that cannot start (no space: the next pass reports
			// it; only blocks still in flight) waits for a batch to end.
			nb, _ := o.startBatch(false, limit, prog)
			if nb == nil {
				tryMore = false
				break
			}
			queue = append(queue, nb)
			started++
		}
		select {
		case <-queue[0].done:
			failed = cmpErr(failed, o.finishBatch(queue[0], len(queue) > 1))
			queue = queue[1:]
			tryMore = stream
		case <-prog:
		}
	}
	return failed
}

const (
	// streamDepth bounds the batches of a streaming writeback in flight.
	streamDepth = 6
	// maxStreamBatches bounds one streaming writeback pass while every
	// background writer is busy, so that the other objects get their turn.
	// Otherwise a pass goes on as long as its object streams: ending it
	// lets the device idle while its last batches drain.
	maxStreamBatches = 64
)

// dirtyPages returns the number of the object's dirty pages.
func (o *Object) dirtyPages() int {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.dirty.Len()
}

// lockWb takes wbMu, letting a streaming writeback that holds it know that
// someone is waiting.
func (o *Object) lockWb() {
	o.wbWaiting.Add(1)
	o.wbMu.Lock()
	o.wbWaiting.Add(-1)
}

// keepStreaming reports whether a streaming writeback should send another
// batch: dirty pages are still over the background threshold, nobody waits
// for the object's writeback lock, and the engine is not closing.
func (o *Object) keepStreaming() bool {
	e := o.e
	select {
	case <-e.stop:
		return false
	default:
	}
	return o.wbWaiting.Load() == 0 && (o.eager.Load() || e.cache.OverBackground())
}

// eagerPages is how many dirty pages an object being appended to in a
// stream gathers before background writeback takes them: an eighth of
// the dirty limit, the size of a streaming writeback batch.
func (e *Engine) eagerPages() int { return max(e.cache.DirtyLimitPages()/8, 1) }

// streamDue reports whether the object is a stream with a batch's worth of
// dirty pages and no background writeback running.
func (o *Object) streamDue() bool {
	if !o.eager.Load() || o.bgActive.Load() {
		return false
	}
	return o.dirtyPages() >= o.e.eagerPages()
}

// noteWrite follows appending writers (wmu is held). Data appended in a
// stream is written back as it comes, in batches of eagerPages, instead of
// waiting for memory pressure: it is seldom rewritten, and the device
// would otherwise idle until half the dirty limit is reached, and the
// final Sync would find all of that still to write. Writes inside the
// object (a block device's, a database's) keep the cache's rules: a
// working set rewritten in place stays in memory.
func (o *Object) noteWrite(off, n, oldSize int64) {
	e := o.e
	switch {
	case off <= oldSize && off+n > oldSize:
		o.appendRun += n
	case off+n <= oldSize:
		o.appendRun = 0
	}
	eager := o.appendRun >= int64(e.eagerPages())<<e.shift
	if o.eager.Load() != eager {
		o.eager.Store(eager)
	}
	if eager && o.streamDue() {
		e.wakeBackground()
	}
}

// wbBatch is one writeback batch: its pages' writes run in the
// background; finishBatch completes it.
type wbBatch struct {
	pages     []wpage
	unwritten []extenttree.Range
	passSize  int64
	done      chan struct{} // closed when every write has completed; then err is set
	err       error
}

// startBatch allocates the object's delalloc ranges and sends its dirty
// pages to the device as one batch, except pages of blocks whose write is
// still in flight (they wait for the next batch). It returns nil if there
// is nothing to send, and sends at most limit pages if limit > 0. Each
// completed write signals prog, if set, without waiting. The
// first batch of a pass (first) also logs the size of an object with
// nothing left to write and gives back space held in allocation windows
// when allocation runs out of it. Callers hold wbMu.
func (o *Object) startBatch(first bool, limit int, prog chan struct{}) (*wbBatch, error) {
	e := o.e
	o.mu.Lock()
	if o.removed || o.dirty.Len() == 0 {
		if first {
			if !o.removed && o.size > o.diskSize {
				// Nothing left to write: every byte below the size is on
				// the device (the commit's flush makes it durable).
				o.diskSize = o.size
				e.logSize(o, true)
			}
			o.undirtyLocked()
		}
		o.mu.Unlock()
		return nil, nil
	}
	err := o.allocLocked()
	if first && errors.Is(err, ErrNoSpace) {
		// Free space may be held by windows or busy until a commit.
		o.mu.Unlock()
		e.spacePressure()
		e.releaseAllWindows()
		if cerr := e.commit(false); cerr != nil {
			return nil, cerr
		}
		o.mu.Lock()
		err = o.allocLocked()
	}
	if err != nil {
		o.mu.Unlock()
		return nil, err
	}
	blocks := o.dirty.Blocks(make([]int64, 0, o.dirty.Len()))
	b := &wbBatch{
		pages: make([]wpage, 0, len(blocks)),
		done:  make(chan struct{}),
	}
	cut := int64(-1) // the first dirty block left for a later batch
	if limit > 0 && len(blocks) > limit {
		cut = blocks[limit]
		blocks = blocks[:limit]
	}
	var segs []extenttree.Segment
	for i := 0; i < len(blocks); {
		if !first && o.wb.Get(blocks[i]) != nil {
			i++
			continue
		}
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 && (first || o.wb.Get(blocks[j]) == nil) {
			j++
		}
		segs = o.tree.Lookup(segs[:0], blocks[i], int64(j-i))
		for _, s := range segs {
			if s.State != extenttree.Unwritten && s.State != extenttree.Written {
				o.mu.Unlock()
				panic(fmt.Sprintf("rawblock: object %q: dirty blocks %d+%d are %v after allocation", o.name, s.Start, s.Len, s.State))
			}
			if s.State == extenttree.Unwritten {
				b.unwritten = append(b.unwritten, extenttree.Range{Start: s.Start, Len: s.Len})
			}
			for blk := s.Start; blk < s.Start+s.Len; blk++ {
				pg := o.dirty.Delete(blk)
				o.wb.Set(blk, pg)
				b.pages = append(b.pages, wpage{blk: blk, phys: s.Phys + blk - s.Start, pg: pg})
			}
		}
		i = j
	}
	if len(b.pages) == 0 {
		o.mu.Unlock()
		return nil, nil
	}
	// The object stays in the engine's dirty set until this writeback has
	// finished, so an Engine.Sync racing with it waits for it (wbMu).
	o.dirtySince = time.Time{}
	o.lastFlush = time.Now()
	// Every block below passSize that needs writing is in this batch or
	// in the one before it, which completes first: a batch cut short by
	// limit covers the size only up to the first block it left dirty.
	b.passSize = o.size
	if cut >= 0 {
		b.passSize = min(b.passSize, cut<<e.shift)
	}
	o.mu.Unlock()

	go func() {
		// A page whose write completed no longer counts as dirty: writers
		// may go on while the rest of the batch is in flight (its frame
		// stays pinned until the batch ends and the range is marked
		// written).
		b.err = e.writePages(o.id, b.pages, func(ps []wpage) {
			for i := range ps {
				ps[i].uncounted = true
			}
			e.cache.ReleaseDirty(len(ps))
			select {
			case prog <- struct{}{}:
			default:
			}
		})
		close(b.done)
	}()
	return b, nil
}

// finishBatch completes batch b after its writes: the pages become clean
// (or dirty again if the batch failed), the new extents Written, and their
// mapping and the pass's size are logged. more says another batch of the
// pass is in flight.
func (o *Object) finishBatch(b *wbBatch, more bool) error {
	e := o.e
	err := b.err
	// Marking new extents written is fenced against commit: commit flushes
	// the device and snapshots the metadata under the gate's write lock, so
	// every extent its checkpoint maps was written before that flush.
	e.gate.RLock()
	defer e.gate.RUnlock()
	o.mu.Lock()
	defer o.mu.Unlock()
	// Small batches stay cached for read-after-write; a streaming batch
	// would only churn the clean cache, so its frames are freed.
	keep := len(b.pages) <= keepCleanPages
	release, recharge := 0, 0
	for _, w := range b.pages {
		o.wb.Delete(w.blk)
		newer := o.dirty.Get(w.blk) != nil
		if err != nil {
			// Keep the data dirty so a later Sync can write it again.
			if !newer {
				o.dirty.Set(w.blk, w.pg)
				if w.uncounted {
					recharge++
				}
				continue
			}
		} else if !newer && keep {
			o.insertClean(w.blk, w.pg)
		}
		w.pg.Release()
		if !w.uncounted {
			release++
		}
	}
	e.cache.ChargeDirty(recharge)
	if release > 0 {
		e.cache.ReleaseDirty(release)
	}
	if err != nil {
		o.markDirtyLocked()
		err = fmt.Errorf("writeback %q: %w", o.name, err)
		o.wbErr, o.wbUnseen = err, seenByAll
		e.writebackFailed(err)
		return err
	}
	// Log the mappings in the order they become Written, under the gate
	// (see commit) and o.mu.
	var segs []extenttree.Segment
	pending := o.pendingRecords()
	for _, r := range b.unwritten {
		segs = o.tree.Lookup(segs[:0], r.Start, r.Len)
		if serr := o.tree.SetWritten(r.Start, r.Len); serr != nil {
			panic(fmt.Sprintf("rawblock: object %q: mark written %d+%d: %v", o.name, r.Start, r.Len, serr))
		}
		for _, sg := range segs {
			e.logOp(jop{kind: opMap, id: o.id, logical: sg.Start, physical: sg.Phys, length: sg.Len})
		}
	}
	// Counted as logged now.
	o.notePending(pending)
	if b.passSize > o.diskSize {
		o.diskSize = b.passSize
		e.logSize(o, true)
	}
	if more || o.dirty.Len() > 0 || o.size > o.diskSize {
		o.markDirtyLocked()
	} else {
		o.undirtyLocked()
	}
	return nil
}

// Observers of writeback failures. Like the kernel's per-file error
// sequence, each one reports a failure once, whatever the other did: the
// object's Sync, and the engine (its Sync, or Close if no engine Sync came
// first), each return the error of a writeback that failed since they last
// looked, even when the pages were written again since (a one-shot device
// error, retried by the other's Sync).
const (
	seenByObjectSync uint8 = 1 << iota
	seenByEngine
	seenByAll = seenByObjectSync | seenByEngine
)

// takeWbErr returns, once for each of the observers in who, the error of
// a writeback that failed since they last looked.
func (o *Object) takeWbErr(who uint8) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.wbUnseen&who == 0 {
		return nil
	}
	err := o.wbErr
	o.wbUnseen &^= who
	if o.wbUnseen == 0 {
		o.wbErr = nil
	}
	return err
}

// allocLocked turns every delalloc range into unwritten extents: one
// allocation per range unless free space is fragmented.
func (o *Object) allocLocked() error {
	e := o.e
	// A range allocated in pieces becomes several entries (see metaLimit).
	defer o.notePending(o.pendingRecords())
	// Delalloc blocks always have dirty pages: look for them only under
	// the dirty runs, not across the whole map (an object of many extents
	// would pay for all of them on every Sync).
	var ranges []extenttree.Range
	blocks := o.dirty.Blocks(make([]int64, 0, o.dirty.Len()))
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j] == blocks[j-1]+1 {
			j++
		}
		ranges = o.tree.DelallocRanges(ranges, blocks[i], int64(j-i))
		i = j
	}
	bs := int64(e.bs)
	eof := (o.size + bs - 1) / bs
	for _, r := range ranges {
		start, n := r.Start, r.Len
		for n > 0 {
			goal, cont, fresh := o.goalLocked(start)
			// An extent that starts where the previous one ends extends it:
			// only one that does not is counted as a new allocation.
			prevEnd := int64(-1)
			if cont {
				prevEnd = goal
			}
			got, err := o.placeLocked(goal, n, cont && start+n >= eof, fresh)
			if err != nil {
				return err
			}
			for _, x := range got {
				if x.Start != prevEnd {
					e.allocations.Add(1)
				}
				prevEnd = x.End()
				if err := o.tree.SetUnwritten(start, x.Len, x.Start); err != nil {
					panic(fmt.Sprintf("rawblock: object %q: set unwritten %d+%d@%d: %v", o.name, start, x.Len, x.Start, err))
				}
				start += x.Len
				n -= x.Len
			}
			// An append, or a batch of a stream being appended to that
			// stops short of the end (streaming batches are bounded):
			// without a window right away, another object's small
			// allocation could take the blocks right after it.
			if (start >= eof || o.eager.Load()) && o.window.Len == 0 {
				o.openWindowLocked(prevEnd)
			}
		}
	}
	return nil
}

// placeLocked allocates n blocks whose goal is goal: from the object's
// window when it starts there, else exactly at the goal when those blocks
// are free, else (appendCont: an append continuing the object's last
// extent) in a fresh region for the stream, else wherever Alloc finds them
// nearest the goal. fresh says the object has no extent yet: its goal is
// freshGoal's, computed here (see placeFresh), and goal is unused.
func (o *Object) placeLocked(goal, n int64, appendCont, fresh bool) ([]reserve.Extent, error) {
	e := o.e
	if fresh {
		h, g := e.placeFresh(o, n, o.eager.Load())
		if h.Len > 0 {
			return []reserve.Extent{h}, nil
		}
		return o.allocNear(g, n)
	}
	if o.window.Len > 0 && o.window.Start == goal {
		x := reserve.Extent{Start: goal, Len: min(n, o.window.Len)}
		if err := e.space.ClaimHeld(x); err != nil {
			panic(fmt.Sprintf("rawblock: object %q: claim window %v: %v", o.name, x, err))
		}
		o.window = reserve.Extent{Start: x.End(), Len: o.window.Len - x.Len}
		return []reserve.Extent{x}, nil
	}
	// The goal itself first: Alloc's best fit by size would take a free
	// extent a block shorter than the one a new stream was placed in the
	// middle of, at its other end.
	if h := o.holdExact(goal, n); h.Len > 0 {
		return []reserve.Extent{h}, nil
	}
	if appendCont {
		// An append that cannot continue in place: give the stream a
		// fresh region with room to grow.
		h, g := e.placeFresh(o, n, true)
		if h.Len > 0 {
			return []reserve.Extent{h}, nil
		}
		goal = g
	}
	return o.allocNear(goal, n)
}

// allocNear allocates n blocks wherever Alloc finds them nearest goal.
func (o *Object) allocNear(goal, n int64) ([]reserve.Extent, error) {
	xs, err := o.e.space.Alloc(n, goal)
	if err != nil {
		if errors.Is(err, reserve.ErrNoSpace) {
			return nil, fmt.Errorf("%w: writeback of %q: %v", ErrNoSpace, o.name, err)
		}
		return nil, fmt.Errorf("writeback of %q: %w", o.name, err)
	}
	return xs, nil
}

// placeFresh allocates n blocks for o at goal = freshGoal(n, stream), or
// nothing (Len 0) if they are not free there, and returns the goal.
//
// Objects place first extents concurrently, each computing its goal from
// the same largest free extent: two streams starting together got the
// same goal, and the loser's Alloc took the best fit by size — a gap of a
// few MiB just before another stream, which it outgrew at once (2 runs in
// 70 of 8 × 64 MiB appenders ended with 9 to 11 extents). placeMu makes
// computing the goal and claiming it one step.
func (e *Engine) placeFresh(o *Object, n int64, stream bool) (reserve.Extent, int64) {
	e.placeMu.Lock()
	defer e.placeMu.Unlock()
	goal := e.freshGoal(n, stream)
	return o.holdExact(goal, n), goal
}

// holdExact allocates exactly blocks [goal, goal+n) if they are all
// allocatable, else nothing (Len 0).
func (o *Object) holdExact(goal, n int64) reserve.Extent {
	e := o.e
	h := e.space.HoldAt(goal, n)
	if h.Len < n {
		if h.Len > 0 {
			if err := e.space.Unhold(h); err != nil {
				panic(fmt.Sprintf("rawblock: object %q: give back %v: %v", o.name, h, err))
			}
		}
		return reserve.Extent{}
	}
	if err := e.space.ClaimHeld(h); err != nil {
		panic(fmt.Sprintf("rawblock: object %q: claim %v: %v", o.name, h, err))
	}
	return h
}

// goalLocked picks where the allocation for logical block start should go:
// right after the physical block mapping start-1 (cont), else after the
// object's last extent, else (fresh, goal unset) a fresh place that
// placeLocked picks (see placeFresh).
func (o *Object) goalLocked(start int64) (goal int64, cont, fresh bool) {
	if start > 0 {
		var arr [1]extenttree.Segment
		s := o.tree.Lookup(arr[:0], start-1, 1)[0]
		if s.State == extenttree.Unwritten || s.State == extenttree.Written {
			return s.Phys + start - 1 - s.Start + 1, true, false
		}
	}
	if last, ok := o.tree.Last(); ok && last.Phys >= 0 {
		return last.Phys + last.Len, false, false
	}
	return -1, false, true
}

// freshGoal places the first extent of an object. Large first flushes are
// streams that will keep growing: they start at the beginning of the
// largest free extent if nothing precedes it, else after room for the
// stream before it to grow. Other small ones (under streamBlocks) pack at
// the front; a stream is also an object being appended to (eager), whose
// first flush may be small: under memory pressure 8 interleaved writers'
// first batches were 5-13 blocks, packed at the front with a window each,
// and half the streams moved after 1 MiB.
//
// How much room the stream before needs is a guess: streams written side
// by side tend to end the same size, so both are taken to grow to S, the
// larger of what the new one flushes now (n) and what the one before has
// (p, half its window: a window holds twice its stream). The one before
// gets S-p more, the new one S, and what is left is shared equally; if
// they cannot both get that, the room is shared in that proportion.
// Splitting in the middle instead gave a stream whose first flush was
// already 64 MiB the same room as one at 7 MiB. With the exact placement
// of allocLocked and the windows of eager streams, 8 interleaved 64 MiB
// writers ended with one extent each in 12 runs of 12 on a 1 GiB device
// with a 16 MiB cache (10 of 12 before), and 7 of 12 on a 768 MiB one
// (6 before): two thirds full, streams that start late can still be
// short of room.
func (e *Engine) freshGoal(n int64, stream bool) int64 {
	if n < streamBlocks && !stream {
		return e.sb.DataStart
	}
	best := e.space.LargestFree()
	if best.Len == 0 || best.Start == e.sb.DataStart {
		return best.Start
	}
	w := min(e.space.HeldBefore(best.Start), best.Len)
	prevEnd, room := best.Start-w, best.Len+w
	p := w / 2
	size := max(n, p)
	prevNeeds := size - p
	var at int64
	if slack := room - prevNeeds - size; slack >= 0 {
		at = prevNeeds + slack/2
	} else {
		at = int64(float64(room) * float64(prevNeeds) / float64(prevNeeds+size))
	}
	// The stream before keeps its window; the new one fits in the extent.
	return min(max(prevEnd+at, best.Start), best.End()-min(n, best.Len))
}

// openWindowLocked holds free space right after physical block end for the
// object's next appends: twice what it has, at least 1 MiB, at most 1 GiB
// and at most 1/16 of free space.
func (o *Object) openWindowLocked(end int64) {
	if end < 0 {
		return
	}
	e := o.e
	_, mapped := o.tree.Count(extenttree.Written)
	_, unw := o.tree.Count(extenttree.Unwritten)
	want := max(2*(mapped+unw), int64(maxIOBytes)>>e.shift)
	// A window never holds space that reservations have promised, and
	// none opens for a while after space ran short.
	if e.pressureUntil.Load() > time.Now().UnixNano() {
		return
	}
	st := e.space.Stats()
	want = min(want, int64(1<<30)>>e.shift, (st.Allocatable-st.Reserved)/16)
	if want <= 0 {
		return
	}
	o.window = e.space.HoldAt(end, want)
}

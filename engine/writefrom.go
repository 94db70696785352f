package engine

import (
	"errors"
	"fmt"
	"io"

	"github.com/rawblock/rawblock/cache"
)

// WriteFrom writes n bytes read from r at offset off: what reading them
// into a buffer and calling WriteAt does, without the buffer. Whole blocks
// are read from r straight into fresh frames of the page cache, which then
// become the object's dirty pages, so each byte is copied once (by r)
// instead of twice; a storage daemon hands its socket to WriteFrom (on
// 1 MiB NBD writes the second copy was 40 % of the daemon's CPU).
//
// The write is all or nothing: if r fails or ends before n bytes, nothing
// is written and the error is returned (io.ErrUnexpectedEOF when r ended).
// Bytes already read from r are consumed either way. Like WriteAt, space
// is reserved before the object changes (ErrNoSpace: nothing written), and
// a writer above the dirty limit waits, here before reading r.
//
// Before reading r, WriteFrom refuses (nothing read) a write to a closed
// engine or a removed object, or one whose space is not free at that
// moment. A write of more blocks than a quarter of the dirty limit does
// not fit the cache's frames at once: it is read into a buffer and written
// as by WriteAt, and it may be at most MaxWriteFromBuffer bytes
// (fs.ErrInvalid above, nothing read).
func (o *Object) WriteFrom(r io.Reader, off, n int64) (int64, error) {
	e := o.e
	argErr := checkRange("write", off, n)
	if n < 0 {
		argErr = fmt.Errorf("%w: write of %d bytes", errInvalid, n)
	}
	if err := e.enterWrite(argErr); err != nil {
		return 0, err
	}
	defer e.exit()
	if n == 0 {
		k, err := o.writeAt(nil, off)
		return int64(k), err
	}
	b0, b1 := off>>e.shift, (off+n-1)>>e.shift+1
	if b1-b0 > int64(max(1, e.cache.DirtyLimitPages()/4)) {
		return o.writeFromBuffer(r, off, n)
	}

	if err := o.checkWrite(off, n); err != nil {
		return 0, err
	}
	// Frames and dirty budget for every block, and one more for a gap's
	// zeroing, before reading: a writer over the dirty limit waits here.
	cr := credits{e: e}
	defer cr.release()
	if err := cr.grow(int(b1-b0) + 1); err != nil {
		return 0, fmt.Errorf("write %q at %d: %w", o.name, off, err)
	}
	src, err := o.readBlocks(r, off, n, &cr)
	defer src.release(e)
	if err != nil {
		return 0, fmt.Errorf("write %q at %d: reading the data: %w", o.name, off, err)
	}

	o.wmu.Lock()
	defer o.wmu.Unlock()
	reserved, metaRes, oldSize, err := o.reserveWrite(b0, b1, off)
	if err != nil {
		return 0, err
	}
	defer e.unreserveLeft(&reserved)
	defer e.metaPending.Add(-metaRes)

	o.mu.Lock()
	used, err := o.installLocked(&src, off, n, reserved, &cr)
	o.mu.Unlock()
	reserved -= used
	if err != nil {
		return 0, err
	}
	o.noteWrite(off, n, oldSize)
	return n, nil
}

// MaxWriteFromBuffer is the largest WriteFrom of more blocks than a
// quarter of the cache's dirty limit (such a write is read into a buffer
// of its size first, to stay all or nothing). rawblockd's writes are at
// most 32 MiB.
const MaxWriteFromBuffer = 1 << 30

// checkWrite refuses, before WriteFrom reads anything, what the write
// itself would refuse after the read: a removed object, or space the
// device does not have now. The reservation is only a check (the write
// makes its own); a write that takes the space in between makes this one
// fail after all, its bytes read.
func (o *Object) checkWrite(off, n int64) error {
	e := o.e
	b0, b1 := off>>e.shift, (off+n-1)>>e.shift+1
	o.wmu.Lock()
	holes, runs, _, err := o.reserveWrite(b0, b1, off)
	o.wmu.Unlock()
	if err != nil {
		return err
	}
	e.unreserveLeft(&holes)
	e.metaPending.Add(-runs)
	return nil
}

// writeFromBuffer is WriteFrom for a write too large for the cache's
// frames: r is read into a buffer, which is then written as by WriteAt.
func (o *Object) writeFromBuffer(r io.Reader, off, n int64) (int64, error) {
	if n > MaxWriteFromBuffer {
		return 0, fmt.Errorf("%w: write %q at %d: %d bytes from a reader, more than MaxWriteFromBuffer (%d) and a quarter of the cache's dirty limit",
			errInvalid, o.name, off, n, int64(MaxWriteFromBuffer))
	}
	if err := o.checkWrite(off, n); err != nil {
		return 0, err
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, fmt.Errorf("write %q at %d: reading the data: %w", o.name, off, err)
	}
	k, err := o.writeAt(buf, off)
	return int64(k), err
}

// installLocked makes src the object's data at [off, off+n) and returns
// how many reserved blocks that used. On an error the object's contents
// and size are unchanged (a gap's zeroing past the end may have happened,
// which reads the same).
func (o *Object) installLocked(src *blockSource, off, n, reserved int64, cr *credits) (int64, error) {
	e := o.e
	if o.removed {
		return 0, o.notExist("write")
	}
	b0, b1 := off>>e.shift, (off+n-1)>>e.shift+1
	bs := int64(e.bs)
	if off > o.size && o.size%bs != 0 {
		if err := o.zeroTailLocked(off, cr); err != nil {
			return 0, fmt.Errorf("write %q at %d: %w", o.name, off, err)
		}
	}
	// Partial blocks at the edges first, into pages not yet installed:
	// their read-modify-write is the only step that can fail, and nothing
	// has changed if it does.
	for i := range src.edges {
		ed := &src.edges[i]
		if ed.page = o.dirty.Get(ed.blk); ed.page != nil {
			ed.own = false
			continue
		}
		if cr.frames() == 0 {
			panic(fmt.Sprintf("rawblock: object %q: no frame left for a partial block of a write", o.name))
		}
		pg := cr.take()
		if err := o.fillBaseLocked(ed.blk, pg.Data()); err != nil {
			pg.Release()
			e.cache.ReleaseDirty(1)
			return 0, fmt.Errorf("write %q at %d: read-modify-write: %w", o.name, off, err)
		}
		ed.page, ed.own = pg, true
	}
	for i := range src.edges {
		ed := &src.edges[i]
		copy(ed.page.Data()[ed.from:ed.to], ed.data[ed.from:ed.to])
		if ed.own {
			o.dirty.Set(ed.blk, ed.page)
			e.cache.Remove(o.key(ed.blk))
			ed.own, ed.page = false, nil
		}
	}
	for i, pg := range src.full {
		if pg == nil {
			continue
		}
		b := b0 + int64(i)
		old := o.dirty.Get(b)
		o.dirty.Set(b, pg)
		src.full[i] = nil
		if old != nil {
			// The dirty page this one replaces gives its budget back.
			old.Release()
			e.cache.ReleaseDirty(1)
		} else {
			e.cache.Remove(o.key(b))
		}
	}
	o.ra.dropRange(&e.bufPool, b0, b1)
	return o.recordLocked(b0, b1, off+n, reserved), nil
}

// blockSource is a write's data read ahead of the object lock: whole
// blocks in fresh frames (full[i] for block b0+i, nil for a partial one),
// partial ones in small buffers.
type blockSource struct {
	full  []*cache.Page
	edges []edgeBlock
}

// edgeBlock is a block the write covers only in part: bytes [from, to) of
// data go into page (the block's dirty page, or own: a fresh one).
type edgeBlock struct {
	blk      int64
	from, to int64
	data     []byte
	page     *cache.Page
	own      bool
}

// readBlocks reads the n bytes at off from r: whole blocks into frames
// taken from cr, partial ones into buffers. Whole blocks whose frames
// follow each other in the arena are read with one call into one buffer:
// a buffered reader (rawblockd's bufio.Reader on its socket) hands a large
// read straight to the kernel, where 4 KiB reads would each be copied out
// of its buffer, a second copy again.
func (o *Object) readBlocks(r io.Reader, off, n int64, cr *credits) (blockSource, error) {
	e := o.e
	bs := int64(e.bs)
	b0, b1 := off>>e.shift, (off+n-1)>>e.shift+1
	src := blockSource{full: make([]*cache.Page, b1-b0)}
	part := func(b int64) (from, to int64) {
		bStart := b * bs
		return max(off, bStart) - bStart, min(off+n, bStart+bs) - bStart
	}
	for b := b0; b < b1; b++ {
		if from, to := part(b); from == 0 && to == bs {
			src.full[b-b0] = cr.take()
		}
	}
	for b := b0; b < b1; {
		var dst []byte
		next := b + 1
		if pg := src.full[b-b0]; pg != nil {
			for next < b1 && src.full[next-b0] != nil && src.full[next-b0].Follows(src.full[next-1-b0]) {
				next++
			}
			dst = pg.Span(int(next - b))
		} else {
			from, to := part(b)
			data := make([]byte, bs)
			src.edges = append(src.edges, edgeBlock{blk: b, from: from, to: to, data: data})
			dst = data[from:to]
		}
		if _, err := io.ReadFull(r, dst); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return src, err
		}
		b = next
	}
	return src, nil
}

// release gives back the frames not installed, with their dirty budget.
func (s *blockSource) release(e *Engine) {
	for i, pg := range s.full {
		if pg != nil {
			pg.Release()
			e.cache.ReleaseDirty(1)
			s.full[i] = nil
		}
	}
	for i := range s.edges {
		if ed := &s.edges[i]; ed.own && ed.page != nil {
			ed.page.Release()
			e.cache.ReleaseDirty(1)
			ed.page = nil
		}
	}
}

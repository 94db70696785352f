package cache

import (
	"math/bits"
	"slices"
)

// Streams: frames set aside for appenders.
//
// Writers that append to different objects at once, a few blocks per
// write, would otherwise take frames from the free list in turn: eight
// appenders of 4 KiB each got every eighth frame, so an object's 1 MiB of
// consecutive blocks sat in 256 scattered frames, which writeback sends as
// a vector of 256 buffers the kernel must pin one page at a time (a tenth
// of the machine's CPU in a 4 KiB append benchmark) and the block layer
// splits in two. AllocStream gives each appender a run of free frames of
// its own, handed out in order, so its consecutive blocks get consecutive
// frames (ascending, and following each other where the frames taken
// from the free list do) and writeback sends them as one buffer.
//
// Frames in a stream are free frames: they hold no data, count as free in
// Stats, and whoever finds the free list short takes them back (popFree,
// AllocRun, Alloc; the least recently used stream first), so streams
// never make a writer wait. At most maxStreams streams exist; a new one
// replaces the least recently used; and while free frames are short
// (under two refills' worth) a stream takes only what it hands out.

// maxStreams bounds the streams; with streamLen frames each they hold at
// most a sixteenth of the cache.
const maxStreams = 8

// streamRun is the frames set aside for one stream, ascending, handed out
// from the front.
type streamRun struct {
	idx  []uint32
	buf  []uint32 // idx's backing array, reused by refills
	used uint64   // c.streamTick at the last AllocStream
}

// streamLenFor is how many frames a stream takes at a time for a cache of
// frames frames: 512 (2 MiB of 4 KiB blocks), less in small caches so that
// maxStreams streams hold at most a sixteenth of the frames; 0 (streams
// off) when that would be under 32 frames. A power of two, the size of
// the aligned groups refills take (see AllocStream).
func streamLenFor(frames int) int {
	n := min(512, frames/(16*maxStreams))
	if n < 32 {
		return 0
	}
	return 1 << (bits.Len(uint(n)) - 1)
}

// AllocStream is AllocRun for an appender (see Streams above): it appends
// to dst up to n frames, each with one reference, taken in order from the
// run of frames set aside for stream id, refilled from the free list. Like
// AllocRun it neither evicts nor waits.
//
// pos is the appender's position, in blocks, of the first frame wanted
// (its block number). A refill takes a whole aligned group of free frames
// when there is one, and hands it out from pos's offset in the group, so
// that block b sits at offset b mod the group size: an object's frames
// follow each other across each aligned group of its blocks, and
// writeback, which ends an I/O where following frames stop (see engine
// splitRuns), cuts every appended object at the same block multiples.
func (c *Cache) AllocStream(id, pos uint64, dst []*Page, n int) []*Page {
	if n <= 0 || c.closed.Load() {
		return dst
	}
	if c.streamLen == 0 {
		return c.AllocRun(dst, n)
	}
	var arr [512]uint32
	got := arr[:0]
	c.freeMu.Lock()
	s := c.streams[id]
	if s == nil {
		if len(c.streams) >= maxStreams {
			c.dropLRUStreamLocked()
		}
		s = &streamRun{buf: make([]uint32, 0, c.streamLen)}
		c.streams[id] = s
	}
	c.streamTick++
	s.used = c.streamTick
	for len(got) < n {
		if len(s.idx) == 0 {
			if c.free.len() == 0 && c.reserved > 0 {
				// Other streams hold the last free frames (this one,
				// empty, may go too: it is put back).
				c.reclaimForLocked(1)
				c.streams[id] = s
			}
			c.refillLocked(s, pos+uint64(len(got)), n-len(got))
			if len(s.idx) == 0 {
				break
			}
		}
		m := min(n-len(got), len(s.idx))
		got = append(got, s.idx[:m]...)
		s.idx = s.idx[m:]
		c.reserved -= m
	}
	c.freeMu.Unlock()
	for _, idx := range got {
		dst = append(dst, c.claim(&c.pages[idx]))
	}
	return dst
}

// refillLocked sets aside frames for the empty stream s, whose next frame
// is for position pos and which is asked for want frames now. freeMu is
// held.
func (c *Cache) refillLocked(s *streamRun, pos uint64, want int) {
	g := c.streamLen
	s.idx = s.buf[:0]
	// Free frames run short: set none aside beyond what is wanted, or a
	// refill would empty the free list, be taken back by the next
	// allocation and set aside again, write after write.
	k := min(want, c.free.len())
	if c.free.len() >= 2*g {
		k = g
		if base, ok := c.free.takeGroup(g); ok {
			off := uint32(pos % uint64(g))
			for i := base; i < base+off; i++ {
				c.free.add(i) // the group's frames before pos's offset stay free
			}
			for i := base + off; i < base+uint32(g); i++ {
				s.idx = append(s.idx, i)
			}
			c.reserved += len(s.idx)
			return
		}
	}
	s.idx = c.free.takeN(s.idx, k)
	slices.Sort(s.idx)
	c.reserved += len(s.idx)
}

// DropStream gives the frames set aside for stream id back to the free list.
func (c *Cache) DropStream(id uint64) {
	c.freeMu.Lock()
	defer c.freeMu.Unlock()
	if s := c.streams[id]; s != nil {
		c.returnStreamLocked(id, s)
	}
}

// returnStreamLocked puts a stream's frames back on the free list. freeMu
// is held.
func (c *Cache) returnStreamLocked(id uint64, s *streamRun) {
	for _, i := range s.idx {
		c.free.add(i)
	}
	c.reserved -= len(s.idx)
	if c.reserved < 0 {
		panic("cache: streams hold a negative number of frames")
	}
	s.idx = nil
	delete(c.streams, id)
}

func (c *Cache) dropLRUStreamLocked() {
	var (
		lru   *streamRun
		lruID uint64
	)
	for id, s := range c.streams {
		if lru == nil || s.used < lru.used {
			lru, lruID = s, id
		}
	}
	if lru != nil {
		c.returnStreamLocked(lruID, lru)
	}
}

// reclaimForLocked gives streams' frames back to the free list, the least
// recently used first, until it holds n frames or no stream holds any.
// freeMu is held.
func (c *Cache) reclaimForLocked(n int) {
	for c.free.len() < n && c.reserved > 0 {
		c.dropLRUStreamLocked()
	}
}

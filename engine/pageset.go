package engine

import (
	"slices"

	"github.com/rawblock/rawblock/cache"
)

// pageSet maps block numbers to pages: an object's dirty pages, or its pages
// under writeback. Blocks are grouped in runs of psChunk, so the sequential
// runs writes produce cost one map entry per run, and a set that is filled
// and emptied over and over (every writeback pass) does not leave a hash
// table full of deleted slots to probe through, as a map per block does.
type pageSet struct {
	chunks  map[int64]*pageChunk
	n       int
	lastKey int64
	last    *pageChunk
	spare   *pageChunk
}

const (
	psShift = 6
	psChunk = 1 << psShift
)

type pageChunk struct {
	n int
	p [psChunk]*cache.Page
}

// chunk finds b's chunk. It never writes: Get runs under the object's
// shared lock, in parallel with other readers; only Set and Delete (under
// the exclusive lock) move the one-entry cache.
func (s *pageSet) chunk(b int64) *pageChunk {
	k := b >> psShift
	if s.last != nil && s.lastKey == k {
		return s.last
	}
	return s.chunks[k]
}

func (s *pageSet) remember(b int64, c *pageChunk) {
	if c != nil {
		s.lastKey, s.last = b>>psShift, c
	}
}

// Len returns the number of pages held.
func (s *pageSet) Len() int { return s.n }

// Get returns block b's page, or nil. Safe in parallel with other Gets.
func (s *pageSet) Get(b int64) *cache.Page {
	if s.n == 0 {
		return nil
	}
	if c := s.chunk(b); c != nil {
		return c.p[b&(psChunk-1)]
	}
	return nil
}

// Set makes p (not nil) block b's page, replacing any.
func (s *pageSet) Set(b int64, p *cache.Page) {
	if p == nil {
		panic("rawblock: pageSet.Set of a nil page")
	}
	c := s.chunk(b)
	s.remember(b, c)
	if c == nil {
		if s.chunks == nil {
			s.chunks = make(map[int64]*pageChunk)
		}
		c, s.spare = s.spare, nil
		if c == nil {
			c = new(pageChunk)
		}
		k := b >> psShift
		s.chunks[k] = c
		s.lastKey, s.last = k, c
	}
	i := b & (psChunk - 1)
	if c.p[i] == nil {
		c.n++
		s.n++
	}
	c.p[i] = p
}

// Delete removes block b's page and returns it (nil if there was none).
func (s *pageSet) Delete(b int64) *cache.Page {
	if s.n == 0 {
		return nil
	}
	c := s.chunk(b)
	if c == nil {
		return nil
	}
	s.remember(b, c)
	i := b & (psChunk - 1)
	p := c.p[i]
	if p == nil {
		return nil
	}
	c.p[i] = nil
	c.n--
	s.n--
	if c.n == 0 {
		k := b >> psShift
		delete(s.chunks, k)
		if s.last == c {
			s.last = nil
		}
		s.spare = c
	}
	return p
}

// Blocks appends the blocks held to dst, in increasing order.
func (s *pageSet) Blocks(dst []int64) []int64 {
	keys := make([]int64, 0, len(s.chunks))
	for k := range s.chunks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		c := s.chunks[k]
		for i, p := range c.p {
			if p != nil {
				dst = append(dst, k<<psShift+int64(i))
			}
		}
	}
	return dst
}

// DeleteRange removes the pages of blocks [b0, b1) and calls fn with each.
func (s *pageSet) DeleteRange(b0, b1 int64, fn func(b int64, p *cache.Page)) {
	if s.n == 0 || b1 <= b0 {
		return
	}
	for _, b := range s.Blocks(nil) {
		if b >= b0 && b < b1 {
			fn(b, s.Delete(b))
		}
	}
}

package cache

import (
	"fmt"
	"math/bits"
)

// freeSet is the set of free frames, a bitmap searched next-fit.
//
// A bitmap rather than a stack because the order frames come back in
// carries no information worth keeping, while their neighbours do: frames
// freed by writeback a run at a time (hundreds that follow each other)
// interleave on a stack with other runs and with evicted clean pages, and
// a stream refill taken off the top of that stack was pieces of several
// runs (2 MiB refills averaged 181 frames that followed each other, so
// writeback's I/Os averaged 720 KiB, not 1 MiB). In a bitmap a freed run
// is whole again, and takeGroup finds it.
//
// Next-fit (search on from where the last frame was found) hands out
// frames in ascending order, so frames taken one by one follow each other
// where the free ones do.
type freeSet struct {
	words  []uint64
	n      int // frames in the set
	frames int // frames in the arena: bits at or past it are never set
	cursor int // word where take looks first
	gcur   int // group (of the last takeGroup size) where takeGroup looks first
}

func newFreeSet(frames int) freeSet {
	f := freeSet{words: make([]uint64, (frames+63)/64), frames: frames}
	for i := range frames {
		f.words[i/64] |= 1 << (i % 64)
	}
	f.n = frames
	return f
}

// len is the number of free frames.
func (f *freeSet) len() int { return f.n }

// add puts frame i in the set; it panics if i is already there (a frame
// freed twice).
func (f *freeSet) add(i uint32) {
	w, b := int(i/64), i%64
	if int(i) >= f.frames || f.words[w]&(1<<b) != 0 {
		panic(fmt.Sprintf("cache: frame %d freed while already free (or past the %d frames)", i, f.frames))
	}
	f.words[w] |= 1 << b
	f.n++
}

// take removes and returns the first free frame at or after the cursor,
// wrapping around; ok is false when the set is empty.
func (f *freeSet) take() (uint32, bool) {
	if f.n == 0 {
		return 0, false
	}
	nw := len(f.words)
	for k := range nw {
		w := f.cursor + k
		if w >= nw {
			w -= nw
		}
		if x := f.words[w]; x != 0 {
			b := bits.TrailingZeros64(x)
			f.words[w] = x &^ (1 << b)
			f.n--
			f.cursor = w
			return uint32(w*64 + b), true
		}
	}
	panic(fmt.Sprintf("cache: free set counts %d frames but holds none", f.n))
}

// takeN appends up to n frames to dst (see take) and returns it.
func (f *freeSet) takeN(dst []uint32, n int) []uint32 {
	for range n {
		i, ok := f.take()
		if !ok {
			break
		}
		dst = append(dst, i)
	}
	return dst
}

// takeGroup removes a whole free group of g frames, g a power of two, that
// starts at a multiple of g, and returns its first frame; ok is false when
// no such group is free. Groups are searched next-fit too.
func (f *freeSet) takeGroup(g int) (uint32, bool) {
	if g <= 0 || g&(g-1) != 0 {
		panic(fmt.Sprintf("cache: takeGroup(%d): the group size must be a power of two", g))
	}
	groups := f.frames / g
	if f.n < g || groups == 0 {
		return 0, false
	}
	if f.gcur >= groups {
		f.gcur = 0
	}
	for k := range groups {
		gi := f.gcur + k
		if gi >= groups {
			gi -= groups
		}
		if f.groupFree(gi, g) {
			f.clearGroup(gi, g)
			f.gcur = gi + 1
			return uint32(gi * g), true
		}
	}
	return 0, false
}

// groupFree reports whether every frame of group gi (of g frames) is free.
func (f *freeSet) groupFree(gi, g int) bool {
	start := gi * g
	if g < 64 {
		mask := uint64(1)<<g - 1
		return f.words[start/64]>>(start%64)&mask == mask
	}
	for w := start / 64; w < (start+g)/64; w++ {
		if f.words[w] != ^uint64(0) {
			return false
		}
	}
	return true
}

func (f *freeSet) clearGroup(gi, g int) {
	start := gi * g
	if g < 64 {
		f.words[start/64] &^= (uint64(1)<<g - 1) << (start % 64)
	} else {
		clear(f.words[start/64 : (start+g)/64])
	}
	f.n -= g
}

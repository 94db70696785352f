package reserve

import (
	"fmt"
	"math/bits"

	"github.com/tidwall/btree"
)

// sizeBuckets is how many of the shortest lengths have a tree of their own
// in the by-size index.
//
// One tree per length, keyed by start, answers the same questions as one
// tree keyed by (Len, Start), with shorter descents: on a fragmented
// device most free extents are short, and a tree holding only one length's
// share of them is one or two nodes deep with short binary searches in
// each. The cost of a descent is mostly its mispredicted comparisons,
// about log2 of the entries: a delete and an insert took 315 ns in one
// tree of 100,000 extents and 234 ns in 64 trees of 1,500 (tidwall/btree,
// degree 256, on the shared 2-core machine). 256 lengths cover every
// extent up to 1 MiB of 4 KiB blocks, the fragments allocation leaves
// behind; longer ones are fewer and stay in the packed tree.
const sizeBuckets = 256

// sizeIndex indexes free extents shorter than longLen by (Len, Start), for
// best fit. Lengths below bucketLen have a tree each (see sizeBuckets);
// lengths from bucketLen up to longLen share one tree of packed keys
// (sizeKey). The caller holds the Space's lock.
type sizeIndex struct {
	// longLen is where Space's by-size index switches to byLong:
	// shortLen, or less in tests so that byLong is exercised on small
	// spaces.
	bucketLen, longLen int64
	buckets            []lenBucket // buckets[l-1] holds the extents of length l
	nonEmpty           []uint64    // bit l-1 is set when buckets[l-1] holds any
	inBuckets          int

	packed   *btree.Map[uint64, struct{}]
	packedIt btree.MapIter[uint64, struct{}]
}

// lenBucket holds the starts of the free extents of one length. Its tree is
// made at its first extent; the iterator is kept so that its path stack is
// not allocated again on every lookup.
type lenBucket struct {
	m  *btree.Map[int64, struct{}]
	it btree.MapIter[int64, struct{}]
}

// init sets up an empty index. 1 <= bucketLen <= longLen <= shortLen.
func (x *sizeIndex) init(bucketLen, longLen int64) {
	if bucketLen < 1 || bucketLen > longLen || longLen > shortLen {
		panic(fmt.Sprintf("reserve: size index thresholds %d, %d outside 1 <= bucket <= long <= %d", bucketLen, longLen, shortLen))
	}
	x.bucketLen, x.longLen = bucketLen, longLen
	x.buckets = make([]lenBucket, bucketLen-1)
	x.nonEmpty = make([]uint64, (bucketLen-1+63)/64)
	x.packed = btree.NewMap[uint64, struct{}](btreeDegree)
	x.packedIt = x.packed.Iter()
}

// add inserts e (1 <= e.Len < longLen) and reports whether it was there
// already.
func (x *sizeIndex) add(e Extent) (dup bool) {
	if e.Len >= x.bucketLen {
		_, dup = x.packed.Set(sizeKey(e), struct{}{})
		return dup
	}
	b := &x.buckets[e.Len-1]
	if b.m == nil {
		b.m = btree.NewMap[int64, struct{}](btreeDegree)
		b.it = b.m.Iter()
	}
	if _, dup = b.m.Set(e.Start, struct{}{}); !dup {
		x.nonEmpty[(e.Len-1)/64] |= 1 << ((e.Len - 1) % 64)
		x.inBuckets++
	}
	return dup
}

// delete removes e and reports whether it was there.
func (x *sizeIndex) delete(e Extent) bool {
	if e.Len >= x.bucketLen {
		_, ok := x.packed.Delete(sizeKey(e))
		return ok
	}
	b := &x.buckets[e.Len-1]
	if b.m == nil {
		return false
	}
	if _, ok := b.m.Delete(e.Start); !ok {
		return false
	}
	x.inBuckets--
	if b.m.Len() == 0 {
		x.nonEmpty[(e.Len-1)/64] &^= 1 << ((e.Len - 1) % 64)
	}
	return true
}

// has reports whether e is in the index.
func (x *sizeIndex) has(e Extent) bool {
	if e.Len < 1 || e.Len >= x.longLen {
		return false
	}
	if e.Len >= x.bucketLen {
		_, ok := x.packed.Get(sizeKey(e))
		return ok
	}
	b := &x.buckets[e.Len-1]
	if b.m == nil {
		return false
	}
	_, ok := b.m.Get(e.Start)
	return ok
}

// len returns the number of extents in the index.
func (x *sizeIndex) len() int { return x.inBuckets + x.packed.Len() }

// nextBucket returns the shortest length of at least l that has a
// non-empty bucket, or 0 if none has.
func (x *sizeIndex) nextBucket(l int64) int64 {
	if l < 1 {
		l = 1
	}
	for i := (l - 1) / 64; i < int64(len(x.nonEmpty)); i++ {
		w := x.nonEmpty[i]
		if i == (l-1)/64 {
			w &^= 1<<((l-1)%64) - 1
		}
		if w != 0 {
			return i*64 + int64(bits.TrailingZeros64(w)) + 1
		}
	}
	return 0
}

// lastBucket returns the longest length that has a non-empty bucket, or 0
// if none has.
func (x *sizeIndex) lastBucket() int64 {
	for i := len(x.nonEmpty) - 1; i >= 0; i-- {
		if w := x.nonEmpty[i]; w != 0 {
			return int64(i)*64 + int64(63-bits.LeadingZeros64(w)) + 1
		}
	}
	return 0
}

// first returns the first extent in (Len, Start) order of length at least
// l.
func (x *sizeIndex) first(l int64) (Extent, bool) {
	if l >= x.longLen {
		return Extent{}, false
	}
	if l < x.bucketLen {
		if n := x.nextBucket(l); n != 0 {
			b := &x.buckets[n-1]
			b.it.First()
			return Extent{Start: b.it.Key(), Len: n}, true
		}
	}
	it := &x.packedIt
	if it.Seek(uint64(max(l, x.bucketLen)) << startBits) {
		return sizeExtent(it.Key()), true
	}
	return Extent{}, false
}

// max returns the last extent in (Len, Start) order.
func (x *sizeIndex) max() (Extent, bool) {
	if k, _, ok := x.packed.Max(); ok {
		return sizeExtent(k), true
	}
	n := x.lastBucket()
	if n == 0 {
		return Extent{}, false
	}
	b := &x.buckets[n-1]
	b.it.Last()
	return Extent{Start: b.it.Key(), Len: n}, true
}

// around returns, for l < longLen, the two extents on either side of
// (l, goal) in (Len, Start) order: lo, the last one of length exactly l
// starting at or before goal, and hi, the first one after (l, goal), of
// any length below longLen (the caller looks further).
func (x *sizeIndex) around(l, goal int64) (lo Extent, okLo bool, hi Extent, okHi bool) {
	if l < x.bucketLen {
		if b := &x.buckets[l-1]; b.m != nil && b.m.Len() > 0 {
			it := &b.it
			var more bool
			if it.Seek(goal + 1) {
				hi, okHi = Extent{Start: it.Key(), Len: l}, true
				more = it.Prev()
			} else {
				more = it.Last()
			}
			if more {
				lo, okLo = Extent{Start: it.Key(), Len: l}, true
			}
		}
		if !okHi {
			hi, okHi = x.first(l + 1)
		}
		return lo, okLo, hi, okHi
	}
	it := &x.packedIt
	var more bool
	// goal+1 reaches 2^48 only for goal == MaxTotal; the carry into the
	// length field makes the key (l+1, 0), still the right bound, unless
	// it overflows: then nothing short is above (l, goal).
	if l < shortLen-1 || goal+1 < 1<<startBits {
		if it.Seek(uint64(l)<<startBits + uint64(goal+1)) {
			hi, okHi = sizeExtent(it.Key()), true
			more = it.Prev()
		} else {
			more = it.Last()
		}
	} else {
		more = it.Last()
	}
	if more {
		lo = sizeExtent(it.Key())
		okLo = lo.Len == l
	}
	return lo, okLo, hi, okHi
}

// scan calls fn for every extent in (Len, Start) order until it returns
// false.
func (x *sizeIndex) scan(fn func(Extent) bool) {
	for i := range x.buckets {
		b := &x.buckets[i]
		if b.m == nil {
			continue
		}
		ok := true
		b.m.Scan(func(start int64, _ struct{}) bool {
			ok = fn(Extent{Start: start, Len: int64(i) + 1})
			return ok
		})
		if !ok {
			return
		}
	}
	x.packed.Scan(func(k uint64, _ struct{}) bool { return fn(sizeExtent(k)) })
}

// check verifies the index's own bookkeeping: every extent is in the tree
// its length says, and the bitmap and count match the buckets.
func (x *sizeIndex) check() error {
	n := 0
	for i := range x.buckets {
		b := &x.buckets[i]
		l := 0
		if b.m != nil {
			l = b.m.Len()
		}
		n += l
		if set := x.nonEmpty[i/64]&(1<<(i%64)) != 0; set != (l > 0) {
			return fmt.Errorf("reserve: by-size bucket of length %d holds %d extents, but its bit says non-empty=%v", i+1, l, set)
		}
	}
	if n != x.inBuckets {
		return fmt.Errorf("reserve: by-size buckets hold %d extents, counter says %d", n, x.inBuckets)
	}
	var err error
	x.packed.Scan(func(k uint64, _ struct{}) bool {
		if e := sizeExtent(k); e.Len < x.bucketLen || e.Len >= x.longLen {
			err = fmt.Errorf("reserve: free extent %v in the packed by-size index, which holds lengths [%d, %d)", e, x.bucketLen, x.longLen)
			return false
		}
		return true
	})
	return err
}

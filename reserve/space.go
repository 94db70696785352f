package reserve

import (
	"cmp"
	"fmt"
	"slices"
	"sync"

	"github.com/tidwall/btree"
)

// btreeDegree is the B-tree degree for every index here: nodes hold up to
// 2*degree-1 items (16 bytes each by block, 8 by size). With 100k free
// extents, degree 256 keeps the big indexes two levels deep (root and about
// 300 leaves), and each level a descent saves is a node header, a children
// slice and a child pointer less to chase, on top of the binary search.
// Measured side by side in BenchmarkAllocFree100kFreeExtents (medians of 4,
// ns/op, Alloc/Free): 64: 1043/1378, 128: 1016/1253, 256: 851/1128;
// 256: 896/1154, 512: 1064/1218, 1024: 1079/1351 (larger nodes move more
// bytes on every insert and delete). 32 and 16 were slower than 64.
const btreeDegree = 256

// The indexes are github.com/tidwall/btree Maps with integer keys, which
// compare with < inside the library's binary search. github.com/google/btree
// (used before) calls the less function through a closure inside
// sort.Search, two indirect calls per comparison: on 100k free extents its
// searches were over half of the allocator's time, and with the same number
// of descents the integer keys took Alloc from 1.3-1.4 to about 1.0 us.
//
// The by-size index (sizeIndex) has a tree of starts for each length up to
// sizeBuckets; longer free extents below shortLen share a tree that packs
// (Len, Start) into one uint64, Len in the top 16 bits and Start in the low
// 48 (block numbers are below MaxTotal = 2^48). Free extents of shortLen
// blocks or more, rare on a fragmented device and few on any device, are in
// a third tree ordered by (Len, Start) with a comparison function; every
// long extent sorts after every short one.
const (
	startBits = 48
	startMask = 1<<startBits - 1
	shortLen  = 1 << (64 - startBits)
)

// busyTag marks a busy extent's entry in the by-block index (its value is
// Start|busyTag; starts are below 2^48).
const busyTag = 1 << 62

// sizeKey is the by-size key of a free extent shorter than shortLen.
func sizeKey(e Extent) uint64 { return uint64(e.Len)<<startBits | uint64(e.Start) }

func sizeExtent(k uint64) Extent {
	return Extent{Start: int64(k & startMask), Len: int64(k >> startBits)}
}

// busyExtent is a freed extent that must not be reused until the metadata
// that frees it (journal sequence seq) is durable.
type busyExtent struct {
	Extent
	seq uint64
	// nearFree: a free or busy extent touched it when it was freed.
	nearFree bool
}

func lessSize(a, b Extent) bool {
	return a.Len < b.Len || a.Len == b.Len && a.Start < b.Start
}

// Space is the allocator plus its Accountant. Every block of [0, Total) is in
// exactly one state:
//
//   - allocated: mapped by metadata (or handed out by Alloc/ClaimHeld);
//   - allocatable: in the free trees, what Alloc and HoldAt take from;
//   - busy: freed by Free but not reusable until Commit of its sequence;
//   - held: in an allocation window (HoldAt), reserved for one object's next
//     allocations, in memory only.
//
// The accounting sees busy and held blocks as free: they are not allocated in
// metadata, so a reservation may count on them. Physical free space
// (allocatable+busy+held) therefore equals Free+Reserved of the Accountant,
// and Allocated equals the allocated blocks.
//
// Space is safe for concurrent use. The trees are under one mutex;
// Reserve, Unreserve and Counts never take it.
type Space struct {
	acct Accountant

	mu        sync.Mutex
	total     int64
	maxExtent int64

	// Allocatable free extents, indexed twice like XFS's bnobt and cntbt:
	// byEnd by block number, for neighbours (coalescing, goal lookups,
	// overlap checks), and bySize+byLong by (Len, Start) for best fit. The
	// two hold exactly the same extents, which are fully coalesced (no two
	// touch).
	//
	// byEnd maps each free extent's End to its Start. For disjoint extents
	// the order by End is the order by Start, but an extent that loses
	// blocks at its start (the usual allocation) or grows at its start
	// (coalescing with a freed extent on its left) keeps its key and is
	// updated in place with one descent instead of a delete and an insert.
	// Each B-tree operation costs 100-200 ns on 100k extents (cache misses
	// and mispredicted branches of the binary searches; a warm lookup is
	// about 30 ns), so their number is the cost of Alloc and Free: with
	// random goals, Alloc does about 4.4 (goal lookup, then best-fit
	// lookup and two deletes, or a three-way split), and Free plus its
	// share of Commit about 5.
	byEnd      *btree.Map[int64, int64]
	bySize     sizeIndex             // extents < longLen
	byLong     *btree.BTreeG[Extent] // extents >= longLen, lessSize
	freeBlocks int64

	// Iterators kept between calls so that their path stacks are not
	// allocated again on every lookup. Only used under mu; every use
	// starts with a Seek.
	endIt btree.MapIter[int64, int64]

	// Busy extents are in byEnd too, tagged with busyTag: the overlap
	// check of Free is then one lookup for free and busy blocks both, the
	// busy extent's entry is already in place when Commit makes it free,
	// and Commit finds its neighbours with the same descent.
	// busyQueue[busyHead:] holds them ordered by sequence so that Commit
	// pops the ones that became reusable from the front. Frees arrive in
	// sequence order as the journal is written, so adding one is nearly
	// always an append; an out-of-order sequence is inserted in place.
	busyQueue  []busyExtent
	sortKeys   []uint64 // Commit's scratch space
	busyHead   int
	busyBlocks int64

	// Commit has to coalesce a busy extent only if it touches a free
	// extent, or a busy one (which may be free by then, or later). Whether
	// it does is known when it is freed (busyExtent.nearFree, from the
	// overlap check's lookup), and only an operation that creates free or
	// busy space next to it can change that (carving free extents never
	// brings one closer): Free, and the coalescing of insertFree and
	// Commit, record its start here. A busy extent in neither touches
	// nothing that is not allocated: it becomes a free extent with one
	// in-place update, without looking for its neighbours. On 100k free
	// extents most freed extents are isolated (71% in the benchmark), and
	// this saves a descent for each.
	lateNear map[int64]struct{}
	//
	// Tried against this layout and not kept (same-session medians, ns/op,
	// on the shared 2-core machine; Free includes its Commit):
	//   - busy extents in a separate small tidwall Map (degree 32 or 256,
	//     with a sentinel so it never empties) instead of in byEnd: Free
	//     1429-1446 -> 1604-1783, AppendFree 663 -> 850-915. Its descents
	//     cost about as much as byEnd's (the time is in the binary
	//     search's mispredicted branches, about log2 of the count, more
	//     than in cache misses), and byEnd then takes an insert at Commit.
	//   - the busy state in a Go map of ends instead of the tag bit (no
	//     byEnd update for an isolated release): AppendFree 558 -> 499,
	//     but Free 1159 -> 1214 and Alloc 928 -> 991 cpu-ns (the map
	//     lookups for touching neighbours cost more than the saved
	//     descent).
	//   - Commit merging a busy extent with free extents on both sides
	//     from a hint recorded at Free (the right neighbour's end, proved
	//     by the value Set replaces), saving the neighbour descent: Free
	//     1168 -> 1114, 1153 -> 1252, 1162 -> 1164 in three rounds, no gain
	//     beyond noise (commit 01b37aa, reverted).
	//   - 8-byte by-block entries: a Map key packing end and length changes
	//     whenever an extent loses blocks at its start, so the in-place
	//     updates of carving and untagging would become a delete and an
	//     insert each.

	// Held windows, Start to Len, coalesced like the free extents.
	held       *btree.Map[int64, int64]
	heldBlocks int64

	// committed is the highest sequence passed to Commit (valid once
	// anyCommit): a Free at or below it is durable already and skips the
	// busy state.
	committed uint64
	anyCommit bool
}

// Allocator is the name the issue tracker uses for Space.
type Allocator = Space

// Stats is a snapshot of a Space.
type Stats struct {
	Total int64
	// Free, Reserved and Allocated are the Accountant's counts. Free
	// includes busy and held blocks.
	Free, Reserved, Allocated int64
	// Busy blocks await Commit; Held blocks are in allocation windows.
	Busy, Held int64
	// Allocatable is the sum of the free extents Alloc can use now.
	Allocatable int64
	// FreeExtents counts the allocatable free extents; LargestFree is the
	// longest of them (0 if none).
	FreeExtents int
	LargestFree int64
}

// NewSpace returns a Space of total blocks in which the used extents are
// allocated and everything else is allocatable. Used extents may come in any
// order and may touch; zero-length ones are ignored. One that is out of
// range or overlaps another is an ErrInvalid error naming both.
func NewSpace(total int64, used []Extent) (*Space, error) {
	return newSpaceTiers(total, used, sizeBuckets+1, shortLen)
}

// newSpaceTiers is NewSpace with the lengths at which free extents leave
// the per-length trees of the by-size index (bucketLen) and go into byLong
// instead of the packed tree (longLen); 1 <= bucketLen <= longLen <=
// shortLen. Tests lower them so that small spaces use every tree.
func newSpaceTiers(total int64, used []Extent, bucketLen, longLen int64) (*Space, error) {
	if bucketLen < 1 || bucketLen > longLen || longLen > shortLen {
		panic(fmt.Sprintf("reserve: size thresholds %d, %d outside 1 <= bucket <= long <= %d", bucketLen, longLen, shortLen))
	}
	if total < 0 || total > MaxTotal {
		return nil, fmt.Errorf("%w: total %d blocks outside [0, %d]", ErrInvalid, total, int64(MaxTotal))
	}
	sorted := make([]Extent, 0, len(used))
	for _, e := range used {
		if err := e.checkIn("used extent", total); err != nil {
			return nil, err
		}
		if e.Len > 0 {
			sorted = append(sorted, e)
		}
	}
	slices.SortFunc(sorted, func(a, b Extent) int { return cmp.Compare(a.Start, b.Start) })
	for i := 1; i < len(sorted); i++ {
		// Until the first overlap the ends increase, so comparing with the
		// previous extent finds it.
		if sorted[i].Start < sorted[i-1].End() {
			return nil, fmt.Errorf("%w: used extent %v overlaps used extent %v", ErrInvalid, sorted[i], sorted[i-1])
		}
	}
	s := &Space{
		total:     total,
		maxExtent: DefaultMaxExtent,
		byEnd:     btree.NewMap[int64, int64](btreeDegree),
		byLong:    btree.NewBTreeGOptions(lessSize, btree.Options{Degree: btreeDegree, NoLocks: true}),
		held:      btree.NewMap[int64, int64](btreeDegree),
	}
	s.endIt = s.byEnd.Iter()
	s.bySize.init(bucketLen, longLen)
	var pos, usedBlocks int64
	for _, e := range sorted {
		if e.Start > pos {
			s.addFree(Extent{Start: pos, Len: e.Start - pos})
		}
		pos = e.End()
		usedBlocks += e.Len
	}
	if pos < total {
		s.addFree(Extent{Start: pos, Len: total - pos})
	}
	s.acct.init(total, total-usedBlocks)
	return s, nil
}

// NewAllocator is NewSpace under the name the issue tracker uses.
func NewAllocator(total int64, used []Extent) (*Space, error) { return NewSpace(total, used) }

// Total returns the number of blocks the Space covers.
func (s *Space) Total() int64 { return s.total }

// MaxExtent returns the longest extent Alloc hands out.
func (s *Space) MaxExtent() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxExtent
}

// SetMaxExtent sets the longest extent Alloc hands out (default
// DefaultMaxExtent); n must be at least 1.
func (s *Space) SetMaxExtent(n int64) error {
	if n < 1 {
		return fmt.Errorf("%w: max extent %d blocks: must be at least 1", ErrInvalid, n)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.maxExtent = n
	return nil
}

// Reserve reserves n blocks of spendable space; see Accountant.Reserve. It
// takes no lock.
func (s *Space) Reserve(n int64) error { return s.acct.Reserve(n) }

// Unreserve gives back n reserved blocks; see Accountant.Unreserve. It takes
// no lock.
func (s *Space) Unreserve(n int64) error { return s.acct.Unreserve(n) }

// Consume turns n reserved blocks into allocated ones, like
// Accountant.Consume, and takes them out of the free space so that the
// trees and the counts stay in step: it is Alloc(n, 0) for a caller that
// counts space and does not need to know where the blocks are (they come
// back only through Free of extents the caller learns otherwise). The
// engine allocates with Alloc, which consumes its reservation itself.
// More than is reserved is ErrInvalid and changes nothing.
func (s *Space) Consume(n int64) error {
	if n <= 0 {
		return checkCount("consume", n)
	}
	_, err := s.Alloc(n, 0)
	return err
}

// Counts returns the accounting counts without taking the lock.
func (s *Space) Counts() Counts { return s.acct.Snapshot() }

// Alloc allocates want blocks and consumes want reserved blocks, which the
// caller must hold (want > reserved is ErrInvalid). It returns the extents in
// allocation order, each at most MaxExtent long, adding up to want.
//
// Extents are chosen one after the other; with rem blocks still to allocate:
//
//  1. If the free extent containing goal has room for rem blocks starting at
//     goal, the allocation is [goal, goal+rem): an object's next extent lands
//     right after its previous one.
//  2. Otherwise, if some free extent has at least rem blocks: best fit, the
//     shortest such extent; among extents of that length, the one where rem
//     blocks, placed as close to goal as the extent allows, land nearest
//     goal (the lower start on a tie).
//  3. Otherwise no single extent is large enough, and the largest pieces
//     are taken first, which gives the fewest extents: n = min(longest free
//     extent, MaxExtent) blocks, from the free extent starting exactly at
//     goal if it has n (so the pieces stay in order on the device), else
//     from the start of the longest free extent (nearest goal by start on a
//     tie).
//
// In cases 1 and 2 an allocation longer than MaxExtent comes back as
// consecutive extents of MaxExtent and a remainder. After each extent the
// goal moves to its end. A negative goal means no preference (lowest block
// first). Only allocatable blocks are used, never busy or held ones. If the
// reservation is there but too few blocks are allocatable, Alloc returns an
// error wrapping both ErrNoSpace and ErrBusy: commit the journal or give
// back windows and retry. On any error nothing changed. Alloc(0, goal)
// returns no extents and no error.
func (s *Space) Alloc(want, goal int64) ([]Extent, error) {
	if want <= 0 {
		return nil, checkCount("alloc", want)
	}
	goal = max(-1, min(goal, s.total))
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.freeBlocks < want {
		if c := s.acct.Snapshot(); c.Reserved < want {
			return nil, fmt.Errorf("%w: alloc %d blocks: only %d reserved", ErrInvalid, want, c.Reserved)
		}
		if s.freeBlocks+s.busyBlocks+s.heldBlocks < want {
			// Physical free space is Free+Reserved >= Reserved >= want.
			panic(fmt.Sprintf("reserve: alloc %d blocks: %d reserved but only %d allocatable+%d busy+%d held: accounting out of step with the trees",
				want, s.acct.Snapshot().Reserved, s.freeBlocks, s.busyBlocks, s.heldBlocks))
		}
		return nil, fmt.Errorf("%w: alloc %d blocks: %d allocatable, %d busy until commit, %d held in windows: %w",
			ErrNoSpace, want, s.freeBlocks, s.busyBlocks, s.heldBlocks, ErrBusy)
	}
	if err := s.acct.Consume(want); err != nil {
		return nil, fmt.Errorf("alloc %d blocks: %w", want, err)
	}
	out := make([]Extent, 0, 1+(want-1)/s.maxExtent)
	for rem := want; rem > 0; {
		piece, from := s.pick(rem, goal)
		s.carve(from, piece)
		out = append(out, piece)
		rem -= piece.Len
		goal = piece.End()
	}
	return out, nil
}

// pick chooses the next extent when rem blocks remain, per Alloc's rules,
// and the free extent it comes from. The caller ensured at least rem blocks
// are allocatable.
func (s *Space) pick(rem, goal int64) (piece, from Extent) {
	n := min(rem, s.maxExtent)
	var gf Extent // the free extent containing goal, if any
	hasGF := false
	if goal >= 0 {
		gf, hasGF = s.containing(goal)
		if hasGF && gf.End()-goal >= rem {
			return Extent{Start: goal, Len: n}, gf
		}
	}
	if f, ok := s.bestFit(rem, goal); ok {
		return Extent{Start: placement(f, rem, goal), Len: n}, f
	}
	m, ok := s.maxFree()
	if !ok {
		panic("reserve: pick: no free extent although free blocks are counted")
	}
	// The largest piece anything offers is n = min(longest, MaxExtent).
	// A run starting at goal that offers n continues the previous extent;
	// taking n from a run's start costs no more extents than taking it from
	// the longest run.
	n = min(m.Len, s.maxExtent)
	if hasGF && gf.Start == goal && gf.Len >= n {
		return Extent{Start: goal, Len: n}, gf
	}
	f := s.nearest(m.Len, m.Len, goal)
	return Extent{Start: f.Start, Len: n}, f
}

// containing returns the free extent that contains block x: the first
// extent in byEnd ending after x, if it starts at or before x and is not
// busy.
func (s *Space) containing(x int64) (Extent, bool) {
	it := &s.endIt
	if !it.Seek(x + 1) {
		return Extent{}, false
	}
	f, busy := endEntry(it)
	return f, !busy && f.Start <= x
}

// endEntry returns the extent at it in byEnd and whether it is busy.
func endEntry(it *btree.MapIter[int64, int64]) (e Extent, busy bool) {
	v := it.Value()
	start := v &^ busyTag
	return Extent{Start: start, Len: it.Key() - start}, v&busyTag != 0
}

// maxFree returns the free extent that is last in (Len, Start) order.
func (s *Space) maxFree() (Extent, bool) {
	if m, ok := s.byLong.Max(); ok {
		return m, true
	}
	return s.bySize.max()
}

// around returns the two free extents on either side of (l, goal) in
// (Len, Start) order: lo, the last one of length exactly l starting at or
// before goal, and hi, the first one after (l, goal), of any length. For
// short lengths one descent of the length's tree (or of the packed tree)
// finds both.
func (s *Space) around(l, goal int64) (lo Extent, okLo bool, hi Extent, okHi bool) {
	if l >= s.bySize.longLen {
		s.byLong.Descend(Extent{Start: goal, Len: l}, func(x Extent) bool {
			lo, okLo = x, x.Len == l
			return false
		})
		s.byLong.Ascend(Extent{Start: goal + 1, Len: l}, func(x Extent) bool {
			hi, okHi = x, true
			return false
		})
		return lo, okLo, hi, okHi
	}
	lo, okLo, hi, okHi = s.bySize.around(l, goal)
	if !okHi {
		hi, okHi = s.byLong.Min()
	}
	return lo, okLo, hi, okHi
}

// bestFit returns the shortest free extent of at least rem blocks, nearest
// goal among those of its length (see nearest), or false if none is long
// enough. Usually extents of exactly rem blocks exist and one lookup
// settles it: the last one of length rem starting at or before goal and the
// first one starting after goal are neighbours in the by-size index.
func (s *Space) bestFit(rem, goal int64) (Extent, bool) {
	lo, okLo, hi, okHi := s.around(rem, goal)
	if !okLo && (!okHi || hi.Len != rem) {
		// No extent of exactly rem blocks, so hi (if any) is the extent of
		// the next length up with the lowest start.
		if !okHi {
			return Extent{}, false
		}
		if hi.Start > goal {
			return hi, true
		}
		return s.nearest(hi.Len, rem, goal), true
	}
	okHi = okHi && hi.Len == rem
	if okLo && (!okHi || distance(lo, rem, goal) <= distance(hi, rem, goal)) {
		return lo, true
	}
	return hi, true
}

// nearest returns, among the free extents of length l, the one where n
// blocks placed as close to goal as it allows land closest to goal, the
// lower start on a tie. Distance falls as start rises towards goal and grows
// after it, so the only candidates are the last extent starting at or before
// goal and the first starting after it.
func (s *Space) nearest(l, n, goal int64) Extent {
	lo, okLo, hi, okHi := s.around(l, goal)
	okHi = okHi && hi.Len == l
	switch {
	case okLo && okHi:
		if distance(hi, n, goal) < distance(lo, n, goal) {
			return hi
		}
		return lo
	case okLo:
		return lo
	case okHi:
		return hi
	}
	panic(fmt.Sprintf("reserve: nearest: no free extent of length %d", l))
}

// placement is where n blocks go inside f: as close to goal as f allows.
func placement(f Extent, n, goal int64) int64 {
	return max(f.Start, min(goal, f.End()-n))
}

func distance(f Extent, n, goal int64) int64 {
	d := placement(f, n, goal) - goal
	if d < 0 {
		return -d
	}
	return d
}

// Free returns an allocated extent. Its blocks count as free at once, but
// they stay busy, out of Alloc's reach, until Commit(seq') with seq' >= seq
// says the metadata freeing them is durable: reusing them earlier could let
// a crash leave an old mapping pointing at new data. If a Commit covering
// seq already happened, the blocks are allocatable at once. An extent out of
// range or overlapping free, busy or held blocks (a double free) is
// ErrInvalid naming it, and nothing changes. A zero-length extent is a
// no-op.
func (s *Space) Free(e Extent, seq uint64) error {
	if err := e.checkIn("free", s.total); err != nil {
		return err
	}
	if e.Len == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	nearFree, err := s.checkAllocated("free", e)
	if err != nil {
		return err
	}
	if err := s.acct.Release(e.Len); err != nil {
		return fmt.Errorf("free %v: %w", e, err)
	}
	if s.anyCommit && seq <= s.committed {
		s.insertFree(e)
		return nil
	}
	if _, dup := s.byEnd.Set(e.End(), e.Start|busyTag); dup {
		panic(fmt.Sprintf("reserve: free %v: end already indexed by block", e))
	}
	s.enqueueBusy(busyExtent{Extent: e, seq: seq, nearFree: nearFree})
	s.busyBlocks += e.Len
	return nil
}

// enqueueBusy adds b to the sequence-ordered busy queue, after every extent
// of the same or a lower sequence.
func (s *Space) enqueueBusy(b busyExtent) {
	q := s.busyQueue
	if n := len(q); n == s.busyHead || q[n-1].seq <= b.seq {
		s.busyQueue = append(q, b)
		return
	}
	i, _ := slices.BinarySearchFunc(q[s.busyHead:], b.seq, func(x busyExtent, seq uint64) int {
		if x.seq <= seq {
			return -1
		}
		return 1
	})
	s.busyQueue = slices.Insert(q, s.busyHead+i, b)
}

// checkAllocated returns an error naming e and the first overlapping extent
// if any block of e is allocatable, busy or held. The extents of each index
// are disjoint and sorted, so one lookup per index finds the only candidate.
// Otherwise it reports whether a free or busy extent touches e, and marks
// the busy ones that do (see lateNear).
func (s *Space) checkAllocated(op string, e Extent) (near bool, err error) {
	var left, right Extent
	var nearLeft, nearRight, busyLeft, busyRight bool
	// The first free or busy extent ending after e.Start overlaps e if any
	// does; if not, it is the right neighbour candidate and the one before
	// it the left.
	it := &s.endIt
	ok := it.Seek(e.Start + 1)
	if ok {
		f, busy := endEntry(it)
		if f.Start < e.End() {
			if busy {
				return false, fmt.Errorf("%w: %s %v: overlaps extent %v already freed at sequence %d (double free?)", ErrInvalid, op, e, f, s.busySeq(f))
			}
			return false, fmt.Errorf("%w: %s %v: overlaps free extent %v (double free?)", ErrInvalid, op, e, f)
		}
		nearRight, busyRight = f.Start == e.End(), busy
		right = f
		ok = it.Prev()
	} else {
		ok = it.Last()
	}
	if ok {
		f, busy := endEntry(it)
		nearLeft, busyLeft, left = f.End() == e.Start, busy, f
	}
	if start, n, ok := floor(s.held, e.End()-1); ok && start+n > e.Start {
		return false, fmt.Errorf("%w: %s %v: overlaps held window %v", ErrInvalid, op, e, Extent{start, n})
	}
	// A busy neighbour now touches e, which will be busy and later free.
	if nearRight && busyRight {
		s.markNear(right)
	}
	if nearLeft && busyLeft {
		s.markNear(left)
	}
	return nearLeft || nearRight, nil
}

// Commit records that metadata up to sequence seq is durable: busy extents
// freed at sequences <= seq become allocatable, coalesced with their
// neighbours. Commits may arrive out of order; a lower seq than a previous
// one releases nothing new.
func (s *Space) Commit(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.anyCommit || seq > s.committed {
		s.committed, s.anyCommit = seq, true
	}
	// The busy extents this commit releases are the front of the queue.
	q := s.busyQueue[s.busyHead:]
	n := 0
	for n < len(q) && q[n].seq <= seq {
		n++
	}
	// Released in block order: consecutive releases then share B-tree
	// leaves and their path, so a large commit walks the indexes with warm
	// caches instead of jumping across them. The order does not change the
	// result: each release coalesces with whatever is free by then, and a
	// busy neighbour released later finds it (see lateNear). Measured in
	// four alternating rounds of BenchmarkAllocFree100kFreeExtents: Commit
	// 683-704 -> 647-674 ns per extent released, Free with its Commit
	// 1036-1083 -> 995-1042.
	// The order is sorted as packed keys, start and position (starts are
	// below 2^48), cheaper than moving the entries themselves.
	switch {
	case n > 1 && n <= 1<<(64-startBits):
		keys := s.sortKeys[:0]
		for i, b := range q[:n] {
			keys = append(keys, uint64(b.Start)<<(64-startBits)|uint64(i))
		}
		slices.Sort(keys)
		for _, k := range keys {
			s.release(q[k&(1<<(64-startBits)-1)])
		}
		s.sortKeys = keys[:0]
	default:
		slices.SortFunc(q[:n], func(a, b busyExtent) int { return cmp.Compare(a.Start, b.Start) })
		for _, b := range q[:n] {
			s.release(b)
		}
	}
	s.busyHead += n
	// Reuse the queue's space once the popped front dominates it.
	if s.busyHead == len(s.busyQueue) {
		s.busyQueue, s.busyHead = s.busyQueue[:0], 0
	} else if s.busyHead > 1024 && s.busyHead > len(s.busyQueue)/2 {
		m := copy(s.busyQueue, s.busyQueue[s.busyHead:])
		s.busyQueue, s.busyHead = s.busyQueue[:m], 0
	}
}

// HoldAt moves the allocatable blocks beginning exactly at start, up to
// maxLen of them and up to the end of their free extent, into a held window
// and returns it. The accounting does not change: held blocks still count as
// free and may back reservations. The window is in memory only; nothing is
// ever written about it. If block start is not allocatable (or maxLen <= 0,
// or start is out of range) the result has Len 0 and nothing changes.
// Adjacent windows merge.
func (s *Space) HoldAt(start, maxLen int64) Extent {
	none := Extent{Start: start}
	if maxLen <= 0 || start < 0 || start >= s.total {
		return none
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	f, ok := s.containing(start)
	if !ok {
		return none
	}
	h := Extent{Start: start, Len: min(f.End()-start, maxLen)}
	s.carve(f, h)
	s.insertHeld(h)
	return h
}

// ClaimHeld allocates e out of a held window: e must lie inside one held
// window, and e.Len reserved blocks are consumed (reserved -> allocated).
// The rest of the window stays held. A zero-length e is a no-op. On error
// nothing changes.
func (s *Space) ClaimHeld(e Extent) error {
	if err := e.checkIn("claim held", s.total); err != nil {
		return err
	}
	if e.Len == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	w, err := s.heldContaining("claim held", e)
	if err != nil {
		return err
	}
	if err := s.acct.Consume(e.Len); err != nil {
		return fmt.Errorf("claim held %v: %w", e, err)
	}
	s.cutHeld(w, e)
	return nil
}

// Unhold gives e, which must lie inside one held window, back to the
// allocatable free extents. It is allocatable at once, with no busy period:
// windows are never in metadata. A zero-length e is a no-op. On error
// nothing changes.
func (s *Space) Unhold(e Extent) error {
	if err := e.checkIn("unhold", s.total); err != nil {
		return err
	}
	if e.Len == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	w, err := s.heldContaining("unhold", e)
	if err != nil {
		return err
	}
	s.cutHeld(w, e)
	s.insertFree(e)
	return nil
}

func (s *Space) heldContaining(op string, e Extent) (Extent, error) {
	start, n, ok := floor(s.held, e.Start)
	w := Extent{Start: start, Len: n}
	if !ok || !w.contains(e) {
		if ok && w.overlaps(e) {
			return Extent{}, fmt.Errorf("%w: %s %v: not inside one held window (overlaps %v)", ErrInvalid, op, e, w)
		}
		return Extent{}, fmt.Errorf("%w: %s %v: not in a held window", ErrInvalid, op, e)
	}
	return w, nil
}

// cutHeld removes e from the held window w that contains it.
func (s *Space) cutHeld(w, e Extent) {
	if _, ok := s.held.Delete(w.Start); !ok {
		panic(fmt.Sprintf("reserve: held window %v missing", w))
	}
	if e.Start > w.Start {
		s.held.Set(w.Start, e.Start-w.Start)
	}
	if e.End() < w.End() {
		s.held.Set(e.End(), w.End()-e.End())
	}
	s.heldBlocks -= e.Len
}

// insertHeld adds e to the held windows, merging with touching ones.
func (s *Space) insertHeld(e Extent) {
	s.heldBlocks += e.Len
	if start, n, ok := floor(s.held, e.Start); ok {
		p := Extent{Start: start, Len: n}
		if p.End() > e.Start {
			panic(fmt.Sprintf("reserve: hold %v: overlaps held window %v", e, p))
		}
		if p.End() == e.Start {
			s.held.Delete(p.Start)
			e = Extent{Start: p.Start, Len: p.Len + e.Len}
		}
	}
	if start, n, ok := ceil(s.held, e.Start); ok {
		if start < e.End() {
			panic(fmt.Sprintf("reserve: hold %v: overlaps held window %v", e, Extent{start, n}))
		}
		if start == e.End() {
			s.held.Delete(start)
			e.Len += n
		}
	}
	s.held.Set(e.Start, e.Len)
}

// addFree inserts e into both free indexes without coalescing.
func (s *Space) addFree(e Extent) {
	if _, dup := s.byEnd.Set(e.End(), e.Start); dup {
		panic(fmt.Sprintf("reserve: free extent %v already indexed by block", e))
	}
	s.addSize(e)
	s.freeBlocks += e.Len
}

// addSize inserts e into the by-size index.
func (s *Space) addSize(e Extent) {
	var dup bool
	if e.Len < s.bySize.longLen {
		dup = s.bySize.add(e)
	} else {
		_, dup = s.byLong.Set(e)
	}
	if dup {
		panic(fmt.Sprintf("reserve: free extent %v already indexed by size", e))
	}
}

// deleteSize removes e from the by-size index.
func (s *Space) deleteSize(e Extent) {
	var ok bool
	if e.Len < s.bySize.longLen {
		ok = s.bySize.delete(e)
	} else {
		_, ok = s.byLong.Delete(e)
	}
	if !ok {
		panic(fmt.Sprintf("reserve: free extent %v missing from the by-size index", e))
	}
}

// hasSize reports whether e is in the by-size index.
func (s *Space) hasSize(e Extent) bool {
	if e.Len < s.bySize.longLen {
		return s.bySize.has(e)
	}
	_, ok := s.byLong.Get(e)
	return ok
}

// sizeLen is the number of extents in the by-size index.
func (s *Space) sizeLen() int { return s.bySize.len() + s.byLong.Len() }

// deleteFree removes e from both free indexes.
func (s *Space) deleteFree(e Extent) {
	if start, ok := s.byEnd.Delete(e.End()); !ok || start != e.Start {
		panic(fmt.Sprintf("reserve: free extent %v missing from the by-block index", e))
	}
	s.deleteSize(e)
	s.freeBlocks -= e.Len
}

// replaceFree puts free extent nu in the place of old. If both end at the
// same block the by-block index is updated in place.
func (s *Space) replaceFree(old, nu Extent) {
	if old.End() == nu.End() {
		if prev, ok := s.byEnd.Set(nu.End(), nu.Start); !ok || prev != old.Start {
			panic(fmt.Sprintf("reserve: replace free extent %v by %v: found start %d in the by-block index", old, nu, prev))
		}
	} else {
		if start, ok := s.byEnd.Delete(old.End()); !ok || start != old.Start {
			panic(fmt.Sprintf("reserve: free extent %v missing from the by-block index", old))
		}
		if _, dup := s.byEnd.Set(nu.End(), nu.Start); dup {
			panic(fmt.Sprintf("reserve: free extent %v already indexed by block", nu))
		}
	}
	s.deleteSize(old)
	s.addSize(nu)
	s.freeBlocks += nu.Len - old.Len
}

// busySeq returns the sequence at which busy extent b was freed (for error
// messages: it walks the queue).
func (s *Space) busySeq(b Extent) uint64 {
	for _, q := range s.busyQueue[s.busyHead:] {
		if q.Extent == b {
			return q.seq
		}
	}
	panic(fmt.Sprintf("reserve: busy extent %v missing from the sequence queue", b))
}

// neighbours returns the free extents that end exactly at e.Start (left)
// and start exactly at e.End() (right), if any, with one descent of byEnd:
// the first extent ending at or after e.Start, and the next one. If
// e is busy it is in byEnd, between the two. Busy neighbours do not
// count: they are not free yet.
func (s *Space) neighbours(e Extent, isBusy bool) (left Extent, hasLeft bool, right Extent, hasRight bool) {
	var busyLeft, busyRight Extent
	hasBusyLeft, hasBusyRight := false, false
	it := &s.endIt
	ok := it.Seek(e.Start)
	if ok && it.Key() == e.Start {
		x, busy := endEntry(it)
		left, hasLeft = x, !busy
		busyLeft, hasBusyLeft = x, busy
		ok = it.Next()
	}
	if isBusy {
		if x, busy := endEntry(it); !ok || !busy || x != e {
			panic(fmt.Sprintf("reserve: busy extent %v missing from the by-block index", e))
		}
		ok = it.Next()
	}
	if ok {
		x, busy := endEntry(it)
		if x.Start < e.End() {
			panic(fmt.Sprintf("reserve: insert free %v: overlaps extent %v", e, x))
		}
		right, hasRight = x, !busy && x.Start == e.End()
		busyRight, hasBusyRight = x, busy && x.Start == e.End()
	}
	// e is about to become free space: busy extents touching it must
	// coalesce when they are released (see lateNear).
	if hasBusyLeft {
		s.markNear(busyLeft)
	}
	if hasBusyRight {
		s.markNear(busyRight)
	}
	return left, hasLeft, right, hasRight
}

// markNear records that busy extent b touches free space.
func (s *Space) markNear(b Extent) {
	if s.lateNear == nil {
		s.lateNear = make(map[int64]struct{})
	}
	s.lateNear[b.Start] = struct{}{}
}

// release turns busy extent b into a free one, coalescing it with the free
// extents it touches. Its entry in byEnd is already there, tagged: it
// becomes the merged extent's entry where the end allows.
func (s *Space) release(b busyExtent) {
	s.busyBlocks -= b.Len
	e := b.Extent
	near := b.nearFree
	if len(s.lateNear) > 0 {
		if _, ok := s.lateNear[e.Start]; ok {
			near = true
			delete(s.lateNear, e.Start)
		}
	}
	if !near {
		// Nothing free touches e: it becomes a free extent as it is.
		if prev, ok := s.byEnd.Set(e.End(), e.Start); !ok || prev != e.Start|busyTag {
			panic(fmt.Sprintf("reserve: busy extent %v missing from the by-block index (found start %#x)", e, prev))
		}
		s.addSize(e)
		s.freeBlocks += e.Len
		return
	}
	left, hasLeft, right, hasRight := s.neighbours(e, true)
	if hasRight {
		if start, ok := s.byEnd.Delete(e.End()); !ok || start != e.Start|busyTag {
			panic(fmt.Sprintf("reserve: busy extent %v missing from the by-block index", e))
		}
		if hasLeft {
			s.deleteFree(left)
			e = Extent{Start: left.Start, Len: e.Len + left.Len}
		}
		s.replaceFree(right, Extent{Start: e.Start, Len: right.End() - e.Start})
		return
	}
	nu := e
	if hasLeft {
		if start, ok := s.byEnd.Delete(left.End()); !ok || start != left.Start {
			panic(fmt.Sprintf("reserve: free extent %v missing from the by-block index", left))
		}
		s.deleteSize(left)
		s.freeBlocks -= left.Len
		nu = Extent{Start: left.Start, Len: left.Len + e.Len}
	}
	if prev, ok := s.byEnd.Set(nu.End(), nu.Start); !ok || prev != e.Start|busyTag {
		panic(fmt.Sprintf("reserve: busy extent %v missing from the by-block index (found start %#x)", e, prev))
	}
	s.addSize(nu)
	s.freeBlocks += nu.Len
}

// insertFree adds e to the free extents, coalescing it with the free
// extents it touches so that no two free extents ever touch.
func (s *Space) insertFree(e Extent) {
	left, hasLeft, right, hasRight := s.neighbours(e, false)
	switch {
	case hasLeft && hasRight:
		s.deleteFree(left)
		s.replaceFree(right, Extent{Start: left.Start, Len: right.End() - left.Start})
	case hasLeft:
		s.replaceFree(left, Extent{Start: left.Start, Len: left.Len + e.Len})
	case hasRight:
		s.replaceFree(right, Extent{Start: e.Start, Len: right.End() - e.Start})
	default:
		s.addFree(e)
	}
}

// carve takes piece out of the free extent f that contains it; what is left
// of f on either side stays free (it cannot touch another free extent,
// because f did not). The part on the right keeps f's end, so the usual
// case, allocating from the start of f, is an in-place update.
func (s *Space) carve(f, piece Extent) {
	if !f.contains(piece) || piece.Len <= 0 {
		panic(fmt.Sprintf("reserve: carve %v out of free extent %v", piece, f))
	}
	left := Extent{Start: f.Start, Len: piece.Start - f.Start}
	right := Extent{Start: piece.End(), Len: f.End() - piece.End()}
	switch {
	case right.Len > 0:
		s.replaceFree(f, right)
		if left.Len > 0 {
			s.addFree(left)
		}
	case left.Len > 0:
		s.replaceFree(f, left)
	default:
		s.deleteFree(f)
	}
}

// Stats returns a consistent snapshot of the Space.
func (s *Space) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.acct.Snapshot()
	st := Stats{
		Total: c.Total, Free: c.Free, Reserved: c.Reserved, Allocated: c.Allocated,
		Busy: s.busyBlocks, Held: s.heldBlocks, Allocatable: s.freeBlocks,
		FreeExtents: s.byEnd.Len() - (len(s.busyQueue) - s.busyHead),
	}
	if m, ok := s.maxFree(); ok {
		st.LargestFree = m.Len
	}
	return st
}

// HeldBefore returns how many held blocks end exactly at block b: the
// allocation window, if any, that a free extent starting at b follows.
func (s *Space) HeldBefore(b int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if start, n, ok := floor(s.held, b-1); ok && start+n == b {
		return n
	}
	return 0
}

// LargestFree returns the longest allocatable free extent, the lowest one
// among equals, or a zero Extent if nothing is allocatable. It costs two
// index lookups, not a walk of the free extents.
func (s *Space) LargestFree() Extent {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.maxFree()
	if !ok {
		return Extent{}
	}
	_, _, f, _ := s.around(m.Len, -1)
	return f
}

// FreeExtents calls fn for each allocatable free extent in order of start
// until fn returns false. It holds the Space's lock: fn must not call back
// into s.
func (s *Space) FreeExtents(fn func(Extent) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byEnd.Scan(func(end, start int64) bool {
		return start&busyTag != 0 || fn(Extent{Start: start, Len: end - start})
	})
}

// Check verifies every invariant of the Space and returns the first broken
// one: the Accountant's sums; the two free indexes hold the same extents;
// free extents are in range, sorted, non-overlapping and fully coalesced;
// busy and held extents are in range and disjoint from each other and from
// the free ones; each counter equals the sum of its tree; and allocatable +
// busy + held equals the accounting's Free + Reserved. It walks every tree:
// use it in tests and fsck, not on a hot path.
func (s *Space) Check() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.acct.Check(); err != nil {
		return err
	}
	// Reserve and Unreserve run without the lock but keep Free+Reserved
	// constant, and everything that changes it holds the lock, so this
	// comparison is exact.
	c := s.acct.Snapshot()
	if phys := s.freeBlocks + s.busyBlocks + s.heldBlocks; phys != c.Free+c.Reserved {
		return fmt.Errorf("reserve: %d allocatable + %d busy + %d held = %d, but accounting has free %d + reserved %d = %d",
			s.freeBlocks, s.busyBlocks, s.heldBlocks, phys, c.Free, c.Reserved, c.Free+c.Reserved)
	}
	type tagged struct {
		Extent
		kind string
	}
	all := make([]tagged, 0, s.byEnd.Len()+s.held.Len())
	var err error
	fail := func(format string, args ...any) bool {
		err = fmt.Errorf("reserve: "+format, args...)
		return false
	}

	// byEnd holds the free and the busy extents. Overlaps between kinds are
	// left to the sorted walk at the end, which names both kinds.
	var sum, busySum int64
	nBusy := 0
	prev, prevFree := Extent{Start: -2}, false
	var touching [][2]Extent // {busy, free or busy} pairs that touch
	s.byEnd.Scan(func(end, v int64) bool {
		start := v &^ busyTag
		e := Extent{Start: start, Len: end - start}
		busy := v&busyTag != 0
		kind := "free"
		if busy {
			kind = "busy"
		}
		switch {
		case v&^(busyTag|startMask) != 0:
			return fail("by-block entry %d -> %#x: stray bits", end, v)
		case e.Len <= 0 || e.Start < 0 || e.End() > s.total:
			return fail("%s extent %v: empty or outside [0, %d)", kind, e, s.total)
		case !busy && prevFree && e.Start <= prev.End():
			return fail("free extents %v and %v overlap or touch (not coalesced)", prev, e)
		case !busy && !s.hasSize(e):
			return fail("free extent %v missing from the by-size index", e)
		}
		if busy {
			nBusy++
			busySum += e.Len
		} else {
			sum += e.Len
		}
		if prev.End() == e.Start && (busy || !prevFree) {
			if busy {
				touching = append(touching, [2]Extent{e, prev})
			}
			if !prevFree {
				touching = append(touching, [2]Extent{prev, e})
			}
		}
		prev, prevFree = e, !busy
		all = append(all, tagged{e, kind})
		return true
	})
	if err != nil {
		return err
	}
	queue := s.busyQueue[s.busyHead:]
	if nBusy != len(queue) {
		return fmt.Errorf("reserve: %d busy extents by block, %d in the sequence queue", nBusy, len(queue))
	}
	if nFree := s.byEnd.Len() - nBusy; nFree != s.sizeLen() {
		return fmt.Errorf("reserve: %d free extents by block, %d by size", nFree, s.sizeLen())
	}
	if sum != s.freeBlocks {
		return fmt.Errorf("reserve: free extents sum to %d blocks, counter says %d", sum, s.freeBlocks)
	}
	if busySum != s.busyBlocks {
		return fmt.Errorf("reserve: busy extents sum to %d blocks, counter says %d", busySum, s.busyBlocks)
	}
	inBlock := func(e Extent) bool {
		if start, ok := s.byEnd.Get(e.End()); !ok || start != e.Start {
			return fail("free extent %v missing from the by-block index", e)
		}
		return true
	}
	if err := s.bySize.check(); err != nil {
		return err
	}
	s.bySize.scan(func(e Extent) bool {
		if e.Len >= s.bySize.longLen {
			return fail("free extent %v in the index of short extents", e)
		}
		return inBlock(e)
	})
	if err != nil {
		return err
	}
	s.byLong.Scan(func(e Extent) bool {
		if e.Len < s.bySize.longLen {
			return fail("free extent %v in the index of long extents", e)
		}
		return inBlock(e)
	})
	if err != nil {
		return err
	}
	near := make(map[int64]bool, len(queue))
	for _, b := range queue {
		near[b.Start] = b.nearFree
	}
	for start := range s.lateNear {
		if _, ok := near[start]; !ok {
			return fmt.Errorf("reserve: block %d marked as a busy extent next to free space, but no busy extent starts there", start)
		}
		near[start] = true
	}
	for _, p := range touching {
		if !near[p[0].Start] {
			return fmt.Errorf("reserve: busy extent %v touches %v but is not marked to coalesce at commit", p[0], p[1])
		}
	}
	for i, b := range queue {
		if i > 0 && b.seq < queue[i-1].seq {
			return fmt.Errorf("reserve: busy queue out of order: %v (seq %d) after %v (seq %d)", b.Extent, b.seq, queue[i-1].Extent, queue[i-1].seq)
		}
		if v, ok := s.byEnd.Get(b.End()); !ok || v != b.Start|busyTag {
			return fmt.Errorf("reserve: busy extent %v (seq %d) in the queue but not by block", b.Extent, b.seq)
		}
		if s.anyCommit && b.seq <= s.committed {
			return fmt.Errorf("reserve: busy extent %v: sequence %d already committed (%d)", b.Extent, b.seq, s.committed)
		}
	}

	sum = 0
	prev = Extent{Start: -2}
	s.held.Scan(func(start, n int64) bool {
		e := Extent{Start: start, Len: n}
		switch {
		case e.Len <= 0 || e.Start < 0 || e.End() > s.total:
			return fail("held window %v: empty or outside [0, %d)", e, s.total)
		case e.Start <= prev.End():
			return fail("held windows %v and %v overlap or touch (not merged)", prev, e)
		}
		prev, sum = e, sum+e.Len
		all = append(all, tagged{e, "held"})
		return true
	})
	if err != nil {
		return err
	}
	if sum != s.heldBlocks {
		return fmt.Errorf("reserve: held windows sum to %d blocks, counter says %d", sum, s.heldBlocks)
	}

	slices.SortFunc(all, func(a, b tagged) int { return cmp.Compare(a.Start, b.Start) })
	for i := 1; i < len(all); i++ {
		// Sorted by start: the first overlap is between neighbours.
		if all[i].Start < all[i-1].End() {
			return fmt.Errorf("reserve: %s extent %v overlaps %s extent %v", all[i-1].kind, all[i-1].Extent, all[i].kind, all[i].Extent)
		}
	}
	return nil
}

// floor returns the greatest key <= key and its value.
func floor[V any](m *btree.Map[int64, V], key int64) (k int64, v V, ok bool) {
	m.Descend(key, func(kk int64, vv V) bool {
		k, v, ok = kk, vv, true
		return false
	})
	return k, v, ok
}

// ceil returns the least key >= key and its value.
func ceil[V any](m *btree.Map[int64, V], key int64) (k int64, v V, ok bool) {
	m.Ascend(key, func(kk int64, vv V) bool {
		k, v, ok = kk, vv, true
		return false
	})
	return k, v, ok
}

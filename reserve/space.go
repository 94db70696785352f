package reserve

import (
	"fmt"
	"slices"
	"sync"

	"github.com/rawblock/rawblock/reserve/internal/bptree"
)

// kind is the state of a run of blocks that is not allocated.
type kind uint8

const (
	kindFree kind = iota // allocatable
	kindBusy             // freed, waiting for Commit
	kindHeld             // in an allocation window
)

func (k kind) String() string {
	switch k {
	case kindFree:
		return "free"
	case kindBusy:
		return "busy"
	case kindHeld:
		return "held"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// posVal is what the by-block index keeps per extent (the key is its
// end): the start in the low 56 bits, the kind above. Block numbers stay
// below MaxTotal = 2^48, and 8 bytes instead of 16 keep more of the index
// in cache.
type posVal uint64

func mkPos(start int64, k kind) posVal { return posVal(uint64(start)&posStartMask | uint64(k)<<56) }

const posStartMask = 1<<56 - 1

func (v posVal) start() int64 { return int64(uint64(v) & posStartMask) }

func (v posVal) kind() kind { return kind(v >> 56) }

type (
	posTree    = bptree.Tree[posVal]
	posCursor  = bptree.Cursor[posVal]
	sizeTree   = bptree.Tree[struct{}]
	sizeCursor = bptree.Cursor[struct{}]
)

// posKey is the by-block key of an extent ending at end.
func posKey(end int64) bptree.Key { return bptree.Key{A: uint64(end)} }

// sizeKey is the by-size key of a free extent: (Len, Start).
func sizeKey(e Extent) bptree.Key { return bptree.Key{A: uint64(e.Len), B: uint64(e.Start)} }

// extentAt returns the extent and kind the by-block cursor c points at.
func extentAt(c posCursor) (Extent, kind) {
	v := c.Value()
	return Extent{Start: v.start(), Len: int64(c.Key().A) - v.start()}, v.kind()
}

// sizeExtent returns the free extent the by-size cursor c points at.
func sizeExtent(c sizeCursor) Extent {
	k := c.Key()
	return Extent{Start: int64(k.B), Len: int64(k.A)}
}

// busyExtent is a freed extent that must not be reused until the metadata
// that frees it (journal sequence seq) is durable.
type busyExtent struct {
	Extent
	seq uint64
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

	// Free space is indexed twice, like XFS's bnobt and cntbt:
	//
	// byEnd holds every extent that is not allocated, by block number:
	// the allocatable free extents, the busy ones and the held windows,
	// each tagged with its kind. One lookup there answers what a block
	// is (a double free, a goal inside a free extent, a window to claim)
	// and finds the neighbours to coalesce with. Free extents are fully
	// coalesced (no two touch); held windows too; busy extents stay as
	// freed (each has its own sequence).
	//
	// bySize holds the free extents, and only them, by (Len, Start), for
	// best fit.
	//
	// byEnd is ordered by End rather than Start: for disjoint extents the
	// two orders are the same, but an extent that loses blocks at its
	// start (the usual allocation) or grows at its start (coalescing with
	// a freed extent on its left) keeps its key, and is updated in place.
	// The trees are bptree's: the cost of Alloc and Free on 100k free
	// extents is the number of descents they take, so every step below
	// that can work from a cursor it already has does.
	byEnd      posTree
	bySize     sizeTree
	freeBlocks int64
	busyBlocks int64
	heldBlocks int64
	busyCount  int // busy extents in byEnd

	// The busy extents again, in busyQueue[busyHead:] ordered by sequence,
	// so that Commit pops the ones that became reusable from the front.
	// Frees arrive in sequence order as the journal is written, so adding
	// one is nearly always an append; an out-of-order sequence is inserted
	// in place.
	busyQueue []busyExtent
	busyHead  int

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
	slices.SortFunc(sorted, func(a, b Extent) int {
		switch {
		case a.Start < b.Start:
			return -1
		case a.Start > b.Start:
			return 1
		}
		return 0
	})
	for i := 1; i < len(sorted); i++ {
		// Until the first overlap the ends increase, so comparing with the
		// previous extent finds it.
		if sorted[i].Start < sorted[i-1].End() {
			return nil, fmt.Errorf("%w: used extent %v overlaps used extent %v", ErrInvalid, sorted[i], sorted[i-1])
		}
	}
	s := &Space{total: total, maxExtent: DefaultMaxExtent}
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

// source is a free extent an allocation comes from, with the cursors that
// already point at it in either index (Valid or not), so that carving it
// out does not look it up again.
type source struct {
	f      Extent
	pos    posCursor
	bySize sizeCursor
}

// pick chooses the next extent when rem blocks remain, per Alloc's rules,
// and the free extent it comes from. The caller ensured at least rem blocks
// are allocatable.
func (s *Space) pick(rem, goal int64) (piece Extent, from source) {
	n := min(rem, s.maxExtent)
	var gf source // the free extent containing goal, if any
	hasGF := false
	if goal >= 0 {
		gf, hasGF = s.containing(goal)
		if hasGF && gf.f.End()-goal >= rem {
			return Extent{Start: goal, Len: n}, gf
		}
	}
	if f, ok := s.bestFit(rem, goal); ok {
		return Extent{Start: placement(f.f, rem, goal), Len: n}, f
	}
	m := s.bySize.Max()
	if !m.Valid() {
		panic("reserve: pick: no free extent although free blocks are counted")
	}
	// The largest piece anything offers is n = min(longest, MaxExtent).
	// A run starting at goal that offers n continues the previous extent;
	// taking n from a run's start costs no more extents than taking it from
	// the longest run.
	longest := int64(m.Key().A)
	n = min(longest, s.maxExtent)
	if hasGF && gf.f.Start == goal && gf.f.Len >= n {
		return Extent{Start: goal, Len: n}, gf
	}
	f := s.nearest(longest, longest, goal)
	return Extent{Start: f.f.Start, Len: n}, f
}

// containing returns the free extent that contains block x, with its
// by-block cursor.
func (s *Space) containing(x int64) (source, bool) {
	c := s.byEnd.Seek(posKey(x + 1))
	if !c.Valid() {
		return source{}, false
	}
	f, k := extentAt(c)
	return source{f: f, pos: c}, k == kindFree && f.Start <= x
}

// bestFit returns the shortest free extent of at least rem blocks, nearest
// goal among those of its length (see nearest), or false if none is long
// enough. Usually extents of exactly rem blocks exist and one lookup settles
// it: it lands on the first one starting after goal, and the one before it
// is the last one starting at or before goal.
func (s *Space) bestFit(rem, goal int64) (source, bool) {
	hi := s.bySize.Seek(sizeKey(Extent{Start: goal + 1, Len: rem}))
	lo := hi
	if hi.Valid() {
		lo.Prev()
	} else {
		lo = s.bySize.Max()
	}
	okLo := goal >= 0 && lo.Valid() && lo.Key().A == uint64(rem)
	okHi := hi.Valid()
	if !okLo && (!okHi || hi.Key().A != uint64(rem)) {
		// No extent of exactly rem blocks, so hi (if any) is the extent of
		// the next length up with the lowest start.
		if !okHi {
			return source{}, false
		}
		if f := sizeExtent(hi); f.Start > goal {
			return source{f: f, bySize: hi}, true
		}
		return s.nearest(int64(hi.Key().A), rem, goal), true
	}
	okHi = okHi && hi.Key().A == uint64(rem)
	if okLo && (!okHi || distance(sizeExtent(lo), rem, goal) <= distance(sizeExtent(hi), rem, goal)) {
		return source{f: sizeExtent(lo), bySize: lo}, true
	}
	return source{f: sizeExtent(hi), bySize: hi}, true
}

// nearest returns, among the free extents of length l, the one where n
// blocks placed as close to goal as it allows land closest to goal, the
// lower start on a tie. Distance falls as start rises towards goal and grows
// after it, so the only candidates are the last extent starting at or before
// goal and the first starting after it: neighbours in the by-size index.
func (s *Space) nearest(l, n, goal int64) source {
	hi := s.bySize.Seek(sizeKey(Extent{Start: goal + 1, Len: l}))
	lo := hi
	if hi.Valid() {
		lo.Prev()
	} else {
		lo = s.bySize.Max()
	}
	okLo := lo.Valid() && lo.Key().A == uint64(l)
	okHi := hi.Valid() && hi.Key().A == uint64(l)
	switch {
	case okLo && okHi:
		if distance(sizeExtent(hi), n, goal) < distance(sizeExtent(lo), n, goal) {
			return source{f: sizeExtent(hi), bySize: hi}
		}
		return source{f: sizeExtent(lo), bySize: lo}
	case okLo:
		return source{f: sizeExtent(lo), bySize: lo}
	case okHi:
		return source{f: sizeExtent(hi), bySize: hi}
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
	next, err := s.checkAllocated("free", e)
	if err != nil {
		return err
	}
	if err := s.acct.Release(e.Len); err != nil {
		return fmt.Errorf("free %v: %w", e, err)
	}
	if s.anyCommit && seq <= s.committed {
		s.mergeFree(e, next, false)
		return nil
	}
	s.byEnd.InsertNear(next, posKey(e.End()), mkPos(e.Start, kindBusy))
	s.busyCount++
	s.busyBlocks += e.Len
	s.enqueueBusy(busyExtent{Extent: e, seq: seq})
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

// checkAllocated returns an error naming e and an overlapping extent if any
// block of e is allocatable, busy or held. Otherwise it returns the by-block
// cursor at the first extent after e (invalid if none), which is where e
// goes if it becomes free or busy. The extents of byEnd are disjoint and
// sorted, so the first one ending after e.Start is the only candidate.
func (s *Space) checkAllocated(op string, e Extent) (posCursor, error) {
	c := s.byEnd.Seek(posKey(e.Start + 1))
	if !c.Valid() {
		return c, nil
	}
	x, k := extentAt(c)
	if x.Start >= e.End() {
		return c, nil
	}
	switch k {
	case kindFree:
		return c, fmt.Errorf("%w: %s %v: overlaps free extent %v (double free?)", ErrInvalid, op, e, x)
	case kindBusy:
		return c, fmt.Errorf("%w: %s %v: overlaps extent %v already freed at sequence %d (double free?)", ErrInvalid, op, e, x, s.busySeq(x))
	default:
		return c, fmt.Errorf("%w: %s %v: overlaps held window %v", ErrInvalid, op, e, x)
	}
}

// busySeq returns the sequence of busy extent b, for error messages: a walk
// of the queue.
func (s *Space) busySeq(b Extent) uint64 {
	for _, q := range s.busyQueue[s.busyHead:] {
		if q.Extent == b {
			return q.seq
		}
	}
	panic(fmt.Sprintf("reserve: busy extent %v missing from the sequence queue", b))
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
		b := q[n].Extent
		c := s.byEnd.Seek(posKey(b.End()))
		if !c.Valid() {
			panic(fmt.Sprintf("reserve: commit: busy extent %v (seq %d) missing from the by-block index", b, q[n].seq))
		}
		if x, k := extentAt(c); x != b || k != kindBusy {
			panic(fmt.Sprintf("reserve: commit: busy extent %v (seq %d): by-block index has %s extent %v", b, q[n].seq, k, x))
		}
		s.busyCount--
		s.busyBlocks -= b.Len
		s.mergeFree(b, c, true)
		n++
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
	h := Extent{Start: start, Len: min(f.f.End()-start, maxLen)}
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
	w, c, err := s.heldContaining("claim held", e)
	if err != nil {
		return err
	}
	if err := s.acct.Consume(e.Len); err != nil {
		return fmt.Errorf("claim held %v: %w", e, err)
	}
	s.cutHeld(w, c, e)
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
	w, c, err := s.heldContaining("unhold", e)
	if err != nil {
		return err
	}
	s.cutHeld(w, c, e)
	s.mergeFree(e, s.byEnd.Seek(posKey(e.End())), false)
	return nil
}

// heldContaining returns the held window that contains e and its cursor,
// or an error saying e is not inside one window.
func (s *Space) heldContaining(op string, e Extent) (Extent, posCursor, error) {
	// The first extent ending after e.Start is the only one that can
	// contain e; if it is not a held window starting at or before e.Start,
	// every held window either ends before e.Start or starts after it.
	c := s.byEnd.Seek(posKey(e.Start + 1))
	if c.Valid() {
		w, k := extentAt(c)
		if k == kindHeld && w.Start <= e.Start {
			if !w.contains(e) {
				return Extent{}, c, fmt.Errorf("%w: %s %v: not inside one held window (overlaps %v)", ErrInvalid, op, e, w)
			}
			return w, c, nil
		}
	}
	return Extent{}, c, fmt.Errorf("%w: %s %v: not in a held window", ErrInvalid, op, e)
}

// cutHeld removes e from the held window w at cursor c, which contains it.
func (s *Space) cutHeld(w Extent, c posCursor, e Extent) {
	left := Extent{Start: w.Start, Len: e.Start - w.Start}
	right := Extent{Start: e.End(), Len: w.End() - e.End()}
	switch {
	case right.Len > 0:
		c.SetValue(mkPos(right.Start, kindHeld))
		if left.Len > 0 {
			s.byEnd.InsertNear(c, posKey(left.End()), mkPos(left.Start, kindHeld))
		}
	case left.Len > 0:
		s.byEnd.ReplaceKey(c, posKey(left.End()))
	default:
		s.byEnd.DeleteAt(c)
	}
	s.heldBlocks -= e.Len
}

// insertHeld adds e to the held windows, merging with touching ones.
func (s *Space) insertHeld(e Extent) {
	s.heldBlocks += e.Len
	next := s.byEnd.Seek(posKey(e.End()))
	prev := next
	if next.Valid() {
		prev.Prev()
	} else {
		prev = s.byEnd.Max()
	}
	var left Extent
	hasLeft, hasRight := false, false
	if prev.Valid() {
		p, k := extentAt(prev)
		if p.End() > e.Start {
			panic(fmt.Sprintf("reserve: hold %v: overlaps %s extent %v", e, k, p))
		}
		left, hasLeft = p, k == kindHeld && p.End() == e.Start
	}
	if next.Valid() {
		n, k := extentAt(next)
		if n.Start < e.End() {
			panic(fmt.Sprintf("reserve: hold %v: overlaps %s extent %v", e, k, n))
		}
		hasRight = k == kindHeld && n.Start == e.End()
	}
	switch {
	case hasLeft && hasRight:
		next.SetValue(mkPos(left.Start, kindHeld))
		s.byEnd.DeleteAt(prev)
	case hasLeft:
		s.byEnd.ReplaceKey(prev, posKey(e.End()))
	case hasRight:
		next.SetValue(mkPos(e.Start, kindHeld))
	default:
		s.byEnd.InsertNear(next, posKey(e.End()), mkPos(e.Start, kindHeld))
	}
}

// addFree inserts e into both free indexes without coalescing.
func (s *Space) addFree(e Extent) {
	if !s.byEnd.Insert(posKey(e.End()), mkPos(e.Start, kindFree)) {
		panic(fmt.Sprintf("reserve: free extent %v: its end is already indexed by block", e))
	}
	s.sizeInsert(e)
	s.freeBlocks += e.Len
}

func (s *Space) sizeInsert(e Extent) {
	if !s.bySize.Insert(sizeKey(e), struct{}{}) {
		panic(fmt.Sprintf("reserve: free extent %v already indexed by size", e))
	}
}

func (s *Space) sizeDelete(e Extent) {
	if _, ok := s.bySize.Delete(sizeKey(e)); !ok {
		panic(fmt.Sprintf("reserve: free extent %v missing from the by-size index", e))
	}
}

// mergeFree makes e allocatable, coalescing it with the free extents it
// touches so that no two free extents ever touch. If present, e is already
// in the by-block index (busy or held) at cursor c; otherwise c is the
// cursor at the first extent after e (invalid if none).
func (s *Space) mergeFree(e Extent, c posCursor, present bool) {
	next, prev := c, c
	if present {
		next.Next()
		prev.Prev()
	} else if c.Valid() {
		prev.Prev()
	} else {
		prev = s.byEnd.Max()
	}
	var left, right Extent
	hasLeft, hasRight := false, false
	if prev.Valid() {
		p, k := extentAt(prev)
		if p.End() > e.Start {
			panic(fmt.Sprintf("reserve: free %v: overlaps %s extent %v", e, k, p))
		}
		left, hasLeft = p, k == kindFree && p.End() == e.Start
	}
	if next.Valid() {
		n, k := extentAt(next)
		if n.Start < e.End() {
			panic(fmt.Sprintf("reserve: free %v: overlaps %s extent %v", e, k, n))
		}
		right, hasRight = n, k == kindFree && n.Start == e.End()
	}
	merged := e
	switch {
	case hasLeft && hasRight:
		merged = Extent{Start: left.Start, Len: right.End() - left.Start}
		s.sizeDelete(left)
		s.sizeDelete(right)
		next.SetValue(mkPos(left.Start, kindFree))
		if present {
			s.byEnd.DeleteRun(prev, 2)
		} else {
			s.byEnd.DeleteAt(prev)
		}
	case hasLeft:
		merged = Extent{Start: left.Start, Len: e.End() - left.Start}
		s.sizeDelete(left)
		if present {
			c.SetValue(mkPos(left.Start, kindFree))
			s.byEnd.DeleteAt(prev)
		} else {
			s.byEnd.ReplaceKey(prev, posKey(e.End()))
		}
	case hasRight:
		merged = Extent{Start: e.Start, Len: right.End() - e.Start}
		s.sizeDelete(right)
		next.SetValue(mkPos(e.Start, kindFree))
		if present {
			s.byEnd.DeleteAt(c)
		}
	default:
		if present {
			c.SetValue(mkPos(e.Start, kindFree))
		} else {
			s.byEnd.InsertNear(c, posKey(e.End()), mkPos(e.Start, kindFree))
		}
	}
	s.sizeInsert(merged)
	s.freeBlocks += e.Len
}

// carve takes piece out of the free extent from.f that contains it; what
// is left of it on either side stays free (it cannot touch another free
// extent, because from.f did not). The part on the right keeps the end, so
// the usual case, allocating from the start, is an in-place update.
func (s *Space) carve(from source, piece Extent) {
	f := from.f
	if !f.contains(piece) || piece.Len <= 0 {
		panic(fmt.Sprintf("reserve: carve %v out of free extent %v", piece, f))
	}
	c := from.pos
	if !c.Valid() {
		c = s.byEnd.Seek(posKey(f.End()))
	}
	if !c.Valid() {
		panic(fmt.Sprintf("reserve: carve: free extent %v missing from the by-block index", f))
	}
	if x, k := extentAt(c); x != f || k != kindFree {
		panic(fmt.Sprintf("reserve: carve: free extent %v: by-block index has %s extent %v", f, k, x))
	}
	if from.bySize.Valid() {
		s.bySize.DeleteAt(from.bySize)
	} else {
		s.sizeDelete(f)
	}
	left := Extent{Start: f.Start, Len: piece.Start - f.Start}
	right := Extent{Start: piece.End(), Len: f.End() - piece.End()}
	switch {
	case right.Len > 0:
		c.SetValue(mkPos(right.Start, kindFree))
		s.sizeInsert(right)
		if left.Len > 0 {
			s.byEnd.InsertNear(c, posKey(left.End()), mkPos(left.Start, kindFree))
			s.sizeInsert(left)
		}
	case left.Len > 0:
		s.byEnd.ReplaceKey(c, posKey(left.End()))
		s.sizeInsert(left)
	default:
		s.byEnd.DeleteAt(c)
	}
	s.freeBlocks -= piece.Len
}

// Stats returns a consistent snapshot of the Space.
func (s *Space) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.acct.Snapshot()
	st := Stats{
		Total: c.Total, Free: c.Free, Reserved: c.Reserved, Allocated: c.Allocated,
		Busy: s.busyBlocks, Held: s.heldBlocks, Allocatable: s.freeBlocks,
		FreeExtents: s.bySize.Len(),
	}
	if m := s.bySize.Max(); m.Valid() {
		st.LargestFree = int64(m.Key().A)
	}
	return st
}

// LargestFree returns the longest allocatable free extent, the lowest one
// among equals, or a zero Extent if nothing is allocatable. It costs two
// index lookups, not a walk of the free extents.
func (s *Space) LargestFree() Extent {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.bySize.Max()
	if !m.Valid() {
		return Extent{}
	}
	return sizeExtent(s.bySize.Seek(bptree.Key{A: m.Key().A}))
}

// FreeExtents calls fn for each allocatable free extent in order of start
// until fn returns false. It holds the Space's lock: fn must not call back
// into s.
func (s *Space) FreeExtents(fn func(Extent) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byEnd.Ascend(func(k bptree.Key, v posVal) bool {
		if v.kind() != kindFree {
			return true
		}
		return fn(Extent{Start: v.start(), Len: int64(k.A) - v.start()})
	})
}

// Check verifies every invariant of the Space and returns the first broken
// one: the Accountant's sums; the structure of both index trees; the two
// indexes hold the same free extents; free, busy and held extents are in
// range, sorted and disjoint; free extents are fully coalesced and held
// windows merged; the busy queue is in sequence order and holds exactly the
// busy extents, none of them committed; each counter equals the sum of its
// extents; and allocatable + busy + held equals the accounting's Free +
// Reserved. It walks every tree: use it in tests and fsck, not on a hot
// path.
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
	if err := s.byEnd.Check(); err != nil {
		return fmt.Errorf("reserve: by-block index: %w", err)
	}
	if err := s.bySize.Check(); err != nil {
		return fmt.Errorf("reserve: by-size index: %w", err)
	}

	var err error
	fail := func(format string, args ...any) bool {
		err = fmt.Errorf("reserve: "+format, args...)
		return false
	}
	var sums [3]int64
	var counts [3]int
	prev, prevKind, hasPrev := Extent{}, kindFree, false
	s.byEnd.Ascend(func(key bptree.Key, v posVal) bool {
		e, k := Extent{Start: v.start(), Len: int64(key.A) - v.start()}, v.kind()
		switch {
		case k > kindHeld:
			return fail("extent %v of unknown %v", e, k)
		case e.Len <= 0 || e.Start < 0 || e.End() > s.total:
			return fail("%s extent %v: empty or outside [0, %d)", k, e, s.total)
		}
		if hasPrev {
			// Sorted by end: if any two overlap, some neighbours do.
			switch {
			case e.Start < prev.End():
				a, ak, b, bk := prev, prevKind, e, k
				if b.Start < a.Start {
					a, ak, b, bk = b, bk, a, ak
				}
				return fail("%s extent %v overlaps %s extent %v", ak, a, bk, b)
			case e.Start == prev.End() && k == kindFree && prevKind == kindFree:
				return fail("free extents %v and %v overlap or touch (not coalesced)", prev, e)
			case e.Start == prev.End() && k == kindHeld && prevKind == kindHeld:
				return fail("held windows %v and %v overlap or touch (not merged)", prev, e)
			}
		}
		if k == kindFree && !s.bySize.Has(sizeKey(e)) {
			return fail("free extent %v missing from the by-size index", e)
		}
		sums[k] += e.Len
		counts[k]++
		prev, prevKind, hasPrev = e, k, true
		return true
	})
	if err != nil {
		return err
	}
	for k, counter := range [3]int64{s.freeBlocks, s.busyBlocks, s.heldBlocks} {
		if sums[k] != counter {
			return fmt.Errorf("reserve: %s extents sum to %d blocks, counter says %d", kind(k), sums[k], counter)
		}
	}
	if counts[kindFree] != s.bySize.Len() {
		return fmt.Errorf("reserve: %d free extents by block, %d by size", counts[kindFree], s.bySize.Len())
	}
	s.bySize.Ascend(func(key bptree.Key, _ struct{}) bool {
		e := Extent{Start: int64(key.B), Len: int64(key.A)}
		if v, ok := s.byEnd.Get(posKey(e.End())); !ok || v != (mkPos(e.Start, kindFree)) {
			return fail("free extent %v missing from the by-block index", e)
		}
		return true
	})
	if err != nil {
		return err
	}

	queue := s.busyQueue[s.busyHead:]
	if counts[kindBusy] != s.busyCount || s.busyCount != len(queue) {
		return fmt.Errorf("reserve: %d busy extents by block (count says %d), %d in the sequence queue", counts[kindBusy], s.busyCount, len(queue))
	}
	for i, b := range queue {
		if i > 0 && b.seq < queue[i-1].seq {
			return fmt.Errorf("reserve: busy queue out of order: %v (seq %d) after %v (seq %d)", b.Extent, b.seq, queue[i-1].Extent, queue[i-1].seq)
		}
		if v, ok := s.byEnd.Get(posKey(b.End())); !ok || v != (mkPos(b.Start, kindBusy)) {
			return fmt.Errorf("reserve: busy extent %v (seq %d) in the queue but not in the by-block index", b.Extent, b.seq)
		}
		if s.anyCommit && b.seq <= s.committed {
			return fmt.Errorf("reserve: busy extent %v: sequence %d already committed (%d)", b.Extent, b.seq, s.committed)
		}
	}
	return nil
}

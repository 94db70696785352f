// Package extenttree is one object's map from logical blocks to device
// blocks, with delayed allocation.
//
// Every logical block of an object is in one of four states:
//
//	Hole       nothing: reads see zeros, a write needs space reserved first
//	Delalloc   dirty data in the page cache, space reserved, no device block yet
//	Unwritten  a device block is allocated but its data is not durable yet;
//	           reads see zeros, so a crash never exposes stale bytes
//	Written    the device block holds the data
//
// The write path marks the hole blocks it has copied Delalloc (MarkDelalloc,
// after CountHoles told it how much to reserve). Writeback turns each
// maximal Delalloc range into one allocation (SetUnwritten), writes the data,
// and once the journal record mapping it is durable marks it Written
// (SetWritten); if the data write fails the range goes back to Delalloc
// (RevertUnwritten) and its space is returned. Opening the device and
// journal replay insert Written mappings directly (MapWritten). Punch and
// Truncate turn ranges back into holes and say what space and reservation
// they released.
//
// Units are engine blocks. Logical blocks run from 0 to MaxBlock; a range
// reaching past MaxBlock is refused with ErrInvalid. Physical block numbers
// are absolute device block numbers and obey the same limit.
//
// The tree stores only non-hole extents, maximally merged: neighbours with
// the same state whose device blocks are contiguous (or which are both
// Delalloc) are always one entry, so memory is O(entries), never O(blocks),
// and a long sequential append stays a single entry.
//
// # Concurrency
//
// A Tree is not safe for concurrent use, and that includes the read-only
// methods (Lookup, CountHoles, DelallocRanges, Count, All, Last, Check):
// they share the tree's internal scratch space so that none of them
// allocates. The caller serializes every call — in rawblock, the engine's
// per-object lock, held exclusively (a shared read lock is not enough).
package extenttree

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/google/btree"
)

// BlockLimit is one past the largest valid block number, logical or
// physical: 2^52 blocks. It is far above any real device (2^52 blocks of
// 512 bytes are 2 PiB) and low enough that block arithmetic on int64 never
// overflows. The engine's maximum object size is the tighter limit in
// practice (2^52 blocks of 4 KiB would not fit an int64 byte offset), and the
// engine checks it before calling in here.
const BlockLimit int64 = 1 << 52

// MaxBlock is the largest valid block number.
const MaxBlock int64 = BlockLimit - 1

// State is what a logical block holds.
type State uint8

// The states of a logical block. The zero value is Hole.
const (
	// Hole: not mapped and not dirty; reads see zeros.
	Hole State = iota
	// Delalloc: dirty data in the cache with space reserved, no device block.
	Delalloc
	// Unwritten: a device block is allocated but its data is not yet durable;
	// reads see zeros.
	Unwritten
	// Written: the device block holds the data.
	Written
	numStates
)

// String returns the lower-case name of the state.
func (s State) String() string {
	switch s {
	case Hole:
		return "hole"
	case Delalloc:
		return "delalloc"
	case Unwritten:
		return "unwritten"
	case Written:
		return "written"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// mapped reports whether blocks in state s have a device block.
func (s State) mapped() bool { return s == Unwritten || s == Written }

// Segment is a run of logical blocks [Start, Start+Len) in one state. For
// Unwritten and Written, logical block Start+i is device block Phys+i; for
// Hole and Delalloc, Phys is -1.
type Segment struct {
	Start, Len int64
	State      State
	Phys       int64
}

// End returns one past the segment's last logical block.
func (s Segment) End() int64 { return s.Start + s.Len }

// Range is a run of logical blocks [Start, Start+Len).
type Range struct {
	Start, Len int64
}

// End returns one past the range's last block.
func (r Range) End() int64 { return r.Start + r.Len }

// PhysExtent is a run of device blocks [Start, Start+Len) released by the
// tree (Punch, Truncate, RevertUnwritten).
type PhysExtent struct {
	Start, Len int64
}

// End returns one past the extent's last block.
func (p PhysExtent) End() int64 { return p.Start + p.Len }

var (
	// ErrInvalid is returned for a bad range: negative start or length,
	// or one reaching past MaxBlock (logical or physical). It wraps
	// fs.ErrInvalid.
	ErrInvalid = fmt.Errorf("invalid block range (%w)", fs.ErrInvalid)
	// ErrState is returned when an operation needs its whole range in one
	// state and part of it is not; the message names the range and what was
	// found there. The tree is unchanged.
	ErrState = errors.New("range not in the required state")
)

// entry is one maximal non-hole extent. The B-tree orders entries by their
// end (start+len): then one ascending search from "end >= s" yields the
// left neighbour that touches s, the entries intersecting a range and the
// right neighbour, with no second search for a predecessor. Entries never
// overlap, so this is also the order of their starts. state, phys and start
// (keeping the end) may change in place; the end may change in place only
// when no other entry ends between its old and new value, so that the
// order, and with it the B-tree's shape, stays valid.
type entry struct {
	start, len int64
	phys       int64 // -1 for Delalloc
	state      State
}

func (e *entry) end() int64 { return e.start + e.len }

// physAt is the device block of logical block b (inside e), or -1.
func (e *entry) physAt(b int64) int64 {
	if e.phys < 0 {
		return -1
	}
	return e.phys + (b - e.start)
}

func (e *entry) segment() Segment {
	return Segment{Start: e.start, Len: e.len, State: e.state, Phys: e.phys}
}

// clip returns the part of e inside [s, end).
func (e *entry) clip(s, end int64) Segment {
	cs, ce := max(e.start, s), min(e.end(), end)
	return Segment{Start: cs, Len: ce - cs, State: e.state, Phys: e.physAt(cs)}
}

// stateStats is what Count reports for one state, kept up to date on every
// change so that Count is O(1) for the non-hole states.
type stateStats struct {
	entries int
	blocks  int64
}

// btreeDegree: nodes of up to 63 pointers keep the tree three levels deep
// for a quarter of a million entries while a node still fits a few cache
// lines.
const btreeDegree = 32

// maxFreeEntries bounds the recycled-entry list so that a tree which shrank
// does not keep its peak memory.
const maxFreeEntries = 64

// maxScratch: scratch slices grown past this by one huge operation are
// dropped afterwards instead of being kept for the life of the tree.
const maxScratch = 1024

// Tree is one object's extent map. The zero value is not usable; call New.
// See the package documentation for the concurrency rules.
type Tree struct {
	bt    *btree.BTreeG[*entry]
	last  *entry // entry with the greatest start (and end), nil if empty: the append fast path
	gen   uint64
	stats [numStates]stateStats

	free []*entry // recycled entries, so steady-state splits do not allocate

	// Scratch space and pre-built iterator closures: B-tree iteration takes
	// a closure, and building one per call would allocate.
	pivot   entry     // search key
	scratch []*entry  // result of collect
	stopAt  int64     // collect stops after the first entry starting at or past it
	pieces  []Segment // SetWritten: the pieces to convert, copied out of scratch
	collFn  func(*entry) bool
}

// New returns an empty tree: every block a hole.
func New() *Tree {
	t := &Tree{
		bt: btree.NewG[*entry](btreeDegree, func(a, b *entry) bool { return a.end() < b.end() }),
	}
	t.collFn = func(e *entry) bool {
		t.scratch = append(t.scratch, e)
		return e.start < t.stopAt
	}
	return t
}

// ---- validation ----

// checkRange validates [start, start+n) against the block limits.
func checkRange(op string, start, n int64) error {
	switch {
	case start < 0:
		return fmt.Errorf("extenttree: %s: negative start block %d: %w", op, start, ErrInvalid)
	case n < 0:
		return fmt.Errorf("extenttree: %s: negative length %d at block %d: %w", op, n, start, ErrInvalid)
	case start > BlockLimit || n > BlockLimit-start:
		return fmt.Errorf("extenttree: %s: range [%d, +%d) reaches past the last block %d: %w",
			op, start, n, MaxBlock, ErrInvalid)
	}
	return nil
}

// checkPhys validates the device range [phys, phys+n).
func checkPhys(op string, phys, n int64) error {
	if phys < 0 || phys > BlockLimit-n {
		return fmt.Errorf("extenttree: %s: physical range [%d, +%d) outside [0, %d]: %w",
			op, phys, n, MaxBlock, ErrInvalid)
	}
	return nil
}

// mustRange is for the methods without an error result: an invalid range
// there is a bug in the caller, which validates offsets first.
func mustRange(op string, start, n int64) {
	if err := checkRange(op, start, n); err != nil {
		panic(err)
	}
}

// ---- low-level entry management (keeps stats, last and the free list right) ----

func (t *Tree) newEntry(start, n int64, st State, phys int64) *entry {
	var e *entry
	if k := len(t.free); k > 0 {
		e = t.free[k-1]
		t.free[k-1] = nil
		t.free = t.free[:k-1]
	} else {
		e = new(entry)
	}
	*e = entry{start: start, len: n, phys: phys, state: st}
	return e
}

func (t *Tree) insert(e *entry) {
	if e.len <= 0 || e.state == Hole || e.state >= numStates || e.state.mapped() != (e.phys >= 0) {
		panic(fmt.Sprintf("extenttree: inserting a malformed entry %+v", *e))
	}
	if old, replaced := t.bt.ReplaceOrInsert(e); replaced {
		panic(fmt.Sprintf("extenttree: two entries start at block %d (%+v and %+v)", e.start, *old, *e))
	}
	t.stats[e.state].entries++
	t.stats[e.state].blocks += e.len
	if t.last == nil || e.start > t.last.start {
		t.last = e
	}
}

func (t *Tree) remove(e *entry) {
	if _, ok := t.bt.Delete(e); !ok {
		panic(fmt.Sprintf("extenttree: entry %+v to delete is not in the tree", *e))
	}
	t.stats[e.state].entries--
	t.stats[e.state].blocks -= e.len
	if t.last == e {
		t.last, _ = t.bt.Max()
	}
	*e = entry{}
	if len(t.free) < maxFreeEntries {
		t.free = append(t.free, e)
	}
}

// resize changes e's length in place.
func (t *Tree) resize(e *entry, n int64) {
	if n <= 0 {
		panic(fmt.Sprintf("extenttree: resizing entry %+v to %d blocks", *e, n))
	}
	t.stats[e.state].blocks += n - e.len
	e.len = n
}

// ---- searching ----

// collect returns, in order, every entry intersecting [s, e) together with
// its touching neighbours: the entry ending exactly at s, if any, comes
// first, and the first entry starting at or after e, if any, comes last
// (it may or may not touch e). The slice is scratch space, valid until the
// next collect.
func (t *Tree) collect(s, e int64) []*entry {
	if cap(t.scratch) > maxScratch {
		t.scratch = nil
	}
	t.scratch = t.scratch[:0]
	switch l := t.last; {
	case l == nil || l.end() < s:
		return t.scratch // nothing ends at or after s
	case l.start < s:
		// Every other entry ends at or before l.start < s: the common case
		// of writes at the end of an object needs no search.
		return append(t.scratch, l)
	}
	t.stopAt = e
	t.pivot.start, t.pivot.len = s, 0 // end() == s
	t.bt.AscendGreaterOrEqual(&t.pivot, t.collFn)
	return t.scratch
}

// firstNot returns the first segment (holes included) of [s, e) whose state
// is not want; ok is false when the whole range is in state want.
func (t *Tree) firstNot(s, e int64, want State) (Segment, bool) {
	pos := s
	for _, x := range t.collect(s, e) {
		if x.end() <= s {
			continue
		}
		if x.start >= e {
			break
		}
		if x.start > pos && want != Hole {
			return Segment{Start: pos, Len: x.start - pos, State: Hole, Phys: -1}, true
		}
		if x.state != want {
			return x.clip(s, e), true
		}
		pos = x.end()
	}
	if pos < e && want != Hole {
		return Segment{Start: pos, Len: e - pos, State: Hole, Phys: -1}, true
	}
	return Segment{}, false
}

func stateError(op string, s, e int64, want State, found Segment) error {
	return fmt.Errorf("extenttree: %s [%d, %d): needs all %s, found %s at [%d, %d): %w",
		op, s, e, want, found.State, found.Start, found.End(), ErrState)
}

// requireAll returns an ErrState error unless all of [s, e) is in state want.
func (t *Tree) requireAll(op string, s, e int64, want State) error {
	if seg, bad := t.firstNot(s, e, want); bad {
		return stateError(op, s, e, want, seg)
	}
	return nil
}

// ---- the two mutation primitives ----

// fillGap makes the hole [g0, g1) state st at device block phys (-1 for
// Delalloc), merging with left (the entry just before the gap, or nil) and
// right (the entry just after it, or nil) where they are compatible. It
// returns the entry that now covers the gap.
func (t *Tree) fillGap(g0, g1 int64, st State, phys int64, left, right *entry) *entry {
	n := g1 - g0
	joinL := left != nil && left.end() == g0 && left.state == st &&
		(st == Delalloc || left.phys+left.len == phys)
	joinR := right != nil && right.start == g1 && right.state == st &&
		(st == Delalloc || phys+n == right.phys)
	switch {
	case joinL && joinR:
		// right goes first: while both are in the tree, left may not take
		// right's end as its key. Then no entry ends in (g0, right's end],
		// so left can grow in place.
		rlen := right.len
		t.remove(right)
		t.resize(left, left.len+n+rlen)
		return left
	case joinL:
		// No entry ends inside the gap: left grows in place.
		t.resize(left, left.len+n)
		return left
	case joinR:
		// right's end (its key) stays; only its start moves down.
		t.resize(right, right.len+n)
		right.start = g0
		if st != Delalloc {
			right.phys = phys
		}
		return right
	}
	x := t.newEntry(g0, n, st, phys)
	t.insert(x)
	return x
}

// assign makes every block of [s, e) state st (Hole removes them), with
// logical block s at device block phys (-1 unless st is mapped), splitting
// the entries that straddle the ends and merging with the neighbours.
func (t *Tree) assign(s, e int64, st State, phys int64) {
	var left, right *entry
	for _, x := range t.collect(s, e) {
		switch {
		case x.end() <= s:
			left = x
		case x.start >= e:
			right = x
		case x.start < s && x.end() > e:
			// x covers the range with blocks to spare on both sides: keep
			// its head in place (no other entry ends inside x, so its key
			// may shrink to s) and insert its tail.
			tail := t.newEntry(e, x.end()-e, x.state, x.physAt(e))
			t.resize(x, s-x.start)
			t.insert(tail)
			left, right = x, tail
		case x.start < s:
			t.resize(x, s-x.start) // nothing else ends inside x
			left = x
		case x.end() > e:
			// Keep x's tail: its end (the key) stays, its start moves up.
			t.resize(x, x.end()-e)
			x.phys = x.physAt(e)
			x.start = e
			right = x
		default:
			t.remove(x)
		}
	}
	if st != Hole {
		t.fillGap(s, e, st, phys, left, right)
	}
}

// appendFreed appends the device blocks of x inside [s, e) to dst, extending
// the last extent appended by this call (dst[from:]) when contiguous.
func appendFreed(dst []PhysExtent, from int, x *entry, s, e int64) []PhysExtent {
	c := x.clip(s, e)
	if k := len(dst); k > from && dst[k-1].End() == c.Phys {
		dst[k-1].Len += c.Len
		return dst
	}
	return append(dst, PhysExtent{Start: c.Phys, Len: c.Len})
}

// ---- API ----

// Lookup appends to dst the ordered segments exactly covering
// [start, start+n), holes included, and returns it. Segments are maximal
// (within the range): two consecutive segments never have the same state
// with contiguous device blocks. n == 0 appends nothing. An invalid range
// panics: the caller validates offsets before looking them up.
func (t *Tree) Lookup(dst []Segment, start, n int64) []Segment {
	mustRange("Lookup", start, n)
	if n == 0 {
		return dst
	}
	e := start + n
	pos := start
	for _, x := range t.collect(start, e) {
		if x.end() <= start {
			continue
		}
		if x.start >= e {
			break
		}
		if x.start > pos {
			dst = append(dst, Segment{Start: pos, Len: x.start - pos, State: Hole, Phys: -1})
		}
		c := x.clip(start, e)
		dst = append(dst, c)
		pos = c.End()
	}
	if pos < e {
		dst = append(dst, Segment{Start: pos, Len: e - pos, State: Hole, Phys: -1})
	}
	return dst
}

// LookupShared is Lookup for callers that only hold the object's lock
// shared: it touches none of the tree's scratch space, so any number of
// LookupShared calls may run together, as long as no method that changes
// the tree runs at the same time.
func (t *Tree) LookupShared(dst []Segment, start, n int64) []Segment {
	mustRange("LookupShared", start, n)
	if n == 0 {
		return dst
	}
	e := start + n
	pos := start
	visit := func(x *entry) bool {
		if x.end() <= start {
			return true
		}
		if x.start >= e {
			return false
		}
		if x.start > pos {
			dst = append(dst, Segment{Start: pos, Len: x.start - pos, State: Hole, Phys: -1})
		}
		c := x.clip(start, e)
		dst = append(dst, c)
		pos = c.End()
		return true
	}
	switch l := t.last; {
	case l == nil || l.end() <= start:
		// Past every extent: a hole.
	case l.start <= start:
		visit(l)
	default:
		pivot := entry{start: start} // end() == start: the first entry ending after start follows
		t.bt.AscendGreaterOrEqual(&pivot, visit)
	}
	if pos < e {
		dst = append(dst, Segment{Start: pos, Len: e - pos, State: Hole, Phys: -1})
	}
	return dst
}

// CountHoles returns how many blocks of [start, start+n) are holes: what a
// write of that range must reserve before it copies. An invalid range panics.
func (t *Tree) CountHoles(start, n int64) int64 {
	holes, _ := t.HoleRuns(start, n)
	return holes
}

// HoleRuns returns how many blocks of [start, start+n) are holes and in
// how many separate runs they lie: a write of the range makes at most that
// many new Delalloc entries. An invalid range panics.
func (t *Tree) HoleRuns(start, n int64) (blocks, runs int64) {
	mustRange("HoleRuns", start, n)
	if n == 0 {
		return 0, 0
	}
	e := start + n
	pos := start
	for _, x := range t.collect(start, e) {
		if x.end() <= start {
			continue
		}
		if x.start >= e {
			break
		}
		if x.start > pos {
			blocks += x.start - pos
			runs++
		}
		pos = x.end()
	}
	if pos < e {
		blocks += e - pos
		runs++
	}
	return blocks, runs
}

// MarkDelalloc marks every hole block of [start, start+n) Delalloc and
// returns how many there were: the reservation the write actually used.
// Blocks already Delalloc, Unwritten or Written are left as they are.
// Appending at or past the last entry takes a fast path that neither
// searches nor allocates when it extends a Delalloc tail.
func (t *Tree) MarkDelalloc(start, n int64) (holes int64, err error) {
	if err := checkRange("MarkDelalloc", start, n); err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, nil
	}
	e := start + n
	if l := t.last; l == nil || start >= l.start {
		// Fast path: nothing starts after start, so the range is at most
		// the tail of l followed by a hole to infinity.
		g0 := start
		if l != nil && start < l.end() {
			if e <= l.end() {
				return 0, nil
			}
			g0 = l.end()
		}
		if l != nil && l.state == Delalloc && l.end() == g0 {
			t.resize(l, e-l.start)
		} else {
			t.insert(t.newEntry(g0, e-g0, Delalloc, -1))
		}
		t.gen++
		return e - g0, nil
	}

	// General path: fill each gap of the range, left to right. prev is the
	// entry (possibly grown by a merge) just before pos.
	var prev *entry
	pos := start
	for _, x := range t.collect(start, e) {
		if x.end() <= start {
			prev = x // the left neighbour
			continue
		}
		if x.start > pos {
			gEnd := min(x.start, e)
			onlyNeighbour := x.start >= e // read before fillGap may merge x away
			holes += gEnd - pos
			f := t.fillGap(pos, gEnd, Delalloc, -1, prev, x)
			if onlyNeighbour {
				pos = e
				break
			}
			if f.end() > gEnd {
				x = f // the gap merged with x (x itself may be gone)
			}
		}
		prev, pos = x, x.end()
		if pos >= e {
			break
		}
	}
	if pos < e {
		holes += e - pos
		t.fillGap(pos, e, Delalloc, -1, prev, nil)
	}
	if holes > 0 {
		t.gen++
	}
	return holes, nil
}

// DelallocRanges appends to dst the maximal contiguous Delalloc ranges
// intersecting [start, start+n), in order and clipped to it, and returns
// it. n < 0 means up to the last block. An invalid range panics.
func (t *Tree) DelallocRanges(dst []Range, start, n int64) []Range {
	if n < 0 {
		mustRange("DelallocRanges", start, 0)
		n = BlockLimit - start
	}
	mustRange("DelallocRanges", start, n)
	if n == 0 {
		return dst
	}
	e := start + n
	for _, x := range t.collect(start, e) {
		if x.state == Delalloc && x.end() > start && x.start < e {
			c := x.clip(start, e)
			dst = append(dst, Range{Start: c.Start, Len: c.Len})
		}
	}
	return dst
}

// SetUnwritten records that the Delalloc range [start, start+n) has been
// allocated device blocks [phys, phys+n) whose data is not yet durable.
// The whole range must be Delalloc; otherwise it returns an ErrState error
// and changes nothing.
func (t *Tree) SetUnwritten(start, n, phys int64) error {
	if err := checkRange("SetUnwritten", start, n); err != nil {
		return err
	}
	if err := checkPhys("SetUnwritten", phys, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	e := start + n
	// Delalloc entries are maximal, so an all-Delalloc range lies in one.
	inOne := false
	for _, x := range t.collect(start, e) {
		if x.end() > start {
			inOne = x.state == Delalloc && x.start <= start && x.end() >= e
			break
		}
	}
	if !inOne {
		return t.requireAll("SetUnwritten", start, e, Delalloc)
	}
	t.assign(start, e, Unwritten, phys)
	t.gen++
	return nil
}

// SetWritten records that the data of the Unwritten range
// [start, start+n) is durable and mapped by durable metadata. The whole
// range must be Unwritten (it may span several allocations); otherwise it
// returns an ErrState error and changes nothing.
func (t *Tree) SetWritten(start, n int64) error {
	if err := checkRange("SetWritten", start, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	e := start + n
	if err := t.requireAll("SetWritten", start, e, Unwritten); err != nil {
		return err
	}
	// Copy the pieces out first: assign reuses the collect scratch.
	t.pieces = t.pieces[:0]
	for _, x := range t.collect(start, e) {
		if x.end() > start && x.start < e {
			t.pieces = append(t.pieces, x.clip(start, e))
		}
	}
	for _, p := range t.pieces {
		t.assign(p.Start, p.End(), Written, p.Phys)
	}
	if cap(t.pieces) > maxScratch {
		t.pieces = nil
	}
	t.gen++
	return nil
}

// RevertUnwritten turns the Unwritten range [start, start+n) back into
// Delalloc — its data write failed and the data is still dirty in the cache —
// and appends to dst the device extents released, in logical order, merging
// physically contiguous neighbours. The whole range must be Unwritten;
// otherwise it returns an ErrState error and changes nothing.
func (t *Tree) RevertUnwritten(dst []PhysExtent, start, n int64) ([]PhysExtent, error) {
	if err := checkRange("RevertUnwritten", start, n); err != nil {
		return dst, err
	}
	if n == 0 {
		return dst, nil
	}
	e := start + n
	if err := t.requireAll("RevertUnwritten", start, e, Unwritten); err != nil {
		return dst, err
	}
	from := len(dst)
	for _, x := range t.collect(start, e) {
		if x.end() > start && x.start < e {
			dst = appendFreed(dst, from, x, start, e)
		}
	}
	t.assign(start, e, Delalloc, -1)
	t.gen++
	return dst, nil
}

// MapWritten maps the hole [start, start+n) Written at device blocks
// [phys, phys+n): loading metadata at open, and journal replay. The whole
// range must be a hole; otherwise it returns an ErrState error and changes
// nothing.
func (t *Tree) MapWritten(start, n, phys int64) error {
	if err := checkRange("MapWritten", start, n); err != nil {
		return err
	}
	if err := checkPhys("MapWritten", phys, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	e := start + n
	var left, right *entry
	for _, x := range t.collect(start, e) {
		switch {
		case x.end() <= start:
			left = x
		case x.start >= e:
			right = x
		default:
			return stateError("MapWritten", start, e, Hole, x.clip(start, e))
		}
	}
	t.fillGap(start, e, Written, phys, left, right)
	t.gen++
	return nil
}

// Punch turns [start, start+n) into a hole. It appends to dst the device
// extents freed (the Unwritten and Written parts, in logical order, merging
// physically contiguous neighbours) and returns the number of Delalloc
// blocks dropped (reservation to give back). Entries straddling the ends
// are split.
func (t *Tree) Punch(dst []PhysExtent, start, n int64) (freed []PhysExtent, delallocDropped int64, err error) {
	if err := checkRange("Punch", start, n); err != nil {
		return dst, 0, err
	}
	if n == 0 {
		return dst, 0, nil
	}
	e := start + n
	from := len(dst)
	touched := false
	for _, x := range t.collect(start, e) {
		if x.end() <= start || x.start >= e {
			continue
		}
		touched = true
		if x.state == Delalloc {
			delallocDropped += min(x.end(), e) - max(x.start, start)
		} else {
			dst = appendFreed(dst, from, x, start, e)
		}
	}
	if !touched {
		return dst, 0, nil
	}
	if first, _ := t.bt.Min(); start <= first.start && e >= t.last.end() {
		// Everything goes (removing an object, truncating it to 0): drop
		// the whole B-tree at once instead of deleting entry by entry.
		t.bt.Clear(false)
		t.last, t.stats = nil, [numStates]stateStats{}
	} else {
		t.assign(start, e, Hole, -1)
	}
	t.gen++
	return dst, delallocDropped, nil
}

// Truncate drops every block at and beyond nblocks, with the same results
// as Punch from nblocks to the last block. nblocks may be 0..BlockLimit.
func (t *Tree) Truncate(dst []PhysExtent, nblocks int64) ([]PhysExtent, int64, error) {
	if nblocks < 0 || nblocks > BlockLimit {
		return dst, 0, fmt.Errorf("extenttree: Truncate to %d blocks: outside [0, %d]: %w",
			nblocks, BlockLimit, ErrInvalid)
	}
	if t.last == nil || t.last.end() <= nblocks {
		return dst, 0, nil
	}
	return t.Punch(dst, nblocks, BlockLimit-nblocks)
}

// Len returns the number of entries (maximal non-hole extents).
func (t *Tree) Len() int { return t.bt.Len() }

// Count returns how many entries are in state s and how many blocks they
// cover. For Hole it counts the holes before the end of the last entry (the
// gaps inside the mapped span; everything past it is a hole too); that case
// walks the tree, the others are O(1).
func (t *Tree) Count(s State) (entries int, blocks int64) {
	switch s {
	case Delalloc, Unwritten, Written:
		return t.stats[s].entries, t.stats[s].blocks
	case Hole:
		if t.last == nil {
			return 0, 0
		}
		var pos int64
		t.bt.Ascend(func(x *entry) bool {
			if x.start > pos {
				entries++
				blocks += x.start - pos
			}
			pos = x.end()
			return true
		})
		return entries, blocks
	}
	return 0, 0
}

// All calls fn for every entry (maximal non-hole extent) in logical order
// until fn returns false. fn must not modify the tree.
func (t *Tree) All(fn func(Segment) bool) {
	t.bt.Ascend(func(x *entry) bool { return fn(x.segment()) })
}

// Last returns the entry with the highest blocks; false if the tree is
// empty (all holes).
func (t *Tree) Last() (Segment, bool) {
	if t.last == nil {
		return Segment{}, false
	}
	return t.last.segment(), true
}

// Generation returns a number that changes whenever the map changes (and
// only then), so that writeback can tell whether a view it took before
// locking pages is still current.
func (t *Tree) Generation() uint64 { return t.gen }

// Check verifies the tree's invariants: entries sorted, non-overlapping,
// within the block limits, maximally merged, in a valid non-hole state,
// with Phys set exactly for Unwritten and Written; per-state counts and the
// cached last entry agree with the entries. It returns the first violation.
func (t *Tree) Check() error {
	var (
		err   error
		prev  *entry
		stats [numStates]stateStats
		n     int
	)
	t.bt.Ascend(func(x *entry) bool {
		n++
		switch {
		case x.state == Hole || x.state >= numStates:
			err = fmt.Errorf("entry %+v has invalid state %v", *x, x.state)
		case x.len <= 0:
			err = fmt.Errorf("entry %+v has non-positive length", *x)
		case x.start < 0 || x.start > BlockLimit-x.len:
			err = fmt.Errorf("entry %+v lies outside [0, %d]", *x, MaxBlock)
		case x.state == Delalloc && x.phys != -1:
			err = fmt.Errorf("delalloc entry %+v has a physical block", *x)
		case x.state.mapped() && (x.phys < 0 || x.phys > BlockLimit-x.len):
			err = fmt.Errorf("%v entry %+v has physical blocks outside [0, %d]", x.state, *x, MaxBlock)
		case prev != nil && prev.end() > x.start:
			err = fmt.Errorf("entries %+v and %+v overlap or are out of order", *prev, *x)
		case prev != nil && prev.end() == x.start && prev.state == x.state &&
			(x.state == Delalloc || prev.phys+prev.len == x.phys):
			err = fmt.Errorf("entries %+v and %+v should have been merged", *prev, *x)
		}
		if err != nil {
			return false
		}
		stats[x.state].entries++
		stats[x.state].blocks += x.len
		prev = x
		return true
	})
	if err != nil {
		return fmt.Errorf("extenttree: invariant broken: %w", err)
	}
	if n != t.bt.Len() {
		return fmt.Errorf("extenttree: invariant broken: iterated %d entries, B-tree holds %d", n, t.bt.Len())
	}
	if stats != t.stats {
		return fmt.Errorf("extenttree: invariant broken: per-state counts %v, entries say %v", t.stats, stats)
	}
	if prev != t.last {
		return fmt.Errorf("extenttree: invariant broken: cached last entry %v, actual last %v", t.last, prev)
	}
	return nil
}

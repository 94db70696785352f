// Package reserve is rawblock's space accounting and free-extent allocator.
//
// It has two layers. The Accountant is a set of lock-free counters that the
// write path touches on every write: Reserve makes sure the space for a
// write exists before a byte is copied (the write fails now with ErrNoSpace,
// never later at writeback), and Unreserve gives back what the write did not
// need. Nothing is allocated at that point; a reservation is a number.
//
// The Space adds the allocator writeback uses to turn delalloc ranges into
// real extents: free space indexed twice, by block number and by (length,
// start), like XFS's free-space B+trees; busy extents that a free has
// returned but that may not be reused until the metadata recording the free
// is durable (XFS's busy extents); and held windows for speculative
// preallocation.
//
// All block numbers are absolute device block numbers in engine blocks. The
// allocator covers [0, total); the engine passes its metadata region as a used
// extent, so free space is the data region minus the mapped extents.
package reserve

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
)

// ErrNoSpace is returned (wrapped) when there is not enough spendable space
// for a reservation, or not enough allocatable space for an allocation.
var ErrNoSpace = errors.New("reserve: no space")

// ErrInvalid is returned (wrapped) for bad arguments: negative counts,
// extents outside the space, overlapping or double frees, and releasing more
// than was reserved or allocated. It wraps fs.ErrInvalid so that callers that
// only know the standard error also match. A call that returns it has changed
// nothing.
var ErrInvalid = fmt.Errorf("reserve: invalid argument: %w", fs.ErrInvalid)

// ErrBusy is returned (wrapped, together with ErrNoSpace) by Alloc when the
// reservation is there but the blocks backing it are not allocatable yet:
// they are busy (freed, waiting for the freeing metadata to become durable)
// or held in allocation windows. Committing the journal (then Commit) or
// giving windows back (Unhold) makes them allocatable; retrying then
// succeeds. Reservations count busy and held blocks as free on purpose, so
// this is a "retry after commit" condition, not a true out-of-space.
var ErrBusy = errors.New("reserve: free space is busy or held")

// MaxTotal is the largest number of blocks a Space or Accountant can manage:
// 2^48-1, 1 EiB at 4 KiB blocks. The limit comes from the Accountant packing
// spendable and reserved counts into one 64-bit word (see Accountant).
const MaxTotal = 1<<48 - 1

// DefaultMaxExtent is the default cap on the length of one allocated
// extent: none (MaxTotal), so that Alloc returns one extent of exactly the
// blocks asked for whenever a free extent is large enough. SetMaxExtent
// sets a cap, for a caller whose extents have a length limit.
const DefaultMaxExtent = MaxTotal

// Extent is a run of blocks [Start, Start+Len).
type Extent struct {
	Start, Len int64
}

// End returns the first block after the extent.
func (e Extent) End() int64 { return e.Start + e.Len }

// String formats the extent as "[start+len]".
func (e Extent) String() string { return fmt.Sprintf("[%d+%d]", e.Start, e.Len) }

// overlaps reports whether two extents share a block.
func (e Extent) overlaps(o Extent) bool {
	return e.Start < o.End() && o.Start < e.End()
}

// contains reports whether o lies entirely inside e.
func (e Extent) contains(o Extent) bool {
	return e.Start <= o.Start && o.End() <= e.End()
}

// checkIn validates e against a space of total blocks: non-negative start
// and length, and an end that neither overflows nor passes total. A
// zero-length extent is valid anywhere in [0, total]. op names the caller in
// the error.
func (e Extent) checkIn(op string, total int64) error {
	switch {
	case e.Start < 0:
		return fmt.Errorf("%w: %s %v: negative start", ErrInvalid, op, e)
	case e.Len < 0:
		return fmt.Errorf("%w: %s %v: negative length", ErrInvalid, op, e)
	case e.Start > math.MaxInt64-e.Len:
		return fmt.Errorf("%w: %s %v: end overflows int64", ErrInvalid, op, e)
	case e.End() > total:
		return fmt.Errorf("%w: %s %v: ends past the last block (total %d)", ErrInvalid, op, e, total)
	}
	return nil
}

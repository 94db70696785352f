package reserve

import (
	"fmt"
	"math/bits"
	"sync/atomic"
)

// Counts is a consistent snapshot of an Accountant: every block is in exactly
// one of Free, Reserved and Allocated, so Free+Reserved+Allocated == Total.
type Counts struct {
	Total int64
	// Free is the spendable space: neither allocated nor reserved. Blocks
	// that are busy or held in windows count here (they are not allocated
	// in metadata).
	Free int64
	// Reserved is space promised to writes that have not been allocated yet
	// (delalloc data and writes in progress).
	Reserved int64
	// Allocated is space mapped by metadata (or about to be: writeback
	// allocated it), including the engine's own metadata region.
	Allocated int64
}

// cacheLine is the padding that keeps the Accountant's hot word off the cache
// lines of its read-only fields and of whatever the Accountant is embedded in.
const cacheLine = 64

// Accountant keeps the free/reserved/allocated counts of a space of Total
// blocks without a lock: it is on the path of every write.
//
// Representation: one 64-bit word holds both the spendable count (Free, in
// the low sBits bits) and the reserved count (in the high 64-sBits bits);
// Allocated is not stored but derived as Total-Free-Reserved. Every operation
// is therefore one compare-and-swap of that word after checking its
// precondition on the value it read, so each check is exact and atomic:
//
//   - Reserve(n):   Free >= n, then Free -= n, Reserved += n
//   - Unreserve(n): Reserved >= n, then Reserved -= n, Free += n
//   - Consume(n):   Reserved >= n, then Reserved -= n (Allocated += n)
//   - Release(n):   Allocated >= n, then Free += n (Allocated -= n)
//
// and Snapshot is a single load, so it is always consistent. A reservation
// can never exceed the spendable space, even with many goroutines racing.
//
// sBits is just wide enough for Total (bits.Len64(Total)), which leaves
// 64-sBits bits for Reserved. Up to Total = 2^32-1 blocks (16 TiB at 4 KiB)
// Reserved can reach Total and there is no extra limit; above that, the
// outstanding reservation is capped at MaxReserved (2^31-1 blocks, 8 TiB at
// 4 KiB, for totals from 2^32 to 2^33-1; halving with each further bit, down
// to 2^16-1 at MaxTotal) and a Reserve past the cap fails with ErrNoSpace. Outstanding reservations are bounded by dirty (delalloc) data
// in memory, and the engine's answer to ErrNoSpace is to convert delalloc at
// writeback and retry, which releases reservations.
type Accountant struct {
	total int64
	sBits uint   // width of the spendable field
	sMask uint64 // 1<<sBits - 1
	rMax  int64  // largest Reserved the word can hold (<= total)
	_     [cacheLine]byte
	word  atomic.Uint64
	_     [cacheLine - 8]byte
}

// NewAccountant returns an Accountant for total blocks of which free are
// neither allocated nor reserved; total-free start allocated.
//
// It panics if total is outside [0, MaxTotal] or free outside [0, total]:
// these are programming errors (NewSpace validates its input and returns an
// error instead).
func NewAccountant(total, free int64) *Accountant {
	a := &Accountant{}
	a.init(total, free)
	return a
}

func (a *Accountant) init(total, free int64) {
	if total < 0 || total > MaxTotal {
		panic(fmt.Sprintf("reserve: NewAccountant: total %d outside [0, %d]", total, int64(MaxTotal)))
	}
	if free < 0 || free > total {
		panic(fmt.Sprintf("reserve: NewAccountant: free %d outside [0, total %d]", free, total))
	}
	a.total = total
	a.sBits = uint(bits.Len64(uint64(total)))
	a.sMask = 1<<a.sBits - 1
	rBits := 64 - a.sBits
	a.rMax = total
	if rBits < 63 && int64(1)<<rBits-1 < total {
		a.rMax = int64(1)<<rBits - 1
	}
	a.word.Store(uint64(free))
}

// unpack splits the packed word into (free, reserved).
func (a *Accountant) unpack(w uint64) (free, reserved int64) {
	return int64(w & a.sMask), int64(w >> a.sBits)
}

func (a *Accountant) pack(free, reserved int64) uint64 {
	return uint64(free) | uint64(reserved)<<a.sBits
}

func (a *Accountant) counts(w uint64) Counts {
	f, r := a.unpack(w)
	return Counts{Total: a.total, Free: f, Reserved: r, Allocated: a.total - f - r}
}

// Total returns the number of blocks accounted for.
func (a *Accountant) Total() int64 { return a.total }

// MaxReserved returns the largest outstanding reservation the packed word can
// hold; it equals Total unless Total is above 2^32-1 (see Accountant).
func (a *Accountant) MaxReserved() int64 { return a.rMax }

// Reserve moves n blocks from free to reserved if at least n are free
// (spendable: not reserved and not allocated). It is one atomic
// check-and-update, without a lock. If the space is not there it returns an
// error wrapping ErrNoSpace and changes nothing. Reserve(0) is a no-op;
// negative n is ErrInvalid.
func (a *Accountant) Reserve(n int64) error {
	if n <= 0 {
		return checkCount("reserve", n)
	}
	for {
		w := a.word.Load()
		f, r := a.unpack(w)
		if f < n {
			return fmt.Errorf("%w: reserve %d blocks: %d spendable (%d reserved, %d allocated, %d total)",
				ErrNoSpace, n, f, r, a.total-f-r, a.total)
		}
		if n > a.rMax-r {
			return fmt.Errorf("%w: reserve %d blocks: %d already reserved, limit %d outstanding (flush delalloc to release reservations)",
				ErrNoSpace, n, r, a.rMax)
		}
		// Subtracting n from the low field and adding n<<sBits to the high
		// field cannot borrow or carry across fields: f >= n and
		// r+n <= rMax.
		if a.word.CompareAndSwap(w, w-uint64(n)+uint64(n)<<a.sBits) {
			return nil
		}
	}
}

// Unreserve gives n reserved blocks back to free: the part of a reservation a
// write did not need. More than is reserved is ErrInvalid and changes
// nothing; Unreserve(0) is a no-op.
func (a *Accountant) Unreserve(n int64) error {
	if n <= 0 {
		return checkCount("unreserve", n)
	}
	for {
		w := a.word.Load()
		_, r := a.unpack(w)
		if r < n {
			return fmt.Errorf("%w: unreserve %d blocks: only %d reserved", ErrInvalid, n, r)
		}
		// r >= n, and free+n <= total because free+reserved <= total.
		if a.word.CompareAndSwap(w, w+uint64(n)-uint64(n)<<a.sBits) {
			return nil
		}
	}
}

// Consume turns n reserved blocks into allocated ones: writeback allocated
// extents for data that had reserved space. More than is reserved is
// ErrInvalid and changes nothing.
func (a *Accountant) Consume(n int64) error {
	if n <= 0 {
		return checkCount("consume", n)
	}
	for {
		w := a.word.Load()
		_, r := a.unpack(w)
		if r < n {
			return fmt.Errorf("%w: consume %d blocks: only %d reserved", ErrInvalid, n, r)
		}
		if a.word.CompareAndSwap(w, w-uint64(n)<<a.sBits) {
			return nil
		}
	}
}

// unconsume undoes Consume (allocated back to reserved). Space uses it only
// under its lock to undo a Consume when a later step of the same operation
// fails; it cannot fail itself because the blocks were just consumed.
func (a *Accountant) unconsume(n int64) {
	for {
		w := a.word.Load()
		f, r := a.unpack(w)
		if a.total-f-r < n || n > a.rMax-r {
			panic(fmt.Sprintf("reserve: unconsume %d blocks: %d allocated, %d reserved", n, a.total-f-r, r))
		}
		if a.word.CompareAndSwap(w, w+uint64(n)<<a.sBits) {
			return
		}
	}
}

// Release turns n allocated blocks back into free ones: an extent was freed.
// More than is allocated is ErrInvalid and changes nothing.
func (a *Accountant) Release(n int64) error {
	if n <= 0 {
		return checkCount("release", n)
	}
	for {
		w := a.word.Load()
		f, r := a.unpack(w)
		if alloc := a.total - f - r; alloc < n {
			return fmt.Errorf("%w: release %d blocks: only %d allocated", ErrInvalid, n, alloc)
		}
		if a.word.CompareAndSwap(w, w+uint64(n)) {
			return nil
		}
	}
}

// Snapshot returns the current counts. It is one atomic load, so the counts
// always add up to Total.
func (a *Accountant) Snapshot() Counts { return a.counts(a.word.Load()) }

// Check verifies the accounting invariant: Free+Reserved+Allocated == Total
// with none negative. Allocated is derived as Total-Free-Reserved, so the sum
// holds by construction; what can break is a field running out of range
// (negative Allocated, or Reserved past its field), which would be a bug in
// this file.
func (a *Accountant) Check() error {
	w := a.word.Load()
	c := a.counts(w)
	switch {
	case a.pack(c.Free, c.Reserved) != w:
		return fmt.Errorf("reserve: accountant word %#x does not round-trip", w)
	case c.Free < 0 || c.Free > c.Total:
		return fmt.Errorf("reserve: accountant: free %d outside [0, %d]", c.Free, c.Total)
	case c.Reserved < 0 || c.Reserved > a.rMax:
		return fmt.Errorf("reserve: accountant: reserved %d outside [0, %d]", c.Reserved, a.rMax)
	case c.Allocated < 0:
		return fmt.Errorf("reserve: accountant: free %d + reserved %d exceed total %d", c.Free, c.Reserved, c.Total)
	}
	return nil
}

// checkCount is the shared answer for n <= 0: zero is a no-op, negative is
// invalid.
func checkCount(op string, n int64) error {
	if n < 0 {
		return fmt.Errorf("%w: %s %d blocks: negative count", ErrInvalid, op, n)
	}
	return nil
}

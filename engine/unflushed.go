package engine

import (
	"fmt"
	"sync"
)

// unflushed tracks the device writes no successful flush has covered yet,
// for one purpose: after a failed flush the engine shuts down, and a device
// that failed a flush may have dropped any write since its last good one
// (fsyncgate). Data that writeback wrote and the cache then let go of could
// come back as its old contents, with no error. Reads of those ranges are
// refused after the shutdown (see Engine.readRefused); everything a good
// flush covered stays readable.
//
// A flush covers the writes that completed before it started, so a write
// is stamped with the flush epoch when it completes, and a flush that
// succeeds forgets the writes stamped before it began. The set holds what
// was written since the last good flush. Commits flush whenever metadata
// changed, but overwrites in place change none, so nothing bounds the
// time between flushes: past maxUnflushed completed writes the set gives
// them up and holds every range in doubt until a flush that started after
// that succeeds.
type unflushed struct {
	mu     sync.Mutex
	next   uint64
	epoch  uint64
	writes map[uint64]unflushedWrite
	// all is set when completed writes were given up (see above); a good
	// flush covering epoch allSince clears it.
	all      bool
	allSince uint64
}

// maxUnflushed bounds the completed writes tracked one by one (a few MiB).
const maxUnflushed = 1 << 16

type unflushedWrite struct {
	off, n int64
	epoch  uint64 // the flush epoch when it completed; pending while in flight
	done   bool
}

// start records a write of n bytes at off about to be issued; finish must
// follow with the returned ticket.
func (u *unflushed) start(off, n int64) uint64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.writes == nil {
		u.writes = make(map[uint64]unflushedWrite)
	}
	u.next++
	u.writes[u.next] = unflushedWrite{off: off, n: n}
	return u.next
}

// cancel forgets a write that was never issued.
func (u *unflushed) cancel(ticket uint64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if w, ok := u.writes[ticket]; !ok || w.done {
		panic(fmt.Sprintf("rawblock: unflushed write %d cancelled after it finished, or never started", ticket))
	}
	delete(u.writes, ticket)
}

// finish stamps a completed (or failed: its range is in doubt all the
// same) write with the current flush epoch.
func (u *unflushed) finish(ticket uint64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	w, ok := u.writes[ticket]
	if !ok || w.done {
		panic(fmt.Sprintf("rawblock: unflushed write %d finished twice or never started", ticket))
	}
	w.epoch, w.done = u.epoch, true
	u.writes[ticket] = w
	if len(u.writes) > maxUnflushed {
		u.all, u.allSince = true, u.epoch
		for k, w := range u.writes {
			if w.done {
				delete(u.writes, k)
			}
		}
	}
}

// flushStarts opens a new epoch and returns the one the flush covers.
func (u *unflushed) flushStarts() uint64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	e := u.epoch
	u.epoch++
	return e
}

// flushed forgets the writes completed in epochs up to covered.
func (u *unflushed) flushed(covered uint64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.all && covered >= u.allSince {
		u.all = false
	}
	for k, w := range u.writes {
		if w.done && w.epoch <= covered {
			delete(u.writes, k)
		}
	}
}

// overlaps reports whether [off, off+n) meets a write no good flush has
// covered.
func (u *unflushed) overlaps(off, n int64) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.all {
		return true
	}
	for _, w := range u.writes {
		if off < w.off+w.n && w.off < off+n {
			return true
		}
	}
	return false
}

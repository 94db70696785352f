package cache

import "sync/atomic"

// doorkeeper decides whether a page loaded after a miss is worth caching
// when the cache is full: only if its key missed before, recently. Under
// random reads of a data set larger than the cache most misses are keys
// read once in a long while; offering each of them to the policy (index
// insert, TinyLFU admission, a sampled eviction and its callback) cost
// more CPU than the device read itself, to be rejected or to evict a page
// that was as good. Keys that come back pass the door on their second miss
// and compete in the policy as before.
//
// It is a Bloom filter of about eight bits per frame with two probes,
// cleared after it has taken as many keys as there are frames, so that
// "recently" is about one cache's worth of misses. Racing updates may lose
// a bit or a clear: the filter is a hint, never a correctness matter.
type doorkeeper struct {
	bits  []atomic.Uint64
	mask  uint64 // bit index mask: len(bits)*64 - 1
	added atomic.Int64
	limit int64
}

func newDoorkeeper(frames int) *doorkeeper {
	n := 64
	for n < 8*frames {
		n *= 2
	}
	return &doorkeeper{bits: make([]atomic.Uint64, n/64), mask: uint64(n - 1), limit: int64(frames)}
}

// seen reports whether h was noted since the last clear, and notes it.
func (d *doorkeeper) seen(h uint64) bool {
	a, b := h&d.mask, (h>>32|h<<32)&d.mask
	wa, ma := &d.bits[a/64], uint64(1)<<(a%64)
	wb, mb := &d.bits[b/64], uint64(1)<<(b%64)
	if wa.Load()&ma != 0 && wb.Load()&mb != 0 {
		return true
	}
	wa.Or(ma)
	wb.Or(mb)
	if d.added.Add(1) >= d.limit {
		d.added.Store(0)
		for i := range d.bits {
			d.bits[i].Store(0)
		}
	}
	return false
}

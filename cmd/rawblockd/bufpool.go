package main

import (
	"fmt"
	"math/bits"
	"sync"
)

// Buffers for request payloads and read replies come from power-of-two
// size classes, 4 KiB up to maxPayload, each backed by a sync.Pool, so a
// steady stream of requests allocates nothing.
const (
	minBufShift = 12
	maxBufShift = 25 // 32 MiB = maxPayload
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

// bufClass returns the size class of a buffer of n bytes.
func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	c := bits.Len(uint(n-1)) - minBufShift
	if c >= len(bufPools) {
		panic(fmt.Sprintf("rawblockd: buffer of %d bytes exceeds the largest class (%d)", n, 1<<maxBufShift))
	}
	return c
}

// getBuf returns a buffer of length n (contents undefined). Return it with
// putBuf.
func getBuf(n int) *[]byte {
	c := bufClass(n)
	if v := bufPools[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minBufShift))
	return &b
}

// putBuf returns b to its pool. b must come from getBuf.
func putBuf(b *[]byte) {
	c := cap(*b)
	if c < 1<<minBufShift || c&(c-1) != 0 {
		panic(fmt.Sprintf("rawblockd: putBuf of a buffer with capacity %d that getBuf did not make", c))
	}
	bufPools[bufClass(c)].Put(b)
}

// budget is a counting semaphore over bytes: it bounds the payload bytes
// held by requests in flight. Waiters are served in arrival order, so a
// large request is not starved by a stream of small ones.
type budget struct {
	mu      sync.Mutex
	free    int64
	size    int64
	waiters []budgetWaiter
}

type budgetWaiter struct {
	n  int64
	ch chan struct{}
}

func newBudget(size int64) *budget {
	if size <= 0 {
		panic(fmt.Sprintf("rawblockd: budget of %d bytes", size))
	}
	return &budget{free: size, size: size}
}

// acquire takes n bytes, waiting until they are free or stop is closed
// (then it returns false and holds nothing). n is capped at the budget's
// size, so a single request can always proceed once the others drain.
func (b *budget) acquire(n int64, stop <-chan struct{}) (int64, bool) {
	n = min(n, b.size)
	b.mu.Lock()
	if len(b.waiters) == 0 && b.free >= n {
		b.free -= n
		b.mu.Unlock()
		return n, true
	}
	ch := make(chan struct{})
	b.waiters = append(b.waiters, budgetWaiter{n: n, ch: ch})
	b.mu.Unlock()
	select {
	case <-ch:
		return n, true
	case <-stop:
		b.mu.Lock()
		for i, w := range b.waiters {
			if w.ch == ch {
				b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
				b.mu.Unlock()
				return 0, false
			}
		}
		// Granted while we were giving up: hand it back.
		b.mu.Unlock()
		b.release(n)
		return 0, false
	}
}

// release returns n bytes taken by acquire.
func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.free += n
	if b.free > b.size {
		panic(fmt.Sprintf("rawblockd: budget released past its size (%d > %d)", b.free, b.size))
	}
	for len(b.waiters) > 0 && b.waiters[0].n <= b.free {
		w := b.waiters[0]
		b.waiters = b.waiters[1:]
		b.free -= w.n
		close(w.ch)
	}
}

// inUse reports the bytes currently held.
func (b *budget) inUse() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.size - b.free
}

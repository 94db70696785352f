package cache

import (
	"context"
	"fmt"
	"sync"
)

// dirtyState counts dirty pages and queues writers above the limit. Writers are
// served in arrival order, so a large request is not starved by small ones.
type dirtyState struct {
	mu    sync.Mutex
	n     int // pages counted
	limit int // pages
	bg    int // background threshold: Kick when n goes over it
	queue []*dirtyWaiter
}

type dirtyWaiter struct {
	n       int
	ch      chan struct{} // closed when granted
	granted bool
}

func (d *dirtyState) init(limit int) {
	d.limit = limit
	// Half the limit, the ratio of Linux's defaults (dirty_background_ratio
	// 10, dirty_ratio 20): a working set that is rewritten in place and
	// fits under it stays in memory until it ages out or is synced, instead
	// of being written back again and again; a writer faster than the
	// device still has the other half to go on with while writeback runs.
	d.bg = max(1, limit/2)
}

// grantLocked admits queued writers, in order, while they fit.
func (d *dirtyState) grantLocked() {
	for len(d.queue) > 0 {
		w := d.queue[0]
		if d.n+w.n > d.limit {
			return
		}
		d.n += w.n
		w.granted = true
		close(w.ch)
		d.queue[0] = nil
		d.queue = d.queue[1:]
	}
}

// AcquireDirty counts n more dirty pages, first waiting (and calling Kick)
// while that would exceed the dirty limit or earlier writers are still
// waiting. A request for more pages than the whole limit returns an error
// wrapping ErrDirtyTooLarge; the caller must split it. If ctx is done before
// the pages are granted, nothing is counted and the error wraps ctx.Err().
func (c *Cache) AcquireDirty(ctx context.Context, n int) error {
	d := &c.dirty
	switch {
	case n < 0:
		return fmt.Errorf("cache: AcquireDirty of %d pages", n)
	case n == 0:
		return nil
	case n > d.limit:
		return fmt.Errorf("%w: %d pages requested, limit %d", ErrDirtyTooLarge, n, d.limit)
	}
	if c.closed.Load() {
		return ErrClosed
	}
	d.mu.Lock()
	if len(d.queue) == 0 && d.n+n <= d.limit {
		crossed := d.n <= d.bg && d.n+n > d.bg
		d.n += n
		d.mu.Unlock()
		if crossed {
			c.doKick()
		}
		return nil
	}
	w := &dirtyWaiter{n: n, ch: make(chan struct{})}
	d.queue = append(d.queue, w)
	d.mu.Unlock()
	c.doKick()

	select {
	case <-w.ch:
		return nil
	case <-ctx.Done():
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if w.granted {
		// Granted while the context ended: keep the grant rather than undo
		// it, the caller may go on.
		return nil
	}
	for i, q := range d.queue {
		if q == w {
			d.queue = append(d.queue[:i], d.queue[i+1:]...)
			break
		}
	}
	// If w was the head, the writers behind it may fit now.
	d.grantLocked()
	return fmt.Errorf("cache: waiting for dirty pages to be written back: %w", ctx.Err())
}

// ReleaseDirty uncounts n dirty pages (written back, or dropped) and wakes the
// writers that now fit. Releasing more than was acquired panics.
func (c *Cache) ReleaseDirty(n int) {
	if n < 0 {
		panic(fmt.Sprintf("cache: ReleaseDirty of %d pages", n))
	}
	if n == 0 {
		return
	}
	d := &c.dirty
	d.mu.Lock()
	if n > d.n {
		have := d.n
		d.mu.Unlock()
		panic(fmt.Sprintf("cache: ReleaseDirty of %d pages, but only %d are counted", n, have))
	}
	d.n -= n
	d.grantLocked()
	d.mu.Unlock()
}

// ChargeDirty counts n more dirty pages without waiting, even past the
// limit: for pages that were uncounted early (their write was in flight and
// then failed) and are dirty again. Writers wait until it is released.
func (c *Cache) ChargeDirty(n int) {
	if n < 0 {
		panic(fmt.Sprintf("cache: ChargeDirty of %d pages", n))
	}
	d := &c.dirty
	d.mu.Lock()
	d.n += n
	d.mu.Unlock()
}

// DirtyPages returns the number of dirty pages counted.
func (c *Cache) DirtyPages() int {
	c.dirty.mu.Lock()
	defer c.dirty.mu.Unlock()
	return c.dirty.n
}

func (c *Cache) doKick() {
	if c.kick != nil {
		c.kick()
	}
}

package cache

import (
	"context"
	"errors"
	"fmt"
)

// ErrLoadPanicked is what Load's other waiters get when the load function
// panicked in the goroutine that ran it (that goroutine sees the panic itself).
var ErrLoadPanicked = errors.New("cache: load function panicked")

// loadCall is one Load in flight; followers of the same key wait on it. Its
// fields are guarded by the lock of the key's shard until done is closed, and
// read-only after.
type loadCall struct {
	done    chan struct{}
	page    *Page
	err     error
	waiters int32 // followers still waiting; each gets a reference
	// detached is set when an Insert or Remove of the key makes the loaded
	// data possibly stale: the result is not indexed, and new Loads no longer
	// join this call.
	detached bool
	finished bool
	// retry tells followers that the leader gave up for a reason of its own
	// (its context, or no frame): they start over with theirs.
	retry bool
}

// detachLoad detaches k's Load in flight, if any; s is k's shard, locked.
func (s *shard) detachLoad(k Key) {
	if call := s.loads[k]; call != nil {
		call.detached = true
		delete(s.loads, k)
	}
}

// Load returns k's clean page with a reference, loading it with fn into a fresh
// frame on a miss. Concurrent Loads of the same key share one fn call. If fn
// fails nothing is cached and every waiter gets its error. fn runs without any
// cache lock held, in the goroutine of the first caller. If k is inserted or
// removed while fn runs, the loaded page is returned to the callers already
// waiting but not cached, since a write may have made it stale. When the
// clean pages fill their capacity, a key's first recent miss is not cached
// either (see doorkeeper); its next one is.
//
// Load is what a caller does after Lookup missed, so it counts nothing in
// the hit/miss statistics or the policy's sketch: Lookup already did.
func (c *Cache) Load(ctx context.Context, k Key, fn func(p *Page) error) (*Page, error) {
	if fn == nil {
		return nil, errors.New("cache: Load with a nil load function")
	}
	h := k.hash()
	s := c.shardFor(h)
	for {
		if c.closed.Load() {
			return nil, ErrClosed
		}
		s.mu.RLock()
		if hd, ok := s.m[k]; ok {
			p := c.page(hd)
			p.refs.Add(1)
			s.mu.RUnlock()
			return p, nil
		}
		s.mu.RUnlock()

		s.mu.Lock()
		if hd, ok := s.m[k]; ok {
			p := c.page(hd)
			p.refs.Add(1)
			s.mu.Unlock()
			return p, nil
		}
		if call := s.loads[k]; call != nil {
			call.waiters++
			s.mu.Unlock()
			p, retry, err := c.follow(ctx, s, call)
			if retry {
				continue
			}
			return p, err
		}
		call := &loadCall{done: make(chan struct{})}
		s.loads[k] = call
		s.mu.Unlock()
		return c.lead(ctx, k, h, s, call, fn)
	}
}

// follow waits for call's result. retry means start over.
func (c *Cache) follow(ctx context.Context, s *shard, call *loadCall) (p *Page, retry bool, err error) {
	select {
	case <-call.done:
	case <-ctx.Done():
		s.mu.Lock()
		if !call.finished {
			call.waiters--
			s.mu.Unlock()
			return nil, false, fmt.Errorf("cache: waiting for a load: %w", ctx.Err())
		}
		// The result is already ours (a reference was taken for us).
		s.mu.Unlock()
		<-call.done
	}
	if call.retry {
		return nil, true, nil
	}
	if call.err != nil {
		return nil, false, call.err
	}
	return call.page, false, nil
}

// lead runs the load for call.
func (c *Cache) lead(ctx context.Context, k Key, h uint64, s *shard, call *loadCall, fn func(p *Page) error) (*Page, error) {
	p, err := c.Alloc(ctx)
	if err != nil {
		c.finishLoad(s, k, call, nil, err, true)
		return nil, err
	}
	returned := false
	defer func() {
		if !returned { // fn panicked: let the followers go, then keep panicking
			c.finishLoad(s, k, call, nil, fmt.Errorf("%w (key %v)", ErrLoadPanicked, k), false)
			p.Release()
		}
	}()
	err = fn(p)
	returned = true
	if err != nil {
		c.finishLoad(s, k, call, nil, err, false)
		p.Release()
		return nil, err
	}
	if hd := c.finishLoad(s, k, call, p, nil, false); hd != 0 {
		c.offer(k, h, hd)
	}
	return p, nil
}

// finishLoad publishes call's result, indexes a loaded page unless the call was
// detached, and gives each follower its reference. It returns the new handle,
// or 0 if the page was not indexed.
func (c *Cache) finishLoad(s *shard, k Key, call *loadCall, p *Page, err error, retry bool) (hd uint64) {
	s.mu.Lock()
	if s.loads[k] == call {
		delete(s.loads, k)
	}
	call.finished = true
	call.err, call.retry = err, retry
	if p != nil {
		if !call.detached && !c.closed.Load() && c.admit(k.hash()) {
			if _, ok := s.m[k]; ok {
				s.mu.Unlock()
				panic(fmt.Sprintf("cache: Load of %v found the key indexed although every Insert detaches the load in flight", k))
			}
			hd = c.index(s, k, p)
		}
		p.refs.Add(call.waiters)
		call.page = p
	}
	s.mu.Unlock()
	close(call.done)
	return hd
}

// admit reports whether a page loaded for a key with hash h is to be
// cached: always while clean pages are below their capacity, else if the
// doorkeeper saw the key miss recently.
func (c *Cache) admit(h uint64) bool {
	return c.clean.Load() < c.cleanCap || c.door.seen(h)
}

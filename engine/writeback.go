package engine

import (
	"sync"
)

// vectorDevice is implemented by devices that move several buffers in one
// I/O (preadv/pwritev, IORING_OP_READV/WRITEV). Writeback and reads then
// use the cache frames where they are, with no bounce copy.
type vectorDevice interface {
	WritevAt(bufs [][]byte, off int64) (int, error)
	ReadvAt(bufs [][]byte, off int64) (int, error)
}

func (e *Engine) writevDev(v vectorDevice, bufs [][]byte, off int64) error {
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	e.devWrites.Add(1)
	e.devBytesW.Add(uint64(total))
	n, err := v.WritevAt(bufs, off)
	return whole("write", n, total, off, err)
}

func (e *Engine) readvDev(v vectorDevice, bufs [][]byte, off int64) error {
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	e.devReads.Add(1)
	e.devBytesR.Add(uint64(total))
	n, err := v.ReadvAt(bufs, off)
	return whole("read", n, total, off, err)
}

// writePages writes a writeback batch: pages with consecutive blocks and
// consecutive physical blocks go out as one I/O of up to maxIOBytes,
// through the engine's writeback queue (see wbQueue).
//
// done, if set, is called (from the I/O's goroutine) with the pages of each
// I/O that completed, so the caller can let writers reuse their dirty budget
// while the rest of the batch is in flight.
func (e *Engine) writePages(pages []wpage, done func([]wpage)) error {
	maxRun := max(maxIOBytes>>e.shift, 1)
	g := &wbGroup{done: done}
	var runs []wbRun
	for i := 0; i < len(pages); {
		j := i + 1
		span := true // pages[i:j] have frames that follow each other
		for j < len(pages) && j-i < maxRun &&
			pages[j].blk == pages[j-1].blk+1 && pages[j].phys == pages[j-1].phys+1 {
			follows := pages[j].pg.Follows(pages[j-1].pg)
			if span && !follows && j-i >= minSpanPages {
				// A long run of following frames goes out as one
				// buffer (see writeRun): end the I/O where they stop
				// following rather than send it all as a vector.
				break
			}
			span = span && follows
			j++
		}
		runs = append(runs, wbRun{pages: pages[i:j], g: g})
		i = j
	}
	g.wg.Add(len(runs))
	e.wbq.push(e, runs)
	g.wg.Wait()
	return g.first
}

// minSpanPages is the shortest run of following frames that writePages
// ends an I/O for, when the next frame does not follow: an appender's
// frames come in cache streams of up to 512, so its I/Os would otherwise
// straddle two streams' frames and go out as vectors of single pages.
const minSpanPages = 32

// wbRun is one writeback I/O: pages with consecutive blocks, mapped to
// consecutive physical blocks.
type wbRun struct {
	pages []wpage
	g     *wbGroup
}

// wbGroup gathers the runs of one writePages call.
type wbGroup struct {
	wg    sync.WaitGroup
	done  func([]wpage)
	mu    sync.Mutex
	first error
}

// wbQueue is the engine's writeback I/O queue: runs wait in order and at
// most ioParallel workers take them, each going straight from one
// completed I/O to the next queued one. A worker exits when it finds the
// queue empty, and push starts workers while fewer than ioParallel run,
// so an idle engine has none. With a goroutine per I/O, each I/O cost
// five goroutine wake-ups (the run's goroutine, its submitter waiting for
// a slot, the reactor twice, the waiter), each waiting for a CPU behind
// the engine's writers on a 2-CPU machine: 16 writes were in flight for
// the engine while the device held nine on average.
type wbQueue struct {
	mu      sync.Mutex
	runs    []wbRun
	head    int
	workers int
}

// push queues runs and starts the workers they need.
func (q *wbQueue) push(e *Engine, runs []wbRun) {
	q.mu.Lock()
	if q.head == len(q.runs) {
		clear(q.runs)
		q.runs, q.head = q.runs[:0], 0
	}
	q.runs = append(q.runs, runs...)
	start := min(ioParallel-q.workers, len(q.runs)-q.head)
	q.workers += start
	q.mu.Unlock()
	for range start {
		go e.wbWorker()
	}
}

// pop takes the oldest run; with none left the worker is done.
func (q *wbQueue) pop() (wbRun, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.head == len(q.runs) {
		q.workers--
		return wbRun{}, false
	}
	r := q.runs[q.head]
	q.runs[q.head] = wbRun{}
	q.head++
	return r, true
}

// wbWorker writes queued runs until none is left.
func (e *Engine) wbWorker() {
	for {
		r, ok := e.wbq.pop()
		if !ok {
			return
		}
		err := e.writeRun(r.pages)
		g := r.g
		if err != nil {
			g.mu.Lock()
			g.first = cmpErr(g.first, err)
			g.mu.Unlock()
		} else if g.done != nil {
			g.done(r.pages)
		}
		g.wg.Done()
	}
}

// writeRun writes one run's pages with one device I/O.
func (e *Engine) writeRun(ps []wpage) error {
	if n := followingFrames(ps); n == len(ps) {
		// Frames are aligned, and these follow each other in the arena:
		// write them where they are, as one buffer.
		return e.writeDev(ps[0].pg.Span(n), ps[0].phys<<e.shift)
	}
	if v, ok := e.dev.(vectorDevice); ok {
		bufs := make([][]byte, len(ps))
		for k, w := range ps {
			bufs[k] = w.pg.Data()
		}
		return e.writevDev(v, bufs, ps[0].phys<<e.shift)
	}
	bufp := e.bufPool.Get().(*[]byte)
	defer e.bufPool.Put(bufp)
	buf := (*bufp)[:len(ps)*e.bs]
	for k, w := range ps {
		copy(buf[k*e.bs:], w.pg.Data())
	}
	return e.writeDev(buf, ps[0].phys<<e.shift)
}

// followingFrames returns how many of ps, from the first, have frames that
// follow each other in the cache's arena.
func followingFrames(ps []wpage) int {
	n := 1
	for n < len(ps) && ps[n].pg.Follows(ps[n-1].pg) {
		n++
	}
	return n
}

package engine

import (
	"errors"
	"slices"
	"sync"

	"github.com/rawblock/rawblock/iouring"
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
	t := e.beginWrite(off, int64(total))
	n, err := v.WritevAt(bufs, off)
	e.uf.finish(t)
	return whole("write", n, total, off, err)
}

// beginWrite counts a device write of n bytes at off about to be issued
// and records it as unflushed; uf.finish(ticket) follows when it ends.
// Counted before it is issued: its completion may be reported, and a
// Sync return, before the call that issued it does.
func (e *Engine) beginWrite(off, n int64) uint64 {
	e.devWrites.Add(1)
	e.devBytesW.Add(uint64(n))
	return e.uf.start(off, n)
}

// cancelWrite undoes beginWrite for a write that was never issued.
func (e *Engine) cancelWrite(ticket uint64, n int64) {
	e.uf.cancel(ticket)
	e.devWrites.Add(^uint64(0))
	e.devBytesW.Add(-uint64(n))
}

func (e *Engine) readvDev(v vectorDevice, bufs [][]byte, off int64) error {
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	if err := e.readRefused(off, int64(total)); err != nil {
		return err
	}
	e.devReads.Add(1)
	e.devBytesR.Add(uint64(total))
	n, err := v.ReadvAt(bufs, off)
	return whole("read", n, total, off, err)
}

// writePages writes a writeback batch of the object lane: pages with
// consecutive blocks and consecutive physical blocks go out as one I/O of
// up to maxIOBytes, through the engine's writeback queue (see wbQueue).
//
// done, if set, is called (from a writeback worker, so it must not block)
// with the pages of each I/O that completed, so the caller can let writers
// reuse their dirty budget while the rest of the batch is in flight.
func (e *Engine) writePages(lane uint64, pages []wpage, done func([]wpage)) error {
	g := &wbGroup{done: done}
	runs := splitRuns(pages, max(maxIOBytes>>e.shift, 1))
	for k := range runs {
		runs[k].g = g
	}
	g.wg.Add(len(runs))
	e.wbq.push(e, lane, runs)
	g.wg.Wait()
	return g.first
}

// splitRuns cuts pages into I/Os (their group left unset): each of
// consecutive blocks mapped to consecutive physical blocks, at most maxRun
// pages. Frames that follow each other go out as one buffer (span; see
// writeRun), the rest as a vector of pages; a stretch of at least
// minSpanPages following frames (an appender's frame stream) gets I/Os of
// its own rather than joining a vector.
func splitRuns(pages []wpage, maxRun int) []wbRun {
	// chain[k]: how many pages from k on are contiguous and have frames
	// that follow each other (see Page.Follows).
	chain := make([]int32, len(pages))
	for k := len(pages) - 1; k >= 0; k-- {
		chain[k] = 1
		if k+1 < len(pages) && contiguous(pages[k], pages[k+1]) && pages[k+1].pg.Follows(pages[k].pg) {
			chain[k] += chain[k+1]
		}
	}
	var out []wbRun
	for i := 0; i < len(pages); {
		j := i + 1
		for j < len(pages) && j-i < maxRun && contiguous(pages[j-1], pages[j]) {
			span := int(chain[i]) >= j-i
			if span && int(chain[i]) == j-i && j-i >= minSpanPages {
				break // the stretch [i, j) ends here
			}
			if !span && chain[j] >= minSpanPages {
				break // a stretch starts at j
			}
			j++
		}
		out = append(out, wbRun{pages: pages[i:j], span: int(chain[i]) >= j-i})
		i = j
	}
	return out
}

// contiguous reports whether b follows a in the object and on the device.
func contiguous(a, b wpage) bool { return b.blk == a.blk+1 && b.phys == a.phys+1 }

// minSpanPages is the shortest stretch of following frames that writePages
// gives an I/O of its own: an appender's frames come in cache streams of
// up to 512, so its I/Os would otherwise straddle two refills and go out
// as vectors of single pages.
const minSpanPages = 32

// wbRun is one writeback I/O: pages with consecutive blocks, mapped to
// consecutive physical blocks.
type wbRun struct {
	pages []wpage
	span  bool // the pages' frames follow each other in the arena
	g     *wbGroup
}

// wbGroup gathers the runs of one writePages call.
type wbGroup struct {
	wg    sync.WaitGroup
	done  func([]wpage)
	mu    sync.Mutex
	first error
}

// wbQueue is the engine's writeback I/O queue. Each object has a lane
// whose runs go out in order (so a stream's batches complete in order);
// the lanes with runs waiting take turns, one run each, so a small Sync
// does not wait behind another object's hundreds of megabytes. On an
// asyncWriter device, pump keeps up to ioParallel runs in flight, each
// completion starting the next. Otherwise at most
// ioParallel workers take runs, each going straight from one completed
// I/O to the next queued one; a worker exits when it finds the queue
// empty, and push starts workers while fewer than ioParallel run, so an
// idle engine has none. With a goroutine per I/O, each I/O cost five
// goroutine wake-ups (the run's goroutine, its submitter waiting for a
// slot, the reactor twice, the waiter), each waiting for a CPU behind the
// engine's writers on a 2-CPU machine: 16 writes were in flight for the
// engine while the device held nine on average.
type wbQueue struct {
	mu      sync.Mutex
	lanes   map[uint64]*wbLane // lanes with runs waiting
	ring    []*wbLane          // the same, in turn order
	next    int                // ring index of the lane whose turn it is
	queued  int                // runs waiting, over all lanes
	workers int                // worker goroutines (synchronous devices)
	async   asyncWriter        // the device, if runs go out through pump
	started int                // runs pump started and not yet done
}

// wbLane is one object's runs waiting: runs[head:].
type wbLane struct {
	id   uint64
	runs []wbRun
	head int
}

// push queues runs on lane and starts the workers they need.
func (q *wbQueue) push(e *Engine, lane uint64, runs []wbRun) {
	if len(runs) == 0 {
		return
	}
	q.mu.Lock()
	l := q.lanes[lane]
	if l == nil {
		if q.lanes == nil {
			q.lanes = make(map[uint64]*wbLane)
		}
		l = &wbLane{id: lane}
		q.lanes[lane] = l
		q.ring = append(q.ring, l)
	}
	l.runs = append(l.runs, runs...)
	q.queued += len(runs)
	if q.async != nil {
		q.mu.Unlock()
		e.pump()
		return
	}
	start := min(ioParallel-q.workers, q.queued)
	q.workers += start
	q.mu.Unlock()
	for range start {
		go e.wbWorker()
	}
}

// pop takes the next run of the lane whose turn it is; with none left
// the worker is done.
func (q *wbQueue) pop() (wbRun, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.queued == 0 {
		q.workers--
		return wbRun{}, false
	}
	return q.popLocked(), true
}

// popLocked takes the next run of the lane whose turn it is; one must be
// queued.
func (q *wbQueue) popLocked() wbRun {
	if q.next >= len(q.ring) {
		q.next = 0
	}
	l := q.ring[q.next]
	r := l.runs[l.head]
	l.runs[l.head] = wbRun{}
	l.head++
	q.queued--
	switch {
	case l.head == len(l.runs):
		// Drained: the lane leaves the ring, and the next one's turn
		// comes at the same index.
		q.ring = slices.Delete(q.ring, q.next, q.next+1)
		delete(q.lanes, l.id)
	default:
		if l.head >= 64 && 2*l.head >= len(l.runs) {
			// A lane that never drains (a stream feeding it batch
			// after batch) must not grow without bound.
			n := copy(l.runs, l.runs[l.head:])
			clear(l.runs[n:])
			l.runs, l.head = l.runs[:n], 0
		}
		q.next++
	}
	return r
}

// wbWorker writes queued runs until none is left.
func (e *Engine) wbWorker() {
	for {
		r, ok := e.wbq.pop()
		if !ok {
			return
		}
		e.runDone(r, e.writeRun(r))
	}
}

// runDone reports a run's completion to its group.
func (e *Engine) runDone(r wbRun, err error) {
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

// pump starts queued runs on an asyncWriter device while fewer than
// ioParallel are in flight. It is called when runs are queued and from
// each run's completion, which is how the queue stays full: the goroutine
// that reaps a completion (the ring's reactor, or a writer polling it)
// issues the next write at once.
func (e *Engine) pump() {
	q := &e.wbq
	for {
		q.mu.Lock()
		if q.queued == 0 || q.started >= ioParallel {
			q.mu.Unlock()
			return
		}
		r := q.popLocked()
		q.started++
		q.mu.Unlock()
		if err := e.startRun(r); err != nil {
			if errors.Is(err, iouring.ErrNoSlot) {
				// Every slot of the ring is taken (reads, syncs): wait
				// for one on a goroutine of its own. Runs queued behind
				// it may go out first; their batches still complete in
				// order (Object.writeback waits for them in turn).
				go func() { e.asyncDone(r, e.writeRun(r)) }()
				continue
			}
			e.asyncFinish(r, err)
		}
	}
}

// asyncDone completes a run that pump started, and starts more.
func (e *Engine) asyncDone(r wbRun, err error) {
	e.asyncFinish(r, err)
	e.pump()
}

func (e *Engine) asyncFinish(r wbRun, err error) {
	q := &e.wbq
	q.mu.Lock()
	q.started--
	q.mu.Unlock()
	e.runDone(r, err)
}

// startRun issues one run's write on the asyncWriter; asyncDone follows
// its completion. An error means nothing was issued.
func (e *Engine) startRun(r wbRun) error {
	off, total := r.pages[0].phys<<e.shift, int64(len(r.pages))<<e.shift
	var buf []byte
	var bufs [][]byte
	if r.span {
		buf = r.spanBuf()
	} else {
		bufs = r.frameBufs()
	}
	t := e.beginWrite(off, total)
	err := e.wbq.async.StartWrite(buf, bufs, off, func(err error) {
		e.uf.finish(t)
		e.asyncDone(r, err)
	})
	if err != nil {
		e.cancelWrite(t, total)
		return err
	}
	return nil
}

// spanBuf is a span run's pages as one buffer: its frames are aligned
// and follow each other in the arena, so it is written where it is.
func (r wbRun) spanBuf() []byte { return r.pages[0].pg.Span(len(r.pages)) }

// frameBufs is the run's frames, for a vectored write.
func (r wbRun) frameBufs() [][]byte {
	bufs := make([][]byte, len(r.pages))
	for k, w := range r.pages {
		bufs[k] = w.pg.Data()
	}
	return bufs
}

// writeRun writes one run's pages with one device I/O.
func (e *Engine) writeRun(r wbRun) error {
	ps := r.pages
	if r.span {
		return e.writeDev(r.spanBuf(), ps[0].phys<<e.shift)
	}
	if v, ok := e.dev.(vectorDevice); ok {
		return e.writevDev(v, r.frameBufs(), ps[0].phys<<e.shift)
	}
	bufp := e.bufPool.Get().(*[]byte)
	defer e.bufPool.Put(bufp)
	buf := (*bufp)[:len(ps)*e.bs]
	for k, w := range ps {
		copy(buf[k*e.bs:], w.pg.Data())
	}
	return e.writeDev(buf, ps[0].phys<<e.shift)
}

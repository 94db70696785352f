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
// at most ioParallel writeback I/Os of the engine in flight.
//
// done, if set, is called (from the I/O's goroutine) with the pages of each
// I/O that completed, so the caller can let writers reuse their dirty budget
// while the rest of the batch is in flight.
func (e *Engine) writePages(pages []wpage, done func([]wpage)) error {
	maxRun := max(maxIOBytes>>e.shift, 1)
	type run struct{ i, j int }
	var runs []run
	for i := 0; i < len(pages); {
		j := i + 1
		for j < len(pages) && j-i < maxRun &&
			pages[j].blk == pages[j-1].blk+1 && pages[j].phys == pages[j-1].phys+1 {
			j++
		}
		runs = append(runs, run{i, j})
		i = j
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	sem := e.wbSem
	bs := e.bs
	for _, r := range runs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			ps := pages[r.i:r.j]
			var err error
			if n := followingFrames(ps); n == len(ps) {
				// Frames are aligned, and these follow each other in
				// the arena: write them where they are, as one buffer.
				err = e.writeDev(ps[0].pg.Span(n), ps[0].phys<<e.shift)
			} else if v, ok := e.dev.(vectorDevice); ok {
				bufs := make([][]byte, len(ps))
				for k, w := range ps {
					bufs[k] = w.pg.Data()
				}
				err = e.writevDev(v, bufs, ps[0].phys<<e.shift)
			} else {
				bufp := e.bufPool.Get().(*[]byte)
				buf := (*bufp)[:len(ps)*bs]
				for k, w := range ps {
					copy(buf[k*bs:], w.pg.Data())
				}
				err = e.writeDev(buf, ps[0].phys<<e.shift)
				e.bufPool.Put(bufp)
			}
			if err != nil {
				mu.Lock()
				first = cmpErr(first, err)
				mu.Unlock()
			} else if done != nil {
				done(ps)
			}
		}()
	}
	wg.Wait()
	return first
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

//go:build linux

package iouring

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxPsyncWorkers bounds the goroutines that serve batches (Do) in psync
// mode; together with the token semaphore it bounds the OS threads blocked
// in pread/pwrite at QueueDepth.
const maxPsyncWorkers = 64

// psyncBackend performs I/O with pread/pwrite/fdatasync. A synchronous call
// runs the system call on the caller's own goroutine (no hand-off), holding
// one of qd tokens; batches are served by a fixed pool of worker goroutines
// that take tokens the same way. So at most qd system calls are in progress
// at once, each blocking one OS thread.
type psyncBackend struct {
	fd     int
	tokens chan struct{}
	jobs   chan psyncJob
	wg     sync.WaitGroup
	nreq   atomic.Uint64
}

type psyncJob struct {
	op   *Op
	done *sync.WaitGroup
}

func newPsync(fd, qd int) *psyncBackend {
	b := &psyncBackend{
		fd:     fd,
		tokens: make(chan struct{}, qd),
		jobs:   make(chan psyncJob, qd),
	}
	workers := min(qd, maxPsyncWorkers)
	b.wg.Add(workers)
	for range workers {
		go b.worker()
	}
	return b
}

func (b *psyncBackend) worker() {
	defer b.wg.Done()
	for j := range b.jobs {
		if j.op.Bufs != nil {
			j.op.N, j.op.Err = b.rwv(j.op.Write, j.op.Bufs, 0, j.op.Off)
			j.done.Done()
			continue
		}
		buf := j.op.Buf
		if len(buf) > maxRW {
			buf = buf[:maxRW]
		}
		j.op.N, j.op.Err = b.rw(j.op.Write, buf, j.op.Off)
		j.done.Done()
	}
}

func (b *psyncBackend) rw(write bool, p []byte, off int64) (int, error) {
	b.tokens <- struct{}{}
	defer func() { <-b.tokens }()
	b.nreq.Add(1)
	for {
		var n int
		var err error
		if write {
			n, err = unix.Pwrite(b.fd, p, off)
		} else {
			n, err = unix.Pread(b.fd, p, off)
		}
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		return n, nil
	}
}

// iovPool holds iovec arrays of MaxIovecs entries for preadv/pwritev, so
// that a vectored call allocates nothing in steady state (unix.Preadv
// builds a new array every call).
var iovPool = sync.Pool{New: func() any {
	a := make([]unix.Iovec, MaxIovecs)
	return &a
}}

// rwv is one preadv/pwritev of at most MaxIovecs buffers and maxRW bytes
// from bufs (bufs[0] starting at byte skip).
func (b *psyncBackend) rwv(write bool, bufs [][]byte, skip int, off int64) (int, error) {
	b.tokens <- struct{}{}
	defer func() { <-b.tokens }()
	b.nreq.Add(1)
	ap := iovPool.Get().(*[]unix.Iovec)
	iov := *ap
	defer func() {
		clear(iov) // drop the pointers into the caller's buffers
		iovPool.Put(ap)
	}()
	n, total := 0, 0
	for ; n < len(bufs) && n < MaxIovecs && total < maxRW; n++ {
		p := bufs[n]
		if n == 0 {
			p = p[skip:]
		}
		if len(p) > maxRW-total {
			p = p[:maxRW-total]
		}
		if len(p) > 0 {
			iov[n].Base = &p[0]
		}
		iov[n].SetLen(len(p))
		total += len(p)
	}
	if total == 0 {
		return 0, nil
	}
	trap := uintptr(unix.SYS_PREADV)
	if write {
		trap = unix.SYS_PWRITEV
	}
	// The kernel takes the offset as two longs, low and high (on 64-bit
	// systems the high one is 0); two shifts keep a shift by the full
	// word size out of the expression.
	lo, hi := uintptr(off), uintptr(uint64(off)>>(bits.UintSize-1)>>1)
	for {
		r, _, errno := unix.Syscall6(trap, uintptr(b.fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(n), lo, hi, 0)
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		if int(r) > total {
			panic("iouring: preadv/pwritev transferred more bytes than requested")
		}
		return int(r), nil
	}
}

func (b *psyncBackend) sync() error {
	b.tokens <- struct{}{}
	defer func() { <-b.tokens }()
	b.nreq.Add(1)
	for {
		err := unix.Fdatasync(b.fd)
		if err == syscall.EINTR {
			continue
		}
		return err
	}
}

func (b *psyncBackend) do(ops []Op) {
	var done sync.WaitGroup
	done.Add(len(ops))
	for i := range ops {
		b.jobs <- psyncJob{op: &ops[i], done: &done}
	}
	done.Wait()
}

func (b *psyncBackend) registerArena(*Arena) (string, error) {
	return "", nil
}

// poll has nothing to do: psync callers do their own I/O.
func (b *psyncBackend) poll() {}

// start has no asynchronous path: a pread/pwrite blocks its thread.
func (b *psyncBackend) start(*Op, func(int32)) error {
	return fmt.Errorf("iouring: Start in psync mode: %w: %w", ErrNoSlot, errors.ErrUnsupported)
}

func (b *psyncBackend) stats() FileStats {
	return FileStats{Requests: b.nreq.Load()}
}

func (b *psyncBackend) close() error {
	close(b.jobs)
	b.wg.Wait()
	return nil
}

//go:build linux

package iouring

import (
	"sync"
	"sync/atomic"
	"syscall"

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

func (b *psyncBackend) stats() FileStats {
	return FileStats{Requests: b.nreq.Load()}
}

func (b *psyncBackend) close() error {
	close(b.jobs)
	b.wg.Wait()
	return nil
}

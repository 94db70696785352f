//go:build linux

package iouring

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Mode selects how a File performs I/O.
type Mode string

const (
	// ModeAuto uses io_uring if Probe reports it usable, else psync. The
	// environment variable RAWBLOCK_IO=psync|io_uring overrides it (and
	// only it).
	ModeAuto Mode = ""
	// ModeIOURing forces io_uring; NewFile fails if it is unavailable.
	ModeIOURing Mode = "io_uring"
	// ModePsync forces pread/pwrite from a bounded set of goroutines.
	ModePsync Mode = "psync"
)

// EnvMode is the environment variable that forces the mode of files opened
// with ModeAuto.
const EnvMode = "RAWBLOCK_IO"

// Limits of FileOptions.
const (
	DefaultQueueDepth = 128
	MaxQueueDepth     = 4096
	MaxRings          = 8
)

// FileOptions configures NewFile.
type FileOptions struct {
	Mode Mode
	// QueueDepth is the number of requests in flight per ring (psync: the
	// number of concurrent system calls); 0 means 128, at most 4096.
	QueueDepth int
	// Arena, if set, is registered once; buffers inside it use
	// READ_FIXED/WRITE_FIXED.
	Arena *Arena
	// Rings is the number of io_uring instances, each with its own reactor
	// goroutine and OS thread; 0 means 1 on machines with up to 4 CPUs and
	// 2 above; at most 8. Ignored by psync.
	Rings int
}

// Op is one request of a batch (File.Do).
type Op struct {
	Write bool
	Buf   []byte
	// Bufs, if non-nil, makes the op vectored (READV/WRITEV, preadv/
	// pwritev): the buffers are transferred in order, as one contiguous
	// range of the file starting at Off, and Buf is ignored. Any number of
	// buffers is accepted; the first MaxIovecs go in the batch, the rest
	// follow in further requests.
	Bufs [][]byte
	Off  int64
	N    int   // out: bytes transferred
	Err  error // out: nil, or why the request failed or was short (io.EOF: a read reached the end of the file)
}

// File performs concurrent I/O on one file descriptor, normally opened with
// O_DIRECT, through io_uring or, when that is unavailable or not wanted,
// pread/pwrite. All methods are safe for concurrent use.
type File struct {
	fd     int
	mode   Mode
	base   string                 // why this mode
	reason atomic.Pointer[string] // base plus the fixed-buffer note
	be     backend

	// state counts calls in progress; closedBit is set by Close. A call
	// that finds the bit set backs out with ErrClosed; Close waits until
	// the count drains to zero, so no request is ever issued after Close
	// has started tearing down the backend.
	state   atomic.Int64
	drained chan struct{}
}

const closedBit = 1 << 62

// backend is one way of doing I/O. rw and do make one attempt per request
// (File handles short transfers and requests over maxRW).
type backend interface {
	rw(write bool, p []byte, off int64) (int, error)
	// rwv transfers up to MaxIovecs buffers and maxRW bytes of bufs,
	// bufs[0] starting at byte skip.
	rwv(write bool, bufs [][]byte, skip int, off int64) (int, error)
	sync() error
	do(ops []Op)
	registerArena(a *Arena) (note string, err error)
	// poll does pending ring work on the calling goroutine (see Poll).
	poll()
	// start queues op and returns at once, or returns an error wrapping
	// ErrNoSlot, queueing nothing (no free slot, or no asynchronous
	// path): see File.Start.
	start(op *Op, cb func(res int32)) error
	stats() FileStats
	close() error
}

// FileStats counts what a File did, for benchmarks and tuning.
type FileStats struct {
	Requests uint64 // I/O requests completed (reads, writes, fsyncs)
	Enters   uint64 // io_uring_enter calls made by the reactors
	Sleeps   uint64 // times a reactor slept waiting for completions or requests
	Kicks    uint64 // eventfd writes made to wake a sleeping reactor
	Parks    uint64 // times a waiting caller parked (rather than finding its result while spinning)
	Retries  uint64 // requests run again after the kernel cancelled them (their submitting thread exited)
	Polls    uint64 // Poll calls that did a sleeping reactor's work
}

// NewFile wraps fd (which stays owned by the caller: Close does not close
// it) for concurrent I/O.
func NewFile(fd int, opts FileOptions) (*File, error) {
	if fd < 0 {
		return nil, fmt.Errorf("iouring: NewFile: fd %d: %w", fd, syscall.EBADF)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("iouring: NewFile: fstat fd %d: %w", fd, err)
	}
	qd := opts.QueueDepth
	if qd == 0 {
		qd = DefaultQueueDepth
	}
	if qd < 1 || qd > MaxQueueDepth {
		return nil, fmt.Errorf("iouring: queue depth %d: want 1..%d: %w", opts.QueueDepth, MaxQueueDepth, syscall.EINVAL)
	}
	rings := opts.Rings
	if rings == 0 {
		rings = 1
		if runtime.NumCPU() > 4 {
			rings = 2
		}
	}
	if rings < 1 || rings > MaxRings {
		return nil, fmt.Errorf("iouring: %d rings: want 1..%d: %w", opts.Rings, MaxRings, syscall.EINVAL)
	}
	mode, reason, forced, err := resolveMode(opts.Mode)
	if err != nil {
		return nil, err
	}
	f := &File{fd: fd, drained: make(chan struct{}, 1)}
	if mode == ModeIOURing {
		be, desc, err := newUring(fd, qd, rings)
		switch {
		case err == nil:
			f.be, f.mode = be, ModeIOURing
			f.base = "io_uring"
			if reason != "" {
				f.base += " (" + reason + ")"
			}
			f.base += ": " + desc
		case !forced && refusedSetup(err):
			mode, reason = ModePsync, err.Error()
		default:
			return nil, err
		}
	}
	if mode == ModePsync {
		f.be, f.mode = newPsync(fd, qd), ModePsync
		f.base = "psync: " + reason
	}
	f.reason.Store(&f.base)
	if opts.Arena != nil {
		if err := f.RegisterArena(opts.Arena); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

// probeHook is Probe; tests replace it to simulate a kernel without
// io_uring.
var probeHook = Probe

// resolveMode applies FileOptions.Mode, RAWBLOCK_IO and Probe. forced means
// the caller or the environment asked for this mode explicitly.
func resolveMode(m Mode) (mode Mode, reason string, forced bool, err error) {
	switch m {
	case ModePsync:
		return ModePsync, "forced by FileOptions.Mode", true, nil
	case ModeIOURing:
		if err := probeHook(); err != nil {
			return "", "", true, fmt.Errorf("iouring: FileOptions.Mode forces io_uring, but it is unavailable: %w", err)
		}
		return ModeIOURing, "forced by FileOptions.Mode", true, nil
	case ModeAuto:
	default:
		return "", "", false, fmt.Errorf("iouring: FileOptions.Mode %q: want %q, %q or %q (auto): %w", m, ModeIOURing, ModePsync, ModeAuto, syscall.EINVAL)
	}
	switch env := os.Getenv(EnvMode); env {
	case "":
	case string(ModePsync):
		return ModePsync, "forced by " + EnvMode, true, nil
	case string(ModeIOURing):
		if err := probeHook(); err != nil {
			return "", "", true, fmt.Errorf("iouring: %s=%s forces io_uring, but it is unavailable: %w", EnvMode, env, err)
		}
		return ModeIOURing, "forced by " + EnvMode, true, nil
	default:
		return "", "", false, fmt.Errorf("iouring: %s=%q: want %q or %q: %w", EnvMode, env, ModePsync, ModeIOURing, syscall.EINVAL)
	}
	if err := probeHook(); err != nil {
		return ModePsync, err.Error(), false, nil
	}
	return ModeIOURing, "", false, nil
}

// Mode is the I/O method actually in use: ModeIOURing or ModePsync.
func (f *File) Mode() Mode { return f.mode }

// Reason says which method is used and why, e.g. "io_uring: 1 ring ...",
// "psync: forced by RAWBLOCK_IO", "psync: io_uring_setup: operation not
// permitted", and whether fixed buffers are in use.
func (f *File) Reason() string { return *f.reason.Load() }

// Fd is the file descriptor the File performs I/O on.
func (f *File) Fd() int { return f.fd }

// Poll lets the calling goroutine move the io_uring backend along: when a
// ring's reactor sleeps, Poll submits the requests waiting for it and
// delivers the completions that are there, without blocking. It costs a
// few atomic operations when there is nothing to do, and does nothing in
// psync mode or after Close.
//
// Goroutines that keep every CPU busy for long stretches (copying into a
// cache, say) should call it between pieces of their work: Go's scheduler
// looks at the netpoller, where a sleeping reactor waits, only when a CPU
// runs out of goroutines or every 10 ms, so without it completions can
// wait that long while the device idles.
func (f *File) Poll() { f.be.poll() }

// Stats returns the File's counters.
func (f *File) Stats() FileStats { return f.be.stats() }

func (f *File) enter() bool {
	if f.state.Add(1)&closedBit != 0 {
		f.exit()
		return false
	}
	return true
}

func (f *File) exit() {
	if f.state.Add(-1) == closedBit {
		select {
		case f.drained <- struct{}{}:
		default:
		}
	}
}

// ReadAt reads len(p) bytes at off, as io.ReaderAt does. Safe for
// concurrent use. The caller guarantees the alignment O_DIRECT needs (File
// does not check it; the kernel answers EINVAL). Anything short of len(p)
// is an error returned with the count read: io.EOF itself, unwrapped, when
// the file ended, so io.SectionReader and io.ReadAll see the end they
// expect.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	return f.rw(false, p, off)
}

// WriteAt writes p at off. Same rules as ReadAt; a short write is an
// error wrapping io.ErrShortWrite.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	return f.rw(true, p, off)
}

func opName(write bool) string {
	if write {
		return "write"
	}
	return "read"
}

func (f *File) rw(write bool, p []byte, off int64) (int, error) {
	if !f.enter() {
		return 0, ErrClosed
	}
	defer f.exit()
	if off < 0 {
		return 0, fmt.Errorf("iouring: %s at negative offset %d: %w", opName(write), off, syscall.EINVAL)
	}
	return f.finish(write, p, off, 0)
}

// finish transfers p[done:], continuing after short transfers until the
// kernel reports an error or makes no progress.
func (f *File) finish(write bool, p []byte, off int64, done int) (int, error) {
	for done < len(p) {
		chunk := p[done:]
		if len(chunk) > maxRW {
			chunk = chunk[:maxRW]
		}
		n, err := f.be.rw(write, chunk, off+int64(done))
		if err != nil {
			return done, fmt.Errorf("iouring: %s %d bytes at offset %d on fd %d: %w", opName(write), len(p), off, f.fd, err)
		}
		if n == 0 {
			return done, shortErr(write, done, len(p), off)
		}
		done += n
	}
	return done, nil
}

// ReadvAt reads into bufs, in order, the len(bufs[0])+len(bufs[1])+...
// bytes at off: one vectored request (READV, or preadv under psync) per
// MaxIovecs buffers, so non-contiguous memory is filled from a contiguous
// range of the file without a bounce copy. Same rules as ReadAt: safe for
// concurrent use, the caller guarantees each buffer's alignment, and
// anything short is an error returned with the count read (io.EOF when the
// file ended). The io_uring
// path allocates nothing per call in steady state; fixed buffers (a
// registered arena) are not used for vectored requests.
func (f *File) ReadvAt(bufs [][]byte, off int64) (int, error) {
	return f.rwv(false, bufs, off)
}

// WritevAt writes bufs, in order, as one contiguous range at off. Same
// rules as ReadvAt; a short write is an error wrapping io.ErrShortWrite.
func (f *File) WritevAt(bufs [][]byte, off int64) (int, error) {
	return f.rwv(true, bufs, off)
}

func (f *File) rwv(write bool, bufs [][]byte, off int64) (int, error) {
	if !f.enter() {
		return 0, ErrClosed
	}
	defer f.exit()
	if off < 0 {
		return 0, fmt.Errorf("iouring: vectored %s at negative offset %d: %w", opName(write), off, syscall.EINVAL)
	}
	return f.finishv(write, bufs, vecLen(bufs), off, 0)
}

// vecLen is the total length of bufs.
func vecLen(bufs [][]byte) int {
	n := 0
	for _, b := range bufs {
		n += len(b)
	}
	return n
}

// finishv transfers bufs from byte done of total on, one request of up to
// MaxIovecs buffers at a time, continuing after short transfers until the
// kernel reports an error or makes no progress.
func (f *File) finishv(write bool, bufs [][]byte, total int, off int64, done int) (int, error) {
	// (i, skip): the first byte not yet transferred is bufs[i][skip];
	// empty buffers are skipped, so every request carries bytes.
	i, skip := 0, done
	for i < len(bufs) && skip >= len(bufs[i]) {
		skip -= len(bufs[i])
		i++
	}
	for done < total {
		n, err := f.be.rwv(write, bufs[i:], skip, off+int64(done))
		if err != nil {
			return done, fmt.Errorf("iouring: vectored %s of %d bytes in %d buffers at offset %d on fd %d: %w",
				opName(write), total, len(bufs), off, f.fd, err)
		}
		if n == 0 {
			return done, shortErr(write, done, total, off)
		}
		if n > total-done {
			panic(fmt.Sprintf("iouring: vectored %s transferred %d bytes, only %d were left", opName(write), n, total-done))
		}
		done += n
		skip += n
		for i < len(bufs) && skip >= len(bufs[i]) {
			skip -= len(bufs[i])
			i++
		}
	}
	return done, nil
}

// shortErr is the error of a transfer the kernel ended early without an
// error: for a read, the file ended — io.EOF itself, as io.ReaderAt
// reports it; for a write, io.ErrShortWrite with the counts.
func shortErr(write bool, n, want int, off int64) error {
	if !write {
		return io.EOF
	}
	return fmt.Errorf("iouring: short write: %d of %d bytes at offset %d: %w", n, want, off, io.ErrShortWrite)
}

// Sync makes every write that completed before the call durable
// (fdatasync; IORING_OP_FSYNC with DATASYNC under io_uring).
func (f *File) Sync() error {
	if !f.enter() {
		return ErrClosed
	}
	defer f.exit()
	if err := f.be.sync(); err != nil {
		return fmt.Errorf("iouring: fdatasync fd %d: %w", f.fd, err)
	}
	return nil
}

// Do issues every op at once (as many in flight as the queue depth allows),
// waits for all of them, sets each op's N and Err, and returns the first
// error (nil if all succeeded). Ops are not ordered with respect to each
// other. Bad input (a negative offset) fails the whole call before any I/O.
func (f *File) Do(ops []Op) error {
	if !f.enter() {
		return ErrClosed
	}
	defer f.exit()
	for i := range ops {
		if ops[i].Off < 0 {
			return fmt.Errorf("iouring: Do: op %d at negative offset %d: %w", i, ops[i].Off, syscall.EINVAL)
		}
	}
	if len(ops) == 0 {
		return nil
	}
	for i := range ops {
		ops[i].N, ops[i].Err = 0, nil
	}
	f.be.do(ops)
	var first error
	for i := range ops {
		op := &ops[i]
		if f.settle(op) {
			f.continueOp(op)
		}
		if op.Err != nil && first == nil {
			first = fmt.Errorf("iouring: Do: op %d of %d: %w", i, len(ops), op.Err)
		}
	}
	return first
}

// ErrNoSlot is returned by Start when every request slot is in use, and
// by a File that has no asynchronous path (psync mode) wrapped with
// errors.ErrUnsupported: the caller issues the request synchronously
// instead, or later.
var ErrNoSlot = errors.New("iouring: no free request slot")

// Start issues op without waiting for it, and calls done, exactly once,
// with op's N and Err set as Do sets them. done runs on the goroutine that
// reaps the completion (a reactor, or a Poll caller), so it must be quick
// and must not block; it may call Start. That is its point: a caller that
// keeps a queue full from done needs no goroutine to be scheduled between
// one request's completion and the next one's submission, which on a
// machine whose CPUs are busy can take milliseconds. A short transfer is
// continued synchronously on a goroutine of its own, which then calls
// done.
//
// Start returns an error, and never calls done, when the File is closed
// (ErrClosed), op has a negative offset, no request slot is free
// (ErrNoSlot), or the File runs in psync mode (ErrNoSlot wrapped with
// errors.ErrUnsupported). op must stay untouched until done.
func (f *File) Start(op *Op, done func(*Op)) error {
	if !f.enter() {
		return ErrClosed
	}
	if op.Off < 0 {
		f.exit()
		return fmt.Errorf("iouring: Start: %s at negative offset %d: %w", opName(op.Write), op.Off, syscall.EINVAL)
	}
	op.N, op.Err = 0, nil
	err := f.be.start(op, func(res int32) {
		if res < 0 {
			op.Err = errnoOf(res)
		} else {
			op.N = int(res)
		}
		if f.settle(op) {
			go func() {
				f.continueOp(op)
				done(op)
				f.exit()
			}()
			return
		}
		// done before exit: Close returns only after the last callback.
		done(op)
		f.exit()
	})
	if err != nil {
		f.exit()
		return err
	}
	return nil
}

// want is the number of bytes op transfers when it completes.
func (op *Op) want() int {
	if op.Bufs != nil {
		return vecLen(op.Bufs)
	}
	return len(op.Buf)
}

// settle wraps a failed op's error as Do does, and reports whether op
// was short and must be continued (see continueOp).
func (f *File) settle(op *Op) bool {
	want := op.want()
	switch {
	case op.Err != nil:
		op.Err = fmt.Errorf("iouring: %s %d bytes at offset %d on fd %d: %w", opName(op.Write), want, op.Off, f.fd, op.Err)
	case op.N > want:
		panic(fmt.Sprintf("iouring: %s of %d bytes transferred %d", opName(op.Write), want, op.N))
	case op.N < want:
		return true
	}
	return false
}

// continueOp finishes a short op synchronously, as Do does.
func (f *File) continueOp(op *Op) {
	want := op.want()
	switch {
	case op.Bufs != nil:
		// Short, or longer than one request: continue. Even N == 0 is
		// retried once (the request may have been MaxIovecs empty
		// buffers); finishv skips empty buffers and stops at the first
		// request that moves nothing.
		op.N, op.Err = f.finishv(op.Write, op.Bufs, want, op.Off, op.N)
	case op.N == 0:
		op.Err = shortErr(op.Write, 0, want, op.Off)
	default:
		op.N, op.Err = f.finish(op.Write, op.Buf, op.Off, op.N)
	}
}

// RegisterArena registers a on every ring (replacing any previous arena;
// nil unregisters), so that buffers inside it use READ_FIXED/WRITE_FIXED.
// Requests in flight finish first. If the kernel refuses (RLIMIT_MEMLOCK
// ...), RegisterArena first raises the soft RLIMIT_MEMLOCK to the hard
// limit and retries; if that fails too it returns nil and keeps using plain
// READ/WRITE, and Reason says so. Under psync it only records the arena.
func (f *File) RegisterArena(a *Arena) error {
	if !f.enter() {
		return ErrClosed
	}
	defer f.exit()
	note, err := f.be.registerArena(a)
	if err != nil {
		return err
	}
	r := f.base
	if note != "" {
		r += "; " + note
	}
	f.reason.Store(&r)
	return nil
}

// Close stops intake (calls made from now on return ErrClosed), waits for
// every call in progress and so every request in flight, then unregisters
// buffers, unmaps the rings and stops the reactors. It does not close fd.
func (f *File) Close() error {
	old := f.state.Or(closedBit)
	if old&closedBit != 0 {
		return ErrClosed
	}
	if old != 0 {
		<-f.drained
	}
	return f.be.close()
}

// errnoOf turns a kernel result into an error (nil for res >= 0).
func errnoOf(res int32) error {
	if res >= 0 {
		return nil
	}
	return syscall.Errno(-res)
}

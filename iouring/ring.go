//go:build linux

package iouring

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	// ErrSQFull is returned by the Prep methods when no request can be
	// queued now: either every SQE is taken, or one more request in flight
	// could overflow the completion queue (see ErrCQFull). Submit and Reap,
	// then retry.
	ErrSQFull = errors.New("iouring: submission queue full")
	// ErrCQFull wraps ErrSQFull: the SQ has room, but the requests in flight
	// plus those prepared already fill the CQ, and one more could overflow
	// it. Reap (after Submit with a wait) before preparing more.
	ErrCQFull = fmt.Errorf("%w: in-flight requests fill the completion queue", ErrSQFull)
	// ErrBusy is returned (wrapped, with the errno) by Submit when the
	// kernel answers EBUSY or EAGAIN: reap completions, then retry.
	ErrBusy = errors.New("iouring: ring busy")
	// ErrClosed is returned by every call on a closed Ring, File or Arena.
	ErrClosed = errors.New("iouring: closed")
	// ErrWrongThread is returned when a ring set up with SINGLE_ISSUER is
	// used from an OS thread other than the one that created it (the kernel
	// answers EEXIST). See NewRing.
	ErrWrongThread = errors.New("iouring: SINGLE_ISSUER ring used from another OS thread (hold runtime.LockOSThread from NewRing to Close)")
)

// RingOptions configures NewRing.
type RingOptions struct {
	// Entries is the number of SQ entries: a power of two, 1..32768; 0 means
	// 128. The CQ gets twice as many.
	Entries uint32
	// NoSingleIssuer skips the IORING_SETUP_SINGLE_ISSUER|DEFER_TASKRUN
	// attempt, for callers that cannot keep every call on one OS thread.
	NoSingleIssuer bool
	// Notify asks for completions to be posted as they happen, even while
	// the submitting thread sleeps (no SINGLE_ISSUER, DEFER_TASKRUN or
	// COOP_TASKRUN), for a caller that waits for them on a registered
	// eventfd rather than in io_uring_enter.
	Notify bool
}

// Ring is one io_uring instance: its SQ and CQ rings and SQE array mapped
// into this process. It is owned by one goroutine and is not safe for
// concurrent use.
//
// NewRing first tries IORING_SETUP_SINGLE_ISSUER|DEFER_TASKRUN (Linux 6.1+),
// then COOP_TASKRUN (5.19+), then no flags; with RingOptions.Notify only
// SUBMIT_ALL, then no flags. A SINGLE_ISSUER ring belongs to
// the OS thread that created it: the goroutine must call
// runtime.LockOSThread before NewRing and hold the lock until Close returns;
// calls from any other thread fail with ErrWrongThread. Set
// RingOptions.NoSingleIssuer when that is not possible. With DEFER_TASKRUN,
// completions are posted only while the owner is inside io_uring_enter, so
// Reap sees new completions only after a Submit (Submit(0) polls).
//
// Buffers passed to the Prep methods are read or written by the kernel
// after the call returns: the caller must keep each one referenced and
// unmodified (for writes) until Reap delivers its completion.
type Ring struct {
	fd       int
	flags    uint32 // setup flags the kernel accepted
	features uint32
	ops      [256]bool // supported opcodes (IORING_REGISTER_PROBE)

	sqMem, cqMem, sqeMem []byte

	sqHead, sqTail *uint32
	sqMask         uint32
	sqEntries      uint32
	sqes           []sqe
	keep           [][]byte       // keep[i]: buffer of the request last prepared in SQE i
	keepIov        [][]unix.Iovec // keepIov[i]: its iovec array, for READV/WRITEV

	cqHead, cqTail *uint32
	cqMask         uint32
	cqEntries      uint32
	cqes           []cqe

	tail     uint32 // local SQ tail: SQEs prepared, published to *sqTail by Submit
	inflight uint32 // consumed by the kernel, completion not yet reaped

	fixed  [][]byte // registered buffers, index = buf_index
	closed bool
}

// NewRing sets up an io_uring with opts.Entries SQ entries and maps it.
func NewRing(opts RingOptions) (*Ring, error) {
	entries := opts.Entries
	if entries == 0 {
		entries = 128
	}
	if entries > maxEntries || entries&(entries-1) != 0 {
		return nil, fmt.Errorf("iouring: ring entries %d: want a power of two in 1..%d", entries, maxEntries)
	}
	attempts := []uint32{
		setupSingleIssuer | setupDeferTaskrun | setupSubmitAll,
		setupCoopTaskrun | setupSubmitAll,
		0,
	}
	if opts.NoSingleIssuer {
		attempts = attempts[1:]
	}
	if opts.Notify {
		attempts = []uint32{setupSubmitAll, 0}
	}
	var (
		p     params
		fd    = -1
		errno syscall.Errno
	)
	for _, flags := range attempts {
		p = params{flags: flags}
		fd, errno = sysSetup(entries, &p)
		if errno != syscall.EINVAL {
			break // success, or a refusal that other flags will not cure
		}
	}
	if errno != 0 {
		return nil, fmt.Errorf("iouring: io_uring_setup(%d entries): %w", entries, errno)
	}
	r := &Ring{fd: fd, flags: p.flags, features: p.features}
	if err := r.mapRings(&p); err != nil {
		r.unmap()
		unix.Close(fd)
		return nil, err
	}
	ops, err := probeOps(fd)
	if err != nil {
		r.unmap()
		unix.Close(fd)
		return nil, fmt.Errorf("iouring: %w", err)
	}
	r.ops = ops
	return r, nil
}

func (r *Ring) mapRings(p *params) error {
	const prot = unix.PROT_READ | unix.PROT_WRITE
	const flags = unix.MAP_SHARED | unix.MAP_POPULATE
	sqSize := int(p.sqOff.array) + int(p.sqEntries)*4
	cqSize := int(p.cqOff.cqes) + int(p.cqEntries)*int(unsafe.Sizeof(cqe{}))
	var err error
	if p.features&featSingleMmap != 0 {
		size := max(sqSize, cqSize)
		if r.sqMem, err = unix.Mmap(r.fd, offSQRing, size, prot, flags); err != nil {
			return fmt.Errorf("iouring: mmap rings: %w", err)
		}
		r.cqMem = r.sqMem
	} else {
		if r.sqMem, err = unix.Mmap(r.fd, offSQRing, sqSize, prot, flags); err != nil {
			return fmt.Errorf("iouring: mmap SQ ring: %w", err)
		}
		if r.cqMem, err = unix.Mmap(r.fd, offCQRing, cqSize, prot, flags); err != nil {
			return fmt.Errorf("iouring: mmap CQ ring: %w", err)
		}
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*int(unsafe.Sizeof(sqe{})), prot, flags); err != nil {
		return fmt.Errorf("iouring: mmap SQEs: %w", err)
	}
	u32 := func(mem []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&mem[off])) }
	r.sqHead = u32(r.sqMem, p.sqOff.head)
	r.sqTail = u32(r.sqMem, p.sqOff.tail)
	r.sqMask = *u32(r.sqMem, p.sqOff.ringMask)
	r.sqEntries = *u32(r.sqMem, p.sqOff.ringEntries)
	r.cqHead = u32(r.cqMem, p.cqOff.head)
	r.cqTail = u32(r.cqMem, p.cqOff.tail)
	r.cqMask = *u32(r.cqMem, p.cqOff.ringMask)
	r.cqEntries = *u32(r.cqMem, p.cqOff.ringEntries)
	if r.sqEntries != p.sqEntries || r.cqEntries != p.cqEntries || r.sqMask != r.sqEntries-1 || r.cqMask != r.cqEntries-1 {
		return fmt.Errorf("iouring: inconsistent ring geometry: sq %d/%d mask %d, cq %d/%d mask %d",
			r.sqEntries, p.sqEntries, r.sqMask, r.cqEntries, p.cqEntries, r.cqMask)
	}
	// The SQ index array maps ring positions to SQEs. SQE i is always used
	// for ring position i (mod size), so the identity mapping is written
	// once and never touched again.
	array := unsafe.Slice((*uint32)(unsafe.Pointer(&r.sqMem[p.sqOff.array])), r.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&r.sqeMem[0])), r.sqEntries)
	r.cqes = unsafe.Slice((*cqe)(unsafe.Pointer(&r.cqMem[p.cqOff.cqes])), r.cqEntries)
	r.keep = make([][]byte, r.sqEntries)
	r.keepIov = make([][]unix.Iovec, r.sqEntries)
	r.tail = atomic.LoadUint32(r.sqTail)
	return nil
}

func (r *Ring) unmap() {
	if r.sqeMem != nil {
		unix.Munmap(r.sqeMem)
	}
	if r.cqMem != nil && len(r.cqMem) > 0 && &r.cqMem[0] != &r.sqMem[0] {
		unix.Munmap(r.cqMem)
	}
	if r.sqMem != nil {
		unix.Munmap(r.sqMem)
	}
	r.sqMem, r.cqMem, r.sqeMem = nil, nil, nil
	r.sqes, r.cqes, r.keep, r.keepIov = nil, nil, nil, nil
}

// SQEntries is the size of the submission queue.
func (r *Ring) SQEntries() int { return int(r.sqEntries) }

// CQEntries is the size of the completion queue: the most requests that may
// be in flight (submitted or prepared, not yet reaped) at once.
func (r *Ring) CQEntries() int { return int(r.cqEntries) }

// InFlight is the number of requests submitted to the kernel whose
// completions have not been reaped yet.
func (r *Ring) InFlight() int { return int(r.inflight) }

// Pending is the number of requests prepared but not yet consumed by the
// kernel.
func (r *Ring) Pending() int {
	if r.closed {
		return 0
	}
	return int(r.tail - atomic.LoadUint32(r.sqHead))
}

// SQSpace is the number of requests that can be prepared now: free SQEs,
// further limited so that in-flight plus prepared requests never exceed
// the CQ size.
func (r *Ring) SQSpace() int {
	if r.closed {
		return 0
	}
	pending := r.tail - atomic.LoadUint32(r.sqHead)
	sq := int(r.sqEntries) - int(pending)
	cq := int(r.cqEntries) - int(r.inflight) - int(pending)
	return max(0, min(sq, cq))
}

// Flags names the setup flags the kernel accepted, e.g.
// "SINGLE_ISSUER|DEFER_TASKRUN|SUBMIT_ALL".
func (r *Ring) Flags() string {
	var names []string
	for _, f := range []struct {
		bit  uint32
		name string
	}{
		{setupSingleIssuer, "SINGLE_ISSUER"},
		{setupDeferTaskrun, "DEFER_TASKRUN"},
		{setupCoopTaskrun, "COOP_TASKRUN"},
		{setupSubmitAll, "SUBMIT_ALL"},
	} {
		if r.flags&f.bit != 0 {
			names = append(names, f.name)
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, "|")
}

// SingleIssuer reports whether the ring is bound to the OS thread that
// created it (see NewRing).
func (r *Ring) SingleIssuer() bool { return r.flags&setupSingleIssuer != 0 }

// Supports reports whether the kernel supports an io_uring opcode (as
// numbered in <linux/io_uring.h>), from IORING_REGISTER_PROBE.
func (r *Ring) Supports(opcode uint8) bool { return r.ops[opcode] }

// nextSQE checks what every request shares and returns the index of the
// SQE to fill.
func (r *Ring) nextSQE(op uint8, fd int, off int64) (uint32, error) {
	if r.closed {
		return 0, ErrClosed
	}
	if !r.ops[op] {
		return 0, fmt.Errorf("iouring: opcode %s not supported by this kernel: %w", opNames[op], errors.ErrUnsupported)
	}
	if off < 0 {
		return 0, fmt.Errorf("iouring: %s at negative offset %d: %w", opNames[op], off, syscall.EINVAL)
	}
	if fd < math.MinInt32 || fd > math.MaxInt32 {
		return 0, fmt.Errorf("iouring: fd %d out of range: %w", fd, syscall.EBADF)
	}
	pending := r.tail - atomic.LoadUint32(r.sqHead)
	if pending >= r.sqEntries {
		return 0, ErrSQFull
	}
	if r.inflight+pending >= r.cqEntries {
		return 0, ErrCQFull
	}
	return r.tail & r.sqMask, nil
}

// prep fills the next SQE. It and prepVec are the only writers of SQEs;
// Submit publishes them.
func (r *Ring) prep(op uint8, fd int, buf []byte, off int64, opFlags uint32, bufIndex uint16, userData uint64) error {
	if len(buf) > maxRW {
		return fmt.Errorf("iouring: %s of %d bytes exceeds the %d-byte limit of one request: %w", opNames[op], len(buf), maxRW, syscall.EINVAL)
	}
	i, err := r.nextSQE(op, fd, off)
	if err != nil {
		return err
	}
	var addr uint64
	if len(buf) > 0 {
		addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
	}
	r.sqes[i] = sqe{
		opcode:   op,
		fd:       int32(fd),
		off:      uint64(off),
		addr:     addr,
		len:      uint32(len(buf)),
		opFlags:  opFlags,
		userData: userData,
		bufIndex: bufIndex,
	}
	// Storing the buffer here makes it escape to the heap (a stack buffer
	// could move while the kernel writes into it) and keeps it referenced
	// at least until this SQE is reused.
	r.keep[i] = buf
	r.keepIov[i] = nil
	r.tail++
	return nil
}

// prepVec fills the next SQE with a READV or WRITEV of iov.
func (r *Ring) prepVec(op uint8, fd int, iov []unix.Iovec, off int64, userData uint64) error {
	if len(iov) > MaxIovecs {
		return fmt.Errorf("iouring: %s of %d buffers exceeds the %d-buffer limit of one request: %w", opNames[op], len(iov), MaxIovecs, syscall.EINVAL)
	}
	var total uint64
	for j := range iov {
		total += iov[j].Len
	}
	if total > maxRW {
		return fmt.Errorf("iouring: %s of %d bytes exceeds the %d-byte limit of one request: %w", opNames[op], total, maxRW, syscall.EINVAL)
	}
	i, err := r.nextSQE(op, fd, off)
	if err != nil {
		return err
	}
	var addr uint64
	if len(iov) > 0 {
		addr = uint64(uintptr(unsafe.Pointer(&iov[0])))
	}
	r.sqes[i] = sqe{
		opcode:   op,
		fd:       int32(fd),
		off:      uint64(off),
		addr:     addr,
		len:      uint32(len(iov)),
		userData: userData,
	}
	// As in prep: the array (and, through its Base pointers, the buffers)
	// escapes to the heap and stays referenced at least until this SQE is
	// reused; the caller keeps it until the completion.
	r.keep[i] = nil
	r.keepIov[i] = iov
	r.tail++
	return nil
}

// PrepNop queues a no-op request; its completion has res 0.
func (r *Ring) PrepNop(userData uint64) error {
	return r.prep(opNop, -1, nil, 0, 0, 0, userData)
}

// PrepRead queues a read of len(buf) bytes at off from fd into buf.
func (r *Ring) PrepRead(fd int, buf []byte, off int64, userData uint64) error {
	return r.prep(opRead, fd, buf, off, 0, 0, userData)
}

// PrepWrite queues a write of buf to fd at off.
func (r *Ring) PrepWrite(fd int, buf []byte, off int64, userData uint64) error {
	return r.prep(opWrite, fd, buf, off, 0, 0, userData)
}

// checkFixed verifies that buf lies inside registered buffer bufIndex: the
// kernel would refuse it with EFAULT, but without saying which rule broke.
func (r *Ring) checkFixed(buf []byte, bufIndex uint16) error {
	if int(bufIndex) >= len(r.fixed) {
		return fmt.Errorf("iouring: fixed buffer index %d, %d registered: %w", bufIndex, len(r.fixed), syscall.EINVAL)
	}
	if len(buf) == 0 {
		return nil
	}
	reg := r.fixed[bufIndex]
	lo := uintptr(unsafe.Pointer(&reg[0]))
	p := uintptr(unsafe.Pointer(&buf[0]))
	if p < lo || p+uintptr(len(buf)) > lo+uintptr(len(reg)) {
		return fmt.Errorf("iouring: buffer %#x+%d not inside registered buffer %d (%#x+%d): %w",
			p, len(buf), bufIndex, lo, len(reg), syscall.EFAULT)
	}
	return nil
}

// PrepReadFixed queues a READ_FIXED into buf, which must lie inside the
// buffer registered at bufIndex.
func (r *Ring) PrepReadFixed(fd int, buf []byte, off int64, bufIndex uint16, userData uint64) error {
	if r.closed {
		return ErrClosed
	}
	if err := r.checkFixed(buf, bufIndex); err != nil {
		return err
	}
	return r.prep(opReadFixed, fd, buf, off, 0, bufIndex, userData)
}

// PrepWriteFixed queues a WRITE_FIXED from buf, which must lie inside the
// buffer registered at bufIndex.
func (r *Ring) PrepWriteFixed(fd int, buf []byte, off int64, bufIndex uint16, userData uint64) error {
	if r.closed {
		return ErrClosed
	}
	if err := r.checkFixed(buf, bufIndex); err != nil {
		return err
	}
	return r.prep(opWriteFixed, fd, buf, off, 0, bufIndex, userData)
}

// PrepReadv queues a vectored read (IORING_OP_READV) at off from fd into
// the buffers iovecs describes, filled in order. At most MaxIovecs entries
// and maxRW (1 GiB) bytes in all. The kernel may read the iovec array
// itself as late as when it issues the request, and writes into the
// buffers until the completion: the caller keeps the array, unmodified,
// and every buffer it points to referenced until Reap delivers the
// completion (a Go pointer in Iovec.Base is enough to keep a buffer alive
// while the array is). O_DIRECT needs each buffer's address and length
// aligned, not only their sum.
func (r *Ring) PrepReadv(fd int, iovecs []unix.Iovec, off int64, userData uint64) error {
	return r.prepVec(opReadv, fd, iovecs, off, userData)
}

// PrepWritev queues a vectored write (IORING_OP_WRITEV) of the buffers
// iovecs describes, in order, to fd at off. Same rules as PrepReadv; the
// buffers must also stay unmodified until the completion.
func (r *Ring) PrepWritev(fd int, iovecs []unix.Iovec, off int64, userData uint64) error {
	return r.prepVec(opWritev, fd, iovecs, off, userData)
}

// PrepFsync queues an fsync of fd (fdatasync when datasync is true). It
// covers writes that completed before it was submitted; io_uring does not
// order it after requests still in flight.
func (r *Ring) PrepFsync(fd int, datasync bool, userData uint64) error {
	var fl uint32
	if datasync {
		fl = fsyncDatasync
	}
	return r.prep(opFsync, fd, nil, 0, fl, 0, userData)
}

// cqReady is the number of completions posted and not yet reaped.
func (r *Ring) cqReady() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// Submit makes one io_uring_enter call that submits every prepared request
// and waits until at least waitNr completions are available to Reap (0: do
// not wait). It returns how many requests the kernel consumed. EINTR is
// retried (as are further calls when a signal cut a wait short); EBUSY and
// EAGAIN are returned wrapping ErrBusy, after which the caller reaps and
// retries. Waiting for more completions than requests in flight is refused,
// since it could never return.
func (r *Ring) Submit(waitNr uint32) (submitted int, err error) {
	if err := r.checkWait(waitNr); err != nil {
		return 0, err
	}
	return r.enter(waitNr, 0)
}

// HasMinWait reports whether the kernel supports SubmitMinWait (Linux 6.12+,
// IORING_FEAT_MIN_TIMEOUT).
func (r *Ring) HasMinWait() bool { return r.features&featMinTimeout != 0 }

// SubmitMinWait is Submit with a batch wait: it waits for waitNr
// completions, but once minWait has passed it returns as soon as at least
// one is available. It batches completions without holding any of them
// longer than minWait. Without kernel support (HasMinWait) it returns an
// error wrapping errors.ErrUnsupported.
func (r *Ring) SubmitMinWait(waitNr uint32, minWait time.Duration) (submitted int, err error) {
	if err := r.checkWait(waitNr); err != nil {
		return 0, err
	}
	if !r.HasMinWait() {
		return 0, fmt.Errorf("iouring: SubmitMinWait needs IORING_FEAT_MIN_TIMEOUT (Linux 6.12): %w", errors.ErrUnsupported)
	}
	us := minWait.Microseconds()
	if us < 1 || us > math.MaxUint32 {
		return 0, fmt.Errorf("iouring: SubmitMinWait(%v): want 1µs..%dµs: %w", minWait, uint32(math.MaxUint32), syscall.EINVAL)
	}
	return r.enter(waitNr, uint32(us))
}

func (r *Ring) checkWait(waitNr uint32) error {
	if r.closed {
		return ErrClosed
	}
	pending := r.tail - atomic.LoadUint32(r.sqHead)
	if uint64(waitNr) > uint64(r.inflight)+uint64(pending) {
		return fmt.Errorf("iouring: Submit waiting for %d completions with only %d requests in flight or prepared would never return: %w",
			waitNr, r.inflight+pending, syscall.EINVAL)
	}
	return nil
}

// enter publishes the prepared SQEs and calls io_uring_enter until they are
// all consumed and waitNr completions are ready (with minWaitUsec > 0: one
// completion, once the kernel has waited that long).
func (r *Ring) enter(waitNr, minWaitUsec uint32) (submitted int, err error) {
	atomic.StoreUint32(r.sqTail, r.tail)
	deferred := r.flags&setupDeferTaskrun != 0
	first := true
	need := waitNr
	batch := minWaitUsec > 0 && waitNr > 1 // a batch wait not yet made
	for {
		pending := r.tail - atomic.LoadUint32(r.sqHead)
		var wait uint32
		if need > 0 && r.cqReady() < need {
			wait = need
		}
		// A DEFER_TASKRUN ring posts completions only inside
		// io_uring_enter(GETEVENTS), so even Submit(0) enters once.
		if pending == 0 && wait == 0 && !(deferred && first) {
			return submitted, nil
		}
		var flags uint32
		if wait > 0 || deferred {
			flags = enterGetEvents
		}
		var n int
		var errno syscall.Errno
		batchWait := batch && wait > 0
		if batchWait {
			arg := getEventsArg{minWaitUsec: minWaitUsec}
			n, errno = sysEnterArg(r.fd, pending, wait, flags, &arg)
		} else {
			n, errno = sysEnter(r.fd, pending, wait, flags)
		}
		if batchWait && (errno == 0 || errno == syscall.ETIME) {
			// The kernel has waited its minimum: from now on one
			// completion is enough, waited for without a timer.
			batch, need = false, 1
		}
		switch errno {
		case 0:
		case syscall.EINTR:
			continue
		case syscall.ETIME:
			if batchWait {
				continue
			}
			return submitted, fmt.Errorf("iouring: io_uring_enter: %w", errno)
		case syscall.EBUSY, syscall.EAGAIN:
			return submitted, fmt.Errorf("%w: io_uring_enter: %w", ErrBusy, errno)
		case syscall.EEXIST:
			if r.flags&setupSingleIssuer != 0 {
				return submitted, fmt.Errorf("%w: io_uring_enter: %w", ErrWrongThread, errno)
			}
			return submitted, fmt.Errorf("iouring: io_uring_enter: %w", errno)
		default:
			return submitted, fmt.Errorf("iouring: io_uring_enter: %w", errno)
		}
		if n < 0 || uint32(n) > pending {
			panic(fmt.Sprintf("iouring: io_uring_enter consumed %d SQEs, only %d were pending", n, pending))
		}
		first = false
		submitted += n
		r.inflight += uint32(n)
		if n == 0 && pending > 0 {
			// The kernel consumed nothing and reported no error: nothing
			// a retry would change.
			return submitted, fmt.Errorf("%w: io_uring_enter consumed none of %d requests", ErrBusy, pending)
		}
	}
}

// Reap calls fn for every completion available now (res < 0 is -errno),
// advances the CQ head past each one before calling fn, and returns how many
// it reaped. It never blocks and never enters the kernel.
func (r *Ring) Reap(fn func(userData uint64, res int32)) int {
	if r.closed {
		return 0
	}
	n := 0
	for {
		head := atomic.LoadUint32(r.cqHead)
		if head == atomic.LoadUint32(r.cqTail) {
			return n
		}
		c := &r.cqes[head&r.cqMask]
		ud, res := c.userData, c.res
		atomic.StoreUint32(r.cqHead, head+1)
		if r.inflight == 0 {
			panic("iouring: completion reaped with no request in flight")
		}
		r.inflight--
		n++
		fn(ud, res)
	}
}

// RegisterEventfd makes the kernel signal efd whenever it posts
// completions. A ring has at most one; Close unregisters it.
func (r *Ring) RegisterEventfd(efd int) error {
	if r.closed {
		return ErrClosed
	}
	fd := int32(efd)
	if errno := sysRegister(r.fd, regEventfd, unsafe.Pointer(&fd), 1); errno != 0 {
		return fmt.Errorf("iouring: io_uring_register(EVENTFD): %w", errno)
	}
	return nil
}

// RegisterBuffers registers bufs for READ_FIXED/WRITE_FIXED (index i =
// bufs[i]); the kernel pins their pages, counted against RLIMIT_MEMLOCK
// unless the process has CAP_IPC_LOCK. Each buffer must be at most 1 GiB.
// The ring keeps them referenced until UnregisterBuffers or Close.
func (r *Ring) RegisterBuffers(bufs [][]byte) error {
	if r.closed {
		return ErrClosed
	}
	if len(bufs) == 0 || len(bufs) > math.MaxUint16 {
		return fmt.Errorf("iouring: RegisterBuffers with %d buffers: want 1..%d: %w", len(bufs), math.MaxUint16, syscall.EINVAL)
	}
	iov := make([]unix.Iovec, len(bufs))
	for i, b := range bufs {
		if len(b) == 0 || len(b) > maxFixedBuf {
			return fmt.Errorf("iouring: registered buffer %d is %d bytes: want 1..%d: %w", i, len(b), maxFixedBuf, syscall.EINVAL)
		}
		iov[i].Base = &b[0]
		iov[i].SetLen(len(b))
	}
	if errno := sysRegister(r.fd, regBuffers, unsafe.Pointer(&iov[0]), uint32(len(iov))); errno != 0 {
		if errno == syscall.EEXIST && r.flags&setupSingleIssuer != 0 {
			return fmt.Errorf("%w: io_uring_register(BUFFERS): %w", ErrWrongThread, errno)
		}
		return fmt.Errorf("iouring: io_uring_register(BUFFERS, %d buffers): %w", len(bufs), errno)
	}
	r.fixed = append([][]byte(nil), bufs...)
	return nil
}

// UnregisterBuffers drops the buffers registered by RegisterBuffers.
// Requests already submitted with them complete normally.
func (r *Ring) UnregisterBuffers() error {
	if r.closed {
		return ErrClosed
	}
	if errno := sysRegister(r.fd, unregBuffers, nil, 0); errno != 0 {
		if errno == syscall.EEXIST && r.flags&setupSingleIssuer != 0 {
			return fmt.Errorf("%w: io_uring_register(UNREGISTER_BUFFERS): %w", ErrWrongThread, errno)
		}
		return fmt.Errorf("iouring: io_uring_register(UNREGISTER_BUFFERS): %w", errno)
	}
	r.fixed = nil
	return nil
}

// Close waits for every request in flight to complete (their completions
// are discarded: the kernel must not write into memory after it is
// unmapped or freed), unregisters buffers, unmaps the rings and closes the
// ring. Prepared requests that were never submitted are dropped. If the
// wait fails (a SINGLE_ISSUER ring closed from the wrong thread), Close
// returns the error and leaves the ring open. Later calls return ErrClosed.
func (r *Ring) Close() error {
	if r.closed {
		return ErrClosed
	}
	// Prepared requests are dropped only once Close succeeds: a Close that
	// fails leaves the ring as it was, those requests included (the next
	// enter publishes them again).
	prepared := r.tail
	r.tail = atomic.LoadUint32(r.sqHead)
	for r.inflight > 0 {
		if _, err := r.enter(r.inflight, 0); err != nil {
			if errors.Is(err, ErrBusy) {
				r.Reap(func(uint64, int32) {})
				continue
			}
			r.tail = prepared
			return fmt.Errorf("iouring: close: draining %d requests in flight: %w", r.inflight, err)
		}
		r.Reap(func(uint64, int32) {})
	}
	var err error
	if len(r.fixed) > 0 {
		if err = r.UnregisterBuffers(); errors.Is(err, ErrWrongThread) {
			r.tail = prepared
			return fmt.Errorf("iouring: close: %w", err)
		}
	}
	r.closed = true
	r.unmap()
	if cerr := unix.Close(r.fd); cerr != nil && err == nil {
		err = fmt.Errorf("iouring: close ring fd: %w", cerr)
	}
	r.fixed = nil
	r.fd = -1
	return err
}

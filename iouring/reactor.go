//go:build linux

package iouring

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The io_uring backend. Each ring is owned by one reactor goroutine. The
// ring posts completions as they happen and signals an eventfd registered
// with it; the reactor sleeps in Go's netpoller on that eventfd (see
// sleep), so it holds no OS thread and no P while it waits. Such a ring
// ties each request to the thread that entered the kernel for it, and a
// thread that exits has the kernel cancel the requests it still holds; Go
// ends threads only under LockOSThread, and the reactor runs a cancelled
// request again (deliverCQE). Where the eventfd cannot be registered, or
// with netpollSleep off, the reactor falls back to holding its OS thread
// for the ring's whole life, with SINGLE_ISSUER|DEFER_TASKRUN when the
// kernel allows, and waits inside io_uring_enter, kicked through an
// eventfd read it keeps armed on the ring.
//
// Callers never touch the ring. A request lives in a slot of the reactor's
// table; the table has QueueDepth slots and the CQ has at least
// QueueDepth+1 entries (one for the eventfd read below), so taking a free
// slot is the semaphore that makes CQ overflow impossible. user_data is
// slot<<32 | generation, never a Go pointer; the slot holds the buffer
// until the completion arrives.
//
// Hand-off and wake-ups, the part that decides the IOPS of the synchronous
// path:
//   - intake is a lock-free stack of slot indexes (push = one CAS, take-all
//     = one Swap), so a burst of callers costs the reactor one atomic and
//     enters the ring as one batch;
//   - the reactor submits everything it took and waits for a completion in
//     the same io_uring_enter;
//   - a reactor about to sleep sets a flag in the intake word, and one
//     caller pays for waking it (an eventfd write): the first to push, unless
//     waiters the reactor has woken are still to run. Those mostly come
//     back with a request, so the pushers leave the wake-up to the last of
//     them to resume, and the reactor takes the whole round's requests in
//     one wake-up instead of one per pusher (NOPs at QD32: 0.08 -> 0.03
//     kicks and 0.16 -> 0.06 io_uring_enter per request, 2x the rate);
//   - a waiter parks only if its result is not there yet (state CAS), and
//     the reactor signals only waiters that parked;
//   - wake-ups are batched: the reactor readies only the first waiter of a
//     reaping round, which readies the rest (see waker), so the reactor
//     spends one channel send per round, not one per waiter;
//   - no allocation per request: slots, their channels and the intake are
//     reused; only errors allocate.
//
// Knobs that measured worse on a 2-CPU machine (a loop device and an
// O_DIRECT file, 32 goroutines at QD32; see file_bench_test.go) are off by
// default and kept for machines where they may pay: spinning in the
// reactor for more intake before sleeping (it burns the CPU the kernel's
// I/O path needs and delays stealing of the woken goroutines), spinning in
// waiters before parking, not waking the reactor while many requests are
// in flight, and batch waits (waitDiv: wait for inflight/waitDiv
// completions, holding none longer than batchWait, Linux 6.12+).

// Tuning knobs, measured by the benchmarks in file_bench_test.go.
var (
	reactorSpin  = time.Duration(0)      // reactor: max spin for more intake before sleeping (0: off)
	reactorIdle  = 3 * time.Microsecond  // reactor: stop spinning after this long without new intake
	kickBelow    = math.MaxInt           // callers wake a sleeping reactor only below this many in flight
	waiterSpin   = 0                     // waiter: polls of its slot before parking
	waitDiv      = 0                     // reactor: wait for inflight/waitDiv completions (0: for one)
	batchWait    = 20 * time.Microsecond // reactor: longest a batch wait holds a completion
	netpollSleep = true                  // reactor: wait in the netpoller (false: in io_uring_enter, on a locked thread)
)

const (
	kindSync  uint8 = iota // a synchronous caller waits on the slot
	kindBatch              // part of a Do batch; the reactor frees the slot
	kindCtl                // control request: register an arena
	kindAsync              // File.Start: the reactor frees the slot and calls back
)

const (
	stPending uint32 = iota
	stParked
	stDone
)

// efdUserData marks the completion of the reactor's eventfd read; no slot
// has index 0xffffffff.
const efdUserData = math.MaxUint64

// sleepBit in the intake word says the reactor is (about to be) asleep in
// the kernel and wants a kick from the next pusher.
const sleepBit = 1 << 32

type slot struct {
	// Written by the owner before the push, read by the reactor after it
	// takes the slot (the intake CAS/Swap orders them).
	op   uint8
	kind uint8
	gen  uint32
	next uint32 // intake link: index+1 of the slot below, 0 = bottom
	off  int64
	buf  []byte
	// iov[:niov] describes a READV/WRITEV. The array is the slot's own,
	// grown on demand and reused, so vectored requests allocate nothing in
	// steady state; its Base pointers keep the caller's buffers alive until
	// deliver clears them, after the completion.
	iov     []unix.Iovec
	niov    int
	batch   *batch
	bidx    int
	cb      func(res int32) // kindAsync: called with the result
	arena   *Arena
	retries uint8 // times the reactor ran it again after a cancellation

	// Written by the reactor before state becomes stDone.
	res  int32
	note string

	state atomic.Uint32
	w     waker
	_     [32]byte // keep neighbouring slots' hot words off one cache line
}

type batch struct {
	remaining atomic.Int32
	state     atomic.Uint32
	w         waker
	res       []int32
}

var batchPool = sync.Pool{New: func() any { return &batch{w: waker{c: make(chan struct{}, 1)}} }}

// waker is how a parked waiter is woken. The reactor links the wakers it
// must signal in one round into a chain and signals only the first, which
// readies the rest: the reactor gets back to the ring after one send, and
// (when it waits in io_uring_enter, holding its P) the waiters are readied
// from a P that is free to run them.
type waker struct {
	c    chan struct{}
	next *waker // rest of the chain; set by the reactor, cleared by the head
}

// wait parks until signalled, then passes the signal on down the chain.
func (w *waker) wait(r *reactor) {
	<-w.c
	if r.waking.Add(-1) == 0 {
		// Callers that pushed while woken waiters were still to run left
		// the kick to the last of them: most of those waiters come back
		// with a request, and the reactor takes them all in one wake-up.
		r.kickIfAsleep()
	}
	n := w.next
	w.next = nil
	for n != nil {
		nn := n.next
		n.next = nil // before the signal: n must not walk the chain too
		n.c <- struct{}{}
		n = nn
	}
}

type reactor struct {
	fd     int
	efd    int
	slots  []slot
	free   chan uint32
	intake atomic.Uint64
	stop   atomic.Bool
	done   chan struct{}
	err    error // set by the loop before done is closed

	// own is held by whoever drives the ring: the reactor goroutine,
	// except while it sleeps in the netpoller, or a goroutine in poll. The
	// reactor takes it when it starts and keeps it from the end of its
	// loop on, so nobody touches a closed ring.
	own sync.Mutex
	// asleep is set while the reactor sleeps in the netpoller, without own.
	asleep atomic.Bool
	// polling is set while a Poll caller reaps (see poll and push).
	polling atomic.Bool

	// Guarded by own.
	ring       *Ring
	inflight   int      // user requests submitted, not completed
	held       []uint32 // taken from intake, not yet prepared
	heldHead   int
	takeBuf    []uint32
	efdBuf     []byte
	efdArmed   bool
	efdFile    *os.File              // netpoll mode (see netpoll): the eventfd, owned by the netpoller
	efdConn    syscall.RawConn       // netpoll mode: for waiting on it
	efdRead    func(fd uintptr) bool // netpoll mode: one eventfd read, made once
	arena      *Arena
	arenaFixed bool
	complete   func(uint64, int32)
	woke       int  // waiters signalled since the reactor last slept
	minWait    bool // the kernel supports batch waits (SubmitMinWait)
	wakeHead   *waker
	wakeTail   *waker

	// waking counts waiters signalled that have not resumed yet.
	waking atomic.Int64

	nreq, nenter, nsleep, nkick, npark, nretry, npoll atomic.Uint64
}

type uringBackend struct {
	reactors []*reactor
	next     atomic.Uint32
}

// newUring starts rings reactors, each with its own ring of qd slots.
func newUring(fd, qd, rings int) (*uringBackend, string, error) {
	b := &uringBackend{}
	sq := uint32(1)
	for sq < uint32(qd)+1 {
		sq <<= 1
	}
	var desc string
	for range rings {
		r, d, err := startReactor(fd, qd, sq)
		if err != nil {
			b.close()
			return nil, "", err
		}
		desc = d
		b.reactors = append(b.reactors, r)
	}
	plural := ""
	if rings > 1 {
		plural = "s"
	}
	return b, fmt.Sprintf("%d ring%s of %d requests in flight, %s", rings, plural, qd, desc), nil
}

func startReactor(fd, qd int, sq uint32) (*reactor, string, error) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return nil, "", fmt.Errorf("iouring: eventfd: %w", err)
	}
	r := &reactor{
		fd:      fd,
		efd:     efd,
		slots:   make([]slot, qd),
		free:    make(chan uint32, qd),
		done:    make(chan struct{}),
		held:    make([]uint32, 0, qd),
		takeBuf: make([]uint32, 0, qd),
		efdBuf:  make([]byte, 8),
	}
	r.complete = r.deliverCQE
	for i := range r.slots {
		r.slots[i].w.c = make(chan struct{}, 1)
		r.free <- uint32(i)
	}
	ready := make(chan string, 1)
	go r.run(sq, ready)
	desc := <-ready
	if desc == "" {
		<-r.done
		_ = r.closeEventfd() // the ring's error is the one to report
		return nil, "", r.err
	}
	return r, desc, nil
}

// run is the reactor goroutine.
func (r *reactor) run(sq uint32, ready chan<- string) {
	defer close(r.done)
	ring, err := r.openRing(sq)
	if err == nil && ring.CQEntries() < len(r.slots)+1 {
		ring.Close()
		err = fmt.Errorf("iouring: CQ of %d entries cannot hold %d requests plus the wake-up read", ring.CQEntries(), len(r.slots))
	}
	if err != nil {
		// No ring, nothing in flight: the thread may go back to the pool.
		if !r.netpoll() {
			runtime.UnlockOSThread()
		}
		r.err = err
		ready <- ""
		return
	}
	r.ring = ring
	r.minWait = ring.HasMinWait() && batchWait >= time.Microsecond
	wait := "waits in io_uring_enter"
	if r.netpoll() {
		wait = "waits in the netpoller"
	}
	ready <- fmt.Sprintf("SQ %d, CQ %d, %s, %s", ring.SQEntries(), ring.CQEntries(), ring.Flags(), wait)
	r.loop()
	r.err = r.shutdown()
	if !r.netpoll() {
		// Only now, with nothing in flight and the ring closed, may the
		// goroutine leave its thread.
		runtime.UnlockOSThread()
	}
}

// openRing sets up the reactor's ring: one that posts completions as they
// happen and signals the reactor's eventfd, which the reactor waits for in
// Go's netpoller (see sleep); else, or with netpollSleep off, a ring bound
// to the reactor's locked thread that it waits for in io_uring_enter.
func (r *reactor) openRing(sq uint32) (*Ring, error) {
	if netpollSleep {
		ring, err := newRingHook(RingOptions{Entries: sq, Notify: true})
		if err == nil {
			if err = r.useNetpoll(ring); err == nil {
				return ring, nil
			}
			ring.Close()
		}
	}
	runtime.LockOSThread()
	return newRingHook(RingOptions{Entries: sq})
}

// netpoll reports whether the reactor waits in the netpoller; otherwise
// it holds its OS thread (LockOSThread) and waits in io_uring_enter.
func (r *reactor) netpoll() bool { return r.efdFile != nil }

// closeEventfd closes the eventfd, through the os.File that owns it in
// netpoll mode.
func (r *reactor) closeEventfd() error {
	if r.netpoll() {
		return r.efdFile.Close()
	}
	return unix.Close(r.efd)
}

// useNetpoll registers the eventfd with ring and hands it to the netpoller.
func (r *reactor) useNetpoll(ring *Ring) error {
	if err := unix.SetNonblock(r.efd, true); err != nil {
		return fmt.Errorf("iouring: eventfd: %w", err)
	}
	if err := registerEventfd(ring, r.efd); err != nil {
		// The fallback reads the eventfd through the ring, which waits
		// for data only on a blocking descriptor.
		if rerr := unix.SetNonblock(r.efd, false); rerr != nil {
			panic(fmt.Sprintf("iouring: reactor: eventfd back to blocking: %v", rerr))
		}
		return err
	}
	r.efdFile = os.NewFile(uintptr(r.efd), "iouring-eventfd")
	c, err := r.efdFile.SyscallConn()
	if err != nil {
		// Not reached for an eventfd; the File owns the descriptor now,
		// so a fallback is not possible.
		panic(fmt.Sprintf("iouring: reactor: eventfd: %v", err))
	}
	r.efdConn = c
	r.efdRead = func(fd uintptr) bool {
		_, err := unix.Read(int(fd), r.efdBuf)
		return err != unix.EAGAIN
	}
	return nil
}

func (r *reactor) loop() {
	r.own.Lock() // never unlocked after the loop: see own
	for {
		r.armEventfd()
		r.take()
		r.prepHeld()
		if r.stop.Load() && r.inflight == 0 && r.heldHead == len(r.held) {
			return
		}
		r.flushWakes()
		r.spin()
		// Results delivered without I/O (refused requests, control) by
		// prepHeld, here or while spinning, must not wait for the sleep.
		r.flushWakes()
		if r.inflight < kickBelow || r.inflight == 0 {
			if !r.intake.CompareAndSwap(0, sleepBit) {
				continue // work arrived: take it into this batch
			}
		}
		r.nsleep.Add(1)
		if r.netpoll() {
			r.sleep()
		} else {
			wait := uint32(1)
			if waitDiv > 0 && r.minWait && r.inflight >= 2*waitDiv {
				wait = uint32(r.inflight / waitDiv)
			}
			r.submit(wait)
		}
		r.woke = 0
		// Awake: the loop takes intake before it sleeps again, so pushers
		// (completion callbacks among them, see File.Start) need not kick.
		r.intake.And(^uint64(sleepBit))
		r.ring.Reap(r.complete)
		r.flushWakes()
	}
}

// spin runs after the reactor woke waiters and before it sleeps. Those
// waiters sit in this P's run queue until another P steals them; most of
// them come straight back with their next request. Spinning until they
// have all run (and then until intake has been quiet for reactorIdle)
// gathers those requests into the batch about to be submitted, and keeps
// the reactor from sleeping in a system call with runnable goroutines
// queued on its P (which the scheduler would only notice 20 µs or more
// later). It never spins longer than reactorSpin.
func (r *reactor) spin() {
	if reactorSpin <= 0 || r.woke == 0 {
		return
	}
	start := time.Now()
	last := time.Duration(0) // time of the last arrival, since start
	for i := 1; ; i++ {
		if uint32(r.intake.Load()) != 0 {
			r.take()
			r.prepHeld()
			last = time.Since(start)
			continue
		}
		if i&31 == 0 {
			el := time.Since(start)
			if el > reactorSpin || (r.waking.Load() <= 0 && el-last > reactorIdle) {
				return
			}
		}
	}
}

// submit enters the kernel once (more on EINTR or ErrBusy), submitting
// everything prepared and waiting for wait completions.
func (r *reactor) submit(wait uint32) {
	for {
		r.nenter.Add(1)
		var minWait uint32
		if wait > 1 {
			minWait = uint32(batchWait.Microseconds())
		}
		_, err := r.ring.enter(wait, minWait)
		if err == nil {
			return
		}
		if errors.Is(err, ErrBusy) {
			// Reap what is there and go round again; requests are never
			// dropped.
			r.ring.Reap(r.complete)
			r.flushWakes()
			wait = 0
			continue
		}
		// Nothing else is expected from a ring this reactor owns; a
		// request could be lost silently, so stop the process loudly.
		panic(fmt.Sprintf("iouring: reactor: %v", err))
	}
}

// sleep submits what is prepared and, unless a completion is ready, waits
// in Go's netpoller for the eventfd, which the ring signals on every
// completion and callers write to when they find the sleep bit set.
//
// Waiting there rather than in io_uring_enter is what lets a 2-CPU
// machine keep its device busy: a goroutine in a system call keeps its P
// until sysmon takes it back, 20 µs to 10 ms later, so the waiters the
// reactor had just woken queued behind it on one P, and after a burst of
// completions the device sat idle while they ran one by one (random 4 KiB
// reads through the engine at QD32 on a loop device: no request in flight
// 42 % of the time). A netpoller wait hands the P over at once; and since
// the goroutine is not locked to a thread, it resumes on whichever P is
// free, where a locked one waited ~50 µs for its thread to be handed one.
func (r *reactor) sleep() {
	if r.ring.Pending() > 0 {
		r.submit(0)
	}
	if r.ring.cqReady() > 0 {
		return
	}
	r.asleep.Store(true)
	r.own.Unlock()
	if sleepHook != nil {
		sleepHook()
	}
	err := r.efdConn.Read(r.efdRead)
	r.own.Lock()
	r.asleep.Store(false)
	if err != nil {
		panic(fmt.Sprintf("iouring: reactor: eventfd read: %v", err))
	}
}

// poll does a sleeping reactor's work on the calling goroutine: it
// submits what callers pushed and delivers the completions that are
// there, without waiting for anything. It does nothing when the reactor
// is awake, holds its thread (locked mode: the ring may accept only that
// thread's submissions), or someone else is polling.
//
// Why: the netpoller, where the reactor sleeps, is consulted by Go's
// scheduler only when a P runs out of goroutines, and otherwise by sysmon
// every 10 ms. Goroutines that keep both CPUs busy (writers copying into
// the page cache) therefore leave completions unreaped and requests
// unsubmitted for milliseconds while the device idles. Those goroutines
// call poll between pieces of their work and move the ring along.
func (r *reactor) poll() {
	// A kick may already be on its way (the sleep bit is then clear), but
	// it too waits for the netpoller; so does the completions' signal.
	if !r.asleep.Load() || !r.own.TryLock() {
		return
	}
	defer r.own.Unlock()
	sub := r.submitIntake()
	// Completion callbacks push more requests: this poll takes them
	// below, so their pushes need not kick the sleeping reactor.
	r.polling.Store(true)
	reaped := r.ring.Reap(r.complete)
	r.polling.Store(false)
	if reaped+sub > 0 {
		r.npoll.Add(1)
	}
	// Completions' callbacks (File.Start) may have queued more, and so
	// may anyone who pushed while polling was set: take it all.
	r.submitIntake()
	r.flushWakes()
}

// submitIntake is poll's submission: it takes intake (keeping the sleep
// bit), prepares and submits it, and returns how many SQEs went in.
func (r *reactor) submitIntake() int {
	r.takeKeepSleep()
	r.prepHeld()
	n := r.ring.Pending()
	if n > 0 {
		r.submit(0)
	}
	return n
}

func (r *reactor) armEventfd() {
	if r.netpoll() || r.efdArmed || r.ring.SQSpace() == 0 {
		return
	}
	if err := r.ring.PrepRead(r.efd, r.efdBuf, 0, efdUserData); err != nil {
		panic(fmt.Sprintf("iouring: reactor: arming eventfd read: %v", err))
	}
	r.efdArmed = true
}

// kick wakes the reactor if it sleeps in io_uring_enter.
func (r *reactor) kick() {
	r.nkick.Add(1)
	var one = [8]byte{1}
	for {
		_, err := unix.Write(r.efd, one[:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			panic(fmt.Sprintf("iouring: eventfd write: %v", err))
		}
		return
	}
}

// push hands the chain bottom..top (linked through next, top first) to the
// reactor, waking it if it sleeps.
func (r *reactor) push(bottom, top uint32) {
	for {
		old := r.intake.Load()
		r.slots[bottom].next = uint32(old)
		// The sleep bit stays set until someone kicks: a pusher, or the
		// last woken waiter to resume (see waker.wait).
		if r.intake.CompareAndSwap(old, uint64(top)+1|old&sleepBit) {
			// A poller reaping now takes intake after it clears polling,
			// and this push is in intake before polling is read.
			if old&sleepBit != 0 && r.waking.Load() <= 0 && !r.polling.Load() {
				r.kickIfAsleep()
			}
			return
		}
	}
}

// kickIfAsleep wakes the reactor if it sleeps with requests in intake,
// clearing the sleep bit so that exactly one caller pays for the kick.
func (r *reactor) kickIfAsleep() {
	for {
		w := r.intake.Load()
		if w&sleepBit == 0 || uint32(w) == 0 {
			return
		}
		if r.intake.CompareAndSwap(w, w&^sleepBit) {
			r.kick()
			return
		}
	}
}

// take moves everything in intake to held, oldest first, and clears the
// sleep bit: the reactor is awake.
func (r *reactor) take() {
	r.takeList(uint32(r.intake.Swap(0)))
}

// takeKeepSleep is take for poll: the reactor still sleeps, so pushers
// must still find the sleep bit and kick it when nobody polls.
func (r *reactor) takeKeepSleep() {
	for {
		w := r.intake.Load()
		if uint32(w) == 0 {
			return
		}
		if r.intake.CompareAndSwap(w, w&sleepBit) {
			r.takeList(uint32(w))
			return
		}
	}
}

// takeList moves the intake chain whose top is top (index+1; 0: empty)
// to held, oldest first.
func (r *reactor) takeList(top uint32) {
	if top == 0 {
		return
	}
	buf := r.takeBuf[:0]
	for i := top; i != 0; i = r.slots[i-1].next {
		buf = append(buf, i-1)
		if len(buf) > len(r.slots) {
			panic("iouring: reactor: intake list longer than the slot table (cycle)")
		}
	}
	if r.heldHead == len(r.held) {
		r.held, r.heldHead = r.held[:0], 0
	}
	for i := len(buf) - 1; i >= 0; i-- {
		r.held = append(r.held, buf[i])
	}
	r.takeBuf = buf
}

// prepHeld turns held requests into SQEs, in order, until the SQ is full
// or a control request must wait for the ring to drain.
func (r *reactor) prepHeld() {
	for r.heldHead < len(r.held) {
		idx := r.held[r.heldHead]
		s := &r.slots[idx]
		if s.kind == kindCtl {
			if r.inflight > 0 {
				return
			}
			r.heldHead++
			r.control(idx)
			continue
		}
		if r.ring.SQSpace() == 0 {
			return
		}
		ud := uint64(idx)<<32 | uint64(s.gen)
		var err error
		switch s.op {
		case opRead, opWrite:
			bi, fixed := uint16(0), false
			if r.arenaFixed {
				bi, fixed = r.arena.fixedIndex(s.buf)
			}
			switch {
			case fixed && s.op == opRead:
				err = r.ring.PrepReadFixed(r.fd, s.buf, s.off, bi, ud)
			case fixed:
				err = r.ring.PrepWriteFixed(r.fd, s.buf, s.off, bi, ud)
			case s.op == opRead:
				err = r.ring.PrepRead(r.fd, s.buf, s.off, ud)
			default:
				err = r.ring.PrepWrite(r.fd, s.buf, s.off, ud)
			}
		case opReadv:
			err = r.ring.PrepReadv(r.fd, s.iov[:s.niov], s.off, ud)
		case opWritev:
			err = r.ring.PrepWritev(r.fd, s.iov[:s.niov], s.off, ud)
		case opFsync:
			err = r.ring.PrepFsync(r.fd, true, ud)
		case opNop:
			err = r.ring.PrepNop(ud)
		default:
			panic(fmt.Sprintf("iouring: reactor: slot %d has unknown op %d", idx, s.op))
		}
		r.heldHead++
		if err != nil {
			if errors.Is(err, ErrSQFull) {
				panic(fmt.Sprintf("iouring: reactor: %v with SQSpace > 0", err))
			}
			// Refused before reaching the kernel: complete it now.
			var errno syscall.Errno
			if !errors.As(err, &errno) {
				errno = syscall.EINVAL
			}
			r.deliver(idx, -int32(errno))
			continue
		}
		r.inflight++
	}
}

// deliverCQE handles one completion.
func (r *reactor) deliverCQE(ud uint64, res int32) {
	if ud == efdUserData {
		r.efdArmed = false
		return
	}
	idx, gen := uint32(ud>>32), uint32(ud)
	if int(idx) >= len(r.slots) || r.slots[idx].gen != gen {
		panic(fmt.Sprintf("iouring: reactor: completion for slot %d generation %d matches no request in flight", idx, gen))
	}
	if r.inflight <= 0 {
		panic("iouring: reactor: completion with no request in flight")
	}
	r.inflight--
	if cqeHook != nil {
		res = cqeHook(ud, res)
	}
	if s := &r.slots[idx]; res == -int32(syscall.ECANCELED) && r.netpoll() && s.retries < maxRetries {
		// The reactor cancels nothing. A ring not bound to one thread
		// ties each request to the thread that entered the kernel for
		// it, and when that thread exits the kernel cancels what it
		// still holds (requests punted to its io-wq workers). Go ends a
		// thread only when a goroutine locked to it exits, so this is
		// rare, and the request, unchanged, is simply run again.
		s.retries++
		r.nretry.Add(1)
		r.requeueFirst(idx)
		return
	}
	r.deliver(idx, res)
}

// requeueFirst puts idx at the head of the held requests: a request run
// again must not be overtaken by a control request that waits for
// nothing to be in flight (an arena must not be unregistered under it).
func (r *reactor) requeueFirst(idx uint32) {
	if r.heldHead > 0 {
		r.heldHead--
		r.held[r.heldHead] = idx
		return
	}
	r.held = append(r.held, 0)
	copy(r.held[1:], r.held)
	r.held[0] = idx
}

// maxRetries bounds how often one request is run again after a
// cancellation before its caller gets ECANCELED.
const maxRetries = 8

// registerEventfd is Ring.RegisterEventfd; tests make it fail.
var registerEventfd = (*Ring).RegisterEventfd

// sleepHook, when set (by tests), runs in a netpoll reactor's sleep after
// it let go of the ring, before it waits.
var sleepHook func()

// cqeHook, when set (by tests), rewrites every completion's result.
var cqeHook func(userData uint64, res int32) int32

// deliver gives a result to the slot's waiter.
func (r *reactor) deliver(idx uint32, res int32) {
	r.nreq.Add(1)
	s := &r.slots[idx]
	s.buf = nil // the kernel is done with it
	s.retries = 0
	if s.niov > 0 {
		clear(s.iov[:s.niov])
		s.niov = 0
	}
	switch s.kind {
	case kindBatch:
		b := s.batch
		b.res[s.bidx] = res
		s.batch = nil
		r.free <- idx
		if b.remaining.Add(-1) == 0 {
			if b.state.Swap(stDone) == stParked {
				r.signal(&b.w)
			}
		}
	case kindAsync:
		cb := s.cb
		s.cb = nil
		r.free <- idx
		cb(res)
	default:
		s.res = res
		if s.state.Swap(stDone) == stParked {
			r.signal(&s.w)
		}
	}
}

// signal queues a parked waiter's wake-up; flushWakes sends it.
func (r *reactor) signal(w *waker) {
	r.woke++
	r.waking.Add(1)
	w.next = nil
	if r.wakeHead == nil {
		r.wakeHead = w
	} else {
		r.wakeTail.next = w
	}
	r.wakeTail = w
}

// flushWakes signals the head of the chain of queued wake-ups.
func (r *reactor) flushWakes() {
	if h := r.wakeHead; h != nil {
		r.wakeHead, r.wakeTail = nil, nil
		h.c <- struct{}{}
	}
}

// control runs a control request once nothing is in flight.
func (r *reactor) control(idx uint32) {
	s := &r.slots[idx]
	s.note = r.setArena(s.arena)
	s.arena = nil
	r.nreq.Add(^uint64(0)) // deliver counts it; it is not I/O
	r.deliver(idx, 0)
}

// setArena replaces the registered arena; it returns a note for Reason.
func (r *reactor) setArena(a *Arena) string {
	if r.arena != nil {
		if r.arenaFixed {
			if err := r.ring.UnregisterBuffers(); err != nil {
				panic(fmt.Sprintf("iouring: reactor: %v", err))
			}
		}
		r.arena.release()
		r.arena, r.arenaFixed = nil, false
	}
	if a == nil {
		return ""
	}
	if err := a.acquire(); err != nil {
		return "fixed buffers off: arena closed"
	}
	r.arena = a
	err := registerHook(r.ring, a.chunks())
	raised := ""
	if errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.EPERM) {
		if msg := raiseMemlock(); msg != "" {
			raised = " (" + msg + ")"
			err = registerHook(r.ring, a.chunks())
		}
	}
	if err != nil {
		return fmt.Sprintf("fixed buffers off: registering the %d-byte arena: %v%s; RLIMIT_MEMLOCK %s",
			a.Size(), err, raised, memlockString())
	}
	r.arenaFixed = true
	return fmt.Sprintf("fixed buffers: %d-byte arena registered%s", a.Size(), raised)
}

// newRingHook creates a reactor's ring; tests replace it to simulate a
// kernel that refuses io_uring.
var newRingHook = NewRing

// registerHook registers buffers; tests replace it to simulate a kernel
// that refuses.
var registerHook = func(ring *Ring, bufs [][]byte) error { return ring.RegisterBuffers(bufs) }

// raiseMemlock raises the soft RLIMIT_MEMLOCK to the hard limit; it
// returns what it did, or "" if it could not raise it.
func raiseMemlock() string {
	var rl unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl) != nil || rl.Cur >= rl.Max {
		return ""
	}
	old := rl.Cur
	rl.Cur = rl.Max
	if unix.Setrlimit(unix.RLIMIT_MEMLOCK, &rl) != nil {
		return ""
	}
	return fmt.Sprintf("raised soft RLIMIT_MEMLOCK from %d to %s", old, limitString(rl.Max))
}

func limitString(v uint64) string {
	if v == unix.RLIM_INFINITY {
		return "unlimited"
	}
	return fmt.Sprintf("%d", v)
}

func memlockString() string {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_MEMLOCK, &rl); err != nil {
		return "unknown"
	}
	return fmt.Sprintf("soft %s, hard %s", limitString(rl.Cur), limitString(rl.Max))
}

// shutdown runs after the loop ends with nothing in flight: it completes
// the eventfd read, unregisters the arena and closes the ring.
func (r *reactor) shutdown() error {
	if r.efdArmed {
		r.kick()
		for r.efdArmed {
			r.submit(1)
			r.ring.Reap(r.complete)
			r.flushWakes()
		}
	}
	if r.arena != nil {
		r.setArena(nil)
	}
	err := r.ring.Close()
	if r.ring.InFlight() != 0 && err == nil {
		panic("iouring: reactor: ring closed with requests in flight")
	}
	return err
}

// ---- caller side ----

// minSlotIov is the smallest iovec array a slot allocates.
const minSlotIov = 16

// setVec fills the slot's iovec array from bufs (bufs[0] starting at byte
// skip): at most MaxIovecs buffers and maxRW bytes, the rest being left for
// a further request (File continues after a short transfer). It returns
// the bytes described. The array grows in powers of two up to MaxIovecs.
func (s *slot) setVec(bufs [][]byte, skip int) int {
	n := min(len(bufs), MaxIovecs)
	if cap(s.iov) < n {
		c := minSlotIov
		for c < n {
			c <<= 1
		}
		s.iov = make([]unix.Iovec, c)
	}
	s.iov = s.iov[:cap(s.iov)]
	total := 0
	k := 0
	for ; k < n && total < maxRW; k++ {
		b := bufs[k]
		if k == 0 {
			b = b[skip:]
		}
		if len(b) > maxRW-total {
			b = b[:maxRW-total]
		}
		if len(b) > 0 {
			s.iov[k].Base = &b[0]
		} else {
			s.iov[k].Base = nil
		}
		s.iov[k].SetLen(len(b))
		total += len(b)
	}
	s.niov = k
	return total
}

func (b *uringBackend) pick() *reactor {
	if len(b.reactors) == 1 {
		return b.reactors[0]
	}
	return b.reactors[b.next.Add(1)%uint32(len(b.reactors))]
}

// start queues one request without waiting for it: cb gets the kernel's
// result on the goroutine that reaps it. It returns ErrNoSlot, queueing
// nothing, when no slot is free.
func (b *uringBackend) start(op *Op, cb func(res int32)) error {
	r := b.pick()
	var idx uint32
	select {
	case idx = <-r.free:
	default:
		return ErrNoSlot
	}
	s := &r.slots[idx]
	s.gen++
	s.setOp(op)
	s.kind, s.cb = kindAsync, cb
	r.push(idx, idx)
	return nil
}

// setOp fills the slot with op's request: its first MaxIovecs buffers, or
// its first maxRW bytes (File continues the rest).
func (s *slot) setOp(op *Op) {
	s.off = op.Off
	if op.Bufs != nil {
		s.op = opReadv
		if op.Write {
			s.op = opWritev
		}
		s.setVec(op.Bufs, 0)
		s.buf = nil
		return
	}
	s.op = opRead
	if op.Write {
		s.op = opWrite
	}
	s.buf = op.Buf[:min(len(op.Buf), maxRW)]
}

// call runs one request synchronously and returns the kernel's result.
func (r *reactor) call(op, kind uint8, p []byte, off int64, a *Arena) (int32, string) {
	idx := <-r.free
	s := &r.slots[idx]
	s.gen++
	s.op, s.kind, s.buf, s.off, s.arena = op, kind, p, off, a
	return r.await(idx, s)
}

// callv runs one vectored request (see slot.setVec) synchronously; it
// returns the kernel's result and the bytes requested.
func (r *reactor) callv(op uint8, bufs [][]byte, skip int, off int64) (int32, int) {
	idx := <-r.free
	s := &r.slots[idx]
	s.gen++
	s.op, s.kind, s.off = op, kindSync, off
	want := s.setVec(bufs, skip)
	res, _ := r.await(idx, s)
	return res, want
}

// await hands the filled slot to the reactor, waits for its result and
// frees the slot.
func (r *reactor) await(idx uint32, s *slot) (int32, string) {
	s.state.Store(stPending)
	r.push(idx, idx)
	for i := 0; i < waiterSpin; i++ {
		if s.state.Load() == stDone {
			break
		}
		runtime.Gosched()
	}
	if s.state.CompareAndSwap(stPending, stParked) {
		r.npark.Add(1)
		s.w.wait(r)
	}
	res, note := s.res, s.note
	s.note = ""
	r.free <- idx
	return res, note
}

func (b *uringBackend) rw(write bool, p []byte, off int64) (int, error) {
	op := uint8(opRead)
	if write {
		op = opWrite
	}
	res, _ := b.pick().call(op, kindSync, p, off, nil)
	if res < 0 {
		return 0, errnoOf(res)
	}
	if int(res) > len(p) {
		panic(fmt.Sprintf("iouring: kernel transferred %d bytes for a %d-byte request", res, len(p)))
	}
	return int(res), nil
}

func (b *uringBackend) rwv(write bool, bufs [][]byte, skip int, off int64) (int, error) {
	op := uint8(opReadv)
	if write {
		op = opWritev
	}
	res, want := b.pick().callv(op, bufs, skip, off)
	if res < 0 {
		return 0, errnoOf(res)
	}
	if int(res) > want {
		panic(fmt.Sprintf("iouring: kernel transferred %d bytes for a %d-byte vectored request", res, want))
	}
	return int(res), nil
}

func (b *uringBackend) sync() error {
	// One fdatasync covers the file, whichever ring issues it.
	res, _ := b.reactors[0].call(opFsync, kindSync, nil, 0, nil)
	return errnoOf(res)
}

func (b *uringBackend) do(ops []Op) {
	bt := batchPool.Get().(*batch)
	if cap(bt.res) < len(ops) {
		bt.res = make([]int32, len(ops))
	}
	bt.res = bt.res[:len(ops)]
	bt.remaining.Store(int32(len(ops)))
	bt.state.Store(stPending)
	r := b.pick()
	// Take as many slots as are free, push them as one chain, and block
	// for more only when none is free: every slot held is already on its
	// way to the kernel, so a large batch cannot deadlock against others.
	var bottom, top uint32
	chain := 0
	flush := func() {
		if chain > 0 {
			r.push(bottom, top)
			chain = 0
		}
	}
	for i := range ops {
		var idx uint32
		select {
		case idx = <-r.free:
		default:
			flush()
			idx = <-r.free
		}
		s := &r.slots[idx]
		s.gen++
		s.setOp(&ops[i])
		s.kind, s.batch, s.bidx = kindBatch, bt, i
		if chain == 0 {
			bottom = idx
		} else {
			s.next = top + 1
		}
		top = idx
		chain++
	}
	flush()
	if bt.state.CompareAndSwap(stPending, stParked) {
		r.npark.Add(1)
		bt.w.wait(r)
	}
	for i := range ops {
		res := bt.res[i]
		if res < 0 {
			ops[i].Err = errnoOf(res)
			continue
		}
		ops[i].N = int(res)
	}
	batchPool.Put(bt)
}

func (b *uringBackend) registerArena(a *Arena) (string, error) {
	if a != nil {
		if err := a.acquire(); err != nil {
			return "", fmt.Errorf("iouring: RegisterArena: %w", err)
		}
		defer a.release()
	}
	var note string
	for _, r := range b.reactors {
		_, note = r.call(0, kindCtl, nil, 0, a)
	}
	return note, nil
}

func (b *uringBackend) poll() {
	for _, r := range b.reactors {
		r.poll()
	}
}

func (b *uringBackend) stats() FileStats {
	var st FileStats
	for _, r := range b.reactors {
		st.Requests += r.nreq.Load()
		st.Enters += r.nenter.Load()
		st.Sleeps += r.nsleep.Load()
		st.Kicks += r.nkick.Load()
		st.Parks += r.npark.Load()
		st.Retries += r.nretry.Load()
		st.Polls += r.npoll.Load()
	}
	return st
}

func (b *uringBackend) close() error {
	var errs []error
	for _, r := range b.reactors {
		r.stop.Store(true)
		r.kick()
	}
	for _, r := range b.reactors {
		<-r.done
		if r.err != nil {
			errs = append(errs, r.err)
		}
		if err := r.closeEventfd(); err != nil {
			errs = append(errs, fmt.Errorf("iouring: close eventfd: %w", err))
		}
	}
	return errors.Join(errs...)
}

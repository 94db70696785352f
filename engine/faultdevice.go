package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"sync"
)

// ErrCrashed is returned (wrapped) by every call to a FaultDevice after its
// simulated power cut: the device answers nothing until it is rebooted.
var ErrCrashed = errors.New("rawblock: fault device: crashed (simulated power loss)")

// FaultOp names the kind of device call a Fault applies to.
type FaultOp uint8

// The device calls a Fault can target. Vectored reads and writes count as
// one read or write each.
const (
	FaultRead FaultOp = iota + 1
	FaultWrite
	FaultFlush
)

func (op FaultOp) String() string {
	switch op {
	case FaultRead:
		return "read"
	case FaultWrite:
		return "write"
	case FaultFlush:
		return "flush"
	}
	return fmt.Sprintf("FaultOp(%d)", uint8(op))
}

// Fault describes device calls to fail. The calls of kind Op for which
// Match returns true (every one when Match is nil) are counted from the
// moment the fault is installed: the first Skip pass, the next Times fail.
type Fault struct {
	Op FaultOp
	// Skip is the number of matching calls let through before the first
	// failure.
	Skip int
	// Times is the number of matching calls that fail after the skipped
	// ones: 0 means 1, a negative value every later call.
	Times int
	// Match restricts the fault to the calls it returns true for. It gets
	// the byte offset and length of a read or write, (0, 0) for a flush. It
	// is called with the device's lock held and must not call the device.
	Match func(off, length int64) bool
	// Err is returned, wrapped, by a failing call. A failing write stores
	// nothing and a failing flush makes nothing durable. Exactly one of
	// Err and Short is set.
	Err error
	// Short makes a failing read or write move only the first half of its
	// sectors (none of a single-sector request) and report that count with
	// a nil error: a device that lies. Not valid for flushes.
	Short bool
}

// FaultStats counts the calls a FaultDevice has answered.
type FaultStats struct {
	// Reads, Writes and Flushes count calls that passed validation,
	// including those an injected fault failed. A vectored call counts once.
	Reads, Writes, Flushes uint64
	// Injected counts calls failed or shortened by a Fault.
	Injected uint64
	// Pending is the number of writes not yet covered by a Flush: those a
	// crash may lose or tear. PendingBytes is their total size.
	Pending      int
	PendingBytes int64
}

// RebootStats says what a Reboot kept of the writes that were volatile at
// the crash.
type RebootStats struct {
	Pending int // volatile writes at the crash (including one cut in flight)
	Kept    int // of those, how many persisted, wholly or in part
	Torn    int // of the kept ones, how many persisted only some sectors
}

// FaultDevice is an in-memory Device for crash and fault-injection tests.
// Unlike MemDevice it has a volatile write cache: a write is visible to
// reads at once, but only a Flush makes it durable. A simulated power cut
// (Crash, or CrashAfter a number of writes and flushes) freezes the device:
// from then on every call returns an error wrapping ErrCrashed, reads
// included, as a powered-off disk answers nothing. Reboot then builds the
// device a restart would find: every flushed write, plus any subset of the
// volatile ones, applied in any order, each possibly torn at the logical
// sector (BlockSize) granularity.
//
// Faults (Inject, FailOn) fail chosen reads, writes or flushes with an error
// such as syscall.EIO or syscall.ENOSPC, or shorten a transfer without an
// error. Validation and its errors are MemDevice's (ErrMisaligned,
// ErrOutOfRange, ErrClosed). Every method is safe for concurrent use; calls
// are serialized, which gives them the total order a crash point counts in.
type FaultDevice struct {
	size int64
	bs   int

	mu      sync.RWMutex
	durable map[int64][]byte // chunk index -> faultChunk bytes as of the last Flush
	pending []*pendingWrite  // writes since the last Flush, in completion order
	// latest maps a sector to the newest pending write covering it, so
	// reads see the volatile state.
	latest map[int64]*pendingWrite

	closed   bool
	crashed  bool
	rebooted bool  // its storage moved to the rebooted device
	crashAt  int64 // the mutation after this count is cut; <0: not armed
	faults   []*activeFault
	stats    FaultStats
	mutation int64 // writes and flushes so far (the crash-point clock)
}

type pendingWrite struct {
	off  int64 // bytes
	data []byte
}

type activeFault struct {
	Fault
	seen int // matching calls so far
}

// Geometry limits of a FaultDevice (those of the devices OpenDevice
// accepts), and its storage unit: untouched chunks take no memory.
const (
	faultMinBlock = 512
	faultMaxBlock = 65536
	faultChunk    = 64 << 10
)

// faultCheck validates a request as MemDevice and FileDevice do, before
// anything happens: each buffer a whole number of blocks, the offset
// aligned, the whole inside the device. It returns the total length.
func (d *FaultDevice) faultCheck(write bool, bufs [][]byte, off int64) (int64, error) {
	op := "read"
	if write {
		op = "write"
	}
	bs := int64(d.bs)
	var total int64
	for _, b := range bufs {
		if int64(len(b))%bs != 0 {
			return 0, fmt.Errorf("rawblock: fault device: %s of a %d-byte buffer: not a multiple of the %d-byte block size: %w", op, len(b), bs, ErrMisaligned)
		}
		total += int64(len(b))
	}
	if off%bs != 0 {
		return 0, fmt.Errorf("rawblock: fault device: %s at offset %d: not a multiple of the %d-byte block size: %w", op, off, bs, ErrMisaligned)
	}
	if off < 0 || off > d.size || total > d.size-off {
		return 0, fmt.Errorf("rawblock: fault device: %s of %d bytes at offset %d: outside the %d-byte device: %w", op, total, off, d.size, ErrOutOfRange)
	}
	return total, nil
}

// NewFaultDevice returns an empty fault device of size bytes with the given
// logical block (sector) size. It panics (a programming error) unless
// blockSize is a power of two in 512..65536 and size a positive multiple
// of it.
func NewFaultDevice(size int64, blockSize int) *FaultDevice {
	if blockSize < faultMinBlock || blockSize > faultMaxBlock || blockSize&(blockSize-1) != 0 {
		panic(fmt.Sprintf("rawblock: NewFaultDevice: block size %d: want a power of two in %d..%d", blockSize, faultMinBlock, faultMaxBlock))
	}
	if size <= 0 || size%int64(blockSize) != 0 {
		panic(fmt.Sprintf("rawblock: NewFaultDevice: size %d: want a positive multiple of the block size %d", size, blockSize))
	}
	return &FaultDevice{
		size:    size,
		bs:      blockSize,
		durable: make(map[int64][]byte),
		latest:  make(map[int64]*pendingWrite),
		crashAt: -1,
	}
}

var (
	_ Device         = (*FaultDevice)(nil)
	_ VectoredDevice = (*FaultDevice)(nil)
)

// Size implements Device.
func (d *FaultDevice) Size() int64 { return d.size }

// BlockSize implements Device; it is also the tearing granularity.
func (d *FaultDevice) BlockSize() int { return d.bs }

// stateErr reports why the device answers nothing. Caller holds mu.
func (d *FaultDevice) stateErr(what string) error {
	if d.crashed {
		return fmt.Errorf("rawblock: fault device: %s: %w", what, ErrCrashed)
	}
	if d.closed {
		return ErrClosed
	}
	return nil
}

// fault finds the fault that fails this call, if any, and counts the call
// against every fault of its kind. Caller holds mu exclusively.
func (d *FaultDevice) fault(op FaultOp, off, n int64) *Fault {
	var hit *Fault
	for i := 0; i < len(d.faults); i++ {
		f := d.faults[i]
		if f.Op != op || (f.Match != nil && !f.Match(off, n)) {
			continue
		}
		f.seen++
		if f.seen <= f.Skip {
			continue
		}
		times := f.Times
		if times == 0 {
			times = 1
		}
		if hit == nil {
			hit = &f.Fault
		}
		if times > 0 && f.seen >= f.Skip+times {
			d.faults = append(d.faults[:i], d.faults[i+1:]...)
			i--
		}
	}
	if hit != nil {
		d.stats.Injected++
	}
	return hit
}

func injected(op FaultOp, off, n int64, err error) error {
	if op == FaultFlush {
		return fmt.Errorf("rawblock: fault device: flush: injected fault: %w", err)
	}
	return fmt.Errorf("rawblock: fault device: %s of %d bytes at %d: injected fault: %w", op, n, off, err)
}

// shortLen is how much of an n-byte transfer a Short fault moves.
func (d *FaultDevice) shortLen(n int64) int64 {
	return n / int64(d.bs) / 2 * int64(d.bs)
}

// ReadAt implements Device: the newest write to each sector, flushed or
// not; never-written sectors read as zeros.
func (d *FaultDevice) ReadAt(p []byte, off int64) (int, error) {
	return d.readv([][]byte{p}, off)
}

// ReadvAt implements VectoredDevice: one read call.
func (d *FaultDevice) ReadvAt(bufs [][]byte, off int64) (int, error) {
	return d.readv(bufs, off)
}

func (d *FaultDevice) readv(bufs [][]byte, off int64) (int, error) {
	// Faults and the counters change on reads, so a read takes the lock
	// exclusively; the data copy is cheap next to what tests do with it.
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.stateErr("read"); err != nil {
		return 0, err
	}
	total, err := d.faultCheck(false, bufs, off)
	if err != nil {
		return 0, err
	}
	d.stats.Reads++
	want := total
	if f := d.fault(FaultRead, off, total); f != nil {
		if !f.Short {
			return 0, injected(FaultRead, off, total, f.Err)
		}
		want = d.shortLen(total)
	}
	done := int64(0)
	for _, b := range bufs {
		if done >= want {
			break
		}
		b = b[:min(int64(len(b)), want-done)]
		d.readLocked(b, off+done)
		done += int64(len(b))
	}
	return int(done), nil
}

// readLocked fills p from the volatile view. Caller holds mu.
func (d *FaultDevice) readLocked(p []byte, off int64) {
	if len(d.latest) == 0 {
		d.readDurable(p, off)
		return
	}
	bs := int64(d.bs)
	for i := int64(0); i < int64(len(p)); i += bs {
		pos := off + i
		if w := d.latest[pos/bs]; w != nil {
			copy(p[i:i+bs], w.data[pos-w.off:])
		} else {
			d.readDurable(p[i:i+bs], pos)
		}
	}
}

func (d *FaultDevice) readDurable(p []byte, off int64) {
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/faultChunk, int(pos%faultChunk)
		n := min(faultChunk-in, len(p)-done)
		if c := d.durable[idx]; c != nil {
			copy(p[done:done+n], c[in:])
		} else {
			clear(p[done : done+n])
		}
		done += n
	}
}

func writeChunks(store map[int64][]byte, p []byte, off int64) {
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/faultChunk, int(pos%faultChunk)
		n := min(faultChunk-in, len(p)-done)
		c := store[idx]
		if c == nil {
			c = make([]byte, faultChunk)
			store[idx] = c
		}
		copy(c[in:], p[done:done+n])
		done += n
	}
}

// WriteAt implements Device: the data is visible at once and durable after
// the next successful Flush.
func (d *FaultDevice) WriteAt(p []byte, off int64) (int, error) {
	return d.writev([][]byte{p}, off)
}

// WritevAt implements VectoredDevice: one write call, torn as one.
func (d *FaultDevice) WritevAt(bufs [][]byte, off int64) (int, error) {
	return d.writev(bufs, off)
}

// tick advances the crash-point clock for a write or flush and reports
// whether this call is the one the power cut interrupts. Caller holds mu.
func (d *FaultDevice) tick() bool {
	d.mutation++
	if d.crashAt >= 0 && d.mutation > d.crashAt {
		d.crashed = true
		return true
	}
	return false
}

func (d *FaultDevice) writev(bufs [][]byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.stateErr("write"); err != nil {
		return 0, err
	}
	total, err := d.faultCheck(true, bufs, off)
	if err != nil {
		return 0, err
	}
	d.stats.Writes++
	data := make([]byte, 0, total)
	for _, b := range bufs {
		data = append(data, b...)
	}
	if d.tick() {
		// The write was in flight when the power failed: a reboot may find
		// any part of it.
		d.addPending(data, off)
		return 0, fmt.Errorf("rawblock: fault device: write of %d bytes at %d: %w", total, off, ErrCrashed)
	}
	if f := d.fault(FaultWrite, off, total); f != nil {
		if !f.Short {
			return 0, injected(FaultWrite, off, total, f.Err)
		}
		data = data[:d.shortLen(total)]
	}
	if len(data) > 0 {
		d.addPending(data, off)
	}
	return len(data), nil
}

func (d *FaultDevice) addPending(data []byte, off int64) {
	w := &pendingWrite{off: off, data: data}
	d.pending = append(d.pending, w)
	bs := int64(d.bs)
	for s := off / bs; s < (off+int64(len(data)))/bs; s++ {
		d.latest[s] = w
	}
	d.stats.Pending++
	d.stats.PendingBytes += int64(len(data))
}

// Flush implements Device: every write completed before the call becomes
// durable. A failed flush (injected, or cut by a crash) makes nothing
// durable.
func (d *FaultDevice) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.stateErr("flush"); err != nil {
		return err
	}
	d.stats.Flushes++
	if d.tick() {
		return fmt.Errorf("rawblock: fault device: flush: %w", ErrCrashed)
	}
	if f := d.fault(FaultFlush, 0, 0); f != nil {
		return injected(FaultFlush, 0, 0, f.Err)
	}
	for _, w := range d.pending {
		writeChunks(d.durable, w.data, w.off)
	}
	d.pending = nil
	clear(d.latest)
	d.stats.Pending, d.stats.PendingBytes = 0, 0
	return nil
}

// Close implements Device; later calls return ErrClosed. The contents stay
// (a closed device can still be rebooted: closing does not flush).
func (d *FaultDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.crashed {
		return d.stateErr("close")
	}
	if d.closed {
		return ErrClosed
	}
	d.closed = true
	return nil
}

// Inject installs a fault. It returns an error wrapping fs.ErrInvalid, and
// installs nothing, for an unknown Op, a negative Skip, a fault with both or
// neither of Err and Short, or a Short flush.
func (d *FaultDevice) Inject(f Fault) error {
	switch {
	case f.Op != FaultRead && f.Op != FaultWrite && f.Op != FaultFlush:
		return fmt.Errorf("%w: fault device: unknown fault op %v", fs.ErrInvalid, f.Op)
	case f.Skip < 0:
		return fmt.Errorf("%w: fault device: negative Skip %d", fs.ErrInvalid, f.Skip)
	case (f.Err == nil) == !f.Short:
		return fmt.Errorf("%w: fault device: a fault sets exactly one of Err and Short", fs.ErrInvalid)
	case f.Short && f.Op == FaultFlush:
		return fmt.Errorf("%w: fault device: a flush cannot be short", fs.ErrInvalid)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.faults = append(d.faults, &activeFault{Fault: f})
	return nil
}

// FailOn makes the nth next call (1 = the very next) of kind op fail with
// err, for example syscall.EIO. It panics (a programming error) on an
// invalid op, nth < 1 or a nil err.
func (d *FaultDevice) FailOn(op FaultOp, nth int, err error) {
	if nth < 1 {
		panic(fmt.Sprintf("rawblock: FaultDevice.FailOn: nth %d: want ≥ 1", nth))
	}
	if ierr := d.Inject(Fault{Op: op, Skip: nth - 1, Err: err}); ierr != nil {
		panic(fmt.Sprintf("rawblock: FaultDevice.FailOn: %v", ierr))
	}
}

// ClearFaults removes every installed fault.
func (d *FaultDevice) ClearFaults() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.faults = nil
}

// Stats returns the call counters and the volatile backlog.
func (d *FaultDevice) Stats() FaultStats {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.stats
}

// Mutations returns the number of writes and flushes the device has
// accepted or been cut in: the clock CrashAfter counts on.
func (d *FaultDevice) Mutations() int64 {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.mutation
}

// CrashAfter arms a power cut: the next n writes and flushes complete (or
// fail by an injected fault) as usual, and the one after them is cut: a
// write is left in flight (a reboot may find any part of it) and returns
// ErrCrashed, a flush makes nothing durable. A negative n disarms. Arming
// again replaces the earlier count.
func (d *FaultDevice) CrashAfter(n int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if n < 0 {
		d.crashAt = -1
		return
	}
	d.crashAt = d.mutation + n
}

// Crash cuts the power now.
func (d *FaultDevice) Crash() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.crashed = true
}

// Crashed reports whether the power has been cut.
func (d *FaultDevice) Crashed() bool {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.crashed
}

// Reboot cuts the power if it is still on and returns the device a restart
// finds: every flushed write, and each volatile write kept or lost
// independently, the kept ones applied in a random order; with tear set, a
// kept write of several sectors may persist only a random subset of them.
// rng decides everything, so a seed reproduces a reboot of the same
// history. The new device has no faults, no crash armed and zeroed
// counters. The storage moves to it: this device stays crashed for good,
// and a second Reboot of it panics.
func (d *FaultDevice) Reboot(rng *rand.Rand, tear bool) (*FaultDevice, RebootStats) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.rebooted {
		panic("rawblock: FaultDevice.Reboot: this device was already rebooted; reboot the device the first Reboot returned")
	}
	d.crashed, d.rebooted = true, true
	st := RebootStats{Pending: len(d.pending)}
	// One keep probability per crash spreads the outcomes from "almost
	// everything reached the disk" to "almost nothing did".
	keep := rng.Float64()
	type piece struct {
		off  int64
		data []byte
	}
	var kept []piece
	bs := int64(d.bs)
	for _, w := range d.pending {
		if rng.Float64() >= keep {
			continue
		}
		st.Kept++
		sectors := int64(len(w.data)) / bs
		if !tear || sectors < 2 || rng.IntN(3) != 0 {
			kept = append(kept, piece{w.off, w.data})
			continue
		}
		st.Torn++
		for s := int64(0); s < sectors; s++ {
			if rng.IntN(2) == 0 {
				kept = append(kept, piece{w.off + s*bs, w.data[s*bs : (s+1)*bs]})
			}
		}
	}
	rng.Shuffle(len(kept), func(i, j int) { kept[i], kept[j] = kept[j], kept[i] })
	for _, p := range kept {
		writeChunks(d.durable, p.data, p.off)
	}
	nd := NewFaultDevice(d.size, d.bs)
	nd.durable = d.durable
	d.durable, d.pending, d.latest = nil, nil, nil
	d.stats.Pending, d.stats.PendingBytes = 0, 0
	return nd, st
}

//go:build linux

package iouring

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kernel ABI of io_uring (include/uapi/linux/io_uring.h). x/sys/unix has the
// syscall numbers but none of the structures, so they are spelled out here
// with compile-time size checks.

// Opcodes (enum io_uring_op).
const (
	opNop        = 0
	opReadv      = 1
	opWritev     = 2
	opFsync      = 3
	opReadFixed  = 4
	opWriteFixed = 5
	opRead       = 22
	opWrite      = 23
)

// opNames names the opcodes this package issues, for error messages.
var opNames = map[uint8]string{
	opNop:        "NOP",
	opReadv:      "READV",
	opWritev:     "WRITEV",
	opFsync:      "FSYNC",
	opReadFixed:  "READ_FIXED",
	opWriteFixed: "WRITE_FIXED",
	opRead:       "READ",
	opWrite:      "WRITE",
}

// Setup flags (io_uring_params.flags).
const (
	setupCQSize       = 1 << 3
	setupSubmitAll    = 1 << 7
	setupCoopTaskrun  = 1 << 8
	setupSingleIssuer = 1 << 12
	setupDeferTaskrun = 1 << 13
)

// Feature flags (io_uring_params.features).
const (
	featSingleMmap = 1 << 0
	featNoDrop     = 1 << 1
	featMinTimeout = 1 << 15 // min_wait_usec in io_uring_getevents_arg (6.12+)
)

// io_uring_enter flags.
const (
	enterGetEvents = 1 << 0
	enterExtArg    = 1 << 3
)

// getEventsArg is struct io_uring_getevents_arg, passed with
// IORING_ENTER_EXT_ARG.
type getEventsArg struct {
	sigmask     uint64
	sigmaskSz   uint32
	minWaitUsec uint32
	ts          uint64
}

var (
	_ [unsafe.Sizeof(getEventsArg{}) - 24]byte
	_ [24 - unsafe.Sizeof(getEventsArg{})]byte
)

// io_uring_register opcodes.
const (
	regBuffers   = 0
	unregBuffers = 1
	regEventfd   = 4
	regProbe     = 8
)

// fsync_flags.
const fsyncDatasync = 1

// mmap offsets of the three shared regions.
const (
	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000
)

// maxEntries is IORING_MAX_ENTRIES: the largest SQ the kernel accepts.
const maxEntries = 32768

// maxRW is the largest transfer one SQE may carry: the kernel caps a single
// read or write at MAX_RW_COUNT (INT_MAX rounded down to a page); File splits
// larger requests, Ring refuses them.
const maxRW = 1 << 30

// MaxIovecs is the most buffers one vectored request carries (IOV_MAX, the
// kernel's UIO_MAXIOV: readv/writev refuse more with EINVAL). Ring refuses
// more; File and its Op batches accept any number and issue them in
// requests of at most MaxIovecs buffers each.
const MaxIovecs = 1024

// maxFixedBuf is the largest single registered buffer the kernel accepts
// (io_buffer_validate refuses iovecs over 1 GiB); an arena is registered as
// consecutive chunks of this size.
const maxFixedBuf = 1 << 30

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

// sqe is struct io_uring_sqe (64 bytes, no SQE128).
type sqe struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	opFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFdIn  int32
	addr3       uint64
	pad2        uint64
}

// cqe is struct io_uring_cqe (16 bytes, no CQE32).
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

// Compile-time ABI size checks: each line fails to build if a size is wrong.
var (
	_ [unsafe.Sizeof(params{}) - 120]byte
	_ [120 - unsafe.Sizeof(params{})]byte
	_ [unsafe.Sizeof(sqe{}) - 64]byte
	_ [64 - unsafe.Sizeof(sqe{})]byte
	_ [unsafe.Sizeof(cqe{}) - 16]byte
	_ [16 - unsafe.Sizeof(cqe{})]byte
)

func sysSetup(entries uint32, p *params) (int, syscall.Errno) {
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), 0
}

// sysEnter is io_uring_enter. It must be Syscall6, not RawSyscall6: a wait
// can block for as long as the device takes, and the Go scheduler has to be
// told so that it can run other goroutines on this P meanwhile.
func sysEnter(fd int, toSubmit, minComplete, flags uint32) (int, syscall.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), 0
}

// sysEnterArg is io_uring_enter with IORING_ENTER_EXT_ARG.
func sysEnterArg(fd int, toSubmit, minComplete, flags uint32, arg *getEventsArg) (int, syscall.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(fd), uintptr(toSubmit), uintptr(minComplete),
		uintptr(flags|enterExtArg), uintptr(unsafe.Pointer(arg)), unsafe.Sizeof(*arg))
	if errno != 0 {
		return 0, errno
	}
	return int(n), 0
}

func sysRegister(fd int, opcode uint32, arg unsafe.Pointer, nrArgs uint32) syscall.Errno {
	for {
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(fd), uintptr(opcode), uintptr(arg), uintptr(nrArgs), 0, 0)
		if errno == syscall.EINTR {
			continue
		}
		return errno
	}
}

// probeOps asks the kernel which opcodes it supports (IORING_REGISTER_PROBE,
// Linux 5.6+). The result is indexed by opcode.
func probeOps(fd int) ([256]bool, error) {
	var ops [256]bool
	// struct io_uring_probe: 16-byte header, then 256 io_uring_probe_op of
	// 8 bytes each ({u8 op; u8 resv; u16 flags; u32 resv2}).
	buf := make([]byte, 16+256*8)
	if errno := sysRegister(fd, regProbe, unsafe.Pointer(&buf[0]), 256); errno != 0 {
		if errno == syscall.EINVAL {
			return ops, fmt.Errorf("io_uring_register(PROBE): %w (kernel older than 5.6)", errno)
		}
		return ops, fmt.Errorf("io_uring_register(PROBE): %w", errno)
	}
	n := int(buf[1]) // ops_len
	for i := 0; i < n && i < 256; i++ {
		e := buf[16+i*8:]
		flags := uint16(e[2]) | uint16(e[3])<<8
		if flags&1 != 0 { // IO_URING_OP_SUPPORTED
			ops[e[0]] = true
		}
	}
	return ops, nil
}

// requiredOps are the opcodes File depends on: READ/WRITE (5.6+) for plain
// buffers and the eventfd wake-up, READV/WRITEV for vectored I/O, FSYNC for
// Sync, the FIXED pair for registered arenas.
var requiredOps = []uint8{opNop, opReadv, opWritev, opRead, opWrite, opFsync, opReadFixed, opWriteFixed}

var (
	probeOnce sync.Once
	probeErr  error
)

// Probe reports whether io_uring can be used in this process: nil, or an
// error that says why not (ENOSYS on kernels without it, EPERM or EACCES
// from seccomp or kernel.io_uring_disabled, a kernel too old to support the
// opcodes File needs). The answer is computed once per process.
func Probe() error {
	probeOnce.Do(func() { probeErr = probe() })
	return probeErr
}

func probe() error {
	var p params
	fd, errno := sysSetup(2, &p)
	if errno != 0 {
		return fmt.Errorf("io_uring_setup: %w", errno)
	}
	defer unix.Close(fd)
	ops, err := probeOps(fd)
	if err != nil {
		return err
	}
	for _, op := range requiredOps {
		if !ops[op] {
			return fmt.Errorf("io_uring: kernel lacks opcode %s: %w", opNames[op], errors.ErrUnsupported)
		}
	}
	return nil
}

// refusedSetup reports whether an io_uring_setup error means io_uring is
// unavailable in this process (rather than a bad argument or a transient
// shortage): these are the errors that make ModeAuto fall back to psync.
func refusedSetup(err error) bool {
	return errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EPERM) ||
		errors.Is(err, syscall.EACCES) || errors.Is(err, errors.ErrUnsupported)
}

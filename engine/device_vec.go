package engine

import (
	"fmt"
	"math"
	"unsafe"

	"github.com/rawblock/rawblock/iouring"
)

// VectoredDevice is implemented by devices that move many buffers in one
// I/O: scattered cache frames read from, or written to, one contiguous
// range of the device without a bounce copy. FileDevice and MemDevice
// implement it.
type VectoredDevice interface {
	// ReadvAt fills bufs, in order, from the device range starting at
	// off. Every buffer's length (and, on a FileDevice, address) and off
	// are multiples of BlockSize(); the total lies inside the device.
	// Success returns the total and nil; anything short is an error.
	ReadvAt(bufs [][]byte, off int64) (int, error)
	// WritevAt writes bufs, in order, as one contiguous range at off,
	// under the same rules. Safe for concurrent use.
	WritevAt(bufs [][]byte, off int64) (int, error)
}

var (
	_ VectoredDevice = (*FileDevice)(nil)
	_ VectoredDevice = (*MemDevice)(nil)
)

// checkVec applies the rules of a vectored request, before any I/O: each
// buffer's length (and, with addrAlign, address) a multiple of bs, then
// the range rules of checkDeviceRange for the total. It returns the total.
func checkVec(name string, write bool, bs, size int64, bufs [][]byte, off int64, addrAlign bool) (int64, error) {
	var total int64
	for i, b := range bufs {
		if int64(len(b))%bs != 0 {
			return 0, fmt.Errorf("rawblock: vectored %s %s: buffer %d of %d is %d bytes, not a multiple of the %d-byte block size: %w",
				devOpName(write), name, i, len(bufs), len(b), bs, ErrMisaligned)
		}
		if addrAlign && len(b) > 0 {
			if addr := uintptr(unsafe.Pointer(&b[0])); addr%uintptr(bs) != 0 {
				return 0, fmt.Errorf("rawblock: vectored %s %s: buffer %d of %d at address %#x is not aligned to the %d-byte block size: %w",
					devOpName(write), name, i, len(bufs), addr, bs, ErrMisaligned)
			}
		}
		// Saturate: past the device is refused below anyway, and the sum
		// must not wrap.
		total = min(total+int64(len(b)), math.MaxInt64/2)
	}
	if err := checkDeviceRange(name, write, bs, size, total, off); err != nil {
		return 0, fmt.Errorf("vectored, %d buffers: %w", len(bufs), err)
	}
	return total, nil
}

// checkv validates one vectored request before the kernel sees it.
func (d *FileDevice) checkv(write bool, bufs [][]byte, off int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if write && d.readOnly {
		return fmt.Errorf("rawblock: write to %s: opened read-only: %w", d.path, ErrReadOnly)
	}
	_, err := checkVec(d.path, write, int64(d.bs), d.size, bufs, off, true)
	return err
}

// ReadvAt implements VectoredDevice: one READV (preadv under psync) per
// iouring.MaxIovecs buffers, allocation-free on the io_uring path.
func (d *FileDevice) ReadvAt(bufs [][]byte, off int64) (int, error) {
	if err := d.checkv(false, bufs, off); err != nil {
		return 0, err
	}
	n, err := d.io.ReadvAt(bufs, off)
	if err != nil {
		return n, d.ioErr("vectored read", err)
	}
	return n, nil
}

// WritevAt implements VectoredDevice: one WRITEV (pwritev under psync) per
// iouring.MaxIovecs buffers. The buffers must not change until it returns.
func (d *FileDevice) WritevAt(bufs [][]byte, off int64) (int, error) {
	if err := d.checkv(true, bufs, off); err != nil {
		return 0, err
	}
	n, err := d.io.WritevAt(bufs, off)
	if err != nil {
		return n, d.ioErr("vectored write", err)
	}
	return n, nil
}

// ReadvAt implements VectoredDevice (buffer addresses need no alignment).
func (d *MemDevice) ReadvAt(bufs [][]byte, off int64) (int, error) {
	return d.rwv(false, bufs, off)
}

// WritevAt implements VectoredDevice (buffer addresses need no alignment).
func (d *MemDevice) WritevAt(bufs [][]byte, off int64) (int, error) {
	return d.rwv(true, bufs, off)
}

func (d *MemDevice) rwv(write bool, bufs [][]byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	total, err := checkVec("memory device", write, int64(d.bs), d.size, bufs, off, false)
	if err != nil {
		return 0, err
	}
	// Every piece is in range and aligned, so the only failure left is a
	// Close racing with the call.
	done := int64(0)
	for _, b := range bufs {
		if write {
			_, err = d.WriteAt(b, off+done)
		} else {
			_, err = d.ReadAt(b, off+done)
		}
		if err != nil {
			return int(done), err
		}
		done += int64(len(b))
	}
	if done != total {
		panic(fmt.Sprintf("rawblock: memory device moved %d of %d vectored bytes", done, total))
	}
	return int(done), nil
}

// asyncWriter is a device that can start a write and call back when it
// completes, from whichever goroutine notices the completion (see
// iouring.File.Start). Writeback uses it to keep the device's queue full
// without a goroutine per I/O: on a machine whose CPUs are busy with
// writers, a worker woken by its completion waited milliseconds for a CPU
// before it issued its next write, and the device idled meanwhile.
type asyncWriter interface {
	// AsyncWrites reports whether StartWrite can work at all (io_uring,
	// not psync).
	AsyncWrites() bool
	// StartWrite validates and issues a write of buf, or of bufs as one
	// vectored write when bufs is non-nil, at off. On success done is
	// called exactly once with the result, and must not block; on error
	// nothing was issued and done is never called. An error wrapping
	// iouring.ErrNoSlot says only that no request slot was free.
	StartWrite(buf []byte, bufs [][]byte, off int64, done func(error)) error
}

var _ asyncWriter = (*FileDevice)(nil)

// AsyncWrites implements asyncWriter: true in io_uring mode.
func (d *FileDevice) AsyncWrites() bool { return d.io.Mode() == iouring.ModeIOURing }

// StartWrite implements asyncWriter.
func (d *FileDevice) StartWrite(buf []byte, bufs [][]byte, off int64, done func(error)) error {
	var err error
	if bufs != nil {
		err = d.checkv(true, bufs, off)
	} else {
		err = d.check(true, buf, off)
	}
	if err != nil {
		return err
	}
	op := &iouring.Op{Write: true, Buf: buf, Bufs: bufs, Off: off}
	err = d.io.Start(op, func(op *iouring.Op) {
		if op.Err != nil {
			done(d.ioErr("write", op.Err))
			return
		}
		done(nil)
	})
	if err != nil {
		return d.ioErr("start write", err)
	}
	return nil
}

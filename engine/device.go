package engine

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"

	"github.com/rawblock/rawblock/iouring"
)

// Device is the block device the engine stores objects on.
type Device interface {
	// ReadAt reads len(p) bytes at off; off and len(p) are multiples of
	// BlockSize(). A read inside the device returns len(p), nil; any
	// failure is an error (there is no io.EOF rule).
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off, under the same rules. Safe for concurrent
	// use.
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write that completed before the call durable.
	Flush() error
	// Size is the usable size in bytes, a multiple of BlockSize().
	Size() int64
	// BlockSize is the logical block size (512 or 4096 usually).
	BlockSize() int
	Close() error
}

var (
	// ErrMisaligned is returned, before any I/O, for a buffer address
	// (FileDevice only: O_DIRECT needs the buffer aligned to the logical
	// block size), offset or length that is not a multiple of the block
	// size. It wraps syscall.EINVAL, which the kernel would have answered.
	ErrMisaligned = fmt.Errorf("rawblock: misaligned I/O: %w", syscall.EINVAL)
	// ErrOutOfRange is returned, before any I/O, for I/O that does not lie
	// inside the device (a negative offset, or past Size()).
	ErrOutOfRange = errors.New("rawblock: I/O outside the device")
	// ErrInUse is returned by OpenDevice when the device is already open
	// (another OpenDevice in this or another process holds its lock) or, for
	// a block device, mounted or opened exclusively by someone else. It
	// wraps fs.ErrExist; the error also wraps the errno (EBUSY, EWOULDBLOCK).
	ErrInUse = fmt.Errorf("rawblock: device in use: %w", fs.ErrExist)
)

// Limits of the devices OpenDevice accepts.
const (
	minDeviceBlock = 512
	maxDeviceBlock = 65536
	// fileBlockSize is the logical block size of a regular file used as a
	// device: the largest sector size in common use, so a file formatted
	// here can later be copied to a 4Kn disk.
	fileBlockSize = 4096
)

// DeviceOptions configures OpenDevice.
type DeviceOptions struct {
	// IO selects io_uring or psync; "" = auto (io_uring when usable; the
	// RAWBLOCK_IO environment variable may force either).
	IO iouring.Mode
	// QueueDepth is the number of requests in flight (per ring); 0 = 128.
	QueueDepth int
	// CreateSize > 0 lets path be a regular file that is created, or grown,
	// to this size (a multiple of 4096) and preallocated (fallocate). A
	// larger existing file is not shrunk. Block devices ignore it.
	CreateSize int64
	// ReadOnly opens O_RDONLY and takes a shared lock instead of an
	// exclusive one, so several read-only opens may coexist, but not with a
	// read-write one.
	ReadOnly bool
}

// FileDevice is a block device or regular file opened with O_DIRECT; I/O
// goes through io_uring (or pread/pwrite, see IOMode). It implements
// Device; every method is safe for concurrent use.
type FileDevice struct {
	path     string
	f        *os.File
	fd       int
	io       *iouring.File
	size     int64
	bs       int
	pbs      int
	blockDev bool
	readOnly bool
	closed   atomic.Bool
}

// OpenDevice opens path with O_DIRECT. A block device is opened O_EXCL (a
// mounted or already-open device is refused with an error wrapping ErrInUse
// and unix.EBUSY); its sizes come from BLKSSZGET, BLKPBSZGET and
// BLKGETSIZE64. A regular file has block size 4096 and its length, rounded
// down to 4096, as size. Either is locked with flock (LOCK_EX, LOCK_SH for
// ReadOnly) so that a second open, in this or another process, fails with
// ErrInUse instead of corrupting it; that answer is given after retrying
// for up to inUseWait, since a device closed a moment ago may still be
// held by the kernel (see inUseWait). Errors name the path. The result's
// dynamic type is *FileDevice.
func OpenDevice(path string, opts DeviceOptions) (Device, error) {
	deadline := time.Now().Add(inUseWait)
	for pause := 100 * time.Microsecond; ; pause *= 2 {
		d, err := openFileDevice(path, opts)
		if err == nil {
			return d, nil
		}
		left := time.Until(deadline)
		if !errors.Is(err, ErrInUse) || left <= 0 {
			return nil, err
		}
		time.Sleep(min(pause, left)) // the last attempt is at the deadline
	}
}

// inUseWait is how long OpenDevice retries a device found in use. The
// kernel's I/O workers (every flush runs on one) post a request's
// completion before they drop their reference to the open file, so for a
// moment after Close returns, the O_EXCL claim on a block device (held
// until the last reference goes) can still refuse a new open
// (TestReopenAfterIO fails without the retry). A device truly in use is
// refused after this long.
const inUseWait = 100 * time.Millisecond

func openFileDevice(path string, opts DeviceOptions) (*FileDevice, error) {
	if opts.QueueDepth < 0 || opts.QueueDepth > iouring.MaxQueueDepth {
		return nil, fmt.Errorf("rawblock: open %s: queue depth %d: want 0..%d: %w", path, opts.QueueDepth, iouring.MaxQueueDepth, fs.ErrInvalid)
	}
	if opts.CreateSize < 0 || opts.CreateSize%fileBlockSize != 0 {
		return nil, fmt.Errorf("rawblock: open %s: CreateSize %d: want a non-negative multiple of %d: %w", path, opts.CreateSize, fileBlockSize, fs.ErrInvalid)
	}
	if opts.CreateSize > 0 && opts.ReadOnly {
		return nil, fmt.Errorf("rawblock: open %s: CreateSize with ReadOnly: a read-only open cannot create or grow a file: %w", path, fs.ErrInvalid)
	}
	blockDev, create := false, false
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && opts.CreateSize > 0:
		create = true
	case err != nil:
		return nil, fmt.Errorf("rawblock: open device: %w", err)
	case st.Mode().IsRegular():
	case st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0:
		blockDev = true
	default:
		return nil, fmt.Errorf("rawblock: open %s: %s is neither a block device nor a regular file: %w", path, st.Mode().Type(), fs.ErrInvalid)
	}

	flags := os.O_RDWR
	if opts.ReadOnly {
		flags = os.O_RDONLY
	}
	if blockDev && !opts.ReadOnly {
		// O_EXCL on a block device claims it: the kernel refuses (EBUSY)
		// if it is mounted, part of an md/dm device, or claimed by another
		// O_EXCL opener.
		flags |= os.O_EXCL
	}
	if create {
		flags |= os.O_CREATE
	}
	f, err := directio.OpenFile(path, flags, 0o600)
	if err != nil {
		switch {
		case errors.Is(err, syscall.EBUSY):
			return nil, fmt.Errorf("rawblock: open %s: the block device is mounted or opened exclusively by another program: %w: %w", path, ErrInUse, err)
		case errors.Is(err, syscall.EINVAL):
			return nil, fmt.Errorf("rawblock: open %s: O_DIRECT refused (the file system does not support direct I/O?): %w", path, err)
		}
		return nil, fmt.Errorf("rawblock: open device: %w", err)
	}
	d := &FileDevice{path: path, f: f, fd: int(f.Fd()), blockDev: blockDev, readOnly: opts.ReadOnly}
	if err := d.setup(opts); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// setup locks the opened file, sizes it and starts its I/O.
func (d *FileDevice) setup(opts DeviceOptions) error {
	how := unix.LOCK_EX | unix.LOCK_NB
	if opts.ReadOnly {
		how = unix.LOCK_SH | unix.LOCK_NB
	}
	if err := lockDevice(d.fd, how); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("rawblock: open %s: already open (locked by another OpenDevice in this or another process): %w: %w", d.path, ErrInUse, err)
		}
		return fmt.Errorf("rawblock: open %s: flock: %w", d.path, err)
	}
	if d.blockDev {
		if err := d.sizeBlockDevice(); err != nil {
			return err
		}
	} else if err := d.sizeRegularFile(opts.CreateSize); err != nil {
		return err
	}
	io, err := iouring.NewFile(d.fd, iouring.FileOptions{Mode: opts.IO, QueueDepth: opts.QueueDepth})
	if err != nil {
		return fmt.Errorf("rawblock: open %s: %w", d.path, err)
	}
	d.io = io
	return nil
}

func lockDevice(fd, how int) error {
	for {
		err := unix.Flock(fd, how)
		if err != unix.EINTR {
			return err
		}
	}
}

func (d *FileDevice) sizeBlockDevice() error {
	lbs, err := unix.IoctlGetUint32(d.fd, unix.BLKSSZGET)
	if err != nil {
		return fmt.Errorf("rawblock: open %s: ioctl BLKSSZGET: %w", d.path, err)
	}
	pbs, err := unix.IoctlGetUint32(d.fd, unix.BLKPBSZGET)
	if err != nil {
		return fmt.Errorf("rawblock: open %s: ioctl BLKPBSZGET: %w", d.path, err)
	}
	// x/sys has no IoctlGetUint64; BLKGETSIZE64 writes a u64.
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(d.fd), uintptr(unix.BLKGETSIZE64), uintptr(unsafe.Pointer(&size))); errno != 0 {
		return fmt.Errorf("rawblock: open %s: ioctl BLKGETSIZE64: %w", d.path, errno)
	}
	if lbs < minDeviceBlock || lbs > maxDeviceBlock || lbs&(lbs-1) != 0 {
		return fmt.Errorf("rawblock: open %s: logical block size %d: want a power of two in %d..%d: %w", d.path, lbs, minDeviceBlock, maxDeviceBlock, fs.ErrInvalid)
	}
	if pbs < lbs {
		pbs = lbs // some drivers report 0
	}
	d.bs, d.pbs = int(lbs), int(pbs)
	d.size = int64(size) / int64(lbs) * int64(lbs)
	if d.size < int64(lbs) {
		return fmt.Errorf("rawblock: open %s: device of %d bytes is smaller than one block: %w", d.path, size, fs.ErrInvalid)
	}
	return nil
}

func (d *FileDevice) sizeRegularFile(createSize int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return fmt.Errorf("rawblock: open %s: fstat: %w", d.path, err)
	}
	if createSize > st.Size {
		if err := preallocateFile(d.fd, createSize); err != nil {
			return fmt.Errorf("rawblock: open %s: growing to %d bytes: %w", d.path, createSize, err)
		}
		st.Size = createSize
	}
	// A file system may need more than 4096-byte alignment for O_DIRECT
	// (statx DIOALIGN, Linux 6.1+); refuse rather than fail every I/O.
	var stx unix.Statx_t
	if err := unix.Statx(d.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx); err == nil && stx.Mask&unix.STATX_DIOALIGN != 0 {
		if stx.Dio_offset_align == 0 {
			return fmt.Errorf("rawblock: open %s: the file system does not support direct I/O on this file: %w", d.path, fs.ErrInvalid)
		}
		if stx.Dio_offset_align > fileBlockSize || stx.Dio_mem_align > fileBlockSize {
			return fmt.Errorf("rawblock: open %s: direct I/O needs %d-byte offsets and %d-byte buffers, more than the %d-byte blocks of a file device: %w",
				d.path, stx.Dio_offset_align, stx.Dio_mem_align, fileBlockSize, fs.ErrInvalid)
		}
	}
	d.bs, d.pbs = fileBlockSize, fileBlockSize
	d.size = st.Size / fileBlockSize * fileBlockSize
	if d.size < fileBlockSize {
		return fmt.Errorf("rawblock: open %s: file of %d bytes is smaller than one %d-byte block (set DeviceOptions.CreateSize to create or grow it): %w",
			d.path, st.Size, fileBlockSize, fs.ErrInvalid)
	}
	return nil
}

// preallocateFile grows the file to size with allocated blocks, so that writes
// to it do not run out of space later; file systems without fallocate get a
// sparse extension instead.
func preallocateFile(fd int, size int64) error {
	for {
		err := unix.Fallocate(fd, 0, 0, size)
		switch err {
		case nil:
			return nil
		case unix.EINTR:
			continue
		case unix.EOPNOTSUPP:
			return unix.Ftruncate(fd, size)
		default:
			return fmt.Errorf("fallocate: %w", err)
		}
	}
}

// check validates one request before the kernel sees it.
func (d *FileDevice) check(write bool, p []byte, off int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if write && d.readOnly {
		return fmt.Errorf("rawblock: write to %s: opened read-only: %w", d.path, ErrReadOnly)
	}
	if err := checkDeviceRange(d.path, write, int64(d.bs), d.size, int64(len(p)), off); err != nil {
		return err
	}
	if len(p) > 0 {
		if addr := uintptr(unsafe.Pointer(&p[0])); addr%uintptr(d.bs) != 0 {
			return fmt.Errorf("rawblock: %s %s: buffer address %#x is not aligned to the %d-byte block size: %w", devOpName(write), d.path, addr, d.bs, ErrMisaligned)
		}
	}
	return nil
}

func devOpName(write bool) string {
	if write {
		return "write"
	}
	return "read"
}

// checkDeviceRange applies the alignment and range rules every Device shares.
func checkDeviceRange(name string, write bool, bs, size, n, off int64) error {
	if off%bs != 0 || n%bs != 0 {
		return fmt.Errorf("rawblock: %s %s: %d bytes at offset %d: not multiples of the %d-byte block size: %w", devOpName(write), name, n, off, bs, ErrMisaligned)
	}
	if off < 0 || off > size || n > size-off {
		return fmt.Errorf("rawblock: %s %s: %d bytes at offset %d: outside the %d-byte device: %w", devOpName(write), name, n, off, size, ErrOutOfRange)
	}
	return nil
}

// ioErr maps an error from the I/O layer.
func (d *FileDevice) ioErr(what string, err error) error {
	if errors.Is(err, iouring.ErrClosed) {
		return fmt.Errorf("rawblock: %s %s: %w", what, d.path, ErrClosed)
	}
	return fmt.Errorf("rawblock: %s %s: %w", what, d.path, err)
}

// ReadAt implements Device.
func (d *FileDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(false, p, off); err != nil {
		return 0, err
	}
	n, err := d.io.ReadAt(p, off)
	if err != nil {
		return n, d.ioErr("read", err)
	}
	return n, nil
}

// WriteAt implements Device.
func (d *FileDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(true, p, off); err != nil {
		return 0, err
	}
	n, err := d.io.WriteAt(p, off)
	if err != nil {
		return n, d.ioErr("write", err)
	}
	return n, nil
}

// Flush implements Device: fdatasync of the device (a cache flush).
func (d *FileDevice) Flush() error {
	if d.closed.Load() {
		return ErrClosed
	}
	if err := d.io.Sync(); err != nil {
		return d.ioErr("flush", err)
	}
	return nil
}

// poller is a Device whose I/O completions may need the writers' help to
// be noticed promptly (see iouring.File.Poll). The engine calls Poll
// between the chunks its writers copy into the page cache; a Device
// without it loses nothing.
type poller interface {
	Poll()
}

// Poll lets the caller submit queued requests and deliver completions of
// the device's io_uring while its reactor sleeps (see iouring.File.Poll);
// it never blocks and is safe after Close.
func (d *FileDevice) Poll() { d.io.Poll() }

// Do validates every op (alignment, range, read-only; a vectored op, with
// Bufs set, under the rules of ReadvAt) and, only if all pass, issues them
// at once with many in flight; it sets each op's N and Err and returns the
// first error.
func (d *FileDevice) Do(ops []iouring.Op) error {
	for i := range ops {
		var err error
		if ops[i].Bufs != nil {
			err = d.checkv(ops[i].Write, ops[i].Bufs, ops[i].Off)
		} else {
			err = d.check(ops[i].Write, ops[i].Buf, ops[i].Off)
		}
		if err != nil {
			if errors.Is(err, ErrClosed) {
				return err
			}
			return fmt.Errorf("rawblock: batch op %d of %d (nothing issued): %w", i, len(ops), err)
		}
	}
	if err := d.io.Do(ops); err != nil {
		return d.ioErr("batch on", err)
	}
	return nil
}

// RegisterArena registers a with io_uring so that buffers inside it use
// READ_FIXED/WRITE_FIXED (see iouring.File.RegisterArena).
func (d *FileDevice) RegisterArena(a *iouring.Arena) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if err := d.io.RegisterArena(a); err != nil {
		return d.ioErr("register arena for", err)
	}
	return nil
}

// Size implements Device.
func (d *FileDevice) Size() int64 { return d.size }

// BlockSize implements Device: the logical block size.
func (d *FileDevice) BlockSize() int { return d.bs }

// PhysicalBlockSize is the device's physical block size (BLKPBSZGET; 4096
// for a file): writes smaller than it may cost a read-modify-write.
func (d *FileDevice) PhysicalBlockSize() int { return d.pbs }

// Fd is the O_DIRECT file descriptor (for tools that drive a ring
// themselves). It stays owned by the device.
func (d *FileDevice) Fd() int { return d.fd }

// Path is the path the device was opened with.
func (d *FileDevice) Path() string { return d.path }

// IsBlockDevice reports whether the path is a block device (not a file).
func (d *FileDevice) IsBlockDevice() bool { return d.blockDev }

// ReadOnly reports whether the device was opened read-only.
func (d *FileDevice) ReadOnly() bool { return d.readOnly }

// IOMode is the I/O method in use: io_uring or psync.
func (d *FileDevice) IOMode() iouring.Mode { return d.io.Mode() }

// IOReason says why that method is used (and whether fixed buffers are).
func (d *FileDevice) IOReason() string { return d.io.Reason() }

// Close waits for I/O in flight, stops the rings, unlocks and closes the
// device. Later calls return ErrClosed.
func (d *FileDevice) Close() error {
	if !d.closed.CompareAndSwap(false, true) {
		return ErrClosed
	}
	var errs []error
	if err := d.io.Close(); err != nil {
		errs = append(errs, err)
	}
	// Unlock before closing: closing releases the flock only with the
	// last reference to the open file, and the kernel's I/O workers may
	// hold one for a moment after their last completion was delivered
	// (see inUseWait). If stopping the I/O failed, requests may still be
	// in flight, and the lock must go only with that last reference. The
	// io_uring File never touches the descriptor after Close returned.
	if len(errs) == 0 {
		if err := lockDevice(d.fd, unix.LOCK_UN); err != nil {
			errs = append(errs, fmt.Errorf("unlock: %w", err))
		}
	}
	if err := d.f.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("rawblock: close %s: %w", d.path, err)
	}
	return nil
}

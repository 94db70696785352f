package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/rawblock/rawblock/engine"
	"github.com/rawblock/rawblock/iouring"
)

// defaultTempSize is the size of the temporary file used when no --device is
// given: large enough that random I/O is not absorbed by a device cache.
const defaultTempSize = 1 << 30

// fillChunk is the size of each write that fills a fresh temporary file.
const fillChunk = 1 << 20

// benchDevice is an opened device plus what the benchmark needs to know
// about where it came from.
type benchDevice struct {
	dev    *engine.FileDevice
	temp   bool  // a temporary file this process created and will remove
	filled int64 // bytes from offset 0 known to hold written data
}

// openBenchDevice opens path with engine.OpenDevice, or, when path is empty,
// a fresh temporary file of tempSize bytes under $TMPDIR (removed by close).
func openBenchDevice(path string, mode iouring.Mode, tempSize int64) (*benchDevice, error) {
	opts := engine.DeviceOptions{IO: mode, QueueDepth: 32}
	temp := path == ""
	if temp {
		f, err := os.CreateTemp("", "rawblock-bench-*.img")
		if err != nil {
			return nil, fmt.Errorf("creating the temporary device file: %w", err)
		}
		path = f.Name()
		if err := f.Close(); err != nil {
			_ = os.Remove(path)
			return nil, fmt.Errorf("creating the temporary device file: %w", err)
		}
		opts.CreateSize = tempSize
	}
	d, err := engine.OpenDevice(path, opts)
	if err != nil {
		if temp {
			_ = os.Remove(path)
		}
		return nil, err
	}
	fd, ok := d.(*engine.FileDevice)
	if !ok {
		_ = d.Close()
		if temp {
			_ = os.Remove(path)
		}
		return nil, fmt.Errorf("%s: engine.OpenDevice returned a %T, not an *engine.FileDevice", path, d)
	}
	return &benchDevice{dev: fd, temp: temp}, nil
}

// close closes the device and removes it if it is a temporary file.
func (b *benchDevice) close() error {
	err := b.dev.Close()
	if b.temp {
		if rerr := os.Remove(b.dev.Path()); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, fmt.Errorf("removing the temporary device file: %w", rerr))
		}
	}
	return err
}

// ensureFilled writes random data over [0, n) of a temporary file that has
// not been written that far yet. A fallocated file is all unwritten extents,
// which ext4 and XFS read as zeros without any device I/O, so read
// benchmarks would measure nothing; writes into them would measure extent
// conversion. Filling makes both hit real, allocated blocks, as on a device.
// Devices the user named are never written here.
func (b *benchDevice) ensureFilled(n int64) error {
	if !b.temp || n <= b.filled {
		return nil
	}
	const inflight = 8
	arena, err := iouring.NewArena(inflight * fillChunk)
	if err != nil {
		return fmt.Errorf("filling %s: %w", b.dev.Path(), err)
	}
	defer arena.Close()
	fillRandom(arena.Bytes(), 0xf111)
	bs := int64(b.dev.BlockSize())
	n -= n % bs
	ops := make([]iouring.Op, 0, inflight)
	for off := b.filled; off < n; {
		ops = ops[:0]
		for i := 0; i < inflight && off < n; i++ {
			l := min(int64(fillChunk), n-off)
			buf := arena.Bytes()[i*fillChunk : i*fillChunk+int(l)]
			ops = append(ops, iouring.Op{Write: true, Buf: buf, Off: off})
			off += l
		}
		if err := b.dev.Do(ops); err != nil {
			return fmt.Errorf("filling %s: %w", b.dev.Path(), err)
		}
	}
	if err := b.dev.Flush(); err != nil {
		return fmt.Errorf("filling %s: %w", b.dev.Path(), err)
	}
	b.filled = n
	return nil
}

// checkWritable refuses (unless force) to let a write workload loose on a
// block device that holds a file system or other known signature.
func (b *benchDevice) checkWritable(force bool) error {
	if force || !b.dev.IsBlockDevice() {
		return nil
	}
	bs := int64(b.dev.BlockSize())
	n := (int64(signatureSpan()) + bs - 1) / bs * bs
	n = min(n, b.dev.Size()/bs*bs)
	if n == 0 {
		return nil
	}
	arena, err := iouring.NewArena(int(n))
	if err != nil {
		return fmt.Errorf("reading the signature area of %s: %w", b.dev.Path(), err)
	}
	defer arena.Close()
	head := arena.Bytes()[:n]
	if _, err := b.dev.ReadAt(head, 0); err != nil {
		return fmt.Errorf("reading the signature area of %s: %w", b.dev.Path(), err)
	}
	return checkSignature(b.dev.Path(), head)
}

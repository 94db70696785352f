package engine

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// memChunk is the allocation unit of a MemDevice: untouched chunks take no
// memory and read as zeros, so a large sparse device is cheap.
const memChunk = 64 << 10

const memShards = 64

// MemDevice is an in-memory Device for tests and for users testing their
// own daemons. It applies the same validation as a FileDevice except buffer
// address alignment (ErrMisaligned for offsets and lengths, ErrOutOfRange),
// is safe for concurrent use, has a no-op Flush (nothing is volatile), and
// returns ErrClosed after Close.
type MemDevice struct {
	size   int64
	bs     int
	closed atomic.Bool
	shards [memShards]memShard
}

type memShard struct {
	mu     sync.RWMutex
	chunks map[int64][]byte // chunk index -> memChunk bytes
}

// NewMemDevice returns an in-memory device of size bytes with the given
// logical block size. It panics (a programming error) unless blockSize is a
// power of two in 512..65536 and size a positive multiple of it.
func NewMemDevice(size int64, blockSize int) Device {
	if blockSize < minDeviceBlock || blockSize > maxDeviceBlock || blockSize&(blockSize-1) != 0 {
		panic(fmt.Sprintf("rawblock: NewMemDevice: block size %d: want a power of two in %d..%d", blockSize, minDeviceBlock, maxDeviceBlock))
	}
	if size <= 0 || size%int64(blockSize) != 0 {
		panic(fmt.Sprintf("rawblock: NewMemDevice: size %d: want a positive multiple of the block size %d", size, blockSize))
	}
	d := &MemDevice{size: size, bs: blockSize}
	for i := range d.shards {
		d.shards[i].chunks = make(map[int64][]byte)
	}
	return d
}

func (d *MemDevice) check(write bool, p []byte, off int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	return checkDeviceRange("memory device", write, int64(d.bs), d.size, int64(len(p)), off)
}

// each calls fn for every chunk piece of [off, off+len(p)): the chunk's
// shard, index, the offset inside the chunk and the matching part of p.
func (d *MemDevice) each(p []byte, off int64, fn func(sh *memShard, idx int64, in int, part []byte) error) error {
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/memChunk, int(pos%memChunk)
		n := min(memChunk-in, len(p)-done)
		if err := fn(&d.shards[idx%memShards], idx, in, p[done:done+n]); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// ReadAt implements Device; never-written blocks read as zeros.
func (d *MemDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(false, p, off); err != nil {
		return 0, err
	}
	err := d.each(p, off, func(sh *memShard, idx int64, in int, part []byte) error {
		sh.mu.RLock()
		defer sh.mu.RUnlock()
		if sh.chunks == nil {
			return ErrClosed
		}
		if c := sh.chunks[idx]; c != nil {
			copy(part, c[in:])
		} else {
			clear(part)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements Device.
func (d *MemDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(true, p, off); err != nil {
		return 0, err
	}
	err := d.each(p, off, func(sh *memShard, idx int64, in int, part []byte) error {
		sh.mu.Lock()
		defer sh.mu.Unlock()
		if sh.chunks == nil {
			return ErrClosed
		}
		c := sh.chunks[idx]
		if c == nil {
			c = make([]byte, memChunk)
			sh.chunks[idx] = c
		}
		copy(c[in:], part)
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush implements Device; memory has no volatile cache.
func (d *MemDevice) Flush() error {
	if d.closed.Load() {
		return ErrClosed
	}
	return nil
}

// Size implements Device.
func (d *MemDevice) Size() int64 { return d.size }

// BlockSize implements Device.
func (d *MemDevice) BlockSize() int { return d.bs }

// Close frees the memory; later calls return ErrClosed.
func (d *MemDevice) Close() error {
	if !d.closed.CompareAndSwap(false, true) {
		return ErrClosed
	}
	for i := range d.shards {
		sh := &d.shards[i]
		sh.mu.Lock()
		sh.chunks = nil
		sh.mu.Unlock()
	}
	return nil
}

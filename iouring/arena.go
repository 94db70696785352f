//go:build linux

package iouring

import (
	"fmt"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// maxArena bounds NewArena: registration indexes 1 GiB chunks with a
// uint16, and no sane cache needs more than this anyway.
const maxArena = 1 << 40

// maxRegBuffers is the kernel's limit on registered buffers per ring
// (IORING_MAX_REG_BUFFERS).
const maxRegBuffers = 1 << 14

// Arena is page-aligned anonymous memory mapped outside the Go heap: the GC
// neither scans nor frees it, so the kernel may keep writing into it for as
// long as a request is in flight, and it can be registered with io_uring
// once (IORING_REGISTER_BUFFERS) for READ_FIXED/WRITE_FIXED. Every address
// in it is aligned as O_DIRECT needs when offsets are multiples of the
// logical block size.
type Arena struct {
	base   uintptr // immutable
	size   int     // immutable
	chunk  int     // immutable: the size of each registered buffer (see chunks)
	mu     sync.Mutex
	mem    []byte
	closed atomic.Bool
	users  atomic.Int32 // Files that have it registered
}

// NewArena maps size bytes (rounded up to the page size) of zeroed memory,
// MAP_PRIVATE|MAP_ANONYMOUS. size must be in 1..1 TiB.
func NewArena(size int) (*Arena, error) {
	if size <= 0 || size > maxArena {
		return nil, fmt.Errorf("iouring: arena size %d: want 1..%d: %w", size, maxArena, syscall.EINVAL)
	}
	page := os.Getpagesize()
	size = (size + page - 1) / page * page
	mem, err := mapAligned(size, hugePage)
	if err != nil {
		return nil, fmt.Errorf("iouring: mmap arena of %d bytes: %w", size, err)
	}
	// Huge pages make frames that follow each other in the arena follow
	// each other in physical memory too, so the block layer merges a
	// 1 MiB write of 256 frames into a few segments, one request, instead
	// of splitting it (devices take 128 segments or so), and pinning the
	// pages for I/O walks fewer of them. Best effort: without THP the
	// arena works the same.
	_ = unix.Madvise(mem, unix.MADV_HUGEPAGE)
	return &Arena{base: uintptr(unsafe.Pointer(&mem[0])), size: size, chunk: chunkSize(size), mem: mem}, nil
}

// Bytes is the whole arena; nil after Close.
func (a *Arena) Bytes() []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mem
}

// Size is the arena's length in bytes.
func (a *Arena) Size() int { return a.size }

// Contains reports whether p (non-empty) lies entirely inside the arena.
func (a *Arena) Contains(p []byte) bool {
	if len(p) == 0 || a.closed.Load() {
		return false
	}
	s := uintptr(unsafe.Pointer(&p[0]))
	return s >= a.base && s-a.base <= uintptr(a.size) && uintptr(len(p)) <= uintptr(a.size)-(s-a.base)
}

// fixedIndex returns the registered-buffer index of p when p lies inside
// one registered chunk of the arena (see chunks).
func (a *Arena) fixedIndex(p []byte) (uint16, bool) {
	if !a.Contains(p) {
		return 0, false
	}
	start := uintptr(unsafe.Pointer(&p[0])) - a.base
	end := start + uintptr(len(p)) - 1
	c := uintptr(a.chunk)
	if start/c != end/c {
		return 0, false
	}
	return uint16(start / c), true
}

// chunkSize is the registered-buffer size for an arena of size bytes:
// a huge page, doubled until the chunks are fewer than maxRegBuffers.
func chunkSize(size int) int {
	chunk := hugePage
	for size/chunk >= maxRegBuffers && chunk < maxFixedBuf {
		chunk *= 2
	}
	return chunk
}

// chunks splits the arena into the iovecs it is registered as: huge pages
// (2 MiB), or more when the arena would need over maxRegBuffers of them
// (the kernel refuses a single buffer over 1 GiB, maxFixedBuf).
//
// The kernel describes a registered buffer to the block layer in huge-page
// segments only if every page of it is in a huge page; otherwise in 4 KiB
// segments, and a device taking 128 segments per request (a loop device)
// then splits each 1 MiB fixed write in two. The arena asks for huge pages
// but may not get all of them: registered as one 1 GiB chunk, a 256 MiB
// cache with 232 MiB in huge pages had its 1 GiB written as 1,863 requests
// of 563 KiB on average; in 2 MiB chunks, each coalesced on its own, as
// 1,065 of 982 KiB (fio's 1 MiB writes: 1,024), at the same or better speed.
// An I/O that crosses a chunk boundary is a plain READ/WRITE.
func (a *Arena) chunks() [][]byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out [][]byte
	for off := 0; off < len(a.mem); off += a.chunk {
		out = append(out, a.mem[off:min(off+a.chunk, len(a.mem))])
	}
	if len(out) > math.MaxUint16 {
		panic("iouring: arena has more chunks than buffer indexes")
	}
	return out
}

// Close unmaps the arena. It fails while a File still has the arena
// registered (the kernel could be writing into it): close or re-register
// those Files first. Later calls return ErrClosed.
func (a *Arena) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.mem == nil {
		return ErrClosed
	}
	if n := a.users.Load(); n > 0 {
		return fmt.Errorf("iouring: arena still registered with %d open File(s): %w", n, syscall.EBUSY)
	}
	a.closed.Store(true)
	err := unmapArena(a.mem)
	a.mem = nil
	if err != nil {
		return fmt.Errorf("iouring: munmap arena: %w", err)
	}
	return nil
}

// acquire marks the arena as registered with one more File; it fails if
// the arena is closed.
func (a *Arena) acquire() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.mem == nil {
		return ErrClosed
	}
	a.users.Add(1)
	return nil
}

func (a *Arena) release() {
	if a.users.Add(-1) < 0 {
		panic("iouring: arena released more often than acquired")
	}
}

// hugePage is the size of an x86-64/arm64 transparent huge page.
const hugePage = 2 << 20

// mapAligned maps size bytes of anonymous memory starting at a multiple of
// align (a power of two), so that huge pages can back all of it: it maps
// align more and gives back the unaligned head and the tail. unmapArena
// gives the result back.
func mapAligned(size, align int) ([]byte, error) {
	const prot, flags = unix.PROT_READ | unix.PROT_WRITE, unix.MAP_PRIVATE | unix.MAP_ANONYMOUS
	raw, err := unix.MmapPtr(-1, 0, nil, uintptr(size+align), prot, flags)
	if err != nil {
		return nil, err
	}
	head := -uintptr(raw) & uintptr(align-1)
	base := unsafe.Add(raw, head)
	if head > 0 {
		if err := unix.MunmapPtr(raw, head); err != nil {
			unix.MunmapPtr(raw, uintptr(size+align))
			return nil, err
		}
	}
	if tail := uintptr(align) - head; tail > 0 {
		if err := unix.MunmapPtr(unsafe.Add(base, size), tail); err != nil {
			unix.MunmapPtr(base, uintptr(size)+tail)
			return nil, err
		}
	}
	return unsafe.Slice((*byte)(base), size), nil
}

// unmapArena unmaps memory from mapAligned.
func unmapArena(mem []byte) error {
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(mem)), uintptr(len(mem)))
}

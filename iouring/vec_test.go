//go:build linux

package iouring

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"
)

// frames returns n block-aligned buffers of bs bytes that are NOT adjacent
// in memory (every other block of one allocation), so a vectored request
// really gathers from or scatters into separate places.
func frames(n, bs int) [][]byte {
	mem := directio.AlignedBlock(2 * n * bs)
	out := make([][]byte, n)
	for i := range out {
		out[i] = mem[2*i*bs : (2*i+1)*bs : (2*i+1)*bs]
	}
	return out
}

func TestRingVectored(t *testing.T) {
	r := lockedRing(t, 8)
	f := tempDirect(t, 1<<20)
	fd := int(f.Fd())
	const bs = 4096
	src := frames(3, bs)
	for i, b := range src {
		fill(b, uint64(i), 1)
	}
	iov := make([]unix.Iovec, len(src))
	for i, b := range src {
		iov[i].Base = &b[0]
		iov[i].SetLen(len(b))
	}
	if err := r.PrepWritev(fd, iov, 2*bs, 1); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.ud != 1 || c.res != 3*bs {
		t.Fatalf("writev completion %+v", c)
	}
	// Read the same range back split differently: 2 blocks, then 1.
	big := directio.AlignedBlock(2 * bs)
	small := directio.AlignedBlock(bs)
	riov := make([]unix.Iovec, 2)
	riov[0].Base, riov[1].Base = &big[0], &small[0]
	riov[0].SetLen(len(big))
	riov[1].SetLen(len(small))
	if err := r.PrepReadv(fd, riov, 2*bs, 2); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.ud != 2 || c.res != 3*bs {
		t.Fatalf("readv completion %+v", c)
	}
	if !bytes.Equal(big[:bs], src[0]) || !bytes.Equal(big[bs:], src[1]) || !bytes.Equal(small, src[2]) {
		t.Fatal("readv read back different bytes")
	}

	// Limits are refused before the kernel sees anything.
	before := r.Pending()
	many := make([]unix.Iovec, MaxIovecs+1)
	if err := r.PrepReadv(fd, many, 0, 3); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("readv of %d iovecs: %v, want EINVAL", len(many), err)
	}
	huge := make([]unix.Iovec, 2)
	for i := range huge {
		huge[i].Base = &small[0] // never dereferenced: refused first
		huge[i].SetLen(maxRW/2 + bs)
	}
	if err := r.PrepWritev(fd, huge, 0, 4); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("writev over %d bytes: %v, want EINVAL", maxRW, err)
	}
	if err := r.PrepReadv(fd, riov, -bs, 5); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("readv at a negative offset: %v, want EINVAL", err)
	}
	if r.Pending() != before {
		t.Errorf("refused requests were queued: %d pending, %d before", r.Pending(), before)
	}
	// The kernel checks each segment's O_DIRECT alignment (on blocks
	// that are written: a file system fills holes without looking).
	odd := make([]unix.Iovec, 1)
	odd[0].Base = &big[1]
	odd[0].SetLen(bs)
	if err := r.PrepReadv(fd, odd, 2*bs, 6); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.ud != 6 || c.res != -int32(syscall.EINVAL) {
		t.Fatalf("misaligned readv completion %+v, want -EINVAL", c)
	}
}

// TestFileVectored: round trips of 1..1500 non-contiguous frames through
// WritevAt and ReadvAt, checked against plain reads of the same range.
func TestFileVectored(t *testing.T) {
	const bs = 4096
	counts := []int{1, 2, 255, 256, MaxIovecs, MaxIovecs + 476}
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, 4<<20+MaxIovecs*2*bs)
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode, QueueDepth: 8})
			for ci, n := range counts {
				off := int64(ci) * bs // overlapping ranges, each checked at once
				src := frames(n, bs)
				for i, b := range src {
					fill(b, uint64(i), uint64(ci+1))
				}
				if got, err := f.WritevAt(src, off); err != nil || got != n*bs {
					t.Fatalf("WritevAt %d buffers: %d, %v", n, got, err)
				}
				flat := directio.AlignedBlock(n * bs)
				if got, err := f.ReadAt(flat, off); err != nil || got != n*bs {
					t.Fatalf("ReadAt after WritevAt of %d buffers: %d, %v", n, got, err)
				}
				for i, b := range src {
					if !bytes.Equal(flat[i*bs:(i+1)*bs], b) {
						t.Fatalf("%d buffers: block %d on disk differs from buffer %d", n, i, i)
					}
				}
				dst := frames(n, bs)
				if got, err := f.ReadvAt(dst, off); err != nil || got != n*bs {
					t.Fatalf("ReadvAt %d buffers: %d, %v", n, got, err)
				}
				for i := range dst {
					if !bytes.Equal(dst[i], src[i]) {
						t.Fatalf("ReadvAt %d buffers: buffer %d differs", n, i)
					}
				}
			}
			// Uneven buffers (multiples of the block size) and empty ones.
			src := [][]byte{directio.AlignedBlock(3 * bs), nil, directio.AlignedBlock(bs), {}, directio.AlignedBlock(2 * bs)}
			for i, b := range src {
				fill(b, uint64(i), 99)
			}
			if got, err := f.WritevAt(src, 64*bs); err != nil || got != 6*bs {
				t.Fatalf("WritevAt uneven: %d, %v", got, err)
			}
			dst := [][]byte{directio.AlignedBlock(bs), {}, directio.AlignedBlock(5 * bs)}
			if got, err := f.ReadvAt(dst, 64*bs); err != nil || got != 6*bs {
				t.Fatalf("ReadvAt uneven: %d, %v", got, err)
			}
			if !bytes.Equal(append(dst[0], dst[2]...), bytes.Join(src, nil)) {
				t.Fatal("uneven round trip differs")
			}
			if got, err := f.ReadvAt(nil, 0); got != 0 || err != nil {
				t.Fatalf("ReadvAt(nil) = %d, %v", got, err)
			}
			if got, err := f.ReadvAt([][]byte{{}, {}}, 0); got != 0 || err != nil {
				t.Fatalf("ReadvAt of empty buffers = %d, %v", got, err)
			}
		})
	}
}

// TestFileVectoredErrors: misaligned segments (the kernel's EINVAL), bad
// offsets and short transfers.
func TestFileVectoredErrors(t *testing.T) {
	const bs = 4096
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, 1<<20)
			// Written blocks: a file system fills holes without checking
			// the alignment.
			if _, err := osf.WriteAt(directio.AlignedBlock(1<<16), 0); err != nil {
				t.Fatal(err)
			}
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode})
			good := frames(3, bs)
			mem := directio.AlignedBlock(2 * bs)
			for _, c := range []struct {
				name string
				bufs [][]byte
			}{
				{"address", [][]byte{good[0], mem[1 : bs+1], good[1]}},
				{"length", [][]byte{good[0], mem[:1000], good[1]}},
			} {
				if _, err := f.ReadvAt(c.bufs, 0); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("misaligned %s ReadvAt: %v, want EINVAL", c.name, err)
				}
				if _, err := f.WritevAt(c.bufs, 0); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("misaligned %s WritevAt: %v, want EINVAL", c.name, err)
				}
			}
			if _, err := f.ReadvAt(good, 100); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("misaligned offset: %v, want EINVAL", err)
			}
			if _, err := f.ReadvAt(good, -bs); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("negative offset: %v, want EINVAL", err)
			}

			// Short: a buffered file of 1000 bytes.
			sf := shortFile(t)
			g := newTestFile(t, int(sf.Fd()), FileOptions{Mode: mode})
			bufs := [][]byte{make([]byte, 600), make([]byte, 600), make([]byte, 600)}
			n, err := g.ReadvAt(bufs, 0)
			if n != 1000 || err != io.EOF {
				t.Fatalf("ReadvAt past the end = %d, %v; want 1000, io.EOF", n, err)
			}
			if !bytes.Equal(bufs[1][:400], bytes.Repeat([]byte{7}, 400)) {
				t.Fatal("short ReadvAt: second buffer not filled")
			}
			ops := []Op{{Bufs: bufs}}
			if err := g.Do(ops); !errors.Is(err, io.EOF) || ops[0].N != 1000 {
				t.Fatalf("Do vectored past the end: N %d, %v", ops[0].N, err)
			}
		})
	}
}

// TestFileVectoredBatch: Do with plain and vectored ops mixed, one of them
// longer than MaxIovecs buffers, at a queue depth smaller than the batch.
func TestFileVectoredBatch(t *testing.T) {
	const bs = 4096
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, 16<<20)
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode, QueueDepth: 4})
			sizes := []int{0, 1, 8, 256, 0, MaxIovecs + 3, 2, 0, 16, 31}
			var ops []Op
			off := int64(0)
			for i, n := range sizes {
				op := Op{Write: true, Off: off}
				if n == 0 {
					op.Buf = directio.AlignedBlock(2 * bs)
					fill(op.Buf, uint64(i), 5)
					off += 2 * bs
				} else {
					op.Bufs = frames(n, bs)
					for j, b := range op.Bufs {
						fill(b, uint64(i<<16|j), 5)
					}
					off += int64(n) * bs
				}
				ops = append(ops, op)
			}
			if err := f.Do(ops); err != nil {
				t.Fatalf("Do writes: %v", err)
			}
			reads := make([]Op, len(ops))
			for i, op := range ops {
				if want := len(op.Buf) + vecLen(op.Bufs); op.N != want || op.Err != nil {
					t.Fatalf("write op %d: N %d Err %v, want %d", i, op.N, op.Err, want)
				}
				reads[i] = Op{Off: op.Off}
				if op.Bufs != nil {
					reads[i].Bufs = frames(len(op.Bufs), bs)
				} else {
					reads[i].Buf = directio.AlignedBlock(len(op.Buf))
				}
			}
			if err := f.Do(reads); err != nil {
				t.Fatalf("Do reads: %v", err)
			}
			for i := range reads {
				if !bytes.Equal(bytes.Join(reads[i].Bufs, nil), bytes.Join(ops[i].Bufs, nil)) || !bytes.Equal(reads[i].Buf, ops[i].Buf) {
					t.Fatalf("op %d read back different bytes", i)
				}
			}
			// A vectored op with a bad segment fails alone.
			bad := []Op{
				{Bufs: frames(2, bs), Off: 0},
				{Bufs: [][]byte{directio.AlignedBlock(2 * bs)[1 : bs+1]}, Off: 0},
			}
			if err := f.Do(bad); !errors.Is(err, syscall.EINVAL) || bad[0].Err != nil || bad[0].N != 2*bs {
				t.Fatalf("Do with a misaligned vectored op: %v; ops %+v", err, bad)
			}
		})
	}
}

// TestFileVectoredConcurrent: goroutines each own a region and round-trip
// vectored I/O through it while others do the same (run with -race).
func TestFileVectoredConcurrent(t *testing.T) {
	const bs, workers, per, nbuf = 4096, 16, 30, 9
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, workers*nbuf*bs)
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode, QueueDepth: 8})
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					src, dst := frames(nbuf, bs), frames(nbuf, bs)
					off := int64(w * nbuf * bs)
					for i := range per {
						k := 1 + i%nbuf // vary the number of buffers
						for j := range k {
							fill(src[j], uint64(w<<8|j), uint64(i))
						}
						if _, err := f.WritevAt(src[:k], off); err != nil {
							errs <- err
							return
						}
						if _, err := f.ReadvAt(dst[:k], off); err != nil {
							errs <- err
							return
						}
						for j := range k {
							if !bytes.Equal(src[j], dst[j]) {
								errs <- fmt.Errorf("worker %d round %d: buffer %d differs", w, i, j)
								return
							}
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
		})
	}
}

// TestFileVectoredNoAllocs: vectored requests allocate nothing per call in
// steady state on the io_uring path.
func TestFileVectoredNoAllocs(t *testing.T) {
	needIOURing(t)
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	const bs = 4096
	osf := tempDirect(t, 1<<20)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 4})
	bufs := frames(64, bs)
	if _, err := f.WritevAt(bufs, 0); err != nil {
		t.Fatal(err)
	}
	// Grow every slot's iovec array first.
	for range 8 {
		if _, err := f.ReadvAt(bufs, 0); err != nil {
			t.Fatal(err)
		}
	}
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := f.ReadvAt(bufs, 0); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per ReadvAt, want 0", allocs)
	}
}

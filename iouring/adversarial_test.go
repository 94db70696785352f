//go:build linux

package iouring_test

import (
	"bytes"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"

	"github.com/rawblock/rawblock/engine"
	"github.com/rawblock/rawblock/iouring"
)

const advBS = 4096

// advFile makes an O_DIRECT temp file of size bytes and returns its fd.
func advFile(t *testing.T, size int64) (*os.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	f, err := directio.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Skipf("O_DIRECT unavailable: %v", err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, path
}

func advModes(t *testing.T) []iouring.Mode {
	modes := []iouring.Mode{iouring.ModePsync}
	if iouring.Probe() == nil {
		modes = append(modes, iouring.ModeIOURing)
	} else {
		t.Logf("io_uring unavailable: %v", iouring.Probe())
	}
	return modes
}

func advNewFile(t *testing.T, fd int, mode iouring.Mode, qd int) *iouring.File {
	t.Helper()
	f, err := iouring.NewFile(fd, iouring.FileOptions{Mode: mode, QueueDepth: qd})
	if err != nil {
		t.Fatal(err)
	}
	if f.Mode() != mode {
		t.Fatalf("Mode() = %q, want %q", f.Mode(), mode)
	}
	return f
}

func advWithTimeout(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: hung for %v", what, d)
	}
}

func TestAdvNewFileBadOptions(t *testing.T) {
	f, _ := advFile(t, 1<<20)
	fd := int(f.Fd())
	bad := []iouring.FileOptions{
		{QueueDepth: -1},
		{QueueDepth: iouring.MaxQueueDepth + 1},
		{QueueDepth: math.MaxInt},
		{Rings: -1},
		{Rings: iouring.MaxRings + 1},
		{Mode: "bogus"},
		{Mode: iouring.ModePsync, QueueDepth: -5},
	}
	for _, o := range bad {
		file, err := iouring.NewFile(fd, o)
		if err == nil {
			file.Close()
			t.Errorf("NewFile(%+v) succeeded", o)
			continue
		}
		if !errors.Is(err, syscall.EINVAL) {
			t.Errorf("NewFile(%+v) = %v, want EINVAL", o, err)
		}
	}
	if _, err := iouring.NewFile(-1, iouring.FileOptions{}); !errors.Is(err, syscall.EBADF) {
		t.Errorf("NewFile(-1) = %v", err)
	}
	// A closed fd.
	r, w, _ := os.Pipe()
	rfd := int(r.Fd())
	r.Close()
	w.Close()
	if file, err := iouring.NewFile(rfd, iouring.FileOptions{Mode: iouring.ModePsync}); err == nil {
		file.Close()
		t.Errorf("NewFile on closed fd succeeded")
	}
	// Maximum queue depth works.
	file, err := iouring.NewFile(fd, iouring.FileOptions{QueueDepth: iouring.MaxQueueDepth})
	if err != nil {
		t.Fatalf("NewFile(MaxQueueDepth) = %v", err)
	}
	file.Close()
}

func TestAdvEnvMode(t *testing.T) {
	f, _ := advFile(t, 1<<20)
	fd := int(f.Fd())
	t.Setenv(iouring.EnvMode, "psync")
	file, err := iouring.NewFile(fd, iouring.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if file.Mode() != iouring.ModePsync || !strings.Contains(file.Reason(), "psync") || !strings.Contains(file.Reason(), iouring.EnvMode) {
		t.Errorf("RAWBLOCK_IO=psync: Mode %q Reason %q", file.Mode(), file.Reason())
	}
	file.Close()
	if iouring.Probe() == nil {
		// The env var overrides only ModeAuto.
		file, err := iouring.NewFile(fd, iouring.FileOptions{Mode: iouring.ModeIOURing})
		if err != nil {
			t.Fatal(err)
		}
		if file.Mode() != iouring.ModeIOURing {
			t.Errorf("explicit io_uring overridden by env: %q", file.Mode())
		}
		file.Close()
		t.Setenv(iouring.EnvMode, "io_uring")
		file, err = iouring.NewFile(fd, iouring.FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if file.Mode() != iouring.ModeIOURing || !strings.Contains(file.Reason(), "io_uring") {
			t.Errorf("RAWBLOCK_IO=io_uring: %q %q", file.Mode(), file.Reason())
		}
		file.Close()
	}
	t.Setenv(iouring.EnvMode, "bogus")
	if file, err := iouring.NewFile(fd, iouring.FileOptions{}); err == nil {
		file.Close()
		t.Error("RAWBLOCK_IO=bogus accepted")
	}
}

func TestAdvBadIO(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			f, _ := advFile(t, 4*advBS)
			file := advNewFile(t, int(f.Fd()), mode, 4)
			defer file.Close()
			blk := directio.AlignedBlock(2 * advBS)
			// zero length
			if n, err := file.ReadAt(blk[:0], 0); n != 0 || err != nil {
				t.Errorf("zero-length read = %d, %v", n, err)
			}
			if n, err := file.WriteAt(blk[:0], 0); n != 0 || err != nil {
				t.Errorf("zero-length write = %d, %v", n, err)
			}
			if n, err := file.ReadvAt(nil, 0); n != 0 || err != nil {
				t.Errorf("nil ReadvAt = %d, %v", n, err)
			}
			if n, err := file.WritevAt([][]byte{{}, {}}, 0); n != 0 || err != nil {
				t.Errorf("empty WritevAt = %d, %v", n, err)
			}
			// negative offsets
			for _, off := range []int64{-1, -advBS, math.MinInt64} {
				if _, err := file.ReadAt(blk[:advBS], off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("ReadAt(off %d) = %v", off, err)
				}
				if _, err := file.WriteAt(blk[:advBS], off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("WriteAt(off %d) = %v", off, err)
				}
				if _, err := file.ReadvAt([][]byte{blk[:advBS]}, off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("ReadvAt(off %d) = %v", off, err)
				}
			}
			// O_DIRECT alignment: the kernel answers EINVAL, which reaches the
			// caller. (On a hole of a sparse file ext4 does not check the
			// alignment of reads, so map the blocks first.)
			if _, err := file.WriteAt(directio.AlignedBlock(4*advBS), 0); err != nil {
				t.Fatal(err)
			}
			if _, err := file.ReadAt(blk[1:advBS+1], 0); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("unaligned buffer read = %v", err)
			}
			if _, err := file.WriteAt(blk[1:advBS+1], 0); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("unaligned buffer write = %v", err)
			}
			if _, err := file.ReadAt(blk[:advBS], 1); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("unaligned offset read = %v", err)
			}
			if _, err := file.ReadAt(blk[:100], 0); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("unaligned length read = %v", err)
			}
			// Huge offset (valid int64) read: EOF-ish error, no panic.
			if n, err := file.ReadAt(blk[:advBS], math.MaxInt64-advBS+1-(math.MaxInt64-advBS+1)%advBS); n != 0 || err == nil {
				t.Errorf("read at huge offset = %d, %v", n, err)
			}
			// Do with a negative offset fails before any I/O.
			wb := directio.AlignedBlock(advBS)
			for i := range wb {
				wb[i] = 0xAB
			}
			ops := []iouring.Op{{Write: true, Buf: wb, Off: 0}, {Write: true, Buf: wb, Off: -advBS}}
			if err := file.Do(ops); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("Do with negative offset = %v", err)
			}
			rb := directio.AlignedBlock(advBS)
			if _, err := file.ReadAt(rb, 0); err != nil {
				t.Fatal(err)
			}
			if rb[0] != 0 {
				t.Errorf("Do with a bad op wrote block 0")
			}
			if err := file.Do(nil); err != nil {
				t.Errorf("Do(nil) = %v", err)
			}
		})
	}
}

func TestAdvReadPastEOF(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			f, _ := advFile(t, 2*advBS)
			file := advNewFile(t, int(f.Fd()), mode, 4)
			defer file.Close()
			buf := directio.AlignedBlock(4 * advBS)
			// entirely past EOF
			n, err := file.ReadAt(buf[:advBS], 2*advBS)
			if n != 0 || err == nil {
				t.Errorf("read at EOF = %d, %v", n, err)
			}
			if err != io.EOF {
				t.Errorf("read at EOF = %v, want io.EOF (io.ReaderAt)", err)
			}
			// straddling EOF: n < len(p) with an error
			n, err = file.ReadAt(buf, advBS)
			if n != advBS || err != io.EOF {
				t.Errorf("read across EOF = %d, %v; want %d and io.EOF", n, err, advBS)
			}
			n, err = file.ReadvAt([][]byte{buf[:advBS], buf[advBS : 2*advBS], buf[2*advBS : 3*advBS]}, 0)
			if n != 2*advBS || err != io.EOF {
				t.Errorf("readv across EOF = %d, %v", n, err)
			}
			ops := []iouring.Op{{Buf: buf[:advBS], Off: 0}, {Buf: buf[advBS : 3*advBS], Off: advBS}, {Buf: buf[3*advBS:], Off: 8 * advBS}}
			err = file.Do(ops)
			if err == nil || ops[0].Err != nil || ops[0].N != advBS || ops[1].N != advBS || ops[1].Err == nil || ops[2].N != 0 || ops[2].Err == nil {
				t.Errorf("Do across EOF: %v; ops %+v %+v %+v", err, ops[0].Err, ops[1], ops[2].Err)
			}
			if mode == iouring.ModeIOURing {
				op := &iouring.Op{Buf: buf[:2*advBS], Off: advBS}
				done := make(chan *iouring.Op, 1)
				if err := file.Start(op, func(o *iouring.Op) { done <- o }); err != nil {
					t.Fatal(err)
				}
				o := <-done
				if o.N != advBS || o.Err != io.EOF {
					t.Errorf("Start across EOF: N %d Err %v", o.N, o.Err)
				}
			}
		})
	}
}

func TestAdvKernelErrorsReachCaller(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			_, path := advFile(t, 4*advBS)
			ro, err := directio.OpenFile(path, os.O_RDONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			file := advNewFile(t, int(ro.Fd()), mode, 4)
			defer file.Close()
			buf := directio.AlignedBlock(advBS)
			if _, err := file.WriteAt(buf, 0); !errors.Is(err, syscall.EBADF) {
				t.Errorf("write to read-only fd = %v, want EBADF", err)
			}
			if _, err := file.WritevAt([][]byte{buf}, 0); !errors.Is(err, syscall.EBADF) {
				t.Errorf("writev to read-only fd = %v, want EBADF", err)
			}
			ops := []iouring.Op{{Write: true, Buf: buf}}
			if err := file.Do(ops); !errors.Is(err, syscall.EBADF) || !errors.Is(ops[0].Err, syscall.EBADF) {
				t.Errorf("Do write to read-only fd = %v / %v", err, ops[0].Err)
			}
		})
	}
}

func TestAdvUseAfterClose(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			f, _ := advFile(t, 4*advBS)
			file := advNewFile(t, int(f.Fd()), mode, 4)
			if err := file.Close(); err != nil {
				t.Fatal(err)
			}
			buf := directio.AlignedBlock(advBS)
			checks := map[string]error{}
			_, checks["ReadAt"] = file.ReadAt(buf, 0)
			_, checks["WriteAt"] = file.WriteAt(buf, 0)
			_, checks["ReadvAt"] = file.ReadvAt([][]byte{buf}, 0)
			_, checks["WritevAt"] = file.WritevAt([][]byte{buf}, 0)
			checks["Sync"] = file.Sync()
			checks["Do"] = file.Do([]iouring.Op{{Buf: buf}})
			checks["Do(nil)"] = file.Do(nil)
			called := false
			checks["Start"] = file.Start(&iouring.Op{Buf: buf}, func(*iouring.Op) { called = true })
			checks["RegisterArena"] = file.RegisterArena(nil)
			checks["Close"] = file.Close()
			_, checks["ReadAt(zero)"] = file.ReadAt(nil, 0)
			_, checks["ReadAt(neg)"] = file.ReadAt(buf, -1)
			for name, err := range checks {
				if !errors.Is(err, iouring.ErrClosed) {
					t.Errorf("%s after Close = %v, want ErrClosed", name, err)
				}
			}
			if called {
				t.Error("Start callback called after Close")
			}
			file.Poll() // must not panic
			_ = file.Stats()
			_ = file.Reason()
			if file.Mode() != mode || file.Fd() != int(f.Fd()) {
				t.Error("Mode/Fd changed after Close")
			}
		})
	}
}

func TestAdvConcurrentVerify(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			const blocks = 256
			f, _ := advFile(t, blocks*advBS)
			file := advNewFile(t, int(f.Fd()), mode, 3) // fewer slots than goroutines
			defer file.Close()
			const G = 48
			var wg sync.WaitGroup
			errs := make(chan error, G)
			for g := 0; g < G; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(g), 1))
					wb := directio.AlignedBlock(advBS)
					rb := directio.AlignedBlock(advBS)
					for i := 0; i < 40; i++ {
						// each goroutine owns blocks g, g+G, g+2G ...
						blk := int64(g + G*rng.IntN(blocks/G))
						for j := range wb {
							wb[j] = byte(g*31 + i + j)
						}
						if _, err := file.WriteAt(wb, blk*advBS); err != nil {
							errs <- err
							return
						}
						if _, err := file.ReadAt(rb, blk*advBS); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(wb, rb) {
							errs <- errors.New("data mismatch")
							return
						}
					}
				}(g)
			}
			advWithTimeout(t, 20*time.Second, "concurrent I/O", wg.Wait)
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			// A Do with many more ops than the queue depth.
			ops := make([]iouring.Op, 200)
			for i := range ops {
				ops[i] = iouring.Op{Buf: directio.AlignedBlock(advBS), Off: int64(i%blocks) * advBS}
			}
			if err := file.Do(ops); err != nil {
				t.Fatal(err)
			}
			for i := range ops {
				if ops[i].N != advBS || ops[i].Err != nil {
					t.Fatalf("op %d: %d %v", i, ops[i].N, ops[i].Err)
				}
			}
		})
	}
}

func TestAdvCloseWithIOInFlight(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			for round := 0; round < 5; round++ {
				f, _ := advFile(t, 64*advBS)
				file := advNewFile(t, int(f.Fd()), mode, 4)
				const G = 24
				var wg sync.WaitGroup
				var bad atomic.Value
				var started sync.WaitGroup
				started.Add(G)
				for g := 0; g < G; g++ {
					wg.Add(1)
					go func(g int) {
						defer wg.Done()
						buf := directio.AlignedBlock(advBS)
						first := true
						for i := 0; ; i++ {
							var err error
							switch i % 4 {
							case 0:
								_, err = file.WriteAt(buf, int64(g%64)*advBS)
							case 1:
								_, err = file.ReadAt(buf, int64(g%64)*advBS)
							case 2:
								err = file.Do([]iouring.Op{{Buf: buf, Off: int64(g%64) * advBS}})
							case 3:
								err = file.Sync()
							}
							if first {
								started.Done()
								first = false
							}
							if err != nil {
								if !errors.Is(err, iouring.ErrClosed) {
									bad.Store(err)
								}
								return
							}
						}
					}(g)
				}
				started.Wait()
				advWithTimeout(t, 10*time.Second, "Close with I/O in flight", func() {
					if err := file.Close(); err != nil {
						t.Errorf("Close = %v", err)
					}
				})
				advWithTimeout(t, 10*time.Second, "callers after Close", wg.Wait)
				if err := bad.Load(); err != nil {
					t.Fatalf("a call in flight at Close failed with %v, want nil or ErrClosed", err)
				}
			}
		})
	}
}

func TestAdvStart(t *testing.T) {
	f, _ := advFile(t, 64*advBS)
	ps := advNewFile(t, int(f.Fd()), iouring.ModePsync, 4)
	err := ps.Start(&iouring.Op{Buf: directio.AlignedBlock(advBS)}, func(*iouring.Op) { t.Error("psync Start called done") })
	if !errors.Is(err, iouring.ErrNoSlot) || !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("psync Start = %v", err)
	}
	ps.Close()
	if iouring.Probe() != nil {
		t.Skip("no io_uring")
	}
	file := advNewFile(t, int(f.Fd()), iouring.ModeIOURing, 2)
	if err := file.Start(&iouring.Op{Buf: directio.AlignedBlock(advBS), Off: -1}, func(*iouring.Op) { t.Error("called") }); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("Start negative offset = %v", err)
	}
	var calls atomic.Int64
	var wg sync.WaitGroup
	const N = 64
	ops := make([]iouring.Op, N)
	seen := make([]atomic.Int32, N)
	noSlot := 0
	for i := range ops {
		ops[i] = iouring.Op{Buf: directio.AlignedBlock(advBS), Off: int64(i) * advBS}
		wg.Add(1)
		i := i
		err := file.Start(&ops[i], func(o *iouring.Op) {
			seen[i].Add(1)
			calls.Add(1)
			wg.Done()
		})
		if err != nil {
			wg.Done()
			if !errors.Is(err, iouring.ErrNoSlot) {
				t.Fatalf("Start %d = %v", i, err)
			}
			noSlot++
			seen[i].Store(-100)
		}
	}
	advWithTimeout(t, 10*time.Second, "Start callbacks", wg.Wait)
	for i := range seen {
		if v := seen[i].Load(); v != 1 && v != -100 {
			t.Errorf("op %d: done called %d times", i, v)
		}
		if v := seen[i].Load(); v == 1 && (ops[i].N != advBS || ops[i].Err != nil) {
			t.Errorf("op %d: %d %v", i, ops[i].N, ops[i].Err)
		}
	}
	t.Logf("%d of %d Starts found no slot (queue depth 2)", noSlot, N)
	// Close waits for callbacks of requests in flight.
	var pending atomic.Int64
	for i := 0; i < 2; i++ {
		op := &iouring.Op{Buf: directio.AlignedBlock(advBS)}
		if err := file.Start(op, func(*iouring.Op) { time.Sleep(time.Millisecond); pending.Add(-1) }); err == nil {
			pending.Add(1)
		}
	}
	if err := file.Close(); err != nil {
		t.Fatal(err)
	}
	if p := pending.Load(); p != 0 {
		t.Errorf("Close returned with %d callbacks not yet run", p)
	}
}

func TestAdvArena(t *testing.T) {
	for _, size := range []int{0, -1, math.MinInt} {
		if a, err := iouring.NewArena(size); err == nil || !errors.Is(err, syscall.EINVAL) {
			if a != nil {
				a.Close()
			}
			t.Errorf("NewArena(%d) = %v", size, err)
		}
	}
	if a, err := iouring.NewArena(1<<40 + 1); err == nil {
		a.Close()
		t.Errorf("NewArena(1TiB+1) accepted")
	}
	a, err := iouring.NewArena(3 * advBS)
	if err != nil {
		t.Fatal(err)
	}
	b := a.Bytes()
	if len(b) < 3*advBS || a.Size() != len(b) {
		t.Fatalf("arena %d bytes, Size %d", len(b), a.Size())
	}
	if uintptr(unsafe.Pointer(&b[0]))%advBS != 0 {
		t.Fatal("arena not aligned")
	}
	if !a.Contains(b[advBS:2*advBS]) || a.Contains(nil) || a.Contains(make([]byte, 10)) {
		t.Error("Contains wrong")
	}
	if iouring.Probe() == nil {
		f, _ := advFile(t, 16*advBS)
		file := advNewFile(t, int(f.Fd()), iouring.ModeIOURing, 4)
		if err := file.RegisterArena(a); err != nil {
			t.Fatal(err)
		}
		t.Logf("reason: %s", file.Reason())
		if err := a.Close(); err == nil {
			t.Error("Arena.Close succeeded while registered")
		}
		for i := range b[:advBS] {
			b[i] = byte(i * 7)
		}
		if _, err := file.WriteAt(b[:advBS], 3*advBS); err != nil {
			t.Fatal(err)
		}
		if _, err := file.ReadAt(b[advBS:2*advBS], 3*advBS); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b[:advBS], b[advBS:2*advBS]) {
			t.Fatal("fixed-buffer round trip mismatch")
		}
		// a buffer partly outside the arena (not Contains) still works
		plain := directio.AlignedBlock(advBS)
		if _, err := file.ReadAt(plain, 3*advBS); err != nil || !bytes.Equal(plain, b[:advBS]) {
			t.Fatalf("plain read with arena registered: %v", err)
		}
		if err := file.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Close(); err != nil {
		t.Fatalf("Arena.Close after File.Close = %v", err)
	}
	if a.Bytes() != nil {
		t.Error("Bytes after Close not nil")
	}
	if err := a.Close(); !errors.Is(err, iouring.ErrClosed) {
		t.Errorf("second Arena.Close = %v", err)
	}
	if a.Contains(b) {
		t.Error("Contains true after Close")
	}
}

func TestAdvRing(t *testing.T) {
	if err := iouring.Probe(); err != nil {
		t.Skip(err)
	}
	for _, e := range []uint32{3, 100, 65536, math.MaxUint32} {
		if r, err := iouring.NewRing(iouring.RingOptions{Entries: e, NoSingleIssuer: true}); err == nil {
			r.Close()
			t.Errorf("NewRing(Entries %d) accepted", e)
		}
	}
	r, err := iouring.NewRing(iouring.RingOptions{Entries: 4, NoSingleIssuer: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.SQEntries() != 4 || r.CQEntries() < 4 {
		t.Fatalf("SQ %d CQ %d", r.SQEntries(), r.CQEntries())
	}
	// Submit waiting for more than in flight is refused, not a hang.
	if _, err := r.Submit(1); err == nil {
		t.Error("Submit(1) with nothing in flight accepted")
	}
	n := 0
	for {
		err := r.PrepNop(uint64(n + 1))
		if err != nil {
			if !errors.Is(err, iouring.ErrSQFull) {
				t.Fatalf("PrepNop %d = %v", n, err)
			}
			break
		}
		n++
		if n > 100 {
			t.Fatal("SQ never full")
		}
	}
	if n != 4 || r.Pending() != 4 || r.SQSpace() != 0 {
		t.Fatalf("prepared %d, pending %d, space %d", n, r.Pending(), r.SQSpace())
	}
	if got, err := r.Submit(uint32(n)); err != nil || got != n {
		t.Fatalf("Submit = %d, %v", got, err)
	}
	seen := map[uint64]int32{}
	r.Reap(func(ud uint64, res int32) { seen[ud] = res })
	if len(seen) != 4 {
		t.Fatalf("reaped %v", seen)
	}
	// Fill until ErrCQFull: CQ has 2x entries; keep requests in flight.
	f, _ := advFile(t, 2*advBS)
	fd := int(f.Fd())
	buf := directio.AlignedBlock(advBS)
	if err := r.PrepRead(fd, buf, 2*advBS, 10); err != nil { // at EOF
		t.Fatal(err)
	}
	if err := r.PrepRead(-1, buf, 0, 11); err != nil { // bad fd
		t.Fatal(err)
	}
	if err := r.PrepRead(fd, buf, -advBS, 12); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("PrepRead negative offset = %v", err)
	}
	if _, err := r.Submit(2); err != nil {
		t.Fatal(err)
	}
	seen = map[uint64]int32{}
	r.Reap(func(ud uint64, res int32) { seen[ud] = res })
	if seen[10] != 0 || seen[11] != -int32(syscall.EBADF) || len(seen) != 2 {
		t.Errorf("kernel results %v", seen)
	}
	if err := r.PrepReadFixed(fd, buf, 0, 0, 1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("PrepReadFixed without registration = %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); !errors.Is(err, iouring.ErrClosed) {
		t.Errorf("second Close = %v", err)
	}
	if err := r.PrepNop(1); !errors.Is(err, iouring.ErrClosed) {
		t.Errorf("PrepNop after Close = %v", err)
	}
	if _, err := r.Submit(0); !errors.Is(err, iouring.ErrClosed) {
		t.Errorf("Submit after Close = %v", err)
	}
	if got := r.Reap(func(uint64, int32) {}); got != 0 {
		t.Errorf("Reap after Close = %d", got)
	}
}

func TestAdvRingCQFull(t *testing.T) {
	if err := iouring.Probe(); err != nil {
		t.Skip(err)
	}
	r, err := iouring.NewRing(iouring.RingOptions{Entries: 2, NoSingleIssuer: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cq := r.CQEntries()
	// Prepare and submit without reaping until refused; nothing must be lost.
	prepared := 0
	for i := 0; i < 10*cq; i++ {
		err := r.PrepNop(uint64(i))
		if errors.Is(err, iouring.ErrSQFull) {
			if r.Pending() == 0 {
				if !errors.Is(err, iouring.ErrCQFull) && r.InFlight() >= cq {
					t.Errorf("refusal with CQ full is %v", err)
				}
				break
			}
			if _, err := r.Submit(0); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		prepared++
	}
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	if prepared > cq {
		t.Fatalf("%d requests accepted with a CQ of %d: overflow possible", prepared, cq)
	}
	if _, err := r.Submit(uint32(r.InFlight())); err != nil {
		t.Fatal(err)
	}
	got := r.Reap(func(uint64, int32) {})
	if got != prepared {
		t.Fatalf("reaped %d of %d", got, prepared)
	}
}

// ---- engine.Device (issue 2's device layer) ----

func advDevices(t *testing.T) map[string]engine.Device {
	devs := map[string]engine.Device{"mem": engine.NewMemDevice(16*advBS, advBS)}
	for _, mode := range advModes(t) {
		path := filepath.Join(t.TempDir(), "dev-"+string(mode))
		d, err := engine.OpenDevice(path, engine.DeviceOptions{IO: mode, CreateSize: 16 * advBS})
		if err != nil {
			t.Fatal(err)
		}
		devs[string(mode)] = d
	}
	return devs
}

func TestAdvDeviceBadIO(t *testing.T) {
	for name, d := range advDevices(t) {
		t.Run(name, func(t *testing.T) {
			defer d.Close()
			if d.Size() != 16*advBS || d.BlockSize() != advBS {
				t.Fatalf("Size %d BlockSize %d", d.Size(), d.BlockSize())
			}
			buf := directio.AlignedBlock(4 * advBS)
			for i := range buf {
				buf[i] = 0x5A
			}
			if _, err := d.WriteAt(buf[:advBS], 0); err != nil {
				t.Fatal(err)
			}
			type c struct {
				name string
				p    []byte
				off  int64
				want error
			}
			cases := []c{
				{"misaligned off", buf[:advBS], 1, engine.ErrMisaligned},
				{"misaligned len", buf[:100], 0, engine.ErrMisaligned},
				{"negative off", buf[:advBS], -advBS, engine.ErrOutOfRange},
				{"past end", buf[:advBS], 16 * advBS, engine.ErrOutOfRange},
				{"straddles end", buf[:2*advBS], 15 * advBS, engine.ErrOutOfRange},
				{"huge off", buf[:advBS], math.MaxInt64 - math.MaxInt64%advBS, engine.ErrOutOfRange},
				{"min off", buf[:advBS], math.MinInt64, engine.ErrOutOfRange},
			}
			if name != "mem" {
				cases = append(cases, c{"misaligned buffer", buf[1 : advBS+1], 0, engine.ErrMisaligned})
			}
			for _, cc := range cases {
				for _, write := range []bool{false, true} {
					var n int
					var err error
					if write {
						n, err = d.WriteAt(cc.p, cc.off)
					} else {
						n, err = d.ReadAt(cc.p, cc.off)
					}
					if n != 0 || !errors.Is(err, cc.want) {
						t.Errorf("%s (write=%v) = %d, %v; want %v", cc.name, write, n, err, cc.want)
					}
					if cc.want == engine.ErrMisaligned && !errors.Is(err, syscall.EINVAL) {
						t.Errorf("%s: %v does not wrap EINVAL", cc.name, err)
					}
				}
			}
			rb := directio.AlignedBlock(advBS)
			if _, err := d.ReadAt(rb, 0); err != nil || !bytes.Equal(rb, buf[:advBS]) {
				t.Fatalf("block 0 changed by refused I/O: %v", err)
			}
			// Zero-length at the end is fine.
			if n, err := d.ReadAt(rb[:0], d.Size()); n != 0 || err != nil {
				t.Errorf("zero-length read at end = %d, %v", n, err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := d.ReadAt(rb, 0); !errors.Is(err, engine.ErrClosed) {
				t.Errorf("ReadAt after Close = %v", err)
			}
			if _, err := d.WriteAt(rb, 0); !errors.Is(err, engine.ErrClosed) {
				t.Errorf("WriteAt after Close = %v", err)
			}
			if err := d.Flush(); !errors.Is(err, engine.ErrClosed) {
				t.Errorf("Flush after Close = %v", err)
			}
			if err := d.Close(); !errors.Is(err, engine.ErrClosed) {
				t.Errorf("Close twice = %v", err)
			}
		})
	}
}

func TestAdvDeviceInUseAndOptions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	d, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 8 * advBS})
	if err != nil {
		t.Fatal(err)
	}
	if d2, err := engine.OpenDevice(path, engine.DeviceOptions{}); err == nil {
		d2.Close()
		t.Error("second OpenDevice succeeded")
	} else if !errors.Is(err, engine.ErrInUse) || !strings.Contains(err.Error(), path) {
		t.Errorf("second OpenDevice = %v", err)
	}
	d.Close()
	for _, o := range []engine.DeviceOptions{{QueueDepth: -1}, {CreateSize: 100}, {CreateSize: -advBS}, {IO: "bogus"}, {QueueDepth: iouring.MaxQueueDepth + 1}} {
		if d, err := engine.OpenDevice(path, o); err == nil {
			d.Close()
			t.Errorf("OpenDevice(%+v) accepted", o)
		}
	}
	if _, err := engine.OpenDevice(filepath.Join(t.TempDir(), "missing"), engine.DeviceOptions{}); err == nil {
		t.Error("missing path without CreateSize accepted")
	}
	t.Setenv(iouring.EnvMode, "psync")
	d, err = engine.OpenDevice(path, engine.DeviceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if fd, ok := d.(*engine.FileDevice); !ok || fd.IOMode() != iouring.ModePsync {
		t.Errorf("RAWBLOCK_IO=psync not honoured by OpenDevice")
	}
	d.Close()
}

func TestAdvMemDevicePanics(t *testing.T) {
	for _, c := range [][2]int64{{0, 512}, {-512, 512}, {1000, 512}, {4096, 0}, {4096, 1000}, {4096, 256}, {1 << 20, 1 << 17}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewMemDevice(%d, %d) did not panic", c[0], c[1])
				}
			}()
			engine.NewMemDevice(c[0], int(c[1]))
		}()
	}
}

var _ = unix.O_DIRECT

func TestAdvVectoredManyBuffers(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			const nb = iouring.MaxIovecs + 37
			f, _ := advFile(t, nb*advBS)
			file := advNewFile(t, int(f.Fd()), mode, 4)
			defer file.Close()
			arena := directio.AlignedBlock(nb * advBS)
			bufs := make([][]byte, 0, 2*nb)
			for i := 0; i < nb; i++ {
				b := arena[i*advBS : (i+1)*advBS]
				for j := range b {
					b[j] = byte(i ^ j)
				}
				bufs = append(bufs, b, nil) // empty buffers interleaved
			}
			if n, err := file.WritevAt(bufs, 0); n != nb*advBS || err != nil {
				t.Fatalf("WritevAt = %d, %v", n, err)
			}
			rd := directio.AlignedBlock(nb * advBS)
			rbufs := make([][]byte, nb)
			for i := range rbufs {
				rbufs[nb-1-i] = rd[i*advBS : (i+1)*advBS] // reversed memory order
			}
			ops := []iouring.Op{{Bufs: rbufs, Off: 0}}
			if err := file.Do(ops); err != nil || ops[0].N != nb*advBS {
				t.Fatalf("Do vectored = %v, N %d", err, ops[0].N)
			}
			for i := 0; i < nb; i++ {
				if !bytes.Equal(rbufs[i], arena[i*advBS:(i+1)*advBS]) {
					t.Fatalf("buffer %d differs", i)
				}
			}
			// A misaligned buffer in the middle: EINVAL, with the count of what went before at most.
			bad := [][]byte{rd[:advBS], rd[advBS+1 : 2*advBS+1]}
			if n, err := file.ReadvAt(bad, 0); !errors.Is(err, syscall.EINVAL) || n > advBS {
				t.Errorf("misaligned readv = %d, %v", n, err)
			}
			if mode == iouring.ModeIOURing {
				op := &iouring.Op{Bufs: rbufs, Off: 0}
				done := make(chan struct{})
				if err := file.Start(op, func(*iouring.Op) { close(done) }); err != nil {
					t.Fatal(err)
				}
				advWithTimeout(t, 10*time.Second, "vectored Start", func() { <-done })
				if op.N != nb*advBS || op.Err != nil {
					t.Errorf("vectored Start: %d %v", op.N, op.Err)
				}
			}
		})
	}
}

func TestAdvStartChainAndPoll(t *testing.T) {
	if iouring.Probe() != nil {
		t.Skip("no io_uring")
	}
	f, _ := advFile(t, 64*advBS)
	file := advNewFile(t, int(f.Fd()), iouring.ModeIOURing, 8)
	defer file.Close()
	const total = 500
	var issued, completed atomic.Int64
	finished := make(chan struct{})
	var mu sync.Mutex
	var firstErr error
	var next func(o *iouring.Op)
	next = func(o *iouring.Op) {
		if o.Err != nil {
			mu.Lock()
			if firstErr == nil {
				firstErr = o.Err
			}
			mu.Unlock()
		}
		if completed.Add(1) == total {
			close(finished)
			return
		}
		if issued.Add(1) <= total {
			o.Off = (o.Off + advBS) % (64 * advBS)
			if err := file.Start(o, next); err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
			}
		}
	}
	for i := 0; i < 4; i++ {
		issued.Add(1)
		op := &iouring.Op{Buf: directio.AlignedBlock(advBS), Off: int64(i) * advBS}
		if err := file.Start(op, next); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	var pw sync.WaitGroup
	for g := 0; g < 4; g++ {
		pw.Add(1)
		go func() {
			defer pw.Done()
			for {
				select {
				case <-stop:
					return
				default:
					file.Poll()
				}
			}
		}()
	}
	advWithTimeout(t, 10*time.Second, "chained Starts", func() { <-finished })
	close(stop)
	pw.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
}

func TestAdvConcurrentClose(t *testing.T) {
	for _, mode := range advModes(t) {
		t.Run(string(mode), func(t *testing.T) {
			f, _ := advFile(t, 8*advBS)
			file := advNewFile(t, int(f.Fd()), mode, 2)
			var wg sync.WaitGroup
			var nils atomic.Int32
			for i := 0; i < 8; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					err := file.Close()
					if err == nil {
						nils.Add(1)
					} else if !errors.Is(err, iouring.ErrClosed) {
						t.Errorf("Close = %v", err)
					}
				}()
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := directio.AlignedBlock(advBS)
					for j := 0; j < 20; j++ {
						if _, err := file.ReadAt(buf, 0); err != nil && !errors.Is(err, iouring.ErrClosed) {
							t.Errorf("ReadAt = %v", err)
						}
						file.Poll()
					}
				}()
			}
			advWithTimeout(t, 10*time.Second, "concurrent Close", wg.Wait)
			if nils.Load() != 1 {
				t.Errorf("%d Close calls returned nil, want 1", nils.Load())
			}
		})
	}
}

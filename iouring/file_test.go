//go:build linux

package iouring

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"
)

// modes lists the backends to run a test against.
func modes(t *testing.T) []Mode {
	if Probe() != nil {
		return []Mode{ModePsync}
	}
	return []Mode{ModeIOURing, ModePsync}
}

func newTestFile(t *testing.T, fd int, opts FileOptions) *File {
	t.Helper()
	f, err := NewFile(fd, opts)
	if err != nil {
		t.Fatalf("NewFile: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// fill writes a recognisable pattern for (block, version) into b.
func fill(b []byte, block, version uint64) {
	for i := 0; i < len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], block)
		binary.LittleEndian.PutUint64(b[i+8:], version*0x9e3779b97f4a7c15+uint64(i))
	}
}

// TestFileConcurrentRandomIO: 32 goroutines make 10,000 random 4 KiB writes,
// then read every block back and check it byte for byte.
func TestFileConcurrentRandomIO(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			total := 10000
			if testing.Short() {
				total = 2000
			}
			concurrentRandomIO(t, mode, total)
		})
	}
}

// TestFileReactorVariants runs the same check with each of the reactor's
// optional behaviours switched on.
func TestFileReactorVariants(t *testing.T) {
	needIOURing(t)
	type knobs struct {
		spin, idle, batch time.Duration
		kick, wspin, div  int
		enterWait         bool
	}
	saved := knobs{reactorSpin, reactorIdle, batchWait, kickBelow, waiterSpin, waitDiv, !netpollSleep}
	set := func(k knobs) {
		reactorSpin, reactorIdle, batchWait, kickBelow, waiterSpin, waitDiv = k.spin, k.idle, k.batch, k.kick, k.wspin, k.div
		netpollSleep = !k.enterWait
	}
	defer set(saved)
	for _, v := range []struct {
		name string
		k    knobs
	}{
		{"reactor-spin", knobs{20 * time.Microsecond, 3 * time.Microsecond, saved.batch, saved.kick, 0, 0, false}},
		{"waiter-spin", knobs{0, saved.idle, saved.batch, saved.kick, 8, 0, false}},
		{"kick-below-4", knobs{0, saved.idle, saved.batch, 4, 0, 0, false}},
		{"enter-wait", knobs{0, saved.idle, saved.batch, saved.kick, 0, 0, true}},
		{"enter-wait-spin", knobs{20 * time.Microsecond, 3 * time.Microsecond, saved.batch, saved.kick, 0, 0, true}},
		{"batch-wait", knobs{0, saved.idle, 20 * time.Microsecond, saved.kick, 0, 2, true}},
		{"batch-wait-no-kick", knobs{0, saved.idle, 50 * time.Microsecond, 4, 0, 2, true}},
	} {
		t.Run(v.name, func(t *testing.T) {
			set(v.k)
			// A cleanup registered first runs last: after the File's
			// Close has stopped the reactor that reads the knobs.
			t.Cleanup(func() { set(saved) })
			concurrentRandomIO(t, ModeIOURing, 2000)
		})
	}
}

// TestFileRetryBeforeControl: a request run again after a cancellation is
// still in flight for a control request, which waits for nothing to be in
// flight: RegisterArena must not return (and the arena may not be
// unmapped) while the retried read can still write into memory.
func TestFileRetryBeforeControl(t *testing.T) {
	needIOURing(t)
	if !netpollSleep {
		t.Skip("the reactor waits in io_uring_enter on a locked thread: nothing to retry")
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	f := newTestFile(t, int(pr.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 4, Rings: 1})
	if !strings.Contains(f.Reason(), "netpoller") {
		t.Skipf("the reactor fell back to waiting in the kernel: %s", f.Reason())
	}
	var cancelled atomic.Bool
	cqeHook = func(_ uint64, res int32) int32 {
		if cancelled.CompareAndSwap(false, true) {
			return -int32(syscall.ECANCELED)
		}
		return res
	}
	t.Cleanup(func() { cqeHook = nil })

	readDone := make(chan error, 1)
	go func() {
		buf := make([]byte, 8)
		_, err := f.ReadAt(buf, 0) // a pipe ignores the offset
		readDone <- err
	}()
	time.Sleep(50 * time.Millisecond) // the read waits on the empty pipe
	a, err := NewArena(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	regDone := make(chan error, 1)
	go func() { regDone <- f.RegisterArena(a) }()
	time.Sleep(50 * time.Millisecond) // the control request waits for the read
	if _, err := pw.Write(make([]byte, 8)); err != nil {
		t.Fatal(err)
	}
	// The read completed, was "cancelled", and runs again, waiting for
	// more data: the control request must still wait.
	select {
	case err := <-regDone:
		t.Fatalf("RegisterArena returned (%v) while a retried read was in flight", err)
	case err := <-readDone:
		t.Fatalf("the read returned (%v) although its retry has no data", err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := pw.Write(make([]byte, 8)); err != nil {
		t.Fatal(err)
	}
	if err := <-readDone; err != nil {
		t.Fatalf("retried read: %v", err)
	}
	if err := <-regDone; err != nil {
		t.Fatalf("RegisterArena: %v", err)
	}
	if err := f.RegisterArena(nil); err != nil {
		t.Fatal(err)
	}
}

// TestFileEventfdRefused: a kernel that refuses to register the eventfd
// gets the reactor that waits in io_uring_enter, and everything works.
func TestFileEventfdRefused(t *testing.T) {
	needIOURing(t)
	saved := registerEventfd
	registerEventfd = func(*Ring, int) error {
		return fmt.Errorf("iouring: io_uring_register(EVENTFD): %w", syscall.EINVAL)
	}
	// A cleanup registered first runs last: after the File's Close.
	t.Cleanup(func() { registerEventfd = saved })
	osf := tempDirect(t, 1<<20)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 8})
	if !strings.Contains(f.Reason(), "waits in io_uring_enter") {
		t.Fatalf("eventfd refused, reactor: %s; want the io_uring_enter wait", f.Reason())
	}
	buf, got := directio.AlignedBlock(4096), directio.AlignedBlock(4096)
	for i := range 64 {
		fill(buf, uint64(i), 1)
		if _, err := f.WriteAt(buf, int64(i%256)*4096); err != nil {
			t.Fatal(err)
		}
		if _, err := f.ReadAt(got, int64(i%256)*4096); err != nil || !bytes.Equal(got, buf) {
			t.Fatalf("read back block %d: %v, equal %v", i, err, bytes.Equal(got, buf))
		}
	}
}

// TestFileRetriesCancelled: a request the kernel cancels because the thread
// that submitted it exited is run again, invisibly to its caller; one that
// is cancelled every time fails with ECANCELED after maxRetries.
func TestFileRetriesCancelled(t *testing.T) {
	needIOURing(t)
	if !netpollSleep {
		t.Skip("the reactor waits in io_uring_enter on a locked thread: nothing to retry")
	}
	// Cancel every third request once (a retry keeps its user_data).
	var (
		mu        sync.Mutex
		n         int
		cancelled = map[uint64]bool{}
	)
	cqeHook = func(ud uint64, res int32) int32 {
		mu.Lock()
		defer mu.Unlock()
		if cancelled[ud] {
			delete(cancelled, ud)
			return res
		}
		if n++; n%3 == 0 {
			cancelled[ud] = true
			return -int32(syscall.ECANCELED)
		}
		return res
	}
	t.Cleanup(func() { cqeHook = nil })
	concurrentRandomIO(t, ModeIOURing, 1000)

	osf := tempDirect(t, 1<<20)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 4})
	if !strings.Contains(f.Reason(), "netpoller") {
		t.Skipf("the reactor fell back to waiting in the kernel: %s", f.Reason())
	}
	buf := directio.AlignedBlock(4096)
	before := f.Stats().Retries
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatalf("read with a third of completions cancelled: %v", err)
	}
	cqeHook = func(uint64, int32) int32 { return -int32(syscall.ECANCELED) }
	if _, err := f.ReadAt(buf, 0); !errors.Is(err, syscall.ECANCELED) {
		t.Fatalf("read cancelled every time: %v, want ECANCELED", err)
	}
	if got := f.Stats().Retries - before; got < maxRetries {
		t.Errorf("%d retries counted, want at least %d", got, maxRetries)
	}
}

// concurrentRandomIO: 32 goroutines make total random 4 KiB writes, then
// read every block back and check it byte for byte.
func concurrentRandomIO(t *testing.T, mode Mode, total int) *File {
	return concurrentRandomIOPolled(t, mode, total, 0)
}

// concurrentRandomIOPolled is concurrentRandomIO with pollers goroutines
// calling Poll in a loop meanwhile; it returns the File, still open.
func concurrentRandomIOPolled(t *testing.T, mode Mode, total, pollers int) *File {
	const (
		bs      = 4096
		blocks  = 1024
		workers = 32
	)
	osf := tempDirect(t, blocks*bs)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode, QueueDepth: 32})
	stopPoll := make(chan struct{})
	var pollWG sync.WaitGroup
	for range pollers {
		pollWG.Add(1)
		go func() {
			defer pollWG.Done()
			for i := 0; ; i++ {
				select {
				case <-stopPoll:
					return
				default:
				}
				f.Poll()
				if i%64 == 0 {
					runtime.Gosched()
				}
			}
		}()
	}
	defer pollWG.Wait()
	defer close(stopPoll)
	// Worker w owns blocks b with b%workers == w, so the expected
	// content of each block is known without locking.
	version := make([]uint64, blocks)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := directio.AlignedBlock(bs)
			for i := range total / workers {
				blk := uint64(rng.IntN(blocks/workers)*workers + w)
				v := uint64(i + 1)
				fill(buf, blk, v)
				if n, err := f.WriteAt(buf, int64(blk)*bs); err != nil || n != bs {
					errs <- fmt.Errorf("write block %d: %d, %v", blk, n, err)
					return
				}
				version[blk] = v
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	var bad atomic.Int64
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := directio.AlignedBlock(bs)
			want := make([]byte, bs)
			for blk := w; blk < blocks; blk += workers {
				if n, err := f.ReadAt(got, int64(blk)*bs); err != nil || n != bs {
					t.Errorf("read block %d: %d, %v", blk, n, err)
					bad.Add(1)
					return
				}
				if version[blk] == 0 {
					clear(want)
				} else {
					fill(want, uint64(blk), version[blk])
				}
				if !bytes.Equal(got, want) {
					t.Errorf("block %d: content differs from version %d", blk, version[blk])
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() == 0 {
		st := f.Stats()
		t.Logf("%s; stats %+v", f.Reason(), st)
		if want := uint64(total/workers*workers + blocks); st.Requests < want {
			t.Errorf("stats count %d requests, made at least %d", st.Requests, want)
		}
	}
	return f
}

// TestFilePoll: callers that poll drive the ring correctly alongside the
// reactor, and on their own when the reactor cannot run.
func TestFilePoll(t *testing.T) {
	t.Run("concurrent", func(t *testing.T) {
		for _, mode := range modes(t) {
			t.Run(string(mode), func(t *testing.T) {
				f := concurrentRandomIOPolled(t, mode, 4000, 2)
				if st := f.Stats(); mode == ModeIOURing && st.Polls == 0 {
					t.Errorf("pollers never did the reactor's work: %+v", st)
				} else if mode == ModePsync && st.Polls != 0 {
					t.Errorf("psync counts %d polls", st.Polls)
				}
			})
		}
	})
	t.Run("reactor-stuck", func(t *testing.T) {
		needIOURing(t)
		// The reactor stops in its first sleep until released: only
		// Poll can submit the write and deliver its completion.
		release := make(chan struct{})
		var once sync.Once
		stuck := make(chan struct{})
		sleepHook = func() {
			once.Do(func() {
				close(stuck)
				<-release
			})
		}
		// Registered first, so it runs after the File's Close has
		// stopped the reactor that reads the hook.
		t.Cleanup(func() { sleepHook = nil })
		osf := tempDirect(t, 1<<16)
		f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 4})
		defer close(release) // before the File's Close, which needs the reactor
		<-stuck
		buf := directio.AlignedBlock(4096)
		fill(buf, 3, 1)
		done := make(chan error, 1)
		go func() {
			_, err := f.WriteAt(buf, 3*4096)
			done <- err
		}()
		deadline := time.Now().Add(10 * time.Second)
		for {
			f.Poll()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("WriteAt: %v", err)
				}
				got := directio.AlignedBlock(4096) // osf is O_DIRECT
				if _, err := osf.ReadAt(got, 3*4096); err != nil || !bytes.Equal(got, buf) {
					t.Fatalf("block 3 after the polled write: %v, equal %v", err, bytes.Equal(got, buf))
				}
				if st := f.Stats(); st.Polls == 0 {
					t.Errorf("stats count no poll: %+v", st)
				}
				return
			default:
			}
			if time.Now().After(deadline) {
				t.Fatal("the write did not complete in 10 s with the reactor stuck and Poll called")
			}
			runtime.Gosched()
		}
	})
	t.Run("after-close", func(t *testing.T) {
		for _, mode := range modes(t) {
			osf := tempDirect(t, 1<<16)
			f, err := NewFile(int(osf.Fd()), FileOptions{Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			f.Poll()
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			f.Poll() // must neither block nor touch the unmapped ring
		}
	})
}

// TestFileTinyQueue runs far more concurrent requests than the ring's CQ has
// entries: callers must wait for slots, and nothing may be lost.
func TestFileTinyQueue(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			const bs, workers, per = 4096, 64, 40
			osf := tempDirect(t, workers*bs)
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode, QueueDepth: 1})
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := directio.AlignedBlock(bs)
					got := directio.AlignedBlock(bs)
					for i := range per {
						fill(buf, uint64(w), uint64(i))
						if _, err := f.WriteAt(buf, int64(w)*bs); err != nil {
							t.Errorf("write: %v", err)
							return
						}
						if _, err := f.ReadAt(got, int64(w)*bs); err != nil {
							t.Errorf("read: %v", err)
							return
						}
						if !bytes.Equal(got, buf) {
							t.Errorf("worker %d iteration %d: read back other bytes", w, i)
							return
						}
					}
				}()
			}
			// A batch larger than the whole slot table, at the same time.
			ops := make([]Op, 100)
			for i := range ops {
				ops[i] = Op{Buf: directio.AlignedBlock(bs), Off: int64(i%workers) * bs}
			}
			if err := f.Do(ops); err != nil {
				t.Errorf("Do: %v", err)
			}
			wg.Wait()
			for i, op := range ops {
				if op.N != bs || op.Err != nil {
					t.Fatalf("op %d: N %d Err %v", i, op.N, op.Err)
				}
			}
		})
	}
}

// TestFileKernelErrors: errors the kernel reports reach the caller.
func TestFileKernelErrors(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, 1<<20)
			if _, err := osf.WriteAt(directio.AlignedBlock(1<<16), 0); err != nil {
				t.Fatal(err)
			}
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode})
			buf := directio.AlignedBlock(8192)
			// O_DIRECT: misaligned offset, length, or buffer address.
			for _, c := range []struct {
				name string
				p    []byte
				off  int64
			}{
				{"offset", buf[:4096], 100},
				{"length", buf[:1000], 0},
				{"address", buf[1 : 4096+1], 0},
			} {
				if _, err := f.ReadAt(c.p, c.off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("misaligned %s read: %v, want EINVAL", c.name, err)
				}
				if _, err := f.WriteAt(c.p, c.off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("misaligned %s write: %v, want EINVAL", c.name, err)
				}
			}
			if _, err := f.ReadAt(buf, -4096); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("negative offset: %v, want EINVAL", err)
			}
			// A descriptor closed under the File: EBADF.
			dup, err := unix.Dup(int(osf.Fd()))
			if err != nil {
				t.Fatal(err)
			}
			g := newTestFile(t, dup, FileOptions{Mode: mode})
			unix.Close(dup)
			if _, err := g.ReadAt(buf, 0); !errors.Is(err, syscall.EBADF) {
				t.Errorf("read on closed fd: %v, want EBADF", err)
			}
			if err := g.Sync(); !errors.Is(err, syscall.EBADF) {
				t.Errorf("sync on closed fd: %v, want EBADF", err)
			}
			// Batches report per-op errors and the first one.
			ops := []Op{
				{Buf: buf[:4096], Off: 0},
				{Buf: buf[:4096], Off: 100},
				{Buf: buf[4096:], Off: 4096, Write: true},
			}
			err = f.Do(ops)
			if !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), "op 1 of 3") {
				t.Errorf("Do: %v, want op 1's EINVAL", err)
			}
			if ops[0].Err != nil || ops[0].N != 4096 || ops[2].Err != nil || ops[2].N != 4096 || !errors.Is(ops[1].Err, syscall.EINVAL) {
				t.Errorf("Do results: %+v", ops)
			}
			if err := f.Do([]Op{{Buf: buf, Off: -1}}); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("Do with negative offset: %v", err)
			}
		})
	}
}

// TestFileShortTransfer: a read that runs into the end of a regular file is
// an error, not a silent short count.
func TestFileShortTransfer(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := shortFile(t)
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode})
			buf := make([]byte, 4096)
			n, err := f.ReadAt(buf, 0)
			if n != 1000 || err != io.EOF {
				t.Fatalf("ReadAt past the end = %d, %v; want 1000, io.EOF", n, err)
			}
			// io.ReaderAt's helpers see the end as an end.
			if all, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<20)); err != nil || len(all) != 1000 {
				t.Fatalf("io.ReadAll of a SectionReader = %d bytes, %v; want 1000, nil", len(all), err)
			}
			if n, err := f.ReadAt(buf, 4096); n != 0 || err != io.EOF {
				t.Fatalf("ReadAt after the end = %d, %v; want 0, io.EOF", n, err)
			}
			ops := []Op{{Buf: buf, Off: 0}}
			if err := f.Do(ops); !errors.Is(err, io.EOF) || ops[0].N != 1000 {
				t.Fatalf("Do past the end: N %d, %v", ops[0].N, err)
			}
			if n, err := f.ReadAt(buf[:0], 0); n != 0 || err != nil {
				t.Fatalf("empty read: %d, %v", n, err)
			}
		})
	}
}

// TestFileCloseInFlight closes a File while 32 goroutines hammer it.
func TestFileCloseInFlight(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			const bs = 4096
			osf := tempDirect(t, 256*bs)
			f, err := NewFile(int(osf.Fd()), FileOptions{Mode: mode, QueueDepth: 8})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			var ok, closed atomic.Int64
			for w := range 32 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := directio.AlignedBlock(bs)
					buf2 := directio.AlignedBlock(bs)
					for i := 0; ; i++ {
						off := int64((w*7+i)%256) * bs
						var err error
						switch i % 4 {
						case 0:
							_, err = f.WriteAt(buf, off)
						case 1:
							err = f.Do([]Op{{Buf: buf, Off: off}, {Buf: buf2, Off: off}})
						default:
							_, err = f.ReadAt(buf, off)
						}
						if errors.Is(err, ErrClosed) {
							closed.Add(1)
							return
						}
						if err != nil {
							t.Errorf("I/O before Close failed: %v", err)
							return
						}
						ok.Add(1)
					}
				}()
			}
			time.Sleep(30 * time.Millisecond)
			done := make(chan error)
			go func() { done <- f.Close() }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Close: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Close hangs with I/O in flight")
			}
			wg.Wait()
			if closed.Load() != 32 {
				t.Fatalf("%d of 32 goroutines saw ErrClosed", closed.Load())
			}
			t.Logf("%d requests completed before Close", ok.Load())
		})
	}
}

func TestFileUseAfterClose(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, 1<<16)
			f, err := NewFile(int(osf.Fd()), FileOptions{Mode: mode})
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			buf := directio.AlignedBlock(4096)
			if _, err := f.ReadAt(buf, 0); !errors.Is(err, ErrClosed) {
				t.Errorf("ReadAt: %v", err)
			}
			if _, err := f.WriteAt(buf, 0); !errors.Is(err, ErrClosed) {
				t.Errorf("WriteAt: %v", err)
			}
			if err := f.Sync(); !errors.Is(err, ErrClosed) {
				t.Errorf("Sync: %v", err)
			}
			if err := f.Do([]Op{{Buf: buf}}); !errors.Is(err, ErrClosed) {
				t.Errorf("Do: %v", err)
			}
			if err := f.RegisterArena(nil); !errors.Is(err, ErrClosed) {
				t.Errorf("RegisterArena: %v", err)
			}
			if err := f.Close(); !errors.Is(err, ErrClosed) {
				t.Errorf("second Close: %v", err)
			}
			// The fd is the caller's: still open.
			if _, err := osf.WriteAt(buf, 0); err != nil {
				t.Errorf("fd unusable after File.Close: %v", err)
			}
		})
	}
}

func TestFileSync(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			osf := tempDirect(t, 1<<16)
			f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode})
			if _, err := f.WriteAt(directio.AlignedBlock(4096), 4096); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatalf("Sync: %v", err)
			}
		})
	}
}

func TestFileModeSelection(t *testing.T) {
	osf := tempDirect(t, 1<<16)
	fd := int(osf.Fd())
	open := func(opts FileOptions) (*File, error) {
		f, err := NewFile(fd, opts)
		if err == nil {
			t.Cleanup(func() { f.Close() })
		}
		return f, err
	}
	f, err := open(FileOptions{Mode: ModePsync})
	if err != nil || f.Mode() != ModePsync || !strings.Contains(f.Reason(), "forced by FileOptions.Mode") {
		t.Fatalf("ModePsync: %v, %v", f, err)
	}
	if _, err := open(FileOptions{Mode: "aio"}); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("bad mode: %v", err)
	}
	for _, qd := range []int{-1, MaxQueueDepth + 1} {
		if _, err := open(FileOptions{QueueDepth: qd}); !errors.Is(err, syscall.EINVAL) {
			t.Errorf("queue depth %d: %v", qd, err)
		}
	}
	if _, err := open(FileOptions{Rings: MaxRings + 1}); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("too many rings: %v", err)
	}
	if _, err := NewFile(-1, FileOptions{}); !errors.Is(err, syscall.EBADF) {
		t.Errorf("fd -1: %v", err)
	}

	t.Setenv(EnvMode, "psync")
	f, err = open(FileOptions{})
	if err != nil || f.Mode() != ModePsync || !strings.Contains(f.Reason(), "forced by "+EnvMode) {
		t.Fatalf("%s=psync: mode %v reason %q, %v", EnvMode, f.Mode(), f.Reason(), err)
	}
	t.Setenv(EnvMode, "bogus")
	if _, err := open(FileOptions{}); !errors.Is(err, syscall.EINVAL) || !strings.Contains(err.Error(), EnvMode) {
		t.Errorf("%s=bogus: %v", EnvMode, err)
	}
	if Probe() != nil {
		return
	}
	t.Setenv(EnvMode, "io_uring")
	f, err = open(FileOptions{})
	if err != nil || f.Mode() != ModeIOURing || !strings.Contains(f.Reason(), "forced by "+EnvMode) {
		t.Fatalf("%s=io_uring: %v, %v", EnvMode, f, err)
	}
	// The environment applies to ModeAuto only.
	t.Setenv(EnvMode, "psync")
	f, err = open(FileOptions{Mode: ModeIOURing})
	if err != nil || f.Mode() != ModeIOURing {
		t.Fatalf("ModeIOURing under %s=psync: %v, %v", EnvMode, f, err)
	}
	t.Setenv(EnvMode, "")
	f, err = open(FileOptions{Rings: 2})
	if err != nil || f.Mode() != ModeIOURing || !strings.HasPrefix(f.Reason(), "io_uring: 2 rings") {
		t.Fatalf("auto: %v, %v", f.Reason(), err)
	}
	buf := directio.AlignedBlock(4096)
	for i := range 8 { // both rings serve requests
		if _, err := f.WriteAt(buf, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestFileFallback simulates kernels that refuse io_uring.
func TestFileFallback(t *testing.T) {
	osf := tempDirect(t, 1<<16)
	fd := int(osf.Fd())
	refused := fmt.Errorf("io_uring_setup: %w", syscall.EPERM)

	// Refused at probe time (seccomp, io_uring_disabled).
	saved := probeHook
	probeHook = func() error { return refused }
	t.Cleanup(func() { probeHook = saved })
	f := newTestFile(t, fd, FileOptions{})
	if f.Mode() != ModePsync || f.Reason() != "psync: io_uring_setup: operation not permitted" {
		t.Errorf("auto with io_uring refused: %s, %q", f.Mode(), f.Reason())
	}
	if _, err := f.WriteAt(directio.AlignedBlock(4096), 0); err != nil {
		t.Errorf("psync fallback write: %v", err)
	}
	if _, err := NewFile(fd, FileOptions{Mode: ModeIOURing}); !errors.Is(err, syscall.EPERM) {
		t.Errorf("forced io_uring when refused: %v, want EPERM", err)
	}
	probeHook = saved
	if Probe() != nil {
		return
	}

	// Probe passes but the reactor's own setup is refused.
	savedRing := newRingHook
	newRingHook = func(RingOptions) (*Ring, error) {
		return nil, fmt.Errorf("iouring: io_uring_setup: %w", syscall.EACCES)
	}
	t.Cleanup(func() { newRingHook = savedRing })
	f = newTestFile(t, fd, FileOptions{})
	if f.Mode() != ModePsync || !strings.Contains(f.Reason(), "permission denied") {
		t.Errorf("auto with ring setup refused: %s, %q", f.Mode(), f.Reason())
	}
	if _, err := NewFile(fd, FileOptions{Mode: ModeIOURing}); !errors.Is(err, syscall.EACCES) {
		t.Errorf("forced io_uring when setup refused: %v, want EACCES", err)
	}
}

func TestFileArena(t *testing.T) {
	for _, mode := range modes(t) {
		t.Run(string(mode), func(t *testing.T) {
			const bs = 4096
			osf := tempDirect(t, 64*bs)
			a, err := NewArena(16 * bs)
			if err != nil {
				t.Fatal(err)
			}
			f, err := NewFile(int(osf.Fd()), FileOptions{Mode: mode, Arena: a})
			if err != nil {
				t.Fatal(err)
			}
			if mode == ModeIOURing {
				if !strings.Contains(f.Reason(), "fixed buffers: 65536-byte arena registered") {
					t.Errorf("Reason %q does not mention the arena", f.Reason())
				}
				if err := a.Close(); !errors.Is(err, syscall.EBUSY) {
					t.Errorf("closing a registered arena: %v, want EBUSY", err)
				}
			}
			mem := a.Bytes()
			heap := directio.AlignedBlock(bs)
			// Fixed and plain buffers, singly and in a batch.
			for i := range 16 {
				fill(mem[i*bs:(i+1)*bs], uint64(i), 1)
			}
			ops := make([]Op, 16)
			for i := range ops {
				ops[i] = Op{Write: true, Buf: mem[i*bs : (i+1)*bs], Off: int64(i) * bs}
			}
			if err := f.Do(ops); err != nil {
				t.Fatal(err)
			}
			for i := range 16 {
				if _, err := f.ReadAt(heap, int64(i)*bs); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(heap, mem[i*bs:(i+1)*bs]) {
					t.Fatalf("block %d differs", i)
				}
			}
			clear(mem)
			if _, err := f.ReadAt(mem[3*bs:5*bs], 3*bs); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, bs)
			fill(want, 4, 1)
			if !bytes.Equal(mem[4*bs:5*bs], want) {
				t.Fatal("READ_FIXED returned other bytes")
			}

			// A kernel that refuses to pin the arena: I/O goes on without
			// fixed buffers and Reason says why.
			saved := registerHook
			registerHook = func(*Ring, [][]byte) error {
				return fmt.Errorf("io_uring_register: %w", syscall.ENOMEM)
			}
			defer func() { registerHook = saved }()
			if err := f.RegisterArena(a); err != nil {
				t.Fatal(err)
			}
			if mode == ModeIOURing && !strings.Contains(f.Reason(), "fixed buffers off") {
				t.Errorf("Reason %q does not say fixed buffers are off", f.Reason())
			}
			if _, err := f.ReadAt(mem[:bs], 0); err != nil {
				t.Fatal(err)
			}
			registerHook = saved
			if err := f.RegisterArena(nil); err != nil {
				t.Fatal(err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if err := a.Close(); err != nil {
				t.Fatalf("closing the arena after the File: %v", err)
			}
			g := newTestFile(t, int(osf.Fd()), FileOptions{Mode: mode})
			if err := g.RegisterArena(a); !errors.Is(err, ErrClosed) && mode == ModeIOURing {
				t.Errorf("registering a closed arena: %v", err)
			}
		})
	}
}

// TestFileNoAllocs: the synchronous io_uring path allocates nothing per
// request in steady state.
func TestFileNoAllocs(t *testing.T) {
	needIOURing(t)
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	osf := tempDirect(t, 1<<16)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing})
	buf := directio.AlignedBlock(4096)
	if _, err := f.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := f.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per ReadAt, want 0", allocs)
	}
}

// TestFileControlDuringSpin: a control request (RegisterArena) that the
// reactor executes while spinning for intake must still wake its caller.
// A read just before it makes the reactor spin (it has just woken a waiter),
// and the long idle window makes the control request arrive during the
// spin every time.
func TestFileControlDuringSpin(t *testing.T) {
	needIOURing(t)
	savedSpin, savedIdle := reactorSpin, reactorIdle
	reactorSpin, reactorIdle = 20*time.Millisecond, 10*time.Millisecond
	defer func() { reactorSpin, reactorIdle = savedSpin, savedIdle }()
	const bs = 4096
	osf := tempDirect(t, 16*bs)
	a, err := NewArena(16 * bs)
	if err != nil {
		t.Fatal(err)
	}
	// Not closed on failure: Close would wait for the stuck call.
	f, err := NewFile(int(osf.Fd()), FileOptions{Mode: ModeIOURing})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		buf := directio.AlignedBlock(bs)
		for i := range 20 {
			if _, err := f.ReadAt(buf, 0); err != nil {
				done <- err
				return
			}
			arena := a
			if i%2 == 1 {
				arena = nil
			}
			if err := f.RegisterArena(arena); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("RegisterArena after a read never returns")
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestFileNoStall: callers that stop after a random number of requests,
// in waves, with batches among them. A request pushed while the reactor
// sleeps must wake it even when the woken waiters that were to bring the
// next requests do not come back.
func TestFileNoStall(t *testing.T) {
	needIOURing(t)
	const bs = 4096
	osf := tempDirect(t, 64*bs)
	// Not closed on failure: Close would wait for the stuck call.
	f, err := NewFile(int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 16})
	if err != nil {
		t.Fatal(err)
	}
	waves := 200
	if testing.Short() {
		waves = 50
	}
	done := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(5, 6))
		for w := range waves {
			var wg sync.WaitGroup
			errs := make(chan error, 64)
			n := 1 + rng.IntN(40)
			for g := range n {
				reads := 1 + rng.IntN(4)
				batch := g%7 == 3
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := directio.AlignedBlock(bs)
					for i := range reads {
						off := int64((g+i)%64) * bs
						if batch {
							ops := []Op{{Buf: buf, Off: off}, {Bufs: [][]byte{buf}, Off: off}}
							if err := f.Do(ops); err != nil {
								errs <- err
								return
							}
							continue
						}
						if _, err := f.ReadAt(buf, off); err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				done <- fmt.Errorf("wave %d: %w", w, err)
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("callers stuck; stats %+v", f.Stats())
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

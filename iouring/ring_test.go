//go:build linux

package iouring

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"
)

// needIOURing skips the test when io_uring is unavailable here.
func needIOURing(t testing.TB) {
	t.Helper()
	if err := Probe(); err != nil {
		t.Skipf("io_uring unavailable: %v", err)
	}
}

// lockedRing creates a ring on this goroutine's OS thread (required for
// SINGLE_ISSUER) and closes it at cleanup.
func lockedRing(t *testing.T, entries uint32) *Ring {
	t.Helper()
	needIOURing(t)
	runtime.LockOSThread()
	r, err := NewRing(RingOptions{Entries: entries})
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("NewRing: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("Close: %v", err)
		}
		runtime.UnlockOSThread()
	})
	return r
}

// tempDirect creates a file of size bytes in a temp dir, opened O_DIRECT.
func tempDirect(t testing.TB, size int64) *os.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "data")
	f, err := directio.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatalf("open O_DIRECT: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

type completion struct {
	ud  uint64
	res int32
}

// waitAll submits and reaps until n completions have arrived.
func waitAll(t *testing.T, r *Ring, n int) []completion {
	t.Helper()
	var got []completion
	for len(got) < n {
		if _, err := r.Submit(1); err != nil {
			t.Fatalf("Submit: %v", err)
		}
		r.Reap(func(ud uint64, res int32) { got = append(got, completion{ud, res}) })
	}
	return got
}

func TestProbe(t *testing.T) {
	if err := Probe(); err != nil {
		t.Logf("io_uring unavailable here: %v", err)
		if !refusedSetup(err) && !errors.Is(err, syscall.EINVAL) {
			t.Errorf("Probe error %v is neither a refusal nor an old kernel", err)
		}
	}
}

func TestRingNop(t *testing.T) {
	r := lockedRing(t, 8)
	if r.SQEntries() != 8 || r.CQEntries() != 16 {
		t.Fatalf("SQ %d CQ %d, want 8 and 16", r.SQEntries(), r.CQEntries())
	}
	t.Logf("flags %s", r.Flags())
	if err := r.PrepNop(0xdeadbeef12345678); err != nil {
		t.Fatal(err)
	}
	n, err := r.Submit(1)
	if err != nil || n != 1 {
		t.Fatalf("Submit = %d, %v; want 1, nil", n, err)
	}
	got := waitAll(t, r, 1)
	if got[0] != (completion{0xdeadbeef12345678, 0}) {
		t.Fatalf("completion %+v", got[0])
	}
	if r.InFlight() != 0 {
		t.Fatalf("InFlight %d after reaping everything", r.InFlight())
	}
}

func TestRingEntriesValidation(t *testing.T) {
	needIOURing(t)
	for _, e := range []uint32{3, 100, 65536} {
		if r, err := NewRing(RingOptions{Entries: e}); err == nil {
			r.Close()
			t.Errorf("NewRing(%d) succeeded", e)
		}
	}
}

// TestRingFullQueues fills the SQ, then the CQ, and checks that every
// request comes back exactly once.
func TestRingFullQueues(t *testing.T) {
	r := lockedRing(t, 4) // SQ 4, CQ 8
	for i := range 4 {
		if err := r.PrepNop(uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.PrepNop(99); !errors.Is(err, ErrSQFull) {
		t.Fatalf("5th prep on a 4-entry SQ: %v, want ErrSQFull", err)
	}
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	for i := 4; i < 8; i++ {
		if err := r.PrepNop(uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	// 8 in flight = CQ size, SQ empty: one more could overflow the CQ.
	if r.SQSpace() != 0 {
		t.Fatalf("SQSpace %d with the CQ full", r.SQSpace())
	}
	if err := r.PrepNop(99); !errors.Is(err, ErrCQFull) || !errors.Is(err, ErrSQFull) {
		t.Fatalf("prep with full CQ: %v, want ErrCQFull (an ErrSQFull)", err)
	}
	got := waitAll(t, r, 8)
	seen := map[uint64]bool{}
	for _, c := range got {
		if c.res != 0 || c.ud >= 8 || seen[c.ud] {
			t.Fatalf("bad or duplicate completion %+v", c)
		}
		seen[c.ud] = true
	}
	if len(seen) != 8 {
		t.Fatalf("got %d distinct completions, want 8", len(seen))
	}
}

func TestRingSubmitWaitTooMany(t *testing.T) {
	r := lockedRing(t, 4)
	if _, err := r.Submit(1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Submit(1) with nothing in flight: %v, want EINVAL", err)
	}
}

func TestRingReadWrite(t *testing.T) {
	r := lockedRing(t, 8)
	f := tempDirect(t, 1<<20)
	fd := int(f.Fd())
	w := directio.AlignedBlock(8192)
	for i := range w {
		w[i] = byte(i * 7)
	}
	if err := r.PrepWrite(fd, w, 4096, 1); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.ud != 1 || c.res != 8192 {
		t.Fatalf("write completion %+v", c)
	}
	if err := r.PrepFsync(fd, true, 2); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.ud != 2 || c.res != 0 {
		t.Fatalf("fsync completion %+v", c)
	}
	got := directio.AlignedBlock(8192)
	if err := r.PrepRead(fd, got, 4096, 3); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.ud != 3 || c.res != 8192 {
		t.Fatalf("read completion %+v", c)
	}
	if !bytes.Equal(got, w) {
		t.Fatal("read back different bytes")
	}
}

func TestRingFixedBuffers(t *testing.T) {
	r := lockedRing(t, 8)
	f := tempDirect(t, 1<<20)
	fd := int(f.Fd())
	a, err := NewArena(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if err := r.RegisterBuffers(a.chunks()); err != nil {
		t.Fatalf("RegisterBuffers: %v", err)
	}
	mem := a.Bytes()
	w, got := mem[:4096], mem[8192:12288]
	for i := range w {
		w[i] = byte(i ^ 0x5a)
	}
	if err := r.PrepWriteFixed(fd, w, 0, 0, 1); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.res != 4096 {
		t.Fatalf("WRITE_FIXED completion %+v", c)
	}
	if err := r.PrepReadFixed(fd, got, 0, 0, 2); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.res != 4096 {
		t.Fatalf("READ_FIXED completion %+v", c)
	}
	if !bytes.Equal(got, w) {
		t.Fatal("READ_FIXED read back different bytes")
	}
	outside := directio.AlignedBlock(4096)
	if err := r.PrepReadFixed(fd, outside, 0, 0, 3); !errors.Is(err, syscall.EFAULT) {
		t.Fatalf("READ_FIXED outside the registered buffer: %v, want EFAULT", err)
	}
	if err := r.PrepReadFixed(fd, got, 0, 1, 3); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("READ_FIXED with unregistered index: %v, want EINVAL", err)
	}
	if err := r.UnregisterBuffers(); err != nil {
		t.Fatal(err)
	}
	if err := r.PrepReadFixed(fd, got, 0, 0, 3); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("READ_FIXED after unregister: %v, want EINVAL", err)
	}
}

// TestRingKernelErrors: errors the kernel reports in a CQE reach the caller.
func TestRingKernelErrors(t *testing.T) {
	r := lockedRing(t, 8)
	f := tempDirect(t, 1<<20)
	// A descriptor that is certainly closed.
	dead, err := unix.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(dead)
	buf := directio.AlignedBlock(4096)
	// Allocate the blocks: O_DIRECT reads of a hole are served without
	// any alignment check.
	if _, err := f.WriteAt(directio.AlignedBlock(8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := r.PrepRead(dead, buf, 0, 1); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.res != -int32(syscall.EBADF) {
		t.Fatalf("read on closed fd: res %d, want -EBADF", c.res)
	}
	// O_DIRECT refuses a misaligned offset.
	if err := r.PrepRead(int(f.Fd()), buf, 100, 2); err != nil {
		t.Fatal(err)
	}
	if c := waitAll(t, r, 1)[0]; c.res != -int32(syscall.EINVAL) {
		t.Fatalf("misaligned O_DIRECT read: res %d, want -EINVAL", c.res)
	}
	if err := r.PrepRead(int(f.Fd()), buf, -1, 3); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("negative offset: %v, want EINVAL", err)
	}
}

func TestRingSubmitMinWait(t *testing.T) {
	r := lockedRing(t, 16)
	if !r.HasMinWait() {
		if _, err := r.SubmitMinWait(2, time.Millisecond); !errors.Is(err, errors.ErrUnsupported) {
			t.Fatalf("SubmitMinWait without kernel support: %v", err)
		}
		t.Skip("kernel lacks IORING_FEAT_MIN_TIMEOUT")
	}
	f := tempDirect(t, 1<<20)
	if _, err := f.WriteAt(directio.AlignedBlock(64<<10), 0); err != nil {
		t.Fatal(err)
	}
	bufs := make([][]byte, 8)
	for i := range bufs {
		bufs[i] = directio.AlignedBlock(4096)
		if err := r.PrepRead(int(f.Fd()), bufs[i], int64(i)*4096, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.SubmitMinWait(9, time.Millisecond); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("SubmitMinWait for more than in flight: %v", err)
	}
	if _, err := r.SubmitMinWait(8, 0); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("SubmitMinWait with zero wait: %v", err)
	}
	n, err := r.SubmitMinWait(8, 200*time.Microsecond)
	if err != nil || n != 8 {
		t.Fatalf("SubmitMinWait = %d, %v", n, err)
	}
	got := 0
	got += r.Reap(func(ud uint64, res int32) {
		if res != 4096 {
			t.Errorf("read %d: res %d", ud, res)
		}
	})
	if got == 0 {
		t.Fatal("SubmitMinWait returned with no completion")
	}
	for got < 8 {
		if _, err := r.Submit(1); err != nil {
			t.Fatal(err)
		}
		got += r.Reap(func(uint64, int32) {})
	}
}

func TestRingWrongThread(t *testing.T) {
	r := lockedRing(t, 4)
	if !r.SingleIssuer() {
		t.Skip("kernel did not accept SINGLE_ISSUER")
	}
	if err := r.PrepNop(1); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error)
	go func() {
		runtime.LockOSThread() // a different thread from the ring's
		defer runtime.UnlockOSThread()
		_, err := r.Submit(0)
		errc <- err
	}()
	if err := <-errc; !errors.Is(err, ErrWrongThread) {
		t.Fatalf("Submit from another thread: %v, want ErrWrongThread", err)
	}
	waitAll(t, r, 1) // the owner can still use it
}

// TestRingCloseDrains closes a ring with reads in flight.
func TestRingCloseDrains(t *testing.T) {
	needIOURing(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r, err := NewRing(RingOptions{Entries: 16})
	if err != nil {
		t.Fatal(err)
	}
	f := tempDirect(t, 1<<20)
	bufs := make([][]byte, 16)
	for i := range bufs {
		bufs[i] = directio.AlignedBlock(4096)
		if err := r.PrepRead(int(f.Fd()), bufs[i], int64(i)*4096, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	if err := r.PrepNop(100); err != nil { // prepared, never submitted
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if r.InFlight() != 0 {
		t.Fatalf("InFlight %d after Close", r.InFlight())
	}
	if err := r.PrepNop(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("PrepNop after Close: %v", err)
	}
	if _, err := r.Submit(0); !errors.Is(err, ErrClosed) {
		t.Fatalf("Submit after Close: %v", err)
	}
	if n := r.Reap(func(uint64, int32) { t.Error("completion after Close") }); n != 0 {
		t.Fatalf("Reap after Close: %d", n)
	}
	if err := r.RegisterBuffers([][]byte{bufs[0]}); !errors.Is(err, ErrClosed) {
		t.Fatalf("RegisterBuffers after Close: %v", err)
	}
	if err := r.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
}

func TestArena(t *testing.T) {
	a, err := NewArena(10000)
	if err != nil {
		t.Fatal(err)
	}
	if a.Size() != 12288 || len(a.Bytes()) != 12288 {
		t.Fatalf("size %d, want 12288", a.Size())
	}
	mem := a.Bytes()
	if !a.Contains(mem) || !a.Contains(mem[4096:8192]) || a.Contains(mem[:0]) {
		t.Fatal("Contains wrong for slices of the arena")
	}
	if a.Contains(make([]byte, 10)) {
		t.Fatal("Contains true for heap memory")
	}
	if i, ok := a.fixedIndex(mem[100:200]); !ok || i != 0 {
		t.Fatalf("fixedIndex = %d, %v", i, ok)
	}
	if err := a.acquire(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("Close while registered: %v, want EBUSY", err)
	}
	a.release()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if a.Bytes() != nil || a.Contains(mem) {
		t.Fatal("arena still usable after Close")
	}
	if err := a.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	for _, size := range []int{0, -1, maxArena + 1} {
		if _, err := NewArena(size); err == nil {
			t.Errorf("NewArena(%d) succeeded", size)
		}
	}
	// Big arenas start on a huge page boundary; all of the memory is
	// usable, zeroed, and given back by Close (mapped and unmapped in a
	// loop, a leak would show as a failed mmap or a growing RSS).
	for _, size := range []int{hugePage - 4096, hugePage, 3*hugePage + 8192} {
		for i := 0; i < 50; i++ {
			a, err := NewArena(size)
			if err != nil {
				t.Fatal(err)
			}
			mem := a.Bytes()
			if len(mem) != size {
				t.Fatalf("NewArena(%d): %d bytes", size, len(mem))
			}
			if size >= hugePage && uintptr(unsafe.Pointer(&mem[0]))%hugePage != 0 {
				t.Fatalf("NewArena(%d) at %p: not on a huge page boundary", size, &mem[0])
			}
			for j := 0; j < size; j += 4096 {
				if mem[j] != 0 {
					t.Fatalf("arena byte %d = %d, want 0", j, mem[j])
				}
				mem[j] = 1
			}
			mem[size-1] = 1
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// A Close from the wrong thread of a SINGLE_ISSUER ring fails and leaves
// the ring as it was: a request prepared before it is still there, and
// Close from the right thread then works.
func TestCloseWrongThreadKeepsPrepared(t *testing.T) {
	r := lockedRing(t, 8)
	if !r.SingleIssuer() {
		t.Skip("no SINGLE_ISSUER")
	}
	if err := r.PrepNop(1); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	if err := r.PrepNop(2); err != nil { // prepared, not submitted
		t.Fatal(err)
	}
	errc := make(chan error)
	go func() { errc <- r.Close() }() // another goroutine, another OS thread
	if err := <-errc; !errors.Is(err, ErrWrongThread) {
		t.Fatalf("Close from another thread: %v, want ErrWrongThread", err)
	}
	if r.Pending() != 1 {
		t.Fatalf("after the failed Close: %d requests prepared, want 1", r.Pending())
	}
	if _, err := r.Submit(2); err != nil {
		t.Fatal(err)
	}
	seen := 0
	r.Reap(func(uint64, int32) { seen++ })
	if seen != 2 {
		t.Fatalf("%d completions after the failed Close, want 2", seen)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

// An arena is registered in huge-page chunks (more only past the kernel's
// buffer count), and a buffer is fixed only inside one chunk.
func TestArenaChunks(t *testing.T) {
	a, err := NewArena(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	cs := a.chunks()
	if len(cs) != 32 || len(cs[0]) != hugePage || len(cs[31]) != hugePage {
		t.Fatalf("64 MiB arena: %d chunks of %d bytes, want 32 of %d", len(cs), len(cs[0]), hugePage)
	}
	mem := a.Bytes()
	if i, ok := a.fixedIndex(mem[3*hugePage+4096 : 3*hugePage+8192]); !ok || i != 3 {
		t.Fatalf("buffer inside chunk 3: index %d, %v", i, ok)
	}
	if _, ok := a.fixedIndex(mem[hugePage-4096 : hugePage+4096]); ok {
		t.Fatal("a buffer across two chunks was given a fixed index")
	}
	// A large arena keeps its chunks under the kernel's count, and none
	// is over the kernel's largest buffer.
	for _, tc := range []struct{ size, chunk int }{
		{256 << 20, hugePage}, {32<<30 - 1, hugePage}, {32 << 30, 4 << 20}, {64 << 30, 8 << 20}, {maxArena, 128 << 20},
	} {
		if got := chunkSize(tc.size); got != tc.chunk {
			t.Errorf("chunkSize(%d) = %d, want %d", tc.size, got, tc.chunk)
		}
	}
}

//go:build linux

package iouring

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ncw/directio"
)

// TestFileStart drives a chain of writes where each completion starts the
// next one from its callback (the way the engine's writeback keeps its
// queue full), with several chains at once, and reads everything back.
func TestFileStart(t *testing.T) {
	needIOURing(t)
	const bs, chains, per = 4096, 8, 64
	osf := tempDirect(t, chains*per*bs)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 4})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	report := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	bufs := make([][]byte, chains)
	for c := range chains {
		bufs[c] = directio.AlignedBlock(per * bs)
		for i := range per {
			fill(bufs[c][i*bs:(i+1)*bs], uint64(c*per+i), 1)
		}
	}
	// next starts block i of chain c; on ErrNoSlot (every slot taken by
	// the other chains) it retries from a goroutine, as a caller must.
	var next func(c, i int)
	next = func(c, i int) {
		if i == per {
			wg.Done()
			return
		}
		op := &Op{Write: true, Buf: bufs[c][i*bs : (i+1)*bs], Off: int64(c*per+i) * bs}
		err := f.Start(op, func(op *Op) {
			if op.Err != nil || op.N != bs {
				report(op.Err)
			}
			next(c, i+1)
		})
		switch {
		case errors.Is(err, ErrNoSlot):
			go func() {
				time.Sleep(10 * time.Microsecond)
				next(c, i)
			}()
		case err != nil:
			report(err)
			wg.Done()
		}
	}
	wg.Add(chains)
	for c := range chains {
		next(c, 0)
	}
	waitOrFail(t, &wg, 30*time.Second)
	if len(errs) > 0 {
		t.Fatalf("writes failed: %v", errs)
	}
	got := directio.AlignedBlock(per * bs)
	for c := range chains {
		if _, err := f.ReadAt(got, int64(c*per)*bs); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bufs[c]) {
			t.Fatalf("chain %d read back other bytes", c)
		}
	}
	if st := f.Stats(); st.Requests < chains*per {
		t.Errorf("stats count %d requests, want at least %d", st.Requests, chains*per)
	}
}

// TestFileStartVectored: a vectored Start writes its buffers in order.
func TestFileStartVectored(t *testing.T) {
	needIOURing(t)
	const bs = 4096
	osf := tempDirect(t, 16*bs)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing})
	parts := make([][]byte, 5)
	for i := range parts {
		parts[i] = directio.AlignedBlock(bs)
		fill(parts[i], uint64(i), 2)
	}
	done := make(chan *Op, 1)
	op := &Op{Write: true, Bufs: parts, Off: 3 * bs}
	if err := f.Start(op, func(op *Op) { done <- op }); err != nil {
		t.Fatal(err)
	}
	if op := <-done; op.Err != nil || op.N != len(parts)*bs {
		t.Fatalf("vectored Start: N %d, %v", op.N, op.Err)
	}
	got := directio.AlignedBlock(len(parts) * bs)
	if _, err := f.ReadAt(got, 3*bs); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Join(parts, nil)) {
		t.Fatal("vectored Start wrote other bytes")
	}
}

// TestFileStartShort: a read that ends past the end of the file is
// continued, then reported as Do reports it.
func TestFileStartShort(t *testing.T) {
	needIOURing(t)
	osf := shortFile(t)
	f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing})
	done := make(chan *Op, 1)
	if err := f.Start(&Op{Buf: make([]byte, 4096)}, func(op *Op) { done <- op }); err != nil {
		t.Fatal(err)
	}
	if op := <-done; op.N != 1000 || op.Err != io.EOF {
		t.Fatalf("Start past the end: N %d, %v; want 1000, io.EOF", op.N, op.Err)
	}
}

// TestFileStartRefused: Start issues nothing and never calls back on bad
// input, a closed File, psync mode, or a full slot table.
func TestFileStartRefused(t *testing.T) {
	called := func(*Op) { t.Error("done called for a refused Start") }
	osf := tempDirect(t, 1<<16)
	buf := directio.AlignedBlock(4096)

	ps := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModePsync})
	if err := ps.Start(&Op{Buf: buf}, called); !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, ErrNoSlot) {
		t.Errorf("psync Start = %v, want ErrNoSlot and ErrUnsupported", err)
	}
	needIOURing(t)
	f, err := NewFile(int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 1})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Start(&Op{Buf: buf, Off: -4096}, called); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("Start at a negative offset = %v, want EINVAL", err)
	}
	// Take every slot with Starts whose completions cannot be delivered:
	// the reactor is held in its callback until release.
	release := make(chan struct{})
	var held sync.WaitGroup
	started := 0
	for {
		held.Add(1)
		err := f.Start(&Op{Buf: directio.AlignedBlock(4096)}, func(op *Op) {
			defer held.Done()
			<-release
		})
		if errors.Is(err, ErrNoSlot) {
			held.Done()
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if started++; started > 1<<16 {
			t.Fatal("Start never ran out of slots")
		}
	}
	close(release)
	waitOrFail(t, &held, 10*time.Second)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(&Op{Buf: buf}, called); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close = %v, want ErrClosed", err)
	}
}

// TestFileStartClose: Close waits for every started request's callback,
// also those of short transfers, which run on goroutines of their own.
func TestFileStartClose(t *testing.T) {
	needIOURing(t)
	for _, short := range []bool{false, true} {
		var osf *os.File
		if short {
			osf = shortFile(t)
		} else {
			osf = tempDirect(t, 1<<20)
		}
		f, err := NewFile(int(osf.Fd()), FileOptions{Mode: ModeIOURing})
		if err != nil {
			t.Fatal(err)
		}
		var calls, started atomic.Int64
		for i := range 64 {
			op := &Op{Write: !short, Buf: directio.AlignedBlock(16384), Off: int64(i) * 16384}
			if short {
				op.Off = 0
			}
			err := f.Start(op, func(op *Op) {
				time.Sleep(time.Millisecond)
				calls.Add(1)
			})
			if err == nil {
				started.Add(1)
			} else if !errors.Is(err, ErrNoSlot) {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		if c, s := calls.Load(), started.Load(); c != s || s == 0 {
			t.Fatalf("short %v: Close returned after %d of %d callbacks", short, c, s)
		}
	}
}

func waitOrFail(t *testing.T, wg *sync.WaitGroup, d time.Duration) {
	t.Helper()
	ch := make(chan struct{})
	go func() {
		wg.Wait()
		close(ch)
	}()
	select {
	case <-ch:
	case <-time.After(d):
		t.Fatalf("not done after %v", d)
	}
}

// shortFile opens, buffered, a file of 1000 bytes of 7s: reads of more
// come back short.
func shortFile(t *testing.T) *os.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "short")
	if err := os.WriteFile(path, bytes.Repeat([]byte{7}, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestFileStartNoSelfKick: a request started from a completion callback
// must not make its pusher wake the reactor (an eventfd write, and a
// wake-up for nothing) when the goroutine running the callback — the
// reactor itself, or a Poll caller — takes it anyway. A chain of 500
// writes, each started from the previous one's callback, once with the
// reactor reaping and once with a goroutine polling.
func TestFileStartNoSelfKick(t *testing.T) {
	needIOURing(t)
	for _, polled := range []bool{false, true} {
		const bs, n = 4096, 500
		osf := tempDirect(t, bs*16)
		f := newTestFile(t, int(osf.Fd()), FileOptions{Mode: ModeIOURing, QueueDepth: 4, Rings: 1})
		buf := directio.AlignedBlock(bs)
		done := make(chan struct{})
		var next func(i int)
		next = func(i int) {
			if i == n {
				close(done)
				return
			}
			op := &Op{Write: true, Buf: buf, Off: int64(i%16) * bs}
			if err := f.Start(op, func(op *Op) {
				if op.Err != nil {
					t.Error(op.Err)
				}
				next(i + 1)
			}); err != nil {
				t.Error(err)
				close(done)
			}
		}
		before := f.Stats()
		next(0)
	wait:
		for {
			select {
			case <-done:
				break wait
			default:
			}
			if polled {
				f.Poll()
			}
			runtime.Gosched()
		}
		st := f.Stats()
		kicks := st.Kicks - before.Kicks
		t.Logf("polled %v: %d chained Starts: kicks %d, sleeps %d, polls %d", polled, n, kicks, st.Sleeps-before.Sleeps, st.Polls-before.Polls)
		if kicks > n/20 {
			t.Errorf("polled %v: %d kicks for %d chained Starts", polled, kicks, n)
		}
	}
}

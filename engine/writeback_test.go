package engine

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// delayDevice delays every write, so that writeback batches overlap.
type delayDevice struct {
	Device
	delay time.Duration
}

func (d *delayDevice) WriteAt(p []byte, off int64) (int, error) {
	time.Sleep(d.delay)
	return d.Device.WriteAt(p, off)
}

// TestStreamingWriteback drives background writeback under memory pressure,
// where a pass keeps sending batches while the earlier ones are in flight.
// One object is appended to while a second goroutine rewrites, reads and
// sometimes syncs the blocks just behind the appender, which are the ones
// in flight; a third object is only appended to. Every read must match the
// model, the pure stream must stay one extent, and the data must survive
// Sync, Close and Open.
func TestStreamingWriteback(t *testing.T) {
	for _, devName := range []string{"mem", "file"} {
		t.Run(devName, func(t *testing.T) {
			var dev Device
			if devName == "mem" {
				dev = &delayDevice{Device: NewMemDevice(96<<20, 4096), delay: 200 * time.Microsecond}
			} else {
				dev = newTestFileDevice(t, 96<<20)
			}
			seed := rand.Uint64()
			t.Logf("seed %d", seed)
			const size = 24 << 20
			opts := Options{CacheSize: 8 << 20, DirtyLimit: 2 << 20}
			e := mustFormatOpen(t, dev, opts)
			mixed, err := e.Create("mixed")
			if err != nil {
				t.Fatal(err)
			}
			pure, err := e.Create("pure")
			if err != nil {
				t.Fatal(err)
			}
			r := rand.New(rand.NewPCG(seed, 1))
			wantMixed := randomBytes(r, size)
			wantPure := randomBytes(r, size)

			var (
				wg       sync.WaitGroup
				appended atomic.Int64 // bytes of mixed written by the appender
				modelMu  sync.Mutex   // wantMixed below appended (the rewriter's)
				errs     = make(chan error, 3)
			)
			appendAll := func(o *Object, src []byte, done *atomic.Int64, chunk int) {
				defer wg.Done()
				for off := 0; off < len(src); off += chunk {
					end := min(off+chunk, len(src))
					modelMu.Lock()
					p := bytes.Clone(src[off:end])
					modelMu.Unlock()
					if _, err := o.WriteAt(p, int64(off)); err != nil {
						errs <- fmt.Errorf("append %q at %d: %w", o.Name(), off, err)
						return
					}
					if done != nil {
						done.Store(int64(end))
					}
				}
			}
			wg.Add(3)
			go appendAll(mixed, wantMixed, &appended, 48<<10+100)
			go appendAll(pure, wantPure, nil, 64<<10)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(seed, 2))
				buf := make([]byte, 64<<10)
				for appended.Load() < size {
					top := appended.Load()
					if top < 1<<20 {
						time.Sleep(100 * time.Microsecond)
						continue
					}
					// Just behind the appender: the blocks a batch is
					// likely writing right now.
					n := 1 + r.Int64N(12<<10)
					at := max(0, top-n-r.Int64N(512<<10))
					p := randomBytes(r, int(n))
					modelMu.Lock()
					copy(wantMixed[at:], p)
					modelMu.Unlock()
					if _, err := mixed.WriteAt(p, at); err != nil {
						errs <- fmt.Errorf("rewrite at %d: %w", at, err)
						return
					}
					l := min(int64(len(buf)), top-at)
					rd := buf[:l]
					if _, err := mixed.ReadAt(rd, at); err != nil {
						errs <- fmt.Errorf("read at %d: %w", at, err)
						return
					}
					modelMu.Lock()
					same := bytes.Equal(rd, wantMixed[at:at+l])
					modelMu.Unlock()
					if !same {
						errs <- fmt.Errorf("read %d bytes at %d (appended %d): differs from the model", l, at, top)
						return
					}
					if r.IntN(64) == 0 {
						if err := mixed.Sync(); err != nil {
							errs <- fmt.Errorf("sync: %w", err)
							return
						}
					}
				}
			}()
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			check := func(stage string, e *Engine) {
				t.Helper()
				for _, c := range []struct {
					name string
					want []byte
				}{{"mixed", wantMixed}, {"pure", wantPure}} {
					o, err := e.Object(c.name)
					if err != nil {
						t.Fatal(err)
					}
					got := make([]byte, len(c.want))
					if n, err := o.ReadAt(got, 0); n != len(got) || (err != nil && n != len(got)) {
						t.Fatalf("%s: read %q: %d bytes, %v", stage, c.name, n, err)
					}
					if i := firstDiff(got, c.want); i >= 0 {
						t.Fatalf("%s: %q differs from the model at byte %d", stage, c.name, i)
					}
				}
			}
			check("before Sync", e)
			if err := e.Sync(); err != nil {
				t.Fatal(err)
			}
			if x := pure.Extents(); len(x) != 1 || x[0].State != Written {
				t.Errorf("the appended-only object has extents %v, want one Written extent", x)
			}
			checkInvariants(t, e)
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			e, err = Open(dev, opts)
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			check("after Close and Open", e)
		})
	}
}

// firstDiff returns the first index where a and b differ, or -1.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// TestEagerAppendWriteback: data appended in a stream goes to the device
// as it comes, without memory pressure and before any Sync; the same
// amount written inside an object (a block device's working set) stays in
// the cache until it ages, is synced or memory runs short.
func TestEagerAppendWriteback(t *testing.T) {
	const cacheSize = 64 << 20
	e := mustFormatOpen(t, NewMemDevice(128<<20, 4096), Options{CacheSize: cacheSize})
	defer e.Close()
	// Under half the dirty limit (no pressure), over eagerPages.
	size := int64(e.cache.DirtyLimitPages()) << e.shift * 2 / 5
	if eager := int64(e.eagerPages()) << e.shift; size < 3*eager {
		t.Fatalf("test needs %d bytes to be over three times eagerPages (%d bytes)", size, eager)
	}
	buf := bytes.Repeat([]byte{7}, 64<<10)
	write := func(o *Object) {
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := o.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
	}

	vol, err := e.Create("vol")
	if err != nil {
		t.Fatal(err)
	}
	if err := vol.Truncate(size); err != nil {
		t.Fatal(err)
	}
	before := e.Stats().DeviceBytesWritten
	write(vol)
	time.Sleep(300 * time.Millisecond)
	if got := e.Stats().DeviceBytesWritten - before; got > 1<<20 {
		t.Fatalf("writes inside an object, no pressure: %d bytes written to the device before a Sync", got)
	}

	// Clean again, so the stream alone is under the background threshold.
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	log, err := e.Create("log")
	if err != nil {
		t.Fatal(err)
	}
	before = e.Stats().DeviceBytesWritten
	write(log)
	deadline := time.Now().Add(3 * time.Second)
	for e.Stats().DeviceBytesWritten-before < uint64(size/2) {
		if time.Now().After(deadline) {
			t.Fatalf("appended %d bytes in a stream: only %d written to the device after 3 s", size, e.Stats().DeviceBytesWritten-before)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	if x := log.Extents(); len(x) != 1 {
		t.Errorf("the stream has extents %v, want one", x)
	}
}

// TestSequentialWriteFramesFollow: a sequential writer gets frames that
// follow each other in the arena, also after writeback has recycled them,
// so that writeback sends its pages as one buffer per I/O.
func TestSequentialWriteFramesFollow(t *testing.T) {
	// A cache large enough that 2 MiB stays under eagerPages: every page
	// is still dirty when the test looks.
	e := mustFormatOpen(t, NewMemDevice(64<<20, 4096), Options{CacheSize: 64 << 20})
	defer e.Close()
	buf := bytes.Repeat([]byte{3}, 64<<10)
	for round := 0; round < 3; round++ {
		o, err := e.Create(fmt.Sprint("o", round))
		if err != nil {
			t.Fatal(err)
		}
		const size = 2 << 20
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := o.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
		o.mu.RLock()
		blocks := o.dirty.Blocks(nil)
		follow := 0
		for i := 1; i < len(blocks); i++ {
			if blocks[i] == blocks[i-1]+1 && o.dirty.Get(blocks[i]).Follows(o.dirty.Get(blocks[i-1])) {
				follow++
			}
		}
		o.mu.RUnlock()
		if len(blocks) != size>>12 {
			t.Fatalf("round %d: %d dirty blocks, want %d", round, len(blocks), size>>12)
		}
		if follow < len(blocks)*9/10 {
			t.Fatalf("round %d: only %d of %d consecutive blocks have frames that follow each other", round, follow, len(blocks)-1)
		}
		// Write it back: the frames return to the cache for the next round.
		if err := o.Sync(); err != nil {
			t.Fatal(err)
		}
	}
}

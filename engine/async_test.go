package engine_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/rawblock/rawblock/engine"
	"github.com/rawblock/rawblock/internal/crashtest"
	"github.com/rawblock/rawblock/iouring"
)

// asyncMem is a memory device whose writes can also be started and
// called back, as io_uring's are: from another goroutine, later. It
// refuses some starts for want of a slot, and fails some writes, so the
// writeback queue's every path runs.
type asyncMem struct {
	engine.Device
	v         engine.VectoredDevice
	mu        sync.Mutex
	rng       *rand.Rand
	noSlot    atomic.Int64 // starts refused with ErrNoSlot
	started   atomic.Int64
	failEvery atomic.Int64 // fail every n-th started write (0: none)
}

func newAsyncMem(size int64) *asyncMem {
	d := engine.NewMemDevice(size, 4096)
	return &asyncMem{Device: d, v: d.(engine.VectoredDevice), rng: rand.New(rand.NewPCG(1, 2))}
}

func (d *asyncMem) AsyncWrites() bool { return true }

func (d *asyncMem) ReadvAt(bufs [][]byte, off int64) (int, error)  { return d.v.ReadvAt(bufs, off) }
func (d *asyncMem) WritevAt(bufs [][]byte, off int64) (int, error) { return d.v.WritevAt(bufs, off) }

var errInjected = errors.New("injected write error")

func (d *asyncMem) StartWrite(buf []byte, bufs [][]byte, off int64, done func(error)) error {
	d.mu.Lock()
	refuse := d.rng.IntN(4) == 0
	d.mu.Unlock()
	if refuse {
		d.noSlot.Add(1)
		return fmt.Errorf("memory device: %w", iouring.ErrNoSlot)
	}
	n := d.started.Add(1)
	fail := d.failEvery.Load() > 0 && n%d.failEvery.Load() == 0
	go func() {
		if fail {
			done(errInjected)
			return
		}
		var err error
		if bufs != nil {
			_, err = d.v.WritevAt(bufs, off)
		} else {
			_, err = d.WriteAt(buf, off)
		}
		done(err)
	}()
	return nil
}

// TestAsyncWriteback writes objects concurrently through a device that
// completes writes asynchronously, refusing a quarter of the starts:
// everything reads back after Sync and after Close and Open; then, with
// every third write failing, Sync reports the failure, and once the device
// heals a Sync makes everything durable.
func TestAsyncWriteback(t *testing.T) {
	dev := newAsyncMem(256 << 20)
	e := formatOpen(t, dev, engine.Options{CacheSize: 16 << 20})
	const objects, size = 4, 8 << 20
	want := make([][]byte, objects)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range want {
		want[i] = make([]byte, size)
		fill(rng, want[i])
	}
	write := func(round, n int) {
		var wg sync.WaitGroup
		for i := range objects {
			wg.Add(1)
			go func() {
				defer wg.Done()
				name := fmt.Sprintf("obj%d", i)
				o, err := e.Object(name)
				if err != nil {
					o, err = e.Create(name)
				}
				if err != nil {
					t.Error(err)
					return
				}
				for off := 0; off < n; off += 12288 {
					end := min(off+12288, n)
					want[i][off] ^= byte(round)
					if _, err := o.WriteAt(want[i][off:end], int64(off)); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	check := func(e *engine.Engine, when string) {
		for i := range objects {
			o, err := e.Object(fmt.Sprintf("obj%d", i))
			if err != nil {
				t.Fatalf("%s: %v", when, err)
			}
			got := make([]byte, size)
			if _, err := o.ReadAt(got, 0); err != nil {
				t.Fatalf("%s: read obj%d: %v", when, i, err)
			}
			if !bytes.Equal(got, want[i]) {
				t.Fatalf("%s: obj%d reads back other bytes", when, i)
			}
		}
	}
	write(1, size)
	if err := e.Sync(); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	check(e, "after Sync")
	if dev.noSlot.Load() == 0 || dev.started.Load() == 0 {
		t.Fatalf("the device saw %d refused and %d started writes; want both", dev.noSlot.Load(), dev.started.Load())
	}

	// Less than the dirty limit, so no writer waits for (failing)
	// writeback: every write is acknowledged.
	dev.failEvery.Store(3)
	write(2, 1<<20)
	if err := e.Sync(); !errors.Is(err, errInjected) {
		t.Fatalf("Sync with failing writes = %v, want the injected error", err)
	}
	dev.failEvery.Store(0)
	// Background writeback may have failed again before the device
	// healed; such a failure is reported once, by the next Sync.
	if err := e.Sync(); err != nil && !errors.Is(err, errInjected) {
		t.Fatalf("first Sync after the device healed: %v", err)
	}
	if err := e.Sync(); err != nil {
		t.Fatalf("Sync after the device healed: %v", err)
	}
	check(e, "after the failed and the good Sync")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e2, err := engine.Open(dev, engine.Options{CacheSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	check(e2, "after Close and Open")
}

// asyncFault completes a FaultDevice's writes on goroutines of their own,
// as io_uring does, so that power cuts land while writeback's queue is
// driven by completions.
type asyncFault struct{ *engine.FaultDevice }

func (asyncFault) AsyncWrites() bool { return true }

func (d asyncFault) StartWrite(buf []byte, bufs [][]byte, off int64, done func(error)) error {
	go func() {
		var err error
		if bufs != nil {
			_, err = d.WritevAt(bufs, off)
		} else {
			_, err = d.WriteAt(buf, off)
		}
		done(err)
	}()
	return nil
}

// TestCrashAsyncWriteback is TestCrash with writes completed
// asynchronously (see asyncFault): 1,000 power cuts while the writeback
// queue is driven by completions; synced data must survive each, and fsck
// must be clean.
func TestCrashAsyncWriteback(t *testing.T) {
	seed := rand.Uint64() >> 1
	cfg := crashtest.Config{Seed: seed, Points: 1000, Check: crashtest.Fsck,
		Wrap: func(d *engine.FaultDevice) engine.Device { return asyncFault{d} }}
	if testing.Short() {
		cfg.Points = 100
		cfg.Objects, cfg.MaxObjectSize, cfg.MaxWrite, cfg.Steps = 4, 256<<10, 256<<10, 8
	}
	t.Logf("seed %d, %d points", seed, cfg.Points)
	st, err := crashtest.Run(context.Background(), cfg)
	t.Log(st)
	if err != nil {
		t.Fatal(err)
	}
	if st.WorkloadCrashes == 0 || st.Syncs == 0 {
		t.Fatalf("the harness did not do what it should: %+v", st)
	}
}

// TestTinyRingWriteback runs writeback, reads and Syncs at once on a
// FileDevice whose ring has one or two slots, far fewer than writeback
// keeps in flight: most starts find no free slot and go through the
// fallback, and everything must still read back, also after Close and
// Open.
func TestTinyRingWriteback(t *testing.T) {
	for _, qd := range []int{1, 2} {
		t.Run(fmt.Sprint("qd", qd), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "dev")
			dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 128 << 20, QueueDepth: qd})
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			e := formatOpen(t, dev, engine.Options{CacheSize: 8 << 20})
			const objects, size = 4, 4 << 20
			want := make([][]byte, objects)
			rng := rand.New(rand.NewPCG(uint64(qd), 5))
			for i := range want {
				want[i] = make([]byte, size)
				fill(rng, want[i])
			}
			var wg sync.WaitGroup
			for i := range objects {
				wg.Add(1)
				go func() {
					defer wg.Done()
					o, err := e.Create(fmt.Sprint("obj", i))
					if err != nil {
						t.Error(err)
						return
					}
					got := make([]byte, 4096)
					for off := 0; off < size; off += 65536 {
						if _, err := o.WriteAt(want[i][off:off+65536], int64(off)); err != nil {
							t.Error(err)
							return
						}
						if off%(1<<20) == 0 {
							if _, err := o.ReadAt(got, int64(off)); err != nil || !bytes.Equal(got, want[i][off:off+4096]) {
								t.Errorf("obj%d at %d: read back %v, equal %v", i, off, err, bytes.Equal(got, want[i][off:off+4096]))
								return
							}
							if err := o.Sync(); err != nil {
								t.Error(err)
								return
							}
						}
					}
				}()
			}
			wg.Wait()
			if t.Failed() {
				return
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			e2, err := engine.Open(dev, engine.Options{CacheSize: 8 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer e2.Close()
			for i := range objects {
				o, err := e2.Object(fmt.Sprint("obj", i))
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, size)
				if _, err := o.ReadAt(got, 0); err != nil || !bytes.Equal(got, want[i]) {
					t.Fatalf("obj%d after Close and Open: %v, equal %v", i, err, bytes.Equal(got, want[i]))
				}
			}
		})
	}
}

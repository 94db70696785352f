package engine_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rawblock/rawblock/engine"
)

// This file drives the public API from many goroutines at once and checks
// every object against a model kept by the test. Each object has a lock in
// the test: mutating calls hold it exclusively so the model stays exact,
// verified reads hold it shared, and Syncs and unverified reads hold nothing,
// so they race with everything else.

// raceEnabled reports whether the test binary was built with -race (the
// build settings record it), so the heavy phases can scale their timeouts.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// hangTimeout is how long a call may take before the test declares a
// deadlock: generous, so that a slow shared machine is not mistaken for one.
func hangTimeout() time.Duration {
	if raceEnabled() {
		return 120 * time.Second
	}
	return 60 * time.Second
}

// goroutineDump returns every goroutine's stack, for deadlock reports.
func goroutineDump() string {
	buf := make([]byte, 4<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// waitOrDie waits for wg, and panics with every goroutine's stack if that
// takes longer than hangTimeout: a deadlock must fail the test, with the
// evidence, rather than hang it until the global timeout.
func waitOrDie(t *testing.T, what string, wg *sync.WaitGroup) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(hangTimeout()):
		t.Errorf("%s did not finish within %v: deadlock?", what, hangTimeout())
		panic(fmt.Sprintf("%s: deadlock; goroutines:\n%s", what, goroutineDump()))
	}
}

// devKind makes a device for a test and reopens it after the engine on it
// was closed, as a daemon restarting would.
type devKind struct {
	name   string
	create func(t *testing.T, size int64) engine.Device
	reopen func(t *testing.T, old engine.Device) engine.Device
}

func devKinds() []devKind {
	return []devKind{
		{
			name:   "mem",
			create: func(t *testing.T, size int64) engine.Device { return engine.NewMemDevice(size, 512) },
			reopen: func(t *testing.T, old engine.Device) engine.Device { return old },
		},
		{
			name:   "file",
			create: createFileDevice,
			reopen: func(t *testing.T, old engine.Device) engine.Device {
				t.Helper()
				fd := old.(*engine.FileDevice)
				if err := fd.Close(); err != nil {
					t.Fatalf("close device: %v", err)
				}
				dev, err := engine.OpenDevice(fd.Path(), engine.DeviceOptions{})
				if err != nil {
					t.Fatalf("reopen device: %v", err)
				}
				t.Cleanup(func() { dev.Close() })
				return dev
			},
		},
	}
}

// createFileDevice opens an O_DIRECT file of size bytes in t.TempDir.
func createFileDevice(t *testing.T, size int64) engine.Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: size})
	if err != nil {
		t.Fatalf("OpenDevice: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	return dev
}

func formatOpen(t *testing.T, dev engine.Device, opts engine.Options) *engine.Engine {
	t.Helper()
	if err := engine.Format(dev, engine.FormatOptions{}); err != nil {
		t.Fatalf("Format: %v", err)
	}
	e, err := engine.Open(dev, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return e
}

// fill puts pseudo-random bytes into p.
func fill(rng *rand.Rand, p []byte) {
	for i := 0; i < len(p); i += 8 {
		v := rng.Uint64()
		for j := i; j < min(i+8, len(p)); j++ {
			p[j] = byte(v)
			v >>= 8
		}
	}
}

// modelWrite applies WriteAt(p, off) to m.
func modelWrite(m []byte, p []byte, off int64) []byte {
	if end := off + int64(len(p)); end > int64(len(m)) {
		m = append(m, make([]byte, end-int64(len(m)))...)
	}
	copy(m[off:], p)
	return m
}

// modelTruncate applies Truncate(size) to m.
func modelTruncate(m []byte, size int64) []byte {
	if size <= int64(len(m)) {
		// The dropped tail stays in m's capacity, but every extension
		// (here and in modelWrite) appends zeros over it.
		return m[:size]
	}
	return append(m, make([]byte, size-int64(len(m)))...)
}

// modelPunch applies PunchHole(off, n) to m.
func modelPunch(m []byte, off, n int64) {
	if off < int64(len(m)) {
		clear(m[off:min(off+n, int64(len(m)))])
	}
}

// firstDiff describes where got and want differ, or returns "" if they
// are equal.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			j := i
			for j < len(got) && got[j] != want[j] {
				j++
			}
			return fmt.Sprintf("first difference at byte %d (%d bytes differ from there): got %#x, want %#x", i, j-i, got[i], want[i])
		}
	}
	return ""
}

// checkRead reads [off, off+n) of o and compares it with model m, under
// io.ReaderAt's rules: a read reaching past the end returns what exists and
// io.EOF; one ending exactly at the end may return nil or io.EOF.
func checkRead(o *engine.Object, m []byte, buf []byte, off int64) error {
	size := int64(len(m))
	n, err := o.ReadAt(buf, off)
	if err != nil && err != io.EOF {
		return fmt.Errorf("ReadAt(%d bytes at %d) = %d: %w", len(buf), off, n, err)
	}
	want := min(max(size-off, 0), int64(len(buf)))
	switch {
	case int64(n) != want:
		return fmt.Errorf("ReadAt(%d bytes at %d) of a %d-byte object: n = %d (err %v), want %d", len(buf), off, size, n, err, want)
	case want < int64(len(buf)) && err != io.EOF:
		return fmt.Errorf("ReadAt(%d bytes at %d) of a %d-byte object: err = %v, want io.EOF", len(buf), off, size, err)
	case want == int64(len(buf)) && err != nil && (err != io.EOF || off+want != size):
		return fmt.Errorf("ReadAt(%d bytes at %d) of a %d-byte object: full read with err = %v", len(buf), off, size, err)
	}
	if want > 0 && !bytes.Equal(buf[:n], m[off:off+want]) {
		return fmt.Errorf("ReadAt(%d bytes at %d) of a %d-byte object: %s", len(buf), off, size, firstDiff(buf[:n], m[off:off+want]))
	}
	return nil
}

// checkObject compares the whole object with m: its size, its bytes, and
// a read one byte past the end.
func checkObject(o *engine.Object, m []byte) error {
	if got := o.Size(); got != int64(len(m)) {
		return fmt.Errorf("size %d, want %d", got, len(m))
	}
	if err := checkRead(o, m, make([]byte, len(m)+1), 0); err != nil {
		return err
	}
	return nil
}

// checkAll checks that e holds exactly the objects of want, each with its
// bytes.
func checkAll(t *testing.T, e *engine.Engine, want map[string][]byte, when string) {
	t.Helper()
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	slices.Sort(names)
	if got := e.Objects(); !slices.Equal(got, names) {
		t.Errorf("%s: Objects() = %q, want %q", when, got, names)
	}
	for _, n := range names {
		o, err := e.Object(n)
		if err != nil {
			t.Errorf("%s: Object(%q): %v", when, n, err)
			continue
		}
		if err := checkObject(o, want[n]); err != nil {
			t.Errorf("%s: object %q: %v", when, n, err)
		}
	}
}

// stressSlot is one object of the stress test and its model.
type stressSlot struct {
	mu    sync.RWMutex
	name  string
	obj   *engine.Object // nil while the object does not exist
	model []byte
	gen   uint64 // bumped by every Remove, so a stale handle's ErrNotExist can be told from a bug
}

const (
	stressObjects    = 16
	stressGoroutines = 64
	stressSpan       = 2 << 20 // writes start below this offset
	stressDevSize    = 192 << 20
	stripeWriters    = 48 // goroutines writing disjoint stripes of one object in phase 2
	stripeLen        = 24<<10 + 13
)

// stressRun holds the state shared by the workers of one stress test.
type stressRun struct {
	t      *testing.T
	e      *engine.Engine
	slots  []*stressSlot
	stop   atomic.Bool
	failed atomic.Bool
	ops    [opCount]atomic.Int64
}

// Operations of the random mix, with their weights.
const (
	opWriteAligned = iota
	opWriteUnaligned
	opRead
	opRacyRead
	opTruncate
	opPunch
	opObjectSync
	opEngineSync
	opRecreate
	opLookup
	opCount
)

var opWeights = [opCount]int{
	opWriteAligned:   18,
	opWriteUnaligned: 24,
	opRead:           20,
	opRacyRead:       6,
	opTruncate:       5,
	opPunch:          7,
	opObjectSync:     6,
	opEngineSync:     2,
	opRecreate:       1,
	opLookup:         3,
}

var opNames = [opCount]string{"write-aligned", "write-unaligned", "read", "racy-read", "truncate", "punch", "object-sync", "engine-sync", "remove+create", "lookup"}

func pickOp(rng *rand.Rand) int {
	total := 0
	for _, w := range opWeights {
		total += w
	}
	r := rng.IntN(total)
	for op, w := range opWeights {
		if r < w {
			return op
		}
		r -= w
	}
	panic("unreachable")
}

func (r *stressRun) fail(format string, args ...any) {
	r.failed.Store(true)
	r.stop.Store(true)
	r.t.Errorf(format, args...)
}

// writeLen picks a write length: mostly small, sometimes up to 512 KiB.
func writeLen(rng *rand.Rand) int {
	switch x := rng.IntN(100); {
	case x < 70:
		return 1 + rng.IntN(16<<10)
	case x < 95:
		return 16<<10 + rng.IntN(112<<10)
	default:
		return 128<<10 + rng.IntN(384<<10)
	}
}

// worker runs random operations until the run stops.
func (r *stressRun) worker(id int) {
	rng := rand.New(rand.NewPCG(uint64(id), 0x5eed))
	buf := make([]byte, 512<<10)
	rbuf := make([]byte, 128<<10)
	for !r.stop.Load() {
		s := r.slots[rng.IntN(len(r.slots))]
		op := pickOp(rng)
		r.ops[op].Add(1)
		if err := r.do(rng, s, op, buf, rbuf); err != nil {
			r.fail("worker %d, %s on %q: %v", id, opNames[op], s.name, err)
			return
		}
	}
}

func (r *stressRun) do(rng *rand.Rand, s *stressSlot, op int, buf, rbuf []byte) error {
	bs := int64(4096)
	switch op {
	case opWriteAligned, opWriteUnaligned:
		var off int64
		var p []byte
		if op == opWriteAligned {
			off = rng.Int64N(stressSpan/bs) * bs
			p = buf[:int64(1+rng.IntN(writeLen(rng)/4096+1))*bs]
		} else {
			off = rng.Int64N(stressSpan)
			p = buf[:writeLen(rng)]
		}
		fill(rng, p)
		s.mu.Lock()
		defer s.mu.Unlock()
		n, err := s.obj.WriteAt(p, off)
		if err != nil || n != len(p) {
			return fmt.Errorf("WriteAt(%d bytes at %d) = %d, %v", len(p), off, n, err)
		}
		s.model = modelWrite(s.model, p, off)
	case opRead:
		s.mu.RLock()
		defer s.mu.RUnlock()
		size := int64(len(s.model))
		off := rng.Int64N(size + 8<<10 + 1)
		p := rbuf[:1+rng.IntN(len(rbuf))]
		if rng.IntN(20) == 0 && size < int64(len(rbuf)) {
			off, p = 0, rbuf[:size+1]
		}
		return checkRead(s.obj, s.model, p, off)
	case opRacyRead:
		// No lock: the bytes are not checked, only that the call behaves.
		s.mu.RLock()
		o, gen := s.obj, s.gen
		s.mu.RUnlock()
		p := rbuf[:1+rng.IntN(len(rbuf))]
		n, err := o.ReadAt(p, rng.Int64N(stressSpan+stressSpan/4))
		switch {
		case n < 0 || n > len(p):
			return fmt.Errorf("racy ReadAt returned n = %d for %d bytes", n, len(p))
		case err == nil && n != len(p):
			return fmt.Errorf("racy ReadAt returned n = %d < %d without an error", n, len(p))
		case err == nil, err == io.EOF:
		case errors.Is(err, fs.ErrNotExist) && r.regenerated(s, gen):
		default:
			return fmt.Errorf("racy ReadAt: %v", err)
		}
	case opTruncate:
		size := rng.Int64N(stressSpan + stressSpan/4)
		switch rng.IntN(8) {
		case 0:
			size = 0
		case 1:
			size = size / bs * bs
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if err := s.obj.Truncate(size); err != nil {
			return fmt.Errorf("Truncate(%d): %v", size, err)
		}
		s.model = modelTruncate(s.model, size)
	case opPunch:
		s.mu.Lock()
		defer s.mu.Unlock()
		size := int64(len(s.model))
		off, n := rng.Int64N(size+4096+1), 1+rng.Int64N(256<<10)
		if rng.IntN(2) == 0 {
			off, n = off/bs*bs, (n+bs-1)/bs*bs
		}
		if err := s.obj.PunchHole(off, n); err != nil {
			return fmt.Errorf("PunchHole(%d, %d): %v", off, n, err)
		}
		modelPunch(s.model, off, n)
		if got := s.obj.Size(); got != size {
			return fmt.Errorf("PunchHole(%d, %d) changed the size from %d to %d", off, n, size, got)
		}
	case opObjectSync:
		s.mu.RLock()
		o, gen := s.obj, s.gen
		s.mu.RUnlock()
		if err := o.Sync(); err != nil && !(errors.Is(err, fs.ErrNotExist) && r.regenerated(s, gen)) {
			return fmt.Errorf("Object.Sync: %v", err)
		}
	case opEngineSync:
		if err := r.e.Sync(); err != nil {
			return fmt.Errorf("Engine.Sync: %v", err)
		}
	case opRecreate:
		s.mu.Lock()
		defer s.mu.Unlock()
		old := s.obj
		if err := r.e.Remove(s.name); err != nil {
			return fmt.Errorf("Remove: %v", err)
		}
		s.gen++
		if _, err := old.WriteAt([]byte("x"), 0); !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("WriteAt on a removed object: %v, want fs.ErrNotExist", err)
		}
		if _, err := old.ReadAt(rbuf[:1], 0); !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("ReadAt on a removed object: %v, want fs.ErrNotExist", err)
		}
		if _, err := r.e.Object(s.name); !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("Object after Remove: %v, want fs.ErrNotExist", err)
		}
		o, err := r.e.Create(s.name)
		if err != nil {
			return fmt.Errorf("Create after Remove: %v", err)
		}
		if o.Size() != 0 {
			return fmt.Errorf("re-created object has size %d", o.Size())
		}
		s.obj, s.model = o, nil
	case opLookup:
		s.mu.RLock()
		defer s.mu.RUnlock()
		o, err := r.e.Object(s.name)
		if err != nil {
			return fmt.Errorf("Object: %v", err)
		}
		if got := o.Size(); got != int64(len(s.model)) {
			return fmt.Errorf("Object(%q).Size() = %d, want %d", s.name, got, len(s.model))
		}
	}
	return nil
}

// regenerated reports whether s was removed after gen was read.
func (r *stressRun) regenerated(s *stressSlot, gen uint64) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.gen != gen
}

// stripeOwner writes, punches and reads back its own stripe of a shared
// object until the run stops. Stripes are disjoint but their edges share
// blocks with the neighbours', so a read-modify-write that loses or
// invents a neighbour's bytes shows up in someone's check.
func (r *stressRun) stripeOwner(o *engine.Object, id int, mine []byte, base int64) {
	rng := rand.New(rand.NewPCG(uint64(id), 0x57e1))
	buf := make([]byte, len(mine))
	got := make([]byte, len(mine))
	for !r.stop.Load() {
		off := rng.IntN(len(mine))
		n := 1 + rng.IntN(min(len(mine)-off, 8<<10))
		switch x := rng.IntN(100); {
		case x < 55:
			p := buf[:n]
			fill(rng, p)
			if w, err := o.WriteAt(p, base+int64(off)); err != nil || w != n {
				r.fail("stripe %d: WriteAt(%d at %d) = %d, %v", id, n, base+int64(off), w, err)
				return
			}
			copy(mine[off:], p)
		case x < 65:
			if err := o.PunchHole(base+int64(off), int64(n)); err != nil {
				r.fail("stripe %d: PunchHole: %v", id, err)
				return
			}
			clear(mine[off : off+n])
		case x < 95:
			if k, err := o.ReadAt(got, base); err != nil || k != len(got) || !bytes.Equal(got, mine) {
				r.fail("stripe %d at %d: ReadAt = %d, %v; %s", id, base, k, err, firstDiff(got, mine))
				return
			}
		default:
			if err := o.Sync(); err != nil {
				r.fail("stripe %d: Sync: %v", id, err)
				return
			}
		}
	}
}

// TestStress runs 64 goroutines of random operations on 16 objects for a
// bounded time, then a phase where 48 of them write disjoint stripes of one
// object while 16 keep the random mix going; every object must then match
// its model, before and after Close and a reopen of the device.
func TestStress(t *testing.T) {
	d := 5 * time.Second
	if testing.Short() {
		d = 1500 * time.Millisecond
	}
	for _, k := range devKinds() {
		t.Run(k.name, func(t *testing.T) { stress(t, k, d) })
	}
}

func stress(t *testing.T, k devKind, d time.Duration) {
	dev := k.create(t, stressDevSize)
	// A cache much smaller than the data, and a dirty limit that the
	// writers hit, so eviction, re-reads and throttling all happen.
	opts := engine.Options{CacheSize: 8 << 20, DirtyLimit: 2 << 20}
	e := formatOpen(t, dev, opts)
	closed := false
	defer func() {
		if !closed {
			e.Close()
		}
	}()
	r := &stressRun{t: t, e: e}
	for i := 0; i < stressObjects; i++ {
		s := &stressSlot{name: fmt.Sprintf("obj-%02d", i)}
		o, err := e.Create(s.name)
		if err != nil {
			t.Fatal(err)
		}
		s.obj = o
		r.slots = append(r.slots, s)
	}
	shared, err := e.Create("shared")
	if err != nil {
		t.Fatal(err)
	}
	sharedLen := int64(stripeWriters*(stripeLen+7) + 4096)
	if err := shared.Truncate(sharedLen); err != nil {
		t.Fatal(err)
	}

	// Phase 1: 64 goroutines of the random mix.
	var wg sync.WaitGroup
	start := time.Now()
	for g := 0; g < stressGoroutines; g++ {
		wg.Add(1)
		go func() { defer wg.Done(); r.worker(g) }()
	}
	time.Sleep(d * 65 / 100)
	r.stop.Store(true)
	waitOrDie(t, "phase 1 workers", &wg)
	if r.failed.Load() {
		t.FailNow()
	}

	// Phase 2: 48 goroutines own disjoint, unaligned stripes of "shared";
	// 16 keep the random mix going on the other objects.
	r.stop.Store(false)
	stripes := make([][]byte, stripeWriters)
	for g := 0; g < stripeWriters; g++ {
		stripes[g] = make([]byte, stripeLen)
		base := int64(g * (stripeLen + 7))
		wg.Add(1)
		go func() { defer wg.Done(); r.stripeOwner(shared, g, stripes[g], base) }()
	}
	for g := 0; g < stressGoroutines-stripeWriters; g++ {
		wg.Add(1)
		go func() { defer wg.Done(); r.worker(1000 + g) }()
	}
	time.Sleep(d * 35 / 100)
	r.stop.Store(true)
	waitOrDie(t, "phase 2 workers", &wg)
	if r.failed.Load() {
		t.FailNow()
	}
	elapsed := time.Since(start)

	want := map[string][]byte{}
	for _, s := range r.slots {
		want[s.name] = s.model
	}
	sharedModel := make([]byte, sharedLen)
	for g, m := range stripes {
		copy(sharedModel[g*(stripeLen+7):], m)
	}
	want["shared"] = sharedModel
	checkAll(t, e, want, "after the run")

	var total int64
	var counts []string
	for op := range r.ops {
		c := r.ops[op].Load()
		total += c
		counts = append(counts, fmt.Sprintf("%s %d", opNames[op], c))
	}
	st := e.Stats()
	t.Logf("%s: %d random operations in %v (%v); device writes %d, reads %d; cache hits %d, misses %d",
		k.name, total, elapsed.Round(time.Millisecond), counts, st.DeviceWrites, st.DeviceReads, st.CacheHits, st.CacheMisses)
	if total < stressGoroutines {
		t.Errorf("only %d operations ran", total)
	}

	closed = true
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	dev = k.reopen(t, dev)
	e2, err := engine.Open(dev, opts)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer e2.Close()
	checkAll(t, e2, want, "after Close and reopen")
	if st := e2.Stats(); st.ReservedBytes != 0 || st.DirtyBytes != 0 {
		t.Errorf("after reopen: %d bytes reserved, %d dirty; want 0", st.ReservedBytes, st.DirtyBytes)
	}
}

// closeRace is the state shared by the workers of one Close race.
type closeRace struct {
	e          *engine.Engine
	slots      []*stressSlot
	closeBegan atomic.Bool
	lateAcks   atomic.Int64 // calls that succeeded after Close began
	mu         sync.Mutex
	errs       []string
}

func (c *closeRace) errorf(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.errs) < 20 {
		c.errs = append(c.errs, fmt.Sprintf(format, args...))
	}
}

// result classifies the outcome of one call: done reports that the caller
// should stop (the engine is closed), ok that the call succeeded.
func (c *closeRace) result(what string, err error) (ok, done bool) {
	switch {
	case err == nil:
		if c.closeBegan.Load() {
			c.lateAcks.Add(1)
		}
		return true, false
	case errors.Is(err, engine.ErrClosed):
		if !c.closeBegan.Load() {
			c.errorf("%s returned ErrClosed before Close was called: %v", what, err)
		}
		return false, true
	default:
		c.errorf("%s: %v", what, err)
		return false, true
	}
}

// writer mutates random objects until the engine refuses with ErrClosed.
// A call refused that way must have changed nothing, so the model is
// updated only for calls that succeeded.
func (c *closeRace) writer(id int) {
	rng := rand.New(rand.NewPCG(uint64(id), 0xc105e))
	buf := make([]byte, 256<<10)
	for {
		s := c.slots[rng.IntN(len(c.slots))]
		done := func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.obj == nil {
				o, err := c.e.Create(s.name)
				ok, done := c.result("Create", err)
				if ok {
					s.obj = o
				}
				return done
			}
			switch x := rng.IntN(100); {
			case x < 80:
				off := rng.Int64N(1 << 20)
				p := buf[:1+rng.IntN(len(buf))]
				if rng.IntN(2) == 0 {
					off, p = off&^4095, buf[:(len(p)+4095)&^4095]
				}
				fill(rng, p)
				n, err := s.obj.WriteAt(p, off)
				ok, done := c.result("WriteAt", err)
				if ok {
					if n != len(p) {
						c.errorf("WriteAt(%d bytes) = %d, nil", len(p), n)
						return true
					}
					s.model = modelWrite(s.model, p, off)
				} else if n != 0 {
					c.errorf("refused WriteAt reported %d bytes written", n)
				}
				return done
			case x < 88:
				size := rng.Int64N(3 << 19)
				ok, done := c.result("Truncate", s.obj.Truncate(size))
				if ok {
					s.model = modelTruncate(s.model, size)
				}
				return done
			case x < 96:
				off, n := rng.Int64N(1<<20), rng.Int64N(128<<10)
				ok, done := c.result("PunchHole", s.obj.PunchHole(off, n))
				if ok {
					modelPunch(s.model, off, n)
				}
				return done
			default:
				ok, done := c.result("Remove", c.e.Remove(s.name))
				if ok {
					s.obj, s.model = nil, nil
					s.gen++
				}
				return done
			}
		}()
		if done {
			return
		}
	}
}

// reader checks reads against the model, and Syncs, until ErrClosed.
func (c *closeRace) reader(id int) {
	rng := rand.New(rand.NewPCG(uint64(id), 0x4ead))
	buf := make([]byte, 64<<10)
	for {
		s := c.slots[rng.IntN(len(c.slots))]
		var err error
		var what string
		switch x := rng.IntN(100); {
		case x < 80:
			what = "ReadAt"
			s.mu.RLock()
			if s.obj != nil {
				off := rng.Int64N(int64(len(s.model)) + 1)
				p := buf[:1+rng.IntN(len(buf))]
				if err = checkRead(s.obj, s.model, p, off); errors.Is(err, engine.ErrClosed) {
					// Refused as a whole; fine once Close began.
				} else if err != nil {
					c.errorf("%s: %v", s.name, err)
					err = engine.ErrClosed
				}
			}
			s.mu.RUnlock()
		case x < 95:
			what = "Object.Sync"
			s.mu.RLock()
			o, gen := s.obj, s.gen
			s.mu.RUnlock()
			if o == nil {
				continue
			}
			err = o.Sync()
			if errors.Is(err, fs.ErrNotExist) {
				s.mu.RLock()
				if s.gen != gen {
					err = nil
				}
				s.mu.RUnlock()
			}
		default:
			what = "Engine.Sync"
			err = c.e.Sync()
		}
		if _, done := c.result(what, err); done {
			return
		}
	}
}

// TestStressCloseRace calls Close while writers, readers and Syncs are
// running: Close must return (no deadlock) without a panic; every call
// after it must fail with ErrClosed; a call refused must have changed
// nothing; and every call acknowledged must be there after a reopen.
func TestStressCloseRace(t *testing.T) {
	rounds := map[string]int{"mem": 4, "file": 3}
	if testing.Short() {
		rounds = map[string]int{"mem": 2, "file": 1}
	}
	for _, k := range devKinds() {
		t.Run(k.name, func(t *testing.T) {
			for round := 0; round < rounds[k.name]; round++ {
				closeRaceRound(t, k, round)
				if t.Failed() {
					return
				}
			}
		})
	}
}

func closeRaceRound(t *testing.T, k devKind, round int) {
	dev := k.create(t, 96<<20)
	opts := engine.Options{CacheSize: 8 << 20, DirtyLimit: 2 << 20}
	e := formatOpen(t, dev, opts)
	c := &closeRace{e: e}
	rng := rand.New(rand.NewPCG(uint64(round), 77))
	for i := 0; i < stressObjects; i++ {
		s := &stressSlot{name: fmt.Sprintf("c%02d", i)}
		o, err := e.Create(s.name)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 1+rng.IntN(200<<10))
		fill(rng, p)
		if _, err := o.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
		s.obj, s.model = o, p
		c.slots = append(c.slots, s)
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	for g := 0; g < 24; g++ {
		wg.Add(1)
		go func() { defer wg.Done(); c.writer(round*100 + g) }()
	}
	for g := 0; g < 12; g++ {
		wg.Add(1)
		go func() { defer wg.Done(); c.reader(round*100 + g) }()
	}
	time.Sleep(time.Duration(20+rng.IntN(250)) * time.Millisecond)

	// Two Closes at once: one does the work, the other is told ErrClosed.
	c.closeBegan.Store(true)
	var closeErrs [2]error
	var cw sync.WaitGroup
	for i := range closeErrs {
		cw.Add(1)
		go func() { defer cw.Done(); closeErrs[i] = e.Close() }()
	}
	waitOrDie(t, "Close", &cw)
	waitOrDie(t, "workers after Close", &wg)
	for _, msg := range c.errs {
		t.Error(msg)
	}
	nilCount, closedCount := 0, 0
	for _, err := range closeErrs {
		switch {
		case err == nil:
			nilCount++
		case errors.Is(err, engine.ErrClosed):
			closedCount++
		default:
			t.Errorf("round %d: Close: %v", round, err)
		}
	}
	if nilCount != 1 || closedCount != 1 {
		t.Errorf("round %d: concurrent Closes returned %v; want one nil and one ErrClosed", round, closeErrs)
	}

	// Every call after Close fails with ErrClosed.
	var live *engine.Object
	for _, s := range c.slots {
		if s.obj != nil {
			live = s.obj
			break
		}
	}
	if live != nil {
		checkClosedObject(t, live)
	}
	checkClosedEngine(t, e)

	want := map[string][]byte{}
	for _, s := range c.slots {
		if s.obj != nil {
			want[s.name] = s.model
		}
	}
	dev = k.reopen(t, dev)
	e2, err := engine.Open(dev, opts)
	if err != nil {
		t.Fatalf("round %d: reopen: %v", round, err)
	}
	defer e2.Close()
	checkAll(t, e2, want, fmt.Sprintf("round %d, after reopen (%d calls acknowledged after Close began)", round, c.lateAcks.Load()))
}

// checkClosedObject checks that every Object call fails with ErrClosed.
func checkClosedObject(t *testing.T, o *engine.Object) {
	t.Helper()
	if n, err := o.WriteAt([]byte("late"), 0); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("WriteAt after Close = %d, %v; want 0, ErrClosed", n, err)
	}
	if n, err := o.ReadAt(make([]byte, 8), 0); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("ReadAt after Close = %d, %v; want 0, ErrClosed", n, err)
	}
	if err := o.Truncate(1); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Truncate after Close = %v; want ErrClosed", err)
	}
	if err := o.PunchHole(0, 1); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("PunchHole after Close = %v; want ErrClosed", err)
	}
	if err := o.Sync(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Object.Sync after Close = %v; want ErrClosed", err)
	}
}

// checkClosedEngine checks that every Engine call fails with ErrClosed.
func checkClosedEngine(t *testing.T, e *engine.Engine) {
	t.Helper()
	if _, err := e.Create("late"); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Create after Close = %v; want ErrClosed", err)
	}
	if _, err := e.Object("late"); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Object after Close = %v; want ErrClosed", err)
	}
	if err := e.Remove("late"); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Remove after Close = %v; want ErrClosed", err)
	}
	if err := e.Sync(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Engine.Sync after Close = %v; want ErrClosed", err)
	}
	if err := e.Close(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("second Close = %v; want ErrClosed", err)
	}
}

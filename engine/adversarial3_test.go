package engine_test

// Crash consistency under concurrency, from a third review: goroutines
// write, truncate, punch, sync, remove and re-create their own objects
// (and share one) while the FaultDevice is cut at a random write or flush,
// inside Close, or inside the Open that recovers; every byte a returned
// Sync covered must survive, and no object may show a byte never written
// to it. RAWBLOCK_A3_SEED and RAWBLOCK_A3_ITERS replay a failing seed.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rawblock/rawblock/engine"
)

// ---------------------------------------------------------------------------
// A per-name crash model that tolerates concurrency.
//
// Every name is owned by one worker goroutine, which is the only one that
// changes it; other goroutines only call Engine.Sync. For each name the model
// keeps an anchor (what a returned Sync made durable: existence and bytes)
// and the list of events since (ops that returned, or that failed and may
// have happened). After a crash the name must be in a state reachable from
// the anchor by any subset of the later events, byte by byte:
//   - a candidate "incarnation" is the anchor state followed by the events up
//     to the first remove, or an empty object created by a later create event
//     followed by the events up to the next remove;
//   - a byte may read as its base value, or as any value an event of the
//     candidate put there (write data, or zeros from a truncate, punch or an
//     extension);
//   - the size may be the base size or any size an event passed through;
//   - the name may be absent only if the anchor is absent or a remove event
//     (or a maybe-create) follows it.
// ---------------------------------------------------------------------------

// a3Stats counts what the runs exercised, so a test that checks nothing
// shows.
var a3Stats struct {
	rounds, crashedInWorkload, folds, pendingEvents, closeCrash, openCrash atomic.Int64
}

type a3Kind uint8

const (
	a3Create a3Kind = iota + 1
	a3Remove
	a3Write
	a3Truncate
	a3Punch
)

type a3Event struct {
	kind  a3Kind
	off   int64
	data  []byte // a3Write
	size  int64  // a3Truncate; a3Punch: length
	maybe bool   // the op failed: it may or may not have happened
}

type a3Name struct {
	mu     sync.Mutex
	name   string
	exists bool   // anchor existence
	base   []byte // anchor contents
	events []a3Event
	folded int // absolute count of events folded into the anchor
	// the present state (exact, for live reads)
	curExists bool
	cur       []byte
}

func a3Apply(exists bool, st []byte, ev a3Event) (bool, []byte) {
	switch ev.kind {
	case a3Create:
		return true, nil
	case a3Remove:
		return false, nil
	case a3Write:
		end := ev.off + int64(len(ev.data))
		if end > int64(len(st)) {
			st = append(st, make([]byte, end-int64(len(st)))...)
		}
		copy(st[ev.off:], ev.data)
	case a3Truncate:
		if ev.size < int64(len(st)) {
			st = st[:ev.size]
		} else {
			st = append(st, make([]byte, ev.size-int64(len(st)))...)
		}
	case a3Punch:
		end := min(ev.off+ev.size, int64(len(st)))
		if end > ev.off {
			clear(st[ev.off:end])
		}
	}
	return exists, st
}

// record appends a completed (or maybe) event and updates the present.
func (n *a3Name) record(ev a3Event) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if ev.kind == a3Write {
		ev.data = bytes.Clone(ev.data)
	}
	n.events = append(n.events, ev)
	if !ev.maybe {
		n.curExists, n.cur = a3Apply(n.curExists, n.cur, ev)
	}
}

// mark returns the absolute number of events recorded so far.
func (n *a3Name) mark() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.folded + len(n.events)
}

// fold makes the first upTo (absolute) events part of the anchor: a Sync
// covering them returned nil. It never folds past a maybe event.
func (n *a3Name) fold(upTo int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for n.folded < upTo && len(n.events) > 0 && !n.events[0].maybe {
		a3Stats.folds.Add(1)
		ev := n.events[0]
		n.exists, n.base = a3Apply(n.exists, bytes.Clone(n.base), ev)
		n.events = n.events[1:]
		n.folded++
	}
}

type a3Cand struct {
	base   []byte
	events []a3Event
}

// check verifies a recovered state (exists, data) against the model and
// returns "" or what is wrong.
func (n *a3Name) check(exists bool, data []byte) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var cands []a3Cand
	absentOK := !n.exists
	if n.exists {
		cands = append(cands, a3Cand{base: n.base})
	}
	cur := len(cands) - 1 // the candidate receiving events; -1: none
	for _, ev := range n.events {
		switch ev.kind {
		case a3Create:
			cands = append(cands, a3Cand{})
			cur = len(cands) - 1
			if ev.maybe {
				absentOK = true
			}
		case a3Remove:
			absentOK = true
			cur = -1
		default:
			if cur >= 0 {
				cands[cur].events = append(cands[cur].events, ev)
			}
		}
	}
	if !exists {
		if absentOK {
			return ""
		}
		return fmt.Sprintf("%q is gone after a crash, but a returned Sync made it durable (anchor size %d, %d events since)", n.name, len(n.base), len(n.events))
	}
	if len(cands) == 0 {
		return fmt.Sprintf("%q exists (size %d) after a crash but was durably absent and never created since", n.name, len(data))
	}
	var why []string
	for i, c := range cands {
		w := a3CheckCand(c, data)
		if w == "" {
			return ""
		}
		why = append(why, fmt.Sprintf("candidate %d (base size %d, %d events): %s", i, len(c.base), len(c.events), w))
	}
	return fmt.Sprintf("%q (size %d) matches no legal state: %v", n.name, len(data), why)
}

func a3CheckCand(c a3Cand, data []byte) string {
	size := int64(len(data))
	sizeOK := size == int64(len(c.base))
	cur := int64(len(c.base))
	for _, ev := range c.events {
		lo, hi := cur, cur
		switch ev.kind {
		case a3Write:
			end := ev.off + int64(len(ev.data))
			if end > cur {
				hi = end
				if !ev.maybe {
					cur = end
				}
			}
		case a3Truncate:
			lo, hi = min(cur, ev.size), max(cur, ev.size)
			if !ev.maybe {
				cur = ev.size
			}
		}
		if size >= lo && size <= hi {
			sizeOK = true
		}
	}
	if !sizeOK {
		return fmt.Sprintf("size %d was never a size since the anchor", size)
	}
	// Byte by byte.
	curLen := int64(len(c.base))
	zeroFrom := make([][2]int64, 0) // ranges some event zeroed
	for _, ev := range c.events {
		switch ev.kind {
		case a3Write:
			if ev.off > curLen {
				zeroFrom = append(zeroFrom, [2]int64{curLen, ev.off})
			}
			if end := ev.off + int64(len(ev.data)); end > curLen && !ev.maybe {
				curLen = end
			}
		case a3Truncate:
			if ev.size < curLen {
				zeroFrom = append(zeroFrom, [2]int64{ev.size, curLen})
			} else {
				zeroFrom = append(zeroFrom, [2]int64{curLen, ev.size})
			}
			if !ev.maybe {
				curLen = ev.size
			}
		case a3Punch:
			zeroFrom = append(zeroFrom, [2]int64{ev.off, ev.off + ev.size})
		}
	}
	for x := int64(0); x < size; x++ {
		v := data[x]
		if x < int64(len(c.base)) {
			if c.base[x] == v {
				continue
			}
		} else if v == 0 {
			continue
		}
		ok := false
		if v == 0 {
			for _, z := range zeroFrom {
				if x >= z[0] && x < z[1] {
					ok = true
					break
				}
			}
		}
		if !ok {
			for _, ev := range c.events {
				if ev.kind == a3Write && x >= ev.off && x < ev.off+int64(len(ev.data)) && ev.data[x-ev.off] == v {
					ok = true
					break
				}
			}
		}
		if !ok {
			base := "past the base size"
			if x < int64(len(c.base)) {
				base = fmt.Sprintf("base %#x", c.base[x])
			}
			return fmt.Sprintf("byte %d reads %#x: never written there (%s)", x, v, base)
		}
	}
	return ""
}

// a3Pattern fills n bytes that identify (tag, offset), never zero.
func a3Pattern(tag uint64, off int64, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		x := (tag*0x9e3779b97f4a7c15 ^ uint64(off+int64(i))*0xbf58476d1ce4e5b9)
		x ^= x >> 29
		x *= 0x94d049bb133111eb
		x ^= x >> 32
		p[i] = byte(x%255) + 1
	}
	return p
}

// a3Expected: errors a workload op may get without the run being broken
// (a full device or metadata region: the op changed nothing).
func a3Benign(err error) bool {
	return errors.Is(err, engine.ErrNoSpace)
}

type a3Config struct {
	devSize    int64
	sector     int
	fo         engine.FormatOptions
	opts       engine.Options
	workers    int
	names      int // per worker
	maxObj     int64
	maxWrite   int
	ops        int // per worker
	engineSync bool
	// closeAfter > 0: another goroutine calls Close that long into the
	// workload, racing the writers; a nil Close folds what returned
	// before it was called.
	closeAfter time.Duration
}

// a3Workload runs the concurrent workload against e until ops run out or
// the device crashes. It returns the models.
func a3Workload(t *testing.T, e *engine.Engine, cfg a3Config, models []*a3Name, seed uint64, tags *atomic.Uint64) {
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	var wdone sync.WaitGroup
	for w := 0; w < cfg.workers; w++ {
		wg.Add(1)
		wdone.Add(1)
		go func(w int) {
			defer wg.Done()
			defer wdone.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)+1))
			mine := models[w*cfg.names : (w+1)*cfg.names]
			handles := make([]*engine.Object, len(mine))
			for i, m := range mine {
				m.mu.Lock()
				ex := m.curExists
				m.mu.Unlock()
				if ex {
					o, err := e.Object(m.name)
					if errors.Is(err, engine.ErrClosed) {
						return // the round's Close came before this worker started
					}
					if err != nil {
						t.Errorf("%s: Object: %v", m.name, err)
						halt()
						return
					}
					handles[i] = o
				}
			}
			for op := 0; op < cfg.ops && !stopped(); op++ {
				i := rng.IntN(len(mine))
				m, o := mine[i], handles[i]
				if o == nil {
					no, err := e.Create(m.name)
					if err != nil {
						if a3Benign(err) {
							continue
						}
						m.record(a3Event{kind: a3Create, maybe: true})
						halt()
						return
					}
					m.record(a3Event{kind: a3Create})
					handles[i] = no
					continue
				}
				size := o.Size()
				switch r := rng.IntN(100); {
				case r < 50:
					n := 1 + rng.IntN(cfg.maxWrite)
					off := rng.Int64N(max(1, min(size+8192, cfg.maxObj-int64(n))))
					if rng.IntN(3) == 0 {
						off &^= 4095
						n = (n + 4095) &^ 4095
					}
					p := a3Pattern(tags.Add(1), off, n)
					var k int
					var err error
					if rng.IntN(4) == 0 {
						var k64 int64
						k64, err = o.WriteFrom(bytes.NewReader(p), off, int64(n))
						k = int(k64)
					} else {
						k, err = o.WriteAt(p, off)
					}
					if err != nil {
						if a3Benign(err) && k == 0 {
							continue
						}
						m.record(a3Event{kind: a3Write, off: off, data: p, maybe: true})
						halt()
						return
					}
					m.record(a3Event{kind: a3Write, off: off, data: p})
				case r < 60:
					ns := rng.Int64N(size + 1)
					if rng.IntN(3) == 0 {
						ns = size + rng.Int64N(20000)
					}
					if err := o.Truncate(ns); err != nil {
						if a3Benign(err) {
							continue
						}
						m.record(a3Event{kind: a3Truncate, size: ns, maybe: true})
						halt()
						return
					}
					m.record(a3Event{kind: a3Truncate, size: ns})
				case r < 67:
					off := rng.Int64N(size + 1)
					n := 1 + rng.Int64N(40000)
					if err := o.PunchHole(off, n); err != nil {
						if a3Benign(err) {
							continue
						}
						m.record(a3Event{kind: a3Punch, off: off, size: n, maybe: true})
						halt()
						return
					}
					m.record(a3Event{kind: a3Punch, off: off, size: n})
				case r < 87:
					mark := m.mark()
					if err := o.Sync(); err != nil {
						halt()
						return
					}
					m.fold(mark)
				case r < 92:
					if err := e.Remove(m.name); err != nil {
						m.record(a3Event{kind: a3Remove, maybe: true})
						halt()
						return
					}
					m.record(a3Event{kind: a3Remove})
					handles[i] = nil
				default:
					// read back the present: it must be exact
					m.mu.Lock()
					want := bytes.Clone(m.cur)
					m.mu.Unlock()
					got := make([]byte, len(want))
					k, err := o.ReadAt(got, 0)
					if err != nil && err != io.EOF {
						halt()
						return
					}
					if k == len(want) && !bytes.Equal(got, want) {
						t.Errorf("seed %d: live read of %s differs from what was written", seed, m.name)
						halt()
						return
					}
				}
			}
		}(w)
	}
	if cfg.engineSync {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 999))
			for !stopped() {
				time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
				marks := make([]int, len(models))
				for i, m := range models {
					marks[i] = m.mark()
				}
				if err := e.Sync(); err != nil {
					halt()
					return
				}
				for i, m := range models {
					m.fold(marks[i])
				}
			}
		}()
	}
	if cfg.closeAfter > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case <-stop:
				return
			case <-time.After(cfg.closeAfter):
			}
			marks := make([]int, len(models))
			for i, m := range models {
				marks[i] = m.mark()
			}
			if err := e.Close(); err == nil {
				for i, m := range models {
					m.fold(marks[i])
				}
			}
			halt()
		}()
	}
	go func() { wdone.Wait(); halt() }()
	wg.Wait()
}

// a3Verify opens (already opened) e and checks every name.
func a3Verify(t *testing.T, e *engine.Engine, models []*a3Name, what string) bool {
	t.Helper()
	present := map[string]bool{}
	for _, n := range e.Objects() {
		present[n] = true
	}
	okAll := true
	for _, m := range models {
		var data []byte
		ex := present[m.name]
		if ex {
			o, err := e.Object(m.name)
			if err != nil {
				t.Errorf("%s: Object(%q): %v", what, m.name, err)
				return false
			}
			data = make([]byte, o.Size())
			if k, err := o.ReadAt(data, 0); k != len(data) || (err != nil && err != io.EOF) {
				t.Errorf("%s: read %q: %d, %v", what, m.name, k, err)
				return false
			}
		}
		if w := m.check(ex, data); w != "" {
			t.Errorf("%s: %s", what, w)
			okAll = false
		}
		delete(present, m.name)
	}
	for n := range present {
		t.Errorf("%s: unknown object %q after recovery", what, n)
		okAll = false
	}
	return okAll
}

// a3Reset makes every model's anchor the observed state (after a verified
// recovery the present is exactly known).
func a3Reset(t *testing.T, e *engine.Engine, models []*a3Name) {
	for _, m := range models {
		m.mu.Lock()
		m.events, m.folded = nil, 0
		m.exists, m.base = false, nil
		if o, err := e.Object(m.name); err == nil {
			data := make([]byte, o.Size())
			if k, err := o.ReadAt(data, 0); k != len(data) || (err != nil && err != io.EOF) {
				t.Fatalf("read %q: %v", m.name, err)
			}
			m.exists, m.base = true, data
		}
		m.curExists, m.cur = m.exists, bytes.Clone(m.base)
		m.mu.Unlock()
	}
}

func a3Fsck(t *testing.T, d engine.Device, what string) bool {
	t.Helper()
	r, err := engine.Check(d)
	if err != nil {
		t.Errorf("%s: fsck: %v (%v)", what, err, r.Problems)
		return false
	}
	if len(r.Problems) > 0 {
		t.Errorf("%s: fsck problems: %v", what, r.Problems)
		return false
	}
	return true
}

// a3GrowZeros extends every object past its size and checks the gap reads
// zeros (nothing cut off or lost before the crash comes back).
func a3GrowZeros(t *testing.T, e *engine.Engine, what string) bool {
	t.Helper()
	for _, name := range e.Objects() {
		o, err := e.Object(name)
		if err != nil {
			continue
		}
		sz := o.Size()
		// A one-byte write a little past the end (same block, or the
		// next): the gap must read zeros.
		gap := int64(1 + (sz*7+int64(len(name)))%5000)
		if _, err := o.WriteAt([]byte{0x5a}, sz+gap); err != nil {
			if a3Benign(err) {
				continue
			}
			t.Errorf("%s: write past the end of %q: %v", what, name, err)
			return false
		}
		g := make([]byte, gap)
		if _, err := o.ReadAt(g, sz); err != nil {
			t.Errorf("%s: read %q: %v", what, name, err)
			return false
		}
		for i, c := range g {
			if c != 0 {
				t.Errorf("%s: %q written at %d past its end %d: byte %d reads %#x, not zero (a lost or cut-off tail came back)", what, name, sz+gap, sz, sz+int64(i), c)
				return false
			}
		}
		if err := o.Truncate(sz); err != nil {
			t.Errorf("%s: shrink back %q: %v", what, name, err)
			return false
		}
		ns := sz + 70000
		if err := o.Truncate(ns); err != nil {
			if a3Benign(err) {
				continue
			}
			t.Errorf("%s: grow %q: %v", what, name, err)
			return false
		}
		got := make([]byte, ns-sz)
		if _, err := o.ReadAt(got, sz); err != nil && err != io.EOF {
			t.Errorf("%s: read %q: %v", what, name, err)
			return false
		}
		for i, c := range got {
			if c != 0 {
				t.Errorf("%s: %q grown from %d: byte %d reads %#x, not zero (a lost or cut-off tail came back)", what, name, sz, sz+int64(i), c)
				return false
			}
		}
		if err := o.Truncate(sz); err != nil {
			t.Errorf("%s: shrink back %q: %v", what, name, err)
			return false
		}
	}
	return true
}

func a3DefaultConfig() a3Config {
	return a3Config{
		devSize:    24 << 20,
		sector:     512,
		fo:         engine.FormatOptions{MetadataSize: 128 << 10},
		opts:       engine.Options{CacheSize: 2 << 20},
		workers:    4,
		names:      2,
		maxObj:     256 << 10,
		maxWrite:   24 << 10,
		ops:        400,
		engineSync: true,
	}
}

// a3Run is one iteration: format, several rounds of concurrent workload with
// a crash at a random device mutation, reboot, (maybe crash again inside
// Open/recovery and Close), verify, fsck.
func a3Run(t *testing.T, cfg a3Config, seed uint64, rounds int) bool {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 7))
	d := engine.NewFaultDevice(cfg.devSize, cfg.sector)
	if err := engine.Format(d, cfg.fo); err != nil {
		t.Fatalf("seed %d: format: %v", seed, err)
	}
	models := make([]*a3Name, cfg.workers*cfg.names)
	for i := range models {
		models[i] = &a3Name{name: fmt.Sprintf("w%d-o%d", i/cfg.names, i%cfg.names)}
	}
	var tags atomic.Uint64
	tags.Store(seed << 20)
	for round := 0; round < rounds; round++ {
		what := fmt.Sprintf("seed %d round %d", seed, round)
		e, err := engine.Open(d, cfg.opts)
		if err != nil {
			t.Errorf("%s: open: %v", what, err)
			return false
		}
		if round > 0 {
			// The engine must already show the verified state.
			if !a3Verify(t, e, models, what+" (reopen)") {
				return false
			}
		}
		cut := rng.Int64N(400)
		cfg.closeAfter = 0
		if rng.IntN(3) == 0 {
			cfg.closeAfter = time.Duration(1+rng.IntN(20)) * time.Millisecond
			cut = rng.Int64N(1500)
		} else if rng.IntN(4) == 0 {
			cut = -1 // the workload runs to its end; Close may be cut
		}
		d.CrashAfter(cut)
		a3Workload(t, e, cfg, models, seed*1000+uint64(round), &tags)
		if t.Failed() {
			return false
		}
		a3Stats.rounds.Add(1)
		if d.Crashed() {
			a3Stats.crashedInWorkload.Add(1)
		}
		for _, m := range models {
			a3Stats.pendingEvents.Add(int64(len(m.events)))
		}
		mode := rng.IntN(4)
		if mode == 0 && !d.Crashed() {
			// crash inside Close
			d.CrashAfter(rng.Int64N(8))
			a3Stats.closeCrash.Add(1)
			if err := e.Close(); err == nil && !d.Crashed() {
				// a clean close: everything is durable
				for _, m := range models {
					m.fold(m.mark())
				}
			}
		}
		d.Crash()
		_ = e.Close()
		nd, _ := d.Reboot(rand.New(rand.NewPCG(seed, uint64(round)+100)), true)
		d = nd
		// Crash during recovery, repeatedly.
		for k := 0; k < 1+rng.IntN(3) && mode >= 2; k++ {
			d.CrashAfter(rng.Int64N(6))
			e2, err := engine.Open(d, cfg.opts)
			a3Stats.openCrash.Add(1)
			if err == nil {
				// let the background run briefly
				time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
				d.Crash()
				_ = e2.Close()
			}
			d, _ = d.Reboot(rand.New(rand.NewPCG(seed, uint64(round)*31+uint64(k)+1000)), true)
		}
		if !a3Fsck(t, d, what) {
			return false
		}
		e, err = engine.Open(d, cfg.opts)
		if err != nil {
			t.Errorf("%s: open after reboot: %v", what, err)
			return false
		}
		if !a3Verify(t, e, models, what) {
			e.Close()
			return false
		}
		a3Reset(t, e, models)
		if !a3GrowZeros(t, e, what) {
			e.Close()
			return false
		}
		if err := e.Close(); err != nil {
			t.Errorf("%s: close: %v", what, err)
			return false
		}
		if !a3Fsck(t, d, what+" after clean close") {
			return false
		}
	}
	return true
}

func a3Iters(t *testing.T, budget time.Duration, max int) (uint64, time.Duration, int) {
	base := crashEnv(t, "RAWBLOCK_A3_SEED", 1)
	if testing.Short() {
		budget /= 3
	}
	if v := crashEnv(t, "RAWBLOCK_A3_ITERS", 0); v > 0 {
		max = int(v)
		budget = time.Hour
	}
	return base, budget, max
}

// TestAdv3ConcurrentCrash: 4 goroutines each own two objects and write,
// truncate, punch, sync, remove and re-create them while another calls
// Engine.Sync; the device is cut at a random mutation. After a reboot that
// loses, reorders and tears unflushed writes (and, in some rounds, crashes
// again inside Open/recovery or inside Close), every name must be in a state
// a legal mix allows, fsck clean, and growing any object reads zeros.
func TestAdv3ConcurrentCrash(t *testing.T) {
	base, budget, max := a3Iters(t, 8*time.Second, 10000)
	start := time.Now()
	n := 0
	for i := 0; i < max && time.Since(start) < budget; i++ {
		seed := base + uint64(i)
		cfg := a3DefaultConfig()
		if seed%3 == 1 {
			cfg.sector = 4096
		}
		if seed%4 == 2 {
			cfg.engineSync = false
		}
		if !a3Run(t, cfg, seed, 3) {
			t.Fatalf("failed at seed %d (RAWBLOCK_A3_SEED=%d RAWBLOCK_A3_ITERS=1 replays the workload; the interleaving is not deterministic)", seed, seed)
		}
		n++
	}
	t.Logf("%d iterations; rounds %d, crashed in workload %d, folds %d, events pending at crashes %d, close cuts %d, open cuts %d", n,
		a3Stats.rounds.Load(), a3Stats.crashedInWorkload.Load(), a3Stats.folds.Load(), a3Stats.pendingEvents.Load(), a3Stats.closeCrash.Load(), a3Stats.openCrash.Load())
}

// TestAdv3ObjectSyncIndependent: Object.Sync of one object must make its
// data, size and existence durable on its own — no Engine.Sync, other
// objects full of dirty data that is never synced, a crash right after.
func TestAdv3ObjectSyncIndependent(t *testing.T) {
	for seed := uint64(0); seed < 40; seed++ {
		d := engine.NewFaultDevice(24<<20, 512)
		if err := engine.Format(d, engine.FormatOptions{MetadataSize: 128 << 10}); err != nil {
			t.Fatal(err)
		}
		e, err := engine.Open(d, engine.Options{CacheSize: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(seed, 3))
		// Others: dirty, never synced.
		for i := 0; i < 3; i++ {
			o, err := e.Create(fmt.Sprintf("other%d", i))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := o.WriteAt(a3Pattern(uint64(100+i), 0, 300<<10), 0); err != nil {
				t.Fatal(err)
			}
		}
		a, err := e.Create("a")
		if err != nil {
			t.Fatal(err)
		}
		n := 1 + rng.IntN(200<<10)
		off := rng.Int64N(10000)
		want := make([]byte, off+int64(n))
		copy(want[off:], a3Pattern(7, off, n))
		if _, err := a.WriteAt(want[off:], off); err != nil {
			t.Fatal(err)
		}
		// Concurrent noise on the others while a syncs.
		var wg sync.WaitGroup
		for i := 0; i < 3; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				o, _ := e.Object(fmt.Sprintf("other%d", i))
				for k := 0; k < 20; k++ {
					if _, err := o.WriteAt(a3Pattern(uint64(200+k), int64(k)*4096, 5000), int64(k)*4096); err != nil {
						return
					}
				}
			}(i)
		}
		if err := a.Sync(); err != nil {
			t.Fatalf("seed %d: a.Sync: %v", seed, err)
		}
		d.Crash()
		wg.Wait()
		_ = e.Close()
		d, _ = d.Reboot(rand.New(rand.NewPCG(seed, 4)), true)
		a3Fsck(t, d, fmt.Sprintf("seed %d", seed))
		e, err = engine.Open(d, engine.Options{CacheSize: 4 << 20})
		if err != nil {
			t.Fatalf("seed %d: open: %v", seed, err)
		}
		ao, err := e.Object("a")
		if err != nil {
			t.Fatalf("seed %d: a synced with Object.Sync is gone after a crash: %v", seed, err)
		}
		got := make([]byte, ao.Size())
		ao.ReadAt(got, 0)
		if !bytes.Equal(got, want) {
			t.Fatalf("seed %d: a after crash: size %d want %d, %s", seed, len(got), len(want), advDiffRanges(got, want))
		}
		e.Close()
	}
}

// TestAdv3RemoveReuseConcurrent: objects are synced full of a pattern, removed
// (with a returned Engine.Sync), and new objects written concurrently over
// the freed space with Object.Sync, crash at random points. Removed objects
// must be gone; new objects show only their own bytes or zeros.
func TestAdv3RemoveReuseConcurrent(t *testing.T) {
	base, budget, max := a3Iters(t, 6*time.Second, 2000)
	start := time.Now()
	for i := 0; i < max && time.Since(start) < budget; i++ {
		seed := base + uint64(i)
		rng := rand.New(rand.NewPCG(seed, 11))
		d := engine.NewFaultDevice(16<<20, 512)
		if err := engine.Format(d, engine.FormatOptions{MetadataSize: 128 << 10}); err != nil {
			t.Fatal(err)
		}
		opts := engine.Options{CacheSize: 2 << 20}
		e, err := engine.Open(d, opts)
		if err != nil {
			t.Fatal(err)
		}
		// Fill most of the device with old objects.
		const oldN, oldSize = 6, 1800 << 10
		for k := 0; k < oldN; k++ {
			o, err := e.Create(fmt.Sprintf("old%d", k))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := o.WriteAt(bytes.Repeat([]byte{0xEE}, oldSize), 0); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Sync(); err != nil {
			t.Fatal(err)
		}
		for k := 0; k < oldN; k++ {
			if err := e.Remove(fmt.Sprintf("old%d", k)); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Sync(); err != nil {
			t.Fatal(err)
		}
		d.CrashAfter(rng.Int64N(200))
		models := make([]*a3Name, 4)
		for w := range models {
			models[w] = &a3Name{name: fmt.Sprintf("new%d", w)}
		}
		var wg sync.WaitGroup
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				m := models[w]
				r := rand.New(rand.NewPCG(seed, uint64(w)))
				o, err := e.Create(m.name)
				if err != nil {
					m.record(a3Event{kind: a3Create, maybe: true})
					return
				}
				m.record(a3Event{kind: a3Create})
				for k := 0; k < 30; k++ {
					n := 1 + r.IntN(64<<10)
					off := r.Int64N(1 << 20)
					p := a3Pattern(uint64(w*1000+k)+seed<<16, off, n)
					if _, err := o.WriteAt(p, off); err != nil {
						m.record(a3Event{kind: a3Write, off: off, data: p, maybe: true})
						return
					}
					m.record(a3Event{kind: a3Write, off: off, data: p})
					if r.IntN(3) == 0 {
						mark := m.mark()
						if err := o.Sync(); err != nil {
							return
						}
						m.fold(mark)
					}
				}
			}(w)
		}
		wg.Wait()
		d.Crash()
		_ = e.Close()
		d, _ = d.Reboot(rand.New(rand.NewPCG(seed, 12)), true)
		what := fmt.Sprintf("seed %d", seed)
		a3Fsck(t, d, what)
		e, err = engine.Open(d, opts)
		if err != nil {
			t.Fatalf("%s: open: %v", what, err)
		}
		for k := 0; k < oldN; k++ {
			if _, err := e.Object(fmt.Sprintf("old%d", k)); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("%s: old%d came back after Remove + Engine.Sync: %v", what, k, err)
			}
		}
		for _, m := range models {
			var data []byte
			o, err := e.Object(m.name)
			ex := err == nil
			if ex {
				data = make([]byte, o.Size())
				o.ReadAt(data, 0)
			}
			if w := m.check(ex, data); w != "" {
				t.Fatalf("%s: %s", what, w)
			}
		}
		e.Close()
	}
}

// TestAdv3ConcurrentCrashTight: the same as TestAdv3ConcurrentCrash on a
// nearly full device with a tiny cache and more writers, so that writeback,
// ENOSPC retries, busy extents and allocation windows all happen under the
// cut.
func TestAdv3ConcurrentCrashTight(t *testing.T) {
	base, budget, max := a3Iters(t, 8*time.Second, 10000)
	start := time.Now()
	n := 0
	for i := 0; i < max && time.Since(start) < budget; i++ {
		seed := base + uint64(i) + 1<<30
		cfg := a3DefaultConfig()
		cfg.devSize = 16 << 20
		cfg.opts = engine.Options{CacheSize: 1 << 20}
		cfg.fo = engine.FormatOptions{MetadataSize: 64 << 10}
		cfg.workers, cfg.names = 6, 2
		cfg.maxObj = 2 << 20
		cfg.maxWrite = 200 << 10
		cfg.ops = 150
		if seed%2 == 1 {
			cfg.sector = 4096
		}
		if !a3Run(t, cfg, seed, 3) {
			t.Fatalf("failed at seed %d (RAWBLOCK_A3_SEED=%d RAWBLOCK_A3_ITERS=1 replays the workload; the interleaving is not deterministic)", seed, seed-1<<30)
		}
		n++
	}
	t.Logf("%d iterations", n)
}

// TestAdv3SharedObjectConcurrentSync: several goroutines write disjoint
// regions of ONE object and each calls Object.Sync on it (group commit on
// one object); the power is cut at a random point. Every region's bytes
// acknowledged by a Sync that returned must survive; no byte may read as
// something never written there.
func TestAdv3SharedObjectConcurrentSync(t *testing.T) {
	base, budget, max := a3Iters(t, 6*time.Second, 5000)
	start := time.Now()
	const writers, region = 4, 384 << 10
	n := 0
	for i := 0; i < max && time.Since(start) < budget; i++ {
		seed := base + uint64(i) + 7<<30
		rng := rand.New(rand.NewPCG(seed, 1))
		sector := 512
		if seed%2 == 0 {
			sector = 4096
		}
		d := engine.NewFaultDevice(24<<20, sector)
		if err := engine.Format(d, engine.FormatOptions{MetadataSize: 128 << 10}); err != nil {
			t.Fatal(err)
		}
		opts := engine.Options{CacheSize: 1 << 20}
		e, err := engine.Open(d, opts)
		if err != nil {
			t.Fatal(err)
		}
		o, err := e.Create("shared")
		if err != nil {
			t.Fatal(err)
		}
		if err := o.Truncate(writers * region); err != nil {
			t.Fatal(err)
		}
		if err := o.Sync(); err != nil {
			t.Fatal(err)
		}
		models := make([]*a3Name, writers)
		for w := range models {
			models[w] = &a3Name{name: fmt.Sprintf("region%d", w), exists: true, base: make([]byte, region), curExists: true, cur: make([]byte, region)}
		}
		d.CrashAfter(rng.Int64N(300))
		var wg sync.WaitGroup
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				m := models[w]
				r := rand.New(rand.NewPCG(seed, uint64(w)+10))
				for k := 0; k < 60; k++ {
					switch r.IntN(5) {
					case 0, 1, 2:
						n := 1 + r.IntN(48<<10)
						off := r.Int64N(region - int64(n))
						p := a3Pattern(seed<<8+uint64(w*1000+k), off, n)
						if _, err := o.WriteAt(p, int64(w)*region+off); err != nil {
							m.record(a3Event{kind: a3Write, off: off, data: p, maybe: true})
							return
						}
						m.record(a3Event{kind: a3Write, off: off, data: p})
					case 3:
						off := r.Int64N(region)
						n := 1 + r.Int64N(min(region-off, 20000))
						if err := o.PunchHole(int64(w)*region+off, n); err != nil {
							m.record(a3Event{kind: a3Punch, off: off, size: n, maybe: true})
							return
						}
						m.record(a3Event{kind: a3Punch, off: off, size: n})
					default:
						mark := m.mark()
						if err := o.Sync(); err != nil {
							return
						}
						m.fold(mark)
					}
				}
			}(w)
		}
		wg.Wait()
		d.Crash()
		_ = e.Close()
		d, _ = d.Reboot(rand.New(rand.NewPCG(seed, 2)), true)
		what := fmt.Sprintf("seed %d", seed)
		if !a3Fsck(t, d, what) {
			t.FailNow()
		}
		e, err = engine.Open(d, opts)
		if err != nil {
			t.Fatalf("%s: open: %v", what, err)
		}
		so, err := e.Object("shared")
		if err != nil {
			t.Fatalf("%s: shared object gone: %v", what, err)
		}
		if so.Size() != writers*region {
			t.Fatalf("%s: size %d, want %d", what, so.Size(), writers*region)
		}
		data := make([]byte, writers*region)
		if k, err := so.ReadAt(data, 0); k != len(data) {
			t.Fatalf("%s: read: %d, %v", what, k, err)
		}
		for w, m := range models {
			if why := m.check(true, data[w*region:(w+1)*region]); why != "" {
				t.Fatalf("%s: %s (offsets relative to the region start %d)", what, why, w*region)
			}
		}
		e.Close()
		n++
	}
	t.Logf("%d iterations", n)
}

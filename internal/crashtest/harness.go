package crashtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"time"

	"github.com/rawblock/rawblock/engine"
)

// harness is one run: a formatted fault device, the engine on it, and the
// model of what the engine must keep.
type harness struct {
	ctx   context.Context
	cfg   *Config
	seed  uint64
	rng   *rand.Rand
	st    *Stats
	start time.Time

	dev   *engine.FaultDevice
	e     *engine.Engine
	objs  map[string]*engine.Object // live handles of the present objects
	slots []*slot

	nextInc int
	gen     uint64
	cuts    int // power cuts so far in this run
	point   int // the crash point being worked towards or checked (1-based)

	trace   []string
	dropped int // trace lines dropped from the front

	// Running estimates of device writes+flushes per workload step, per
	// Close and per Open, so crash points spread over the whole of each.
	opsPerStep, closeOps, openOps float64
}

// errCut reports that the power was cut while the harness was verifying a
// recovery: the check is abandoned and the recovery redone.
var errCut = errors.New("power cut during verification")

// errAbandoned reports a call still blocked a grace period after the power
// cut: its engine is left behind.
var errAbandoned = errors.New("call still blocked after the power cut: engine abandoned")

func newHarness(ctx context.Context, cfg *Config, seed uint64, st *Stats, start time.Time) *harness {
	h := &harness{
		ctx:        ctx,
		cfg:        cfg,
		seed:       seed,
		rng:        rand.New(rand.NewPCG(seed, 0x7261776226c6f636)),
		st:         st,
		start:      start,
		objs:       make(map[string]*engine.Object),
		opsPerStep: 3,
		closeOps:   4,
		openOps:    1,
	}
	for i := range cfg.Objects {
		h.slots = append(h.slots, &slot{name: fmt.Sprintf("obj-%02d", i)})
	}
	return h
}

func (h *harness) tracef(format string, args ...any) {
	h.trace = append(h.trace, fmt.Sprintf("[cut %d] ", h.point)+fmt.Sprintf(format, args...))
	if len(h.trace) >= 2*traceTail {
		n := len(h.trace) - traceTail
		h.dropped += n
		h.trace = append(h.trace[:0], h.trace[n:]...)
	}
}

func (h *harness) traceTail() []string {
	t := h.trace
	if len(t) > traceTail {
		h.dropped += len(t) - traceTail
		t = t[len(t)-traceTail:]
	}
	if h.dropped > 0 {
		t = append([]string{fmt.Sprintf("(%d earlier lines left out)", h.dropped)}, t...)
	}
	return t
}

func ema(old, sample float64) float64 { return 0.7*old + 0.3*sample }

// call runs one engine call with a watchdog. A call still blocked Grace
// after the power cut is abandoned (errAbandoned): a dead device can leave
// a writer waiting for writeback forever, and that engine is of no further
// use. A call blocked for StepTimeout with the power on has hung: that is a
// failure.
func (h *harness) call(what string, fn func() error) error {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	start := time.Now()
	var cut time.Time
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return err
		case <-tick.C:
		}
		if cut.IsZero() && h.dev.Crashed() {
			cut = time.Now()
		}
		if !cut.IsZero() && time.Since(cut) > h.cfg.Grace {
			h.st.Abandoned++
			h.tracef("%s: still blocked %v after the power cut: engine abandoned", what, h.cfg.Grace)
			return errAbandoned
		}
		if time.Since(start) > h.cfg.StepTimeout {
			return fmt.Errorf("%s hung: no return after %v with the device up", what, h.cfg.StepTimeout)
		}
	}
}

// run checks points crash points on a freshly formatted device.
func (h *harness) run(points int) error {
	h.point = 1
	h.tracef("run seed %d: device %d bytes, %d-byte sectors, %d objects of at most %d bytes, writes up to %d, cache %d",
		h.seed, h.cfg.DeviceSize, h.cfg.SectorSize, h.cfg.Objects, h.cfg.MaxObjectSize, h.cfg.MaxWrite, h.cfg.CacheSize)
	meta := h.cfg.MetadataSize
	if meta == 0 && h.rng.IntN(2) == 0 {
		meta = int64(32<<10) << h.rng.IntN(4)
	}
	h.tracef("format: metadata size %d (0: the engine's default)", meta)
	h.dev = engine.NewFaultDevice(h.cfg.DeviceSize, h.cfg.SectorSize)
	if err := engine.Format(h.dev, engine.FormatOptions{MetadataSize: meta}); err != nil {
		return fmt.Errorf("format: %w", err)
	}
	if err := h.open(); err != nil {
		return fmt.Errorf("open after format: %w", err)
	}
	for h.cuts < points {
		if err := h.ctx.Err(); err != nil {
			h.retire()
			return ctxErr{err}
		}
		var err error
		if h.rng.IntN(6) == 0 {
			err = h.closeCycle()
		} else {
			err = h.workloadCycle()
		}
		if err == nil {
			err = h.recover()
		}
		if err != nil {
			return err
		}
		if h.cfg.Progress != nil {
			h.cfg.Progress(*h.st)
		}
		h.point = h.cuts + 1
	}
	// A clean Close keeps everything: reopen and compare exactly. A
	// failure here belongs to the last crash point, so that replaying
	// that many points ends with this same Close.
	h.point = h.cuts
	h.tracef("final Close")
	h.engineStats()
	if err := h.call("final Close", h.e.Close); err != nil {
		return fmt.Errorf("final Close: %w", err)
	}
	h.e = nil
	h.syncAll()
	h.dev.Crash()
	nd, _ := h.dev.Reboot(h.rng, true)
	h.dev = nd
	if h.cfg.Check != nil {
		if err := h.cfg.Check(h.dev); err != nil {
			return fmt.Errorf("consistency check after the final Close: %w", err)
		}
	}
	if err := h.open(); err != nil {
		return fmt.Errorf("open after the final Close: %w", err)
	}
	if err := h.verify(); err != nil {
		return fmt.Errorf("after the final Close: %w", err)
	}
	h.engineStats()
	if err := h.call("Close", h.e.Close); err != nil {
		return fmt.Errorf("Close: %w", err)
	}
	h.e = nil
	return nil
}

// engineStats adds the engine's metadata counters to the run's, before
// its Close (so Close's own checkpoint is not counted).
func (h *harness) engineStats() {
	e := h.e
	var es engine.Stats
	if h.call("Stats", func() error { es = e.Stats(); return nil }) == nil {
		h.st.Checkpoints += es.Checkpoints
		h.st.Commits += es.Commits
	}
}

func (h *harness) open() error {
	var dev engine.Device = h.dev
	if h.cfg.Wrap != nil {
		dev = h.cfg.Wrap(h.dev)
	}
	var e *engine.Engine
	err := h.call("Open", func() error {
		var err error
		e, err = engine.Open(dev, engine.Options{CacheSize: h.cfg.CacheSize})
		return err
	})
	if err != nil {
		return err
	}
	h.e = e
	clear(h.objs)
	return nil
}

// retire closes an engine whose device is gone (or abandons it).
func (h *harness) retire() {
	if h.e == nil {
		return
	}
	if !h.dev.Crashed() {
		h.dev.Crash()
	}
	h.engineStats()
	e := h.e
	h.e = nil
	clear(h.objs)
	_ = h.call("Close after the power cut", e.Close)
}

func (h *harness) cut(how string) {
	h.cuts++
	h.st.Points++
	h.point = h.cuts
	h.tracef("power cut %s (device op %d)", how, h.dev.Mutations())
}

// workloadCycle runs random steps with a power cut armed somewhere among
// their device operations (or after the last one).
func (h *harness) workloadCycle() error {
	steps := 1 + h.rng.IntN(2*h.cfg.Steps)
	// Device operations per step vary widely (a Sync makes several, most
	// writes none): aiming a little short of the mean puts most cuts
	// inside the steps rather than after them.
	budget := int64(0.8*h.opsPerStep*float64(steps)) + 1
	n := h.rng.Int64N(budget + 1)
	m0 := h.dev.Mutations()
	h.dev.CrashAfter(n)
	h.tracef("workload: %d steps, power cut armed after %d more device writes/flushes", steps, n)
	i := 0
	for ; i < steps && !h.dev.Crashed(); i++ {
		stop, err := h.step()
		if err != nil {
			return err
		}
		if stop {
			break
		}
	}
	if !h.dev.Crashed() {
		h.opsPerStep = ema(h.opsPerStep, float64(h.dev.Mutations()-m0)/float64(steps))
		h.dev.Crash()
		h.cut("after the last step")
	} else {
		h.cut(fmt.Sprintf("during step %d of %d", i+1, steps))
	}
	h.st.WorkloadCrashes++
	h.retire()
	return nil
}

// closeCycle runs a few steps, then Close with a power cut armed among its
// device operations; a Close that completes is a clean shutdown, after
// which everything must be there.
func (h *harness) closeCycle() error {
	steps := 1 + h.rng.IntN(h.cfg.Steps)
	h.dev.CrashAfter(-1)
	h.tracef("close: %d steps first", steps)
	for range steps {
		if _, err := h.step(); err != nil {
			return err
		}
	}
	n := h.rng.Int64N(int64(h.closeOps*1.5) + 2)
	m0 := h.dev.Mutations()
	h.dev.CrashAfter(n)
	h.tracef("Close, power cut armed after %d device writes/flushes", n)
	h.engineStats()
	e := h.e
	h.e = nil
	clear(h.objs)
	err := h.call("Close", e.Close)
	if h.dev.Crashed() {
		h.cut("during Close")
		h.st.CloseCrashes++
		return nil
	}
	if err != nil {
		return fmt.Errorf("Close: %w", err)
	}
	h.closeOps = ema(h.closeOps, float64(h.dev.Mutations()-m0))
	h.syncAll()
	h.dev.Crash()
	h.cut("after a clean Close")
	h.st.CleanCloses++
	return nil
}

// recover reboots the device, checks it, reopens it (perhaps cutting the
// power again inside Open) and verifies the promises.
func (h *harness) recover() error {
	for {
		tear := h.rng.IntN(4) != 0
		nd, rs := h.dev.Reboot(h.rng, tear)
		h.dev = nd
		h.st.Volatile += int64(rs.Pending)
		h.st.Kept += int64(rs.Kept)
		h.st.Torn += int64(rs.Torn)
		h.tracef("reboot (tear %v): of %d volatile writes %d kept, %d torn", tear, rs.Pending, rs.Kept, rs.Torn)
		if h.cfg.Check != nil {
			if err := h.cfg.Check(h.dev); err != nil {
				return fmt.Errorf("consistency check after the power cut: %w", err)
			}
		}
		armed := h.rng.IntN(3) == 0
		if armed {
			n := h.rng.Int64N(int64(h.openOps*1.5) + 2)
			h.dev.CrashAfter(n)
			h.tracef("Open, power cut armed after %d device writes/flushes", n)
		}
		err := h.open()
		if h.dev.Crashed() {
			if err == nil {
				h.retire()
			}
			h.cut("during recovery")
			h.st.RecoveryCrashes++
			continue
		}
		if err != nil {
			return fmt.Errorf("open after the power cut: %w", err)
		}
		h.dev.CrashAfter(-1)
		h.openOps = ema(h.openOps, float64(h.dev.Mutations()))
		err = h.verify()
		if errors.Is(err, errCut) {
			h.retire()
			h.cut("just after recovery")
			h.st.RecoveryCrashes++
			continue
		}
		return err
	}
}

// verify checks every name against the model and, when all pass, makes
// the recovered state the model's anchor.
func (h *harness) verify() error {
	names := h.e.Objects()
	present := make(map[string]bool, len(names))
	for _, n := range names {
		if h.slotOf(n) == nil {
			return fmt.Errorf("recovered an object %q that was never created", n)
		}
		present[n] = true
	}
	type result struct {
		s    *slot
		o    *engine.Object
		data []byte
	}
	var res []result
	for _, s := range h.slots {
		if !present[s.name] {
			if _, _, err := s.check(-1, nil); err != nil {
				return err
			}
			res = append(res, result{s: s})
			continue
		}
		var o *engine.Object
		err := h.call("Object", func() error {
			var err error
			o, err = h.e.Object(s.name)
			return err
		})
		if err != nil {
			return h.readErr(fmt.Sprintf("Object(%q)", s.name), err)
		}
		size := o.Size()
		_, data, err := s.check(size, func() ([]byte, error) {
			buf := make([]byte, size)
			if size == 0 {
				return buf, nil
			}
			var n int
			err := h.call("ReadAt", func() error {
				var err error
				n, err = o.ReadAt(buf, 0)
				return err
			})
			if err != nil && !(errors.Is(err, io.EOF) && n == len(buf)) {
				return nil, h.readErr(fmt.Sprintf("read %q (%d bytes)", s.name, size), err)
			}
			if n != len(buf) {
				return nil, fmt.Errorf("read %q: %d of its %d bytes, no error", s.name, n, size)
			}
			return buf, nil
		})
		if err != nil {
			return err
		}
		res = append(res, result{s: s, o: o, data: data})
	}
	if h.dev.Crashed() {
		// Whatever was read may predate a cut that hit the engine's own
		// writes: recover again.
		return errCut
	}
	clear(h.objs)
	var sum bytes.Buffer
	for _, r := range res {
		h.nextInc++
		r.s.recovered(h.nextInc, r.data, r.o != nil)
		if r.o != nil {
			h.objs[r.s.name] = r.o
			fmt.Fprintf(&sum, " %s=%d#%d", r.s.name, len(r.data), h.nextInc)
		}
	}
	h.tracef("verified:%s", sum.String())
	return nil
}

// readErr classifies an error met while verifying: a power cut, or a
// failure.
func (h *harness) readErr(what string, err error) error {
	if h.dev.Crashed() || errors.Is(err, errAbandoned) {
		return fmt.Errorf("%s: %w: %w", what, errCut, err)
	}
	return fmt.Errorf("%s after recovery: %w", what, err)
}

func (h *harness) slotOf(name string) *slot {
	for _, s := range h.slots {
		if s.name == name {
			return s
		}
	}
	return nil
}

func (h *harness) syncAll() {
	for _, s := range h.slots {
		s.sync()
	}
}

// outcome classifies the result of a modifying call: nil error goes on; an
// error with the power cut stops the cycle (the caller has recorded the
// call's effect in the model as possible); any other error is a failure.
func (h *harness) outcome(what string, err error) (stop bool, fail error) {
	if err == nil {
		return false, nil
	}
	if h.dev.Crashed() || errors.Is(err, errAbandoned) {
		h.tracef("  %s: %v (power cut)", what, err)
		return true, nil
	}
	return true, fmt.Errorf("%s: unexpected error with the device up: %w", what, err)
}

// step runs one random operation. stop reports that the power was cut.
func (h *harness) step() (stop bool, err error) {
	h.st.Steps++
	s := h.slots[h.rng.IntN(len(h.slots))]
	r := h.rng.IntN(100)
	if r >= 94 {
		return h.engineSync()
	}
	if s.cur == nil {
		return h.create(s)
	}
	switch {
	case r < 45:
		return h.write(s)
	case r < 53:
		return h.read(s)
	case r < 60:
		return h.truncate(s)
	case r < 67:
		return h.punch(s)
	case r < 72:
		return h.remove(s)
	default:
		return h.objectSync(s)
	}
}

func (h *harness) create(s *slot) (bool, error) {
	h.nextInc++
	in := &incarnation{id: h.nextInc}
	h.tracef("create %s #%d", s.name, in.id)
	var o *engine.Object
	err := h.call("Create", func() error {
		var err error
		o, err = h.e.Create(s.name)
		return err
	})
	if refused(err) && !h.dev.Crashed() {
		h.st.NoSpace++
		h.tracef("  no space: nothing changed")
		return false, nil
	}
	stop, fail := h.outcome("create "+s.name, err)
	if fail != nil {
		return true, fail
	}
	s.create(in)
	if !stop {
		h.objs[s.name] = o
	}
	return stop, nil
}

// refused reports an error by which the engine refused a change for lack
// of space, promising that nothing changed.
func refused(err error) bool {
	return errors.Is(err, engine.ErrNoSpace) || errors.Is(err, engine.ErrMetadataFull)
}

func (h *harness) writeLen() int64 {
	var n int64
	switch r := h.rng.IntN(100); {
	case r < 35:
		n = 1 + h.rng.Int64N(512)
	case r < 70:
		n = 1 + h.rng.Int64N(16<<10)
	case r < 92:
		n = 1 + h.rng.Int64N(128<<10)
	default:
		n = 1 + h.rng.Int64N(h.cfg.MaxWrite)
	}
	return min(n, h.cfg.MaxWrite)
}

func (h *harness) write(s *slot) (bool, error) {
	in := s.cur
	maxObj := h.cfg.MaxObjectSize
	n := h.writeLen()
	size := int64(len(in.cur))
	if h.cfg.Dense && h.rng.IntN(2) == 0 {
		// Large writes that keep objects dense, so the device fills up.
		n = max(1, h.cfg.MaxWrite/2+h.rng.Int64N(h.cfg.MaxWrite/2+1))
	}
	var off int64
	switch r := h.rng.IntN(100); {
	case (r < 25 || h.cfg.Dense && r < 60) && size+n <= maxObj: // append
		off = size
	case r < 40 && size > 0: // around the end
		off = max(0, size-h.rng.Int64N(min(size, 8192)+1))
	default:
		off = h.rng.Int64N(maxObj - n + 1)
	}
	if h.rng.IntN(3) == 0 && h.cfg.MaxWrite >= 4096 { // block-aligned
		n = max(4096, n&^4095)
		off &^= 4095
	}
	off = min(off, maxObj-n)
	h.gen++
	key := writeKey(in.id, h.gen)
	p := make([]byte, n)
	fillPattern(p, key, off)
	h.tracef("write %s #%d [%d,%d) %d bytes, key %#x", s.name, in.id, off, off+n, n, key)
	o := h.objs[s.name]
	var wn int
	err := h.call("WriteAt", func() error {
		var err error
		wn, err = o.WriteAt(p, off)
		return err
	})
	if refused(err) && wn == 0 && !h.dev.Crashed() {
		h.st.NoSpace++
		h.tracef("  no space: nothing written")
		return false, nil
	}
	if err == nil && wn != len(p) {
		return true, fmt.Errorf("write %s: %d of %d bytes and no error", s.name, wn, len(p))
	}
	stop, fail := h.outcome("write "+s.name, err)
	if fail != nil {
		return true, fail
	}
	in.write(off, p, key)
	h.st.BytesWritten += n
	return stop, nil
}

// read checks a live read against the model exactly.
func (h *harness) read(s *slot) (bool, error) {
	cur := s.cur.cur
	size := int64(len(cur))
	off := h.rng.Int64N(size + 1024)
	n := 1 + h.rng.Int64N(256<<10)
	o := h.objs[s.name]
	buf := make([]byte, n)
	var rn int
	var osize int64
	err := h.call("ReadAt", func() error {
		var err error
		osize = o.Size()
		rn, err = o.ReadAt(buf, off)
		return err
	})
	if err != nil && !errors.Is(err, io.EOF) {
		return h.outcome(fmt.Sprintf("read %s [%d,%d)", s.name, off, off+n), err)
	}
	want := cur[min(off, size):min(off+n, size)]
	switch {
	case osize != size:
		return true, fmt.Errorf("live object %s has size %d, want %d", s.name, osize, size)
	case rn != len(want) || (rn < len(buf) && err == nil):
		return true, fmt.Errorf("live read %s [%d,%d) of size %d: %d bytes, %v; want %d bytes", s.name, off, off+n, size, rn, err, len(want))
	case !bytes.Equal(buf[:rn], want):
		i := 0
		for buf[i] == want[i] {
			i++
		}
		return true, fmt.Errorf("live read %s [%d,%d): byte %d is %#02x, want %#02x", s.name, off, off+n, off+int64(i), buf[i], want[i])
	}
	return h.dev.Crashed(), nil
}

func (h *harness) truncate(s *slot) (bool, error) {
	in := s.cur
	size := int64(len(in.cur))
	var ns int64
	if h.rng.IntN(2) == 0 {
		ns = h.rng.Int64N(size + 1)
	} else {
		ns = size + h.rng.Int64N(h.cfg.MaxObjectSize-size+1)
	}
	h.tracef("truncate %s #%d %d -> %d", s.name, in.id, size, ns)
	o := h.objs[s.name]
	err := h.call("Truncate", func() error { return o.Truncate(ns) })
	if refused(err) && !h.dev.Crashed() {
		h.st.NoSpace++
		h.tracef("  no space: nothing changed")
		return false, nil
	}
	stop, fail := h.outcome("truncate "+s.name, err)
	if fail != nil {
		return true, fail
	}
	in.truncate(ns)
	return stop, nil
}

func (h *harness) punch(s *slot) (bool, error) {
	in := s.cur
	size := int64(len(in.cur))
	off := h.rng.Int64N(size + 1)
	n := h.rng.Int64N(min(size-off, 512<<10) + 8192)
	if h.rng.IntN(3) == 0 {
		off &^= 4095
		n = (n + 4095) &^ 4095
	}
	h.tracef("punch %s #%d [%d,%d)", s.name, in.id, off, off+n)
	o := h.objs[s.name]
	err := h.call("PunchHole", func() error { return o.PunchHole(off, n) })
	if refused(err) && !h.dev.Crashed() {
		h.st.NoSpace++
		h.tracef("  no space: nothing changed")
		return false, nil
	}
	stop, fail := h.outcome("punch "+s.name, err)
	if fail != nil {
		return true, fail
	}
	in.punch(off, n)
	return stop, nil
}

func (h *harness) remove(s *slot) (bool, error) {
	h.tracef("remove %s #%d", s.name, s.cur.id)
	err := h.call("Remove", func() error { return h.e.Remove(s.name) })
	if errors.Is(err, fs.ErrNotExist) && !h.dev.Crashed() {
		return true, fmt.Errorf("remove %s: %w, but it was created and not removed since", s.name, err)
	}
	stop, fail := h.outcome("remove "+s.name, err)
	if fail != nil {
		return true, fail
	}
	s.remove()
	delete(h.objs, s.name)
	return stop, nil
}

func (h *harness) objectSync(s *slot) (bool, error) {
	h.tracef("sync %s #%d (size %d)", s.name, s.cur.id, len(s.cur.cur))
	o := h.objs[s.name]
	err := h.call("Object.Sync", o.Sync)
	stop, fail := h.outcome("sync "+s.name, err)
	if fail != nil || stop {
		return true, fail
	}
	s.sync()
	h.st.Syncs++
	return false, nil
}

func (h *harness) engineSync() (bool, error) {
	h.tracef("engine sync")
	err := h.call("Engine.Sync", h.e.Sync)
	stop, fail := h.outcome("engine sync", err)
	if fail != nil || stop {
		return true, fail
	}
	h.syncAll()
	h.st.Syncs++
	return false, nil
}

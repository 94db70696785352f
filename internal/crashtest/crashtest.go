// Package crashtest is rawblock's crash harness. It runs random workloads
// (Create, WriteAt aligned and unaligned, Truncate, PunchHole, Remove,
// Object.Sync, Engine.Sync, verified reads) over a few objects of an engine
// on an engine.FaultDevice, cuts the power at a random device operation —
// during the workload, during recovery, during Close — reboots the device
// with a random subset of its volatile writes, reordered and torn at sector
// granularity, reopens it and checks the durability promises against a
// model:
//
//  1. every object whose Sync returned nil exists with at least that state:
//     each byte is the synced value or a value written later, and the size
//     is the synced size or one the object had since;
//  2. no byte reads as data never written to that object at that offset
//     (every written byte encodes object, generation and offset);
//  3. an object removed and synced stays removed;
//  4. the device passes the consistency check (Config.Check, fsck) after
//     every crash.
//
// The engine tests and `bench crash` both run it.
package crashtest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/rawblock/rawblock/engine"
)

// Config parameterizes Run. Zero fields take the defaults named.
type Config struct {
	// Seed is the seed of the first run; run i uses Seed+i. The same seed
	// replays the same workload and the same crash decisions, though the
	// engine's background writeback may order device writes differently.
	Seed uint64
	// Points is how many crash points to check (≥ 1).
	Points int
	// PointsPerRun is how many crash points one run (one formatted device)
	// goes through before the next starts afresh; default 20.
	PointsPerRun int
	// DeviceSize is the fault device's size; default 32 MiB.
	DeviceSize int64
	// SectorSize is the device's logical block size, the unit of tearing:
	// 512 (default) or 4096.
	SectorSize int
	// Objects is the number of object names in play, 1..64; default 6.
	Objects int
	// MaxObjectSize bounds every object's size; default 1 MiB. Objects ×
	// MaxObjectSize may exceed the device's data space (up to 4 × the
	// device): the device then fills up, writes are refused with
	// ErrNoSpace (which must change nothing), and freed blocks are reused
	// at once.
	MaxObjectSize int64
	// MaxWrite bounds one WriteAt; default 1 MiB (and ≤ MaxObjectSize).
	MaxWrite int64
	// Dense makes half the writes large (MaxWrite/2..MaxWrite) and most of
	// them appends, so objects have few holes and, with Objects ×
	// MaxObjectSize beyond the device, the device fills up.
	Dense bool
	// CacheSize is the engine's page cache; default 4 MiB, so writeback
	// also happens on its own.
	CacheSize int64
	// MetadataSize is FormatOptions.MetadataSize (journal and checkpoints).
	// 0: each run picks the engine's default or, half the time, a small
	// region of 32 to 256 KiB, so that the journal fills and checkpoints
	// (and power cuts during them) happen often.
	MetadataSize int64
	// Steps is the mean number of workload operations between crashes;
	// default 12.
	Steps int
	// Check, if set, checks a rebooted device before it is reopened
	// (Fsck: engine.Check); an error is a broken promise.
	Check func(engine.Device) error
	// Wrap, if set, wraps the device the engine opens (tests use it to
	// break the device's promises and see the harness notice).
	Wrap func(*engine.FaultDevice) engine.Device
	// Progress, if set, is called after every checked crash point.
	Progress func(Stats)
	// StepTimeout is how long one engine call may take before the run
	// fails as hung; default 2 minutes.
	StepTimeout time.Duration
	// Grace is how long a call still blocked after the power cut is waited
	// for before it, and its engine, are abandoned; default 1 s.
	Grace time.Duration
}

// Limits of Config.
const (
	maxObjects   = 64
	maxSteps     = 10000
	minCacheSize = 4 << 20
)

func (c *Config) setDefaults() error {
	def := func(p *int64, v int64) {
		if *p == 0 {
			*p = v
		}
	}
	if c.PointsPerRun == 0 {
		c.PointsPerRun = 20
	}
	if c.SectorSize == 0 {
		c.SectorSize = 512
	}
	if c.Objects == 0 {
		c.Objects = 6
	}
	if c.Steps == 0 {
		c.Steps = 12
	}
	def(&c.DeviceSize, 32<<20)
	def(&c.MaxObjectSize, 1<<20)
	def(&c.MaxWrite, min(1<<20, c.MaxObjectSize))
	def(&c.CacheSize, minCacheSize)
	if c.StepTimeout == 0 {
		c.StepTimeout = 2 * time.Minute
	}
	if c.Grace == 0 {
		c.Grace = time.Second
	}
	bad := func(format string, args ...any) error {
		return fmt.Errorf("crashtest: %s: %w", fmt.Sprintf(format, args...), fs.ErrInvalid)
	}
	switch {
	case c.Points < 1:
		return bad("Points %d: want ≥ 1", c.Points)
	case c.PointsPerRun < 1:
		return bad("PointsPerRun %d: want ≥ 1", c.PointsPerRun)
	case c.SectorSize != 512 && c.SectorSize != 4096:
		return bad("SectorSize %d: want 512 or 4096", c.SectorSize)
	case c.DeviceSize < engine.MinDeviceSize || c.DeviceSize%int64(c.SectorSize) != 0:
		return bad("DeviceSize %d: want a multiple of the sector size, at least %d", c.DeviceSize, engine.MinDeviceSize)
	case c.Objects < 1 || c.Objects > maxObjects:
		return bad("Objects %d: want 1..%d", c.Objects, maxObjects)
	case c.MaxObjectSize < 4096 || c.MaxObjectSize > 4*c.DeviceSize/int64(c.Objects):
		return bad("MaxObjectSize %d: want ≥ 4096, and Objects × MaxObjectSize at most 4 × the device size %d", c.MaxObjectSize, c.DeviceSize)
	case c.MaxWrite < 1 || c.MaxWrite > c.MaxObjectSize:
		return bad("MaxWrite %d: want 1..MaxObjectSize (%d)", c.MaxWrite, c.MaxObjectSize)
	case c.CacheSize < minCacheSize:
		return bad("CacheSize %d: want ≥ %d", c.CacheSize, minCacheSize)
	case c.Steps < 1 || c.Steps > maxSteps:
		return bad("Steps %d: want 1..%d", c.Steps, maxSteps)
	case c.MetadataSize < 0:
		return bad("MetadataSize %d: want ≥ 0", c.MetadataSize)
	case c.StepTimeout < 0 || c.Grace < 0:
		return bad("negative StepTimeout or Grace")
	}
	return nil
}

// Stats counts what Run did.
type Stats struct {
	Points          int // crash points checked (each followed by a verified recovery, or by another crash during it)
	Runs            int // formatted devices
	WorkloadCrashes int // power cuts during the workload
	RecoveryCrashes int // power cuts inside Open, or just after it
	CloseCrashes    int // power cuts inside Close
	CleanCloses     int // Close calls that completed (then verified after a reopen)
	Steps           int64
	Syncs           int64 // Object.Sync and Engine.Sync calls that returned nil
	BytesWritten    int64
	Volatile        int64  // writes volatile at the power cuts
	Kept            int64  // of those, persisted wholly or in part
	Torn            int64  // of the kept ones, persisted in part
	NoSpace         int64  // changes refused with ErrNoSpace or ErrMetadataFull (nothing changed)
	Checkpoints     uint64 // checkpoints the engines completed during workloads (engine.Stats; not Close's)
	Commits         uint64 // metadata commits the engines completed
	Abandoned       int    // engines left behind with a call blocked after a power cut
	Elapsed         time.Duration
}

func (s Stats) String() string {
	return fmt.Sprintf("%d crash points (%d workload, %d recovery, %d close; %d clean closes) in %d runs, %v: %d steps, %d syncs, %d MiB written; %d commits, %d checkpoints; at the cuts %d volatile writes, %d kept, %d torn; %d refused for space, %d engines abandoned",
		s.Points, s.WorkloadCrashes, s.RecoveryCrashes, s.CloseCrashes, s.CleanCloses, s.Runs, s.Elapsed.Round(time.Millisecond),
		s.Steps, s.Syncs, s.BytesWritten>>20, s.Commits, s.Checkpoints, s.Volatile, s.Kept, s.Torn, s.NoSpace, s.Abandoned)
}

// Failure is a broken promise (or an engine error the workload did not
// expect). Run with Seed = Failure.Seed and Points = Failure.Point replays
// its run up to it.
type Failure struct {
	Seed  uint64   // the run's seed
	Point int      // the crash point, counted from 1 within the run, at which it failed
	Err   error    // what broke
	Trace []string // the run's operations, oldest first (the tail if long)
}

// traceTail bounds the trace a Failure keeps.
const traceTail = 400

func (f *Failure) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "crashtest: run seed %d, crash point %d: %v\n", f.Seed, f.Point, f.Err)
	fmt.Fprintf(&b, "replay: Seed %d, Points %d (bench crash --seed %d --points %d)\ntrace:\n", f.Seed, f.Point, f.Seed, f.Point)
	for _, l := range f.Trace {
		b.WriteString("  ")
		b.WriteString(l)
		b.WriteByte('\n')
	}
	return b.String()
}

func (f *Failure) Unwrap() error { return f.Err }

// Run runs crash points until cfg.Points are checked, the first failure,
// or ctx ends. A broken promise is returned as a *Failure; a bad Config as
// an error wrapping fs.ErrInvalid; a cancelled ctx as ctx.Err(). The Stats
// count what was done either way.
func Run(ctx context.Context, cfg Config) (st Stats, err error) {
	if err := cfg.setDefaults(); err != nil {
		return st, err
	}
	start := time.Now()
	defer func() { st.Elapsed = time.Since(start) }()
	for run := uint64(0); st.Points < cfg.Points; run++ {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		h := newHarness(ctx, &cfg, cfg.Seed+run, &st, start)
		st.Runs++
		if err := h.run(min(cfg.PointsPerRun, cfg.Points-st.Points)); err != nil {
			h.retire()
			var ce ctxErr
			if errors.As(err, &ce) {
				return st, ce.err
			}
			return st, &Failure{Seed: h.seed, Point: h.point, Err: err, Trace: h.traceTail()}
		}
	}
	return st, nil
}

// Fsck is promise 4 as a Config.Check: engine.Check, with every problem
// its report lists in the error.
func Fsck(dev engine.Device) error {
	r, err := engine.Check(dev)
	if err != nil && len(r.Problems) > 0 {
		return fmt.Errorf("%w (problems: %s)", err, strings.Join(r.Problems, "; "))
	}
	return err
}

// ctxErr carries a cancellation out of a run, so it is not taken for a
// broken promise.
type ctxErr struct{ err error }

func (c ctxErr) Error() string { return c.err.Error() }

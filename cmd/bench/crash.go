package main

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/rawblock/rawblock/engine"
	"github.com/rawblock/rawblock/internal/crashtest"
)

// crashCmd is `bench crash`: the engine tests' crash harness, run for as
// many crash points as asked. Each power cut lands on a random device
// operation of an in-memory fault device — during a workload, Close or
// recovery — which then loses, reorders and tears its unflushed writes;
// the engine is reopened and every durability promise checked.
type crashCmd struct {
	Points       int      `default:"10000" help:"Crash points to check (≥ 1)."`
	Seed         int64    `default:"-1" help:"Seed of the first run (run i uses seed+i); -1 picks one at random. A failure prints the seed and points that replay it."`
	DeviceSize   byteSize `name:"device-size" default:"32M" help:"Size of the in-memory fault device (at least 16M)."`
	Sector       int      `default:"512" help:"The device's logical sector size, the unit of torn writes: 512 or 4096."`
	Objects      int      `default:"6" help:"Object names in play (1..64)."`
	MaxObject    byteSize `name:"max-object" default:"1M" help:"Largest object size (objects × max-object ≤ 4 × the device; past the device's size, it fills up and freed space is reused at once)."`
	MaxWrite     byteSize `name:"max-write" default:"1M" help:"Largest single write (≤ max-object)."`
	Dense        bool     `help:"Large writes, mostly appends: objects stay dense and, with objects × max-object beyond the device, it fills up."`
	Cache        byteSize `default:"4M" help:"Engine page cache (at least 4M; small, so writeback also runs on its own)."`
	Metadata     byteSize `name:"metadata-size" default:"0" help:"Journal and checkpoint region at format; 0: each run picks the engine's default or, half the time, 32K to 256K so that checkpoints happen often."`
	Steps        int      `default:"12" help:"Mean workload operations between power cuts (1..10000)."`
	PointsPerRun int      `name:"points-per-run" default:"20" help:"Crash points per formatted device before the next run starts afresh."`
	NoFsck       bool     `name:"no-fsck" help:"Skip engine.Check of the device after every power cut."`
	Quiet        bool     `help:"No progress lines."`

	// wrap, set by tests, wraps the device the engine opens.
	wrap func(*engine.FaultDevice) engine.Device
}

// progressEvery is how often a progress line is printed.
const progressEvery = 2 * time.Second

// Run implements the command.
func (c *crashCmd) Run(env *appEnv) error {
	if c.Seed < -1 {
		return fmt.Errorf("%w: --seed %d: want ≥ 0, or -1 for a random seed", errBadFlag, c.Seed)
	}
	seed := uint64(c.Seed)
	if c.Seed == -1 {
		seed = rand.Uint64() >> 1
	}
	cfg := crashtest.Config{
		Seed:          seed,
		Points:        c.Points,
		PointsPerRun:  c.PointsPerRun,
		DeviceSize:    int64(c.DeviceSize),
		SectorSize:    c.Sector,
		Objects:       c.Objects,
		MaxObjectSize: int64(c.MaxObject),
		MaxWrite:      int64(c.MaxWrite),
		CacheSize:     int64(c.Cache),
		MetadataSize:  int64(c.Metadata),
		Dense:         c.Dense,
		Steps:         c.Steps,
		Wrap:          c.wrap,
	}
	// Zero would mean "the default" to the harness; here every flag has
	// its default already, so a zero is a user's mistake.
	if c.Points < 1 || c.PointsPerRun < 1 || c.Objects < 1 || c.Steps < 1 || c.Sector == 0 ||
		c.DeviceSize == 0 || c.MaxObject == 0 || c.MaxWrite == 0 || c.Cache == 0 {
		return fmt.Errorf("%w: --points, --points-per-run, --objects, --steps, --sector and the sizes must be positive", errBadFlag)
	}
	if !c.NoFsck {
		cfg.Check = crashtest.Fsck
	}
	env.printf("crash: seed %d, %d points, %d per run; device %s with %d-byte sectors, %d objects up to %s, writes up to %s, cache %s\n",
		seed, c.Points, c.PointsPerRun, formatSize(int64(c.DeviceSize)), c.Sector, c.Objects,
		formatSize(int64(c.MaxObject)), formatSize(int64(c.MaxWrite)), formatSize(int64(c.Cache)))
	start := time.Now()
	last := start
	if !c.Quiet {
		cfg.Progress = func(st crashtest.Stats) {
			if now := time.Now(); now.Sub(last) >= progressEvery {
				last = now
				el := now.Sub(start).Seconds()
				env.printf("  %d/%d points, %d runs, %.0f points/s\n", st.Points, c.Points, st.Runs, float64(st.Points)/el)
			}
		}
	}
	st, err := crashtest.Run(env.ctx, cfg)
	if st.Runs > 0 {
		env.printf("%v\nseeds %d..%d\n", st, seed, seed+uint64(st.Runs)-1)
	}
	var f *crashtest.Failure
	switch {
	case errors.As(err, &f):
		env.printf("FAILED\n%s", f.Error())
		return fmt.Errorf("a durability promise broke at crash point %d of run seed %d: replay with bench crash --seed %d --points %d (same size flags)",
			f.Point, f.Seed, f.Seed, f.Point)
	case err != nil && env.ctx.Err() != nil:
		return fmt.Errorf("interrupted after %d crash points in %v: %w", st.Points, time.Since(start).Round(time.Millisecond), err)
	case err != nil:
		return err
	}
	env.printf("ok: %d crash points, no promise broken\n", st.Points)
	return nil
}

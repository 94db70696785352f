package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"

	"github.com/rawblock/rawblock/engine"
	"github.com/rawblock/rawblock/iouring"
)

// Targets of the durability figures (issue 5).
const (
	targetSyncRatio     = 1.5 // Object.Sync p50 with many objects ÷ with few
	targetConcRatio     = 4.0 // concurrent Syncs ÷ serialized Syncs, ops/s
	targetJournalBlocks = 2.0 // journal blocks per 4 KiB write + Sync
	targetRecovery      = 1.0 // seconds for Open after a crash
)

// Limits of `bench durability`; each is checked before the device is
// touched.
const (
	durWriteSize     = 4096 // every measured write is one 4 KiB write
	maxDurObjects    = 1_000_000
	maxDurRounds     = 1_000_000
	maxDurJobs       = 1024
	maxDurRuntime    = time.Hour
	maxDurFillBatch  = 4096
	maxDurVerify     = 1_000_000
	durWarmupRounds  = 20
	maxFillFraction  = 0.5 // the engine checkpoints (and empties the journal) past half
	durMinObjectSize = durWriteSize
)

// durabilityCmd is `bench durability`: the figures of the durability issue,
// each as a table row beside its target.
type durabilityCmd struct {
	Device     string        `arg:"" placeholder:"DEVICE" help:"Device or file to measure on. It is formatted several times: everything on it is lost."`
	Measure    []string      `default:"sync,concurrent,recovery" enum:"sync,concurrent,recovery" help:"Measures to run, comma separated: sync (Object.Sync latency, few vs many objects, and journal blocks per Sync), concurrent (concurrent vs serialized Syncs), recovery (Open after a crash with a full journal)."`
	Objects    int           `default:"100000" help:"Objects in the many-objects Sync latency run and in the recovery run (1..1000000)."`
	FewObjects int           `name:"few-objects" default:"10" help:"Objects in the few-objects Sync latency run (below --objects)."`
	Rounds     int           `default:"400" help:"Measured write + Object.Sync rounds per Sync latency run (1..1000000)."`
	Jobs       int           `default:"16" help:"Goroutines of the concurrent measure, each writing its own object (1..1024)."`
	Runtime    time.Duration `default:"10s" help:"Length of each concurrent run."`
	ObjectSize byteSize      `name:"object-size" default:"64M" help:"Each concurrent job writes 4 KiB at random offsets below this (fio's --size)."`
	Fill       float64       `default:"0.45" help:"Recovery: fill the journal to this fraction of its size before the crash (the engine checkpoints past 0.5)."`
	FillJobs   int           `name:"fill-jobs" default:"16" help:"Recovery: goroutines filling the journal, each with write + Sync on its own objects."`
	FillBatch  int           `name:"fill-batch" default:"1" help:"Recovery: writes per Sync while filling (1: write + Object.Sync; more: that many writes, then Engine.Sync)."`
	Verify     int           `default:"1000" help:"Recovery: earlier writes checked at random after the crash, besides each job's last Sync and every object's size."`
	Cache      byteSize      `default:"256M" help:"Engine page cache size."`
	IO         string        `name:"io" enum:"auto,io_uring,psync" default:"auto" help:"I/O engine: ${enum}."`
	Force      bool          `help:"Format even a block device that holds a file system or other signature."`
	JSON       bool          `name:"json" help:"Print one JSON object instead of text."`
	Quiet      bool          `help:"No progress lines on stderr."`
	CPUProf    string        `name:"cpuprofile" type:"path" placeholder:"FILE" help:"Write a Go CPU profile of this process (not the crash child) to FILE."`
}

// durSpec is what the measures need from the command line.
type durSpec struct {
	path            string
	mode            iouring.Mode
	io              string
	objects, few    int
	rounds          int
	jobs            int
	runtime         time.Duration
	objectSize      int64
	fill            float64
	fillJobs, batch int
	verify          int
	cache           int64
	quiet           bool
}

func (s *durSpec) validate() error {
	switch {
	case s.objects < 1 || s.objects > maxDurObjects:
		return fmt.Errorf("%w: --objects %d: want 1..%d", errBadFlag, s.objects, maxDurObjects)
	case s.few < 1 || s.few >= s.objects:
		return fmt.Errorf("%w: --few-objects %d: want 1..%d (below --objects)", errBadFlag, s.few, s.objects-1)
	case s.rounds < 1 || s.rounds > maxDurRounds:
		return fmt.Errorf("%w: --rounds %d: want 1..%d", errBadFlag, s.rounds, maxDurRounds)
	case s.jobs < 1 || s.jobs > maxDurJobs:
		return fmt.Errorf("%w: --jobs %d: want 1..%d", errBadFlag, s.jobs, maxDurJobs)
	case s.runtime <= 0 || s.runtime > maxDurRuntime:
		return fmt.Errorf("%w: --runtime %s: want > 0 and at most %s", errBadFlag, s.runtime, maxDurRuntime)
	case s.objectSize < durMinObjectSize || s.objectSize > engine.MaxObjectSize:
		return fmt.Errorf("%w: --object-size %d: want %d..%d bytes", errBadFlag, s.objectSize, durMinObjectSize, engine.MaxObjectSize)
	case !(s.fill > 0 && s.fill < maxFillFraction):
		return fmt.Errorf("%w: --fill %g: want above 0 and below %g (the engine checkpoints past half)", errBadFlag, s.fill, maxFillFraction)
	case s.fillJobs < 1 || s.fillJobs > maxDurJobs || s.fillJobs > s.objects:
		return fmt.Errorf("%w: --fill-jobs %d: want 1..%d and at most --objects", errBadFlag, s.fillJobs, maxDurJobs)
	case s.batch < 1 || s.batch > maxDurFillBatch:
		return fmt.Errorf("%w: --fill-batch %d: want 1..%d", errBadFlag, s.batch, maxDurFillBatch)
	case s.verify < 0 || s.verify > maxDurVerify:
		return fmt.Errorf("%w: --verify %d: want 0..%d", errBadFlag, s.verify, maxDurVerify)
	case s.cache < 4<<20:
		return fmt.Errorf("%w: --cache %d: at least 4M", errBadFlag, s.cache)
	}
	return nil
}

// progress prints a progress line on stderr unless quiet.
func (s *durSpec) progress(format string, args ...any) {
	if !s.quiet {
		fmt.Fprintf(os.Stderr, "durability: "+format+"\n", args...)
	}
}

// syncPhase is one Sync latency run: rounds of one 4 KiB append to one
// object followed by that object's Sync, with this many objects on the
// device.
type syncPhase struct {
	Objects              int            `json:"objects"`
	Rounds               int            `json:"rounds"`
	Lat                  latencySummary `json:"sync_lat_us"`
	JournalBlocksPerSync float64        `json:"journal_blocks_per_sync"`
	FlushesPerSync       float64        `json:"flushes_per_sync"`
	CommitsPerSync       float64        `json:"commits_per_sync"`
	CheckpointsDuring    uint64         `json:"checkpoints_during"`
}

// syncLatencyResult is measures a and c of the issue.
type syncLatencyResult struct {
	Few   syncPhase `json:"few"`
	Many  syncPhase `json:"many"`
	Ratio float64   `json:"ratio"` // Many.Lat.P50 / Few.Lat.P50
}

// concRun is one concurrent run.
type concRun struct {
	Jobs               int            `json:"jobs"`
	Serialized         bool           `json:"serialized"`
	Ops                int64          `json:"ops"`
	Seconds            float64        `json:"seconds"`
	OpsPerS            float64        `json:"ops_per_s"`
	Lat                latencySummary `json:"lat_us"` // write + Sync
	JournalBlocksPerOp float64        `json:"journal_blocks_per_op"`
	FlushesPerOp       float64        `json:"flushes_per_op"`
	CommitsPerOp       float64        `json:"commits_per_op"`
}

// concurrentResult is measure b of the issue.
type concurrentResult struct {
	Concurrent concRun `json:"concurrent"`
	Serialized concRun `json:"serialized"`
	Ratio      float64 `json:"ratio"` // Concurrent.OpsPerS / Serialized.OpsPerS
}

// recoveryResult is measure d of the issue.
type recoveryResult struct {
	Objects          int     `json:"objects"`
	FillJobs         int     `json:"fill_jobs"`
	FillBatch        int     `json:"fill_batch"`
	FillWrites       int64   `json:"fill_writes"`
	FillSeconds      float64 `json:"fill_seconds"`
	CrashJournalUsed int64   `json:"crash_journal_used_bytes"` // the child's last Stats before it exited
	JournalBytes     int64   `json:"journal_bytes"`
	OpenSeconds      float64 `json:"open_seconds"`
	ReplayedBytes    int64   `json:"replayed_journal_bytes"` // Stats.JournalUsedBytes right after Open
	ObjectsAfter     int     `json:"objects_after"`
	WritesVerified   int     `json:"writes_verified"`
	SizesVerified    int     `json:"sizes_verified"`
	FsckSeconds      float64 `json:"fsck_seconds"` // engine.Check after the recovered engine closed
	FsckClean        bool    `json:"fsck_clean"`
	// engine.Check of the crashed device before the Open: its time is
	// that of reading and replaying the metadata alone.
	CrashFsckSeconds     float64 `json:"crash_fsck_seconds"`
	ReplayedTransactions int     `json:"replayed_transactions"`
	ReplayStop           string  `json:"replay_stop"`
}

// durabilityRow is one line of the table.
type durabilityRow struct {
	Measure string  `json:"measure"`
	Value   float64 `json:"value"`
	Unit    string  `json:"unit"`
	Target  string  `json:"target,omitempty"`
	OK      *bool   `json:"ok,omitempty"` // nil: a figure without a target of its own
}

// durabilityResult is everything `bench durability` measured; its JSON
// field names are a stable interface used by hack/vs-durability.sh.
type durabilityResult struct {
	Device      string             `json:"device"`
	IOMode      string             `json:"io_mode"`
	BlockSize   int                `json:"block_size"`
	SyncLatency *syncLatencyResult `json:"sync_latency,omitempty"`
	Concurrent  *concurrentResult  `json:"concurrent,omitempty"`
	Recovery    *recoveryResult    `json:"recovery,omitempty"`
	Table       []durabilityRow    `json:"table"`
}

// Run implements `bench durability`.
func (c *durabilityCmd) Run(env *appEnv) error {
	mode, err := parseIOMode(c.IO)
	if err != nil {
		return err
	}
	s := durSpec{
		path: c.Device, mode: mode, io: c.IO, objects: c.Objects, few: c.FewObjects, rounds: c.Rounds,
		jobs: c.Jobs, runtime: c.Runtime, objectSize: int64(c.ObjectSize), fill: c.Fill,
		fillJobs: c.FillJobs, batch: c.FillBatch, verify: c.Verify, cache: int64(c.Cache),
		quiet: c.Quiet,
	}
	if err := s.validate(); err != nil {
		return err
	}
	want := map[string]bool{}
	for _, m := range c.Measure {
		want[m] = true
	}
	// Refuse a device holding a signature before anything is written.
	bd, err := openBenchDevice(c.Device, mode, 0)
	if err != nil {
		return err
	}
	res := durabilityResult{Device: c.Device, IOMode: string(bd.dev.IOMode()), BlockSize: bd.dev.BlockSize()}
	if err := bd.checkWritable(c.Force); err != nil {
		return errors.Join(err, bd.close())
	}
	if err := bd.close(); err != nil {
		return err
	}
	stop, err := startCPUProfile(c.CPUProf)
	if err != nil {
		return err
	}
	err = func() error {
		if want["sync"] {
			r, err := measureSyncLatency(env.ctx, &s)
			if err != nil {
				return fmt.Errorf("sync latency: %w", err)
			}
			res.SyncLatency = &r
		}
		if want["concurrent"] {
			r, err := measureConcurrent(env.ctx, &s)
			if err != nil {
				return fmt.Errorf("concurrent syncs: %w", err)
			}
			res.Concurrent = &r
		}
		if want["recovery"] {
			r, err := measureRecovery(env.ctx, &s)
			if err != nil {
				return fmt.Errorf("recovery: %w", err)
			}
			res.Recovery = &r
		}
		return nil
	}()
	if perr := stop(); perr != nil {
		err = errors.Join(err, perr)
	}
	if err != nil {
		return err
	}
	res.Table = durabilityTable(&res)
	if c.JSON {
		return writeJSON(env.stdout, res)
	}
	return printDurability(env.stdout, &res)
}

// durFormat formats dev with an engine block of 4 KiB (or the device's
// logical block, when larger) and returns that block size.
func durFormat(dev engine.Device) (int64, error) {
	bs := max(durWriteSize, dev.BlockSize())
	if err := engine.Format(dev, engine.FormatOptions{BlockSize: bs}); err != nil {
		return 0, err
	}
	return int64(bs), nil
}

// durEngine formats the device at s.path and opens an engine on it; it
// returns the engine block size and the function that closes both.
func durEngine(s *durSpec) (e *engine.Engine, bs int64, closeAll func() error, err error) {
	dev, err := engine.OpenDevice(s.path, engine.DeviceOptions{IO: s.mode})
	if err != nil {
		return nil, 0, nil, err
	}
	if bs, err = durFormat(dev); err != nil {
		return nil, 0, nil, errors.Join(err, dev.Close())
	}
	e, err = engine.Open(dev, engine.Options{CacheSize: s.cache})
	if err != nil {
		return nil, 0, nil, errors.Join(err, dev.Close())
	}
	return e, bs, func() error { return errors.Join(e.Close(), dev.Close()) }, nil
}

// createObjects creates objects objName(from) .. objName(to-1).
func createObjects(ctx context.Context, e *engine.Engine, from, to int) ([]*engine.Object, error) {
	objs := make([]*engine.Object, 0, to-from)
	for i := from; i < to; i++ {
		if i%1024 == 0 && ctx.Err() != nil {
			return nil, ctx.Err()
		}
		o, err := e.Create(objName(i))
		if err != nil {
			return nil, err
		}
		objs = append(objs, o)
	}
	return objs, nil
}

// statsDelta is the metadata counters' growth between two Stats.
type statsDelta struct{ commits, checkpoints, journalBytes, flushes uint64 }

func deltaOf(a, b engine.Stats) statsDelta {
	return statsDelta{
		commits: b.Commits - a.Commits, checkpoints: b.Checkpoints - a.Checkpoints,
		journalBytes: b.JournalBytesWritten - a.JournalBytesWritten, flushes: b.Flushes - a.Flushes,
	}
}

// measureSyncLatency runs rounds of (4 KiB append, Object.Sync) on one
// object with s.few objects on the device, then creates the rest up to
// s.objects and runs the same rounds again on the same object.
func measureSyncLatency(ctx context.Context, s *durSpec) (syncLatencyResult, error) {
	var r syncLatencyResult
	e, blockSize, closeAll, err := durEngine(s)
	if err != nil {
		return r, err
	}
	defer func() {
		if closeAll != nil {
			_ = closeAll() // an earlier error is the one reported
		}
	}()
	bs := float64(blockSize)
	objs, err := createObjects(ctx, e, 0, s.few)
	if err != nil {
		return r, err
	}
	if err := e.Sync(); err != nil {
		return r, err
	}
	o := objs[0]
	buf := make([]byte, durWriteSize)
	var off int64
	phase := func(n int) (syncPhase, error) {
		p := syncPhase{Objects: n, Rounds: s.rounds}
		h := newLatHist()
		var before engine.Stats
		for i := -durWarmupRounds; i < s.rounds; i++ {
			if ctx.Err() != nil {
				return p, ctx.Err()
			}
			if i == 0 {
				before = e.Stats()
			}
			stampBlock(buf, 0, uint64(off/durWriteSize))
			if _, err := o.WriteAt(buf, off); err != nil {
				return p, err
			}
			off += durWriteSize
			t := time.Now()
			if err := o.Sync(); err != nil {
				return p, err
			}
			if i >= 0 {
				recordLatency(h, int64(time.Since(t)))
			}
		}
		d := deltaOf(before, e.Stats())
		p.Lat = summarizeLatency(h)
		p.JournalBlocksPerSync = float64(d.journalBytes) / bs / float64(s.rounds)
		p.FlushesPerSync = float64(d.flushes) / float64(s.rounds)
		p.CommitsPerSync = float64(d.commits) / float64(s.rounds)
		p.CheckpointsDuring = d.checkpoints
		return p, nil
	}
	s.progress("Object.Sync latency with %d objects, %d rounds", s.few, s.rounds)
	if r.Few, err = phase(s.few); err != nil {
		return r, err
	}
	s.progress("creating %d more objects", s.objects-s.few)
	if _, err := createObjects(ctx, e, s.few, s.objects); err != nil {
		return r, err
	}
	if err := e.Sync(); err != nil {
		return r, err
	}
	s.progress("Object.Sync latency with %d objects, %d rounds", s.objects, s.rounds)
	if r.Many, err = phase(s.objects); err != nil {
		return r, err
	}
	if r.Few.Lat.P50 > 0 {
		r.Ratio = r.Many.Lat.P50 / r.Few.Lat.P50
	}
	err = closeAll()
	closeAll = nil
	return r, err
}

// measureConcurrent runs s.jobs goroutines, each doing 4 KiB random writes
// + Object.Sync on its own object for s.runtime, once freely and once with
// every Sync under one mutex.
func measureConcurrent(ctx context.Context, s *durSpec) (concurrentResult, error) {
	var r concurrentResult
	var err error
	s.progress("%d goroutines × (4k write + Object.Sync), %s", s.jobs, s.runtime)
	if r.Concurrent, err = concurrentRun(ctx, s, false); err != nil {
		return r, err
	}
	s.progress("the same with Syncs serialized, %s", s.runtime)
	if r.Serialized, err = concurrentRun(ctx, s, true); err != nil {
		return r, err
	}
	if r.Serialized.OpsPerS > 0 {
		r.Ratio = r.Concurrent.OpsPerS / r.Serialized.OpsPerS
	}
	return r, nil
}

func concurrentRun(ctx context.Context, s *durSpec, serialize bool) (concRun, error) {
	r := concRun{Jobs: s.jobs, Serialized: serialize}
	e, blockSize, closeAll, err := durEngine(s)
	if err != nil {
		return r, err
	}
	defer func() {
		if closeAll != nil {
			_ = closeAll() // an earlier error is the one reported
		}
	}()
	bs := float64(blockSize)
	objs, err := createObjects(ctx, e, 0, s.jobs)
	if err != nil {
		return r, err
	}
	if err := e.Sync(); err != nil {
		return r, err
	}
	blocks := s.objectSize / durWriteSize
	var syncMu sync.Mutex
	var ops atomic.Int64
	var failed atomic.Bool // one job failed: the others stop
	hists := make([]*hdrhistogram.Histogram, s.jobs)
	errs := make([]error, s.jobs)
	before := e.Stats()
	t0 := time.Now()
	deadline := t0.Add(s.runtime)
	var wg sync.WaitGroup
	for j := range s.jobs {
		hists[j] = newLatHist()
		wg.Add(1)
		go func() {
			defer wg.Done()
			o, h := objs[j], hists[j]
			buf := make([]byte, durWriteSize)
			rng := rand.New(rand.NewPCG(uint64(j)+1, 0xd0))
			for ctx.Err() == nil && !failed.Load() && time.Now().Before(deadline) {
				blk := rng.Int64N(blocks)
				stampBlock(buf, uint64(j), uint64(blk))
				t := time.Now()
				if _, err := o.WriteAt(buf, blk*durWriteSize); err != nil {
					errs[j] = err
					failed.Store(true)
					return
				}
				if serialize {
					syncMu.Lock()
				}
				err := o.Sync()
				if serialize {
					syncMu.Unlock()
				}
				if err != nil {
					errs[j] = err
					failed.Store(true)
					return
				}
				recordLatency(h, int64(time.Since(t)))
				ops.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	if err := firstError(errs); err != nil {
		return r, err
	}
	if err := ctx.Err(); err != nil {
		return r, err
	}
	d := deltaOf(before, e.Stats())
	r.Ops, r.Seconds = ops.Load(), elapsed.Seconds()
	r.OpsPerS = float64(r.Ops) / r.Seconds
	r.Lat = summarizeLatency(mergeLatency(hists))
	if r.Ops > 0 {
		r.JournalBlocksPerOp = float64(d.journalBytes) / bs / float64(r.Ops)
		r.FlushesPerOp = float64(d.flushes) / float64(r.Ops)
		r.CommitsPerOp = float64(d.commits) / float64(r.Ops)
	}
	err = closeAll()
	closeAll = nil
	return r, err
}

// firstError returns the first non-nil error of errs, noting how many more
// jobs failed: when one job fails the others usually fail the same way.
func firstError(errs []error) error {
	var first error
	n := 0
	for _, err := range errs {
		if err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	if n > 1 {
		return fmt.Errorf("%w (and %d more jobs failed)", first, n-1)
	}
	return first
}

// stampBlock fills a 4 KiB block with bytes that identify (object index,
// block index): a header carrying both, then pseudo-random bytes seeded by
// them, so a block read back after a crash is either exactly this or wrong.
func stampBlock(buf []byte, obj, blk uint64) {
	fillRandom(buf, obj<<32^blk^0x5eed)
	binary.LittleEndian.PutUint64(buf[0:], obj)
	binary.LittleEndian.PutUint64(buf[8:], blk)
}

// fillPlan is the deterministic write sequence of the recovery fill: job j
// owns objects j, j+jobs, j+2·jobs ...; its k-th write goes to the
// (k mod owned)-th of them, at block k / owned. Every (object, block) is
// written once, so what each must hold after the crash is known.
type fillPlan struct {
	objects, jobs int
}

// owned is how many objects job j owns.
func (p fillPlan) owned(j int) int64 { return int64((p.objects - j + p.jobs - 1) / p.jobs) }

// write returns the object index and block of job j's k-th write.
func (p fillPlan) write(j int, k int64) (obj int, blk int64) {
	n := p.owned(j)
	return j + int(k%n)*p.jobs, k / n
}

// blocksOf returns how many blocks object obj holds after job obj%jobs made
// n writes.
func (p fillPlan) blocksOf(obj int, n int64) int64 {
	j := obj % p.jobs
	own := p.owned(j)
	pos := int64(obj / p.jobs)
	b := n / own
	if pos < n%own {
		b++
	}
	return b
}

// fillReport is what the crash child prints (one JSON line on stdout) just
// before it exits without closing the engine.
type fillReport struct {
	Objects          int     `json:"objects"`
	Jobs             int     `json:"jobs"`
	Batch            int     `json:"batch"`
	Writes           []int64 `json:"writes"` // per job, every one synced
	Seconds          float64 `json:"seconds"`
	JournalUsedBytes int64   `json:"journal_used_bytes"`
	JournalBytes     int64   `json:"journal_bytes"`
	Checkpoints      uint64  `json:"checkpoints"`
}

// durabilityFillCmd is the hidden child of the recovery measure: it opens
// an engine on a formatted device, creates objects, fills the journal with
// small synced writes, prints a fillReport and exits at once, without
// Close: a crash after the last Sync returned.
type durabilityFillCmd struct {
	Device  string   `arg:"" placeholder:"DEVICE"`
	Objects int      `required:""`
	Fill    float64  `required:""`
	Jobs    int      `required:""`
	Batch   int      `required:""`
	Cache   byteSize `required:""`
	IO      string   `name:"io" enum:"auto,io_uring,psync" default:"auto"`
}

// crashExit ends the crash child; it is os.Exit, so that nothing after the
// last Sync (no Close, no deferred call) reaches the device.
var crashExit = os.Exit

// Run implements the hidden `bench durability-fill`.
func (c *durabilityFillCmd) Run(env *appEnv) error {
	mode, err := parseIOMode(c.IO)
	if err != nil {
		return err
	}
	s := durSpec{objects: c.Objects, fill: c.Fill, fillJobs: c.Jobs, batch: c.Batch, cache: int64(c.Cache)}
	switch {
	case s.objects < 1 || s.objects > maxDurObjects:
		return fmt.Errorf("%w: --objects %d", errBadFlag, s.objects)
	case !(s.fill > 0 && s.fill < maxFillFraction):
		return fmt.Errorf("%w: --fill %g", errBadFlag, s.fill)
	case s.fillJobs < 1 || s.fillJobs > maxDurJobs || s.fillJobs > s.objects:
		return fmt.Errorf("%w: --jobs %d", errBadFlag, s.fillJobs)
	case s.batch < 1 || s.batch > maxDurFillBatch:
		return fmt.Errorf("%w: --batch %d", errBadFlag, s.batch)
	}
	dev, err := engine.OpenDevice(c.Device, engine.DeviceOptions{IO: mode})
	if err != nil {
		return err
	}
	e, err := engine.Open(dev, engine.Options{CacheSize: s.cache})
	if err != nil {
		return errors.Join(err, dev.Close())
	}
	rep, err := fillJournal(env.ctx, e, &s)
	if err != nil {
		return errors.Join(err, e.Close(), dev.Close())
	}
	if err := writeJSON(env.stdout, rep); err != nil {
		return err
	}
	crashExit(0)
	return nil
}

// fillJournal creates s.objects objects, syncs, then runs s.fillJobs
// goroutines doing small writes + Syncs until the journal holds s.fill of
// its size. Every write it counts has been synced.
func fillJournal(ctx context.Context, e *engine.Engine, s *durSpec) (fillReport, error) {
	rep := fillReport{Objects: s.objects, Jobs: s.fillJobs, Batch: s.batch, Writes: make([]int64, s.fillJobs)}
	objs, err := createObjects(ctx, e, 0, s.objects)
	if err != nil {
		return rep, err
	}
	if err := e.Sync(); err != nil {
		return rep, err
	}
	plan := fillPlan{objects: s.objects, jobs: s.fillJobs}
	limit := int64(s.fill * float64(e.Stats().JournalBytes))
	var full atomic.Bool // the journal is full enough, or a job failed
	errs := make([]error, s.fillJobs)
	t0 := time.Now()
	var wg sync.WaitGroup
	for j := range s.fillJobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, durWriteSize)
			var k int64
			for !full.Load() {
				if ctx.Err() != nil {
					errs[j] = ctx.Err()
					full.Store(true)
					return
				}
				var last *engine.Object
				for range s.batch {
					obj, blk := plan.write(j, k)
					stampBlock(buf, uint64(obj), uint64(blk))
					last = objs[obj]
					if _, err := last.WriteAt(buf, blk*durWriteSize); err != nil {
						errs[j] = err
						full.Store(true)
						return
					}
					k++
				}
				var err error
				if s.batch == 1 {
					err = last.Sync()
				} else {
					err = e.Sync()
				}
				if err != nil {
					errs[j] = err
					full.Store(true)
					return
				}
				rep.Writes[j] = k // only synced writes count
				if e.Stats().JournalUsedBytes >= limit {
					full.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		var n int64
		for _, w := range rep.Writes {
			n += w
		}
		if errors.Is(err, engine.ErrNoSpace) {
			return rep, fmt.Errorf("the device filled up after %d synced 4 KiB writes, before the journal held %.0f%% of its size (a larger device, or a smaller --fill-batch, packs fewer writes per journal block): %w", n, s.fill*100, err)
		}
		return rep, fmt.Errorf("after %d synced writes: %w", n, err)
	}
	st := e.Stats()
	rep.Seconds = time.Since(t0).Seconds()
	rep.JournalUsedBytes, rep.JournalBytes, rep.Checkpoints = st.JournalUsedBytes, st.JournalBytes, st.Checkpoints
	return rep, nil
}

// measureRecovery formats the device, lets a child process fill the journal
// and exit without Close (a crash), then times engine.Open, checks that
// every synced write it looks at reads back, closes, and runs fsck.
func measureRecovery(ctx context.Context, s *durSpec) (recoveryResult, error) {
	r := recoveryResult{Objects: s.objects, FillJobs: s.fillJobs, FillBatch: s.batch}
	dev, err := engine.OpenDevice(s.path, engine.DeviceOptions{IO: s.mode})
	if err != nil {
		return r, err
	}
	if _, err := durFormat(dev); err != nil {
		return r, errors.Join(err, dev.Close())
	}
	if err := dev.Close(); err != nil {
		return r, err
	}
	s.progress("child: %d objects, filling the journal to %.0f%% with %d jobs × (%d write(s) + Sync), then exit without Close",
		s.objects, s.fill*100, s.fillJobs, s.batch)
	rep, err := runFillChild(ctx, s)
	if err != nil {
		return r, err
	}
	for _, n := range rep.Writes {
		r.FillWrites += n
	}
	r.FillSeconds, r.CrashJournalUsed, r.JournalBytes = rep.Seconds, rep.JournalUsedBytes, rep.JournalBytes

	dev, err = engine.OpenDevice(s.path, engine.DeviceOptions{IO: s.mode})
	if err != nil {
		return r, err
	}
	// fsck the crashed device first: it must be consistent as the crash
	// left it, and its time is that of recovery's read and replay alone.
	// The device is opened O_DIRECT, so this warms no cache for the Open
	// below; the garbage collection afterwards hands the Open a cold heap.
	s.progress("fsck of the crashed device")
	t0 := time.Now()
	crep, cerr := engine.Check(dev)
	r.CrashFsckSeconds = time.Since(t0).Seconds()
	if cerr != nil {
		return r, errors.Join(fmt.Errorf("fsck of the crashed device: %w", cerr), dev.Close())
	}
	r.ReplayedTransactions, r.ReplayStop = crep.Journal.Transactions, crep.Journal.Stop
	runtime.GC()
	debug.FreeOSMemory()

	s.progress("recovering: engine.Open after the crash")
	t0 = time.Now()
	e, err := engine.Open(dev, engine.Options{CacheSize: s.cache})
	r.OpenSeconds = time.Since(t0).Seconds()
	if err != nil {
		return r, errors.Join(err, dev.Close())
	}
	st := e.Stats()
	r.ReplayedBytes = st.JournalUsedBytes
	r.ObjectsAfter = len(e.Objects())
	verr := verifyFill(e, rep, s.verify, &r)
	if err := e.Close(); err != nil {
		return r, errors.Join(verr, err, dev.Close())
	}
	if verr != nil {
		return r, errors.Join(verr, dev.Close())
	}
	s.progress("fsck after recovery")
	t0 = time.Now()
	_, cerr = engine.Check(dev)
	r.FsckSeconds = time.Since(t0).Seconds()
	r.FsckClean = cerr == nil
	if err := dev.Close(); err != nil {
		return r, err
	}
	if cerr != nil {
		return r, fmt.Errorf("fsck after recovery: %w", cerr)
	}
	return r, nil
}

// childMaxStderr bounds how much of the child's stderr an error quotes.
const childMaxStderr = 4096

// runFillChild runs `bench durability-fill` in a child process (this same
// executable) and returns its report.
func runFillChild(ctx context.Context, s *durSpec) (fillReport, error) {
	var rep fillReport
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	args := []string{"durability-fill", s.path,
		"--objects", strconv.Itoa(s.objects), "--fill", strconv.FormatFloat(s.fill, 'g', -1, 64),
		"--jobs", strconv.Itoa(s.fillJobs), "--batch", strconv.Itoa(s.batch),
		"--cache", strconv.FormatInt(s.cache, 10), "--io", cmpStr(s.io, "auto")}
	cmd := exec.CommandContext(ctx, exe, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errOut.String())
		if len(msg) > childMaxStderr {
			msg = msg[len(msg)-childMaxStderr:]
		}
		return rep, fmt.Errorf("crash child %s %s: %w; stderr: %s", exe, strings.Join(args, " "), err, msg)
	}
	dec := json.NewDecoder(&out)
	if err := dec.Decode(&rep); err != nil {
		return rep, fmt.Errorf("crash child printed no report (%w); stdout: %q", err, out.String())
	}
	if rep.Objects != s.objects || rep.Jobs != s.fillJobs || len(rep.Writes) != s.fillJobs {
		return rep, fmt.Errorf("crash child report does not match its arguments: %+v", rep)
	}
	return rep, nil
}

func cmpStr(s, dflt string) string {
	if s == "" {
		return dflt
	}
	return s
}

// verifyFill checks the recovered engine against the child's report: every
// object exists with exactly the size its synced writes gave it, the last
// Sync of every job reads back, and so do up to sample earlier writes picked
// at random.
func verifyFill(e *engine.Engine, rep fillReport, sample int, r *recoveryResult) error {
	plan := fillPlan{objects: rep.Objects, jobs: rep.Jobs}
	objs := make([]*engine.Object, rep.Objects)
	for i := range objs {
		o, err := e.Object(objName(i))
		if err != nil {
			return fmt.Errorf("after the crash: %w", err)
		}
		wantBlocks := plan.blocksOf(i, rep.Writes[i%rep.Jobs])
		if got, want := o.Size(), wantBlocks*durWriteSize; got != want {
			return fmt.Errorf("after the crash: object %q has size %d, its synced writes made it %d", o.Name(), got, want)
		}
		objs[i] = o
		r.SizesVerified++
	}
	want := make([]byte, durWriteSize)
	got := make([]byte, durWriteSize)
	check := func(j int, k int64) error {
		obj, blk := plan.write(j, k)
		stampBlock(want, uint64(obj), uint64(blk))
		if _, err := objs[obj].ReadAt(got, blk*durWriteSize); err != nil {
			return fmt.Errorf("after the crash: reading object %q block %d (job %d's write %d): %w", objName(obj), blk, j, k, err)
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("after the crash: object %q block %d (job %d's synced write %d) reads back different bytes (header %x, want %x)",
				objName(obj), blk, j, k, got[:16], want[:16])
		}
		r.WritesVerified++
		return nil
	}
	// Each job's last Sync covered its last batch of writes.
	for j, n := range rep.Writes {
		for k := max(0, n-int64(rep.Batch)); k < n; k++ {
			if err := check(j, k); err != nil {
				return err
			}
		}
	}
	rng := rand.New(rand.NewPCG(0xc4a54, uint64(rep.Objects)))
	var total int64
	for _, n := range rep.Writes {
		total += n
	}
	for i := 0; i < sample && total > 0; i++ {
		// Pick a write uniformly over all jobs' writes.
		x := rng.Int64N(total)
		j := 0
		for x >= rep.Writes[j] {
			x -= rep.Writes[j]
			j++
		}
		if err := check(j, x); err != nil {
			return err
		}
	}
	return nil
}

// durabilityTable turns the result into the rows printed beside their
// targets.
func durabilityTable(res *durabilityResult) []durabilityRow {
	var rows []durabilityRow
	ok := func(b bool) *bool { return &b }
	if r := res.SyncLatency; r != nil {
		rows = append(rows,
			durabilityRow{Measure: fmt.Sprintf("Object.Sync p50 after a 4k write, %d objects", r.Few.Objects), Value: r.Few.Lat.P50, Unit: "µs"},
			durabilityRow{Measure: fmt.Sprintf("Object.Sync p50 after a 4k write, %d objects", r.Many.Objects), Value: r.Many.Lat.P50, Unit: "µs"},
			durabilityRow{Measure: fmt.Sprintf("  ratio %d / %d objects", r.Many.Objects, r.Few.Objects), Value: r.Ratio, Unit: "×",
				Target: fmt.Sprintf("≤ %g", targetSyncRatio), OK: ok(r.Ratio > 0 && r.Ratio <= targetSyncRatio)},
		)
		jb := max(r.Few.JournalBlocksPerSync, r.Many.JournalBlocksPerSync)
		rows = append(rows, durabilityRow{Measure: "journal blocks per 4k write + Sync", Value: jb, Unit: "blocks",
			Target: fmt.Sprintf("≤ %g", targetJournalBlocks), OK: ok(jb <= targetJournalBlocks)})
	}
	if r := res.Concurrent; r != nil {
		rows = append(rows,
			durabilityRow{Measure: fmt.Sprintf("%d goroutines, 4k write + Object.Sync each", r.Concurrent.Jobs), Value: r.Concurrent.OpsPerS, Unit: "ops/s"},
			durabilityRow{Measure: "  same, Syncs serialized", Value: r.Serialized.OpsPerS, Unit: "ops/s"},
			durabilityRow{Measure: "  ratio concurrent / serialized", Value: r.Ratio, Unit: "×",
				Target: fmt.Sprintf("≥ %g", targetConcRatio), OK: ok(r.Ratio >= targetConcRatio)},
		)
	}
	if r := res.Recovery; r != nil {
		rows = append(rows,
			durabilityRow{Measure: fmt.Sprintf("recovery: Open after a crash, %d objects, %s of journal (%.0f%%)",
				r.ObjectsAfter, humanBytes(r.ReplayedBytes), percent(r.ReplayedBytes, r.JournalBytes)),
				Value: r.OpenSeconds, Unit: "s", Target: fmt.Sprintf("≤ %g", targetRecovery), OK: ok(r.OpenSeconds <= targetRecovery)},
			durabilityRow{Measure: fmt.Sprintf("  read + replay alone (fsck of the crashed device, %d transactions)", r.ReplayedTransactions),
				Value: r.CrashFsckSeconds, Unit: "s"},
		)
	}
	return rows
}

// humanBytes renders a byte count with one decimal in the largest binary
// unit that keeps it at least 1.
func humanBytes(n int64) string {
	units := []struct {
		shift uint
		name  string
	}{{40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}}
	for _, u := range units {
		if n >= 1<<u.shift || -n >= 1<<u.shift {
			return fmt.Sprintf("%.1f %s", float64(n)/float64(int64(1)<<u.shift), u.name)
		}
	}
	return fmt.Sprintf("%d B", n)
}

// printDurability prints the details of each measure, then the table.
func printDurability(w io.Writer, res *durabilityResult) error {
	var b strings.Builder
	fmt.Fprintf(&b, "durability on %s (io %s, device block %d)\n", res.Device, res.IOMode, res.BlockSize)
	if r := res.SyncLatency; r != nil {
		for _, p := range []*syncPhase{&r.Few, &r.Many} {
			fmt.Fprintf(&b, "  sync, %d objects: %d rounds, p50 %.1f µs p99 %.1f µs max %.1f µs; per Sync %.2f journal blocks, %.2f flushes, %.2f commits; %d checkpoints\n",
				p.Objects, p.Rounds, p.Lat.P50, p.Lat.P99, p.Lat.Max, p.JournalBlocksPerSync, p.FlushesPerSync, p.CommitsPerSync, p.CheckpointsDuring)
		}
	}
	if r := res.Concurrent; r != nil {
		for _, c := range []*concRun{&r.Concurrent, &r.Serialized} {
			kind := "concurrent"
			if c.Serialized {
				kind = "serialized"
			}
			fmt.Fprintf(&b, "  %s, %d jobs: %d ops in %.2f s; write+Sync p50 %.1f µs p99 %.1f µs; per op %.2f journal blocks, %.2f flushes, %.2f commits\n",
				kind, c.Jobs, c.Ops, c.Seconds, c.Lat.P50, c.Lat.P99, c.JournalBlocksPerOp, c.FlushesPerOp, c.CommitsPerOp)
		}
	}
	if r := res.Recovery; r != nil {
		fmt.Fprintf(&b, "  recovery: fill %d writes in %.1f s (%d jobs, %d per Sync), journal %s of %s at the crash\n",
			r.FillWrites, r.FillSeconds, r.FillJobs, r.FillBatch, humanBytes(r.CrashJournalUsed), humanBytes(r.JournalBytes))
		fmt.Fprintf(&b, "    fsck of the crashed device %.3f s (clean): %d transactions replayed, stopped at: %s\n",
			r.CrashFsckSeconds, r.ReplayedTransactions, r.ReplayStop)
		fmt.Fprintf(&b, "    Open %.3f s, replayed %s; %d objects; %d sizes and %d writes verified; fsck after Close %.3f s, clean %v\n",
			r.OpenSeconds, humanBytes(r.ReplayedBytes), r.ObjectsAfter, r.SizesVerified, r.WritesVerified, r.FsckSeconds, r.FsckClean)
	}
	b.WriteByte('\n')
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "measure\tvalue\ttarget\tmet")
	for _, row := range res.Table {
		met := ""
		if row.OK != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*row.OK]
		}
		fmt.Fprintf(tw, "%s\t%s %s\t%s\t%s\n", row.Measure, formatValue(row.Value), row.Unit, row.Target, met)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// formatValue prints large figures without decimals and small ones with
// enough to read a ratio.
func formatValue(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}

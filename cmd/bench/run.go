package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
	"golang.org/x/sys/unix"

	"github.com/rawblock/rawblock/engine"
)

// runCmd is `bench run`: whole workloads through the engine.
type runCmd struct {
	Device    string        `help:"Device or file to run on. Default: a ${tempsize} temporary file under $$TMPDIR, formatted and removed afterwards." placeholder:"PATH"`
	Format    bool          `help:"Format the device first (everything on it is lost)."`
	Workload  string        `enum:"seqwrite,randwrite,seqread,randread,mixed" default:"seqwrite" help:"Workload: ${enum}."`
	BS        byteSize      `name:"bs" default:"4k" help:"Size of each read or write."`
	Objects   int           `default:"8" help:"Number of objects (1..100000)."`
	Size      byteSize      `default:"64M" help:"Size of each object."`
	Jobs      int           `default:"8" help:"Goroutines issuing I/O (1..1024)."`
	SyncEvery int           `name:"sync-every" default:"0" help:"Object.Sync after every N writes of a job (0: only the final Engine.Sync)."`
	Runtime   time.Duration `default:"30s" help:"Upper bound on the timed phase."`
	Cache     byteSize      `default:"256M" help:"Engine page cache size."`
	IO        string        `name:"io" enum:"auto,io_uring,psync" default:"auto" help:"I/O engine: ${enum}."`
	Force     bool          `help:"Format even a block device that holds a file system or other signature."`
	JSON      bool          `name:"json" help:"Print one JSON object instead of text."`
	Quiet     bool          `help:"No progress line."`
	CPUProf   string        `name:"cpuprofile" type:"path" placeholder:"FILE" help:"Write a Go CPU profile of the run to FILE."`
	Trace     string        `name:"trace" type:"path" placeholder:"FILE" help:"Write a Go execution trace of the timed phase to FILE (see go tool trace)."`
}

// engineResult is what one engine workload measured. Its JSON field names
// are a stable interface used by the hack/ scripts.
type engineResult struct {
	Mode               string         `json:"mode"`
	Workload           string         `json:"workload"`
	BS                 int64          `json:"bs"`
	Objects            int            `json:"objects"`
	ObjectSize         int64          `json:"object_size"`
	Jobs               int            `json:"jobs"`
	SyncEvery          int            `json:"sync_every"`
	Ops                int64          `json:"ops"`
	Bytes              int64          `json:"bytes"`
	Seconds            float64        `json:"seconds"`
	SyncSeconds        float64        `json:"sync_seconds"` // the final Engine.Sync, part of Seconds
	IOPS               float64        `json:"iops"`
	MiBPerS            float64        `json:"mib_per_s"`
	Lat                latencySummary `json:"lat_us"`
	ExtentsPerObject   float64        `json:"extents_per_object"`
	Allocations        uint64         `json:"allocations"`
	DeviceBytesWritten uint64         `json:"device_bytes_written"`
	DeviceBytesRead    uint64         `json:"device_bytes_read"`
	DeviceWrites       uint64         `json:"device_writes"` // I/Os, so bytes/writes is the mean write size
	DeviceReads        uint64         `json:"device_reads"`
	WriteAmp           float64        `json:"write_amplification"`
	CacheHits          uint64         `json:"cache_hits"`
	CacheMisses        uint64         `json:"cache_misses"`
	ProcessCPUSeconds  float64        `json:"process_cpu_s"`
	MachineCPUSeconds  float64        `json:"machine_cpu_s"`
	CPUPerGiB          float64        `json:"machine_cpu_s_per_gib"`
	MaxRSSMiB          float64        `json:"max_rss_mib"`
	CacheSize          int64          `json:"cache_size"`
	IOMode             string         `json:"io_mode"`
	Device             string         `json:"device"`
	TempFile           bool           `json:"temp_file"`
}

// engineSpec is one engine workload.
type engineSpec struct {
	workload  string
	bs        int64
	objects   int
	size      int64
	jobs      int
	syncEvery int
	runtime   time.Duration
	cache     int64
	quiet     bool
	trace     string // execution trace of the timed phase ("" = none)
}

const (
	maxObjects   = 100000
	maxEngineJob = 1024
)

func (s *engineSpec) validate() error {
	switch {
	case s.bs <= 0 || s.bs > maxBS:
		return fmt.Errorf("%w: --bs %d: want 1..%d bytes", errBadFlag, s.bs, maxBS)
	case s.objects < 1 || s.objects > maxObjects:
		return fmt.Errorf("%w: --objects %d: want 1..%d", errBadFlag, s.objects, maxObjects)
	case s.jobs < 1 || s.jobs > maxEngineJob:
		return fmt.Errorf("%w: --jobs %d: want 1..%d", errBadFlag, s.jobs, maxEngineJob)
	case s.size < s.bs:
		return fmt.Errorf("%w: --size %d is smaller than --bs %d", errBadFlag, s.size, s.bs)
	case s.syncEvery < 0:
		return fmt.Errorf("%w: --sync-every %d is negative", errBadFlag, s.syncEvery)
	case s.runtime <= 0:
		return fmt.Errorf("%w: --runtime must be positive", errBadFlag)
	case s.cache < 4<<20:
		return fmt.Errorf("%w: --cache %d: at least 4M", errBadFlag, s.cache)
	}
	return nil
}

// Run implements `bench run`.
func (c *runCmd) Run(env *appEnv) error {
	mode, err := parseIOMode(c.IO)
	if err != nil {
		return err
	}
	spec := engineSpec{
		workload: c.Workload, bs: int64(c.BS), objects: c.Objects, size: int64(c.Size),
		jobs: c.Jobs, syncEvery: c.SyncEvery, runtime: c.Runtime, cache: int64(c.Cache),
		quiet: c.Quiet || c.JSON, trace: c.Trace,
	}
	if err := spec.validate(); err != nil {
		return err
	}
	bd, err := openBenchDevice(c.Device, mode, defaultTempSize)
	if err != nil {
		return err
	}
	if bd.temp || c.Format {
		if err := bd.checkWritable(c.Force); err != nil {
			return errors.Join(err, bd.close())
		}
		if err := engine.Format(bd.dev, engine.FormatOptions{}); err != nil {
			return errors.Join(err, bd.close())
		}
	}
	var r engineResult
	err = profiled(c.CPUProf, bd, func() (err error) {
		r, err = runEngine(env.ctx, bd, spec)
		return err
	})
	if err != nil {
		return err
	}
	if c.JSON {
		return writeJSON(env.stdout, r)
	}
	return printEngineResult(env.stdout, &r)
}

func objName(i int) string { return "bench-" + strconv.Itoa(i) }

// runEngine runs one workload on a formatted device.
func runEngine(ctx context.Context, bd *benchDevice, spec engineSpec) (engineResult, error) {
	r := engineResult{
		Mode: "engine", Workload: spec.workload, BS: spec.bs, Objects: spec.objects,
		ObjectSize: spec.size, Jobs: spec.jobs, SyncEvery: spec.syncEvery, CacheSize: spec.cache,
		IOMode: string(bd.dev.IOMode()), Device: bd.dev.Path(), TempFile: bd.temp,
	}
	opts := engine.Options{CacheSize: spec.cache}
	e, err := engine.Open(bd.dev, opts)
	if err != nil {
		return r, err
	}
	defer func() {
		if e != nil {
			e.Close()
		}
	}()
	objs := make([]*engine.Object, spec.objects)
	for i := range objs {
		if err := e.Remove(objName(i)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return r, err
		}
		if objs[i], err = e.Create(objName(i)); err != nil {
			return r, err
		}
	}
	reads := spec.workload == "seqread" || spec.workload == "randread" || spec.workload == "mixed"
	if reads {
		// Fill the objects, then reopen for a cold cache.
		if err := fillObjects(ctx, objs, spec.size); err != nil {
			return r, err
		}
		if err := e.Close(); err != nil {
			return r, err
		}
		if e, err = engine.Open(bd.dev, opts); err != nil {
			return r, err
		}
		for i := range objs {
			if objs[i], err = e.Object(objName(i)); err != nil {
				return r, err
			}
		}
	}
	before := e.Stats()
	u0, err := getUsage()
	if err != nil {
		return r, err
	}
	m0 := machineBusy()
	var ops, bytes atomic.Int64
	stopTrace, err := startTrace(spec.trace)
	if err != nil {
		return r, err
	}
	stopProgress := startProgress(spec.quiet, &ops, &bytes)
	t0 := time.Now()
	hists, err := runEngineJobs(ctx, spec, objs, &ops, &bytes)
	jobsDone := time.Since(t0)
	if err == nil && spec.workload != "seqread" && spec.workload != "randread" {
		err = e.Sync()
	}
	elapsed := time.Since(t0)
	r.SyncSeconds = (elapsed - jobsDone).Seconds()
	stopProgress()
	err = errors.Join(err, stopTrace())
	m1 := machineBusy()
	u1, uerr := getUsage()
	if err != nil {
		return r, err
	}
	if uerr != nil {
		return r, uerr
	}
	after := e.Stats()
	var exts int
	for _, o := range objs {
		exts += len(o.Extents())
	}
	r.Ops, r.Bytes, r.Seconds = ops.Load(), bytes.Load(), elapsed.Seconds()
	if r.Seconds > 0 {
		r.IOPS = float64(r.Ops) / r.Seconds
		r.MiBPerS = float64(r.Bytes) / (1 << 20) / r.Seconds
	}
	r.Lat = summarizeLatency(mergeLatency(hists))
	r.ExtentsPerObject = float64(exts) / float64(len(objs))
	r.Allocations = after.Allocations - before.Allocations
	r.DeviceBytesWritten = after.DeviceBytesWritten - before.DeviceBytesWritten
	r.DeviceBytesRead = after.DeviceBytesRead - before.DeviceBytesRead
	r.DeviceWrites = after.DeviceWrites - before.DeviceWrites
	r.DeviceReads = after.DeviceReads - before.DeviceReads
	r.CacheHits = after.CacheHits - before.CacheHits
	r.CacheMisses = after.CacheMisses - before.CacheMisses
	if r.Bytes > 0 && spec.workload != "seqread" && spec.workload != "randread" {
		r.WriteAmp = float64(r.DeviceBytesWritten) / float64(r.Bytes)
	}
	r.ProcessCPUSeconds = (u1.cpu - u0.cpu).Seconds()
	r.MachineCPUSeconds = m1 - m0
	if r.Bytes > 0 {
		r.CPUPerGiB = r.MachineCPUSeconds / (float64(r.Bytes) / (1 << 30))
	}
	r.MaxRSSMiB = float64(u1.maxRSSKiB) / 1024
	err = e.Close()
	e = nil
	return r, err
}

// fillObjects writes every object fully with 1 MiB writes and syncs.
func fillObjects(ctx context.Context, objs []*engine.Object, size int64) error {
	buf := make([]byte, 1<<20)
	fillRandom(buf, 0xf1)
	var wg sync.WaitGroup
	errs := make([]error, len(objs))
	sem := make(chan struct{}, 4)
	for i, o := range objs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			errs[i] = writeObject(ctx, o, buf, size)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, o := range objs {
		if err := o.Sync(); err != nil {
			return err
		}
	}
	return nil
}

func writeObject(ctx context.Context, o *engine.Object, buf []byte, size int64) error {
	for off := int64(0); off < size; off += int64(len(buf)) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		n := min(int64(len(buf)), size-off)
		if _, err := o.WriteAt(buf[:n], off); err != nil {
			return err
		}
	}
	return nil
}

// runEngineJobs runs the timed phase and returns one histogram per job.
func runEngineJobs(ctx context.Context, spec engineSpec, objs []*engine.Object, ops, bytes *atomic.Int64) ([]*hdrhistogram.Histogram, error) {
	deadline := time.Now().Add(spec.runtime)
	hists := make([]*hdrhistogram.Histogram, spec.jobs)
	errs := make([]error, spec.jobs)
	var wg sync.WaitGroup
	blocksPerObj := spec.size / spec.bs
	// Random workloads do as many I/Os as one pass over the data set, or
	// run out of time first.
	totalRandom := int64(len(objs)) * blocksPerObj
	var issued atomic.Int64
	for j := 0; j < spec.jobs; j++ {
		hists[j] = newLatHist()
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := hists[j]
			buf := make([]byte, spec.bs)
			fillRandom(buf, uint64(j)+1)
			rng := rand.New(rand.NewPCG(uint64(j)+7, 99))
			writes := 0
			// now is the end of the last I/O. For sequential workloads it
			// is also the start of the next one (the loop between them
			// records a histogram value, tens of nanoseconds); random ones
			// draw their next I/O between the two, with a shared atomic,
			// so they read the clock again. It is also what the deadline
			// check compares: one or two clock reads per I/O instead of
			// three. The shared counters are added to in batches. Both keep
			// the loop's own cost small next to the engine's, as fio's is
			// next to the kernel's.
			restart := spec.workload != "seqwrite" && spec.workload != "seqread"
			now := time.Now()
			var pending int64
			flush := func() {
				ops.Add(pending)
				bytes.Add(pending * spec.bs)
				pending = 0
			}
			defer flush()
			expired := func() bool { return ctx.Err() != nil || now.After(deadline) }
			do := func(o *engine.Object, off int64, write bool) error {
				t := now
				if restart {
					t = time.Now()
				}
				var err error
				if write {
					_, err = o.WriteAt(buf, off)
					writes++
				} else {
					_, err = o.ReadAt(buf, off)
					if err == io.EOF {
						err = nil
					}
				}
				now = time.Now()
				recordLatency(h, int64(now.Sub(t)))
				if err != nil {
					return err
				}
				if pending++; pending == 256 {
					flush()
				}
				if write && spec.syncEvery > 0 && writes%spec.syncEvery == 0 {
					err := o.Sync()
					now = time.Now()
					return err
				}
				return nil
			}
			switch spec.workload {
			case "seqwrite", "seqread":
				write := spec.workload == "seqwrite"
				// Job j owns objects j, j+jobs, ...; it interleaves them
				// block by block so concurrent streams are the norm.
				var mine []*engine.Object
				for i := j; i < len(objs); i += spec.jobs {
					mine = append(mine, objs[i])
				}
				for pass := 0; len(mine) > 0; pass++ {
					for blk := int64(0); blk < blocksPerObj; blk++ {
						for _, o := range mine {
							if expired() {
								return
							}
							if err := do(o, blk*spec.bs, write); err != nil {
								errs[j] = err
								return
							}
						}
					}
					if write {
						return
					}
				}
			default:
				for issued.Add(1) <= totalRandom || spec.workload != "randwrite" {
					if expired() {
						return
					}
					o := objs[rng.IntN(len(objs))]
					off := rng.Int64N(blocksPerObj) * spec.bs
					write := spec.workload == "randwrite" || (spec.workload == "mixed" && rng.IntN(10) < 3)
					if err := do(o, off, write); err != nil {
						errs[j] = err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	return hists, errors.Join(errs...)
}

// machineBusy returns the machine's busy CPU seconds so far (all CPUs,
// kernel threads included) from /proc/stat, or 0 if it cannot be read.
func machineBusy() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, s := range f[1:] {
		v, _ := strconv.ParseInt(s, 10, 64)
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest time is already in user
			break
		}
		busy += v
	}
	return float64(busy) / 100 // USER_HZ
}

// startProgress prints a progress line every second on a terminal.
func startProgress(quiet bool, ops, bytes *atomic.Int64) func() {
	if quiet {
		return func() {}
	}
	if _, err := unix.IoctlGetTermios(int(os.Stderr.Fd()), unix.TCGETS); err != nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t0 := time.Now()
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-done:
				fmt.Fprint(os.Stderr, "\r\033[K")
				return
			case <-tick.C:
				s := time.Since(t0).Seconds()
				fmt.Fprintf(os.Stderr, "\r\033[K%5.0fs  %d ops  %.1f MiB/s", s, ops.Load(), float64(bytes.Load())/(1<<20)/s)
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

func printEngineResult(w io.Writer, r *engineResult) error {
	var b strings.Builder
	fmt.Fprintf(&b, "engine %s bs=%s objects=%d×%s jobs=%d sync-every=%d cache=%s on %s\n",
		r.Workload, formatSize(r.BS), r.Objects, formatSize(r.ObjectSize), r.Jobs, r.SyncEvery, formatSize(r.CacheSize), r.Device)
	fmt.Fprintf(&b, "  ops          %d in %.2f s (final Sync included)\n", r.Ops, r.Seconds)
	fmt.Fprintf(&b, "  IOPS         %.0f\n", r.IOPS)
	fmt.Fprintf(&b, "  bandwidth    %.1f MiB/s\n", r.MiBPerS)
	fmt.Fprintf(&b, "  latency      p50 %.1f µs  p99 %.1f µs  p99.9 %.1f µs\n", r.Lat.P50, r.Lat.P99, r.Lat.P999)
	fmt.Fprintf(&b, "  extents      %.2f per object, %d allocations\n", r.ExtentsPerObject, r.Allocations)
	fmt.Fprintf(&b, "  device       %d bytes written (%.3f × the data), %d read\n", r.DeviceBytesWritten, r.WriteAmp, r.DeviceBytesRead)
	fmt.Fprintf(&b, "  cache        %d hits, %d misses\n", r.CacheHits, r.CacheMisses)
	fmt.Fprintf(&b, "  CPU          %.2f s process, %.2f s machine (%.2f s per GiB)\n", r.ProcessCPUSeconds, r.MachineCPUSeconds, r.CPUPerGiB)
	fmt.Fprintf(&b, "  peak RSS     %.1f MiB\n", r.MaxRSSMiB)
	_, err := io.WriteString(w, b.String())
	return err
}

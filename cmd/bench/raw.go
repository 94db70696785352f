package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
	"golang.org/x/sys/unix"

	"github.com/rawblock/rawblock/iouring"
)

// Limits of the raw benchmark. Each is checked with a clear error before any
// file is created or any byte is written.
const (
	maxBS          = 64 << 20 // largest block size per I/O
	maxIODepth     = 4096
	maxJobs        = 256
	maxBufferBytes = 1 << 30 // jobs × iodepth × bs: memory pinned for buffers
	maxPsyncIOs    = 4096    // jobs × iodepth goroutines, each blocking an OS thread
)

var errBadFlag = errors.New("invalid flag")

// rawCmd is `bench raw`: the raw device's ceiling, measured the way fio
// measures it, that rawblock's own numbers are compared with.
type rawCmd struct {
	Device  string        `help:"Device or file to benchmark. Default: a ${tempsize} temporary file under $$TMPDIR, removed afterwards." placeholder:"PATH"`
	RW      string        `name:"rw" enum:"read,write,randread,randwrite" default:"randread" help:"Workload: ${enum}."`
	BS      byteSize      `name:"bs" default:"4k" help:"Size of each I/O (4k, 1M ...): a multiple of the device's block size, at most 64M."`
	IODepth int           `name:"iodepth" default:"32" help:"I/Os in flight per job (1..4096)."`
	Jobs    int           `default:"1" help:"Parallel jobs, each with its own ring and buffers (1..256)."`
	Size    byteSize      `placeholder:"SIZE" help:"Region of the device to use, from offset 0. Default: 1G, or the device size if smaller."`
	Runtime time.Duration `default:"10s" help:"How long to run."`
	IO      string        `name:"io" enum:"auto,io_uring,psync" default:"auto" help:"I/O engine: ${enum}. auto follows the device (io_uring unless the kernel refuses it or RAWBLOCK_IO=psync)."`
	Force   bool          `help:"Write even to a block device that holds a file system or other signature."`
	JSON    bool          `name:"json" help:"Print one JSON object instead of text."`
	CPUProf string        `name:"cpuprofile" type:"path" placeholder:"FILE" help:"Write a Go CPU profile of the run to FILE."`
}

// rawSpec is one raw workload.
type rawSpec struct {
	rw      string
	bs      int64
	iodepth int
	jobs    int
	size    int64 // 0: min(1 GiB, device size)
	runtime time.Duration
	io      iouring.Mode // ModeAuto: whatever the device uses
	force   bool
}

func (s *rawSpec) write() bool      { return s.rw == "write" || s.rw == "randwrite" }
func (s *rawSpec) sequential() bool { return s.rw == "read" || s.rw == "write" }

// Run implements `bench raw`.
func (c *rawCmd) Run(env *appEnv) error {
	spec := rawSpec{
		rw: c.RW, bs: int64(c.BS), iodepth: c.IODepth, jobs: c.Jobs,
		size: int64(c.Size), runtime: c.Runtime, force: c.Force,
	}
	mode, err := parseIOMode(c.IO)
	if err != nil {
		return err
	}
	spec.io = mode
	if err := spec.validate(); err != nil {
		return err
	}
	bd, err := openBenchDevice(c.Device, mode, defaultTempSize)
	if err != nil {
		return err
	}
	var res result
	err = profiled(c.CPUProf, bd, func() (err error) {
		res, err = runRaw(env.ctx, bd, spec)
		return err
	})
	if err != nil {
		return err
	}
	if c.JSON {
		return writeJSON(env.stdout, res)
	}
	return printResult(env.stdout, &res)
}

// parseIOMode maps the --io flag to an iouring.Mode.
func parseIOMode(s string) (iouring.Mode, error) {
	switch s {
	case "", "auto":
		return iouring.ModeAuto, nil
	case "io_uring":
		return iouring.ModeIOURing, nil
	case "psync":
		return iouring.ModePsync, nil
	}
	return "", fmt.Errorf("%w: --io %q: want auto, io_uring or psync", errBadFlag, s)
}

// validate checks everything that does not depend on the device.
func (s *rawSpec) validate() error {
	switch s.rw {
	case "read", "write", "randread", "randwrite":
	default:
		return fmt.Errorf("%w: --rw %q: want read, write, randread or randwrite", errBadFlag, s.rw)
	}
	if s.bs <= 0 || s.bs > maxBS {
		return fmt.Errorf("%w: --bs %d: must be between 1 block and %s", errBadFlag, s.bs, formatSize(maxBS))
	}
	if s.iodepth < 1 || s.iodepth > maxIODepth {
		return fmt.Errorf("%w: --iodepth %d: must be 1..%d", errBadFlag, s.iodepth, maxIODepth)
	}
	if s.jobs < 1 || s.jobs > maxJobs {
		return fmt.Errorf("%w: --jobs %d: must be 1..%d", errBadFlag, s.jobs, maxJobs)
	}
	if s.size < 0 || (s.size > 0 && s.size < s.bs) {
		return fmt.Errorf("%w: --size %d: must be at least --bs (%d)", errBadFlag, s.size, s.bs)
	}
	if s.runtime <= 0 {
		return fmt.Errorf("%w: --runtime %s: must be > 0", errBadFlag, s.runtime)
	}
	if buf := int64(s.jobs) * int64(s.iodepth) * s.bs; buf > maxBufferBytes {
		return fmt.Errorf("%w: --jobs × --iodepth × --bs = %s of buffers, more than the %s limit",
			errBadFlag, formatSize(buf), formatSize(maxBufferBytes))
	}
	if s.io == iouring.ModePsync && s.jobs*s.iodepth > maxPsyncIOs {
		return fmt.Errorf("%w: psync needs one thread per I/O in flight: --jobs × --iodepth = %d, more than %d",
			errBadFlag, s.jobs*s.iodepth, maxPsyncIOs)
	}
	return nil
}

// validateFor checks the spec against the opened device and resolves the
// default size.
func (s *rawSpec) validateFor(bd *benchDevice) error {
	d := bd.dev
	bsz := int64(d.BlockSize())
	if bsz <= 0 {
		return fmt.Errorf("%s: device reports block size %d", d.Path(), bsz)
	}
	if s.bs%bsz != 0 {
		return fmt.Errorf("%w: --bs %d: not a multiple of the block size of %s (%d)", errBadFlag, s.bs, d.Path(), bsz)
	}
	if s.size == 0 {
		s.size = min(defaultTempSize, d.Size())
		if s.size < s.bs {
			return fmt.Errorf("%w: %s holds %d bytes, less than --bs %d", errBadFlag, d.Path(), d.Size(), s.bs)
		}
	}
	if s.size > d.Size() {
		return fmt.Errorf("%w: --size %s: larger than %s (%d bytes)", errBadFlag, formatSize(s.size), d.Path(), d.Size())
	}
	// The region the workload touches: whole I/Os from offset 0.
	s.size -= s.size % s.bs
	if s.io == iouring.ModeIOURing && d.IOMode() != iouring.ModeIOURing {
		return fmt.Errorf("--io io_uring: %s cannot use io_uring: %s", d.Path(), d.IOReason())
	}
	return nil
}

// runRaw validates spec against bd and runs it.
func runRaw(ctx context.Context, bd *benchDevice, spec rawSpec) (result, error) {
	if err := spec.validate(); err != nil {
		return result{}, err
	}
	if err := spec.validateFor(bd); err != nil {
		return result{}, err
	}
	if spec.write() {
		if err := bd.checkWritable(spec.force); err != nil {
			return result{}, err
		}
	}
	if err := bd.ensureFilled(spec.size); err != nil {
		return result{}, err
	}
	mode := spec.io
	if mode == iouring.ModeAuto {
		mode = bd.dev.IOMode()
	}
	r := result{
		Mode: "raw", RW: spec.rw, BS: spec.bs, IODepth: spec.iodepth, Jobs: spec.jobs,
		Size: spec.size, IOMode: string(mode), Device: bd.dev.Path(),
		BlockSize: bd.dev.BlockSize(), TempFile: bd.temp,
	}
	jobs := make([]*rawJob, spec.jobs)
	for i := range jobs {
		jobs[i] = &rawJob{id: i, spec: &spec, fd: bd.dev.Fd(), lat: newLatHist()}
	}
	var how string
	var m measurement
	var err error
	switch mode {
	case iouring.ModeIOURing:
		m, how, err = runJobs(ctx, jobs, spec, (*rawJob).setupRing, (*rawJob).runRing)
	case iouring.ModePsync:
		m, how, err = runJobs(ctx, jobs, spec, (*rawJob).setupPsync, (*rawJob).runPsync)
	default:
		return result{}, fmt.Errorf("%s: device reports unknown I/O mode %q", bd.dev.Path(), mode)
	}
	if err != nil {
		return result{}, err
	}
	r.IOReason = "device: " + bd.dev.IOReason() + "; " + how
	r.fill(m)
	return r, nil
}

// runJobs sets every job up, starts them together, waits for all of them,
// and measures the time and resources between start and finish.
func runJobs(ctx context.Context, jobs []*rawJob, spec rawSpec,
	setup func(*rawJob) (string, error), run func(*rawJob, time.Time)) (measurement, string, error) {
	var wg sync.WaitGroup
	start := make(chan time.Time)
	ready := make(chan error, len(jobs))
	hows := make([]string, len(jobs))
	for i, j := range jobs {
		wg.Go(func() {
			// A ring created with SINGLE_ISSUER must be used by the thread
			// that created it, and keeping the thread also keeps the
			// scheduler from moving the submit loop around.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			defer j.teardown()
			how, err := setup(j)
			hows[i] = how
			ready <- err
			if err != nil {
				return
			}
			t0, ok := <-start
			if !ok {
				return
			}
			run(j, t0)
		})
	}
	var setupErr error
	for range jobs {
		setupErr = errors.Join(setupErr, <-ready)
	}
	if setupErr != nil {
		close(start)
		wg.Wait()
		return measurement{}, "", setupErr
	}
	stopWatch := context.AfterFunc(ctx, func() {
		for _, j := range jobs {
			j.stop.Store(true)
		}
	})
	defer stopWatch()

	before, err := getUsage()
	if err != nil {
		close(start)
		wg.Wait()
		return measurement{}, "", err
	}
	t0 := time.Now()
	for range jobs {
		start <- t0
	}
	wg.Wait()
	elapsed := time.Since(t0)
	after, err := getUsage()
	if err != nil {
		return measurement{}, "", err
	}

	m := measurement{elapsed: elapsed, before: before, after: after}
	hs := make([]*hdrhistogram.Histogram, len(jobs))
	var jobErr error
	for i, j := range jobs {
		m.ops += j.ops
		hs[i] = j.lat
		if j.err != nil {
			jobErr = errors.Join(jobErr, fmt.Errorf("job %d: %w", j.id, j.err))
		}
	}
	if jobErr != nil {
		return measurement{}, "", jobErr
	}
	if err := ctx.Err(); err != nil {
		return measurement{}, "", fmt.Errorf("interrupted: %w", context.Cause(ctx))
	}
	m.bytes = m.ops * spec.bs
	m.lat = mergeLatency(hs)
	return m, hows[0], nil
}

// rawJob is one job: one ring (or one group of psync goroutines), its own
// buffers, its own random stream and histogram.
type rawJob struct {
	id   int
	spec *rawSpec
	fd   int
	stop atomic.Bool // set on interrupt

	arena *iouring.Arena
	bufs  [][]byte
	ring  *iouring.Ring
	fixed bool // buffers registered: READ_FIXED / WRITE_FIXED

	// Sequential position: I/O number n goes to block (first+n) mod blocks.
	first, next uint64

	ops int64
	lat *hdrhistogram.Histogram
	err error
}

// setupBuffers maps the job's buffers, one per I/O in flight; write data is
// random (so no layer below can shortcut zeros or repeats) and written once.
func (j *rawJob) setupBuffers() error {
	s := j.spec
	a, err := iouring.NewArena(s.iodepth * int(s.bs))
	if err != nil {
		return fmt.Errorf("buffers: %w", err)
	}
	j.arena = a
	mem := a.Bytes()
	j.bufs = make([][]byte, s.iodepth)
	for i := range j.bufs {
		j.bufs[i] = mem[i*int(s.bs) : (i+1)*int(s.bs) : (i+1)*int(s.bs)]
	}
	if s.write() {
		fillRandom(mem[:s.iodepth*int(s.bs)], uint64(j.id)+1)
	}
	blocks := uint64(s.size / s.bs)
	j.first = blocks / uint64(s.jobs) * uint64(j.id)
	return nil
}

// setupRing prepares the job for io_uring: ring and registered buffers.
// It runs on the job's locked OS thread.
func (j *rawJob) setupRing() (string, error) {
	if err := j.setupBuffers(); err != nil {
		return "", err
	}
	entries := uint32(1)
	for entries < uint32(j.spec.iodepth) {
		entries <<= 1
	}
	r, err := iouring.NewRing(iouring.RingOptions{Entries: entries})
	if err != nil {
		return "", fmt.Errorf("creating a ring of %d entries: %w", entries, err)
	}
	j.ring = r
	if r.CQEntries() < j.spec.iodepth {
		return "", fmt.Errorf("ring of %d entries has only %d CQ entries for iodepth %d", entries, r.CQEntries(), j.spec.iodepth)
	}
	how := fmt.Sprintf("bench: one ring per job, %d entries, READ_FIXED/WRITE_FIXED on registered buffers", entries)
	if err := r.RegisterBuffers(j.bufs); err != nil {
		how = fmt.Sprintf("bench: one ring per job, %d entries, plain READ/WRITE (buffer registration refused: %v)", entries, err)
	} else {
		j.fixed = true
	}
	return how, nil
}

// setupPsync prepares the job for pread/pwrite goroutines.
func (j *rawJob) setupPsync() (string, error) {
	if err := j.setupBuffers(); err != nil {
		return "", err
	}
	return fmt.Sprintf("bench: pread/pwrite from %d goroutines per job", j.spec.iodepth), nil
}

// teardown releases the ring and the buffers (after all I/O completed).
func (j *rawJob) teardown() {
	if j.ring != nil {
		if j.fixed {
			if err := j.ring.UnregisterBuffers(); err != nil && j.err == nil {
				j.err = fmt.Errorf("unregistering buffers: %w", err)
			}
		}
		if err := j.ring.Close(); err != nil && j.err == nil {
			j.err = fmt.Errorf("closing the ring: %w", err)
		}
		j.ring = nil
	}
	if j.arena != nil {
		if err := j.arena.Close(); err != nil && j.err == nil {
			j.err = fmt.Errorf("unmapping buffers: %w", err)
		}
		j.arena = nil
	}
}

// offsetSource yields the offset of each next I/O of a job.
type offsetSource struct {
	rng    *rand.Rand
	blocks uint64
	bs     int64
	random bool
}

func newOffsetSource(spec *rawSpec, seed uint64) offsetSource {
	return offsetSource{
		rng:    rand.New(rand.NewPCG(seed, 0x72617762_6c6f636b)),
		blocks: uint64(spec.size / spec.bs),
		bs:     spec.bs,
		random: !spec.sequential(),
	}
}

// at returns the offset of the n-th I/O of a job that starts at block first.
func (o *offsetSource) at(first, n uint64) int64 {
	if o.random {
		return int64(o.rng.Uint64N(o.blocks)) * o.bs
	}
	return int64((first+n)%o.blocks) * o.bs
}

// runRing is the io_uring loop, fio-style: keep iodepth I/Os in flight,
// submit everything prepared and wait for at least one completion in ONE
// io_uring_enter, reap everything that completed, refill. Slot i owns
// buffer i; user_data is the slot index.
func (j *rawJob) runRing(t0 time.Time) {
	s := j.spec
	offs := newOffsetSource(s, uint64(j.id)+1)
	r := j.ring
	write := s.write()
	bs := int32(s.bs)

	free := make([]uint16, 0, s.iodepth) // stack of idle slots
	for i := s.iodepth - 1; i >= 0; i-- {
		free = append(free, uint16(i))
	}
	busy := make([]bool, s.iodepth)
	submitted := make([]int64, s.iodepth) // ns since t0
	offset := make([]int64, s.iodepth)
	fresh := make([]uint16, 0, s.iodepth) // prepared in this round, not yet timestamped
	inflight := 0
	stopping := false
	var now int64
	var failed error

	complete := func(ud uint64, res int32) {
		if ud >= uint64(len(busy)) || !busy[ud] {
			panic(fmt.Sprintf("bench: completion for slot %d, which has no I/O in flight", ud))
		}
		slot := uint16(ud)
		busy[slot] = false
		inflight--
		free = append(free, slot)
		switch {
		case res < 0:
			if failed == nil {
				failed = fmt.Errorf("%s of %d bytes at offset %d: %w", s.rw, s.bs, offset[slot], syscall.Errno(-res))
			}
		case res != bs:
			if failed == nil {
				failed = fmt.Errorf("%s of %d bytes at offset %d: short transfer of %d bytes", s.rw, s.bs, offset[slot], res)
			}
		default:
			j.ops++
			recordLatency(j.lat, now-submitted[slot])
		}
	}

	for {
		if !stopping {
			for len(free) > 0 {
				slot := free[len(free)-1]
				off := offs.at(j.first, j.next)
				buf := j.bufs[slot]
				var err error
				switch {
				case write && j.fixed:
					err = r.PrepWriteFixed(j.fd, buf, off, slot, uint64(slot))
				case write:
					err = r.PrepWrite(j.fd, buf, off, uint64(slot))
				case j.fixed:
					err = r.PrepReadFixed(j.fd, buf, off, slot, uint64(slot))
				default:
					err = r.PrepRead(j.fd, buf, off, uint64(slot))
				}
				if errors.Is(err, iouring.ErrSQFull) || errors.Is(err, iouring.ErrCQFull) {
					break
				}
				if err != nil {
					failed = fmt.Errorf("preparing a %s at offset %d: %w", s.rw, off, err)
					stopping = true
					break
				}
				j.next++
				free = free[:len(free)-1]
				busy[slot] = true
				offset[slot] = off
				fresh = append(fresh, slot)
				inflight++
			}
		}
		if inflight == 0 {
			break
		}
		t := int64(time.Since(t0))
		for _, slot := range fresh {
			submitted[slot] = t
		}
		fresh = fresh[:0]
		if _, err := r.Submit(1); err != nil && !errors.Is(err, iouring.ErrBusy) {
			// The ring is unusable; I/O still in flight completes into
			// memory that teardown keeps mapped until Close cancels it.
			j.err = errors.Join(failed, fmt.Errorf("io_uring_enter: %w", err))
			return
		}
		now = int64(time.Since(t0))
		r.Reap(complete)
		if now >= int64(s.runtime) || failed != nil || j.stop.Load() {
			stopping = true
		}
	}
	j.err = failed
}

// runPsync runs iodepth goroutines, each doing one blocking pread/pwrite at
// a time on the shared fd.
func (j *rawJob) runPsync(t0 time.Time) {
	s := j.spec
	var wg sync.WaitGroup
	var mu sync.Mutex // guards j.ops, j.lat, j.err
	var failed atomic.Bool
	var seq atomic.Uint64
	for g := 0; g < s.iodepth; g++ {
		wg.Go(func() {
			offs := newOffsetSource(s, uint64(j.id)<<16|uint64(g)+1)
			buf := j.bufs[g]
			// Latencies are batched locally so the shared histogram's
			// lock is taken once per batch, not once per I/O.
			var batch [256]int64
			nlat := 0
			var ops int64
			var err error
			flush := func() {
				mu.Lock()
				for _, v := range batch[:nlat] {
					recordLatency(j.lat, v)
				}
				j.ops += ops
				if err != nil && j.err == nil {
					j.err = err
				}
				mu.Unlock()
				nlat, ops = 0, 0
			}
			defer flush()
			for !failed.Load() && !j.stop.Load() {
				var n uint64
				if !offs.random {
					n = seq.Add(1) - 1 // the job's goroutines share one sequential stream
				}
				off := offs.at(j.first, n)
				start := time.Since(t0)
				var k int
				var e error
				if s.write() {
					k, e = unix.Pwrite(j.fd, buf, off)
				} else {
					k, e = unix.Pread(j.fd, buf, off)
				}
				end := time.Since(t0)
				if errors.Is(e, unix.EINTR) {
					continue
				}
				if e == nil && k != len(buf) {
					e = fmt.Errorf("short transfer of %d bytes", k)
				}
				if e != nil {
					err = fmt.Errorf("%s of %d bytes at offset %d: %w", s.rw, s.bs, off, e)
					failed.Store(true)
					return
				}
				ops++
				batch[nlat] = int64(end - start)
				nlat++
				if nlat == len(batch) {
					flush()
				}
				if end >= s.runtime {
					return
				}
			}
		})
	}
	wg.Wait()
}

// fillRandom fills p with pseudo-random bytes from seed, eight at a time,
// never a zero word: data no layer below can compress or skip.
func fillRandom(p []byte, seed uint64) {
	rng := rand.NewPCG(seed, 0x66696c6c)
	i := 0
	for ; i+8 <= len(p); i += 8 {
		v := rng.Uint64() | 1
		binary.LittleEndian.PutUint64(p[i:], v)
	}
	for ; i < len(p); i++ {
		p[i] = byte(rng.Uint64()) | 1
	}
}

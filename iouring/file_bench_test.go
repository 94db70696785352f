//go:build linux

package iouring

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ncw/directio"
)

// Benchmarks: 4 KiB random reads at queue depth 32, the workload to compare
// with `fio --direct=1 --ioengine=io_uring --rw=randread --bs=4k
// --iodepth=32` on the same target.
//
// Target: RAWBLOCK_BENCH_FILE (a file or block device, only read), else a
// temporary O_DIRECT file of RAWBLOCK_BENCH_SIZE bytes (default 256 MiB)
// under RAWBLOCK_BENCH_DIR (default the temp dir), written once so that
// reads reach the device (O_DIRECT reads of unwritten blocks do no I/O).

const benchQD = 32

var (
	benchOnce sync.Once
	benchFile *os.File
	benchSize int64
	benchDir  string
	benchErr  error
)

// Tuning experiments: RAWBLOCK_TUNE_SPIN, RAWBLOCK_TUNE_IDLE (durations),
// RAWBLOCK_TUNE_KICKBELOW, RAWBLOCK_TUNE_WAITERSPIN (counts) and
// RAWBLOCK_TUNE_NETPOLL (0: wait in io_uring_enter) override the reactor's
// knobs for this test binary.
func applyTuning() {
	if v, err := strconv.ParseBool(os.Getenv("RAWBLOCK_TUNE_NETPOLL")); err == nil {
		netpollSleep = v
	}
	if v, err := time.ParseDuration(os.Getenv("RAWBLOCK_TUNE_SPIN")); err == nil {
		reactorSpin = v
	}
	if v, err := time.ParseDuration(os.Getenv("RAWBLOCK_TUNE_IDLE")); err == nil {
		reactorIdle = v
	}
	if v, err := strconv.Atoi(os.Getenv("RAWBLOCK_TUNE_KICKBELOW")); err == nil {
		kickBelow = v
	}
	if v, err := time.ParseDuration(os.Getenv("RAWBLOCK_TUNE_BATCHWAIT")); err == nil {
		batchWait = v
	}
	if v, err := strconv.Atoi(os.Getenv("RAWBLOCK_TUNE_WAITDIV")); err == nil {
		waitDiv = v
	}
	if v, err := strconv.Atoi(os.Getenv("RAWBLOCK_TUNE_WAITERSPIN")); err == nil {
		waiterSpin = v
	}
}

func TestMain(m *testing.M) {
	applyTuning()
	code := m.Run()
	if benchFile != nil {
		benchFile.Close()
	}
	if benchDir != "" {
		os.RemoveAll(benchDir)
	}
	os.Exit(code)
}

func benchTarget(b *testing.B) (int, int64) {
	benchOnce.Do(func() { benchErr = openBenchTarget() })
	if benchErr != nil {
		b.Fatal(benchErr)
	}
	return int(benchFile.Fd()), benchSize
}

func openBenchTarget() error {
	if path := os.Getenv("RAWBLOCK_BENCH_FILE"); path != "" {
		f, err := directio.OpenFile(path, os.O_RDONLY, 0)
		if err != nil {
			return err
		}
		size, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			return err
		}
		benchFile, benchSize = f, size/4096*4096
		return nil
	}
	size := int64(256 << 20)
	if s := os.Getenv("RAWBLOCK_BENCH_SIZE"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil || v < 1<<20 {
			return fmt.Errorf("RAWBLOCK_BENCH_SIZE=%q: want a byte count of at least 1 MiB", s)
		}
		size = v / (1 << 20) * (1 << 20)
	}
	dir, err := os.MkdirTemp(os.Getenv("RAWBLOCK_BENCH_DIR"), "iouring-bench")
	if err != nil {
		return err
	}
	benchDir = dir
	f, err := directio.OpenFile(filepath.Join(dir, "data"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	chunk := directio.AlignedBlock(1 << 20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	benchFile, benchSize = f, size
	return nil
}

// cpuTime is the CPU time (user + system) this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchReport adds IOPS, CPU time per request (this process: user +
// system, so it includes the kernel's submission and completion work but
// not a loop device's worker threads) and per-request costs of the File's
// machinery.
func benchReport(b *testing.B, n int, elapsed, cpu time.Duration, f *File) {
	b.ReportMetric(float64(n)/elapsed.Seconds(), "IOPS")
	b.ReportMetric(float64(cpu.Nanoseconds())/1000/float64(n), "cpu-us/req")
	if f == nil {
		return
	}
	st := f.Stats()
	if st.Requests > 0 {
		b.ReportMetric(float64(st.Enters)/float64(st.Requests), "enters/req")
		b.ReportMetric(float64(st.Kicks)/float64(st.Requests), "kicks/req")
		b.ReportMetric(float64(st.Parks)/float64(st.Requests), "parks/req")
	}
}

// benchFileRandRead runs benchQD goroutines, each doing one synchronous
// 4 KiB ReadAt at a time at random offsets; with fixed, into buffers of a
// registered arena (READ_FIXED).
func benchFileRandRead(b *testing.B, mode Mode, fixed bool) {
	fd, size := benchTarget(b)
	var arena *Arena
	if fixed {
		a, err := NewArena(benchQD * 4096)
		if err != nil {
			b.Fatal(err)
		}
		defer a.Close()
		arena = a
	}
	f, err := NewFile(fd, FileOptions{Mode: mode, Arena: arena})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.Log(f.Reason())
	blocks := size / 4096
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	for g := range benchQD {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := directio.AlignedBlock(4096)
			if arena != nil {
				buf = arena.Bytes()[g*4096 : (g+1)*4096]
			}
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for next.Add(1) <= int64(b.N) {
				if _, err := f.ReadAt(buf, rng.Int64N(blocks)*4096); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	benchReport(b, b.N, elapsed, cpu, f)
}

// BenchmarkFileRandRead4kQD32: 32 goroutines, File.ReadAt, io_uring.
func BenchmarkFileRandRead4kQD32(b *testing.B) {
	needIOURing(b)
	benchFileRandRead(b, ModeIOURing, false)
}

// BenchmarkFileRandRead4kQD32Fixed: the same into a registered arena.
func BenchmarkFileRandRead4kQD32Fixed(b *testing.B) {
	needIOURing(b)
	benchFileRandRead(b, ModeIOURing, true)
}

// BenchmarkFileRandRead4kQD32Psync: the same through pread.
func BenchmarkFileRandRead4kQD32Psync(b *testing.B) {
	benchFileRandRead(b, ModePsync, false)
}

// BenchmarkFileBatchRandRead4kQD32: one goroutine issuing File.Do batches
// of 32 reads.
func BenchmarkFileBatchRandRead4kQD32(b *testing.B) {
	needIOURing(b)
	fd, size := benchTarget(b)
	f, err := NewFile(fd, FileOptions{Mode: ModeIOURing})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	blocks := size / 4096
	ops := make([]Op, benchQD)
	for i := range ops {
		ops[i].Buf = directio.AlignedBlock(4096)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	done := 0
	for done < b.N {
		n := min(len(ops), b.N-done)
		for i := range n {
			ops[i].Off = rng.Int64N(blocks) * 4096
		}
		if err := f.Do(ops[:n]); err != nil {
			b.Fatal(err)
		}
		done += n
	}
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	benchReport(b, b.N, elapsed, cpu, f)
}

// BenchmarkRingRandRead4kQD32: the ring alone, driven the way fio drives
// it: one goroutine keeps 32 reads in flight, submitting and waiting in one
// io_uring_enter per round.
func BenchmarkRingRandRead4kQD32(b *testing.B) {
	needIOURing(b)
	fd, size := benchTarget(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r, err := NewRing(RingOptions{Entries: 2 * benchQD})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	blocks := size / 4096
	bufs := make([][]byte, benchQD)
	for i := range bufs {
		bufs[i] = directio.AlignedBlock(4096)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	issued, completed := 0, 0
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	for i := 0; i < benchQD && issued < b.N; i++ {
		if err := r.PrepRead(fd, bufs[i], rng.Int64N(blocks)*4096, uint64(i)); err != nil {
			b.Fatal(err)
		}
		issued++
	}
	for completed < b.N {
		if _, err := r.Submit(1); err != nil {
			b.Fatal(err)
		}
		r.Reap(func(ud uint64, res int32) {
			if res != 4096 {
				b.Fatalf("read: res %d", res)
			}
			completed++
			if issued < b.N {
				if err := r.PrepRead(fd, bufs[ud], rng.Int64N(blocks)*4096, ud); err != nil {
					b.Fatal(err)
				}
				issued++
			}
		})
	}
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	benchReport(b, b.N, elapsed, cpu, nil)
}

// BenchmarkReactorNopQD32 measures the synchronous path's own cost: 32
// goroutines each making one NOP request at a time through the reactor
// (no device involved). Compare with BenchmarkRingNopBatch32.
func BenchmarkReactorNopQD32(b *testing.B) {
	needIOURing(b)
	f, err := NewFile(int(os.Stdin.Fd()), FileOptions{Mode: ModeIOURing})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	r := f.be.(*uringBackend).reactors[0]
	var next atomic.Int64
	var wg sync.WaitGroup
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	for range benchQD {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if res, _ := r.call(opNop, kindSync, nil, 0, nil); res != 0 {
					b.Errorf("NOP: res %d", res)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	benchReport(b, b.N, elapsed, cpu, f)
}

// BenchmarkRingNopBatch32: one goroutine keeping 32 NOPs in flight on a
// ring, the floor the reactor's cost is measured against.
func BenchmarkRingNopBatch32(b *testing.B) {
	needIOURing(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r, err := NewRing(RingOptions{Entries: 2 * benchQD})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	issued, completed := 0, 0
	for completed < b.N {
		for issued < b.N && issued-completed < benchQD {
			if err := r.PrepNop(uint64(issued)); err != nil {
				b.Fatal(err)
			}
			issued++
		}
		if _, err := r.Submit(1); err != nil {
			b.Fatal(err)
		}
		completed += r.Reap(func(uint64, int32) {})
	}
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	benchReport(b, b.N, elapsed, cpu, nil)
}

package crashtest

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

// smallConfig keeps a harness test to a second or two.
func smallConfig(seed uint64, points int) Config {
	return Config{Seed: seed, Points: points, PointsPerRun: 10, MaxObjectSize: 256 << 10, MaxWrite: 256 << 10, Objects: 4, Steps: 8}
}

func TestRun(t *testing.T) {
	var calls int
	cfg := smallConfig(1, 40)
	cfg.Check = Fsck
	cfg.Progress = func(Stats) { calls++ }
	st, err := Run(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(st)
	if st.Points < 40 || st.Runs != 4 || st.WorkloadCrashes == 0 || st.Steps == 0 || st.Syncs == 0 || st.BytesWritten == 0 {
		t.Errorf("stats %+v", st)
	}
	if st.Points != st.WorkloadCrashes+st.RecoveryCrashes+st.CloseCrashes+st.CleanCloses {
		t.Errorf("points %d are not the sum of their kinds: %+v", st.Points, st)
	}
	if calls == 0 {
		t.Error("Progress never called")
	}
}

// lyingFlush is a device whose Flush reports success without making
// anything durable, once armed.
type lyingFlush struct {
	*engine.FaultDevice
}

func (lyingFlush) Flush() error { return nil }

// TestRunCatchesLyingDevice: synced data that the device drops must be
// reported as a broken promise, with the seed and a trace.
func TestRunCatchesLyingDevice(t *testing.T) {
	cfg := smallConfig(2, 200)
	cfg.Wrap = func(d *engine.FaultDevice) engine.Device { return lyingFlush{d} }
	_, err := Run(context.Background(), cfg)
	var f *Failure
	if !errors.As(err, &f) {
		t.Fatalf("a device that ignores Flush went unnoticed: %v", err)
	}
	msg := f.Error()
	t.Log(msg[:min(len(msg), 2000)])
	if f.Seed < 2 || f.Point < 1 || len(f.Trace) == 0 || !strings.Contains(msg, "replay: Seed") {
		t.Errorf("failure lacks its seed, point or trace: seed %d point %d, %d trace lines", f.Seed, f.Point, len(f.Trace))
	}
}

// TestRunCatchesMisdirectedReads: a device that answers some reads with
// the wrong blocks (another object's data, or another offset's) is caught.
type misdirect struct {
	*engine.FaultDevice
	n *int
}

func (m misdirect) ReadAt(p []byte, off int64) (int, error) {
	*m.n++
	if *m.n%7 == 0 {
		if off+int64(len(p))+64<<10 <= m.Size() {
			off += 64 << 10
		} else {
			off -= 64 << 10
		}
	}
	return m.FaultDevice.ReadAt(p, off)
}

func TestRunCatchesMisdirectedReads(t *testing.T) {
	var n int
	cfg := smallConfig(3, 100)
	cfg.Wrap = func(d *engine.FaultDevice) engine.Device { return misdirect{d, &n} }
	_, err := Run(context.Background(), cfg)
	var f *Failure
	if !errors.As(err, &f) {
		t.Fatalf("misdirected reads went unnoticed: %v", err)
	}
	t.Log(f.Err)
}

func TestRunCheckHook(t *testing.T) {
	errFsck := errors.New("fsck: block 7 owned twice")
	calls := 0
	cfg := smallConfig(4, 20)
	cfg.Check = func(d engine.Device) error {
		calls++
		if d.Size() != 32<<20 {
			t.Errorf("checked a device of %d bytes", d.Size())
		}
		if calls == 3 {
			return errFsck
		}
		return nil
	}
	_, err := Run(context.Background(), cfg)
	if !errors.Is(err, errFsck) {
		t.Fatalf("Run = %v, want the check's error", err)
	}
}

func TestRunConfigAndCancel(t *testing.T) {
	for _, c := range []Config{
		{Points: 0},
		{Points: 1, Objects: 65},
		{Points: 1, SectorSize: 1024},
		{Points: 1, DeviceSize: 1 << 20},
		{Points: 1, MaxObjectSize: 100},
		{Points: 1, MaxWrite: 2 << 20},
		{Points: 1, CacheSize: 1 << 20},
		{Points: 1, Steps: -1},
		{Points: 1, Objects: 40, MaxObjectSize: 4 << 20},
	} {
		if _, err := Run(context.Background(), c); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Run(%+v) = %v, want fs.ErrInvalid", c, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Run(ctx, smallConfig(5, 10)); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled Run = %v", err)
	}
}

func TestFsck(t *testing.T) {
	d := engine.NewFaultDevice(32<<20, 512)
	if err := engine.Format(d, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := Fsck(d); err != nil {
		t.Fatalf("fresh device: %v", err)
	}
	// Destroy both superblock copies (A at 0, B one engine block on).
	if _, err := d.WriteAt(make([]byte, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := Fsck(d); !errors.Is(err, engine.ErrCorrupt) {
		t.Fatalf("device without superblocks: %v, want ErrCorrupt", err)
	}
}

package engine_test

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

const fdSector = 512

func fdFill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func fdMustWrite(t *testing.T, d engine.Device, p []byte, off int64) {
	t.Helper()
	if n, err := d.WriteAt(p, off); err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(p), off, n, err)
	}
}

func fdMustRead(t *testing.T, d engine.Device, n int, off int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if got, err := d.ReadAt(p, off); err != nil || got != n {
		t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, got, err)
	}
	return p
}

func TestFaultDeviceValidation(t *testing.T) {
	d := engine.NewFaultDevice(64<<10, fdSector)
	if d.Size() != 64<<10 || d.BlockSize() != fdSector {
		t.Fatalf("Size %d BlockSize %d", d.Size(), d.BlockSize())
	}
	buf := make([]byte, fdSector)
	for _, tc := range []struct {
		p    []byte
		off  int64
		want error
	}{
		{buf, 1, engine.ErrMisaligned},
		{buf[:100], 0, engine.ErrMisaligned},
		{buf, -fdSector, engine.ErrOutOfRange},
		{buf, 64 << 10, engine.ErrOutOfRange},
		{make([]byte, 2*fdSector), 64<<10 - fdSector, engine.ErrOutOfRange},
	} {
		if _, err := d.WriteAt(tc.p, tc.off); !errors.Is(err, tc.want) {
			t.Errorf("WriteAt(%d at %d) = %v, want %v", len(tc.p), tc.off, err, tc.want)
		}
		if _, err := d.ReadAt(tc.p, tc.off); !errors.Is(err, tc.want) {
			t.Errorf("ReadAt(%d at %d) = %v, want %v", len(tc.p), tc.off, err, tc.want)
		}
	}
	if st := d.Stats(); st.Reads != 0 || st.Writes != 0 {
		t.Errorf("refused calls were counted: %+v", st)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(buf, 0); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("ReadAt after Close = %v", err)
	}
	if _, err := d.WriteAt(buf, 0); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("WriteAt after Close = %v", err)
	}
	if err := d.Flush(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Flush after Close = %v", err)
	}
	if err := d.Close(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("second Close = %v", err)
	}
	for _, f := range []func(){
		func() { engine.NewFaultDevice(4096, 1000) },
		func() { engine.NewFaultDevice(1000, 512) },
		func() { engine.NewFaultDevice(0, 512) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Error("bad geometry did not panic")
				}
			}()
			f()
		}()
	}
}

// TestFaultDeviceVolatility: reads see every write at once; a reboot keeps
// flushed writes always and unflushed ones sometimes, whole without tear.
func TestFaultDeviceVolatility(t *testing.T) {
	outcomes := map[string]int{}
	for seed := uint64(0); seed < 200; seed++ {
		d := engine.NewFaultDevice(1<<20, fdSector)
		fdMustWrite(t, d, fdFill(1, 2*fdSector), 0)
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		fdMustWrite(t, d, fdFill(2, 4*fdSector), 4096)
		fdMustWrite(t, d, fdFill(3, fdSector), 0)
		if got := fdMustRead(t, d, 2*fdSector, 0); got[0] != 3 || got[fdSector] != 1 {
			t.Fatalf("read before crash: %d %d", got[0], got[fdSector])
		}
		if got := fdMustRead(t, d, 8192, 0); got[4096] != 2 || got[2*fdSector] != 0 {
			t.Fatalf("read before crash: %d %d", got[4096], got[2*fdSector])
		}
		if st := d.Stats(); st.Pending != 2 || st.PendingBytes != 5*fdSector {
			t.Fatalf("pending %+v", st)
		}
		nd, rs := d.Reboot(rand.New(rand.NewPCG(seed, 1)), false)
		if rs.Pending != 2 || rs.Torn != 0 || rs.Kept > 2 {
			t.Fatalf("reboot stats %+v", rs)
		}
		if _, err := d.ReadAt(make([]byte, fdSector), 0); !errors.Is(err, engine.ErrCrashed) {
			t.Fatalf("old device after reboot: %v", err)
		}
		got := fdMustRead(t, nd, 8192, 0)
		if got[fdSector] != 1 {
			t.Fatalf("seed %d: flushed sector lost: %d", seed, got[fdSector])
		}
		first := got[0]
		if first != 1 && first != 3 {
			t.Fatalf("seed %d: sector 0 reads %d", seed, first)
		}
		second := got[4096]
		if !bytes.Equal(got[4096:4096+4*fdSector], fdFill(second, 4*fdSector)) || (second != 0 && second != 2) {
			t.Fatalf("seed %d: untorn write came back partly: %v", seed, got[4096:4096+4*fdSector])
		}
		kept := 0
		if first == 3 {
			kept++
		}
		if second == 2 {
			kept++
		}
		if kept != rs.Kept {
			t.Fatalf("seed %d: %d writes survived, stats say %d", seed, kept, rs.Kept)
		}
		outcomes[fmt.Sprint(first, second)]++
	}
	for _, want := range []string{"1 0", "3 0", "1 2", "3 2"} {
		if outcomes[want] == 0 {
			t.Errorf("outcome %q never seen in 200 reboots: %v", want, outcomes)
		}
	}
}

// TestFaultDeviceTearing: a torn write keeps a subset of whole sectors,
// never part of a sector; without tear a write is all or nothing.
func TestFaultDeviceTearing(t *testing.T) {
	const sectors = 16
	for _, tear := range []bool{false, true} {
		sawMixed := false
		for seed := uint64(0); seed < 300; seed++ {
			d := engine.NewFaultDevice(1<<20, fdSector)
			p := make([]byte, sectors*fdSector)
			for i := range p {
				p[i] = byte(i/fdSector + 1)
			}
			fdMustWrite(t, d, p, 8192)
			nd, rs := d.Reboot(rand.New(rand.NewPCG(seed, 2)), tear)
			got := fdMustRead(t, nd, len(p), 8192)
			n := 0
			for s := 0; s < sectors; s++ {
				sec := got[s*fdSector : (s+1)*fdSector]
				switch {
				case bytes.Equal(sec, p[s*fdSector:(s+1)*fdSector]):
					n++
				case bytes.Equal(sec, make([]byte, fdSector)):
				default:
					t.Fatalf("tear=%v seed %d: sector %d is neither old nor new", tear, seed, s)
				}
			}
			if n != 0 && n != sectors {
				if !tear {
					t.Fatalf("seed %d: untorn write kept %d of %d sectors", seed, n, sectors)
				}
				sawMixed = true
				if rs.Torn != 1 {
					t.Fatalf("seed %d: torn write not counted: %+v", seed, rs)
				}
			}
		}
		if tear && !sawMixed {
			t.Error("tear=true never tore a 16-sector write in 300 reboots")
		}
	}
}

// TestFaultDeviceReorder: two volatile writes to one sector may land in
// either order.
func TestFaultDeviceReorder(t *testing.T) {
	seen := map[byte]bool{}
	for seed := uint64(0); seed < 200; seed++ {
		d := engine.NewFaultDevice(1<<20, fdSector)
		fdMustWrite(t, d, fdFill(1, fdSector), 0)
		fdMustWrite(t, d, fdFill(2, fdSector), 0)
		nd, _ := d.Reboot(rand.New(rand.NewPCG(seed, 3)), false)
		seen[fdMustRead(t, nd, fdSector, 0)[0]] = true
	}
	for _, v := range []byte{0, 1, 2} {
		if !seen[v] {
			t.Errorf("value %d never survived: %v", v, seen)
		}
	}
}

func TestFaultDeviceRebootDeterministic(t *testing.T) {
	run := func() []byte {
		d := engine.NewFaultDevice(1<<20, fdSector)
		for i := range 50 {
			fdMustWrite(t, d, fdFill(byte(i+1), 8*fdSector), int64(i%7)*fdSector*3)
		}
		nd, _ := d.Reboot(rand.New(rand.NewPCG(42, 42)), true)
		return fdMustRead(t, nd, 64<<10, 0)
	}
	if !bytes.Equal(run(), run()) {
		t.Fatal("the same history and seed rebooted to different contents")
	}
}

func TestFaultDeviceCrashAfter(t *testing.T) {
	d := engine.NewFaultDevice(1<<20, fdSector)
	d.CrashAfter(3)
	fdMustWrite(t, d, fdFill(1, fdSector), 0)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	fdMustWrite(t, d, fdFill(2, fdSector), fdSector)
	if d.Crashed() || d.Mutations() != 3 {
		t.Fatalf("crashed early: %v after %d", d.Crashed(), d.Mutations())
	}
	if n, err := d.WriteAt(fdFill(3, fdSector), 2*fdSector); !errors.Is(err, engine.ErrCrashed) || n != 0 {
		t.Fatalf("4th mutation = %d, %v; want ErrCrashed", n, err)
	}
	if !d.Crashed() {
		t.Fatal("not crashed")
	}
	for name, err := range map[string]error{
		"read":  func() error { _, err := d.ReadAt(make([]byte, fdSector), 0); return err }(),
		"write": func() error { _, err := d.WriteAt(make([]byte, fdSector), 0); return err }(),
		"flush": d.Flush(),
		"close": d.Close(),
	} {
		if !errors.Is(err, engine.ErrCrashed) {
			t.Errorf("%s after crash = %v", name, err)
		}
	}
	// The cut write was in flight: some reboots find it.
	found := false
	for seed := uint64(0); seed < 100 && !found; seed++ {
		c := engine.NewFaultDevice(1<<20, fdSector)
		fdMustWrite(t, c, fdFill(1, fdSector), 0)
		c.CrashAfter(0)
		if _, err := c.WriteAt(fdFill(3, fdSector), fdSector); !errors.Is(err, engine.ErrCrashed) {
			t.Fatal(err)
		}
		nd, rs := c.Reboot(rand.New(rand.NewPCG(seed, 4)), false)
		if rs.Pending != 2 {
			t.Fatalf("pending %+v", rs)
		}
		found = fdMustRead(t, nd, fdSector, fdSector)[0] == 3
	}
	if !found {
		t.Error("a write cut by the crash never persisted")
	}
	nd, _ := d.Reboot(rand.New(rand.NewPCG(1, 1)), true)
	if got := fdMustRead(t, nd, fdSector, 0); got[0] != 1 {
		t.Errorf("flushed write lost: %d", got[0])
	}
	if nd.Crashed() || nd.Mutations() != 0 || nd.Stats() != (engine.FaultStats{Reads: 1}) {
		t.Errorf("rebooted device state: crashed %v mutations %d stats %+v", nd.Crashed(), nd.Mutations(), nd.Stats())
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("second Reboot of one device did not panic")
			}
		}()
		d.Reboot(rand.New(rand.NewPCG(1, 1)), true)
	}()
	// A cut flush makes nothing durable.
	f := engine.NewFaultDevice(1<<20, fdSector)
	fdMustWrite(t, f, fdFill(5, fdSector), 0)
	f.CrashAfter(0)
	if err := f.Flush(); !errors.Is(err, engine.ErrCrashed) {
		t.Fatalf("cut flush = %v", err)
	}
	if _, rs := f.Reboot(rand.New(rand.NewPCG(1, 1)), false); rs.Pending != 1 {
		t.Errorf("cut flush made its write durable: %+v", rs)
	}
	// Disarming.
	g := engine.NewFaultDevice(1<<20, fdSector)
	g.CrashAfter(0)
	g.CrashAfter(-1)
	fdMustWrite(t, g, fdFill(1, fdSector), 0)
	if g.Crashed() {
		t.Error("disarmed crash fired")
	}
}

func TestFaultDeviceInjection(t *testing.T) {
	d := engine.NewFaultDevice(1<<20, fdSector)
	d.FailOn(engine.FaultWrite, 2, syscall.EIO)
	fdMustWrite(t, d, fdFill(1, fdSector), 0)
	if n, err := d.WriteAt(fdFill(2, fdSector), fdSector); !errors.Is(err, syscall.EIO) || n != 0 {
		t.Fatalf("2nd write = %d, %v; want EIO", n, err)
	}
	if got := fdMustRead(t, d, fdSector, fdSector); got[0] != 0 {
		t.Fatalf("failed write stored data: %d", got[0])
	}
	fdMustWrite(t, d, fdFill(3, fdSector), fdSector)

	d.FailOn(engine.FaultFlush, 1, syscall.EIO)
	if err := d.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush = %v", err)
	}
	if st := d.Stats(); st.Pending != 2 {
		t.Fatalf("failed flush changed the backlog: %+v", st)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := d.Stats(); st.Pending != 0 || st.Flushes != 2 || st.Writes != 3 || st.Injected != 2 {
		t.Fatalf("stats %+v", st)
	}

	d.FailOn(engine.FaultRead, 1, syscall.EIO)
	if _, err := d.ReadAt(make([]byte, fdSector), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read = %v", err)
	}
	fdMustRead(t, d, fdSector, 0)

	// A predicate and a repeating fault: ENOSPC on every write past 512 KiB.
	if err := d.Inject(engine.Fault{Op: engine.FaultWrite, Times: -1, Err: syscall.ENOSPC,
		Match: func(off, n int64) bool { return off+n > 512<<10 }}); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := d.WriteAt(fdFill(4, 4096), 600<<10); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("write past 512 KiB = %v", err)
		}
		fdMustWrite(t, d, fdFill(4, 4096), 4096)
	}
	d.ClearFaults()
	fdMustWrite(t, d, fdFill(4, 4096), 600<<10)

	// Short transfers report less with no error.
	if err := d.Inject(engine.Fault{Op: engine.FaultWrite, Short: true}); err != nil {
		t.Fatal(err)
	}
	if n, err := d.WriteAt(fdFill(6, 4*fdSector), 64<<10); err != nil || n != 2*fdSector {
		t.Fatalf("short write = %d, %v", n, err)
	}
	got := fdMustRead(t, d, 4*fdSector, 64<<10)
	if !bytes.Equal(got[:2*fdSector], fdFill(6, 2*fdSector)) || !bytes.Equal(got[2*fdSector:], make([]byte, 2*fdSector)) {
		t.Fatal("short write stored more or less than it reported")
	}
	if err := d.Inject(engine.Fault{Op: engine.FaultRead, Short: true}); err != nil {
		t.Fatal(err)
	}
	p := fdFill(9, 4*fdSector)
	if n, err := d.ReadAt(p, 64<<10); err != nil || n != 2*fdSector {
		t.Fatalf("short read = %d, %v", n, err)
	}
	if !bytes.Equal(p[:2*fdSector], fdFill(6, 2*fdSector)) || p[2*fdSector] != 9 {
		t.Fatal("short read filled more or less than it reported")
	}

	for _, bad := range []engine.Fault{
		{Op: 0, Err: syscall.EIO},
		{Op: engine.FaultRead},
		{Op: engine.FaultRead, Err: syscall.EIO, Short: true},
		{Op: engine.FaultFlush, Short: true},
		{Op: engine.FaultWrite, Skip: -1, Err: syscall.EIO},
	} {
		if err := d.Inject(bad); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Inject(%+v) = %v, want fs.ErrInvalid", bad, err)
		}
	}
}

func TestFaultDeviceVectored(t *testing.T) {
	d := engine.NewFaultDevice(1<<20, fdSector)
	bufs := [][]byte{fdFill(1, fdSector), fdFill(2, 2*fdSector), fdFill(3, fdSector)}
	if n, err := d.WritevAt(bufs, 4096); err != nil || n != 4*fdSector {
		t.Fatalf("WritevAt = %d, %v", n, err)
	}
	if st := d.Stats(); st.Writes != 1 || st.Pending != 1 {
		t.Fatalf("vectored write counted as %+v", st)
	}
	out := [][]byte{make([]byte, 3*fdSector), make([]byte, fdSector)}
	if n, err := d.ReadvAt(out, 4096); err != nil || n != 4*fdSector {
		t.Fatalf("ReadvAt = %d, %v", n, err)
	}
	want := bytes.Join(bufs, nil)
	if !bytes.Equal(bytes.Join(out, nil), want) {
		t.Fatal("vectored read-back differs")
	}
	if _, err := d.WritevAt([][]byte{make([]byte, 100)}, 0); !errors.Is(err, engine.ErrMisaligned) {
		t.Fatalf("misaligned vectored write = %v", err)
	}
}

// TestFaultDeviceConcurrent: writers, flushers and readers at once (run
// with -race); after a reboot everything written before the last flush
// that followed it is there.
func TestFaultDeviceConcurrent(t *testing.T) {
	d := engine.NewFaultDevice(4<<20, fdSector)
	const writers, rounds = 8, 200
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for r := range rounds {
				off := int64(w)*(512<<10) + int64(r%64)*4096
				if _, err := d.WriteAt(fdFill(byte(w+1), 4096), off); err != nil {
					t.Error(err)
					return
				}
				if r%16 == 0 {
					if err := d.Flush(); err != nil {
						t.Error(err)
						return
					}
				}
				p := make([]byte, 4096)
				if _, err := d.ReadAt(p, off); err != nil || p[0] != byte(w+1) {
					t.Errorf("read back %d, %v", p[0], err)
					return
				}
				_ = d.Stats()
			}
		})
	}
	wg.Wait()
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := d.Stats(); st.Writes != writers*rounds || st.Pending != 0 {
		t.Fatalf("stats %+v", st)
	}
	nd, rs := d.Reboot(rand.New(rand.NewPCG(7, 7)), true)
	if rs.Pending != 0 {
		t.Fatalf("reboot after flush: %+v", rs)
	}
	for w := range writers {
		got := fdMustRead(t, nd, 64*4096, int64(w)*(512<<10))
		if !bytes.Equal(got, fdFill(byte(w+1), len(got))) {
			t.Fatalf("writer %d: flushed data lost", w)
		}
	}
}

// TestFaultDeviceEngine: the engine formats, syncs and reopens on a fault
// device; a synced object survives a crash that drops every later write.
func TestFaultDeviceEngine(t *testing.T) {
	d := engine.NewFaultDevice(32<<20, fdSector)
	if err := engine.Format(d, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	e, err := engine.Open(d, engine.Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	o, err := e.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	data := fdFill(7, 10000)
	if _, err := o.WriteAt(data, 3); err != nil {
		t.Fatal(err)
	}
	if err := o.Sync(); err != nil {
		t.Fatal(err)
	}
	d.Crash()
	_ = e.Close() // fails: the device is gone
	nd, _ := d.Reboot(rand.New(rand.NewPCG(3, 3)), true)
	e, err = engine.Open(nd, engine.Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	o, err = e.Object("a")
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10003)
	if n, err := o.ReadAt(got, 0); n != len(got) || err != nil {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
	if !bytes.Equal(got[3:], data) || !bytes.Equal(got[:3], []byte{0, 0, 0}) {
		t.Fatal("synced data changed across a crash")
	}
}

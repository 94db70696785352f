package engine

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/ncw/directio"
	"golang.org/x/sys/unix"

	"github.com/rawblock/rawblock/iouring"
)

const devTestSize = 8 << 20

// deviceCase opens one kind of device for the shared suite.
type deviceCase struct {
	name string
	open func(t *testing.T) Device
}

func deviceCases() []deviceCase {
	file := func(mode iouring.Mode, env string) func(t *testing.T) Device {
		return func(t *testing.T) Device {
			if mode == iouring.ModeIOURing {
				if err := iouring.Probe(); err != nil {
					t.Skipf("io_uring unavailable: %v", err)
				}
			}
			if env != "" {
				t.Setenv(iouring.EnvMode, env)
			}
			path := filepath.Join(t.TempDir(), "dev")
			d, err := OpenDevice(path, DeviceOptions{IO: mode, CreateSize: devTestSize})
			if err != nil {
				t.Fatalf("OpenDevice: %v", err)
			}
			fd := d.(*FileDevice)
			want := mode
			if env != "" {
				want = iouring.Mode(env)
			}
			if fd.IOMode() != want {
				t.Fatalf("IOMode %q (%s), want %q", fd.IOMode(), fd.IOReason(), want)
			}
			if env != "" && !strings.Contains(fd.IOReason(), iouring.EnvMode) {
				t.Errorf("IOReason %q does not mention %s", fd.IOReason(), iouring.EnvMode)
			}
			return d
		}
	}
	mem := func(bs int) func(t *testing.T) Device {
		return func(t *testing.T) Device { return NewMemDevice(devTestSize, bs) }
	}
	loop := func(sector int) func(t *testing.T) Device {
		return func(t *testing.T) Device {
			dev := newLoopDevice(t, sector)
			d, err := OpenDevice(dev, DeviceOptions{})
			if err != nil {
				t.Fatalf("OpenDevice(%s): %v", dev, err)
			}
			fd := d.(*FileDevice)
			if !fd.IsBlockDevice() || fd.BlockSize() != sector || fd.Size() != devTestSize || fd.PhysicalBlockSize() < sector {
				t.Fatalf("loop device: block device %v, block %d, physical %d, size %d",
					fd.IsBlockDevice(), fd.BlockSize(), fd.PhysicalBlockSize(), fd.Size())
			}
			return d
		}
	}
	return []deviceCase{
		{"file-io_uring", file(iouring.ModeIOURing, "")},
		{"file-psync", file(iouring.ModePsync, "")},
		{"file-env-psync", file(iouring.ModeAuto, "psync")},
		{"mem-4096", mem(4096)},
		{"mem-512", mem(512)},
		{"loop-512", loop(512)},
		{"loop-4096", loop(4096)},
	}
}

// newLoopDevice attaches a direct-I/O loop device with the given logical
// sector size over a fresh devTestSize file, detached at cleanup. It skips
// the test when that is not possible here (not root, no losetup, no loop
// driver).
func newLoopDevice(t *testing.T, sector int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	losetup, err := exec.LookPath("losetup")
	if err != nil {
		t.Skip("losetup not found")
	}
	backing := filepath.Join(t.TempDir(), "loop.img")
	f, err := os.Create(backing)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, devTestSize); err != nil {
		f.Close()
		t.Fatal(err)
	}
	f.Close()
	out, err := exec.Command(losetup, "--find", "--show", "--direct-io=on", "--sector-size", fmt.Sprint(sector), backing).CombinedOutput()
	if err != nil {
		t.Skipf("losetup failed: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command(losetup, "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// aligned returns a zeroed buffer of n bytes aligned to 4096 (enough for
// any block size the tests use).
func aligned(n int) []byte { return directio.AlignedBlock(n) }

func pattern(b []byte, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 99))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

func TestDeviceSuite(t *testing.T) {
	for _, c := range deviceCases() {
		t.Run(c.name, func(t *testing.T) {
			dev := c.open(t)
			closed := false
			t.Cleanup(func() {
				if !closed {
					dev.Close()
				}
			})
			t.Run("RoundTrip", func(t *testing.T) { suiteRoundTrip(t, dev) })
			t.Run("ConcurrentWriters", func(t *testing.T) { suiteConcurrent(t, dev) })
			t.Run("Misaligned", func(t *testing.T) { suiteMisaligned(t, dev) })
			t.Run("OutOfRange", func(t *testing.T) { suiteOutOfRange(t, dev) })
			t.Run("Vectored", func(t *testing.T) { suiteVectored(t, dev) })
			if fd, ok := dev.(*FileDevice); ok {
				t.Run("Batch", func(t *testing.T) { suiteBatch(t, fd) })
				t.Run("Arena", func(t *testing.T) { suiteArena(t, fd) })
			}
			t.Run("Flush", func(t *testing.T) {
				if err := dev.Flush(); err != nil {
					t.Fatal(err)
				}
			})
			closed = true
			t.Run("Close", func(t *testing.T) { suiteClose(t, dev) })
		})
	}
}

func suiteRoundTrip(t *testing.T, dev Device) {
	bs := dev.BlockSize()
	size := dev.Size()
	if bs != 512 && bs != 4096 || size <= 0 || size%int64(bs) != 0 {
		t.Fatalf("block size %d, size %d", bs, size)
	}
	last := size - int64(bs)
	for i, c := range []struct {
		off int64
		n   int
	}{
		{0, bs},
		{int64(bs), 3 * bs},
		{last, bs},
		{size - 64*int64(bs), 64 * bs},
		{size / 2, 256 << 10},
	} {
		w := aligned(c.n)
		pattern(w, uint64(i))
		if n, err := dev.WriteAt(w, c.off); n != c.n || err != nil {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", c.n, c.off, n, err)
		}
		r := aligned(c.n)
		if n, err := dev.ReadAt(r, c.off); n != c.n || err != nil {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", c.n, c.off, n, err)
		}
		if !bytes.Equal(r, w) {
			t.Fatalf("%d bytes at %d read back different", c.n, c.off)
		}
	}
	// A zero-length request inside the device is a no-op.
	if n, err := dev.ReadAt(nil, size); n != 0 || err != nil {
		t.Fatalf("empty ReadAt at the end = %d, %v", n, err)
	}
}

func suiteConcurrent(t *testing.T, dev Device) {
	bs := dev.BlockSize()
	const writers, rounds = 16, 20
	// Writer w owns blocks w, w+writers, ...; each round rewrites them.
	region := 8 * writers
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := aligned(bs)
			for r := range rounds {
				for b := w; b < region; b += writers {
					pattern(buf, uint64(b*1000+r))
					if _, err := dev.WriteAt(buf, int64(b*bs)); err != nil {
						t.Errorf("writer %d: %v", w, err)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	got, want := aligned(region*bs), make([]byte, bs)
	if _, err := dev.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for b := range region {
		pattern(want, uint64(b*1000+rounds-1))
		if !bytes.Equal(got[b*bs:(b+1)*bs], want) {
			t.Fatalf("block %d does not hold its last write", b)
		}
	}
}

func suiteMisaligned(t *testing.T, dev Device) {
	bs := dev.BlockSize()
	buf := aligned(4 * bs)
	cases := []struct {
		name string
		p    []byte
		off  int64
	}{
		{"offset", buf[:bs], int64(bs / 2)},
		{"length", buf[:bs/2], 0},
		{"length-over-block", buf[:bs+bs/2], int64(bs)},
	}
	if _, ok := dev.(*FileDevice); ok {
		cases = append(cases, struct {
			name string
			p    []byte
			off  int64
		}{"address", buf[bs/2 : bs/2+bs], 0})
	}
	marker := aligned(bs)
	pattern(marker, 4242)
	if _, err := dev.WriteAt(marker, 0); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		if _, err := dev.ReadAt(c.p, c.off); !errors.Is(err, ErrMisaligned) || !errors.Is(err, syscall.EINVAL) {
			t.Errorf("misaligned %s read: %v, want ErrMisaligned (EINVAL)", c.name, err)
		}
		if _, err := dev.WriteAt(c.p, c.off); !errors.Is(err, ErrMisaligned) || !errors.Is(err, syscall.EINVAL) {
			t.Errorf("misaligned %s write: %v, want ErrMisaligned (EINVAL)", c.name, err)
		}
	}
	// Refused writes changed nothing.
	got := aligned(bs)
	if _, err := dev.ReadAt(got, 0); err != nil || !bytes.Equal(got, marker) {
		t.Fatalf("block 0 changed by refused writes (err %v)", err)
	}
}

func suiteOutOfRange(t *testing.T, dev Device) {
	bs := dev.BlockSize()
	size := dev.Size()
	buf := aligned(2 * bs)
	for _, c := range []struct {
		name string
		p    []byte
		off  int64
	}{
		{"at end", buf[:bs], size},
		{"across end", buf, size - int64(bs)},
		{"far past end", buf[:bs], size * 4},
		{"negative", buf[:bs], -int64(bs)},
	} {
		if _, err := dev.ReadAt(c.p, c.off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("read %s: %v, want ErrOutOfRange", c.name, err)
		}
		_, err := dev.WriteAt(c.p, c.off)
		if !errors.Is(err, ErrOutOfRange) {
			t.Errorf("write %s: %v, want ErrOutOfRange", c.name, err)
		} else if !strings.Contains(err.Error(), fmt.Sprint(size)) {
			t.Errorf("error %q does not name the device size", err)
		}
	}
}

func suiteBatch(t *testing.T, d *FileDevice) {
	bs := d.BlockSize()
	ops := make([]iouring.Op, 32)
	for i := range ops {
		ops[i] = iouring.Op{Write: true, Buf: aligned(bs), Off: int64(i * 2 * bs)}
		pattern(ops[i].Buf, uint64(i+500))
	}
	if err := d.Do(ops); err != nil {
		t.Fatal(err)
	}
	for i := range ops {
		ops[i].Write, ops[i].Buf = false, aligned(bs)
	}
	if err := d.Do(ops); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, bs)
	for i, op := range ops {
		pattern(want, uint64(i+500))
		if op.N != bs || !bytes.Equal(op.Buf, want) {
			t.Fatalf("batch op %d: N %d, content differs", i, op.N)
		}
	}
	// One bad op: nothing is issued.
	bad := []iouring.Op{
		{Write: true, Buf: aligned(bs), Off: 0},
		{Write: true, Buf: aligned(bs), Off: d.Size()},
	}
	if err := d.Do(bad); !errors.Is(err, ErrOutOfRange) || bad[0].N != 0 {
		t.Fatalf("batch with a bad op: %v, op 0 N %d", err, bad[0].N)
	}
	got := aligned(bs)
	if _, err := d.ReadAt(got, 0); err != nil || bytes.Equal(got, bad[0].Buf) {
		t.Fatalf("refused batch wrote op 0 (err %v)", err)
	}
}

// vecFrames returns n buffers of bs bytes, block-aligned and not adjacent in
// memory, as cache frames are.
func vecFrames(n, bs int) [][]byte {
	mem := aligned(2 * n * bs)
	out := make([][]byte, n)
	for i := range out {
		out[i] = mem[2*i*bs : (2*i+1)*bs : (2*i+1)*bs]
	}
	return out
}

// suiteVectored: ReadvAt/WritevAt round trips of 1..256 scattered blocks,
// the validation rules (nothing written on refusal), vectored batches.
func suiteVectored(t *testing.T, dev Device) {
	vd, ok := dev.(VectoredDevice)
	if !ok {
		t.Fatalf("%T does not implement VectoredDevice", dev)
	}
	bs := dev.BlockSize()
	for ci, n := range []int{1, 2, 255, 256} {
		off := int64(ci*300*bs) % (dev.Size() - int64(n*bs))
		off -= off % int64(bs)
		src := vecFrames(n, bs)
		for i, b := range src {
			pattern(b, uint64(ci*1000+i))
		}
		if got, err := vd.WritevAt(src, off); err != nil || got != n*bs {
			t.Fatalf("WritevAt %d buffers: %d, %v", n, got, err)
		}
		flat := aligned(n * bs)
		if _, err := dev.ReadAt(flat, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(flat, bytes.Join(src, nil)) {
			t.Fatalf("WritevAt %d buffers: the device holds other bytes", n)
		}
		dst := vecFrames(n, bs)
		if got, err := vd.ReadvAt(dst, off); err != nil || got != n*bs {
			t.Fatalf("ReadvAt %d buffers: %d, %v", n, got, err)
		}
		if !bytes.Equal(bytes.Join(dst, nil), flat) {
			t.Fatalf("ReadvAt %d buffers: read other bytes", n)
		}
	}
	if got, err := vd.ReadvAt(nil, 0); got != 0 || err != nil {
		t.Errorf("ReadvAt(nil) = %d, %v", got, err)
	}

	// Refusals, each before any I/O: block 0 keeps its marker.
	marker := aligned(bs)
	pattern(marker, 777)
	if _, err := dev.WriteAt(marker, 0); err != nil {
		t.Fatal(err)
	}
	mem := aligned(4 * bs)
	good := vecFrames(2, bs)
	type vcase struct {
		name string
		bufs [][]byte
		off  int64
		want error
	}
	cases := []vcase{
		{"length", [][]byte{good[0], mem[:bs/2]}, 0, ErrMisaligned},
		{"offset", good, int64(bs / 2), ErrMisaligned},
		{"past the end", good, dev.Size() - int64(bs), ErrOutOfRange},
		{"negative", good, -int64(bs), ErrOutOfRange},
	}
	if _, ok := dev.(*FileDevice); ok {
		cases = append(cases, vcase{"address", [][]byte{good[0], mem[bs/2 : bs/2+bs]}, 0, ErrMisaligned})
	}
	for _, c := range cases {
		if _, err := vd.WritevAt(c.bufs, c.off); !errors.Is(err, c.want) {
			t.Errorf("WritevAt %s: %v, want %v", c.name, err, c.want)
		}
		if _, err := vd.ReadvAt(c.bufs, c.off); !errors.Is(err, c.want) {
			t.Errorf("ReadvAt %s: %v, want %v", c.name, err, c.want)
		}
	}
	got := aligned(bs)
	if _, err := dev.ReadAt(got, 0); err != nil || !bytes.Equal(got, marker) {
		t.Fatalf("block 0 changed by refused vectored writes (err %v)", err)
	}

	fd, ok := dev.(*FileDevice)
	if !ok {
		return
	}
	// Batches with vectored ops; a bad vectored op refuses the batch.
	src := vecFrames(8, bs)
	for i, b := range src {
		pattern(b, uint64(4000+i))
	}
	plain := aligned(bs)
	pattern(plain, 4100)
	ops := []iouring.Op{
		{Write: true, Bufs: src, Off: int64(64 * bs)},
		{Write: true, Buf: plain, Off: int64(80 * bs)},
	}
	if err := fd.Do(ops); err != nil {
		t.Fatal(err)
	}
	dst := vecFrames(9, bs)
	rops := []iouring.Op{{Bufs: dst[:8], Off: int64(64 * bs)}, {Bufs: dst[8:], Off: int64(80 * bs)}}
	if err := fd.Do(rops); err != nil {
		t.Fatal(err)
	}
	if rops[0].N != 8*bs || !bytes.Equal(bytes.Join(dst[:8], nil), bytes.Join(src, nil)) || !bytes.Equal(dst[8], plain) {
		t.Fatalf("vectored batch read back other bytes (N %d)", rops[0].N)
	}
	bad := []iouring.Op{
		{Write: true, Buf: aligned(bs), Off: 0},
		{Write: true, Bufs: [][]byte{good[0], mem[bs/2 : bs/2+bs]}, Off: int64(bs)},
	}
	if err := fd.Do(bad); !errors.Is(err, ErrMisaligned) || bad[0].N != 0 {
		t.Fatalf("batch with a misaligned vectored op: %v, op 0 N %d", err, bad[0].N)
	}
	if _, err := dev.ReadAt(got, 0); err != nil || !bytes.Equal(got, marker) {
		t.Fatalf("refused vectored batch wrote op 0 (err %v)", err)
	}
}

func suiteArena(t *testing.T, d *FileDevice) {
	a, err := iouring.NewArena(64 << 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.RegisterArena(a); err != nil {
		t.Fatal(err)
	}
	mem := a.Bytes()
	pattern(mem[:32<<10], 77)
	if _, err := d.WriteAt(mem[:32<<10], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(mem[32<<10:], 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mem[:32<<10], mem[32<<10:]) {
		t.Fatal("arena round trip differs")
	}
	if d.IOMode() == iouring.ModeIOURing && !strings.Contains(d.IOReason(), "fixed buffers") {
		t.Errorf("IOReason %q does not mention fixed buffers", d.IOReason())
	}
	if err := d.RegisterArena(nil); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
}

func suiteClose(t *testing.T, dev Device) {
	size, bs := dev.Size(), dev.BlockSize()
	if err := dev.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	buf := aligned(bs)
	if _, err := dev.ReadAt(buf, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadAt after Close: %v", err)
	}
	if _, err := dev.WriteAt(buf, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("WriteAt after Close: %v", err)
	}
	if err := dev.Flush(); !errors.Is(err, ErrClosed) {
		t.Errorf("Flush after Close: %v", err)
	}
	if err := dev.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
	vd := dev.(VectoredDevice)
	if _, err := vd.ReadvAt([][]byte{buf}, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadvAt after Close: %v", err)
	}
	if _, err := vd.WritevAt([][]byte{buf}, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("WritevAt after Close: %v", err)
	}
	if fd, ok := dev.(*FileDevice); ok {
		if err := fd.Do([]iouring.Op{{Bufs: [][]byte{buf}}}); !errors.Is(err, ErrClosed) {
			t.Errorf("vectored Do after Close: %v", err)
		}
		if err := fd.Do([]iouring.Op{{Buf: buf}}); !errors.Is(err, ErrClosed) {
			t.Errorf("Do after Close: %v", err)
		}
		if err := fd.RegisterArena(nil); !errors.Is(err, ErrClosed) {
			t.Errorf("RegisterArena after Close: %v", err)
		}
	}
	if dev.Size() != size || dev.BlockSize() != bs {
		t.Errorf("geometry changed by Close")
	}
}

// TestDeviceCloseWhileBusy closes a device while goroutines use it: every
// call either succeeds or returns ErrClosed, and Close returns.
func TestDeviceCloseWhileBusy(t *testing.T) {
	for _, c := range deviceCases() {
		if strings.HasPrefix(c.name, "loop") {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			dev := c.open(t)
			bs := dev.BlockSize()
			var wg sync.WaitGroup
			start := make(chan struct{})
			for w := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := aligned(bs)
					<-start
					for i := 0; ; i++ {
						var err error
						if i%2 == 0 {
							_, err = dev.WriteAt(buf, int64((w*64+i%64)*bs))
						} else {
							_, err = dev.ReadAt(buf, int64((w*64+i%64)*bs))
						}
						if errors.Is(err, ErrClosed) {
							return
						}
						if err != nil {
							t.Errorf("I/O: %v", err)
							return
						}
					}
				}()
			}
			close(start)
			if err := dev.Close(); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
		})
	}
}

// TestOpenDeviceExclusiveFile: a second OpenDevice of the same file fails
// (flock), read-only opens share, and the lock goes with Close.
func TestOpenDeviceExclusiveFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	d, err := OpenDevice(path, DeviceOptions{CreateSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{false, true} {
		_, err := OpenDevice(path, DeviceOptions{ReadOnly: ro})
		if !errors.Is(err, ErrInUse) || !errors.Is(err, fs.ErrExist) || !errors.Is(err, unix.EWOULDBLOCK) || !strings.Contains(err.Error(), path) {
			t.Errorf("second open (read-only %v) of an open file: %v, want ErrInUse naming the path", ro, err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	r1, err := OpenDevice(path, DeviceOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	r2, err := OpenDevice(path, DeviceOptions{ReadOnly: true})
	if err != nil {
		t.Fatalf("second read-only open: %v", err)
	}
	defer r2.Close()
	if _, err := OpenDevice(path, DeviceOptions{}); !errors.Is(err, ErrInUse) {
		t.Errorf("read-write open while read-only opens exist: %v", err)
	}
	if _, err := r1.WriteAt(aligned(4096), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write to a read-only device: %v", err)
	}
}

// TestOpenDeviceExclusiveLoop: a second OpenDevice of a block device fails
// (O_EXCL, then the lock), and so does opening a device held O_EXCL by
// another opener.
func TestOpenDeviceExclusiveLoop(t *testing.T) {
	dev := newLoopDevice(t, 4096)
	d, err := OpenDevice(dev, DeviceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = OpenDevice(dev, DeviceOptions{})
	if !errors.Is(err, ErrInUse) || !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), dev) {
		t.Errorf("second open of %s: %v, want ErrInUse wrapping EBUSY and naming the device", dev, err)
	}
	if _, err := OpenDevice(dev, DeviceOptions{ReadOnly: true}); !errors.Is(err, ErrInUse) {
		t.Errorf("read-only open of a device open read-write: %v, want ErrInUse", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// Another program's exclusive claim (as a mount would make).
	f, err := os.OpenFile(dev, os.O_RDWR|os.O_EXCL, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := OpenDevice(dev, DeviceOptions{}); !errors.Is(err, unix.EBUSY) || !errors.Is(err, ErrInUse) {
		t.Errorf("open of a device claimed O_EXCL elsewhere: %v, want EBUSY", err)
	}
}

func TestOpenDeviceCreate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "dev")
	if _, err := OpenDevice(path, DeviceOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file without CreateSize: %v", err)
	}
	d, err := OpenDevice(path, DeviceOptions{CreateSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 1<<20 || st.Blocks*512 < 1<<20 {
		t.Errorf("created file: size %d, allocated %d; want 1 MiB preallocated", st.Size, st.Blocks*512)
	}
	fd := d.(*FileDevice)
	if fd.Size() != 1<<20 || fd.BlockSize() != 4096 || fd.PhysicalBlockSize() != 4096 || fd.IsBlockDevice() || fd.Path() != path || fd.Fd() < 0 {
		t.Errorf("file device geometry: size %d block %d physical %d", fd.Size(), fd.BlockSize(), fd.PhysicalBlockSize())
	}
	w := aligned(4096)
	pattern(w, 1)
	if _, err := d.WriteAt(w, 1<<20-4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	d.Close()
	// Grown, never shrunk, and the data stays.
	d, err = OpenDevice(path, DeviceOptions{CreateSize: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if d.Size() != 2<<20 {
		t.Errorf("grown size %d", d.Size())
	}
	d.Close()
	d, err = OpenDevice(path, DeviceOptions{CreateSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if d.Size() != 2<<20 {
		t.Errorf("CreateSize smaller than the file changed its size to %d", d.Size())
	}
	r := aligned(4096)
	if _, err := d.ReadAt(r, 1<<20-4096); err != nil || !bytes.Equal(r, w) {
		t.Errorf("data lost across reopen (err %v)", err)
	}
	d.Close()

	// A length that is not a multiple of 4096 is rounded down.
	odd := filepath.Join(dir, "odd")
	if err := os.WriteFile(odd, make([]byte, 10000), 0o600); err != nil {
		t.Fatal(err)
	}
	if d, err := OpenDevice(odd, DeviceOptions{}); err != nil || d.Size() != 8192 {
		t.Errorf("odd-sized file: %v", err)
	} else {
		d.Close()
	}
	tiny := filepath.Join(dir, "tiny")
	if err := os.WriteFile(tiny, make([]byte, 100), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path string
		opts DeviceOptions
	}{
		{tiny, DeviceOptions{}},
		{dir, DeviceOptions{}},
		{"/dev/null", DeviceOptions{}},
		{path, DeviceOptions{CreateSize: 1000}},
		{path, DeviceOptions{CreateSize: -4096}},
		{path, DeviceOptions{CreateSize: 4096, ReadOnly: true}},
		{path, DeviceOptions{QueueDepth: -1}},
		{path, DeviceOptions{IO: "aio"}},
	} {
		if d, err := OpenDevice(c.path, c.opts); err == nil {
			d.Close()
			t.Errorf("OpenDevice(%s, %+v) succeeded", c.path, c.opts)
		} else if !strings.Contains(err.Error(), c.path) && !strings.Contains(err.Error(), "aio") {
			t.Errorf("error %q does not name %s", err, c.path)
		}
	}
}

func TestNewMemDeviceRejects(t *testing.T) {
	for _, c := range []struct {
		size int64
		bs   int
	}{{0, 4096}, {4096, 1000}, {4096, 256}, {6000, 4096}, {1 << 20, 1 << 17}, {-4096, 4096}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewMemDevice(%d, %d) did not panic", c.size, c.bs)
				}
			}()
			NewMemDevice(c.size, c.bs)
		}()
	}
	// Untouched blocks of a large sparse device read as zeros and cost
	// no memory.
	d := NewMemDevice(1<<40, 4096)
	defer d.Close()
	buf := aligned(4096)
	pattern(buf, 3)
	if _, err := d.ReadAt(buf, 1<<39); err != nil || !bytes.Equal(buf, make([]byte, 4096)) {
		t.Fatalf("sparse read: %v", err)
	}
}

// TestReopenAfterIO: a device closed right after I/O and a flush
// (completions that the kernel may still be freeing) opens again at once, on a file and on a
// loop device (whose O_EXCL claim lasts as long as the open file).
func TestReopenAfterIO(t *testing.T) {
	paths := map[string]string{"file": filepath.Join(t.TempDir(), "dev")}
	t.Run("file", func(t *testing.T) { reopenAfterIO(t, paths["file"], true) })
	t.Run("loop", func(t *testing.T) { reopenAfterIO(t, newLoopDevice(t, 4096), false) })
}

// reopenAfterIO runs the rounds; with unlocked set it also checks, without
// OpenDevice's retry, that Close released the flock at once.
func reopenAfterIO(t *testing.T, path string, unlocked bool) {
	rounds := 200
	if testing.Short() {
		rounds = 40
	}
	for i := range rounds {
		d, err := OpenDevice(path, DeviceOptions{CreateSize: 4 << 20})
		if err != nil {
			t.Fatalf("round %d: %v", i, err)
		}
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := aligned(4096)
				off := int64(g) * 4096
				if _, err := d.WriteAt(buf, off); err != nil {
					t.Error(err)
				}
				if _, err := d.ReadAt(buf, off); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		// A flush runs on the kernel's io-wq workers, which drop their
		// reference to the file after posting the completion.
		if err := d.Flush(); err != nil {
			t.Fatalf("round %d: flush: %v", i, err)
		}
		if err := d.Close(); err != nil {
			t.Fatalf("round %d: close: %v", i, err)
		}
		if unlocked {
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			f.Close()
			if err != nil {
				t.Fatalf("round %d: flock right after Close: %v", i, err)
			}
		}
	}
}

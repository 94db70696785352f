package engine

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"pgregory.net/rapid"
)

// newTestFileDevice opens an O_DIRECT temp file of size bytes.
func newTestFileDevice(t testing.TB, size int64) Device {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	dev, err := OpenDevice(path, DeviceOptions{CreateSize: size})
	if err != nil {
		t.Fatalf("OpenDevice: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	return dev
}

// onMemAndFile runs fn as two subtests: on an in-memory device and on an
// O_DIRECT temp file, each of size bytes with 4096-byte sectors.
func onMemAndFile(t *testing.T, size int64, fn func(t *testing.T, dev Device)) {
	t.Run("mem", func(t *testing.T) { fn(t, NewMemDevice(size, 4096)) })
	t.Run("file", func(t *testing.T) { fn(t, newTestFileDevice(t, size)) })
}

func mustFormatOpen(t testing.TB, dev Device, opts Options) *Engine {
	t.Helper()
	if err := Format(dev, FormatOptions{}); err != nil {
		t.Fatalf("Format: %v", err)
	}
	e, err := Open(dev, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return e
}

func TestFormatOpenEmpty(t *testing.T) {
	dev := NewMemDevice(16<<20, 512)
	e := mustFormatOpen(t, dev, Options{})
	if got := e.Objects(); len(got) != 0 {
		t.Fatalf("Objects = %v, want none", got)
	}
	st := e.Stats()
	if st.TotalBytes <= 0 || st.FreeBytes != st.TotalBytes || st.ReservedBytes != 0 {
		t.Fatalf("Stats = %+v", st)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close = %v, want ErrClosed", err)
	}
	if _, err := e.Create("x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Create after Close = %v", err)
	}
}

func TestFormatRejects(t *testing.T) {
	if err := Format(NewMemDevice(8<<20, 512), FormatOptions{}); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("8 MiB device: %v", err)
	}
	dev := NewMemDevice(32<<20, 4096)
	for _, bs := range []int{512, 1000, 3 << 12, 1 << 17} {
		if err := Format(dev, FormatOptions{BlockSize: bs}); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("block size %d: %v", bs, err)
		}
	}
	if err := Format(dev, FormatOptions{MetadataSize: 30 << 20}); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("huge metadata: %v", err)
	}
	if _, err := Open(NewMemDevice(32<<20, 512), Options{}); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Open of an unformatted device: %v", err)
	}
}

func TestBasicReadWrite(t *testing.T) {
	for _, bs := range []int{4096, 16384} {
		t.Run(strconv.Itoa(bs), func(t *testing.T) {
			dev := NewMemDevice(64<<20, 512)
			if err := Format(dev, FormatOptions{BlockSize: bs}); err != nil {
				t.Fatal(err)
			}
			e, err := Open(dev, Options{CacheSize: 8 << 20})
			if err != nil {
				t.Fatal(err)
			}
			o, err := e.Create("a")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := e.Create("a"); !errors.Is(err, fs.ErrExist) {
				t.Fatalf("second Create: %v", err)
			}
			data := bytes.Repeat([]byte("0123456789abcdef"), 10000)
			if n, err := o.WriteAt(data, 1000); n != len(data) || err != nil {
				t.Fatalf("WriteAt = %d, %v", n, err)
			}
			got := make([]byte, len(data)+2000)
			n, err := o.ReadAt(got, 0)
			if n != len(data)+1000 || err != io.EOF {
				t.Fatalf("ReadAt = %d, %v", n, err)
			}
			if !bytes.Equal(got[:1000], make([]byte, 1000)) || !bytes.Equal(got[1000:n], data) {
				t.Fatal("read back differs")
			}
			if err := e.Sync(); err != nil {
				t.Fatal(err)
			}
			xs := o.Extents()
			if len(xs) != 1 || xs[0].State != Written {
				t.Fatalf("Extents = %+v, want one written", xs)
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			e, err = Open(dev, Options{CacheSize: 8 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			o, err = e.Object("a")
			if err != nil {
				t.Fatal(err)
			}
			clear(got)
			n, err = o.ReadAt(got, 0)
			if n != len(data)+1000 || err != io.EOF || !bytes.Equal(got[1000:n], data) {
				t.Fatalf("after reopen ReadAt = %d, %v", n, err)
			}
			if _, err := e.Object("b"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Object(b) = %v", err)
			}
		})
	}
}

func TestBadInput(t *testing.T) {
	e := mustFormatOpen(t, NewMemDevice(32<<20, 512), Options{CacheSize: 8 << 20})
	defer e.Close()
	for _, name := range []string{"", strings.Repeat("x", 256), "a\x00b"} {
		if _, err := e.Create(name); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Create(%q) = %v", name, err)
		}
	}
	o, _ := e.Create("o")
	if _, err := o.WriteAt([]byte("x"), -1); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("negative offset: %v", err)
	}
	if _, err := o.WriteAt([]byte("x"), MaxObjectSize); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("offset at max: %v", err)
	}
	if _, err := o.ReadAt(make([]byte, 1), -5); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("negative read offset: %v", err)
	}
	if err := o.Truncate(-1); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("negative truncate: %v", err)
	}
	if err := o.PunchHole(0, -1); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("negative punch: %v", err)
	}
	if o.Size() != 0 {
		t.Errorf("size changed to %d", o.Size())
	}
	if err := e.Remove("o"); err != nil {
		t.Fatal(err)
	}
	if _, err := o.WriteAt([]byte("x"), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("write after remove: %v", err)
	}
	if _, err := o.ReadAt(make([]byte, 1), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("read after remove: %v", err)
	}
	if err := o.Sync(); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("sync after remove: %v", err)
	}
}

func TestTruncatePunchZeroes(t *testing.T) {
	e := mustFormatOpen(t, NewMemDevice(32<<20, 512), Options{CacheSize: 8 << 20})
	defer e.Close()
	o, _ := e.Create("o")
	data := bytes.Repeat([]byte{0xAB}, 5*4096)
	o.WriteAt(data, 0)
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	// Shrink into a block, then grow again: the tail must read zeros.
	if err := o.Truncate(4096 + 100); err != nil {
		t.Fatal(err)
	}
	if err := o.Truncate(5 * 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5*4096)
	o.ReadAt(got, 0)
	want := append(bytes.Repeat([]byte{0xAB}, 4096+100), make([]byte, 4*4096-100)...)
	if !bytes.Equal(got, want) {
		t.Fatal("truncate then extend did not zero the tail")
	}
	o.WriteAt(data, 0)
	if err := o.PunchHole(100, 3*4096); err != nil {
		t.Fatal(err)
	}
	o.ReadAt(got, 0)
	want = bytes.Clone(data)
	clear(want[100 : 100+3*4096])
	if !bytes.Equal(got, want) {
		t.Fatal("punch did not zero its range")
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	o.ReadAt(got, 0)
	if !bytes.Equal(got, want) {
		t.Fatal("punch lost after sync")
	}
}

// model is the reference: named byte slices.
type model map[string][]byte

func (m model) write(name string, p []byte, off int64) {
	if len(p) == 0 {
		return // like pwrite, an empty write does not extend
	}
	b := m[name]
	if end := off + int64(len(p)); end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	copy(b[off:], p)
	m[name] = b
}

func TestEngineModel(t *testing.T) {
	devs := map[string]func(t *rapid.T) Device{
		"mem512": func(*rapid.T) Device { return NewMemDevice(24<<20, 512) },
		"mem4k":  func(*rapid.T) Device { return NewMemDevice(24<<20, 4096) },
		"odirect": func(rt *rapid.T) Device {
			dir, err := os.MkdirTemp("", "rawblock-model")
			if err != nil {
				rt.Fatal(err)
			}
			rt.Cleanup(func() { os.RemoveAll(dir) })
			dev, err := OpenDevice(filepath.Join(dir, "dev"), DeviceOptions{CreateSize: 24 << 20})
			if err != nil {
				rt.Fatal(err)
			}
			rt.Cleanup(func() { dev.Close() })
			return dev
		},
	}
	for name, mk := range devs {
		t.Run(name, func(t *testing.T) {
			rapid.Check(t, func(rt *rapid.T) {
				runModel(rt, mk(rt))
			})
		})
	}
}

func runModel(rt *rapid.T, dev Device) {
	bsz := rapid.SampledFrom([]int{0, 8192}).Draw(rt, "blocksize")
	if err := Format(dev, FormatOptions{BlockSize: bsz}); err != nil {
		rt.Fatal(err)
	}
	// A 4 MiB cache with a 1 MiB dirty limit; the smallest the block
	// size allows, where every few writes go through writeback; or one
	// big enough for appenders' frame streams (cache.AllocStream).
	var opts Options
	switch rapid.SampledFrom([]string{"small", "tiny", "streams"}).Draw(rt, "cache") {
	case "small":
		opts = Options{CacheSize: 4 << 20, DirtyLimit: 1 << 20}
	case "tiny":
		opts = Options{CacheSize: max(1<<20, 160*int64(bsz))}
	case "streams":
		opts = Options{CacheSize: 20 << 20, DirtyLimit: 1 << 20}
	}
	e, err := Open(dev, opts)
	if err != nil {
		rt.Fatal(err)
	}
	defer func() {
		if e != nil {
			e.Close()
		}
	}()
	m := model{}
	names := []string{"a", "b", "c"}
	const maxOff = 1 << 20
	get := func(name string) *Object {
		o, err := e.Object(name)
		if err != nil {
			rt.Fatalf("Object(%q): %v", name, err)
		}
		return o
	}
	check := func(name string, off, n int64) {
		o := get(name)
		buf := make([]byte, n)
		got, err := o.ReadAt(buf, off)
		want := m[name]
		if off >= int64(len(want)) {
			if n > 0 && (got != 0 || err != io.EOF) {
				rt.Fatalf("read %q at %d past size %d: %d, %v", name, off, len(want), got, err)
			}
			return
		}
		wn := min(n, int64(len(want))-off)
		if int64(got) != wn || (wn < n) != (err == io.EOF) || (err != nil && err != io.EOF) {
			rt.Fatalf("read %q %d+%d (size %d): %d, %v", name, off, n, len(want), got, err)
		}
		if !bytes.Equal(buf[:got], want[off:off+wn]) {
			for i := range buf[:got] {
				if buf[i] != want[off+int64(i)] {
					rt.Fatalf("read %q %d+%d: first difference at %d: got %#x want %#x", name, off, n, off+int64(i), buf[i], want[off+int64(i)])
				}
			}
		}
	}
	steps := rapid.IntRange(1, 120).Draw(rt, "steps")
	for i := 0; i < steps; i++ {
		name := rapid.SampledFrom(names).Draw(rt, "name")
		_, exists := m[name]
		switch op := rapid.IntRange(0, 9).Draw(rt, "op"); {
		case !exists || op == 0:
			_, err := e.Create(name)
			if exists != errors.Is(err, fs.ErrExist) || (!exists && err != nil) {
				rt.Fatalf("Create(%q) exists=%v: %v", name, exists, err)
			}
			if !exists {
				m[name] = []byte{}
			}
		case op <= 3:
			off := rapid.Int64Range(0, maxOff).Draw(rt, "off")
			n := rapid.IntRange(0, 70000).Draw(rt, "len")
			p := make([]byte, n)
			seed := rapid.Uint64().Draw(rt, "seed")
			r := rand.New(rand.NewPCG(seed, 1))
			for j := range p {
				p[j] = byte(r.Uint32() | 1)
			}
			got, err := get(name).WriteAt(p, off)
			if got != n || err != nil {
				rt.Fatalf("WriteAt(%q, %d+%d) = %d, %v", name, off, n, got, err)
			}
			m.write(name, p, off)
		case op <= 5:
			size := int64(len(m[name]))
			off := rapid.Int64Range(0, size+5000).Draw(rt, "roff")
			n := rapid.Int64Range(0, 70000).Draw(rt, "rlen")
			check(name, off, n)
		case op == 6:
			size := rapid.Int64Range(0, maxOff).Draw(rt, "size")
			if err := get(name).Truncate(size); err != nil {
				rt.Fatal(err)
			}
			b := m[name]
			if size <= int64(len(b)) {
				m[name] = b[:size]
			} else {
				m[name] = append(b, make([]byte, size-int64(len(b)))...)
			}
		case op == 7:
			off := rapid.Int64Range(0, maxOff).Draw(rt, "poff")
			n := rapid.Int64Range(0, 100000).Draw(rt, "plen")
			if err := get(name).PunchHole(off, n); err != nil {
				rt.Fatal(err)
			}
			b := m[name]
			if off < int64(len(b)) {
				clear(b[off:min(off+n, int64(len(b)))])
			}
		case op == 8:
			switch rapid.IntRange(0, 3).Draw(rt, "syncop") {
			case 0:
				if err := get(name).Sync(); err != nil {
					rt.Fatal(err)
				}
			case 1:
				if err := e.Sync(); err != nil {
					rt.Fatal(err)
				}
			case 2:
				if err := e.Remove(name); err != nil {
					rt.Fatal(err)
				}
				delete(m, name)
			case 3:
				if err := e.Close(); err != nil {
					rt.Fatal(err)
				}
				e, err = Open(dev, opts)
				if err != nil {
					rt.Fatalf("reopen: %v", err)
				}
			}
		case op == 9:
			size := int64(len(m[name]))
			check(name, 0, size+10)
		}
		checkInvariants(rt, e)
	}
	for name, b := range m {
		check(name, 0, int64(len(b)))
	}
	if got := e.Objects(); len(got) != len(m) {
		rt.Fatalf("Objects() = %v, model has %d", got, len(m))
	}
}

func checkInvariants(t interface{ Fatalf(string, ...any) }, e *Engine) {
	if err := e.space.Check(); err != nil {
		t.Fatalf("space: %v", err)
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	for _, o := range e.objects {
		o.mu.Lock()
		err := o.tree.Check()
		o.mu.Unlock()
		if err != nil {
			t.Fatalf("object %q tree: %v", o.name, err)
		}
	}
}

// TestHeadlineInterleavedWriters: 8 objects written concurrently in
// interleaved 4 KiB writes end up with exactly one extent each.
func TestHeadlineInterleavedWriters(t *testing.T) {
	perObj := int64(64 << 20)
	if testing.Short() {
		perObj = 16 << 20
	}
	dev := NewMemDevice(1<<30, 4096)
	e := mustFormatOpen(t, dev, Options{})
	defer e.Close()
	before := e.Stats().Allocations
	var wg sync.WaitGroup
	objs := make([]*Object, 8)
	for i := range objs {
		o, err := e.Create(fmt.Sprintf("obj%d", i))
		if err != nil {
			t.Fatal(err)
		}
		objs[i] = o
	}
	for i, o := range objs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat([]byte{byte(i + 1)}, 4096)
			for off := int64(0); off < perObj; off += 4096 {
				if _, err := o.WriteAt(buf, off); err != nil {
					t.Error(err)
					return
				}
				if off%(1<<20) == 0 {
					runtime.Gosched()
				}
			}
		}()
	}
	wg.Wait()
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		xs := o.Extents()
		if len(xs) != 1 || xs[0].State != Written || xs[0].Length != perObj {
			t.Errorf("%s: extents %+v, want one written extent of %d", o.Name(), xs, perObj)
		}
	}
	if got := e.Stats().Allocations - before; got != 8 {
		t.Errorf("allocations grew by %d, want 8", got)
	}
	buf := make([]byte, 4096)
	for i, o := range objs {
		for _, off := range []int64{0, perObj / 2, perObj - 4096} {
			o.ReadAt(buf, off)
			if buf[0] != byte(i+1) || buf[4095] != byte(i+1) {
				t.Fatalf("%s at %d: %d", o.Name(), off, buf[0])
			}
		}
	}
}

// TestAppendSyncExtents: 8 goroutines each append 1,000 × 4 KiB with a Sync
// after every write; allocation windows keep each object in few extents.
func TestAppendSyncExtents(t *testing.T) {
	n := 1000
	if testing.Short() {
		n = 300
	}
	dev := NewMemDevice(256<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 16 << 20})
	defer e.Close()
	var wg sync.WaitGroup
	objs := make([]*Object, 8)
	for i := range objs {
		objs[i], _ = e.Create(fmt.Sprintf("a%d", i))
	}
	for _, o := range objs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for k := 0; k < n; k++ {
				buf[0] = byte(k)
				if _, err := o.WriteAt(buf, int64(k)*4096); err != nil {
					t.Error(err)
					return
				}
				if err := o.Sync(); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for _, o := range objs {
		if xs := o.Extents(); len(xs) > 16 {
			t.Errorf("%s: %d extents, want ≤ 16", o.Name(), len(xs))
		}
	}
}

func rssBytes(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Skip("no VmRSS")
	return 0
}

// TestCacheBound: writing 4 × CacheSize keeps the cache and the process
// within bounds.
func TestCacheBound(t *testing.T) {
	const cacheSize = 32 << 20
	dev := newTestFileDevice(t, 512<<20)
	debug.FreeOSMemory()
	base := rssBytes(t)
	e := mustFormatOpen(t, dev, Options{CacheSize: cacheSize})
	defer e.Close()
	o, _ := e.Create("big")
	buf := bytes.Repeat([]byte{7}, 256<<10)
	var peak int64
	for off := int64(0); off < 4*cacheSize; off += int64(len(buf)) {
		if _, err := o.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
		if c := e.Stats().CachedBytes; c > cacheSize {
			t.Fatalf("CachedBytes %d > CacheSize %d", c, cacheSize)
		}
		peak = max(peak, rssBytes(t))
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	rb := make([]byte, 64<<10)
	for off := int64(0); off < 4*cacheSize; off += int64(len(rb)) {
		if _, err := o.ReadAt(rb, off); err != nil || rb[0] != 7 {
			t.Fatalf("read at %d: %v", off, err)
		}
		if c := e.Stats().CachedBytes; c > cacheSize {
			t.Fatalf("CachedBytes %d > CacheSize %d", c, cacheSize)
		}
	}
	peak = max(peak, rssBytes(t))
	if raceEnabled {
		t.Logf("RSS grew by %d MiB (not checked under the race detector)", (peak-base)>>20)
		return
	}
	if grew := peak - base; grew > cacheSize+64<<20 {
		t.Fatalf("RSS grew by %d MiB, limit %d MiB", grew>>20, (cacheSize+64<<20)>>20)
	}
	t.Logf("RSS grew by %d MiB with a %d MiB cache", (peak-base)>>20, cacheSize>>20)
}

// TestNoSpace fills a small device: ErrNoSpace comes from WriteAt with
// n = 0, never from Sync, and everything acknowledged survives a reopen.
func TestNoSpace(t *testing.T) {
	dev := NewMemDevice(16<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	acked := model{}
	chunk := 100 << 10
	full := false
	for i := 0; !full; i++ {
		name := fmt.Sprintf("f%d", i%3)
		o, err := e.Object(name)
		if errors.Is(err, fs.ErrNotExist) {
			o, err = e.Create(name)
			acked[name] = []byte{}
		}
		if err != nil {
			t.Fatal(err)
		}
		p := bytes.Repeat([]byte{byte(i + 1)}, chunk)
		off := int64(len(acked[name]))
		n, err := o.WriteAt(p, off)
		if errors.Is(err, ErrNoSpace) {
			if n != 0 {
				t.Fatalf("ErrNoSpace with n = %d", n)
			}
			full = true
			break
		}
		if err != nil || n != chunk {
			t.Fatalf("WriteAt = %d, %v", n, err)
		}
		acked.write(name, p, off)
		if i%7 == 0 {
			if err := e.Sync(); err != nil {
				t.Fatalf("Sync: %v", err)
			}
		}
	}
	if err := e.Sync(); err != nil {
		t.Fatalf("Sync after ENOSPC: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e, err := Open(dev, Options{CacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for name, want := range acked {
		o, err := e.Object(name)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if n, err := o.ReadAt(got, 0); n != len(want) || (err != nil && err != io.EOF) || !bytes.Equal(got, want) {
			t.Fatalf("%s: read %d, %v; equal=%v", name, n, err, bytes.Equal(got, want))
		}
	}
	// Removing an object gives the space back.
	if err := e.Remove("f0"); err != nil {
		t.Fatal(err)
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	o, _ := e.Create("again")
	if _, err := o.WriteAt(make([]byte, chunk), 0); err != nil {
		t.Fatalf("write after remove: %v", err)
	}
}

// TestConcurrentOwners: goroutines each own an object and check it against
// their own model while others read it, Sync runs, and a small cache forces
// eviction and background writeback.
func TestConcurrentOwners(t *testing.T) {
	dev := NewMemDevice(64<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 4 << 20, DirtyLimit: 1 << 20})
	defer e.Close()
	const owners = 6
	iters := 300
	if testing.Short() {
		iters = 100
	}
	objs := make([]*Object, owners)
	for i := range objs {
		objs[i], _ = e.Create(fmt.Sprintf("own%d", i))
	}
	stop := make(chan struct{})
	var bg sync.WaitGroup
	for r := 0; r < 3; r++ {
		bg.Add(1)
		go func() {
			defer bg.Done()
			buf := make([]byte, 10000)
			rng := rand.New(rand.NewPCG(uint64(r), 5))
			for {
				select {
				case <-stop:
					return
				default:
				}
				o := objs[rng.IntN(owners)]
				if _, err := o.ReadAt(buf, rng.Int64N(1<<20)); err != nil && err != io.EOF {
					t.Error(err)
					return
				}
				if rng.IntN(20) == 0 {
					if err := e.Sync(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	var wg sync.WaitGroup
	for i, o := range objs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), 9))
			var m []byte
			for k := 0; k < iters; k++ {
				switch rng.IntN(10) {
				case 0:
					size := rng.Int64N(1 << 20)
					if err := o.Truncate(size); err != nil {
						t.Error(err)
						return
					}
					if size <= int64(len(m)) {
						m = m[:size]
					} else {
						m = append(m, make([]byte, size-int64(len(m)))...)
					}
				case 1:
					off, n := rng.Int64N(1<<20), rng.Int64N(50000)
					if err := o.PunchHole(off, n); err != nil {
						t.Error(err)
						return
					}
					if off < int64(len(m)) {
						clear(m[off:min(off+n, int64(len(m)))])
					}
				case 2:
					if err := o.Sync(); err != nil {
						t.Error(err)
						return
					}
				default:
					off, n := rng.Int64N(1<<20), 1+rng.IntN(40000)
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(k) | 1
					}
					if _, err := o.WriteAt(p, off); err != nil {
						t.Error(err)
						return
					}
					if end := off + int64(n); end > int64(len(m)) {
						m = append(m, make([]byte, end-int64(len(m)))...)
					}
					copy(m[off:], p)
				}
				got := make([]byte, len(m))
				if n, err := o.ReadAt(got, 0); n != len(m) || (err != nil && err != io.EOF) || !bytes.Equal(got, m) {
					t.Errorf("%s step %d: read %d, %v, equal %v", o.Name(), k, n, err, bytes.Equal(got, m))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	bg.Wait()
	checkInvariants(t, e)
}

func TestReadOnlyOpen(t *testing.T) {
	dev := NewMemDevice(32<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	o, _ := e.Create("x")
	o.WriteAt([]byte("hello"), 0)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := Open(dev, Options{CacheSize: 8 << 20, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	o, err = ro.Object("x")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if n, err := o.ReadAt(buf, 0); n != 5 || string(buf) != "hello" {
		t.Fatalf("read %d %v %q", n, err, buf)
	}
	if _, err := o.WriteAt(buf, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("write: %v", err)
	}
	if _, err := ro.Create("y"); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("create: %v", err)
	}
	if err := ro.Remove("x"); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("remove: %v", err)
	}
	// Bad arguments are bad arguments, read-only or not.
	if _, err := o.WriteAt(buf, -1); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("write at -1: %v; want fs.ErrInvalid", err)
	}
	if _, err := ro.Create(""); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("create \"\": %v; want fs.ErrInvalid", err)
	}
	if err := o.Truncate(-1); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("truncate -1: %v; want fs.ErrInvalid", err)
	}
}

// TestCheckpointFallback: a damaged newest checkpoint falls back to the
// older one; a damaged superblock A falls back to copy B.
func TestCheckpointFallback(t *testing.T) {
	dev := NewMemDevice(32<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	sb := e.sb
	o, _ := e.Create("x")
	o.WriteAt([]byte("one"), 0)
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	o.WriteAt([]byte("two"), 0)
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	slot := e.ckptSlot
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	// Close wrote one more checkpoint into the other slot; damage it.
	newest := 1 - slot
	blk := make([]byte, 4096)
	dev.ReadAt(blk, sb.CkptStart[newest]*4096)
	blk[100] ^= 0xff
	dev.WriteAt(blk, sb.CkptStart[newest]*4096)
	// And superblock A.
	dev.ReadAt(blk, 0)
	blk[20] ^= 0xff
	dev.WriteAt(blk, 0)
	e, err := Open(dev, Options{CacheSize: 8 << 20})
	if err != nil {
		t.Fatalf("open with a damaged checkpoint and superblock A: %v", err)
	}
	defer e.Close()
	o, err = e.Object("x")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	o.ReadAt(buf, 0)
	if string(buf) != "two" {
		t.Fatalf("read %q after fallback, want the synced %q", buf, "two")
	}
}

// slowDevice delays every write and counts writes in flight; it hides the
// vectored methods, so the engine uses plain writes.
type slowDevice struct {
	Device
	delay    time.Duration
	inflight atomic.Int64
	failRead atomic.Bool
}

func (d *slowDevice) WriteAt(p []byte, off int64) (int, error) {
	d.inflight.Add(1)
	defer d.inflight.Add(-1)
	time.Sleep(d.delay)
	return d.Device.WriteAt(p, off)
}

func (d *slowDevice) ReadAt(p []byte, off int64) (int, error) {
	if d.failRead.Load() {
		return 0, syscall.EIO
	}
	return d.Device.ReadAt(p, off)
}

// TestSyncWaitsForBackgroundWriteback: an Engine.Sync that races with a
// background writeback returns only after that writeback's writes are done.
func TestSyncWaitsForBackgroundWriteback(t *testing.T) {
	for round := 0; round < 5; round++ {
		dev := &slowDevice{Device: NewMemDevice(64<<20, 4096), delay: 20 * time.Millisecond}
		e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20, DirtyLimit: 1 << 20})
		o, _ := e.Create("x")
		buf := make([]byte, 64<<10)
		for off := int64(0); off < 4<<20; off += int64(len(buf)) {
			if _, err := o.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
		// Let background writeback take the last pages, then Sync.
		time.Sleep(2 * time.Millisecond)
		if err := e.Sync(); err != nil {
			t.Fatal(err)
		}
		if n := dev.inflight.Load(); n != 0 {
			t.Fatalf("round %d: Sync returned with %d writes still in flight", round, n)
		}
		e.Close()
	}
}

// TestFailedReadModifyWrite: a write whose read-modify-write fails leaves
// what it copied recorded, and the object keeps working.
func TestFailedReadModifyWrite(t *testing.T) {
	dev := &slowDevice{Device: NewMemDevice(32<<20, 4096)}
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	o, _ := e.Create("x")
	o.WriteAt(bytes.Repeat([]byte{1}, 4096), 4096)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e, err := Open(dev, Options{CacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	o, _ = e.Object("x")
	dev.failRead.Store(true)
	n, err := o.WriteAt(bytes.Repeat([]byte{2}, 4096+100), 0)
	if !errors.Is(err, syscall.EIO) || n != 4096 {
		t.Fatalf("WriteAt = %d, %v; want 4096 and EIO", n, err)
	}
	dev.failRead.Store(false)
	if err := o.Sync(); err != nil {
		t.Fatalf("Sync after a failed read-modify-write: %v", err)
	}
	got := make([]byte, 8192)
	o.ReadAt(got, 0)
	if !bytes.Equal(got[:4096], bytes.Repeat([]byte{2}, 4096)) || !bytes.Equal(got[4096:], bytes.Repeat([]byte{1}, 4096)) {
		t.Fatal("contents after a failed read-modify-write")
	}
	checkInvariants(t, e)
}

// TestSmallDirtyLimit: writes larger than the dirty limit are split, not
// refused.
func TestSmallDirtyLimit(t *testing.T) {
	e := mustFormatOpen(t, NewMemDevice(32<<20, 4096), Options{CacheSize: 8 << 20, DirtyLimit: 256 << 10})
	defer e.Close()
	o, _ := e.Create("x")
	p := bytes.Repeat([]byte{9}, 3<<20)
	if n, err := o.WriteAt(p, 0); n != len(p) || err != nil {
		t.Fatalf("WriteAt = %d, %v", n, err)
	}
	got := make([]byte, len(p))
	if n, err := o.ReadAt(got, 0); n != len(p) || err != nil || !bytes.Equal(got, p) {
		t.Fatalf("ReadAt = %d, %v", n, err)
	}
}

// ExtentsIn is Extents cut to the blocks a range touches, for any range,
// whatever mix of written, delalloc and hole the map holds.
func TestExtentsIn(t *testing.T) {
	e := mustFormatOpen(t, NewMemDevice(64<<20, 4096), Options{CacheSize: 8 << 20})
	defer e.Close()
	o, err := e.Create("x")
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(7, 8))
	buf := make([]byte, 64<<10)
	for i := 0; i < 200; i++ {
		off := r.Int64N(8 << 20)
		n := r.IntN(len(buf)) + 1
		if _, err := o.WriteAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
		switch r.IntN(20) {
		case 0:
			if err := o.Sync(); err != nil {
				t.Fatal(err)
			}
		case 1:
			if err := o.PunchHole(r.Int64N(8<<20), r.Int64N(256<<10)); err != nil {
				t.Fatal(err)
			}
		}
	}
	all := o.Extents()
	const bs = 4096
	for i := 0; i < 2000; i++ {
		off, length := r.Int64N(9<<20), r.Int64N(1<<20)
		if i%10 == 0 {
			length = 0
		}
		got, err := o.ExtentsIn(off, length)
		if err != nil {
			t.Fatal(err)
		}
		var want []Extent
		if length > 0 {
			lo, hi := off/bs*bs, (off+length+bs-1)/bs*bs
			for _, x := range all {
				s, end := max(x.Offset, lo), min(x.Offset+x.Length, hi)
				if s >= end {
					continue
				}
				c := Extent{Offset: s, Length: end - s, State: x.State, Physical: x.Physical}
				if c.Physical >= 0 {
					c.Physical += s - x.Offset
				}
				want = append(want, c)
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("ExtentsIn(%d, %d) = %+v, want %+v", off, length, got, want)
		}
	}
	for _, bad := range [][2]int64{{-1, 1}, {0, -1}, {MaxObjectSize, 1}, {1, MaxObjectSize}} {
		if _, err := o.ExtentsIn(bad[0], bad[1]); !errors.Is(err, fs.ErrInvalid) {
			t.Fatalf("ExtentsIn(%d, %d): %v, want fs.ErrInvalid", bad[0], bad[1], err)
		}
	}
}

// Truncate and PunchHole read the partial blocks they zero before they
// change anything: when that read fails, the call fails and the object's
// size and contents are as before.
func TestPartialZeroReadFailureChangesNothing(t *testing.T) {
	const bs = 4096
	for _, tc := range []struct {
		name string
		op   func(o *Object) error
	}{
		{"truncate", func(o *Object) error { return o.Truncate(5*bs + 100) }},
		{"punch", func(o *Object) error { return o.PunchHole(bs+100, 4*bs) }},
		{"punch inside a block", func(o *Object) error { return o.PunchHole(2*bs+10, 100) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := NewFaultDevice(32<<20, 512)
			e := mustFormatOpen(t, dev, Options{CacheSize: 4 << 20})
			defer e.Close()
			o, err := e.Create("a")
			if err != nil {
				t.Fatal(err)
			}
			data := make([]byte, 10*bs)
			for i := range data {
				data[i] = byte(i*7 + 1)
			}
			if _, err := o.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := o.Sync(); err != nil {
				t.Fatal(err)
			}
			// Written and clean, out of the cache: the edge must be read.
			e.cache.RemoveRange(o.id, 0, 10)
			if err := dev.Inject(Fault{Op: FaultRead, Times: -1, Err: syscall.EIO}); err != nil {
				t.Fatal(err)
			}
			if err := tc.op(o); !errors.Is(err, syscall.EIO) {
				t.Fatalf("%s with failing reads: %v, want EIO", tc.name, err)
			}
			dev.ClearFaults()
			if o.Size() != int64(len(data)) {
				t.Fatalf("size %d after the failed %s, want %d", o.Size(), tc.name, len(data))
			}
			got := make([]byte, len(data))
			if _, err := o.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("contents changed by the failed %s", tc.name)
			}
		})
	}
}

// A one-shot EIO at writeback is reported once to each observer: the
// object's Sync, and the engine (its Sync, or Close when no engine Sync
// came first), though the retry wrote the data.
func TestOneShotWritebackErrorReachesEachObserver(t *testing.T) {
	for _, engineSync := range []bool{true, false} {
		dev := NewFaultDevice(32<<20, 512)
		e := mustFormatOpen(t, dev, Options{CacheSize: 4 << 20})
		o, err := e.Create("a")
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Sync(); err != nil {
			t.Fatal(err)
		}
		data := bytes.Repeat([]byte{7}, 64<<10)
		if _, err := o.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		dev.FailOn(FaultWrite, 1, syscall.EIO)
		if err := o.Sync(); !errors.Is(err, syscall.EIO) {
			t.Fatalf("Object.Sync with a failing write: %v, want EIO", err)
		}
		if err := o.Sync(); err != nil {
			t.Fatalf("second Object.Sync: %v, want nil (reported once)", err)
		}
		if engineSync {
			if err := e.Sync(); !errors.Is(err, syscall.EIO) {
				t.Fatalf("Engine.Sync after the object's: %v, want EIO", err)
			}
			if err := e.Sync(); err != nil {
				t.Fatalf("second Engine.Sync: %v, want nil", err)
			}
			if err := e.Close(); err != nil {
				t.Fatalf("Close after Engine.Sync reported: %v", err)
			}
		} else if err := e.Close(); !errors.Is(err, syscall.EIO) {
			t.Fatalf("Close with no Engine.Sync after the failure: %v, want EIO", err)
		}
		e, err = Open(dev, Options{CacheSize: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		o, err = e.Object("a")
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if _, err := o.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("after reopen: %v, data equal %v", err, bytes.Equal(got, data))
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

package engine_test

// Adversarial black-box tests of the public API: the metadata region under
// many small extents, crashes around removal and reuse, full and failing
// devices, unaligned I/O at every block size, huge offsets, and journal
// records that pass their checksums but describe impossible states.

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rawblock/rawblock/engine"
)

const advMiB = 1 << 20

func advOpen(t *testing.T, dev engine.Device) *engine.Engine {
	t.Helper()
	e, err := engine.Open(dev, engine.Options{CacheSize: 8 * advMiB})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return e
}

func advObj(t *testing.T, e *engine.Engine, name string) *engine.Object {
	t.Helper()
	o, err := e.Object(name)
	if err != nil {
		t.Fatalf("Object(%q): %v", name, err)
	}
	return o
}

func advFill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func advRand(rng *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.IntN(255) + 1) // never 0: zeros mean "hole"
	}
	return p
}

// ---------------------------------------------------------------------------
// Metadata region: acknowledged writes must never make a later Sync fail
// because the metadata does not fit (the write must refuse up front).

// TestAdvMetadataSmallRegionUsable: Format accepts a small MetadataSize; the
// resulting engine must be able to create at least one object, or Format
// must refuse the option with a clear error.
func TestAdvMetadataSmallRegionUsable(t *testing.T) {
	for _, ms := range []int64{16 << 10, 32 << 10, 64 << 10} {
		t.Run(fmt.Sprint(ms), func(t *testing.T) {
			dev := engine.NewMemDevice(16*advMiB, 512)
			if err := engine.Format(dev, engine.FormatOptions{MetadataSize: ms}); err != nil {
				t.Skipf("Format refused MetadataSize %d: %v (fine)", ms, err)
			}
			e := advOpen(t, dev)
			defer e.Close()
			o, err := e.Create("a")
			if err != nil {
				t.Fatalf("Format accepted MetadataSize %d but Create of the first object fails: %v", ms, err)
			}
			bbWrite(t, o, []byte("hello"), 0)
			if err := e.Sync(); err != nil {
				t.Fatalf("Sync: %v", err)
			}
		})
	}
}

// TestAdvMetadataSparseWritesThenSync: many sparse one-byte writes each
// pass the write-time metadata check (nothing is logged until writeback),
// then the Sync that maps them all must not fail and shut the engine down.
// Either WriteAt refuses some write (ErrMetadataFull / ErrNoSpace), or Sync
// succeeds and the data survives Close+Open.
func TestAdvMetadataSparseWritesThenSync(t *testing.T) {
	for _, tc := range []struct {
		name string
		fo   engine.FormatOptions
		n    int
	}{
		{"meta64k-bs4k", engine.FormatOptions{MetadataSize: 64 << 10}, 1500},
		{"default-bs512", engine.FormatOptions{BlockSize: 512}, 12000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := engine.NewMemDevice(16*advMiB, 512)
			a2Format(t, dev, tc.fo)
			e, err := engine.Open(dev, engine.Options{CacheSize: 64 * advMiB})
			if err != nil {
				t.Fatal(err)
			}
			o := a2Create(t, e, "sparse")
			bs := int64(4096)
			if tc.fo.BlockSize != 0 {
				bs = int64(tc.fo.BlockSize)
			}
			acked := 0
			for i := 0; i < tc.n; i++ {
				_, err := o.WriteAt([]byte{byte(i%250 + 1)}, int64(i)*2*bs)
				if err != nil {
					if errors.Is(err, engine.ErrMetadataFull) || errors.Is(err, engine.ErrNoSpace) {
						t.Logf("write %d refused: %v", i, err)
						break
					}
					t.Fatalf("write %d: %v", i, err)
				}
				acked++
			}
			if err := e.Sync(); err != nil {
				t.Fatalf("after %d acknowledged sparse writes, Sync failed: %v", acked, err)
			}
			if err := e.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			e = advOpen(t, dev)
			defer e.Close()
			o = advObj(t, e, "sparse")
			b := make([]byte, 1)
			for i := 0; i < acked; i++ {
				if _, err := o.ReadAt(b, int64(i)*2*bs); err != nil || b[0] != byte(i%250+1) {
					t.Fatalf("byte of write %d: %#x, %v", i, b[0], err)
				}
			}
		})
	}
}

// TestAdvMetadataManySmallObjects: the default format of a 16 MiB device
// with 4 KiB blocks; thousands of small objects, each created (the create
// passes the metadata check) and given one byte. The extent each one maps
// at writeback is not counted by the write-time check, so the final Sync
// must not be where the metadata region overflows.
func TestAdvMetadataManySmallObjects(t *testing.T) {
	dev := engine.NewMemDevice(16*advMiB, 512)
	a2Format(t, dev, engine.FormatOptions{})
	e, err := engine.Open(dev, engine.Options{CacheSize: 32 * advMiB})
	if err != nil {
		t.Fatal(err)
	}
	acked := 0
	for i := 0; i < 3900; i++ {
		o, err := e.Create(fmt.Sprintf("obj%05d", i))
		if err != nil {
			if errors.Is(err, engine.ErrMetadataFull) || errors.Is(err, engine.ErrNoSpace) {
				t.Logf("create %d refused: %v", i, err)
				break
			}
			t.Fatalf("create %d: %v", i, err)
		}
		if _, err := o.WriteAt([]byte{byte(i%250 + 1)}, 0); err != nil {
			if errors.Is(err, engine.ErrMetadataFull) || errors.Is(err, engine.ErrNoSpace) {
				t.Logf("write %d refused: %v", i, err)
				break
			}
			t.Fatalf("write %d: %v", i, err)
		}
		acked++
	}
	if err := e.Sync(); err != nil {
		cerr := e.Close()
		lost := 0
		if e2, oerr := engine.Open(dev, engine.Options{CacheSize: 32 * advMiB}); oerr == nil {
			for i := 0; i < acked; i++ {
				o, err := e2.Object(fmt.Sprintf("obj%05d", i))
				b := make([]byte, 1)
				if err != nil {
					lost++
				} else if _, err := o.ReadAt(b, 0); err != nil || b[0] != byte(i%250+1) {
					lost++
				}
			}
			e2.Close()
		}
		t.Fatalf("after %d small objects were created and written (every call acknowledged), Sync failed: %v; Close: %v; after reopen %d of them are lost or wrong", acked, err, cerr, lost)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e = advOpen(t, dev)
	defer e.Close()
	for i := 0; i < acked; i++ {
		o := advObj(t, e, fmt.Sprintf("obj%05d", i))
		b := make([]byte, 1)
		if _, err := o.ReadAt(b, 0); err != nil || b[0] != byte(i%250+1) {
			t.Fatalf("object %d: %#x, %v", i, b[0], err)
		}
	}
}

// ---------------------------------------------------------------------------
// Crash tests on the FaultDevice.

func advFaultDev(t *testing.T, size int64, sector int, fo engine.FormatOptions) *engine.FaultDevice {
	t.Helper()
	d := engine.NewFaultDevice(size, sector)
	a2Format(t, d, fo)
	return d
}

var advCrashOpts = engine.Options{CacheSize: 4 * advMiB}

func advReboot(t *testing.T, d *engine.FaultDevice, seed uint64, tear bool) (*engine.FaultDevice, *engine.Engine) {
	t.Helper()
	nd, _ := d.Reboot(rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), tear)
	e, err := engine.Open(nd, advCrashOpts)
	if err != nil {
		t.Fatalf("seed %d: Open after reboot: %v", seed, err)
	}
	if r, err := engine.Check(nd); err == nil && len(r.Problems) > 0 {
		t.Errorf("seed %d: fsck after reboot: %v", seed, r.Problems)
	}
	return nd, e
}

// TestAdvCrashRemoveThenReuse: object A is synced full of 0xAA and removed;
// B is created and written in part (holes, partial blocks) while the power
// is cut at every point of its Sync. After the reboot B must never show a
// byte of A, and A, if it came back, must hold exactly its synced data.
func TestAdvCrashRemoveThenReuse(t *testing.T) {
	const asz = 256 << 10
	for _, syncRemove := range []bool{false, true} {
		for cut := int64(0); cut < 14; cut++ {
			for seed := uint64(0); seed < 3; seed++ {
				d := advFaultDev(t, 24*advMiB, 512, engine.FormatOptions{})
				e, err := engine.Open(d, advCrashOpts)
				if err != nil {
					t.Fatal(err)
				}
				a := a2Create(t, e, "a")
				bbWrite(t, a, advFill(0xAA, asz), 0)
				if err := e.Sync(); err != nil {
					t.Fatal(err)
				}
				if err := e.Remove("a"); err != nil {
					t.Fatal(err)
				}
				if syncRemove {
					if err := e.Sync(); err != nil {
						t.Fatal(err)
					}
				}
				b := a2Create(t, e, "b")
				// Partial writes scattered over what A occupied.
				want := make([]byte, asz)
				for _, w := range []struct{ off, n int }{{100, 50}, {5000, 9000}, {65536 + 7, 1}, {200000, 30000}} {
					bbWrite(t, b, advFill(0xBB, w.n), int64(w.off))
					copy(want[w.off:], advFill(0xBB, w.n))
				}
				if err := b.Truncate(asz); err != nil {
					t.Fatal(err)
				}
				d.CrashAfter(cut)
				syncErr := b.Sync()
				d.Crash()
				_ = e.Close()
				var nd *engine.FaultDevice
				nd, e = advReboot(t, d, seed+uint64(cut)*10, true)
				_ = nd
				if syncRemove || syncErr == nil {
					if _, err := e.Object("a"); err == nil && syncRemove {
						t.Fatalf("cut %d: removed object a came back after Engine.Sync", cut)
					}
				}
				if ao, err := e.Object("a"); err == nil {
					got := bbReadAll(t, ao)
					if d := firstDiff(got, advFill(0xAA, asz)); d != "" {
						t.Fatalf("cut %d seed %d: a came back altered: %s", cut, seed, d)
					}
				}
				bo, err := e.Object("b")
				if err != nil {
					if syncErr == nil {
						t.Fatalf("cut %d: b lost after a successful Sync: %v", cut, err)
					}
					e.Close()
					continue
				}
				got := bbReadAll(t, bo)
				for i, c := range got {
					if c == 0xAA {
						t.Fatalf("cut %d seed %d syncRemove %v: b byte %d reads a's 0xAA", cut, seed, syncRemove, i)
					}
					if c != 0 && c != want[i] {
						t.Fatalf("cut %d seed %d: b byte %d reads %#x, never written", cut, seed, i, c)
					}
				}
				if syncErr == nil {
					if d := firstDiff(got, want); d != "" {
						t.Fatalf("cut %d seed %d: b after successful Sync: %s", cut, seed, d)
					}
				}
				e.Close()
			}
		}
	}
}

// TestAdvCrashMetadataChurn: a small metadata region (the journal wraps and
// checkpoints alternate often) churned by creates, writes, truncates,
// removes and Engine.Syncs, with the power cut at a random point. Every
// state a successful Engine.Sync acknowledged must be what the reboot
// finds, or a later one: objects synced and not touched since are exact,
// objects removed before a successful Sync stay removed.
func TestAdvCrashMetadataChurn(t *testing.T) {
	for seed := uint64(1); seed <= 40; seed++ {
		rng := rand.New(rand.NewPCG(seed, 7))
		d := advFaultDev(t, 20*advMiB, 512, engine.FormatOptions{MetadataSize: 128 << 10})
		e, err := engine.Open(d, advCrashOpts)
		if err != nil {
			t.Fatal(err)
		}
		keep := a2Create(t, e, "keep")
		keepData := advRand(rng, 100000)
		bbWrite(t, keep, keepData, 3)
		keepData = append(make([]byte, 3), keepData...)
		if err := keep.Sync(); err != nil {
			t.Fatal(err)
		}
		// synced: name -> contents as of the last successful Engine.Sync
		// for objects not modified since; removed: names whose removal a
		// successful Sync covered.
		synced := map[string][]byte{"keep": keepData}
		cur := map[string][]byte{}
		removed := map[string]bool{}
		touched := map[string]bool{}
		d.CrashAfter(int64(rng.IntN(400)))
		crashed := false
		for step := 0; step < 200 && !crashed; step++ {
			name := fmt.Sprintf("o%d", rng.IntN(12))
			var err error
			switch k := rng.IntN(10); {
			case k < 3:
				var o *engine.Object
				o, err = e.Create(name)
				if err == nil {
					cur[name] = []byte{}
					touched[name] = true
					delete(removed, name)
					n := rng.IntN(20000) + 1
					off := rng.IntN(10000)
					p := advRand(rng, n)
					if _, err = o.WriteAt(p, int64(off)); err == nil {
						m := make([]byte, off+n)
						copy(m[off:], p)
						cur[name] = m
					}
				} else if errors.Is(err, fs.ErrExist) {
					err = nil
				}
			case k < 5:
				if _, ok := cur[name]; ok {
					var o *engine.Object
					if o, err = e.Object(name); err == nil {
						sz := rng.IntN(30000)
						if err = o.Truncate(int64(sz)); err == nil {
							m := cur[name]
							if sz < len(m) {
								m = m[:sz]
							} else {
								m = append(m, make([]byte, sz-len(m))...)
							}
							cur[name] = m
							touched[name] = true
						}
					}
				}
			case k < 7:
				if _, ok := cur[name]; ok {
					if err = e.Remove(name); err == nil {
						delete(cur, name)
						touched[name] = true
					}
				}
			default:
				if err = e.Sync(); err == nil {
					for n := range touched {
						if m, ok := cur[n]; ok {
							synced[n] = bytes.Clone(m)
							delete(removed, n)
						} else {
							delete(synced, n)
							removed[n] = true
						}
					}
					clear(touched)
				}
			}
			if err != nil {
				if !d.Crashed() {
					t.Fatalf("seed %d step %d: %v (device not crashed)", seed, step, err)
				}
				crashed = true
			}
		}
		d.Crash()
		_ = e.Close()
		_, e = advReboot(t, d, seed, true)
		for n, want := range synced {
			if touched[n] {
				continue // modified after its last Sync: may be newer
			}
			o, err := e.Object(n)
			if err != nil {
				t.Fatalf("seed %d: synced object %q lost: %v", seed, n, err)
			}
			if d := firstDiff(bbReadAll(t, o), want); d != "" {
				t.Fatalf("seed %d: synced object %q: %s", seed, n, d)
			}
		}
		for n := range removed {
			if touched[n] {
				continue
			}
			if _, err := e.Object(n); err == nil {
				t.Fatalf("seed %d: object %q removed before a successful Sync came back", seed, n)
			}
		}
		e.Close()
	}
}

// ---------------------------------------------------------------------------
// Unaligned I/O against a model, on every engine block size.

type advModel map[string][]byte

func advCheckObj(t *testing.T, o *engine.Object, want []byte, what string) {
	t.Helper()
	if o.Size() != int64(len(want)) {
		t.Fatalf("%s: size %d, want %d", what, o.Size(), len(want))
	}
	got := make([]byte, len(want)+17)
	n, err := o.ReadAt(got, 0)
	if n != len(want) {
		t.Fatalf("%s: ReadAt = %d, %v; want %d", what, n, err, len(want))
	}
	if err != io.EOF {
		t.Fatalf("%s: ReadAt past the end returned err %v, want io.EOF", what, err)
	}
	if d := firstDiff(got[:n], want); d != "" {
		t.Fatalf("%s: %s", what, d)
	}
}

func TestAdvModelBlockSizes(t *testing.T) {
	for _, geo := range []struct{ sector, block int }{{512, 512}, {512, 4096}, {4096, 16384}, {512, 65536}, {4096, 65536}} {
		t.Run(fmt.Sprintf("sector%d-block%d", geo.sector, geo.block), func(t *testing.T) {
			for seed := uint64(1); seed <= 2; seed++ {
				advModelRun(t, geo.sector, geo.block, seed)
			}
		})
	}
}

func advModelRun(t *testing.T, sector, block int, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, uint64(block)))
	dev := engine.NewMemDevice(32*advMiB, sector)
	a2Format(t, dev, engine.FormatOptions{BlockSize: block})
	open := func() *engine.Engine {
		e, err := engine.Open(dev, engine.Options{CacheSize: 8 * advMiB})
		if err != nil {
			t.Fatalf("seed %d: Open: %v", seed, err)
		}
		return e
	}
	e := open()
	defer func() { e.Close() }()
	m := advModel{}
	names := []string{"a", "b", "c"}
	bs := block
	// offsets near block boundaries
	pos := func(maxv int) int64 {
		switch rng.IntN(4) {
		case 0:
			return int64(rng.IntN(maxv + 1))
		case 1:
			return int64(rng.IntN(maxv/bs+1)*bs + rng.IntN(3) - 1)
		case 2:
			return int64(rng.IntN(maxv/bs+1) * bs)
		default:
			return int64(rng.IntN(maxv/bs+1)*bs + bs - 1)
		}
	}
	maxSz := 6 * bs
	if maxSz > 512<<10 {
		maxSz = 512 << 10
	}
	for step := 0; step < 150; step++ {
		name := names[rng.IntN(len(names))]
		o, err := e.Object(name)
		if err != nil {
			o, err = e.Create(name)
			if err != nil {
				t.Fatal(err)
			}
			m[name] = []byte{}
		}
		cur := m[name]
		what := fmt.Sprintf("seed %d step %d %s", seed, step, name)
		switch k := rng.IntN(12); {
		case k < 4:
			off := max(pos(maxSz), 0)
			n := int(max(pos(bs*2), 0))
			p := advRand(rng, n)
			if w, err := o.WriteAt(p, off); w != n || err != nil {
				t.Fatalf("%s: WriteAt(%d, %d) = %d, %v", what, n, off, w, err)
			}
			if end := int(off) + n; end > len(cur) && n > 0 {
				cur = append(cur, make([]byte, end-len(cur))...)
			}
			if n > 0 {
				copy(cur[off:], p)
			}
		case k < 6:
			off := max(pos(maxSz), 0)
			n := int(max(pos(bs*3), 0))
			buf := make([]byte, n)
			got, err := o.ReadAt(buf, off)
			var want []byte
			if int(off) < len(cur) {
				want = cur[off:min(len(cur), int(off)+n)]
			}
			if got != len(want) {
				t.Fatalf("%s: ReadAt(%d at %d) = %d, %v; want %d", what, n, off, got, err, len(want))
			}
			if got < n && err != io.EOF {
				t.Fatalf("%s: short ReadAt(%d at %d) = %d with err %v, want io.EOF", what, n, off, got, err)
			}
			if got == n && err != nil && !(err == io.EOF && int(off)+n == len(cur)) {
				t.Fatalf("%s: full ReadAt = %d, %v", what, got, err)
			}
			if d := firstDiff(buf[:got], want); d != "" {
				t.Fatalf("%s: ReadAt(%d at %d): %s", what, n, off, d)
			}
		case k < 7:
			sz := max(pos(maxSz), 0)
			if err := o.Truncate(sz); err != nil {
				t.Fatalf("%s: Truncate(%d): %v", what, sz, err)
			}
			if int(sz) < len(cur) {
				cur = cur[:sz]
			} else {
				cur = append(cur, make([]byte, int(sz)-len(cur))...)
			}
		case k < 8:
			off := max(pos(maxSz), 0)
			n := max(pos(bs*3), 0)
			if err := o.PunchHole(off, n); err != nil {
				t.Fatalf("%s: PunchHole(%d, %d): %v", what, off, n, err)
			}
			for i := off; i < off+n && int(i) < len(cur); i++ {
				cur[i] = 0
			}
		case k < 9:
			if err := o.Sync(); err != nil {
				t.Fatalf("%s: Sync: %v", what, err)
			}
		case k < 10:
			if rng.IntN(3) == 0 {
				if err := e.Remove(name); err != nil {
					t.Fatalf("%s: Remove: %v", what, err)
				}
				delete(m, name)
				continue
			}
		default:
			if err := e.Close(); err != nil {
				t.Fatalf("%s: Close: %v", what, err)
			}
			e = open()
			o = advObj(t, e, name)
		}
		m[name] = cur
		advCheckObj(t, o, cur, what)
	}
	for n, want := range m {
		advCheckObj(t, advObj(t, e, n), want, fmt.Sprintf("seed %d final %s", seed, n))
	}
}

// ---------------------------------------------------------------------------
// Full device.

func advStatsSane(t *testing.T, e *engine.Engine, what string) engine.Stats {
	t.Helper()
	st := e.Stats()
	if st.FreeBytes < 0 || st.ReservedBytes < 0 || st.ReservedBytes > st.FreeBytes || st.FreeBytes > st.TotalBytes {
		t.Fatalf("%s: insane stats: total %d free %d reserved %d", what, st.TotalBytes, st.FreeBytes, st.ReservedBytes)
	}
	return st
}

// advMapped sums the Written/Unwritten extents of every object.
func advMapped(t *testing.T, e *engine.Engine) int64 {
	var sum int64
	for _, n := range e.Objects() {
		o := advObj(t, e, n)
		for _, x := range o.Extents() {
			if x.State != engine.Delalloc {
				sum += x.Length
			}
		}
	}
	return sum
}

// TestAdvFullDevice fills the device with unaligned writes to ErrNoSpace,
// then: overwrites everything in place, punches, truncates and removes,
// and writes again into the space given back. Sync must never return
// ErrNoSpace, and everything acknowledged must read back after reopen.
func TestAdvFullDevice(t *testing.T) {
	dev := engine.NewMemDevice(16*advMiB, 512)
	a2Format(t, dev, engine.FormatOptions{})
	e, err := engine.Open(dev, engine.Options{CacheSize: 8 * advMiB})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { e.Close() }()
	rng := rand.New(rand.NewPCG(3, 4))
	m := advModel{}
	st0 := advStatsSane(t, e, "empty")
	// Fill: several objects, odd sizes, until ErrNoSpace.
	full := false
	maxN := 300000
	for i := 0; !full; i++ {
		name := fmt.Sprintf("f%d", i%5)
		o, err := e.Object(name)
		if err != nil {
			o = a2Create(t, e, name)
			m[name] = nil
		}
		n := rng.IntN(maxN) + 1
		p := advRand(rng, n)
		off := int64(len(m[name]))
		w, err := o.WriteAt(p, off)
		if err != nil {
			if !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("fill: %v", err)
			}
			if w != 0 {
				t.Fatalf("ErrNoSpace with n = %d", w)
			}
			// Smaller writes until even one byte does not fit a new block.
			if n > 1 {
				maxN = max(n/2, 1)
				continue
			}
			full = true
			break
		}
		m[name] = append(m[name], p...)
		if i%7 == 0 {
			if err := e.Sync(); err != nil {
				t.Fatalf("Sync while filling: %v", err)
			}
		}
		if i > 5000 {
			t.Fatal("device never filled")
		}
	}
	if err := e.Sync(); err != nil {
		t.Fatalf("Sync of a full device: %v", err)
	}
	st := advStatsSane(t, e, "full")
	if st.ReservedBytes != 0 {
		t.Errorf("reserved %d after Sync", st.ReservedBytes)
	}
	if used := advMapped(t, e); used != st.TotalBytes-st.FreeBytes {
		t.Errorf("full: mapped %d bytes, but Total-Free = %d", used, st.TotalBytes-st.FreeBytes)
	}
	t.Logf("full: free %d of %d (start %d)", st.FreeBytes, st.TotalBytes, st0.FreeBytes)
	// Overwrite everything in place, unaligned, in pieces.
	for name, cur := range m {
		o := advObj(t, e, name)
		for off := 0; off < len(cur); {
			n := min(rng.IntN(70000)+1, len(cur)-off)
			p := advRand(rng, n)
			bbWrite(t, o, p, int64(off))
			copy(cur[off:], p)
			off += n
		}
	}
	if err := e.Sync(); err != nil {
		t.Fatalf("Sync after overwriting in place on a full device: %v", err)
	}
	// A write into a hole past the end must fail cleanly now.
	if o := advObj(t, e, "f0"); true {
		if n, err := o.WriteAt([]byte{1}, int64(len(m["f0"]))+10*advMiB); !errors.Is(err, engine.ErrNoSpace) || n != 0 {
			t.Fatalf("write into a hole of a full device = %d, %v; want 0, ErrNoSpace", n, err)
		}
		if o.Size() != int64(len(m["f0"])) {
			t.Fatalf("a refused write changed the size to %d", o.Size())
		}
	}
	// Punch 1 MiB out of f1 (unaligned), then the space must be writable
	// without any Sync in between.
	o1 := advObj(t, e, "f1")
	if len(m["f1"]) > 2*advMiB {
		off := int64(12345)
		if err := o1.PunchHole(off, advMiB); err != nil {
			t.Fatal(err)
		}
		clear(m["f1"][off : off+advMiB])
		p := advRand(rng, 512<<10)
		bbWrite(t, o1, p, off+1000)
		copy(m["f1"][off+1000:], p)
	}
	// Truncate f2 to a third, write elsewhere (f3 append) into it at once.
	o2 := advObj(t, e, "f2")
	third := len(m["f2"]) / 3
	if err := o2.Truncate(int64(third) + 1); err != nil {
		t.Fatal(err)
	}
	m["f2"] = m["f2"][:third+1]
	o3 := advObj(t, e, "f3")
	grow := advRand(rng, third/2)
	bbWrite(t, o3, grow, int64(len(m["f3"])))
	m["f3"] = append(m["f3"], grow...)
	// Remove f4, create g, fill g with the space it gave back.
	g4 := len(m["f4"])
	if err := e.Remove("f4"); err != nil {
		t.Fatal(err)
	}
	delete(m, "f4")
	g := a2Create(t, e, "g")
	gp := advRand(rng, max(g4-8192, 1))
	bbWrite(t, g, gp, 0)
	m["g"] = gp
	if err := e.Sync(); err != nil {
		t.Fatalf("Sync after reuse: %v", err)
	}
	st = advStatsSane(t, e, "after reuse")
	if st.ReservedBytes != 0 {
		t.Errorf("reserved %d after Sync", st.ReservedBytes)
	}
	if used := advMapped(t, e); used != st.TotalBytes-st.FreeBytes {
		t.Errorf("after reuse: mapped %d bytes, but Total-Free = %d", used, st.TotalBytes-st.FreeBytes)
	}
	for name, want := range m {
		advCheckObj(t, advObj(t, e, name), want, "before reopen "+name)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e = advOpen(t, dev)
	for name, want := range m {
		advCheckObj(t, advObj(t, e, name), want, "after reopen "+name)
	}
	st2 := advStatsSane(t, e, "reopened")
	if st2.FreeBytes != st.FreeBytes {
		t.Errorf("free bytes %d after reopen, %d before", st2.FreeBytes, st.FreeBytes)
	}
}

// ---------------------------------------------------------------------------
// Failing devices.

func advLayout(t *testing.T, d engine.Device) engine.Layout {
	t.Helper()
	r, err := engine.Check(d)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	return r.Layout
}

// TestAdvReadEIONotCached: a data read that fails with EIO must report it
// (errors.Is), return n == 0 or a short count with the error, and must not
// leave zeros or garbage in the cache: once the device heals the same read
// returns the data. Covers single-block, multi-block, sequential and
// read-modify-write reads.
func TestAdvReadEIONotCached(t *testing.T) {
	d := advFaultDev(t, 32*advMiB, 512, engine.FormatOptions{})
	lay := advLayout(t, d)
	bs := int64(lay.BlockSize)
	dataLo, dataHi := lay.DataStart*bs, lay.TotalBlocks*bs
	e, err := engine.Open(d, engine.Options{CacheSize: 8 * advMiB})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(9, 9))
	o := a2Create(t, e, "x")
	want := advRand(rng, 3*advMiB)
	bbWrite(t, o, want, 0)
	if err := e.Close(); err != nil { // drop every cached page
		t.Fatal(err)
	}
	e, err = engine.Open(d, engine.Options{CacheSize: 8 * advMiB})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	o = advObj(t, e, "x")
	for i, rd := range []struct{ off, n int64 }{
		{5, 10},              // one block
		{bs + 7, 3*bs + 100}, // several blocks
		{8 * bs, 8 * bs},     // sequential: two reads in a row then more
		{16 * bs, 8 * bs},
		{24 * bs, 8 * bs},
		{32 * bs, 64 * bs},
	} {
		if err := d.Inject(engine.Fault{Op: engine.FaultRead, Times: -1, Match: fltIn(dataLo, dataHi), Err: syscall.EIO}); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, rd.n)
		n, err := o.ReadAt(buf, rd.off)
		if err == nil {
			// Served from cache or a readahead made earlier: must be right.
			if d := firstDiff(buf[:n], want[rd.off:rd.off+rd.n]); d != "" || n != len(buf) {
				t.Fatalf("read %d under EIO returned %d, nil and wrong data: %s", i, n, d)
			}
		} else if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read %d: error %v does not wrap EIO", i, err)
		}
		d.ClearFaults()
		n, err = o.ReadAt(buf, rd.off)
		if n != len(buf) || err != nil {
			t.Fatalf("read %d after heal: %d, %v", i, n, err)
		}
		if d := firstDiff(buf, want[rd.off:rd.off+rd.n]); d != "" {
			t.Fatalf("read %d after heal: %s (a failed read left bad data cached)", i, d)
		}
	}
	// Read-modify-write under EIO: the write fails, nothing changes.
	x := int64(100 * bs)
	if err := d.Inject(engine.Fault{Op: engine.FaultRead, Times: -1, Match: fltIn(dataLo, dataHi), Err: syscall.EIO}); err != nil {
		t.Fatal(err)
	}
	n, err := o.WriteAt([]byte{1, 2, 3}, x+10)
	d.ClearFaults()
	if err == nil {
		copy(want[x+10:], []byte{1, 2, 3})
	} else if !errors.Is(err, syscall.EIO) || n != 0 {
		t.Fatalf("RMW under EIO: %d, %v", n, err)
	}
	buf := make([]byte, bs*2)
	if _, err := o.ReadAt(buf, x); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(buf, want[x:x+2*bs]); d != "" {
		t.Fatalf("after a failed read-modify-write: %s", d)
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	advCheckObj(t, o, want, "final")
}

// TestAdvWriteEIOThenHeal: a data write failing with EIO makes Sync fail
// (errors.Is EIO); the data stays readable; after the device heals a Sync
// succeeds and the data survives a power cut.
func TestAdvWriteEIOThenHeal(t *testing.T) {
	for _, engineSync := range []bool{false, true} {
		d := advFaultDev(t, 32*advMiB, 512, engine.FormatOptions{})
		lay := advLayout(t, d)
		bs := int64(lay.BlockSize)
		dataLo, dataHi := lay.DataStart*bs, lay.TotalBlocks*bs
		e, err := engine.Open(d, advCrashOpts)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		o := a2Create(t, e, "x")
		base := advRand(rng, 300000)
		bbWrite(t, o, base, 0)
		if err := o.Sync(); err != nil {
			t.Fatal(err)
		}
		want := bytes.Clone(base)
		// overwrite in place + extend
		p := advRand(rng, 200000)
		bbWrite(t, o, p, 250000)
		want = append(want[:250000], p...)
		if err := d.Inject(engine.Fault{Op: engine.FaultWrite, Times: -1, Match: fltIn(dataLo, dataHi), Err: syscall.EIO}); err != nil {
			t.Fatal(err)
		}
		sync := o.Sync
		if engineSync {
			sync = e.Sync
		}
		if err := sync(); !errors.Is(err, syscall.EIO) {
			t.Fatalf("Sync with failing data writes: %v, want EIO", err)
		}
		advCheckObj(t, o, want, "after failed sync")
		d.ClearFaults()
		err = sync()
		if err != nil {
			// One report per observer is allowed; the next one is clean.
			t.Logf("first Sync after heal: %v", err)
			if err := sync(); err != nil {
				t.Fatalf("second Sync after heal: %v", err)
			}
		}
		d.Crash()
		_ = e.Close()
		_, e = advReboot(t, d, 5, true)
		advCheckObj(t, advObj(t, e, "x"), want, fmt.Sprintf("engineSync=%v after heal+sync+crash", engineSync))
		e.Close()
	}
}

// TestAdvFlushEIOShutsDown: a failed flush must fail the Sync, later
// changes must be refused, Close must return, and a reopen must find every
// byte synced before the failure.
func TestAdvFlushEIOShutsDown(t *testing.T) {
	for nth := 1; nth <= 3; nth++ {
		d := advFaultDev(t, 32*advMiB, 512, engine.FormatOptions{})
		e, err := engine.Open(d, advCrashOpts)
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(uint64(nth), 2))
		a := a2Create(t, e, "a")
		aData := advRand(rng, 100000)
		bbWrite(t, a, aData, 0)
		if err := e.Sync(); err != nil {
			t.Fatal(err)
		}
		b := a2Create(t, e, "b")
		bbWrite(t, b, advRand(rng, 50000), 0)
		d.FailOn(engine.FaultFlush, nth, syscall.EIO)
		err = b.Sync()
		if err == nil {
			err = e.Sync()
		}
		if err == nil {
			t.Logf("nth %d: flush failure not hit", nth)
		} else {
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("nth %d: Sync error %v does not wrap EIO", nth, err)
			}
			if _, werr := a.WriteAt([]byte{1}, 0); werr == nil {
				t.Errorf("nth %d: write accepted after a failed flush", nth)
			}
			if serr := e.Sync(); serr == nil {
				t.Errorf("nth %d: Sync succeeded after a failed flush", nth)
			}
		}
		done := make(chan error, 1)
		go func() { done <- e.Close() }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("nth %d: Close hangs after a failed flush", nth)
		}
		_, e = advReboot(t, d, uint64(nth), true)
		advCheckObj(t, advObj(t, e, "a"), aData, fmt.Sprintf("nth %d: a", nth))
		e.Close()
	}
}

// ---------------------------------------------------------------------------
// Concurrency (run with -race).

// TestAdvConcurrentMixed: goroutines each own an object and run random
// writes, reads, truncates, punches and syncs on it against a model while
// others run Engine.Sync, Stats, and create/remove churn on shared names
// through stale handles. No panic, no race; every owner's model holds, also
// after Close and Open.
func TestAdvConcurrentMixed(t *testing.T) {
	dev := engine.NewMemDevice(64*advMiB, 512)
	a2Format(t, dev, engine.FormatOptions{})
	e, err := engine.Open(dev, engine.Options{CacheSize: 2 * advMiB})
	if err != nil {
		t.Fatal(err)
	}
	const owners = 4
	models := make([][]byte, owners)
	var wg sync.WaitGroup
	errc := make(chan error, 100)
	stop := make(chan struct{})
	for g := 0; g < owners; g++ {
		o := a2Create(t, e, fmt.Sprintf("own%d", g))
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 77))
			var cur []byte
			defer func() { models[g] = cur }()
			for step := 0; step < 150; step++ {
				switch k := rng.IntN(10); {
				case k < 4:
					off := rng.IntN(400000)
					p := advRand(rng, rng.IntN(70000)+1)
					if n, err := o.WriteAt(p, int64(off)); n != len(p) || err != nil {
						errc <- fmt.Errorf("owner %d write: %d, %v", g, n, err)
						return
					}
					if end := off + len(p); end > len(cur) {
						cur = append(cur, make([]byte, end-len(cur))...)
					}
					copy(cur[off:], p)
				case k < 6:
					off := rng.IntN(450000)
					buf := make([]byte, rng.IntN(50000)+1)
					n, err := o.ReadAt(buf, int64(off))
					var want []byte
					if off < len(cur) {
						want = cur[off:min(len(cur), off+len(buf))]
					}
					if n != len(want) || (n < len(buf) && err != io.EOF) || (n == len(buf) && err != nil && err != io.EOF) {
						errc <- fmt.Errorf("owner %d read %d at %d: %d, %v (want %d)", g, len(buf), off, n, err, len(want))
						return
					}
					if d := firstDiff(buf[:n], want); d != "" {
						errc <- fmt.Errorf("owner %d read %d at %d: %s", g, len(buf), off, d)
						return
					}
				case k < 7:
					sz := rng.IntN(400000)
					if err := o.Truncate(int64(sz)); err != nil {
						errc <- fmt.Errorf("owner %d truncate: %v", g, err)
						return
					}
					if sz < len(cur) {
						cur = cur[:sz]
					} else {
						cur = append(cur, make([]byte, sz-len(cur))...)
					}
				case k < 8:
					off, n := rng.IntN(400000), rng.IntN(100000)
					if err := o.PunchHole(int64(off), int64(n)); err != nil {
						errc <- fmt.Errorf("owner %d punch: %v", g, err)
						return
					}
					for i := off; i < off+n && i < len(cur); i++ {
						cur[i] = 0
					}
				default:
					if err := o.Sync(); err != nil {
						errc <- fmt.Errorf("owner %d sync: %v", g, err)
						return
					}
				}
			}
		}()
	}
	var bg sync.WaitGroup
	bg.Add(2)
	go func() {
		defer bg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := e.Sync(); err != nil {
				errc <- fmt.Errorf("engine sync: %v", err)
				return
			}
			st := e.Stats()
			if st.ReservedBytes > st.FreeBytes || st.FreeBytes > st.TotalBytes || st.FreeBytes < 0 {
				errc <- fmt.Errorf("stats: %+v", st)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	go func() {
		defer bg.Done()
		rng := rand.New(rand.NewPCG(5, 5))
		var handles []*engine.Object
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			name := fmt.Sprintf("churn%d", rng.IntN(3))
			switch rng.IntN(4) {
			case 0:
				if o, err := e.Create(name); err == nil {
					handles = append(handles, o)
				} else if !errors.Is(err, fs.ErrExist) {
					errc <- fmt.Errorf("churn create: %v", err)
					return
				}
			case 1:
				if err := e.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errc <- fmt.Errorf("churn remove: %v", err)
					return
				}
			default:
				if len(handles) == 0 {
					continue
				}
				h := handles[rng.IntN(len(handles))]
				_, err1 := h.WriteAt(advFill(0x5A, 5000), int64(rng.IntN(20000)))
				buf := make([]byte, 3000)
				_, err2 := h.ReadAt(buf, 0)
				err3 := h.Sync()
				err4 := h.Truncate(int64(rng.IntN(30000)))
				for _, err := range []error{err1, err2, err3, err4} {
					if err != nil && !errors.Is(err, fs.ErrNotExist) && err != io.EOF {
						errc <- fmt.Errorf("churn handle op: %v", err)
						return
					}
				}
			}
		}
	}()
	wg.Wait()
	close(stop)
	bg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if t.Failed() {
		e.Close()
		return
	}
	for g := 0; g < owners; g++ {
		advCheckObj(t, advObj(t, e, fmt.Sprintf("own%d", g)), models[g], fmt.Sprintf("owner %d before close", g))
	}
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e = advOpen(t, dev)
	defer e.Close()
	for g := 0; g < owners; g++ {
		advCheckObj(t, advObj(t, e, fmt.Sprintf("own%d", g)), models[g], fmt.Sprintf("owner %d after reopen", g))
	}
}

// ---------------------------------------------------------------------------
// Huge offsets near the maximum object size.

func TestAdvHugeOffsets(t *testing.T) {
	for _, block := range []int{512, 4096, 65536} {
		t.Run(fmt.Sprint(block), func(t *testing.T) {
			dev := engine.NewMemDevice(32*advMiB, 512)
			a2Format(t, dev, engine.FormatOptions{BlockSize: block})
			e, err := engine.Open(dev, engine.Options{CacheSize: 8 * advMiB})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { e.Close() }()
			max := engine.MaxObjectSize
			o := a2Create(t, e, "huge")
			// Straddling the limit: refused, nothing changes.
			if n, err := o.WriteAt([]byte{1, 2}, max-1); !errors.Is(err, fs.ErrInvalid) || n != 0 {
				t.Fatalf("write straddling the limit: %d, %v", n, err)
			}
			if o.Size() != 0 {
				t.Fatalf("size %d after a refused write", o.Size())
			}
			tail := []byte("the last bytes!")
			bbWrite(t, o, tail, max-int64(len(tail)))
			head := []byte("head")
			bbWrite(t, o, head, 1)
			if o.Size() != max {
				t.Fatalf("size %d, want %d", o.Size(), max)
			}
			check := func(what string) {
				buf := make([]byte, len(tail)+10)
				n, err := o.ReadAt(buf, max-int64(len(tail)))
				if n != len(tail) || err != io.EOF || !bytes.Equal(buf[:n], tail) {
					t.Fatalf("%s: tail read %d, %v, %q", what, n, err, buf[:n])
				}
				buf = make([]byte, 4+2*block)
				n, err = o.ReadAt(buf, 0)
				if n != len(buf) || err != nil || !bytes.Equal(buf[1:5], head) || buf[0] != 0 || !bytes.Equal(buf[5:], make([]byte, len(buf)-5)) {
					t.Fatalf("%s: head read %d, %v", what, n, err)
				}
				// A hole in the middle.
				buf = make([]byte, 3*block)
				n, err = o.ReadAt(buf, max/2-int64(block)-3)
				if n != len(buf) || err != nil || !bytes.Equal(buf, make([]byte, len(buf))) {
					t.Fatalf("%s: middle read %d, %v", what, n, err)
				}
				for _, off := range []int64{max, max + 1, 1 << 62} {
					if n, err := o.ReadAt(make([]byte, 8), off); n != 0 || err != io.EOF {
						t.Fatalf("%s: read at %d: %d, %v; want 0, io.EOF", what, off, n, err)
					}
				}
			}
			check("in memory")
			if err := o.Sync(); err != nil {
				t.Fatal(err)
			}
			check("synced")
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			e = advOpen(t, dev)
			o = advObj(t, e, "huge")
			check("reopened")
			// Punch all but the tail, truncate to one byte short, extend back.
			if err := o.PunchHole(0, max-int64(len(tail))); err != nil {
				t.Fatalf("punch: %v", err)
			}
			if err := o.Truncate(max - 1); err != nil {
				t.Fatal(err)
			}
			if err := o.Truncate(max); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 1)
			if _, err := o.ReadAt(b, max-1); err != io.EOF && err != nil || b[0] != 0 {
				t.Fatalf("byte cut by truncate came back: %#x, %v", b[0], err)
			}
			if _, err := o.ReadAt(b, 1); err != nil || b[0] != 0 {
				t.Fatalf("punched byte: %#x, %v", b[0], err)
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			e = advOpen(t, dev)
			o = advObj(t, e, "huge")
			if o.Size() != max {
				t.Fatalf("size %d after reopen", o.Size())
			}
			if _, err := o.ReadAt(b, max-1); (err != io.EOF && err != nil) || b[0] != 0 {
				t.Fatalf("after reopen: byte cut by truncate came back: %#x, %v", b[0], err)
			}
			if err := o.Truncate(0); err != nil {
				t.Fatal(err)
			}
			if err := e.Sync(); err != nil {
				t.Fatal(err)
			}
			st := e.Stats()
			if st.FreeBytes != st.TotalBytes {
				t.Errorf("after truncating to 0: free %d of %d", st.FreeBytes, st.TotalBytes)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Metadata that checksums right but says impossible things. The format is
// documented in format.go/journal.go; a checksum only proves the bytes are
// what some writer wrote, and Open must still refuse (ErrCorrupt), never
// panic, and never hand out one block twice.

type advOp struct {
	kind    byte
	at      int // payload offset
	id      uint64
	a, b, c int64
	name    string
}

func advParseOps(p []byte) []advOp {
	le := func(b []byte) uint64 {
		var v uint64
		for i := 7; i >= 0; i-- {
			v = v<<8 | uint64(b[i])
		}
		return v
	}
	var ops []advOp
	for i := 0; i < len(p); {
		op := advOp{kind: p[i], at: i, id: le(p[i+1:])}
		j := i + 9
		switch op.kind {
		case 1:
			n := int(p[j]) | int(p[j+1])<<8
			op.name = string(p[j+2 : j+2+n])
			j += 2 + n
		case 2:
		case 3:
			op.a = int64(le(p[j:]))
			j += 8
		case 4:
			op.a, op.b, op.c = int64(le(p[j:])), int64(le(p[j+8:])), int64(le(p[j+16:]))
			j += 24
		case 5:
			op.a, op.b = int64(le(p[j:])), int64(le(p[j+8:]))
			j += 16
		default:
			return ops
		}
		ops = append(ops, op)
		i = j
	}
	return ops
}

func advPut64(b []byte, v uint64) {
	for i := 0; i < 8; i++ {
		b[i] = byte(v >> (8 * i))
	}
}

func TestAdvJournalValidButImpossible(t *testing.T) {
	build := func(t *testing.T) (*engine.FaultDevice, engine.Layout, []byte, int64) {
		d := advFaultDev(t, 24*advMiB, 512, engine.FormatOptions{})
		e, err := engine.Open(d, advCrashOpts)
		if err != nil {
			t.Fatal(err)
		}
		a := a2Create(t, e, "a")
		b := a2Create(t, e, "b")
		bbWrite(t, a, advFill(0xAA, 8192), 0)
		bbWrite(t, b, advFill(0xBB, 8192), 0)
		if err := e.Sync(); err != nil {
			t.Fatal(err)
		}
		d.Crash()
		_ = e.Close()
		nd, _ := d.Reboot(rand.New(rand.NewPCG(1, 1)), false)
		lay := advLayout(t, nd)
		bs := int64(lay.BlockSize)
		off := lay.JournalStart * bs
		blk := make([]byte, bs)
		if _, err := nd.ReadAt(blk, off); err != nil {
			t.Fatal(err)
		}
		nblk := int64(blk[4]) | int64(blk[5])<<8
		tx := make([]byte, nblk*bs)
		if _, err := nd.ReadAt(tx, off); err != nil {
			t.Fatal(err)
		}
		return nd, lay, tx, off
	}
	reseal := func(tx []byte) {
		tx[40], tx[41], tx[42], tx[43] = 0, 0, 0, 0
		sum := crc32c(tx)
		tx[40], tx[41], tx[42], tx[43] = byte(sum), byte(sum>>8), byte(sum>>16), byte(sum>>24)
	}
	payload := func(tx []byte) []byte {
		n := int(tx[20]) | int(tx[21])<<8 | int(tx[22])<<16 | int(tx[23])<<24
		return tx[44 : 44+n]
	}
	// set64 sets the u64 at byte at of the first operation of kind.
	set64 := func(kind byte, at int, v func(engine.Layout) uint64) func(engine.Layout, []byte, []advOp) bool {
		return func(lay engine.Layout, p []byte, ops []advOp) bool {
			for _, op := range ops {
				if op.kind == kind {
					advPut64(p[op.at+at:], v(lay))
					return true
				}
			}
			return false
		}
	}
	cases := []struct {
		name string
		mut  func(lay engine.Layout, p []byte, ops []advOp) bool
	}{
		{"map-b-onto-a", func(lay engine.Layout, p []byte, ops []advOp) bool {
			var aPhys int64 = -1
			for _, op := range ops {
				if op.kind == 4 && aPhys < 0 {
					aPhys = op.b
					continue
				}
				if op.kind == 4 && aPhys >= 0 {
					advPut64(p[op.at+9+8:], uint64(aPhys))
					return true
				}
			}
			return false
		}},
		{"map-into-metadata", set64(4, 9+8, func(engine.Layout) uint64 { return 1 })},
		{"size-below-extent", set64(3, 9, func(engine.Layout) uint64 { return 1 })},
		{"map-past-device", set64(4, 9+8, func(lay engine.Layout) uint64 { return uint64(lay.TotalBlocks - 1) })},
		{"map-huge-logical", set64(4, 9, func(engine.Layout) uint64 { return 1 << 40 })},
		{"duplicate-name", func(lay engine.Layout, p []byte, ops []advOp) bool {
			for _, op := range ops {
				if op.kind == 1 && op.name == "b" {
					p[op.at+11] = 'a'
					return true
				}
			}
			return false
		}},
		{"op-on-unknown-id", set64(3, 1, func(engine.Layout) uint64 { return 1000 })},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, lay, tx, off := build(t)
			p := payload(tx)
			if !tc.mut(lay, p, advParseOps(p)) {
				t.Fatalf("nothing to mutate in %+v", advParseOps(p))
			}
			reseal(tx)
			if _, err := d.WriteAt(tx, off); err != nil {
				t.Fatal(err)
			}
			var e *engine.Engine
			var err error
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("Open panicked: %v", r)
					}
				}()
				e, err = engine.Open(d, advCrashOpts)
			}()
			if err != nil {
				if !errors.Is(err, engine.ErrCorrupt) {
					t.Fatalf("Open: %v, not ErrCorrupt", err)
				}
				t.Logf("Open refused: %v", err)
				return
			}
			defer e.Close()
			// Accepted: the state must be self-consistent; no block may be
			// owned twice, and writing must not corrupt other objects.
			seen := map[int64]string{}
			for _, n := range e.Objects() {
				for _, x := range advObj(t, e, n).Extents() {
					for b := x.Physical; b < x.Physical+x.Length; b += int64(lay.BlockSize) {
						if other, dup := seen[b]; dup {
							t.Fatalf("Open accepted metadata in which %q and %q share device byte %d", other, n, b)
						}
						seen[b] = n
					}
				}
			}
		})
	}
}

func crc32c(b []byte) uint32 { return crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)) }

// TestAdvSyncMetadataOps: after a successful Object.Sync, a truncate
// (shrink and grow), a punch, and the object's existence are durable; with
// the power cut at every point inside the Sync, the object is either as
// before the operation or as after it, never something else.
func TestAdvSyncMetadataOps(t *testing.T) {
	const sz = 200000
	type opFn func(o *engine.Object, want []byte) ([]byte, error)
	ops := map[string]opFn{
		"shrink": func(o *engine.Object, w []byte) ([]byte, error) {
			return w[:5000], o.Truncate(5000)
		},
		"shrink-then-grow": func(o *engine.Object, w []byte) ([]byte, error) {
			if err := o.Truncate(5001); err != nil {
				return nil, err
			}
			return append(bytes.Clone(w[:5001]), make([]byte, 150000-5001)...), o.Truncate(150000)
		},
		"punch": func(o *engine.Object, w []byte) ([]byte, error) {
			n := bytes.Clone(w)
			clear(n[777 : 777+100000])
			return n, o.PunchHole(777, 100000)
		},
		"punch-past-end": func(o *engine.Object, w []byte) ([]byte, error) {
			n := bytes.Clone(w)
			clear(n[sz-5000:])
			return n, o.PunchHole(sz-5000, 1<<30)
		},
	}
	for name, op := range ops {
		t.Run(name, func(t *testing.T) {
			for cut := int64(0); cut < 10; cut++ {
				d := advFaultDev(t, 24*advMiB, 512, engine.FormatOptions{})
				e, err := engine.Open(d, advCrashOpts)
				if err != nil {
					t.Fatal(err)
				}
				rng := rand.New(rand.NewPCG(uint64(cut), 1))
				o := a2Create(t, e, "o")
				before := advRand(rng, sz)
				bbWrite(t, o, before, 0)
				if err := o.Sync(); err != nil {
					t.Fatal(err)
				}
				after, err := op(o, before)
				if err != nil {
					t.Fatal(err)
				}
				advCheckObj(t, o, after, "in memory")
				d.CrashAfter(cut)
				syncErr := o.Sync()
				d.Crash()
				_ = e.Close()
				_, e = advReboot(t, d, uint64(cut), true)
				got := bbReadAll(t, advObj(t, e, "o"))
				if syncErr == nil {
					if dd := firstDiff(got, after); dd != "" {
						t.Fatalf("cut %d: after a successful Sync: %s", cut, dd)
					}
				} else if firstDiff(got, after) != "" && firstDiff(got, before) != "" {
					// An unacknowledged operation may persist in part (a
					// punch's zeroed edge without its unmap, a truncate's
					// zeroed tail block without its size: the kernel file
					// systems do the same). Each byte must still be its
					// value before or after, or zero where the truncate
					// cut it off.
					if len(got) != len(before) && len(got) != len(after) {
						t.Fatalf("cut %d: size %d, neither %d nor %d", cut, len(got), len(before), len(after))
					}
					for i, c := range got {
						if c != before[i] && !(i < len(after) && c == after[i]) && !(i >= len(after) && c == 0) {
							t.Fatalf("cut %d: byte %d = %#x: neither before %#x nor after", cut, i, c, before[i])
						}
					}
					t.Logf("cut %d: operation persisted in part; differs from before in %s", cut, advDiffRanges(got, before))
				}
				e.Close()
			}
		})
	}
}

// advDiffRanges lists the byte ranges where a and b differ (a's length).
func advDiffRanges(a, b []byte) string {
	var out []string
	for i := 0; i < len(a); {
		if i < len(b) && a[i] == b[i] {
			i++
			continue
		}
		j := i
		for j < len(a) && (j >= len(b) || a[j] != b[j]) {
			j++
		}
		out = append(out, fmt.Sprintf("[%d,%d)", i, j))
		i = j
	}
	return fmt.Sprint(out)
}

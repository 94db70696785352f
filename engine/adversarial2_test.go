package engine_test

// Second round of adversarial black-box tests of the public API: Stats
// semantics at the space limit, lifecycle races (Close, Remove, re-Create),
// read-only engines, Truncate/PunchHole/Extents edge cases, the exact
// io.ReaderAt/io.WriterAt contract, the same on an O_DIRECT file device, and
// Format/Open misuse.
//
// Helpers here are prefixed a2 so they do not collide with the earlier
// rounds' (adv*, bb*).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rawblock/rawblock/engine"
)

const a2MiB = 1 << 20

func a2Format(t *testing.T, dev engine.Device, fo engine.FormatOptions) {
	t.Helper()
	bbMust(t, engine.Format(dev, fo), "Format")
}

func a2Open(t *testing.T, dev engine.Device, opts engine.Options) *engine.Engine {
	t.Helper()
	e, err := engine.Open(dev, opts)
	bbMust(t, err, "Open")
	return e
}

func a2MemEngine(t *testing.T, size int64, opts engine.Options) (engine.Device, *engine.Engine) {
	t.Helper()
	dev := engine.NewMemDevice(size, 512)
	return dev, formatOpen(t, dev, opts)
}

func a2Create(t *testing.T, e *engine.Engine, name string) *engine.Object {
	t.Helper()
	o, err := e.Create(name)
	bbMust(t, err, "Create "+name)
	return o
}

// a2Pattern returns n pseudo-random bytes for seed, none of them zero
// (zeros mean "hole" in these tests).
func a2Pattern(seed uint64, n int) []byte {
	var key [32]byte
	for i := 0; i < 4; i++ {
		key[i*8] = byte(seed >> (8 * i))
		key[i*8+1] = byte(seed >> (8*i + 32))
	}
	p := make([]byte, n)
	_, _ = rand.NewChaCha8(key).Read(p)
	for i, b := range p {
		if b == 0 {
			p[i] = 0x5B
		}
	}
	return p
}

func a2Check(t *testing.T, o *engine.Object, want []byte, what string) {
	t.Helper()
	if o.Size() != int64(len(want)) {
		t.Fatalf("%s: Size = %d, want %d", what, o.Size(), len(want))
	}
	if d := firstDiff(bbReadAll(t, o), want); d != "" {
		t.Fatalf("%s: %s", what, d)
	}
}

// a2Avail is what Stats promises can still be written.
func a2Avail(s engine.Stats) int64 { return s.FreeBytes - s.ReservedBytes }

// a2CheckExtents checks the public map's invariants: sorted, not
// overlapping, positive lengths, block-aligned, inside the size rounded up
// to a block, Delalloc with Physical -1 and the others on the device.
func a2CheckExtents(t *testing.T, o *engine.Object, bs int64, devSize int64, what string) []engine.Extent {
	t.Helper()
	xs := o.Extents()
	size := o.Size()
	limit := (size + bs - 1) / bs * bs
	prevEnd := int64(-1)
	for i, x := range xs {
		switch {
		case x.Length <= 0:
			t.Errorf("%s: extent %d %+v: length <= 0", what, i, x)
		case x.Offset%bs != 0 || x.Length%bs != 0:
			t.Errorf("%s: extent %d %+v: not block aligned", what, i, x)
		case x.Offset < prevEnd:
			t.Errorf("%s: extent %d %+v overlaps or is out of order (previous end %d)", what, i, x, prevEnd)
		case x.Offset+x.Length > limit:
			t.Errorf("%s: extent %d %+v ends past the size %d (rounded %d)", what, i, x, size, limit)
		}
		switch x.State {
		case engine.Delalloc:
			if x.Physical != -1 {
				t.Errorf("%s: delalloc extent %d %+v has Physical %d, want -1", what, i, x, x.Physical)
			}
		case engine.Unwritten, engine.Written:
			if x.Physical < 0 || x.Physical%bs != 0 || x.Physical+x.Length > devSize {
				t.Errorf("%s: extent %d %+v: physical outside the device", what, i, x)
			}
		default:
			t.Errorf("%s: extent %d %+v: bad state", what, i, x)
		}
		prevEnd = x.Offset + x.Length
	}
	return xs
}

// a2Timeout runs fn and fails the test if it does not return in d.
func a2Timeout(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(d):
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		t.Fatalf("%s: did not finish within %v (deadlock?)\n%s", what, d, buf[:n])
	}
}

// ---------------------------------------------------------------------------
// 1. Stats semantics.

// TestAdv2StatsExactFillOneObject: FreeBytes − ReservedBytes can be written,
// exactly: the whole of it into one object (aligned and unaligned chunks
// and an unaligned start), then one more block fails with ErrNoSpace, n = 0
// and nothing changed; Sync succeeds, ReservedBytes is 0 after it; Remove +
// Sync gives FreeBytes back; TotalBytes never changes.
func TestAdv2StatsExactFillOneObject(t *testing.T) {
	for _, tc := range []struct {
		name  string
		chunk int
		start int64 // byte offset inside the first block
	}{
		{"aligned-1MiB", a2MiB, 0},
		{"unaligned-chunks", 777_777, 0},
		{"unaligned-start", 300_001, 1234},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, e := a2MemEngine(t, 24*a2MiB, engine.Options{CacheSize: 4 * a2MiB})
			defer e.Close()
			const bs = 4096
			s0 := e.Stats()
			total := s0.TotalBytes
			avail := a2Avail(s0)
			if avail <= 0 || avail%bs != 0 {
				t.Fatalf("Stats at start: %+v", s0)
			}
			o := a2Create(t, e, "big")
			// Bytes [start, avail) cover exactly avail/bs blocks.
			want := a2Pattern(1, int(avail))
			clear(want[:tc.start])
			for off := tc.start; off < avail; {
				n := min(int64(tc.chunk), avail-off)
				bbWrite(t, o, want[off:off+n], off)
				off += n
				if s := e.Stats(); s.TotalBytes != total {
					t.Fatalf("TotalBytes changed %d -> %d", total, s.TotalBytes)
				}
			}
			s1 := e.Stats()
			if a2Avail(s1) != 0 {
				t.Errorf("after writing FreeBytes−ReservedBytes = %d bytes: avail now %d (%+v)", avail, a2Avail(s1), s1)
			}
			// One more block: no space, nothing changed.
			n, err := o.WriteAt(make([]byte, bs), avail)
			if n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("WriteAt one block past the free space = %d, %v; want 0, ErrNoSpace", n, err)
			}
			if o.Size() != avail {
				t.Fatalf("size after refused write = %d, want %d", o.Size(), avail)
			}
			// Another object: no space either.
			o2 := a2Create(t, e, "small")
			if n, err := o2.WriteAt([]byte{1}, 0); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("1-byte WriteAt into a new object on a full device = %d, %v", n, err)
			}
			if o2.Size() != 0 {
				t.Fatalf("size after refused write = %d", o2.Size())
			}
			// Overwrites of the object's own blocks need no space.
			bbWrite(t, o, []byte("overwrite"), 5000)
			copy(want[5000:], "overwrite")
			bbMust(t, e.Sync(), "Sync of a device filled exactly")
			s2 := e.Stats()
			if s2.ReservedBytes != 0 || s2.FreeBytes != 0 || s2.TotalBytes != total {
				t.Errorf("after Sync: %+v; want ReservedBytes 0, FreeBytes 0, TotalBytes %d", s2, total)
			}
			// Overwriting written blocks on a full device works too, and
			// so does a write that ends exactly at the last block.
			bbWrite(t, o, []byte("again"), avail-5)
			copy(want[avail-5:], "again")
			if n, err := o.WriteAt([]byte("xy"), avail-1); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("write crossing into a new block on a full device = %d, %v", n, err)
			}
			a2Check(t, o, want, "full object")
			bbMust(t, e.Sync(), "Sync")
			a2Check(t, o, want, "full object after Sync")
			bbMust(t, e.Remove("big"), "Remove")
			bbMust(t, e.Sync(), "Sync after Remove")
			s3 := e.Stats()
			if s3.FreeBytes != s0.FreeBytes || s3.ReservedBytes != 0 || s3.TotalBytes != total {
				t.Errorf("after Remove+Sync: %+v; want FreeBytes %d back", s3, s0.FreeBytes)
			}
			// And the space really is usable again.
			bbWrite(t, o2, want[:avail], 0)
			bbMust(t, e.Sync(), "Sync of the refill")
			if s := e.Stats(); s.FreeBytes != 0 || s.ReservedBytes != 0 {
				t.Errorf("after refill: %+v", s)
			}
		})
	}
}

// TestAdv2StatsExactFillManyObjects: the free space spread over several
// objects of unaligned sizes (each last block partly used) and written in
// interleaved chunks; then one byte in a fresh block fails, while writes
// into the slack of the objects' last blocks need no space and succeed.
func TestAdv2StatsExactFillManyObjects(t *testing.T) {
	const bs = 4096
	_, e := a2MemEngine(t, 20*a2MiB, engine.Options{CacheSize: 4 * a2MiB})
	defer e.Close()
	s0 := e.Stats()
	blocks := a2Avail(s0) / bs
	const nObj = 7
	// Split blocks over nObj objects; each object's size is its blocks
	// times bs minus a remainder, so its last block is partial.
	rng := rand.New(rand.NewPCG(3, 4))
	sizes := make([]int64, nObj)
	left := blocks
	for i := range sizes {
		b := left / int64(nObj-i)
		if i < nObj-1 {
			b += int64(rng.IntN(20)) - 10
		}
		left -= b
		sizes[i] = b*bs - int64(1+rng.IntN(bs-1))
	}
	objs := make([]*engine.Object, nObj)
	want := make([][]byte, nObj)
	for i := range objs {
		objs[i] = a2Create(t, e, fmt.Sprintf("o%d", i))
		want[i] = a2Pattern(uint64(10+i), int(sizes[i]))
	}
	// Interleave unaligned chunks across the objects.
	offs := make([]int64, nObj)
	for busy := true; busy; {
		busy = false
		for i, o := range objs {
			if offs[i] >= sizes[i] {
				continue
			}
			busy = true
			n := min(int64(50_000+rng.IntN(100_000)), sizes[i]-offs[i])
			bbWrite(t, o, want[i][offs[i]:offs[i]+n], offs[i])
			offs[i] += n
		}
	}
	if s := e.Stats(); a2Avail(s) != 0 {
		t.Errorf("after filling: avail %d, want 0 (%+v)", a2Avail(s), s)
	}
	extra := a2Create(t, e, "extra")
	if n, err := extra.WriteAt([]byte{7}, 123); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
		t.Fatalf("WriteAt into a new object on a full device = %d, %v", n, err)
	}
	if extra.Size() != 0 {
		t.Fatalf("refused write changed the size to %d", extra.Size())
	}
	// Fill the slack of each object's last block: no new block needed.
	for i, o := range objs {
		end := (sizes[i] + bs - 1) / bs * bs
		tail := a2Pattern(uint64(100+i), int(end-sizes[i]))
		bbWrite(t, o, tail, sizes[i])
		want[i] = append(want[i], tail...)
		// One byte more needs a block.
		if n, err := o.WriteAt([]byte{1}, end); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
			t.Fatalf("object %d: WriteAt at %d on a full device = %d, %v", i, end, n, err)
		}
	}
	bbMust(t, e.Sync(), "Sync")
	if s := e.Stats(); s.ReservedBytes != 0 || s.FreeBytes != 0 {
		t.Errorf("after Sync: %+v", s)
	}
	for i, o := range objs {
		a2Check(t, o, want[i], fmt.Sprintf("object %d", i))
	}
	for i := range objs {
		bbMust(t, e.Remove(fmt.Sprintf("o%d", i)), "Remove")
	}
	bbMust(t, e.Sync(), "Sync after Remove")
	if s := e.Stats(); s.FreeBytes != s0.FreeBytes || s.ReservedBytes != 0 || s.TotalBytes != s0.TotalBytes {
		t.Errorf("after removing everything: %+v, want FreeBytes %d", s, s0.FreeBytes)
	}
}

// TestAdv2StatsBoundsAndMonotone: under a mixed workload the cache stays
// within CacheSize, dirty bytes within the dirty limit, and every counter
// only grows; reservations are zero after each Sync.
func TestAdv2StatsBoundsAndMonotone(t *testing.T) {
	const cacheSize, dirtyLimit = 4 * a2MiB, 1 * a2MiB
	_, e := a2MemEngine(t, 64*a2MiB, engine.Options{CacheSize: cacheSize, DirtyLimit: dirtyLimit})
	defer e.Close()
	var prev engine.Stats
	check := func(what string) {
		s := e.Stats()
		if s.CachedBytes > cacheSize {
			t.Fatalf("%s: CachedBytes %d > CacheSize %d", what, s.CachedBytes, cacheSize)
		}
		if s.DirtyBytes > dirtyLimit {
			t.Fatalf("%s: DirtyBytes %d > DirtyLimit %d", what, s.DirtyBytes, dirtyLimit)
		}
		if s.DirtyBytes > s.CachedBytes {
			t.Errorf("%s: DirtyBytes %d > CachedBytes %d", what, s.DirtyBytes, s.CachedBytes)
		}
		if s.FreeBytes < s.ReservedBytes || s.FreeBytes > s.TotalBytes || s.ReservedBytes < 0 {
			t.Fatalf("%s: inconsistent space %+v", what, s)
		}
		if s.LargestFreeBytes > s.FreeBytes || (s.FreeBytes > 0 && s.FreeExtents == 0) {
			t.Errorf("%s: LargestFreeBytes %d, FreeExtents %d with FreeBytes %d", what, s.LargestFreeBytes, s.FreeExtents, s.FreeBytes)
		}
		type ctr struct {
			name   string
			now, p uint64
		}
		for _, c := range []ctr{
			{"Allocations", s.Allocations, prev.Allocations},
			{"DeviceWrites", s.DeviceWrites, prev.DeviceWrites},
			{"DeviceReads", s.DeviceReads, prev.DeviceReads},
			{"DeviceBytesWritten", s.DeviceBytesWritten, prev.DeviceBytesWritten},
			{"DeviceBytesRead", s.DeviceBytesRead, prev.DeviceBytesRead},
			{"CacheHits", s.CacheHits, prev.CacheHits},
			{"CacheMisses", s.CacheMisses, prev.CacheMisses},
			{"Commits", s.Commits, prev.Commits},
			{"Flushes", s.Flushes, prev.Flushes},
		} {
			if c.now < c.p {
				t.Errorf("%s: %s went down %d -> %d", what, c.name, c.p, c.now)
			}
		}
		if s.TotalBytes != prev.TotalBytes && prev.TotalBytes != 0 {
			t.Errorf("%s: TotalBytes changed %d -> %d", what, prev.TotalBytes, s.TotalBytes)
		}
		prev = s
	}
	check("start")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sampleErr atomic.Value
	wg.Add(1)
	go func() { // a concurrent sampler: bounds must hold at every instant
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			s := e.Stats()
			if s.CachedBytes > cacheSize || s.DirtyBytes > dirtyLimit {
				sampleErr.Store(fmt.Sprintf("sampled CachedBytes %d DirtyBytes %d", s.CachedBytes, s.DirtyBytes))
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()
	rng := rand.New(rand.NewPCG(5, 6))
	objs := []*engine.Object{a2Create(t, e, "a"), a2Create(t, e, "b"), a2Create(t, e, "c")}
	for round := 0; round < 6; round++ {
		for i := 0; i < 40; i++ {
			o := objs[rng.IntN(len(objs))]
			off := int64(rng.IntN(6 * a2MiB))
			bbWrite(t, o, a2Pattern(uint64(round*100+i), 1+rng.IntN(300_000)), off)
		}
		check(fmt.Sprintf("round %d after writes", round))
		for _, o := range objs {
			buf := make([]byte, 1+rng.IntN(a2MiB))
			if _, err := o.ReadAt(buf, int64(rng.IntN(6*a2MiB))); err != nil && err != io.EOF {
				t.Fatalf("ReadAt: %v", err)
			}
		}
		check(fmt.Sprintf("round %d after reads", round))
		bbMust(t, objs[round%3].PunchHole(int64(rng.IntN(4*a2MiB)), int64(rng.IntN(a2MiB))), "PunchHole")
		bbMust(t, e.Sync(), "Sync")
		s := e.Stats()
		if s.ReservedBytes != 0 || s.DirtyBytes != 0 {
			t.Errorf("round %d after Sync: ReservedBytes %d DirtyBytes %d", round, s.ReservedBytes, s.DirtyBytes)
		}
		check(fmt.Sprintf("round %d after Sync", round))
	}
	close(stop)
	wg.Wait()
	if v := sampleErr.Load(); v != nil {
		t.Errorf("%v (CacheSize %d, DirtyLimit %d)", v, cacheSize, dirtyLimit)
	}
}

// ---------------------------------------------------------------------------
// 2. Lifecycle races.

// a2OK reports whether err is an answer a call racing with Close, Remove
// and other goroutines may legitimately give.
func a2OK(err error) bool {
	return err == nil || err == io.EOF || errors.Is(err, engine.ErrClosed) ||
		errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrExist)
}

// a2AllClosed runs every public call against a closed engine and its old
// handle and wants ErrClosed from each that returns an error.
func a2AllClosed(t *testing.T, e *engine.Engine, o *engine.Object, what string) {
	t.Helper()
	bad := func(op string, err error) {
		if !errors.Is(err, engine.ErrClosed) {
			t.Errorf("%s: %s = %v, want ErrClosed", what, op, err)
		}
	}
	_, err := e.Create("new-after-close")
	bad("Create", err)
	_, err = e.Object("x")
	bad("Object", err)
	bad("Remove", e.Remove("x"))
	bad("Sync", e.Sync())
	bad("Close", e.Close())
	if names := e.Objects(); len(names) != 0 {
		t.Errorf("%s: Objects = %q after Close", what, names)
	}
	if s := e.Stats(); s != (engine.Stats{}) {
		t.Logf("%s: Stats after Close = %+v (no error to return)", what, s)
	}
	n, err := o.WriteAt([]byte("x"), 0)
	if n != 0 {
		t.Errorf("%s: WriteAt wrote %d after Close", what, n)
	}
	bad("WriteAt", err)
	_, err = o.WriteAt(nil, 0)
	bad("WriteAt(empty)", err)
	_, err = o.ReadAt(make([]byte, 10), 0)
	bad("ReadAt", err)
	_, err = o.ReadAt(nil, 0)
	bad("ReadAt(empty)", err)
	_, err = o.ReadAt(make([]byte, 10), 1<<40)
	bad("ReadAt(past EOF)", err)
	bad("Truncate", o.Truncate(1))
	bad("PunchHole", o.PunchHole(0, 1))
	bad("Object.Sync", o.Sync())
	_, err = o.WriteFrom(bytes.NewReader([]byte("abc")), 0, 3)
	bad("WriteFrom", err)
}

// TestAdv2CloseRacesEverything: Close while many goroutines run every kind
// of call; nothing panics or hangs, each call answers an allowed error, and
// every call that starts after Close returned answers ErrClosed.
func TestAdv2CloseRacesEverything(t *testing.T) {
	for iter := 0; iter < 4; iter++ {
		dev, e := a2MemEngine(t, 64*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
		shared := a2Create(t, e, "shared")
		bbWrite(t, shared, a2Pattern(1, 300_000), 0)
		var closed atomic.Bool
		var wg sync.WaitGroup
		errc := make(chan string, 64)
		report := func(s string) {
			select {
			case errc <- s:
			default:
			}
		}
		for g := 0; g < 12; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(iter), uint64(g)))
				name := fmt.Sprintf("g%d", g)
				buf := make([]byte, 70_000)
				for i := 0; ; i++ {
					after := closed.Load() // Close had returned before this call
					var err error
					var op string
					o := shared
					if rng.IntN(2) == 0 {
						if oo, err2 := e.Object(name); err2 == nil {
							o = oo
						} else if oo, err2 := e.Create(name); err2 == nil {
							o = oo
						}
					}
					switch rng.IntN(11) {
					case 0:
						op = "WriteAt"
						_, err = o.WriteAt(buf[:1+rng.IntN(len(buf))], int64(rng.IntN(2*a2MiB)))
					case 1:
						op = "ReadAt"
						_, err = o.ReadAt(buf[:1+rng.IntN(len(buf))], int64(rng.IntN(2*a2MiB)))
					case 2:
						op = "Object.Sync"
						err = o.Sync()
					case 3:
						op = "Engine.Sync"
						err = e.Sync()
					case 4:
						op = "Create"
						_, err = e.Create(fmt.Sprintf("%s-%d", name, i))
					case 5:
						op = "Remove"
						err = e.Remove(fmt.Sprintf("%s-%d", name, i-1))
					case 6:
						op = "Truncate"
						err = o.Truncate(int64(rng.IntN(a2MiB)))
					case 7:
						op = "PunchHole"
						err = o.PunchHole(int64(rng.IntN(a2MiB)), int64(rng.IntN(a2MiB)))
					case 8:
						op = "Stats"
						_ = e.Stats()
						_ = e.Objects()
						_ = o.Extents()
						_ = o.Size()
					case 9:
						op = "Remove(own)"
						err = e.Remove(name)
					case 10:
						op = "WriteFrom"
						_, err = o.WriteFrom(bytes.NewReader(buf[:5000]), int64(rng.IntN(a2MiB)), 5000)
					}
					if !a2OK(err) {
						report(fmt.Sprintf("%s: unexpected error %v", op, err))
					}
					if after && op != "Stats" && !errors.Is(err, engine.ErrClosed) {
						report(fmt.Sprintf("%s after Close returned: %v, want ErrClosed", op, err))
					}
					if after {
						return
					}
				}
			}()
		}
		time.Sleep(time.Duration(5+iter*10) * time.Millisecond)
		a2Timeout(t, 10*time.Second, "Close racing with callers", func() {
			if err := e.Close(); err != nil {
				report(fmt.Sprintf("Close: %v", err))
			}
		})
		closed.Store(true)
		a2Timeout(t, 10*time.Second, "callers after Close", wg.Wait)
		close(errc)
		for s := range errc {
			t.Error(s)
		}
		a2AllClosed(t, e, shared, "after Close")
		// The device still opens, consistent.
		if r, err := engine.Check(dev); err != nil || len(r.Problems) > 0 {
			t.Fatalf("Check after the racing Close: %v %v", err, r.Problems)
		}
		e2 := a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
		bbMust(t, e2.Close(), "Close of the reopened engine")
		if t.Failed() {
			return
		}
	}
}

// TestAdv2HandlesAcrossReopen: a handle from before Close+Open belongs to
// the closed engine: it answers ErrClosed and never touches the new one.
func TestAdv2HandlesAcrossReopen(t *testing.T) {
	dev, e := a2MemEngine(t, 32*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
	o := a2Create(t, e, "obj")
	data := a2Pattern(2, 10_000)
	bbWrite(t, o, data, 0)
	bbMust(t, e.Close(), "Close")
	if err := e.Close(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("second Close = %v, want ErrClosed", err)
	}
	e2 := a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
	defer e2.Close()
	a2AllClosed(t, e, o, "old handle after reopen")
	o2, err := e2.Object("obj")
	bbMust(t, err, "Object in the new engine")
	a2Check(t, o2, data, "new engine unaffected by the old handle")
	if names := e2.Objects(); !slices.Equal(names, []string{"obj"}) {
		t.Errorf("Objects = %q", names)
	}
}

// TestAdv2ExtentsInClosedAndRemoved: ExtentsIn, like every call with an
// error result, answers ErrClosed after Close and fs.ErrNotExist on a
// removed object's handle (it used to return the old map, and nil, nil).
func TestAdv2ExtentsInClosedAndRemoved(t *testing.T) {
	dev, e := a2MemEngine(t, 32*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
	_ = dev
	o := a2Create(t, e, "obj")
	bbWrite(t, o, a2Pattern(2, 10_000), 0)
	r := a2Create(t, e, "removed")
	bbWrite(t, r, a2Pattern(3, 10_000), 0)
	bbMust(t, e.Remove("removed"), "Remove")
	if _, err := r.ExtentsIn(0, 4096); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ExtentsIn on a removed object's handle = %v, want fs.ErrNotExist", err)
	}
	bbMust(t, e.Close(), "Close")
	if xs, err := o.ExtentsIn(0, 4096); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("ExtentsIn on a closed engine's handle = %v, %v; want ErrClosed", xs, err)
	}
}

// TestAdv2RemoveWhileInUse: Remove while goroutines write, read, truncate,
// punch and sync the same object through handles. After Remove returns
// every call on the handles answers fs.ErrNotExist; after Sync the space
// is back to what it was before the object existed; and a re-Created
// object of the same name is empty and never shows the old bytes.
func TestAdv2RemoveWhileInUse(t *testing.T) {
	for iter := 0; iter < 6; iter++ {
		func() {
			_, e := a2MemEngine(t, 48*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
			defer e.Close()
			bbMust(t, e.Sync(), "Sync")
			base := e.Stats()
			o := a2Create(t, e, "victim")
			old := bytes.Repeat([]byte{0xEE}, 3*a2MiB)
			bbWrite(t, o, old, 0)
			if iter%2 == 0 {
				bbMust(t, o.Sync(), "Sync")
			}
			var removed atomic.Bool
			var wg sync.WaitGroup
			errc := make(chan string, 32)
			report := func(s string) {
				select {
				case errc <- s:
				default:
				}
			}
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(iter), uint64(g)))
					h, err := e.Object("victim")
					if err != nil {
						h = o
					}
					buf := make([]byte, 64<<10)
					for {
						after := removed.Load()
						var err error
						switch rng.IntN(6) {
						case 0, 1:
							_, err = h.WriteAt(bytes.Repeat([]byte{0xEE}, 1+rng.IntN(len(buf))), int64(rng.IntN(4*a2MiB)))
						case 2:
							_, err = h.ReadAt(buf, int64(rng.IntN(3*a2MiB)))
						case 3:
							err = h.Sync()
						case 4:
							err = h.Truncate(int64(rng.IntN(4 * a2MiB)))
						case 5:
							err = h.PunchHole(int64(rng.IntN(3*a2MiB)), int64(rng.IntN(a2MiB)))
						}
						if !a2OK(err) {
							report(fmt.Sprintf("unexpected error %v", err))
						}
						if after {
							if !errors.Is(err, fs.ErrNotExist) {
								report(fmt.Sprintf("call after Remove returned: %v, want fs.ErrNotExist", err))
							}
							if h.Size() != 0 || len(h.Extents()) != 0 {
								report(fmt.Sprintf("removed handle: Size %d, %d extents", h.Size(), len(h.Extents())))
							}
							return
						}
					}
				}()
			}
			time.Sleep(time.Duration(1+iter*3) * time.Millisecond)
			a2Timeout(t, 10*time.Second, "Remove racing with users", func() {
				bbMust(t, e.Remove("victim"), "Remove")
			})
			removed.Store(true)
			a2Timeout(t, 10*time.Second, "users after Remove", wg.Wait)
			close(errc)
			for s := range errc {
				t.Error(s)
			}
			if _, err := e.Object("victim"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Object after Remove = %v", err)
			}
			// A fresh object of the same name, written sparsely: it must
			// read zeros wherever it was not written, never 0xEE.
			n := a2Create(t, e, "victim")
			if n.Size() != 0 || len(n.Extents()) != 0 {
				t.Fatalf("re-created object: Size %d, extents %v", n.Size(), n.Extents())
			}
			bbMust(t, n.Truncate(3*a2MiB), "Truncate")
			bbWrite(t, n, []byte("new"), 1_000_000)
			got := bbReadAll(t, n)
			if i := bytes.IndexByte(got, 0xEE); i >= 0 {
				t.Fatalf("re-created object shows the removed object's byte at %d", i)
			}
			bbMust(t, e.Sync(), "Sync")
			got = bbReadAll(t, n)
			if i := bytes.IndexByte(got, 0xEE); i >= 0 {
				t.Fatalf("after Sync the re-created object shows the removed object's byte at %d", i)
			}
			bbMust(t, e.Remove("victim"), "Remove of the new one")
			bbMust(t, e.Sync(), "Sync")
			if s := e.Stats(); s.FreeBytes != base.FreeBytes || s.ReservedBytes != 0 {
				t.Fatalf("iter %d: after removing everything FreeBytes %d Reserved %d, want %d, 0 (leak of %d bytes)",
					iter, s.FreeBytes, s.ReservedBytes, base.FreeBytes, base.FreeBytes-s.FreeBytes)
			}
		}()
		if t.Failed() {
			return
		}
	}
}

// ---------------------------------------------------------------------------
// 3. Read-only engines.

// TestAdv2ReadOnlyChangesNothing: on a read-only engine every mutating call
// answers ErrReadOnly (bad arguments may answer fs.ErrInvalid first), reads
// work, and from Open to Close the device sees no write and no flush.
func TestAdv2ReadOnlyChangesNothing(t *testing.T) {
	dev := engine.NewFaultDevice(32*a2MiB, 512)
	a2Format(t, dev, engine.FormatOptions{})
	e := a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
	want := map[string][]byte{"a": a2Pattern(1, 123_457), "b": a2Pattern(2, 3*a2MiB+5)}
	for name, d := range want {
		bbWrite(t, a2Create(t, e, name), d, 0)
	}
	bbMust(t, e.Close(), "Close")
	before := dev.Stats()
	r, err := engine.Open(dev, engine.Options{ReadOnly: true, CacheSize: 2 * a2MiB})
	bbMust(t, err, "Open read-only")
	a, err := r.Object("a")
	bbMust(t, err, "Object")
	mut := func(op string, err error) {
		t.Helper()
		if !errors.Is(err, engine.ErrReadOnly) {
			t.Errorf("read-only %s = %v, want ErrReadOnly", op, err)
		}
	}
	n, err := a.WriteAt([]byte("x"), 0)
	if n != 0 {
		t.Errorf("read-only WriteAt wrote %d", n)
	}
	mut("WriteAt", err)
	_, err = a.WriteAt([]byte("x"), 1<<30) // past the end
	mut("WriteAt past EOF", err)
	_, err = a.WriteAt(nil, 0)
	if err != nil && !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("read-only empty WriteAt = %v", err)
	}
	_, err = a.WriteFrom(bytes.NewReader([]byte("abc")), 0, 3)
	mut("WriteFrom", err)
	mut("Truncate(shrink)", a.Truncate(1))
	mut("Truncate(grow)", a.Truncate(1<<30))
	mut("Truncate(same)", a.Truncate(a.Size()))
	mut("PunchHole", a.PunchHole(0, 4096))
	mut("PunchHole past EOF", a.PunchHole(1<<30, 4096))
	mut("PunchHole(0 length)", a.PunchHole(0, 0))
	_, err = r.Create("c")
	mut("Create", err)
	_, err = r.Create("a")
	if !errors.Is(err, engine.ErrReadOnly) && !errors.Is(err, fs.ErrExist) {
		t.Errorf("read-only Create of an existing name = %v", err)
	}
	mut("Remove", r.Remove("a"))
	if err := r.Remove("nope"); !errors.Is(err, engine.ErrReadOnly) && !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("read-only Remove of a missing name = %v", err)
	}
	// Bad arguments: fs.ErrInvalid (documented order) or ErrReadOnly.
	if _, err := a.WriteAt([]byte("x"), -1); !errors.Is(err, fs.ErrInvalid) && !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("read-only WriteAt(-1) = %v", err)
	}
	if err := a.Sync(); err != nil && !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("read-only Object.Sync = %v", err)
	}
	if err := r.Sync(); err != nil && !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("read-only Sync = %v", err)
	}
	for name, d := range want {
		o, err := r.Object(name)
		bbMust(t, err, "Object")
		a2Check(t, o, d, "read-only "+name)
		xs := a2CheckExtents(t, o, 4096, dev.Size(), "read-only "+name)
		for _, x := range xs {
			if x.State != engine.Written {
				t.Errorf("read-only %s: extent %+v not Written", name, x)
			}
		}
	}
	if names := r.Objects(); !slices.Equal(names, []string{"a", "b"}) {
		t.Errorf("Objects = %q", names)
	}
	s := r.Stats()
	if s.DirtyBytes != 0 || s.ReservedBytes != 0 {
		t.Errorf("read-only Stats: %+v", s)
	}
	bbMust(t, r.Close(), "Close read-only")
	after := dev.Stats()
	if after.Writes != before.Writes || after.Flushes != before.Flushes {
		t.Errorf("read-only engine wrote to the device: writes %d -> %d, flushes %d -> %d",
			before.Writes, after.Writes, before.Flushes, after.Flushes)
	}
	// Two read-only engines at once are fine; a writer is not.
	r1 := a2Open(t, dev, engine.Options{ReadOnly: true, CacheSize: 2 * a2MiB})
	r2 := a2Open(t, dev, engine.Options{ReadOnly: true, CacheSize: 2 * a2MiB})
	if w, err := engine.Open(dev, engine.Options{CacheSize: 2 * a2MiB}); err == nil {
		w.Close()
		t.Errorf("read-write Open while read-only engines are open succeeded")
	}
	bbMust(t, r1.Close(), "Close r1")
	bbMust(t, r2.Close(), "Close r2")
	e = a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
	for name, d := range want {
		o, err := e.Object(name)
		bbMust(t, err, "Object")
		a2Check(t, o, d, "read-write after read-only "+name)
	}
	bbMust(t, e.Close(), "Close")
}

// TestAdv2ReadOnlyAfterCrash: a device whose journal holds transactions no
// checkpoint covers (the engine crashed after its Syncs) opens read-only
// with every synced byte, changes nothing, and then a read-write Open finds
// the same.
func TestAdv2ReadOnlyAfterCrash(t *testing.T) {
	for seed := uint64(1); seed <= 6; seed++ {
		dev := engine.NewFaultDevice(32*a2MiB, 512)
		a2Format(t, dev, engine.FormatOptions{})
		e := a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
		synced := map[string][]byte{}
		rng := rand.New(rand.NewPCG(seed, 99))
		for i := 0; i < 5; i++ {
			name := fmt.Sprintf("o%d", i)
			o := a2Create(t, e, name)
			d := a2Pattern(seed*10+uint64(i), 1+rng.IntN(300_000))
			off := int64(rng.IntN(10_000))
			bbWrite(t, o, d, off)
			full := make([]byte, off+int64(len(d)))
			copy(full[off:], d)
			bbMust(t, o.Sync(), "Sync")
			synced[name] = full
		}
		// A removal, a truncate and a punch, synced.
		bbMust(t, e.Remove("o0"), "Remove")
		delete(synced, "o0")
		o1, _ := e.Object("o1")
		cut := int64(len(synced["o1"]) / 3)
		bbMust(t, o1.Truncate(cut), "Truncate")
		synced["o1"] = synced["o1"][:cut]
		o2, _ := e.Object("o2")
		bbMust(t, o2.PunchHole(100, 5000), "PunchHole")
		if int64(len(synced["o2"])) > 100 {
			clear(synced["o2"][100:min(5100, len(synced["o2"]))])
		}
		bbMust(t, e.Sync(), "Sync")
		if s := e.Stats(); s.JournalUsedBytes == 0 {
			t.Logf("seed %d: nothing in the journal to replay", seed)
		}
		// Unsynced changes, then the crash.
		o3, _ := e.Object("o3")
		bbWrite(t, o3, []byte("unsynced"), 0)
		nd, _ := dev.Reboot(rand.New(rand.NewPCG(seed, 7)), true)
		// The crashed engine is abandoned (its device is dead); Close it
		// to free its goroutines, whatever it answers.
		_ = e.Close()

		before := nd.Stats()
		r, err := engine.Open(nd, engine.Options{ReadOnly: true, CacheSize: 2 * a2MiB})
		bbMust(t, err, "read-only Open after a crash")
		check := func(e *engine.Engine, what string) {
			names := e.Objects()
			for name, d := range synced {
				o, err := e.Object(name)
				if err != nil {
					t.Fatalf("seed %d %s: %s: %v (objects %q)", seed, what, name, err, names)
				}
				got := bbReadAll(t, o)
				if name == "o3" && len(got) >= 8 && bytes.Equal(got[:8], []byte("unsynced")) {
					copy(got, d[:8]) // the unsynced write may have survived
				}
				if dd := firstDiff(got, d); dd != "" {
					t.Fatalf("seed %d %s: %s: %s", seed, what, name, dd)
				}
			}
			if _, err := e.Object("o0"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("seed %d %s: removed object came back: %v", seed, what, err)
			}
		}
		check(r, "read-only")
		bbMust(t, r.Close(), "Close read-only")
		if st := nd.Stats(); st.Writes != before.Writes || st.Flushes != before.Flushes {
			t.Errorf("seed %d: read-only open of a crashed device wrote: %+v -> %+v", seed, before, st)
		}
		w := a2Open(t, nd, engine.Options{CacheSize: 2 * a2MiB})
		check(w, "read-write after read-only")
		bbMust(t, w.Close(), "Close")
		if rep, err := engine.Check(nd); err != nil || len(rep.Problems) > 0 {
			t.Fatalf("seed %d: Check: %v %v", seed, err, rep.Problems)
		}
	}
}

// ---------------------------------------------------------------------------
// 4. Truncate, PunchHole, Extents.

// a2Evict reads enough other data through a small cache that the clean
// pages of everything else are gone.
func a2Evict(t *testing.T, e *engine.Engine, cacheSize int) {
	t.Helper()
	o, err := e.Object("evictor")
	if err != nil {
		o = a2Create(t, e, "evictor")
		bbWrite(t, o, a2Pattern(77, 4*cacheSize), 0)
		bbMust(t, o.Sync(), "Sync evictor")
	}
	buf := make([]byte, 64<<10)
	for pass := 0; pass < 2; pass++ {
		for off := int64(0); off < o.Size(); off += int64(len(buf)) {
			if _, err := o.ReadAt(buf, off); err != nil && err != io.EOF {
				t.Fatalf("evictor read: %v", err)
			}
		}
	}
}

// TestAdv2TruncateShrinkExtendZeros: shrinking to the middle of a block and
// growing again reads zeros past the cut — from the cache, after Sync,
// after the cache was evicted, and after Close+Open — for data that was
// delalloc, written, or written and then overwritten in the cache.
func TestAdv2TruncateShrinkExtendZeros(t *testing.T) {
	const bs = 4096
	const cache = 1 * a2MiB
	for _, tc := range []struct {
		name               string
		syncBefore         bool // the data is written before the cut
		dirtyOverwrite     bool // and overwritten (dirty) before the cut
		syncCut, syncGrow  bool
		growByWrite, evict bool
	}{
		{name: "delalloc"},
		{name: "written", syncBefore: true},
		{name: "written-dirty", syncBefore: true, dirtyOverwrite: true},
		{name: "written-synccut", syncBefore: true, syncCut: true},
		{name: "written-synccut-evict", syncBefore: true, syncCut: true, evict: true},
		{name: "written-synccut-syncgrow-evict", syncBefore: true, syncCut: true, syncGrow: true, evict: true},
		{name: "written-growbywrite", syncBefore: true, growByWrite: true},
		{name: "written-synccut-growbywrite-evict", syncBefore: true, syncCut: true, growByWrite: true, evict: true},
		{name: "delalloc-growbywrite", growByWrite: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, e := a2MemEngine(t, 32*a2MiB, engine.Options{CacheSize: cache})
			o := a2Create(t, e, "t")
			want := a2Pattern(9, 5*bs+100)
			bbWrite(t, o, want, 0)
			if tc.syncBefore {
				bbMust(t, o.Sync(), "Sync")
			}
			if tc.dirtyOverwrite {
				ow := a2Pattern(10, 3*bs)
				bbWrite(t, o, ow, bs)
				copy(want[bs:], ow)
			}
			cut := int64(2*bs + 1000)
			bbMust(t, o.Truncate(cut), "Truncate shrink")
			want = want[:cut]
			a2Check(t, o, want, "after shrink")
			if tc.syncCut {
				bbMust(t, o.Sync(), "Sync cut")
			}
			if tc.evict {
				a2Evict(t, e, cache)
			}
			grow := int64(4*bs + 17)
			if tc.growByWrite {
				bbWrite(t, o, []byte{0xAB}, grow-1)
			} else {
				bbMust(t, o.Truncate(grow), "Truncate grow")
			}
			want = append(want, make([]byte, grow-cut)...)
			if tc.growByWrite {
				want[grow-1] = 0xAB
			}
			a2Check(t, o, want, "after grow")
			if tc.syncGrow {
				bbMust(t, o.Sync(), "Sync grow")
			}
			if tc.evict {
				a2Evict(t, e, cache)
				a2Check(t, o, want, "after grow and eviction")
			}
			bbMust(t, e.Close(), "Close")
			e = a2Open(t, dev, engine.Options{CacheSize: cache})
			defer e.Close()
			o, err := e.Object("t")
			bbMust(t, err, "Object")
			a2Check(t, o, want, "after Close+Open")
			a2CheckExtents(t, o, bs, dev.Size(), "after Close+Open")
		})
	}
}

// TestAdv2TruncateCrashNoStaleTail: a synced block cut in its middle and
// synced, then grown (synced) — after a crash at any point the bytes past
// the cut read zeros (never the old tail).
func TestAdv2TruncateCrashNoStaleTail(t *testing.T) {
	const bs = 4096
	for seed := uint64(0); seed < 30; seed++ {
		dev := engine.NewFaultDevice(32*a2MiB, 512)
		a2Format(t, dev, engine.FormatOptions{})
		e := a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
		o := a2Create(t, e, "t")
		old := bytes.Repeat([]byte{0xCC}, 3*bs)
		bbWrite(t, o, old, 0)
		bbMust(t, o.Sync(), "Sync")
		start := dev.Mutations()
		dev.CrashAfter(int64(seed))
		// Errors after the crash are expected.
		_ = o.Truncate(bs + 10)
		_ = o.Sync()
		_ = o.Truncate(3 * bs)
		_ = o.Sync()
		_ = start
		nd, _ := dev.Reboot(rand.New(rand.NewPCG(seed, 1)), true)
		_ = e.Close()
		e2 := a2Open(t, nd, engine.Options{CacheSize: 2 * a2MiB})
		o2, err := e2.Object("t")
		bbMust(t, err, "Object")
		got := bbReadAll(t, o2)
		// Allowed: the old 3 blocks of 0xCC; the cut (bs+10 bytes of 0xCC);
		// or the grown object: bs+10 of 0xCC then zeros.
		switch size := int64(len(got)); {
		case size == 3*bs && bytes.Equal(got, old):
		case size == bs+10 && bytes.Equal(got, old[:bs+10]):
		case size == 3*bs && bytes.Equal(got[:bs+10], old[:bs+10]) && bytes.Count(got[bs+10:], []byte{0}) == len(got)-(bs+10):
		default:
			t.Fatalf("seed %d: after the crash: size %d, %d bytes 0xCC past %d", seed, size, bytes.Count(got[min(int64(len(got)), bs+10):], []byte{0xCC}), bs+10)
		}
		bbMust(t, e2.Close(), "Close")
	}
}

// TestAdv2PunchEdgeCases: punches past EOF, of zero length, spanning EOF,
// and unaligned ranges over delalloc, written and hole blocks, against a
// byte model; Extents stay well formed and punched whole blocks leave the
// map; the size never changes; everything survives Sync and Close+Open.
func TestAdv2PunchEdgeCases(t *testing.T) {
	const bs = 4096
	dev, e := a2MemEngine(t, 32*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
	o := a2Create(t, e, "p")
	// Layout: blocks 0-7 written, 8-11 hole, 12-19 delalloc, size mid 20.
	model := make([]byte, 20*bs+333)
	w := a2Pattern(1, 8*bs)
	bbWrite(t, o, w, 0)
	copy(model, w)
	bbMust(t, o.Sync(), "Sync")
	d := a2Pattern(2, 8*bs+333)
	bbWrite(t, o, d, 12*bs)
	copy(model[12*bs:], d)
	size := int64(len(model))
	a2Check(t, o, model, "setup")
	xs := a2CheckExtents(t, o, bs, dev.Size(), "setup")
	var sawDelalloc, sawWritten bool
	for _, x := range xs {
		if x.State == engine.Delalloc {
			sawDelalloc = true
		}
		if x.State == engine.Written {
			sawWritten = true
		}
		if x.Offset < 12*bs && x.Offset+x.Length > 8*bs {
			t.Errorf("extent %+v covers the hole [8, 12) blocks", x)
		}
	}
	if !sawDelalloc || !sawWritten {
		t.Errorf("setup extents %+v: want both Delalloc and Written", xs)
	}
	punch := func(off, n int64) {
		t.Helper()
		bbMust(t, o.PunchHole(off, n), fmt.Sprintf("PunchHole(%d, %d)", off, n))
		if off < size {
			clear(model[off:min(size, off+n)])
		}
		if o.Size() != size {
			t.Fatalf("PunchHole(%d, %d) changed the size to %d", off, n, o.Size())
		}
		a2Check(t, o, model, fmt.Sprintf("after PunchHole(%d, %d)", off, n))
		for _, x := range a2CheckExtents(t, o, bs, dev.Size(), "after punch") {
			// Whole blocks inside the punch are freed.
			first, last := (off+bs-1)/bs*bs, min(off+n, size)/bs*bs
			if first < last && x.Offset < last && x.Offset+x.Length > first {
				t.Errorf("after PunchHole(%d, %d): extent %+v still maps punched whole blocks [%d, %d)", off, n, x, first, last)
			}
		}
	}
	punch(size+10, 5*bs) // past EOF
	punch(size, 1)       // at EOF
	punch(100, 0)        // zero length
	punch(0, 0)
	punch(5, 7)            // inside one written block
	punch(bs-1, 2)         // across a written block boundary
	punch(3*bs+17, 6*bs)   // written into the hole
	punch(10*bs+5, 3*bs)   // hole into delalloc
	punch(14*bs+100, 100)  // inside delalloc
	punch(18*bs+7, 100*bs) // delalloc across EOF
	punch(6*bs, 2*bs)      // exact written blocks
	bbMust(t, e.Sync(), "Sync")
	a2Check(t, o, model, "after Sync")
	for _, x := range a2CheckExtents(t, o, bs, dev.Size(), "after Sync") {
		if x.State != engine.Written {
			t.Errorf("after Sync: extent %+v not Written", x)
		}
	}
	punch(2*bs+1, bs*2)   // over written, after sync
	punch(0, size+100*bs) // everything and past EOF
	if xs := o.Extents(); len(xs) > 1 {
		// Only the last partial block may remain (its head is zeroed in place).
		t.Errorf("after punching everything: extents %+v", xs)
	}
	bbMust(t, e.Close(), "Close")
	e = a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
	defer e.Close()
	o, _ = e.Object("p")
	a2Check(t, o, model, "after Close+Open")
}

// TestAdv2ExtentsStates: before writeback a fresh write is Delalloc with
// Physical −1; after Sync Written on the device, extents never overlap each
// other or the extents of another object; after Truncate nothing lies past
// the size.
func TestAdv2ExtentsStates(t *testing.T) {
	const bs = 4096
	dev, e := a2MemEngine(t, 64*a2MiB, engine.Options{CacheSize: 8 * a2MiB})
	defer e.Close()
	objs := []*engine.Object{a2Create(t, e, "x"), a2Create(t, e, "y")}
	rng := rand.New(rand.NewPCG(11, 12))
	for _, o := range objs {
		for i := 0; i < 20; i++ {
			bbWrite(t, o, a2Pattern(uint64(i), 1+rng.IntN(40_000)), int64(rng.IntN(2*a2MiB)))
		}
		for _, x := range a2CheckExtents(t, o, bs, dev.Size(), "before Sync") {
			if x.State != engine.Delalloc || x.Physical != -1 {
				t.Errorf("before any writeback: %+v, want Delalloc @ -1", x)
			}
		}
	}
	bbMust(t, e.Sync(), "Sync")
	type phys struct{ start, end int64 }
	var used []phys
	for _, o := range objs {
		for _, x := range a2CheckExtents(t, o, bs, dev.Size(), "after Sync") {
			if x.State != engine.Written {
				t.Errorf("after Sync: %+v not Written", x)
			}
			used = append(used, phys{x.Physical, x.Physical + x.Length})
		}
	}
	slices.SortFunc(used, func(a, b phys) int { return int(a.start - b.start) })
	for i := 1; i < len(used); i++ {
		if used[i].start < used[i-1].end {
			t.Errorf("physical ranges overlap: %v and %v", used[i-1], used[i])
		}
	}
	// Extents cover exactly the written blocks' bytes: every non-zero byte
	// lies inside an extent.
	for _, o := range objs {
		data := bbReadAll(t, o)
		xs := o.Extents()
		for i, b := range data {
			if b == 0 {
				continue
			}
			in := false
			for _, x := range xs {
				if int64(i) >= x.Offset && int64(i) < x.Offset+x.Length {
					in = true
					break
				}
			}
			if !in {
				t.Fatalf("%s: byte %d is %#x but no extent covers it", o.Name(), i, b)
			}
		}
		bbMust(t, o.Truncate(300_001), "Truncate")
		a2CheckExtents(t, o, bs, dev.Size(), "after Truncate")
		bbMust(t, o.Truncate(0), "Truncate 0")
		if xs := o.Extents(); len(xs) != 0 {
			t.Errorf("after Truncate(0): %+v", xs)
		}
	}
}

// ---------------------------------------------------------------------------
// 5. io.ReaderAt / io.WriterAt exactness.

// a2ReaderAtContract checks the io.ReaderAt rules on o, whose contents
// are want.
func a2ReaderAtContract(t *testing.T, o *engine.Object, want []byte, what string) {
	t.Helper()
	size := int64(len(want))
	for _, off := range []int64{size, size + 1, size + 4096, 1 << 40, engine.MaxObjectSize + 5} {
		n, err := o.ReadAt(make([]byte, 10), off)
		if n != 0 || err != io.EOF {
			t.Errorf("%s: ReadAt(10 at %d), size %d = %d, %v; want 0, io.EOF", what, off, size, n, err)
		}
		n, err = o.ReadAt(nil, off)
		if n != 0 || (err != nil && err != io.EOF) {
			t.Errorf("%s: ReadAt(empty at %d) = %d, %v", what, off, n, err)
		}
	}
	if size == 0 {
		return
	}
	for _, off := range []int64{0, 1, size / 2, size - 1} {
		if n, err := o.ReadAt(nil, off); n != 0 || err != nil {
			t.Errorf("%s: ReadAt(empty at %d < size) = %d, %v; want 0, nil", what, off, n, err)
		}
		// Reading up to the end exactly: n == len(p), err nil or EOF.
		p := make([]byte, size-off)
		n, err := o.ReadAt(p, off)
		if int64(n) != size-off || (err != nil && err != io.EOF) || !bytes.Equal(p, want[off:]) {
			t.Errorf("%s: ReadAt(to the end from %d) = %d, %v (data equal %v)", what, off, n, err, bytes.Equal(p, want[off:]))
		}
		// Past the end: n < len(p), io.EOF, the bytes exact.
		p = bytes.Repeat([]byte{0x5A}, int(size-off)+777)
		n, err = o.ReadAt(p, off)
		if int64(n) != size-off || err != io.EOF {
			t.Errorf("%s: ReadAt(%d at %d) of size %d = %d, %v; want %d, io.EOF", what, len(p), off, size, n, err, size-off)
		}
		if !bytes.Equal(p[:n], want[off:]) {
			t.Errorf("%s: partial read at %d: %s", what, off, firstDiff(p[:n], want[off:]))
		}
	}
	if _, err := o.ReadAt(make([]byte, 1), -1); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("%s: ReadAt(-1) = %v, want fs.ErrInvalid", what, err)
	}
}

// TestAdv2ReaderAtContract: the io.ReaderAt/io.WriterAt rules on objects of
// several sizes, states and block sizes, and iotest-style checks through
// io.SectionReader.
func TestAdv2ReaderAtContract(t *testing.T) {
	for _, bs := range []int{512, 4096, 65536} {
		t.Run(fmt.Sprint(bs), func(t *testing.T) {
			dev := engine.NewMemDevice(32*a2MiB, 512)
			a2Format(t, dev, engine.FormatOptions{BlockSize: bs})
			e := a2Open(t, dev, engine.Options{CacheSize: 8 * a2MiB})
			defer e.Close()
			for i, size := range []int{0, 1, bs - 1, bs, bs + 1, 3*bs + 77} {
				o := a2Create(t, e, fmt.Sprintf("o%d", i))
				want := a2Pattern(uint64(i), size)
				if size > 0 {
					// Written in odd pieces, with io.WriterAt's n.
					for off := 0; off < size; {
						k := min(size-off, 1+(off*7+13)%(bs+3))
						n, err := o.WriteAt(want[off:off+k], int64(off))
						if n != k || err != nil {
							t.Fatalf("WriteAt = %d, %v", n, err)
						}
						off += k
					}
				}
				if n, err := o.WriteAt(nil, int64(size)+100); n != 0 || err != nil || o.Size() != int64(size) {
					t.Errorf("empty WriteAt past EOF = %d, %v; size now %d (must not grow)", n, err, o.Size())
				}
				a2ReaderAtContract(t, o, want, fmt.Sprintf("bs %d size %d delalloc", bs, size))
				bbMust(t, o.Sync(), "Sync")
				a2ReaderAtContract(t, o, want, fmt.Sprintf("bs %d size %d written", bs, size))
				sr := io.NewSectionReader(o, 0, 1<<62)
				got, err := io.ReadAll(sr)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("io.ReadAll(SectionReader) = %d bytes, %v", len(got), err)
				}
			}
		})
	}
}

// TestAdv2ParallelDisjointUnaligned: many goroutines write and read
// disjoint, unaligned byte ranges of one object — neighbours share blocks —
// with Syncs, truncation-free, through a cache small enough that partial
// blocks are read back from the device; each goroutine always reads back
// exactly its own bytes, and so does the final state after Close+Open.
func TestAdv2ParallelDisjointUnaligned(t *testing.T) {
	const bs = 4096
	const G = 16
	const span = 3*bs + 1001 // each goroutine's range: unaligned, shares blocks
	dev, e := a2MemEngine(t, 64*a2MiB, engine.Options{CacheSize: a2MiB})
	o := a2Create(t, e, "shared")
	total := G * span
	bbMust(t, o.Truncate(int64(total)), "Truncate")
	models := make([][]byte, G)
	var wg sync.WaitGroup
	errc := make(chan string, G)
	iters := 300
	if testing.Short() {
		iters = 100
	}
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 77))
			base := int64(g * span)
			m := make([]byte, span)
			for i := 0; i < iters; i++ {
				switch rng.IntN(10) {
				case 0:
					if err := o.Sync(); err != nil {
						errc <- fmt.Sprintf("g%d Sync: %v", g, err)
						return
					}
				case 1:
					// Punch a piece of one's own range.
					off := rng.IntN(span)
					n := rng.IntN(span - off + 1)
					if err := o.PunchHole(base+int64(off), int64(n)); err != nil {
						errc <- fmt.Sprintf("g%d PunchHole: %v", g, err)
						return
					}
					clear(m[off : off+n])
				default:
					off := rng.IntN(span)
					n := 1 + rng.IntN(span-off)
					p := a2Pattern(uint64(g*100000+i), n)
					k, err := o.WriteAt(p, base+int64(off))
					if k != n || err != nil {
						errc <- fmt.Sprintf("g%d WriteAt = %d, %v", g, k, err)
						return
					}
					copy(m[off:], p)
				}
				got := make([]byte, span)
				k, err := o.ReadAt(got, base)
				if k != span || (err != nil && err != io.EOF) {
					errc <- fmt.Sprintf("g%d ReadAt = %d, %v", g, k, err)
					return
				}
				if d := firstDiff(got, m); d != "" {
					errc <- fmt.Sprintf("g%d iteration %d: own range: %s", g, i, d)
					return
				}
			}
			models[g] = m
		}()
	}
	// Another goroutine keeps evicting clean pages meanwhile.
	stop := make(chan struct{})
	var ew sync.WaitGroup
	ew.Add(1)
	ev := a2Create(t, e, "evictor")
	bbWrite(t, ev, a2Pattern(5, 3*a2MiB), 0)
	bbMust(t, ev.Sync(), "Sync")
	go func() {
		defer ew.Done()
		buf := make([]byte, 256<<10)
		for off := int64(0); ; off = (off + int64(len(buf))) % (3 * a2MiB) {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := ev.ReadAt(buf, off); err != nil && err != io.EOF {
				errc <- fmt.Sprintf("evictor: %v", err)
				return
			}
		}
	}()
	a2Timeout(t, 60*time.Second, "parallel writers", wg.Wait)
	close(stop)
	ew.Wait()
	close(errc)
	for s := range errc {
		t.Error(s)
	}
	if t.Failed() {
		return
	}
	want := bytes.Join(models, nil)
	a2Check(t, o, want, "final")
	bbMust(t, e.Close(), "Close")
	e = a2Open(t, dev, engine.Options{CacheSize: a2MiB})
	defer e.Close()
	o, _ = e.Object("shared")
	a2Check(t, o, want, "after Close+Open")
}

// ---------------------------------------------------------------------------
// 6. The same checks on an O_DIRECT file device.

func a2FileDev(t *testing.T, size int64) (string, engine.Device) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev.img")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: size})
	if err != nil {
		t.Skipf("OpenDevice: %v", err)
	}
	return path, dev
}

// TestAdv2FileDevice: on an O_DIRECT temp file, unaligned writes from
// misaligned user buffers against a model, the io.ReaderAt contract, a
// mid-block shrink and grow after eviction, the exact fill of
// FreeBytes − ReservedBytes with ErrNoSpace one block later, and all of it
// again after closing and reopening the file.
func TestAdv2FileDevice(t *testing.T) {
	const bs = 4096
	const cache = 2 * a2MiB
	path, dev := a2FileDev(t, 24*a2MiB)
	a2Format(t, dev, engine.FormatOptions{})
	e := a2Open(t, dev, engine.Options{CacheSize: cache})
	o := a2Create(t, e, "model")
	rng := rand.New(rand.NewPCG(21, 22))
	var model []byte
	for i := 0; i < 150; i++ {
		off := rng.IntN(2 * a2MiB)
		n := 1 + rng.IntN(100_000)
		raw := a2Pattern(uint64(i), n+7)
		p := raw[1+rng.IntN(6):][:n] // misaligned user buffer
		bbWrite(t, o, p, int64(off))
		if off+n > len(model) {
			model = append(model, make([]byte, off+n-len(model))...)
		}
		copy(model[off:], p)
		switch rng.IntN(12) {
		case 0:
			bbMust(t, o.Sync(), "Sync")
		case 1:
			a, b := rng.IntN(len(model)), rng.IntN(50_000)
			bbMust(t, o.PunchHole(int64(a), int64(b)), "PunchHole")
			clear(model[a:min(len(model), a+b)])
		case 2:
			got := make([]byte, 1+rng.IntN(200_000))
			roff := rng.IntN(len(model))
			k, err := o.ReadAt(got[1:], int64(roff)) // misaligned destination
			wantN := min(len(got)-1, len(model)-roff)
			if k != wantN || (k < len(got)-1 && err != io.EOF) || (err != nil && err != io.EOF) {
				t.Fatalf("ReadAt(%d at %d) = %d, %v", len(got)-1, roff, k, err)
			}
			if d := firstDiff(got[1:1+k], model[roff:roff+k]); d != "" {
				t.Fatalf("ReadAt at %d: %s", roff, d)
			}
		}
	}
	a2Check(t, o, model, "model on the file device")
	a2ReaderAtContract(t, o, model, "file device")
	// Mid-block shrink, eviction, grow.
	bbMust(t, o.Sync(), "Sync")
	cut := int64(len(model)/2/bs*bs + 1234)
	bbMust(t, o.Truncate(cut), "Truncate")
	bbMust(t, o.Sync(), "Sync")
	a2Evict(t, e, cache)
	bbMust(t, o.Truncate(cut+3*bs), "Truncate grow")
	model = append(model[:cut], make([]byte, 3*bs)...)
	a2Check(t, o, model, "after shrink, eviction, grow")
	// Exact fill.
	ev, _ := e.Object("evictor")
	_ = ev
	bbMust(t, e.Sync(), "Sync")
	s0 := e.Stats()
	avail := a2Avail(s0)
	fill := a2Create(t, e, "fill")
	fillData := a2Pattern(31, int(avail)-3000) // ends inside the last block
	for off := 0; off < len(fillData); off += 333_333 {
		bbWrite(t, fill, fillData[off:min(len(fillData), off+333_333)], int64(off))
	}
	if s := e.Stats(); a2Avail(s) != 0 {
		t.Errorf("after filling the file device: avail %d", a2Avail(s))
	}
	if n, err := fill.WriteAt(make([]byte, bs), avail); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
		t.Fatalf("WriteAt past the free space on the file device = %d, %v", n, err)
	}
	bbMust(t, e.Sync(), "Sync of the full file device")
	bbMust(t, e.Close(), "Close")
	bbMust(t, dev.Close(), "dev.Close")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{})
	bbMust(t, err, "OpenDevice again")
	defer dev.Close()
	e = a2Open(t, dev, engine.Options{CacheSize: cache})
	defer e.Close()
	o, _ = e.Object("model")
	a2Check(t, o, model, "model after reopening the file")
	fill, _ = e.Object("fill")
	a2Check(t, fill, fillData, "fill after reopening the file")
	if s := e.Stats(); s.FreeBytes != 0 || s.ReservedBytes != 0 {
		t.Errorf("after reopening the full file device: %+v", s)
	}
	bbMust(t, e.Remove("fill"), "Remove")
	bbMust(t, e.Sync(), "Sync")
	if s := e.Stats(); s.FreeBytes != s0.FreeBytes {
		t.Errorf("after Remove+Sync: FreeBytes %d, want %d", s.FreeBytes, s0.FreeBytes)
	}
}

// TestAdv2FileDeviceParallel: parallel disjoint unaligned writers and
// readers on the O_DIRECT file device, and Close racing with them.
func TestAdv2FileDeviceParallel(t *testing.T) {
	const G = 8
	const span = 50_001
	_, dev := a2FileDev(t, 32*a2MiB)
	defer dev.Close()
	a2Format(t, dev, engine.FormatOptions{})
	e := a2Open(t, dev, engine.Options{CacheSize: a2MiB})
	o := a2Create(t, e, "p")
	bbMust(t, o.Truncate(G*span), "Truncate")
	var wg sync.WaitGroup
	errc := make(chan string, G)
	models := make([][]byte, G)
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 3))
			m := make([]byte, span)
			base := int64(g * span)
			for i := 0; i < 60; i++ {
				off := rng.IntN(span)
				n := 1 + rng.IntN(span-off)
				p := a2Pattern(uint64(g*1000+i), n)
				if k, err := o.WriteAt(p, base+int64(off)); k != n || err != nil {
					errc <- fmt.Sprintf("WriteAt = %d, %v", k, err)
					return
				}
				copy(m[off:], p)
				if i%7 == 0 {
					if err := o.Sync(); err != nil {
						errc <- fmt.Sprintf("Sync: %v", err)
						return
					}
				}
				got := make([]byte, span)
				if k, err := o.ReadAt(got, base); k != span || (err != nil && err != io.EOF) {
					errc <- fmt.Sprintf("ReadAt = %d, %v", k, err)
					return
				} else if d := firstDiff(got[:k], m[:k]); d != "" {
					errc <- fmt.Sprintf("g%d: %s", g, d)
					return
				}
			}
			models[g] = m
		}()
	}
	a2Timeout(t, 60*time.Second, "file device writers", wg.Wait)
	close(errc)
	for s := range errc {
		t.Error(s)
	}
	if t.Failed() {
		e.Close()
		return
	}
	want := bytes.Join(models, nil)
	a2Check(t, o, want, "final")
	bbMust(t, e.Close(), "Close")
	a2AllClosed(t, e, o, "file device after Close")
}

// ---------------------------------------------------------------------------
// 7. Format and Open misuse.

// TestAdv2FormatBadOptions: every FormatOptions that cannot work is refused
// with an error wrapping fs.ErrInvalid, without writing the device.
func TestAdv2FormatBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int64
		sector int
		fo     engine.FormatOptions
	}{
		{"bs-not-pow2", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: 3000}},
		{"bs-4095", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: 4095}},
		{"bs-6144", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: 6144}},
		{"bs-negative", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: -4096}},
		{"bs-below-device", 32 * a2MiB, 4096, engine.FormatOptions{BlockSize: 2048}},
		{"bs-512-on-4k", 32 * a2MiB, 4096, engine.FormatOptions{BlockSize: 512}},
		{"bs-256", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: 256}},
		{"bs-128k", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: 128 << 10}},
		{"bs-huge", 32 * a2MiB, 512, engine.FormatOptions{BlockSize: 1 << 40}},
		{"meta-bigger-than-device", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: 33 * a2MiB}},
		{"meta-equal-device", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: 32 * a2MiB}},
		{"meta-over-half", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: 17 * a2MiB}},
		{"meta-negative", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: -1}},
		{"meta-huge", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: 1 << 62}},
		{"device-16MiB-minus-sector", 16*a2MiB - 512, 512, engine.FormatOptions{}},
		{"device-1MiB", a2MiB, 512, engine.FormatOptions{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := engine.NewFaultDevice(tc.size, tc.sector)
			var err error
			mustNotPanic(t, "Format", func() { err = engine.Format(dev, tc.fo) })
			if err == nil {
				t.Fatalf("Format(%+v) on %d bytes / %d-byte sectors succeeded", tc.fo, tc.size, tc.sector)
			}
			if !errors.Is(err, fs.ErrInvalid) {
				t.Errorf("Format(%+v) = %v; want an error wrapping fs.ErrInvalid", tc.fo, err)
			}
			if st := dev.Stats(); st.Writes != 0 {
				t.Errorf("refused Format wrote %d times", st.Writes)
			}
		})
	}
}

// TestAdv2FormatLimitsWork: the limits themselves work end to end: a 16 MiB
// device, 512-byte and 65536-byte engine blocks, a device size that is not
// a multiple of the engine block, a small MetadataSize; each can be
// written to the last byte FreeBytes promises, synced and reopened.
func TestAdv2FormatLimitsWork(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int64
		sector int
		fo     engine.FormatOptions
		cache  int64
	}{
		{"16MiB-default", 16 * a2MiB, 512, engine.FormatOptions{}, 2 * a2MiB},
		{"16MiB-bs512", 16 * a2MiB, 512, engine.FormatOptions{BlockSize: 512}, 2 * a2MiB},
		{"16MiB-bs64k", 16 * a2MiB, 512, engine.FormatOptions{BlockSize: 65536}, 8 * a2MiB},
		{"4k-sector-bs64k", 32 * a2MiB, 4096, engine.FormatOptions{BlockSize: 65536}, 8 * a2MiB},
		{"odd-size", 16*a2MiB + 4096 + 512, 512, engine.FormatOptions{BlockSize: 8192}, 2 * a2MiB},
		{"small-meta", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: 64 << 10}, 2 * a2MiB},
		{"meta-half", 32 * a2MiB, 512, engine.FormatOptions{MetadataSize: 15 * a2MiB}, 2 * a2MiB},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := engine.NewMemDevice(tc.size, tc.sector)
			a2Format(t, dev, tc.fo)
			e := a2Open(t, dev, engine.Options{CacheSize: tc.cache})
			s0 := e.Stats()
			if s0.TotalBytes <= 0 || s0.TotalBytes > tc.size || s0.FreeBytes != s0.TotalBytes {
				t.Fatalf("fresh engine Stats: %+v", s0)
			}
			o := a2Create(t, e, "all")
			want := a2Pattern(1, int(a2Avail(s0)))
			for off := 0; off < len(want); off += 1_000_003 {
				bbWrite(t, o, want[off:min(len(want), off+1_000_003)], int64(off))
			}
			if n, err := o.WriteAt([]byte{1}, int64(len(want))); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("write past the free space = %d, %v", n, err)
			}
			bbMust(t, e.Sync(), "Sync")
			for _, x := range a2CheckExtents(t, o, int64(blockOf(tc.fo)), tc.size, "full") {
				if x.Physical+x.Length > tc.size {
					t.Errorf("extent %+v past the device", x)
				}
			}
			bbMust(t, e.Close(), "Close")
			e = a2Open(t, dev, engine.Options{CacheSize: tc.cache})
			defer e.Close()
			o, err := e.Object("all")
			bbMust(t, err, "Object")
			a2Check(t, o, want, "after reopen")
			if r, err := engine.Check(dev); err != nil || len(r.Problems) > 0 {
				t.Fatalf("Check: %v %v", err, r.Problems)
			}
		})
	}
}

func blockOf(fo engine.FormatOptions) int {
	if fo.BlockSize == 0 {
		return 4096
	}
	return fo.BlockSize
}

// TestAdv2OpenBadDevices: Open of a zeroed, never formatted, random or
// half-overwritten device returns an error (ErrCorrupt) and never panics;
// bad Options are fs.ErrInvalid.
func TestAdv2OpenBadDevices(t *testing.T) {
	open := func(dev engine.Device, opts engine.Options) (err error) {
		mustNotPanic(t, "Open", func() {
			var e *engine.Engine
			e, err = engine.Open(dev, opts)
			if err == nil {
				e.Close()
			}
		})
		return err
	}
	opts := engine.Options{CacheSize: 2 * a2MiB}
	zero := engine.NewMemDevice(16*a2MiB, 512)
	if err := open(zero, opts); err == nil || !errors.Is(err, engine.ErrCorrupt) {
		t.Errorf("Open of a zeroed device = %v, want ErrCorrupt", err)
	}
	if err := open(zero, engine.Options{CacheSize: 2 * a2MiB, ReadOnly: true}); err == nil || !errors.Is(err, engine.ErrCorrupt) {
		t.Errorf("read-only Open of a zeroed device = %v, want ErrCorrupt", err)
	}
	for seed := uint64(0); seed < 8; seed++ {
		g := engine.NewMemDevice(16*a2MiB, 512)
		junk := a2Pattern(seed, 4*a2MiB)
		if _, err := g.WriteAt(junk, 0); err != nil {
			t.Fatal(err)
		}
		if err := open(g, opts); err == nil {
			t.Errorf("Open of random bytes succeeded")
		} else if !errors.Is(err, engine.ErrCorrupt) {
			t.Logf("Open of random bytes = %v (not ErrCorrupt)", err)
		}
	}
	// Formatted, then each metadata block zeroed or scribbled in turn.
	dev := engine.NewMemDevice(16*a2MiB, 512)
	a2Format(t, dev, engine.FormatOptions{})
	e := a2Open(t, dev, opts)
	bbWrite(t, a2Create(t, e, "x"), a2Pattern(3, 100_000), 0)
	bbMust(t, e.Close(), "Close")
	img := make([]byte, 2*a2MiB)
	_, _ = dev.ReadAt(img, 0)
	for blk := int64(0); blk < 64; blk++ {
		for _, junk := range [][]byte{make([]byte, 4096), a2Pattern(uint64(blk), 4096)} {
			d := engine.NewMemDevice(16*a2MiB, 512)
			_, _ = d.WriteAt(img, 0)
			_, _ = d.WriteAt(junk, blk*4096)
			mustNotPanic(t, fmt.Sprintf("Open with block %d damaged", blk), func() {
				if e, err := engine.Open(d, opts); err == nil {
					// A damaged redundant copy may be tolerated; data must read.
					if o, err := e.Object("x"); err == nil {
						_ = bbReadAll(t, o)
					}
					e.Close()
				}
				_, _ = engine.Check(d)
			})
		}
	}
	// Bad options.
	for _, o := range []engine.Options{
		{CacheSize: -1},
		{CacheSize: 512 << 10},
		{CacheSize: 2 * a2MiB, DirtyLimit: -1},
		{CacheSize: 2 * a2MiB, DirtyLimit: 2 * a2MiB},
	} {
		if err := open(dev, o); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Open(%+v) = %v, want fs.ErrInvalid", o, err)
		}
	}
	// The device is still usable after all the failed Opens.
	e = a2Open(t, dev, opts)
	bbMust(t, e.Close(), "Close")
}

// TestAdv2FormatOverExisting: Format over a device holding an engine with
// objects, synced or only journaled, then Open: empty, all space free, and
// nothing of the old objects ever readable in new ones.
func TestAdv2FormatOverExisting(t *testing.T) {
	for _, clean := range []bool{true, false} {
		dev := engine.NewFaultDevice(32*a2MiB, 512)
		a2Format(t, dev, engine.FormatOptions{})
		e := a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
		fresh := e.Stats()
		for i := 0; i < 5; i++ {
			o := a2Create(t, e, fmt.Sprintf("old%d", i))
			bbWrite(t, o, bytes.Repeat([]byte{0xDD}, 500_000), 0)
			bbMust(t, o.Sync(), "Sync")
		}
		if clean {
			bbMust(t, e.Close(), "Close")
		} else {
			// The journal holds transactions; the engine is abandoned
			// (simulated crash) and the device formatted anyway.
			nd, _ := dev.Reboot(rand.New(rand.NewPCG(1, 2)), false)
			_ = e.Close()
			dev = nd
		}
		a2Format(t, dev, engine.FormatOptions{})
		e = a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
		if names := e.Objects(); len(names) != 0 {
			t.Fatalf("clean=%v: after re-Format: objects %q", clean, names)
		}
		if s := e.Stats(); s.FreeBytes != fresh.FreeBytes || s.ReservedBytes != 0 {
			t.Fatalf("clean=%v: after re-Format: %+v, want FreeBytes %d", clean, s, fresh.FreeBytes)
		}
		o := a2Create(t, e, "old0")
		bbMust(t, o.Truncate(500_000), "Truncate")
		bbWrite(t, o, []byte{1}, 250_000)
		if i := bytes.IndexByte(bbReadAll(t, o), 0xDD); i >= 0 {
			t.Fatalf("clean=%v: new object shows old bytes at %d", clean, i)
		}
		bbMust(t, e.Close(), "Close")
		e = a2Open(t, dev, engine.Options{CacheSize: 2 * a2MiB})
		if names := e.Objects(); !slices.Equal(names, []string{"old0"}) {
			t.Fatalf("clean=%v: after reopen: %q", clean, names)
		}
		bbMust(t, e.Close(), "Close")
	}
}

// TestAdv2OpenBadCacheOptionsInvalid: Options the page cache refuses — a
// DirtyLimit below one engine block, a CacheSize under the cache's
// 64-frame minimum for 64 KiB blocks — are bad Options like the ones Open
// checks itself, and wrap fs.ErrInvalid (they used to wrap only
// cache.ErrBadOptions).
func TestAdv2OpenBadCacheOptionsInvalid(t *testing.T) {
	dev := engine.NewMemDevice(16*a2MiB, 512)
	a2Format(t, dev, engine.FormatOptions{})
	if e, err := engine.Open(dev, engine.Options{CacheSize: 2 * a2MiB, DirtyLimit: 100}); err == nil {
		e.Close()
		t.Errorf("Open with DirtyLimit 100 succeeded")
	} else if !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("Open(DirtyLimit 100 < one block) = %v; want an error wrapping fs.ErrInvalid", err)
	}
	d64 := engine.NewMemDevice(16*a2MiB, 512)
	a2Format(t, d64, engine.FormatOptions{BlockSize: 65536})
	if e, err := engine.Open(d64, engine.Options{CacheSize: 2 * a2MiB}); err == nil {
		e.Close()
		t.Errorf("Open with a 2 MiB cache of 64 KiB blocks succeeded")
	} else if !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("Open(CacheSize 2 MiB, 64 KiB blocks) = %v; want an error wrapping fs.ErrInvalid like the other bad Options", err)
	}
}

// TestAdv2StatsExactFillAfterRemoveAndWindows: the space of a removed,
// not yet synced object is promised as free at once (FreeBytes) — it must
// then really be writable, and the Sync (engine's or object's) that writes
// it back must not fail, even while other appenders' allocation windows
// hold free space and background writeback runs under a small cache.
func TestAdv2StatsExactFillAfterRemoveAndWindows(t *testing.T) {
	const bs = 4096
	for _, objSync := range []bool{false, true} {
		t.Run(fmt.Sprintf("objectSync=%v", objSync), func(t *testing.T) {
			dev, e := a2MemEngine(t, 24*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
			defer e.Close()
			s0 := e.Stats()
			// Two appenders that Sync as they go (they get windows).
			apps := []*engine.Object{a2Create(t, e, "app0"), a2Create(t, e, "app1")}
			for i := 0; i < 16; i++ {
				for j, o := range apps {
					bbWrite(t, o, a2Pattern(uint64(i*2+j), 64<<10), int64(i)*(64<<10))
					bbMust(t, o.Sync(), "Sync appender")
				}
			}
			// A big object, synced, then removed without a Sync.
			big := a2Create(t, e, "big")
			bbWrite(t, big, bytes.Repeat([]byte{0xBB}, int(a2Avail(e.Stats()))/2), 0)
			bbMust(t, big.Sync(), "Sync big")
			bbMust(t, e.Remove("big"), "Remove big")
			avail := a2Avail(e.Stats())
			fill := a2Create(t, e, "fill")
			want := a2Pattern(42, int(avail))
			for off := 0; off < len(want); off += 200_000 {
				bbWrite(t, fill, want[off:min(len(want), off+200_000)], int64(off))
			}
			if n, err := fill.WriteAt(make([]byte, bs), avail); n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("one block more = %d, %v", n, err)
			}
			if objSync {
				bbMust(t, fill.Sync(), "Object.Sync of the fill (must not report ENOSPC)")
			}
			bbMust(t, e.Sync(), "Sync of the fill (must not report ENOSPC)")
			if s := e.Stats(); s.FreeBytes != 0 || s.ReservedBytes != 0 {
				t.Errorf("after the fill: %+v", s)
			}
			got := bbReadAll(t, fill)
			if d := firstDiff(got, want); d != "" {
				t.Fatalf("fill: %s", d)
			}
			// Appenders' data intact.
			for j, o := range apps {
				data := bbReadAll(t, o)
				for i := 0; i < 16; i++ {
					if !bytes.Equal(data[i*(64<<10):(i+1)*(64<<10)], a2Pattern(uint64(i*2+j), 64<<10)) {
						t.Fatalf("appender %d chunk %d damaged", j, i)
					}
				}
			}
			bbMust(t, e.Remove("fill"), "Remove")
			for _, name := range []string{"app0", "app1"} {
				bbMust(t, e.Remove(name), "Remove")
			}
			bbMust(t, e.Sync(), "Sync")
			if s := e.Stats(); s.FreeBytes != s0.FreeBytes {
				t.Errorf("all removed: FreeBytes %d, want %d", s.FreeBytes, s0.FreeBytes)
			}
			_ = dev
		})
	}
}

// TestAdv2ConcurrentBoundsAndExtents: several writers (appending and
// rewriting, block sizes 4 KiB and 64 KiB with the smallest cache the
// engine accepts) while a sampler checks CachedBytes ≤ CacheSize,
// DirtyBytes ≤ DirtyLimit and the well-formedness of every object's map
// (sorted, non-overlapping, within the size) at every instant, and
// Size() never goes down for append-only objects.
func TestAdv2ConcurrentBoundsAndExtents(t *testing.T) {
	for _, tc := range []struct {
		bs           int
		cache, dirty int64
	}{
		{4096, 2 * a2MiB, 512 << 10},
		{65536, 5 * a2MiB, a2MiB},
	} {
		t.Run(fmt.Sprint(tc.bs), func(t *testing.T) {
			dev := engine.NewMemDevice(96*a2MiB, 512)
			a2Format(t, dev, engine.FormatOptions{BlockSize: tc.bs})
			e, err := engine.Open(dev, engine.Options{CacheSize: tc.cache, DirtyLimit: tc.dirty})
			if err != nil {
				t.Skipf("Open: %v", err)
			}
			defer e.Close()
			const W = 4
			objs := make([]*engine.Object, W)
			for i := range objs {
				objs[i] = a2Create(t, e, fmt.Sprintf("w%d", i))
			}
			ctx, cancel := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			errc := make(chan string, 16)
			report := func(s string) {
				select {
				case errc <- s:
				default:
				}
			}
			for i, o := range objs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(i), 1))
					var off int64
					for j := 0; off < 8*a2MiB; j++ {
						n := 1 + rng.IntN(100_000)
						at := off
						if i%2 == 1 && j%3 == 0 && off > 0 {
							at = int64(rng.Int64N(off)) // a rewrite inside
						}
						if k, err := o.WriteAt(a2Pattern(uint64(j), n), at); k != n || err != nil {
							report(fmt.Sprintf("WriteAt = %d, %v", k, err))
							return
						}
						if at == off {
							off += int64(n)
						}
						if j%25 == 0 {
							if err := o.Sync(); err != nil {
								report(fmt.Sprintf("Sync: %v", err))
								return
							}
						}
					}
				}()
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				lastSize := make([]int64, W)
				bs := int64(tc.bs)
				for ctx.Err() == nil {
					s := e.Stats()
					if s.CachedBytes > tc.cache {
						report(fmt.Sprintf("CachedBytes %d > CacheSize %d", s.CachedBytes, tc.cache))
					}
					if s.DirtyBytes > tc.dirty {
						report(fmt.Sprintf("DirtyBytes %d > DirtyLimit %d", s.DirtyBytes, tc.dirty))
					}
					for i, o := range objs {
						size := o.Size()
						if size < lastSize[i] {
							report(fmt.Sprintf("w%d: Size went down %d -> %d", i, lastSize[i], size))
						}
						lastSize[i] = size
						xs := o.Extents()
						limit := (o.Size() + bs - 1) / bs * bs
						prev := int64(0)
						for _, x := range xs {
							if x.Offset < prev || x.Length <= 0 || x.Offset+x.Length > limit ||
								(x.State == engine.Delalloc) != (x.Physical == -1) {
								report(fmt.Sprintf("w%d: bad map %+v (size %d)", i, xs, size))
								break
							}
							prev = x.Offset + x.Length
						}
					}
					time.Sleep(200 * time.Microsecond)
				}
			}()
			// Writers end on their own; then stop the sampler.
			writersDone := make(chan struct{})
			go func() {
				for _, o := range objs {
					for o.Size() < 8*a2MiB {
						if ctx.Err() != nil {
							break
						}
						time.Sleep(time.Millisecond)
					}
				}
				close(writersDone)
			}()
			select {
			case <-writersDone:
			case <-time.After(30 * time.Second):
			case s := <-errc:
				t.Error(s)
			}
			cancel()
			a2Timeout(t, 30*time.Second, "writers", wg.Wait)
			close(errc)
			for s := range errc {
				t.Error(s)
			}
			bbMust(t, e.Sync(), "Sync")
			for _, o := range objs {
				for _, x := range a2CheckExtents(t, o, int64(tc.bs), dev.Size(), "after Sync") {
					if x.State != engine.Written {
						t.Errorf("after Sync: %+v", x)
					}
				}
			}
		})
	}
}

// TestAdv2OldHandleAfterRecreate: a handle of a removed object stays dead
// after the name is created again: it answers fs.ErrNotExist and its calls
// never reach the new object.
func TestAdv2OldHandleAfterRecreate(t *testing.T) {
	_, e := a2MemEngine(t, 32*a2MiB, engine.Options{CacheSize: 2 * a2MiB})
	defer e.Close()
	old := a2Create(t, e, "n")
	bbWrite(t, old, bytes.Repeat([]byte{0x11}, 20_000), 0)
	bbMust(t, e.Sync(), "Sync")
	bbMust(t, e.Remove("n"), "Remove")
	nw := a2Create(t, e, "n")
	bbWrite(t, nw, []byte("fresh"), 0)
	if _, err := old.WriteAt([]byte("stale"), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle WriteAt = %v", err)
	}
	if _, err := old.WriteAt(nil, 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle empty WriteAt = %v", err)
	}
	if _, err := old.ReadAt(make([]byte, 5), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle ReadAt = %v", err)
	}
	if _, err := old.ReadAt(nil, 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle empty ReadAt = %v", err)
	}
	if err := old.Truncate(100); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle Truncate = %v", err)
	}
	if err := old.PunchHole(0, 100); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle PunchHole = %v", err)
	}
	if err := old.Sync(); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle Sync = %v", err)
	}
	if _, err := old.WriteFrom(bytes.NewReader([]byte("abc")), 0, 3); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle WriteFrom = %v", err)
	}
	if err := e.Remove("n"); err != nil {
		t.Fatalf("Remove of the new object: %v", err)
	}
	if err := e.Remove("n"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("second Remove = %v", err)
	}
	nw2 := a2Create(t, e, "n")
	if got := bbReadAll(t, nw2); len(got) != 0 {
		t.Errorf("third incarnation not empty: %q", got)
	}
	a2Check(t, nw2, nil, "third")
}

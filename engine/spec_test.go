package engine_test

// Black-box tests of the public API against the promises, written
// from the specification alone (names, semantics, error sentinels) by a
// reviewer who had not read the implementation: the edge cases an
// outside test suite would probe.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rawblock/rawblock/engine"
)

const (
	bbMiB   = 1 << 20
	bbBlock = 4096
)

var bbOpts = engine.Options{CacheSize: 16 * bbMiB}

func bbNewDev(t *testing.T, size int64) engine.Device {
	t.Helper()
	dev := engine.NewMemDevice(size, 512)
	if err := engine.Format(dev, engine.FormatOptions{}); err != nil {
		t.Fatalf("Format(%d): %v", size, err)
	}
	return dev
}

func bbOpen(t *testing.T, dev engine.Device) *engine.Engine {
	t.Helper()
	e, err := engine.Open(dev, bbOpts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return e
}

func bbReopen(t *testing.T, e *engine.Engine, dev engine.Device) *engine.Engine {
	t.Helper()
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return bbOpen(t, dev)
}

func bbSetup(t *testing.T, size int64) (engine.Device, *engine.Engine) {
	t.Helper()
	dev := bbNewDev(t, size)
	return dev, bbOpen(t, dev)
}

func bbMust(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func bbPattern(seed int64, n int) []byte {
	p := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(p)
	return p
}

func bbWrite(t *testing.T, o *engine.Object, p []byte, off int64) {
	t.Helper()
	n, err := o.WriteAt(p, off)
	if err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes @%d) = %d, %v", len(p), off, n, err)
	}
}

// bbReadAll reads the whole object (by Size) and returns it.
func bbReadAll(t *testing.T, o *engine.Object) []byte {
	t.Helper()
	sz := o.Size()
	buf := make([]byte, sz)
	if sz == 0 {
		return buf
	}
	n, err := o.ReadAt(buf, 0)
	if n != int(sz) || (err != nil && err != io.EOF) {
		t.Fatalf("ReadAt(all %d) = %d, %v", sz, n, err)
	}
	return buf
}

func bbCheckRange(t *testing.T, o *engine.Object, off int64, want []byte, what string) {
	t.Helper()
	got := make([]byte, len(want))
	n, err := o.ReadAt(got, off)
	if n != len(want) || (err != nil && err != io.EOF) {
		t.Fatalf("%s: ReadAt(%d @%d) = %d, %v", what, len(want), off, n, err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: data mismatch at byte %d (abs %d): got %#x want %#x", what, i, off+int64(i), got[i], want[i])
	}
}

func bbZeros(n int) []byte { return make([]byte, n) }

// ---------------------------------------------------------------- names

func TestSpecNameValidation(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	bad := []string{"", strings.Repeat("x", 256), "a\x00b", "\x00", strings.Repeat("y", 1000)}
	for _, n := range bad {
		if _, err := e.Create(n); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Create(%q...len %d) err = %v, want fs.ErrInvalid", trunc(n), len(n), err)
		}
		if _, err := e.Object(n); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Object(len %d) err = %v, want fs.ErrInvalid", len(n), err)
		}
		if err := e.Remove(n); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Remove(len %d) err = %v, want fs.ErrInvalid", len(n), err)
		}
	}
	if got := e.Objects(); len(got) != 0 {
		t.Errorf("Objects after bad creates = %q", got)
	}
	ok := []string{"a", strings.Repeat("z", 255), "with space/and\xff\x01bytes", "\xff"}
	for _, n := range ok {
		o, err := e.Create(n)
		if err != nil {
			t.Fatalf("Create(len %d): %v", len(n), err)
		}
		if o.Name() != n {
			t.Errorf("Name() = %q want %q", o.Name(), n)
		}
	}
}

func trunc(s string) string {
	if len(s) > 10 {
		return s[:10]
	}
	return s
}

func TestSpecCreateExistRemoveNotExist(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	if _, err := e.Object("nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Object(absent) = %v, want ErrNotExist", err)
	}
	if err := e.Remove("nope"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Remove(absent) = %v, want ErrNotExist", err)
	}
	o, err := e.Create("x")
	bbMust(t, err, "Create")
	bbWrite(t, o, []byte("data"), 0)
	if o2, err := e.Create("x"); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Create(existing) = %v, %v; want fs.ErrExist", o2, err)
	}
	// the existing object is untouched
	bbCheckRange(t, o, 0, []byte("data"), "after failed Create")
	o3, err := e.Object("x")
	bbMust(t, err, "Object")
	if o3.Size() != 4 {
		t.Errorf("Size via second handle = %d", o3.Size())
	}
	// also after Sync + reopen
	bbMust(t, e.Sync(), "Sync")
	if _, err := e.Create("x"); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Create(existing after sync) = %v", err)
	}
}

// ---------------------------------------------------------------- bad args

func TestSpecNegativeOffsets(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	o, err := e.Create("o")
	bbMust(t, err, "Create")
	data := bbPattern(1, 10000)
	bbWrite(t, o, data, 0)
	check := func(what string) {
		t.Helper()
		if o.Size() != 10000 {
			t.Errorf("%s: size changed to %d", what, o.Size())
		}
		bbCheckRange(t, o, 0, data, what)
	}
	buf := make([]byte, 10)
	if n, err := o.ReadAt(buf, -1); n != 0 || !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("ReadAt(-1) = %d, %v; want 0, ErrInvalid", n, err)
	}
	if n, err := o.WriteAt(buf, -1); n != 0 || !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("WriteAt(-1) = %d, %v; want 0, ErrInvalid", n, err)
	}
	check("WriteAt(-1)")
	if n, err := o.WriteAt(buf, math.MinInt64); n != 0 || !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("WriteAt(MinInt64) = %d, %v", n, err)
	}
	if err := o.Truncate(-1); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("Truncate(-1) = %v", err)
	}
	check("Truncate(-1)")
	if err := o.PunchHole(-1, 100); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("PunchHole(-1,100) = %v", err)
	}
	check("PunchHole(-1,100)")
	if err := o.PunchHole(100, -1); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("PunchHole(100,-1) = %v", err)
	}
	check("PunchHole(100,-1)")
	if err := o.PunchHole(-4096, 8192); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("PunchHole(-4096,8192) = %v", err)
	}
	check("PunchHole(-4096,8192)")
	bbMust(t, o.Sync(), "Sync")
	check("after sync")
}

func TestSpecMaxObjectSize(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	o, err := e.Create("o")
	bbMust(t, err, "Create")
	max := engine.MaxObjectSize
	p := []byte("xyz")
	// past the max
	for _, off := range []int64{max, max - 2, max + 1, math.MaxInt64 - 1, math.MaxInt64} {
		n, err := o.WriteAt(p, off)
		if n != 0 || !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("WriteAt(3 @%d) = %d, %v; want 0, ErrInvalid", off, n, err)
		}
		if o.Size() != 0 {
			t.Fatalf("size changed: %d", o.Size())
		}
	}
	for _, sz := range []int64{max + 1, math.MaxInt64} {
		if err := o.Truncate(sz); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Truncate(%d) = %v; want ErrInvalid", sz, err)
		}
	}
	for _, r := range [][2]int64{{max - 1, 2}, {math.MaxInt64 - 1, 10}, {0, math.MaxInt64}, {max + 1, 1}} {
		if err := o.PunchHole(r[0], r[1]); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("PunchHole(%d,%d) = %v; want ErrInvalid", r[0], r[1], err)
		}
	}
	if o.Size() != 0 {
		t.Fatalf("size changed: %d", o.Size())
	}
	// exactly at the max is fine
	n, err := o.WriteAt(p, max-3)
	if n != 3 || err != nil {
		t.Fatalf("WriteAt(3 @max-3) = %d, %v", n, err)
	}
	if o.Size() != max {
		t.Fatalf("size = %d want %d", o.Size(), max)
	}
	bbCheckRange(t, o, max-3, p, "at max")
	bbCheckRange(t, o, max-4096-3, bbZeros(4096), "hole before max")
	buf := make([]byte, 10)
	if n, err := o.ReadAt(buf, max); n != 0 || err != io.EOF {
		t.Errorf("ReadAt(@max) = %d, %v; want 0, EOF", n, err)
	}
	// ReadAt far past max: some error, no panic
	if n, err := o.ReadAt(buf, math.MaxInt64-2); n != 0 || err == nil {
		t.Errorf("ReadAt(@MaxInt64-2) = %d, %v; want 0, error", n, err)
	}
	bbMust(t, o.Truncate(max), "Truncate(max)")
	bbMust(t, o.Truncate(5), "Truncate(5)")
	bbMust(t, o.Sync(), "Sync")
}

// ---------------------------------------------------------------- ReadAt

func TestSpecReadAtEOF(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	o, err := e.Create("o")
	bbMust(t, err, "Create")
	buf := make([]byte, 100)
	// empty object
	if n, err := o.ReadAt(buf, 0); n != 0 || err != io.EOF {
		t.Errorf("empty: ReadAt(100@0) = %d, %v; want 0, EOF", n, err)
	}
	if n, err := o.ReadAt(buf, 5000); n != 0 || err != io.EOF {
		t.Errorf("empty: ReadAt(100@5000) = %d, %v; want 0, EOF", n, err)
	}
	const size = 10000
	data := bbPattern(2, size)
	bbWrite(t, o, data, 0)
	run := func(stage string) {
		t.Run(stage, func(t *testing.T) {
			// at EOF
			if n, err := o.ReadAt(buf, size); n != 0 || err != io.EOF {
				t.Errorf("ReadAt(100@size) = %d, %v; want 0, EOF", n, err)
			}
			// past EOF
			for _, off := range []int64{size + 1, size + 4096, 1 << 40} {
				if n, err := o.ReadAt(buf, off); n != 0 || err != io.EOF {
					t.Errorf("ReadAt(100@%d) = %d, %v; want 0, EOF", off, n, err)
				}
			}
			// across EOF
			for _, off := range []int64{size - 50, size - 1, size - 99} {
				for i := range buf {
					buf[i] = 0xEE
				}
				n, err := o.ReadAt(buf, off)
				want := int(size - off)
				if n != want || err != io.EOF {
					t.Errorf("ReadAt(100@%d) = %d, %v; want %d, EOF", off, n, err, want)
				}
				if n > 0 && !bytes.Equal(buf[:want], data[off:]) {
					t.Errorf("ReadAt(100@%d): wrong data", off)
				}
			}
			// ending exactly at EOF
			n, err := o.ReadAt(buf, size-100)
			if n != 100 || (err != nil && err != io.EOF) {
				t.Errorf("ReadAt(100@size-100) = %d, %v; want 100, nil|EOF", n, err)
			}
			if !bytes.Equal(buf, data[size-100:]) {
				t.Errorf("ReadAt ending at EOF: wrong data")
			}
			// inside
			n, err = o.ReadAt(buf, 4090)
			if n != 100 || err != nil {
				t.Errorf("ReadAt(100@4090) = %d, %v; want 100, nil", n, err)
			}
			if !bytes.Equal(buf, data[4090:4190]) {
				t.Errorf("ReadAt inside: wrong data")
			}
			// zero-length read inside: 0, nil
			if n, err := o.ReadAt(nil, 10); n != 0 || err != nil {
				t.Errorf("ReadAt(0@10) = %d, %v; want 0, nil", n, err)
			}
			// big read across EOF
			big := make([]byte, 1<<20)
			n, err = o.ReadAt(big, 0)
			if n != size || err != io.EOF {
				t.Errorf("ReadAt(1MiB@0) = %d, %v; want %d, EOF", n, err, size)
			}
			if !bytes.Equal(big[:size], data) {
				t.Errorf("ReadAt(1MiB@0): wrong data")
			}
			// io.SectionReader / io.ReadAll over it
			all, err := io.ReadAll(io.NewSectionReader(o, 0, 1<<30))
			if err != nil || !bytes.Equal(all, data) {
				t.Errorf("io.ReadAll(SectionReader) = %d bytes, %v", len(all), err)
			}
		})
	}
	run("dirty")
	bbMust(t, o.Sync(), "Sync")
	run("synced")
	e = bbReopen(t, e, dev)
	o, err = e.Object("o")
	bbMust(t, err, "Object")
	run("reopened")
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- sparse

func TestSpecSparseHugeOffset(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	st0 := e.Stats()
	o, err := e.Create("sparse")
	bbMust(t, err, "Create")
	const off = int64(1) << 40
	bbWrite(t, o, []byte("hello"), off)
	if o.Size() != off+5 {
		t.Fatalf("Size = %d want %d", o.Size(), off+5)
	}
	// second write inside a different unaligned spot
	bbWrite(t, o, []byte("mid"), 123456789)
	check := func(stage string) {
		bbCheckRange(t, o, 0, bbZeros(8192), stage+": start")
		bbCheckRange(t, o, off-8192, bbZeros(8192), stage+": before")
		want := append(bbZeros(4091), []byte("hello")...)
		bbCheckRange(t, o, off-4091, want, stage+": tail")
		bbCheckRange(t, o, 123456789-10, append(append(bbZeros(10), "mid"...), bbZeros(10)...), stage+": mid")
		bbCheckRange(t, o, off/2, bbZeros(100000), stage+": middle hole")
		if o.Size() != off+5 {
			t.Fatalf("%s: Size = %d", stage, o.Size())
		}
	}
	check("dirty")
	bbMust(t, o.Sync(), "Sync")
	check("synced")
	st := e.Stats()
	if used := (st0.FreeBytes - st0.ReservedBytes) - (st.FreeBytes - st.ReservedBytes); used > 1*bbMiB {
		t.Errorf("sparse object uses %d bytes of space", used)
	}
	e = bbReopen(t, e, dev)
	o, err = e.Object("sparse")
	bbMust(t, err, "Object")
	check("reopened")
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- truncate

func TestSpecTruncateShrinkExtend(t *testing.T) {
	type stage int
	const (
		none stage = iota
		syncBeforeShrink
		syncAfterShrink
		reopenBeforeShrink
		reopenAfterShrink
	)
	names := []string{"nosync", "syncBeforeShrink", "syncAfterShrink", "reopenBeforeShrink", "reopenAfterShrink"}
	for _, extendByWrite := range []bool{false, true} {
		for s := none; s <= reopenAfterShrink; s++ {
			for _, shrinkTo := range []int64{5000, 4096, 1, 0, 12289} {
				name := fmt.Sprintf("%s/shrink%d/write=%v", names[s], shrinkTo, extendByWrite)
				t.Run(name, func(t *testing.T) {
					dev, e := bbSetup(t, 32*bbMiB)
					o, err := e.Create("t")
					bbMust(t, err, "Create")
					full := bytes.Repeat([]byte{0xAB}, 3*bbBlock+123)
					bbWrite(t, o, full, 0)
					if s == syncBeforeShrink {
						bbMust(t, o.Sync(), "Sync")
					}
					if s == reopenBeforeShrink {
						e = bbReopen(t, e, dev)
						o, err = e.Object("t")
						bbMust(t, err, "Object")
					}
					bbMust(t, o.Truncate(shrinkTo), "Truncate shrink")
					if o.Size() != shrinkTo {
						t.Fatalf("Size after shrink = %d", o.Size())
					}
					if s == syncAfterShrink {
						bbMust(t, o.Sync(), "Sync")
					}
					if s == reopenAfterShrink {
						e = bbReopen(t, e, dev)
						o, err = e.Object("t")
						bbMust(t, err, "Object")
						if o.Size() != shrinkTo {
							t.Fatalf("Size after reopen = %d", o.Size())
						}
					}
					const newSize = 20000
					if extendByWrite {
						bbWrite(t, o, []byte{0x11}, newSize-1)
					} else {
						bbMust(t, o.Truncate(newSize), "Truncate extend")
					}
					if o.Size() != newSize {
						t.Fatalf("Size after extend = %d", o.Size())
					}
					want := make([]byte, newSize)
					copy(want, full[:shrinkTo])
					if extendByWrite {
						want[newSize-1] = 0x11
					}
					if got := bbReadAll(t, o); !bytes.Equal(got, want) {
						t.Fatalf("after extend: %s", bbDiff(got, want))
					}
					bbMust(t, o.Sync(), "Sync")
					if got := bbReadAll(t, o); !bytes.Equal(got, want) {
						t.Fatalf("after sync: %s", bbDiff(got, want))
					}
					e = bbReopen(t, e, dev)
					o, err = e.Object("t")
					bbMust(t, err, "Object")
					if got := bbReadAll(t, o); !bytes.Equal(got, want) {
						t.Fatalf("after reopen: %s", bbDiff(got, want))
					}
					bbMust(t, e.Close(), "Close")
				})
			}
		}
	}
}

func bbDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("len %d want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			j := i
			for j < len(got) && got[j] != want[j] {
				j++
			}
			return fmt.Sprintf("first diff at %d (got %#x want %#x), differing run to %d", i, got[i], want[i], j)
		}
	}
	return "equal"
}

func TestSpecTruncateFreesSpace(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	avail := func() int64 { s := e.Stats(); return s.FreeBytes - s.ReservedBytes }
	a0 := avail()
	o, err := e.Create("t")
	bbMust(t, err, "Create")
	bbWrite(t, o, bbPattern(3, 4*bbMiB), 0)
	a1 := avail()
	if a0-a1 < 4*bbMiB {
		t.Errorf("after 4 MiB write, available dropped only %d", a0-a1)
	}
	bbMust(t, e.Sync(), "Sync")
	bbMust(t, o.Truncate(1000), "Truncate")
	bbMust(t, e.Sync(), "Sync")
	a2 := avail()
	if a0-a2 > 64<<10 {
		t.Errorf("after truncate to 1000 + Sync, available %d, initial %d (diff %d)", a2, a0, a0-a2)
	}
	bbMust(t, o.Truncate(0), "Truncate0")
	bbMust(t, e.Sync(), "Sync")
	if a := avail(); a != a0 {
		t.Errorf("after truncate to 0 + Sync, available %d, want initial %d", a, a0)
	}
	e = bbReopen(t, e, dev)
	if a := avail(); a != a0 {
		t.Errorf("after reopen, available %d, want initial %d", a, a0)
	}
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- punch

func TestSpecPunchHole(t *testing.T) {
	for _, mode := range []string{"dirty", "synced", "reopened"} {
		t.Run(mode, func(t *testing.T) {
			dev, e := bbSetup(t, 32*bbMiB)
			o, err := e.Create("p")
			bbMust(t, err, "Create")
			const size = 5*bbBlock + 100
			data := bytes.Repeat([]byte{0xCD}, size)
			bbWrite(t, o, data, 0)
			if mode != "dirty" {
				bbMust(t, o.Sync(), "Sync")
			}
			if mode == "reopened" {
				e = bbReopen(t, e, dev)
				o, err = e.Object("p")
				bbMust(t, err, "Object")
			}
			want := bytes.Clone(data)
			punch := func(off, l int64) {
				t.Helper()
				bbMust(t, o.PunchHole(off, l), fmt.Sprintf("PunchHole(%d,%d)", off, l))
				end := min(off+l, int64(len(want)))
				for i := off; i < end; i++ {
					want[i] = 0
				}
				if o.Size() != size {
					t.Fatalf("PunchHole(%d,%d) changed size to %d", off, l, o.Size())
				}
				if got := bbReadAll(t, o); !bytes.Equal(got, want) {
					t.Fatalf("after PunchHole(%d,%d): %s", off, l, bbDiff(got, want))
				}
			}
			punch(1000, 9000)          // unaligned both edges, spans a whole block
			punch(4096*3+5, 10)        // inside one block
			punch(0, 0)                // no-op
			punch(size-10, 100000)     // past EOF: must not grow
			punch(size+1000, 4096)     // wholly past EOF
			punch(4096*4, 4096)        // exactly aligned block
			punch(size, math.MaxInt32) // at EOF
			bbMust(t, o.Sync(), "Sync")
			if got := bbReadAll(t, o); !bytes.Equal(got, want) {
				t.Fatalf("after sync: %s", bbDiff(got, want))
			}
			e = bbReopen(t, e, dev)
			o, err = e.Object("p")
			bbMust(t, err, "Object")
			if o.Size() != size {
				t.Fatalf("size after reopen %d", o.Size())
			}
			if got := bbReadAll(t, o); !bytes.Equal(got, want) {
				t.Fatalf("after reopen: %s", bbDiff(got, want))
			}
			// write again into the hole, then read
			bbWrite(t, o, []byte("again"), 5000)
			copy(want[5000:], "again")
			if got := bbReadAll(t, o); !bytes.Equal(got, want) {
				t.Fatalf("after rewrite: %s", bbDiff(got, want))
			}
			bbMust(t, e.Close(), "Close")
		})
	}
}

func TestSpecPunchHoleFreesSpace(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	avail := func() int64 { s := e.Stats(); return s.FreeBytes - s.ReservedBytes }
	o, err := e.Create("p")
	bbMust(t, err, "Create")
	bbWrite(t, o, bbPattern(4, 2*bbMiB), 0)
	bbMust(t, e.Sync(), "Sync")
	a1 := avail()
	bbMust(t, o.PunchHole(100, bbMiB), "PunchHole")
	bbMust(t, e.Sync(), "Sync")
	a2 := avail()
	if got := a2 - a1; got < bbMiB-2*bbBlock {
		t.Errorf("punching 1 MiB freed only %d bytes", got)
	}
	if o.Size() != 2*bbMiB {
		t.Errorf("size %d", o.Size())
	}
}

// ---------------------------------------------------------------- ENOSPC

func TestSpecNoSpace(t *testing.T) {
	for _, chunk := range []int{256 << 10, 1 << 20, 4096, 3 << 20} {
		for _, syncEach := range []bool{false, true} {
			t.Run(fmt.Sprintf("chunk%d/sync=%v", chunk, syncEach), func(t *testing.T) {
				bbNoSpace(t, chunk, syncEach)
			})
		}
	}
}

func bbNoSpace(t *testing.T, chunk int, syncEach bool) {
	dev, e := bbSetup(t, 16*bbMiB)
	st := e.Stats()
	o, err := e.Create("fill")
	bbMust(t, err, "Create")
	var acked []byte
	var off int64
	hit := false
	limit := int(2*st.TotalBytes/int64(chunk)) + 10
	for i := 0; i < limit; i++ {
		p := bbPattern(int64(i), chunk)
		before := o.Size()
		s0 := e.Stats()
		n, err := o.WriteAt(p, off)
		if err != nil {
			if !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("write %d: unexpected err %v", i, err)
			}
			if n != 0 {
				t.Errorf("ErrNoSpace with n=%d (want 0)", n)
			}
			if o.Size() != before {
				t.Errorf("ErrNoSpace changed size %d -> %d", before, o.Size())
			}
			s1 := e.Stats()
			if avail := s1.FreeBytes - s1.ReservedBytes; avail >= int64(chunk) {
				t.Errorf("ErrNoSpace but FreeBytes-ReservedBytes = %d >= chunk %d (before: free %d reserved %d)", avail, chunk, s0.FreeBytes, s0.ReservedBytes)
			}
			hit = true
			break
		}
		if n != chunk {
			t.Fatalf("short write %d", n)
		}
		acked = append(acked, p...)
		off += int64(n)
		if syncEach {
			if err := o.Sync(); err != nil {
				t.Fatalf("Sync after write %d: %v", i, err)
			}
		}
	}
	if !hit {
		t.Fatalf("never hit ErrNoSpace (wrote %d bytes, total %d)", off, st.TotalBytes)
	}
	if off < st.TotalBytes/2 {
		t.Errorf("ErrNoSpace after only %d of %d bytes", off, st.TotalBytes)
	}
	t.Logf("wrote %d of TotalBytes %d before ErrNoSpace", off, st.TotalBytes)
	// data read back before sync
	if got := bbReadAll(t, o); !bytes.Equal(got, acked) {
		t.Fatalf("before sync: %s", bbDiff(got, acked))
	}
	// A second write of 1 byte past the end into a fresh block must also fail cleanly or succeed.
	if n, err := o.WriteAt([]byte{1}, off+int64(64<<20)); err != nil && (n != 0 || !errors.Is(err, engine.ErrNoSpace)) {
		t.Errorf("tiny far write: %d, %v", n, err)
	} else if err == nil {
		// keep the model in sync: truncate back
		bbMust(t, o.Truncate(off), "Truncate back")
	}
	// overwrite of existing data needs no new space
	if n, err := o.WriteAt(bytes.Repeat([]byte{7}, 100), 10); n != 100 || err != nil {
		t.Errorf("overwrite after ENOSPC = %d, %v", n, err)
	} else {
		copy(acked[10:], bytes.Repeat([]byte{7}, 100))
	}
	if err := o.Sync(); err != nil {
		t.Fatalf("Object.Sync after ENOSPC: %v", err)
	}
	if err := e.Sync(); err != nil {
		t.Fatalf("Engine.Sync after ENOSPC: %v", err)
	}
	if got := bbReadAll(t, o); !bytes.Equal(got, acked) {
		t.Fatalf("after sync: %s", bbDiff(got, acked))
	}
	e = bbReopen(t, e, dev)
	o, err = e.Object("fill")
	bbMust(t, err, "Object")
	if o.Size() != int64(len(acked)) {
		t.Fatalf("size after reopen %d want %d", o.Size(), len(acked))
	}
	if got := bbReadAll(t, o); !bytes.Equal(got, acked) {
		t.Fatalf("after reopen: %s", bbDiff(got, acked))
	}
	// Remove + Sync gives the space back
	bbMust(t, e.Remove("fill"), "Remove")
	bbMust(t, e.Sync(), "Sync")
	s2 := e.Stats()
	if s2.FreeBytes-s2.ReservedBytes != st.FreeBytes-st.ReservedBytes {
		t.Errorf("after Remove+Sync available %d, initially %d", s2.FreeBytes-s2.ReservedBytes, st.FreeBytes-st.ReservedBytes)
	}
	o2, err := e.Create("again")
	bbMust(t, err, "Create again")
	big := bbPattern(99, int(off))
	bbWrite(t, o2, big, 0)
	bbMust(t, e.Close(), "Close")
}

// Many objects filling the device concurrently; every acknowledged write
// reads back after reopen.
func TestSpecNoSpaceConcurrent(t *testing.T) {
	dev, e := bbSetup(t, 16*bbMiB)
	const workers = 4
	var wg sync.WaitGroup
	acked := make([][]byte, workers)
	errs := make([]error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			o, err := e.Create(fmt.Sprintf("w%d", w))
			if err != nil {
				errs[w] = err
				return
			}
			for i := 0; ; i++ {
				p := bbPattern(int64(w*1000+i), 64<<10+w*512)
				before := o.Size()
				n, err := o.WriteAt(p, int64(len(acked[w])))
				if err != nil {
					if !errors.Is(err, engine.ErrNoSpace) || n != 0 || o.Size() != before {
						errs[w] = fmt.Errorf("write: n=%d err=%v size %d->%d", n, err, before, o.Size())
					}
					return
				}
				acked[w] = append(acked[w], p...)
				if i%7 == 0 {
					if err := o.Sync(); err != nil {
						errs[w] = fmt.Errorf("sync: %w", err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	for w, err := range errs {
		if err != nil {
			t.Errorf("worker %d: %v", w, err)
		}
	}
	bbMust(t, e.Sync(), "Sync")
	e = bbReopen(t, e, dev)
	for w := 0; w < workers; w++ {
		o, err := e.Object(fmt.Sprintf("w%d", w))
		bbMust(t, err, "Object")
		if got := bbReadAll(t, o); !bytes.Equal(got, acked[w]) {
			t.Errorf("worker %d after reopen: %s", w, bbDiff(got, acked[w]))
		}
	}
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- remove

func TestSpecRemoveHandle(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	o, err := e.Create("r")
	bbMust(t, err, "Create")
	bbWrite(t, o, bbPattern(5, 50000), 0)
	other, err := e.Object("r")
	bbMust(t, err, "Object")
	bbMust(t, e.Remove("r"), "Remove")
	buf := make([]byte, 10)
	for _, h := range []*engine.Object{o, other} {
		if n, err := h.ReadAt(buf, 0); n != 0 || !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("ReadAt after Remove = %d, %v", n, err)
		}
		if n, err := h.WriteAt(buf, 0); n != 0 || !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("WriteAt after Remove = %d, %v", n, err)
		}
		if err := h.Truncate(5); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Truncate after Remove = %v", err)
		}
		if err := h.PunchHole(0, 5); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("PunchHole after Remove = %v", err)
		}
		if err := h.Sync(); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("Sync after Remove = %v", err)
		}
		_ = h.Size()
		_ = h.Extents()
		if h.Name() != "r" {
			t.Errorf("Name after remove = %q", h.Name())
		}
	}
	if _, err := e.Object("r"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Object after Remove = %v", err)
	}
	if err := e.Remove("r"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("second Remove = %v", err)
	}
	if slices.Contains(e.Objects(), "r") {
		t.Errorf("Objects still lists r")
	}
	// recreate: fresh, empty; old handle still dead
	n, err := e.Create("r")
	bbMust(t, err, "Create again")
	if n.Size() != 0 {
		t.Errorf("recreated size %d", n.Size())
	}
	if k, err := n.ReadAt(buf, 0); k != 0 || err != io.EOF {
		t.Errorf("recreated ReadAt = %d, %v", k, err)
	}
	if _, err := o.WriteAt(buf, 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle WriteAt after recreate = %v", err)
	}
	if n.Size() != 0 {
		t.Errorf("old handle write changed new object: size %d", n.Size())
	}
	bbMust(t, e.Sync(), "Sync")
}

func TestSpecRemovePersistsAndFrees(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	avail := func() int64 { s := e.Stats(); return s.FreeBytes - s.ReservedBytes }
	a0 := avail()
	o, err := e.Create("a")
	bbMust(t, err, "Create")
	bbWrite(t, o, bbPattern(6, 3*bbMiB+7), 0)
	bbMust(t, e.Sync(), "Sync")
	e = bbReopen(t, e, dev)
	bbMust(t, e.Remove("a"), "Remove")
	bbMust(t, e.Sync(), "Sync")
	if a := avail(); a != a0 {
		t.Errorf("after Remove+Sync available %d want %d", a, a0)
	}
	e = bbReopen(t, e, dev)
	if _, err := e.Object("a"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("removed object back after reopen: %v", err)
	}
	if a := avail(); a != a0 {
		t.Errorf("after reopen available %d want %d", a, a0)
	}
	// Remove of a dirty (never synced) object frees its reservation.
	o, err = e.Create("b")
	bbMust(t, err, "Create")
	bbWrite(t, o, bbPattern(7, 2*bbMiB), 0)
	bbMust(t, e.Remove("b"), "Remove dirty")
	bbMust(t, e.Sync(), "Sync")
	if a := avail(); a != a0 {
		t.Errorf("after Remove(dirty)+Sync available %d want %d", a, a0)
	}
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- closed

func TestSpecClosed(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	o, err := e.Create("c")
	bbMust(t, err, "Create")
	bbWrite(t, o, []byte("persist me"), 3)
	bbMust(t, e.Close(), "Close")
	buf := make([]byte, 4)
	if _, err := e.Create("d"); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Create = %v", err)
	}
	if _, err := e.Create(""); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Create(\"\") after Close = %v; want ErrClosed", err)
	}
	if _, err := e.Object("c"); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Object = %v", err)
	}
	if err := e.Remove("c"); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Remove = %v", err)
	}
	if err := e.Sync(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Sync = %v", err)
	}
	if err := e.Close(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("second Close = %v", err)
	}
	_ = e.Objects()
	_ = e.Stats()
	if n, err := o.ReadAt(buf, 0); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("ReadAt = %d, %v", n, err)
	}
	if n, err := o.ReadAt(buf, 1000); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("ReadAt past EOF = %d, %v", n, err)
	}
	if n, err := o.WriteAt(buf, 0); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("WriteAt = %d, %v", n, err)
	}
	if err := o.Truncate(0); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Truncate = %v", err)
	}
	if err := o.PunchHole(0, 1); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("PunchHole = %v", err)
	}
	if err := o.Sync(); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("Object.Sync = %v", err)
	}
	_ = o.Size()
	_ = o.Extents()
	_ = o.Name()
	// dev left open; reopen works
	if _, err := dev.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("device closed by Engine.Close: %v", err)
	}
	e2 := bbOpen(t, dev)
	o2, err := e2.Object("c")
	bbMust(t, err, "Object after reopen")
	bbCheckRange(t, o2, 0, append([]byte{0, 0, 0}, "persist me"...), "reopen")
	// old handle stays closed even though a new engine is open on dev
	if _, err := o.ReadAt(buf, 0); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("old handle ReadAt after reopen = %v", err)
	}
	bbMust(t, e2.Close(), "Close")
}

// Close while writers are active: no panic, calls return nil or ErrClosed.
func TestSpecCloseConcurrent(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	var wg sync.WaitGroup
	objs := make([]*engine.Object, 4)
	for i := range objs {
		o, err := e.Create(fmt.Sprintf("o%d", i))
		bbMust(t, err, "Create")
		objs[i] = o
	}
	stop := make(chan struct{})
	var mu sync.Mutex
	var bad []error
	for i, o := range objs {
		wg.Add(1)
		go func(i int, o *engine.Object) {
			defer wg.Done()
			p := bbPattern(int64(i), 8192)
			buf := make([]byte, 8192)
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				_, err := o.WriteAt(p, int64(k%64)*8192)
				if err == nil {
					_, err = o.ReadAt(buf, int64(k%64)*4096)
					if err == io.EOF {
						err = nil
					}
				}
				if err == nil && k%10 == 0 {
					err = o.Sync()
				}
				if err != nil {
					if !errors.Is(err, engine.ErrClosed) {
						mu.Lock()
						bad = append(bad, err)
						mu.Unlock()
					}
					return
				}
			}
		}(i, o)
	}
	time.Sleep(50 * time.Millisecond)
	if err := e.Close(); err != nil {
		t.Errorf("Close under load: %v", err)
	}
	close(stop)
	wg.Wait()
	for _, err := range bad {
		t.Errorf("concurrent call during Close: %v", err)
	}
	e = bbOpen(t, dev)
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- read-only

func TestSpecReadOnly(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	o, err := e.Create("ro")
	bbMust(t, err, "Create")
	data := bbPattern(8, 12345)
	bbWrite(t, o, data, 0)
	bbMust(t, e.Close(), "Close")
	r, err := engine.Open(dev, engine.Options{ReadOnly: true, CacheSize: 8 * bbMiB})
	bbMust(t, err, "Open RO")
	o, err = r.Object("ro")
	bbMust(t, err, "Object")
	bbCheckRange(t, o, 0, data, "ro read")
	if n, err := o.WriteAt([]byte("x"), 0); n != 0 || !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("WriteAt = %d, %v; want ErrReadOnly", n, err)
	}
	if err := o.Truncate(5); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Truncate = %v", err)
	}
	if err := o.PunchHole(0, 4096); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("PunchHole = %v", err)
	}
	if _, err := r.Create("new"); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Create = %v", err)
	}
	if err := r.Remove("ro"); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Remove = %v", err)
	}
	if err := o.Sync(); err != nil && !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Object.Sync = %v", err)
	}
	if err := r.Sync(); err != nil && !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Engine.Sync = %v", err)
	}
	if o.Size() != int64(len(data)) {
		t.Errorf("size changed %d", o.Size())
	}
	bbCheckRange(t, o, 0, data, "ro read after rejected writes")
	if got := r.Objects(); !slices.Equal(got, []string{"ro"}) {
		t.Errorf("Objects = %q", got)
	}
	bbMust(t, r.Close(), "Close RO")
	// a read-only open of an unformatted device fails
	if _, err := engine.Open(engine.NewMemDevice(16*bbMiB, 4096), engine.Options{ReadOnly: true}); err == nil {
		t.Errorf("read-only Open of blank device succeeded")
	}
	e = bbOpen(t, dev)
	o, err = e.Object("ro")
	bbMust(t, err, "Object")
	bbCheckRange(t, o, 0, data, "rw after ro")
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- corruption

func bbOpenNoPanic(t *testing.T, dev engine.Device) (e *engine.Engine, err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("Open panicked: %v", r)
		}
	}()
	return engine.Open(dev, bbOpts)
}

func bbScribble(t *testing.T, dev engine.Device, off int64, n int, seed int64) {
	t.Helper()
	p := bbPattern(seed, n)
	if _, err := dev.WriteAt(p, off); err != nil {
		t.Fatalf("scribble: %v", err)
	}
}

func TestSpecOpenGarbage(t *testing.T) {
	t.Run("zeros", func(t *testing.T) {
		dev := engine.NewMemDevice(32*bbMiB, 4096)
		e, err := bbOpenNoPanic(t, dev)
		if err == nil {
			e.Close()
			t.Fatalf("Open of zeroed device succeeded")
		}
		if !errors.Is(err, engine.ErrCorrupt) {
			t.Errorf("zeros: %v does not wrap ErrCorrupt", err)
		}
	})
	t.Run("random", func(t *testing.T) {
		dev := engine.NewMemDevice(16*bbMiB, 4096)
		bbScribble(t, dev, 0, 16*bbMiB, 42)
		e, err := bbOpenNoPanic(t, dev)
		if err == nil {
			e.Close()
			t.Fatalf("Open of random device succeeded")
		}
		if !errors.Is(err, engine.ErrCorrupt) {
			t.Errorf("random: %v does not wrap ErrCorrupt", err)
		}
	})
	t.Run("tooSmall", func(t *testing.T) {
		dev := engine.NewMemDevice(8192, 4096)
		e, err := bbOpenNoPanic(t, dev)
		if err == nil {
			e.Close()
			t.Fatalf("Open of 8 KiB device succeeded")
		}
	})
}

// bbFormattedWithData makes a formatted device holding some objects, closed.
func bbFormattedWithData(t *testing.T) (engine.Device, map[string][]byte) {
	t.Helper()
	dev, e := bbSetup(t, 32*bbMiB)
	want := map[string][]byte{}
	for i := 0; i < 5; i++ {
		name := fmt.Sprintf("obj%d", i)
		o, err := e.Create(name)
		bbMust(t, err, "Create")
		d := bbPattern(int64(100+i), 10000*(i+1)+i)
		bbWrite(t, o, d, 0)
		want[name] = d
	}
	bbMust(t, e.Close(), "Close")
	return dev, want
}

func bbVerify(t *testing.T, e *engine.Engine, want map[string][]byte) {
	t.Helper()
	names := e.Objects()
	if len(names) != len(want) {
		t.Fatalf("Objects = %q, want %d", names, len(want))
	}
	for name, d := range want {
		o, err := e.Object(name)
		bbMust(t, err, "Object "+name)
		if got := bbReadAll(t, o); !bytes.Equal(got, d) {
			t.Fatalf("%s: %s", name, bbDiff(got, d))
		}
	}
}

func TestSpecSuperblockCorruption(t *testing.T) {
	// Superblock A at byte 0, B one engine block (4096) further.
	t.Run("firstOnlyRandom4K", func(t *testing.T) {
		dev, want := bbFormattedWithData(t)
		bbScribble(t, dev, 0, 4096, 1)
		e, err := bbOpenNoPanic(t, dev)
		if err != nil {
			t.Fatalf("Open with only superblock A damaged: %v (want success via copy B)", err)
		}
		bbVerify(t, e, want)
		bbMust(t, e.Close(), "Close")
	})
	t.Run("firstOnlyZeroed", func(t *testing.T) {
		dev, want := bbFormattedWithData(t)
		if _, err := dev.WriteAt(make([]byte, 4096), 0); err != nil {
			t.Fatal(err)
		}
		e, err := bbOpenNoPanic(t, dev)
		if err != nil {
			t.Fatalf("Open with superblock A zeroed: %v", err)
		}
		bbVerify(t, e, want)
		bbMust(t, e.Close(), "Close")
	})
	t.Run("firstOnlyBitflip", func(t *testing.T) {
		dev, want := bbFormattedWithData(t)
		buf := make([]byte, 4096)
		dev.ReadAt(buf, 0)
		buf[40] ^= 0x10 // inside the checksummed header, magic kept
		dev.WriteAt(buf, 0)
		e, err := bbOpenNoPanic(t, dev)
		if err != nil {
			t.Fatalf("Open with superblock A bit-flipped: %v", err)
		}
		bbVerify(t, e, want)
		bbMust(t, e.Close(), "Close")
	})
	t.Run("bothRandom", func(t *testing.T) {
		dev, _ := bbFormattedWithData(t)
		bbScribble(t, dev, 0, 8192, 2)
		e, err := bbOpenNoPanic(t, dev)
		if err == nil {
			e.Close()
			t.Fatalf("Open with both superblocks random succeeded")
		}
		if !errors.Is(err, engine.ErrCorrupt) {
			t.Errorf("both random: err %v does not wrap ErrCorrupt", err)
		}
	})
	t.Run("bothBitflip", func(t *testing.T) {
		dev, _ := bbFormattedWithData(t)
		buf := make([]byte, 8192)
		dev.ReadAt(buf, 0)
		buf[40] ^= 0x10
		buf[4096+50] ^= 0x01
		dev.WriteAt(buf, 0)
		e, err := bbOpenNoPanic(t, dev)
		if err == nil {
			e.Close()
			t.Fatalf("Open with both superblocks bit-flipped succeeded")
		}
		if !errors.Is(err, engine.ErrCorrupt) {
			t.Errorf("both bitflip: err %v does not wrap ErrCorrupt", err)
		}
	})
	t.Run("bothTruncatedSuperblock", func(t *testing.T) {
		// keep magic, zero the rest of each copy
		dev, _ := bbFormattedWithData(t)
		buf := make([]byte, 8192)
		dev.ReadAt(buf, 0)
		clear(buf[8:4096])
		clear(buf[4096+8:])
		dev.WriteAt(buf, 0)
		e, err := bbOpenNoPanic(t, dev)
		if err == nil {
			e.Close()
			t.Fatalf("Open with truncated superblocks succeeded")
		}
		if !errors.Is(err, engine.ErrCorrupt) {
			t.Errorf("err %v does not wrap ErrCorrupt", err)
		}
	})
	t.Run("deviceShrunk", func(t *testing.T) {
		dev, _ := bbFormattedWithData(t)
		small := engine.NewMemDevice(16*bbMiB, 4096)
		buf := make([]byte, bbMiB)
		for off := int64(0); off < 16*bbMiB; off += bbMiB {
			dev.ReadAt(buf, off)
			small.WriteAt(buf, off)
		}
		e, err := bbOpenNoPanic(t, small)
		if err == nil {
			e.Close()
			t.Fatalf("Open of truncated device copy succeeded")
		}
		t.Logf("shrunk: %v", err)
	})
}

// Random damage anywhere in the metadata region must never panic.
func TestSpecMetadataFuzzNoPanic(t *testing.T) {
	base, _ := bbFormattedWithData(t)
	// metadata is within the first 1 MiB (32 MiB device -> 1 MiB metadata + 2 superblocks)
	img := make([]byte, 2*bbMiB)
	base.ReadAt(img, 0)
	seed, iters := int64(7), 60
	if v := os.Getenv("SPEC_SEED"); v != "" {
		seed, _ = strconv.ParseInt(v, 10, 64)
		iters = 400
	}
	rng := rand.New(rand.NewSource(seed))
	for it := 0; it < iters; it++ {
		dev := engine.NewMemDevice(32*bbMiB, 4096)
		// copy the whole device (data too)
		buf := make([]byte, bbMiB)
		for off := int64(0); off < 32*bbMiB; off += bbMiB {
			base.ReadAt(buf, off)
			dev.WriteAt(buf, off)
		}
		m := bytes.Clone(img)
		// damage: some random bytes in the first 2 MiB, skipping the superblocks half the time
		lo := 0
		if it%2 == 0 {
			lo = 8192
		}
		for k := 0; k < 1+rng.Intn(20); k++ {
			i := lo + rng.Intn(len(m)-lo)
			m[i] ^= byte(1 + rng.Intn(255))
		}
		if it%5 == 0 {
			// a whole random block somewhere in metadata
			blk := 2 + rng.Intn(255)
			rng.Read(m[blk*4096 : (blk+1)*4096])
		}
		dev.WriteAt(m, 0)
		func() {
			defer func() {
				if r := recover(); r != nil {
					t.Fatalf("iteration %d: panic: %v", it, r)
				}
			}()
			e, err := engine.Open(dev, bbOpts)
			if err != nil {
				return
			}
			for _, n := range e.Objects() {
				o, err := e.Object(n)
				if err != nil {
					continue
				}
				p := make([]byte, 65536)
				o.ReadAt(p, 0)
			}
			e.Close()
		}()
	}
}

// ---------------------------------------------------------------- format

func TestSpecFormat(t *testing.T) {
	dev := engine.NewMemDevice(16*bbMiB, 4096)
	if err := engine.Format(dev, engine.FormatOptions{}); err != nil {
		t.Fatalf("Format 16 MiB: %v", err)
	}
	e := bbOpen(t, dev)
	o, err := e.Create("x")
	bbMust(t, err, "Create")
	bbWrite(t, o, []byte("ok"), 0)
	bbMust(t, e.Close(), "Close")

	dev512 := engine.NewMemDevice(16*bbMiB, 512)
	if err := engine.Format(dev512, engine.FormatOptions{}); err != nil {
		t.Fatalf("Format 16 MiB/512: %v", err)
	}
	bbMust(t, bbOpen(t, dev512).Close(), "Close 512")

	small := engine.NewMemDevice(16*bbMiB-4096, 4096)
	if err := engine.Format(small, engine.FormatOptions{}); err == nil {
		t.Errorf("Format of 16 MiB - 4096 succeeded")
	}
	small512 := engine.NewMemDevice(16*bbMiB-512, 512)
	if err := engine.Format(small512, engine.FormatOptions{}); err == nil {
		t.Errorf("Format of 16 MiB - 512 succeeded")
	}
	for _, bs := range []int{3000, 131072, 100, -4096, 1 << 20, 4097, 256} {
		d := engine.NewMemDevice(32*bbMiB, 512)
		if err := engine.Format(d, engine.FormatOptions{BlockSize: bs}); err == nil {
			t.Errorf("Format BlockSize %d succeeded", bs)
		}
	}
	// smaller than the device block
	d := engine.NewMemDevice(32*bbMiB, 4096)
	if err := engine.Format(d, engine.FormatOptions{BlockSize: 512}); err == nil {
		t.Errorf("Format BlockSize 512 on a 4096 device succeeded")
	}
	if err := engine.Format(d, engine.FormatOptions{BlockSize: 2048}); err == nil {
		t.Errorf("Format BlockSize 2048 on a 4096 device succeeded")
	}
	// metadata that does not fit
	for _, ms := range []int64{-1, 64 * bbMiB, 31 * bbMiB, 20 * bbMiB} {
		d := engine.NewMemDevice(32*bbMiB, 4096)
		if err := engine.Format(d, engine.FormatOptions{MetadataSize: ms}); err == nil {
			t.Errorf("Format MetadataSize %d on 32 MiB succeeded", ms)
		}
	}
	// valid non-default sizes
	for _, bs := range []int{512, 1024, 8192, 65536} {
		d := engine.NewMemDevice(32*bbMiB, 512)
		if err := engine.Format(d, engine.FormatOptions{BlockSize: bs}); err != nil {
			t.Errorf("Format BlockSize %d: %v", bs, err)
			continue
		}
		e, err := engine.Open(d, bbOpts)
		if err != nil {
			t.Errorf("Open BlockSize %d: %v", bs, err)
			continue
		}
		o, _ := e.Create("x")
		data := bbPattern(int64(bs), 3*bs+17)
		bbWrite(t, o, data, int64(bs/2+3))
		bbMust(t, o.Truncate(int64(bs+5)), "truncate")
		bbMust(t, o.Truncate(int64(4*bs)), "extend")
		e = bbReopen(t, e, d)
		o, err = e.Object("x")
		bbMust(t, err, "Object")
		want := make([]byte, 4*bs)
		copy(want[bs/2+3:bs+5], data)
		if got := bbReadAll(t, o); !bytes.Equal(got, want) {
			t.Errorf("BlockSize %d: %s", bs, bbDiff(got, want))
		}
		// superblock A corruption with non-default block size: B at offset bs
		bbMust(t, e.Close(), "Close")
		bbScribble(t, d, 0, 512, 3)
		e, err = engine.Open(d, bbOpts)
		if err != nil {
			t.Errorf("BlockSize %d: open with superblock A damaged: %v", bs, err)
			continue
		}
		bbMust(t, e.Close(), "Close")
	}
	// reformat wipes
	d = engine.NewMemDevice(32*bbMiB, 4096)
	bbMust(t, engine.Format(d, engine.FormatOptions{}), "Format")
	e = bbOpen(t, d)
	e.Create("gone")
	bbMust(t, e.Close(), "Close")
	bbMust(t, engine.Format(d, engine.FormatOptions{}), "reFormat")
	e = bbOpen(t, d)
	if got := e.Objects(); len(got) != 0 {
		t.Errorf("after reformat Objects = %q", got)
	}
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- objects

func TestSpecObjectsSorted(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	names := []string{"zeta", "Alpha", "alpha", "a", "aa", "a\xff", "b", "0", "~", "a b", "ä", "Zulu"}
	perm := rand.New(rand.NewSource(1)).Perm(len(names))
	for _, i := range perm {
		_, err := e.Create(names[i])
		bbMust(t, err, "Create")
	}
	want := slices.Clone(names)
	slices.Sort(want)
	if got := e.Objects(); !slices.Equal(got, want) {
		t.Errorf("Objects = %q\nwant %q", got, want)
	}
	bbMust(t, e.Remove("b"), "Remove")
	want = slices.DeleteFunc(want, func(s string) bool { return s == "b" })
	if got := e.Objects(); !slices.Equal(got, want) {
		t.Errorf("after Remove Objects = %q", got)
	}
	// returned slice is a copy
	got := e.Objects()
	got[0] = "mutated"
	if e.Objects()[0] == "mutated" {
		t.Errorf("Objects returns internal slice")
	}
	e = bbReopen(t, e, dev)
	if got := e.Objects(); !slices.Equal(got, want) {
		t.Errorf("after reopen Objects = %q", got)
	}
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- extents

func TestSpecExtents(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	o, err := e.Create("x")
	bbMust(t, err, "Create")
	if ex := o.Extents(); len(ex) != 0 {
		t.Errorf("new object extents %v", ex)
	}
	bbWrite(t, o, bbPattern(1, 64<<10), 0)
	ex := o.Extents()
	for _, x := range ex {
		if x.State == engine.Delalloc && x.Physical != -1 {
			t.Errorf("delalloc extent with Physical %d", x.Physical)
		}
	}
	bbMust(t, o.Sync(), "Sync")
	ex = o.Extents()
	var total int64
	for i, x := range ex {
		if x.State != engine.Written || x.Physical < 0 || x.Length <= 0 {
			t.Errorf("after sync extent %d = %+v", i, x)
		}
		if i > 0 && ex[i-1].Offset+ex[i-1].Length > x.Offset {
			t.Errorf("extents overlap/unsorted: %+v", ex)
		}
		total += x.Length
	}
	if total != 64<<10 {
		t.Errorf("extents cover %d bytes want %d: %+v", total, 64<<10, ex)
	}
	bbMust(t, o.PunchHole(8192, 8192), "punch")
	for _, x := range o.Extents() {
		if x.Offset < 16384 && x.Offset+x.Length > 8192 {
			t.Errorf("punched range still mapped: %+v", x)
		}
	}
	if st := e.Stats(); st.TotalBytes <= 0 || st.FreeBytes > st.TotalBytes || st.ReservedBytes < 0 || st.FreeBytes < st.ReservedBytes {
		t.Errorf("odd stats %+v", st)
	}
}

// ---------------------------------------------------------------- misc write

func TestSpecZeroLengthAndSmallWrites(t *testing.T) {
	dev, e := bbSetup(t, 32*bbMiB)
	o, err := e.Create("z")
	bbMust(t, err, "Create")
	if n, err := o.WriteAt(nil, 0); n != 0 || err != nil {
		t.Errorf("WriteAt(nil,0) = %d, %v", n, err)
	}
	if n, err := o.WriteAt(nil, 5000); n != 0 || err != nil {
		t.Errorf("WriteAt(nil,5000) = %d, %v", n, err)
	}
	if o.Size() != 0 {
		t.Errorf("zero-length WriteAt at 5000 changed the size to %d", o.Size())
	}
	bbMust(t, o.Truncate(0), "Truncate")
	// many 1-byte writes at scattered unaligned offsets
	want := make([]byte, 70000)
	rng := rand.New(rand.NewSource(3))
	for i := 0; i < 500; i++ {
		off := rng.Intn(len(want))
		b := byte(rng.Intn(255) + 1)
		bbWrite(t, o, []byte{b}, int64(off))
		want[off] = b
	}
	if int(o.Size()) > len(want) {
		t.Fatalf("size %d", o.Size())
	}
	want = want[:o.Size()]
	if got := bbReadAll(t, o); !bytes.Equal(got, want) {
		t.Fatalf("%s", bbDiff(got, want))
	}
	e = bbReopen(t, e, dev)
	o, _ = e.Object("z")
	if got := bbReadAll(t, o); !bytes.Equal(got, want) {
		t.Fatalf("after reopen %s", bbDiff(got, want))
	}
	// caller's buffer reuse after WriteAt must not affect data
	p := bytes.Repeat([]byte{9}, 10000)
	bbWrite(t, o, p, 100)
	for i := range p {
		p[i] = 0
	}
	copy(want[100:], bytes.Repeat([]byte{9}, 10000))
	if len(want) < 10100 {
		want = append(want, bytes.Repeat([]byte{9}, 10100-len(want))...)
	}
	if got := bbReadAll(t, o); !bytes.Equal(got, want) {
		t.Fatalf("buffer aliasing: %s", bbDiff(got, want))
	}
	bbMust(t, e.Close(), "Close")
}

// A single write much larger than the cache must complete (no deadlock).
func TestSpecWriteLargerThanCache(t *testing.T) {
	dev := bbNewDev(t, 64*bbMiB)
	e, err := engine.Open(dev, engine.Options{CacheSize: 1 * bbMiB})
	bbMust(t, err, "Open")
	o, err := e.Create("big")
	bbMust(t, err, "Create")
	data := bbPattern(11, 24*bbMiB+333)
	done := make(chan error, 1)
	go func() {
		n, err := o.WriteAt(data, 777)
		if err == nil && n != len(data) {
			err = fmt.Errorf("short %d", n)
		}
		done <- err
	}()
	select {
	case err := <-done:
		bbMust(t, err, "big WriteAt")
	case <-time.After(60 * time.Second):
		t.Fatalf("24 MiB WriteAt with 1 MiB cache did not finish in 60s")
	}
	bbCheckRange(t, o, 777, data, "big")
	bbMust(t, e.Close(), "Close")
	e, err = engine.Open(dev, engine.Options{CacheSize: 1 * bbMiB})
	bbMust(t, err, "Open")
	o, _ = e.Object("big")
	bbCheckRange(t, o, 0, append(bbZeros(777), data...), "big reopen")
	bbMust(t, e.Close(), "Close")
}

func TestSpecDefaultOptions(t *testing.T) {
	dev := bbNewDev(t, 16*bbMiB)
	e, err := engine.Open(dev, engine.Options{})
	bbMust(t, err, "Open default")
	o, err := e.Create("d")
	bbMust(t, err, "Create")
	bbWrite(t, o, bbPattern(1, 5*bbMiB), 0)
	bbMust(t, e.Close(), "Close")
	// reopen repeatedly
	for i := 0; i < 3; i++ {
		e, err = engine.Open(dev, engine.Options{})
		bbMust(t, err, "reOpen")
		bbMust(t, e.Close(), "Close")
	}
}

// ---------------------------------------------------------------- persistence

func TestSpecPersistenceModel(t *testing.T) {
	dev, e := bbSetup(t, 64*bbMiB)
	rng := rand.New(rand.NewSource(12))
	model := map[string][]byte{}
	names := []string{"a", "b", "c", "d"}
	handles := map[string]*engine.Object{}
	for _, n := range names {
		o, err := e.Create(n)
		bbMust(t, err, "Create")
		handles[n] = o
		model[n] = nil
	}
	for step := 0; step < 400; step++ {
		n := names[rng.Intn(len(names))]
		o := handles[n]
		m := model[n]
		switch op := rng.Intn(10); {
		case op < 5:
			off := rng.Int63n(600000)
			l := 1 + rng.Intn(40000)
			p := bbPattern(int64(step), l)
			bbWrite(t, o, p, off)
			if int(off)+l > len(m) {
				m = append(m, make([]byte, int(off)+l-len(m))...)
			}
			copy(m[off:], p)
		case op < 7:
			sz := rng.Int63n(700000)
			bbMust(t, o.Truncate(sz), "Truncate")
			if int(sz) < len(m) {
				m = m[:sz]
			} else {
				m = append(m, make([]byte, int(sz)-len(m))...)
			}
		case op < 8:
			off := rng.Int63n(700000)
			l := rng.Int63n(100000)
			bbMust(t, o.PunchHole(off, l), "PunchHole")
			for i := off; i < off+l && i < int64(len(m)); i++ {
				m[i] = 0
			}
		case op < 9:
			bbMust(t, o.Sync(), "Sync")
		default:
			if rng.Intn(4) == 0 {
				model[n] = m
				e = bbReopen(t, e, dev)
				for _, nn := range names {
					h, err := e.Object(nn)
					bbMust(t, err, "Object")
					handles[nn] = h
				}
				o = handles[n]
			}
		}
		model[n] = m
		if o.Size() != int64(len(m)) {
			t.Fatalf("step %d: %s size %d want %d", step, n, o.Size(), len(m))
		}
		if step%40 == 0 {
			for _, nn := range names {
				if got := bbReadAll(t, handles[nn]); !bytes.Equal(got, model[nn]) {
					t.Fatalf("step %d: %s: %s", step, nn, bbDiff(got, model[nn]))
				}
			}
		}
	}
	e = bbReopen(t, e, dev)
	for _, nn := range names {
		o, err := e.Object(nn)
		bbMust(t, err, "Object")
		if got := bbReadAll(t, o); !bytes.Equal(got, model[nn]) {
			t.Fatalf("final %s: %s", nn, bbDiff(got, model[nn]))
		}
	}
	bbMust(t, e.Close(), "Close")
}

// ---------------------------------------------------------------- concurrency

func TestSpecConcurrent(t *testing.T) {
	dev, e := bbSetup(t, 64*bbMiB)
	const G = 8
	models := make([][]byte, G)
	var wg sync.WaitGroup
	errc := make(chan error, G*4)
	stopStats := make(chan struct{})
	var sg sync.WaitGroup
	sg.Add(1)
	go func() {
		defer sg.Done()
		for {
			select {
			case <-stopStats:
				return
			default:
			}
			_ = e.Stats()
			names := e.Objects()
			if !slices.IsSorted(names) {
				errc <- fmt.Errorf("Objects unsorted %q", names)
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			name := fmt.Sprintf("g%d", g)
			o, err := e.Create(name)
			if err != nil {
				errc <- err
				return
			}
			rng := rand.New(rand.NewSource(int64(g)))
			var m []byte
			for step := 0; step < 150; step++ {
				switch op := rng.Intn(10); {
				case op < 6:
					off := rng.Int63n(300000)
					l := 1 + rng.Intn(20000)
					p := bbPattern(int64(g*10000+step), l)
					n, err := o.WriteAt(p, off)
					if err != nil || n != l {
						errc <- fmt.Errorf("%s write: %d %v", name, n, err)
						return
					}
					if int(off)+l > len(m) {
						m = append(m, make([]byte, int(off)+l-len(m))...)
					}
					copy(m[off:], p)
				case op < 7:
					sz := rng.Int63n(300000)
					if err := o.Truncate(sz); err != nil {
						errc <- err
						return
					}
					if int(sz) < len(m) {
						m = m[:sz]
					} else {
						m = append(m, make([]byte, int(sz)-len(m))...)
					}
				case op < 8:
					off, l := rng.Int63n(300000), rng.Int63n(50000)
					if err := o.PunchHole(off, l); err != nil {
						errc <- err
						return
					}
					for i := off; i < off+l && i < int64(len(m)); i++ {
						m[i] = 0
					}
				case op < 9:
					if err := o.Sync(); err != nil {
						errc <- err
						return
					}
				default:
					if err := e.Sync(); err != nil {
						errc <- err
						return
					}
				}
				// read back a random range
				if len(m) > 0 {
					off := rng.Intn(len(m))
					l := min(1+rng.Intn(30000), len(m)-off)
					buf := make([]byte, l)
					n, err := o.ReadAt(buf, int64(off))
					if n != l || (err != nil && err != io.EOF) {
						errc <- fmt.Errorf("%s read %d@%d: %d %v", name, l, off, n, err)
						return
					}
					if !bytes.Equal(buf, m[off:off+l]) {
						errc <- fmt.Errorf("%s step %d: read mismatch @%d: %s", name, step, off, bbDiff(buf, m[off:off+l]))
						return
					}
				}
				if o.Size() != int64(len(m)) {
					errc <- fmt.Errorf("%s size %d want %d", name, o.Size(), len(m))
					return
				}
			}
			models[g] = m
		}(g)
	}
	wg.Wait()
	close(stopStats)
	sg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if t.Failed() {
		e.Close()
		return
	}
	e = bbReopen(t, e, dev)
	for g := 0; g < G; g++ {
		o, err := e.Object(fmt.Sprintf("g%d", g))
		bbMust(t, err, "Object")
		if got := bbReadAll(t, o); !bytes.Equal(got, models[g]) {
			t.Errorf("g%d after reopen: %s", g, bbDiff(got, models[g]))
		}
	}
	bbMust(t, e.Close(), "Close")
}

// Concurrent writers and readers on the SAME object, disjoint ranges.
func TestSpecConcurrentSameObject(t *testing.T) {
	dev, e := bbSetup(t, 64*bbMiB)
	o, err := e.Create("shared")
	bbMust(t, err, "Create")
	const G = 8
	const span = 100000 // unaligned spans, so neighbours share blocks
	var wg sync.WaitGroup
	errc := make(chan error, G)
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			base := int64(g * span)
			for k := 0; k < 20; k++ {
				p := bbPattern(int64(g*100+k), span)
				if n, err := o.WriteAt(p, base); n != span || err != nil {
					errc <- fmt.Errorf("write %d %v", n, err)
					return
				}
				buf := make([]byte, span)
				if n, err := o.ReadAt(buf, base); n != span || (err != nil && err != io.EOF) {
					errc <- fmt.Errorf("read %d %v", n, err)
					return
				}
				if !bytes.Equal(buf, p) {
					errc <- fmt.Errorf("g%d k%d: %s", g, k, bbDiff(buf, p))
					return
				}
				if k%5 == 0 {
					o.Sync()
				}
			}
		}(g)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	want := make([]byte, 0, G*span)
	for g := 0; g < G; g++ {
		want = append(want, bbPattern(int64(g*100+19), span)...)
	}
	e = bbReopen(t, e, dev)
	o, _ = e.Object("shared")
	if got := bbReadAll(t, o); !bytes.Equal(got, want) {
		t.Errorf("after reopen: %s", bbDiff(got, want))
	}
	bbMust(t, e.Close(), "Close")
}

// Remove racing with writes on the same object.
func TestSpecConcurrentRemove(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	for round := 0; round < 20; round++ {
		o, err := e.Create("victim")
		bbMust(t, err, "Create")
		var wg sync.WaitGroup
		for g := 0; g < 3; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				p := bbPattern(int64(g), 10000)
				for k := 0; k < 50; k++ {
					_, err := o.WriteAt(p, int64(k*5000))
					if err != nil {
						if !errors.Is(err, fs.ErrNotExist) {
							t.Errorf("write during remove: %v", err)
						}
						return
					}
					if k%10 == 0 {
						if err := o.Sync(); err != nil && !errors.Is(err, fs.ErrNotExist) {
							t.Errorf("sync during remove: %v", err)
							return
						}
					}
				}
			}(g)
		}
		time.Sleep(time.Duration(round%5) * time.Millisecond)
		bbMust(t, e.Remove("victim"), "Remove")
		wg.Wait()
	}
	bbMust(t, e.Sync(), "Sync")
	st := e.Stats()
	if st.ReservedBytes != 0 {
		t.Errorf("reserved after removes+sync: %d", st.ReservedBytes)
	}
}

// ---------------------------------------------------------------- file device

func TestSpecFileDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev.img")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 32 * bbMiB})
	if err != nil {
		t.Skipf("OpenDevice: %v", err)
	}
	bbMust(t, engine.Format(dev, engine.FormatOptions{}), "Format")
	e, err := engine.Open(dev, bbOpts)
	bbMust(t, err, "Open")
	o, err := e.Create("f")
	bbMust(t, err, "Create")
	// deliberately misaligned user buffers and offsets
	raw := bbPattern(21, 3*bbMiB+11)
	data := raw[3:]
	bbWrite(t, o, data, 4093)
	bbMust(t, o.Truncate(4093+int64(len(data))-1000), "Truncate")
	bbMust(t, o.Truncate(4093+int64(len(data))+5000), "extend")
	want := make([]byte, 4093+len(data)+5000)
	copy(want[4093:], data[:len(data)-1000])
	bbMust(t, o.PunchHole(100000, 77777), "Punch")
	clear(want[100000 : 100000+77777])
	got := make([]byte, len(want)+7)
	n, err := o.ReadAt(got[7:], 0)
	if n != len(want) || (err != nil && err != io.EOF) {
		t.Fatalf("ReadAt = %d %v", n, err)
	}
	if !bytes.Equal(got[7:], want) {
		t.Fatalf("%s", bbDiff(got[7:], want))
	}
	bbMust(t, e.Close(), "Close")
	bbMust(t, dev.Close(), "dev.Close")
	dev, err = engine.OpenDevice(path, engine.DeviceOptions{})
	bbMust(t, err, "OpenDevice again")
	defer dev.Close()
	e, err = engine.Open(dev, bbOpts)
	bbMust(t, err, "Open again")
	o, err = e.Object("f")
	bbMust(t, err, "Object")
	if g := bbReadAll(t, o); !bytes.Equal(g, want) {
		t.Fatalf("after reopen: %s", bbDiff(g, want))
	}
	bbMust(t, e.Close(), "Close")
}

func TestSpecFileDeviceNoSpace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev.img")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 16 * bbMiB})
	if err != nil {
		t.Skipf("OpenDevice: %v", err)
	}
	defer dev.Close()
	bbMust(t, engine.Format(dev, engine.FormatOptions{}), "Format")
	e, err := engine.Open(dev, bbOpts)
	bbMust(t, err, "Open")
	o, _ := e.Create("fill")
	var acked []byte
	for i := 0; ; i++ {
		p := bbPattern(int64(i), 300000)
		sz := o.Size()
		n, err := o.WriteAt(p, int64(len(acked)))
		if err != nil {
			if !errors.Is(err, engine.ErrNoSpace) || n != 0 || o.Size() != sz {
				t.Fatalf("fill: n=%d err=%v size %d->%d", n, err, sz, o.Size())
			}
			break
		}
		acked = append(acked, p...)
	}
	bbMust(t, e.Sync(), "Sync")
	bbMust(t, e.Close(), "Close")
	e, err = engine.Open(dev, bbOpts)
	bbMust(t, err, "Open")
	o, _ = e.Object("fill")
	if g := bbReadAll(t, o); !bytes.Equal(g, acked) {
		t.Fatalf("after reopen: %s", bbDiff(g, acked))
	}
	bbMust(t, e.Close(), "Close")
}

// A write that overlaps existing data and extends into new space that does
// not fit must change nothing: not even the overlapped bytes.
func TestSpecNoSpaceNoPartialChange(t *testing.T) {
	for _, synced := range []bool{false, true} {
		t.Run(fmt.Sprintf("synced=%v", synced), func(t *testing.T) {
			dev, e := bbSetup(t, 16*bbMiB)
			o, err := e.Create("a")
			bbMust(t, err, "Create")
			st := e.Stats()
			avail := st.FreeBytes - st.ReservedBytes
			// leave roughly 300 KiB free
			base := bbPattern(1, int(avail-300<<10)+123)
			bbWrite(t, o, base, 0)
			if synced {
				bbMust(t, e.Sync(), "Sync")
			}
			// overlapping write: last 5000 bytes of existing data + 1 MiB new
			p := bytes.Repeat([]byte{0x5A}, 5000+bbMiB)
			off := int64(len(base) - 5000)
			n, err := o.WriteAt(p, off)
			if n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("overlapping write = %d, %v; want 0, ErrNoSpace", n, err)
			}
			if o.Size() != int64(len(base)) {
				t.Fatalf("size changed to %d", o.Size())
			}
			if got := bbReadAll(t, o); !bytes.Equal(got, base) {
				t.Fatalf("overlapped bytes changed: %s", bbDiff(got, base))
			}
			// sparse write into a hole far away that does not fit
			n, err = o.WriteAt(make([]byte, 2*bbMiB), 1<<30)
			if n != 0 || !errors.Is(err, engine.ErrNoSpace) {
				t.Fatalf("far write = %d, %v; want 0, ErrNoSpace", n, err)
			}
			if o.Size() != int64(len(base)) {
				t.Fatalf("size changed to %d by failed far write", o.Size())
			}
			// a write that fits still works
			bbWrite(t, o, []byte("tail"), int64(len(base)))
			base = append(base, "tail"...)
			bbMust(t, e.Sync(), "Sync")
			e = bbReopen(t, e, dev)
			o, _ = e.Object("a")
			if got := bbReadAll(t, o); !bytes.Equal(got, base) {
				t.Fatalf("after reopen: %s", bbDiff(got, base))
			}
			bbMust(t, e.Close(), "Close")
		})
	}
}

// After Close, bad arguments too answer ErrClosed.
func TestSpecClosedBadArgs(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	o, _ := e.Create("x")
	bbMust(t, e.Close(), "Close")
	_, err1 := e.Object("")
	err2 := e.Remove("a\x00")
	_, err3 := o.ReadAt(make([]byte, 1), -1)
	_, err4 := o.WriteAt(make([]byte, 1), -1)
	err5 := o.Truncate(-1)
	err6 := o.PunchHole(-1, 1)
	for i, err := range []error{err1, err2, err3, err4, err5, err6} {
		if !errors.Is(err, engine.ErrClosed) {
			t.Errorf("call %d after Close: %v; want ErrClosed", i+1, err)
		}
	}
}

// Zero-length reads at and past EOF read nothing (io.ReaderAt lets them
// answer nil or io.EOF).
func TestSpecZeroLengthReads(t *testing.T) {
	_, e := bbSetup(t, 32*bbMiB)
	defer e.Close()
	o, _ := e.Create("x")
	bbWrite(t, o, []byte("abc"), 0)
	for _, off := range []int64{0, 3, 4, 1 << 40} {
		n, err := o.ReadAt([]byte{}, off)
		if n != 0 || (err != nil && err != io.EOF) {
			t.Errorf("ReadAt(len 0 @%d) = %d, %v", off, n, err)
		}
	}
}

// Both checkpoint regions damaged: an error wrapping ErrCorrupt, no panic.
// Layout on 32 MiB/4 KiB: sb A, sb B, journal, ckpt A, ckpt B, data (<= 1 MiB + alignment).
func TestSpecAllMetadataGarbage(t *testing.T) {
	dev, _ := bbFormattedWithData(t)
	// keep both superblocks, randomize everything else up to the data region
	bbScribble(t, dev, 8192, bbMiB-8192, 9)
	e, err := bbOpenNoPanic(t, dev)
	if err == nil {
		e.Close()
		t.Fatalf("Open with random journal+checkpoints succeeded")
	}
	if !errors.Is(err, engine.ErrCorrupt) {
		t.Errorf("err %v does not wrap ErrCorrupt", err)
	}
}

package engine_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"testing"

	"github.com/ncw/directio"

	"github.com/rawblock/rawblock/engine"
)

// This file feeds the public API bad input and misuse: each must be a clear
// error that changes nothing, and never a panic.

// smallOpts keeps the engines of these tests small.
var smallOpts = engine.Options{CacheSize: 8 << 20}

// mustNotPanic runs fn and turns a panic into a test failure with its stack.
func mustNotPanic(t *testing.T, what string, fn func()) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("%s panicked: %v\n%s", what, r, debug.Stack())
		}
	}()
	fn()
}

// populate stores a few objects of assorted sizes on a freshly formatted
// dev, syncs them, and returns the open engine and its contents.
func populate(t *testing.T, dev engine.Device) (*engine.Engine, map[string][]byte) {
	t.Helper()
	e := formatOpen(t, dev, smallOpts)
	rng := rand.New(rand.NewPCG(1, 2))
	want := map[string][]byte{}
	for i, size := range []int{0, 1, 4095, 4096, 10000, 300 << 10} {
		name := fmt.Sprintf("o%d", i)
		o, err := e.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, size)
		fill(rng, p)
		if _, err := o.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
		want[name] = p
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	return e, want
}

// reopenCheck closes e, opens dev again and checks it holds want.
func reopenCheck(t *testing.T, e *engine.Engine, dev engine.Device, want map[string][]byte) {
	t.Helper()
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e2, err := engine.Open(dev, smallOpts)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer e2.Close()
	checkAll(t, e2, want, "after reopen")
}

func TestMisuseNames(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	long := strings.Repeat("n", engine.MaxNameLen)
	for _, name := range []string{"", long + "x", strings.Repeat("y", 4096), "a\x00b", "\x00", "abc\x00"} {
		if _, err := e.Create(name); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Create(%q) = %v, want fs.ErrInvalid", name, err)
		}
		if _, err := e.Object(name); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Object(%q) = %v, want fs.ErrInvalid", name, err)
		}
		if err := e.Remove(name); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Remove(%q) = %v, want fs.ErrInvalid", name, err)
		}
	}
	checkAll(t, e, want, "after bad names")

	// The longest name works, and so does any byte but NUL.
	for _, name := range []string{long, "x", "with space", "a/b", "..", "\xff\xfe", "ünï"} {
		o, err := e.Create(name)
		if err != nil {
			t.Fatalf("Create(%q): %v", name, err)
		}
		if _, err := o.WriteAt([]byte(name), 0); err != nil {
			t.Fatal(err)
		}
		want[name] = []byte(name)
	}
	// An existing name is refused, and its object is left alone.
	for _, name := range []string{"o4", long} {
		if _, err := e.Create(name); !errors.Is(err, fs.ErrExist) {
			t.Errorf("Create(%q), which exists, = %v, want fs.ErrExist", name, err)
		}
	}
	if _, err := e.Object("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Object(missing) = %v, want fs.ErrNotExist", err)
	}
	if err := e.Remove("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Remove(missing) = %v, want fs.ErrNotExist", err)
	}
	checkAll(t, e, want, "after Create of existing names")
	reopenCheck(t, e, dev, want)
}

func TestMisuseRanges(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	o, err := e.Object("o4")
	if err != nil {
		t.Fatal(err)
	}
	lim := engine.MaxObjectSize
	p := []byte("xyz")
	buf := make([]byte, 16)
	for _, off := range []int64{-1, -4096, math.MinInt64, lim, lim - 2, lim + 1, math.MaxInt64 - 1, math.MaxInt64} {
		if n, err := o.WriteAt(p, off); n != 0 || !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("WriteAt(3 bytes at %d) = %d, %v; want 0, fs.ErrInvalid", off, n, err)
		}
		// A read past the end is io.EOF at any offset, as for a file.
		wantErr := io.EOF
		if off < 0 {
			wantErr = fs.ErrInvalid
		}
		if n, err := o.ReadAt(buf, off); n != 0 || !errors.Is(err, wantErr) {
			t.Errorf("ReadAt(16 bytes at %d) = %d, %v; want 0, %v", off, n, err, wantErr)
		}
	}
	for _, size := range []int64{-1, math.MinInt64, lim + 1, math.MaxInt64} {
		if err := o.Truncate(size); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Truncate(%d) = %v, want fs.ErrInvalid", size, err)
		}
	}
	for _, r := range [][2]int64{{-1, 1}, {0, -1}, {math.MinInt64, 10}, {10, math.MinInt64}, {lim, 1}, {1, lim}, {lim + 1, 0}, {1, math.MaxInt64}, {math.MaxInt64, math.MaxInt64}} {
		if err := o.PunchHole(r[0], r[1]); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("PunchHole(%d, %d) = %v, want fs.ErrInvalid", r[0], r[1], err)
		}
	}
	// Errors above were the engine's, not the device's: everything is as
	// it was, and the engine keeps working.
	checkAll(t, e, want, "after out-of-range calls")
	if st := e.Stats(); st.ReservedBytes != 0 {
		t.Errorf("%d bytes reserved after refused calls", st.ReservedBytes)
	}

	// The limit itself is usable: a range ending exactly at MaxObjectSize.
	edge, err := e.Create("edge")
	if err != nil {
		t.Fatal(err)
	}
	mustNotPanic(t, "write at the size limit", func() {
		if n, err := edge.WriteAt(p, lim-int64(len(p))); n != len(p) || err != nil {
			t.Fatalf("WriteAt(3 bytes ending at MaxObjectSize) = %d, %v", n, err)
		}
	})
	if got := edge.Size(); got != lim {
		t.Fatalf("size %d after a write ending at MaxObjectSize, want %d", got, lim)
	}
	got := make([]byte, 8)
	if n, err := edge.ReadAt(got, lim-8); n != 8 || (err != nil && err != io.EOF) || !bytes.Equal(got, append(make([]byte, 5), p...)) {
		t.Fatalf("ReadAt at the limit = %d, %v, %q", n, err, got)
	}
	if n, err := edge.ReadAt(got, lim/2); n != 8 || err != nil || !bytes.Equal(got, make([]byte, 8)) {
		t.Fatalf("ReadAt in the middle of a sparse object = %d, %v, %q; want zeros", n, err, got)
	}
	if err := edge.Truncate(lim); err != nil {
		t.Fatalf("Truncate(MaxObjectSize): %v", err)
	}
	if err := edge.PunchHole(lim-1, 1); err != nil {
		t.Fatalf("PunchHole of the last byte: %v", err)
	}
	want["edge"] = nil // checked separately: it is too large to read whole
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e2, err := engine.Open(dev, smallOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	edge, err = e2.Object("edge")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := edge.ReadAt(got, lim-8); edge.Size() != lim || n != 8 || (err != nil && err != io.EOF) || !bytes.Equal(got, []byte{0, 0, 0, 0, 0, 'x', 'y', 0}) {
		t.Fatalf("after reopen: size %d, ReadAt at the limit = %d, %v, %q", edge.Size(), n, err, got)
	}
	delete(want, "edge")
	for name, w := range want {
		o, err := e2.Object(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := checkObject(o, w); err != nil {
			t.Errorf("%s after reopen: %v", name, err)
		}
	}
}

// TestMisuseEmptyBuffers documents zero-length calls: WriteAt of a nil or
// empty buffer returns 0, nil and changes nothing, not even the size when
// off lies past the end; ReadAt of one returns 0, nil anywhere in range
// (io.ReaderAt asks nothing more); both still validate off.
func TestMisuseEmptyBuffers(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	o, err := e.Object("o4")
	if err != nil {
		t.Fatal(err)
	}
	size := o.Size()
	for _, p := range [][]byte{nil, {}} {
		for _, off := range []int64{0, 1, size - 1, size, size + 1, size + 1<<20} {
			if n, err := o.WriteAt(p, off); n != 0 || err != nil {
				t.Errorf("WriteAt(%d-byte buffer at %d) = %d, %v; want 0, nil", len(p), off, n, err)
			}
			if n, err := o.ReadAt(p, off); n != 0 || err != nil {
				t.Errorf("ReadAt(%d-byte buffer at %d) = %d, %v; want 0, nil", len(p), off, n, err)
			}
		}
		if n, err := o.WriteAt(p, -1); n != 0 || !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("WriteAt(empty, -1) = %d, %v; want fs.ErrInvalid", n, err)
		}
		if n, err := o.ReadAt(p, -1); n != 0 || !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("ReadAt(empty, -1) = %d, %v; want fs.ErrInvalid", n, err)
		}
	}
	// Zero-length punches and a truncate to the same size change nothing.
	if err := o.PunchHole(5, 0); err != nil {
		t.Errorf("PunchHole(5, 0) = %v", err)
	}
	if err := o.PunchHole(size+100, 0); err != nil {
		t.Errorf("PunchHole past the end, length 0 = %v", err)
	}
	if err := o.Truncate(size); err != nil {
		t.Errorf("Truncate to the same size = %v", err)
	}
	// The object of size 0 behaves the same.
	z, _ := e.Object("o0")
	if n, err := z.ReadAt(nil, 0); n != 0 || err != nil {
		t.Errorf("ReadAt(nil, 0) of an empty object = %d, %v; want 0, nil", n, err)
	}
	if n, err := z.ReadAt(make([]byte, 1), 0); n != 0 || err != io.EOF {
		t.Errorf("ReadAt(1 byte, 0) of an empty object = %d, %v; want 0, io.EOF", n, err)
	}
	checkAll(t, e, want, "after zero-length calls")
	reopenCheck(t, e, dev, want)
}

// TestMisuseReaderAt checks the io.ReaderAt rules at the end of an object,
// from the cache and, after a reopen, from the device; and that the standard
// library's readers built on it see exactly the object.
func TestMisuseReaderAt(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e := formatOpen(t, dev, smallOpts)
	o, err := e.Create("r")
	if err != nil {
		t.Fatal(err)
	}
	const size = 3*4096 + 1234
	data := make([]byte, size)
	fill(rand.New(rand.NewPCG(3, 4)), data)
	// A hole in the middle: written, then extended by Truncate, then written.
	if _, err := o.WriteAt(data[:5000], 0); err != nil {
		t.Fatal(err)
	}
	if err := o.Truncate(9000); err != nil {
		t.Fatal(err)
	}
	if _, err := o.WriteAt(data[9000:], 9000); err != nil {
		t.Fatal(err)
	}
	clear(data[5000:9000])
	check := func(o *engine.Object, when string) {
		t.Helper()
		p := make([]byte, 100)
		cases := []struct {
			off   int64
			n     int
			eofOK bool // n == len(p) at the very end: nil or io.EOF
			eof   bool
		}{
			{0, 100, false, false},
			{4990, 100, false, false}, // across the end of the first write into the hole
			{size - 100, 100, true, false},
			{size - 50, 50, false, true},
			{size - 1, 1, false, true},
			{size, 0, false, true},
			{size + 1, 0, false, true},
			{size + 1<<30, 0, false, true},
		}
		for _, c := range cases {
			clear(p)
			n, err := o.ReadAt(p, c.off)
			okErr := err == nil && !c.eof || err == io.EOF && (c.eof || c.eofOK)
			if n != c.n || !okErr {
				t.Errorf("%s: ReadAt(100 bytes at %d) = %d, %v; want %d, eof %v", when, c.off, n, err, c.n, c.eof)
				continue
			}
			if n > 0 && !bytes.Equal(p[:n], data[c.off:c.off+int64(n)]) {
				t.Errorf("%s: ReadAt(100 bytes at %d): %s", when, c.off, firstDiff(p[:n], data[c.off:c.off+int64(n)]))
			}
		}
		all, err := io.ReadAll(io.NewSectionReader(o, 0, 1<<40))
		if err != nil || !bytes.Equal(all, data) {
			t.Errorf("%s: io.ReadAll of a SectionReader: %d bytes, %v; %s", when, len(all), err, firstDiff(all, data))
		}
	}
	check(o, "cached")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e, err = engine.Open(dev, smallOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	o, err = e.Object("r")
	if err != nil {
		t.Fatal(err)
	}
	check(o, "after reopen")
}

// TestMisuseAfterRemove: a handle to a removed object refuses everything
// with fs.ErrNotExist, and cannot touch a new object of the same name.
func TestMisuseAfterRemove(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	old, err := e.Object("o5")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Remove("o5"); err != nil {
		t.Fatal(err)
	}
	delete(want, "o5")
	checkRemoved := func(when string) {
		t.Helper()
		if n, err := old.WriteAt([]byte("zz"), 0); n != 0 || !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: WriteAt = %d, %v; want 0, fs.ErrNotExist", when, n, err)
		}
		if n, err := old.WriteAt(nil, 0); n != 0 || !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: WriteAt(nil) = %d, %v; want 0, fs.ErrNotExist", when, n, err)
		}
		if n, err := old.ReadAt(make([]byte, 10), 0); n != 0 || !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: ReadAt = %d, %v; want 0, fs.ErrNotExist", when, n, err)
		}
		if err := old.Truncate(100); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: Truncate = %v; want fs.ErrNotExist", when, err)
		}
		if err := old.PunchHole(0, 100); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: PunchHole = %v; want fs.ErrNotExist", when, err)
		}
		if err := old.Sync(); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: Sync = %v; want fs.ErrNotExist", when, err)
		}
		if got := old.Size(); got != 0 {
			t.Errorf("%s: Size = %d; want 0", when, got)
		}
		if x := old.Extents(); len(x) != 0 {
			t.Errorf("%s: Extents = %v; want none", when, x)
		}
	}
	checkRemoved("removed")
	if err := e.Remove("o5"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("second Remove = %v; want fs.ErrNotExist", err)
	}
	if _, err := e.Object("o5"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Object after Remove = %v; want fs.ErrNotExist", err)
	}
	checkAll(t, e, want, "after Remove")

	// A new object under the same name starts empty; the old handle still
	// refuses, and its calls do not reach the new object.
	fresh, err := e.Create("o5")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fresh.WriteAt([]byte("new"), 0); err != nil {
		t.Fatal(err)
	}
	want["o5"] = []byte("new")
	if n, err := old.WriteAt([]byte("zz"), 0); n != 0 || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle after re-Create: WriteAt = %d, %v; want 0, fs.ErrNotExist", n, err)
	}
	if err := old.Truncate(0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle after re-Create: Truncate = %v; want fs.ErrNotExist", err)
	}
	if err := old.Sync(); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old handle after re-Create: Sync = %v; want fs.ErrNotExist", err)
	}
	checkAll(t, e, want, "after re-Create")
	reopenCheck(t, e, dev, want)
}

// TestMisuseAfterClose: every call after Close fails with ErrClosed, even
// ones whose other arguments are fine, and the device holds what was
// there.
func TestMisuseAfterClose(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	o, _ := e.Object("o3")
	if _, err := o.WriteAt([]byte("unsynced"), 10); err != nil {
		t.Fatal(err)
	}
	copy(want["o3"][10:], "unsynced")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	checkClosedObject(t, o)
	checkClosedEngine(t, e)
	if n, err := o.WriteAt(nil, 0); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("WriteAt(nil) after Close = %d, %v; want ErrClosed", n, err)
	}
	if n, err := o.ReadAt(nil, 0); n != 0 || !errors.Is(err, engine.ErrClosed) {
		t.Errorf("ReadAt(nil) after Close = %d, %v; want ErrClosed", n, err)
	}
	// Closed comes first, whatever the arguments.
	badArgs := map[string]error{}
	_, badArgs["Create(\"\")"] = e.Create("")
	_, badArgs["Object(\"a\\x00\")"] = e.Object("a\x00")
	badArgs["Remove(\"\")"] = e.Remove("")
	_, badArgs["ReadAt(-1)"] = o.ReadAt(make([]byte, 1), -1)
	_, badArgs["WriteAt(-1)"] = o.WriteAt([]byte("x"), -1)
	_, badArgs["WriteFrom(n -1)"] = o.WriteFrom(strings.NewReader("x"), 0, -1)
	badArgs["Truncate(-1)"] = o.Truncate(-1)
	badArgs["PunchHole(-1, 1)"] = o.PunchHole(-1, 1)
	for call, err := range badArgs {
		if !errors.Is(err, engine.ErrClosed) {
			t.Errorf("%s after Close: %v; want ErrClosed", call, err)
		}
	}
	mustNotPanic(t, "queries after Close", func() {
		_ = e.Objects()
		_ = e.Stats()
		_ = o.Size()
		_ = o.Name()
		_ = o.Extents()
	})
	e2, err := engine.Open(dev, smallOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	checkAll(t, e2, want, "after Close and reopen")
}

// TestMisuseOptions: bad Open and Format options are refused before the
// device is touched.
func TestMisuseOptions(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	before := deviceBytes(t, dev, 4<<20)
	for _, opts := range []engine.Options{
		{CacheSize: -1},
		{DirtyLimit: -1},
		{CacheSize: 1 << 10},
		{CacheSize: 8 << 20, DirtyLimit: 8 << 20},
		{CacheSize: 8 << 20, DirtyLimit: 9 << 20},
	} {
		mustNotPanic(t, "Open", func() {
			if e, err := engine.Open(dev, opts); !errors.Is(err, fs.ErrInvalid) {
				t.Errorf("Open(%+v) = %v; want fs.ErrInvalid", opts, err)
				if err == nil {
					e.Close()
				}
			}
		})
	}
	if _, err := engine.Open(nil, smallOpts); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("Open(nil) = %v; want fs.ErrInvalid", err)
	}
	if err := engine.Format(nil, engine.FormatOptions{}); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("Format(nil) = %v; want fs.ErrInvalid", err)
	}
	for _, fo := range []engine.FormatOptions{
		{BlockSize: 3000},
		{BlockSize: 256},
		{BlockSize: 1 << 17},
		{BlockSize: 2048}, // below this device's 4096-byte blocks
		{MetadataSize: -1},
		{MetadataSize: 30 << 20},          // leaves no data space
		{MetadataSize: math.MaxInt64},     // rounding it up to blocks would wrap
		{MetadataSize: math.MaxInt64 - 1}, // likewise
	} {
		if err := engine.Format(dev, fo); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Format(%+v) = %v; want fs.ErrInvalid", fo, err)
		}
	}
	if !bytes.Equal(before, deviceBytes(t, dev, 4<<20)) {
		t.Fatal("refused Format or Open calls changed the device")
	}
	small := engine.NewMemDevice(engine.MinDeviceSize-4096, 4096)
	if err := engine.Format(small, engine.FormatOptions{}); err == nil {
		t.Errorf("Format of a %d-byte device succeeded; the minimum is %d", small.Size(), engine.MinDeviceSize)
	}
	e, err := engine.Open(dev, smallOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	checkAll(t, e, want, "after refused Format and Open calls")
}

// deviceBytes reads the first n bytes of dev.
func deviceBytes(t *testing.T, dev engine.Device, n int64) []byte {
	t.Helper()
	p := alignedBytes(int(min(n, dev.Size())))
	if _, err := dev.ReadAt(p, 0); err != nil {
		t.Fatalf("read device: %v", err)
	}
	return p
}

// alignedBytes returns n bytes aligned for O_DIRECT.
func alignedBytes(n int) []byte { return directio.AlignedBlock(n) }

// Superblock layout of engine/format.go (version 1): "rawblock" magic at
// 0, format version u32 at 8, engine block size u32 at 12, checkpoint
// starts u64 at 56 and 64 (in engine blocks), crc32c of bytes 0..111 at
// 112. Copy A is at byte 0, copy B one engine block further.
const (
	sbVersionOff = 8
	sbBlockOff   = 12
	sbCkptOff    = 56
	sbCRCOff     = 112
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// superblockAt reads the superblock copy at off and checks that it still
// has the layout above, so that a format change fails here clearly rather
// than making the tests below damage the wrong bytes.
func superblockAt(t *testing.T, dev engine.Device, off int64) []byte {
	t.Helper()
	blk := alignedBytes(4096)
	if _, err := dev.ReadAt(blk, off); err != nil {
		t.Fatal(err)
	}
	if string(blk[:8]) != "rawblock" || binary.LittleEndian.Uint32(blk[sbCRCOff:]) != crc32.Checksum(blk[:sbCRCOff], castagnoli) {
		t.Fatalf("superblock at %d does not have the layout this test knows (magic %q): update the offsets", off, blk[:8])
	}
	return blk
}

func writeBlock(t *testing.T, dev engine.Device, blk []byte, off int64, fixCRC bool) {
	t.Helper()
	if fixCRC {
		binary.LittleEndian.PutUint32(blk[sbCRCOff:], crc32.Checksum(blk[:sbCRCOff], castagnoli))
	}
	if _, err := dev.WriteAt(blk, off); err != nil {
		t.Fatal(err)
	}
}

// copyDevice copies the first size bytes of src into a new MemDevice of
// that size.
func copyDevice(t *testing.T, src engine.Device, size int64) engine.Device {
	t.Helper()
	dst := engine.NewMemDevice(size, src.BlockSize())
	buf := alignedBytes(1 << 20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		p := buf[:min(int64(len(buf)), size-off)]
		if _, err := src.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
		if _, err := dst.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

// expectCorrupt opens dev, which must fail with an error wrapping
// ErrCorrupt (mentioning each of words), without a panic and without
// writing to the device.
func expectCorrupt(t *testing.T, what string, dev engine.Device, words ...string) {
	t.Helper()
	before := deviceBytes(t, dev, 8<<20)
	mustNotPanic(t, "Open of "+what, func() {
		for _, ro := range []bool{false, true} {
			e, err := engine.Open(dev, engine.Options{CacheSize: 8 << 20, ReadOnly: ro})
			if err == nil {
				e.Close()
				t.Errorf("Open of %s (read-only %v) succeeded; want ErrCorrupt", what, ro)
				continue
			}
			if !errors.Is(err, engine.ErrCorrupt) {
				t.Errorf("Open of %s (read-only %v) = %v; want an error wrapping ErrCorrupt", what, ro, err)
			}
			for _, w := range words {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Open of %s: error %q does not mention %q", what, err, w)
				}
			}
		}
	})
	if !bytes.Equal(before, deviceBytes(t, dev, 8<<20)) {
		t.Errorf("a refused Open of %s changed the device", what)
	}
}

func TestMisuseOpenNotRawblock(t *testing.T) {
	const size = 32 << 20
	expectCorrupt(t, "a zeroed device", engine.NewMemDevice(size, 4096))
	expectCorrupt(t, "a zeroed 512-byte-sector device", engine.NewMemDevice(size, 512))

	// An ext4 superblock: magic 0xEF53 at byte 1024+56, a 4 KiB block
	// size (log 2) and some counts, as mkfs would leave them.
	ext4 := engine.NewMemDevice(size, 4096)
	blk := alignedBytes(4096)
	le := binary.LittleEndian
	sb := blk[1024:]
	le.PutUint32(sb[0:], 8192)    // s_inodes_count
	le.PutUint32(sb[4:], 8192)    // s_blocks_count_lo
	le.PutUint32(sb[24:], 2)      // s_log_block_size
	le.PutUint16(sb[56:], 0xEF53) // s_magic
	le.PutUint32(sb[76:], 1)      // s_rev_level
	copy(sb[120:], "data")        // s_volume_name
	writeBlock(t, ext4, blk, 0, false)
	expectCorrupt(t, "an ext4 device", ext4)

	// An XFS superblock: "XFSB" at byte 0, big-endian block size 4096.
	xfs := engine.NewMemDevice(size, 512)
	blk = alignedBytes(4096)
	copy(blk, "XFSB")
	binary.BigEndian.PutUint32(blk[4:], 4096)
	binary.BigEndian.PutUint64(blk[8:], size/4096)
	writeBlock(t, xfs, blk, 0, false)
	expectCorrupt(t, "an XFS device", xfs)

	// Random bytes over the first MiB.
	junk := engine.NewMemDevice(size, 4096)
	p := alignedBytes(1 << 20)
	fill(rand.New(rand.NewPCG(9, 9)), p)
	writeBlock(t, junk, p, 0, false)
	expectCorrupt(t, "random bytes", junk)

	// The magic with nothing valid behind it, in both copies.
	fake := engine.NewMemDevice(size, 4096)
	blk = alignedBytes(8192)
	copy(blk, "rawblock")
	copy(blk[4096:], "rawblock")
	writeBlock(t, fake, blk, 0, false)
	expectCorrupt(t, "a bare magic", fake)
}

func TestMisuseOpenNewerVersion(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	a := superblockAt(t, dev, 0)
	bs := int64(binary.LittleEndian.Uint32(a[sbBlockOff:]))
	b := superblockAt(t, dev, bs)
	saveA, saveB := bytes.Clone(a), bytes.Clone(b)
	v := binary.LittleEndian.Uint32(a[sbVersionOff:])
	for _, newer := range []uint32{v + 1, v + 100, math.MaxUint32} {
		for _, sb := range [][]byte{a, b} {
			binary.LittleEndian.PutUint32(sb[sbVersionOff:], newer)
		}
		writeBlock(t, dev, a, 0, true)
		writeBlock(t, dev, b, bs, true)
		expectCorrupt(t, fmt.Sprintf("format version %d", newer), dev, "version", fmt.Sprint(newer))
	}
	// Restored, the device opens with everything on it: the refusals
	// changed nothing.
	writeBlock(t, dev, saveA, 0, false)
	writeBlock(t, dev, saveB, bs, false)
	e, err := engine.Open(dev, smallOpts)
	if err != nil {
		t.Fatalf("Open after restoring the superblocks: %v", err)
	}
	checkAll(t, e, want, "after restoring the superblocks")
	e.Close()
}

// TestMisuseOpenDamaged: both superblock copies or both checkpoints bad is
// ErrCorrupt; one bad copy of either is survived with the data intact.
func TestMisuseOpenDamaged(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	e, want := populate(t, dev)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	a := superblockAt(t, dev, 0)
	bs := int64(binary.LittleEndian.Uint32(a[sbBlockOff:]))
	b := superblockAt(t, dev, bs)
	ckpt := [2]int64{int64(binary.LittleEndian.Uint64(a[sbCkptOff:])) * bs, int64(binary.LittleEndian.Uint64(a[sbCkptOff+8:])) * bs}
	damage := func(off int64, at int) []byte {
		blk := alignedBytes(int(bs))
		if _, err := dev.ReadAt(blk, off); err != nil {
			t.Fatal(err)
		}
		saved := bytes.Clone(blk)
		blk[at] ^= 0x5a
		writeBlock(t, dev, blk, off, false)
		return saved
	}
	opensWith := func(what string) {
		t.Helper()
		e, err := engine.Open(dev, smallOpts)
		if err != nil {
			t.Fatalf("Open with %s: %v", what, err)
		}
		checkAll(t, e, want, "with "+what)
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}

	// Superblocks: a bad checksum in one copy, then in both.
	saveA := damage(0, 20)
	opensWith("superblock A damaged")
	saveB := damage(bs, 40)
	expectCorrupt(t, "both superblocks damaged", dev, "superblock")
	writeBlock(t, dev, saveA, 0, false)
	opensWith("superblock B damaged")
	writeBlock(t, dev, saveB, bs, false)
	// A checksummed superblock whose layout is impossible (data region
	// past the end of the device), in both copies.
	for _, sb := range [][]byte{a, b} {
		binary.LittleEndian.PutUint64(sb[80:], 1<<40)
	}
	writeBlock(t, dev, a, 0, true)
	writeBlock(t, dev, b, bs, true)
	expectCorrupt(t, "an impossible layout", dev, "superblock")
	writeBlock(t, dev, saveA, 0, false)
	writeBlock(t, dev, saveB, bs, false)

	// Checkpoints: both damaged is ErrCorrupt.
	c0 := damage(ckpt[0], 30)
	c1 := damage(ckpt[1], 30)
	expectCorrupt(t, "both checkpoints damaged", dev, "checkpoint")
	writeBlock(t, dev, c0, ckpt[0], false)
	writeBlock(t, dev, c1, ckpt[1], false)
	opensWith("everything restored")
}

// TestMisuseOpenShrunk: a device smaller than it was at Format is refused
// with ErrCorrupt, however much smaller, never read past its end.
func TestMisuseOpenShrunk(t *testing.T) {
	const size = 48 << 20
	dev := engine.NewMemDevice(size, 4096)
	e, _ := populate(t, dev)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	for _, smaller := range []int64{size - 4096, size / 2, engine.MinDeviceSize, 1 << 20, 64 << 10, 8192, 4096} {
		expectCorrupt(t, fmt.Sprintf("a %d-byte copy of a %d-byte device", smaller, int64(size)), copyDevice(t, dev, smaller))
	}

	// A real file, formatted, then cut short past the last block in use, so
	// that growing it back restores it exactly.
	path := filepath.Join(t.TempDir(), "dev")
	fdev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	e, want := populate(t, fdev)
	var used int64
	for name := range want {
		o, _ := e.Object(name)
		for _, x := range o.Extents() {
			if x.State != engine.Written {
				t.Fatalf("%s: extent %+v after Sync", name, x)
			}
			used = max(used, x.Physical+x.Length)
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := fdev.Close(); err != nil {
		t.Fatal(err)
	}
	cut := max((used+4095)&^4095, size/2)
	if cut >= size {
		t.Fatalf("data reaches %d of the %d-byte device: nothing can be cut off", used, int64(size))
	}
	if err := os.Truncate(path, cut); err != nil {
		t.Fatal(err)
	}
	fdev, err = engine.OpenDevice(path, engine.DeviceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	expectCorrupt(t, fmt.Sprintf("a file cut from %d to %d bytes", int64(size), cut), fdev)
	if err := fdev.Close(); err != nil {
		t.Fatal(err)
	}
	fdev, err = engine.OpenDevice(path, engine.DeviceOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fdev.Close() })
	e, err = engine.Open(fdev, smallOpts)
	if err != nil {
		t.Fatalf("Open after growing the file back: %v", err)
	}
	defer e.Close()
	checkAll(t, e, want, "after growing the file back")
}

// TestMisuseSecondOpen: a file device open read-write cannot be opened
// again, read-write or read-only, in this process or another; read-only
// opens coexist, serve reads concurrently, and keep a writer out.
func TestMisuseSecondOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e, want := populate(t, dev)
	for _, ro := range []bool{false, true} {
		if d2, err := engine.OpenDevice(path, engine.DeviceOptions{ReadOnly: ro}); !errors.Is(err, engine.ErrInUse) || !errors.Is(err, fs.ErrExist) {
			t.Errorf("second OpenDevice (read-only %v) while open read-write = %v; want ErrInUse", ro, err)
			if err == nil {
				d2.Close()
			}
		} else if !strings.Contains(err.Error(), path) {
			t.Errorf("second OpenDevice error %q does not name the path", err)
		}
	}
	if out := openFromOtherProcess(t, path); out != "rw in-use\nro in-use\n" {
		t.Errorf("another process opening the device: %q; want both refused as in use", out)
	}
	// The first opener was not disturbed.
	o, _ := e.Object("o2")
	if _, err := o.WriteAt([]byte("still mine"), 0); err != nil {
		t.Fatal(err)
	}
	copy(want["o2"], "still mine")
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}

	// Two read-only devices and engines at once, reading concurrently.
	var ros []*engine.Engine
	for i := 0; i < 2; i++ {
		d, err := engine.OpenDevice(path, engine.DeviceOptions{ReadOnly: true})
		if err != nil {
			t.Fatalf("read-only OpenDevice %d: %v", i, err)
		}
		t.Cleanup(func() { d.Close() })
		e, err := engine.Open(d, engine.Options{CacheSize: 8 << 20, ReadOnly: true})
		if err != nil {
			t.Fatalf("read-only Open %d: %v", i, err)
		}
		ros = append(ros, e)
	}
	if d2, err := engine.OpenDevice(path, engine.DeviceOptions{}); !errors.Is(err, engine.ErrInUse) {
		t.Errorf("read-write OpenDevice while open read-only = %v; want ErrInUse", err)
		if err == nil {
			d2.Close()
		}
	}
	if out := openFromOtherProcess(t, path); out != "rw in-use\nro ok\n" {
		t.Errorf("another process opening a device open read-only: %q; want read-write refused, read-only allowed", out)
	}
	var wg sync.WaitGroup
	for i, e := range ros {
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for name, w := range want {
					o, err := e.Object(name)
					if err != nil {
						t.Errorf("engine %d: %v", i, err)
						return
					}
					if err := checkObject(o, w); err != nil {
						t.Errorf("engine %d, %s: %v", i, name, err)
					}
				}
			}()
		}
	}
	waitOrDie(t, "read-only readers", &wg)
	// A read-only engine refuses every change, and changes nothing.
	ro := ros[0]
	o, _ = ro.Object("o4")
	if n, err := o.WriteAt([]byte("no"), 0); n != 0 || !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("WriteAt on a read-only engine = %d, %v; want ErrReadOnly", n, err)
	}
	if err := o.Truncate(0); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Truncate on a read-only engine = %v; want ErrReadOnly", err)
	}
	if err := o.PunchHole(0, 10); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("PunchHole on a read-only engine = %v; want ErrReadOnly", err)
	}
	if _, err := ro.Create("new"); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Create on a read-only engine = %v; want ErrReadOnly", err)
	}
	if err := ro.Remove("o4"); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Remove on a read-only engine = %v; want ErrReadOnly", err)
	}
	if err := o.Sync(); err != nil {
		t.Errorf("Object.Sync on a read-only engine = %v; want nil (nothing to write)", err)
	}
	if err := ro.Sync(); err != nil {
		t.Errorf("Engine.Sync on a read-only engine = %v; want nil", err)
	}
	for i, e := range ros {
		checkAll(t, e, want, fmt.Sprintf("read-only engine %d", i))
		if err := e.Close(); err != nil {
			t.Errorf("Close of read-only engine %d: %v", i, err)
		}
	}
}

// openFromOtherProcess runs this test binary as a child that tries to open
// path read-write and read-only, and returns what it reported.
func openFromOtherProcess(t *testing.T, path string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestMisuseOpenHelperProcess$", "-test.v=false")
	cmd.Env = append(os.Environ(), "RAWBLOCK_TEST_OPEN_PATH="+path)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child process: %v\n%s", err, out)
	}
	// The child's test framework prints PASS after our lines.
	s := string(out)
	if i := strings.Index(s, "PASS"); i >= 0 {
		s = s[:i]
	}
	return s
}

// TestMisuseOpenHelperProcess is the child of openFromOtherProcess: it runs
// only when that sets RAWBLOCK_TEST_OPEN_PATH, and prints one line per open
// mode: "in-use" when refused with ErrInUse, "ok" when it succeeded.
func TestMisuseOpenHelperProcess(t *testing.T) {
	path := os.Getenv("RAWBLOCK_TEST_OPEN_PATH")
	if path == "" {
		t.Skip("runs only as the child of TestMisuseSecondOpen")
	}
	for _, ro := range []bool{false, true} {
		mode := map[bool]string{false: "rw", true: "ro"}[ro]
		d, err := engine.OpenDevice(path, engine.DeviceOptions{ReadOnly: ro})
		switch {
		case err == nil:
			d.Close()
			fmt.Printf("%s ok\n", mode)
		case errors.Is(err, engine.ErrInUse):
			fmt.Printf("%s in-use\n", mode)
		default:
			fmt.Printf("%s error: %v\n", mode, err)
		}
	}
}

// TestMisuseReadWriteOpenOfReadOnlyDevice: an engine opened read-write on a
// device opened read-only can never make a write durable, so it must not
// acknowledge one: either Open refuses with ErrReadOnly, or the engine
// serves it read-only and refuses changes with ErrReadOnly. Accepting
// Create and WriteAt and failing only at Sync or Close loses acknowledged
// data.
func TestMisuseReadWriteOpenOfReadOnlyDevice(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e, want := populate(t, dev)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := engine.OpenDevice(path, engine.DeviceOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ro.Close() })
	e, err = engine.Open(ro, smallOpts)
	if err != nil {
		if !errors.Is(err, engine.ErrReadOnly) {
			t.Fatalf("read-write Open of a read-only device = %v; want an error wrapping ErrReadOnly", err)
		}
		return
	}
	defer e.Close()
	if _, err := e.Create("new"); !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("Create on an engine over a read-only device = %v; want ErrReadOnly (it can never be made durable)", err)
	}
	o, err := e.Object("o4")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := o.WriteAt([]byte("lost"), 0); n != 0 || !errors.Is(err, engine.ErrReadOnly) {
		t.Errorf("WriteAt on an engine over a read-only device = %d, %v; want 0, ErrReadOnly (it can never be made durable)", n, err)
	}
	checkAll(t, e, want, "engine over a read-only device")
}

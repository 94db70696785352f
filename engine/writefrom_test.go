package engine

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"testing"
	"testing/iotest"

	"pgregory.net/rapid"
)

// TestWriteFromModel: WriteFrom and WriteAt, mixed, at random (unaligned)
// offsets and lengths, with Syncs and a reopen, against a byte-slice model.
func TestWriteFromModel(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		dev := NewMemDevice(64<<20, 4096)
		opts := Options{CacheSize: 8 << 20}
		e := mustFormatOpen(t, dev, opts)
		o, err := e.Create("x")
		if err != nil {
			rt.Fatal(err)
		}
		var model []byte
		steps := rapid.IntRange(1, 40).Draw(rt, "steps")
		for i := 0; i < steps; i++ {
			off := rapid.Int64Range(0, 3<<20).Draw(rt, "off")
			n := rapid.IntRange(1, 700<<10).Draw(rt, "n")
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(i*31 + j*7 + 1)
			}
			if rapid.Bool().Draw(rt, "from") {
				// One byte at a time now and then: a reader that
				// returns less than asked for.
				var r io.Reader = bytes.NewReader(p)
				if rapid.IntRange(0, 4).Draw(rt, "slow") == 0 {
					r = iotest.OneByteReader(r)
				}
				k, err := o.WriteFrom(r, off, int64(n))
				if err != nil || k != int64(n) {
					rt.Fatalf("WriteFrom(%d bytes at %d) = %d, %v", n, off, k, err)
				}
			} else if k, err := o.WriteAt(p, off); err != nil || k != n {
				rt.Fatalf("WriteAt(%d bytes at %d) = %d, %v", n, off, k, err)
			}
			if end := off + int64(n); end > int64(len(model)) {
				model = append(model, make([]byte, end-int64(len(model)))...)
			}
			copy(model[off:], p)
			if rapid.IntRange(0, 5).Draw(rt, "sync") == 0 {
				if err := o.Sync(); err != nil {
					rt.Fatal(err)
				}
			}
		}
		check := func(stage string) {
			if o.Size() != int64(len(model)) {
				rt.Fatalf("%s: size %d, model %d", stage, o.Size(), len(model))
			}
			got := make([]byte, len(model))
			if k, err := o.ReadAt(got, 0); k != len(got) || (err != nil && err != io.EOF) {
				rt.Fatalf("%s: ReadAt = %d, %v", stage, k, err)
			}
			if i := firstDiff(got, model); i >= 0 {
				rt.Fatalf("%s: byte %d differs from the model", stage, i)
			}
		}
		check("written")
		if err := e.Close(); err != nil {
			rt.Fatal(err)
		}
		if e, err = Open(dev, opts); err != nil {
			rt.Fatal(err)
		}
		defer e.Close()
		if o, err = e.Object("x"); err != nil {
			rt.Fatal(err)
		}
		check("reopened")
		checkInvariants(rt, e)
	})
}

// TestWriteFromFailingReader: a reader that fails or ends early writes
// nothing, and the object and the engine's budgets are as before.
func TestWriteFromFailingReader(t *testing.T) {
	e := mustFormatOpen(t, NewMemDevice(32<<20, 4096), Options{CacheSize: 8 << 20})
	defer e.Close()
	o, _ := e.Create("x")
	base := bytes.Repeat([]byte{5}, 100<<10)
	if _, err := o.WriteAt(base, 0); err != nil {
		t.Fatal(err)
	}
	if err := o.Sync(); err != nil {
		t.Fatal(err)
	}
	before := e.Stats()
	boom := errors.New("boom")
	for _, c := range []struct {
		name string
		r    io.Reader
		want error
	}{
		{"fails", io.MultiReader(bytes.NewReader(make([]byte, 50<<10)), iotest.ErrReader(boom)), boom},
		{"ends", bytes.NewReader(make([]byte, 50<<10)), io.ErrUnexpectedEOF},
	} {
		k, err := o.WriteFrom(c.r, 1000, 200<<10)
		if k != 0 || !errors.Is(err, c.want) {
			t.Fatalf("%s: WriteFrom = %d, %v; want 0 and %v", c.name, k, err, c.want)
		}
	}
	if o.Size() != int64(len(base)) {
		t.Fatalf("size %d after failed writes, want %d", o.Size(), len(base))
	}
	got := make([]byte, len(base))
	o.ReadAt(got, 0)
	if !bytes.Equal(got, base) {
		t.Fatal("contents changed by failed writes")
	}
	after := e.Stats()
	if after.DirtyBytes != before.DirtyBytes || after.ReservedBytes != before.ReservedBytes {
		t.Fatalf("dirty %d -> %d, reserved %d -> %d after failed writes", before.DirtyBytes, after.DirtyBytes, before.ReservedBytes, after.ReservedBytes)
	}
	checkInvariants(t, e)
	// A write bigger than a quarter of the dirty limit goes through a
	// buffer and WriteAt, with the same result.
	big := bytes.Repeat([]byte{9}, 3<<20)
	if k, err := o.WriteFrom(bytes.NewReader(big), 4096, int64(len(big))); err != nil || k != int64(len(big)) {
		t.Fatalf("big WriteFrom = %d, %v", k, err)
	}
	got = make([]byte, len(big))
	o.ReadAt(got, 4096)
	if !bytes.Equal(got, big) {
		t.Fatal("big WriteFrom contents")
	}
	if _, err := o.WriteFrom(bytes.NewReader(nil), -1, 1); !errors.Is(err, errInvalid) {
		t.Fatalf("negative offset: %v", err)
	}
}

// A WriteFrom the engine refuses reads nothing from r, whatever its size:
// after Close, on a removed object, without the space, and over
// MaxWriteFromBuffer (an error, not an allocation of n bytes).
func TestWriteFromRefusesBeforeReading(t *testing.T) {
	// With a 4 MiB cache a quarter of the dirty limit is well under
	// 8 MiB: n 64 KiB goes through frames, 8 MiB through a buffer.
	for _, n := range []int64{64 << 10, 8 << 20} {
		e := mustFormatOpen(t, NewMemDevice(32<<20, 4096), Options{CacheSize: 4 << 20})
		o, err := e.Create("a")
		if err != nil {
			t.Fatal(err)
		}
		gone, err := e.Create("gone")
		if err != nil {
			t.Fatal(err)
		}
		if err := e.Remove("gone"); err != nil {
			t.Fatal(err)
		}
		refused := func(what string, o *Object, off, n int64, want error) {
			t.Helper()
			r := bytes.NewReader(make([]byte, 1<<20))
			k, err := o.WriteFrom(r, off, n)
			if k != 0 || !errors.Is(err, want) || r.Len() != 1<<20 {
				t.Fatalf("%s (n %d): WriteFrom = %d, %v, read %d bytes; want 0, %v, none read", what, n, k, err, 1<<20-r.Len(), want)
			}
		}
		refused("removed", gone, 0, n, fs.ErrNotExist)
		refused("huge", o, 0, 1<<49, fs.ErrInvalid)
		refused("over the buffer limit", o, 0, MaxWriteFromBuffer+1, fs.ErrInvalid)
		// Fill the device but for less than n.
		st := e.Stats()
		fill := make([]byte, (st.FreeBytes-st.ReservedBytes-n/2)/4096*4096)
		if _, err := o.WriteAt(fill, 0); err != nil {
			t.Fatal(err)
		}
		refused("no space", o, int64(len(fill)), n, ErrNoSpace)
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		refused("after Close", o, 0, n, ErrClosed)
	}
}

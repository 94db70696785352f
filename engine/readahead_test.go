package engine

import (
	"bytes"
	"math/rand/v2"
	"syscall"
	"testing"
)

// TestReadaheadSeesChanges reads an object sequentially from a cold cache,
// so that readahead windows are read (or in flight) ahead of the reader,
// and between reads changes the blocks ahead of it: overwrites, punched
// holes, truncation and extension, both inside and outside the windows,
// synced or not. Every read must see the object as it is now, never a
// window's older copy.
func TestReadaheadSeesChanges(t *testing.T) {
	onMemAndFile(t, 64<<20, func(t *testing.T, dev Device) {
		seed := rand.Uint64()
		t.Logf("seed %d", seed)
		r := rand.New(rand.NewPCG(seed, 7))
		const size = 8 << 20
		model := randomBytes(r, size)
		e, o := writeObject(t, dev, model)
		for round := 0; round < 4; round++ {
			// Close and reopen: the cache is cold, reads go to
			// the device and readahead starts.
			e, o = reopenCold(t, e, dev)
			const chunk = 128 << 10
			buf := make([]byte, chunk)
			for off := int64(0); off < int64(len(model)); off += chunk {
				n, err := o.ReadAt(buf, off)
				want := model[off:min(off+chunk, int64(len(model)))]
				if n != len(want) || !bytes.Equal(buf[:n], want) {
					t.Fatalf("round %d: read at %d: %d bytes (err %v), differ from the model", round, off, n, err)
				}
				// Change something ahead, usually inside the
				// windows (up to 1 MiB ahead), sometimes far.
				at := off + chunk + r.Int64N(2<<20)
				switch k := r.IntN(10); {
				case k < 5 && at < int64(len(model)):
					p := randomBytes(r, 1+r.IntN(20000))
					if _, err := o.WriteAt(p, at); err != nil {
						t.Fatal(err)
					}
					if end := at + int64(len(p)); end > int64(len(model)) {
						model = append(model, make([]byte, end-int64(len(model)))...)
					}
					copy(model[at:], p)
				case k < 7 && at < int64(len(model)):
					l := min(1+r.Int64N(30000), int64(len(model))-at)
					if err := o.PunchHole(at, l); err != nil {
						t.Fatal(err)
					}
					clear(model[at : at+l])
				case k < 8 && at < int64(len(model)) && r.IntN(4) == 0:
					if err := o.Truncate(at); err != nil {
						t.Fatal(err)
					}
					model = model[:at]
				case k < 9:
					if err := o.Sync(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if got := o.Size(); got != int64(len(model)) {
				t.Fatalf("size %d, model %d", got, len(model))
			}
			if len(model) < size/2 {
				// Grow back so the next round has something to read.
				p := randomBytes(r, size-len(model))
				if _, err := o.WriteAt(p, int64(len(model))); err != nil {
					t.Fatal(err)
				}
				model = append(model, p...)
			}
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

// TestReadaheadFailures fails device reads (errors and short reads) while a
// sequential reader runs from a cold cache, so that readahead windows fail
// in flight. A read may return an error, but never data that differs from
// what was written, and once the faults are gone every byte reads back.
func TestReadaheadFailures(t *testing.T) {
	for _, short := range []bool{false, true} {
		dev := NewFaultDevice(64<<20, 4096)
		seed := rand.Uint64()
		t.Logf("short %v, seed %d", short, seed)
		r := rand.New(rand.NewPCG(seed, 9))
		model := randomBytes(r, 6<<20)
		e, _ := writeObject(t, dev, model)
		e, o := reopenCold(t, e, dev)
		f := Fault{Op: FaultRead, Times: -1, Match: func(off, n int64) bool { return r.IntN(4) == 0 }}
		if short {
			f.Short = true
		} else {
			f.Err = syscall.EIO
		}
		if err := dev.Inject(f); err != nil {
			t.Fatal(err)
		}
		const chunk = 64 << 10
		buf := make([]byte, chunk)
		failed := 0
		for off := int64(0); off < int64(len(model)); off += chunk {
			n, err := o.ReadAt(buf, off)
			if err != nil {
				failed++
				continue
			}
			if !bytes.Equal(buf[:n], model[off:off+int64(n)]) || n != chunk {
				t.Fatalf("read at %d under faults: %d bytes differ from what was written", off, n)
			}
		}
		dev.ClearFaults()
		for off := int64(0); off < int64(len(model)); off += chunk {
			n, err := o.ReadAt(buf, off)
			if err != nil || n != chunk || !bytes.Equal(buf, model[off:off+chunk]) {
				t.Fatalf("read at %d after the faults: %d bytes, %v", off, n, err)
			}
		}
		t.Logf("%d of %d reads failed under faults", failed, len(model)/chunk)
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// randomBytes returns n bytes from r.
func randomBytes(r *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// reopenCold closes e (if not nil) and opens dev again with an 8 MiB cache,
// so that the object's data is read from the device, and returns the
// engine and the object "obj".
func reopenCold(t *testing.T, e *Engine, dev Device) (*Engine, *Object) {
	t.Helper()
	if e != nil {
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
	}
	e, err := Open(dev, Options{CacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	o, err := e.Object("obj")
	if err != nil {
		t.Fatal(err)
	}
	return e, o
}

// writeObject formats dev, writes model to a new object "obj" and returns
// the engine and the object.
func writeObject(t *testing.T, dev Device, model []byte) (*Engine, *Object) {
	t.Helper()
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	o, err := e.Create("obj")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	return e, o
}

package engine

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"
)

// cloneDevice copies a MemDevice: what a crash at this instant would leave,
// since a MemDevice has no volatile cache.
func cloneDevice(t testing.TB, dev Device) Device {
	t.Helper()
	out := NewMemDevice(dev.Size(), dev.BlockSize())
	buf := make([]byte, 1<<20)
	for off := int64(0); off < dev.Size(); off += int64(len(buf)) {
		n := min(int64(len(buf)), dev.Size()-off)
		if _, err := dev.ReadAt(buf[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf[:n], make([]byte, n)) {
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
		}
	}
	return out
}

// verifyModel checks that every object of e reads exactly as in m, and that
// e has no other objects.
func verifyModel(t testing.TB, e *Engine, m map[string][]byte) {
	t.Helper()
	names := e.Objects()
	if len(names) != len(m) {
		t.Fatalf("objects %v, want %d of them", names, len(m))
	}
	for name, want := range m {
		o, err := e.Object(name)
		if err != nil {
			t.Fatalf("object %q: %v", name, err)
		}
		if o.Size() != int64(len(want)) {
			t.Fatalf("object %q: size %d, want %d", name, o.Size(), len(want))
		}
		got := make([]byte, len(want))
		if n, err := o.ReadAt(got, 0); n != len(want) || (err != nil && n != len(got)) {
			t.Fatalf("object %q: read %d, %v", name, n, err)
		}
		if !bytes.Equal(got, want) {
			i := 0
			for i < len(got) && got[i] == want[i] {
				i++
			}
			t.Fatalf("object %q: differs from byte %d (size %d)", name, i, len(want))
		}
	}
}

// TestJournalRecovery runs random changes with a small journal (so it wraps
// and checkpoints often), and after every Engine.Sync opens a copy of the
// device as a crash would leave it: it must hold exactly the synced state.
func TestJournalRecovery(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			dev := NewMemDevice(32<<20, 512)
			if err := Format(dev, FormatOptions{MetadataSize: 256 << 10}); err != nil {
				t.Fatal(err)
			}
			e, err := Open(dev, Options{CacheSize: 4 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer e.Close()
			model := map[string][]byte{}
			steps := 300
			if testing.Short() {
				steps = 120
			}
			for step := 0; step < steps; step++ {
				name := fmt.Sprintf("o%d", rng.IntN(6))
				switch k := rng.IntN(10); {
				case k == 0:
					if _, ok := model[name]; ok {
						if err := e.Remove(name); err != nil {
							t.Fatal(err)
						}
						delete(model, name)
					}
				case k == 1:
					if o, err := e.Object(name); err == nil {
						size := rng.Int64N(int64(len(model[name])) + 1)
						if rng.IntN(3) == 0 {
							size = int64(len(model[name])) + rng.Int64N(20000)
						}
						if err := o.Truncate(size); err != nil {
							t.Fatal(err)
						}
						b := model[name]
						if size <= int64(len(b)) {
							model[name] = b[:size]
						} else {
							model[name] = append(b, make([]byte, size-int64(len(b)))...)
						}
					}
				case k == 2:
					if o, err := e.Object(name); err == nil && len(model[name]) > 0 {
						b := model[name]
						off := rng.Int64N(int64(len(b)))
						n := rng.Int64N(int64(len(b))-off) + 1
						if err := o.PunchHole(off, n); err != nil {
							t.Fatal(err)
						}
						clear(b[off : off+n])
					}
				default:
					o, err := e.Object(name)
					if err != nil {
						if o, err = e.Create(name); err != nil {
							t.Fatal(err)
						}
						model[name] = nil
					}
					off := rng.Int64N(200000)
					p := make([]byte, rng.IntN(30000)+1)
					for i := range p {
						p[i] = byte(rng.IntN(255) + 1)
					}
					if _, err := o.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					b := model[name]
					if end := off + int64(len(p)); end > int64(len(b)) {
						b = append(b, make([]byte, end-int64(len(b)))...)
					}
					copy(b[off:], p)
					model[name] = b
				}
				if rng.IntN(4) == 0 {
					if err := e.Sync(); err != nil {
						t.Fatal(err)
					}
					crashed := cloneDevice(t, dev)
					if rep, err := Check(crashed); err != nil {
						t.Fatalf("step %d: check after crash: %v (%v)", step, err, rep.Problems)
					}
					e2, err := Open(crashed, Options{CacheSize: 4 << 20, ReadOnly: true})
					if err != nil {
						t.Fatalf("step %d: open after crash: %v", step, err)
					}
					verifyModel(t, e2, model)
					checkInvariants(t, e2)
					e2.Close()
				}
			}
			if st := e.Stats(); st.Checkpoints == 0 {
				t.Fatalf("no checkpoint was written: the ring never filled (stats %+v)", st)
			}
		})
	}
}

// TestJournalSyncCost: a 4 KiB write + Object.Sync writes at most two
// journal blocks, however many objects exist.
func TestJournalSyncCost(t *testing.T) {
	dev := NewMemDevice(64<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	defer e.Close()
	for i := 0; i < 2000; i++ {
		if _, err := e.Create(fmt.Sprintf("obj-%05d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	o, _ := e.Object("obj-01000")
	p := bytes.Repeat([]byte{7}, 4096)
	for i := 0; i < 20; i++ {
		before := e.Stats()
		if _, err := o.WriteAt(p, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if err := o.Sync(); err != nil {
			t.Fatal(err)
		}
		after := e.Stats()
		if d := after.JournalBytesWritten - before.JournalBytesWritten; d > 2*4096 || d == 0 {
			t.Fatalf("write %d: %d journal bytes for one 4 KiB write + Sync", i, d)
		}
	}
}

// TestCleanCloseNothingToReplay: Close checkpoints, so the next open replays
// no transaction.
func TestCleanCloseNothingToReplay(t *testing.T) {
	dev := NewMemDevice(32<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 4 << 20})
	o, _ := e.Create("a")
	for i := 0; i < 10; i++ {
		o.WriteAt([]byte("hello"), int64(i)*10000)
		if err := o.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	l, err := load(dev)
	if err != nil {
		t.Fatal(err)
	}
	if l.ring.txs == 0 {
		t.Fatal("Syncs left nothing in the journal")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if l, err = load(dev); err != nil {
		t.Fatal(err)
	}
	if l.ring.txs != 0 {
		t.Fatalf("clean close left %d transactions to replay", l.ring.txs)
	}
}

// TestJournalTornTail: damaging the newest transaction loses only it; the
// state before it opens.
func TestJournalTornTail(t *testing.T) {
	dev := NewMemDevice(32<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 4 << 20})
	defer e.Close()
	o, _ := e.Create("a")
	o.WriteAt([]byte("first"), 0)
	if err := o.Sync(); err != nil {
		t.Fatal(err)
	}
	head := e.ring.head
	o.WriteAt([]byte("second"), 100)
	if err := o.Sync(); err != nil {
		t.Fatal(err)
	}
	crashed := cloneDevice(t, dev)
	// Flip a byte inside the second transaction.
	blk := make([]byte, 4096)
	off := (e.sb.JournalStart + head) * 4096
	crashed.ReadAt(blk, off)
	blk[txHeaderLen+3] ^= 0xff
	crashed.WriteAt(blk, off)
	e2, err := Open(crashed, Options{CacheSize: 4 << 20, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	o2, err := e2.Object("a")
	if err != nil {
		t.Fatal(err)
	}
	if o2.Size() != 5 {
		t.Fatalf("size %d after losing the torn tail, want 5", o2.Size())
	}
}

// flushDelayDevice makes Flush slow, as on a real disk, so concurrent Syncs
// overlap.
type flushDelayDevice struct {
	Device
	delay   time.Duration
	mu      sync.Mutex
	flushes int
}

func (d *flushDelayDevice) Flush() error {
	d.mu.Lock()
	d.flushes++
	d.mu.Unlock()
	time.Sleep(d.delay)
	return d.Device.Flush()
}

// TestGroupCommit: 16 goroutines each writing and syncing their own object
// share commits.
func TestGroupCommit(t *testing.T) {
	dev := &flushDelayDevice{Device: NewMemDevice(64<<20, 4096), delay: 2 * time.Millisecond}
	e := mustFormatOpen(t, dev, Options{CacheSize: 8 << 20})
	defer e.Close()
	const workers, rounds = 16, 20
	var wg sync.WaitGroup
	before := e.Stats()
	for w := 0; w < workers; w++ {
		o, err := e.Create(fmt.Sprint("w", w))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 4096)
			for i := 0; i < rounds; i++ {
				binary.LittleEndian.PutUint64(p, uint64(i))
				if _, err := o.WriteAt(p, int64(i)*4096); err != nil {
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
	commits := e.Stats().Commits - before.Commits
	if commits >= workers*rounds/2 {
		t.Fatalf("%d commits for %d Syncs: concurrent Syncs did not share commits", commits, workers*rounds)
	}
	t.Logf("%d commits for %d Syncs", commits, workers*rounds)
}

// FuzzJournalTx feeds arbitrary bytes to the transaction decoder and replays
// what decodes onto a small state: nothing may panic or allocate without
// bound.
func FuzzJournalTx(f *testing.F) {
	sb, err := layout(64<<20, 512, 512, 0)
	if err != nil {
		f.Fatal(err)
	}
	var ops []byte
	ops = appendOp(ops, jop{kind: opCreate, id: 1, name: "a"})
	ops = appendOp(ops, jop{kind: opSize, id: 1, size: 5000})
	ops = appendOp(ops, jop{kind: opMap, id: 1, logical: 0, physical: sb.DataStart, length: 4})
	ops = appendOp(ops, jop{kind: opUnmap, id: 1, logical: 2, length: 1})
	ops = appendOp(ops, jop{kind: opRemove, id: 1})
	tx := make([]byte, txBlocks(len(ops), 512)*512)
	encodeTx(tx, ops, 512, 2, 7, sb.UUID)
	f.Add(tx)
	f.Add(tx[:512])
	f.Add(make([]byte, 512))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 512 {
			return
		}
		h, err := parseTxHeader(data[:512])
		if err != nil {
			return
		}
		if h.blocks*512 > len(data) {
			return
		}
		payload, err := verifyTx(data[:h.blocks*512], h)
		if err != nil {
			// Exercise the operation decoder on unchecked bytes too.
			payload = data[txHeaderLen:]
		}
		m, err := newMetaState(&sb, &checkpoint{NextObjectID: 1})
		if err != nil {
			t.Fatal(err)
		}
		if decodeOps(payload, m.apply) == nil {
			if _, err := m.usedExtents(); err != nil {
				return
			}
		}
	})
}

// TestCheckFindsProblems: Check reports a clean device as clean, and a
// checkpoint whose objects share device blocks, or map past their size, as
// corrupt with each problem listed.
func TestCheckFindsProblems(t *testing.T) {
	dev := NewMemDevice(32<<20, 4096)
	e := mustFormatOpen(t, dev, Options{CacheSize: 4 << 20})
	o, _ := e.Create("a")
	o.WriteAt(bytes.Repeat([]byte{1}, 3*4096), 0)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	rep, err := Check(dev)
	if err != nil {
		t.Fatalf("clean device: %v %v", err, rep.Problems)
	}
	if rep.ObjectCount != 1 || rep.ExtentCount != 1 || rep.UsedBlocks != 3 || rep.FreeBlocks != rep.Layout.DataBlocks-3 {
		t.Fatalf("report %+v", rep)
	}
	l, _ := load(dev)
	ds := l.sb.DataStart
	bad := &checkpoint{Seq: l.ckpt.Seq + 10, NextObjectID: 3, JournalPos: l.ring.head, Chain: 1, Objects: []ckptObject{
		{ID: 1, Name: "a", Size: 3 * 4096, Extents: []ckptExtent{{0, ds, 3}}},
		{ID: 2, Name: "b", Size: 2 * 4096, Extents: []ckptExtent{{0, ds + 2, 2}}},
	}}
	data, err := encodeCheckpoint(nil, bad, 4096, l.sb.CkptBlocks)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dev.WriteAt(data, l.sb.CkptStart[1-l.ckptSlot]*4096); err != nil {
		t.Fatal(err)
	}
	rep, err = Check(dev)
	if !errors.Is(err, ErrCorrupt) || len(rep.Problems) == 0 {
		t.Fatalf("overlapping extents: err %v, problems %v", err, rep.Problems)
	}
	if _, err := Open(dev, Options{CacheSize: 4 << 20}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open of a device whose objects share blocks: %v", err)
	}
}

// TestMetadataFull: creating objects until the checkpoint region cannot
// hold another one gives ErrMetadataFull, corrupts nothing, and removing
// objects makes room again.
func TestMetadataFull(t *testing.T) {
	dev := NewMemDevice(32<<20, 4096)
	if err := Format(dev, FormatOptions{MetadataSize: 512 << 10}); err != nil {
		t.Fatal(err)
	}
	e, err := Open(dev, Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	long := string(bytes.Repeat([]byte("n"), 200))
	created := 0
	for ; ; created++ {
		_, err := e.Create(fmt.Sprintf("%s-%06d", long, created))
		if errors.Is(err, ErrMetadataFull) {
			break
		}
		if err != nil {
			t.Fatalf("create %d: %v", created, err)
		}
		if created > 100000 {
			t.Fatal("the metadata region never filled")
		}
	}
	t.Logf("%d objects fit", created)
	// Fragmenting writes hit the same limit.
	o, err := e.Object(fmt.Sprintf("%s-%06d", long, 0))
	if err != nil {
		t.Fatal(err)
	}
	for i := int64(0); i < 100000; i++ {
		if _, err := o.WriteAt([]byte{1}, i*2*4096); err != nil {
			if !errors.Is(err, ErrMetadataFull) {
				t.Fatalf("write %d: %v", i, err)
			}
			break
		}
	}
	if err := e.Close(); err != nil {
		t.Fatalf("close at full metadata: %v", err)
	}
	if rep, err := Check(dev); err != nil {
		t.Fatalf("check: %v %v", err, rep.Problems)
	}
	e, err = Open(dev, Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if n := len(e.Objects()); n != created {
		t.Fatalf("%d objects after reopen, %d created", n, created)
	}
	for i := 1; i < 40; i++ {
		if err := e.Remove(fmt.Sprintf("%s-%06d", long, i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.Create("again"); err != nil {
		t.Fatalf("create after removals: %v", err)
	}
}

// TestMetadataFullComesBeforeSync: data written but not yet written back
// still needs extent records in the next checkpoint. Writes that would
// need more than the region holds are refused with ErrMetadataFull (which
// is ErrNoSpace) and change nothing; everything accepted then syncs,
// survives Close and Open, and the region is used to at least 90 % of what
// the records take.
func TestMetadataFullComesBeforeSync(t *testing.T) {
	type step func(i int) (name string, off int64, want byte, err error)
	run := func(t *testing.T, fo FormatOptions, perItem int64, do func(e *Engine) step) {
		dev := NewMemDevice(16<<20, 512)
		if err := Format(dev, fo); err != nil {
			t.Fatal(err)
		}
		e, err := Open(dev, Options{CacheSize: 64 << 20})
		if err != nil {
			t.Fatal(err)
		}
		next := do(e)
		type acked struct {
			name string
			off  int64
			b    byte
		}
		var done []acked
		for i := 0; ; i++ {
			if i > 1<<20 {
				t.Fatal("the metadata region never filled")
			}
			name, off, b, err := next(i)
			if err != nil {
				if !errors.Is(err, ErrMetadataFull) || !errors.Is(err, ErrNoSpace) {
					t.Fatalf("item %d: %v, want ErrMetadataFull wrapping ErrNoSpace", i, err)
				}
				break
			}
			done = append(done, acked{name, off, b})
		}
		if fit := e.metaLimit() / perItem; int64(len(done)) < fit*9/10 {
			t.Errorf("%d items accepted; about %d fit the region", len(done), fit)
		}
		if err := e.Sync(); err != nil {
			t.Fatalf("Sync after %d accepted items: %v", len(done), err)
		}
		if err := e.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if e, err = Open(dev, Options{CacheSize: 8 << 20}); err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		for _, a := range done {
			o, err := e.Object(a.name)
			if err != nil {
				t.Fatal(err)
			}
			var b [1]byte
			if _, err := o.ReadAt(b[:], a.off); err != nil || b[0] != a.b {
				t.Fatalf("%q at %d: %#x, %v; want %#x", a.name, a.off, b[0], err, a.b)
			}
		}
	}
	// A refused write must change nothing.
	write := func(o *Object, i int, off int64) error {
		size := o.Size()
		n, err := o.WriteAt([]byte{byte(i%251 + 1)}, off)
		if err != nil && (n != 0 || o.Size() != size) {
			return fmt.Errorf("refused write wrote %d bytes, size %d -> %d: %v", n, size, o.Size(), err)
		}
		return err
	}

	t.Run("objects", func(t *testing.T) {
		// An object record (22 bytes and the name) and one extent record.
		run(t, FormatOptions{}, 22+8+extentRecLen, func(e *Engine) step {
			return func(i int) (string, int64, byte, error) {
				name := fmt.Sprintf("o%07d", i)
				o, err := e.Create(name)
				if err != nil {
					return "", 0, 0, err
				}
				return name, 0, byte(i%251 + 1), write(o, i, 0)
			}
		})
	})
	t.Run("sparse", func(t *testing.T) {
		run(t, FormatOptions{MetadataSize: 64 << 10}, extentRecLen, func(e *Engine) step {
			o, err := e.Create("sparse")
			if err != nil {
				t.Fatal(err)
			}
			return func(i int) (string, int64, byte, error) {
				off := int64(i) * 2 * 4096
				return "sparse", off, byte(i%251 + 1), write(o, i, off)
			}
		})
	})
	t.Run("punch", func(t *testing.T) {
		// Punching holes into delalloc data splits its one entry.
		run(t, FormatOptions{MetadataSize: 64 << 10}, extentRecLen, func(e *Engine) step {
			o, err := e.Create("punched")
			if err != nil {
				t.Fatal(err)
			}
			if _, err := o.WriteAt(bytes.Repeat([]byte{7}, 8<<20), 0); err != nil {
				t.Fatal(err)
			}
			return func(i int) (string, int64, byte, error) {
				off := int64(i)*2*4096 + 4096
				if off >= 8<<20 {
					t.Fatal("ran out of blocks to punch")
				}
				// The block before the hole still holds 7s.
				return "punched", off - 4096, 7, o.PunchHole(off, 4096)
			}
		})
	})
}

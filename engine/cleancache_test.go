package engine

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestOverwriteDropsCleanCopies puts blocks in the clean cache (a small
// writeback batch; reads of one block each, out of order, so no
// readahead), then overwrites them and writes them back in a batch too large to be
// kept clean: every later read must see the new data, never a stale clean
// copy. Then the same through a multi-block miss (one I/O for a run of
// blocks), and for blocks appended past the end after a truncate.
func TestOverwriteDropsCleanCopies(t *testing.T) {
	onMemAndFile(t, 64<<20, func(t *testing.T, dev Device) {
		e := mustFormatOpen(t, dev, Options{CacheSize: 32 << 20})
		defer func() { e.Close() }()
		o, err := e.Create("x")
		if err != nil {
			t.Fatal(err)
		}
		r := rand.New(rand.NewPCG(1, 2))
		const blocks = 2 * keepCleanPages // a writeback batch not kept clean
		bs := e.bs
		model := randomBytes(r, blocks*bs)
		write := func(off int, p []byte) {
			t.Helper()
			if n, err := o.WriteAt(p, int64(off)); n != len(p) || err != nil {
				t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(p), off, n, err)
			}
			copy(model[off:], p)
		}
		sync := func() {
			t.Helper()
			if err := o.Sync(); err != nil {
				t.Fatal(err)
			}
		}
		// readBlocks reads every block on its own, last first, and
		// checks it against the model.
		readBlocks := func(what string) {
			t.Helper()
			buf := make([]byte, bs)
			for b := len(model)/bs - 1; b >= 0; b-- {
				if _, err := o.ReadAt(buf, int64(b*bs)); err != nil {
					t.Fatalf("%s: read block %d: %v", what, b, err)
				}
				if !bytes.Equal(buf, model[b*bs:(b+1)*bs]) {
					t.Fatalf("%s: block %d is not what was written last", what, b)
				}
			}
		}
		// A small writeback batch stays cached clean; an overwrite
		// written back in a large batch must not leave it behind.
		first := bytes.Clone(model)
		write(0, randomBytes(r, 10*bs))
		sync()
		write(0, first)
		sync()
		readBlocks("after a kept batch") // single-block loads fill the clean cache
		write(0, randomBytes(r, len(model)))
		sync()
		readBlocks("after an overwrite")

		// Cold again, a random reader's multi-block miss: one I/O
		// into frames, which are then cached.
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		if e, err = Open(dev, Options{CacheSize: 32 << 20}); err != nil {
			t.Fatal(err)
		}
		if o, err = e.Object("x"); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 16*bs)
		if _, err := o.ReadAt(buf, int64(64*bs)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, model[64*bs:80*bs]) {
			t.Fatal("multi-block read after reopen: not what was written")
		}
		if e.Stats().CachedBytes < int64(len(buf)) {
			t.Fatalf("%d bytes cached after a 16-block miss", e.Stats().CachedBytes)
		}
		write(0, randomBytes(r, len(model)))
		sync()
		readBlocks("after a second overwrite")

		// Shrink, then grow again by appending: the appended blocks
		// had clean copies before the truncate.
		if err := o.Truncate(int64(len(model) / 2)); err != nil {
			t.Fatal(err)
		}
		model = model[:len(model)/2]
		tail := randomBytes(r, blocks*bs/2)
		model = append(model, make([]byte, len(tail))...)
		write(len(model)-len(tail), tail)
		sync()
		readBlocks("after truncate and append")
	})
}

package engine

import "testing"

// TestUnflushedEpochs: a good flush forgets only the writes that
// completed before it started; one in flight meanwhile stays in doubt
// until the next.
func TestUnflushedEpochs(t *testing.T) {
	var u unflushed
	a := u.start(0, 4096)
	u.finish(a)
	b := u.start(8192, 4096) // still in flight when the flush starts
	covered := u.flushStarts()
	u.finish(b)
	c := u.start(16384, 4096) // issued after the flush started
	u.flushed(covered)
	if u.overlaps(0, 4096) {
		t.Error("a write completed before the flush is still in doubt after it")
	}
	if !u.overlaps(8192, 1) || !u.overlaps(16383, 2) {
		t.Error("writes completed or issued after the flush started were forgotten")
	}
	u.finish(c)
	if u.overlaps(4096, 4096) || u.overlaps(12288, 4096) {
		t.Error("ranges nobody wrote are in doubt")
	}
	next := u.flushStarts()
	u.flushed(next)
	if u.overlaps(0, 1<<20) {
		t.Error("a second good flush left writes in doubt")
	}
	defer func() {
		if recover() == nil {
			t.Error("finishing a write twice did not panic")
		}
	}()
	u.finish(c)
}

// TestUnflushedBounded: overwrites in place log no metadata, so no flush
// need come for a long time; past maxUnflushed writes the set stops
// tracking them one by one and holds everything in doubt until a flush
// that started after that succeeds.
func TestUnflushedBounded(t *testing.T) {
	var u unflushed
	for i := range maxUnflushed + 10 {
		u.finish(u.start(int64(i%100)*4096, 4096))
	}
	if len(u.writes) > maxUnflushed {
		t.Fatalf("%d writes tracked, bound %d", len(u.writes), maxUnflushed)
	}
	if !u.overlaps(1<<40, 1) {
		t.Fatal("after giving writes up, a range nobody wrote is not in doubt")
	}
	inFlight := u.start(0, 4096)
	covered := u.flushStarts() // after the writes were given up
	u.finish(inFlight)         // completes during the flush: stays in doubt
	u.flushed(covered)
	if u.overlaps(1<<40, 1) {
		t.Fatal("a good flush started after the writes were given up left everything in doubt")
	}
	if !u.overlaps(0, 1) {
		t.Fatal("a write completed during the flush was forgotten")
	}
}

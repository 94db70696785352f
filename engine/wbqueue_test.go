package engine

import (
	"testing"

	"github.com/rawblock/rawblock/cache"
)

// TestWbQueueTurns checks the writeback queue's order: runs of one lane
// in the order pushed, lanes taking turns one run each, so a lane pushed
// behind a long one is served at once; drained lanes leave; a lane fed
// as fast as it drains stays small.
func TestWbQueueTurns(t *testing.T) {
	var q wbQueue
	q.workers = ioParallel // push starts no worker: the test pops
	mk := func(lane uint64, n int) []wbRun {
		rs := make([]wbRun, n)
		for i := range rs {
			rs[i] = wbRun{pages: make([]wpage, 1), g: &wbGroup{}}
			rs[i].pages[0].blk = int64(lane)<<32 | int64(i)
		}
		return rs
	}
	q.push(nil, 1, mk(1, 100))
	q.push(nil, 2, mk(2, 3))
	next := map[uint64]int64{}
	var order []uint64
	for {
		r, ok := q.pop()
		if !ok {
			break
		}
		lane, i := uint64(r.pages[0].blk>>32), r.pages[0].blk&(1<<32-1)
		if i != next[lane] {
			t.Fatalf("lane %d: run %d came before run %d", lane, i, next[lane])
		}
		next[lane]++
		order = append(order, lane)
	}
	if next[1] != 100 || next[2] != 3 {
		t.Fatalf("popped %d and %d runs, want 100 and 3", next[1], next[2])
	}
	last2 := 0
	for k, l := range order {
		if l == 2 {
			last2 = k
		}
	}
	if last2 > 6 {
		t.Fatalf("the short lane's last run came %dth, behind the long lane", last2+1)
	}
	if q.workers != ioParallel-1 || q.queued != 0 || len(q.lanes) != 0 || len(q.ring) != 0 {
		t.Fatalf("drained queue: workers %d, queued %d, lanes %d, ring %d", q.workers, q.queued, len(q.lanes), len(q.ring))
	}

	// A stream's lane never drains: it must not grow with what went
	// through it.
	q.workers = ioParallel
	q.push(nil, 7, mk(7, 10))
	for range 10000 {
		q.push(nil, 7, mk(7, 1))
		if _, ok := q.pop(); !ok {
			t.Fatal("pop found nothing with runs queued")
		}
	}
	if l := q.lanes[7]; l == nil || cap(l.runs) > 256 || len(l.runs)-l.head != 10 {
		t.Fatalf("lane after 10,000 runs through it: %+v", l)
	}
}

// TestSplitRuns checks how writeback cuts a batch into I/Os: at device
// and block gaps, at maxRun pages, and around long stretches of frames
// that follow each other, which get I/Os of their own.
func TestSplitRuns(t *testing.T) {
	c, err := cache.New(cache.Options{Size: 16 << 20, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Frames: 40 following each other, then 10 scattered (every other
	// frame), then 100 following.
	var frames []*cache.Page
	all := c.AllocRun(nil, 400)
	defer func() {
		for _, p := range all {
			p.Release()
		}
	}()
	frames = append(frames, all[0:40]...)
	for k := 0; k < 10; k++ {
		frames = append(frames, all[50+2*k])
	}
	frames = append(frames, all[100:200]...)
	pages := make([]wpage, len(frames))
	for k, p := range frames {
		pages[k] = wpage{blk: int64(k), phys: 1000 + int64(k), pg: p}
	}
	lens := func(runs []wbRun) []int {
		var out []int
		for _, r := range runs {
			out = append(out, len(r.pages))
		}
		return out
	}
	eq := func(a, b []int) bool {
		if len(a) != len(b) {
			return false
		}
		for i := range a {
			if a[i] != b[i] {
				return false
			}
		}
		return true
	}
	runs := splitRuns(pages, 256)
	if got, want := lens(runs), []int{40, 10, 100}; !eq(got, want) {
		t.Fatalf("runs %v, want %v", got, want)
	}
	if !runs[0].span || runs[1].span || !runs[2].span {
		t.Fatalf("span flags %v %v %v, want true false true", runs[0].span, runs[1].span, runs[2].span)
	}
	if got, want := lens(splitRuns(pages, 64)), []int{40, 10, 64, 36}; !eq(got, want) {
		t.Fatalf("maxRun 64: runs %v, want %v", got, want)
	}
	// A device gap cuts the long stretch.
	gap := append([]wpage(nil), pages...)
	for k := 120; k < len(gap); k++ {
		gap[k].phys += 5
	}
	if got, want := lens(splitRuns(gap, 256)), []int{40, 10, 70, 30}; !eq(got, want) {
		t.Fatalf("with a device gap: runs %v, want %v", got, want)
	}
	// Short stretches join the vector around them.
	short := append([]wpage(nil), pages[30:60]...)
	if got, want := lens(splitRuns(short, 256)), []int{30}; !eq(got, want) {
		t.Fatalf("short stretches: runs %v, want %v", got, want)
	}
}

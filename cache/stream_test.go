package cache

import (
	"testing"

	"pgregory.net/rapid"
)

// TestAllocStreamInterleaved is the case streams exist for: appenders
// taking one frame at a time in turn each get frames that follow each
// other, where AllocRun would deal them out round-robin.
func TestAllocStreamInterleaved(t *testing.T) {
	c := newTestCache(t, 4096, 8192, 0)
	defer c.Close()
	if c.streamLen != 64 {
		t.Fatalf("streamLen %d for 8192 frames, want 64", c.streamLen)
	}
	const streams, each = 4, 64
	got := make([][]*Page, streams)
	for range each {
		for s := range streams {
			got[s] = c.AllocStream(uint64(s+1), 0, got[s], 1)
		}
	}
	for s, ps := range got {
		if len(ps) != each {
			t.Fatalf("stream %d got %d frames, want %d", s, len(ps), each)
		}
		for i := 1; i < len(ps); i++ {
			if !ps[i].Follows(ps[i-1]) {
				t.Fatalf("stream %d: frame %d then %d do not follow each other", s, ps[i-1].idx, ps[i].idx)
			}
		}
		if span := ps[0].Span(len(ps)); len(span) != each*4096 {
			t.Fatalf("stream %d: span of %d bytes", s, len(span))
		}
	}
	if st := c.Stats(); st.FreeFrames != st.Frames-streams*each {
		t.Fatalf("FreeFrames %d with %d of %d frames held", st.FreeFrames, streams*each, st.Frames)
	}
	for _, ps := range got {
		for _, p := range ps {
			p.Release()
		}
	}
}

// TestAllocStreamGivesBack checks that frames set aside for streams are
// free frames: a writer that needs them takes them back, and removing an
// object or closing the cache returns its stream's frames.
func TestAllocStreamGivesBack(t *testing.T) {
	c := newTestCache(t, 4096, 8192, 0)
	one := c.AllocStream(1, 0, nil, 1) // sets aside 64 frames, hands out 1
	two := c.AllocStream(2, 0, nil, 1)
	if c.reserved != 2*(c.streamLen-1) {
		t.Fatalf("reserved %d, want %d", c.reserved, 2*(c.streamLen-1))
	}
	// Everything free, one frame at a time: the streams' frames included.
	held := allocAll(c)
	if len(held) != 8192-2 {
		t.Fatalf("TryAlloc got %d frames with %d free", len(held), 8192-2)
	}
	if c.reserved != 0 || len(c.streams) != 0 {
		t.Fatalf("streams still hold %d frames (%d streams) after the free list ran dry", c.reserved, len(c.streams))
	}
	if more := c.AllocStream(1, 0, nil, 4); len(more) != 0 {
		t.Fatalf("AllocStream with nothing free returned %d frames", len(more))
	}
	for _, p := range held {
		p.Release()
	}
	// RemoveObject drops the object's stream.
	one = c.AllocStream(1, 0, one, 1)
	c.RemoveObject(1)
	if _, ok := c.streams[1]; ok {
		t.Fatal("RemoveObject left the object's stream")
	}
	// AllocRun for more than the free list holds takes the streams back.
	two = c.AllocStream(2, 0, two, 1)
	free := c.free.len()
	big := c.AllocRun(nil, free+1)
	if len(big) != free+1 {
		t.Fatalf("AllocRun(%d) returned %d frames", free+1, len(big))
	}
	for _, p := range append(append(big, one...), two...) {
		p.Release()
	}
	// Close with a stream set aside: every frame counts as free.
	three := c.AllocStream(3, 0, nil, 3)
	for _, p := range three {
		p.Release()
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close with a stream set aside: %v", err)
	}
}

// TestAllocStreamLimits checks the least recently used stream's frames
// go back when a ninth stream starts, and that a small cache has no
// streams at all.
func TestAllocStreamLimits(t *testing.T) {
	c := newTestCache(t, 4096, 8192, 0)
	defer c.Close()
	var held []*Page
	for id := uint64(1); id <= maxStreams+1; id++ {
		held = c.AllocStream(id, 0, held, 1)
	}
	if len(c.streams) != maxStreams {
		t.Fatalf("%d streams, want at most %d", len(c.streams), maxStreams)
	}
	if _, ok := c.streams[1]; ok {
		t.Fatal("the least recently used stream was kept")
	}
	if c.reserved != maxStreams*(c.streamLen-1) {
		t.Fatalf("reserved %d, want %d", c.reserved, maxStreams*(c.streamLen-1))
	}
	for _, p := range held {
		p.Release()
	}

	small := newTestCache(t, 4096, 1024, 0)
	defer small.Close()
	if small.streamLen != 0 {
		t.Fatalf("streamLen %d in a 1024-frame cache, want 0 (off)", small.streamLen)
	}
	ps := small.AllocStream(1, 0, nil, 8)
	if len(ps) != 8 || len(small.streams) != 0 {
		t.Fatalf("AllocStream with streams off: %d frames, %d streams", len(ps), len(small.streams))
	}
	for _, p := range ps {
		p.Release()
	}
}

// TestAllocStreamModel runs random allocations through streams, AllocRun
// and TryAlloc, releases and stream drops, and checks that no frame is
// handed out twice, that every free frame can be had (streams never make
// an allocation fail), that each AllocStream call returns ascending
// frames, and that the free count adds up.
func TestAllocStreamModel(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		c, err := New(Options{Size: FixedOverhead + 4096*(4096+FrameOverhead), BlockSize: 4096})
		if err != nil {
			rt.Fatal(err)
		}
		defer c.Close()
		if c.Frames() != 4096 || c.streamLen != 32 {
			rt.Fatalf("%d frames, streams of %d; want 4096 and 32", c.Frames(), c.streamLen)
		}
		held := map[uint32]*Page{}
		// take checks and records frames handed out; a call's frames
		// ascend but for at most maxDescents steps (a stream's run of
		// frames is ascending, and a call may span refills).
		take := func(t *rapid.T, ps []*Page, maxDescents int) {
			descents := 0
			for i, p := range ps {
				if _, dup := held[p.idx]; dup {
					t.Fatalf("frame %d handed out twice", p.idx)
				}
				if p.refs.Load() != 1 {
					t.Fatalf("frame %d handed out with %d references", p.idx, p.refs.Load())
				}
				if i > 0 && p.idx <= ps[i-1].idx {
					if descents++; descents > maxDescents {
						t.Fatalf("frames %d then %d: not ascending (%d descents, at most %d)", ps[i-1].idx, p.idx, descents, maxDescents)
					}
				}
				held[p.idx] = p
			}
		}
		free := func() int { return c.Frames() - len(held) }
		rt.Repeat(map[string]func(*rapid.T){
			"stream": func(t *rapid.T) {
				id := rapid.Uint64Range(1, 12).Draw(t, "id")
				n := rapid.IntRange(1, 600).Draw(t, "n")
				pos := rapid.Uint64Range(0, 1<<20).Draw(t, "pos")
				before := free()
				ps := c.AllocStream(id, pos, nil, n)
				if want := min(n, before); len(ps) != want {
					t.Fatalf("AllocStream(%d) returned %d frames with %d free", n, len(ps), before)
				}
				// With frames plentiful, a call's frames come from at most
				// one refill more than its size needs; when they run short,
				// streams are taken back and refilled piecemeal, in any order.
				maxDescents := len(ps)
				if before >= 2*maxStreams*c.streamLen+n {
					maxDescents = (n+c.streamLen-1)/c.streamLen + 1
				}
				take(t, ps, maxDescents)
			},
			"run": func(t *rapid.T) {
				n := rapid.IntRange(1, 600).Draw(t, "n")
				ps := c.AllocRun(nil, n)
				if want := min(n, free()); len(ps) != want {
					t.Fatalf("AllocRun(%d) returned %d frames with %d free", n, len(ps), free())
				}
				take(t, ps, 0)
			},
			"one": func(t *rapid.T) {
				p := c.TryAlloc()
				if (p == nil) != (free() == 0) {
					t.Fatalf("TryAlloc returned %v with %d free", p, free())
				}
				if p != nil {
					take(t, []*Page{p}, 0)
				}
			},
			"release": func(t *rapid.T) {
				k := rapid.IntRange(1, 200).Draw(t, "k")
				for idx, p := range held {
					if k == 0 {
						break
					}
					p.Release()
					delete(held, idx)
					k--
				}
			},
			"drop": func(t *rapid.T) {
				id := rapid.Uint64Range(1, 12).Draw(t, "id")
				if rapid.Bool().Draw(t, "remove") {
					c.RemoveObject(id)
				} else {
					c.DropStream(id)
				}
			},
			"": func(t *rapid.T) {
				if st := c.Stats(); st.FreeFrames != free() {
					t.Fatalf("FreeFrames %d, want %d (%d held)", st.FreeFrames, free(), len(held))
				}
				if len(c.streams) > maxStreams {
					t.Fatalf("%d streams", len(c.streams))
				}
			},
		})
		for _, p := range held {
			p.Release()
		}
	})
}

// TestAllocStreamAligned checks that a stream refilled from free frames
// places block b at offset b mod streamLen of an aligned group, so that
// writeback's aligned I/Os find their frames following each other.
func TestAllocStreamAligned(t *testing.T) {
	c := newTestCache(t, 4096, 8192, 0)
	g := c.streamLen
	if g == 0 || g&(g-1) != 0 {
		t.Fatalf("streamLen %d: want a power of two", g)
	}
	// A busy frame in the first group: refills must skip that group.
	busy := c.TryAlloc()
	var held []*Page
	pos := uint64(3*g - 5)
	for k := range 2*g + 10 {
		ps := c.AllocStream(7, pos+uint64(k), nil, 1)
		if len(ps) != 1 {
			t.Fatalf("AllocStream at %d returned %d frames", pos+uint64(k), len(ps))
		}
		p := ps[0]
		if got, want := int(p.idx)%g, int((pos+uint64(k))%uint64(g)); got != want {
			t.Fatalf("block %d got frame %d, at offset %d of its group; want %d", pos+uint64(k), p.idx, got, want)
		}
		if int(p.idx) < g {
			t.Fatalf("block %d got frame %d, in the group the busy frame %d is in", pos+uint64(k), p.idx, busy.idx)
		}
		if k > 0 && int(p.idx)%g != 0 && !p.Follows(held[k-1]) {
			t.Fatalf("block %d got frame %d, not following frame %d inside a group", pos+uint64(k), p.idx, held[k-1].idx)
		}
		held = append(held, p)
	}
	for _, p := range append(held, busy) {
		p.Release()
	}
	// The frames before the first offset were not set aside.
	if st := c.Stats(); st.FreeFrames != 8192 {
		t.Fatalf("FreeFrames %d after releasing everything, want 8192", st.FreeFrames)
	}
}

package crashtest

import (
	"bytes"
	"fmt"
	"strings"
)

// The model keeps, for every object name, what a crash may leave of it.
//
// An incarnation is one life of a name, from Create to Remove. Its anchor
// state (synced: contents and size) is what the last successful Sync
// covering it made durable; every change since is an event. After a crash a
// byte of the incarnation may read as its anchor value or as any value an
// event gave it since (a write's data, or zeros from a punch, a truncate or
// the hole an extension opens); its size is the anchor size or any size it
// passed through since. cur is the exact present contents, which live reads
// must return.
//
// Per name, the anchor is the incarnation the last Sync covering the name
// made durable (nil: durably absent). After a crash the name may hold the
// anchor incarnation or any incarnation created since, and may be absent
// only if the anchor is nil or the anchor incarnation was removed since.

// span is an inclusive range of sizes an incarnation passed through.
type span struct{ lo, hi int64 }

// event is a change since the anchor: bytes [off, end) hold the pattern of
// key, or zeros when key is 0.
type event struct {
	off, end int64
	key      uint64
}

type incarnation struct {
	id     int
	cur    []byte
	synced []byte
	events []event
	spans  []span
}

func (in *incarnation) write(off int64, p []byte, key uint64) {
	old := int64(len(in.cur))
	end := off + int64(len(p))
	if off > old {
		in.events = append(in.events, event{old, off, 0})
	}
	in.events = append(in.events, event{off, end, key})
	if end > old {
		in.cur = append(in.cur, make([]byte, end-old)...)
		in.spans = append(in.spans, span{old, end})
	}
	copy(in.cur[off:], p)
}

func (in *incarnation) truncate(size int64) {
	old := int64(len(in.cur))
	switch {
	case size < old:
		in.events = append(in.events, event{size, old, 0})
		in.spans = append(in.spans, span{size, old})
		in.cur = in.cur[:size]
	case size > old:
		in.events = append(in.events, event{old, size, 0})
		in.spans = append(in.spans, span{old, size})
		in.cur = append(in.cur, make([]byte, size-old)...)
	}
}

func (in *incarnation) punch(off, n int64) {
	end := min(off+n, int64(len(in.cur)))
	if end <= off {
		return
	}
	in.events = append(in.events, event{off, end, 0})
	clear(in.cur[off:end])
}

// sync makes the present state the anchor state.
func (in *incarnation) sync() {
	in.synced = bytes.Clone(in.cur)
	in.events, in.spans = nil, nil
}

func (in *incarnation) sizeOK(size int64) bool {
	if size == int64(len(in.synced)) {
		return true
	}
	for _, s := range in.spans {
		if size >= s.lo && size <= s.hi {
			return true
		}
	}
	return false
}

func (in *incarnation) sizes() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d (synced)", len(in.synced))
	for _, s := range in.spans {
		fmt.Fprintf(&b, ", %d..%d", s.lo, s.hi)
	}
	return b.String()
}

// byteOK reports whether byte x may read as v after a crash; evs are the
// events that may cover x.
func (in *incarnation) byteOK(x int64, v byte, evs []event) bool {
	if x < int64(len(in.cur)) && in.cur[x] == v {
		return true
	}
	if x < int64(len(in.synced)) {
		if in.synced[x] == v {
			return true
		}
	} else if v == 0 {
		return true
	}
	for _, e := range evs {
		if x >= e.off && x < e.end {
			if e.key == 0 {
				if v == 0 {
					return true
				}
			} else if pattern(e.key, x) == v {
				return true
			}
		}
	}
	return false
}

// checkBlock is the unit of the fast comparison of recovered contents.
const checkBlock = 4096

// contentErr checks recovered contents a (the whole object) byte by byte.
// Whole blocks equal to the present or the anchor contents pass at once.
func (in *incarnation) contentErr(a []byte) error {
	var evs []event
	for c := int64(0); c < int64(len(a)); c += checkBlock {
		e := min(c+checkBlock, int64(len(a)))
		if e <= int64(len(in.cur)) && bytes.Equal(a[c:e], in.cur[c:e]) {
			continue
		}
		if e <= int64(len(in.synced)) && bytes.Equal(a[c:e], in.synced[c:e]) {
			continue
		}
		evs = evs[:0]
		for _, ev := range in.events {
			if ev.off < e && ev.end > c {
				evs = append(evs, ev)
			}
		}
		for x := c; x < e; x++ {
			if in.byteOK(x, a[x], evs) {
				continue
			}
			bad := x
			for bad < int64(len(a)) && !in.byteOK(bad, a[bad], in.events) {
				bad++
			}
			return fmt.Errorf("bytes %d..%d (%d) read as none of their synced or later-written values: %s",
				x, bad, bad-x, in.describe(a, x))
		}
	}
	return nil
}

// describe explains byte x of recovered contents a for a failure report.
func (in *incarnation) describe(a []byte, x int64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "read %#02x", a[x])
	if x < int64(len(in.synced)) {
		fmt.Fprintf(&b, ", synced %#02x", in.synced[x])
	} else {
		fmt.Fprintf(&b, ", beyond the synced size %d (zero)", len(in.synced))
	}
	if x < int64(len(in.cur)) {
		fmt.Fprintf(&b, ", present %#02x", in.cur[x])
	}
	n := 0
	for _, e := range in.events {
		if x >= e.off && x < e.end {
			if e.key == 0 {
				fmt.Fprintf(&b, ", zeroed by [%d,%d)", e.off, e.end)
			} else {
				fmt.Fprintf(&b, ", %#02x by write %#x [%d,%d)", pattern(e.key, x), e.key, e.off, e.end)
			}
			n++
		}
	}
	if n == 0 {
		b.WriteString(", nothing written there since the sync")
	}
	end := min(x+16, int64(len(a)))
	fmt.Fprintf(&b, "; read from %d: % x", x, a[x:end])
	if x < int64(len(in.cur)) {
		fmt.Fprintf(&b, "; present: % x", in.cur[x:min(end, int64(len(in.cur)))])
	}
	return b.String()
}

// slot is the model of one object name.
type slot struct {
	name   string
	anchor *incarnation   // durable incarnation; nil: durably absent
	gone   bool           // the anchor incarnation was removed since
	since  []*incarnation // created since the anchor point
	cur    *incarnation   // the live incarnation; nil: absent now
}

func (s *slot) absentOK() bool { return s.anchor == nil || s.gone }

// candidates are the incarnations a crash may leave under the name.
func (s *slot) candidates() []*incarnation {
	var c []*incarnation
	if s.anchor != nil {
		c = append(c, s.anchor)
	}
	return append(c, s.since...)
}

func (s *slot) create(in *incarnation) {
	if s.cur != nil {
		panic(fmt.Sprintf("crashtest: model: create %q while incarnation %d lives", s.name, s.cur.id))
	}
	s.since = append(s.since, in)
	s.cur = in
}

func (s *slot) remove() {
	if s.cur == nil {
		panic(fmt.Sprintf("crashtest: model: remove of absent %q", s.name))
	}
	if s.cur == s.anchor {
		s.gone = true
	}
	s.cur = nil
}

// sync records a successful Sync covering the name: its present state is
// the new anchor.
func (s *slot) sync() {
	if s.cur != nil {
		s.cur.sync()
	}
	s.anchor, s.gone, s.since = s.cur, false, nil
}

// recovered resets the slot to what a verified recovery found: data is the
// object's contents, nil when absent. The recovered state is on the device,
// so it is the new anchor.
func (s *slot) recovered(id int, data []byte, present bool) {
	s.since, s.gone = nil, false
	if !present {
		s.anchor, s.cur = nil, nil
		return
	}
	in := &incarnation{id: id, cur: data, synced: bytes.Clone(data)}
	s.anchor, s.cur = in, in
}

// check verifies one name after a crash. size < 0 means the name is absent;
// read returns the object's contents (called at most once, after the size
// passed). It returns the incarnation that matched.
func (s *slot) check(size int64, read func() ([]byte, error)) (*incarnation, []byte, error) {
	if size < 0 {
		if !s.absentOK() {
			return nil, nil, fmt.Errorf("object %q is missing, but incarnation %d was synced and never removed since", s.name, s.anchor.id)
		}
		return nil, nil, nil
	}
	cands := s.candidates()
	if len(cands) == 0 {
		return nil, nil, fmt.Errorf("object %q exists (size %d), but it was removed and synced and never created since", s.name, size)
	}
	var fits []*incarnation
	for _, c := range cands {
		if c.sizeOK(size) {
			fits = append(fits, c)
		}
	}
	if len(fits) == 0 {
		var b strings.Builder
		for _, c := range cands {
			fmt.Fprintf(&b, "; incarnation %d may have size %s", c.id, c.sizes())
		}
		return nil, nil, fmt.Errorf("object %q has size %d, which no incarnation could have%s", s.name, size, b.String())
	}
	data, err := read()
	if err != nil {
		return nil, nil, err
	}
	var b strings.Builder
	for _, c := range fits {
		err := c.contentErr(data)
		if err == nil {
			return c, data, nil
		}
		fmt.Fprintf(&b, "; as incarnation %d: %v", c.id, err)
	}
	return nil, nil, fmt.Errorf("object %q (size %d) matches no incarnation%s", s.name, size, b.String())
}

const golden = 0x9e3779b97f4a7c15

// mix64 is the splitmix64 finalizer: a bijection that scatters bits.
func mix64(z uint64) uint64 {
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// writeKey names the data of write gen to incarnation inc: never 0, which
// stands for zeros.
func writeKey(inc int, gen uint64) uint64 {
	return mix64(uint64(inc)<<40^gen) | 1
}

// pattern is byte x of the data written with key: each 8-byte word of the
// object's address space gets its own hash, so any sector of data
// identifies the write (hence the object and generation) and its offset.
func pattern(key uint64, x int64) byte {
	return byte(mix64(key^uint64(x>>3)*golden) >> (8 * (x & 7)))
}

// fillPattern fills p with the data of key at object offset off.
func fillPattern(p []byte, key uint64, off int64) {
	var w uint64
	for i := range p {
		x := off + int64(i)
		if i == 0 || x&7 == 0 {
			w = mix64(key ^ uint64(x>>3)*golden)
		}
		p[i] = byte(w >> (8 * (x & 7)))
	}
}

package crashtest

import (
	"bytes"
	"strings"
	"testing"
)

func TestPattern(t *testing.T) {
	p := make([]byte, 1000)
	fillPattern(p, 12345, 77)
	for i, b := range p {
		if b != pattern(12345, 77+int64(i)) {
			t.Fatalf("fillPattern byte %d differs from pattern", i)
		}
	}
	// A sector of one write never equals the same sector of another write,
	// nor the same write at another offset.
	q := make([]byte, 512)
	fillPattern(q, 12346, 77)
	if bytes.Equal(p[:512], q) {
		t.Fatal("two keys wrote the same sector")
	}
	fillPattern(q, 12345, 77+512)
	if bytes.Equal(p[:512], q) {
		t.Fatal("one key wrote the same bytes at two offsets")
	}
	if writeKey(1, 1) == writeKey(2, 1) || writeKey(1, 1) == writeKey(1, 2) || writeKey(0, 0) == 0 {
		t.Fatal("write keys collide or are zero")
	}
}

func patternBytes(key uint64, off, n int64) []byte {
	p := make([]byte, n)
	fillPattern(p, key, off)
	return p
}

// synced returns an incarnation whose anchor holds 8 KiB of key 1's data.
func syncedInc() *incarnation {
	in := &incarnation{id: 1}
	in.write(0, patternBytes(1, 0, 8192), 1)
	in.sync()
	return in
}

func TestIncarnationContent(t *testing.T) {
	in := syncedInc()
	synced := bytes.Clone(in.cur)
	// Unsynced: overwrite [1000,5000) with key 2, punch [6000,7000).
	in.write(1000, patternBytes(2, 1000, 4000), 2)
	in.punch(6000, 1000)
	present := bytes.Clone(in.cur)

	ok := func(name string, a []byte) {
		t.Helper()
		if err := in.contentErr(a); err != nil {
			t.Errorf("%s rejected: %v", name, err)
		}
	}
	bad := func(name string, a []byte, want string) {
		t.Helper()
		err := in.contentErr(a)
		if err == nil {
			t.Errorf("%s accepted", name)
		} else if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not mention %q", name, err, want)
		}
	}
	ok("synced state", synced)
	ok("present state", present)
	mixed := bytes.Clone(synced)
	copy(mixed[1024:1536], present[1024:1536]) // one sector of the write landed
	clear(mixed[6100:6200])                    // part of the punch landed
	ok("a mix of synced and later bytes", mixed)

	other := bytes.Clone(synced)
	copy(other[4096:4608], patternBytes(99, 4096, 512))
	bad("another write's sector", other, "bytes 4096..")
	shifted := bytes.Clone(synced)
	copy(shifted[512:1024], synced[0:512])
	bad("the object's own data at the wrong offset", shifted, "bytes 5")
	zeroed := bytes.Clone(synced)
	clear(zeroed[0:512])
	bad("zeros over synced data never punched", zeroed, "bytes 0..")

	if !in.sizeOK(8192) || in.sizeOK(8191) || in.sizeOK(9000) {
		t.Error("size rules without a size change")
	}
	in.truncate(3000)
	in.write(10000, patternBytes(3, 10000, 100), 3)
	for _, s := range []int64{8192, 3000, 5000, 8192, 9000, 10100} {
		if !in.sizeOK(s) {
			t.Errorf("size %d rejected after truncate 8192->3000 and a write to 10100", s)
		}
	}
	if in.sizeOK(2999) || in.sizeOK(10101) {
		t.Error("a size the object never had was accepted")
	}
	// After the truncate, zeros are allowed where data was cut off, and the
	// extension's gap reads zeros.
	cut := bytes.Clone(synced)
	clear(cut[3000:])
	cut = append(cut, make([]byte, 10100-8192)...)
	copy(cut[10000:], patternBytes(3, 10000, 100))
	ok("truncated and extended", cut)
	if !bytes.Equal(in.cur[3000:10000], make([]byte, 7000)) {
		t.Error("present contents kept data past a truncate")
	}
}

func TestSlotRules(t *testing.T) {
	s := &slot{name: "a"}
	if !s.absentOK() || len(s.candidates()) != 0 {
		t.Fatal("a never-created name must be absent")
	}
	if _, _, err := s.check(0, nil); err == nil {
		t.Fatal("an object that was never created was accepted")
	}
	i1 := &incarnation{id: 1}
	s.create(i1)
	i1.write(0, patternBytes(5, 0, 100), 5)
	if !s.absentOK() {
		t.Fatal("an unsynced create must be allowed to vanish")
	}
	read := func(b []byte) func() ([]byte, error) { return func() ([]byte, error) { return b, nil } }
	if _, _, err := s.check(100, read(patternBytes(5, 0, 100))); err != nil {
		t.Fatalf("unsynced create that persisted: %v", err)
	}
	if _, _, err := s.check(50, read(make([]byte, 50))); err != nil {
		t.Fatalf("size 50 and zeros after a 100-byte write to a new object: %v", err)
	}
	s.sync()
	if s.absentOK() {
		t.Fatal("a synced object may not vanish")
	}
	if _, _, err := s.check(-1, nil); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("missing synced object: %v", err)
	}
	if _, _, err := s.check(50, read(make([]byte, 50))); err == nil {
		t.Fatal("a synced object shrank without a truncate")
	}
	// Remove and re-create: the old one, the new one, or nothing.
	s.remove()
	i2 := &incarnation{id: 2}
	s.create(i2)
	i2.write(0, patternBytes(6, 0, 100), 6)
	for name, data := range map[string][]byte{"old": patternBytes(5, 0, 100), "new": patternBytes(6, 0, 100)} {
		if _, _, err := s.check(100, read(data)); err != nil {
			t.Errorf("%s incarnation after remove+create: %v", name, err)
		}
	}
	if !s.absentOK() {
		t.Error("a removal may have persisted")
	}
	mix := append(patternBytes(5, 0, 50), patternBytes(6, 50, 50)...)
	if _, _, err := s.check(100, read(mix)); err == nil {
		t.Error("a mix of two incarnations was accepted")
	}
	// Removed and synced: stays removed.
	s.remove()
	s.sync()
	if !s.absentOK() || len(s.candidates()) != 0 {
		t.Fatal("removed and synced")
	}
	if _, _, err := s.check(100, read(patternBytes(6, 0, 100))); err == nil {
		t.Error("a removed and synced object came back")
	}
	// A recovery makes what it found the anchor.
	s.recovered(3, []byte{1, 2, 3}, true)
	if s.absentOK() {
		t.Error("a recovered object may not vanish")
	}
	if _, _, err := s.check(3, read([]byte{1, 2, 3})); err != nil {
		t.Error(err)
	}
	if _, _, err := s.check(3, read([]byte{1, 2, 4})); err == nil {
		t.Error("recovered contents changed without a write")
	}
}

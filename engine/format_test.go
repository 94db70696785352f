package engine

import (
	"errors"
	"reflect"
	"testing"
)

func testSuperblock(t testing.TB) superblock {
	s, err := layout(64<<20, 512, 4096, 0)
	if err != nil {
		t.Fatal(err)
	}
	s.Generation = 3
	copy(s.UUID[:], "0123456789abcdef")
	return s
}

func TestSuperblockRoundTrip(t *testing.T) {
	s := testSuperblock(t)
	buf := make([]byte, 512)
	s.encode(buf)
	got, err := decodeSuperblock(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got != s {
		t.Fatalf("decoded %+v, want %+v", got, s)
	}
	for i := 0; i < superblockLen; i++ {
		bad := append([]byte(nil), buf...)
		bad[i] ^= 0x40
		if _, err := decodeSuperblock(bad); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("flipped byte %d: err = %v", i, err)
		}
	}
}

func TestLayoutScales(t *testing.T) {
	for _, size := range []int64{16 << 20, 1 << 30, 1 << 40} {
		s, err := layout(size, 512, 4096, 0)
		if err != nil {
			t.Fatalf("%d: %v", size, err)
		}
		if s.DataStart*4096 > size/16 && size > 16<<20 {
			t.Errorf("%d: metadata takes %d bytes", size, s.DataStart*4096)
		}
	}
}

// TestLayoutAlignsTheDataRegion: whatever the device, block and metadata
// sizes, the data region starts on a 1 MiB boundary (or, for metadata under
// 2 MiB, a power of two up to half of it) and the journal keeps at least
// half of what it was given.
func TestLayoutAlignsTheDataRegion(t *testing.T) {
	for _, size := range []int64{16 << 20, 17<<20 + 4096, 100<<20 + 512, 1 << 30, 1<<40 + 12345} {
		for _, bs := range []int{512, 4096, 16384, 65536} {
			for _, meta := range []int64{0, 512 << 10, 1<<20 + 3*4096, 8 << 20, 64<<20 + 512} {
				s, err := layout(size, 512, bs, meta)
				if err != nil {
					continue // too much metadata for the device
				}
				m := meta
				if m == 0 {
					m = min(max(size/32, minMetadataSize), maxMetadataSize)
				}
				metaBlocks := (m + int64(bs) - 1) / int64(bs)
				align := int64(dataAlign)
				for align > metaBlocks*int64(bs)/2 {
					align /= 2
				}
				if m >= 2<<20 && align != dataAlign {
					t.Fatalf("metadata %d aligns to %d", m, align)
				}
				if off := s.DataStart * int64(bs); off%align != 0 {
					t.Errorf("size %d, bs %d, metadata %d: data region at byte %d, not on a %d boundary", size, bs, meta, off, align)
				}
				if given := max(metaBlocks-2*max(metaBlocks/4, 1), 1); s.JournalBlocks < (given+1)/2 {
					t.Errorf("size %d, bs %d, metadata %d: journal of %d blocks, given %d", size, bs, meta, s.JournalBlocks, given)
				}
			}
		}
	}
}

func testCheckpoint() *checkpoint {
	return &checkpoint{
		Seq:          9,
		NextObjectID: 5,
		Objects: []ckptObject{
			{ID: 1, Name: "a", Size: 3 * 4096, Extents: []ckptExtent{{0, 100, 2}, {2, 300, 1}}},
			{ID: 4, Name: "bee", Size: 0, Extents: []ckptExtent{}},
		},
	}
}

func TestCheckpointRoundTrip(t *testing.T) {
	c := testCheckpoint()
	// Many objects so the payload spans blocks.
	for i := 0; i < 300; i++ {
		c.Objects = append(c.Objects, ckptObject{ID: uint64(10 + i), Name: string(rune('A'+i%26)) + string(rune('a'+i/26)) + "xxxxxxxx", Size: 4096, Extents: []ckptExtent{{0, int64(1000 + i), 1}}})
	}
	c.NextObjectID = 1000
	c.JournalPos, c.Chain = 77, 0xdeadbeef
	data, err := encodeCheckpoint(nil, c, 512, 100)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeCheckpoint(data, 512)
	if err != nil {
		t.Fatal(err)
	}
	if got.encodedLen != len(data) {
		t.Fatalf("encoded length %d, want %d", got.encodedLen, len(data))
	}
	if got.payloadLen != c.payloadLen || got.payloadLen <= (len(data)/512-1)*(512-ckptHeaderLen-4) || got.payloadLen > len(data)/512*(512-ckptHeaderLen-4) {
		t.Fatalf("payload length %d (encoder's %d), encoded %d bytes", got.payloadLen, c.payloadLen, len(data))
	}
	got.encodedLen, got.payloadLen = c.encodedLen, c.payloadLen
	if !reflect.DeepEqual(got, c) {
		t.Fatal("round trip differs")
	}
	if _, err := encodeCheckpoint(nil, c, 512, 2); !errors.Is(err, errCkptFull) {
		t.Fatalf("too small region: %v", err)
	}
	// A torn write: the last block from another checkpoint.
	other, _ := encodeCheckpoint(nil, &checkpoint{Seq: 8, NextObjectID: 1000, Objects: c.Objects}, 512, 100)
	torn := append(append([]byte(nil), data[:len(data)-512]...), other[len(other)-512:]...)
	if _, err := decodeCheckpoint(torn, 512); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("torn checkpoint: %v", err)
	}
}

// checkRegions fails unless the superblock's regions follow each other
// inside the device: superblocks, journal, checkpoints A and B, data.
func checkRegions(t *testing.T, s superblock) {
	t.Helper()
	bounds := []int64{2, s.JournalStart, s.CkptStart[0], s.CkptStart[1], s.DataStart, s.TotalBlocks}
	for i := 1; i < len(bounds); i++ {
		if bounds[i] < bounds[i-1] {
			t.Fatalf("accepted regions out of order (superblocks, journal, checkpoints, data, end): %v", bounds)
		}
	}
	if s.CkptStart[0]-s.JournalStart != s.JournalBlocks || s.CkptStart[1]-s.CkptStart[0] != s.CkptBlocks || s.DataStart-s.CkptStart[1] != s.CkptBlocks {
		t.Fatalf("accepted region sizes that do not match their starts: %+v", s)
	}
}

// Sizes whose sums wrap around int64 must not make a layout that looks
// consistent: the data region would overlap the journal.
func TestSuperblockRejectsWrappingLayout(t *testing.T) {
	const maxInt64 = 1<<63 - 1
	for _, tc := range []struct {
		name   string
		change func(*superblock)
	}{
		{"checkpoint size wraps", func(s *superblock) {
			s.CkptBlocks = maxInt64
			s.CkptStart[1] = s.CkptStart[0] + s.CkptBlocks
			s.DataStart = s.CkptStart[1] + s.CkptBlocks
		}},
		{"journal size wraps", func(s *superblock) {
			s.JournalBlocks = maxInt64 - 1
			s.CkptStart[0] = s.JournalStart + s.JournalBlocks
			s.CkptStart[1] = s.CkptStart[0] + s.CkptBlocks
			s.DataStart = s.CkptStart[1] + s.CkptBlocks
		}},
		{"metadata over half the device", func(s *superblock) {
			s.CkptBlocks = s.TotalBlocks / 4
			s.CkptStart[1] = s.CkptStart[0] + s.CkptBlocks
			s.DataStart = s.CkptStart[1] + s.CkptBlocks
		}},
	} {
		s := testSuperblock(t)
		tc.change(&s)
		buf := make([]byte, superblockLen)
		s.encode(buf)
		if _, err := decodeSuperblock(buf); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: decode of a checksummed superblock %+v: %v, want ErrCorrupt", tc.name, s, err)
		}
	}
}

func FuzzDecodeSuperblock(f *testing.F) {
	s := testSuperblock(f)
	buf := make([]byte, 512)
	s.encode(buf)
	f.Add(buf)
	f.Add(make([]byte, 512))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := decodeSuperblock(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if err := s.validate(); err != nil {
			t.Fatalf("accepted an invalid superblock: %v", err)
		}
		checkRegions(t, s)
		out := make([]byte, superblockLen)
		s.encode(out)
		if s2, err := decodeSuperblock(out); err != nil || s2 != s {
			t.Fatalf("re-encode: %v", err)
		}
	})
}

func FuzzDecodeCheckpoint(f *testing.F) {
	data, err := encodeCheckpoint(nil, testCheckpoint(), 512, 8)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	empty, _ := encodeCheckpoint(nil, &checkpoint{Seq: 1, NextObjectID: 1}, 512, 8)
	f.Add(empty)
	f.Fuzz(func(t *testing.T, b []byte) {
		n := len(b) / 512 * 512
		if n == 0 {
			return
		}
		c, err := decodeCheckpoint(b[:n], 512)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		again, err := encodeCheckpoint(nil, c, 512, int64(n/512)+8)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := decodeCheckpoint(again, 512)
		if err != nil || !reflect.DeepEqual(c, c2) {
			t.Fatalf("re-decode: %v", err)
		}
	})
}

// FuzzCheckpointPayload frames arbitrary payload bytes in valid checkpoint
// blocks, so the fuzzer exercises the payload parser behind the checksums.
func FuzzCheckpointPayload(f *testing.F) {
	data, _ := encodeCheckpoint(nil, testCheckpoint(), 512, 8)
	f.Add(data[ckptHeaderLen : ckptHeaderLen+int(uint32(data[20])|uint32(data[21])<<8)])
	f.Fuzz(func(t *testing.T, payload []byte) {
		const bs = 512
		per := bs - ckptHeaderLen - 4
		count := max((len(payload)+per-1)/per, 1)
		buf := make([]byte, count*bs)
		for i := 0; i < count; i++ {
			blk := buf[i*bs : (i+1)*bs]
			chunk := payload[min(i*per, len(payload)):min((i+1)*per, len(payload))]
			putU32(blk[0:], ckptMagic)
			putU32(blk[4:], uint32(i))
			putU32(blk[8:], 7)
			putU32(blk[16:], uint32(count))
			putU32(blk[20:], uint32(len(chunk)))
			copy(blk[ckptHeaderLen:], chunk)
			putU32(blk[bs-4:], crc(blk[:bs-4]))
		}
		c, err := decodeCheckpoint(buf, bs)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if c.Seq != 7 {
			t.Fatalf("seq %d", c.Seq)
		}
	})
}

func putU32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

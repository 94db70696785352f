package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
)

// On-disk format, version 1. All integers are little-endian. Block numbers
// are in engine blocks. See DESIGN.md "On-disk layout":
//
//	| superblock A | superblock B | journal | checkpoint A | checkpoint B | data ... |
const (
	superMagic    = "rawblock"
	formatVersion = 1

	// superblockLen is the encoded length of a superblock, checksum included.
	// It fits in the smallest logical sector (512 bytes), so a superblock
	// write is never torn across sectors.
	superblockLen = 116

	// MinDeviceSize is the smallest device Format accepts.
	MinDeviceSize = 16 << 20
	// MaxBlockSize and MinBlockSize bound FormatOptions.BlockSize.
	MaxBlockSize = 65536
	MinBlockSize = 512
	// MaxNameLen is the longest object name, in bytes.
	MaxNameLen = 255
	// MaxObjectSize is the largest object size, and the bound on offset+length.
	MaxObjectSize int64 = 1 << 50

	// minMetadataSize and maxMetadataSize bound the scaled default.
	minMetadataSize = 512 << 10
	maxMetadataSize = 4 << 30
	// dataAlign: the data region starts at a multiple of this many bytes
	// from the device's start (see layout).
	dataAlign = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// errNotFormatted is returned (wrapping ErrCorrupt) when no superblock copy
// carries the magic: the device was never formatted, or holds something else.
var errNotFormatted = fmt.Errorf("%w: no rawblock superblock (device not formatted, or it holds another format)", ErrCorrupt)

// superblock describes the layout. Both copies are written at Format and are
// never rewritten afterwards; Generation orders them if that ever changes.
type superblock struct {
	Version       uint32
	BlockSize     uint32 // engine block size in bytes
	DevBlockSize  uint32 // logical block size of the device at format
	DeviceSize    int64  // bytes, at format
	TotalBlocks   int64  // engine blocks the layout covers
	JournalStart  int64
	JournalBlocks int64
	CkptStart     [2]int64
	CkptBlocks    int64
	DataStart     int64
	UUID          [16]byte
	Generation    uint64
}

func (s *superblock) encode(buf []byte) {
	clear(buf[:superblockLen])
	copy(buf, superMagic)
	le := binary.LittleEndian
	le.PutUint32(buf[8:], s.Version)
	le.PutUint32(buf[12:], s.BlockSize)
	le.PutUint32(buf[16:], s.DevBlockSize)
	le.PutUint64(buf[24:], uint64(s.DeviceSize))
	le.PutUint64(buf[32:], uint64(s.TotalBlocks))
	le.PutUint64(buf[40:], uint64(s.JournalStart))
	le.PutUint64(buf[48:], uint64(s.JournalBlocks))
	le.PutUint64(buf[56:], uint64(s.CkptStart[0]))
	le.PutUint64(buf[64:], uint64(s.CkptStart[1]))
	le.PutUint64(buf[72:], uint64(s.CkptBlocks))
	le.PutUint64(buf[80:], uint64(s.DataStart))
	copy(buf[88:104], s.UUID[:])
	le.PutUint64(buf[104:], s.Generation)
	le.PutUint32(buf[112:], crc(buf[:112]))
}

// decodeSuperblock parses and validates one superblock copy. Every failure
// wraps ErrCorrupt; a missing magic is errNotFormatted.
func decodeSuperblock(buf []byte) (superblock, error) {
	var s superblock
	if len(buf) < superblockLen {
		return s, fmt.Errorf("%w: superblock: %d bytes, need %d", ErrCorrupt, len(buf), superblockLen)
	}
	if string(buf[:8]) != superMagic {
		return s, errNotFormatted
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(buf[112:]), crc(buf[:112]); got != want {
		return s, fmt.Errorf("%w: superblock: checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	s.Version = le.Uint32(buf[8:])
	if s.Version > formatVersion {
		return s, fmt.Errorf("%w: superblock: format version %d is newer than this build reads (%d)", ErrCorrupt, s.Version, formatVersion)
	}
	if s.Version == 0 {
		return s, fmt.Errorf("%w: superblock: format version 0", ErrCorrupt)
	}
	s.BlockSize = le.Uint32(buf[12:])
	s.DevBlockSize = le.Uint32(buf[16:])
	s.DeviceSize = int64(le.Uint64(buf[24:]))
	s.TotalBlocks = int64(le.Uint64(buf[32:]))
	s.JournalStart = int64(le.Uint64(buf[40:]))
	s.JournalBlocks = int64(le.Uint64(buf[48:]))
	s.CkptStart[0] = int64(le.Uint64(buf[56:]))
	s.CkptStart[1] = int64(le.Uint64(buf[64:]))
	s.CkptBlocks = int64(le.Uint64(buf[72:]))
	s.DataStart = int64(le.Uint64(buf[80:]))
	copy(s.UUID[:], buf[88:104])
	s.Generation = le.Uint64(buf[104:])
	if err := s.validate(); err != nil {
		return s, fmt.Errorf("%w: superblock: %w", ErrCorrupt, err)
	}
	return s, nil
}

func isPow2(n uint64) bool { return n != 0 && bits.OnesCount64(n) == 1 }

// validate checks that the layout is self-consistent, so that nothing later
// computes an offset outside the device from a damaged but checksummed copy.
func (s *superblock) validate() error {
	bs := int64(s.BlockSize)
	switch {
	case !isPow2(uint64(s.BlockSize)) || s.BlockSize < MinBlockSize || s.BlockSize > MaxBlockSize:
		return fmt.Errorf("block size %d", s.BlockSize)
	case !isPow2(uint64(s.DevBlockSize)) || s.DevBlockSize > s.BlockSize:
		return fmt.Errorf("device block size %d with engine block size %d", s.DevBlockSize, s.BlockSize)
	case s.DeviceSize < MinDeviceSize || s.TotalBlocks <= 0 || s.TotalBlocks > s.DeviceSize/bs:
		return fmt.Errorf("device size %d holds no %d blocks of %d bytes", s.DeviceSize, s.TotalBlocks, bs)
	case s.JournalStart != 2 || s.JournalBlocks < 1:
		return fmt.Errorf("journal at %d+%d", s.JournalStart, s.JournalBlocks)
	case s.JournalBlocks >= s.TotalBlocks || s.CkptBlocks >= s.TotalBlocks:
		// Bounded before the sums below, which must not wrap around.
		return fmt.Errorf("journal of %d and checkpoints of %d blocks on a device of %d", s.JournalBlocks, s.CkptBlocks, s.TotalBlocks)
	case s.CkptBlocks < 1 || s.CkptStart[0] != s.JournalStart+s.JournalBlocks || s.CkptStart[1] != s.CkptStart[0]+s.CkptBlocks:
		return fmt.Errorf("checkpoints at %d and %d, %d blocks each", s.CkptStart[0], s.CkptStart[1], s.CkptBlocks)
	case s.DataStart != s.CkptStart[1]+s.CkptBlocks || s.DataStart*2 > s.TotalBlocks:
		// Format leaves at least half the device to data.
		return fmt.Errorf("data region at %d of %d blocks", s.DataStart, s.TotalBlocks)
	}
	return nil
}

// dataAlignment is the alignment of the data region, in bytes, for
// metadata of metaBytes: dataAlign, or the largest power of two up to
// half the metadata if that is less.
func dataAlignment(metaBytes int64) int64 {
	half := max(metaBytes/2, 1)
	return min(int64(dataAlign), int64(1)<<(63-bits.LeadingZeros64(uint64(half))))
}

// layout computes the superblock for a device of size bytes.
func layout(size int64, devBS, bs int, metadataSize int64) (superblock, error) {
	var s superblock
	if size < MinDeviceSize {
		return s, fmt.Errorf("%w: device has %d bytes, the minimum is %d (16 MiB)", errInvalid, size, MinDeviceSize)
	}
	if metadataSize < 0 || metadataSize > size {
		return s, fmt.Errorf("%w: MetadataSize %d outside [0, the device's %d bytes]", errInvalid, metadataSize, size)
	}
	if metadataSize == 0 {
		metadataSize = min(max(size/32, minMetadataSize), maxMetadataSize)
	}
	b := int64(bs)
	total := size / b
	metaBlocks := (metadataSize + b - 1) / b
	// Journal gets half, each checkpoint a quarter.
	ckpt := max(metaBlocks/4, 1)
	journal := max(metaBlocks-2*ckpt, 1)
	// The data region starts on a dataAlign boundary, as partitions and
	// file systems align theirs: a device's internal units (flash pages
	// and erase blocks, RAID stripes, a host file's extents under a
	// virtual disk) are aligned to the device's start, and a 1 MiB
	// writeback I/O that straddles two of them can cost two. The journal
	// gives up the blocks in front of the boundary, or takes the blocks
	// up to it when that would cost it more than half its size. Metadata
	// under 2 MiB (tiny devices, tests) aligns to the largest power of two
	// up to half its size instead, so that its journal stays about the
	// size asked for.
	if align := dataAlignment(metaBlocks*b) / b; align > 1 {
		if rem := (2 + journal + 2*ckpt) % align; rem != 0 {
			if journal-rem >= (journal+1)/2 {
				journal -= rem
			} else {
				journal += align - rem
			}
		}
	}
	s = superblock{
		Version:       formatVersion,
		BlockSize:     uint32(bs),
		DevBlockSize:  uint32(devBS),
		DeviceSize:    size,
		TotalBlocks:   total,
		JournalStart:  2,
		JournalBlocks: journal,
		CkptBlocks:    ckpt,
	}
	s.CkptStart[0] = s.JournalStart + journal
	s.CkptStart[1] = s.CkptStart[0] + ckpt
	s.DataStart = s.CkptStart[1] + ckpt
	// The data region must be at least as large as the metadata, or the
	// device is mostly bookkeeping.
	if s.DataStart*2 > total {
		return s, fmt.Errorf("%w: metadata of %d bytes leaves too little data space on a %d-byte device", errInvalid, s.DataStart*b, size)
	}
	return s, s.validate()
}

// Checkpoint blocks. Each block carries its own header and checksum so that a
// torn checkpoint write is detected wherever it tore:
//
//	0  magic u32 | 4 index u32 | 8 seq u64 | 16 count u32 | 20 payload u32 | payload ... | crc32c u32 (last 4 bytes)
const (
	ckptMagic     = 0x4b434252 // "RBCK"
	ckptHeaderLen = 24
	ckptVersion   = 2
	// extentRecLen is the encoded size of one extent: logical, physical, length.
	extentRecLen = 24
)

// checkpoint is a full snapshot of the metadata at sequence Seq. The
// journal continues after it with transaction Seq+1 at block JournalPos of
// the ring, chained to Chain.
type checkpoint struct {
	Seq          uint64
	NextObjectID uint64
	JournalPos   int64
	Chain        uint32
	Objects      []ckptObject
	encodedLen   int // bytes on disk, set by encodeCheckpoint and decodeCheckpoint
	payloadLen   int // payload bytes (what the region's capacity counts), set by both too
}

type ckptObject struct {
	ID      uint64
	Name    string
	Size    int64
	Extents []ckptExtent // Written extents, sorted by Logical
}

type ckptExtent struct{ Logical, Physical, Length int64 } // blocks

// errCkptFull reports that a checkpoint does not fit its region.
var errCkptFull = ErrMetadataFull

// encodeCheckpoint serialises c into whole blocks of size bs, at most
// maxBlocks of them, appending to dst (which is reused when large enough).
func encodeCheckpoint(dst []byte, c *checkpoint, bs int, maxBlocks int64) ([]byte, error) {
	le := binary.LittleEndian
	payload := make([]byte, 0, 64+len(c.Objects)*64)
	payload = le.AppendUint32(payload, ckptVersion)
	payload = le.AppendUint64(payload, c.NextObjectID)
	payload = le.AppendUint64(payload, uint64(c.JournalPos))
	payload = le.AppendUint32(payload, c.Chain)
	payload = le.AppendUint32(payload, uint32(len(c.Objects)))
	for i := range c.Objects {
		o := &c.Objects[i]
		payload = le.AppendUint64(payload, o.ID)
		payload = le.AppendUint16(payload, uint16(len(o.Name)))
		payload = append(payload, o.Name...)
		payload = le.AppendUint64(payload, uint64(o.Size))
		payload = le.AppendUint32(payload, uint32(len(o.Extents)))
		for _, e := range o.Extents {
			payload = le.AppendUint64(payload, uint64(e.Logical))
			payload = le.AppendUint64(payload, uint64(e.Physical))
			payload = le.AppendUint64(payload, uint64(e.Length))
		}
	}
	per := bs - ckptHeaderLen - 4
	count := max((len(payload)+per-1)/per, 1)
	if int64(count) > maxBlocks {
		return nil, fmt.Errorf("%w: checkpoint needs %d blocks, the region holds %d", errCkptFull, count, maxBlocks)
	}
	need := count * bs
	c.encodedLen, c.payloadLen = need, len(payload)
	if cap(dst) < need {
		dst = alignedBuf(need) // O_DIRECT: the device checks the address
	}
	dst = dst[:need]
	for i := 0; i < count; i++ {
		blk := dst[i*bs : (i+1)*bs]
		clear(blk)
		chunk := payload[min(i*per, len(payload)):min((i+1)*per, len(payload))]
		le.PutUint32(blk[0:], ckptMagic)
		le.PutUint32(blk[4:], uint32(i))
		le.PutUint64(blk[8:], c.Seq)
		le.PutUint32(blk[16:], uint32(count))
		le.PutUint32(blk[20:], uint32(len(chunk)))
		copy(blk[ckptHeaderLen:], chunk)
		le.PutUint32(blk[bs-4:], crc(blk[:bs-4]))
	}
	return dst, nil
}

// ckptHeader reads the header of a checkpoint's first block, so the reader
// knows how many blocks to fetch. It verifies that block's checksum.
func ckptHeader(blk []byte) (seq uint64, count int, err error) {
	le := binary.LittleEndian
	bs := len(blk)
	if bs < ckptHeaderLen+4 {
		return 0, 0, fmt.Errorf("%w: checkpoint block of %d bytes", ErrCorrupt, bs)
	}
	if le.Uint32(blk[0:]) != ckptMagic {
		return 0, 0, fmt.Errorf("%w: checkpoint: bad magic", ErrCorrupt)
	}
	if got, want := le.Uint32(blk[bs-4:]), crc(blk[:bs-4]); got != want {
		return 0, 0, fmt.Errorf("%w: checkpoint block 0: checksum %08x, want %08x", ErrCorrupt, got, want)
	}
	if le.Uint32(blk[4:]) != 0 {
		return 0, 0, fmt.Errorf("%w: checkpoint: first block has index %d", ErrCorrupt, le.Uint32(blk[4:]))
	}
	return le.Uint64(blk[8:]), int(le.Uint32(blk[16:])), nil
}

// decodeCheckpoint parses a whole checkpoint (count blocks of size bs). It
// never panics and never allocates more than the input can describe.
func decodeCheckpoint(data []byte, bs int) (*checkpoint, error) {
	le := binary.LittleEndian
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: checkpoint: %s", ErrCorrupt, fmt.Sprintf(format, a...))
	}
	if bs < ckptHeaderLen+4 || len(data) < bs || len(data)%bs != 0 {
		return nil, bad("%d bytes is not whole %d-byte blocks", len(data), bs)
	}
	seq, count, err := ckptHeader(data[:bs])
	if err != nil {
		return nil, err
	}
	if count < 1 || count > len(data)/bs {
		return nil, bad("claims %d blocks, %d present", count, len(data)/bs)
	}
	per := bs - ckptHeaderLen - 4
	payload := make([]byte, 0, min(count*per, len(data)))
	for i := 0; i < count; i++ {
		blk := data[i*bs : (i+1)*bs]
		if le.Uint32(blk[0:]) != ckptMagic || le.Uint32(blk[4:]) != uint32(i) ||
			le.Uint64(blk[8:]) != seq || le.Uint32(blk[16:]) != uint32(count) {
			return nil, bad("block %d does not belong to checkpoint %d (torn write?)", i, seq)
		}
		if got, want := le.Uint32(blk[bs-4:]), crc(blk[:bs-4]); got != want {
			return nil, bad("block %d: checksum %08x, want %08x", i, got, want)
		}
		n := int(le.Uint32(blk[20:]))
		if n > per {
			return nil, bad("block %d: payload %d bytes, at most %d", i, n, per)
		}
		payload = append(payload, blk[ckptHeaderLen:ckptHeaderLen+n]...)
	}
	r := reader{b: payload}
	if v := r.u32(); v != ckptVersion {
		if r.err != nil {
			return nil, bad("truncated header")
		}
		return nil, bad("payload version %d", v)
	}
	c := &checkpoint{Seq: seq, NextObjectID: r.u64(), JournalPos: int64(r.u64()), Chain: r.u32()}
	nobj := int(r.u32())
	if r.err != nil {
		return nil, bad("truncated header")
	}
	if c.JournalPos < 0 || c.NextObjectID == 0 || c.NextObjectID >= 1<<62 {
		return nil, bad("journal position %d, next object id %d", c.JournalPos, c.NextObjectID)
	}
	// Each object takes at least 22 bytes; refuse counts the payload cannot hold.
	if nobj > r.remaining()/22 {
		return nil, bad("claims %d objects in %d bytes", nobj, r.remaining())
	}
	c.Objects = make([]ckptObject, 0, nobj)
	names := make(map[string]struct{}, nobj)
	ids := make(map[uint64]struct{}, nobj)
	for i := 0; i < nobj; i++ {
		var o ckptObject
		o.ID = r.u64()
		nl := int(r.u16())
		o.Name = string(r.bytes(nl))
		o.Size = int64(r.u64())
		ne := int(r.u32())
		if r.err != nil {
			return nil, bad("object %d: truncated", i)
		}
		if err := checkName(o.Name); err != nil {
			return nil, bad("object %d: %v", i, err)
		}
		if _, dup := names[o.Name]; dup {
			return nil, bad("object name %q appears twice", o.Name)
		}
		if _, dup := ids[o.ID]; dup || o.ID == 0 || o.ID >= c.NextObjectID {
			return nil, bad("object %q: id %d (next id %d)", o.Name, o.ID, c.NextObjectID)
		}
		names[o.Name], ids[o.ID] = struct{}{}, struct{}{}
		if o.Size < 0 || o.Size > MaxObjectSize {
			return nil, bad("object %q: size %d", o.Name, o.Size)
		}
		if ne > r.remaining()/extentRecLen {
			return nil, bad("object %q claims %d extents in %d bytes", o.Name, ne, r.remaining())
		}
		o.Extents = make([]ckptExtent, ne)
		prevEnd := int64(0)
		for j := range o.Extents {
			e := ckptExtent{int64(r.u64()), int64(r.u64()), int64(r.u64())}
			if e.Length <= 0 || e.Logical < prevEnd || e.Physical < 0 ||
				e.Logical > MaxObjectSize/MinBlockSize || e.Length > MaxObjectSize/MinBlockSize ||
				e.Physical > MaxObjectSize || e.Logical+e.Length > (o.Size+int64(bs)-1)/int64(bs) {
				return nil, bad("object %q: extent %d %+v out of order or out of range", o.Name, j, e)
			}
			prevEnd = e.Logical + e.Length
			o.Extents[j] = e
		}
		c.Objects = append(c.Objects, o)
	}
	if r.err != nil {
		return nil, bad("truncated")
	}
	if r.remaining() != 0 {
		return nil, bad("%d trailing bytes", r.remaining())
	}
	c.encodedLen, c.payloadLen = count*bs, len(payload)
	return c, nil
}

// reader is a bounds-checked little-endian decoder; after the first short
// read every call returns zero and err stays set.
type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) remaining() int { return len(r.b) - r.off }

func (r *reader) bytes(n int) []byte {
	if r.err != nil || n < 0 || n > r.remaining() {
		r.err = errors.New("short")
		return nil
	}
	p := r.b[r.off : r.off+n]
	r.off += n
	return p
}

func (r *reader) u16() uint16 {
	if p := r.bytes(2); p != nil {
		return binary.LittleEndian.Uint16(p)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if p := r.bytes(4); p != nil {
		return binary.LittleEndian.Uint32(p)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if p := r.bytes(8); p != nil {
		return binary.LittleEndian.Uint64(p)
	}
	return 0
}

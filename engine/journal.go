package engine

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/rawblock/rawblock/extenttree"
)

// The metadata journal (DESIGN.md "On-disk layout"). Every metadata change is
// logged, in the order it is applied in memory, as a small operation appended
// to the pending batch. A commit writes the batch as one transaction: one or
// more whole blocks at a block boundary of the journal ring, so that writing
// a transaction never rewrites a block holding an earlier, acknowledged one.
//
// Transaction, little-endian:
//
//	0 magic u32 | 4 blocks u32 | 8 seq u64 | 16 prev u32 | 20 payload u32 |
//	24 uuid [16] | 40 crc u32 | 44 payload (operations) ... zero padding
//
// crc is crc32c over all the transaction's blocks with the crc field zero, so
// a write torn anywhere is detected. prev is the crc of the transaction before
// it (or the checkpoint's chain value), and uuid is the superblock's: a stale
// transaction from an earlier lap of the ring, from a history a crash cut
// short, or from an earlier format never continues the chain.
//
// Operations apply "last writer wins" per object and per logical block, so
// replaying one that a checkpoint already reflects changes nothing: replay is
// idempotent, and a checkpoint may be taken while operations are logged.
const (
	txMagic     = 0x4a544252 // "RBTJ"
	txHeaderLen = 44

	opCreate = 1 // id u64, name len u16, name
	opRemove = 2 // id u64
	opSize   = 3 // id u64, size u64
	opMap    = 4 // id u64, logical u64, physical u64, length u64: Written
	opUnmap  = 5 // id u64, logical u64, length u64: back to a hole

	opMapLen   = 1 + 4*8
	opUnmapLen = 1 + 3*8
	opSizeLen  = 1 + 2*8
)

// jop is one decoded journal operation.
type jop struct {
	kind       byte
	id         uint64
	name       string
	size       int64
	logical    int64
	physical   int64
	length     int64
	payloadOff int // where it starts in its payload, for error messages
}

// appendOp encodes op onto dst.
func appendOp(dst []byte, op jop) []byte {
	le := binary.LittleEndian
	dst = append(dst, op.kind)
	dst = le.AppendUint64(dst, op.id)
	switch op.kind {
	case opCreate:
		dst = le.AppendUint16(dst, uint16(len(op.name)))
		dst = append(dst, op.name...)
	case opRemove:
	case opSize:
		dst = le.AppendUint64(dst, uint64(op.size))
	case opMap:
		dst = le.AppendUint64(dst, uint64(op.logical))
		dst = le.AppendUint64(dst, uint64(op.physical))
		dst = le.AppendUint64(dst, uint64(op.length))
	case opUnmap:
		dst = le.AppendUint64(dst, uint64(op.logical))
		dst = le.AppendUint64(dst, uint64(op.length))
	default:
		panic(fmt.Sprintf("rawblock: journal: encoding unknown operation %d", op.kind))
	}
	return dst
}

// decodeOps calls fn for each operation of a transaction payload. Field
// ranges are checked here; whether an operation fits the state it applies to
// is the applier's business.
func decodeOps(payload []byte, fn func(op jop) error) error {
	r := reader{b: payload}
	for r.remaining() > 0 {
		op := jop{payloadOff: r.off}
		op.kind = r.bytes(1)[0]
		op.id = r.u64()
		switch op.kind {
		case opCreate:
			op.name = string(r.bytes(int(r.u16())))
		case opRemove:
		case opSize:
			op.size = int64(r.u64())
		case opMap:
			op.logical, op.physical, op.length = int64(r.u64()), int64(r.u64()), int64(r.u64())
		case opUnmap:
			op.logical, op.length = int64(r.u64()), int64(r.u64())
		default:
			return fmt.Errorf("operation at byte %d: unknown kind %d", op.payloadOff, op.kind)
		}
		if r.err != nil {
			return fmt.Errorf("operation at byte %d: truncated", op.payloadOff)
		}
		if err := op.validate(); err != nil {
			return fmt.Errorf("operation at byte %d: %w", op.payloadOff, err)
		}
		if err := fn(op); err != nil {
			return fmt.Errorf("operation at byte %d: %w", op.payloadOff, err)
		}
	}
	return nil
}

// validate checks an operation's fields against the format's limits.
func (op *jop) validate() error {
	if op.id == 0 || op.id >= 1<<62 {
		return fmt.Errorf("object id %d", op.id)
	}
	switch op.kind {
	case opCreate:
		return checkName(op.name)
	case opSize:
		if op.size < 0 || op.size > MaxObjectSize {
			return fmt.Errorf("size %d", op.size)
		}
	case opMap, opUnmap:
		if op.logical < 0 || op.length <= 0 || op.logical > extenttree.BlockLimit-op.length {
			return fmt.Errorf("logical range %d+%d", op.logical, op.length)
		}
		if op.kind == opMap && (op.physical < 0 || op.physical > extenttree.BlockLimit-op.length) {
			return fmt.Errorf("physical range %d+%d", op.physical, op.length)
		}
	}
	return nil
}

// txHdr is a decoded transaction header.
type txHdr struct {
	blocks  int
	seq     uint64
	prev    uint32
	payload int
	uuid    [16]byte
	crc     uint32
}

// txBlocks is how many blocks a transaction with n payload bytes takes.
func txBlocks(n, bs int) int { return (txHeaderLen + n + bs - 1) / bs }

// encodeTx writes a transaction carrying payload into dst, which must be
// txBlocks(len(payload), bs) blocks long, and returns its crc.
func encodeTx(dst, payload []byte, bs int, seq uint64, prev uint32, uuid [16]byte) uint32 {
	le := binary.LittleEndian
	n := txBlocks(len(payload), bs)
	if len(dst) != n*bs {
		panic(fmt.Sprintf("rawblock: journal: transaction buffer of %d bytes, need %d", len(dst), n*bs))
	}
	le.PutUint32(dst[0:], txMagic)
	le.PutUint32(dst[4:], uint32(n))
	le.PutUint64(dst[8:], seq)
	le.PutUint32(dst[16:], prev)
	le.PutUint32(dst[20:], uint32(len(payload)))
	copy(dst[24:40], uuid[:])
	le.PutUint32(dst[40:], 0)
	copy(dst[txHeaderLen:], payload)
	clear(dst[txHeaderLen+len(payload):])
	sum := crc(dst)
	le.PutUint32(dst[40:], sum)
	return sum
}

// parseTxHeader reads the header in a transaction's first block. It checks
// only what the block itself shows; the crc needs every block.
func parseTxHeader(blk []byte) (txHdr, error) {
	le := binary.LittleEndian
	var h txHdr
	if len(blk) < txHeaderLen {
		return h, fmt.Errorf("block of %d bytes", len(blk))
	}
	if le.Uint32(blk[0:]) != txMagic {
		return h, errors.New("no transaction magic")
	}
	h.blocks = int(le.Uint32(blk[4:]))
	h.seq = le.Uint64(blk[8:])
	h.prev = le.Uint32(blk[16:])
	h.payload = int(le.Uint32(blk[20:]))
	copy(h.uuid[:], blk[24:40])
	h.crc = le.Uint32(blk[40:])
	if h.blocks < 1 || h.payload < 0 || txBlocks(h.payload, len(blk)) != h.blocks {
		return h, fmt.Errorf("%d payload bytes in %d blocks", h.payload, h.blocks)
	}
	return h, nil
}

// verifyTx checks the crc of a whole transaction (h.blocks blocks in data)
// and returns its payload.
func verifyTx(data []byte, h txHdr) ([]byte, error) {
	if len(data) < txHeaderLen+h.payload {
		return nil, fmt.Errorf("transaction of %d bytes, header says %d payload bytes", len(data), h.payload)
	}
	le := binary.LittleEndian
	saved := le.Uint32(data[40:])
	le.PutUint32(data[40:], 0)
	sum := crc(data)
	le.PutUint32(data[40:], saved)
	if sum != h.crc {
		return nil, fmt.Errorf("checksum %08x, want %08x", sum, h.crc)
	}
	return data[txHeaderLen : txHeaderLen+h.payload], nil
}

// chainStart is the chain value a fresh format starts the journal with.
func chainStart(uuid [16]byte) uint32 { return crc(uuid[:]) }

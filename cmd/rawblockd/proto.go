package main

// The NBD wire protocol: the fixed-newstyle handshake and the transmission
// phase with simple and structured replies, written here from the protocol
// document (doc/proto.md of the NBD project). Every integer is big-endian.

import (
	"encoding/binary"
	"errors"
	"syscall"
)

// Magic numbers.
const (
	nbdMagic             uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic             uint64 = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic        uint64 = 0x0003e889045565a9
	requestMagic         uint32 = 0x25609513
	simpleReplyMagic     uint32 = 0x67446698
	structuredReplyMagic uint32 = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFixedNewstyle uint32 = 1 << 0
	clientNoZeroes      uint32 = 1 << 1
)

// Transmission flags: what the export supports.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Options.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
	optExtendedHeaders uint32 = 11
)

// Option reply types.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repErrBit      uint32 = 1 << 31
	repErrUnsup           = repErrBit | 1
	repErrPolicy          = repErrBit | 2
	repErrInvalid         = repErrBit | 3
	repErrUnknown         = repErrBit | 6
	repErrShutdown        = repErrBit | 7
	repErrTooBig          = repErrBit | 9
)

// NBD_INFO types sent in NBD_REP_INFO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cflagFUA      uint16 = 1 << 0
	cflagNoHole   uint16 = 1 << 1
	cflagDF       uint16 = 1 << 2
	cflagReqOne   uint16 = 1 << 3
	cflagFastZero uint16 = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 | 1
)

// base:allocation status flags.
const (
	stateHole uint32 = 1 << 0
	stateZero uint32 = 1 << 1
)

// metaContextBaseAllocation is the one metadata context we serve, with
// the id we give it.
const (
	metaContextBaseAllocation = "base:allocation"
	baseAllocationID          = 1
)

// Error values of the transmission phase (a fixed subset of errno values).
const (
	errPerm      uint32 = uint32(syscall.EPERM)
	errIO        uint32 = uint32(syscall.EIO)
	errInval     uint32 = uint32(syscall.EINVAL)
	errNoSpc     uint32 = uint32(syscall.ENOSPC)
	errOverflow  uint32 = uint32(syscall.EOVERFLOW)
	errNotSup    uint32 = uint32(syscall.ENOTSUP)
	errShutdown  uint32 = uint32(syscall.ESHUTDOWN)
	requestBytes        = 28 // magic, flags, type, handle, offset, length
	simpleBytes         = 16 // magic, error, handle
	chunkBytes          = 20 // magic, flags, type, handle, length
)

// Limits. Each is enforced with a protocol error or a disconnect.
const (
	// maxPayload is the largest READ or WRITE we serve (the block size
	// constraint we advertise). A larger READ gets EINVAL; a larger WRITE
	// is a disconnect, since skipping up to 4 GiB of payload to stay in
	// sync would let one client hold the connection for nothing.
	maxPayload = 32 << 20
	// maxOptionData bounds the data of one handshake option. The largest
	// legitimate one is NBD_OPT_GO with a 4096-byte name and a few info
	// requests; larger data is drained (up to maxOptionDrain) and answered
	// with NBD_REP_ERR_TOO_BIG.
	maxOptionData = 16 << 10
	// maxOptionDrain: option data beyond this is not read at all; the
	// client is dropped.
	maxOptionDrain = 1 << 20
	// maxOptions bounds the options one handshake may send, so a client
	// cannot hold a connection in haggling forever.
	maxOptions = 1024
	// maxNameLen is the protocol's limit on strings such as export names.
	maxNameLen = 4096
	// preferredBlock is the block size we advertise as preferred: the
	// engine's page size, which a write covers without a read-modify-write.
	preferredBlock = 4096
	// maxStatusDescriptors bounds the descriptors of one BLOCK_STATUS reply.
	maxStatusDescriptors = 1024
)

var errBadMagic = errors.New("bad magic")

// request is one transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

func (r *request) decode(b []byte) error {
	if binary.BigEndian.Uint32(b[0:4]) != requestMagic {
		return errBadMagic
	}
	r.flags = binary.BigEndian.Uint16(b[4:6])
	r.typ = binary.BigEndian.Uint16(b[6:8])
	r.handle = binary.BigEndian.Uint64(b[8:16])
	r.offset = binary.BigEndian.Uint64(b[16:24])
	r.length = binary.BigEndian.Uint32(b[24:28])
	return nil
}

func (r *request) encode(b []byte) {
	binary.BigEndian.PutUint32(b[0:4], requestMagic)
	binary.BigEndian.PutUint16(b[4:6], r.flags)
	binary.BigEndian.PutUint16(b[6:8], r.typ)
	binary.BigEndian.PutUint64(b[8:16], r.handle)
	binary.BigEndian.PutUint64(b[16:24], r.offset)
	binary.BigEndian.PutUint32(b[24:28], r.length)
}

// putSimple writes a simple reply header into b[:simpleBytes].
func putSimple(b []byte, errno uint32, handle uint64) {
	binary.BigEndian.PutUint32(b[0:4], simpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], handle)
}

// putChunk writes a structured reply chunk header into b[:chunkBytes].
func putChunk(b []byte, flags, typ uint16, handle uint64, length uint32) {
	binary.BigEndian.PutUint32(b[0:4], structuredReplyMagic)
	binary.BigEndian.PutUint16(b[4:6], flags)
	binary.BigEndian.PutUint16(b[6:8], typ)
	binary.BigEndian.PutUint64(b[8:16], handle)
	binary.BigEndian.PutUint32(b[16:20], length)
}

// cmdName names a command for logs and metrics labels.
func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
	}
	return "unknown"
}

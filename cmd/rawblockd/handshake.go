package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/rawblock/rawblock/engine"
)

// conn is one client connection: the handshake, then the transmission
// phase.
type conn struct {
	s      *server
	nc     net.Conn
	id     uint64
	remote string
	br     *bufio.Reader
	bw     *bufio.Writer // handshake replies only

	// mu orders interrupt against the handshake's deadlines.
	mu       sync.Mutex
	stopping bool

	// readSince/writeSince: when the payload read / reply write in
	// progress started (server.now), 0 when none; the watchdog reads them.
	readSince, writeSince atomic.Int64

	// Negotiated in the handshake.
	noZeroes   bool
	structured bool
	metaExport string // export the base:allocation context was set for
	metaSet    bool
}

// export is an object as one connection serves it.
type export struct {
	name  string
	obj   *engine.Object
	size  uint64
	flags uint16
	meta  bool // base:allocation negotiated for this export
	m     *exportMetrics
}

// errHandshake marks a handshake that ended without an export: the client
// aborted, broke the protocol, or asked for an export by NBD_OPT_EXPORT_NAME
// that does not exist.
var errHandshake = errors.New("handshake ended")

// errAborted is the client's own NBD_OPT_ABORT: not a failure.
var errAborted = fmt.Errorf("%w: client sent NBD_OPT_ABORT", errHandshake)

func newConn(s *server, nc net.Conn) *conn {
	return &conn{
		s:      s,
		nc:     nc,
		id:     connIDs.Add(1),
		remote: nc.RemoteAddr().String(),
		br:     bufio.NewReaderSize(nc, 64<<10),
		bw:     bufio.NewWriterSize(nc, 4<<10),
	}
}

// interrupt asks the connection to stop reading: a handshake ends, a
// transmission phase finishes the requests it has read and closes.
func (c *conn) interrupt() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	c.nc.SetReadDeadline(time.Now())
}

// setDeadline sets the connection's deadline unless it is being
// interrupted (then the read deadline stays in the past).
func (c *conn) setDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		c.nc.SetWriteDeadline(t)
		return
	}
	c.nc.SetDeadline(t)
}

func (c *conn) isStopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping
}

// run serves the connection to its end and closes it.
func (c *conn) run() {
	defer c.nc.Close()
	log := c.s.log.With("conn", c.id, "remote", c.remote)
	if c.s.cfg.HandshakeTimeout > 0 {
		c.setDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	}
	ex, err := c.handshake()
	if err != nil {
		if !errors.Is(err, errAborted) {
			c.s.m.handshakeFailures.Inc()
		}
		log.Debug("handshake ended", "err", err)
		return
	}
	c.setDeadline(time.Time{})
	ex.m = c.s.m.export(ex.name)
	log = log.With("export", ex.name)
	log.Info("client connected", "size", ex.size, "structured", c.structured, "base_allocation", ex.meta)
	inline, dispatched, err := c.transmit(ex)
	log = log.With("inline", inline, "dispatched", dispatched)
	switch {
	case errors.Is(err, errNoDisc):
		// Common (nbdfuse, a killed client): nothing was lost that the
		// client had not been told about.
		log.Info("client disconnected without NBD_CMD_DISC")
		return
	case err != nil:
		log.Warn("client dropped", "err", err)
		return
	}
	log.Info("client disconnected")
}

// handshake runs the fixed-newstyle negotiation up to NBD_OPT_GO or
// NBD_OPT_EXPORT_NAME and returns the export chosen.
func (c *conn) handshake() (*export, error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:8], nbdMagic)
	binary.BigEndian.PutUint64(b[8:16], optMagic)
	binary.BigEndian.PutUint16(b[16:18], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.bw.Write(b[:18]); err != nil {
		return nil, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, fmt.Errorf("client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		// The protocol requires dropping a client that sets flags we
		// did not offer.
		return nil, fmt.Errorf("%w: unknown client flags %#x", errHandshake, cflags)
	}
	// A client without FIXED_NEWSTYLE only ever sends NBD_OPT_EXPORT_NAME,
	// which is answered the same way in both styles.
	c.noZeroes = cflags&clientNoZeroes != 0

	for n := 0; ; n++ {
		if n == maxOptions {
			return nil, fmt.Errorf("%w: more than %d options", errHandshake, maxOptions)
		}
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return nil, fmt.Errorf("option header: %w", err)
		}
		if binary.BigEndian.Uint64(h[0:8]) != optMagic {
			return nil, fmt.Errorf("%w: bad option magic %#x", errHandshake, binary.BigEndian.Uint64(h[0:8]))
		}
		opt := binary.BigEndian.Uint32(h[8:12])
		length := binary.BigEndian.Uint32(h[12:16])
		if length > maxOptionData {
			if opt == optExportName {
				// EXPORT_NAME has no error reply: refusing it ends the
				// session.
				return nil, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME with %d bytes of data", errHandshake, length)
			}
			if opt == optSetMetaContext {
				c.metaSet, c.metaExport = false, ""
			}
			if length > maxOptionDrain {
				return nil, fmt.Errorf("%w: option %d with %d bytes of data", errHandshake, opt, length)
			}
			if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
				return nil, fmt.Errorf("option data: %w", err)
			}
			if err := c.optReply(opt, repErrTooBig, msg(fmt.Sprintf("option data of %d bytes exceeds %d", length, maxOptionData))); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("option data: %w", err)
		}
		ex, err := c.option(opt, data)
		if err != nil || ex != nil {
			return ex, err
		}
	}
}

// msg is option reply data: a message for the user.
func msg(s string) []byte { return []byte(s) }

// optReply sends one option reply and flushes it.
func (c *conn) optReply(opt, typ uint32, data ...[]byte) error {
	n := 0
	for _, d := range data {
		n += len(d)
	}
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:8], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:12], opt)
	binary.BigEndian.PutUint32(h[12:16], typ)
	binary.BigEndian.PutUint32(h[16:20], uint32(n))
	c.bw.Write(h[:])
	for _, d := range data {
		c.bw.Write(d)
	}
	return c.bw.Flush()
}

// option handles one option. It returns the export when the option ends
// the handshake with one, an error when the connection must close.
func (c *conn) option(opt uint32, data []byte) (*export, error) {
	switch opt {
	case optExportName:
		name := string(data)
		ex, rep, why := c.lookup(name)
		if rep != 0 {
			// NBD_OPT_EXPORT_NAME cannot answer an error: the
			// protocol's only way to refuse is to close.
			return nil, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME %q: %s", errHandshake, name, why)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:8], ex.size)
		binary.BigEndian.PutUint16(b[8:10], ex.flags)
		n := len(b)
		if c.noZeroes {
			n = 10
		}
		c.bw.Write(b[:n])
		if err := c.bw.Flush(); err != nil {
			return nil, err
		}
		return ex, nil

	case optAbort:
		// The client may close without reading this; ignore errors.
		c.optReply(opt, repAck)
		return nil, errAborted

	case optList:
		if len(data) != 0 {
			return nil, c.optReply(opt, repErrInvalid, msg("NBD_OPT_LIST takes no data"))
		}
		for _, name := range c.s.eng.Objects() {
			if !utf8.ValidString(name) {
				// NBD names are UTF-8, and GO refuses this one: an
				// object another program made, not an export.
				continue
			}
			var l [4]byte
			binary.BigEndian.PutUint32(l[:], uint32(len(name)))
			if err := c.optReply(opt, repServer, l[:], []byte(name)); err != nil {
				return nil, err
			}
		}
		return nil, c.optReply(opt, repAck)

	case optStartTLS:
		return nil, c.optReply(opt, repErrPolicy, msg("rawblockd does not serve TLS"))

	case optStructuredReply:
		if len(data) != 0 {
			return nil, c.optReply(opt, repErrInvalid, msg("NBD_OPT_STRUCTURED_REPLY takes no data"))
		}
		c.structured = true
		return nil, c.optReply(opt, repAck)

	case optInfo, optGo:
		return c.infoGo(opt, data)

	case optListMetaContext, optSetMetaContext:
		return nil, c.metaContext(opt, data)
	}
	return nil, c.optReply(opt, repErrUnsup, msg(fmt.Sprintf("option %d is not supported", opt)))
}

// lookup resolves an export name. On failure it returns the option error
// to answer and why.
func (c *conn) lookup(name string) (*export, uint32, string) {
	if name == "" {
		if c.s.cfg.DefaultExport == "" {
			return nil, repErrUnknown, "no default export (ask for an export by name; NBD_OPT_LIST lists them)"
		}
		name = c.s.cfg.DefaultExport
	}
	if len(name) > maxNameLen || !utf8.ValidString(name) {
		return nil, repErrInvalid, "export name longer than 4096 bytes or not UTF-8"
	}
	obj, err := c.s.eng.Object(name)
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, fs.ErrInvalid):
		return nil, repErrUnknown, fmt.Sprintf("no export %q", name)
	case errors.Is(err, engine.ErrClosed):
		return nil, repErrShutdown, "server shutting down"
	case err != nil:
		return nil, repErrUnknown, fmt.Sprintf("export %q: %v", name, err)
	}
	flags := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagCanMultiConn | tflagSendCache
	if c.s.cfg.ReadOnly {
		flags |= tflagReadOnly
	} else {
		flags |= tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero
	}
	if c.structured {
		// We always answer a read with one chunk.
		flags |= tflagSendDF
	}
	return &export{
		name:  name,
		obj:   obj,
		size:  uint64(obj.Size()),
		flags: flags,
		meta:  c.metaSet && c.metaExport == name,
	}, 0, ""
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) infoGo(opt uint32, data []byte) (*export, error) {
	if len(data) < 6 {
		return nil, c.optReply(opt, repErrInvalid, msg("option data too short"))
	}
	nlen := binary.BigEndian.Uint32(data[0:4])
	if uint64(nlen)+6 > uint64(len(data)) {
		return nil, c.optReply(opt, repErrInvalid, msg("export name length past the option data"))
	}
	name := string(data[4 : 4+nlen])
	rest := data[4+nlen:]
	nreq := int(binary.BigEndian.Uint16(rest[0:2]))
	if len(rest) != 2+2*nreq {
		return nil, c.optReply(opt, repErrInvalid, msg("information request count does not match the option length"))
	}
	wantName, wantDesc := false, false
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2+2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	ex, rep, why := c.lookup(name)
	if rep != 0 {
		return nil, c.optReply(opt, rep, msg(why))
	}
	var b [14]byte
	binary.BigEndian.PutUint16(b[0:2], infoExport)
	binary.BigEndian.PutUint64(b[2:10], ex.size)
	binary.BigEndian.PutUint16(b[10:12], ex.flags)
	if err := c.optReply(opt, repInfo, b[:12]); err != nil {
		return nil, err
	}
	if wantName {
		binary.BigEndian.PutUint16(b[0:2], infoName)
		if err := c.optReply(opt, repInfo, b[:2], []byte(ex.name)); err != nil {
			return nil, err
		}
	}
	if wantDesc {
		binary.BigEndian.PutUint16(b[0:2], infoDescription)
		if err := c.optReply(opt, repInfo, b[:2], []byte("rawblock object "+ex.name)); err != nil {
			return nil, err
		}
	}
	// Block sizes, always: any alignment works (the engine does
	// read-modify-write), whole pages are cheapest, maxPayload is the
	// most one request may carry.
	var bs [14]byte
	binary.BigEndian.PutUint16(bs[0:2], infoBlockSize)
	binary.BigEndian.PutUint32(bs[2:6], 1)
	binary.BigEndian.PutUint32(bs[6:10], preferredBlock)
	binary.BigEndian.PutUint32(bs[10:14], maxPayload)
	if err := c.optReply(opt, repInfo, bs[:]); err != nil {
		return nil, err
	}
	if err := c.optReply(opt, repAck); err != nil {
		return nil, err
	}
	if opt == optInfo {
		return nil, nil
	}
	return ex, nil
}

// metaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. The one context served is base:allocation.
func (c *conn) metaContext(opt uint32, data []byte) error {
	if opt == optSetMetaContext {
		// A SET replaces whatever an earlier one selected, even when it
		// fails (the protocol says so).
		c.metaSet, c.metaExport = false, ""
	}
	if !c.structured {
		return c.optReply(opt, repErrInvalid, msg("negotiate structured replies first"))
	}
	name, queries, ok := parseMetaQuery(data)
	if !ok {
		return c.optReply(opt, repErrInvalid, msg("malformed metadata context query"))
	}
	ex, rep, why := c.lookup(name)
	if rep != 0 {
		return c.optReply(opt, rep, msg(why))
	}
	selected := false
	for _, q := range queries {
		switch {
		case q == metaContextBaseAllocation:
			selected = true
		case opt == optListMetaContext && q == "base:":
			selected = true
		}
	}
	if opt == optListMetaContext && len(queries) == 0 {
		selected = true
	}
	if opt == optSetMetaContext {
		// The resolved name: a client that set the context for the
		// default export ("") and then selects it gets block status.
		c.metaSet, c.metaExport = selected, ex.name
	}
	if selected {
		id := uint32(0) // LIST replies carry no usable id
		if opt == optSetMetaContext {
			id = baseAllocationID
		}
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], id)
		if err := c.optReply(opt, repMetaContext, b[:], []byte(metaContextBaseAllocation)); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck)
}

// parseMetaQuery splits the data of a metadata context option: export
// name, then a count of queries, each length-prefixed.
func parseMetaQuery(data []byte) (string, []string, bool) {
	if len(data) < 8 {
		return "", nil, false
	}
	nlen := binary.BigEndian.Uint32(data[0:4])
	if uint64(nlen)+8 > uint64(len(data)) || nlen > maxNameLen {
		return "", nil, false
	}
	name := string(data[4 : 4+nlen])
	rest := data[4+nlen:]
	n := binary.BigEndian.Uint32(rest[0:4])
	rest = rest[4:]
	if uint64(n)*4 > uint64(len(rest)) {
		return "", nil, false
	}
	qs := make([]string, 0, n)
	for range n {
		if len(rest) < 4 {
			return "", nil, false
		}
		l := binary.BigEndian.Uint32(rest[0:4])
		if uint64(l)+4 > uint64(len(rest)) || l > maxNameLen {
			return "", nil, false
		}
		qs = append(qs, string(rest[4:4+l]))
		rest = rest[4+l:]
	}
	if len(rest) != 0 {
		return "", nil, false
	}
	return name, qs, true
}

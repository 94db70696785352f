package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// testClient is a small NBD client for the protocol tests: it speaks the
// handshake option by option and sends requests and reads replies one at a
// time or pipelined, so tests can also send what a good client never would.
type testClient struct {
	t     testing.TB
	nc    net.Conn
	br    *bufio.Reader
	bw    *bufio.Writer
	hflag uint16

	structured bool
	size       uint64
	flags      uint16

	// lengths of reads in flight, by handle, to know how much data a
	// simple reply carries.
	reads map[uint64]uint32
}

// optReply is one option reply.
type optReplyMsg struct {
	opt, typ uint32
	data     []byte
}

// reply is the whole answer to one request.
type reply struct {
	handle uint64
	errno  uint32
	msg    string
	data   []byte      // read data, reassembled
	descs  [][2]uint32 // block status descriptors (length, flags)
	chunks int
}

func dialRaw(t testing.TB, network, addr string) *testClient {
	t.Helper()
	nc, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	return &testClient{t: t, nc: nc, br: bufio.NewReader(nc), bw: bufio.NewWriter(nc), reads: map[uint64]uint32{}}
}

// greet reads the server's greeting and sends client flags.
func (c *testClient) greet(cflags uint32) error {
	var b [18]byte
	if _, err := io.ReadFull(c.br, b[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(b[0:8]) != nbdMagic || binary.BigEndian.Uint64(b[8:16]) != optMagic {
		return fmt.Errorf("bad greeting % x", b)
	}
	c.hflag = binary.BigEndian.Uint16(b[16:18])
	binary.BigEndian.PutUint32(b[:4], cflags)
	c.bw.Write(b[:4])
	return c.bw.Flush()
}

// sendOpt sends one option.
func (c *testClient) sendOpt(opt uint32, data []byte) error {
	var h [16]byte
	binary.BigEndian.PutUint64(h[0:8], optMagic)
	binary.BigEndian.PutUint32(h[8:12], opt)
	binary.BigEndian.PutUint32(h[12:16], uint32(len(data)))
	c.bw.Write(h[:])
	c.bw.Write(data)
	return c.bw.Flush()
}

// readOptReply reads one option reply.
func (c *testClient) readOptReply() (optReplyMsg, error) {
	var h [20]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return optReplyMsg{}, err
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != optReplyMagic {
		return optReplyMsg{}, fmt.Errorf("option reply magic %#x", m)
	}
	r := optReplyMsg{opt: binary.BigEndian.Uint32(h[8:12]), typ: binary.BigEndian.Uint32(h[12:16])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:20]))
	_, err := io.ReadFull(c.br, r.data)
	return r, err
}

// opt sends an option and collects its replies up to the final one (an
// ACK or an error).
func (c *testClient) opt(opt uint32, data []byte) ([]optReplyMsg, error) {
	if err := c.sendOpt(opt, data); err != nil {
		return nil, err
	}
	var out []optReplyMsg
	for {
		r, err := c.readOptReply()
		if err != nil {
			return out, err
		}
		if r.opt != opt {
			return out, fmt.Errorf("reply to option %d, sent %d", r.opt, opt)
		}
		out = append(out, r)
		if r.typ == repAck || r.typ&repErrBit != 0 {
			return out, nil
		}
	}
}

// infoData builds NBD_OPT_INFO/GO data.
func infoData(name string, reqs ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

// metaData builds NBD_OPT_{LIST,SET}_META_CONTEXT data.
func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goExport sends NBD_OPT_GO and enters transmission on success.
func (c *testClient) goExport(name string) ([]optReplyMsg, error) {
	rs, err := c.opt(optGo, infoData(name, infoBlockSize))
	if err != nil {
		return rs, err
	}
	last := rs[len(rs)-1]
	if last.typ != repAck {
		return rs, fmt.Errorf("NBD_OPT_GO %q: reply %#x %q", name, last.typ, last.data)
	}
	for _, r := range rs {
		if r.typ == repInfo && binary.BigEndian.Uint16(r.data[0:2]) == infoExport {
			c.size = binary.BigEndian.Uint64(r.data[2:10])
			c.flags = binary.BigEndian.Uint16(r.data[10:12])
		}
	}
	return rs, nil
}

// connect dials, negotiates (structured replies and base:allocation when
// structured) and enters transmission on export name.
func connect(t testing.TB, addr, name string, structured bool) *testClient {
	t.Helper()
	c := dialRaw(t, "tcp", addr)
	if err := c.greet(clientFixedNewstyle | clientNoZeroes); err != nil {
		t.Fatal(err)
	}
	if structured {
		rs, err := c.opt(optStructuredReply, nil)
		if err != nil || rs[0].typ != repAck {
			t.Fatalf("structured reply: %v %v", rs, err)
		}
		c.structured = true
		rs, err = c.opt(optSetMetaContext, metaData(name, metaContextBaseAllocation))
		if err != nil || rs[len(rs)-1].typ != repAck {
			t.Fatalf("set meta context: %v %v", rs, err)
		}
	}
	if _, err := c.goExport(name); err != nil {
		t.Fatal(err)
	}
	return c
}

// send writes one request (and its payload).
func (c *testClient) send(typ, flags uint16, handle, off uint64, length uint32, payload []byte) error {
	var h [requestBytes]byte
	r := request{flags: flags, typ: typ, handle: handle, offset: off, length: length}
	r.encode(h[:])
	if typ == cmdRead {
		c.reads[handle] = length
	}
	c.bw.Write(h[:])
	c.bw.Write(payload)
	return c.bw.Flush()
}

// recv reads the complete reply to one request.
func (c *testClient) recv() (reply, error) {
	var m [4]byte
	if _, err := io.ReadFull(c.br, m[:]); err != nil {
		return reply{}, err
	}
	switch binary.BigEndian.Uint32(m[:]) {
	case simpleReplyMagic:
		var h [12]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return reply{}, err
		}
		r := reply{errno: binary.BigEndian.Uint32(h[0:4]), handle: binary.BigEndian.Uint64(h[4:12])}
		if n, ok := c.reads[r.handle]; ok {
			delete(c.reads, r.handle)
			if c.structured {
				return r, fmt.Errorf("simple reply to a read after structured replies were negotiated")
			}
			if r.errno == 0 {
				r.data = make([]byte, n)
				if _, err := io.ReadFull(c.br, r.data); err != nil {
					return r, err
				}
			}
		}
		return r, nil
	case structuredReplyMagic:
		if !c.structured {
			return reply{}, fmt.Errorf("structured reply without negotiation")
		}
		var r reply
		first := true
		for {
			if !first {
				if _, err := io.ReadFull(c.br, m[:]); err != nil {
					return r, err
				}
				if binary.BigEndian.Uint32(m[:]) != structuredReplyMagic {
					return r, fmt.Errorf("chunk magic %#x", m)
				}
			}
			first = false
			var h [16]byte
			if _, err := io.ReadFull(c.br, h[:]); err != nil {
				return r, err
			}
			flags := binary.BigEndian.Uint16(h[0:2])
			typ := binary.BigEndian.Uint16(h[2:4])
			r.handle = binary.BigEndian.Uint64(h[4:12])
			p := make([]byte, binary.BigEndian.Uint32(h[12:16]))
			if _, err := io.ReadFull(c.br, p); err != nil {
				return r, err
			}
			r.chunks++
			switch typ {
			case replyTypeOffsetData:
				r.data = append(r.data, p[8:]...)
			case replyTypeError:
				r.errno = binary.BigEndian.Uint32(p[0:4])
				r.msg = string(p[6 : 6+binary.BigEndian.Uint16(p[4:6])])
			case replyTypeBlockStatus:
				if binary.BigEndian.Uint32(p[0:4]) != baseAllocationID {
					return r, fmt.Errorf("block status for context %d", binary.BigEndian.Uint32(p[0:4]))
				}
				for i := 4; i < len(p); i += 8 {
					r.descs = append(r.descs, [2]uint32{binary.BigEndian.Uint32(p[i:]), binary.BigEndian.Uint32(p[i+4:])})
				}
			case replyTypeNone:
			default:
				return r, fmt.Errorf("chunk type %d", typ)
			}
			if flags&replyFlagDone != 0 {
				delete(c.reads, r.handle)
				return r, nil
			}
		}
	}
	return reply{}, fmt.Errorf("reply magic %#x", m)
}

// do sends one request and waits for its reply.
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) reply {
	c.t.Helper()
	const h = 0xfeedface
	if err := c.send(typ, flags, h, off, length, payload); err != nil {
		c.t.Fatalf("send %s: %v", cmdName(typ), err)
	}
	r, err := c.recv()
	if err != nil {
		c.t.Fatalf("reply to %s: %v", cmdName(typ), err)
	}
	if r.handle != h {
		c.t.Fatalf("reply handle %#x, want %#x", r.handle, h)
	}
	return r
}

func (c *testClient) write(off uint64, p []byte, flags uint16) uint32 {
	return c.do(cmdWrite, flags, off, uint32(len(p)), p).errno
}

func (c *testClient) read(off uint64, n uint32) ([]byte, uint32) {
	r := c.do(cmdRead, 0, off, n, nil)
	return r.data, r.errno
}

// disc sends NBD_CMD_DISC and waits for the server to close.
func (c *testClient) disc() {
	c.t.Helper()
	if err := c.send(cmdDisc, 0, 1, 0, 0, nil); err != nil {
		c.t.Fatal(err)
	}
	c.expectClosed()
}

// expectClosed reads until EOF: the server must close without sending
// anything more.
func (c *testClient) expectClosed() {
	c.t.Helper()
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("server did not close the connection")
	}
	if n != 0 {
		c.t.Fatalf("server sent %d unexpected bytes before closing", n)
	}
}

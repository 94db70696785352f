package main

// Adversarial protocol tests: a raw NBD client (the testClient of
// client_test.go, plus pipelined batches written straight to the socket)
// sends what good and bad clients send, and the replies are checked
// against the NBD protocol (doc/proto.md) and a byte model of the export.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// advReq is one request of a pipelined batch.
type advReq struct {
	typ, flags uint16
	handle     uint64
	off        uint64
	length     uint32
	payload    []byte
}

// advBatch sends reqs (and a DISC after them when disc is set) in one
// stream from another goroutine while this one reads the replies, so
// neither side blocks the other. It returns the replies by handle; a
// second reply to one handle fails the test.
func advBatch(t *testing.T, c *testClient, reqs []advReq, disc bool) map[uint64]reply {
	t.Helper()
	var buf bytes.Buffer
	for _, r := range reqs {
		var h [requestBytes]byte
		rq := request{flags: r.flags, typ: r.typ, handle: r.handle, offset: r.off, length: r.length}
		rq.encode(h[:])
		buf.Write(h[:])
		buf.Write(r.payload)
		if r.typ == cmdRead {
			c.reads[r.handle] = r.length
		}
	}
	if disc {
		var h [requestBytes]byte
		rq := request{typ: cmdDisc, handle: 0xd15c}
		rq.encode(h[:])
		buf.Write(h[:])
	}
	sendErr := make(chan error, 1)
	go func() {
		_, err := c.nc.Write(buf.Bytes())
		sendErr <- err
	}()
	out := map[uint64]reply{}
	for range reqs {
		r, err := c.recv()
		if err != nil {
			t.Fatalf("reply %d of %d: %v", len(out)+1, len(reqs), err)
		}
		if _, dup := out[r.handle]; dup {
			t.Fatalf("two replies for handle %#x", r.handle)
		}
		out[r.handle] = r
	}
	if err := <-sendErr; err != nil {
		t.Fatalf("send batch: %v", err)
	}
	return out
}

func advExpectOpt(t *testing.T, what string, rs []optReplyMsg, err error, want uint32) []optReplyMsg {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v (replies %v)", what, err, rs)
	}
	if len(rs) == 0 || rs[len(rs)-1].typ != want {
		t.Fatalf("%s: replies %v, want final %#x", what, rs, want)
	}
	return rs
}

func isPow2(x uint32) bool { return x != 0 && bits.OnesCount32(x) == 1 }

// Option haggling goes on after every kind of refused option; NBD_OPT_INFO
// answers what was asked, with block sizes the protocol allows; flags
// follow negotiation.
func TestAdvHandshakeOptionsAfterErrors(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	if err := c.greet(clientFixedNewstyle | clientNoZeroes); err != nil {
		t.Fatal(err)
	}
	rs, err := c.opt(0, nil)
	advExpectOpt(t, "option 0", rs, err, repErrUnsup)
	rs, err = c.opt(0x7fffffff, []byte("junk"))
	advExpectOpt(t, "option 0x7fffffff", rs, err, repErrUnsup)
	rs, err = c.opt(optGo, infoData("nosuch"))
	advExpectOpt(t, "GO unknown", rs, err, repErrUnknown)
	rs, err = c.opt(optGo, infoData(string(bytes.Repeat([]byte("n"), 5000))))
	if err != nil || len(rs) != 1 || rs[0].typ&repErrBit == 0 {
		t.Fatalf("GO with a 5000-byte name: %v %v", rs, err)
	}
	rs, err = c.opt(optInfo, []byte{0, 0, 0})
	advExpectOpt(t, "INFO short", rs, err, repErrInvalid)
	rs, err = c.opt(optInfo, []byte{0, 0, 1, 0, 'd', 'i', 's', 'k', 0, 0})
	advExpectOpt(t, "INFO name past data", rs, err, repErrInvalid)
	bad := infoData(testExport, infoName)
	bad = bad[:len(bad)-1]
	rs, err = c.opt(optInfo, bad)
	advExpectOpt(t, "INFO bad request count", rs, err, repErrInvalid)
	rs, err = c.opt(optSetMetaContext, metaData(testExport, metaContextBaseAllocation))
	advExpectOpt(t, "SET_META_CONTEXT before structured", rs, err, repErrInvalid)

	// A good INFO: export, name, description, block size (and an unknown
	// request ignored), then ACK; the session stays in haggling.
	rs, err = c.opt(optInfo, infoData(testExport, infoName, infoDescription, infoBlockSize, 0x7777))
	advExpectOpt(t, "INFO", rs, err, repAck)
	seen := map[uint16][]byte{}
	for _, r := range rs[:len(rs)-1] {
		if r.typ != repInfo || len(r.data) < 2 {
			t.Fatalf("INFO reply %#x % x", r.typ, r.data)
		}
		seen[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
	ex, ok := seen[infoExport]
	if !ok || len(ex) != 10 || binary.BigEndian.Uint64(ex) != testSize {
		t.Fatalf("NBD_INFO_EXPORT % x", ex)
	}
	fl := binary.BigEndian.Uint16(ex[8:])
	if fl&tflagSendDF != 0 {
		t.Fatalf("SEND_DF advertised without structured replies: %#x", fl)
	}
	if string(seen[infoName]) != testExport {
		t.Fatalf("NBD_INFO_NAME %q", seen[infoName])
	}
	bs, ok := seen[infoBlockSize]
	if !ok || len(bs) != 12 {
		t.Fatalf("NBD_INFO_BLOCK_SIZE % x", bs)
	}
	minB, prefB, maxB := binary.BigEndian.Uint32(bs), binary.BigEndian.Uint32(bs[4:]), binary.BigEndian.Uint32(bs[8:])
	if !isPow2(minB) || minB > 65536 || !isPow2(prefB) || prefB < minB || prefB < 512 || maxB%minB != 0 || maxB < prefB {
		t.Fatalf("block sizes min %d preferred %d max %d break the protocol's rules", minB, prefB, maxB)
	}

	rs, err = c.opt(optStructuredReply, nil)
	advExpectOpt(t, "STRUCTURED_REPLY", rs, err, repAck)
	c.structured = true
	rs, err = c.opt(optListMetaContext, metaData(testExport, "base:"))
	rs = advExpectOpt(t, "LIST_META_CONTEXT base:", rs, err, repAck)
	if len(rs) != 2 || rs[0].typ != repMetaContext || string(rs[0].data[4:]) != metaContextBaseAllocation {
		t.Fatalf("LIST base: %v", rs)
	}
	// Duplicates and foreign namespaces: one context, one reply.
	rs, err = c.opt(optSetMetaContext, metaData(testExport, metaContextBaseAllocation, "x-foo:bar", metaContextBaseAllocation))
	rs = advExpectOpt(t, "SET_META_CONTEXT", rs, err, repAck)
	if len(rs) != 2 || rs[0].typ != repMetaContext || binary.BigEndian.Uint32(rs[0].data) == 0 {
		t.Fatalf("SET with duplicates: %v", rs)
	}
	// Unknown option after all that, then GO.
	rs, err = c.opt(1000, nil)
	advExpectOpt(t, "option 1000", rs, err, repErrUnsup)
	if _, err := c.goExport(testExport); err != nil {
		t.Fatal(err)
	}
	want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendDF
	if c.flags&want != want || c.flags&tflagReadOnly != 0 {
		t.Fatalf("GO flags %#x, want at least %#x", c.flags, want)
	}
	if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != 0 || len(r.descs) != 1 {
		t.Fatalf("block status: errno %d %v", r.errno, r.descs)
	}
	c.disc()
	h.waitIdle()
}

// Client flags the server did not offer, or NO_ZEROES with EXPORT_NAME.
func TestAdvClientFlags(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	for _, f := range []uint32{1 << 2, 1 << 31, clientFixedNewstyle | 1<<3} {
		c := dialRaw(t, "tcp", h.addr)
		c.greet(f)
		c.expectClosed()
	}
	// NO_ZEROES without FIXED_NEWSTYLE, EXPORT_NAME: 10 bytes, no padding.
	c := dialRaw(t, "tcp", h.addr)
	c.greet(clientNoZeroes)
	c.sendOpt(optExportName, []byte(testExport))
	var b [10]byte
	if _, err := io.ReadFull(c.br, b[:]); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint64(b[:]) != testSize {
		t.Fatalf("size % x", b)
	}
	// The next bytes are the reply to our request, not padding.
	p := pattern(77, 512)
	if errno := c.write(0, p, 0); errno != 0 {
		t.Fatalf("write errno %d", errno)
	}
	c.disc()
	h.waitIdle()
}

// Bad requests of every kind on one connection: each gets its error, a
// refused write's payload is skipped, and the stream stays in step.
func TestAdvBadRequestsStayInSync(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{}, map[string]int64{testExport: testSize, "big": 40 << 20})
		c := connect(t, h.addr, testExport, structured)
		marker := pattern(5, 4096)
		if errno := c.write(0, marker, cflagFUA); errno != 0 {
			t.Fatalf("write errno %d", errno)
		}
		for _, tc := range []struct {
			name  string
			cmd   uint16
			flags uint16
			off   uint64
			n     uint32
			pay   bool
			want  uint32
		}{
			{"write with DF", cmdWrite, cflagDF, 0, 4096, true, errInval},
			{"write with REQ_ONE, big", cmdWrite, cflagReqOne, 0, 200000, true, errInval},
			{"write with FAST_ZERO, 1 MiB", cmdWrite, cflagFastZero, 0, 1 << 20, true, errInval},
			{"write past end, 1 MiB", cmdWrite, 0, testSize - 4096, 1 << 20, true, errNoSpc},
			{"write past end, FUA", cmdWrite, cflagFUA, testSize, 100, true, errNoSpc},
			{"write zero length, bad flag", cmdWrite, cflagNoHole, 0, 0, true, errInval},
			{"unknown command all flags", 0xffff, 0xffff, 0, 0, false, errInval},
			{"unknown command 9", 9, 0, 0, 512, false, errInval},
			{"block status zero length", cmdBlockStatus, 0, 0, 0, false, errInval},
			{"trim zero length", cmdTrim, 0, 0, 0, false, errInval},
			{"trim with NO_HOLE", cmdTrim, cflagNoHole, 0, 4096, false, errInval},
			{"trim with DF", cmdTrim, cflagDF, 0, 4096, false, errInval},
			{"zeroes with REQ_ONE", cmdWriteZeroes, cflagReqOne, 0, 4096, false, errInval},
			{"zeroes zero length", cmdWriteZeroes, cflagNoHole, 0, 0, false, errInval},
			{"cache with NO_HOLE", cmdCache, cflagNoHole, 0, 4096, false, errInval},
			{"flush with REQ_ONE", cmdFlush, cflagReqOne, 0, 0, false, errInval},
			{"read huge offset", cmdRead, 0, 1 << 63, 1, false, errInval},
			{"zeroes offset overflow", cmdWriteZeroes, 0, 1<<64 - 4096, 8192, false, errNoSpc},
		} {
			var p []byte
			if tc.pay {
				p = bytes.Repeat([]byte{0xee}, int(tc.n))
			}
			r := c.do(tc.cmd, tc.flags, tc.off, tc.n, p)
			if r.errno != tc.want {
				t.Fatalf("%s: errno %d, want %d (%s)", tc.name, r.errno, tc.want, r.msg)
			}
			// In step: the next request is answered properly and nothing
			// of a refused payload was written.
			d, errno := c.read(0, 4096)
			if errno != 0 || !bytes.Equal(d, marker) {
				t.Fatalf("after %s: read errno %d, data changed %v", tc.name, errno, !bytes.Equal(d, marker))
			}
		}
		// Accepted oddities: FUA on flush, cache, read, block status;
		// misaligned reads and writes.
		if r := c.do(cmdFlush, cflagFUA, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush FUA errno %d", r.errno)
		}
		if r := c.do(cmdCache, cflagFUA, 1, 12345, nil); r.errno != 0 {
			t.Fatalf("cache FUA errno %d", r.errno)
		}
		p := pattern(9, 4095)
		if errno := c.write(1, p, 0); errno != 0 {
			t.Fatalf("misaligned write errno %d", errno)
		}
		want := append([]byte{marker[0]}, p...)
		if d, errno := c.read(0, 4096); errno != 0 || !bytes.Equal(d, want) {
			t.Fatalf("misaligned read back: errno %d", errno)
		}
		c.disc()

		// The largest request in each direction, on a 40 MiB export.
		c = connect(t, h.addr, "big", structured)
		big := make([]byte, maxPayload)
		for i := range big {
			big[i] = byte(i*7 + i>>13)
		}
		for _, fl := range []uint16{0, cflagFUA} {
			if errno := c.write(uint64(fl)*4096+7, big, fl); errno != 0 {
				t.Fatalf("32 MiB write (flags %d): errno %d", fl, errno)
			}
			d, errno := c.read(uint64(fl)*4096+7, maxPayload)
			if errno != 0 || !bytes.Equal(d, big) {
				t.Fatalf("32 MiB read back (flags %d): errno %d", fl, errno)
			}
		}
		c.disc()
		h.waitIdle()
	})
}

// NBD_CMD_DISC sent right behind many requests: every one of them is
// answered before the server closes, and their effects are all there.
func TestAdvDiscAnswersInFlight(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{ConnRequests: 4}, defaultExports())
		c := connect(t, h.addr, testExport, structured)
		var reqs []advReq
		model := make([]byte, testSize)
		// 8 lanes of 1 MiB, each written once by a request with its own
		// size, path and flags.
		for i := range 8 {
			n := []int{4096, 100000, 1 << 20, 70000, 65536, 65537, 3000, 1 << 19}[i]
			fl := uint16(0)
			if i%2 == 1 {
				fl = cflagFUA
			}
			p := pattern(uint64(100+i), n)
			off := uint64(i) << 20
			copy(model[off:], p)
			reqs = append(reqs, advReq{typ: cmdWrite, flags: fl, handle: uint64(1000 + i), off: off, length: uint32(n), payload: p})
		}
		reqs = append(reqs,
			advReq{typ: cmdFlush, handle: 2000},
			advReq{typ: cmdTrim, flags: cflagFUA, handle: 2001, off: 8 << 20 / 2, length: 4096},
			advReq{typ: cmdRead, handle: 2002, off: 7<<20 - 4096, length: 4096},
			advReq{typ: cmdCache, handle: 2003, off: 0, length: 2 << 20},
			advReq{typ: 77, handle: 2004, off: 0, length: 1},
		)
		if structured {
			reqs = append(reqs, advReq{typ: cmdBlockStatus, handle: 2005, off: 0, length: testSize})
		}
		copy(model[8<<20/2:], make([]byte, 4096))
		reps := advBatch(t, c, reqs, true)
		for _, rq := range reqs {
			r, ok := reps[rq.handle]
			if !ok {
				t.Fatalf("no reply for handle %d", rq.handle)
			}
			want := uint32(0)
			if rq.typ == 77 {
				want = errInval
			}
			if r.errno != want {
				t.Fatalf("handle %d (%s): errno %d (%s)", rq.handle, cmdName(rq.typ), r.errno, r.msg)
			}
		}
		c.expectClosed()
		h.waitIdle()
		c = connect(t, h.addr, testExport, structured)
		d, errno := c.read(0, testSize)
		if errno != 0 || !bytes.Equal(d, model) {
			t.Fatalf("after DISC: errno %d or data mismatch", errno)
		}
		c.disc()
	})
}

// A write whose payload the client cuts off (half-close or full close)
// gets no reply and changes nothing, on every serving path: inline,
// straight into the cache (WriteFrom), dispatched with FUA, and behind
// other requests in one burst.
func TestAdvCutPayloadLeavesNoTrace(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	base := pattern(1, 4<<20)
	c := connect(t, h.addr, testExport, true)
	if errno := c.write(0, base, cflagFUA); errno != 0 {
		t.Fatalf("fill errno %d", errno)
	}
	c.disc()
	for _, tc := range []struct {
		name  string
		n     int
		sent  int
		flags uint16
	}{
		{"inline 4k", 4096, 4095, 0},
		{"inline 64k", 65536, 1, 0},
		{"writefrom 64k", 65536 + 4096, 65536, 0},
		{"writefrom 1M", 1 << 20, 1<<20 - 1, 0},
		{"writefrom 3M", 3 << 20, 2 << 20, 0},
		{"fua 4k", 4096, 2048, cflagFUA},
		{"fua 1M", 1 << 20, 1 << 19, cflagFUA},
		{"header only", 1 << 20, 0, 0},
	} {
		for _, hard := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/hard=%v", tc.name, hard), func(t *testing.T) {
				c := connect(t, h.addr, testExport, true)
				// One good request first, in the same burst.
				var hdr [requestBytes]byte
				var burst []byte
				good := request{typ: cmdFlush, handle: 1}
				good.encode(hdr[:])
				burst = append(burst, hdr[:]...)
				cut := request{typ: cmdWrite, flags: tc.flags, handle: 2, offset: 4096 + 13, length: uint32(tc.n)}
				cut.encode(hdr[:])
				burst = append(burst, hdr[:]...)
				burst = append(burst, bytes.Repeat([]byte{0x5a}, tc.sent)...)
				if _, err := c.nc.Write(burst); err != nil {
					t.Fatal(err)
				}
				if hard {
					// Wait for the flush's reply, then close entirely.
					r, err := c.recv()
					if err != nil || r.handle != 1 || r.errno != 0 {
						t.Fatalf("flush reply %+v %v", r, err)
					}
					c.nc.Close()
				} else {
					c.nc.(*net.TCPConn).CloseWrite()
					r, err := c.recv()
					if err != nil || r.handle != 1 || r.errno != 0 {
						t.Fatalf("flush reply %+v %v", r, err)
					}
					c.expectClosed()
				}
				h.waitIdle()
				v := connect(t, h.addr, testExport, true)
				d, errno := v.read(0, 4<<20)
				if errno != 0 {
					t.Fatalf("read errno %d", errno)
				}
				if !bytes.Equal(d, base) {
					i := 0
					for d[i] == base[i] {
						i++
					}
					t.Fatalf("cut write left a trace: first changed byte at %d (%#x, was %#x)", i, d[i], base[i])
				}
				v.disc()
			})
		}
	}
}

// advCheckStatus checks a base:allocation reply against the model: sane
// descriptors, and every range said to read as zeros does.
func advCheckStatus(t *testing.T, what string, r reply, model []byte, off uint64, n uint32, reqOne bool) {
	t.Helper()
	if r.errno != 0 {
		t.Fatalf("%s: block status errno %d (%s)", what, r.errno, r.msg)
	}
	if len(r.descs) == 0 || reqOne && len(r.descs) != 1 {
		t.Fatalf("%s: %d descriptors (REQ_ONE %v)", what, len(r.descs), reqOne)
	}
	pos := off
	for i, d := range r.descs {
		if d[0] == 0 {
			t.Fatalf("%s: descriptor %d has length 0", what, i)
		}
		if d[1]&^(stateHole|stateZero) != 0 {
			t.Fatalf("%s: descriptor %d flags %#x", what, i, d[1])
		}
		if i > 0 && r.descs[i-1][1] == d[1] {
			t.Logf("%s: descriptors %d and %d have the same status", what, i-1, i)
		}
		end := pos + uint64(d[0])
		if end > off+uint64(n) {
			t.Fatalf("%s: descriptors run to %d, past the request's end %d", what, end, off+uint64(n))
		}
		if d[1]&stateZero != 0 {
			for j := pos; j < end; j++ {
				if model[j] != 0 {
					t.Fatalf("%s: [%d, %d) reported as zeros (flags %#x) but byte %d is %#x", what, pos, end, d[1], j, model[j])
				}
			}
		}
		pos = end
	}
}

// Random reads, writes, trims, zeroes (with and without NO_HOLE, FUA),
// caches and block status queries against a byte model: every read is
// byte-exact, never-written ranges read zeros, and no range reported as
// zeros holds data. Part of it in pipelined bursts of disjoint requests.
func TestAdvModel(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		const size = 3<<20 + 1234 // not a multiple of the block size
		h := newHarness(t, serverConfig{ConnRequests: 6}, map[string]int64{"m": size})
		c := connect(t, h.addr, "m", structured)
		model := make([]byte, size)
		rng := rand.New(rand.NewPCG(42, uint64(len(fmt.Sprint(structured)))))
		pick := func() (uint64, uint32) {
			var n int
			switch rng.IntN(4) {
			case 0:
				n = 1 + rng.IntN(600)
			case 1:
				n = 1 + rng.IntN(9000)
			case 2:
				n = 60000 + rng.IntN(10000)
			default:
				n = 1 + rng.IntN(400000)
			}
			if rng.IntN(8) == 0 { // at the very end
				return uint64(size - n), uint32(n)
			}
			return uint64(rng.IntN(size - n + 1)), uint32(n)
		}
		op := func(i int) advReq {
			off, n := pick()
			fl := uint16(0)
			if rng.IntN(4) == 0 {
				fl |= cflagFUA
			}
			switch k := rng.IntN(10); {
			case k < 4:
				p := pattern(uint64(i)+1000, int(n))
				if rng.IntN(5) == 0 {
					p = make([]byte, n) // zeros written as data
				}
				return advReq{typ: cmdWrite, flags: fl, off: off, length: n, payload: p}
			case k < 5:
				return advReq{typ: cmdTrim, flags: fl, off: off, length: n}
			case k < 6:
				return advReq{typ: cmdWriteZeroes, flags: fl, off: off, length: n}
			case k < 7:
				return advReq{typ: cmdWriteZeroes, flags: fl | cflagNoHole, off: off, length: n}
			case k < 8:
				return advReq{typ: cmdCache, off: off, length: n}
			case k < 9 && structured:
				if rng.IntN(3) == 0 {
					fl |= cflagReqOne
				}
				return advReq{typ: cmdBlockStatus, flags: fl, off: off, length: n}
			}
			return advReq{typ: cmdRead, flags: fl, off: off, length: n}
		}
		apply := func(rq advReq) {
			switch rq.typ {
			case cmdWrite:
				copy(model[rq.off:], rq.payload)
			case cmdTrim, cmdWriteZeroes:
				clear(model[rq.off : rq.off+uint64(rq.length)])
			}
		}
		check := func(i int, rq advReq, r reply) {
			t.Helper()
			what := fmt.Sprintf("op %d %s flags %#x [%d, +%d)", i, cmdName(rq.typ), rq.flags, rq.off, rq.length)
			if r.errno != 0 {
				t.Fatalf("%s: errno %d (%s)", what, r.errno, r.msg)
			}
			switch rq.typ {
			case cmdRead:
				want := model[rq.off : rq.off+uint64(rq.length)]
				if !bytes.Equal(r.data, want) {
					j := 0
					for j < len(want) && j < len(r.data) && r.data[j] == want[j] {
						j++
					}
					t.Fatalf("%s: data differs from byte %d (len %d)", what, j, len(r.data))
				}
			case cmdBlockStatus:
				advCheckStatus(t, what, r, model, rq.off, rq.length, rq.flags&cflagReqOne != 0)
			}
		}
		// One at a time.
		for i := range 300 {
			rq := op(i)
			rq.handle = uint64(i)
			if rq.typ == cmdRead {
				c.reads[rq.handle] = rq.length
			}
			if err := c.send(rq.typ, rq.flags, rq.handle, rq.off, rq.length, rq.payload); err != nil {
				t.Fatal(err)
			}
			r, err := c.recv()
			if err != nil || r.handle != rq.handle {
				t.Fatalf("op %d: reply %+v %v", i, r.handle, err)
			}
			apply(rq)
			check(i, rq, r)
		}
		// Bursts of requests on disjoint ranges (so their order does not
		// matter), answered out of order.
		for b := range 30 {
			var reqs []advReq
			var taken [][2]uint64
			for len(reqs) < 12 {
				rq := op(10000 + b*100 + len(reqs))
				e := rq.off + uint64(rq.length)
				clash := false
				for _, x := range taken {
					if rq.off < x[1] && x[0] < e {
						clash = true
					}
				}
				if clash {
					continue
				}
				taken = append(taken, [2]uint64{rq.off, e})
				rq.handle = uint64(b)<<32 | uint64(len(reqs))
				reqs = append(reqs, rq)
			}
			// Reads and block status see the state before the burst for
			// their own range, which no other request of the burst touches.
			reps := advBatch(t, c, reqs, false)
			for i, rq := range reqs {
				r, ok := reps[rq.handle]
				if !ok {
					t.Fatalf("burst %d: no reply for request %d", b, i)
				}
				check(b*100+i, rq, r)
			}
			for _, rq := range reqs {
				apply(rq)
			}
		}
		// The whole export, and the flushed state after a restart.
		if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush errno %d", r.errno)
		}
		d, errno := c.read(0, size)
		if errno != 0 || !bytes.Equal(d, model) {
			t.Fatalf("final read: errno %d, equal %v", errno, bytes.Equal(d, model))
		}
		if structured {
			advCheckStatus(t, "final", c.do(cmdBlockStatus, 0, 0, size, nil), model, 0, size, false)
		}
		c.disc()
		h.restart()
		c = connect(t, h.addr, "m", structured)
		d, errno = c.read(0, size)
		if errno != 0 || !bytes.Equal(d, model) {
			t.Fatalf("after restart: errno %d, equal %v", errno, bytes.Equal(d, model))
		}
		c.disc()
	})
}

// Block status at the export's end, on an export whose size is not a
// multiple of the block size, and REQ_ONE over a mixed range.
func TestAdvBlockStatusEdges(t *testing.T) {
	const size = 1<<20 + 100
	h := newHarness(t, serverConfig{}, map[string]int64{"odd": size})
	c := connect(t, h.addr, "odd", true)
	hz := stateHole | stateZero
	if r := c.do(cmdBlockStatus, 0, size-100, 100, nil); r.errno != 0 || len(r.descs) != 1 || r.descs[0] != [2]uint32{100, hz} {
		t.Fatalf("tail of a new export: %+v", r)
	}
	if r := c.do(cmdBlockStatus, 0, size-100, 101, nil); r.errno != errInval {
		t.Fatalf("one past the end: errno %d", r.errno)
	}
	if r := c.do(cmdBlockStatus, 0, size, 1, nil); r.errno != errInval {
		t.Fatalf("at the end: errno %d", r.errno)
	}
	if errno := c.write(size-1, []byte{0xab}, 0); errno != 0 {
		t.Fatalf("last byte write errno %d", errno)
	}
	r := c.do(cmdBlockStatus, 0, size-100, 100, nil)
	if r.errno != 0 || len(r.descs) != 1 || r.descs[0] != [2]uint32{100, 0} {
		t.Fatalf("tail after a write: %+v", r)
	}
	r = c.do(cmdBlockStatus, cflagReqOne, 0, size, nil)
	if r.errno != 0 || len(r.descs) != 1 || r.descs[0][1] != hz || r.descs[0][0] != 1<<20 {
		t.Fatalf("REQ_ONE over hole then data: %+v", r)
	}
	r = c.do(cmdBlockStatus, cflagReqOne, size-50, 50, nil)
	if r.errno != 0 || len(r.descs) != 1 || r.descs[0] != [2]uint32{50, 0} {
		t.Fatalf("REQ_ONE inside the data: %+v", r)
	}
	// Trim the tail: a hole that reads zeros again.
	if r := c.do(cmdTrim, 0, size-100, 100, nil); r.errno != 0 {
		t.Fatalf("trim errno %d", r.errno)
	}
	if d, errno := c.read(size-100, 100); errno != 0 || !bytes.Equal(d, make([]byte, 100)) {
		t.Fatalf("tail after trim: errno %d % x", errno, d)
	}
	r = c.do(cmdBlockStatus, 0, 0, size, nil)
	var model [size]byte
	advCheckStatus(t, "after trim", r, model[:], 0, size, false)
	c.disc()
}

// Every in-flight request answered exactly once with its own handle,
// with errors mixed in, many more requests than the connection's limit.
func TestAdvPipelinedMixedHandles(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{ConnRequests: 3, ConnBytes: maxPayload}, defaultExports())
		c := connect(t, h.addr, testExport, structured)
		rng := rand.New(rand.NewPCG(3, 4))
		var reqs []advReq
		used := map[uint64]bool{}
		const lanes = 64
		const lane = testSize / lanes
		for i := range 600 {
			var hd uint64
			for hd = rng.Uint64(); used[hd]; hd = rng.Uint64() {
			}
			used[hd] = true
			l := uint64(i % lanes)
			var rq advReq
			switch i % 9 {
			case 0, 1:
				n := 1 + rng.IntN(lane-1)
				rq = advReq{typ: cmdWrite, off: l * lane, length: uint32(n), payload: pattern(uint64(i), n)}
				if i%2 == 0 {
					rq.flags = cflagFUA
				}
			case 2:
				rq = advReq{typ: cmdRead, off: l * lane, length: lane}
			case 3:
				rq = advReq{typ: 200, off: 0, length: 5}
			case 4:
				rq = advReq{typ: cmdRead, off: testSize, length: 1}
			case 5:
				rq = advReq{typ: cmdFlush}
			case 6:
				rq = advReq{typ: cmdWriteZeroes, flags: cflagNoHole, off: l * lane, length: lane}
			case 7:
				rq = advReq{typ: cmdCache, off: l * lane, length: lane}
			case 8:
				rq = advReq{typ: cmdTrim, off: l * lane, length: lane}
			}
			rq.handle = hd
			reqs = append(reqs, rq)
		}
		// Requests on the same lane may run in any order: only errors and
		// handles are checked here, and the lengths of read data.
		reps := advBatch(t, c, reqs, false)
		for _, rq := range reqs {
			r, ok := reps[rq.handle]
			if !ok {
				t.Fatalf("no reply for handle %#x", rq.handle)
			}
			want := uint32(0)
			if rq.typ == 200 || rq.typ == cmdRead && rq.off == testSize {
				want = errInval
			}
			if r.errno != want {
				t.Fatalf("%s: errno %d, want %d", cmdName(rq.typ), r.errno, want)
			}
			if rq.typ == cmdRead && want == 0 && len(r.data) != int(rq.length) {
				t.Fatalf("read: %d bytes, want %d", len(r.data), rq.length)
			}
		}
		c.disc()
		h.waitIdle()
	})
}

// A full device: every kind of write fails with ENOSPC (never another
// error, never a disconnect), a refused write changes nothing, an
// acknowledged one is intact, and a range block status calls allocated
// can still be overwritten (proto.md: writing to an extent with
// NBD_STATE_HOLE clear MUST NOT fail with ENOSPC).
func TestAdvNoSpace(t *testing.T) {
	h := newHarness(t, serverConfig{}, map[string]int64{"thin": 4 * testDevSize})
	c := connect(t, h.addr, "thin", true)
	model := map[uint64][]byte{} // 1 MiB slots acknowledged
	nospc := 0
	for i := 0; i < 2*testDevSize>>20 && nospc < 6; i++ {
		off := uint64(i) << 20
		var p []byte
		var r reply
		switch i % 3 {
		case 0: // straight into the cache
			p = pattern(uint64(i), 1<<20)
			r = c.do(cmdWrite, 0, off, 1<<20, p)
		case 1: // dispatched with FUA
			p = pattern(uint64(i), 1<<20)
			r = c.do(cmdWrite, cflagFUA, off, 1<<20, p)
		case 2: // zeros without holes
			p = make([]byte, 1<<20)
			r = c.do(cmdWriteZeroes, cflagNoHole, off, 1<<20, nil)
		}
		switch r.errno {
		case 0:
			model[off] = p
		case errNoSpc:
			nospc++
		default:
			t.Fatalf("write %d: errno %d (%s)", i, r.errno, r.msg)
		}
	}
	if nospc == 0 || len(model) == 0 {
		t.Fatalf("%d ok, %d ENOSPC", len(model), nospc)
	}
	// Small inline writes into fresh space: ENOSPC too, in step.
	for i := range 8 {
		off := uint64(3*testDevSize) + uint64(i)*8192
		r := c.do(cmdWrite, 0, off, 4096, pattern(1, 4096))
		if r.errno != errNoSpc && r.errno != 0 {
			t.Fatalf("small write: errno %d (%s)", r.errno, r.msg)
		}
		if r.errno == 0 {
			model[off] = pattern(1, 4096)
		}
	}
	// Acknowledged data intact; refused slots read as zeros.
	for i := 0; i < 2*testDevSize>>20; i++ {
		off := uint64(i) << 20
		d, errno := c.read(off, 1<<20)
		if errno != 0 {
			t.Fatalf("read %d: errno %d", i, errno)
		}
		want, ok := model[off]
		if !ok {
			want = make([]byte, 1<<20)
		}
		if !bytes.Equal(d, want) {
			t.Fatalf("slot %d (acknowledged %v) holds other data", i, ok)
		}
	}
	// Overwrite what block status reports as allocated.
	r := c.do(cmdBlockStatus, 0, 0, 2*testDevSize, nil)
	if r.errno != 0 {
		t.Fatalf("block status errno %d", r.errno)
	}
	pos := uint64(0)
	overwrote := 0
	for _, d := range r.descs {
		if d[1]&stateHole == 0 {
			for o := pos; o+4096 <= pos+uint64(d[0]) && overwrote < 64; o += 256 << 10 {
				if r := c.do(cmdWrite, 0, o, 4096, pattern(o, 4096)); r.errno != 0 {
					t.Fatalf("BUG overwrite of allocated [%d, +4096) on a full device: errno %d (%s)", o, r.errno, r.msg)
				}
				if r := c.do(cmdWrite, cflagFUA, o+8192, 8192, pattern(o, 8192)); r.errno != 0 {
					t.Fatalf("BUG FUA overwrite of allocated [%d, +8192) on a full device: errno %d (%s)", o+8192, r.errno, r.msg)
				}
				overwrote++
			}
		}
		pos += uint64(d[0])
	}
	if overwrote == 0 {
		t.Fatal("block status reported nothing allocated")
	}
	if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatalf("flush on a full device: errno %d (%s)", r.errno, r.msg)
	}
	c.disc()
}

// A read-only export: every write-like command gets EPERM whatever its
// range or flags, a refused payload is skipped; reads, flush, cache and
// block status work.
func TestAdvReadOnly(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := connect(t, h.addr, testExport, false)
	p := pattern(8, 8192)
	c.write(4096, p, cflagFUA)
	c.disc()
	h.stop()
	h.cfg.ReadOnly = true
	h.start()
	forModes(t, func(t *testing.T, structured bool) {
		c := connect(t, h.addr, testExport, structured)
		for _, tc := range []struct {
			cmd, flags uint16
			off        uint64
			n          uint32
		}{
			{cmdWrite, 0, 0, 1 << 20},
			{cmdWrite, cflagFUA, 0, 100},
			{cmdWrite, 0, testSize - 10, 4096},
			{cmdTrim, cflagFUA, 4096, 8192},
			{cmdWriteZeroes, cflagNoHole | cflagFastZero, 0, 4096},
			{cmdWriteZeroes, 0, 4096, testSize},
		} {
			var pay []byte
			if tc.cmd == cmdWrite {
				pay = bytes.Repeat([]byte{1}, int(tc.n))
			}
			if r := c.do(tc.cmd, tc.flags, tc.off, tc.n, pay); r.errno != errPerm {
				t.Fatalf("%s flags %#x: errno %d, want EPERM", cmdName(tc.cmd), tc.flags, r.errno)
			}
			if d, errno := c.read(4096, 8192); errno != 0 || !bytes.Equal(d, p) {
				t.Fatalf("after %s: errno %d or data changed", cmdName(tc.cmd), errno)
			}
		}
		if r := c.do(cmdCache, 0, 0, testSize, nil); r.errno != 0 {
			t.Fatalf("cache errno %d", r.errno)
		}
		if r := c.do(cmdFlush, cflagFUA, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush errno %d", r.errno)
		}
		if structured {
			r := c.do(cmdBlockStatus, 0, 0, 3*4096, nil)
			if r.errno != 0 || len(r.descs) != 2 || r.descs[0] != [2]uint32{4096, stateHole | stateZero} || r.descs[1] != [2]uint32{8192, 0} {
				t.Fatalf("block status on read-only: %+v", r)
			}
		}
		c.disc()
	})
}

// The same protocol over a Unix socket, with two connections sharing an
// export (CAN_MULTI_CONN: a flush on one covers the other's writes, which
// it sees).
func TestAdvUnixSocketMultiConn(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	dir, err := os.MkdirTemp("", "advnbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- h.srv.serve(l) }()
	t.Cleanup(func() {
		h.stop()
		<-done
	})
	dial := func() *testClient {
		c := dialRaw(t, "unix", path)
		if err := c.greet(clientFixedNewstyle | clientNoZeroes); err != nil {
			t.Fatal(err)
		}
		if _, err := c.goExport(testExport); err != nil {
			t.Fatal(err)
		}
		if c.flags&tflagCanMultiConn == 0 {
			t.Skip("CAN_MULTI_CONN not advertised")
		}
		return c
	}
	a, b := dial(), dial()
	p := pattern(21, 100000)
	if errno := a.write(12345, p, 0); errno != 0 {
		t.Fatalf("write errno %d", errno)
	}
	if r := b.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatalf("flush errno %d", r.errno)
	}
	if d, errno := b.read(12345, 100000); errno != 0 || !bytes.Equal(d, p) {
		t.Fatal("the other connection does not see the write")
	}
	// Cut payload on a Unix socket.
	a.send(cmdWrite, 0, 9, 12345, 100000, make([]byte, 50000))
	a.nc.(*net.UnixConn).CloseWrite()
	a.expectClosed()
	if d, errno := b.read(12345, 100000); errno != 0 || !bytes.Equal(d, p) {
		t.Fatal("cut write changed data")
	}
	b.disc()
	h.waitIdle()
}

// A client whose connection breaks in the middle of haggling or with
// requests in flight leaves nothing behind, and the server keeps serving.
func TestAdvAbruptClients(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	for i := range 20 {
		c := dialRaw(t, "tcp", h.addr)
		switch i % 5 {
		case 0:
			c.greet(clientFixedNewstyle)
			c.sendOpt(optList, nil)
		case 1:
			c.greet(clientFixedNewstyle)
			c.opt(optStructuredReply, nil)
			c.sendOpt(optSetMetaContext, metaData(testExport, metaContextBaseAllocation))
		case 2:
			c.greet(clientFixedNewstyle)
			c.sendOpt(optAbort, []byte("bye"))
		case 3:
			c := connect(t, h.addr, testExport, true)
			for j := range 16 {
				c.send(cmdRead, 0, uint64(j), uint64(j)<<19, 1<<19, nil)
			}
			c.nc.(*net.TCPConn).SetLinger(0)
			c.nc.Close()
		case 4:
			c := connect(t, h.addr, testExport, false)
			for j := range 16 {
				c.send(cmdWrite, cflagFUA, uint64(j), uint64(j)<<16, 1<<16, pattern(uint64(j), 1<<16))
			}
			c.nc.Close()
		}
		c.nc.Close()
	}
	h.waitIdle()
	c := connect(t, h.addr, testExport, true)
	if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatalf("flush errno %d", r.errno)
	}
	c.disc()
}

// A write that waits for the server-wide budget when shutdown begins is
// dropped without its payload being read; the reader must not then take
// the payload's bytes for requests. Here the payload starts with the
// bytes of a TRIM request: if the server parses it, it trims data no
// client asked to trim, and answers a handle nobody sent as a request
// (it did before errStopping).
func TestAdvShutdownDropsPayloadUnparsed(t *testing.T) {
	h := newHarness(t, serverConfig{Budget: maxPayload}, map[string]int64{testExport: testSize, "big": 40 << 20})
	marker := pattern(31, 1<<20)
	v := connect(t, h.addr, testExport, false)
	if errno := v.write(0, marker, cflagFUA); errno != 0 {
		t.Fatalf("marker write errno %d", errno)
	}
	v.disc()

	// A: a 32 MiB read whose reply A never reads: its worker holds the
	// whole budget while it waits for the socket.
	a := connect(t, h.addr, "big", false)
	a.nc.(*net.TCPConn).SetReadBuffer(4096)
	if err := a.send(cmdRead, 0, 1, 0, maxPayload, nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for h.srv.budget.inUse() < maxPayload {
		if time.Now().After(deadline) {
			t.Fatalf("budget in use %d", h.srv.budget.inUse())
		}
		time.Sleep(time.Millisecond)
	}

	// B: a FUA write (served by a worker, so it needs budget) whose
	// payload begins with a TRIM request over the marker.
	b := connect(t, h.addr, testExport, false)
	payload := make([]byte, 1<<20)
	forged := request{typ: cmdTrim, handle: 0x666, offset: 0, length: 1 << 20}
	forged.encode(payload)
	if err := b.send(cmdWrite, cflagFUA, 2, 4<<20, 1<<20, payload); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // B's reader now waits for budget

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	h.srv.shutdown(ctx) // times out on A, which never reads; closes it

	// Whatever B received must not answer the forged handle.
	b.nc.SetReadDeadline(time.Now().Add(2 * time.Second))
	got, _ := io.ReadAll(b.br)
	if len(got) >= simpleBytes && binary.BigEndian.Uint32(got) == simpleReplyMagic {
		t.Errorf("server answered handle %#x after shutdown began (errno %d): it parsed the dropped write's payload as a request",
			binary.BigEndian.Uint64(got[8:16]), binary.BigEndian.Uint32(got[4:8]))
	}
	obj, err := h.eng.Object(testExport)
	if err != nil {
		t.Fatal(err)
	}
	d := make([]byte, 1<<20)
	if _, err := obj.ReadAt(d, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(d, marker) {
		t.Errorf("data no client wrote or trimmed changed during shutdown (the forged TRIM ran)")
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http/httptest"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rawblock/rawblock/engine"
)

// harness runs a server over an engine on an in-memory device.
type harness struct {
	t    *testing.T
	dev  engine.Device
	eng  *engine.Engine
	srv  *server
	m    *metrics
	addr string
	cfg  serverConfig
	done chan error
}

const (
	testDevSize = 64 << 20
	testExport  = "disk"
	testSize    = 8 << 20
)

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// newHarness formats a device, creates the exports and starts serving.
func newHarness(t *testing.T, cfg serverConfig, exports map[string]int64) *harness {
	t.Helper()
	h := &harness{t: t, dev: engine.NewMemDevice(testDevSize, 4096), cfg: cfg}
	if err := engine.Format(h.dev, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	eng, err := engine.Open(h.dev, engine.Options{CacheSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for name, size := range exports {
		if err := createExport(eng, name, size); err != nil {
			t.Fatal(err)
		}
	}
	if err := eng.Close(); err != nil {
		t.Fatal(err)
	}
	h.start()
	t.Cleanup(h.stop)
	return h
}

func (h *harness) start() {
	h.t.Helper()
	eng, err := engine.Open(h.dev, engine.Options{CacheSize: 16 << 20, ReadOnly: h.cfg.ReadOnly})
	if err != nil {
		h.t.Fatal(err)
	}
	h.eng = eng
	h.m = newMetrics(eng)
	h.srv, err = newServer(eng, h.cfg, testLogger(h.t), h.m)
	if err != nil {
		h.t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		h.t.Fatal(err)
	}
	h.addr = l.Addr().String()
	h.done = make(chan error, 1)
	go func() { h.done <- h.srv.serve(l) }()
}

// stop shuts the server down and closes the engine (idempotent).
func (h *harness) stop() {
	if h.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.srv.shutdown(ctx); err != nil {
		h.t.Errorf("shutdown: %v", err)
	}
	if err := <-h.done; err != nil {
		h.t.Errorf("serve: %v", err)
	}
	if err := h.eng.Close(); err != nil {
		h.t.Errorf("engine close: %v", err)
	}
	if n := h.srv.budget.inUse(); n != 0 {
		h.t.Errorf("budget: %d bytes still held after shutdown", n)
	}
	h.srv = nil
}

func (h *harness) restart() {
	h.t.Helper()
	h.stop()
	h.start()
}

// waitIdle waits until the server has no connection left.
func (h *harness) waitIdle() {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.srv.activeConns() != 0 {
		if time.Now().After(deadline) {
			h.t.Fatalf("%d connections still open", h.srv.activeConns())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := h.srv.budget.inUse(); n != 0 {
		h.t.Fatalf("budget: %d bytes held with no connection open", n)
	}
}

func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func defaultExports() map[string]int64 {
	return map[string]int64{testExport: testSize, "other": 1 << 20}
}

// forModes runs f with simple and with structured replies.
func forModes(t *testing.T, f func(t *testing.T, structured bool)) {
	for _, structured := range []bool{false, true} {
		name := "simple"
		if structured {
			name = "structured"
		}
		t.Run(name, func(t *testing.T) { f(t, structured) })
	}
}

func TestHandshakeList(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	if err := c.greet(clientFixedNewstyle); err != nil {
		t.Fatal(err)
	}
	if c.hflag != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", c.hflag)
	}
	rs, err := c.opt(optList, nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range rs[:len(rs)-1] {
		if r.typ != repServer {
			t.Fatalf("reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data[0:4])
		names = append(names, string(r.data[4:4+n]))
	}
	if rs[len(rs)-1].typ != repAck || strings.Join(names, ",") != "disk,other" {
		t.Fatalf("list: %q, final %#x", names, rs[len(rs)-1].typ)
	}
	rs, err = c.opt(optList, []byte("x"))
	if err != nil || rs[0].typ != repErrInvalid {
		t.Fatalf("list with data: %v %v", rs, err)
	}
	// The connection is still usable.
	if _, err := c.goExport(testExport); err != nil {
		t.Fatal(err)
	}
	c.disc()
}

func TestHandshakeInfo(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	if err := c.greet(clientFixedNewstyle | clientNoZeroes); err != nil {
		t.Fatal(err)
	}
	rs, err := c.opt(optInfo, infoData(testExport, infoName, infoDescription, infoBlockSize))
	if err != nil {
		t.Fatal(err)
	}
	got := map[uint16][]byte{}
	for _, r := range rs[:len(rs)-1] {
		if r.typ != repInfo {
			t.Fatalf("reply %#x", r.typ)
		}
		got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
	if rs[len(rs)-1].typ != repAck {
		t.Fatalf("final reply %#x", rs[len(rs)-1].typ)
	}
	ex := got[infoExport]
	if binary.BigEndian.Uint64(ex) != testSize {
		t.Fatalf("size %d", binary.BigEndian.Uint64(ex))
	}
	want := tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn | tflagSendCache | tflagSendFastZero
	if f := binary.BigEndian.Uint16(ex[8:]); f != want {
		t.Fatalf("transmission flags %#x, want %#x", f, want)
	}
	if string(got[infoName]) != testExport || !strings.Contains(string(got[infoDescription]), testExport) {
		t.Fatalf("name %q description %q", got[infoName], got[infoDescription])
	}
	bs := got[infoBlockSize]
	if binary.BigEndian.Uint32(bs[0:]) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != maxPayload {
		t.Fatalf("block sizes % x", bs)
	}
	// Unknown export, then malformed data: errors, and the session goes on.
	rs, err = c.opt(optInfo, infoData("nope"))
	if err != nil || rs[0].typ != repErrUnknown || !strings.Contains(string(rs[0].data), "nope") {
		t.Fatalf("unknown export: %v %v", rs, err)
	}
	rs, err = c.opt(optGo, infoData("nope"))
	if err != nil || rs[0].typ != repErrUnknown {
		t.Fatalf("go unknown export: %v %v", rs, err)
	}
	bad := infoData(testExport, infoName)
	for _, data := range [][]byte{bad[:3], bad[:len(bad)-1], append(bad, 0), {0xff, 0xff, 0xff, 0xff, 0, 0}} {
		rs, err = c.opt(optGo, data)
		if err != nil || rs[0].typ != repErrInvalid {
			t.Fatalf("malformed GO % x: %v %v", data, rs, err)
		}
	}
	if _, err := c.goExport(testExport); err != nil {
		t.Fatal(err)
	}
	if c.size != testSize {
		t.Fatalf("size %d", c.size)
	}
	if d, errno := c.read(0, 4096); errno != 0 || !bytes.Equal(d, make([]byte, 4096)) {
		t.Fatalf("read of a new export: errno %d", errno)
	}
	c.disc()
}

func TestHandshakeDefaultExport(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle)
	rs, err := c.opt(optGo, infoData(""))
	if err != nil || rs[0].typ != repErrUnknown {
		t.Fatalf("empty name without a default: %v %v", rs, err)
	}
	h.stop()
	h.cfg.DefaultExport = "other"
	h.start()
	c = dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle)
	if _, err := c.goExport(""); err != nil {
		t.Fatal(err)
	}
	if c.size != 1<<20 {
		t.Fatalf("default export size %d", c.size)
	}
	c.disc()
}

func TestHandshakeExportName(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	for _, noZeroes := range []bool{false, true} {
		c := dialRaw(t, "tcp", h.addr)
		flags := clientFixedNewstyle
		if noZeroes {
			flags |= clientNoZeroes
		}
		c.greet(flags)
		c.sendOpt(optExportName, []byte(testExport))
		n := 10 + 124
		if noZeroes {
			n = 10
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(c.br, b); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint64(b) != testSize || binary.BigEndian.Uint16(b[8:])&tflagHasFlags == 0 {
			t.Fatalf("export name reply % x", b[:10])
		}
		if !bytes.Equal(b[10:], make([]byte, n-10)) {
			t.Fatal("reserved bytes not zero")
		}
		if errno := c.write(100, []byte("hello"), 0); errno != 0 {
			t.Fatalf("write errno %d", errno)
		}
		c.disc()
	}
	// An unknown export cannot be refused with an error: the server closes.
	c := dialRaw(t, "tcp", h.addr)
	c.greet(0) // a non-fixed newstyle client
	c.sendOpt(optExportName, []byte("nope"))
	c.expectClosed()
	h.waitIdle()
}

func TestHandshakeOptions(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle)
	for _, tc := range []struct {
		opt  uint32
		data []byte
		want uint32
	}{
		{99, []byte("whatever"), repErrUnsup},
		{optExtendedHeaders, nil, repErrUnsup},
		{optStartTLS, nil, repErrPolicy},
		{optStructuredReply, []byte{1}, repErrInvalid},
		{optListMetaContext, metaData(testExport), repErrInvalid}, // before structured replies
		{4, nil, repErrUnsup},                                     // withdrawn PEEK_EXPORT
	} {
		rs, err := c.opt(tc.opt, tc.data)
		if err != nil || len(rs) != 1 || rs[0].typ != tc.want {
			t.Fatalf("option %d: %v %v, want %#x", tc.opt, rs, err, tc.want)
		}
	}
	// Too much option data: drained and refused, the session goes on.
	rs, err := c.opt(optList, make([]byte, maxOptionData+1))
	if err != nil || rs[0].typ != repErrTooBig {
		t.Fatalf("big option: %v %v", rs, err)
	}
	if _, err := c.goExport(testExport); err != nil {
		t.Fatal(err)
	}
	c.disc()

	// Abort: acknowledged, then closed.
	c = dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle)
	rs, err = c.opt(optAbort, nil)
	if err != nil || rs[0].typ != repAck {
		t.Fatalf("abort: %v %v", rs, err)
	}
	c.expectClosed()
	h.waitIdle()
}

func TestHandshakeMalformed(t *testing.T) {
	h := newHarness(t, serverConfig{HandshakeTimeout: 300 * time.Millisecond}, defaultExports())
	good := connect(t, h.addr, testExport, true)
	cases := map[string]func(c *testClient){
		"unknown client flags": func(c *testClient) { c.greet(1 << 5) },
		"bad option magic": func(c *testClient) {
			c.greet(clientFixedNewstyle)
			c.bw.Write(make([]byte, 16))
			c.bw.Flush()
		},
		"huge option": func(c *testClient) {
			c.greet(clientFixedNewstyle)
			var h [16]byte
			binary.BigEndian.PutUint64(h[0:], optMagic)
			binary.BigEndian.PutUint32(h[8:], optGo)
			binary.BigEndian.PutUint32(h[12:], 1<<30)
			c.bw.Write(h[:])
			c.bw.Flush()
		},
		"truncated option": func(c *testClient) {
			c.greet(clientFixedNewstyle)
			var h [16]byte
			binary.BigEndian.PutUint64(h[0:], optMagic)
			binary.BigEndian.PutUint32(h[8:], optGo)
			binary.BigEndian.PutUint32(h[12:], 100)
			c.bw.Write(h[:])
			c.bw.Write([]byte{1, 2, 3})
			c.bw.Flush()
			c.nc.(*net.TCPConn).CloseWrite()
		},
		"silent client": func(c *testClient) { // handshake timeout
			io.ReadFull(c.br, make([]byte, 18))
		},
		"greeting then silence": func(c *testClient) {
			c.greet(clientFixedNewstyle)
		},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			c := dialRaw(t, "tcp", h.addr)
			f(c)
			c.expectClosed()
		})
	}
	h.waitIdleExcept(1)
	// The well-behaved client never noticed.
	p := pattern(1, 8192)
	if errno := good.write(0, p, 0); errno != 0 {
		t.Fatalf("write errno %d", errno)
	}
	if d, errno := good.read(0, 8192); errno != 0 || !bytes.Equal(d, p) {
		t.Fatal("read back failed")
	}
	good.disc()
}

// waitIdleExcept waits until exactly n connections remain.
func (h *harness) waitIdleExcept(n int) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.srv.activeConns() != n {
		if time.Now().After(deadline) {
			h.t.Fatalf("%d connections open, want %d", h.srv.activeConns(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReadWrite(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{}, defaultExports())
		c := connect(t, h.addr, testExport, structured)
		model := make([]byte, testSize)
		r := rand.New(rand.NewPCG(7, 7))
		for i := range 200 {
			n := 1 + r.IntN(70000)
			if i%10 == 0 {
				n = 1 << 20
			}
			off := r.IntN(testSize - n)
			p := pattern(uint64(i), n)
			flags := uint16(0)
			if i%7 == 0 {
				flags = cflagFUA
			}
			if errno := c.write(uint64(off), p, flags); errno != 0 {
				t.Fatalf("write %d at %d: errno %d", n, off, errno)
			}
			copy(model[off:], p)
			if i%5 == 0 {
				ro := r.IntN(testSize - n)
				d, errno := c.read(uint64(ro), uint32(n))
				if errno != 0 || !bytes.Equal(d, model[ro:ro+n]) {
					t.Fatalf("read %d at %d: errno %d, mismatch", n, ro, errno)
				}
			}
		}
		if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush errno %d", r.errno)
		}
		if r := c.do(cmdFlush, cflagFUA, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush with FUA errno %d", r.errno)
		}
		// Whole export, including the last byte.
		d, errno := c.read(0, testSize)
		if errno != 0 || !bytes.Equal(d, model) {
			t.Fatalf("full read: errno %d or mismatch", errno)
		}
		if d, errno := c.read(testSize-1, 1); errno != 0 || d[0] != model[testSize-1] {
			t.Fatal("last byte")
		}
		c.disc()
		// The flushed data survives a restart.
		h.restart()
		c = connect(t, h.addr, testExport, structured)
		d, errno = c.read(0, testSize)
		if errno != 0 || !bytes.Equal(d, model) {
			t.Fatalf("after restart: errno %d or mismatch", errno)
		}
		c.disc()
	})
}

func TestTrimAndZeroes(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{}, defaultExports())
		c := connect(t, h.addr, testExport, structured)
		fill := func() {
			if errno := c.write(0, bytes.Repeat([]byte{0xaa}, 1<<20), 0); errno != 0 {
				t.Fatalf("fill: errno %d", errno)
			}
		}
		check := func(what string, zoff, zlen int) {
			t.Helper()
			d, errno := c.read(0, 1<<20)
			if errno != 0 {
				t.Fatalf("%s: read errno %d", what, errno)
			}
			for i, b := range d {
				want := byte(0xaa)
				if i >= zoff && i < zoff+zlen {
					want = 0
				}
				if b != want {
					t.Fatalf("%s: byte %d = %#x, want %#x", what, i, b, want)
				}
			}
		}
		for _, tc := range []struct {
			name      string
			cmd       uint16
			flags     uint16
			off, n    int
			wantErrno uint32
		}{
			{"trim aligned", cmdTrim, 0, 8192, 65536, 0},
			{"trim unaligned", cmdTrim, cflagFUA, 1000, 70000, 0},
			{"zeroes punch", cmdWriteZeroes, 0, 4096, 12288, 0},
			{"zeroes unaligned", cmdWriteZeroes, cflagFUA, 333, 5000, 0},
			{"zeroes no hole", cmdWriteZeroes, cflagNoHole, 100000, 300000, 0},
			{"zeroes fast", cmdWriteZeroes, cflagFastZero, 40960, 40960, 0},
			{"zeroes no hole fast", cmdWriteZeroes, cflagNoHole | cflagFastZero, 0, 4096, errNotSup},
		} {
			fill()
			r := c.do(tc.cmd, tc.flags, uint64(tc.off), uint32(tc.n), nil)
			if r.errno != tc.wantErrno {
				t.Fatalf("%s: errno %d, want %d (%s)", tc.name, r.errno, tc.wantErrno, r.msg)
			}
			if tc.wantErrno == 0 {
				check(tc.name, tc.off, tc.n)
			} else {
				check(tc.name, 0, 0)
			}
		}
		// NO_HOLE leaves the range allocated; a punch frees it.
		if structured {
			fill()
			c.do(cmdWriteZeroes, 0, 0, 1<<20, nil)
			if r := c.do(cmdBlockStatus, 0, 0, 1<<20, nil); len(r.descs) != 1 || r.descs[0][1] != stateHole|stateZero {
				t.Fatalf("after punch: %v", r.descs)
			}
			c.do(cmdWriteZeroes, cflagNoHole, 0, 1<<20, nil)
			if r := c.do(cmdBlockStatus, 0, 0, 1<<20, nil); len(r.descs) != 1 || r.descs[0][1] != 0 {
				t.Fatalf("after NO_HOLE zeroes: %v", r.descs)
			}
		}
		c.disc()
	})
}

func TestRequestErrors(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{}, defaultExports())
		c := connect(t, h.addr, testExport, structured)
		for _, tc := range []struct {
			name    string
			cmd     uint16
			flags   uint16
			off     uint64
			n       uint32
			payload bool
			want    uint32
		}{
			{"read past end", cmdRead, 0, testSize - 10, 11, false, errInval},
			{"read offset past end", cmdRead, 0, testSize + 1, 1, false, errInval},
			{"read offset overflow", cmdRead, 0, 1<<64 - 1, 2, false, errInval},
			{"read zero length", cmdRead, 0, 0, 0, false, errInval},
			{"write past end", cmdWrite, 0, testSize - 4096, 8192, true, errNoSpc},
			{"write zero length", cmdWrite, 0, 0, 0, true, errInval},
			{"write bad flag", cmdWrite, cflagNoHole, 0, 4096, true, errInval},
			{"zeroes past end", cmdWriteZeroes, 0, testSize, 1, false, errNoSpc},
			{"trim past end", cmdTrim, 0, testSize - 1, 2, false, errInval},
			{"cache past end", cmdCache, 0, testSize, 4096, false, errInval},
			{"flush with offset", cmdFlush, 0, 4096, 0, false, errInval},
			{"flush with length", cmdFlush, 0, 0, 1, false, errInval},
			{"unknown command", 42, 0, 0, 4096, false, errInval},
			{"resize unsupported", 8, 0, 0, 0, false, errInval},
			{"unknown flag", cmdRead, 1 << 9, 0, 4096, false, errInval},
			{"req one on read", cmdRead, cflagReqOne, 0, 4096, false, errInval},
			{"block status past end", cmdBlockStatus, 0, testSize - 1, 2, false, errInval},
		} {
			var p []byte
			if tc.payload {
				p = make([]byte, tc.n)
			}
			r := c.do(tc.cmd, tc.flags, tc.off, tc.n, p)
			if r.errno != tc.want {
				t.Fatalf("%s: errno %d, want %d", tc.name, r.errno, tc.want)
			}
			if structured && r.msg == "" {
				t.Fatalf("%s: structured error without a message", tc.name)
			}
			if r.data != nil {
				t.Fatalf("%s: error reply carried data", tc.name)
			}
		}
		// A read over the limit: EOVERFLOW with structured replies (retry
		// smaller), EINVAL without.
		wantBig := errInval
		if structured {
			wantBig = errOverflow
		}
		if r := c.do(cmdRead, 0, 0, maxPayload+1, nil); r.errno != wantBig {
			t.Fatalf("read too big: errno %d, want %d", r.errno, wantBig)
		}
		// DF: only with structured replies.
		r := c.do(cmdRead, cflagDF, 0, 4096, nil)
		if structured && (r.errno != 0 || r.chunks != 1) || !structured && r.errno != errInval {
			t.Fatalf("DF read: errno %d chunks %d", r.errno, r.chunks)
		}
		// Block status needs the context negotiated.
		if !structured {
			if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errInval {
				t.Fatalf("block status without context: errno %d", r.errno)
			}
		}
		// CACHE and FUA on a read are accepted.
		if r := c.do(cmdCache, 0, 0, 3<<20, nil); r.errno != 0 {
			t.Fatalf("cache errno %d", r.errno)
		}
		if r := c.do(cmdRead, cflagFUA, 0, 4096, nil); r.errno != 0 {
			t.Fatalf("read with FUA errno %d", r.errno)
		}
		// After all that, the export is intact and the connection works.
		p := pattern(3, 4096)
		if errno := c.write(testSize-4096, p, 0); errno != 0 {
			t.Fatalf("write errno %d", errno)
		}
		if d, errno := c.read(testSize-4096, 4096); errno != 0 || !bytes.Equal(d, p) {
			t.Fatal("read back")
		}
		c.disc()
		ms := failuresOf(t, h, testExport)
		if ms == 0 {
			t.Fatal("errors not counted in metrics")
		}
	})
}

func failuresOf(t *testing.T, h *harness, export string) float64 {
	t.Helper()
	mfs, err := h.m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != "rawblockd_request_errors_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "export" && l.GetValue() == export {
					total += m.GetCounter().GetValue()
				}
			}
		}
	}
	return total
}

func TestProtocolViolationsDisconnect(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	good := connect(t, h.addr, testExport, true)
	for name, f := range map[string]func(c *testClient){
		"bad request magic": func(c *testClient) {
			c.bw.Write(make([]byte, requestBytes))
			c.bw.Flush()
		},
		"oversized write": func(c *testClient) {
			c.send(cmdWrite, 0, 1, 0, maxPayload+1, nil)
		},
		"disconnect mid payload": func(c *testClient) {
			c.send(cmdWrite, 0, 1, 0, 1<<20, make([]byte, 1000))
			c.nc.(*net.TCPConn).CloseWrite()
		},
		"disconnect mid small payload": func(c *testClient) {
			c.send(cmdWrite, 0, 1, 0, 4096, make([]byte, 1000))
			c.nc.(*net.TCPConn).CloseWrite()
		},
		"disconnect mid header": func(c *testClient) {
			c.bw.Write([]byte{0x25, 0x60, 0x95})
			c.bw.Flush()
			c.nc.(*net.TCPConn).CloseWrite()
		},
		"disconnect without disc": func(c *testClient) {
			c.nc.(*net.TCPConn).CloseWrite()
		},
	} {
		t.Run(name, func(t *testing.T) {
			c := connect(t, h.addr, testExport, true)
			f(c)
			c.expectClosed()
		})
	}
	h.waitIdleExcept(1)
	// Disconnect with requests in flight: the server finishes them
	// and cleans up.
	c := connect(t, h.addr, testExport, false)
	for i := range 64 {
		c.send(cmdWrite, 0, uint64(i), uint64(i)*65536, 65536, pattern(uint64(i), 65536))
		c.send(cmdRead, 0, uint64(1000+i), uint64(i)*65536, 65536, nil)
	}
	c.nc.Close()
	h.waitIdleExcept(1)
	if r := good.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Fatal("flush on the surviving client")
	}
	good.disc()
	h.waitIdle()
}

func TestIOTimeout(t *testing.T) {
	h := newHarness(t, serverConfig{IOTimeout: 200 * time.Millisecond}, defaultExports())
	c := connect(t, h.addr, testExport, false)
	// A payload that stops halfway holds buffers: dropped.
	c.send(cmdWrite, 0, 1, 0, 1<<20, make([]byte, 4096))
	c.expectClosed()
	h.waitIdle()
	// An idle client between requests is not dropped.
	c = connect(t, h.addr, testExport, false)
	time.Sleep(600 * time.Millisecond)
	if errno := c.write(0, []byte("still here"), 0); errno != 0 {
		t.Fatalf("idle client: errno %d", errno)
	}
	c.disc()
}

func TestPipelined(t *testing.T) {
	forModes(t, func(t *testing.T, structured bool) {
		h := newHarness(t, serverConfig{ConnRequests: 8}, defaultExports())
		c := connect(t, h.addr, testExport, structured)
		const n = 256
		const bs = 16384
		// Writes to distinct blocks with random handles, then reads of
		// them, all pipelined: every reply must match its request's handle.
		handles := map[uint64]int{}
		r := rand.New(rand.NewPCG(9, 9))
		var sendErr error
		var wg sync.WaitGroup
		order := r.Perm(n)
		hs := make([]uint64, 2*n)
		for i := range hs {
			hs[i] = r.Uint64()
			handles[hs[i]] = i
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, i := range order {
				if err := c.send(cmdWrite, 0, hs[i], uint64(i*bs), bs, pattern(uint64(i), bs)); err != nil {
					sendErr = err
					return
				}
			}
		}()
		for range n {
			rep, err := c.recv()
			if err != nil {
				t.Fatal(err)
			}
			i, ok := handles[rep.handle]
			if !ok || i >= n || rep.errno != 0 {
				t.Fatalf("write reply handle %#x errno %d", rep.handle, rep.errno)
			}
			delete(handles, rep.handle)
		}
		wg.Wait()
		if sendErr != nil {
			t.Fatal(sendErr)
		}
		// c.reads is written by send and read by recv: keep them in one
		// goroutine for the reads.
		for _, i := range order {
			if err := c.send(cmdRead, 0, hs[n+i], uint64(i*bs), bs, nil); err != nil {
				t.Fatal(err)
			}
		}
		for range n {
			rep, err := c.recv()
			if err != nil {
				t.Fatal(err)
			}
			j, ok := handles[rep.handle]
			if !ok || j < n || rep.errno != 0 {
				t.Fatalf("read reply handle %#x errno %d", rep.handle, rep.errno)
			}
			if !bytes.Equal(rep.data, pattern(uint64(j-n), bs)) {
				t.Fatalf("read %d returned the wrong data", j-n)
			}
			delete(handles, rep.handle)
		}
		if len(handles) != 0 {
			t.Fatalf("%d requests unanswered", len(handles))
		}
		c.disc()
	})
}

func TestManyClients(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	clients := 24
	if testing.Short() {
		clients = 8
	}
	before := runtime.NumGoroutine()
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	region := testSize / clients &^ 4095
	for k := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := connect(t, h.addr, testExport, k%2 == 0)
			base := k * region
			for i := 0; i+16384 <= region; i += 16384 {
				if errno := c.write(uint64(base+i), pattern(uint64(k<<20+i), 16384), 0); errno != 0 {
					errs <- fmt.Errorf("client %d write errno %d", k, errno)
					return
				}
			}
			if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
				errs <- fmt.Errorf("client %d flush errno %d", k, r.errno)
				return
			}
			for i := 0; i+16384 <= region; i += 16384 {
				d, errno := c.read(uint64(base+i), 16384)
				if errno != 0 || !bytes.Equal(d, pattern(uint64(k<<20+i), 16384)) {
					errs <- fmt.Errorf("client %d read at %d: errno %d or mismatch", k, base+i, errno)
					return
				}
			}
			c.send(cmdDisc, 0, 0, 0, 0, nil)
			c.nc.Close()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	h.waitIdle()
	// Every connection's goroutines are gone.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if g := runtime.NumGoroutine(); g > before+2 {
		t.Fatalf("goroutines: %d before, %d after all clients left", before, g)
	}
}

func TestMaxClients(t *testing.T) {
	h := newHarness(t, serverConfig{MaxClients: 2}, defaultExports())
	a := connect(t, h.addr, testExport, false)
	b := connect(t, h.addr, testExport, false)
	c := dialRaw(t, "tcp", h.addr)
	c.expectClosed()
	a.disc()
	h.waitIdleExcept(1)
	d := connect(t, h.addr, testExport, false)
	d.disc()
	b.disc()
}

func TestReadOnly(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := connect(t, h.addr, testExport, false)
	p := pattern(5, 4096)
	c.write(0, p, cflagFUA)
	c.disc()
	h.stop()
	h.cfg.ReadOnly = true
	h.start()
	forModes(t, func(t *testing.T, structured bool) {
		c := connect(t, h.addr, testExport, structured)
		if c.flags&tflagReadOnly == 0 || c.flags&(tflagSendTrim|tflagSendWriteZeroes) != 0 {
			t.Fatalf("flags %#x", c.flags)
		}
		for _, cmd := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
			var payload []byte
			if cmd == cmdWrite {
				payload = make([]byte, 4096)
			}
			if r := c.do(cmd, 0, 0, 4096, payload); r.errno != errPerm {
				t.Fatalf("%s on a read-only export: errno %d", cmdName(cmd), r.errno)
			}
		}
		if d, errno := c.read(0, 4096); errno != 0 || !bytes.Equal(d, p) {
			t.Fatal("read-only read")
		}
		if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
			t.Fatalf("flush errno %d", r.errno)
		}
		c.disc()
	})
}

func TestBlockStatus(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := connect(t, h.addr, testExport, true)
	hz := stateHole | stateZero
	if r := c.do(cmdBlockStatus, 0, 0, testSize, nil); r.errno != 0 || len(r.descs) != 1 || r.descs[0] != [2]uint32{testSize, hz} {
		t.Fatalf("new export: %v errno %d", r.descs, r.errno)
	}
	c.write(1<<20, pattern(1, 8192), 0)
	c.write(3<<20, pattern(2, 4096), cflagFUA) // written, then still data
	r := c.do(cmdBlockStatus, 0, 0, 4<<20, nil)
	want := [][2]uint32{{1 << 20, hz}, {8192, 0}, {2<<20 - 8192, hz}, {4096, 0}, {1<<20 - 4096, hz}}
	if fmt.Sprint(r.descs) != fmt.Sprint(want) {
		t.Fatalf("descriptors %v, want %v", r.descs, want)
	}
	// An unaligned window into the middle, and REQ_ONE.
	r = c.do(cmdBlockStatus, 0, 1<<20+100, 10000, nil)
	if fmt.Sprint(r.descs) != fmt.Sprint([][2]uint32{{8092, 0}, {1908, hz}}) {
		t.Fatalf("window: %v", r.descs)
	}
	r = c.do(cmdBlockStatus, cflagReqOne, 0, 4<<20, nil)
	if len(r.descs) != 1 || r.descs[0] != [2]uint32{1 << 20, hz} {
		t.Fatalf("REQ_ONE: %v", r.descs)
	}
	c.disc()

	// Meta context negotiation.
	c = dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle)
	c.opt(optStructuredReply, nil)
	c.structured = true
	rs, err := c.opt(optListMetaContext, metaData(testExport))
	if err != nil || len(rs) != 2 || rs[0].typ != repMetaContext || string(rs[0].data[4:]) != metaContextBaseAllocation {
		t.Fatalf("list all: %v %v", rs, err)
	}
	rs, _ = c.opt(optListMetaContext, metaData(testExport, "qemu:dirty-bitmap:x"))
	if len(rs) != 1 || rs[0].typ != repAck {
		t.Fatalf("list other namespace: %v", rs)
	}
	rs, _ = c.opt(optSetMetaContext, metaData("nope", metaContextBaseAllocation))
	if rs[0].typ != repErrUnknown {
		t.Fatalf("set for unknown export: %v", rs)
	}
	rs, _ = c.opt(optSetMetaContext, []byte{0, 0, 0, 9, 'x'})
	if rs[0].typ != repErrInvalid {
		t.Fatalf("malformed set: %v", rs)
	}
	// Selected for another export than the one we then use: not active.
	rs, _ = c.opt(optSetMetaContext, metaData("other", metaContextBaseAllocation))
	if len(rs) != 2 || binary.BigEndian.Uint32(rs[0].data) != baseAllocationID {
		t.Fatalf("set: %v", rs)
	}
	if _, err := c.goExport(testExport); err != nil {
		t.Fatal(err)
	}
	if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errInval {
		t.Fatalf("block status with the context set for another export: errno %d", r.errno)
	}
	c.disc()
}

func TestNoSpace(t *testing.T) {
	// A thin export larger than the device: writes past the free space
	// fail with ENOSPC, and the export stays usable.
	h := newHarness(t, serverConfig{}, map[string]int64{"big": 4 * testDevSize})
	c := connect(t, h.addr, "big", true)
	var nospc, ok int
	p := pattern(1, 1<<20)
	for i := range 2 * testDevSize >> 20 {
		r := c.do(cmdWrite, 0, uint64(i)<<20, 1<<20, p)
		switch r.errno {
		case 0:
			ok++
		case errNoSpc:
			nospc++
		default:
			t.Fatalf("write %d: errno %d (%s)", i, r.errno, r.msg)
		}
	}
	if ok == 0 || nospc == 0 {
		t.Fatalf("%d writes succeeded, %d got ENOSPC", ok, nospc)
	}
	if r := c.do(cmdTrim, 0, 0, uint32(ok)<<20, nil); r.errno != 0 {
		t.Fatalf("trim errno %d", r.errno)
	}
	if r := c.do(cmdWrite, 0, 0, 1<<20, p); r.errno != 0 {
		t.Fatalf("write after trim: errno %d (%s)", r.errno, r.msg)
	}
	c.disc()
}

func TestShutdownFinishesInFlight(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := connect(t, h.addr, testExport, false)
	const n = 64
	const bs = 65536
	for i := range n {
		if err := c.send(cmdWrite, 0, uint64(i), uint64(i*bs), bs, pattern(uint64(i), bs)); err != nil {
			t.Fatal(err)
		}
	}
	// Wait for the first reply so the server has requests in hand, then
	// shut down while the rest are in flight or queued.
	var acked []int
	rep, err := c.recv()
	if err != nil || rep.errno != 0 {
		t.Fatalf("first reply: %v %d", err, rep.errno)
	}
	acked = append(acked, int(rep.handle))
	stopped := make(chan struct{})
	go func() {
		h.stop()
		close(stopped)
	}()
	for {
		rep, err := c.recv()
		if err != nil {
			break
		}
		if rep.errno != 0 {
			t.Fatalf("reply %d errno %d", rep.handle, rep.errno)
		}
		acked = append(acked, int(rep.handle))
	}
	<-stopped
	// Everything acknowledged is there after the restart (Close synced it).
	h.start()
	c = connect(t, h.addr, testExport, false)
	for _, i := range acked {
		d, errno := c.read(uint64(i*bs), bs)
		if errno != 0 || !bytes.Equal(d, pattern(uint64(i), bs)) {
			t.Fatalf("acknowledged write %d lost across shutdown", i)
		}
	}
	c.disc()
	t.Logf("%d of %d writes acknowledged before shutdown", len(acked), n)
}

func TestMetricsEndpoint(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := connect(t, h.addr, testExport, true)
	c.write(0, pattern(1, 8192), 0)
	c.read(0, 8192)
	c.do(cmdFlush, 0, 0, 0, nil)
	c.do(cmdRead, 0, testSize, 1, nil)
	c.disc()
	h.waitIdle()
	srv := httptest.NewServer(promhttp.HandlerFor(h.m.reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`rawblockd_requests_total{export="disk",op="write"} 1`,
		`rawblockd_requests_total{export="disk",op="read"} 2`,
		`rawblockd_request_errors_total{export="disk",op="read"} 1`,
		`rawblockd_request_bytes_total{export="disk",op="write"} 8192`,
		`rawblockd_request_duration_seconds_count{export="disk",op="flush"} 1`,
		`rawblockd_connections_total 1`,
		`rawblockd_connections 0`,
		`rawblock_total_bytes `,
		`rawblock_device_writes_total `,
		`rawblock_cache_hits_total `,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

func TestBudget(t *testing.T) {
	b := newBudget(100)
	n, ok := b.acquire(60, nil)
	if !ok || n != 60 {
		t.Fatal("acquire 60")
	}
	got := make(chan int64)
	go func() {
		n, _ := b.acquire(50, nil)
		got <- n
	}()
	select {
	case <-got:
		t.Fatal("acquired past the budget")
	case <-time.After(50 * time.Millisecond):
	}
	// FIFO: a small request queued behind the big one waits too.
	small := make(chan bool)
	go func() {
		time.Sleep(10 * time.Millisecond)
		_, ok := b.acquire(10, nil)
		small <- ok
	}()
	time.Sleep(30 * time.Millisecond)
	b.release(60)
	if n := <-got; n != 50 {
		t.Fatalf("got %d", n)
	}
	<-small
	if b.inUse() != 60 {
		t.Fatalf("in use %d", b.inUse())
	}
	// Larger than the whole budget: capped.
	stop := make(chan struct{})
	res := make(chan bool)
	go func() {
		_, ok := b.acquire(1000, stop)
		res <- ok
	}()
	time.Sleep(20 * time.Millisecond)
	close(stop)
	if <-res {
		t.Fatal("acquire did not give up on stop")
	}
	b.release(50)
	b.release(10)
	if n, ok := b.acquire(1000, nil); !ok || n != 100 {
		t.Fatalf("capped acquire: %d %v", n, ok)
	}
	b.release(100)
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("over-release did not panic")
			}
		}()
		b.release(1)
	}()
}

func TestBufPool(t *testing.T) {
	for _, n := range []int{1, 4096, 4097, 65536, 1 << 20, maxPayload} {
		b := getBuf(n)
		if len(*b) != n || cap(*b) < n || cap(*b)&(cap(*b)-1) != 0 {
			t.Fatalf("getBuf(%d): len %d cap %d", n, len(*b), cap(*b))
		}
		putBuf(b)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("oversized getBuf did not panic")
			}
		}()
		getBuf(maxPayload + 1)
	}()
	func() {
		defer func() {
			if recover() == nil {
				t.Fatal("foreign putBuf did not panic")
			}
		}()
		b := make([]byte, 5000)
		putBuf(&b)
	}()
}

// slowDevice delays reads, as a device does, and records how many were in
// flight at once.
type slowDevice struct {
	engine.Device
	delay            time.Duration
	mu               sync.Mutex
	inFlight, maxInF int
}

func (d *slowDevice) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	d.inFlight++
	d.maxInF = max(d.maxInF, d.inFlight)
	d.mu.Unlock()
	time.Sleep(d.delay)
	n, err := d.Device.ReadAt(p, off)
	d.mu.Lock()
	d.inFlight--
	d.mu.Unlock()
	return n, err
}

func TestSlowReadsOverlap(t *testing.T) {
	// Small reads that miss the cache are slow: the reader must stop
	// serving them itself and let them overlap on the workers.
	mem := engine.NewMemDevice(testDevSize, 4096)
	if err := engine.Format(mem, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	eng, err := engine.Open(mem, engine.Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := createExport(eng, testExport, 32<<20); err != nil {
		t.Fatal(err)
	}
	obj, _ := eng.Object(testExport)
	model := pattern(3, 32<<20)
	if _, err := obj.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := eng.Close(); err != nil {
		t.Fatal(err)
	}
	dev := &slowDevice{Device: mem, delay: 2 * time.Millisecond}
	eng, err = engine.Open(dev, engine.Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	addr, stop := startOn(t, eng)
	defer func() {
		stop()
		eng.Close()
	}()
	c := connect(t, addr, testExport, true)
	r := rand.New(rand.NewPCG(5, 5))
	const depth, rounds = 16, 8
	for range rounds {
		offs := map[uint64]uint64{}
		for i := range depth {
			off := uint64(r.IntN(32<<20/4096)) * 4096
			offs[uint64(i)] = off
			if err := c.send(cmdRead, 0, uint64(i), off, 4096, nil); err != nil {
				t.Fatal(err)
			}
		}
		for range depth {
			rep, err := c.recv()
			if err != nil || rep.errno != 0 {
				t.Fatalf("read: %v errno %d", err, rep.errno)
			}
			off := offs[rep.handle]
			if !bytes.Equal(rep.data, model[off:off+4096]) {
				t.Fatalf("read at %d returned the wrong data", off)
			}
		}
	}
	c.disc()
	dev.mu.Lock()
	defer dev.mu.Unlock()
	if dev.maxInF < 4 {
		t.Fatalf("at most %d device reads overlapped; slow small reads were not spread over workers", dev.maxInF)
	}
	t.Logf("up to %d device reads in flight", dev.maxInF)
}

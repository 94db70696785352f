package main

// Handshake rules of the NBD protocol (doc/proto.md) that the main suite
// did not cover, each checked against the behaviour the rule asks for.

import (
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/rawblock/rawblock/engine"
)

// A context set for the default export ("") is the context of the export
// that name selects: nbdinfo --map asks this way.
func TestMetaContextForDefaultExport(t *testing.T) {
	h := newHarness(t, serverConfig{DefaultExport: testExport}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	if rs, err := c.opt(optStructuredReply, nil); err != nil || rs[0].typ != repAck {
		t.Fatal(rs, err)
	}
	c.structured = true
	rs, err := c.opt(optSetMetaContext, metaData("", metaContextBaseAllocation))
	if err != nil || len(rs) != 2 || rs[0].typ != repMetaContext || rs[1].typ != repAck {
		t.Fatalf("SET_META_CONTEXT(\"\"): %v %v", rs, err)
	}
	if _, err := c.goExport(""); err != nil {
		t.Fatal(err)
	}
	if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != 0 || len(r.descs) == 0 {
		t.Fatalf("BLOCK_STATUS after SET_META_CONTEXT(\"\") and GO(\"\"): errno %d %q, descriptors %v", r.errno, r.msg, r.descs)
	}
}

// "Issuing this command replaces all previously-set metadata contexts
// (including when this command fails)."
func TestFailedSetMetaContextClears(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"malformed", []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 0, 0, 1}},
		{"unknown export", metaData("nosuch", metaContextBaseAllocation)},
		{"too big", make([]byte, maxOptionData+1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, serverConfig{}, defaultExports())
			c := dialRaw(t, "tcp", h.addr)
			c.greet(clientFixedNewstyle | clientNoZeroes)
			c.opt(optStructuredReply, nil)
			c.structured = true
			if rs, err := c.opt(optSetMetaContext, metaData(testExport, metaContextBaseAllocation)); err != nil || rs[len(rs)-1].typ != repAck {
				t.Fatalf("first SET: %v %v", rs, err)
			}
			rs, err := c.opt(optSetMetaContext, tc.data)
			if err != nil || rs[len(rs)-1].typ&repErrBit == 0 {
				t.Fatalf("second SET was not refused: %v %v", rs, err)
			}
			if _, err := c.goExport(testExport); err != nil {
				t.Fatal(err)
			}
			if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errInval {
				t.Fatalf("BLOCK_STATUS after a failed SET: errno %d, descriptors %v; want EINVAL", r.errno, r.descs)
			}
		})
	}
}

// NBD_OPT_EXPORT_NAME has no option replies: one the server will not
// take ends the session, here one with too much data.
func TestExportNameTooBigDisconnects(t *testing.T) {
	h := newHarness(t, serverConfig{}, defaultExports())
	c := dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle | clientNoZeroes)
	name := make([]byte, maxOptionData+1)
	for i := range name {
		name[i] = 'a'
	}
	c.sendOpt(optExportName, name)
	c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c.br)
	// The server does not read the refused name, and a socket closed with
	// unread data ends in a reset rather than a FIN: a close all the same.
	if errors.Is(err, syscall.ECONNRESET) {
		err = nil
	}
	if err != nil || len(b) != 0 {
		var size uint64
		if len(b) >= 8 {
			size = binary.BigEndian.Uint64(b[0:8])
		}
		t.Fatalf("server sent %d bytes (a client reads size %#x), err %v; want a close", len(b), size, err)
	}
}

// NBD names are UTF-8: NBD_OPT_LIST leaves out objects whose names are
// not (GO would refuse them).
func TestListSkipsNonUTF8Names(t *testing.T) {
	// rawblockd makes only UTF-8 exports; another program sharing the
	// device may make any object.
	if err := createExport(nil, "bad\xfe", 1<<20); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("createExport of a non-UTF-8 name: %v, want fs.ErrInvalid", err)
	}
	h := &harness{t: t, dev: engine.NewMemDevice(testDevSize, 4096)}
	if err := engine.Format(h.dev, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	eng, err := engine.Open(h.dev, engine.Options{CacheSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := createExport(eng, "ok", 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := eng.Create("bad\xff"); err != nil {
		t.Fatal(err)
	}
	if err := eng.Close(); err != nil {
		t.Fatal(err)
	}
	h.start()
	t.Cleanup(h.stop)
	c := dialRaw(t, "tcp", h.addr)
	c.greet(clientFixedNewstyle)
	rs, err := c.opt(optList, nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range rs {
		if r.typ == repServer {
			names = append(names, string(r.data[4:]))
		}
	}
	if len(names) != 1 || names[0] != "ok" || !utf8.ValidString(names[0]) {
		t.Fatalf("NBD_OPT_LIST gave %q, want [\"ok\"]", names)
	}
}

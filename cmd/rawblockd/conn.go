package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/rawblock/rawblock/engine"
)

// The transmission phase. One goroutine, the reader, reads requests.
// A small read or write is served by the reader itself ("inline") while
// such requests are fast: handing each one to another goroutine costs a
// cross-thread wake-up that is larger than a cache hit (measured: 4k random
// reads from the cache, 1.5-2.5x the IOPS inline). Every other request —
// flush, trim, zeroes, large transfers, and small ones while they are slow
// (cache misses waiting for the device) — goes to a pool of worker
// goroutines, at most ConnRequests in flight, so slow requests overlap.
// Replies go out in completion order, matched to requests by handle.
//
// Replies are gathered in one buffer under a mutex. The reader defers the
// socket write while it has more requests buffered (it writes before it
// would block on the socket); a worker that finds others waiting for the
// mutex leaves the write to the last of them. A burst of requests thus
// costs one read and one write system call.
//
// Tried and not kept: holding the reader's replies back until a read would
// block (a non-blocking read first, the flush only before waiting), so
// that a pipelined client gets its replies in bursts. With fio's nbd
// engine (4k random writes at iodepth 16, cached) it halved the daemon's
// writes but cut IOPS from 148-160k to 123-132k: the client still polls
// and receives once per reply (perf stat: 1 poll, 1 recvfrom and 2 sendto
// per request either way), and held replies only left it idle. That
// client spends about 7 µs of CPU per request and runs at 0.92 of a core
// against either server, so it, not the server, sets the IOPS.

const (
	// replyBuf is the size of the buffer replies are gathered in; larger
	// read data goes out in the same writev as the buffered bytes.
	replyBuf = 64 << 10
	// chunkBytesIO bounds one engine call of a NO_HOLE WRITE_ZEROES or a
	// CACHE, so a large request does not need a large buffer.
	chunkBytesIO = 1 << 20
	// maxErrorMessage bounds the message of a structured error chunk.
	maxErrorMessage = 1024
	// maxInline is the largest read or write the reader may serve itself.
	maxInline = 64 << 10
	// slowOp: an inline-class request whose engine call takes longer
	// than this was slow (it waited for the device or for writeback).
	slowOp = 40 * time.Microsecond
	// Slowness is an exponentially weighted average in 1/1024 units over
	// about the last slowWeight requests; above slowLimit, small requests
	// go to the workers too, and one in probeEvery is still served inline
	// to notice when they are fast again.
	slowWeight = 8
	slowLimit  = 256
	probeEvery = 64
)

// zeros is the source of WRITE_ZEROES with NO_HOLE; never written.
var zeros = make([]byte, chunkBytesIO)

// errNoDisc: the client closed the connection without NBD_CMD_DISC.
var errNoDisc = errors.New("client closed the connection without NBD_CMD_DISC")

// errStopping ends the reader's loop when the server shuts down in the
// middle of a request (waiting for its budget, or for a write's payload).
// The request is dropped unanswered — never acknowledged, so nothing is
// lost — and nothing after it may be parsed: its payload, or part of it,
// is still in the read buffer, and read as request headers it could run
// as requests no client sent.
var errStopping = errors.New("server stopping in the middle of a request")

// replyWriter serializes replies on one connection.
type replyWriter struct {
	c       *conn
	mu      sync.Mutex
	waiting atomic.Int32
	buf     []byte
	vec     net.Buffers
	err     error
}

// send writes one reply: hdr (small) and data (any size, may be nil).
// With deferred set (the reader only, when it has more requests to serve)
// the bytes may stay buffered until the reader's next flush; otherwise
// they are written, or left to a sender waiting for the mutex. data may be
// reused when send returns.
func (w *replyWriter) send(hdr, data []byte, deferred bool) error {
	w.waiting.Add(1)
	w.mu.Lock()
	w.waiting.Add(-1)
	defer w.mu.Unlock()
	if w.err != nil {
		return w.err
	}
	if len(w.buf)+len(hdr)+len(data) <= cap(w.buf) {
		w.buf = append(w.buf, hdr...)
		w.buf = append(w.buf, data...)
		if deferred || w.waiting.Load() > 0 {
			return nil
		}
		return w.flushLocked(nil, nil)
	}
	return w.flushLocked(hdr, data)
}

// flush writes whatever replies are buffered.
func (w *replyWriter) flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil || len(w.buf) == 0 {
		return w.err
	}
	return w.flushLocked(nil, nil)
}

// flushLocked writes the buffered bytes, then hdr and data, in one writev.
func (w *replyWriter) flushLocked(hdr, data []byte) error {
	w.vec = w.vec[:0]
	for _, b := range [][]byte{w.buf, hdr, data} {
		if len(b) > 0 {
			w.vec = append(w.vec, b)
		}
	}
	w.c.writeSince.Store(w.c.s.now())
	v := w.vec // WriteTo consumes the slice header it is called on
	_, err := v.WriteTo(w.c.nc)
	w.c.writeSince.Store(0)
	w.buf = w.buf[:0]
	clear(w.vec[:cap(w.vec)])
	if err != nil {
		w.err = err
		// The client can no longer be answered: stop reading from it too.
		w.c.nc.Close()
	}
	return err
}

// session is the state of one connection's transmission phase.
type session struct {
	c          *conn
	ex         *export
	rw         *replyWriter
	slots      chan struct{} // one per request in flight at a worker
	connBudget *budget
	jobs       chan job
	workers    int // started; only the reader changes it
	wg         sync.WaitGroup
	// slow is the slowness average of inline-class requests (1/1024
	// units); the reader and the workers update it.
	slow  atomic.Int32
	probe int
	// inline and dispatched count the requests served each way, for the
	// log line at the end of the connection.
	inline, dispatched int64
	// payload is the write payload serveWriteFrom streams into the engine
	// (reader only).
	payload payloadReader
}

// payloadReader reads a write's payload from the connection for
// Object.WriteFrom, counting what it read and keeping the connection's
// error apart from the engine's.
type payloadReader struct {
	r   io.Reader
	n   int64
	err error
}

func (p *payloadReader) Read(b []byte) (int, error) {
	k, err := p.r.Read(b)
	p.n += int64(k)
	if err != nil {
		p.err = err
	}
	return k, err
}

// writeFromMin: writes at least this long (without FUA) go from the socket
// straight into the engine's cache pages (Object.WriteFrom), served on the
// reader: copying them into a buffer first was 40 % of the daemon's CPU
// on 1 MiB writes.
//
// Once the cache had turned over, a write's frames were seldom consecutive
// in the arena (runs of about two frames: the free list is a stack), so
// WriteFrom read short runs, which the bufio.Reader copied out of its
// buffer: 22 % of the daemon's CPU in memmove on 1 MiB writes. Tried and
// not kept: readv(2) on the socket straight into the frames. memmove went,
// a third of the read calls too, but the kernel's copy into 4 KiB iovecs
// cost as much more system time (201-209 against 194-219 CPU ticks per
// 8 GiB written). What fixed it is on the engine's side: a write takes its
// free frames in one batch, sorted (cache.AllocRun), so they form spans
// that are read with one call each.
const writeFromMin = 64 << 10

// job is a request handed to a worker with what it holds.
type job struct {
	r           request
	buf         *[]byte
	held, gheld int64
}

// transmit serves requests for ex until the client disconnects. It
// returns nil after NBD_CMD_DISC or a server shutdown, an error when the
// connection ended otherwise, and how many requests the reader served
// itself and how many went to workers. Every request it started has finished, and
// its reply has been written (or failed), when it returns.
func (c *conn) transmit(ex *export) (inline, dispatched int64, err error) {
	se := &session{
		c:          c,
		ex:         ex,
		rw:         &replyWriter{c: c, buf: make([]byte, 0, replyBuf)},
		slots:      make(chan struct{}, c.s.cfg.ConnRequests),
		connBudget: newBudget(c.s.cfg.ConnBytes),
		jobs:       make(chan job, c.s.cfg.ConnRequests),
	}
	err = se.serve()
	if errors.Is(err, errStopping) {
		err = nil // a shutdown, as documented above
	}
	close(se.jobs)
	se.wg.Wait()
	se.rw.flush()
	return se.inline, se.dispatched, err
}

// serve is the reader's loop.
func (se *session) serve() error {
	c, s, rw := se.c, se.c.s, se.rw
	var hdr [requestBytes]byte
	for {
		if c.br.Buffered() < requestBytes {
			// About to wait for the client: answer what we can first.
			rw.flush()
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			switch {
			case c.isStopping():
				return nil
			case errors.Is(err, io.EOF):
				return errNoDisc
			}
			return fmt.Errorf("read request: %w", err)
		}
		var r request
		if err := r.decode(hdr[:]); err != nil {
			return fmt.Errorf("request magic %#x: %w (hard disconnect)", binary.BigEndian.Uint32(hdr[0:4]), err)
		}
		if r.typ == cmdDisc {
			return nil
		}
		if r.typ == cmdWrite && r.length > maxPayload {
			return fmt.Errorf("write of %d bytes exceeds the %d-byte limit (hard disconnect: its payload is not read)", r.length, maxPayload)
		}
		if errno, why := c.check(se.ex, &r); errno != 0 {
			if r.typ == cmdWrite {
				if err := se.discard(int64(r.length)); err != nil {
					return fmt.Errorf("discard payload of a refused write: %w", err)
				}
			}
			se.ex.m.op(r.typ).fail(time.Now())
			s.log.Debug("request refused", "conn", c.id, "cmd", cmdName(r.typ), "offset", r.offset, "length", r.length, "errno", errno, "why", why)
			c.replyError(rw, &r, errno, why, c.br.Buffered() >= requestBytes)
			continue
		}
		if r.typ == cmdWrite && r.length >= writeFromMin && r.flags&cflagFUA == 0 {
			se.inline++
			if err := se.serveWriteFrom(r); err != nil {
				return err
			}
			continue
		}
		if inlineClass(&r) {
			inline := se.slow.Load() < slowLimit
			if !inline {
				se.probe++
				inline = se.probe%probeEvery == 0
			}
			if inline {
				se.inline++
				if err := se.serveInline(r); err != nil {
					return err
				}
				continue
			}
		}
		se.dispatched++
		if err := se.dispatch(r); err != nil {
			return err
		}
	}
}

// inlineClass: small reads and writes without FUA, the requests that are
// usually served from the cache in a few microseconds.
func inlineClass(r *request) bool {
	return (r.typ == cmdRead || r.typ == cmdWrite) && r.length <= maxInline && r.flags&cflagFUA == 0
}

// serveInline serves r on the reader. Its buffer is not counted in the
// budgets: one at a time per connection, at most maxInline bytes.
func (se *session) serveInline(r request) error {
	buf := getBuf(int(r.length))
	defer putBuf(buf)
	if r.typ == cmdWrite {
		if err := se.readPayload(*buf); err != nil {
			if se.c.isStopping() {
				return errStopping
			}
			return fmt.Errorf("client disconnected in the payload of a %d-byte write: %w", r.length, err)
		}
	}
	se.do(r, buf, true)
	return nil
}

// serveWriteFrom serves a write on the reader, its payload going from the
// socket into the engine (see writeFromMin).
func (se *session) serveWriteFrom(r request) error {
	c := se.c
	se.payload = payloadReader{r: c.br}
	if c.br.Buffered() < int(r.length) {
		// About to wait for the client: answer what we can first.
		se.rw.flush()
		c.readSince.Store(c.s.now())
	}
	se.do(r, nil, true)
	c.readSince.Store(0)
	p := &se.payload
	switch {
	case p.err != nil && p.n < int64(r.length):
		if c.isStopping() {
			return errStopping
		}
		return fmt.Errorf("client disconnected in the payload of a %d-byte write: %w", r.length, p.err)
	case p.n < int64(r.length):
		// The engine refused the write before reading all of it.
		if err := se.discard(int64(r.length) - p.n); err != nil {
			return fmt.Errorf("discard payload of a refused write: %w", err)
		}
	}
	return nil
}

// dispatch hands r to a worker, first taking a request slot and the
// budget its buffer needs (waiting for them if need be).
func (se *session) dispatch(r request) error {
	c, s := se.c, se.c.s
	need := int64(0)
	switch r.typ {
	case cmdRead, cmdWrite:
		need = int64(r.length)
	case cmdCache:
		need = min(int64(r.length), chunkBytesIO)
	}
	select {
	case se.slots <- struct{}{}:
	default:
		se.rw.flush()
		se.slots <- struct{}{}
	}
	if se.connBudget.inUse()+need > se.connBudget.size || s.budget.inUse()+need > s.budget.size {
		se.rw.flush()
	}
	held, _ := se.connBudget.acquire(need, nil)
	gheld, ok := s.budget.acquire(need, s.stop)
	if !ok {
		// Shutting down: this request is not served (it was never
		// acknowledged, so nothing is lost), and the reader stops here
		// (see errStopping).
		se.connBudget.release(held)
		<-se.slots
		return errStopping
	}
	var buf *[]byte
	if need > 0 {
		buf = getBuf(int(need))
	}
	if r.typ == cmdWrite {
		if err := se.readPayload(*buf); err != nil {
			putBuf(buf)
			s.budget.release(gheld)
			se.connBudget.release(held)
			<-se.slots
			if c.isStopping() {
				return errStopping
			}
			return fmt.Errorf("client disconnected in the payload of a %d-byte write: %w", r.length, err)
		}
	}
	if len(se.slots) > se.workers {
		// Every request in flight has a worker: none waits behind a
		// slow one.
		se.workers++
		se.wg.Add(1)
		go se.worker()
	}
	se.jobs <- job{r: r, buf: buf, held: held, gheld: gheld}
	return nil
}

// worker serves jobs until the session ends.
func (se *session) worker() {
	defer se.wg.Done()
	for j := range se.jobs {
		se.do(j.r, j.buf, false)
		if j.buf != nil {
			putBuf(j.buf)
		}
		se.c.s.budget.release(j.gheld)
		se.connBudget.release(j.held)
		<-se.slots
	}
}

// readPayload reads a write's payload. If it is not all buffered yet the
// reader will wait for the client, so pending replies go out first, and
// the watchdog times the wait.
func (se *session) readPayload(p []byte) error {
	c := se.c
	if c.br.Buffered() >= len(p) {
		_, err := io.ReadFull(c.br, p)
		return err
	}
	se.rw.flush()
	c.readSince.Store(c.s.now())
	_, err := io.ReadFull(c.br, p)
	c.readSince.Store(0)
	return err
}

// observe folds one inline-class request's engine time into the slowness
// average. Concurrent updates may lose one another; it is a heuristic.
func (se *session) observe(d time.Duration) {
	x := int32(0)
	if d > slowOp {
		x = 1024
	}
	old := se.slow.Load()
	se.slow.Store(old + (x-old)/slowWeight)
}

// discard skips the payload of a refused write.
func (se *session) discard(n int64) error {
	c := se.c
	if int64(c.br.Buffered()) < n {
		se.rw.flush()
	}
	c.readSince.Store(c.s.now())
	_, err := io.CopyN(io.Discard, c.br, n)
	c.readSince.Store(0)
	return err
}

// check validates a request against the export: command, flags, range.
// It returns 0 or the error to answer, with a message.
func (c *conn) check(ex *export, r *request) (uint32, string) {
	allowed := cflagFUA // valid on every command once SEND_FUA is offered
	switch r.typ {
	case cmdRead:
		if c.structured {
			allowed |= cflagDF
		}
	case cmdWriteZeroes:
		allowed |= cflagNoHole | cflagFastZero
	case cmdBlockStatus:
		allowed |= cflagReqOne
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
	default:
		return errInval, fmt.Sprintf("unknown command %d", r.typ)
	}
	if r.flags&^allowed != 0 {
		return errInval, fmt.Sprintf("flags %#x not valid for %s", r.flags&^allowed, cmdName(r.typ))
	}
	writes := r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes
	if writes && ex.flags&tflagReadOnly != 0 {
		return errPerm, "read-only export"
	}
	switch r.typ {
	case cmdFlush:
		if r.offset != 0 || r.length != 0 {
			return errInval, "flush with a nonzero offset or length"
		}
		return 0, ""
	case cmdBlockStatus:
		if !ex.meta {
			return errInval, "block status without the base:allocation context negotiated"
		}
	case cmdRead:
		if r.length > maxPayload {
			// With structured replies EOVERFLOW tells the client to
			// retry in smaller reads (the protocol's advice).
			errno := errInval
			if c.structured {
				errno = errOverflow
			}
			return errno, fmt.Sprintf("read of %d bytes exceeds the %d-byte limit", r.length, maxPayload)
		}
	}
	if r.length == 0 {
		return errInval, "zero-length request"
	}
	if r.offset > ex.size || uint64(r.length) > ex.size-r.offset {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc, fmt.Sprintf("%d bytes at %d end past the export's size %d", r.length, r.offset, ex.size)
		}
		return errInval, fmt.Sprintf("%d bytes at %d end past the export's size %d", r.length, r.offset, ex.size)
	}
	return 0, ""
}

// do runs one validated request and answers it. onReader is set when the
// reader serves it inline.
func (se *session) do(r request, buf *[]byte, onReader bool) {
	c, ex, rw := se.c, se.ex, se.rw
	start := time.Now()
	om := ex.m.op(r.typ)
	obj, off, n := ex.obj, int64(r.offset), int64(r.length)
	var err error
	switch r.typ {
	case cmdRead:
		p := (*buf)[:n]
		var got int
		got, err = obj.ReadAt(p, off)
		if err == nil && got != len(p) || errors.Is(err, io.EOF) {
			// The export's size is fixed while it is served: a short
			// read means the object changed under us.
			err = fmt.Errorf("read %d bytes at %d: got %d: %w", n, off, got, io.ErrUnexpectedEOF)
		}
	case cmdWrite:
		var wrote int
		if buf == nil {
			// serveWriteFrom: the payload is still in the socket.
			var k int64
			k, err = obj.WriteFrom(&se.payload, off, n)
			wrote = int(k)
		} else {
			wrote, err = obj.WriteAt((*buf)[:n], off)
		}
		if err == nil && int64(wrote) != n {
			err = fmt.Errorf("wrote %d of %d bytes: %w", wrote, n, io.ErrShortWrite)
		}
		if err == nil && r.flags&cflagFUA != 0 {
			err = obj.Sync()
		}
	case cmdFlush:
		err = obj.Sync()
	case cmdTrim:
		err = obj.PunchHole(off, n)
		if err == nil && r.flags&cflagFUA != 0 {
			err = obj.Sync()
		}
	case cmdWriteZeroes:
		err = writeZeroes(obj, &r)
	case cmdCache:
		err = prefetch(obj, off, n, *buf)
	case cmdBlockStatus:
		om.done(n, start)
		c.replyBlockStatus(rw, ex, &r)
		return
	default:
		panic(fmt.Sprintf("rawblockd: unvalidated command %d reached do", r.typ))
	}
	if buf == nil && r.typ == cmdWrite && se.payload.err != nil && se.payload.n < n {
		// The client went away in the payload: no answer, the reader
		// drops the connection.
		return
	}
	if inlineClass(&r) {
		se.observe(time.Since(start))
	}
	// Only the reader may look at its input buffer.
	deferred := onReader && c.br.Buffered() >= requestBytes
	if err != nil {
		om.fail(start)
		errno := errnoOf(err)
		level := slog.LevelWarn
		if errno == errNoSpc || errno == errShutdown {
			level = slog.LevelInfo
		}
		c.s.log.Log(context.Background(), level, "request failed", "conn", c.id, "export", ex.name, "cmd", cmdName(r.typ), "offset", off, "length", n, "errno", errno, "err", err)
		c.replyError(rw, &r, errno, err.Error(), deferred)
		return
	}
	om.done(n, start)
	if r.typ == cmdRead {
		c.replyRead(rw, &r, (*buf)[:n], deferred)
		return
	}
	var h [simpleBytes]byte
	putSimple(h[:], 0, r.handle)
	rw.send(h[:], nil, deferred)
}

// writeZeroes: without NO_HOLE the range is punched (whole blocks freed,
// edges zeroed); with it, zeros are written, which FAST_ZERO refuses as
// not fast.
func writeZeroes(obj *engine.Object, r *request) error {
	off, n := int64(r.offset), int64(r.length)
	if r.flags&cflagNoHole == 0 {
		if err := obj.PunchHole(off, n); err != nil {
			return err
		}
	} else {
		if r.flags&cflagFastZero != 0 {
			return errFastZero
		}
		for n > 0 {
			k := min(n, chunkBytesIO)
			w, err := obj.WriteAt(zeros[:k], off)
			if err != nil {
				return err
			}
			if int64(w) != k {
				return fmt.Errorf("wrote %d of %d zero bytes: %w", w, k, io.ErrShortWrite)
			}
			off += k
			n -= k
		}
	}
	if r.flags&cflagFUA != 0 {
		return obj.Sync()
	}
	return nil
}

// errFastZero answers a FAST_ZERO request we can only do slowly.
var errFastZero = fmt.Errorf("zeroing without holes is a full write: %w", syscall.ENOTSUP)

// prefetch reads [off, off+n) into the engine's cache, buf at a time.
func prefetch(obj *engine.Object, off, n int64, buf []byte) error {
	for n > 0 {
		k := min(n, int64(len(buf)))
		if _, err := obj.ReadAt(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// errnoOf maps an engine error to the protocol's error values.
func errnoOf(err error) uint32 {
	switch {
	case errors.Is(err, engine.ErrNoSpace), errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, engine.ErrReadOnly), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM):
		return errPerm
	case errors.Is(err, engine.ErrClosed):
		return errShutdown
	case errors.Is(err, syscall.ENOTSUP):
		return errNotSup
	case errors.Is(err, fs.ErrInvalid):
		return errInval
	}
	return errIO
}

// replyRead answers a successful read with its data.
func (c *conn) replyRead(rw *replyWriter, r *request, data []byte, deferred bool) {
	if !c.structured {
		var h [simpleBytes]byte
		putSimple(h[:], 0, r.handle)
		rw.send(h[:], data, deferred)
		return
	}
	var h [chunkBytes + 8]byte
	putChunk(h[:], replyFlagDone, replyTypeOffsetData, r.handle, uint32(8+len(data)))
	binary.BigEndian.PutUint64(h[chunkBytes:], r.offset)
	rw.send(h[:], data, deferred)
}

// replyError answers r with an error: a structured error chunk with the
// message when structured replies are on, else a simple reply.
func (c *conn) replyError(rw *replyWriter, r *request, errno uint32, why string, deferred bool) {
	if errno == 0 {
		panic("rawblockd: error reply without an error")
	}
	if !c.structured {
		var h [simpleBytes]byte
		putSimple(h[:], errno, r.handle)
		rw.send(h[:], nil, deferred)
		return
	}
	if len(why) > maxErrorMessage {
		// Cut at a character boundary: the message is UTF-8.
		n := maxErrorMessage
		for n > 0 && !utf8.RuneStart(why[n]) {
			n--
		}
		why = why[:n]
	}
	h := make([]byte, chunkBytes+6, chunkBytes+6+len(why))
	putChunk(h, replyFlagDone, replyTypeError, r.handle, uint32(6+len(why)))
	binary.BigEndian.PutUint32(h[chunkBytes:], errno)
	binary.BigEndian.PutUint16(h[chunkBytes+4:], uint16(len(why)))
	h = append(h, why...)
	rw.send(h, nil, deferred)
}

// replyBlockStatus answers a base:allocation query from the object's
// extent map: a range no extent covers is a hole that reads zeros; every
// mapped range (delalloc data in the cache, unwritten space whose data
// may still be in flight, written data) is reported as data.
func (c *conn) replyBlockStatus(rw *replyWriter, ex *export, r *request) {
	start, end := r.offset, r.offset+uint64(r.length)
	limit := maxStatusDescriptors
	if r.flags&cflagReqOne != 0 {
		limit = 1
	}
	type desc struct {
		length uint64
		flags  uint32
	}
	var ds []desc
	add := func(length uint64, flags uint32) bool {
		if length == 0 {
			return true
		}
		if n := len(ds); n > 0 && ds[n-1].flags == flags {
			ds[n-1].length += length
			return true
		}
		if len(ds) == limit {
			return false
		}
		ds = append(ds, desc{length, flags})
		return true
	}
	pos := start
	// Only the extents in the range: the cost of a query follows the
	// window asked for, not the export's whole map.
	xs, err := ex.obj.ExtentsIn(int64(start), int64(end-start))
	if err != nil {
		// check() validated the range against the export's size, so this
		// is the engine closing (shutdown) or the object going away.
		c.replyError(rw, r, errnoOf(err), fmt.Sprintf("block status [%d, %d): %v", start, end, err), false)
		return
	}
	for _, x := range xs {
		xs, xe := uint64(x.Offset), uint64(x.Offset+x.Length)
		if xe <= pos {
			continue
		}
		if xs >= end {
			break
		}
		if xs > pos && !add(xs-pos, stateHole|stateZero) {
			pos = end + 1 // full
			break
		}
		pos = max(pos, xs)
		e := min(xe, end)
		if !add(e-pos, 0) {
			pos = end + 1
			break
		}
		pos = e
	}
	if pos < end {
		add(end-pos, stateHole|stateZero)
	}
	if len(ds) == 0 {
		panic("rawblockd: block status produced no descriptor")
	}
	b := make([]byte, chunkBytes+4+8*len(ds))
	putChunk(b, replyFlagDone, replyTypeBlockStatus, r.handle, uint32(4+8*len(ds)))
	binary.BigEndian.PutUint32(b[chunkBytes:], baseAllocationID)
	for i, d := range ds {
		// A descriptor's length is 32 bits; the request's length is too,
		// so a merged run never exceeds it.
		binary.BigEndian.PutUint32(b[chunkBytes+4+8*i:], uint32(d.length))
		binary.BigEndian.PutUint32(b[chunkBytes+8+8*i:], d.flags)
	}
	rw.send(b, nil, false)
}

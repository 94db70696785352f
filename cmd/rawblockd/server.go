package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rawblock/rawblock/engine"
)

// serverConfig holds the server's limits. Zero values take the defaults
// of withDefaults.
type serverConfig struct {
	// DefaultExport is served to a client that asks for the empty name
	// (the protocol's "default export"); "" = none, such a client gets
	// NBD_REP_ERR_UNKNOWN.
	DefaultExport string
	// ReadOnly exports every object read-only (the engine is open
	// read-only).
	ReadOnly bool
	// MaxClients bounds the connections open at once; more are accepted
	// and closed at once, with a log line.
	MaxClients int
	// ConnRequests bounds the requests one connection has in flight; the
	// connection stops reading requests until one completes.
	ConnRequests int
	// ConnBytes bounds the payload bytes one connection's requests in
	// flight hold (it is at least maxPayload, so any legal request fits).
	ConnBytes int64
	// Budget bounds the payload bytes held by requests in flight on all
	// connections together.
	Budget int64
	// HandshakeTimeout bounds the whole handshake.
	HandshakeTimeout time.Duration
	// IOTimeout drops a client whose request payload or reply makes no
	// progress for this long (it holds buffers and a request slot).
	IOTimeout time.Duration
}

// Defaults and the ranges the flags accept.
const (
	defaultMaxClients   = 256
	maxMaxClients       = 65536
	defaultConnRequests = 32
	maxConnRequests     = 1024
	defaultConnBytes    = 2 * maxPayload
	defaultBudget       = 256 << 20
	defaultHandshake    = 30 * time.Second
	defaultIOTimeout    = 60 * time.Second
)

func (c serverConfig) withDefaults() (serverConfig, error) {
	if c.MaxClients == 0 {
		c.MaxClients = defaultMaxClients
	}
	if c.ConnRequests == 0 {
		c.ConnRequests = defaultConnRequests
	}
	if c.ConnBytes == 0 {
		c.ConnBytes = defaultConnBytes
	}
	if c.Budget == 0 {
		c.Budget = defaultBudget
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = defaultHandshake
	}
	if c.IOTimeout == 0 {
		c.IOTimeout = defaultIOTimeout
	}
	switch {
	case c.MaxClients < 1 || c.MaxClients > maxMaxClients:
		return c, fmt.Errorf("max clients %d: want 1..%d", c.MaxClients, maxMaxClients)
	case c.ConnRequests < 1 || c.ConnRequests > maxConnRequests:
		return c, fmt.Errorf("requests in flight per connection %d: want 1..%d", c.ConnRequests, maxConnRequests)
	case c.ConnBytes < maxPayload:
		return c, fmt.Errorf("bytes in flight per connection %d: want at least %d (the largest request)", c.ConnBytes, maxPayload)
	case c.Budget < maxPayload:
		return c, fmt.Errorf("bytes in flight %d: want at least %d (the largest request)", c.Budget, maxPayload)
	case c.HandshakeTimeout < 0 || c.IOTimeout < 0:
		return c, fmt.Errorf("timeouts must not be negative")
	}
	return c, nil
}

// server serves the engine's objects as NBD exports.
type server struct {
	eng    *engine.Engine
	cfg    serverConfig
	log    *slog.Logger
	m      *metrics
	budget *budget
	epoch  time.Time // base of the connections' progress stamps

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   bool
	stop      chan struct{} // closed when shutdown begins
	wg        sync.WaitGroup
	watchdog  sync.Once
}

// newServer makes a server for eng. m may be nil (no metrics).
func newServer(eng *engine.Engine, cfg serverConfig, log *slog.Logger, m *metrics) (*server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if m == nil {
		m = newMetrics(nil)
	}
	return &server{
		eng:       eng,
		cfg:       cfg,
		log:       log,
		m:         m,
		budget:    newBudget(cfg.Budget),
		epoch:     time.Now(),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		stop:      make(chan struct{}),
	}, nil
}

// errServerClosed is returned by serve after shutdown began.
var errServerClosed = errors.New("rawblockd: server closed")

// serve accepts connections on l until shutdown (then it returns nil) or
// a permanent accept error. It closes l.
func (s *server) serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return errServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	s.watchdog.Do(func() { go s.watch() })
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of file descriptors or a transient error: back
				// off instead of spinning.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "delay", delay)
				select {
				case <-time.After(delay):
				case <-s.stop:
				}
				continue
			}
			return fmt.Errorf("accept on %s: %w", l.Addr(), err)
		}
		delay = 0
		s.accept(nc)
	}
}

// accept starts serving nc, or closes it when the server is full or
// closing.
func (s *server) accept(nc net.Conn) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	if len(s.conns) >= s.cfg.MaxClients {
		s.mu.Unlock()
		s.m.refused.Inc()
		s.log.Warn("too many clients; connection closed", "remote", nc.RemoteAddr().String(), "max", s.cfg.MaxClients)
		nc.Close()
		return
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.m.connections.Inc()
	s.m.connectionsTotal.Inc()
	go func() {
		defer s.wg.Done()
		defer func() {
			s.m.connections.Dec()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
		c.run()
	}()
}

// activeConns reports the connections being served.
func (s *server) activeConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// shutdown stops accepting, lets every connection finish the requests it
// has already read (new requests are not read), and waits for them. When
// ctx ends first, the remaining connections are closed hard and shutdown
// still waits for their engine calls to return, so the engine can be
// closed safely afterwards. It does not close the engine.
func (s *server) shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.closing {
		s.closing = true
		close(s.stop)
	}
	for l := range s.listeners {
		l.Close()
	}
	for c := range s.conns {
		c.interrupt()
	}
	s.mu.Unlock()

	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	n := len(s.conns)
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
	s.log.Warn("shutdown timeout: closed connections with requests still in flight", "connections", n)
	<-done
	return fmt.Errorf("shutdown: %d connections closed before their requests finished: %w", n, ctx.Err())
}

// watch drops connections whose payload read or reply write has made no
// progress for IOTimeout: such a client holds buffers, a request slot and
// budget that other clients need.
func (s *server) watch() {
	period := max(s.cfg.IOTimeout/4, 10*time.Millisecond)
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		now := s.now()
		limit := int64(s.cfg.IOTimeout)
		s.mu.Lock()
		for c := range s.conns {
			r, w := c.readSince.Load(), c.writeSince.Load()
			if r != 0 && now-r > limit || w != 0 && now-w > limit {
				s.m.timeouts.Inc()
				s.log.Warn("client made no progress; dropped", "conn", c.id, "remote", c.remote, "timeout", s.cfg.IOTimeout)
				c.nc.Close()
			}
		}
		s.mu.Unlock()
	}
}

// now is a monotonic clock in nanoseconds since the server started, never 0.
func (s *server) now() int64 { return int64(time.Since(s.epoch)) + 1 }

var connIDs atomic.Uint64

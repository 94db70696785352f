// Command rawblockd is rawblock's reference storage daemon: it embeds the
// engine and serves each object as a Network Block Device export, so that
// the kernel, QEMU, fio and libnbd use rawblock unchanged.
//
//	rawblockd --device PATH [--format] [--listen 127.0.0.1:10809 | --socket PATH]
//	          [--cache 1G] [--metrics 127.0.0.1:9100] [--export NAME=SIZE ...]
//	rawblockd create --device PATH NAME SIZE
//	rawblockd list --device PATH
//	rawblockd remove --device PATH NAME
//
// The NBD protocol (fixed-newstyle handshake, simple and structured
// replies, base:allocation block status) is implemented in this package.
package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/rawblock/rawblock/internal/bytesize"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/alecthomas/kong"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rawblock/rawblock/engine"
)

// cli is the command line.
type cli struct {
	Serve  serveCmd  `cmd:"" default:"withargs" help:"Serve the device's objects over NBD (what rawblockd does without a command)."`
	Create createCmd `cmd:"" help:"Create an object (an export) of a given size. The daemon must not be running on the device."`
	List   listCmd   `cmd:"" help:"List the objects (exports) and their sizes."`
	Remove removeCmd `cmd:"" help:"Remove an object. The daemon must not be running on the device."`
}

// deviceFlags open the engine; every command has them.
type deviceFlags struct {
	Device     string   `required:"" placeholder:"PATH" help:"Block device or regular file holding the objects."`
	Format     bool     `help:"Format the device first (destroys everything on it)."`
	Size       byteSize `placeholder:"SIZE" help:"Create or grow a regular file to SIZE (e.g. 4G) before opening it."`
	Cache      byteSize `default:"1G" placeholder:"SIZE" help:"Engine page cache size."`
	DirtyLimit byteSize `placeholder:"SIZE" help:"Dirty bytes at which writers wait for writeback (default: half the cache)."`
}

// openEngine opens (and with --format, formats) the device and the
// engine. The returned close function closes both.
func (d *deviceFlags) openEngine(readOnly bool) (*engine.Engine, func() error, error) {
	if d.Format && readOnly {
		return nil, nil, fmt.Errorf("--format with --read-only: %w", fs.ErrInvalid)
	}
	dev, err := engine.OpenDevice(d.Device, engine.DeviceOptions{CreateSize: int64(d.Size), ReadOnly: readOnly})
	if err != nil {
		return nil, nil, err
	}
	if d.Format {
		if err := engine.Format(dev, engine.FormatOptions{}); err != nil {
			dev.Close()
			return nil, nil, fmt.Errorf("format %s: %w", d.Device, err)
		}
	}
	eng, err := engine.Open(dev, engine.Options{CacheSize: int64(d.Cache), DirtyLimit: int64(d.DirtyLimit), ReadOnly: readOnly})
	if err != nil {
		dev.Close()
		if errors.Is(err, engine.ErrCorrupt) && !d.Format {
			return nil, nil, fmt.Errorf("open %s: %w (a new device needs --format)", d.Device, err)
		}
		return nil, nil, fmt.Errorf("open %s: %w", d.Device, err)
	}
	closeFn := func() error {
		err := eng.Close()
		if cerr := dev.Close(); err == nil {
			err = cerr
		}
		return err
	}
	return eng, closeFn, nil
}

// appEnv is what every command's Run receives.
type appEnv struct {
	ctx    context.Context
	stdout io.Writer
	stderr io.Writer
	// ready, when set, receives the server's listeners once they accept
	// (tests use it to find the addresses).
	ready func([]net.Listener)
}

type serveCmd struct {
	deviceFlags
	Listen          string        `placeholder:"HOST:PORT" help:"TCP address to serve on (default 127.0.0.1:10809 unless --socket is given)."`
	Socket          string        `placeholder:"PATH" help:"Unix socket to serve on."`
	Metrics         string        `placeholder:"HOST:PORT" help:"Serve Prometheus metrics at http://HOST:PORT/metrics."`
	Pprof           bool          `help:"Also serve Go's profiler at /debug/pprof/ on the --metrics address."`
	ReadOnly        bool          `help:"Open the engine read-only and export every object read-only."`
	Export          []string      `placeholder:"NAME=SIZE" help:"Create export NAME of SIZE at start if it does not exist (an existing one must have that size). Repeatable."`
	DefaultExport   string        `placeholder:"NAME" help:"Export served to clients that ask for the empty (default) name."`
	MaxClients      int           `default:"256" help:"Connections served at once; more are closed."`
	ConnRequests    int           `default:"32" help:"Requests one connection may have in flight."`
	MaxInflight     byteSize      `default:"256M" placeholder:"SIZE" help:"Payload bytes all requests in flight may hold together."`
	IOTimeout       time.Duration `default:"60s" help:"Drop a client whose payload or reply makes no progress for this long."`
	ShutdownTimeout time.Duration `default:"30s" help:"On SIGTERM/SIGINT, how long to wait for requests in flight before closing connections."`
	LogLevel        string        `default:"info" enum:"debug,info,warn,error" help:"Log level (debug, info, warn, error)."`
	LogFormat       string        `default:"text" enum:"text,json" help:"Log format (text, json)."`
}

// Run serves until ctx ends, then shuts down: stop accepting, finish the
// requests in flight, close the engine.
func (c *serveCmd) Run(env *appEnv) error {
	log := newLogger(env.stderr, c.LogLevel, c.LogFormat)
	exports, err := parseExports(c.Export)
	if err != nil {
		return err
	}
	if c.ReadOnly && len(exports) > 0 {
		return fmt.Errorf("--export with --read-only: cannot create exports read-only: %w", fs.ErrInvalid)
	}
	if c.MaxClients < 1 || c.ConnRequests < 1 || c.MaxInflight < 1 || c.IOTimeout <= 0 {
		return fmt.Errorf("--max-clients, --conn-requests, --max-inflight and --io-timeout must be positive: %w", fs.ErrInvalid)
	}
	if c.Pprof && c.Metrics == "" {
		return fmt.Errorf("--pprof needs --metrics (it serves on that address): %w", fs.ErrInvalid)
	}
	if c.ShutdownTimeout <= 0 {
		return fmt.Errorf("--shutdown-timeout %v: want > 0: %w", c.ShutdownTimeout, fs.ErrInvalid)
	}
	eng, closeEngine, err := c.openEngine(c.ReadOnly)
	if err != nil {
		return err
	}
	closed := false
	defer func() {
		if !closed {
			closeEngine()
		}
	}()
	for _, ex := range exports {
		if err := ensureExport(eng, ex.name, ex.size); err != nil {
			return err
		}
	}
	if c.DefaultExport != "" {
		if _, err := eng.Object(c.DefaultExport); err != nil {
			return fmt.Errorf("--default-export: %w", err)
		}
	}
	m := newMetrics(eng)
	srv, err := newServer(eng, serverConfig{
		DefaultExport: c.DefaultExport,
		ReadOnly:      c.ReadOnly,
		MaxClients:    c.MaxClients,
		ConnRequests:  c.ConnRequests,
		Budget:        int64(c.MaxInflight),
		IOTimeout:     c.IOTimeout,
	}, log, m)
	if err != nil {
		return err
	}

	var listeners []net.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	if c.Listen == "" && c.Socket == "" {
		c.Listen = "127.0.0.1:10809"
	}
	if c.Listen != "" {
		l, err := net.Listen("tcp", c.Listen)
		if err != nil {
			return err
		}
		if tl, ok := l.(*net.TCPListener); ok {
			l = noDelayListener{tl}
		}
		listeners = append(listeners, l)
	}
	if c.Socket != "" {
		l, err := listenUnix(c.Socket)
		if err != nil {
			closeAll()
			return err
		}
		listeners = append(listeners, l)
	}
	var metricsSrv *http.Server
	if c.Metrics != "" {
		ml, err := net.Listen("tcp", c.Metrics)
		if err != nil {
			closeAll()
			return fmt.Errorf("--metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
		if c.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		}
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go metricsSrv.Serve(ml)
		log.Info("metrics", "url", "http://"+ml.Addr().String()+"/metrics")
	}

	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		log.Info("serving", "addr", l.Addr().String(), "network", l.Addr().Network(), "exports", len(eng.Objects()), "device", c.Device)
		go func() { errc <- srv.serve(l) }()
	}
	if env.ready != nil {
		env.ready(listeners)
	}
	var serveErr error
	select {
	case <-env.ctx.Done():
		log.Info("shutting down: finishing requests in flight")
	case serveErr = <-errc:
		log.Error("serving failed; shutting down", "err", serveErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
	defer cancel()
	shutErr := srv.shutdown(ctx)
	if metricsSrv != nil {
		metricsSrv.Shutdown(ctx)
	}
	closed = true
	if err := closeEngine(); err != nil {
		log.Error("closing the engine failed", "err", err)
		return errors.Join(serveErr, shutErr, err)
	}
	log.Info("engine closed; bye")
	return errors.Join(serveErr, shutErr)
}

// noDelayListener sets TCP_NODELAY (Go's default, made explicit) and
// keepalives on accepted connections, so a vanished client is noticed.
type noDelayListener struct{ *net.TCPListener }

func (l noDelayListener) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	c.SetNoDelay(true)
	c.SetKeepAlivePeriod(30 * time.Second)
	c.SetKeepAlive(true)
	return c, nil
}

// listenUnix listens on a Unix socket, replacing a stale socket file that
// nobody listens on (left by a killed daemon), but never another file.
func listenUnix(path string) (net.Listener, error) {
	l, err := net.Listen("unix", path)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		return l, err
	}
	st, serr := os.Lstat(path)
	if serr != nil || st.Mode().Type() != fs.ModeSocket {
		return nil, err
	}
	if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
		c.Close()
		return nil, fmt.Errorf("%s: another server is listening there: %w", path, err)
	}
	if rerr := os.Remove(path); rerr != nil {
		return nil, fmt.Errorf("%w (removing the stale socket: %v)", err, rerr)
	}
	return net.Listen("unix", path)
}

func newLogger(w io.Writer, level, format string) *slog.Logger {
	var lv slog.Level
	switch level {
	case "debug":
		lv = slog.LevelDebug
	case "warn":
		lv = slog.LevelWarn
	case "error":
		lv = slog.LevelError
	default:
		lv = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

type exportSpec struct {
	name string
	size int64
}

// parseExports parses NAME=SIZE flags.
func parseExports(specs []string) ([]exportSpec, error) {
	var out []exportSpec
	seen := map[string]bool{}
	for _, s := range specs {
		i := strings.LastIndexByte(s, '=')
		if i <= 0 {
			return nil, fmt.Errorf("--export %q: want NAME=SIZE: %w", s, fs.ErrInvalid)
		}
		name := s[:i]
		if !utf8.ValidString(name) {
			return nil, fmt.Errorf("--export %q: the name is not UTF-8: %w", s, fs.ErrInvalid)
		}
		size, err := parseSize(s[i+1:])
		if err != nil {
			return nil, fmt.Errorf("--export %q: %w", s, err)
		}
		if seen[name] {
			return nil, fmt.Errorf("--export %q: export named twice: %w", name, fs.ErrInvalid)
		}
		seen[name] = true
		out = append(out, exportSpec{name, size})
	}
	return out, nil
}

// checkExportSize validates an export size.
func checkExportSize(size int64) error {
	if size <= 0 || size > engine.MaxObjectSize {
		return fmt.Errorf("export size %d: want 1..%d: %w", size, engine.MaxObjectSize, fs.ErrInvalid)
	}
	return nil
}

// ensureExport creates export name of size, or checks that the existing
// one has that size.
func ensureExport(eng *engine.Engine, name string, size int64) error {
	if err := checkExportSize(size); err != nil {
		return fmt.Errorf("export %q: %w", name, err)
	}
	obj, err := eng.Object(name)
	if err == nil {
		if got := obj.Size(); got != size {
			return fmt.Errorf("export %q exists with size %d, not %d (remove it or use its size): %w", name, got, size, fs.ErrExist)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return createExport(eng, name, size)
}

// createExport makes a new object of size (sparse: it reads zeros) and
// makes its existence and size durable.
func createExport(eng *engine.Engine, name string, size int64) error {
	if err := checkExportSize(size); err != nil {
		return fmt.Errorf("create %q: %w", name, err)
	}
	if !utf8.ValidString(name) {
		return fmt.Errorf("create %q: an export name is UTF-8 (NBD clients send it so): %w", name, fs.ErrInvalid)
	}
	obj, err := eng.Create(name)
	if err != nil {
		return err
	}
	if err := obj.Truncate(size); err != nil {
		return errors.Join(fmt.Errorf("create %q: size %d: %w", name, size, err), eng.Remove(name))
	}
	return obj.Sync()
}

type createCmd struct {
	deviceFlags
	Name string   `arg:"" help:"Object (export) name, 1..255 bytes."`
	Sz   byteSize `arg:"" name:"size" help:"Export size, e.g. 1G."`
}

func (c *createCmd) Run(env *appEnv) error {
	eng, closeEngine, err := c.openEngine(false)
	if err != nil {
		return err
	}
	err = createExport(eng, c.Name, int64(c.Sz))
	if cerr := closeEngine(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "created %s (%d bytes)\n", c.Name, int64(c.Sz))
	return nil
}

type listCmd struct {
	deviceFlags
}

func (c *listCmd) Run(env *appEnv) error {
	eng, closeEngine, err := c.openEngine(true)
	if err != nil {
		return err
	}
	defer closeEngine()
	for _, name := range eng.Objects() {
		obj, err := eng.Object(name)
		if err != nil {
			return err
		}
		fmt.Fprintf(env.stdout, "%s\t%d\n", name, obj.Size())
	}
	return closeEngine()
}

type removeCmd struct {
	deviceFlags
	Name string `arg:"" help:"Object (export) name."`
}

func (c *removeCmd) Run(env *appEnv) error {
	eng, closeEngine, err := c.openEngine(false)
	if err != nil {
		return err
	}
	err = eng.Remove(c.Name)
	if err == nil {
		err = eng.Sync()
	}
	if cerr := closeEngine(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(env.stdout, "removed %s\n", c.Name)
	return nil
}

// byteSize and parseSize are the command line's sizes: see internal/bytesize.
type byteSize = bytesize.Size

var errBadSize = bytesize.ErrBad

func parseSize(s string) (int64, error) { return bytesize.Parse(s) }

// execute parses args and runs the chosen command.
func execute(env *appEnv, args []string, exit func(int)) error {
	var c cli
	parser, err := kong.New(&c,
		kong.Name("rawblockd"),
		kong.Description("Serve rawblock objects as Network Block Device exports."),
		kong.UsageOnError(),
		kong.Writers(env.stdout, env.stderr),
		kong.Exit(exit),
	)
	if err != nil {
		return err
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		return err
	}
	return kctx.Run(env)
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := execute(&appEnv{ctx: ctx, stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:], os.Exit)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "rawblockd:", err)
		os.Exit(1)
	}
}

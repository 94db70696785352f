package main

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "4k": 4096, "4KiB": 4096, "1M": 1 << 20, "1g": 1 << 30, "2T": 2 << 40, " 7 ": 7} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "k", "-1", "1.5G", "1X", "99999999999T"} {
		if _, err := parseSize(in); !errors.Is(err, errBadSize) {
			t.Errorf("parseSize(%q): err %v, want errBadSize", in, err)
		}
	}
}

func TestParseExports(t *testing.T) {
	got, err := parseExports([]string{"a=1M", "b=c=4k"})
	if err != nil || len(got) != 2 || got[0] != (exportSpec{"a", 1 << 20}) || got[1] != (exportSpec{"b=c", 4096}) {
		t.Fatalf("%v %v", got, err)
	}
	for _, bad := range [][]string{{"a"}, {"=1M"}, {"a=x"}, {"a=1M", "a=2M"}} {
		if _, err := parseExports(bad); err == nil {
			t.Errorf("parseExports(%q) accepted", bad)
		}
	}
}

// run runs the CLI with args and returns stdout.
func run(t *testing.T, ctx context.Context, ready func([]net.Listener), args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	env := &appEnv{ctx: ctx, stdout: &out, stderr: &errb, ready: ready}
	err := execute(env, args, func(code int) { t.Fatalf("exit %d: %s", code, errb.String()) })
	if testing.Verbose() {
		t.Logf("rawblockd %s:\n%s%s", strings.Join(args, " "), out.String(), errb.String())
	}
	return out.String(), err
}

func TestCLIAdmin(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "dev.img")
	ctx := context.Background()
	if _, err := run(t, ctx, nil, "create", "--device", dev, "--size", "64M", "--format", "--cache", "8M", "a", "1M"); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, ctx, nil, "create", "--device", dev, "--cache", "8M", "b", "3G"); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, ctx, nil, "create", "--device", dev, "--cache", "8M", "a", "1M"); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("create existing: %v", err)
	}
	if _, err := run(t, ctx, nil, "create", "--device", dev, "--cache", "8M", "c", "0"); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("create size 0: %v", err)
	}
	out, err := run(t, ctx, nil, "list", "--device", dev, "--cache", "8M")
	if err != nil || out != "a\t1048576\nb\t3221225472\n" {
		t.Fatalf("list: %q %v", out, err)
	}
	if _, err := run(t, ctx, nil, "remove", "--device", dev, "--cache", "8M", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, ctx, nil, "remove", "--device", dev, "--cache", "8M", "a"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("remove missing: %v", err)
	}
	out, _ = run(t, ctx, nil, "list", "--device", dev, "--cache", "8M")
	if out != "b\t3221225472\n" {
		t.Fatalf("list after remove: %q", out)
	}
	if _, err := run(t, ctx, nil, "list", "--device", filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("list of a missing device: %v", err)
	}
}

// serveOnce starts `rawblockd serve` on a Unix socket and returns a
// function that stops it (as SIGTERM does) and returns its error.
func serveOnce(t *testing.T, args ...string) (string, func() error) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := run(t, ctx, func([]net.Listener) { close(ready) }, append(args, "--socket", sock)...)
		done <- err
	}()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		t.Fatalf("serve: %v", err)
	}
	return sock, func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(30 * time.Second):
			t.Fatal("serve did not stop")
			return nil
		}
	}
}

func unixClient(t *testing.T, sock, name string) *testClient {
	c := dialRaw(t, "unix", sock)
	if err := c.greet(clientFixedNewstyle | clientNoZeroes); err != nil {
		t.Fatal(err)
	}
	if _, err := c.goExport(name); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCLIServeRestart(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "dev.img")
	sock, stop := serveOnce(t, "--device", dev, "--size", "64M", "--format", "--cache", "8M", "--export", "vol=4M", "--default-export", "vol")
	c := unixClient(t, sock, "vol")
	p := pattern(11, 1<<20)
	if errno := c.write(4096, p, 0); errno != 0 {
		t.Fatalf("write errno %d", errno)
	}
	// No flush: the graceful stop (Engine.Close) makes it durable.
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	c.expectClosed()

	// The same export again; --export with another size is refused.
	if _, err := run(t, context.Background(), nil, "--device", dev, "--cache", "8M", "--export", "vol=8M", "--socket", filepath.Join(t.TempDir(), "x")); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("--export with another size: %v", err)
	}
	sock, stop = serveOnce(t, "--device", dev, "--cache", "8M", "--export", "vol=4M")
	c = unixClient(t, sock, "vol")
	if d, errno := c.read(4096, 1<<20); errno != 0 || !bytes.Equal(d, p) {
		t.Fatal("data lost across a restart")
	}
	c.disc()
	// A stale socket file left by a killed daemon does not block a
	// restart, and the listener's socket is removed on exit.
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := listenUnixStale(sock); err != nil {
		t.Fatal(err)
	}
}

func listenUnixStale(path string) (net.Listener, error) {
	l, err := listenUnix(path)
	if err != nil {
		return nil, err
	}
	return l, l.Close()
}

func TestCLIServeErrors(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "dev.img")
	ctx := context.Background()
	if _, err := run(t, ctx, nil, "--device", dev, "--size", "64M", "--socket", filepath.Join(t.TempDir(), "s")); err == nil {
		t.Fatal("serving an unformatted device succeeded")
	}
	if _, err := run(t, ctx, nil, "--device", dev, "--format", "--read-only"); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("--format --read-only: %v", err)
	}
	if _, err := run(t, ctx, nil, "--device", dev, "--format", "--cache", "8M", "--default-export", "nope", "--socket", filepath.Join(t.TempDir(), "s")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("--default-export of a missing export: %v", err)
	}
	if _, err := run(t, ctx, nil, "--device", dev, "--cache", "8M", "--conn-requests", "0", "--socket", filepath.Join(t.TempDir(), "s")); err == nil {
		t.Fatal("--conn-requests 0 accepted")
	}
	// A second daemon on the same device is refused (the engine's lock).
	_, stop := serveOnce(t, "--device", dev, "--cache", "8M")
	defer stop()
	if _, err := run(t, ctx, nil, "--device", dev, "--cache", "8M", "--socket", filepath.Join(t.TempDir(), "s")); err == nil {
		t.Fatal("second daemon on the same device started")
	}
}

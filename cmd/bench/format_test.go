package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

// bench format writes a layout that fsck passes and the engine opens, with
// the block size asked for; a bad block size is an error that leaves the
// device as it was.
func TestFormatCommand(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 64<<20); err != nil {
		t.Fatal(err)
	}
	out, err := bench(t, "format", path, "--block-size", "8k")
	if err != nil || !strings.Contains(out, "of 8192 bytes") {
		t.Fatalf("format: %v\n%s", err, out)
	}
	if out, err := bench(t, "fsck", path); err != nil {
		t.Fatalf("fsck after format: %v\n%s", err, out)
	}
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bench(t, "format", path, "--block-size", "3k"); !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("format --block-size 3k: %v, want fs.ErrInvalid", err)
	}
	after, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(before) != string(after) {
		t.Fatal("a refused format changed the device")
	}
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	e, err := engine.Open(dev, engine.Options{CacheSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
}

package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

// formattedDevice creates a 32 MiB file device in a test directory, formats
// it, and stores objects; it returns the path and each object's extent map
// (written extents only, as Check reports them).
func formattedDevice(t *testing.T, objects map[string][]byte) (string, map[string][]engine.Extent) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev.img")
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{CreateSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := dev.Close(); err != nil {
			t.Fatal(err)
		}
	}()
	if err := engine.Format(dev, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	e, err := engine.Open(dev, engine.Options{CacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	maps := map[string][]engine.Extent{}
	var objs []*engine.Object
	for name, data := range objects {
		o, err := e.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		// Two writes with a gap give a map of more than one extent.
		if _, err := o.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := o.WriteAt(data, int64(len(data))+1<<20); err != nil {
			t.Fatal(err)
		}
		objs = append(objs, o)
	}
	if err := e.Sync(); err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		for _, x := range o.Extents() {
			if x.State != engine.Written {
				t.Fatalf("object %q: extent %+v not written after Sync", o.Name(), x)
			}
		}
		maps[o.Name()] = o.Extents()
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	return path, maps
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// corruptAt overwrites n bytes of path at off with 0xA5.
func corruptAt(t *testing.T, path string, off int64, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xA5}, n), off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func testObjects() map[string][]byte {
	return map[string][]byte{
		"zeta":  bytes.Repeat([]byte("z"), 12288),
		"alpha": bytes.Repeat([]byte("a"), 4096),
		"mid":   bytes.Repeat([]byte("m"), 100),
	}
}

func TestFsckClean(t *testing.T) {
	path, _ := formattedDevice(t, testObjects())
	sum := fileSum(t, path)
	out, err := bench(t, "fsck", path)
	if err != nil {
		t.Fatalf("fsck of a clean device: %v\n%s", err, out)
	}
	for _, want := range []string{"clean", "objects     3, 6 extents", "checkpoint  slot", "journal", "problems    none"} {
		if !strings.Contains(out, want) {
			t.Errorf("fsck output lacks %q:\n%s", want, out)
		}
	}
	out, err = bench(t, "fsck", path, "--json")
	if err != nil {
		t.Fatal(err)
	}
	m := decodeOne(t, out)
	if m["clean"] != true || num(t, m, "objects") != 3 || num(t, m, "extents") != 6 {
		t.Errorf("fsck --json: clean/objects/extents = %v/%v/%v, want true/3/6", m["clean"], m["objects"], m["extents"])
	}
	// 12288 + 12288 + 4096 + 4096 + 4096 + 4096 bytes, rounded up to blocks.
	if used := num(t, m, "used_blocks"); used != 10 {
		t.Errorf("used_blocks = %v, want 10", used)
	}
	if p, ok := m["problems"].([]any); !ok || len(p) != 0 {
		t.Errorf("problems = %v, want []", m["problems"])
	}
	if fileSum(t, path) != sum {
		t.Error("fsck changed the device")
	}
}

func TestFsckCorruptSuperblock(t *testing.T) {
	path, _ := formattedDevice(t, testObjects())
	corruptAt(t, path, 4096+16, 8) // superblock B, past its magic
	sum := fileSum(t, path)
	out, err := bench(t, "fsck", path)
	if err == nil {
		t.Fatalf("fsck of a device with a bad superblock copy succeeded:\n%s", out)
	}
	if !errors.Is(err, engine.ErrCorrupt) || !errors.Is(err, errProblems) {
		t.Errorf("error %v does not wrap engine.ErrCorrupt and errProblems", err)
	}
	for _, want := range []string{"1 problems", "superblock B", "1. superblock B"} {
		if !strings.Contains(out, want) {
			t.Errorf("fsck output lacks %q:\n%s", want, out)
		}
	}
	out, err = bench(t, "fsck", path, "--json")
	if err == nil {
		t.Fatal("fsck --json of a corrupt device succeeded")
	}
	m := decodeOne(t, out)
	if m["clean"] != false {
		t.Errorf("clean = %v, want false", m["clean"])
	}
	if p, ok := m["problems"].([]any); !ok || len(p) != 1 {
		t.Errorf("problems = %v, want one", m["problems"])
	}
	if fileSum(t, path) != sum {
		t.Error("fsck changed the device")
	}
}

func TestFsckUnformattedAndMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blank.img")
	if err := os.WriteFile(path, make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := bench(t, "fsck", path)
	if err == nil || !errors.Is(err, engine.ErrCorrupt) {
		t.Errorf("fsck of a blank file: err = %v, want ErrCorrupt\n%s", err, out)
	}
	if !strings.Contains(out, "problems") {
		t.Errorf("fsck of a blank file prints no problems:\n%s", out)
	}
	missing := filepath.Join(t.TempDir(), "nope.img")
	if _, err := bench(t, "fsck", missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("fsck of a missing file: err = %v, want one naming it", err)
	}
	if _, err := bench(t, "inspect", path); err == nil || !errors.Is(err, engine.ErrCorrupt) {
		t.Errorf("inspect of a blank file: err = %v, want ErrCorrupt", err)
	}
}

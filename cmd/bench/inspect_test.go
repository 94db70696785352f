package main

import (
	"encoding/json"
	"errors"
	"io/fs"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

func TestInspectText(t *testing.T) {
	path, maps := formattedDevice(t, testObjects())
	sum := fileSum(t, path)
	out, err := bench(t, "inspect", path, "--extents", "zeta")
	if err != nil {
		t.Fatalf("inspect: %v\n%s", err, out)
	}
	for _, want := range []string{"superblocks A: ok; B: ok", "superblock A", "superblock B", "journal", "checkpoint A",
		"checkpoint B", "data", "transactions replayed", "replay stopped", "objects     3, 6 extents", `extents of "zeta": 2`} {
		if !strings.Contains(out, want) {
			t.Errorf("inspect output lacks %q:\n%s", want, out)
		}
	}
	// Objects are listed by name.
	ia, im, iz := strings.Index(out, " alpha "), strings.Index(out, " mid "), strings.Index(out, " zeta ")
	if ia < 0 || im < 0 || iz < 0 || !(ia < im && im < iz) {
		t.Errorf("objects not listed in name order (alpha %d, mid %d, zeta %d):\n%s", ia, im, iz, out)
	}
	// The extent rows are the engine's map of zeta.
	row := regexp.MustCompile(`(?m)^  (\d+)\s+(\d+)\s+(\d+)\s+written$`)
	rows := row.FindAllStringSubmatch(out, -1)
	want := maps["zeta"]
	if len(rows) != len(want) {
		t.Fatalf("%d extent rows, want %d:\n%s", len(rows), len(want), out)
	}
	for i, r := range rows {
		off, _ := strconv.ParseInt(r[1], 10, 64)
		n, _ := strconv.ParseInt(r[2], 10, 64)
		phys, _ := strconv.ParseInt(r[3], 10, 64)
		if off != want[i].Offset || n != want[i].Length || phys != want[i].Physical {
			t.Errorf("extent row %d = %d+%d @ %d, want %+v", i, off, n, phys, want[i])
		}
	}
	if fileSum(t, path) != sum {
		t.Error("inspect changed the device")
	}
}

func TestInspectJSONAndLimit(t *testing.T) {
	path, maps := formattedDevice(t, testObjects())
	out, err := bench(t, "inspect", path, "--json", "--limit", "2", "--extents", "alpha")
	if err != nil {
		t.Fatal(err)
	}
	var got inspectJSON
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if got.ObjectCount != 3 || len(got.Objects) != 2 || got.More != 1 {
		t.Errorf("object_count/listed/more = %d/%d/%d, want 3/2/1", got.ObjectCount, len(got.Objects), got.More)
	}
	if len(got.Objects) == 2 && (got.Objects[0].Name != "alpha" || got.Objects[1].Name != "mid") {
		t.Errorf("listed %v, want alpha and mid", got.Objects)
	}
	if len(got.Objects) > 0 && (got.Objects[0].Size != 4096+1<<20+4096 || got.Objects[0].Extents != 2) {
		t.Errorf("alpha = %+v, want size %d with 2 extents", got.Objects[0], 4096+1<<20+4096)
	}
	if len(got.Map) != len(maps["alpha"]) {
		t.Errorf("extents of alpha: %v, want %v", got.Map, maps["alpha"])
	}
	l := got.Layout
	names := []string{"superblock A", "superblock B", "journal", "checkpoint A", "checkpoint B", "data"}
	if len(got.Regions) != len(names) {
		t.Fatalf("regions %+v", got.Regions)
	}
	next := int64(0)
	for i, rg := range got.Regions {
		if rg.Name != names[i] || rg.Start != next || rg.Blocks <= 0 || rg.Bytes != rg.Blocks*int64(l.BlockSize) {
			t.Errorf("region %d = %+v, want %s starting at block %d", i, rg, names[i], next)
		}
		next = rg.Start + rg.Blocks
	}
	if next != l.TotalBlocks {
		t.Errorf("regions end at block %d, the device has %d", next, l.TotalBlocks)
	}
	if got.UsedBlocks+got.FreeBlocks != l.DataBlocks {
		t.Errorf("used %d + free %d != data blocks %d", got.UsedBlocks, got.FreeBlocks, l.DataBlocks)
	}

	out, err = bench(t, "inspect", path, "--limit", "0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "and 3 more") {
		t.Errorf("--limit 0 does not say how many were left out:\n%s", out)
	}
}

func TestInspectBadInput(t *testing.T) {
	path, _ := formattedDevice(t, testObjects())
	if _, err := bench(t, "inspect", path, "--extents", "nosuch"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("--extents of a missing object: err = %v, want fs.ErrNotExist", err)
	}
	if _, err := bench(t, "inspect", path, "--limit=-1"); !errors.Is(err, errBadFlag) {
		t.Errorf("--limit -1: err = %v, want errBadFlag", err)
	}
	corruptAt(t, path, 16, 8) // superblock A
	out, err := bench(t, "inspect", path)
	if !errors.Is(err, engine.ErrCorrupt) {
		t.Errorf("inspect with a bad superblock copy: err = %v, want ErrCorrupt", err)
	}
	// The good copy still describes the device, and the problem is shown.
	if !strings.Contains(out, "regions") || !strings.Contains(out, "1. superblock A") {
		t.Errorf("inspect of a device with one bad superblock:\n%s", out)
	}
}

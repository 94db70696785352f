package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

// TestMain lets this test binary stand in for bench as the crash child of
// the recovery measure: runFillChild re-executes the running executable
// with "durability-fill" as its first argument, which a test binary never
// receives otherwise.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "durability-fill" {
		main()
		os.Exit(0) // main returns only on success, after crashExit
	}
	os.Exit(m.Run())
}

// durDevice creates a file of size bytes to run durability on.
func durDevice(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dur.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestDurabilityJSON(t *testing.T) {
	path := durDevice(t, 64<<20)
	out, err := bench(t, "durability", path, "--json", "--quiet", "--objects", "300", "--few-objects", "5",
		"--rounds", "30", "--jobs", "4", "--runtime", "300ms", "--object-size", "1M", "--cache", "16M",
		"--fill-jobs", "4", "--verify", "50")
	if err != nil {
		t.Fatal(err)
	}
	var r durabilityResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	sl := r.SyncLatency
	if sl == nil || sl.Few.Objects != 5 || sl.Many.Objects != 300 || sl.Few.Rounds != 30 || sl.Many.Rounds != 30 {
		t.Fatalf("sync_latency = %+v", sl)
	}
	for _, p := range []syncPhase{sl.Few, sl.Many} {
		// Every round appends a block: at least one journal block and
		// one commit per Sync, and the data and journal flushes.
		if p.Lat.P50 <= 0 || p.JournalBlocksPerSync < 1 || p.CommitsPerSync < 1 || p.FlushesPerSync < 1 {
			t.Errorf("sync phase %+v", p)
		}
	}
	if sl.Ratio != sl.Many.Lat.P50/sl.Few.Lat.P50 {
		t.Errorf("ratio %v != %v / %v", sl.Ratio, sl.Many.Lat.P50, sl.Few.Lat.P50)
	}
	c := r.Concurrent
	if c == nil || c.Concurrent.Serialized || !c.Serialized.Serialized || c.Concurrent.Jobs != 4 {
		t.Fatalf("concurrent = %+v", c)
	}
	for _, run := range []concRun{c.Concurrent, c.Serialized} {
		if run.Ops <= 0 || run.OpsPerS <= 0 || run.Seconds < 0.3 || run.CommitsPerOp <= 0 {
			t.Errorf("concurrent run %+v", run)
		}
	}
	// Serialized Syncs cannot share a commit.
	if c.Serialized.CommitsPerOp < 0.99 {
		t.Errorf("serialized run: %.2f commits per op, want ≥ 1 (one per Sync)", c.Serialized.CommitsPerOp)
	}
	rec := r.Recovery
	if rec == nil {
		t.Fatal("no recovery result")
	}
	if rec.ObjectsAfter != 300 || rec.SizesVerified != 300 || rec.WritesVerified < 4+50 || !rec.FsckClean || rec.FillWrites <= 0 {
		t.Errorf("recovery = %+v", rec)
	}
	// The crash left the journal as full as asked, and Open replayed it.
	if rec.CrashJournalUsed < int64(0.45*float64(rec.JournalBytes)) || rec.ReplayedBytes != rec.CrashJournalUsed {
		t.Errorf("journal at the crash %d of %d, replayed %d", rec.CrashJournalUsed, rec.JournalBytes, rec.ReplayedBytes)
	}
	if rec.ReplayedTransactions <= 0 || rec.CrashFsckSeconds <= 0 || !strings.Contains(rec.ReplayStop, "end of journal") {
		t.Errorf("fsck of the crashed device: %d transactions in %v s, stop %q", rec.ReplayedTransactions, rec.CrashFsckSeconds, rec.ReplayStop)
	}
	if len(r.Table) != 9 {
		t.Errorf("table has %d rows, want 9: %+v", len(r.Table), r.Table)
	}
	// The device is left formatted and consistent.
	if _, err := bench(t, "fsck", path); err != nil {
		t.Errorf("fsck after durability: %v", err)
	}
}

func TestDurabilityTextOneMeasure(t *testing.T) {
	path := durDevice(t, 32<<20)
	out, err := bench(t, "durability", path, "--quiet", "--measure", "sync", "--objects", "50", "--rounds", "10")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Object.Sync p50 after a 4k write, 10 objects", "50 objects", "ratio 50 / 10 objects",
		"journal blocks per 4k write + Sync", "≤ 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "goroutines") || strings.Contains(out, "recovery") {
		t.Errorf("measures that were not asked for ran:\n%s", out)
	}
}

func TestDurabilityBadFlags(t *testing.T) {
	path := durDevice(t, 32<<20)
	for _, args := range [][]string{
		{"--objects", "0"},
		{"--few-objects", "100", "--objects", "100"},
		{"--rounds", "0"},
		{"--jobs", "0"},
		{"--runtime", "0s"},
		{"--object-size", "1k"},
		{"--fill", "0.5"},
		{"--fill", "0"},
		{"--fill-batch", "0"},
		{"--verify=-1"},
		{"--cache", "1M"},
	} {
		_, err := bench(t, append([]string{"durability", path, "--quiet"}, args...)...)
		if !errors.Is(err, errBadFlag) {
			t.Errorf("durability %v: err = %v, want errBadFlag", args, err)
		}
	}
	if fileSum(t, path) != fileSum(t, durDevice(t, 32<<20)) {
		t.Error("a refused command wrote to the device")
	}
}

// TestFillPlan: every (object, block) is written once, in order per
// object, and blocksOf agrees with the writes made.
func TestFillPlan(t *testing.T) {
	for _, c := range []struct{ objects, jobs int }{{1, 1}, {7, 3}, {10, 10}, {100, 16}, {5, 2}} {
		p := fillPlan{objects: c.objects, jobs: c.jobs}
		for n := int64(0); n < 40; n++ {
			blocks := make([]int64, c.objects)
			for j := range c.jobs {
				for k := range n {
					obj, blk := p.write(j, k)
					if obj%c.jobs != j || obj >= c.objects {
						t.Fatalf("%+v: job %d write %d goes to object %d, not one of its own", c, j, k, obj)
					}
					if blk != blocks[obj] {
						t.Fatalf("%+v: job %d write %d goes to block %d of object %d, want %d", c, j, k, blk, obj, blocks[obj])
					}
					blocks[obj]++
				}
			}
			for obj, b := range blocks {
				if got := p.blocksOf(obj, n); got != b {
					t.Fatalf("%+v: after %d writes per job object %d has %d blocks, blocksOf says %d", c, n, obj, b, got)
				}
			}
		}
	}
}

// TestVerifyFillDetects: verifyFill passes on what fillJournal wrote and
// fails on a size or a block that differs from it.
func TestVerifyFillDetects(t *testing.T) {
	dev := engine.NewMemDevice(32<<20, 4096)
	if err := engine.Format(dev, engine.FormatOptions{}); err != nil {
		t.Fatal(err)
	}
	e, err := engine.Open(dev, engine.Options{CacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	s := durSpec{objects: 20, fill: 0.1, fillJobs: 3, batch: 2}
	rep, err := fillJournal(context.Background(), e, &s)
	if err != nil {
		t.Fatal(err)
	}
	if st := e.Stats(); st.JournalUsedBytes < int64(0.1*float64(st.JournalBytes)) {
		t.Fatalf("journal holds %d of %d bytes after the fill", st.JournalUsedBytes, st.JournalBytes)
	}
	var r recoveryResult
	if err := verifyFill(e, rep, 10, &r); err != nil {
		t.Fatal(err)
	}
	// Each job's last batch (a job may have made none before the
	// journal filled), and the sample.
	wantWrites := 10
	for _, n := range rep.Writes {
		wantWrites += int(min(n, 2))
	}
	if r.SizesVerified != 20 || r.WritesVerified != wantWrites {
		t.Errorf("verified %d sizes and %d writes, want 20 and %d (writes per job %v)", r.SizesVerified, r.WritesVerified, wantWrites, rep.Writes)
	}
	// A report claiming one more write than was made.
	bad := rep
	bad.Writes = append([]int64(nil), rep.Writes...)
	bad.Writes[1]++
	if err := verifyFill(e, bad, 0, &recoveryResult{}); err == nil || !strings.Contains(err.Error(), "size") {
		t.Errorf("a missing write went unnoticed: %v", err)
	}
	// The last write of a job overwritten with other bytes.
	plan := fillPlan{objects: 20, jobs: 3}
	j := slices.IndexFunc(rep.Writes, func(n int64) bool { return n > 0 })
	obj, blk := plan.write(j, rep.Writes[j]-1)
	o, err := e.Object(objName(obj))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, durWriteSize)
	stampBlock(buf, uint64(obj)+1, uint64(blk))
	if _, err := o.WriteAt(buf, blk*durWriteSize); err != nil {
		t.Fatal(err)
	}
	if err := verifyFill(e, rep, 0, &recoveryResult{}); err == nil || !strings.Contains(err.Error(), "different bytes") {
		t.Errorf("a wrong block went unnoticed: %v", err)
	}
}

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rawblock/rawblock/iouring"
)

// bench runs the CLI in-process with args, with $TMPDIR pointed at a fresh
// directory, and checks that the run left no temporary file behind.
func bench(t *testing.T, args ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("TMPDIR", dir)
	var out, errOut bytes.Buffer
	err := execute(context.Background(), args, &out, &errOut, func(code int) {
		t.Fatalf("bench %v exited with %d; stderr: %s", args, code, errOut.String())
	})
	left, rerr := os.ReadDir(dir)
	if rerr != nil {
		t.Fatal(rerr)
	}
	if len(left) != 0 {
		t.Errorf("bench %v left %d files in $TMPDIR, e.g. %s", args, len(left), left[0].Name())
	}
	return out.String(), err
}

func skipWithoutIOURing(t *testing.T) {
	t.Helper()
	if err := iouring.Probe(); err != nil {
		t.Skipf("io_uring unavailable: %v", err)
	}
}

// decodeOne decodes exactly one JSON object from s.
func decodeOne(t *testing.T, s string) map[string]any {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("output is not a JSON object: %v\n%s", err, s)
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		t.Fatalf("output holds more than one JSON value (%v)\n%s", err, s)
	}
	return m
}

func num(t *testing.T, m map[string]any, key string) float64 {
	t.Helper()
	v, ok := m[key].(float64)
	if !ok {
		t.Fatalf("JSON field %q missing or not a number: %v", key, m[key])
	}
	return v
}

func TestRawJSONEachWorkload(t *testing.T) {
	for _, mode := range []string{"io_uring", "psync"} {
		for _, rw := range []string{"read", "write", "randread", "randwrite"} {
			t.Run(mode+"/"+rw, func(t *testing.T) {
				if mode == "io_uring" {
					skipWithoutIOURing(t)
				}
				jobs := "1"
				if rw == "randread" {
					jobs = "2"
				}
				out, err := bench(t, "raw", "--rw", rw, "--bs", "8k", "--iodepth", "8", "--jobs", jobs,
					"--size", "4M", "--runtime", "200ms", "--io", mode, "--json")
				if err != nil {
					t.Fatal(err)
				}
				m := decodeOne(t, out)
				if m["mode"] != "raw" || m["rw"] != rw || m["io_mode"] != mode {
					t.Errorf("mode/rw/io_mode = %v/%v/%v, want raw/%s/%s", m["mode"], m["rw"], m["io_mode"], rw, mode)
				}
				if num(t, m, "bs") != 8192 || num(t, m, "iodepth") != 8 || num(t, m, "jobs") != map[string]float64{"1": 1, "2": 2}[jobs] {
					t.Errorf("bs/iodepth/jobs = %v/%v/%v", m["bs"], m["iodepth"], m["jobs"])
				}
				ops := num(t, m, "ops")
				if ops <= 0 {
					t.Fatalf("ops = %v, want > 0", ops)
				}
				if b := num(t, m, "bytes"); b != ops*8192 {
					t.Errorf("bytes = %v, want ops × bs = %v", b, ops*8192)
				}
				secs := num(t, m, "seconds")
				if secs < 0.2 || secs > 10 {
					t.Errorf("seconds = %v for a 200ms run", secs)
				}
				if iops := num(t, m, "iops"); iops < ops/secs*0.999 || iops > ops/secs*1.001 {
					t.Errorf("iops = %v, want ops/seconds = %v", iops, ops/secs)
				}
				if mib := num(t, m, "mib_per_s"); mib <= 0 {
					t.Errorf("mib_per_s = %v", mib)
				}
				lat, ok := m["lat_us"].(map[string]any)
				if !ok {
					t.Fatalf("lat_us missing: %v", m["lat_us"])
				}
				p50, p99, p999 := num(t, lat, "p50"), num(t, lat, "p99"), num(t, lat, "p999")
				if p50 <= 0 || p50 > p99 || p99 > p999 {
					t.Errorf("latency percentiles not ordered: p50 %v p99 %v p99.9 %v", p50, p99, p999)
				}
				if num(t, m, "cpu_s_per_1m_ios") <= 0 {
					t.Errorf("cpu_s_per_1m_ios = %v", m["cpu_s_per_1m_ios"])
				}
				if num(t, m, "max_rss_mib") <= 0 {
					t.Errorf("max_rss_mib = %v", m["max_rss_mib"])
				}
				if r, _ := m["io_reason"].(string); r == "" {
					t.Error("io_reason empty")
				}
				if num(t, m, "size") != 4<<20 {
					t.Errorf("size = %v, want 4 MiB", m["size"])
				}
			})
		}
	}
}

func TestRawText(t *testing.T) {
	out, err := bench(t, "raw", "--rw", "randread", "--size", "1M", "--iodepth", "4", "--runtime", "100ms")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"raw randread 4k qd4", "IOPS", "MiB/s", "p99.9", "per 1M I/Os", "peak RSS", "temporary file"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRawBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--rw", "readwrite"}, "--rw"},
		{[]string{"--bs", "0"}, "--bs"},
		{[]string{"--bs", "65M"}, "--bs"},
		{[]string{"--bs", "4x"}, "suffix"},
		{[]string{"--bs", "1000"}, "not a multiple of the block size"},
		{[]string{"--iodepth", "0"}, "--iodepth"},
		{[]string{"--iodepth", "4097"}, "--iodepth"},
		{[]string{"--jobs", "0"}, "--jobs"},
		{[]string{"--jobs", "257"}, "--jobs"},
		{[]string{"--size", "2k"}, "--size"},
		{[]string{"--size", "2G"}, "larger than"},
		{[]string{"--runtime", "0s"}, "--runtime"},
		{[]string{"--runtime", "-1s"}, "--runtime"},
		{[]string{"--bs", "64M", "--iodepth", "32"}, "limit"},
		{[]string{"--io", "psync", "--iodepth", "4096", "--jobs", "2"}, "psync"},
		{[]string{"--io", "aio"}, "--io"},
		{[]string{"--device", "/nonexistent/rawblock-bench-dev"}, "/nonexistent/rawblock-bench-dev"},
	}
	for _, c := range cases {
		args := append([]string{"raw", "--runtime", "100ms"}, c.args...)
		out, err := bench(t, args...)
		if err == nil {
			t.Errorf("bench %v succeeded:\n%s", args, out)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("bench %v: error %q does not mention %q", args, err, c.want)
		}
	}
}

func TestSuite(t *testing.T) {
	out, err := bench(t, "--runtime", "100ms", "--size", "64M")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"raw randread 4k qd32", "raw randwrite 4k qd32", "raw write 1M qd16", "raw randread 4k qd1",
		"IOPS", "engine beside the raw device", "seqwrite 4k", "randread 4k"} {
		if !strings.Contains(out, want) {
			t.Errorf("suite output lacks %q:\n%s", want, out)
		}
	}
	out, err = bench(t, "suite", "--runtime", "100ms", "--size", "64M", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var rs struct {
		Raw    []result       `json:"raw"`
		Engine []engineResult `json:"engine"`
	}
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		t.Fatalf("suite --json: %v\n%s", err, out)
	}
	if len(rs.Raw) != len(suiteWorkloads) || len(rs.Engine) != len(suiteEngine) {
		t.Fatalf("suite --json: %d raw and %d engine results, want %d and %d", len(rs.Raw), len(rs.Engine), len(suiteWorkloads), len(suiteEngine))
	}
	for _, r := range rs.Raw {
		if r.Ops <= 0 {
			t.Errorf("%s: ops = %d", r.label(), r.Ops)
		}
	}
	for _, r := range rs.Engine {
		if r.Ops <= 0 || r.Mode != "engine" {
			t.Errorf("engine %s: ops = %d, mode %q", r.Workload, r.Ops, r.Mode)
		}
	}
}

// TestRunWorkloads runs every engine workload briefly and checks the JSON
// fields the hack/ scripts rely on.
func TestRunWorkloads(t *testing.T) {
	for _, w := range []string{"seqwrite", "randwrite", "seqread", "randread", "mixed"} {
		out, err := bench(t, "run", "--workload", w, "--objects", "3", "--size", "2M", "--jobs", "3",
			"--runtime", "200ms", "--cache", "16M", "--sync-every", "7", "--json")
		if err != nil {
			t.Fatalf("%s: %v", w, err)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%s: %v\n%s", w, err, out)
		}
		for _, k := range []string{"mode", "workload", "bs", "objects", "jobs", "ops", "bytes", "seconds", "iops",
			"mib_per_s", "lat_us", "extents_per_object", "allocations", "device_bytes_written"} {
			if _, ok := m[k]; !ok {
				t.Errorf("%s: JSON lacks %q: %s", w, k, out)
			}
		}
		if m["mode"] != "engine" || m["workload"] != w || m["ops"].(float64) <= 0 {
			t.Errorf("%s: %s", w, out)
		}
		// A Sync every 7 writes flushes 28 KiB at a time; allocation
		// windows still keep each object in a few extents.
		if w == "seqwrite" && m["extents_per_object"].(float64) > 4 {
			t.Errorf("seqwrite: %v extents per object, want ≤ 4", m["extents_per_object"])
		}
	}
	if _, err := bench(t, "run", "--objects", "0"); err == nil {
		t.Error("--objects 0 accepted")
	}
}

func TestOffsetSource(t *testing.T) {
	spec := &rawSpec{rw: "read", bs: 4096, size: 10 * 4096, jobs: 1}
	o := newOffsetSource(spec, 1)
	for n := uint64(0); n < 25; n++ {
		if got, want := o.at(7, n), int64((7+n)%10)*4096; got != want {
			t.Fatalf("sequential I/O %d from block 7: offset %d, want %d", n, got, want)
		}
	}
	spec.rw = "randwrite"
	o = newOffsetSource(spec, 1)
	seen := map[int64]bool{}
	for range 1000 {
		off := o.at(0, 0)
		if off < 0 || off+spec.bs > spec.size || off%spec.bs != 0 {
			t.Fatalf("random offset %d outside the region or misaligned", off)
		}
		seen[off] = true
	}
	if len(seen) != 10 {
		t.Errorf("1000 random offsets hit %d of 10 blocks", len(seen))
	}
}

func TestFillRandom(t *testing.T) {
	p := make([]byte, 4099)
	fillRandom(p, 3)
	for i := 0; i+8 <= len(p); i += 8 {
		if bytes.Equal(p[i:i+8], make([]byte, 8)) {
			t.Fatalf("zero word at %d", i)
		}
	}
	q := make([]byte, 4099)
	fillRandom(q, 4)
	if bytes.Equal(p, q) {
		t.Error("different seeds gave the same data")
	}
}

// TestRawRefusesSignature writes to a loop device that holds an XFS magic:
// refused without --force (nothing written), done with it.
func TestRawRefusesSignature(t *testing.T) {
	if testing.Short() {
		t.Skip("needs a loop device")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("losetup not found")
	}
	backing := filepath.Join(t.TempDir(), "loop.img")
	img := make([]byte, 1<<20)
	copy(img, "XFSB")
	if err := os.WriteFile(backing, img, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).Output()
	if err != nil {
		t.Skipf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		// The device may still be busy for a moment after close.
		for i := 0; ; i++ {
			err := exec.Command("losetup", "--detach", dev).Run()
			if err == nil || i == 20 {
				if err != nil {
					t.Errorf("losetup --detach %s: %v", dev, err)
				}
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	_, err = bench(t, "raw", "--device", dev, "--rw", "randwrite", "--runtime", "100ms")
	if !errors.Is(err, errSignature) || !strings.Contains(err.Error(), "XFS") {
		t.Fatalf("write to a device with an XFS magic: error %v, want one naming XFS", err)
	}
	got, rerr := os.ReadFile(backing)
	if rerr != nil {
		t.Fatal(rerr)
	}
	if !bytes.Equal(got, img) {
		t.Fatal("the refused run changed the device")
	}
	if _, err := bench(t, "raw", "--device", dev, "--rw", "randread", "--runtime", "100ms"); err != nil {
		t.Fatalf("reads need no --force: %v", err)
	}
	if _, err := bench(t, "raw", "--device", dev, "--rw", "randwrite", "--runtime", "100ms", "--force"); err != nil {
		t.Fatalf("write with --force: %v", err)
	}
}

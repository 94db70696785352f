package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// result is what one benchmark run measured. Every subcommand that measures
// a workload fills one, so that raw-device and engine numbers print (and
// compare) the same way; its JSON field names are a stable interface used by
// hack/vs-fio.sh.
type result struct {
	Mode      string         `json:"mode"` // "raw", or the engine workload family
	RW        string         `json:"rw"`
	BS        int64          `json:"bs"`
	IODepth   int            `json:"iodepth"`
	Jobs      int            `json:"jobs"`
	Size      int64          `json:"size"` // bytes of the region the workload touched
	Ops       int64          `json:"ops"`
	Bytes     int64          `json:"bytes"`
	Seconds   float64        `json:"seconds"`
	IOPS      float64        `json:"iops"`
	MiBPerS   float64        `json:"mib_per_s"`
	Lat       latencySummary `json:"lat_us"`
	CPUPer1M  float64        `json:"cpu_s_per_1m_ios"`
	MaxRSSMiB float64        `json:"max_rss_mib"`
	IOMode    string         `json:"io_mode"`
	IOReason  string         `json:"io_reason"`
	Device    string         `json:"device"`
	BlockSize int            `json:"block_size"`
	TempFile  bool           `json:"temp_file"`
}

// measurement is the raw material of a result.
type measurement struct {
	ops, bytes int64
	elapsed    time.Duration
	lat        *hdrhistogram.Histogram
	before     usage // taken just before the workload started
	after      usage // taken just after it finished
}

// fill derives the rates, percentiles and resource figures of r from m.
func (r *result) fill(m measurement) {
	r.Ops = m.ops
	r.Bytes = m.bytes
	r.Seconds = m.elapsed.Seconds()
	if r.Seconds > 0 {
		r.IOPS = float64(m.ops) / r.Seconds
		r.MiBPerS = float64(m.bytes) / (1 << 20) / r.Seconds
	}
	r.Lat = summarizeLatency(m.lat)
	if m.ops > 0 {
		r.CPUPer1M = (m.after.cpu - m.before.cpu).Seconds() / float64(m.ops) * 1e6
	}
	r.MaxRSSMiB = float64(m.after.maxRSSKiB) / 1024
}

// label names the workload compactly: "raw randread 4k qd32" (plus "x4
// jobs" when there are several).
func (r *result) label() string {
	s := fmt.Sprintf("%s %s %s qd%d", r.Mode, r.RW, formatSize(r.BS), r.IODepth)
	if r.Jobs > 1 {
		s += fmt.Sprintf(" x%d jobs", r.Jobs)
	}
	return s
}

// writeJSON writes v as one JSON document on one line.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("writing JSON: %w", err)
	}
	return nil
}

// printResult prints one result for a human.
func printResult(w io.Writer, r *result) error {
	dev := r.Device
	if r.TempFile {
		dev += " (temporary file)"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s  size=%s  on %s, block size %d\n", r.label(), formatSize(r.Size), dev, r.BlockSize)
	fmt.Fprintf(&b, "  io         %s (%s)\n", r.IOMode, r.IOReason)
	fmt.Fprintf(&b, "  ops        %d in %.2f s\n", r.Ops, r.Seconds)
	fmt.Fprintf(&b, "  IOPS       %.0f\n", r.IOPS)
	fmt.Fprintf(&b, "  bandwidth  %.1f MiB/s\n", r.MiBPerS)
	fmt.Fprintf(&b, "  latency    p50 %.1f µs  p99 %.1f µs  p99.9 %.1f µs  (mean %.1f µs, max %.1f µs)\n",
		r.Lat.P50, r.Lat.P99, r.Lat.P999, r.Lat.Mean, r.Lat.Max)
	fmt.Fprintf(&b, "  CPU        %.2f s per 1M I/Os\n", r.CPUPer1M)
	fmt.Fprintf(&b, "  peak RSS   %.1f MiB\n", r.MaxRSSMiB)
	_, err := io.WriteString(w, b.String())
	return err
}

// printTable prints results as one aligned table, one row per result.
func printTable(w io.Writer, rs []result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "workload\tio\tIOPS\tMiB/s\tp50 µs\tp99 µs\tp99.9 µs\tCPU s/1M IOs\tRSS MiB")
	for i := range rs {
		r := &rs[i]
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.1f\t%.1f\t%.1f\t%.1f\t%.2f\t%.1f\n",
			r.label(), r.IOMode, r.IOPS, r.MiBPerS, r.Lat.P50, r.Lat.P99, r.Lat.P999, r.CPUPer1M, r.MaxRSSMiB)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("writing table: %w", err)
	}
	return nil
}

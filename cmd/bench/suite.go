package main

import (
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/rawblock/rawblock/engine"
)

// suiteCmd is what `bench` runs without arguments: a short suite of raw
// workloads on a temporary file, then the engine's workloads on the same
// file, printed as tables with the engine/raw ratios.
type suiteCmd struct {
	Device  string        `help:"Device or file to run on instead of a temporary file (write workloads need --force on a block device with a signature)." placeholder:"PATH"`
	Runtime time.Duration `default:"3s" help:"How long each workload runs."`
	Size    byteSize      `default:"1G" help:"Size of the temporary file, and of the region used."`
	IO      string        `name:"io" enum:"auto,io_uring,psync" default:"auto" help:"I/O engine: ${enum}."`
	Force   bool          `help:"Write even to a block device that holds a signature."`
	JSON    bool          `name:"json" help:"Print one JSON object {raw: [...], engine: [...]} instead of tables."`
	RawOnly bool          `name:"raw-only" help:"Only the raw device workloads."`
}

// suiteWorkloads are the raw workloads of the default suite: the same four
// hack/vs-fio.sh compares with fio.
var suiteWorkloads = []rawSpec{
	{rw: "randread", bs: 4 << 10, iodepth: 32, jobs: 1},
	{rw: "randwrite", bs: 4 << 10, iodepth: 32, jobs: 1},
	{rw: "write", bs: 1 << 20, iodepth: 16, jobs: 1},
	{rw: "randread", bs: 4 << 10, iodepth: 1, jobs: 1},
	{rw: "read", bs: 1 << 20, iodepth: 16, jobs: 1},
}

// suiteEngine pairs each engine workload of the default suite with the raw
// workload (index into suiteWorkloads) it is compared with, and the figure
// compared: "mib" (MiB/s) or "iops".
var suiteEngine = []struct {
	spec   engineSpec
	raw    int
	metric string
}{
	{engineSpec{workload: "seqwrite", bs: 4 << 10, objects: 8, size: 64 << 20, jobs: 8, cache: 256 << 20}, 2, "mib"},
	{engineSpec{workload: "randwrite", bs: 4 << 10, objects: 8, size: 32 << 20, jobs: 8, cache: 256 << 20}, 1, "iops"},
	{engineSpec{workload: "seqread", bs: 128 << 10, objects: 8, size: 32 << 20, jobs: 8, cache: 64 << 20}, 4, "mib"},
	{engineSpec{workload: "randread", bs: 4 << 10, objects: 8, size: 64 << 20, jobs: 32, cache: 64 << 20}, 0, "iops"},
}

// Run implements the default suite.
func (c *suiteCmd) Run(env *appEnv) error {
	mode, err := parseIOMode(c.IO)
	if err != nil {
		return err
	}
	specs := make([]rawSpec, len(suiteWorkloads))
	for i, w := range suiteWorkloads {
		w.size = int64(c.Size)
		w.runtime = c.Runtime
		w.io = mode
		w.force = c.Force
		if err := w.validate(); err != nil {
			return err
		}
		specs[i] = w
	}
	bd, err := openBenchDevice(c.Device, mode, int64(c.Size))
	if err != nil {
		return err
	}
	var results []result
	for _, spec := range specs {
		var r result
		r, err = runRaw(env.ctx, bd, spec)
		if err != nil {
			break
		}
		results = append(results, r)
	}
	var engResults []engineResult
	if err == nil && !c.RawOnly {
		engResults, err = runEngineSuite(env, bd, c)
	}
	if cerr := bd.close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if err != nil {
		return err
	}
	if c.JSON {
		return writeJSON(env.stdout, map[string]any{"raw": results, "engine": engResults})
	}
	if len(results) > 0 {
		r := results[0]
		dev := r.Device
		if r.TempFile {
			dev = "temporary file " + dev
		}
		if _, err := env.printf("suite on %s (%s, block size %d), %s per workload\nio: %s (%s)\n\n",
			dev, formatSize(r.Size), r.BlockSize, c.Runtime, r.IOMode, r.IOReason); err != nil {
			return err
		}
	}
	if err := printTable(env.stdout, results); err != nil {
		return err
	}
	if len(engResults) == 0 {
		return nil
	}
	if _, err := env.printf("\nengine beside the raw device (same file, same run):\n"); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(env.stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "engine workload\tengine\traw workload\traw\tratio\textents/object\tp99 µs")
	for i, er := range engResults {
		pair := suiteEngine[i]
		raw := results[pair.raw]
		ev, rv, unit := er.MiBPerS, raw.MiBPerS, "MiB/s"
		if pair.metric == "iops" {
			ev, rv, unit = er.IOPS, raw.IOPS, "IOPS"
		}
		ratio := 0.0
		if rv > 0 {
			ratio = ev / rv
		}
		fmt.Fprintf(tw, "%s %s %d×%s j%d\t%.0f %s\t%s\t%.0f %s\t%.2f\t%.2f\t%.1f\n",
			er.Workload, formatSize(er.BS), er.Objects, formatSize(er.ObjectSize), er.Jobs, ev, unit,
			raw.label(), rv, unit, ratio, er.ExtentsPerObject, er.Lat.P99)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("writing table: %w", err)
	}
	return nil
}

// runEngineSuite formats the suite's device and runs the engine workloads.
func runEngineSuite(env *appEnv, bd *benchDevice, c *suiteCmd) ([]engineResult, error) {
	if err := bd.checkWritable(c.Force); err != nil {
		return nil, err
	}
	var out []engineResult
	for _, pair := range suiteEngine {
		spec := pair.spec
		spec.runtime = c.Runtime
		spec.quiet = true
		// Scale the data set to the device: at most half of it.
		if per := bd.dev.Size() / 2 / int64(spec.objects) / spec.bs * spec.bs; spec.size > per {
			spec.size = max(per, spec.bs)
		}
		if err := engine.Format(bd.dev, engine.FormatOptions{}); err != nil {
			return out, err
		}
		r, err := runEngine(env.ctx, bd, spec)
		if err != nil {
			return out, fmt.Errorf("engine %s: %w", spec.workload, err)
		}
		out = append(out, r)
	}
	return out, nil
}

package main

import (
	"errors"
	"time"
)

// suiteCmd is what `bench` runs without arguments: a short suite of raw
// workloads on a temporary file, printed as one table.
type suiteCmd struct {
	Device  string        `help:"Device or file to run on instead of a temporary file (write workloads need --force on a block device with a signature)." placeholder:"PATH"`
	Runtime time.Duration `default:"3s" help:"How long each workload runs."`
	Size    byteSize      `default:"1G" help:"Size of the temporary file, and of the region used."`
	IO      string        `name:"io" enum:"auto,io_uring,psync" default:"auto" help:"I/O engine: ${enum}."`
	Force   bool          `help:"Write even to a block device that holds a signature."`
	JSON    bool          `name:"json" help:"Print one JSON array of results instead of a table."`
}

// suiteWorkloads are the raw workloads of the default suite: the same four
// hack/vs-fio.sh compares with fio.
var suiteWorkloads = []rawSpec{
	{rw: "randread", bs: 4 << 10, iodepth: 32, jobs: 1},
	{rw: "randwrite", bs: 4 << 10, iodepth: 32, jobs: 1},
	{rw: "write", bs: 1 << 20, iodepth: 16, jobs: 1},
	{rw: "randread", bs: 4 << 10, iodepth: 1, jobs: 1},
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
	if cerr := bd.close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	if err != nil {
		return err
	}
	if c.JSON {
		return writeJSON(env.stdout, results)
	}
	if len(results) > 0 {
		r := results[0]
		dev := r.Device
		if r.TempFile {
			dev = "temporary file " + dev
		}
		if _, err := env.printf("raw device suite on %s (%s, block size %d), %s per workload\nio: %s (%s)\n\n",
			dev, formatSize(r.Size), r.BlockSize, c.Runtime, r.IOMode, r.IOReason); err != nil {
			return err
		}
	}
	return printTable(env.stdout, results)
}

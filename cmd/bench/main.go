// Command bench measures rawblock and the device under it: `bench raw`
// drives the raw device the way fio does (the ceiling), and `bench` alone
// runs a short default suite on a temporary file.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/alecthomas/kong"
)

// cli is the command line. Each subcommand lives in its own file as a type
// with a Run(*appEnv) error method; adding one is adding a field here.
type cli struct {
	Suite          suiteCmd          `cmd:"" default:"withargs" help:"Run the short default suite on a temporary file (what bench does without arguments)."`
	Raw            rawCmd            `cmd:"" help:"Benchmark the raw device with O_DIRECT I/O, fio-style (io_uring or pread/pwrite)."`
	Run            runCmd            `cmd:"" help:"Run a workload through the engine: objects, page cache, delayed allocation."`
	Format         formatCmd         `cmd:"" help:"Write an empty rawblock layout to a device (everything on it is lost)."`
	Fsck           fsckCmd           `cmd:"" help:"Check a formatted device's metadata, read-only; exit status 1 on any problem."`
	Inspect        inspectCmd        `cmd:"" help:"Print a formatted device's layout, checkpoint, journal and objects, read-only."`
	Durability     durabilityCmd     `cmd:"" help:"Measure Sync latency, concurrent Syncs, journal bytes per Sync and recovery time (formats the device)."`
	DurabilityFill durabilityFillCmd `cmd:"" hidden:"" name:"durability-fill" help:"Internal: the child process of bench durability's recovery measure."`
	Crash          crashCmd          `cmd:"" help:"Cut the power at random points of random workloads on an in-memory fault device and check every durability promise after each reboot."`
}

// appEnv is what every subcommand's Run receives: where to print, and a
// context cancelled on SIGINT/SIGTERM (runs then stop early and clean up).
type appEnv struct {
	ctx    context.Context
	stdout io.Writer
}

// printf writes to the command's standard output.
func (e *appEnv) printf(format string, args ...any) (int, error) {
	return fmt.Fprintf(e.stdout, format, args...)
}

// newParser builds the kong parser for c, printing to stdout/stderr and
// exiting through exit (tests pass their own).
func newParser(c *cli, stdout, stderr io.Writer, exit func(int)) (*kong.Kong, error) {
	return kong.New(c,
		kong.Name("bench"),
		kong.Description("Benchmarks for rawblock and the raw block device beneath it."),
		kong.UsageOnError(),
		kong.Writers(stdout, stderr),
		kong.Exit(exit),
		kong.Vars{"tempsize": formatSize(defaultTempSize)},
	)
}

// execute parses args and runs the chosen command.
func execute(ctx context.Context, args []string, stdout, stderr io.Writer, exit func(int)) error {
	var c cli
	parser, err := newParser(&c, stdout, stderr, exit)
	if err != nil {
		return err
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		return err
	}
	return kctx.Run(&appEnv{ctx: ctx, stdout: stdout})
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := execute(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Exit)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

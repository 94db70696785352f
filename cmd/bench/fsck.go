package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/rawblock/rawblock/engine"
)

// fsckCmd is `bench fsck`: a read-only consistency check of a device.
type fsckCmd struct {
	Device string `arg:"" help:"Formatted device or file to check (opened read-only)." placeholder:"DEVICE"`
	JSON   bool   `name:"json" help:"Print one JSON object instead of text."`
}

// errProblems is returned (wrapping engine.ErrCorrupt too) when a check
// found problems, so that the command exits non-zero after printing them.
var errProblems = errors.New("device has problems")

// checkDevice opens path read-only and runs engine.Check on it. The report is
// returned even when the check failed part way (it holds what was found);
// err is the check's error, or the open/close error.
func checkDevice(path string) (engine.Report, error) {
	dev, err := engine.OpenDevice(path, engine.DeviceOptions{ReadOnly: true})
	if err != nil {
		return engine.Report{}, err
	}
	r, cerr := engine.Check(dev)
	if err := dev.Close(); err != nil {
		cerr = errors.Join(cerr, fmt.Errorf("closing %s: %w", path, err))
	}
	return r, cerr
}

// checkFailure turns a report and Check's error into the command's error:
// nil only when the device is clean.
func checkFailure(path string, r *engine.Report, err error) error {
	switch {
	case err != nil && len(r.Problems) > 0:
		return fmt.Errorf("%s: %w: %d problems: %w", path, errProblems, len(r.Problems), err)
	case err != nil:
		return fmt.Errorf("%s: %w", path, err)
	case len(r.Problems) > 0:
		// Check promises an error whenever it lists problems; say so
		// rather than pass a dirty device as clean.
		return fmt.Errorf("%s: %w: %d problems, yet engine.Check returned no error", path, errProblems, len(r.Problems))
	}
	return nil
}

// fsckJSON is the JSON form of `bench fsck`; its field names are a stable
// interface for scripts.
type fsckJSON struct {
	Device           string    `json:"device"`
	Clean            bool      `json:"clean"`
	Error            string    `json:"error,omitempty"`
	Objects          int64     `json:"objects"`
	Extents          int64     `json:"extents"`
	UsedBlocks       int64     `json:"used_blocks"`
	FreeBlocks       int64     `json:"free_blocks"`
	BlockSize        int       `json:"block_size"`
	CheckpointSlot   string    `json:"checkpoint_slot"`
	CheckpointSeq    uint64    `json:"checkpoint_seq"`
	JournalLive      int64     `json:"journal_live_blocks"`
	JournalBlocks    int64     `json:"journal_blocks"`
	JournalReplayed  int       `json:"journal_transactions_replayed"`
	JournalLastSeq   uint64    `json:"journal_last_seq"`
	JournalStop      string    `json:"journal_stop"`
	Problems         []string  `json:"problems"`
	SuperblockStatus [2]string `json:"superblocks"`
}

// Run implements `bench fsck`.
func (c *fsckCmd) Run(env *appEnv) error {
	r, cerr := checkDevice(c.Device)
	if r.Layout.BlockSize == 0 && cerr != nil && len(r.Problems) == 0 {
		return cerr // could not even open or read the device
	}
	fail := checkFailure(c.Device, &r, cerr)
	if c.JSON {
		j := fsckJSON{
			Device: c.Device, Clean: fail == nil,
			Objects: r.ObjectCount, Extents: r.ExtentCount, UsedBlocks: r.UsedBlocks, FreeBlocks: r.FreeBlocks,
			BlockSize: r.Layout.BlockSize, CheckpointSlot: slotName(r.Checkpoint.Slot), CheckpointSeq: r.Checkpoint.Seq,
			JournalLive: r.Journal.LiveBlocks, JournalBlocks: r.Layout.JournalBlocks, JournalReplayed: r.Journal.Transactions,
			JournalLastSeq: r.Journal.LastSeq, JournalStop: r.Journal.Stop,
			Problems: r.Problems, SuperblockStatus: r.Superblocks,
		}
		if j.Problems == nil {
			j.Problems = []string{}
		}
		if cerr != nil {
			j.Error = cerr.Error()
		}
		if err := writeJSON(env.stdout, j); err != nil {
			return errors.Join(fail, err)
		}
		return fail
	}
	if err := printFsck(env.stdout, c.Device, &r, fail == nil); err != nil {
		return errors.Join(fail, err)
	}
	return fail
}

// slotName names a checkpoint slot as the layout does: A or B.
func slotName(slot int) string {
	switch slot {
	case 0:
		return "A"
	case 1:
		return "B"
	}
	return fmt.Sprintf("slot(%d)", slot)
}

// percent is 100·a/b, or 0 when b is 0.
func percent(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

// printFsck prints the summary and every problem.
func printFsck(w io.Writer, path string, r *engine.Report, clean bool) error {
	var b strings.Builder
	if clean {
		fmt.Fprintf(&b, "fsck %s: clean\n", path)
	} else {
		fmt.Fprintf(&b, "fsck %s: %d problems\n", path, len(r.Problems))
	}
	if l := &r.Layout; l.BlockSize > 0 {
		fmt.Fprintf(&b, "  layout      version %d, block %d, %s device, uuid %s\n", l.Version, l.BlockSize, formatSize(l.DeviceSize), l.UUID)
		fmt.Fprintf(&b, "  objects     %d, %d extents\n", r.ObjectCount, r.ExtentCount)
		fmt.Fprintf(&b, "  data        %d used + %d free of %d blocks (%.1f%% used)\n",
			r.UsedBlocks, r.FreeBlocks, l.DataBlocks, percent(r.UsedBlocks, l.DataBlocks))
		fmt.Fprintf(&b, "  checkpoint  slot %s, seq %d; other slot: %s\n", slotName(r.Checkpoint.Slot), r.Checkpoint.Seq, r.Checkpoint.Other)
		fmt.Fprintf(&b, "  journal     %d of %d blocks live (%.1f%%), %d transactions replayed to seq %d; replay stopped: %s\n",
			r.Journal.LiveBlocks, l.JournalBlocks, percent(r.Journal.LiveBlocks, l.JournalBlocks),
			r.Journal.Transactions, r.Journal.LastSeq, r.Journal.Stop)
	}
	fmt.Fprintf(&b, "  superblocks A: %s; B: %s\n", orUnknown(r.Superblocks[0]), orUnknown(r.Superblocks[1]))
	if len(r.Problems) == 0 {
		b.WriteString("  problems    none\n")
	} else {
		b.WriteString("  problems:\n")
		for i, p := range r.Problems {
			fmt.Fprintf(&b, "    %d. %s\n", i+1, p)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func orUnknown(s string) string {
	if s == "" {
		return "not read"
	}
	return s
}

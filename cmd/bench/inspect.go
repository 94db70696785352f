package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/rawblock/rawblock/engine"
)

// maxInspectLimit bounds --limit: the listing is for people, and a device
// may hold millions of objects.
const maxInspectLimit = 10_000_000

// inspectCmd is `bench inspect`: what is on a device, read-only.
type inspectCmd struct {
	Device  string `arg:"" help:"Formatted device or file to inspect (opened read-only)." placeholder:"DEVICE"`
	Extents string `placeholder:"NAME" help:"Also print the extent map of object NAME."`
	Limit   int    `default:"100" help:"List at most this many objects (0: none; at most 10000000)."`
	JSON    bool   `name:"json" help:"Print one JSON object instead of text."`
}

// region is one region of the on-disk layout, in engine blocks.
type region struct {
	Name   string `json:"name"`
	Start  int64  `json:"start_block"`
	Blocks int64  `json:"blocks"`
	Bytes  int64  `json:"bytes"`
}

// inspectObject is one object in the listing.
type inspectObject struct {
	ID      uint64 `json:"id"`
	Name    string `json:"name"`
	Size    int64  `json:"size"`
	Extents int    `json:"extents"`
}

// inspectExtent is one extent of an object's map, in bytes.
type inspectExtent struct {
	Offset   int64  `json:"offset"`
	Length   int64  `json:"length"`
	Physical int64  `json:"physical"`
	State    string `json:"state"`
}

// inspectJSON is the JSON form of `bench inspect`; its field names are a
// stable interface for scripts.
type inspectJSON struct {
	Device      string                 `json:"device"`
	Layout      engine.Layout          `json:"layout"`
	Regions     []region               `json:"regions"`
	Superblocks [2]string              `json:"superblocks"`
	Checkpoint  engine.CheckpointState `json:"checkpoint"`
	Journal     engine.JournalState    `json:"journal"`
	ObjectCount int64                  `json:"object_count"`
	ExtentCount int64                  `json:"extent_count"`
	UsedBlocks  int64                  `json:"used_blocks"`
	FreeBlocks  int64                  `json:"free_blocks"`
	Objects     []inspectObject        `json:"objects"`
	More        int                    `json:"more_objects"` // objects beyond --limit, not listed
	ExtentsOf   string                 `json:"extents_of,omitempty"`
	Map         []inspectExtent        `json:"extents,omitempty"`
	Problems    []string               `json:"problems"`
}

// Run implements `bench inspect`.
func (c *inspectCmd) Run(env *appEnv) error {
	if c.Limit < 0 || c.Limit > maxInspectLimit {
		return fmt.Errorf("%w: --limit %d: want 0..%d", errBadFlag, c.Limit, maxInspectLimit)
	}
	r, cerr := checkDevice(c.Device)
	if r.Layout.BlockSize == 0 {
		// Nothing to show: the device could not be opened or holds no
		// readable rawblock layout.
		if cerr == nil {
			cerr = fmt.Errorf("%w: engine.Check returned no layout and no error", engine.ErrCorrupt)
		}
		return fmt.Errorf("%s: %w", c.Device, cerr)
	}
	fail := checkFailure(c.Device, &r, cerr)
	out := buildInspect(c.Device, &r, c.Limit)
	if c.Extents != "" {
		i := slices.IndexFunc(r.Objects, func(o engine.ObjectReport) bool { return o.Name == c.Extents })
		if i < 0 {
			return errors.Join(fail, fmt.Errorf("%s: --extents %q: %w", c.Device, c.Extents, fs.ErrNotExist))
		}
		out.ExtentsOf = c.Extents
		out.Map = []inspectExtent{}
		for _, x := range r.Objects[i].Extents {
			out.Map = append(out.Map, inspectExtent{Offset: x.Offset, Length: x.Length, Physical: x.Physical, State: x.State.String()})
		}
	}
	var err error
	if c.JSON {
		err = writeJSON(env.stdout, out)
	} else {
		err = printInspect(env.stdout, &out)
	}
	return errors.Join(fail, err)
}

// layoutRegions lists the regions of l in device order. The superblocks are
// the blocks before the journal, one copy per block (Format's layout).
func layoutRegions(l *engine.Layout) []region {
	bs := int64(l.BlockSize)
	mk := func(name string, start, n int64) region {
		return region{Name: name, Start: start, Blocks: n, Bytes: n * bs}
	}
	var rs []region
	if l.JournalStart == 2 {
		rs = append(rs, mk("superblock A", 0, 1), mk("superblock B", 1, 1))
	} else {
		rs = append(rs, mk("superblocks", 0, l.JournalStart))
	}
	return append(rs,
		mk("journal", l.JournalStart, l.JournalBlocks),
		mk("checkpoint A", l.CheckpointStart[0], l.CheckpointBlocks),
		mk("checkpoint B", l.CheckpointStart[1], l.CheckpointBlocks),
		mk("data", l.DataStart, l.DataBlocks),
	)
}

// buildInspect assembles what inspect prints: objects sorted by name, at
// most limit of them.
func buildInspect(path string, r *engine.Report, limit int) inspectJSON {
	objs := make([]inspectObject, len(r.Objects))
	for i, o := range r.Objects {
		objs[i] = inspectObject{ID: o.ID, Name: o.Name, Size: o.Size, Extents: len(o.Extents)}
	}
	slices.SortFunc(objs, func(a, b inspectObject) int { return strings.Compare(a.Name, b.Name) })
	more := 0
	if len(objs) > limit {
		more = len(objs) - limit
		objs = objs[:limit]
	}
	problems := r.Problems
	if problems == nil {
		problems = []string{}
	}
	return inspectJSON{
		Device: path, Layout: r.Layout, Regions: layoutRegions(&r.Layout), Superblocks: r.Superblocks,
		Checkpoint: r.Checkpoint, Journal: r.Journal,
		ObjectCount: r.ObjectCount, ExtentCount: r.ExtentCount, UsedBlocks: r.UsedBlocks, FreeBlocks: r.FreeBlocks,
		Objects: objs, More: more, Problems: problems,
	}
}

// printInspect prints out for a human.
func printInspect(w io.Writer, out *inspectJSON) error {
	var b strings.Builder
	l := &out.Layout
	fmt.Fprintf(&b, "device      %s\n", out.Device)
	fmt.Fprintf(&b, "format      version %d, uuid %s\n", l.Version, l.UUID)
	fmt.Fprintf(&b, "block size  %d (device logical block %d)\n", l.BlockSize, l.DeviceBlockSize)
	fmt.Fprintf(&b, "size        %d bytes (%s) at format, %d blocks\n", l.DeviceSize, humanBytes(l.DeviceSize), l.TotalBlocks)
	fmt.Fprintf(&b, "superblocks A: %s; B: %s\n", out.Superblocks[0], out.Superblocks[1])
	b.WriteString("\nregions\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  region\tfirst block\tlast block\tblocks\tbytes")
	for _, rg := range out.Regions {
		fmt.Fprintf(tw, "  %s\t%d\t%d\t%d\t%d (%s)\n", rg.Name, rg.Start, rg.Start+rg.Blocks-1, rg.Blocks, rg.Bytes, humanBytes(rg.Bytes))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	cp := &out.Checkpoint
	fmt.Fprintf(&b, "\ncheckpoint  slot %s, seq %d; other slot %s: %s\n", slotName(cp.Slot), cp.Seq, slotName(1-cp.Slot), cp.Other)
	j := &out.Journal
	fmt.Fprintf(&b, "journal     head at block %d of the ring, %d of %d blocks live (%.1f%%)\n",
		j.Head, j.LiveBlocks, l.JournalBlocks, percent(j.LiveBlocks, l.JournalBlocks))
	fmt.Fprintf(&b, "            %d transactions replayed, last seq %d; replay stopped: %s\n", j.Transactions, j.LastSeq, j.Stop)
	fmt.Fprintf(&b, "space       %d used + %d free of %d data blocks (%.1f%% used)\n",
		out.UsedBlocks, out.FreeBlocks, l.DataBlocks, percent(out.UsedBlocks, l.DataBlocks))

	fmt.Fprintf(&b, "\nobjects     %d, %d extents\n", out.ObjectCount, out.ExtentCount)
	if len(out.Objects) > 0 {
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "  id\tname\tsize\textents")
		for _, o := range out.Objects {
			fmt.Fprintf(tw, "  %d\t%s\t%d\t%d\n", o.ID, o.Name, o.Size, o.Extents)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if out.More > 0 {
		fmt.Fprintf(&b, "  ... and %d more (raise --limit to list them)\n", out.More)
	}
	if out.ExtentsOf != "" {
		fmt.Fprintf(&b, "\nextents of %q: %d\n", out.ExtentsOf, len(out.Map))
		if len(out.Map) > 0 {
			tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "  logical offset\tlength\tphysical\tstate")
			for _, x := range out.Map {
				fmt.Fprintf(tw, "  %d\t%d\t%d\t%s\n", x.Offset, x.Length, x.Physical, x.State)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
		}
	}
	if len(out.Problems) > 0 {
		fmt.Fprintf(&b, "\nproblems    %d\n", len(out.Problems))
		for i, p := range out.Problems {
			fmt.Fprintf(&b, "  %d. %s\n", i+1, p)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

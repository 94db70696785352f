package engine

import (
	"cmp"
	"encoding/hex"
	"fmt"
	"slices"

	"github.com/rawblock/rawblock/extenttree"
	"github.com/rawblock/rawblock/reserve"
)

// Report is what Check found on a device: its layout and metadata state,
// every object, and every problem. Block numbers are in engine blocks.
type Report struct {
	Layout      Layout
	Superblocks [2]string // "ok", or why that copy is not valid
	Checkpoint  CheckpointState
	Journal     JournalState
	Objects     []ObjectReport // by id

	ObjectCount, ExtentCount int64
	UsedBlocks, FreeBlocks   int64 // in the data region
	// Problems lists every inconsistency; empty means the device is clean.
	Problems []string
}

// Layout is the on-disk layout a superblock describes.
type Layout struct {
	Version                     uint32
	UUID                        string
	BlockSize, DeviceBlockSize  int
	DeviceSize                  int64 // bytes, at format
	TotalBlocks                 int64
	JournalStart, JournalBlocks int64
	CheckpointStart             [2]int64
	CheckpointBlocks, DataStart int64
	DataBlocks                  int64
	MetadataBytes, DataBytes    int64
}

// CheckpointState describes the checkpoint recovery starts from.
type CheckpointState struct {
	Slot  int    // 0 = A, 1 = B
	Seq   uint64 // sequence it covers
	Other string // the other slot: "ok" or why it is not valid (a torn checkpoint after a crash is normal)
}

// JournalState describes the journal after replay.
type JournalState struct {
	Head         int64  // block of the ring where the next transaction goes
	LiveBlocks   int64  // blocks written since the checkpoint
	Transactions int    // transactions replayed
	LastSeq      uint64 // newest sequence replayed (or the checkpoint's)
	Stop         string // why replay stopped (a torn or stale tail is normal)
}

// ObjectReport is one object's metadata.
type ObjectReport struct {
	ID      uint64
	Name    string
	Size    int64
	Extents []Extent // Written extents, in logical order
}

// Check verifies the metadata on dev without changing anything: superblocks,
// checkpoint, journal replay, every object's map (sorted, non-overlapping,
// inside the data region, covered by its size), no block owned twice, and
// free space derived consistently. The error wraps ErrCorrupt when any
// problem is found (the report lists them), or is the I/O error that stopped
// the check. The engine must not be open for writing on dev.
func Check(dev Device) (Report, error) {
	var r Report
	if dev == nil {
		return r, fmt.Errorf("%w: nil device", errInvalid)
	}
	problem := func(err error) { r.Problems = append(r.Problems, err.Error()) }
	r.checkSuperblocks(dev)
	l, err := load(dev)
	if err != nil {
		// A corrupt device wraps ErrCorrupt; an I/O error stays one.
		problem(err)
		return r, fmt.Errorf("check: %w", err)
	}
	sb := &l.sb
	bs := int64(sb.BlockSize)
	r.Layout = Layout{
		Version: sb.Version, UUID: hex.EncodeToString(sb.UUID[:]),
		BlockSize: int(sb.BlockSize), DeviceBlockSize: int(sb.DevBlockSize),
		DeviceSize: sb.DeviceSize, TotalBlocks: sb.TotalBlocks,
		JournalStart: sb.JournalStart, JournalBlocks: sb.JournalBlocks,
		CheckpointStart: sb.CkptStart, CheckpointBlocks: sb.CkptBlocks,
		DataStart: sb.DataStart, DataBlocks: sb.TotalBlocks - sb.DataStart,
		MetadataBytes: sb.DataStart * bs, DataBytes: (sb.TotalBlocks - sb.DataStart) * bs,
	}
	r.Checkpoint = CheckpointState{Slot: l.ckptSlot, Seq: l.ckpt.Seq, Other: "ok"}
	if err := l.ckptErrs[1-l.ckptSlot]; err != nil {
		r.Checkpoint.Other = err.Error()
	}
	r.Journal = JournalState{Head: l.ring.head, LiveBlocks: l.ring.used, Transactions: l.ring.txs, LastSeq: l.ring.seq, Stop: l.stop}

	used := l.state.scan(problem)
	type owned struct {
		reserve.Extent
		owner string
	}
	var owners []owned
	for _, o := range l.state.objects() {
		or := ObjectReport{ID: o.id, Name: o.name, Size: o.size}
		o.tree.All(func(s extenttree.Segment) bool {
			if s.State == extenttree.Written {
				or.Extents = append(or.Extents, Extent{Offset: s.Start * bs, Length: s.Len * bs, Physical: s.Phys * bs, State: Written})
				owners = append(owners, owned{reserve.Extent{Start: s.Phys, Len: s.Len}, o.name})
			}
			return true
		})
		r.ExtentCount += int64(len(or.Extents))
		r.Objects = append(r.Objects, or)
	}
	r.ObjectCount = int64(len(r.Objects))
	if l.state.nextID <= maxID(r.Objects) {
		problem(fmt.Errorf("next object id %d is not above the largest id in use", l.state.nextID))
	}

	// No block owned twice.
	slices.SortFunc(owners, func(a, b owned) int { return cmp.Compare(a.Start, b.Start) })
	for i := 1; i < len(owners); i++ {
		if p, c := owners[i-1], owners[i]; c.Start < p.Start+p.Len {
			problem(fmt.Errorf("device blocks %d+%d of object %q overlap blocks %d+%d of object %q", c.Start, c.Len, c.owner, p.Start, p.Len, p.owner))
		}
	}
	// Free space derived from the maps, and both of the allocator's
	// indexes agreeing on it.
	if sp, err := reserve.NewSpace(sb.TotalBlocks, used); err != nil {
		problem(fmt.Errorf("deriving free space: %w", err))
	} else {
		if err := sp.Check(); err != nil {
			problem(fmt.Errorf("free space: %w", err))
		}
		st := sp.Stats()
		r.FreeBlocks = st.Free
		r.UsedBlocks = sb.TotalBlocks - sb.DataStart - st.Free
		if st.Reserved != 0 {
			problem(fmt.Errorf("%d blocks reserved right after load", st.Reserved))
		}
	}
	if len(r.Problems) > 0 {
		return r, fmt.Errorf("%w: check found %d problems; the first: %s", ErrCorrupt, len(r.Problems), r.Problems[0])
	}
	return r, nil
}

func maxID(objs []ObjectReport) uint64 {
	var m uint64
	for _, o := range objs {
		m = max(m, o.ID)
	}
	return m
}

// checkSuperblocks reports each copy. Both are written at Format and never
// again, so a bad copy is damage, not a crash.
func (r *Report) checkSuperblocks(dev Device) {
	_, errs := readSuperblocks(dev)
	for i, err := range errs {
		r.Superblocks[i] = "ok"
		if err != nil {
			r.Superblocks[i] = err.Error()
			r.Problems = append(r.Problems, fmt.Sprintf("superblock %c: %v", 'A'+i, err))
		}
	}
}

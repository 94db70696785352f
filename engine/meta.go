package engine

import (
	"errors"
	"fmt"
	"slices"

	"github.com/rawblock/rawblock/extenttree"
	"github.com/rawblock/rawblock/reserve"
)

// Loading the metadata: newest valid superblock → newest valid checkpoint →
// replay the journal until the first transaction whose checksum, sequence or
// chain is wrong → derive free space. Open and Check share this code; it
// reads and never writes, so a crash during recovery is just another crash.

// metaObj is one object's durable metadata.
type metaObj struct {
	id   uint64
	name string
	size int64
	tree *extenttree.Tree
}

// metaState is the object table being loaded.
type metaState struct {
	sb     *superblock
	nextID uint64
	byID   map[uint64]*metaObj
	byName map[string]*metaObj
}

func newMetaState(sb *superblock, c *checkpoint) (*metaState, error) {
	m := &metaState{
		sb:     sb,
		nextID: c.NextObjectID,
		byID:   make(map[uint64]*metaObj, len(c.Objects)),
		byName: make(map[string]*metaObj, len(c.Objects)),
	}
	for _, co := range c.Objects {
		o := &metaObj{id: co.ID, name: co.Name, size: co.Size, tree: extenttree.New()}
		for _, x := range co.Extents {
			if err := m.checkPhys(x.Physical, x.Length); err != nil {
				return nil, fmt.Errorf("object %q: %w", co.Name, err)
			}
			if err := o.tree.MapWritten(x.Logical, x.Length, x.Physical); err != nil {
				return nil, fmt.Errorf("object %q: %w", co.Name, err)
			}
		}
		m.byID[o.id], m.byName[o.name] = o, o
	}
	return m, nil
}

func (m *metaState) checkPhys(p, n int64) error {
	if p < m.sb.DataStart || n <= 0 || p > m.sb.TotalBlocks-n {
		return fmt.Errorf("extent at block %d+%d lies outside the data region [%d,%d)", p, n, m.sb.DataStart, m.sb.TotalBlocks)
	}
	return nil
}

// apply replays one journal operation. Operations on an object that a later
// (or already applied) removal deleted are skipped: ids are never reused.
func (m *metaState) apply(op jop) error {
	if op.kind == opCreate {
		if o := m.byID[op.id]; o != nil {
			if o.name != op.name {
				return fmt.Errorf("create object %d %q: it exists as %q", op.id, op.name, o.name)
			}
			return nil
		}
		if o := m.byName[op.name]; o != nil {
			return fmt.Errorf("create object %d %q: the name belongs to object %d", op.id, op.name, o.id)
		}
		o := &metaObj{id: op.id, name: op.name, tree: extenttree.New()}
		m.byID[o.id], m.byName[o.name] = o, o
		m.nextID = max(m.nextID, op.id+1)
		return nil
	}
	o := m.byID[op.id]
	if o == nil {
		if op.id < m.nextID {
			return nil // removed
		}
		return fmt.Errorf("operation %d on object %d, which was never created (next id %d)", op.kind, op.id, m.nextID)
	}
	switch op.kind {
	case opRemove:
		delete(m.byID, o.id)
		delete(m.byName, o.name)
	case opSize:
		o.size = op.size
	case opMap:
		if err := m.checkPhys(op.physical, op.length); err != nil {
			return fmt.Errorf("object %q: %w", o.name, err)
		}
		if _, _, err := o.tree.Punch(nil, op.logical, op.length); err != nil {
			return fmt.Errorf("object %q: %w", o.name, err)
		}
		if err := o.tree.MapWritten(op.logical, op.length, op.physical); err != nil {
			return fmt.Errorf("object %q: %w", o.name, err)
		}
	case opUnmap:
		if _, _, err := o.tree.Punch(nil, op.logical, op.length); err != nil {
			return fmt.Errorf("object %q: %w", o.name, err)
		}
	}
	return nil
}

// objects returns the loaded objects ordered by id.
func (m *metaState) objects() []*metaObj {
	out := make([]*metaObj, 0, len(m.byID))
	for _, o := range m.byID {
		out = append(out, o)
	}
	slices.SortFunc(out, func(a, b *metaObj) int {
		switch {
		case a.id < b.id:
			return -1
		case a.id > b.id:
			return 1
		}
		return 0
	})
	return out
}

// usedExtents lists the metadata region and every mapped extent; it checks
// that each object's map is sane and covered by its size, and fails on the
// first problem.
func (m *metaState) usedExtents() ([]reserve.Extent, error) {
	var first error
	used := m.scan(func(err error) {
		if first == nil {
			first = err
		}
	})
	return used, first
}

// scan is usedExtents reporting every problem to problem.
func (m *metaState) scan(problem func(error)) []reserve.Extent {
	used := []reserve.Extent{{Start: 0, Len: m.sb.DataStart}}
	bs := int64(m.sb.BlockSize)
	for _, o := range m.objects() {
		if err := o.tree.Check(); err != nil {
			problem(fmt.Errorf("object %q: extent map: %w", o.name, err))
			continue
		}
		o.tree.All(func(s extenttree.Segment) bool {
			if s.State != extenttree.Written {
				problem(fmt.Errorf("object %q: blocks %d+%d are %v in durable metadata", o.name, s.Start, s.Len, s.State))
				return true
			}
			if s.End() > (o.size+bs-1)/bs {
				problem(fmt.Errorf("object %q: extent %d+%d lies past its size %d", o.name, s.Start, s.Len, o.size))
			}
			if err := m.checkPhys(s.Phys, s.Len); err != nil {
				problem(fmt.Errorf("object %q: %w", o.name, err))
				return true
			}
			used = append(used, reserve.Extent{Start: s.Phys, Len: s.Len})
			return true
		})
	}
	return used
}

// ringPos is where the journal stands: the next transaction's place and
// sequence, and how much of the ring is live since the newest checkpoint.
type ringPos struct {
	head  int64  // block, relative to the journal start, of the next transaction
	used  int64  // live blocks since the checkpoint, wrap waste included
	seq   uint64 // the last sequence number used (transaction or checkpoint)
	chain uint32 // prev value of the next transaction
	txs   int    // transactions replayed at open
}

// loaded is the result of reading a device's metadata.
type loaded struct {
	sb       superblock
	ckpt     *checkpoint // the newest valid one (objects dropped after loading)
	ckptSlot int
	ckptErrs [2]error // why a slot was not valid
	state    *metaState
	ring     ringPos
	stop     string // why replay stopped
}

// ringWindow is how many journal blocks replay reads at once.
const ringWindow = 256

// ringReader reads journal blocks through a window, so replaying many small
// transactions does not cost one device read each.
type ringReader struct {
	dev      Device
	sb       *superblock
	win      []byte
	winStart int64
	winN     int64
}

func (r *ringReader) read(pos, n int64) ([]byte, error) {
	bs := int64(r.sb.BlockSize)
	if pos >= r.winStart && pos+n <= r.winStart+r.winN {
		return r.win[(pos-r.winStart)*bs : (pos-r.winStart+n)*bs], nil
	}
	cnt := min(max(n, ringWindow), r.sb.JournalBlocks-pos)
	if int64(cap(r.win)) < cnt*bs {
		r.win = alignedBuf(int(cnt * bs))
	}
	r.win = r.win[:cnt*bs]
	r.winN = 0
	if err := readFull(r.dev, r.win, (r.sb.JournalStart+pos)*bs); err != nil {
		return nil, fmt.Errorf("read journal blocks %d+%d: %w", pos, cnt, err)
	}
	r.winStart, r.winN = pos, cnt
	return r.win[:n*bs], nil
}

func readFull(dev Device, p []byte, off int64) error {
	n, err := dev.ReadAt(p, off)
	return whole("read", n, len(p), off, err)
}

// errStop marks a transaction that does not continue the journal: the end of
// replay, not an error.
var errStop = errors.New("end of journal")

// txAt reads the transaction at pos if it is the one that continues the
// ring: right magic, uuid, sequence and chain, inside the ring, checksum
// right.
func (r *ringReader) txAt(pos int64, j *ringPos) (payload []byte, h txHdr, err error) {
	first, err := r.read(pos, 1)
	if err != nil {
		return nil, h, err
	}
	h, err = parseTxHeader(first)
	switch {
	case err != nil:
		return nil, h, fmt.Errorf("%w: block %d: %v", errStop, pos, err)
	case h.uuid != r.sb.UUID:
		return nil, h, fmt.Errorf("%w: block %d: transaction of another format", errStop, pos)
	case h.seq != j.seq+1 || h.prev != j.chain:
		return nil, h, fmt.Errorf("%w: block %d: sequence %d (chain %08x), want %d (chain %08x)", errStop, pos, h.seq, h.prev, j.seq+1, j.chain)
	case int64(h.blocks) > r.sb.JournalBlocks-pos:
		return nil, h, fmt.Errorf("%w: block %d: %d-block transaction runs past the ring", errStop, pos, h.blocks)
	}
	data, err := r.read(pos, int64(h.blocks))
	if err != nil {
		return nil, h, err
	}
	payload, err = verifyTx(data, h)
	if err != nil {
		return nil, h, fmt.Errorf("%w: block %d: transaction %d: %v (torn write)", errStop, pos, h.seq, err)
	}
	return payload, h, nil
}

// replay applies the journal after checkpoint c to m and returns where the
// journal stands, and why replay stopped.
func replay(dev Device, sb *superblock, m *metaState, c *checkpoint) (ringPos, string, error) {
	jb := sb.JournalBlocks
	j := ringPos{head: c.JournalPos, seq: c.Seq, chain: c.Chain}
	if j.head < 0 || j.head >= jb {
		return j, "", fmt.Errorf("%w: checkpoint %d: journal position %d outside the %d-block ring", ErrCorrupt, c.Seq, j.head, jb)
	}
	r := ringReader{dev: dev, sb: sb}
	for {
		pos, waste := j.head, int64(0)
		payload, h, err := r.txAt(pos, &j)
		if errors.Is(err, errStop) && pos != 0 {
			// The writer wraps to the ring's start when a transaction
			// does not fit before its end.
			p2, h2, err2 := r.txAt(0, &j)
			switch {
			case err2 == nil:
				payload, h, err, pos, waste = p2, h2, nil, 0, jb-j.head
			case !errors.Is(err2, errStop):
				return j, "", err2
			}
		}
		if err != nil {
			if errors.Is(err, errStop) {
				return j, err.Error(), nil
			}
			return j, "", err
		}
		if j.used+waste+int64(h.blocks) > jb {
			return j, "ring full", nil
		}
		if err := decodeOps(payload, m.apply); err != nil {
			return j, "", fmt.Errorf("%w: journal transaction %d at block %d: %w", ErrCorrupt, h.seq, pos, err)
		}
		j.used += waste + int64(h.blocks)
		j.head = (pos + int64(h.blocks)) % jb
		j.seq, j.chain = h.seq, h.crc
		j.txs++
	}
}

// readCheckpoint loads and decodes the checkpoint in slot i.
func readCheckpoint(dev Device, sb *superblock, i int) (*checkpoint, error) {
	bs := int64(sb.BlockSize)
	first := alignedBuf(int(bs))
	if err := readFull(dev, first, sb.CkptStart[i]*bs); err != nil {
		return nil, fmt.Errorf("read checkpoint %c: %w", 'A'+i, err)
	}
	_, count, err := ckptHeader(first)
	if err != nil {
		return nil, err
	}
	if count < 1 || int64(count) > sb.CkptBlocks {
		return nil, fmt.Errorf("%w: checkpoint %c claims %d blocks, the region holds %d", ErrCorrupt, 'A'+i, count, sb.CkptBlocks)
	}
	data := alignedBuf(count * int(bs))
	copy(data, first)
	if count > 1 {
		if err := readFull(dev, data[bs:], (sb.CkptStart[i]+1)*bs); err != nil {
			return nil, fmt.Errorf("read checkpoint %c: %w", 'A'+i, err)
		}
	}
	return decodeCheckpoint(data, int(bs))
}

// load reads the device's metadata: the recovery procedure of Open, also
// used by Check.
func load(dev Device) (*loaded, error) {
	sb, err := readSuperblock(dev)
	if err != nil {
		return nil, err
	}
	if dev.Size() < sb.TotalBlocks*int64(sb.BlockSize) {
		return nil, fmt.Errorf("%w: device has %d bytes, smaller than the %d it was formatted with", ErrCorrupt, dev.Size(), sb.DeviceSize)
	}
	if dev.BlockSize() > int(sb.BlockSize) {
		return nil, fmt.Errorf("%w: device logical block size %d exceeds the engine block size %d", ErrCorrupt, dev.BlockSize(), sb.BlockSize)
	}
	l := &loaded{sb: sb, ckptSlot: -1}
	// The newest valid checkpoint wins; a torn or damaged one falls back
	// to the other slot.
	for i := 0; i < 2; i++ {
		c, err := readCheckpoint(dev, &l.sb, i)
		if err != nil && !errors.Is(err, ErrCorrupt) {
			// Unreadable is not invalid: falling back to the older
			// checkpoint would silently lose what the newer one holds.
			return nil, fmt.Errorf("load metadata: %w", err)
		}
		l.ckptErrs[i] = err
		if err == nil && (l.ckpt == nil || c.Seq > l.ckpt.Seq) {
			l.ckpt, l.ckptSlot = c, i
		}
	}
	if l.ckpt == nil {
		return nil, fmt.Errorf("no valid checkpoint: A: %w; B: %v", l.ckptErrs[0], l.ckptErrs[1])
	}
	if l.state, err = newMetaState(&l.sb, l.ckpt); err != nil {
		return nil, fmt.Errorf("%w: checkpoint %c: %w", ErrCorrupt, 'A'+l.ckptSlot, err)
	}
	l.ckpt.Objects = nil // loaded into state
	if l.ring, l.stop, err = replay(dev, &l.sb, l.state, l.ckpt); err != nil {
		return nil, err
	}
	return l, nil
}

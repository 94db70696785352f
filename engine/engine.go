package engine

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ncw/directio"

	"github.com/rawblock/rawblock/cache"
	"github.com/rawblock/rawblock/extenttree"
	"github.com/rawblock/rawblock/reserve"
)

// FormatOptions are the parameters of Format.
type FormatOptions struct {
	BlockSize    int   // engine block; 0 = 4096; power of two, ≥ dev.BlockSize(), ≤ 65536
	MetadataSize int64 // bytes for journal + checkpoints; 0 = scaled to the device
}

// Options are the parameters of Open.
type Options struct {
	CacheSize  int64 // page cache bytes, clean + dirty; 0 = 256 MiB
	DirtyLimit int64 // dirty bytes at which writers wait; 0 = CacheSize/2
	ReadOnly   bool
}

const (
	defaultCacheSize = 256 << 20
	// minCacheSize keeps enough frames for writeback and reads in flight.
	minCacheSize = 4 << 20
	// maxIOBytes caps one device I/O issued by writeback or a read.
	maxIOBytes = 1 << 20
	// ioParallel bounds the device I/Os one writeback keeps in flight.
	ioParallel = 32
	// bgWriters and syncWriters: how many objects background writeback and
	// Sync write back at once.
	bgWriters   = 4
	syncWriters = 4
	// writeChunkBlocks bounds the blocks one WriteAt step dirties under
	// the object lock, so readers and writeback interleave with big writes.
	writeChunkBlocks = 256
	// dirtyExpire is how old dirty data may get before background writeback
	// writes it even without memory pressure.
	dirtyExpire = 5 * time.Second
	// windowIdle is how long an object may not be flushed before its
	// allocation window is given back.
	windowIdle = 30 * time.Second
)

// ExtentState is the state of an object extent.
type ExtentState uint8

// Extent states, see DESIGN.md.
const (
	Delalloc  ExtentState = iota + 1 // dirty in the cache, space reserved, no blocks yet
	Unwritten                        // blocks allocated, data not yet durable: reads zeros without a page
	Written                          // blocks hold the data
)

func (s ExtentState) String() string {
	switch s {
	case Delalloc:
		return "delalloc"
	case Unwritten:
		return "unwritten"
	case Written:
		return "written"
	}
	return fmt.Sprintf("ExtentState(%d)", uint8(s))
}

// Extent is one contiguous range of an object's map.
type Extent struct {
	Offset, Length int64 // logical bytes
	Physical       int64 // device byte offset; -1 for Delalloc
	State          ExtentState
}

// Stats is a snapshot of the engine's counters.
type Stats struct {
	TotalBytes, FreeBytes, ReservedBytes int64 // FreeBytes − ReservedBytes can still be written
	FreeExtents, LargestFreeBytes        int64 // fragmentation of free space
	CachedBytes, DirtyBytes              int64
	Allocations                          uint64 // extents allocated by writeback
	DeviceWrites, DeviceReads            uint64 // I/Os issued to the device
	DeviceBytesWritten, DeviceBytesRead  uint64
	CacheHits, CacheMisses               uint64
}

// errInvalid is the root of bad-argument errors; it matches fs.ErrInvalid.
var errInvalid = fs.ErrInvalid

// Engine is an open rawblock device. All methods are safe for concurrent use.
type Engine struct {
	dev      Device
	sb       superblock
	bs       int
	shift    uint
	readOnly bool

	cache *cache.Cache
	space *reserve.Space

	// life is held shared by every public call and exclusively by Close, so
	// Close waits for calls in flight before it tears anything down.
	life   sync.RWMutex
	closed atomic.Bool

	mu      sync.RWMutex // objects, nextID
	objects map[string]*Object
	nextID  uint64

	dirtyMu   sync.Mutex
	dirtyObjs map[*Object]struct{}

	// gate orders writeback against checkpoints: writeback marks extents
	// written holding it shared; commit holds it exclusively across its
	// device flush and metadata snapshot.
	gate      sync.RWMutex
	syncMu    sync.Mutex // one checkpoint at a time
	ckptSeq   uint64     // sequence of the newest durable checkpoint
	ckptSlot  int        // the slot it lives in
	ckptBuf   []byte
	metaDirty atomic.Bool
	// freeSeq is the checkpoint sequence that will first exclude an extent
	// freed now; commit advances it before taking its snapshot.
	freeSeq atomic.Uint64

	kick    chan struct{}
	stop    chan struct{}
	bgDone  chan struct{}
	bufPool sync.Pool // aligned maxIO buffers for bounce copies

	allocations, devWrites, devReads, devBytesW, devBytesR atomic.Uint64
}

// alignedBuf returns a buffer aligned for O_DIRECT. directio aligns to 4096,
// which covers every logical block size the device accepts.
func alignedBuf(n int) []byte { return directio.AlignedBlock(n) }

func checkName(name string) error {
	if len(name) == 0 || len(name) > MaxNameLen {
		return fmt.Errorf("%w: object name of %d bytes (1..%d)", errInvalid, len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		if name[i] == 0 {
			return fmt.Errorf("%w: object name %q contains NUL", errInvalid, name)
		}
	}
	return nil
}

// Format writes an empty rawblock layout onto dev. Everything on it is lost.
func Format(dev Device, opts FormatOptions) error {
	if dev == nil {
		return fmt.Errorf("%w: nil device", errInvalid)
	}
	devBS := dev.BlockSize()
	bs := opts.BlockSize
	if bs == 0 {
		bs = max(4096, devBS)
	}
	if !isPow2(uint64(bs)) || bs < MinBlockSize || bs > MaxBlockSize {
		return fmt.Errorf("%w: block size %d is not a power of two in %d..%d", errInvalid, bs, MinBlockSize, MaxBlockSize)
	}
	if bs < devBS {
		return fmt.Errorf("%w: block size %d is smaller than the device's logical block size %d", errInvalid, bs, devBS)
	}
	sb, err := layout(dev.Size(), devBS, bs, opts.MetadataSize)
	if err != nil {
		return err
	}
	if _, err := rand.Read(sb.UUID[:]); err != nil {
		return fmt.Errorf("format: uuid: %w", err)
	}
	sb.Generation = 1
	buf := alignedBuf(bs)
	// Invalidate what an earlier format left in the journal and checkpoint
	// B, write an empty checkpoint A, and only then the superblocks: a
	// crash part way leaves either the old device or nothing that opens.
	for _, blk := range []int64{sb.JournalStart, sb.CkptStart[1], 0, 1} {
		if _, err := dev.WriteAt(buf, blk*int64(bs)); err != nil {
			return fmt.Errorf("format: clear block %d: %w", blk, err)
		}
	}
	c := &checkpoint{Seq: 1, NextObjectID: 1}
	data, err := encodeCheckpoint(alignedBuf(bs), c, bs, sb.CkptBlocks)
	if err != nil {
		return err
	}
	if _, err := dev.WriteAt(data, sb.CkptStart[0]*int64(bs)); err != nil {
		return fmt.Errorf("format: write checkpoint: %w", err)
	}
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("format: flush: %w", err)
	}
	sb.encode(buf)
	for blk := int64(0); blk < 2; blk++ {
		if _, err := dev.WriteAt(buf, blk*int64(bs)); err != nil {
			return fmt.Errorf("format: write superblock %c: %w", 'A'+blk, err)
		}
	}
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("format: flush: %w", err)
	}
	return nil
}

// readSuperblock finds the newest valid superblock copy. Copy A is at byte 0;
// copy B is one engine block further, so when A is unreadable every possible
// block size is tried for B.
func readSuperblock(dev Device) (superblock, error) {
	devBS := dev.BlockSize()
	if devBS <= 0 || devBS > MaxBlockSize || !isPow2(uint64(devBS)) {
		return superblock{}, fmt.Errorf("%w: device block size %d", errInvalid, devBS)
	}
	buf := alignedBuf(max(devBS, superblockLen))
	buf = buf[:devBS*((superblockLen+devBS-1)/devBS)]
	read := func(off int64) (superblock, error) {
		if off+int64(len(buf)) > dev.Size() {
			return superblock{}, errNotFormatted
		}
		if _, err := dev.ReadAt(buf, off); err != nil {
			return superblock{}, fmt.Errorf("read superblock at %d: %w", off, err)
		}
		return decodeSuperblock(buf)
	}
	a, errA := read(0)
	var b superblock
	var errB error = errNotFormatted
	if errA == nil {
		b, errB = read(int64(a.BlockSize))
	} else {
		for bs := max(devBS, MinBlockSize); bs <= MaxBlockSize; bs *= 2 {
			if s, err := read(int64(bs)); err == nil && int(s.BlockSize) == bs {
				b, errB = s, nil
				break
			} else if !errors.Is(err, errNotFormatted) {
				errB = err
			}
		}
	}
	switch {
	case errA == nil && errB == nil:
		if b.Generation > a.Generation {
			return b, nil
		}
		return a, nil
	case errA == nil:
		return a, nil
	case errB == nil:
		return b, nil
	}
	// Neither copy is valid: report the more informative failure.
	if errors.Is(errA, errNotFormatted) {
		return superblock{}, errB
	}
	return superblock{}, fmt.Errorf("superblock A: %w (copy B: %v)", errA, errB)
}

// readCheckpoint loads and decodes the checkpoint in slot i.
func (e *Engine) readCheckpoint(i int) (*checkpoint, error) {
	bs := int64(e.bs)
	first := alignedBuf(e.bs)
	if _, err := e.dev.ReadAt(first, e.sb.CkptStart[i]*bs); err != nil {
		return nil, fmt.Errorf("read checkpoint %c: %w", 'A'+i, err)
	}
	_, count, err := ckptHeader(first)
	if err != nil {
		return nil, err
	}
	if count < 1 || int64(count) > e.sb.CkptBlocks {
		return nil, fmt.Errorf("%w: checkpoint %c claims %d blocks, the region holds %d", ErrCorrupt, 'A'+i, count, e.sb.CkptBlocks)
	}
	data := alignedBuf(count * e.bs)
	copy(data, first)
	if count > 1 {
		if _, err := e.dev.ReadAt(data[e.bs:], (e.sb.CkptStart[i]+1)*bs); err != nil {
			return nil, fmt.Errorf("read checkpoint %c: %w", 'A'+i, err)
		}
	}
	return decodeCheckpoint(data, e.bs)
}

// Open opens a formatted device. The caller keeps ownership of dev: Close
// leaves it open.
func Open(dev Device, opts Options) (*Engine, error) {
	if dev == nil {
		return nil, fmt.Errorf("%w: nil device", errInvalid)
	}
	if opts.CacheSize < 0 || opts.DirtyLimit < 0 {
		return nil, fmt.Errorf("%w: negative CacheSize or DirtyLimit", errInvalid)
	}
	if opts.CacheSize == 0 {
		opts.CacheSize = defaultCacheSize
	}
	if opts.CacheSize < minCacheSize {
		return nil, fmt.Errorf("%w: CacheSize %d is below the minimum %d", errInvalid, opts.CacheSize, minCacheSize)
	}
	if opts.DirtyLimit == 0 {
		opts.DirtyLimit = opts.CacheSize / 2
	}
	if opts.DirtyLimit >= opts.CacheSize {
		return nil, fmt.Errorf("%w: DirtyLimit %d must be below CacheSize %d", errInvalid, opts.DirtyLimit, opts.CacheSize)
	}
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
	e := &Engine{
		dev:       dev,
		sb:        sb,
		bs:        int(sb.BlockSize),
		readOnly:  opts.ReadOnly,
		objects:   make(map[string]*Object),
		dirtyObjs: make(map[*Object]struct{}),
		kick:      make(chan struct{}, 1),
		stop:      make(chan struct{}),
		bgDone:    make(chan struct{}),
	}
	for 1<<e.shift < e.bs {
		e.shift++
	}
	e.bufPool.New = func() any { b := alignedBuf(max(maxIOBytes, e.bs)); return &b }

	// The newest valid checkpoint wins; a torn or damaged one falls back
	// to the other slot.
	var best *checkpoint
	var errs [2]error
	for i := 0; i < 2; i++ {
		c, err := e.readCheckpoint(i)
		errs[i] = err
		if err == nil && (best == nil || c.Seq > best.Seq) {
			best, e.ckptSlot = c, i
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no valid checkpoint: A: %w; B: %v", errs[0], errs[1])
	}
	e.ckptSeq, e.nextID = best.Seq, best.NextObjectID
	e.freeSeq.Store(e.ckptSeq + 1)
	used := []reserve.Extent{{Start: 0, Len: sb.DataStart}}
	for _, co := range best.Objects {
		o := e.newObject(co.ID, co.Name)
		o.size = co.Size
		for _, x := range co.Extents {
			if x.Physical < sb.DataStart || x.Physical+x.Length > sb.TotalBlocks {
				return nil, fmt.Errorf("%w: object %q: extent at block %d+%d lies outside the data region [%d,%d)", ErrCorrupt, co.Name, x.Physical, x.Length, sb.DataStart, sb.TotalBlocks)
			}
			if err := o.tree.MapWritten(x.Logical, x.Length, x.Physical); err != nil {
				return nil, fmt.Errorf("%w: object %q: %w", ErrCorrupt, co.Name, err)
			}
			used = append(used, reserve.Extent{Start: x.Physical, Len: x.Length})
		}
		e.objects[co.Name] = o
	}
	e.space, err = reserve.NewSpace(sb.TotalBlocks, used)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	if err := e.space.Check(); err != nil {
		return nil, fmt.Errorf("%w: free space derived at open: %w", ErrCorrupt, err)
	}
	e.cache, err = cache.New(cache.Options{
		Size:       opts.CacheSize,
		BlockSize:  e.bs,
		DirtyLimit: opts.DirtyLimit,
		Kick:       e.kickWriteback,
	})
	if err != nil {
		return nil, fmt.Errorf("open: page cache: %w", err)
	}
	if fd, ok := dev.(*FileDevice); ok {
		// Best effort: without registration the device uses plain READ/WRITE.
		_ = fd.RegisterArena(e.cache.Arena())
	}
	if !e.readOnly {
		go e.background()
	} else {
		close(e.bgDone)
	}
	return e, nil
}

func (e *Engine) newObject(id uint64, name string) *Object {
	return &Object{
		e:     e,
		id:    id,
		name:  name,
		tree:  extenttree.New(),
		dirty: make(map[int64]*cache.Page),
		wb:    make(map[int64]*cache.Page),
	}
}

// enter admits a public call; exit must follow. It fails once Close began.
func (e *Engine) enter() error {
	e.life.RLock()
	if e.closed.Load() {
		e.life.RUnlock()
		return ErrClosed
	}
	return nil
}

func (e *Engine) exit() { e.life.RUnlock() }

func (e *Engine) enterWrite() error {
	if err := e.enter(); err != nil {
		return err
	}
	if e.readOnly {
		e.exit()
		return ErrReadOnly
	}
	return nil
}

// Create makes a new, empty object. It fails with fs.ErrExist if the name
// is taken.
func (e *Engine) Create(name string) (*Object, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := e.enterWrite(); err != nil {
		return nil, err
	}
	defer e.exit()
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.objects[name]; ok {
		return nil, fmt.Errorf("create %q: %w", name, fs.ErrExist)
	}
	o := e.newObject(e.nextID, name)
	e.nextID++
	e.objects[name] = o
	e.metaDirty.Store(true)
	return o, nil
}

// Object returns the object called name, or fs.ErrNotExist.
func (e *Engine) Object(name string) (*Object, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := e.enter(); err != nil {
		return nil, err
	}
	defer e.exit()
	e.mu.RLock()
	defer e.mu.RUnlock()
	o, ok := e.objects[name]
	if !ok {
		return nil, fmt.Errorf("object %q: %w", name, fs.ErrNotExist)
	}
	return o, nil
}

// Objects returns the names of all objects, sorted.
func (e *Engine) Objects() []string {
	if e.enter() != nil {
		return nil
	}
	defer e.exit()
	e.mu.RLock()
	names := make([]string, 0, len(e.objects))
	for n := range e.objects {
		names = append(names, n)
	}
	e.mu.RUnlock()
	slices.Sort(names)
	return names
}

// Remove deletes an object and frees its space. The space becomes
// allocatable once the metadata recording the removal is durable.
func (e *Engine) Remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := e.enterWrite(); err != nil {
		return err
	}
	defer e.exit()
	e.mu.Lock()
	o, ok := e.objects[name]
	if ok {
		delete(e.objects, name)
	}
	e.mu.Unlock()
	if !ok {
		return fmt.Errorf("remove %q: %w", name, fs.ErrNotExist)
	}
	o.wmu.Lock()
	defer o.wmu.Unlock()
	o.wbMu.Lock()
	defer o.wbMu.Unlock()
	o.mu.Lock()
	defer o.mu.Unlock()
	o.removed = true
	err := o.truncateBlocksLocked(0)
	o.releaseWindowLocked()
	e.cache.RemoveObject(o.id)
	e.metaDirty.Store(true)
	return err
}

// Stats returns a snapshot of the engine's counters.
func (e *Engine) Stats() Stats {
	if e.enter() != nil {
		return Stats{}
	}
	defer e.exit()
	bs := int64(e.bs)
	sp := e.space.Stats()
	cs := e.cache.Stats()
	return Stats{
		TotalBytes:         (e.sb.TotalBlocks - e.sb.DataStart) * bs,
		FreeBytes:          (sp.Free + sp.Reserved) * bs,
		ReservedBytes:      sp.Reserved * bs,
		FreeExtents:        int64(sp.FreeExtents),
		LargestFreeBytes:   sp.LargestFree * bs,
		CachedBytes:        cs.CachedBytes,
		DirtyBytes:         cs.DirtyBytes,
		Allocations:        e.allocations.Load(),
		DeviceWrites:       e.devWrites.Load(),
		DeviceReads:        e.devReads.Load(),
		DeviceBytesWritten: e.devBytesW.Load(),
		DeviceBytesRead:    e.devBytesR.Load(),
		CacheHits:          cs.Hits,
		CacheMisses:        cs.Misses,
	}
}

// Sync makes every object's acknowledged writes, sizes, existence and every
// removal durable.
func (e *Engine) Sync() error {
	if err := e.enter(); err != nil {
		return err
	}
	defer e.exit()
	if e.readOnly {
		return nil
	}
	return e.syncAll(false)
}

// syncAll writes back every dirty object, flushes, and writes a checkpoint
// if any metadata changed (always when force is set).
func (e *Engine) syncAll(force bool) error {
	objs := e.dirtyList()
	first := e.writebackObjects(objs, syncWriters)
	if first != nil {
		for _, o := range objs {
			o.takeWbErr()
		}
		return first
	}
	if err := e.commit(force); err != nil {
		return err
	}
	// Report, once, writeback failures whose pages have been written since.
	all := e.objectList()
	for _, o := range all {
		if err := o.takeWbErr(); err != nil {
			first = cmpErr(first, fmt.Errorf("an earlier writeback failed (its data has been written again since): %w", err))
		}
	}
	return first
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// commit flushes the device and, if metadata changed, writes a checkpoint
// into the older slot and flushes again. Only then do freed extents become
// allocatable.
func (e *Engine) commit(force bool) error {
	e.syncMu.Lock()
	defer e.syncMu.Unlock()
	e.gate.Lock()
	if err := e.flushDevice(); err != nil {
		e.gate.Unlock()
		return err
	}
	if !force && !e.metaDirty.Load() {
		e.gate.Unlock()
		return nil
	}
	// Clear the flag before the snapshot: a change racing with it sets it
	// again and is caught by the next commit.
	e.metaDirty.Store(false)
	seq := e.ckptSeq + 1
	// Extents freed from here on may still be in this snapshot: they wait
	// for the next checkpoint.
	e.freeSeq.Store(seq + 1)
	c := e.snapshot()
	e.gate.Unlock()
	c.Seq = seq
	data, err := encodeCheckpoint(e.ckptBuf, c, e.bs, e.sb.CkptBlocks)
	if err != nil {
		e.metaDirty.Store(true)
		return fmt.Errorf("%w: %w", ErrNoSpace, err)
	}
	e.ckptBuf = data
	slot := 1 - e.ckptSlot
	if err := e.writeDev(data, e.sb.CkptStart[slot]*int64(e.bs)); err != nil {
		e.metaDirty.Store(true)
		return fmt.Errorf("write checkpoint: %w", err)
	}
	if err := e.flushDevice(); err != nil {
		e.metaDirty.Store(true)
		return err
	}
	e.ckptSeq, e.ckptSlot = c.Seq, slot
	e.space.Commit(c.Seq)
	return nil
}

// snapshot captures the durable part of the metadata: names, sizes and
// Written extents (whose data writeback flushed before marking them).
func (e *Engine) snapshot() *checkpoint {
	e.mu.RLock()
	objs := make([]*Object, 0, len(e.objects))
	for _, o := range e.objects {
		objs = append(objs, o)
	}
	c := &checkpoint{NextObjectID: e.nextID}
	e.mu.RUnlock()
	c.Objects = make([]ckptObject, 0, len(objs))
	for _, o := range objs {
		o.mu.RLock()
		if o.removed {
			o.mu.RUnlock()
			continue
		}
		co := ckptObject{ID: o.id, Name: o.name, Size: o.size}
		o.treeMu.Lock()
		o.tree.All(func(s extenttree.Segment) bool {
			if s.State == extenttree.Written {
				co.Extents = append(co.Extents, ckptExtent{s.Start, s.Phys, s.Len})
			}
			return true
		})
		o.treeMu.Unlock()
		o.mu.RUnlock()
		c.Objects = append(c.Objects, co)
	}
	slices.SortFunc(c.Objects, func(a, b ckptObject) int { return int(a.ID - b.ID) })
	return c
}

// Close writes everything back, writes a final checkpoint and releases the
// cache. The device stays open. Every later call returns ErrClosed.
func (e *Engine) Close() error {
	if e.closed.Swap(true) {
		return ErrClosed
	}
	// Wait for calls in flight; background writeback keeps running so that
	// writers throttled on dirty memory can finish.
	e.life.Lock()
	defer e.life.Unlock()
	close(e.stop)
	<-e.bgDone
	var err error
	if !e.readOnly {
		err = e.syncAll(true)
		if err == nil {
			// Everything was written back: no reservation may remain.
			if sp := e.space.Stats(); sp.Reserved != 0 {
				err = fmt.Errorf("rawblock: invariant broken: %d blocks still reserved after the final writeback", sp.Reserved)
			} else if cerr := e.space.Check(); cerr != nil {
				err = fmt.Errorf("rawblock: invariant broken at close: %w", cerr)
			}
		}
	}
	e.mu.Lock()
	for _, o := range e.objects {
		o.mu.Lock()
		o.releaseWindowLocked()
		o.dropPagesLocked(0)
		o.mu.Unlock()
	}
	e.mu.Unlock()
	if fd, ok := e.dev.(*FileDevice); ok {
		if uerr := fd.RegisterArena(nil); uerr != nil && err == nil {
			err = fmt.Errorf("close: unregister cache arena: %w", uerr)
		}
	}
	if cerr := e.cache.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("close: page cache: %w", cerr)
	}
	return err
}

func (e *Engine) kickWriteback() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// background is the writeback daemon: it writes back everything dirty when
// the cache signals pressure, and data older than dirtyExpire otherwise.
func (e *Engine) background() {
	defer close(e.bgDone)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		var all bool
		select {
		case <-e.stop:
			return
		case <-e.kick:
			all = true
		case <-tick.C:
		}
		now := time.Now()
		var due []*Object
		for _, o := range e.dirtyList() {
			if all || o.dirtyAge(now) > dirtyExpire {
				due = append(due, o)
			}
		}
		// An error stays with the object's dirty pages; the next Sync
		// retries and reports it.
		_ = e.writebackObjects(due, bgWriters)
		if !all {
			e.releaseIdleWindows(now)
		}
	}
}

// dirtyList returns the objects that have dirty pages or a writeback in
// flight.
func (e *Engine) dirtyList() []*Object {
	e.dirtyMu.Lock()
	defer e.dirtyMu.Unlock()
	objs := make([]*Object, 0, len(e.dirtyObjs))
	for o := range e.dirtyObjs {
		objs = append(objs, o)
	}
	return objs
}

// writebackObjects writes back objs, at most par at a time, and returns the
// first error.
func (e *Engine) writebackObjects(objs []*Object, par int) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	sem := make(chan struct{}, par)
	for _, o := range objs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := o.writeback(); err != nil {
				mu.Lock()
				first = cmpErr(first, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return first
}

// objectList returns the live objects, so callers can visit them without
// holding the engine lock.
func (e *Engine) objectList() []*Object {
	e.mu.RLock()
	defer e.mu.RUnlock()
	objs := make([]*Object, 0, len(e.objects))
	for _, o := range e.objects {
		objs = append(objs, o)
	}
	return objs
}

func (e *Engine) flushDevice() error {
	if err := e.dev.Flush(); err != nil {
		return fmt.Errorf("flush device: %w", err)
	}
	return nil
}

func (e *Engine) writeDev(p []byte, off int64) error {
	e.devWrites.Add(1)
	e.devBytesW.Add(uint64(len(p)))
	n, err := e.dev.WriteAt(p, off)
	return whole("write", n, len(p), off, err)
}

func (e *Engine) readDev(p []byte, off int64) error {
	e.devReads.Add(1)
	e.devBytesR.Add(uint64(len(p)))
	n, err := e.dev.ReadAt(p, off)
	return whole("read", n, len(p), off, err)
}

// whole turns a short transfer that reported no error into one: a device
// that moves less than asked has failed, whatever it says.
func whole(op string, n, want int, off int64, err error) error {
	if err == nil && n != want {
		err = fmt.Errorf("short %s: %d of %d bytes at %d", op, n, want, off)
	}
	return err
}

// reserve reserves n blocks for a write. Before answering ErrNoSpace it
// gives back allocation windows and writes back delalloc once: busy extents
// are committed by the checkpoint and reservations become exact.
func (e *Engine) reserve(n int64) error {
	if n == 0 {
		return nil
	}
	err := e.space.Reserve(n)
	if err == nil {
		return nil
	}
	if !errors.Is(err, reserve.ErrNoSpace) {
		return err
	}
	e.releaseAllWindows()
	if serr := e.syncAll(true); serr != nil {
		return fmt.Errorf("%w: %d blocks wanted (writeback before retry failed: %v)", ErrNoSpace, n, serr)
	}
	if err := e.space.Reserve(n); err != nil {
		return fmt.Errorf("%w: %d blocks wanted: %v", ErrNoSpace, n, err)
	}
	return nil
}

func (e *Engine) releaseAllWindows() {
	objs := e.objectList()
	for _, o := range objs {
		o.mu.Lock()
		o.releaseWindowLocked()
		o.mu.Unlock()
	}
}

func (e *Engine) releaseIdleWindows(now time.Time) {
	objs := e.objectList()
	for _, o := range objs {
		o.mu.Lock()
		if o.window.Len > 0 && now.Sub(o.lastFlush) > windowIdle {
			o.releaseWindowLocked()
		}
		o.mu.Unlock()
	}
}

var bgCtx = context.Background()

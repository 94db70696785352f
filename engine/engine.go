package engine

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"reflect"
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
	DirtyLimit int64 // dirty bytes at which writers wait; 0 (or more) = half the cache's frames beyond its read reserve
	ReadOnly   bool
}

const (
	defaultCacheSize = 256 << 20
	// minCacheSize keeps enough frames for writeback and reads in flight
	// (the cache also wants 64 frames, which for blocks over 16 KiB is
	// more). The engine's model test runs at this size.
	minCacheSize = 1 << 20
	// maxIOBytes caps one device I/O issued by writeback or a read.
	maxIOBytes = 1 << 20
	// ioParallel bounds the device I/Os of writeback in flight, over all
	// objects (see wbQueue). On a loop device a 1 MiB sequential writer
	// ran 9 % faster at 32 than at 16 (eight alternating runs each), and
	// 48 gained nothing more while the 4 KiB appenders lost a little:
	// past the device's own depth, queueing only makes every I/O wait.
	ioParallel = 32
	// bgWriters and syncWriters: how many objects background writeback and
	// Sync write back at once (their device I/Os share ioParallel).
	bgWriters   = 8
	syncWriters = 4
	// writeChunkBlocks bounds the blocks one WriteAt step dirties under
	// the object lock, so readers and writeback interleave with big writes.
	writeChunkBlocks = 256
	// dirtyExpire is how old dirty data may get before background writeback
	// writes it even without memory pressure.
	dirtyExpire = 5 * time.Second
	// bgCommitBytes is the pending journal batch size at which background
	// writeback commits it.
	bgCommitBytes = 1 << 20
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
	// Metadata: commits (journal transactions, checkpoints or bare
	// flushes), checkpoints written, journal bytes written, device flushes.
	Commits, Checkpoints, JournalBytesWritten, Flushes uint64
	// JournalUsedBytes of JournalBytes of the ring hold transactions not
	// yet covered by a checkpoint: what an Open after a crash replays.
	JournalUsedBytes, JournalBytes int64
}

// errInvalid is the root of bad-argument errors; it matches fs.ErrInvalid.
var errInvalid = fs.ErrInvalid

// Engine is an open rawblock device. All methods are safe for concurrent use.
type Engine struct {
	dev      Device
	poll     func() // the device's Poll (see poller), or a no-op
	sb       superblock
	bs       int
	shift    uint
	readOnly bool

	cache *cache.Cache
	space *reserve.Space
	// placeMu makes computing a fresh extent's goal and claiming it one
	// step (see placeFresh).
	placeMu sync.Mutex

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
	// written and logs their mapping holding it shared; a checkpoint takes
	// the pending batch and its snapshot holding it exclusively, so the
	// snapshot maps exactly the extents of the batches it covers.
	gate sync.RWMutex

	// The pending journal batch (jmu, a leaf lock): operations logged since
	// the last commit took the batch, and the batch's generation. A
	// generation is durable once doneGen reaches it; extents freed in it
	// stay busy until then.
	jmu     sync.Mutex
	jops    []byte
	jflush  bool      // the batch maps or sizes over written data: flush that first
	jsince  time.Time // when the batch got its first operation
	gen     uint64
	doneGen atomic.Uint64

	// The committers' state (cmu, ccond; see commit): whether a commit is
	// being planned, the newest generation a commit in progress took, and
	// the tickets that keep commits' I/O in order.
	cmu        sync.Mutex
	ccond      *sync.Cond
	planning   bool
	swapped    uint64
	nextTicket uint64
	turn       uint64
	// The planner's state (one planner at a time).
	ring     ringPos
	ckptSlot int // the slot of the newest planned checkpoint
	txBufs   [2][]byte
	txIdx    int
	jspare   []byte // guarded by jmu
	ckptFull bool   // the last checkpoint did not fit its region
	wantCkpt atomic.Bool

	// failed holds the cause once a metadata write or flush failed: the
	// engine then refuses changes (ErrReadOnly) and keeps serving reads.
	failed atomic.Pointer[error]

	pressureUntil atomic.Int64 // unix ns; see spacePressure

	// Dirty-budget waits (see throttleCtx).
	thrMu     sync.Mutex
	thrCtx    context.Context
	thrCancel context.CancelCauseFunc

	kick    chan struct{} // memory pressure: write back everything dirty
	ckick   chan struct{} // the journal ring is half full: checkpoint
	wake    chan struct{} // a stream has data to write, or a background writeback ended
	bgSem   chan struct{} // background writebacks running (bgWriters)
	bgWG    sync.WaitGroup
	stop    chan struct{}
	bgDone  chan struct{}
	bufPool sync.Pool      // aligned maxIO buffers for bounce copies
	wbq     wbQueue        // writeback device I/Os (ioParallel in flight)
	raWG    sync.WaitGroup // readahead reads in flight (see readAheadLocked)
	uf      unflushed      // device writes no good flush has covered yet

	allocations, devWrites, devReads, devBytesW, devBytesR atomic.Uint64
	commits, checkpoints, journalBytes, flushes            atomic.Uint64
	ringUsed                                               atomic.Int64 // ring.used, for Stats
	// ckptBytes is the payload size of the newest checkpoint, logged the
	// operation bytes logged since its snapshot, and metaPending the extent
	// records no logged operation covers yet: together they bound the next
	// checkpoint's size (metaUsed).
	ckptBytes, logged, metaPending atomic.Int64
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
	c := &checkpoint{Seq: 1, NextObjectID: 1, Chain: chainStart(sb.UUID)}
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

// readSuperblocks reads and decodes both superblock copies. Copy A is at
// byte 0; copy B is one engine block further, so when A is unreadable every
// possible block size is tried for B.
func readSuperblocks(dev Device) (sbs [2]superblock, errs [2]error) {
	devBS := dev.BlockSize()
	if devBS <= 0 || devBS > MaxBlockSize || !isPow2(uint64(devBS)) {
		err := fmt.Errorf("%w: device block size %d", errInvalid, devBS)
		return sbs, [2]error{err, err}
	}
	buf := alignedBuf(max(devBS, superblockLen))
	buf = buf[:devBS*((superblockLen+devBS-1)/devBS)]
	read := func(off int64) (superblock, error) {
		if off+int64(len(buf)) > dev.Size() {
			return superblock{}, errNotFormatted
		}
		if err := readFull(dev, buf, off); err != nil {
			return superblock{}, fmt.Errorf("read superblock at %d: %w", off, err)
		}
		return decodeSuperblock(buf)
	}
	sbs[0], errs[0] = read(0)
	errs[1] = errNotFormatted
	if errs[0] == nil {
		sbs[1], errs[1] = read(int64(sbs[0].BlockSize))
		return sbs, errs
	}
	for bs := max(devBS, MinBlockSize); bs <= MaxBlockSize; bs *= 2 {
		if s, err := read(int64(bs)); err == nil && int(s.BlockSize) == bs {
			sbs[1], errs[1] = s, nil
			break
		} else if !errors.Is(err, errNotFormatted) {
			errs[1] = err
		}
	}
	return sbs, errs
}

// readSuperblock finds the newest valid superblock copy. Copy A is at byte 0;
// copy B is one engine block further, so when A is unreadable every possible
// block size is tried for B.
func readSuperblock(dev Device) (superblock, error) {
	sbs, errs := readSuperblocks(dev)
	a, b, errA, errB := sbs[0], sbs[1], errs[0], errs[1]
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
	if opts.DirtyLimit != 0 && opts.DirtyLimit >= opts.CacheSize {
		return nil, fmt.Errorf("%w: DirtyLimit %d must be below CacheSize %d", errInvalid, opts.DirtyLimit, opts.CacheSize)
	}
	if ro, ok := dev.(interface{ ReadOnly() bool }); ok && ro.ReadOnly() && !opts.ReadOnly {
		return nil, fmt.Errorf("open: %w: the device was opened read-only; set Options.ReadOnly", ErrReadOnly)
	}
	if err := claimDevice(dev, opts.ReadOnly); err != nil {
		return nil, err
	}
	e, err := open(dev, opts)
	if err != nil {
		releaseDevice(dev, opts.ReadOnly)
		return nil, err
	}
	return e, nil
}

// openDevs counts the engines open on each Device value in this process:
// any number of read-only ones, or one that writes. (OpenDevice's locks
// guard a device against other opens of its path; this guards one Device
// value handed to Open twice.)
var openDevs = struct {
	sync.Mutex
	m map[any]int // > 0: read-only engines; -1: one writer
}{m: map[any]int{}}

func claimDevice(dev Device, readOnly bool) error {
	if !reflect.TypeOf(dev).Comparable() {
		return nil
	}
	openDevs.Lock()
	defer openDevs.Unlock()
	n := openDevs.m[dev]
	if n < 0 || (n > 0 && !readOnly) {
		return fmt.Errorf("open: %w: an engine in this process already has this device open", ErrInUse)
	}
	if readOnly {
		openDevs.m[dev] = n + 1
	} else {
		openDevs.m[dev] = -1
	}
	return nil
}

func releaseDevice(dev Device, readOnly bool) {
	if !reflect.TypeOf(dev).Comparable() {
		return
	}
	openDevs.Lock()
	defer openDevs.Unlock()
	if n := openDevs.m[dev]; readOnly && n > 1 {
		openDevs.m[dev] = n - 1
	} else {
		delete(openDevs.m, dev)
	}
}

func open(dev Device, opts Options) (*Engine, error) {
	l, err := load(dev)
	if err != nil {
		return nil, err
	}
	sb := l.sb
	e := &Engine{
		dev:       dev,
		poll:      func() {},
		sb:        sb,
		bs:        int(sb.BlockSize),
		readOnly:  opts.ReadOnly,
		objects:   make(map[string]*Object, len(l.state.byID)),
		nextID:    l.state.nextID,
		dirtyObjs: make(map[*Object]struct{}),
		ring:      l.ring,
		ckptSlot:  l.ckptSlot,
		gen:       1,
		kick:      make(chan struct{}, 1),
		ckick:     make(chan struct{}, 1),
		wake:      make(chan struct{}, 1),
		bgSem:     make(chan struct{}, bgWriters),
		stop:      make(chan struct{}),
		bgDone:    make(chan struct{}),
	}
	for 1<<e.shift < e.bs {
		e.shift++
	}
	e.ccond = sync.NewCond(&e.cmu)
	if a, ok := dev.(asyncWriter); ok && a.AsyncWrites() {
		e.wbq.async = a
	}
	if p, ok := dev.(poller); ok {
		e.poll = p.Poll
	}
	e.ringUsed.Store(e.ring.used)
	e.ckptBytes.Store(int64(l.ckpt.payloadLen))
	e.logged.Store(int64(l.ring.used) * int64(e.bs))
	e.bufPool.New = func() any { b := alignedBuf(max(maxIOBytes, e.bs)); return &b }
	for _, mo := range l.state.byID {
		o := e.newObject(mo.id, mo.name, mo.tree)
		o.size, o.diskSize = mo.size, mo.size
		e.objects[mo.name] = o
	}
	// Free space is derived: everything the metadata does not map.
	used, err := l.state.usedExtents()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
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
	if errors.Is(err, cache.ErrBadOptions) {
		// Options the cache cannot work with (too small for this block
		// size, a dirty limit under one block) are bad Options.
		return nil, fmt.Errorf("%w: open: page cache: %w", errInvalid, err)
	}
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

func (e *Engine) newObject(id uint64, name string, tree *extenttree.Tree) *Object {
	return &Object{e: e, id: id, name: name, tree: tree}
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

// enterRead is enter for a call that changes nothing, given its arguments'
// check: ErrClosed first, then the arguments' error (see enterWrite).
func (e *Engine) enterRead(argErr error) error {
	if err := e.enter(); err != nil {
		return err
	}
	if argErr != nil {
		e.exit()
		return argErr
	}
	return nil
}

// enterWrite admits a public call that changes something, given its
// arguments' check (nil: they are fine). The answers come in this order: a
// closing engine answers ErrClosed to every call, whatever its arguments;
// then bad arguments answer fs.ErrInvalid, also on a read-only or failed
// engine; then a read-only engine ErrReadOnly and a failed one its
// failure.
func (e *Engine) enterWrite(argErr error) error {
	if err := e.enterRead(argErr); err != nil {
		return err
	}
	if e.readOnly {
		e.exit()
		return ErrReadOnly
	}
	if err := e.failure(); err != nil {
		e.exit()
		return err
	}
	return nil
}

// Create makes a new, empty object. It fails with fs.ErrExist if the name
// is taken.
func (e *Engine) Create(name string) (*Object, error) {
	if err := e.enterWrite(checkName(name)); err != nil {
		return nil, err
	}
	defer e.exit()
	if err := e.metaRoom(0); err != nil {
		return nil, fmt.Errorf("create %q: %w", name, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.objects[name]; ok {
		return nil, fmt.Errorf("create %q: %w", name, fs.ErrExist)
	}
	o := e.newObject(e.nextID, name, extenttree.New())
	e.nextID++
	e.objects[name] = o
	e.logOp(jop{kind: opCreate, id: o.id, name: name})
	return o, nil
}

// Object returns the object called name, or fs.ErrNotExist.
func (e *Engine) Object(name string) (*Object, error) {
	if err := e.enterRead(checkName(name)); err != nil {
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
	if err := e.enterWrite(checkName(name)); err != nil {
		return err
	}
	defer e.exit()
	e.mu.Lock()
	o, ok := e.objects[name]
	if ok {
		delete(e.objects, name)
		// Logged under e.mu, so a Create reusing the name follows it.
		e.logOp(jop{kind: opRemove, id: o.id})
	}
	e.mu.Unlock()
	if !ok {
		return fmt.Errorf("remove %q: %w", name, fs.ErrNotExist)
	}
	o.wmu.Lock()
	defer o.wmu.Unlock()
	o.lockWb()
	defer o.wbMu.Unlock()
	o.mu.Lock()
	defer o.mu.Unlock()
	o.removed = true
	err := o.truncateBlocksLocked(0)
	o.releaseWindowLocked()
	e.cache.RemoveObject(o.id)
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

		Commits:             e.commits.Load(),
		Checkpoints:         e.checkpoints.Load(),
		JournalBytesWritten: e.journalBytes.Load(),
		Flushes:             e.flushes.Load(),
		JournalUsedBytes:    e.ringUsed.Load() * bs,
		JournalBytes:        e.sb.JournalBlocks * bs,
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
	return e.syncAll(false, seenByEngine)
}

// syncAll writes back every dirty object, flushes, and writes a checkpoint
// if any metadata changed (always when force is set). It reports the
// writeback failures that the observers in who have not seen (see
// takeWbErr).
func (e *Engine) syncAll(force bool, who uint8) error {
	objs := e.dirtyList()
	first := e.writebackObjects(objs, syncWriters)
	if first != nil {
		for _, o := range objs {
			o.takeWbErr(who)
		}
		return first
	}
	if err := e.commit(force); err != nil {
		return err
	}
	// Report, once, writeback failures whose pages have been written since.
	all := e.objectList()
	for _, o := range all {
		if err := o.takeWbErr(who); err != nil {
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

// commit makes durable every operation logged and every data write that
// completed before the call: it flushes the device and writes the pending
// batch as one journal transaction (or a checkpoint, when ckpt is set or the
// batch does not fit the ring).
//
// Group commit: callers that arrive while a commit is being planned wait,
// and are carried by the next one, or by the one that took their batch.
// Commits are pipelined in two stages: planning (take the batch, encode its
// transaction, advance the ring — one commit at a time) and I/O (flush the
// data the batch depends on, write, flush). The data flush of one commit
// overlaps the journal write and flush of the one before it; the journal
// writes themselves, and the points where a generation becomes durable, stay
// in order. Only after its commit do extents freed in a batch become
// allocatable.
func (e *Engine) commit(ckpt bool) error {
	e.jmu.Lock()
	want := e.gen
	e.jmu.Unlock()
	e.cmu.Lock()
	for {
		if err := e.failure(); err != nil {
			e.cmu.Unlock()
			return err
		}
		if !ckpt && e.doneGen.Load() >= want {
			e.cmu.Unlock()
			return nil // a commit that started after our call covered us
		}
		// At most commitDepth commits in flight: the callers arriving
		// meanwhile gather into the next batch.
		if e.planning || (!ckpt && e.swapped >= want) || e.nextTicket-e.turn >= commitDepth {
			e.ccond.Wait()
			continue
		}
		break
	}
	e.planning = true
	e.cmu.Unlock()

	p, err := e.plan(ckpt)
	e.cmu.Lock()
	e.planning = false
	if err == nil {
		e.swapped = p.g
		p.ticket = e.nextTicket
		e.nextTicket++
	}
	e.cmu.Unlock()
	e.ccond.Broadcast()
	if err != nil {
		return e.shutdown(err)
	}
	return e.perform(p)
}

// commitDepth is how many commits may be in flight at once: one writing
// its journal transaction, and the next flushing its data meanwhile.
const commitDepth = 2

// commitPlan is one commit, as planned: the batch it carries and the bytes
// to write.
type commitPlan struct {
	g, ticket uint64
	ops       []byte
	preFlush  bool   // flush the data the batch depends on first
	buf       []byte // a transaction or a checkpoint; nil: a bare flush
	off       int64
	what      string
	ckpt      bool
	ringUsed  int64 // live ring blocks once this commit is durable
}

// plan takes the pending batch and encodes it, advancing the ring as if the
// commits planned so far had all succeeded (one that fails shuts the engine
// down). Only one commit plans at a time.
func (e *Engine) plan(ckpt bool) (*commitPlan, error) {
	e.gate.Lock()
	e.jmu.Lock()
	p := &commitPlan{g: e.gen, ops: e.jops, preFlush: e.jflush}
	e.jops, e.jspare, e.jflush, e.jsince = e.jspare[:0], nil, false, time.Time{}
	e.gen++
	e.jmu.Unlock()
	ckpt = ckpt || !e.ringFits(len(p.ops))
	var snap *checkpoint
	if ckpt {
		e.logged.Store(0)
		snap = e.snapshot()
	}
	e.gate.Unlock()

	if ckpt {
		err := e.planCheckpoint(p, snap)
		if !errors.Is(err, errCkptFull) {
			return p, err
		}
		if !e.ringFits(len(p.ops)) {
			return p, err
		}
		// Keep going on the journal while it has room; the checkpoint is
		// retried when it fills.
		e.ckptFull = true
	}
	if len(p.ops) > 0 {
		e.planTx(p)
	} else {
		p.preFlush = true // the flush is the whole commit
	}
	p.ringUsed = e.ring.used
	return p, nil
}

// ringFits reports whether a transaction of n payload bytes fits the ring
// without overwriting what the newest checkpoint does not cover. A batch
// larger than a quarter of the ring goes to a checkpoint instead, which
// keeps replay bounded.
func (e *Engine) ringFits(n int) bool {
	jb := e.sb.JournalBlocks
	blocks := int64(txBlocks(n, e.bs))
	waste := int64(0)
	if e.ring.head+blocks > jb {
		waste = jb - e.ring.head
	}
	return blocks <= max(jb/4, 1) && e.ring.used+waste+blocks <= jb
}

// planTx encodes the batch as the next journal transaction.
func (e *Engine) planTx(p *commitPlan) {
	jb, bs := e.sb.JournalBlocks, e.bs
	n := txBlocks(len(p.ops), bs)
	pos, waste := e.ring.head, int64(0)
	if pos+int64(n) > jb {
		pos, waste = 0, jb-pos
	}
	if e.ring.used+waste+int64(n) > jb {
		panic(fmt.Sprintf("rawblock: journal: a %d-block transaction overruns the ring (%d of %d blocks live)", n, e.ring.used, jb))
	}
	// Two buffers: the commit before this one may still be writing from
	// the other.
	e.txIdx ^= 1
	if cap(e.txBufs[e.txIdx]) < n*bs {
		e.txBufs[e.txIdx] = alignedBuf(max(n*bs, 16*bs))
	}
	p.buf = e.txBufs[e.txIdx][:n*bs]
	sum := encodeTx(p.buf, p.ops, bs, e.ring.seq+1, e.ring.chain, e.sb.UUID)
	p.off = (e.sb.JournalStart + pos) * int64(bs)
	p.what = "journal"
	e.ring.head = (pos + int64(n)) % jb
	e.ring.used += waste + int64(n)
	e.ring.seq++
	e.ring.chain = sum
}

// planCheckpoint encodes snap for the older slot. Its data flush makes the
// data of every extent it maps durable; the flush after its write makes it
// the newest checkpoint, and the ring's space before its position reusable
// (later transactions are written only after that).
func (e *Engine) planCheckpoint(p *commitPlan, snap *checkpoint) error {
	snap.Seq = e.ring.seq + 1
	snap.JournalPos, snap.Chain = e.ring.head, e.ring.chain
	data, err := encodeCheckpoint(nil, snap, e.bs, e.sb.CkptBlocks)
	if err != nil {
		return err
	}
	e.ckptBytes.Store(int64(snap.payloadLen))
	slot := 1 - e.ckptSlot
	p.buf, p.off, p.preFlush, p.ckpt = data, e.sb.CkptStart[slot]*int64(e.bs), true, true
	p.what = fmt.Sprintf("checkpoint %c", 'A'+slot)
	e.ckptSlot = slot
	e.ring.seq, e.ring.used = snap.Seq, 0
	e.ckptFull = false
	return nil
}

// perform does a planned commit's I/O. Its data flush runs at once, in
// parallel with the commits before it; its write waits for their turn.
func (e *Engine) perform(p *commitPlan) error {
	var err error
	if p.preFlush {
		err = e.flushDevice()
	}
	e.cmu.Lock()
	for e.turn != p.ticket {
		e.ccond.Wait()
	}
	e.cmu.Unlock()
	if err == nil {
		err = e.failure() // an earlier commit failed: build nothing on it
	}
	if err == nil && p.buf != nil {
		if err = e.writeDev(p.buf, p.off); err != nil {
			err = fmt.Errorf("write %s: %w", p.what, err)
		} else {
			err = e.flushDevice()
		}
	}
	if err != nil {
		err = e.shutdown(err)
	} else {
		if p.ckpt {
			e.checkpoints.Add(1)
		} else if p.buf != nil {
			e.journalBytes.Add(uint64(len(p.buf)))
		}
		e.commits.Add(1)
		e.ringUsed.Store(p.ringUsed)
		e.doneGen.Store(p.g)
		e.space.Commit(p.g)
		e.jmu.Lock()
		if e.jspare == nil {
			e.jspare = p.ops[:0]
		}
		e.jmu.Unlock()
		if p.ringUsed > e.sb.JournalBlocks/2 {
			e.wantCkpt.Store(true)
			// Only the checkpoint: writing back all the dirty data
			// because the journal filled would turn a rewritten
			// working set that fits the cache into device writes.
			select {
			case e.ckick <- struct{}{}:
			default:
			}
		}
	}
	e.cmu.Lock()
	e.turn++
	e.cmu.Unlock()
	e.ccond.Broadcast()
	return err
}

// snapshot captures the durable part of the metadata: names, sizes and
// Written extents (whose data writeback completed before marking them; the
// checkpoint's first flush makes it durable). The caller holds the gate.
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
		co := ckptObject{ID: o.id, Name: o.name, Size: o.diskSize}
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
	slices.SortFunc(c.Objects, func(a, b ckptObject) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return c
}

// logOp appends op to the pending journal batch. Callers hold the lock
// that orders the change in memory (the object's mu, or e.mu for names),
// so the batch lists changes in the order they were made.
func (e *Engine) logOp(op jop) {
	e.jmu.Lock()
	e.logLocked(op)
	e.jmu.Unlock()
}

func (e *Engine) logLocked(op jop) {
	if len(e.jops) == 0 {
		e.jsince = time.Now()
	}
	n := len(e.jops)
	e.jops = appendOp(e.jops, op)
	e.logged.Add(int64(len(e.jops) - n))
	if op.kind == opMap {
		e.jflush = true
	}
}

// logSize logs o's durable size (diskSize). One size operation per object
// and batch is enough: sizes are last-writer-wins, so a later change
// rewrites it in place. grown says the size grew over data written in place:
// the commit must flush that data before the journal write, as for a map.
// The caller holds o.mu.
func (e *Engine) logSize(o *Object, grown bool) {
	e.jmu.Lock()
	defer e.jmu.Unlock()
	if grown {
		e.jflush = true
	}
	if o.sizeGen == e.gen {
		binary.LittleEndian.PutUint64(e.jops[o.sizeOff+9:], uint64(o.diskSize))
		return
	}
	o.sizeGen, o.sizeOff = e.gen, len(e.jops)
	e.logLocked(jop{kind: opSize, id: o.id, size: o.diskSize})
}

// logFree logs that o's blocks [start, start+n) became a hole and frees the
// device extents they held. The extents stay busy until the batch carrying
// the operation is durable. The caller holds o.mu.
func (e *Engine) logFree(o *Object, start, n int64, freed []extenttree.PhysExtent) {
	e.jmu.Lock()
	defer e.jmu.Unlock()
	if !o.removed && len(freed) > 0 {
		e.logLocked(jop{kind: opUnmap, id: o.id, logical: start, length: n})
	}
	for _, x := range freed {
		if err := e.space.Free(reserve.Extent{Start: x.Start, Len: x.Len}, e.gen); err != nil {
			panic(fmt.Sprintf("rawblock: object %q: free %v: %v", o.name, x, err))
		}
	}
}

// Metadata room. Every Sync may have to write a checkpoint of everything,
// so a change is refused with ErrMetadataFull, before it is made, when the
// checkpoint it leads to might not fit its region; a Sync never finds out
// too late. metaUsed bounds the next checkpoint's payload:
//   - the newest checkpoint's payload;
//   - twice the operation bytes logged since: an object record is 11 bytes
//     longer than its create operation, an extent record (24 bytes) is
//     shorter than its map operation (33), an unmap splits at most one
//     record in two;
//   - one extent record for each Delalloc or Unwritten entry of an object's
//     map (metaPending): writeback turns each into at least one Written
//     extent, logged only when its data is durable — a write is accepted
//     long before that;
//   - and one for each hole run a write in progress will fill, or an
//     extent a punch in progress may split (reserved by metaRoom, returned
//     by the caller when its change is recorded).
// The limit keeps a sixteenth of the region for what writeback adds
// without asking: a range allocated in several pieces because free space
// is fragmented (one extent record per extra piece).

// metaLimit is the payload bytes a checkpoint may be counted up to.
func (e *Engine) metaLimit() int64 {
	return e.sb.CkptBlocks * int64(e.bs-ckptHeaderLen-4) * 15 / 16
}

// metaUsed bounds the payload of the next checkpoint (see above).
func (e *Engine) metaUsed() int64 {
	return e.ckptBytes.Load() + 2*e.logged.Load() + extentRecLen*e.metaPending.Load()
}

// metaRoom reserves room for extents more extent records, or fails with
// ErrMetadataFull, reserving nothing, when the next checkpoint might then
// not fit its region. Only when the bound crosses the limit is a checkpoint
// taken to measure. The caller gives a reservation back with
// metaPending.Add(-extents) once its change is recorded.
func (e *Engine) metaRoom(extents int64) error {
	limit := e.metaLimit()
	e.metaPending.Add(extents)
	if e.metaUsed() <= limit {
		return nil
	}
	// With nothing logged since the newest checkpoint, another one would
	// measure the same: at the limit, refusals cost no I/O.
	if e.logged.Load() > 0 {
		if err := e.commit(true); err != nil && !errors.Is(err, errCkptFull) {
			e.metaPending.Add(-extents)
			return err
		}
	}
	if used := e.metaUsed(); used > limit {
		e.metaPending.Add(-extents)
		return fmt.Errorf("%w: checkpoint of about %d bytes, the region holds %d", ErrMetadataFull, used, limit)
	}
	return nil
}

// pendingOps reports the size and age of the pending batch.
func (e *Engine) pendingOps() (int, time.Time) {
	e.jmu.Lock()
	defer e.jmu.Unlock()
	return len(e.jops), e.jsince
}

// shutdown records the first metadata write failure and returns the error
// every later change gets.
func (e *Engine) shutdown(cause error) error {
	err := fmt.Errorf("%w: shut down after a metadata write failed: %w", ErrReadOnly, cause)
	e.cmu.Lock() // committers waiting on ccond check failure() under cmu
	e.failed.CompareAndSwap(nil, &err)
	e.cmu.Unlock()
	e.ccond.Broadcast()
	return *e.failed.Load()
}

// readRefused refuses, once the engine has shut down, a device read of n
// bytes at off that meets a write no good flush covered (see unflushed):
// the device may have dropped it, and would answer with the old contents.
// Reads the cache serves are the newest data and go on, as do device reads
// of what a good flush covered. Close and Open recover the last durable
// state.
func (e *Engine) readRefused(off, n int64) error {
	if err := e.failure(); err != nil && e.uf.overlaps(off, n) {
		return fmt.Errorf("read of %d bytes at device offset %d refused: written since the last good flush, which the device may have lost: %w", n, off, err)
	}
	return nil
}

// failure returns the shutdown error, if the engine shut down.
func (e *Engine) failure() error {
	if p := e.failed.Load(); p != nil {
		return *p
	}
	return nil
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
	// No call is in flight, so no readahead starts any more.
	e.raWG.Wait()
	var err error
	if !e.readOnly {
		err = e.syncAll(true, seenByEngine)
		if err == nil {
			// Everything was written back: no reservation may remain.
			if sp := e.space.Stats(); sp.Reserved != 0 {
				err = fmt.Errorf("rawblock: invariant broken: %d blocks still reserved after the final writeback", sp.Reserved)
			} else if cerr := e.space.Check(); cerr != nil {
				err = fmt.Errorf("rawblock: invariant broken at close: %w", cerr)
			} else if n := e.metaPending.Load(); n != 0 {
				err = fmt.Errorf("rawblock: invariant broken: %d extent records counted as pending after the final writeback", n)
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
	releaseDevice(e.dev, e.readOnly)
	return err
}

func (e *Engine) kickWriteback() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// wakeBackground asks the writeback daemon to look again, without waiting.
func (e *Engine) wakeBackground() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// background is the writeback daemon. Under memory pressure it writes back
// the dirty objects, largest first; otherwise the objects being appended to
// in a stream (see Object.eager) and those whose dirty data is older than
// dirtyExpire. Each object's writeback runs in its own goroutine, up to
// bgWriters at once, so that a long streaming pass never holds up the
// others, nor checkpoints and commits.
func (e *Engine) background() {
	defer close(e.bgDone)
	defer e.bgWG.Wait()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		var pressure, ticked bool
		select {
		case <-e.stop:
			return
		case <-e.kick:
			pressure = true
		case <-e.ckick:
		case <-e.wake:
		case <-tick.C:
			ticked = true
		}
		now := time.Now()
		pressure = pressure || e.cache.OverBackground()
		var due []*Object
		if pressure {
			due = pressureList(e.dirtyList(), now)
		} else {
			for _, o := range e.dirtyList() {
				if o.streamDue() || o.dirtyAge(now) > dirtyExpire {
					due = append(due, o)
				}
			}
		}
		for _, o := range due {
			if !e.startWriteback(o) {
				break // every writer is busy; one that ends wakes us
			}
		}
		if ticked {
			e.releaseIdleWindows(now)
		}
		// Metadata too is made durable in the background: when the ring
		// is half full (a checkpoint), or when the pending batch grew large
		// or old, so memory and the loss window stay bounded.
		n, since := e.pendingOps()
		switch {
		case e.wantCkpt.Swap(false):
			_ = e.commit(true)
		case n > bgCommitBytes || (n > 0 && now.Sub(since) > dirtyExpire):
			_ = e.commit(false)
		}
	}
}

// bgWritersBusy reports whether every background writer is running.
func (e *Engine) bgWritersBusy() bool { return len(e.bgSem) == cap(e.bgSem) }

// startWriteback starts a background writeback of o, unless one is
// running already. It reports false, and starts nothing, when bgWriters
// are running.
func (e *Engine) startWriteback(o *Object) bool {
	if o.bgActive.Load() {
		return true
	}
	select {
	case e.bgSem <- struct{}{}:
	default:
		return false
	}
	if !o.bgActive.CompareAndSwap(false, true) {
		<-e.bgSem
		return true
	}
	e.bgWG.Add(1)
	go func() {
		defer e.bgWG.Done()
		// An error stays with the object's dirty pages; the next Sync
		// retries and reports it.
		err := o.writeback(o.eager.Load() || e.cache.OverBackground())
		o.bgActive.Store(false)
		<-e.bgSem
		if err == nil {
			// Look for more work now; after a failure, at the next tick.
			e.wakeBackground()
		}
	}()
	return true
}

// pressureList picks the dirty objects that background writeback writes
// under memory pressure, largest first. Objects with fewer than
// streamBlocks dirty pages are left out, unless their data has aged or the
// large ones hold less than half of the dirty pages: writing them relieves
// nothing, and an object that has just begun to stream would get a tiny
// first extent packed at the front of the device, and its next one
// elsewhere (with eight writers, one run in eight ended with two extents
// for one object).
func pressureList(objs []*Object, now time.Time) []*Object {
	type cand struct {
		o     *Object
		pages int
		old   bool
	}
	cs := make([]cand, 0, len(objs))
	total, large := 0, 0
	for _, o := range objs {
		c := cand{o: o, pages: o.dirtyPages(), old: o.dirtyAge(now) > dirtyExpire}
		total += c.pages
		if c.pages >= streamBlocks {
			large += c.pages
		}
		cs = append(cs, c)
	}
	slices.SortFunc(cs, func(a, b cand) int { return cmp.Compare(b.pages, a.pages) })
	due := make([]*Object, 0, len(cs))
	for _, c := range cs {
		if c.pages >= streamBlocks || c.old || 2*large < total {
			due = append(due, c.o)
		}
	}
	return due
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
			if err := o.writeback(false); err != nil {
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
	e.flushes.Add(1)
	covered := e.uf.flushStarts()
	if err := e.dev.Flush(); err != nil {
		return fmt.Errorf("flush device: %w", err)
	}
	e.uf.flushed(covered)
	return nil
}

func (e *Engine) writeDev(p []byte, off int64) error {
	t := e.beginWrite(off, int64(len(p)))
	n, err := e.dev.WriteAt(p, off)
	e.uf.finish(t)
	return whole("write", n, len(p), off, err)
}

func (e *Engine) readDev(p []byte, off int64) error {
	if err := e.readRefused(off, int64(len(p))); err != nil {
		return err
	}
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
	e.spacePressure()
	e.releaseAllWindows()
	if serr := e.syncAll(false, 0); serr != nil {
		return fmt.Errorf("%w: %d blocks wanted (writeback before retry failed: %w)", ErrNoSpace, n, serr)
	}
	if err := e.space.Reserve(n); err != nil {
		return fmt.Errorf("%w: %d blocks wanted: %v", ErrNoSpace, n, err)
	}
	return nil
}

// spacePressure stops new allocation windows for a while: space ran short,
// and windows reopened by other writebacks would hold the space a retry
// needs.
func (e *Engine) spacePressure() {
	e.pressureUntil.Store(time.Now().Add(2 * time.Second).UnixNano())
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

// throttleCtx is what writers waiting for dirty budget wait on. A failed
// writeback cancels it with the failure as the cause and puts a fresh one in
// its place: pages that cannot be written stay dirty, so a writer waiting
// for them to drain would wait until the device heals; the writers waiting
// at a failure get its error instead, and later ones wait for the next
// attempt (writeback retries while they wait).
func (e *Engine) throttleCtx() context.Context {
	e.thrMu.Lock()
	defer e.thrMu.Unlock()
	if e.thrCtx == nil {
		e.thrCtx, e.thrCancel = context.WithCancelCause(bgCtx)
	}
	return e.thrCtx
}

// writebackFailed wakes the writers throttled now with err.
func (e *Engine) writebackFailed(err error) {
	e.thrMu.Lock()
	defer e.thrMu.Unlock()
	if e.thrCancel != nil {
		e.thrCancel(err)
		e.thrCtx, e.thrCancel = nil, nil
	}
}

package cache

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// newTestCache makes a cache of about frames frames of blockSize bytes.
func newTestCache(t testing.TB, blockSize, frames int, dirtyLimit int64) *Cache {
	t.Helper()
	size := FixedOverhead + int64(frames)*(int64(max(blockSize, FrameAlign))+FrameOverhead)
	c, err := New(Options{Size: size, BlockSize: blockSize, DirtyLimit: dirtyLimit})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if c.Frames() != frames {
		t.Fatalf("Frames = %d, want %d", c.Frames(), frames)
	}
	return c
}

// stamp writes k and a version at both ends of the page, so that a reader can
// tell a page that is not k's (or is torn).
func stamp(p *Page, k Key, version uint64) {
	d := p.Data()
	n := len(d)
	binary.LittleEndian.PutUint64(d[0:], k.Obj)
	binary.LittleEndian.PutUint64(d[8:], uint64(k.Block))
	binary.LittleEndian.PutUint64(d[16:], version)
	binary.LittleEndian.PutUint64(d[n-24:], k.Obj)
	binary.LittleEndian.PutUint64(d[n-16:], uint64(k.Block))
	binary.LittleEndian.PutUint64(d[n-8:], version)
}

// readStamp returns the key and version at both ends of a page (or an error if
// they disagree).
func readStamp(d []byte) (Key, uint64, error) {
	n := len(d)
	k1 := Key{binary.LittleEndian.Uint64(d[0:]), int64(binary.LittleEndian.Uint64(d[8:]))}
	v1 := binary.LittleEndian.Uint64(d[16:])
	k2 := Key{binary.LittleEndian.Uint64(d[n-24:]), int64(binary.LittleEndian.Uint64(d[n-16:]))}
	v2 := binary.LittleEndian.Uint64(d[n-8:])
	if k1 != k2 || v1 != v2 {
		return k1, v1, fmt.Errorf("torn page: head %v/%d tail %v/%d", k1, v1, k2, v2)
	}
	return k1, v1, nil
}

// fataler is what checkStamp needs of testing.TB and rapid.T.
type fataler interface {
	Helper()
	Fatalf(format string, args ...any)
}

func checkStamp(t fataler, p *Page, k Key) {
	t.Helper()
	got, _, err := readStamp(p.Data())
	if err != nil {
		t.Fatalf("page for %v: %v", k, err)
	}
	if got != k {
		t.Fatalf("page for %v holds %v", k, got)
	}
}

// insertNew allocates a page, stamps it with k, inserts it and drops the
// caller's reference.
func insertNew(t testing.TB, c *Cache, k Key) {
	t.Helper()
	p, err := c.Alloc(context.Background())
	if err != nil {
		t.Fatalf("Alloc: %v", err)
	}
	stamp(p, k, 1)
	c.Insert(k, p)
	p.Release()
}

func mustPanic(t *testing.T, want string, f func()) {
	t.Helper()
	defer func() {
		t.Helper()
		r := recover()
		if r == nil {
			t.Fatalf("no panic, want one mentioning %q", want)
		}
		if !strings.Contains(fmt.Sprint(r), want) {
			t.Fatalf("panic %q, want one mentioning %q", r, want)
		}
	}()
	f()
}

func TestLayout(t *testing.T) {
	if s := unsafe.Sizeof(Page{}); s != 64 {
		t.Fatalf("sizeof(Page) = %d, want 64", s)
	}
	if s := unsafe.Sizeof(shard{}); s != 128 {
		t.Fatalf("sizeof(shard) = %d, want 128", s)
	}
}

func TestNewOptions(t *testing.T) {
	good := MinSize(4096)
	bad := []Options{
		{Size: 0, BlockSize: 4096},
		{Size: -1, BlockSize: 4096},
		{Size: good, BlockSize: 0},
		{Size: good, BlockSize: 3000},
		{Size: good, BlockSize: 256},
		{Size: good * 16, BlockSize: 1 << 17},
		{Size: good - 1, BlockSize: 4096},
		{Size: good, BlockSize: 4096, DirtyLimit: -1},
		{Size: good, BlockSize: 4096, DirtyLimit: good},
		{Size: good, BlockSize: 4096, DirtyLimit: 100},
	}
	for _, o := range bad {
		c, err := New(o)
		if err == nil {
			c.Close()
			t.Errorf("New(%+v) succeeded", o)
			continue
		}
		if !errors.Is(err, ErrBadOptions) {
			t.Errorf("New(%+v) = %v, want ErrBadOptions", o, err)
		}
	}

	for _, bs := range []int{512, 4096, 65536} {
		c, err := New(Options{Size: MinSize(bs), BlockSize: bs})
		if err != nil {
			t.Fatalf("New(MinSize(%d)): %v", bs, err)
		}
		if c.Frames() != MinFrames || c.BlockSize() != bs {
			t.Fatalf("bs %d: frames %d block %d", bs, c.Frames(), c.BlockSize())
		}
		// Half of the frames beyond the read reserve (8 of MinFrames).
		if c.DirtyLimitPages() != (MinFrames-8)/2 || c.CleanCapacity() < 1 {
			t.Fatalf("bs %d: dirty limit %d clean capacity %d", bs, c.DirtyLimitPages(), c.CleanCapacity())
		}
		c2, err := New(Options{Size: MinSize(bs), BlockSize: bs, DirtyLimit: int64(60 * bs)})
		if err != nil {
			t.Fatalf("bs %d: DirtyLimit of 60 pages: %v", bs, err)
		}
		if c2.DirtyLimitPages() != (MinFrames-8)/2 {
			t.Fatalf("bs %d: DirtyLimit of 60 of %d frames gave %d pages, want it lowered to %d", bs, MinFrames, c2.DirtyLimitPages(), (MinFrames-8)/2)
		}
		c2.Close()
		if got := c.Arena().Size(); got < c.Frames()*max(bs, FrameAlign) {
			t.Fatalf("arena %d bytes for %d frames", got, c.Frames())
		}
		seen := map[uintptr]bool{}
		for i := 0; i < c.Frames(); i++ {
			p := c.TryAlloc()
			if p == nil {
				t.Fatalf("TryAlloc nil after %d", i)
			}
			d := p.Data()
			addr := uintptr(unsafe.Pointer(&d[0]))
			if len(d) != bs || cap(d) != bs || addr%FrameAlign != 0 || !c.Arena().Contains(d) || seen[addr] {
				t.Fatalf("frame %d: len %d cap %d addr %#x in arena %v dup %v", i, len(d), cap(d), addr, c.Arena().Contains(d), seen[addr])
			}
			seen[addr] = true
			d[0], d[bs-1] = 1, 2 // the whole frame is writable
		}
		if c.TryAlloc() != nil {
			t.Fatal("TryAlloc succeeded with every frame held")
		}
		for i := 0; i < c.Frames(); i++ {
			c.pages[i].Release()
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}

	c, err := New(Options{Size: MinSize(4096) * 4, BlockSize: 4096, DirtyLimit: 10 * 4096})
	if err != nil {
		t.Fatal(err)
	}
	if c.DirtyLimitPages() != 10 {
		t.Fatalf("dirty limit %d pages, want 10", c.DirtyLimitPages())
	}
	if c.CleanCapacity() != c.Frames()-10-c.reserve {
		t.Fatalf("clean capacity %d, frames %d reserve %d", c.CleanCapacity(), c.Frames(), c.reserve)
	}
	c.Close()
}

func TestInsertLookupRemove(t *testing.T) {
	c := newTestCache(t, 4096, 128, 0)
	defer c.Close()
	k := Key{Obj: 7, Block: 3}
	if c.Lookup(k) != nil {
		t.Fatal("hit in an empty cache")
	}
	p, _ := c.Alloc(context.Background())
	stamp(p, k, 1)
	c.Insert(k, p)
	if r := p.refs.Load(); r != 2 {
		t.Fatalf("refs after Insert = %d, want 2 (caller + index)", r)
	}
	c.Insert(k, p) // already k's page: nothing changes
	if r := p.refs.Load(); r != 2 {
		t.Fatalf("refs after a repeated Insert = %d, want 2", r)
	}
	q := c.Lookup(k)
	if q != p {
		t.Fatalf("Lookup = %p, want %p", q, p)
	}
	checkStamp(t, q, k)
	q.Release()
	p.Release()
	// Only the index holds it now; it is still found.
	if q = c.Lookup(k); q == nil {
		t.Fatal("page dropped when the caller released it")
	}
	q.Release()

	// Replacing: the old page loses the index's reference and is freed.
	p2, _ := c.Alloc(context.Background())
	stamp(p2, k, 2)
	c.Insert(k, p2)
	p2.Release()
	if r := p.refs.Load(); r != 0 || p.indexed.Load() {
		t.Fatalf("replaced page: refs %d indexed %v", r, p.indexed.Load())
	}
	q = c.Lookup(k)
	if q != p2 {
		t.Fatal("Lookup after replace did not return the new page")
	}
	if _, v, _ := readStamp(q.Data()); v != 2 {
		t.Fatalf("version %d, want 2", v)
	}
	// Inserting a page indexed under k as another key is a bug.
	mustPanic(t, "another key", func() { c.Insert(Key{Obj: 8}, q) })
	q.Release()

	st := c.Stats()
	if st.CleanPages != 1 || st.Hits != 3 || st.Misses != 1 || st.FreeFrames != st.Frames-1 || st.CachedBytes != 4096 {
		t.Fatalf("stats %+v", st)
	}
	c.Remove(k)
	c.Remove(k)
	if c.Lookup(k) != nil {
		t.Fatal("found after Remove")
	}
	st = c.Stats()
	if st.CleanPages != 0 || st.FreeFrames != st.Frames || st.Evictions != 0 {
		t.Fatalf("stats after Remove %+v", st)
	}
}

func TestReferenceMisuse(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	defer c.Close()
	p := c.TryAlloc()
	if p.Ref() != p {
		t.Fatal("Ref did not return the page")
	}
	p.Release()
	p.Release()
	mustPanic(t, "released more times", p.Release)
	p.refs.Store(0) // undo the damage the test did on purpose
	mustPanic(t, "used after Release", func() { p.Data() })
	mustPanic(t, "used after Release", func() { p.Ref() })
	p.refs.Store(0)
	mustPanic(t, "does not hold", func() { c.Insert(Key{}, p) })

	// Releasing the index's reference by mistake is caught.
	q := c.TryAlloc()
	c.Insert(Key{Obj: 1}, q)
	q.Release()
	mustPanic(t, "index's reference", q.Release)
	q.refs.Store(1)
	c.Remove(Key{Obj: 1})
	if st := c.Stats(); st.FreeFrames != st.Frames {
		t.Fatalf("leaked frames: %+v", st)
	}
}

// TestEvictionKeepsFramesBounded inserts ten times as many pages as fit and
// checks that frames stay accounted, the index shrinks back to the policy's
// capacity, and no Lookup ever returns another key's data.
func TestEvictionKeepsFramesBounded(t *testing.T) {
	c := newTestCache(t, 4096, 256, 0)
	defer c.Close()
	n := 10 * c.Frames()
	for i := 0; i < n; i++ {
		k := Key{Obj: uint64(i % 3), Block: int64(i)}
		insertNew(t, c, k)
		// Nothing is held between inserts, so every frame in use is clean,
		// once the policy's goroutine is not dropping pages; Stats reads free
		// frames before clean pages, so a drop in between shows as more in use.
		st := c.Stats()
		if inUse := st.Frames - st.FreeFrames; st.CleanPages > st.Frames || inUse < st.CleanPages {
			t.Fatalf("after %d inserts: %+v", i+1, st)
		}
		if i%16 == 0 {
			c.policy.Wait()
			if st := c.Stats(); st.Frames-st.FreeFrames != st.CleanPages {
				t.Fatalf("after %d inserts, policy idle: %+v", i+1, st)
			}
		}
		if i%7 == 0 { // look some up while churning
			j := rand.IntN(i + 1)
			kj := Key{Obj: uint64(j % 3), Block: int64(j)}
			if p := c.Lookup(kj); p != nil {
				checkStamp(t, p, kj)
				p.Release()
			}
		}
	}
	c.policy.Wait()
	st := c.Stats()
	if st.CleanPages > c.CleanCapacity() {
		t.Fatalf("%d clean pages once the policy caught up, capacity %d", st.CleanPages, c.CleanCapacity())
	}
	if st.Evictions < uint64(n-c.Frames()) {
		t.Fatalf("evictions %d after %d inserts into %d frames", st.Evictions, n, c.Frames())
	}
	found := 0
	for i := 0; i < n; i++ {
		k := Key{Obj: uint64(i % 3), Block: int64(i)}
		if p := c.Lookup(k); p != nil {
			checkStamp(t, p, k)
			p.Release()
			found++
		}
	}
	if found != st.CleanPages {
		t.Fatalf("found %d pages, index holds %d", found, st.CleanPages)
	}
	t.Logf("%d inserts into %d frames (clean capacity %d): %d cached at the end, %d evictions", n, c.Frames(), c.CleanCapacity(), found, st.Evictions)
}

// TestHeldPageNotReused has readers hold pages and verify them, slowly, while
// writers churn inserts through a cache far too small for them.
func TestHeldPageNotReused(t *testing.T) {
	c := newTestCache(t, 4096, 128, 0)
	defer c.Close()
	const keys = 2000
	dur := 400 * time.Millisecond
	if testing.Short() {
		dur = 100 * time.Millisecond
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var version atomic.Uint64
	var hits, checks atomic.Int64
	var failed atomic.Value
	fail := func(err error) {
		failed.CompareAndSwap(nil, err)
	}
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := Key{Obj: 1, Block: r.Int64N(keys)}
				p, err := c.Alloc(context.Background())
				if err != nil {
					fail(err)
					return
				}
				stamp(p, k, version.Add(1))
				c.Insert(k, p)
				p.Release()
			}
		}()
	}
	for rd := 0; rd < 3; rd++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(rd), 2))
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := Key{Obj: 1, Block: r.Int64N(keys)}
				p := c.Lookup(k)
				if p == nil {
					continue
				}
				hits.Add(1)
				got, v, err := readStamp(p.Data())
				if err == nil && got != k {
					err = fmt.Errorf("lookup of %v returned %v", k, got)
				}
				// Hold it a while; it must not change under us.
				for i := 0; i < 20 && err == nil; i++ {
					runtime.Gosched()
					g2, v2, err2 := readStamp(p.Data())
					if err2 != nil || g2 != got || v2 != v {
						err = fmt.Errorf("held page %v changed to %v/%d (%v)", k, g2, v2, err2)
					}
					checks.Add(1)
				}
				p.Release()
				if err != nil {
					fail(err)
					return
				}
			}
		}()
	}
	time.Sleep(dur)
	close(stop)
	wg.Wait()
	if err := failed.Load(); err != nil {
		t.Fatal(err)
	}
	if hits.Load() == 0 {
		t.Fatal("readers never hit")
	}
	st := c.Stats()
	t.Logf("%d inserts, %d reader hits, %d held checks, %d evictions", version.Load(), hits.Load(), checks.Load(), st.Evictions)
}

func TestLoadSingleflight(t *testing.T) {
	c := newTestCache(t, 4096, 128, 0)
	defer c.Close()
	k := Key{Obj: 3, Block: 9}
	var calls atomic.Int32
	release := make(chan struct{})
	fn := func(p *Page) error {
		calls.Add(1)
		<-release
		stamp(p, k, 1)
		return nil
	}
	const n = 16
	var wg sync.WaitGroup
	pages := make([]*Page, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pages[i], errs[i] = c.Load(context.Background(), k, fn)
		}()
	}
	// Let every goroutine join before the load finishes.
	waitFor(t, func() bool {
		s := c.shardFor(k.hash())
		s.mu.RLock()
		defer s.mu.RUnlock()
		call := s.loads[k]
		return call != nil && call.waiters == n-1
	})
	close(release)
	wg.Wait()
	if calls.Load() != 1 {
		t.Fatalf("fn called %d times", calls.Load())
	}
	for i := 0; i < n; i++ {
		if errs[i] != nil || pages[i] != pages[0] {
			t.Fatalf("Load %d: %p %v", i, pages[i], errs[i])
		}
		checkStamp(t, pages[i], k)
	}
	if r := pages[0].refs.Load(); r != n+1 {
		t.Fatalf("refs %d, want %d (each caller + index)", r, n+1)
	}
	for i := 0; i < n; i++ {
		pages[i].Release()
	}
	p, err := c.Load(context.Background(), k, func(*Page) error { t.Error("fn called on a hit"); return nil })
	if err != nil || p != pages[0] {
		t.Fatalf("second Load: %p %v", p, err)
	}
	p.Release()
	// Load counts nothing: the caller's Lookup counted the access.
	if st := c.Stats(); st.Misses != 0 || st.Hits != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestLoadErrorNotCached(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	defer c.Close()
	k := Key{Obj: 1, Block: 1}
	boom := errors.New("boom")
	release := make(chan struct{})
	var calls atomic.Int32
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := c.Load(context.Background(), k, func(*Page) error { calls.Add(1); <-release; return boom })
			if p != nil {
				t.Error("page returned with an error")
			}
			errs[i] = err
		}()
	}
	waitFor(t, func() bool {
		s := c.shardFor(k.hash())
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.loads[k] != nil && s.loads[k].waiters == 3
	})
	close(release)
	wg.Wait()
	for _, err := range errs {
		if !errors.Is(err, boom) {
			t.Fatalf("waiter got %v", err)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("fn called %d times", calls.Load())
	}
	if st := c.Stats(); st.CleanPages != 0 || st.FreeFrames != st.Frames {
		t.Fatalf("after a failed load: %+v", st)
	}
	p, err := c.Load(context.Background(), k, func(p *Page) error { stamp(p, k, 1); return nil })
	if err != nil {
		t.Fatal(err)
	}
	checkStamp(t, p, k)
	p.Release()

	// A panicking load function lets its followers go with an error.
	k2 := Key{Obj: 2}
	started := make(chan struct{})
	go func() {
		defer func() { recover() }()
		c.Load(context.Background(), k2, func(*Page) error { close(started); time.Sleep(20 * time.Millisecond); panic("load exploded") })
	}()
	<-started
	if _, err := c.Load(context.Background(), k2, func(*Page) error { return nil }); !errors.Is(err, ErrLoadPanicked) {
		// Either it joined the panicking call or it ran after it.
		if err != nil {
			t.Fatalf("follower of a panicking load: %v", err)
		}
	}
	waitFor(t, func() bool { st := c.Stats(); return st.Frames-st.FreeFrames == st.CleanPages })
}

func TestLoadDetachedByRemoveOrInsert(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	defer c.Close()
	k := Key{Obj: 5, Block: 5}
	for _, how := range []string{"remove", "insert", "removeRange", "removeObject"} {
		entered, release := make(chan struct{}), make(chan struct{})
		done := make(chan *Page)
		go func() {
			p, err := c.Load(context.Background(), k, func(p *Page) error {
				close(entered)
				<-release
				stamp(p, k, 1) // old data
				return nil
			})
			if err != nil {
				t.Error(err)
			}
			done <- p
		}()
		<-entered
		var fresh *Page
		switch how {
		case "remove":
			c.Remove(k)
		case "insert":
			fresh, _ = c.Alloc(context.Background())
			stamp(fresh, k, 2)
			c.Insert(k, fresh)
		case "removeRange":
			c.RemoveRange(k.Obj, 0, 1000)
		case "removeObject":
			c.RemoveObject(k.Obj)
		}
		// A Load started now must not join the stale one.
		p2, err := c.Load(context.Background(), k, func(p *Page) error { stamp(p, k, 3); return nil })
		if err != nil {
			t.Fatal(err)
		}
		_, v2, _ := readStamp(p2.Data())
		close(release)
		p := <-done
		_, v, _ := readStamp(p.Data())
		if v != 1 {
			t.Fatalf("%s: leader got version %d", how, v)
		}
		want := uint64(3)
		if fresh != nil {
			want = 2
		}
		if v2 != want {
			t.Fatalf("%s: later Load got version %d, want %d", how, v2, want)
		}
		q := c.Lookup(k)
		_, vq, _ := readStamp(q.Data())
		if vq != want {
			t.Fatalf("%s: the stale load replaced the page: version %d, want %d", how, vq, want)
		}
		q.Release()
		p.Release()
		p2.Release()
		if fresh != nil {
			fresh.Release()
		}
		c.Remove(k)
		if st := c.Stats(); st.FreeFrames != st.Frames {
			t.Fatalf("%s: leaked frames %+v", how, st)
		}
	}
}

func TestLoadFollowerCancel(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	defer c.Close()
	k := Key{Obj: 1}
	entered, release := make(chan struct{}), make(chan struct{})
	leader := make(chan *Page)
	go func() {
		p, _ := c.Load(context.Background(), k, func(p *Page) error { close(entered); <-release; stamp(p, k, 1); return nil })
		leader <- p
	}()
	<-entered
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := c.Load(ctx, k, nil); err == nil {
		t.Fatal("Load with a nil function succeeded")
	}
	p, err := c.Load(ctx, k, func(*Page) error { t.Error("follower ran fn"); return nil })
	if !errors.Is(err, context.DeadlineExceeded) || p != nil {
		t.Fatalf("canceled follower: %p %v", p, err)
	}
	close(release)
	lp := <-leader
	if r := lp.refs.Load(); r != 2 {
		t.Fatalf("refs %d, want 2: a canceled follower kept a reference", r)
	}
	lp.Release()

	// A leader that cannot get a frame lets its followers retry with their
	// own contexts.
	held := make([]*Page, 0, c.Frames())
	for p := c.TryAlloc(); p != nil; p = c.TryAlloc() {
		held = append(held, p)
	}
	k2 := Key{Obj: 2}
	short, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	leaderErr := make(chan error)
	go func() {
		_, err := c.Load(short, k2, func(p *Page) error { return nil })
		leaderErr <- err
	}()
	waitFor(t, func() bool { return c.allocWaiters.Load() == 1 })
	follower := make(chan error)
	go func() {
		p, err := c.Load(context.Background(), k2, func(p *Page) error { stamp(p, k2, 1); return nil })
		if err == nil {
			checkStamp(t, p, k2)
			p.Release()
		}
		follower <- err
	}()
	waitFor(t, func() bool {
		s := c.shardFor(k2.hash())
		s.mu.RLock()
		defer s.mu.RUnlock()
		return s.loads[k2] != nil && s.loads[k2].waiters == 1
	})
	cancel2()
	if err := <-leaderErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("leader: %v", err)
	}
	time.Sleep(10 * time.Millisecond)
	for _, p := range held {
		p.Release()
	}
	if err := <-follower; err != nil {
		t.Fatalf("follower after the leader gave up: %v", err)
	}
}

func TestAllocWaits(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	defer c.Close()
	var held []*Page
	for p := c.TryAlloc(); p != nil; p = c.TryAlloc() {
		held = append(held, p)
	}
	if len(held) != c.Frames() {
		t.Fatalf("TryAlloc gave %d of %d frames", len(held), c.Frames())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := c.Alloc(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Alloc with every frame held: %v", err)
	}
	if c.allocWaiters.Load() != 0 {
		t.Fatal("a canceled waiter is still counted")
	}

	// Woken by a Release that frees a frame.
	got := make(chan *Page)
	go func() {
		p, err := c.Alloc(context.Background())
		if err != nil {
			t.Error(err)
		}
		got <- p
	}()
	waitFor(t, func() bool { return c.allocWaiters.Load() == 1 })
	held[0].Release()
	p := <-got
	if p != held[0] {
		t.Fatal("Alloc did not get the released frame")
	}

	// Woken by a Release that leaves an indexed page to the index alone.
	k := Key{Obj: 9}
	stamp(held[1], k, 1)
	c.Insert(k, held[1])
	go func() {
		p, err := c.Alloc(context.Background())
		if err != nil {
			t.Error(err)
		}
		got <- p
	}()
	waitFor(t, func() bool { return c.allocWaiters.Load() == 1 })
	held[1].Release()
	if q := <-got; q != held[1] {
		t.Fatal("Alloc did not evict the page only the index held")
	}
	if c.Lookup(k) != nil {
		t.Fatal("evicted page still indexed")
	}
	held[0] = p
	for _, p := range held {
		p.Release()
	}
	if st := c.Stats(); st.FreeFrames != st.Frames || st.Evictions != 1 {
		t.Fatalf("stats %+v", st)
	}

	// Many waiters, frames trickling back: every waiter gets one, none is lost.
	held = held[:0]
	for p := c.TryAlloc(); p != nil; p = c.TryAlloc() {
		held = append(held, p)
	}
	const waiters = 20
	results := make(chan *Page, waiters)
	for i := 0; i < waiters; i++ {
		go func() {
			p, err := c.Alloc(context.Background())
			if err != nil {
				t.Error(err)
			}
			results <- p
		}()
	}
	for i := 0; i < waiters; i++ {
		if i%2 == 0 {
			held[i].Release()
		} else { // via the index
			c.Insert(Key{Obj: 100, Block: int64(i)}, held[i])
			held[i].Release()
		}
	}
	for i := 0; i < waiters; i++ {
		select {
		case p := <-results:
			p.Release()
		case <-time.After(5 * time.Second):
			t.Fatalf("only %d of %d waiters got a frame", i, waiters)
		}
	}
	for _, p := range held[waiters:] {
		p.Release()
	}
}

func TestAcquireDirty(t *testing.T) {
	var kicks atomic.Int32
	size := MinSize(4096) * 2
	c, err := New(Options{Size: size, BlockSize: 4096, DirtyLimit: 16 * 4096, Kick: func() { kicks.Add(1) }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.AcquireDirty(ctx, 17); !errors.Is(err, ErrDirtyTooLarge) {
		t.Fatalf("over the limit: %v", err)
	}
	if err := c.AcquireDirty(ctx, -1); err == nil {
		t.Fatal("negative request accepted")
	}
	if err := c.AcquireDirty(ctx, 8); err != nil || kicks.Load() != 0 {
		t.Fatalf("up to the background threshold: %v, %d kicks", err, kicks.Load())
	}
	if err := c.AcquireDirty(ctx, 1); err != nil || kicks.Load() != 1 {
		t.Fatalf("going over the background threshold (8): %v, %d kicks", err, kicks.Load())
	}
	if err := c.AcquireDirty(ctx, 7); err != nil || kicks.Load() != 1 || c.DirtyPages() != 16 {
		t.Fatalf("up to the limit: %v, %d kicks, %d dirty", err, kicks.Load(), c.DirtyPages())
	}
	if st := c.Stats(); st.DirtyPages != 16 || st.DirtyBytes != 16*4096 {
		t.Fatalf("stats %+v", st)
	}

	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := c.AcquireDirty(short, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("at the limit: %v", err)
	}
	if kicks.Load() != 2 || c.DirtyPages() != 16 {
		t.Fatalf("after a canceled wait: %d kicks, %d dirty", kicks.Load(), c.DirtyPages())
	}

	// Waiters are served in order and woken by ReleaseDirty.
	order := make(chan int, 3)
	for i, n := range []int{8, 2, 1} {
		go func() {
			if err := c.AcquireDirty(ctx, n); err != nil {
				t.Error(err)
			}
			order <- i
		}()
		waitFor(t, func() bool { c.dirty.mu.Lock(); defer c.dirty.mu.Unlock(); return len(c.dirty.queue) == i+1 })
	}
	c.ReleaseDirty(4) // 12: the 8 does not fit yet, and the small ones wait behind it
	time.Sleep(10 * time.Millisecond)
	if len(order) != 0 {
		t.Fatal("a writer jumped the queue")
	}
	c.ReleaseDirty(6) // 6: 8 fits (14), then 2 (16), not 1
	if a, b := <-order, <-order; a+b != 1 {
		t.Fatalf("granted %d and %d, want 0 and 1", a, b)
	}
	if c.DirtyPages() != 16 {
		t.Fatalf("dirty %d", c.DirtyPages())
	}
	c.ReleaseDirty(1)
	if <-order != 2 {
		t.Fatal("last waiter")
	}
	c.ReleaseDirty(16)
	if c.DirtyPages() != 0 {
		t.Fatalf("dirty %d", c.DirtyPages())
	}
	mustPanic(t, "only 0", func() { c.ReleaseDirty(1) })
}

func TestRemoveRangeAndObject(t *testing.T) {
	c := newTestCache(t, 4096, 512, 4096)
	defer c.Close()
	fill := func() {
		for obj := uint64(1); obj <= 3; obj++ {
			for b := int64(0); b < 100; b++ {
				k := Key{Obj: obj, Block: b}
				if p := c.Lookup(k); p != nil {
					p.Release()
					continue
				}
				insertNew(t, c, k)
			}
		}
		c.policy.Wait()
		if st := c.Stats(); st.CleanPages != 300 {
			t.Fatalf("filled %d pages, want 300", st.CleanPages)
		}
	}
	present := func(obj uint64, b int64) bool {
		p := c.Lookup(Key{Obj: obj, Block: b})
		if p != nil {
			p.Release()
		}
		return p != nil
	}
	check := func(name string, gone func(obj uint64, b int64) bool) {
		t.Helper()
		for obj := uint64(1); obj <= 3; obj++ {
			for b := int64(0); b < 100; b++ {
				if got := present(obj, b); got == gone(obj, b) {
					t.Fatalf("%s: %d:%d present %v", name, obj, b, got)
				}
			}
		}
	}
	fill()
	c.RemoveRange(2, 10, 20) // lookups
	check("small range", func(obj uint64, b int64) bool { return obj == 2 && b >= 10 && b < 30 })
	fill()
	c.RemoveRange(2, 50, 1<<40) // scan
	check("large range", func(obj uint64, b int64) bool { return obj == 2 && b >= 50 })
	fill()
	c.RemoveRange(2, 95, 1<<62+(1<<62-1)) // start+n overflows
	check("overflowing range", func(obj uint64, b int64) bool { return obj == 2 && b >= 95 })
	fill()
	c.RemoveRange(2, 0, 0)
	c.RemoveRange(2, 0, -5)
	c.RemoveObject(3)
	check("object", func(obj uint64, b int64) bool { return obj == 3 })
	if st := c.Stats(); st.CleanPages != 200 || st.FreeFrames != st.Frames-200 || st.Evictions != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestScanResistance keeps a hot set in use while a one-pass scan ten times
// the cache's size streams through, and measures the hot set's hit ratio
// during the scan.
func TestScanResistance(t *testing.T) {
	c := newTestCache(t, 4096, 1024, 4096)
	defer c.Close()
	ctx := context.Background()
	hot := c.CleanCapacity() / 2
	load := func(k Key) bool {
		// As the engine does: Lookup (which counts the access), then Load.
		if p := c.Lookup(k); p != nil {
			checkStamp(t, p, k)
			p.Release()
			return true
		}
		hit := true
		p, err := c.Load(ctx, k, func(p *Page) error {
			hit = false
			stamp(p, k, 1)
			// A real miss waits for the device. Without any pause, and with
			// the CPU taken, the policy's goroutine may not run, and
			// ristretto drops the reads it could not buffer.
			runtime.Gosched()
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		checkStamp(t, p, k)
		p.Release()
		return hit
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20*hot; i++ { // warm up: each hot key ~20 times
		load(Key{Obj: 1, Block: r.Int64N(int64(hot))})
	}
	c.policy.Wait()
	scan := 10 * c.Frames()
	hotHits, hotN := 0, 0
	for i := 0; i < scan; i++ {
		load(Key{Obj: 2, Block: int64(i)}) // each scanned block once
		if i%2 == 0 {
			hotN++
			if load(Key{Obj: 1, Block: r.Int64N(int64(hot))}) {
				hotHits++
			}
		}
	}
	ratio := float64(hotHits) / float64(hotN)
	lruRatio := lruHotHitRatio(c.CleanCapacity(), hot, scan)
	t.Logf("hot set %d pages, clean capacity %d, scan %d blocks: hot hit ratio during the scan %.3f (%d/%d; an LRU of the same capacity: %.3f), evictions %d (forced %d)",
		hot, c.CleanCapacity(), scan, ratio, hotHits, hotN, lruRatio, c.Stats().Evictions, c.Stats().ForcedEvictions)
	if raceEnabled {
		// sync.Pool drops a quarter of its Puts under the race detector, and
		// ristretto buffers reads in a sync.Pool: its frequency sketch sees
		// almost no reads, so TinyLFU has nothing to go on.
		t.Log("race detector on: hit ratio not checked")
		return
	}
	if ratio < 0.8 || ratio < lruRatio+0.2 {
		t.Fatalf("hot hit ratio %.3f during a scan", ratio)
	}
}

func TestClose(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	p := c.TryAlloc()
	insertNew(t, c, Key{Obj: 1})
	if err := c.AcquireDirty(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); !errors.Is(err, ErrBusy) {
		t.Fatalf("Close with a page held and dirty pages counted: %v", err)
	}
	p.Release()
	if err := c.Close(); !errors.Is(err, ErrBusy) {
		t.Fatalf("Close with dirty pages counted: %v", err)
	}
	c.ReleaseDirty(1)
	if q := c.Lookup(Key{Obj: 1}); q == nil {
		t.Fatal("a refused Close changed the cache")
	} else {
		q.Release()
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if c.Arena().Bytes() != nil {
		t.Fatal("arena still mapped")
	}
	if _, err := c.Alloc(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Alloc after Close: %v", err)
	}
	if _, err := c.Load(context.Background(), Key{}, func(*Page) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Load after Close: %v", err)
	}
	if err := c.AcquireDirty(context.Background(), 1); !errors.Is(err, ErrClosed) {
		t.Fatalf("AcquireDirty after Close: %v", err)
	}
	if c.TryAlloc() != nil || c.Lookup(Key{Obj: 1}) != nil {
		t.Fatal("TryAlloc or Lookup after Close")
	}
	c.Remove(Key{Obj: 1})
	c.RemoveObject(1)
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

// lruHotHitRatio replays the access pattern of TestScanResistance (the same
// random sequence) on an LRU of capacity pages and returns the hot set's hit
// ratio during the scan, for comparison.
func lruHotHitRatio(capacity, hot, scan int) float64 {
	type node struct {
		k          Key
		prev, next *node
	}
	head := &node{}
	head.prev, head.next = head, head
	index := map[Key]*node{}
	access := func(k Key) bool {
		if n := index[k]; n != nil {
			n.prev.next, n.next.prev = n.next, n.prev
			n.next, n.prev = head.next, head
			head.next.prev = n
			head.next = n
			return true
		}
		n := &node{k: k, next: head.next, prev: head}
		head.next.prev = n
		head.next = n
		index[k] = n
		if len(index) > capacity {
			last := head.prev
			last.prev.next, head.prev = head, last.prev
			delete(index, last.k)
		}
		return false
	}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20*hot; i++ {
		access(Key{Obj: 1, Block: r.Int64N(int64(hot))})
	}
	hits, n := 0, 0
	for i := 0; i < scan; i++ {
		access(Key{Obj: 2, Block: int64(i)})
		if i%2 == 0 {
			n++
			if access(Key{Obj: 1, Block: r.Int64N(int64(hot))}) {
				hits++
			}
		}
	}
	return float64(hits) / float64(n)
}

// TestAllocRunSortsFreedFrames: frames freed in any order come back from
// AllocRun ascending, so neighbours in the arena form one span; it never
// takes more than asked or than is free, never evicts, and each frame it
// hands out has one reference.
// allocAll takes every frame TryAlloc gives, one at a time.
func allocAll(c *Cache) []*Page {
	var held []*Page
	for p := c.TryAlloc(); p != nil; p = c.TryAlloc() {
		held = append(held, p)
	}
	return held
}

func TestAllocRunSortsFreedFrames(t *testing.T) {
	c := newTestCache(t, 4096, 64, 0)
	held := allocAll(c)
	if got := c.AllocRun(nil, 4); len(got) != 0 {
		t.Fatalf("AllocRun on an empty free list returned %d frames", len(got))
	}
	// Free 32 frames that neighbour each other in a shuffled order: popped
	// one by one they would seldom follow each other.
	slices.SortFunc(held, func(a, b *Page) int { return cmp.Compare(a.idx, b.idx) })
	run := slices.Clone(held[8:40])
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(run), func(i, j int) { run[i], run[j] = run[j], run[i] })
	for _, p := range run {
		p.Release()
	}
	got := c.AllocRun(nil, 32)
	if len(got) != 32 {
		t.Fatalf("AllocRun(32) with 32 free returned %d", len(got))
	}
	for i, p := range got {
		if r := p.refs.Load(); r != 1 {
			t.Fatalf("frame %d has %d references", p.idx, r)
		}
		if i > 0 && !p.Follows(got[i-1]) {
			t.Fatalf("frames %d then %d: not one span", got[i-1].idx, p.idx)
		}
	}
	if span := got[0].Span(len(got)); len(span) != 32*4096 {
		t.Fatalf("span of %d bytes", len(span))
	}
	// Part of what is free: the top of the free list, ascending.
	for _, p := range got {
		p.Release()
	}
	got = c.AllocRun(nil, 20)
	if len(got) != 20 {
		t.Fatalf("AllocRun(20) with 32 free returned %d", len(got))
	}
	for i := 1; i < len(got); i++ {
		if got[i].idx <= got[i-1].idx {
			t.Fatalf("frames %d then %d: not ascending", got[i-1].idx, got[i].idx)
		}
	}
	rest := c.AllocRun(got, 100)
	if len(rest) != 32 {
		t.Fatalf("AllocRun(100) with 12 free: %d frames in all, want 32", len(rest))
	}
	for _, p := range rest {
		p.Release()
	}
	for _, p := range held[:8] {
		p.Release()
	}
	for _, p := range held[40:] {
		p.Release()
	}
	c.Close()
	if got := c.AllocRun(nil, 4); len(got) != 0 {
		t.Fatalf("AllocRun on a closed cache returned %d frames", len(got))
	}
}

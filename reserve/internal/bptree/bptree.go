// Package bptree is an in-memory B+tree of unique keys, each a pair of
// uint64 compared lexicographically, with a value of any type per key.
//
// It exists for the allocator's free-space indexes, where every Alloc and
// Free costs several tree operations on trees of 100,000 and more extents,
// so the cost of one descent is the cost of the allocator. What it does
// differently from a general-purpose B-tree, and why:
//
//   - The key type is fixed, so a comparison is one inlined 128-bit
//     subtraction instead of an indirect call, and a leaf is searched by
//     adding up those borrows, without a branch to mispredict (see
//     lowerBound).
//   - Items live only in the leaves, keys and values in separate arrays (a
//     search touches only keys), and the leaves are linked both ways: a
//     Cursor steps to the neighbours of an item without a second descent,
//     which is how one seek answers both "last item <= k" and "first
//     item > k".
//   - An item can be deleted, its value replaced, or a new item inserted next
//     to it through a cursor, without a descent, whenever that cannot break
//     the tree's structure (the leaf neither under- nor overflows and the
//     new key lies strictly between two keys of the leaf); otherwise the
//     operation falls back to the ordinary one.
//   - Nodes that merges free are kept for reuse (up to a bound), so a tree
//     whose size hovers allocates nothing.
//
// A Tree is not safe for concurrent use; its user locks.
package bptree

import (
	"errors"
	"fmt"
	"math/bits"
)

// Key is a tree key: ordered by A, then by B.
type Key struct {
	A, B uint64
}

// Less reports whether k orders before o.
func (k Key) Less(o Key) bool { return less(k, o) != 0 }

// less is 1 if k orders before o, else 0: the borrow out of the 128-bit
// subtraction k-o, computed without a branch.
func less(k, o Key) uint64 {
	_, b := bits.Sub64(k.B, o.B, 0)
	_, b = bits.Sub64(k.A, o.A, b)
	return b
}

// String formats the key as "(A,B)".
func (k Key) String() string { return fmt.Sprintf("(%d,%d)", k.A, k.B) }

const (
	// leafCap and innerCap are the most items of a leaf and children of an
	// inner node. Measured on the allocator's benchmark (100,000 free
	// extents): leaves of 32 and 128 and inner nodes of 128 were within
	// noise of 64, leaves of 16 slower.
	leafCap  = 64
	innerCap = 64
	// leafMin and innerMin are the fewest a node other than the root keeps
	// after a delete. A quarter rather than the textbook half: a leaf that
	// hovers around its minimum does not split and merge on every other
	// operation, and most deletes stay on the descent-free path of
	// DeleteAt. Memory stays O(items): at worst four times the packed size.
	leafMin  = leafCap / 4
	innerMin = innerCap / 4
	// maxHeight bounds the inner levels; with innerMin children per node it
	// covers 2^48 items, more than fit in memory.
	maxHeight = 12
	// poolMax bounds the nodes kept for reuse.
	poolMax = 64
)

type leaf[V any] struct {
	n          int
	prev, next *leaf[V]
	keys       [leafCap]Key
	vals       [leafCap]V
}

// inner is an interior node with n children. For 1 <= i < n, keys[i]
// separates child i-1 from child i: every key below child i-1 is less than
// keys[i], every key below child i is at least keys[i]. keys[0] is unused,
// which keeps child and separator indexes equal. Children are inner nodes
// one level down (inners) or, on the level above the leaves, leaves.
type inner[V any] struct {
	n      int
	keys   [innerCap]Key
	inners [innerCap]*inner[V]
	leaves [innerCap]*leaf[V]
}

// Tree is a B+tree from Key to V. The zero value is an empty tree ready to
// use.
type Tree[V any] struct {
	// height counts the inner levels: 0 means the root is rootLeaf.
	height     int
	root       *inner[V]
	rootLeaf   *leaf[V]
	head, tail *leaf[V]
	n          int

	freeLeaves []*leaf[V]
	freeInners []*inner[V]
}

// pathStep is one inner node on the way down and the child taken.
type pathStep[V any] struct {
	x *inner[V]
	i int
}

// Len returns the number of items.
func (t *Tree[V]) Len() int { return t.n }

// Cursor points at one item of a tree, or nowhere (not Valid). Any change to
// the tree other than through this cursor's own SetValue invalidates every
// cursor of it.
type Cursor[V any] struct {
	l *leaf[V]
	i int
}

// Valid reports whether c points at an item.
func (c Cursor[V]) Valid() bool { return c.l != nil }

// Key returns the key of the item c points at. c must be Valid.
func (c Cursor[V]) Key() Key { return c.l.keys[c.i] }

// Value returns the value of the item c points at. c must be Valid.
func (c Cursor[V]) Value() V { return c.l.vals[c.i] }

// SetValue replaces the value of the item c points at. c must be Valid; it
// stays valid.
func (c Cursor[V]) SetValue(v V) { c.l.vals[c.i] = v }

// Next moves c to the next item in key order, or makes it invalid after the
// last one. An invalid cursor stays invalid.
func (c *Cursor[V]) Next() {
	if c.l == nil {
		return
	}
	c.i++
	if c.i == c.l.n {
		c.l, c.i = c.l.next, 0
	}
}

// Prev moves c to the previous item in key order, or makes it invalid
// before the first one. An invalid cursor stays invalid.
func (c *Cursor[V]) Prev() {
	if c.l == nil {
		return
	}
	if c.i > 0 {
		c.i--
		return
	}
	c.l = c.l.prev
	if c.l != nil {
		c.i = c.l.n - 1
	}
}

// lowerBound returns the index of the first key of l that is >= k: the
// number of keys below k, since the keys are sorted.
//
// Leaves are where a descent misses the cache (the inner levels of a tree
// of 100k items stay in L2). A binary search there waits for one miss per
// probe and mispredicts half its branches; counting over every key has no
// branch to mispredict and loads that do not depend on each other, so the
// misses overlap. Measured on BenchmarkAllocFree100kFreeExtents, this took
// a fifth off Alloc; the same count over all of an inner node, which is
// cached, was slower than a binary search (see child for what is used).
func (l *leaf[V]) lowerBound(k Key) int {
	var c uint64
	for _, x := range l.keys[:l.n] {
		c += less(x, k)
	}
	return int(c)
}

// child returns the index of the child of x under which k belongs: the last
// one whose separator is <= k, which is the number of separators in
// keys[1:n] that are <= k.
//
// Inner nodes are in cache, so what a binary search costs here is its
// mispredicted branches. Instead, count first over every eighth separator,
// which says how many whole groups of eight lie at or below k, then over
// the seven separators of the next group: at most 14 comparisons, none of
// them a branch. Measured against the binary search, a few percent off
// Alloc and Free.
func (x *inner[V]) child(k Key) int {
	last := x.n - 1 // separators are keys[1..last]
	var g uint64
	for m := 8; m <= last; m += 8 {
		g += 1 - less(k, x.keys[m&(innerCap-1)])
	}
	base := int(g) * 8
	c := uint64(base)
	for i := base + 1; i <= min(base+7, last); i++ {
		c += 1 - less(k, x.keys[i&(innerCap-1)])
	}
	return int(c)
}

// findLeaf returns the leaf under which k belongs (nil in an empty zero
// tree).
func (t *Tree[V]) findLeaf(k Key) *leaf[V] {
	if t.height == 0 {
		return t.rootLeaf
	}
	x := t.root
	for h := t.height; h > 1; h-- {
		x = x.inners[x.child(k)]
	}
	return x.leaves[x.child(k)]
}

// Seek returns a cursor at the first item with key >= k, or an invalid one
// if there is none.
func (t *Tree[V]) Seek(k Key) Cursor[V] {
	l := t.findLeaf(k)
	if l == nil {
		return Cursor[V]{}
	}
	i := l.lowerBound(k)
	if i == l.n {
		// Every key in the next leaf is at least its separator, which is
		// greater than k.
		return Cursor[V]{l: l.next}
	}
	return Cursor[V]{l: l, i: i}
}

// Get returns the value stored under k.
func (t *Tree[V]) Get(k Key) (v V, ok bool) {
	c := t.Seek(k)
	if c.Valid() && c.Key() == k {
		return c.Value(), true
	}
	return v, false
}

// Has reports whether k is in the tree.
func (t *Tree[V]) Has(k Key) bool {
	c := t.Seek(k)
	return c.Valid() && c.Key() == k
}

// Max returns a cursor at the last item (invalid if the tree is empty).
func (t *Tree[V]) Max() Cursor[V] {
	if t.n == 0 {
		return Cursor[V]{}
	}
	return Cursor[V]{l: t.tail, i: t.tail.n - 1}
}

// Ascend calls fn for every item in key order until fn returns false. fn
// must not change the tree.
func (t *Tree[V]) Ascend(fn func(Key, V) bool) {
	if t.n == 0 {
		return
	}
	for l := t.head; l != nil; l = l.next {
		for i := 0; i < l.n; i++ {
			if !fn(l.keys[i], l.vals[i]) {
				return
			}
		}
	}
}

func (t *Tree[V]) newLeaf() *leaf[V] {
	if k := len(t.freeLeaves); k > 0 {
		l := t.freeLeaves[k-1]
		t.freeLeaves = t.freeLeaves[:k-1]
		return l
	}
	return new(leaf[V])
}

// releaseLeaf drops a leaf that is no longer in the tree, keeping it for
// reuse if the pool has room.
func (t *Tree[V]) releaseLeaf(l *leaf[V]) {
	if len(t.freeLeaves) >= poolMax {
		return
	}
	clear(l.vals[:l.n]) // values may hold pointers; do not keep them alive
	l.n, l.prev, l.next = 0, nil, nil
	t.freeLeaves = append(t.freeLeaves, l)
}

func (t *Tree[V]) newInner() *inner[V] {
	if k := len(t.freeInners); k > 0 {
		x := t.freeInners[k-1]
		t.freeInners = t.freeInners[:k-1]
		return x
	}
	return new(inner[V])
}

func (t *Tree[V]) releaseInner(x *inner[V]) {
	if len(t.freeInners) >= poolMax {
		return
	}
	clear(x.inners[:x.n])
	clear(x.leaves[:x.n])
	x.n = 0
	t.freeInners = append(t.freeInners, x)
}

// Insert adds k with value v and reports true, or, if k is already in the
// tree, changes nothing and reports false.
func (t *Tree[V]) Insert(k Key, v V) bool {
	if t.rootLeaf == nil && t.height == 0 {
		t.rootLeaf = t.newLeaf()
		t.head, t.tail = t.rootLeaf, t.rootLeaf
	}
	l := t.findLeaf(k)
	i := l.lowerBound(k)
	if i < l.n && l.keys[i] == k {
		return false
	}
	t.n++
	if l.n < leafCap {
		l.insertAt(i, k, v)
		return true
	}
	// The leaf splits: descend again, this time keeping the path (rare
	// enough that the common case should not pay for recording it).
	var path [maxHeight]pathStep[V]
	l = t.descend(k, &path)
	nl := t.splitLeaf(l, splitAt(i, leafCap, leafMin))
	if i <= l.n {
		l.insertAt(i, k, v)
	} else {
		nl.insertAt(i-l.n, k, v)
	}
	t.addChild(&path, t.height-1, nl.keys[0], nil, nl)
	return true
}

// descend returns the leaf under which k belongs and records the inner
// nodes and children taken on the way in path[:t.height].
func (t *Tree[V]) descend(k Key, path *[maxHeight]pathStep[V]) *leaf[V] {
	if t.height == 0 {
		return t.rootLeaf
	}
	x := t.root
	for lvl := 0; ; lvl++ {
		i := x.child(k)
		path[lvl] = pathStep[V]{x, i}
		if lvl == t.height-1 {
			return x.leaves[i]
		}
		x = x.inners[i]
	}
}

// InsertNear is Insert for a key whose place is known: c must be the result
// of Seek(k) (or a cursor at the same item), and k must not be in the tree.
// When the leaf has room and k lies strictly between two of its keys (or
// after the last key of the tree) it is inserted without a descent;
// otherwise it falls back to Insert. It panics if k is not where c says.
func (t *Tree[V]) InsertNear(c Cursor[V], k Key, v V) {
	l, i := c.l, c.i
	if l == nil {
		// k is after every key: it goes at the end of the last leaf.
		l = t.tail
		if l != nil {
			i = l.n
		}
	}
	if l != nil && i > 0 && l.n < leafCap {
		if !l.keys[i-1].Less(k) || i < l.n && !k.Less(l.keys[i]) {
			panic(fmt.Sprintf("bptree: InsertNear %v: cursor is not at its successor (%v, %d)", k, l.keys[i-1], i))
		}
		l.insertAt(i, k, v)
		t.n++
		return
	}
	if !t.Insert(k, v) {
		panic(fmt.Sprintf("bptree: InsertNear %v: key already present", k))
	}
}

func (l *leaf[V]) insertAt(i int, k Key, v V) {
	copy(l.keys[i+1:l.n+1], l.keys[i:l.n])
	copy(l.vals[i+1:l.n+1], l.vals[i:l.n])
	l.keys[i], l.vals[i] = k, v
	l.n++
}

func (l *leaf[V]) removeAt(i int) {
	copy(l.keys[i:l.n-1], l.keys[i+1:l.n])
	copy(l.vals[i:l.n-1], l.vals[i+1:l.n])
	l.n--
	var zero V
	l.vals[l.n] = zero
}

// splitAt is where a full node of capacity c splits when an item goes in
// at index i: in the middle, except for an item added after the last one,
// where the node keeps all but the minimum. Items added in order (a Space
// built at open) then fill nodes to three quarters instead of a half.
func splitAt(i, c, minimum int) int {
	if i == c {
		return c - minimum
	}
	return c / 2
}

// splitLeaf moves the items of the full leaf l from index at on into a new
// leaf linked after it and returns that leaf.
func (t *Tree[V]) splitLeaf(l *leaf[V], at int) *leaf[V] {
	nl := t.newLeaf()
	nl.n = copy(nl.keys[:], l.keys[at:l.n])
	copy(nl.vals[:], l.vals[at:l.n])
	clear(l.vals[at:l.n])
	l.n = at
	nl.prev, nl.next = l, l.next
	if l.next != nil {
		l.next.prev = nl
	} else {
		t.tail = nl
	}
	l.next = nl
	return nl
}

// addChild inserts a new child (ni, or nl on the level above the leaves)
// with separator sep right after the child path[lvl] went to, splitting
// upwards as needed. lvl -1 means the split node was the root.
func (t *Tree[V]) addChild(path *[maxHeight]pathStep[V], lvl int, sep Key, ni *inner[V], nl *leaf[V]) {
	for ; lvl >= 0; lvl-- {
		x, pos := path[lvl].x, path[lvl].i+1
		if x.n < innerCap {
			x.insertChild(pos, sep, ni, nl)
			return
		}
		// Split x: y takes the children from mid on, and x.keys[mid],
		// the separator of y's first child, moves up.
		y := t.newInner()
		mid := splitAt(pos, innerCap, innerMin)
		y.n = x.n - mid
		copy(y.keys[1:y.n], x.keys[mid+1:x.n])
		copy(y.inners[:y.n], x.inners[mid:x.n])
		copy(y.leaves[:y.n], x.leaves[mid:x.n])
		up := x.keys[mid]
		clear(x.inners[mid:x.n])
		clear(x.leaves[mid:x.n])
		x.n = mid
		if pos <= mid {
			x.insertChild(pos, sep, ni, nl)
		} else {
			y.insertChild(pos-mid, sep, ni, nl)
		}
		sep, ni, nl = up, y, nil
	}
	// The root split: a new root above the old one and its new sibling.
	r := t.newInner()
	r.n = 2
	r.keys[1] = sep
	if t.height == 0 {
		r.leaves[0], r.leaves[1] = t.rootLeaf, nl
		t.rootLeaf = nil
	} else {
		r.inners[0], r.inners[1] = t.root, ni
	}
	t.root = r
	t.height++
	if t.height > maxHeight {
		panic(fmt.Sprintf("bptree: height %d exceeds %d", t.height, maxHeight))
	}
}

// insertChild inserts child ni or nl at index pos >= 1 with separator sep.
func (x *inner[V]) insertChild(pos int, sep Key, ni *inner[V], nl *leaf[V]) {
	copy(x.keys[pos+1:x.n+1], x.keys[pos:x.n])
	copy(x.inners[pos+1:x.n+1], x.inners[pos:x.n])
	copy(x.leaves[pos+1:x.n+1], x.leaves[pos:x.n])
	x.keys[pos], x.inners[pos], x.leaves[pos] = sep, ni, nl
	x.n++
}

// removeChild removes the child at index pos >= 1 and its separator.
func (x *inner[V]) removeChild(pos int) {
	copy(x.keys[pos:x.n-1], x.keys[pos+1:x.n])
	copy(x.inners[pos:x.n-1], x.inners[pos+1:x.n])
	copy(x.leaves[pos:x.n-1], x.leaves[pos+1:x.n])
	x.n--
	x.inners[x.n], x.leaves[x.n] = nil, nil
}

// Delete removes k and returns its value, or reports false if k is not in
// the tree.
func (t *Tree[V]) Delete(k Key) (v V, ok bool) {
	if t.n == 0 {
		return v, false
	}
	l := t.findLeaf(k)
	i := l.lowerBound(k)
	if i == l.n || l.keys[i] != k {
		return v, false
	}
	v = l.vals[i]
	if t.height == 0 || l.n > leafMin {
		l.removeAt(i)
		t.n--
		return v, true
	}
	var path [maxHeight]pathStep[V]
	l = t.descend(k, &path)
	l.removeAt(i)
	t.n--
	t.rebalanceLeaf(&path, l)
	return v, true
}

// DeleteAt removes the item c points at (c must be Valid). When the leaf
// keeps enough items this takes no descent; otherwise it falls back to
// Delete, which rebalances.
func (t *Tree[V]) DeleteAt(c Cursor[V]) {
	if l := c.l; t.height == 0 || l.n > leafMin {
		l.removeAt(c.i)
		t.n--
		return
	}
	if _, ok := t.Delete(c.Key()); !ok {
		panic(fmt.Sprintf("bptree: DeleteAt: key %v not found by descent", c.Key()))
	}
}

// DeleteRun removes the n items starting at the one c points at (c must be
// Valid and n items must follow from it, 1 <= n <= 8). Within one leaf
// that keeps enough items this takes no descent; otherwise each item is
// deleted with Delete.
func (t *Tree[V]) DeleteRun(c Cursor[V], n int) {
	if n < 1 || n > 8 {
		panic(fmt.Sprintf("bptree: DeleteRun of %d items", n))
	}
	l, i := c.l, c.i
	if i+n <= l.n && (t.height == 0 || l.n-n >= leafMin) {
		copy(l.keys[i:l.n-n], l.keys[i+n:l.n])
		copy(l.vals[i:l.n-n], l.vals[i+n:l.n])
		clear(l.vals[l.n-n : l.n])
		l.n -= n
		t.n -= n
		return
	}
	var keys [8]Key
	for j := range n {
		if !c.Valid() {
			panic(fmt.Sprintf("bptree: DeleteRun of %d items: only %d follow", n, j))
		}
		keys[j] = c.Key()
		c.Next()
	}
	for _, k := range keys[:n] {
		if _, ok := t.Delete(k); !ok {
			panic(fmt.Sprintf("bptree: DeleteRun: key %v not found by descent", k))
		}
	}
}

// ReplaceKey changes the key of the item c points at to k, keeping its
// value. When k keeps the item's place in its leaf (strictly between its
// neighbours there, and inside the leaf's separators) the key is
// overwritten without a descent; otherwise it is a delete and an insert.
// It panics if k is already in the tree under another item.
func (t *Tree[V]) ReplaceKey(c Cursor[V], k Key) {
	l, i := c.l, c.i
	old := l.keys[i]
	var fits bool
	if k.Less(old) {
		// Moving down: above the previous key in the leaf, or, for the
		// first key, only in the first leaf, which no separator bounds
		// from below.
		fits = i > 0 && l.keys[i-1].Less(k) || i == 0 && l.prev == nil
	} else {
		fits = i < l.n-1 && k.Less(l.keys[i+1]) || i == l.n-1 && l.next == nil
	}
	if fits {
		l.keys[i] = k
		return
	}
	if k == old {
		return
	}
	v := l.vals[i]
	t.DeleteAt(c)
	if !t.Insert(k, v) {
		panic(fmt.Sprintf("bptree: ReplaceKey %v by %v: key already present", old, k))
	}
}

// rebalanceLeaf restores the minimum fill of leaf l (under path) by
// borrowing from a sibling or merging with one.
func (t *Tree[V]) rebalanceLeaf(path *[maxHeight]pathStep[V], l *leaf[V]) {
	lvl := t.height - 1
	p, ci := path[lvl].x, path[lvl].i
	if ci > 0 {
		s := p.leaves[ci-1]
		if s.n > leafMin {
			// Borrow the left sibling's last item; it is the new least
			// key of l.
			l.insertAt(0, s.keys[s.n-1], s.vals[s.n-1])
			s.removeAt(s.n - 1)
			p.keys[ci] = l.keys[0]
			return
		}
		// Merge l into its left sibling.
		copy(s.keys[s.n:], l.keys[:l.n])
		copy(s.vals[s.n:], l.vals[:l.n])
		s.n += l.n
		t.unlinkLeaf(l)
		p.removeChild(ci)
	} else {
		s := p.leaves[1]
		if s.n > leafMin {
			l.insertAt(l.n, s.keys[0], s.vals[0])
			s.removeAt(0)
			p.keys[1] = s.keys[0]
			return
		}
		// Merge the right sibling into l.
		copy(l.keys[l.n:], s.keys[:s.n])
		copy(l.vals[l.n:], s.vals[:s.n])
		l.n += s.n
		t.unlinkLeaf(s)
		p.removeChild(1)
	}
	t.rebalanceInner(path, lvl)
}

func (t *Tree[V]) unlinkLeaf(l *leaf[V]) {
	if l.prev != nil {
		l.prev.next = l.next
	} else {
		t.head = l.next
	}
	if l.next != nil {
		l.next.prev = l.prev
	} else {
		t.tail = l.prev
	}
	t.releaseLeaf(l)
}

// rebalanceInner restores the minimum fill of path[lvl].x after it lost a
// child, walking up while merges cascade, and lowers the root when it is
// left with one child.
func (t *Tree[V]) rebalanceInner(path *[maxHeight]pathStep[V], lvl int) {
	for ; lvl > 0; lvl-- {
		x := path[lvl].x
		if x.n >= innerMin {
			return
		}
		p, ci := path[lvl-1].x, path[lvl-1].i
		if ci > 0 {
			s := p.inners[ci-1]
			if s.n > innerMin {
				// x's new first child comes from s; x's old first child
				// gets the separator that bounded x from below.
				x.insertChild(1, p.keys[ci], nil, nil)
				x.inners[1], x.leaves[1] = x.inners[0], x.leaves[0]
				x.inners[0], x.leaves[0] = s.inners[s.n-1], s.leaves[s.n-1]
				p.keys[ci] = s.keys[s.n-1]
				s.n--
				s.inners[s.n], s.leaves[s.n] = nil, nil
				return
			}
			mergeInner(s, x, p.keys[ci])
			p.removeChild(ci)
			t.releaseInner(x)
		} else {
			s := p.inners[1]
			if s.n > innerMin {
				x.keys[x.n] = p.keys[1]
				x.inners[x.n], x.leaves[x.n] = s.inners[0], s.leaves[0]
				x.n++
				p.keys[1] = s.keys[1]
				copy(s.keys[1:s.n-1], s.keys[2:s.n])
				copy(s.inners[:s.n-1], s.inners[1:s.n])
				copy(s.leaves[:s.n-1], s.leaves[1:s.n])
				s.n--
				s.inners[s.n], s.leaves[s.n] = nil, nil
				return
			}
			mergeInner(x, s, p.keys[1])
			p.removeChild(1)
			t.releaseInner(s)
		}
	}
	// lvl == 0: the root. It may go down to two children; with one left,
	// that child becomes the root.
	if r := t.root; r.n == 1 {
		if t.height == 1 {
			t.rootLeaf = r.leaves[0]
		} else {
			t.root = r.inners[0]
		}
		t.height--
		if t.height == 0 {
			t.root = nil
		}
		t.releaseInner(r)
	}
}

// mergeInner appends the children of s to x; sep is the separator that
// stood between them in their parent.
func mergeInner[V any](x, s *inner[V], sep Key) {
	x.keys[x.n] = sep
	copy(x.keys[x.n+1:], s.keys[1:s.n])
	copy(x.inners[x.n:], s.inners[:s.n])
	copy(x.leaves[x.n:], s.leaves[:s.n])
	x.n += s.n
}

// errCheck wraps every structural problem Check finds.
var errCheck = errors.New("bptree: broken tree")

// Check verifies the structure of the tree: fill bounds, key order within
// and across nodes, separators, the leaf chain, and the item count. It
// walks every node: for tests.
func (t *Tree[V]) Check() error {
	var leaves []*leaf[V]
	count := 0
	var walk func(x *inner[V], h int, lo, hi *Key) error
	checkLeaf := func(l *leaf[V], lo, hi *Key, root bool) error {
		if !root && l.n < leafMin || l.n > leafCap {
			return fmt.Errorf("%w: leaf with %d items outside [%d, %d]", errCheck, l.n, leafMin, leafCap)
		}
		for i := 0; i < l.n; i++ {
			k := l.keys[i]
			if i > 0 && !l.keys[i-1].Less(k) {
				return fmt.Errorf("%w: leaf keys %v, %v out of order", errCheck, l.keys[i-1], k)
			}
			if lo != nil && k.Less(*lo) || hi != nil && !k.Less(*hi) {
				return fmt.Errorf("%w: leaf key %v outside its separators", errCheck, k)
			}
		}
		leaves = append(leaves, l)
		count += l.n
		return nil
	}
	walk = func(x *inner[V], h int, lo, hi *Key) error {
		if x.n < 2 || x != t.root && x.n < innerMin || x.n > innerCap {
			return fmt.Errorf("%w: inner node with %d children", errCheck, x.n)
		}
		for i := 0; i < x.n; i++ {
			clo, chi := lo, hi
			if i > 0 {
				clo = &x.keys[i]
				if lo != nil && clo.Less(*lo) || hi != nil && !clo.Less(*hi) || i > 1 && !x.keys[i-1].Less(*clo) {
					return fmt.Errorf("%w: separator %v out of order", errCheck, *clo)
				}
			}
			if i < x.n-1 {
				chi = &x.keys[i+1]
			}
			var err error
			if h > 1 {
				if x.leaves[i] != nil || x.inners[i] == nil {
					return fmt.Errorf("%w: inner node child %d of the wrong kind", errCheck, i)
				}
				err = walk(x.inners[i], h-1, clo, chi)
			} else {
				if x.inners[i] != nil || x.leaves[i] == nil {
					return fmt.Errorf("%w: inner node child %d of the wrong kind", errCheck, i)
				}
				err = checkLeaf(x.leaves[i], clo, chi, false)
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	var err error
	switch {
	case t.height == 0 && t.rootLeaf == nil:
		if t.n != 0 || t.head != nil || t.tail != nil {
			return fmt.Errorf("%w: no root but %d items", errCheck, t.n)
		}
		return nil
	case t.height == 0:
		if t.root != nil {
			return fmt.Errorf("%w: height 0 with an inner root", errCheck)
		}
		err = checkLeaf(t.rootLeaf, nil, nil, true)
	default:
		if t.rootLeaf != nil {
			return fmt.Errorf("%w: height %d with a root leaf", errCheck, t.height)
		}
		err = walk(t.root, t.height, nil, nil)
	}
	if err != nil {
		return err
	}
	if count != t.n {
		return fmt.Errorf("%w: %d items in the leaves, count says %d", errCheck, count, t.n)
	}
	if t.head != leaves[0] || t.tail != leaves[len(leaves)-1] {
		return fmt.Errorf("%w: head or tail is not the first or last leaf", errCheck)
	}
	for i, l := range leaves {
		var prev, next *leaf[V]
		if i > 0 {
			prev = leaves[i-1]
		}
		if i+1 < len(leaves) {
			next = leaves[i+1]
		}
		if l.prev != prev || l.next != next {
			return fmt.Errorf("%w: leaf chain broken at leaf %d", errCheck, i)
		}
		if l.n == 0 && len(leaves) > 1 {
			return fmt.Errorf("%w: empty leaf %d", errCheck, i)
		}
	}
	return nil
}

package reserve

import (
	"errors"
	"io/fs"
	"math/bits"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"pgregory.net/rapid"
)

func mustCounts(t *testing.T, a *Accountant, want Counts) {
	t.Helper()
	if got := a.Snapshot(); got != want {
		t.Fatalf("counts %+v, want %+v", got, want)
	}
	if err := a.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestAccountantTransitions(t *testing.T) {
	a := NewAccountant(100, 60)
	mustCounts(t, a, Counts{Total: 100, Free: 60, Reserved: 0, Allocated: 40})

	if err := a.Reserve(60); err != nil {
		t.Fatal(err)
	}
	mustCounts(t, a, Counts{Total: 100, Free: 0, Reserved: 60, Allocated: 40})

	err := a.Reserve(1)
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Reserve past free: %v, want ErrNoSpace", err)
	}
	if !strings.Contains(err.Error(), "0 spendable") {
		t.Errorf("error %q does not say how much was spendable", err)
	}
	mustCounts(t, a, Counts{Total: 100, Free: 0, Reserved: 60, Allocated: 40})

	if err := a.Unreserve(61); !errors.Is(err, ErrInvalid) || !errors.Is(err, fs.ErrInvalid) {
		t.Fatalf("Unreserve past reserved: %v, want ErrInvalid (and fs.ErrInvalid)", err)
	}
	if err := a.Unreserve(10); err != nil {
		t.Fatal(err)
	}
	mustCounts(t, a, Counts{Total: 100, Free: 10, Reserved: 50, Allocated: 40})

	if err := a.Consume(51); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Consume past reserved: %v, want ErrInvalid", err)
	}
	if err := a.Consume(50); err != nil {
		t.Fatal(err)
	}
	mustCounts(t, a, Counts{Total: 100, Free: 10, Reserved: 0, Allocated: 90})

	if err := a.Release(91); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Release past allocated: %v, want ErrInvalid", err)
	}
	if err := a.Release(90); err != nil {
		t.Fatal(err)
	}
	mustCounts(t, a, Counts{Total: 100, Free: 100, Reserved: 0, Allocated: 0})
}

func TestAccountantZeroAndNegative(t *testing.T) {
	a := NewAccountant(10, 5)
	ops := map[string]func(int64) error{
		"Reserve": a.Reserve, "Unreserve": a.Unreserve, "Consume": a.Consume, "Release": a.Release,
	}
	for name, op := range ops {
		if err := op(0); err != nil {
			t.Errorf("%s(0) = %v, want nil (no-op)", name, err)
		}
		if err := op(-1); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "negative") {
			t.Errorf("%s(-1) = %v, want ErrInvalid saying negative", name, err)
		}
	}
	mustCounts(t, a, Counts{Total: 10, Free: 5, Allocated: 5})
}

func TestAccountantEmpty(t *testing.T) {
	a := NewAccountant(0, 0)
	mustCounts(t, a, Counts{})
	if err := a.Reserve(1); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Reserve on empty accountant: %v", err)
	}
}

func TestNewAccountantPanicsOnBadArguments(t *testing.T) {
	for _, c := range []struct{ total, free int64 }{
		{-1, 0}, {MaxTotal + 1, 0}, {10, 11}, {10, -1},
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewAccountant(%d, %d) did not panic", c.total, c.free)
				}
			}()
			NewAccountant(c.total, c.free)
		}()
	}
}

// Above 2^32-1 blocks the reserved field is narrower than the total; the
// cap must be enforced exactly and must not corrupt the spendable field.
func TestAccountantLargeTotals(t *testing.T) {
	for _, c := range []struct {
		total, maxReserved int64
	}{
		{1<<32 - 1, 1<<32 - 1},
		{1 << 32, 1<<31 - 1},
		{MaxTotal, 1<<16 - 1},
	} {
		a := NewAccountant(c.total, c.total)
		if got := a.MaxReserved(); got != c.maxReserved {
			t.Fatalf("total %d: MaxReserved %d, want %d", c.total, got, c.maxReserved)
		}
		if err := a.Reserve(c.maxReserved); err != nil {
			t.Fatalf("total %d: Reserve(max %d): %v", c.total, c.maxReserved, err)
		}
		want := Counts{Total: c.total, Free: c.total - c.maxReserved, Reserved: c.maxReserved}
		mustCounts(t, a, want)
		if c.maxReserved < c.total {
			err := a.Reserve(1)
			if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "limit") {
				t.Fatalf("total %d: Reserve past the reservation cap: %v", c.total, err)
			}
			mustCounts(t, a, want)
		}
		// Move everything through allocated and back at the top of the range.
		if err := a.Consume(c.maxReserved); err != nil {
			t.Fatal(err)
		}
		mustCounts(t, a, Counts{Total: c.total, Free: c.total - c.maxReserved, Allocated: c.maxReserved})
		if err := a.Release(c.maxReserved); err != nil {
			t.Fatal(err)
		}
		mustCounts(t, a, Counts{Total: c.total, Free: c.total})
	}
}

// Eight goroutines race for a small space one block at a time: exactly the
// free blocks are granted, never more.
func TestAccountantConcurrentReserveNeverOvercommits(t *testing.T) {
	const total, free, workers = 1000, 700, 8
	for round := 0; round < 20; round++ {
		a := NewAccountant(total, free)
		var granted atomic.Int64
		var wg sync.WaitGroup
		start := make(chan struct{})
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(n int64) {
				defer wg.Done()
				<-start
				for {
					err := a.Reserve(n)
					if errors.Is(err, ErrNoSpace) {
						// Only smaller requests may still fit.
						if n == 1 {
							return
						}
						n = 1
						continue
					}
					if err != nil {
						t.Error(err)
						return
					}
					granted.Add(n)
				}
			}(int64(w%3 + 1))
		}
		close(start)
		wg.Wait()
		if g := granted.Load(); g != free {
			t.Fatalf("round %d: granted %d blocks, free space was %d", round, g, free)
		}
		mustCounts(t, a, Counts{Total: total, Free: 0, Reserved: free, Allocated: total - free})
	}
}

// A mixed workload: every goroutine reserves, gives back, consumes and
// releases only what it holds, while another goroutine checks that every
// snapshot adds up. In the end everyone gives everything back.
func TestAccountantConcurrentInvariant(t *testing.T) {
	const total, workers = 4096, 8
	iters := 20000
	if testing.Short() {
		iters = 2000
	}
	a := NewAccountant(total, total)
	var wg, checker sync.WaitGroup
	stop := make(chan struct{})
	checker.Add(1)
	go func() {
		defer checker.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			c := a.Snapshot()
			if c.Free+c.Reserved+c.Allocated != c.Total || c.Free < 0 || c.Reserved < 0 || c.Allocated < 0 {
				t.Errorf("inconsistent snapshot %+v", c)
				return
			}
			if err := a.Check(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 1))
			var reserved, allocated int64
			for i := 0; i < iters; i++ {
				n := r.Int64N(64) + 1
				switch r.IntN(4) {
				case 0:
					if err := a.Reserve(n); err == nil {
						reserved += n
					} else if !errors.Is(err, ErrNoSpace) {
						t.Error(err)
						return
					}
				case 1:
					n = min(n, reserved)
					if err := a.Unreserve(n); err != nil {
						t.Error(err)
						return
					}
					reserved -= n
				case 2:
					n = min(n, reserved)
					if err := a.Consume(n); err != nil {
						t.Error(err)
						return
					}
					reserved, allocated = reserved-n, allocated+n
				case 3:
					n = min(n, allocated)
					if err := a.Release(n); err != nil {
						t.Error(err)
						return
					}
					allocated -= n
				}
			}
			if err := a.Unreserve(reserved); err != nil {
				t.Error(err)
			}
			if err := a.Release(allocated); err != nil {
				t.Error(err)
			}
		}(uint64(w))
	}
	wg.Wait()
	close(stop)
	checker.Wait()
	mustCounts(t, a, Counts{Total: total, Free: total})
}

// The Accountant against plain counters, over totals from 0 to MaxTotal so
// that every split of the packed word is exercised.
func TestAccountantAgainstCounters(t *testing.T) {
	rapid.Check(t, func(t *rapid.T) {
		// Pick the bit length of total first (half the time above 32, where
		// the reserved field is narrower than total), then total with
		// exactly that length.
		var bitsTotal int
		if rapid.Bool().Draw(t, "wide") {
			bitsTotal = rapid.IntRange(33, 48).Draw(t, "bits")
		} else {
			bitsTotal = rapid.IntRange(0, 32).Draw(t, "bits")
		}
		var total int64
		if bitsTotal > 0 {
			half := int64(1) << (bitsTotal - 1)
			total = half + rapid.Int64Range(0, half-1).Draw(t, "total")
		}
		free := rapid.Int64Range(0, total).Draw(t, "free")
		a := NewAccountant(total, free)
		m := Counts{Total: total, Free: free, Allocated: total - free}
		// The reserved field gets the bits the spendable field leaves.
		rMax := total
		if rb := 64 - bits.Len64(uint64(total)); rb < 63 {
			rMax = min(total, int64(1)<<rb-1)
		}
		if a.MaxReserved() != rMax {
			t.Fatalf("MaxReserved %d, want %d", a.MaxReserved(), rMax)
		}
		// Amounts near the interesting bounds: the current counts, the cap,
		// and small numbers.
		amount := func(t *rapid.T, near int64) int64 {
			switch rapid.IntRange(0, 3).Draw(t, "kind") {
			case 0:
				return rapid.Int64Range(-1, 3).Draw(t, "small")
			case 1:
				return near + rapid.Int64Range(-1, 1).Draw(t, "off")
			default:
				return rapid.Int64Range(0, total+1).Draw(t, "any")
			}
		}
		t.Repeat(map[string]func(*rapid.T){
			"Reserve": func(t *rapid.T) {
				n := amount(t, min(m.Free, rMax-m.Reserved))
				err := a.Reserve(n)
				switch {
				case n < 0:
					if !errors.Is(err, ErrInvalid) {
						t.Fatalf("Reserve(%d) = %v", n, err)
					}
				case n <= m.Free && m.Reserved+n <= rMax:
					if err != nil {
						t.Fatalf("Reserve(%d) with %+v: %v", n, m, err)
					}
					m.Free, m.Reserved = m.Free-n, m.Reserved+n
				default:
					if !errors.Is(err, ErrNoSpace) {
						t.Fatalf("Reserve(%d) with %+v = %v, want ErrNoSpace", n, m, err)
					}
				}
			},
			"Unreserve": func(t *rapid.T) {
				n := amount(t, m.Reserved)
				err := a.Unreserve(n)
				if n < 0 || n > m.Reserved {
					if !errors.Is(err, ErrInvalid) {
						t.Fatalf("Unreserve(%d) with %+v = %v", n, m, err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				m.Free, m.Reserved = m.Free+n, m.Reserved-n
			},
			"Consume": func(t *rapid.T) {
				n := amount(t, m.Reserved)
				err := a.Consume(n)
				if n < 0 || n > m.Reserved {
					if !errors.Is(err, ErrInvalid) {
						t.Fatalf("Consume(%d) with %+v = %v", n, m, err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				m.Reserved, m.Allocated = m.Reserved-n, m.Allocated+n
			},
			"Release": func(t *rapid.T) {
				n := amount(t, m.Allocated)
				err := a.Release(n)
				if n < 0 || n > m.Allocated {
					if !errors.Is(err, ErrInvalid) {
						t.Fatalf("Release(%d) with %+v = %v", n, m, err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				m.Allocated, m.Free = m.Allocated-n, m.Free+n
			},
			"": func(t *rapid.T) {
				if got := a.Snapshot(); got != m {
					t.Fatalf("Snapshot %+v, model %+v", got, m)
				}
				if err := a.Check(); err != nil {
					t.Fatal(err)
				}
			},
		})
	})
}

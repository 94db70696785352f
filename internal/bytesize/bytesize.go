// Package bytesize parses and prints the sizes the command-line tools take
// ("4k", "1M", "2G": powers of 1024), for cmd/bench and cmd/rawblockd alike.
package bytesize

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Size is a size in bytes given on the command line as "4096", "4k",
// "1M", "1G", "2T" (binary multiples: k = 1024). It implements
// encoding.TextUnmarshaler so kong parses flags of this type directly.
type Size int64

// ErrBad is wrapped by every parse error.
var ErrBad = errors.New("bad size")

// Parse parses a size such as "512", "4k", "4K", "4KiB", "1M", "1g".
// The suffixes k, m, g, t (any case, optionally followed by "i", "b" or
// "ib") are powers of 1024. Fractions, negative numbers and values that do not
// fit in an int64 are errors.
func Parse(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("%w: empty", ErrBad)
	}
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("%w %q: must start with a decimal number (e.g. 4k, 1M, 1G)", ErrBad, s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w %q: %w", ErrBad, s, err)
	}
	suffix := strings.ToLower(t[i:])
	var shift uint
	switch suffix {
	case "", "b":
		shift = 0
	case "k", "kb", "ki", "kib":
		shift = 10
	case "m", "mb", "mi", "mib":
		shift = 20
	case "g", "gb", "gi", "gib":
		shift = 30
	case "t", "tb", "ti", "tib":
		shift = 40
	default:
		return 0, fmt.Errorf("%w %q: unknown suffix %q (use k, M, G or T)", ErrBad, s, t[i:])
	}
	if n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%w %q: too large", ErrBad, s)
	}
	return n << shift, nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (b *Size) UnmarshalText(text []byte) error {
	n, err := Parse(string(text))
	if err != nil {
		return err
	}
	*b = Size(n)
	return nil
}

// Format renders n compactly with a binary suffix when it divides
// exactly ("4k", "1M", "1G"), else in bytes.
func Format(n int64) string {
	units := []struct {
		shift  uint
		suffix string
	}{{40, "T"}, {30, "G"}, {20, "M"}, {10, "k"}}
	for _, u := range units {
		if n != 0 && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

package main

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// byteSize is a size in bytes given on the command line as "4096", "4k",
// "1M", "1G", "2T" (binary multiples: k = 1024). It implements
// encoding.TextUnmarshaler so kong parses flags of this type directly.
type byteSize int64

var errBadSize = errors.New("bad size")

// parseSize parses a size such as "512", "4k", "4K", "4KiB", "1M", "1g".
// The suffixes k, m, g, t (any case, optionally followed by "i", "b" or
// "ib") are powers of 1024. Fractions, negative numbers and values that do not
// fit in an int64 are errors.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("%w: empty", errBadSize)
	}
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("%w %q: must start with a decimal number (e.g. 4k, 1M, 1G)", errBadSize, s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w %q: %w", errBadSize, s, err)
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
		return 0, fmt.Errorf("%w %q: unknown suffix %q (use k, M, G or T)", errBadSize, s, t[i:])
	}
	if n > math.MaxInt64>>shift {
		return 0, fmt.Errorf("%w %q: too large", errBadSize, s)
	}
	return n << shift, nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (b *byteSize) UnmarshalText(text []byte) error {
	n, err := parseSize(string(text))
	if err != nil {
		return err
	}
	*b = byteSize(n)
	return nil
}

// formatSize renders n compactly with a binary suffix when it divides
// exactly ("4k", "1M", "1G"), else in bytes.
func formatSize(n int64) string {
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

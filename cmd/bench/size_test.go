package main

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := []struct {
		in   string
		want int64
	}{
		{"0", 0},
		{"512", 512},
		{"4096b", 4096},
		{"4k", 4 << 10},
		{"4K", 4 << 10},
		{"4KiB", 4 << 10},
		{"4kb", 4 << 10},
		{"1M", 1 << 20},
		{"64m", 64 << 20},
		{"1G", 1 << 30},
		{"3g", 3 << 30},
		{"2T", 2 << 40},
		{" 8k ", 8 << 10},
		{"8388607T", 8388607 << 40},
	}
	for _, c := range good {
		got, err := parseSize(c.in)
		if err != nil || got != c.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
	bad := []string{"", "k", "-1", "-4k", "1.5G", "4x", "4kk", "1P", "8388608T", "99999999999999999999", "G1", "0x10"}
	for _, in := range bad {
		got, err := parseSize(in)
		if err == nil {
			t.Errorf("parseSize(%q) = %d, nil; want an error", in, got)
			continue
		}
		if !errors.Is(err, errBadSize) {
			t.Errorf("parseSize(%q) error %v does not wrap errBadSize", in, err)
		}
	}
}

func TestByteSizeUnmarshalText(t *testing.T) {
	var b byteSize = 7
	if err := b.UnmarshalText([]byte("1M")); err != nil || b != 1<<20 {
		t.Fatalf("UnmarshalText(1M) = %d, %v", b, err)
	}
	if err := b.UnmarshalText([]byte("nope")); err == nil {
		t.Fatal("UnmarshalText(nope) succeeded")
	}
	if b != 1<<20 {
		t.Fatalf("a failed UnmarshalText changed the value to %d", b)
	}
}

func TestFormatSize(t *testing.T) {
	cases := map[int64]string{
		0: "0", 512: "512", 4096: "4k", 1 << 20: "1M", 3 << 30: "3G", 1 << 40: "1T", 1536: "1536", 1536 << 10: "1536k",
	}
	for in, want := range cases {
		if got := formatSize(in); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", in, got, want)
		}
		if in == 0 {
			continue
		}
		back, err := parseSize(formatSize(in))
		if err != nil || back != in {
			t.Errorf("parseSize(formatSize(%d)) = %d, %v", in, back, err)
		}
	}
}

package main

import (
	"errors"
	"strings"
	"testing"
)

func TestDetectSignature(t *testing.T) {
	span := signatureSpan()
	if span != 65600+8 {
		t.Fatalf("signatureSpan() = %d, want %d (btrfs magic end)", span, 65600+8)
	}
	put := func(off int, magic string) []byte {
		b := make([]byte, span)
		copy(b[off:], magic)
		return b
	}
	cases := []struct {
		name string
		head []byte
		want string // substring of the signature name; "" = none
	}{
		{"zeros", make([]byte, span), ""},
		{"empty", nil, ""},
		{"ext4", put(1080, "\x53\xef"), "ext2/ext3/ext4"},
		{"ext4 byte order reversed", put(1080, "\xef\x53"), ""},
		{"xfs", put(0, "XFSB"), "XFS"},
		{"xfs shifted", put(1, "XFSB"), ""},
		{"btrfs", put(65600, "_BHRfS_M"), "btrfs"},
		{"swap", put(4086, "SWAPSPACE2"), "swap"},
		{"lvm sector 1", put(512, "LABELONE"), "LVM"},
		{"lvm sector 0", put(0, "LABELONE"), "LVM"},
		{"lvm sector 3", put(1536, "LABELONE"), "LVM"},
		{"rawblock at 0", put(0, "rawblock"), "rawblock"},
		{"rawblock at 4096", put(4096, "rawblock"), "rawblock superblock (\"rawblock\" at byte 4096)"},
		{"rawblock partial", put(4096, "rawbloc"), ""},
		{"btrfs beyond a short head", put(65600, "_BHRfS_M")[:65604], ""},
		{"ext4 in a short head", put(1080, "\x53\xef")[:1082], "ext2/ext3/ext4"},
	}
	for _, c := range cases {
		name, found := detectSignature(c.head)
		if c.want == "" {
			if found {
				t.Errorf("%s: found %q, want nothing", c.name, name)
			}
			continue
		}
		if !found || !strings.Contains(name, c.want) {
			t.Errorf("%s: got %q, %v; want a name containing %q", c.name, name, found, c.want)
		}
	}
}

func TestCheckSignature(t *testing.T) {
	head := make([]byte, signatureSpan())
	if err := checkSignature("/dev/x", head); err != nil {
		t.Fatalf("clean head: %v", err)
	}
	copy(head[4086:], "SWAPSPACE2")
	err := checkSignature("/dev/x", head)
	if !errors.Is(err, errSignature) {
		t.Fatalf("swap head: error %v does not wrap errSignature", err)
	}
	for _, want := range []string{"/dev/x", "swap", "--force"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

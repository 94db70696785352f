package main

import (
	"bytes"
	"errors"
	"fmt"
)

// errSignature is returned (wrapped, naming what was found) when a write
// benchmark would overwrite a block device that holds a file system, swap,
// an LVM label or a rawblock superblock.
var errSignature = errors.New("device holds a signature")

// signature is one on-disk magic that marks a device as in use.
type signature struct {
	name  string
	off   int
	magic []byte
}

// signatures lists the magics checked before a write benchmark touches a block
// device. The LVM label may sit in any of the first four 512-byte sectors
// (LVM2 uses the second by default), so all four are checked.
var signatures = []signature{
	{"ext2/ext3/ext4 (magic 0xEF53 at byte 1080)", 1080, []byte{0x53, 0xEF}},
	{"XFS (\"XFSB\" at byte 0)", 0, []byte("XFSB")},
	{"btrfs (\"_BHRfS_M\" at byte 65600)", 65600, []byte("_BHRfS_M")},
	{"swap (\"SWAPSPACE2\" at byte 4086)", 4086, []byte("SWAPSPACE2")},
	{"LVM physical volume (\"LABELONE\" at byte 0)", 0, []byte("LABELONE")},
	{"LVM physical volume (\"LABELONE\" at byte 512)", 512, []byte("LABELONE")},
	{"LVM physical volume (\"LABELONE\" at byte 1024)", 1024, []byte("LABELONE")},
	{"LVM physical volume (\"LABELONE\" at byte 1536)", 1536, []byte("LABELONE")},
	{"rawblock superblock (\"rawblock\" at byte 0)", 0, []byte("rawblock")},
	{"rawblock superblock (\"rawblock\" at byte 4096)", 4096, []byte("rawblock")},
}

// signatureSpan is how many bytes from the start of a device detectSignature
// needs to see every signature.
func signatureSpan() int {
	n := 0
	for _, s := range signatures {
		n = max(n, s.off+len(s.magic))
	}
	return n
}

// detectSignature reports the first known signature found in head, the first
// bytes of a device. Signatures that lie beyond len(head) are not checked, so
// a device smaller than signatureSpan() is judged on what it has.
func detectSignature(head []byte) (name string, found bool) {
	for _, s := range signatures {
		end := s.off + len(s.magic)
		if end <= len(head) && bytes.Equal(head[s.off:end], s.magic) {
			return s.name, true
		}
	}
	return "", false
}

// checkSignature returns an error wrapping errSignature if head holds a known
// signature; path names the device in the message.
func checkSignature(path string, head []byte) error {
	if name, ok := detectSignature(head); ok {
		return fmt.Errorf("%s: %w: %s; refusing to write to it (use --force to overwrite it anyway)", path, errSignature, name)
	}
	return nil
}

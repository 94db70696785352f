// Package engine is rawblock's public API: it formats and opens a block
// device and stores named objects on it, with its own page cache, delayed
// allocation and O_DIRECT I/O through io_uring.
package engine

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the engine returns that falls in one of these
// classes wraps the sentinel, so callers test with errors.Is. Name lookups
// use the standard fs.ErrExist, fs.ErrNotExist and fs.ErrInvalid.
var (
	// ErrNoSpace is returned when the device has no room left for a write.
	// A write that returns it has changed nothing.
	ErrNoSpace = errors.New("rawblock: no space left on device")
	// ErrCorrupt is returned when on-disk bytes fail a checksum or a
	// consistency check; the error names the region.
	ErrCorrupt = errors.New("rawblock: corrupt metadata")
	// ErrClosed is returned by every call made after Close, whatever its
	// arguments.
	ErrClosed = errors.New("rawblock: closed")
	// ErrReadOnly is returned by calls that would modify an engine opened
	// read-only, or one that has shut itself down after a metadata I/O error.
	ErrReadOnly = errors.New("rawblock: read-only")
	// ErrMetadataFull is returned when the metadata region (journal and
	// checkpoints) cannot hold another object or extent. It wraps
	// ErrNoSpace — to a caller it is the device being full, as running out
	// of inodes is ENOSPC to a file system's — and, like it, comes from the
	// call that would need the room (Create, WriteAt, PunchHole), never
	// from Sync, and with nothing changed. Data space may remain; removing
	// objects or coarser writes make room.
	ErrMetadataFull = fmt.Errorf("%w: metadata region full", ErrNoSpace)
)

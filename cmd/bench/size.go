package main

import "github.com/rawblock/rawblock/internal/bytesize"

// The command line's sizes ("4k", "1M", "1G"): see internal/bytesize.
type byteSize = bytesize.Size

var errBadSize = bytesize.ErrBad

func parseSize(s string) (int64, error) { return bytesize.Parse(s) }

func formatSize(n int64) string { return bytesize.Format(n) }

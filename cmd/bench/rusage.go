package main

import (
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// usage is a snapshot of this process's resource use.
type usage struct {
	cpu       time.Duration // user + system CPU time
	maxRSSKiB int64         // peak resident set size (ru_maxrss is in KiB on Linux)
}

// getUsage reads getrusage(RUSAGE_SELF).
func getUsage() (usage, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return usage{}, fmt.Errorf("getrusage: %w", err)
	}
	tv := func(t unix.Timeval) time.Duration {
		return time.Duration(t.Sec)*time.Second + time.Duration(t.Usec)*time.Microsecond
	}
	return usage{cpu: tv(ru.Utime) + tv(ru.Stime), maxRSSKiB: ru.Maxrss}, nil
}

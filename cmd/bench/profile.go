package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"runtime/trace"
)

// startCPUProfile starts a Go CPU profile into path ("" = none) and returns
// the function that stops it and closes the file.
func startCPUProfile(path string) (stop func() error, err error) {
	return record("cpu profile", path, pprof.StartCPUProfile, pprof.StopCPUProfile)
}

// startTrace starts a Go execution trace into path ("" = none) and returns
// the function that stops it and closes the file. It shows what a CPU
// profile cannot: where goroutines wait runnable, in system calls or for
// each other (go tool trace -pprof=sched FILE).
func startTrace(path string) (stop func() error, err error) {
	return record("trace", path, trace.Start, trace.Stop)
}

// record starts a recorder (what names it in errors) writing into a new
// file at path, or nothing for "", and returns the function that stops it
// and closes the file.
func record(what, path string, start func(io.Writer) error, end func()) (stop func() error, err error) {
	if path == "" {
		return func() error { return nil }, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := start(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("%s %s: %w", what, path, err)
	}
	return func() error {
		end()
		if err := f.Close(); err != nil {
			return fmt.Errorf("%s %s: %w", what, path, err)
		}
		return nil
	}, nil
}

// profiled runs fn under a CPU profile into path ("" = none) and closes bd
// afterwards, joining every error.
func profiled(path string, bd *benchDevice, fn func() error) error {
	stop, err := startCPUProfile(path)
	if err != nil {
		return errors.Join(err, bd.close())
	}
	err = fn()
	if perr := stop(); perr != nil {
		err = errors.Join(err, perr)
	}
	return errors.Join(err, bd.close())
}

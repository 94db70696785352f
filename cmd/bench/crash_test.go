package main

import (
	"bytes"
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"

	"github.com/rawblock/rawblock/engine"
)

var crashSmall = []string{"--max-object", "128k", "--max-write", "128k", "--objects", "3", "--steps", "6", "--points-per-run", "10"}

func TestCrashCommand(t *testing.T) {
	out, err := bench(t, append([]string{"crash", "--points", "25", "--seed", "7", "--quiet"}, crashSmall...)...)
	if err != nil {
		t.Fatalf("bench crash: %v\n%s", err, out)
	}
	for _, want := range []string{"crash: seed 7, 25 points", "25 crash points", "seeds 7..9", "ok: 25 crash points"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	// A random seed is printed so the run can be replayed.
	out, err = bench(t, append([]string{"crash", "--points", "3", "--quiet", "--no-fsck"}, crashSmall...)...)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`crash: seed \d+, 3 points`).MatchString(out) {
		t.Errorf("no seed printed:\n%s", out)
	}
}

func TestCrashCommandBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"crash", "--points", "0"},
		{"crash", "--seed", "-2"},
		{"crash", "--objects", "100"},
		{"crash", "--sector", "1024"},
		{"crash", "--device-size", "1M"},
		{"crash", "--max-write", "2M"},
		{"crash", "--steps", "0"},
	} {
		if _, err := bench(t, args...); err == nil {
			t.Errorf("bench %v succeeded", args)
		}
	}
}

// lyingDevice acknowledges Flush without making anything durable.
type lyingDevice struct{ *engine.FaultDevice }

func (lyingDevice) Flush() error { return nil }

// TestCrashCommandFailure: a broken promise is an error (a non-zero exit)
// that names the seed and points replaying it, after the trace.
func TestCrashCommandFailure(t *testing.T) {
	c := &crashCmd{Points: 200, Seed: 11, DeviceSize: 32 << 20, Sector: 512, Objects: 3, MaxObject: 128 << 10,
		MaxWrite: 128 << 10, Cache: 4 << 20, Steps: 6, PointsPerRun: 10, Quiet: true,
		wrap: func(d *engine.FaultDevice) engine.Device { return lyingDevice{d} }}
	var out bytes.Buffer
	err := c.Run(&appEnv{ctx: context.Background(), stdout: &out})
	if err == nil {
		t.Fatalf("a device that ignores Flush passed:\n%s", out.String())
	}
	m := regexp.MustCompile(`replay with bench crash --seed (\d+) --points (\d+)`).FindStringSubmatch(err.Error())
	if m == nil {
		t.Fatalf("error does not say how to replay: %v", err)
	}
	if !strings.Contains(out.String(), "FAILED") || !strings.Contains(out.String(), "trace:") {
		t.Errorf("no failure report with a trace:\n%s", out.String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c.wrap = nil
	if err := c.Run(&appEnv{ctx: ctx, stdout: &out}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled run: %v", err)
	}
}

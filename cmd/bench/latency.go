package main

import (
	"time"

	hdrhistogram "github.com/HdrHistogram/hdrhistogram-go"
)

// Latencies are recorded in nanoseconds with three significant digits: at
// most 0.1% error, i.e. better than 1 µs below 1 ms. Anything slower than
// latHighest is recorded as latHighest (and shows up in max).
const (
	latLowest  = 1
	latHighest = int64(60 * time.Second)
	latDigits  = 3
)

// newLatHist returns an empty latency histogram (nanoseconds).
func newLatHist() *hdrhistogram.Histogram {
	return hdrhistogram.New(latLowest, latHighest, latDigits)
}

// recordLatency records ns, clamped to the histogram's range so that the
// record cannot fail (a negative or zero duration cannot come from a
// monotonic clock, but is not worth an error either).
func recordLatency(h *hdrhistogram.Histogram, ns int64) {
	ns = min(max(ns, latLowest), latHighest)
	if err := h.RecordValue(ns); err != nil {
		panic("bench: latency " + time.Duration(ns).String() + " rejected by a histogram that covers it: " + err.Error())
	}
}

// latencySummary is the latency part of a result, in microseconds.
type latencySummary struct {
	P50  float64 `json:"p50"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Mean float64 `json:"mean"`
	Max  float64 `json:"max"`
}

// summarizeLatency converts a nanosecond histogram to microsecond
// percentiles.
func summarizeLatency(h *hdrhistogram.Histogram) latencySummary {
	us := func(ns int64) float64 { return float64(ns) / 1e3 }
	return latencySummary{
		P50:  us(h.ValueAtQuantile(50)),
		P99:  us(h.ValueAtQuantile(99)),
		P999: us(h.ValueAtQuantile(99.9)),
		Mean: h.Mean() / 1e3,
		Max:  us(h.Max()),
	}
}

// mergeLatency merges every histogram in hs into one.
func mergeLatency(hs []*hdrhistogram.Histogram) *hdrhistogram.Histogram {
	all := newLatHist()
	for _, h := range hs {
		if dropped := all.Merge(h); dropped != 0 {
			panic("bench: merging latency histograms of the same range dropped values")
		}
	}
	return all
}

//go:build race

package reserve

// raceEnabled says the tests run under the race detector, which slows the
// brute-force models tenfold without adding anything to single-goroutine
// tests.
const raceEnabled = true

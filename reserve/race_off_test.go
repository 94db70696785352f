//go:build !race

package reserve

// raceEnabled says the tests run under the race detector.
const raceEnabled = false

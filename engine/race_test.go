//go:build race

package engine

// raceEnabled: the race detector multiplies memory use, so RSS bounds
// are not checked under it.
const raceEnabled = true

package extenttree

import (
	"flag"
	"os"
	"testing"
)

// TestMain raises rapid's defaults (100 checks of about 30 operations), which
// are too light for a state machine with this many actions, unless they are
// given on the command line. -short divides the checks by 5.
func TestMain(m *testing.M) {
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for name, value := range map[string]string{"rapid.checks": "2000", "rapid.steps": "100"} {
		if f := flag.Lookup(name); f != nil && !set[name] {
			if err := f.Value.Set(value); err != nil {
				panic(err)
			}
		}
	}
	os.Exit(m.Run())
}

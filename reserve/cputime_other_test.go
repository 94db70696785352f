//go:build !linux

package reserve

import "time"

// threadCPU is not measured outside Linux; benchmarks then omit cpu-ns/op.
func threadCPU() time.Duration { return 0 }

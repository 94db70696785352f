package main

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/rawblock/rawblock/engine"
)

// metrics are the daemon's Prometheus metrics: connection counters,
// per-export request counters and latency histograms, and the engine's
// Stats read at each scrape.
type metrics struct {
	reg *prometheus.Registry

	connections       prometheus.Gauge
	connectionsTotal  prometheus.Counter
	refused           prometheus.Counter
	handshakeFailures prometheus.Counter
	timeouts          prometheus.Counter

	requests *prometheus.CounterVec
	failures *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	latency  *prometheus.HistogramVec

	mu      sync.Mutex
	exports map[string]*exportMetrics
}

// numOps: the commands 0..cmdBlockStatus, plus one slot for unknown ones.
const numOps = int(cmdBlockStatus) + 2

// exportMetrics holds one export's metrics, resolved once so a request
// touches no label map.
type exportMetrics struct {
	ops [numOps]opMetrics
}

type opMetrics struct {
	requests, errors, bytes prometheus.Counter
	latency                 prometheus.Observer
}

// op returns the metrics of command t.
func (e *exportMetrics) op(t uint16) *opMetrics {
	if int(t) >= numOps-1 {
		return &e.ops[numOps-1]
	}
	return &e.ops[t]
}

// done records a successful request over n bytes that started at start.
func (o *opMetrics) done(n int64, start time.Time) {
	o.requests.Inc()
	o.bytes.Add(float64(n))
	o.latency.Observe(time.Since(start).Seconds())
}

// fail records a request answered with an error.
func (o *opMetrics) fail(start time.Time) {
	o.requests.Inc()
	o.errors.Inc()
	o.latency.Observe(time.Since(start).Seconds())
}

// newMetrics registers the daemon's metrics; eng may be nil (then the
// engine's Stats are not exported).
func newMetrics(eng *engine.Engine) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{
		reg: reg,
		connections: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "rawblockd_connections", Help: "Client connections open now.",
		}),
		connectionsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rawblockd_connections_total", Help: "Client connections accepted.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rawblockd_connections_refused_total", Help: "Connections closed at once because max-clients were open.",
		}),
		handshakeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rawblockd_handshake_failures_total", Help: "Connections that ended in the handshake other than by NBD_OPT_ABORT (malformed, unknown export, timeout).",
		}),
		timeouts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rawblockd_io_timeouts_total", Help: "Clients dropped because a payload or reply made no progress for io-timeout.",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rawblockd_requests_total", Help: "NBD requests answered, by export and command (errors included).",
		}, []string{"export", "op"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rawblockd_request_errors_total", Help: "NBD requests answered with an error, by export and command.",
		}, []string{"export", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rawblockd_request_bytes_total", Help: "Bytes covered by successful requests, by export and command.",
		}, []string{"export", "op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "rawblockd_request_duration_seconds",
			Help:    "Time from a request's arrival (after its payload) to its reply, by export and command.",
			Buckets: prometheus.ExponentialBucketsRange(5e-6, 10, 16),
		}, []string{"export", "op"}),
		exports: make(map[string]*exportMetrics),
	}
	reg.MustRegister(m.connections, m.connectionsTotal, m.refused, m.handshakeFailures, m.timeouts,
		m.requests, m.failures, m.bytes, m.latency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if eng != nil {
		reg.MustRegister(engineCollector{eng})
	}
	return m
}

// export returns the metrics of the named export.
func (m *metrics) export(name string) *exportMetrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.exports[name]; e != nil {
		return e
	}
	e := &exportMetrics{}
	for i := range e.ops {
		op := "unknown"
		if i < numOps-1 {
			op = cmdName(uint16(i))
		}
		e.ops[i] = opMetrics{
			requests: m.requests.WithLabelValues(name, op),
			errors:   m.failures.WithLabelValues(name, op),
			bytes:    m.bytes.WithLabelValues(name, op),
			latency:  m.latency.WithLabelValues(name, op),
		}
	}
	m.exports[name] = e
	return e
}

// engineCollector exports engine.Stats at each scrape.
type engineCollector struct{ eng *engine.Engine }

type engineMetric struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	value func(s *engine.Stats) float64
}

func gauge(name, help string, f func(s *engine.Stats) float64) engineMetric {
	return engineMetric{prometheus.NewDesc("rawblock_"+name, help, nil, nil), prometheus.GaugeValue, f}
}

func counter(name, help string, f func(s *engine.Stats) float64) engineMetric {
	return engineMetric{prometheus.NewDesc("rawblock_"+name, help, nil, nil), prometheus.CounterValue, f}
}

var engineMetrics = []engineMetric{
	gauge("total_bytes", "Data region size.", func(s *engine.Stats) float64 { return float64(s.TotalBytes) }),
	gauge("free_bytes", "Free space, reservations included.", func(s *engine.Stats) float64 { return float64(s.FreeBytes) }),
	gauge("reserved_bytes", "Space reserved by dirty data not yet allocated.", func(s *engine.Stats) float64 { return float64(s.ReservedBytes) }),
	gauge("free_extents", "Free extents (fragmentation of free space).", func(s *engine.Stats) float64 { return float64(s.FreeExtents) }),
	gauge("largest_free_bytes", "Largest free extent.", func(s *engine.Stats) float64 { return float64(s.LargestFreeBytes) }),
	gauge("cached_bytes", "Page cache bytes, clean and dirty.", func(s *engine.Stats) float64 { return float64(s.CachedBytes) }),
	gauge("dirty_bytes", "Dirty page cache bytes.", func(s *engine.Stats) float64 { return float64(s.DirtyBytes) }),
	counter("allocations_total", "Extents allocated by writeback.", func(s *engine.Stats) float64 { return float64(s.Allocations) }),
	counter("device_writes_total", "Write I/Os issued to the device.", func(s *engine.Stats) float64 { return float64(s.DeviceWrites) }),
	counter("device_reads_total", "Read I/Os issued to the device.", func(s *engine.Stats) float64 { return float64(s.DeviceReads) }),
	counter("device_written_bytes_total", "Bytes written to the device.", func(s *engine.Stats) float64 { return float64(s.DeviceBytesWritten) }),
	counter("device_read_bytes_total", "Bytes read from the device.", func(s *engine.Stats) float64 { return float64(s.DeviceBytesRead) }),
	counter("cache_hits_total", "Page cache hits.", func(s *engine.Stats) float64 { return float64(s.CacheHits) }),
	counter("cache_misses_total", "Page cache misses.", func(s *engine.Stats) float64 { return float64(s.CacheMisses) }),
}

func (c engineCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range engineMetrics {
		ch <- m.desc
	}
}

func (c engineCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.eng.Stats()
	for _, m := range engineMetrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, m.value(&s))
	}
}

// Package metrics serves the daemon's Prometheus metrics
// (github.com/prometheus/client_golang; docs/adr/0021-metrics.md): a
// collector that reads the Manager at each scrape (sandboxes by status;
// per sandbox CPU seconds, memory, disk and network counters from
// VM.Stats; snapshots and their bytes), the HTTP middleware's request
// counts and latencies by route, and the daemon process's own Go and
// process metrics.
package metrics

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/smolvm-go/smolvm"
)

const namespace = "smolvm"

// ScrapeTimeout bounds the reading of the Manager in one scrape.
const ScrapeTimeout = 10 * time.Second

// statsWorkers bounds the VM.Stats calls of one scrape that run at once.
const statsWorkers = 4

// Handler serves the metrics of m, and of Middleware, in the Prometheus
// text (or protobuf) format. Each call makes its own registry.
func Handler(m *smolvm.Manager) http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(m), requests, latency,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorHandling:       promhttp.ContinueOnError, // a sandbox that vanished mid-scrape costs only its series
		MaxRequestsInFlight: 4,
		Timeout:             ScrapeTimeout + 5*time.Second,
	})
}

// Collector reads a Manager at each scrape.
type Collector struct {
	m *smolvm.Manager
}

// NewCollector returns the collector of m's sandboxes and snapshots.
func NewCollector(m *smolvm.Manager) *Collector { return &Collector{m: m} }

var (
	descSandboxes = prometheus.NewDesc(namespace+"_sandboxes", "Sandboxes by status (warm pool members not counted).", []string{"status"}, nil)
	descCPU       = prometheus.NewDesc(namespace+"_sandbox_cpu_seconds_total", "Host CPU time (user+system) of the sandbox's VMM and sidecars since they started.", []string{"id"}, nil)
	descRSS       = prometheus.NewDesc(namespace+"_sandbox_memory_rss_bytes", "Resident set size of the sandbox's VMM and sidecars.", []string{"id"}, nil)
	descPSS       = prometheus.NewDesc(namespace+"_sandbox_memory_pss_bytes", "Proportional set size of the sandbox's VMM and sidecars.", []string{"id"}, nil)
	descGuest     = prometheus.NewDesc(namespace+"_sandbox_guest_memory_bytes", "Guest memory configured for the sandbox.", []string{"id"}, nil)
	descDisk      = prometheus.NewDesc(namespace+"_sandbox_disk_allocated_bytes", "Host disk space allocated to the sandbox's files (its disk overlay or copy, logs).", []string{"id"}, nil)
	descUptime    = prometheus.NewDesc(namespace+"_sandbox_uptime_seconds", "How long the sandbox's VMM has run (0 when it does not run).", []string{"id"}, nil)
	descNetConns  = prometheus.NewDesc(namespace+"_sandbox_network_flows_total", "Guest connections and UDP flows the network sidecar let through (result=allowed) or refused (result=refused).", []string{"id", "result"}, nil)
	descNetBytes  = prometheus.NewDesc(namespace+"_sandbox_network_bytes_total", "Bytes of Ethernet frames between the guest and the network sidecar (direction=tx: sent by the guest, rx: received by it).", []string{"id", "direction"}, nil)
	descSnapshots = prometheus.NewDesc(namespace+"_snapshots", "Snapshots (templates not counted).", nil, nil)
	descSnapBytes = prometheus.NewDesc(namespace+"_snapshots_size_bytes", "Total size of the snapshots' artifacts.", nil, nil)
	descUp        = prometheus.NewDesc(namespace+"_state_up", "1 when the last scrape read the state (sandboxes and snapshots), else 0.", nil, nil)
)

// Describe sends every metric's description.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSandboxes, descCPU, descRSS, descPSS, descGuest, descDisk, descUptime,
		descNetConns, descNetBytes, descSnapshots, descSnapBytes, descUp} {
		ch <- d
	}
}

// Collect reads the Manager: its sandboxes, each one's stats (at most
// statsWorkers at once) and its snapshots, within ScrapeTimeout.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), ScrapeTimeout)
	defer cancel()
	up := 1.0
	infos, err := c.m.List(ctx)
	if err != nil {
		up = 0
	}
	counts := map[smolvm.Status]int{}
	for _, s := range []smolvm.Status{smolvm.StatusCreated, smolvm.StatusRunning, smolvm.StatusPaused, smolvm.StatusStopped, smolvm.StatusError} {
		counts[s] = 0 // every status has a series, 0 included
	}
	var ids []string
	for _, i := range infos {
		if i.Pool {
			continue
		}
		counts[i.Status]++
		ids = append(ids, i.ID)
	}
	for s, n := range counts {
		ch <- prometheus.MustNewConstMetric(descSandboxes, prometheus.GaugeValue, float64(n), string(s))
	}
	c.collectStats(ctx, ch, ids)
	snaps, err := c.m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
	if err != nil {
		up = 0
	} else {
		var size int64
		for _, s := range snaps {
			size += s.SizeBytes
		}
		ch <- prometheus.MustNewConstMetric(descSnapshots, prometheus.GaugeValue, float64(len(snaps)))
		ch <- prometheus.MustNewConstMetric(descSnapBytes, prometheus.GaugeValue, float64(size))
	}
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up)
}

// collectStats sends the per-sandbox series of ids. A sandbox deleted
// meanwhile, or whose stats cannot be read in time, has none.
func (c *Collector) collectStats(ctx context.Context, ch chan<- prometheus.Metric, ids []string) {
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(statsWorkers, len(ids)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range work {
				st, ok := c.stats(ctx, id)
				if !ok {
					continue
				}
				gauge := func(d *prometheus.Desc, v float64, labels ...string) {
					ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{id}, labels...)...)
				}
				counter := func(d *prometheus.Desc, v float64, labels ...string) {
					ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, append([]string{id}, labels...)...)
				}
				counter(descCPU, st.CPU.Seconds)
				gauge(descRSS, float64(st.Memory.RSSBytes))
				gauge(descPSS, float64(st.Memory.PSSBytes))
				gauge(descGuest, float64(st.Memory.GuestBytes))
				gauge(descDisk, float64(st.Disk.AllocatedBytes))
				gauge(descUptime, st.UptimeSeconds)
				if n := st.Network; n != nil {
					counter(descNetConns, float64(n.Allowed), "allowed")
					counter(descNetConns, float64(n.Refused), "refused")
					counter(descNetBytes, float64(n.TxBytes), "tx")
					counter(descNetBytes, float64(n.RxBytes), "rx")
				}
			}
		}()
	}
	for _, id := range ids {
		select {
		case work <- id:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
}

func (c *Collector) stats(ctx context.Context, id string) (smolvm.Stats, bool) {
	vm, err := c.m.Open(ctx, id)
	if err != nil {
		return smolvm.Stats{}, false
	}
	defer vm.Close()
	st, err := vm.Stats(ctx)
	return st, err == nil
}

// The middleware's metrics (registered by every Handler).
var (
	requests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Subsystem: "http", Name: "requests_total",
		Help: "HTTP requests served, by route (the mux pattern), method and status code.",
	}, []string{"route", "method", "code"})
	latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: namespace, Subsystem: "http", Name: "request_duration_seconds",
		Help: "Time to serve an HTTP request (to the end of its body, streams included), by route and method.",
		// From a health check to a snapshot or a template build.
		Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 600},
	}, []string{"route", "method"})
)

// Middleware counts and times the requests next serves, by route: the
// pattern of the http.ServeMux route that served it (Request.Pattern),
// else the path with every segment that is not one of the API's words
// replaced by "{id}" (ids never become label values: bounded
// cardinality).
func Middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rw := &recorder{ResponseWriter: w}
		next.ServeHTTP(rw, r)
		code := rw.code
		if code == 0 {
			code = http.StatusOK
		}
		route := Route(r)
		method := methodLabel(r.Method)
		requests.WithLabelValues(route, method, codeLabel(code)).Inc()
		latency.WithLabelValues(route, method).Observe(time.Since(start).Seconds())
	})
}

// words are the path segments of the API's routes (the rest are ids).
var words = map[string]bool{
	"v1": true, "sandboxes": true, "snapshots": true, "templates": true, "exec": true, "stream": true, "ws": true,
	"files": true, "ports": true, "logs": true, "stats": true, "start": true, "stop": true, "pause": true,
	"resume": true, "timeout": true, "restore": true, "fork": true, "gc": true, "health": true, "version": true,
	"events": true, "openapi.json": true, "metrics": true, "mcp": true,
}

// maxRouteSegments bounds a fallback route label.
const maxRouteSegments = 6

// Route is the route label of r: its mux pattern when the mux recorded
// one on r, else its path normalized (segments other than the API's words
// become "{id}"; at most 6 segments, then "...").
func Route(r *http.Request) string {
	if r.Pattern != "" {
		// "GET /v1/sandboxes/{id}": the method is a label of its own.
		if _, p, ok := strings.Cut(r.Pattern, " "); ok {
			return p
		}
		return r.Pattern
	}
	segs := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	var b strings.Builder
	for i, s := range segs {
		if i == maxRouteSegments {
			b.WriteString("/...")
			break
		}
		b.WriteByte('/')
		switch {
		case s == "" && len(segs) == 1:
		case words[s]:
			b.WriteString(s)
		default:
			b.WriteString("{id}")
		}
	}
	return b.String()
}

// methodLabel keeps the method label to the standard methods.
func methodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions, http.MethodConnect, http.MethodTrace:
		return m
	}
	return "other"
}

func codeLabel(code int) string {
	if code < 100 || code > 999 {
		return "other"
	}
	return strconv.Itoa(code)
}

// recorder notes the status code, and keeps the writer's optional
// abilities reachable: Flush and Hijack directly (streams, WebSockets),
// the rest through Unwrap (http.ResponseController).
type recorder struct {
	http.ResponseWriter
	code int
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 && code >= 200 {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(b)
}

// Flush sends buffered data to the client (NDJSON and SSE streams).
func (r *recorder) Flush() {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	http.NewResponseController(r.ResponseWriter).Flush()
}

// Hijack hands the connection over (WebSockets: recorded as 101).
func (r *recorder) Hijack() (c net.Conn, rw *bufio.ReadWriter, err error) {
	c, rw, err = http.NewResponseController(r.ResponseWriter).Hijack()
	if err == nil && r.code == 0 {
		r.code = http.StatusSwitchingProtocols
	}
	return c, rw, err
}

// Unwrap returns the wrapped writer (http.ResponseController).
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

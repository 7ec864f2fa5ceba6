package metrics

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend" // registers "fake"
	"github.com/smolvm-go/smolvm/internal/image"
	smtest "github.com/smolvm-go/smolvm/internal/testutil"
)

func TestMain(m *testing.M) {
	if _, err := smtest.EnsureImages(context.Background(), image.Busybox); err != nil {
		fmt.Fprintf(os.Stderr, "test setup: %v\nrun scripts/setup first\n", err)
		os.Exit(1)
	}
	os.Setenv("SMOLVM_COLD_BOOT", "1")
	os.Exit(m.Run())
}

// newManager is a data dir on the fake backend with a running sandbox
// "run1", a stopped one "stop1" and a snapshot of run1.
func newManager(t *testing.T) *smolvm.Manager {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dir, ImageDir: smtest.ImageDir(),
		RunDir: filepath.Join(dir, "run"), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		infos, _ := m.List(ctx)
		for _, i := range infos {
			if vm, err := m.Open(ctx, i.ID); err == nil {
				vm.Delete(ctx)
				vm.Close()
			}
		}
		snaps, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
		for _, s := range snaps {
			m.DeleteSnapshot(ctx, s.ID)
		}
		m.Close()
	})
	for _, name := range []string{"run1", "stop1"} {
		vm, err := m.New(ctx, smolvm.Config{Name: name, Image: "busybox", Backend: fakebackend.Name, NoNetwork: true, MemoryMiB: 256})
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.Start(ctx); err != nil {
			t.Fatal(err)
		}
		switch name {
		case "run1":
			if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "snap1", ResumeSource: true}); err != nil {
				t.Fatal(err)
			}
		case "stop1":
			if err := vm.Stop(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	return m
}

// TestCollector gathers the collector's metrics from a fake data dir and
// checks their values and that promlint finds nothing wrong with them.
func TestCollector(t *testing.T) {
	m := newManager(t)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(NewCollector(m))
	want := `
# HELP smolvm_sandboxes Sandboxes by status (warm pool members not counted).
# TYPE smolvm_sandboxes gauge
smolvm_sandboxes{status="created"} 0
smolvm_sandboxes{status="error"} 0
smolvm_sandboxes{status="paused"} 0
smolvm_sandboxes{status="running"} 1
smolvm_sandboxes{status="stopped"} 1
# HELP smolvm_sandbox_guest_memory_bytes Guest memory configured for the sandbox.
# TYPE smolvm_sandbox_guest_memory_bytes gauge
smolvm_sandbox_guest_memory_bytes{id="run1"} 2.68435456e+08
smolvm_sandbox_guest_memory_bytes{id="stop1"} 2.68435456e+08
# HELP smolvm_snapshots Snapshots (templates not counted).
# TYPE smolvm_snapshots gauge
smolvm_snapshots 1
# HELP smolvm_state_up 1 when the last scrape read the state (sandboxes and snapshots), else 0.
# TYPE smolvm_state_up gauge
smolvm_state_up 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"smolvm_sandboxes", "smolvm_sandbox_guest_memory_bytes", "smolvm_snapshots", "smolvm_state_up"); err != nil {
		t.Error(err)
	}
	// Every per-sandbox series exists for both (network only with networking).
	for name, n := range map[string]int{"smolvm_sandbox_cpu_seconds_total": 2, "smolvm_sandbox_memory_rss_bytes": 2,
		"smolvm_sandbox_disk_allocated_bytes": 2, "smolvm_sandbox_uptime_seconds": 2, "smolvm_sandbox_network_bytes_total": 0} {
		if got, err := testutil.GatherAndCount(reg, name); err != nil || got != n {
			t.Errorf("%s: %d series, %v; want %d", name, got, err, n)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "smolvm_snapshots_size_bytes" && mf.GetMetric()[0].GetGauge().GetValue() <= 0 {
			t.Errorf("snapshot bytes %v", mf.GetMetric()[0].GetGauge().GetValue())
		}
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil || len(problems) != 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}

// TestMiddleware counts and times requests by the mux's route (never by
// id), keeps Flush reachable through the wrapper, and serves everything
// through Handler, lint-clean.
func TestMiddleware(t *testing.T) {
	m := newManager(t)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("id") != "run1" {
			http.Error(w, "no", http.StatusNotFound)
			return
		}
		fmt.Fprint(w, "ok")
	})
	mux.HandleFunc("POST /v1/sandboxes/{id}/exec/stream", func(w http.ResponseWriter, r *http.Request) {
		f, ok := w.(http.Flusher)
		if !ok {
			t.Error("the middleware hides http.Flusher")
			return
		}
		fmt.Fprintln(w, `{"type":"stdout"}`)
		f.Flush()
		fmt.Fprintln(w, `{"type":"exit"}`)
	})
	mux.Handle("GET /metrics", Handler(m))
	srv := httptest.NewServer(Middleware(mux))
	defer srv.Close()
	get := func(method, path string) (int, string) {
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	base := map[string]float64{}
	for _, l := range [][]string{{"/v1/sandboxes/{id}", "GET", "200"}, {"/v1/sandboxes/{id}", "GET", "404"},
		{"/v1/sandboxes/{id}/exec/stream", "POST", "200"}, {"/v1/{id}/{id}", "GET", "404"}} {
		base[strings.Join(l, " ")] = testutil.ToFloat64(requests.WithLabelValues(l...))
	}
	get("GET", "/v1/sandboxes/run1")
	get("GET", "/v1/sandboxes/run1")
	get("GET", "/v1/sandboxes/other")
	if code, body := get("POST", "/v1/sandboxes/run1/exec/stream"); code != 200 || !strings.Contains(body, "exit") {
		t.Errorf("stream: %d %q", code, body)
	}
	get("GET", "/v1/no-such-thing/at-all")
	for l, want := range map[string]float64{"/v1/sandboxes/{id} GET 200": 2, "/v1/sandboxes/{id} GET 404": 1,
		"/v1/sandboxes/{id}/exec/stream POST 200": 1, "/v1/{id}/{id} GET 404": 1} {
		if got := testutil.ToFloat64(requests.WithLabelValues(strings.Split(l, " ")...)) - base[l]; got != want {
			t.Errorf("requests %s = %v, want %v", l, got, want)
		}
	}
	code, body := get("GET", "/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	seen := map[string]bool{}
	for sc.Scan() {
		if strings.Contains(sc.Text(), `id="other"`) || strings.Contains(sc.Text(), "no-such-thing") {
			t.Errorf("an id became a label value: %s", sc.Text())
		}
		if f := strings.FieldsFunc(sc.Text(), func(r rune) bool { return r == '{' || r == ' ' }); len(f) > 0 {
			seen[f[0]] = true
		}
	}
	for _, name := range []string{`smolvm_http_request_duration_seconds_bucket`, "smolvm_http_requests_total", "smolvm_sandboxes",
		"smolvm_sandbox_cpu_seconds_total", "go_goroutines", "process_resident_memory_bytes"} {
		if !seen[name] {
			t.Errorf("/metrics has no %s", name)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(requests, latency)
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) != 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
}

func TestRoute(t *testing.T) {
	for path, want := range map[string]string{
		"/":                        "/",
		"/v1/sandboxes":            "/v1/sandboxes",
		"/v1/sandboxes/abc/exec":   "/v1/sandboxes/{id}/exec",
		"/v1/snapshots/s1/restore": "/v1/snapshots/{id}/restore",
		"/a/b/c/d/e/f/g/h":         "/{id}/{id}/{id}/{id}/{id}/{id}/...",
		"/v1/sandboxes/" + strings.Repeat("x", 1000): "/v1/sandboxes/{id}",
	} {
		r := httptest.NewRequest("GET", "http://h"+path, nil)
		if got := Route(r); got != want {
			t.Errorf("Route(%s) = %q, want %q", path, got, want)
		}
	}
	r := httptest.NewRequest("GET", "/v1/sandboxes/x", nil)
	r.Pattern = "GET /v1/sandboxes/{id}"
	if got := Route(r); got != "/v1/sandboxes/{id}" {
		t.Errorf("Route with pattern = %q", got)
	}
	if methodLabel("BREW") != "other" || codeLabel(42) != "other" || codeLabel(503) != "503" {
		t.Error("labels not bounded")
	}
}

package server

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"

	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

var testRoot string

func TestMain(m *testing.M) {
	root, err := os.MkdirTemp("/tmp", "smsv")
	if err != nil {
		panic(err)
	}
	testRoot = root
	os.Setenv("SMOLVM_RUN_DIR", filepath.Join(root, "run"))
	os.Setenv("SMOLVM_COLD_BOOT", "1") // templates are tested in the root package
	os.Unsetenv("SMOLVM_API_SOCKET")
	os.Unsetenv("SMOLVM_API_TOKEN")
	code := m.Run()
	os.RemoveAll(root)
	os.Exit(code)
}

// needImages builds the agent into the busybox image (a no-op when
// current) for the tests that boot VMs.
func needImages(t *testing.T) {
	t.Helper()
	testutil.RequireQEMU(t)
	if _, err := testutil.EnsureImages(context.Background(), image.Busybox); err != nil {
		t.Fatal(err)
	}
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// daemon is an in-process server on a unix socket (and TCP when asked).
type daemon struct {
	s      *Server
	client *http.Client // over the unix socket
	cancel context.CancelFunc
	done   chan error
}

// startDaemon runs a Server for cfg until the test ends (a fresh data dir
// when cfg has none).
func startDaemon(t *testing.T, cfg Config, mount ...func(*Server)) *daemon {
	t.Helper()
	if cfg.Options.DataDir == "" {
		cfg.Options.DataDir = t.TempDir()
	}
	if cfg.Socket == "" {
		cfg.Socket = filepath.Join(testutil.ShortDir(t), "api.sock")
	}
	cfg.Options.Logger = quietLogger()
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range mount {
		f(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d := &daemon{s: s, cancel: cancel, done: make(chan error, 1), client: unixClient(s.Socket())}
	ready := make(chan struct{})
	go func() { d.done <- s.Serve(ctx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-d.done:
		t.Fatalf("serve: %v", err)
	}
	t.Cleanup(func() { d.stop(t) })
	return d
}

func (d *daemon) stop(t *testing.T) {
	if d.cancel == nil {
		return
	}
	d.cancel()
	d.cancel = nil
	select {
	case err := <-d.done:
		if err != nil {
			t.Errorf("serve returned %v", err)
		}
	case <-time.After(40 * time.Second):
		t.Errorf("serve did not return after shutdown")
	}
	d.s.Close()
}

func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

// spec is the loaded contract with a router, for validating responses.
type spec struct {
	doc    *openapi3.T
	router routers.Router
	mu     sync.Mutex
	seen   map[string]bool // operationId -> exercised
}

func loadSpec(t *testing.T) *spec {
	t.Helper()
	doc, err := LoadSpec(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r, err := gorillamux.NewRouter(doc)
	if err != nil {
		t.Fatal(err)
	}
	return &spec{doc: doc, router: r, seen: map[string]bool{}}
}

// call does one request and validates the response against the spec
// (status, headers, JSON bodies; NDJSON line by line). It returns the
// response (body read into the returned bytes).
func (sp *spec) call(t *testing.T, c *http.Client, method, path string, body io.Reader, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://smolvm"+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	if body != nil && req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s %s: reading: %v", method, path, err)
	}
	sp.validate(t, req, resp, b)
	return resp, b
}

func (sp *spec) validate(t *testing.T, req *http.Request, resp *http.Response, b []byte) {
	t.Helper()
	route, params, err := sp.router.FindRoute(req)
	if err != nil {
		// Not an operation of the spec: must be the error shape.
		var e ErrorBody
		if json.Unmarshal(b, &e) != nil || e.Error.Code == "" {
			t.Errorf("%s %s (no spec route): body is not the error shape: %s", req.Method, req.URL.Path, b)
		}
		return
	}
	sp.mu.Lock()
	sp.seen[route.Operation.OperationID] = true
	sp.mu.Unlock()
	ct := resp.Header.Get("Content-Type")
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route,
			Options: &openapi3filter.Options{AuthenticationFunc: openapi3filter.NoopAuthenticationFunc}},
		Status: resp.StatusCode, Header: resp.Header, Body: io.NopCloser(bytes.NewReader(b)),
		Options: &openapi3filter.Options{IncludeResponseStatus: true},
	}
	if !strings.HasPrefix(ct, "application/json") {
		in.Options.ExcludeResponseBody = true
	}
	if err := openapi3filter.ValidateResponse(context.Background(), in); err != nil {
		t.Errorf("%s %s → %d: response breaks the spec: %v\nbody: %.600s", req.Method, req.URL.Path, resp.StatusCode, err, b)
	}
	if strings.HasPrefix(ct, "application/x-ndjson") {
		rsp := route.Operation.Responses.Status(resp.StatusCode)
		if rsp == nil {
			rsp = route.Operation.Responses.Default()
		}
		mt := rsp.Value.Content.Get("application/x-ndjson")
		if mt == nil {
			t.Errorf("%s %s: NDJSON response the spec does not declare", req.Method, req.URL.Path)
			return
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			var v any
			if err := json.Unmarshal(sc.Bytes(), &v); err != nil {
				t.Errorf("%s %s: NDJSON line is not JSON: %q", req.Method, req.URL.Path, sc.Bytes())
				continue
			}
			if err := mt.Schema.Value.VisitJSON(v); err != nil {
				t.Errorf("%s %s: NDJSON line breaks the spec: %v\nline: %.400s", req.Method, req.URL.Path, err, sc.Bytes())
			}
		}
	}
}

// operations is every operationId of the spec the daemon serves itself
// (x-smolvm-extra paths are other packages').
func (sp *spec) operations() map[string]string {
	out := map[string]string{}
	for path, item := range sp.doc.Paths.Map() {
		if _, extra := item.Extensions["x-smolvm-extra"]; extra {
			continue
		}
		for method, op := range item.Operations() {
			out[op.OperationID] = method + " " + path
		}
	}
	return out
}

func jsonBody(v any) io.Reader {
	b, _ := json.Marshal(v)
	return bytes.NewReader(b)
}

func decodeAs[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decoding %T: %v: %.300s", v, err, b)
	}
	return v
}

func wantStatus(t *testing.T, what string, resp *http.Response, b []byte, want int) {
	t.Helper()
	if resp.StatusCode != want {
		t.Fatalf("%s: status %d, want %d: %.600s", what, resp.StatusCode, want, b)
	}
}

func wantError(t *testing.T, what string, resp *http.Response, b []byte, status int, code string) ErrorBody {
	t.Helper()
	e := decodeAs[ErrorBody](t, b)
	if resp.StatusCode != status || e.Error.Code != code {
		t.Errorf("%s: %d %q, want %d %q: %s", what, resp.StatusCode, e.Error.Code, status, code, b)
	}
	return e
}

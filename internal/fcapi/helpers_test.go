package fcapi

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// shortDir returns a temporary directory with a path short enough for unix
// sockets (t.TempDir embeds the test name and can exceed sun_path).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "fcapi")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// recorded is one request a test server saw.
type recorded struct {
	Method string
	Path   string
	Body   []byte
}

func (r recorded) String() string { return r.Method + " " + r.Path }

// unixServer serves h on a fresh unix socket and returns its path.
func unixServer(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(shortDir(t), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// recorder wraps a handler and keeps every request in order.
type recorder struct {
	mu   sync.Mutex
	reqs []recorded
	next http.Handler
}

func (rc *recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	rc.reqs = append(rc.reqs, recorded{Method: r.Method, Path: r.URL.Path, Body: body})
	rc.mu.Unlock()
	r.Body = io.NopCloser(bytes.NewReader(body))
	rc.next.ServeHTTP(w, r)
}

func (rc *recorder) all() []recorded {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]recorded(nil), rc.reqs...)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeFault(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"fault_message": msg})
}

package fctest

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"testing"

	"github.com/smolvm-go/smolvm/internal/testutil"
)

// UnixServer serves h on a fresh unix socket until the test ends and
// returns the socket's path.
func UnixServer(t testing.TB, h http.Handler) string {
	t.Helper()
	sock := filepath.Join(testutil.ShortDir(t), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// Recorded is one request a test server saw.
type Recorded struct {
	Method string
	Path   string
	Body   []byte
}

func (r Recorded) String() string { return r.Method + " " + r.Path }

// Recorder wraps Next and keeps every request, in order.
type Recorder struct {
	Next http.Handler

	mu   sync.Mutex
	reqs []Recorded
}

func (rc *Recorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	rc.reqs = append(rc.reqs, Recorded{Method: r.Method, Path: r.URL.Path, Body: body})
	rc.mu.Unlock()
	r.Body = io.NopCloser(bytes.NewReader(body))
	rc.Next.ServeHTTP(w, r)
}

// All returns the requests seen so far.
func (rc *Recorder) All() []Recorded {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]Recorded(nil), rc.reqs...)
}

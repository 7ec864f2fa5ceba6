package server

import (
	"bytes"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

// spoolFiles lists the transfer spool files left in dir.
func spoolFiles(t *testing.T, dir string) []string {
	t.Helper()
	up, _ := filepath.Glob(filepath.Join(dir, ".upload-*"))
	down, _ := filepath.Glob(filepath.Join(dir, ".download-*"))
	return append(up, down...)
}

// TestFileLimits: an upload whose Content-Length passes MaxFileBytes is
// refused before its sandbox is even looked up (413); a chunked body is
// refused once it passes the cap and its spool file is gone; a data dir
// without room refuses the spool (507 no_space). No VM: the real-VM side
// (a guest file over the cap) is in TestLive.
func TestFileLimits(t *testing.T) {
	full := false
	d := startDaemon(t, Config{MaxFileBytes: 1024}, func(s *Server) {
		s.freeSpace = func(dir string) (uint64, string, error) {
			if full {
				return 10 << 20, dir, nil
			}
			return 1 << 40, dir, nil
		}
	})
	sp := loadSpec(t)
	resp, b := sp.call(t, d.client, "PUT", "/v1/sandboxes/nosuch/files?path=/x", bytes.NewReader(make([]byte, 1025)), "Content-Type", "application/octet-stream")
	wantError(t, "upload over the cap", resp, b, 413, "request_too_large")
	resp, b = sp.call(t, d.client, "PUT", "/v1/sandboxes/nosuch/files?path=/x", bytes.NewReader(make([]byte, 1024)), "Content-Type", "application/octet-stream")
	wantError(t, "upload at the cap (reaches the sandbox lookup)", resp, b, 404, "vm_not_found")

	dir := d.s.m.DataDir()
	f, done, n, err := d.s.spoolBody(strings.NewReader(strings.Repeat("x", 1024)))
	if err != nil || n != 1024 {
		t.Fatalf("chunked body at the cap: %d bytes, %v", n, err)
	}
	if st, err := f.Stat(); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("spool file: %v %v", st.Mode(), err)
	}
	done()
	_, _, _, err = d.s.spoolBody(strings.NewReader(strings.Repeat("x", 1025)))
	if det, st := detail(err); st != 413 || det.Code != "request_too_large" {
		t.Errorf("chunked body over the cap: %d %+v", st, det)
	}
	if left := spoolFiles(t, dir); len(left) != 0 {
		t.Errorf("spool files left: %v", left)
	}
	full = true
	_, _, _, err = d.s.spoolBody(strings.NewReader("x"))
	if det, st := detail(err); st != 507 || det.Code != "no_space" || !errors.Is(err, smolvm.ErrNoSpace) || det.Fix == nil || det.Fix.Args["path"] != dir {
		t.Errorf("chunked body on a full disk: %d %+v %v", st, det, err)
	}
	if err := d.s.checkRoom(1 << 20); !errors.Is(err, smolvm.ErrNoSpace) {
		t.Errorf("a download of 1 MiB with 10 MiB free (margin 64 MiB): %v", err)
	}
	full = false
	if err := d.s.checkRoom(1 << 20); err != nil {
		t.Errorf("a download of 1 MiB with room: %v", err)
	}
	if left := spoolFiles(t, dir); len(left) != 0 {
		t.Errorf("spool files left: %v", left)
	}
}

// TestInFlightLimit: with MaxInFlight streams open (events, which block
// until the client leaves), one more long operation gets 429
// too_many_requests with Retry-After, quick calls still pass, and a
// closed stream frees its place. No VM.
func TestInFlightLimit(t *testing.T) {
	d := startDaemon(t, Config{MaxInFlight: 2})
	sp := loadSpec(t)
	var open []*http.Response
	for range 2 {
		resp, err := d.client.Get("http://smolvm/v1/events")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("events: %v %v", resp, err)
		}
		open = append(open, resp)
	}
	defer func() {
		for _, r := range open {
			r.Body.Close()
		}
	}()
	resp, b := sp.call(t, d.client, "DELETE", "/v1/sandboxes/nosuch", nil)
	wantError(t, "a long operation over the limit", resp, b, 429, "too_many_requests")
	if got := resp.Header.Get("Retry-After"); got != "1" {
		t.Errorf("Retry-After %q", got)
	}
	resp, b = sp.call(t, d.client, "POST", "/v1/sandboxes/nosuch/exec", jsonBody(map[string]any{"command": "true"}))
	wantError(t, "an exec over the limit", resp, b, 429, "too_many_requests")
	for _, p := range []string{"/v1/health", "/v1/version", "/openapi.json", "/v1/sandboxes"} {
		resp, b = sp.call(t, d.client, "GET", p, nil)
		wantStatus(t, p+" at the limit", resp, b, 200)
	}
	open[0].Body.Close()
	open = open[1:]
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, b = sp.call(t, d.client, "DELETE", "/v1/sandboxes/nosuch", nil)
		if resp.StatusCode != 429 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	wantError(t, "a long operation once a stream closed", resp, b, 404, "vm_not_found")
}

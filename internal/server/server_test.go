package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fixtext"
)

// TestSpecMatchesRoutes: every operation of api/openapi.yaml is a route of
// the daemon (or an x-smolvm-extra one, mounted from Config.Extra), and
// every route is in the spec.
func TestSpecMatchesRoutes(t *testing.T) {
	sp := loadSpec(t)
	inSpec := map[string]bool{}
	for _, mp := range sp.operations() {
		inSpec[mp] = true
	}
	served := map[string]bool{}
	for _, rt := range (&Server{}).table() {
		served[rt.method+" "+rt.path] = true
		if !inSpec[rt.method+" "+rt.path] {
			t.Errorf("route %s %s is not in api/openapi.yaml", rt.method, rt.path)
		}
	}
	for mp := range inSpec {
		if !served[mp] {
			t.Errorf("spec operation %s has no route", mp)
		}
	}
	if len(served) < 29 {
		t.Errorf("only %d routes", len(served))
	}
}

// TestErrorStatuses: the HTTP status of every SDK error code (api12.md),
// and the recovery text is the CLI's.
func TestErrorStatuses(t *testing.T) {
	cases := map[error]int{
		smolvm.ErrVMNotFound: 404, smolvm.ErrSnapshotNotFound: 404,
		smolvm.ErrVMExists: 409, smolvm.ErrSnapshotExists: 409, smolvm.ErrSnapshotInUse: 409, smolvm.ErrSnapshotRestored: 409, smolvm.ErrVMNotRunning: 409, smolvm.ErrHostIncompatible: 409,
		smolvm.ErrInvalidConfig: 422, smolvm.ErrInvalidID: 422,
		smolvm.ErrImageNotBuilt: 503, smolvm.ErrUnsupported: 503,
		smolvm.ErrTimeout: 504, context.DeadlineExceeded: 504,
		smolvm.ErrRemoteNotFound: 404, smolvm.ErrRemoteExists: 409, smolvm.ErrRemoteAuth: 502, smolvm.ErrRemoteUnreachable: 502, smolvm.ErrNoSpace: 507,
		smolvm.ErrBoot: 500, smolvm.ErrGuestProtocol: 500, errors.New("other"): 500,
	}
	for err, want := range cases {
		if _, got := detail(fmt.Errorf("wrapped: %w", err)); got != want {
			t.Errorf("%v: status %d, want %d", err, got, want)
		}
	}
	err := &smolvm.Error{Message: "m", Fix: smolvm.Fix{Action: smolvm.FixRestoreForce, Args: map[string]string{smolvm.ArgSnapshot: "s1"}}, Err: smolvm.ErrSnapshotRestored}
	d, st := detail(err)
	if st != 409 || d.Code != "snapshot_already_restored" || d.Message != "m" || d.Recovery != fixtext.Text(err) ||
		d.Recovery != "smolvm sandbox snapshot restore s1 --force" || d.Fix == nil || d.Fix.Action != string(smolvm.FixRestoreForce) || d.Fix.Args["snapshot"] != "s1" {
		t.Errorf("detail: %d %+v %+v", st, d, d.Fix)
	}
}

// TestBadInput: unknown routes and methods, malformed JSON, unknown fields,
// oversize bodies, ids that break the rules, a missing path: the one error
// shape and the right status, checked against the spec. No VM is needed:
// every request fails before it reaches one.
func TestBadInput(t *testing.T) {
	d := startDaemon(t, Config{MaxBodyBytes: 4096})
	sp := loadSpec(t)
	c := d.client
	call := func(method, path, body string, hdr ...string) (*http.Response, []byte) {
		var r *bytes.Reader
		if body != "" {
			r = bytes.NewReader([]byte(body))
			return sp.call(t, c, method, path, r, hdr...)
		}
		return sp.call(t, c, method, path, nil, hdr...)
	}
	resp, b := call("GET", "/v1/nope", "")
	wantError(t, "unknown route", resp, b, 404, "not_found")
	resp, b = call("GET", "/", "")
	wantError(t, "root", resp, b, 404, "not_found")
	resp, b = call("PATCH", "/v1/sandboxes", "")
	wantError(t, "PATCH /v1/sandboxes", resp, b, 405, "method_not_allowed")
	if got := resp.Header.Get("Allow"); got != "GET, HEAD, POST" {
		t.Errorf("Allow %q", got)
	}
	resp, b = call("PUT", "/v1/snapshots/s1/restore", "{}")
	wantError(t, "PUT restore", resp, b, 405, "method_not_allowed")
	if got := resp.Header.Get("Allow"); got != "POST" {
		t.Errorf("Allow %q", got)
	}
	resp, b = call("POST", "/v1/sandboxes", `{"name": "x",`)
	wantError(t, "malformed JSON", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/sandboxes", `{"nmae": "x"}`)
	wantError(t, "unknown field", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/sandboxes", `{"memory_mib": "lots"}`)
	wantError(t, "wrong type", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/sandboxes", `{"image":"busybox"} {"image":"debian"}`)
	wantError(t, "two documents", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/sandboxes", `{"name":"x","env":{"A":"`+strings.Repeat("a", 8000)+`"}}`)
	wantError(t, "oversize body", resp, b, 413, "request_too_large")
	resp, b = call("POST", "/v1/sandboxes", `{"name":"x","memory_mib":64}`)
	wantError(t, "memory out of range (the SDK says)", resp, b, 422, "invalid_config")
	resp, b = call("POST", "/v1/sandboxes", `{"name":"x","timeout_s":60}`)
	wantError(t, "lifetime without a runner", resp, b, 503, "unsupported")
	for _, id := range []string{"UPPER", "-lead", "a.b", "a%2Fb", strings.Repeat("a", 65), "%00"} {
		resp, b = call("GET", "/v1/sandboxes/"+id, "")
		if resp.StatusCode != 422 && resp.StatusCode != 404 {
			t.Errorf("id %q: status %d: %s", id, resp.StatusCode, b)
		}
		if resp.StatusCode == 422 {
			wantError(t, "bad id "+id, resp, b, 422, "invalid_id")
		}
	}
	resp, b = call("POST", "/v1/snapshots/Bad..id/restore", "{}")
	wantError(t, "bad snapshot id", resp, b, 422, "invalid_id")
	resp, b = call("GET", "/v1/snapshots?vm_id=NO", "")
	wantError(t, "bad vm_id", resp, b, 422, "invalid_request")
	resp, b = call("GET", "/v1/sandboxes/nosuch", "")
	wantError(t, "missing sandbox", resp, b, 404, "vm_not_found")
	resp, b = call("POST", "/v1/snapshots/nosuch/restore", "{}")
	wantError(t, "missing snapshot", resp, b, 404, "snapshot_not_found")
	resp, b = call("POST", "/v1/sandboxes/nosuch/exec", `{"command":"true","argv":["true"]}`)
	wantError(t, "command and argv", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/sandboxes/nosuch/exec", `{"command":"true","timeout_s":-1}`)
	wantError(t, "negative timeout", resp, b, 422, "invalid_request")
	resp, b = call("GET", "/v1/sandboxes/nosuch/files?path=relative", "")
	wantError(t, "relative path", resp, b, 422, "invalid_request")
	resp, b = call("PUT", "/v1/sandboxes/nosuch/files?path=/x&mode=999", "data", "Content-Type", "application/octet-stream")
	wantError(t, "bad mode", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/sandboxes/nosuch/exec/stream", "")
	wantError(t, "stream without a command", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/snapshots/s1/fork", `{"count":0}`)
	wantError(t, "fork count 0", resp, b, 422, "invalid_request")
	resp, b = call("POST", "/v1/templates", `{"image":"no-such-image"}`)
	if resp.StatusCode < 400 {
		t.Errorf("template of a missing image: %d %s", resp.StatusCode, b)
	}
}

// TestToken: on TCP every request needs the bearer token (missing and
// wrong ones are 401 in the error shape); the unix socket needs none.
func TestToken(t *testing.T) {
	dataDir := t.TempDir()
	extra := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("extra " + r.PathValue("id"))) })
	d := startDaemon(t, Config{Options: smolvm.Options{DataDir: dataDir}, Listen: "127.0.0.1:0",
		Extra: map[string]http.Handler{"/metrics": extra}}, func(s *Server) { s.Mount("GET /v1/sandboxes/{id}/stats", extra) })
	// The token file was made 0600.
	st, err := os.Stat(filepath.Join(dataDir, "api-token"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("token file: %v %v", st, err)
	}
	tok, _ := os.ReadFile(filepath.Join(dataDir, "api-token"))
	addr := d.tcpAddr(t)
	sp := loadSpec(t)
	c := &http.Client{}
	get := func(auth string) (*http.Response, []byte) {
		req, _ := http.NewRequest("GET", "http://"+addr+"/v1/health", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var buf bytes.Buffer
		buf.ReadFrom(resp.Body)
		return resp, buf.Bytes()
	}
	for _, auth := range []string{"", "Bearer ", "Bearer wrong", "Basic " + strings.TrimSpace(string(tok)), "Bearer " + strings.TrimSpace(string(tok)) + "x"} {
		resp, b := get(auth)
		wantError(t, fmt.Sprintf("auth %q", auth), resp, b, 401, "unauthorized")
		if resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("401 without WWW-Authenticate")
		}
	}
	resp, b := get("Bearer " + strings.TrimSpace(string(tok)))
	wantStatus(t, "right token", resp, b, 200)
	// Handlers mounted from other packages are behind the same check.
	for _, path := range []string{"/metrics", "/v1/sandboxes/x1/stats"} {
		req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("%s without a token: %d", path, resp.StatusCode)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		resp, err = c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		buf.ReadFrom(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasPrefix(buf.String(), "extra") {
			t.Errorf("%s with the token: %d %q", path, resp.StatusCode, buf.String())
		}
	}
	resp, b = sp.call(t, d.client, "GET", "/v1/health", nil)
	wantStatus(t, "unix socket, no token", resp, b, 200)
	// The socket is 0600.
	if st, err := os.Stat(d.s.Socket()); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode: %v %v", st, err)
	}
}

func (d *daemon) tcpAddr(t *testing.T) string {
	t.Helper()
	// Serve bound 127.0.0.1:0; find the port from the listener the log
	// names... simpler: the server keeps it.
	if d.s.tcpAddr == "" {
		t.Fatal("no TCP listener")
	}
	return d.s.tcpAddr
}

// TestListenRules: a non-loopback address without TLS is refused; a second
// daemon on one data dir is refused and names the first one's pid.
func TestListenRules(t *testing.T) {
	dataDir := t.TempDir()
	_, err := New(context.Background(), Config{Options: smolvm.Options{DataDir: dataDir, Logger: quietLogger()}, Listen: "0.0.0.0:0"})
	if !errors.Is(err, smolvm.ErrInvalidConfig) || !strings.Contains(err.Error(), "tls") {
		t.Errorf("non-loopback without TLS: %v", err)
	}
	startDaemon(t, Config{Options: smolvm.Options{DataDir: dataDir}})
	_, err = New(context.Background(), Config{Options: smolvm.Options{DataDir: dataDir, Logger: quietLogger()}, Socket: filepath.Join(t.TempDir(), "x.sock")})
	if !errors.Is(err, ErrRunning) || !strings.Contains(err.Error(), fmt.Sprint(os.Getpid())) {
		t.Errorf("second daemon: %v", err)
	}
	if smolvm.ErrorCode(err) == "" {
		t.Error("no code")
	}
}

// TestAPISocketPath: per data dir, in the run dir, short enough for a
// unix socket; SMOLVM_API_SOCKET overrides it.
func TestAPISocketPath(t *testing.T) {
	a := smolvm.APISocketPath(smolvm.Options{DataDir: "/d/one", RunDir: "/run/x"})
	b := smolvm.APISocketPath(smolvm.Options{DataDir: "/d/two", RunDir: "/run/x"})
	if a == b || filepath.Dir(a) != "/run/x" || !strings.HasPrefix(filepath.Base(a), "api-") || len(filepath.Base(a)) != len("api-")+12+len(".sock") {
		t.Errorf("paths %q %q", a, b)
	}
	t.Setenv("SMOLVM_API_SOCKET", "/tmp/x.sock")
	if got := smolvm.APISocketPath(smolvm.Options{}); got != "/tmp/x.sock" {
		t.Errorf("override: %q", got)
	}
}

// FuzzDecode: request bodies are hostile bytes; decode never panics and
// either fills the request or says invalid_request / request_too_large.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"command":"true","env":{"A":"b"}}`))
	f.Add([]byte(`{"argv":["a"]}{}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, _ := http.NewRequest("POST", "/", bytes.NewReader(b))
		r.Body = http.MaxBytesReader(nil, r.Body, 1024)
		var req ExecRequest
		err := decode(r, &req)
		if err != nil {
			d, st := detail(err)
			if st != 422 && st != 413 {
				t.Fatalf("status %d %+v", st, d)
			}
		}
	})
}

// TestTLS: with a certificate the TCP listener speaks TLS only (a plain
// HTTP request gets no answer), and still needs the token.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	pool := writeSelfSigned(t, certFile, keyFile)
	d := startDaemon(t, Config{Listen: "127.0.0.1:0", TLSCert: certFile, TLSKey: keyFile, Token: "0123456789abcdef0123"})
	addr := d.s.tcpAddr
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, _ := http.NewRequest("GET", "https://"+addr+"/v1/health", nil)
	req.Header.Set("Authorization", "Bearer 0123456789abcdef0123")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Errorf("TLS with the token: %d %v", resp.StatusCode, resp.TLS)
	}
	req.Header.Del("Authorization")
	if resp, err := c.Do(req); err != nil || resp.StatusCode != 401 {
		t.Errorf("TLS without the token: %v %v", resp, err)
	}
	plain, err := (&http.Client{}).Get("http://" + addr + "/v1/health")
	if err == nil && plain.StatusCode == 200 {
		t.Errorf("plain HTTP answered 200 on the TLS listener")
	}
}

// writeSelfSigned writes a certificate for 127.0.0.1 and its key, and
// returns a pool that trusts it.
func writeSelfSigned(t *testing.T, certFile, keyFile string) *x509.CertPool {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "smolvm test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return pool
}

package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/server"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestServeWired runs the daemon as `smolvm serve` wires it (wireDaemon)
// on one real VM and calls each route mounted from other packages: the
// stats, the interactive exec WebSocket, /metrics (the sandbox's series
// and the request counter of the middleware), /mcp (tools/list with the
// MCP SDK's streamable client), then the lifetime: a sandbox created to
// pause at its deadline, with the deadline brought to 1 s, is paused
// (sandbox.expired on /v1/events), and start through the API restores it
// with a file it had and its memory (the same boot id).
func TestServeWired(t *testing.T) {
	t.Parallel()
	testutil.RequireQEMU(t)
	ctx := context.Background()
	s, err := server.New(ctx, server.Config{Options: smolvm.Options{DataDir: t.TempDir(), Logger: slog.New(slog.DiscardHandler)},
		Socket: filepath.Join(testutil.ShortDir(t), "api.sock")})
	if err != nil {
		t.Fatal(err)
	}
	if err := wireDaemon(s, "test-1", nil); err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() { done <- s.Serve(sctx, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", s.Socket())
	}}
	c := &http.Client{Transport: tr}
	t.Cleanup(func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if vm, err := s.Manager().Open(dctx, "w1"); err == nil {
			vm.Delete(dctx)
		}
		stop()
		<-done
		s.Close()
	})
	call := func(method, path, body string) (int, []byte) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://smolvm"+path, strings.NewReader(body))
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	exec := func(cmd string) string {
		t.Helper()
		code, b := call("POST", "/v1/sandboxes/w1/exec", `{"command":`+quote(cmd)+`}`)
		var r server.ExecResult
		json.Unmarshal(b, &r)
		if code != 200 || !r.OK {
			t.Fatalf("exec %q: %d %s", cmd, code, b)
		}
		return r.Stdout
	}

	// A lifetime of an hour that pauses: only with the runner wired (503
	// without one).
	if code, b := call("POST", "/v1/sandboxes", `{"name":"w1","image":"busybox","timeout_s":3600,"on_timeout":"pause"}`); code != 201 {
		t.Fatalf("create: %d %s", code, b)
	}
	exec("echo kept > /tmp/kept")
	bootID := exec("cat /proc/sys/kernel/random/boot_id")

	t.Run("Stats", func(t *testing.T) {
		code, b := call("GET", "/v1/sandboxes/w1/stats", "")
		var st smolvm.Stats
		if code != 200 || json.Unmarshal(b, &st) != nil || st.ID != "w1" || st.Status != smolvm.StatusRunning || st.Memory.RSSBytes == 0 {
			t.Fatalf("stats: %d %s", code, b)
		}
		if code, b := call("GET", "/v1/sandboxes/nope/stats", ""); code != 404 || !bytes.Contains(b, []byte(`"vm_not_found"`)) {
			t.Fatalf("stats of no sandbox: %d %s", code, b)
		}
	})

	t.Run("ExecWS", func(t *testing.T) {
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		conn, _, err := websocket.Dial(wctx, "ws://smolvm/v1/sandboxes/w1/exec/ws", &websocket.DialOptions{HTTPClient: c})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.CloseNow()
		conn.Write(wctx, websocket.MessageText, []byte(`{"type":"start","command":"read l; echo got:$l"}`))
		conn.Write(wctx, websocket.MessageBinary, []byte("hello\n"))
		var out bytes.Buffer
		for {
			typ, data, err := conn.Read(wctx)
			if err != nil {
				t.Fatalf("read: %v (output %q)", err, out.String())
			}
			if typ == websocket.MessageBinary && len(data) > 0 && data[0] == 1 {
				out.Write(data[1:])
				continue
			}
			if typ == websocket.MessageText && bytes.Contains(data, []byte(`"exit"`)) {
				if !bytes.Contains(data, []byte(`"exit_code":0`)) || out.String() != "got:hello\n" {
					t.Fatalf("exit %s, output %q", data, out.String())
				}
				return
			}
		}
	})

	t.Run("Metrics", func(t *testing.T) {
		code, b := call("GET", "/metrics", "")
		if code != 200 || !bytes.Contains(b, []byte(`smolvm_sandbox_memory_rss_bytes{id="w1"}`)) {
			t.Fatalf("metrics: %d %.2000s", code, b)
		}
		// The middleware counted the exec above, by its route pattern.
		if !bytes.Contains(b, []byte(`smolvm_http_requests_total{code="200",method="POST",route="/v1/sandboxes/{id}/exec"}`)) {
			t.Fatalf("no request metrics for the exec route: %s", grepLines(b, "smolvm_http_requests"))
		}
	})

	t.Run("MCP", func(t *testing.T) {
		cl := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
		cs, err := cl.Connect(ctx, &mcp.StreamableClientTransport{Endpoint: "http://smolvm/mcp", HTTPClient: c, MaxRetries: -1}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer cs.Close()
		if v := cs.InitializeResult().ServerInfo.Version; v != "test-1" {
			t.Errorf("MCP server version %q, want the daemon's", v)
		}
		tools, err := cs.ListTools(ctx, nil)
		if err != nil || len(tools.Tools) == 0 {
			t.Fatalf("tools/list: %v %v", tools, err)
		}
	})

	t.Run("LifetimePauseResume", func(t *testing.T) {
		ectx, cancel := context.WithTimeout(ctx, 3*time.Minute)
		defer cancel()
		req, _ := http.NewRequestWithContext(ectx, "GET", "http://smolvm/v1/events", nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if code, b := call("POST", "/v1/sandboxes/w1/timeout", `{"timeout_s":1}`); code != 200 {
			t.Fatalf("timeout: %d %s", code, b)
		}
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() && !strings.Contains(sc.Text(), `"type":"sandbox.expired"`) {
		}
		if sc.Err() != nil || !strings.Contains(sc.Text(), `"id":"w1"`) {
			t.Fatalf("no sandbox.expired for w1: %q %v", sc.Text(), sc.Err())
		}
		code, b := call("GET", "/v1/sandboxes/w1", "")
		var info smolvm.Info
		if json.Unmarshal(b, &info); code != 200 || info.Status != smolvm.StatusStopped {
			t.Fatalf("after the pause: %d %s", code, b)
		}
		if code, b := call("POST", "/v1/sandboxes/w1/start", ""); code != 200 {
			t.Fatalf("start: %d %s", code, b)
		}
		if got := exec("cat /tmp/kept"); got != "kept\n" {
			t.Fatalf("after the resume /tmp/kept = %q", got)
		}
		// Its memory came back (a boot from its disk has a new boot id).
		if got := exec("cat /proc/sys/kernel/random/boot_id"); got != bootID {
			t.Fatalf("boot id %q after the resume, %q before: booted, not restored", got, bootID)
		}
	})
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func grepLines(b []byte, sub string) string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

package wsexec_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/testutil"
	"github.com/smolvm-go/smolvm/internal/wsexec"
)

// One real busybox VM for the package, served by the handler on
// 127.0.0.1 (httptest) and driven by coder/websocket's client.

var (
	root   string
	shared struct {
		once sync.Once
		m    *smolvm.Manager
		vm   *smolvm.VM
		err  error
	}
)

func TestMain(m *testing.M) {
	if _, err := testutil.EnsureImages(context.Background(), image.Busybox); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	root, _ = os.MkdirTemp("/tmp", "smws")
	os.Setenv("SMOLVM_COLD_BOOT", "1")
	code := m.Run()
	if shared.vm != nil {
		shared.vm.Delete(context.Background())
		shared.m.Close()
	}
	os.RemoveAll(root)
	os.Exit(code)
}

func sharedVM(t *testing.T) *smolvm.VM {
	t.Helper()
	shared.once.Do(func() {
		ctx := context.Background()
		shared.m, shared.err = smolvm.NewManager(ctx, smolvm.Options{DataDir: filepath.Join(root, "data"), RunDir: filepath.Join(root, "run"),
			ImageDir: testutil.ImageDir(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if shared.err != nil {
			return
		}
		shared.vm, shared.err = shared.m.New(ctx, smolvm.Config{Name: "ws", Image: "busybox", NoNetwork: true})
		if shared.err == nil {
			shared.err = shared.vm.Start(ctx)
		}
	})
	if shared.err != nil {
		t.Fatalf("shared vm: %v", shared.err)
	}
	return shared.vm
}

// server serves the handler for the shared VM (id "ws"; others: not found).
func server(t *testing.T) string {
	vm := sharedVM(t)
	mux := http.NewServeMux()
	mux.Handle("GET /v1/sandboxes/{id}/exec/ws", wsexec.Handler(func(r *http.Request) (*smolvm.VM, error) {
		if r.PathValue("id") != "ws" {
			return nil, &smolvm.Error{Message: "vm not found", Err: smolvm.ErrVMNotFound}
		}
		return vm, nil
	}))
	srv := httptest.NewUnstartedServer(mux) // 127.0.0.1
	// A daemon's quick-call timeouts must not cut a session short.
	srv.Config.ReadTimeout, srv.Config.WriteTimeout = 500*time.Millisecond, 500*time.Millisecond
	srv.Start()
	t.Cleanup(srv.Close)
	return "ws" + strings.TrimPrefix(srv.URL, "http")
}

type client struct {
	conn           *websocket.Conn
	stdout, stderr bytes.Buffer
	ctl            []map[string]any
}

func dial(t *testing.T, url string, start map[string]any) *client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, url+"/v1/sandboxes/ws/exec/ws", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.CloseNow() })
	c := &client{conn: conn}
	start["type"] = "start"
	c.send(t, start)
	if m := c.next(t); m["type"] != "started" {
		t.Fatalf("first message %v, want started", m)
	}
	return c
}

func (c *client) send(t *testing.T, v map[string]any) {
	t.Helper()
	b, _ := json.Marshal(v)
	if err := c.conn.Write(context.Background(), websocket.MessageText, b); err != nil {
		t.Fatal(err)
	}
}

// next reads until the next control message, collecting output.
func (c *client) next(t *testing.T) map[string]any {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		typ, data, err := c.conn.Read(ctx)
		if err != nil {
			t.Fatalf("read: %v (stdout %q, stderr %q)", err, c.stdout.String(), c.stderr.String())
		}
		if typ == websocket.MessageBinary {
			switch {
			case len(data) > 0 && data[0] == wsexec.StreamStdout:
				c.stdout.Write(data[1:])
			case len(data) > 0 && data[0] == wsexec.StreamStderr:
				c.stderr.Write(data[1:])
			default:
				t.Fatalf("binary message without a stream byte: %q", data)
			}
			continue
		}
		var m map[string]any
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
}

// waitOutput reads output until stdout holds want.
func (c *client) waitOutput(t *testing.T, want string) {
	t.Helper()
	for !strings.Contains(c.stdout.String(), want) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		typ, data, err := c.conn.Read(ctx)
		cancel()
		if err != nil || typ != websocket.MessageBinary || len(data) == 0 {
			t.Fatalf("waiting for %q: %v %q (stdout %q)", want, err, data, c.stdout.String())
		}
		if data[0] == wsexec.StreamStdout {
			c.stdout.Write(data[1:])
		}
	}
}

func TestWebSocketSession(t *testing.T) {
	url := server(t)
	t.Run("stdin", func(t *testing.T) {
		c := dial(t, url, map[string]any{"command": "wc -c; echo err >&2; exit 3"})
		data := bytes.Repeat([]byte("x"), 300<<10)
		for off := 0; off < len(data); off += 100 << 10 {
			if err := c.conn.Write(context.Background(), websocket.MessageBinary, data[off:off+100<<10]); err != nil {
				t.Fatal(err)
			}
		}
		c.send(t, map[string]any{"type": "eof"})
		m := c.next(t)
		if m["type"] != "exit" || m["exit_code"] != float64(3) || strings.TrimSpace(c.stdout.String()) != fmt.Sprint(len(data)) || c.stderr.String() != "err\n" {
			t.Fatalf("got %v, stdout %q, stderr %q", m, c.stdout.String(), c.stderr.String())
		}
	})
	t.Run("outlives server timeouts", func(t *testing.T) {
		c := dial(t, url, map[string]any{"command": "sleep 1.5; echo ok"})
		if m := c.next(t); m["type"] != "exit" || m["exit_code"] != float64(0) || c.stdout.String() != "ok\n" {
			t.Fatalf("got %v, stdout %q", m, c.stdout.String())
		}
	})
	t.Run("tty", func(t *testing.T) {
		c := dial(t, url, map[string]any{"argv": []string{"sh", "-c", "stty size; read x; stty size; echo slept; sleep 100"}, "tty": map[string]any{"rows": 20, "cols": 70}})
		c.waitOutput(t, "20 70")
		c.send(t, map[string]any{"type": "resize", "rows": 21, "cols": 71})
		c.conn.Write(context.Background(), websocket.MessageBinary, []byte("go\r"))
		c.waitOutput(t, "slept")
		c.send(t, map[string]any{"type": "signal", "signal": "SIGTERM"})
		m := c.next(t)
		if m["type"] != "exit" || m["exit_code"] != float64(143) || !strings.Contains(c.stdout.String(), "20 70") || !strings.Contains(c.stdout.String(), "21 71") {
			t.Fatalf("got %v, output %q", m, c.stdout.String())
		}
	})
	t.Run("client gone", func(t *testing.T) {
		c := dial(t, url, map[string]any{"command": "echo $$; exec sleep 1000"})
		c.waitOutput(t, "\n")
		pid := strings.TrimSpace(c.stdout.String())
		// Input the command does not read, past the agent's window: the
		// server keeps reading, so it sees the client go.
		for range 2 {
			if err := c.conn.Write(context.Background(), websocket.MessageBinary, make([]byte, 1<<20)); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(200 * time.Millisecond)
		c.conn.CloseNow() // no close handshake: the client vanished
		vm := sharedVM(t)
		deadline := time.Now().Add(15 * time.Second)
		for {
			res, err := vm.Run(context.Background(), "kill -0 "+pid)
			if err != nil {
				t.Fatal(err)
			}
			if res.ExitCode != 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pid %s still runs after its client vanished", pid)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	t.Run("input overflow", func(t *testing.T) {
		c := dial(t, url, map[string]any{"argv": []string{"sleep", "1000"}})
		go func() {
			for range 6 {
				if c.conn.Write(context.Background(), websocket.MessageBinary, make([]byte, 1<<20)) != nil {
					return
				}
			}
		}()
		if m := c.next(t); m["type"] != "error" || !strings.Contains(fmt.Sprint(m["error"]), "more than the command read") {
			t.Fatalf("got %v", m)
		}
	})
	t.Run("refusals", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// Unknown sandbox: an HTTP error before the upgrade.
		_, resp, err := websocket.Dial(ctx, url+"/v1/sandboxes/nope/exec/ws", nil)
		if err == nil || resp == nil || resp.StatusCode != http.StatusNotFound {
			t.Fatalf("unknown sandbox: %v %v", resp, err)
		}
		// A bad first message: an error message, then the close.
		for _, first := range []string{`{"type":"resize","rows":1,"cols":1}`, `{"type":"start"}`, `{"type":"start","command":"x","bogus":1}`, `not json`} {
			conn, _, err := websocket.Dial(ctx, url+"/v1/sandboxes/ws/exec/ws", nil)
			if err != nil {
				t.Fatal(err)
			}
			conn.Write(ctx, websocket.MessageText, []byte(first))
			_, data, err := conn.Read(ctx)
			if err != nil || !strings.Contains(string(data), `"invalid_config"`) {
				t.Errorf("%s: %q %v", first, data, err)
			}
			conn.CloseNow()
		}
	})
}

func TestParseControl(t *testing.T) {
	for _, ok := range []string{`{"type":"start","argv":["ls"]}`, `{"type":"start","command":"ls","tty":{"rows":2,"cols":3},"term":"vt100","env":{"A":"b"},"cwd":"/"}`,
		`{"type":"eof"}`, `{"type":"resize","rows":5,"cols":6}`, `{"type":"signal","signal":"int"}`} {
		if _, err := wsexec.ParseControl([]byte(ok)); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{`{"type":"start"}`, `{"type":"start","argv":["a"],"command":"b"}`, `{"type":"start","command":"a","rows":1}`,
		`{"type":"eof","signal":"INT"}`, `{"type":"resize","rows":0,"cols":6}`, `{"type":"resize","rows":5000,"cols":6}`, `{"type":"signal","signal":"SIGSEGV"}`,
		`{"type":"nope"}`, `{"type":"eof"} {}`, `{"type":"eof","x":1}`, `[]`} {
		if _, err := wsexec.ParseControl([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}

// FuzzParseControl: any client text message is parsed or refused without
// panicking; what is accepted is within bounds.
func FuzzParseControl(f *testing.F) {
	for _, s := range []string{`{"type":"start","argv":["ls"],"tty":{"rows":2,"cols":3}}`, `{"type":"resize","rows":5,"cols":6}`, `{"type":"signal","signal":"int"}`, `{"type":"eof"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := wsexec.ParseControl(data)
		if err != nil {
			return
		}
		switch c.Type {
		case "start":
			if c.Spec().Validate() != nil {
				t.Fatalf("invalid start accepted: %q", data)
			}
		case "resize":
			if c.Rows == 0 || c.Cols == 0 || c.Rows > 4096 || c.Cols > 4096 {
				t.Fatalf("size accepted: %q", data)
			}
		case "signal":
			if !strings.HasPrefix(c.Signal, "SIG") {
				t.Fatalf("signal %q", c.Signal)
			}
		case "eof":
		default:
			t.Fatalf("type %q accepted", c.Type)
		}
	})
}

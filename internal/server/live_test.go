package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

// fakeLifetimes records what the daemon asks of the lifetime runner (our
// own interface; internal/lifetime is tested on its own).
type fakeLifetimes struct {
	mu    sync.Mutex
	calls []string
}

func (f *fakeLifetimes) rec(s string) {
	f.mu.Lock()
	f.calls = append(f.calls, s)
	f.mu.Unlock()
}
func (f *fakeLifetimes) Set(_ context.Context, id string, ttl time.Duration, action string, idle time.Duration) error {
	f.rec("set " + id + " " + ttl.String() + " " + action + " " + idle.String())
	return nil
}
func (f *fakeLifetimes) Extend(_ context.Context, id string, ttl time.Duration) error {
	f.rec("extend " + id + " " + ttl.String())
	return nil
}
func (f *fakeLifetimes) Touch(id string)                           {}
func (f *fakeLifetimes) Forget(_ context.Context, id string) error { f.rec("forget " + id); return nil }
func (f *fakeLifetimes) AutoPaused(id string) bool                 { return false }
func (f *fakeLifetimes) Resume(ctx context.Context, id string) (*smolvm.VM, error) {
	return nil, fmt.Errorf("fakeLifetimes.Resume(%s): not auto-paused", id)
}
func (f *fakeLifetimes) Run(ctx context.Context, _ func(id, action string, err error)) error {
	<-ctx.Done()
	return nil
}
func (f *fakeLifetimes) has(s string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.calls, s)
}

// execEvents reads an exec/stream NDJSON body: stdout, stderr, the last event.
func execEvents(t *testing.T, b []byte) (stdout, stderr string, last map[string]any) {
	t.Helper()
	var o, e bytes.Buffer
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var ev struct {
			Type string `json:"type"`
			Data []byte `json:"data"`
		}
		json.Unmarshal(sc.Bytes(), &ev)
		switch ev.Type {
		case "stdout":
			o.Write(ev.Data)
		case "stderr":
			e.Write(ev.Data)
		}
		last = map[string]any{}
		json.Unmarshal(sc.Bytes(), &last)
	}
	return o.String(), e.String(), last
}

// waitGone waits until the guest process whose pid is in pidFile (in c1)
// is gone.
func waitGone(t *testing.T, sp *spec, c *http.Client, pidFile string, within time.Duration, why string) {
	t.Helper()
	deadline := time.Now().Add(within)
	cmd := fmt.Sprintf("test -s %[1]s || { echo nopid; exit; }; kill -0 $(cat %[1]s) 2>/dev/null && echo alive || echo gone", pidFile)
	for {
		_, b := sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": cmd}))
		r := decodeAs[ExecResult](t, b)
		if r.Stdout == "gone\n" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the command still runs %v after %s: %+v", within, why, r)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// lastLine decodes the last NDJSON line of a long operation.
func lastLine(t *testing.T, b []byte) map[string]any {
	t.Helper()
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	var v map[string]any
	if err := json.Unmarshal(lines[len(lines)-1], &v); err != nil {
		t.Fatalf("last line: %v: %s", err, b)
	}
	return v
}

// TestLive is the conformance test: one daemon, real VMs (busybox, TCG),
// every operation of api/openapi.yaml called and every response validated
// against the spec; it fails when an operation of the spec was not
// exercised. Along the way: two clients restore one snapshot at once
// (exactly one wins), and a client that disconnects mid-stream gets its
// command killed.
func TestLive(t *testing.T) {
	t.Parallel()
	needImages(t)
	lt := &fakeLifetimes{}
	d := startDaemon(t, Config{Lifetimes: lt, WriteStall: 2 * time.Second, MaxFileBytes: 4 << 20})
	sp := loadSpec(t)
	c := d.client
	ctx := context.Background()
	t.Cleanup(func() {
		// Whatever a failure left.
		if infos, err := d.s.m.List(ctx); err == nil {
			for _, i := range infos {
				if vm, err := d.s.m.Open(ctx, i.ID); err == nil {
					vm.Delete(ctx)
				}
			}
		}
	})

	// Events: subscribe first, collect what comes.
	evReq, _ := http.NewRequest("GET", "http://smolvm/v1/events", nil)
	evCtx, evCancel := context.WithCancel(ctx)
	defer evCancel()
	evResp, err := c.Do(evReq.WithContext(evCtx))
	if err != nil {
		t.Fatal(err)
	}
	sp.validate(t, evReq, evResp, nil)
	eventSchema := sp.doc.Components.Schemas["Event"].Value
	var evMu sync.Mutex
	var events []string
	go func() {
		sc := bufio.NewScanner(evResp.Body)
		for sc.Scan() {
			data, ok := strings.CutPrefix(sc.Text(), "data: ")
			if !ok {
				continue
			}
			var v any
			json.Unmarshal([]byte(data), &v)
			if err := eventSchema.VisitJSON(v); err != nil {
				t.Errorf("event breaks the spec: %v: %s", err, data)
			}
			var e Event
			json.Unmarshal([]byte(data), &e)
			evMu.Lock()
			events = append(events, e.Type+" "+e.ID)
			evMu.Unlock()
		}
	}()

	for _, p := range []string{"/openapi.json", "/v1/health", "/v1/version"} {
		resp, b := sp.call(t, c, "GET", p, nil)
		wantStatus(t, p, resp, b, 200)
	}

	// Create c1 with a lifetime.
	resp, b := sp.call(t, c, "POST", "/v1/sandboxes", jsonBody(map[string]any{"name": "c1", "image": "busybox", "memory_mib": 256,
		"env": map[string]string{"FOO": "bar"}, "timeout_s": 600, "on_timeout": "pause"}))
	wantStatus(t, "create", resp, b, 201)
	if info := decodeAs[smolvm.Info](t, b); info.ID != "c1" || info.Status != smolvm.StatusRunning {
		t.Fatalf("created: %+v", info)
	}
	if !lt.has("set c1 10m0s pause 0s") {
		t.Errorf("lifetime not set: %v", lt.calls)
	}
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes", nil)
	wantStatus(t, "list", resp, b, 200)
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1", nil)
	wantStatus(t, "get", resp, b, 200)
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "echo $FOO; echo e >&2; exit 3"}))
	wantStatus(t, "exec", resp, b, 200)
	if r := decodeAs[ExecResult](t, b); r.ExitCode != 3 || r.Stdout != "bar\n" || r.Stderr != "e\n" || r.OK {
		t.Errorf("exec: %+v", r)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"argv": []string{"cat"}, "stdin": "in", "cwd": "/tmp"}))
	if r := decodeAs[ExecResult](t, b); r.Stdout != "in" || !r.OK {
		t.Errorf("exec argv: %+v", r)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "sleep 5", "timeout_s": 0.5}))
	if r := decodeAs[ExecResult](t, b); !r.TimedOut || r.OK {
		t.Errorf("exec timeout: %+v", r)
	}

	// Streamed exec with stdin.
	q := url.Values{"command": {"cat; echo; echo E >&2; exit 5"}}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec/stream?"+q.Encode(), strings.NewReader("stdin data"), "Content-Type", "application/octet-stream")
	wantStatus(t, "exec stream", resp, b, 200)
	if o, e, last := execEvents(t, b); o != "stdin data\n" || e != "E\n" || last["type"] != "exit" || last["exit_code"] != float64(5) {
		t.Errorf("exec stream: %q %q %v", o, e, last)
	}

	// Files: streamed both ways, with a length and chunked.
	data := make([]byte, 2<<20+123)
	rand.Read(data)
	resp, b = sp.call(t, c, "PUT", "/v1/sandboxes/c1/files?path=/tmp/d/f.bin&mode=0640", bytes.NewReader(data), "Content-Type", "application/octet-stream")
	wantStatus(t, "put file", resp, b, 204)
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1/files?path=/tmp/d/f.bin", nil)
	wantStatus(t, "get file", resp, b, 200)
	if !bytes.Equal(b, data) || resp.Header.Get("X-Smolvm-File-Mode") != "0640" {
		t.Errorf("file round trip: %d bytes (want %d), mode %q", len(b), len(data), resp.Header.Get("X-Smolvm-File-Mode"))
	}
	resp, b = sp.call(t, c, "PUT", "/v1/sandboxes/c1/files?path=/tmp/chunked", io.MultiReader(strings.NewReader("chunked "), strings.NewReader("body")), "Content-Type", "application/octet-stream")
	wantStatus(t, "put chunked", resp, b, 204)
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1/files?path=/tmp/chunked", nil)
	if string(b) != "chunked body" {
		t.Errorf("chunked upload: %q", b)
	}
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1/files?path=/no/such", nil)
	if resp.StatusCode < 400 {
		t.Errorf("missing file: %d", resp.StatusCode)
	}
	// Over MaxFileBytes (4 MiB): a guest file of 5 MiB is refused on the
	// size the guest announces, a chunked upload once the spool passes
	// the cap; neither leaves a spool file.
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "dd if=/dev/zero of=/tmp/big bs=1048576 count=5 2>/dev/null && wc -c < /tmp/big"}))
	if r := decodeAs[ExecResult](t, b); strings.TrimSpace(r.Stdout) != "5242880" {
		t.Errorf("making a 5 MiB guest file: %+v", r)
	}
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1/files?path=/tmp/big", nil)
	if e := wantError(t, "a guest file over the cap", resp, b, 413, "request_too_large"); !strings.Contains(e.Error.Message, "the guest file of 5242880 bytes") {
		t.Errorf("not refused on the announced size: %s", e.Error.Message) // (capWriter's refusal comes after 4 MiB are spooled)
	}
	resp, b = sp.call(t, c, "PUT", "/v1/sandboxes/c1/files?path=/tmp/big2", io.MultiReader(bytes.NewReader(make([]byte, 4<<20)), bytes.NewReader(make([]byte, 64<<10))), "Content-Type", "application/octet-stream")
	wantError(t, "a chunked upload over the cap", resp, b, 413, "request_too_large")
	if left := spoolFiles(t, d.s.m.DataDir()); len(left) != 0 {
		t.Errorf("spool files left: %v", left)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "rm /tmp/big; test ! -e /tmp/big2"}))
	if r := decodeAs[ExecResult](t, b); !r.OK {
		t.Errorf("the refused upload was written: %+v", r)
	}

	l, _ := net.Listen("tcp", "127.0.0.1:0")
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/ports", jsonBody(map[string]int{"host_port": port, "guest_port": 8080}))
	wantStatus(t, "ports", resp, b, 200)
	if info := decodeAs[smolvm.Info](t, b); len(info.PortForwards) != 1 || info.PortForwards[0].HostPort != port {
		t.Errorf("port forwards: %+v", info.PortForwards)
	}
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1/logs", nil)
	wantStatus(t, "logs", resp, b, 200)
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/timeout", jsonBody(map[string]int{"timeout_s": 120}))
	wantStatus(t, "timeout", resp, b, 200)
	if !lt.has("extend c1 2m0s") {
		t.Errorf("lifetime not extended: %v", lt.calls)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/pause", nil, "Accept", "application/x-ndjson")
	wantStatus(t, "pause (progress)", resp, b, 200)
	if last := lastLine(t, b); last["type"] != "result" || last["status"] != float64(200) {
		t.Errorf("pause progress: %s", b)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "true"}))
	wantError(t, "exec while paused", resp, b, 409, "vm_not_running")
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/resume", nil)
	wantStatus(t, "resume", resp, b, 200)

	t.Run("DisconnectKillsCommand", func(t *testing.T) {
		sctx, cancel := context.WithCancel(ctx)
		q := url.Values{"command": {"echo $$ > /tmp/pid; echo go; exec sleep 300"}}
		req, _ := http.NewRequestWithContext(sctx, "POST", "http://smolvm/v1/sandboxes/c1/exec/stream?"+q.Encode(), nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(resp.Body).ReadString('\n')
		if err != nil || !strings.Contains(line, `"stdout"`) {
			t.Fatalf("first event: %q %v", line, err)
		}
		cancel() // the client goes away mid-stream
		resp.Body.Close()
		waitGone(t, sp, c, "/tmp/pid", 15*time.Second, "its client went away")
	})

	t.Run("StreamsStdin", func(t *testing.T) {
		// The command answers each line before the client sends the next:
		// stdin reaches it while the request body is still open.
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		pr, pw := io.Pipe()
		defer pw.Close()
		go func() { <-sctx.Done(); pw.CloseWithError(sctx.Err()) }()
		q := url.Values{"command": {"while read l; do echo got:$l; done; echo eof"}}
		req, _ := http.NewRequestWithContext(sctx, "POST", "http://smolvm/v1/sandboxes/c1/exec/stream?"+q.Encode(), pr)
		req.Header.Set("Content-Type", "application/octet-stream")
		// (Go's client may hold the request headers until the body's
		// first chunk.)
		go pw.Write([]byte("a\n"))
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("exec stream: %d %s", resp.StatusCode, b)
		}
		events := bufio.NewReader(resp.Body)
		next := func() map[string]any {
			line, err := events.ReadString('\n')
			var ev map[string]any
			if err != nil || json.Unmarshal([]byte(line), &ev) != nil {
				t.Fatalf("event: %q %v", line, err)
			}
			return ev
		}
		for _, w := range []string{"a", "b"} {
			if w != "a" {
				pw.Write([]byte(w + "\n"))
			}
			ev := next()
			if ev["type"] != "stdout" || ev["data"] != base64.StdEncoding.EncodeToString([]byte("got:"+w+"\n")) {
				t.Fatalf("after %q: %v", w, ev)
			}
		}
		pw.Close() // EOF closes the command's stdin
		if ev := next(); ev["data"] != base64.StdEncoding.EncodeToString([]byte("eof\n")) {
			t.Fatalf("after EOF: %v", ev)
		}
		if ev := next(); ev["type"] != "exit" || ev["exit_code"] != float64(0) || ev["timed_out"] != false {
			t.Fatalf("exit: %v", ev)
		}
		// Its timeout kills it.
		q = url.Values{"command": {"echo $$ > /tmp/tpid; exec sleep 300"}, "timeout_s": {"1"}}
		resp2, b := sp.call(t, c, "POST", "/v1/sandboxes/c1/exec/stream?"+q.Encode(), nil)
		wantStatus(t, "exec stream timeout", resp2, b, 200)
		if _, _, last := execEvents(t, b); last["type"] != "exit" || last["timed_out"] != true {
			t.Errorf("exec stream timeout: %s", b)
		}
		waitGone(t, sp, c, "/tmp/tpid", 15*time.Second, "its timeout")
	})

	t.Run("StalledClientKillsCommand", func(t *testing.T) {
		// A client that stops reading an endless stream: after WriteStall
		// the write fails, the command is killed, and the sandbox's
		// other calls go on.
		conn, err := net.Dial("unix", d.s.Socket())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		q := url.Values{"command": {"echo $$ > /tmp/spid; exec cat /dev/zero"}}
		fmt.Fprintf(conn, "POST /v1/sandboxes/c1/exec/stream?%s HTTP/1.1\r\nHost: smolvm\r\nContent-Length: 0\r\n\r\n", q.Encode())
		// Never read. Wait for the pid file, then for the command to die.
		// (Without the stall bound the stuck stream would also block these
		// calls: the agent connection is shared; hence their timeout.)
		pc := &http.Client{Transport: c.Transport, Timeout: 15 * time.Second}
		waitGone(t, sp, pc, "/tmp/spid", 30*time.Second, "its client stopped reading")
	})

	// Snapshot, then two clients restore it at once: exactly one wins.
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/snapshots", jsonBody(map[string]any{"snapshot_id": "s1", "resume_source": true}))
	wantStatus(t, "snapshot", resp, b, 201)
	resp, b = sp.call(t, c, "GET", "/v1/snapshots?vm_id=c1", nil)
	if l := decodeAs[struct{ Snapshots []smolvm.SnapshotInfo }](t, b); len(l.Snapshots) != 1 || l.Snapshots[0].ID != "s1" {
		t.Errorf("list snapshots: %s", b)
	}
	resp, b = sp.call(t, c, "GET", "/v1/snapshots/s1", nil)
	wantStatus(t, "get snapshot", resp, b, 200)
	var wg sync.WaitGroup
	statuses := make([]int, 2)
	bodies := make([][]byte, 2)
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, b := sp.call(t, unixClient(d.s.Socket()), "POST", "/v1/snapshots/s1/restore", jsonBody(map[string]bool{"resume": true}))
			statuses[i], bodies[i] = r.StatusCode, b
		}()
	}
	wg.Wait()
	sorted := slices.Clone(statuses)
	sort.Ints(sorted)
	if sorted[0] != 201 || sorted[1] != 409 {
		t.Fatalf("two restores at once: %v\n%s\n%s", statuses, bodies[0], bodies[1])
	}
	loser := bodies[0]
	if statuses[0] == 201 {
		loser = bodies[1]
	}
	if e := decodeAs[ErrorBody](t, loser); e.Error.Code != "snapshot_already_restored" || !strings.Contains(e.Error.Recovery, "--force") {
		t.Errorf("the loser: %s", loser)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "cat /tmp/chunked"}))
	if r := decodeAs[ExecResult](t, b); r.Stdout != "chunked body" {
		t.Errorf("restored sandbox: %+v %s", r, b)
	}

	resp, b = sp.call(t, c, "POST", "/v1/snapshots/s1/fork", jsonBody(map[string]int{"count": 1}), "Accept", "application/x-ndjson")
	wantStatus(t, "fork", resp, b, 200)
	last := lastLine(t, b)
	if last["type"] != "result" || last["status"] != float64(201) {
		t.Fatalf("fork: %s", b)
	}
	clones := last["body"].(map[string]any)["sandboxes"].([]any)
	clone := clones[0].(map[string]any)["id"].(string)
	if !bytes.Contains(b, []byte(`"type":"progress"`)) {
		t.Errorf("fork reported no progress: %s", b)
	}
	resp, b = sp.call(t, c, "DELETE", "/v1/sandboxes/"+clone, nil)
	wantStatus(t, "delete clone", resp, b, 204)

	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/stop", nil)
	wantStatus(t, "stop", resp, b, 200)
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/start", nil)
	wantStatus(t, "start", resp, b, 200)
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/c1/exec", jsonBody(map[string]any{"command": "echo back"}))
	if r := decodeAs[ExecResult](t, b); r.Stdout != "back\n" {
		t.Errorf("after stop/start: %s", b)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes", jsonBody(map[string]any{"name": "c2", "image": "busybox", "start": false}))
	wantStatus(t, "create unstarted", resp, b, 201)
	if info := decodeAs[smolvm.Info](t, b); info.Status != smolvm.StatusCreated {
		t.Errorf("start false: %s", info.Status)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes", jsonBody(map[string]any{"name": "c2", "image": "busybox", "start": false}))
	wantError(t, "create twice", resp, b, 409, "vm_exists")
	resp, b = sp.call(t, c, "DELETE", "/v1/sandboxes/c2", nil)
	wantStatus(t, "delete c2", resp, b, 204)

	// Templates: build one (a builder VM boots), list it, delete it.
	resp, b = sp.call(t, c, "POST", "/v1/templates", jsonBody(map[string]any{"image": "busybox", "memory_mib": 192, "no_network": true}), "Accept", "application/x-ndjson")
	wantStatus(t, "build template", resp, b, 200)
	last = lastLine(t, b)
	if last["type"] != "result" || last["status"] != float64(201) {
		t.Fatalf("build template: %s", b)
	}
	key := last["body"].(map[string]any)["key"].(string)
	resp, b = sp.call(t, c, "GET", "/v1/templates", nil)
	wantStatus(t, "templates", resp, b, 200)
	if !bytes.Contains(b, []byte(key)) {
		t.Errorf("template %s not listed: %s", key, b)
	}
	resp, b = sp.call(t, c, "POST", "/v1/templates", jsonBody(map[string]any{"image": "no-such-image"}))
	if resp.StatusCode < 400 {
		t.Errorf("template of a missing image: %s", b)
	}
	resp, b = sp.call(t, c, "DELETE", "/v1/templates/"+key, nil)
	wantStatus(t, "delete template", resp, b, 204)
	resp, b = sp.call(t, c, "DELETE", "/v1/templates/"+key, nil)
	if resp.StatusCode != 404 {
		t.Errorf("delete a deleted template: %d %s", resp.StatusCode, b)
	}
	resp, b = sp.call(t, c, "POST", "/v1/templates/gc", nil)
	wantStatus(t, "templates gc", resp, b, 200)

	resp, b = sp.call(t, c, "DELETE", "/v1/snapshots/s1", nil)
	wantError(t, "delete a snapshot in use", resp, b, 409, "snapshot_in_use")
	resp, b = sp.call(t, c, "DELETE", "/v1/sandboxes/c1", nil)
	wantStatus(t, "delete c1", resp, b, 204)
	if !lt.has("forget c1") {
		t.Errorf("lifetime not forgotten: %v", lt.calls)
	}
	resp, b = sp.call(t, c, "DELETE", "/v1/snapshots/s1", nil)
	wantStatus(t, "delete snapshot", resp, b, 204)
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/c1", nil)
	wantError(t, "deleted", resp, b, 404, "vm_not_found")

	for op, mp := range sp.operations() {
		if !sp.seen[op] {
			t.Errorf("spec operation %s (%s) was not exercised", op, mp)
		}
	}
	time.Sleep(100 * time.Millisecond)
	evMu.Lock()
	defer evMu.Unlock()
	for _, want := range []string{"sandbox.created c1", "sandbox.started c1", "sandbox.paused c1", "sandbox.resumed c1", "sandbox.stopped c1",
		"snapshot.created s1", "snapshot.restored s1", "sandbox.deleted c1", "snapshot.deleted s1"} {
		if !slices.Contains(events, want) {
			t.Errorf("event %q not received; got %v", want, events)
		}
	}
}

package mcpserver_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/mcpserver"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

var (
	bin     string // smolvm built from this tree
	dataDir string
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx := context.Background()
	if _, err := testutil.EnsureImages(ctx, image.Busybox); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	root, err := os.MkdirTemp("/tmp", "smvmcp")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(root)
	dataDir = filepath.Join(root, "data")
	os.Setenv("SMOLVM_RUN_DIR", filepath.Join(root, "run"))
	os.Setenv("SMOLVM_COLD_BOOT", "1") // templates are tested in the root package
	if bin, err = testutil.BuildCommand(ctx, root, "smolvm"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	// Whatever a failed test left running.
	if mg, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dataDir}); err == nil {
		infos, _ := mg.List(ctx)
		for _, i := range infos {
			if vm, err := mg.Open(ctx, i.ID); err == nil {
				vm.Delete(ctx)
				vm.Close()
			}
		}
		mg.Close()
	}
	return code
}

// stdio starts `smolvm mcp` and connects the MCP SDK's client to it.
func stdio(t *testing.T) *mcp.ClientSession {
	t.Helper()
	cmd := exec.Command(bin, "--data-dir", dataDir, "mcp")
	var stderr syncBuffer
	cmd.Stderr = &stderr
	c := mcp.NewClient(&mcp.Implementation{Name: "test", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &mcp.CommandTransport{Command: cmd}, nil)
	if err != nil {
		t.Fatalf("connect to smolvm mcp: %v\nstderr: %s", err, stderr.String())
	}
	t.Cleanup(func() {
		if err := cs.Close(); err != nil {
			t.Logf("close: %v", err)
		}
		if t.Failed() {
			t.Logf("smolvm mcp stderr:\n%s", stderr.String())
		}
	})
	return cs
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// call calls a tool that must succeed and decodes its structured result.
func call[Out any](t *testing.T, cs *mcp.ClientSession, name string, args any) Out {
	t.Helper()
	var out Out
	res := callRaw(t, cs, name, args)
	if res.IsError {
		t.Fatalf("%s %v: error %s", name, args, text(res))
	}
	b, _ := json.Marshal(res.StructuredContent)
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%s: structured content %s: %v", name, b, err)
	}
	// The text content is the same JSON (for clients without structured
	// content).
	var again Out
	if err := json.Unmarshal([]byte(text(res)), &again); err != nil {
		t.Errorf("%s: text content is not the result's JSON: %q", name, text(res))
	}
	return out
}

// callErr calls a tool that must fail and returns its error body.
func callErr(t *testing.T, cs *mcp.ClientSession, name string, args any) mcpserver.ErrorDetail {
	t.Helper()
	res := callRaw(t, cs, name, args)
	if !res.IsError {
		t.Fatalf("%s %v: no error: %s", name, args, text(res))
	}
	var body mcpserver.ErrorBody
	if err := json.Unmarshal([]byte(text(res)), &body); err != nil || body.Error.Code == "" || body.Error.Message == "" {
		t.Fatalf("%s: error text is not {\"error\":{code,message,...}}: %q (%v)", name, text(res), err)
	}
	if res.StructuredContent != nil {
		t.Errorf("%s: an error result carries structured content %v", name, res.StructuredContent)
	}
	return body.Error
}

func callRaw(t *testing.T, cs *mcp.ClientSession, name string, args any) *mcp.CallToolResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := cs.CallTool(ctx, &mcp.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		t.Fatalf("%s: protocol error: %v", name, err)
	}
	return res
}

func text(res *mcp.CallToolResult) string {
	if len(res.Content) != 1 {
		return fmt.Sprintf("<%d content items>", len(res.Content))
	}
	tc, ok := res.Content[0].(*mcp.TextContent)
	if !ok {
		return fmt.Sprintf("<%T>", res.Content[0])
	}
	return tc.Text
}

type obj = map[string]any

func wantCode(t *testing.T, what string, e mcpserver.ErrorDetail, code string, recovery bool) {
	t.Helper()
	if e.Code != code {
		t.Errorf("%s: code %q (%s), want %q", what, e.Code, e.Message, code)
	}
	if recovery && e.Recovery == "" {
		t.Errorf("%s: no recovery text: %+v", what, e)
	}
}

var toolNames = []string{"file_read", "file_write", "sandbox_create", "sandbox_delete", "sandbox_exec", "sandbox_list",
	"sandbox_pause", "sandbox_resume", "snapshot_create", "snapshot_delete", "snapshot_fork", "snapshot_list", "snapshot_restore"}

// TestToolsList: the tools, their descriptions and their schemas as a client
// sees them over stdio.
func TestToolsList(t *testing.T) {
	cs := stdio(t)
	res, err := cs.ListTools(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	byName := map[string]*mcp.Tool{}
	for _, tool := range res.Tools {
		names = append(names, tool.Name)
		byName[tool.Name] = tool
		if len(tool.Description) < 20 {
			t.Errorf("%s: description %q", tool.Name, tool.Description)
		}
		in, _ := tool.InputSchema.(map[string]any)
		out, _ := tool.OutputSchema.(map[string]any)
		if in["type"] != "object" || out["type"] != "object" {
			t.Errorf("%s: input schema %v, output schema %v: want objects", tool.Name, in, out)
		}
		if in["additionalProperties"] == nil {
			t.Errorf("%s: unknown arguments are not refused: %v", tool.Name, in)
		}
	}
	sort.Strings(names)
	if !slices.Equal(names, toolNames) {
		t.Fatalf("tools %v, want %v", names, toolNames)
	}
	prop := func(tool, schema, name string) map[string]any {
		s := byName[tool].InputSchema
		if schema == "out" {
			s = byName[tool].OutputSchema
		}
		p, _ := s.(map[string]any)["properties"].(map[string]any)[name].(map[string]any)
		if p == nil {
			t.Errorf("%s %s schema: no property %q", tool, schema, name)
		}
		return p
	}
	required := func(tool string) []any {
		r, _ := byName[tool].InputSchema.(map[string]any)["required"].([]any)
		return r
	}
	for _, p := range []string{"exit_code", "stdout", "stderr", "ok", "timed_out", "truncated", "duration_ms"} {
		prop("sandbox_exec", "out", p)
	}
	for _, p := range []string{"command", "argv", "cwd", "env", "stdin", "timeout_s", "output_limit"} {
		prop("sandbox_exec", "in", p)
	}
	if r := required("sandbox_exec"); !slices.Equal(r, []any{"sandbox_id"}) {
		t.Errorf("sandbox_exec requires %v", r)
	}
	if max := prop("sandbox_exec", "in", "output_limit")["maximum"]; max != float64(mcpserver.MaxOutputLimit) {
		t.Errorf("output_limit maximum %v", max)
	}
	if max := prop("file_read", "in", "max_bytes")["maximum"]; max != float64(mcpserver.MaxReadBytes) {
		t.Errorf("max_bytes maximum %v", max)
	}
	if !strings.Contains(byName["file_read"].Description, "1 MiB") {
		t.Errorf("file_read does not say its cap: %q", byName["file_read"].Description)
	}
	if e := prop("snapshot_create", "in", "snapshot_type")["enum"]; fmt.Sprint(e) != "[full diff disk]" {
		t.Errorf("snapshot_type enum %v", e)
	}
	if e := prop("file_write", "in", "encoding")["enum"]; fmt.Sprint(e) != "[text base64]" {
		t.Errorf("encoding enum %v", e)
	}
	prop("snapshot_restore", "in", "force")
	prop("snapshot_restore", "in", "resume")
	prop("snapshot_fork", "in", "count")
	prop("snapshot_list", "in", "vm_id")
	if r := required("snapshot_fork"); !slices.Equal(r, []any{"snapshot_id", "count"}) {
		t.Errorf("snapshot_fork requires %v", r)
	}
	if a := byName["sandbox_list"].Annotations; a == nil || !a.ReadOnlyHint {
		t.Errorf("sandbox_list is not marked read-only: %+v", a)
	}
	if a := byName["sandbox_delete"].Annotations; a == nil || a.DestructiveHint == nil || !*a.DestructiveHint {
		t.Errorf("sandbox_delete is not marked destructive: %+v", a)
	}
}

// TestToolErrors: refused arguments and missing things, each with its
// code, message and recovery, and no VM needed.
func TestToolErrors(t *testing.T) {
	cs := stdio(t)
	wantCode(t, "bad id", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": "Bad/ID", "command": "true"}), "invalid_id", false)
	wantCode(t, "bad snapshot id", callErr(t, cs, "snapshot_restore", obj{"snapshot_id": "../x"}), "invalid_id", false)
	wantCode(t, "bad vm_id", callErr(t, cs, "snapshot_list", obj{"vm_id": "A"}), "invalid_id", false)
	wantCode(t, "missing sandbox", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": "nope", "command": "true"}), "vm_not_found", true)
	e0 := callErr(t, cs, "sandbox_pause", obj{"sandbox_id": "nope"})
	wantCode(t, "missing sandbox", e0, "vm_not_found", true)
	// The CLI's words (internal/fixtext), as the HTTP API's recovery.
	if !strings.Contains(e0.Recovery, "smolvm sandbox list") {
		t.Errorf("missing sandbox: recovery %q is not the CLI's words", e0.Recovery)
	}
	e := callErr(t, cs, "snapshot_restore", obj{"snapshot_id": "nope"})
	wantCode(t, "missing snapshot", e, "snapshot_not_found", true)
	if !strings.Contains(e.Recovery, "snapshot") {
		t.Errorf("missing snapshot: recovery %q", e.Recovery)
	}
	wantCode(t, "missing snapshot", callErr(t, cs, "snapshot_delete", obj{"snapshot_id": "nope"}), "snapshot_not_found", true)
	wantCode(t, "missing snapshot", callErr(t, cs, "snapshot_fork", obj{"snapshot_id": "nope", "count": 1}), "snapshot_not_found", true)
	// The input schema refuses before the handler runs.
	wantCode(t, "count 0", callErr(t, cs, "snapshot_fork", obj{"snapshot_id": "s", "count": 0}), "invalid_request", true)
	wantCode(t, "count 65", callErr(t, cs, "snapshot_fork", obj{"snapshot_id": "s", "count": smolvm.MaxClones + 1}), "invalid_request", true)
	wantCode(t, "no sandbox_id", callErr(t, cs, "sandbox_exec", obj{"command": "true"}), "invalid_request", true)
	wantCode(t, "unknown argument", callErr(t, cs, "sandbox_list", obj{"all": true}), "invalid_request", true)
	wantCode(t, "bad type", callErr(t, cs, "snapshot_create", obj{"sandbox_id": "x", "snapshot_type": "memory"}), "invalid_request", true)
	wantCode(t, "timeout", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": "x", "command": "true", "timeout_s": 99999}), "invalid_request", true)
	// The handlers' own checks.
	wantCode(t, "relative path", callErr(t, cs, "file_read", obj{"sandbox_id": "x", "path": "etc/passwd"}), "invalid_config", true)
	wantCode(t, "NUL in path", callErr(t, cs, "file_write", obj{"sandbox_id": "x", "path": "/a\x00b", "content": ""}), "invalid_config", true)
	wantCode(t, "command and argv", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": "x", "command": "true", "argv": []string{"true"}}), "invalid_config", true)
	wantCode(t, "neither", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": "x"}), "invalid_config", true)
	wantCode(t, "env name", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": "x", "command": "true", "env": obj{"A=B": "1"}}), "invalid_config", true)
	wantCode(t, "base64", callErr(t, cs, "file_write", obj{"sandbox_id": "x", "path": "/a", "content": "%%%", "encoding": "base64"}), "invalid_config", true)
	wantCode(t, "mode", callErr(t, cs, "file_write", obj{"sandbox_id": "x", "path": "/a", "content": "", "mode": "0999"}), "invalid_request", true)
	big := base64.StdEncoding.EncodeToString(make([]byte, mcpserver.MaxWriteBytes+1))
	wantCode(t, "oversize write", callErr(t, cs, "file_write", obj{"sandbox_id": "x", "path": "/a", "content": big, "encoding": "base64"}), "invalid_config", true)
	wantCode(t, "bad cidr", callErr(t, cs, "sandbox_create", obj{"allow_cidrs": []string{"10.0.0.0/99"}}), "invalid_config", true)
	if l := call[mcpserver.Sandboxes](t, cs, "sandbox_list", obj{}); len(l.Sandboxes) != 0 {
		t.Errorf("refused creates left sandboxes: %+v", l)
	}
}

// httpServer serves HTTPHandler on 127.0.0.1 with a Manager of its own on
// the tests' data dir.
func httpServer(t *testing.T) *httptest.Server {
	mg, err := smolvm.NewManager(context.Background(), smolvm.Options{DataDir: dataDir})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(mcpserver.HTTPHandler(mg, "test"))
	t.Cleanup(func() {
		srv.Close()
		mg.Close()
	})
	return srv
}

// TestHTTPRefusals: the HTTP handler refuses cross-origin browser requests
// and, on loopback, foreign Host headers (DNS rebinding).
func TestHTTPRefusals(t *testing.T) {
	srv := httpServer(t)
	body := `{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"x","version":"1"}}}`
	for name, set := range map[string]func(*http.Request){
		"cross-origin": func(r *http.Request) {
			r.Header.Set("Origin", "http://evil.example")
			r.Header.Set("Sec-Fetch-Site", "cross-site")
		},
		"rebinding": func(r *http.Request) { r.Host = "evil.example" },
		"none":      func(*http.Request) {},
	} {
		req, _ := http.NewRequest("POST", srv.URL, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		set(req)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if want := map[bool]int{true: 200, false: 403}[name == "none"]; resp.StatusCode != want {
			t.Errorf("%s: status %d, want %d", name, resp.StatusCode, want)
		}
	}
}

// TestSandboxFlow drives one real VM through every tool over stdio, and the
// same VM through HTTPHandler with the SDK's streamable client.
func TestSandboxFlow(t *testing.T) {
	cs := stdio(t)
	const id, snap = "mcp1", "mcp1-snap"
	sb := call[mcpserver.Sandbox](t, cs, "sandbox_create", obj{"name": id, "image": "busybox", "memory_mib": 256, "no_network": true})
	if sb.ID != id || sb.Status != "running" || sb.MemoryMiB != 256 || sb.Network {
		t.Fatalf("create: %+v", sb)
	}
	wantCode(t, "create twice", callErr(t, cs, "sandbox_create", obj{"name": id, "image": "busybox", "no_network": true}), "vm_exists", true)
	if l := call[mcpserver.Sandboxes](t, cs, "sandbox_list", nil); len(l.Sandboxes) != 1 || l.Sandboxes[0].ID != id {
		t.Errorf("list: %+v", l)
	}

	exec := func(args obj) mcpserver.ExecOutput {
		t.Helper()
		args["sandbox_id"] = id
		return call[mcpserver.ExecOutput](t, cs, "sandbox_exec", args)
	}
	r := exec(obj{"command": "echo hi; echo err >&2; exit 3"})
	if r.ExitCode != 3 || r.Stdout != "hi\n" || r.Stderr != "err\n" || r.OK || r.TimedOut || r.Truncated {
		t.Errorf("exec: %+v", r)
	}
	if r = exec(obj{"argv": []string{"printf", "%s|%s", "a b", "$HOME"}}); r.Stdout != "a b|$HOME" || !r.OK {
		t.Errorf("exec argv: %+v", r)
	}
	if r = exec(obj{"command": "cat; echo $X; pwd", "stdin": "piped\n", "env": obj{"X": "x1"}, "cwd": "/tmp"}); r.Stdout != "piped\nx1\n/tmp\n" {
		t.Errorf("exec stdin/env/cwd: %+v", r)
	}
	if r = exec(obj{"command": "head -c 100 /dev/zero | tr '\\0' a", "output_limit": 10}); r.Stdout != "aaaaaaaaaa" || !r.Truncated || !r.OK {
		t.Errorf("exec output_limit: %+v", r)
	}
	start := time.Now()
	if r = exec(obj{"command": "sleep 30", "timeout_s": 1}); !r.TimedOut || r.OK {
		t.Errorf("exec timeout: %+v", r)
	}
	if el := time.Since(start); el > 10*time.Second {
		t.Errorf("a 1 s timeout returned after %v", el)
	}

	w := call[mcpserver.FileWriteOutput](t, cs, "file_write", obj{"sandbox_id": id, "path": "/root/dir/a.txt", "content": "v1 ✓", "mode": "0600"})
	if w.Size != len("v1 ✓") {
		t.Errorf("write: %+v", w)
	}
	f := call[mcpserver.FileReadOutput](t, cs, "file_read", obj{"sandbox_id": id, "path": "/root/dir/a.txt"})
	if f.Content != "v1 ✓" || f.Encoding != "text" || f.Mode != "0600" || f.Truncated || f.Size != w.Size {
		t.Errorf("read: %+v", f)
	}
	raw := []byte{0xff, 0, 1, 'x'}
	call[mcpserver.FileWriteOutput](t, cs, "file_write", obj{"sandbox_id": id, "path": "/root/b.bin", "content": base64.StdEncoding.EncodeToString(raw), "encoding": "base64"})
	f = call[mcpserver.FileReadOutput](t, cs, "file_read", obj{"sandbox_id": id, "path": "/root/b.bin"})
	if got, _ := base64.StdEncoding.DecodeString(f.Content); f.Encoding != "base64" || !bytes.Equal(got, raw) || f.Mode != "0644" {
		t.Errorf("read binary: %+v", f)
	}
	if f = call[mcpserver.FileReadOutput](t, cs, "file_read", obj{"sandbox_id": id, "path": "/root/dir/a.txt", "max_bytes": 2}); f.Content != "v1" || !f.Truncated || f.Size != 2 {
		t.Errorf("read max_bytes 2: %+v", f)
	}
	if e := callErr(t, cs, "file_read", obj{"sandbox_id": id, "path": "/root/missing"}); !strings.Contains(e.Message, "missing") {
		t.Errorf("read missing file: %+v", e)
	}

	s := call[mcpserver.Snapshot](t, cs, "snapshot_create", obj{"sandbox_id": id, "snapshot_id": snap, "resume_source": true})
	if s.ID != snap || s.VMID != id || s.Type != "full" || s.Restored || s.SizeBytes <= 0 {
		t.Errorf("snapshot: %+v", s)
	}
	wantCode(t, "snapshot twice", callErr(t, cs, "snapshot_create", obj{"sandbox_id": id, "snapshot_id": snap}), "snapshot_exists", true)
	call[mcpserver.FileWriteOutput](t, cs, "file_write", obj{"sandbox_id": id, "path": "/root/dir/a.txt", "content": "v2"})
	sb = call[mcpserver.Sandbox](t, cs, "snapshot_restore", obj{"snapshot_id": snap, "resume": true})
	if sb.ID != id || sb.Status != "running" || sb.RestoredFrom != snap {
		t.Errorf("restore: %+v", sb)
	}
	if r = exec(obj{"command": "cat /root/dir/a.txt"}); r.Stdout != "v1 ✓" {
		t.Errorf("after restore: %+v", r)
	}
	e := callErr(t, cs, "snapshot_restore", obj{"snapshot_id": snap})
	wantCode(t, "restore twice", e, "snapshot_already_restored", true)
	if !strings.Contains(strings.ToLower(e.Recovery), "force") {
		t.Errorf("restore twice: recovery %q does not mention force", e.Recovery)
	}

	clones := call[mcpserver.Sandboxes](t, cs, "snapshot_fork", obj{"snapshot_id": snap, "count": 2})
	if len(clones.Sandboxes) != 2 || clones.Sandboxes[0].ID == clones.Sandboxes[1].ID {
		t.Fatalf("fork: %+v", clones)
	}
	c0 := clones.Sandboxes[0]
	if c0.Status != "paused" || c0.ID == id || c0.RestoredFrom != snap {
		t.Errorf("clone: %+v", c0)
	}
	if sb = call[mcpserver.Sandbox](t, cs, "sandbox_resume", obj{"sandbox_id": c0.ID}); sb.Status != "running" {
		t.Errorf("resume clone: %+v", sb)
	}
	cr := call[mcpserver.ExecOutput](t, cs, "sandbox_exec", obj{"sandbox_id": c0.ID, "command": "cat /root/dir/a.txt; echo; hostname"})
	if cr.Stdout != "v1 ✓\n"+c0.ID+"\n" {
		t.Errorf("clone exec: %+v", cr)
	}
	l := call[mcpserver.Snapshots](t, cs, "snapshot_list", obj{"vm_id": id})
	if len(l.Snapshots) != 1 || l.Snapshots[0].ID != snap || !l.Snapshots[0].Restored || l.Snapshots[0].RestoredVMID != id {
		t.Errorf("snapshot_list: %+v", l)
	}
	if l = call[mcpserver.Snapshots](t, cs, "snapshot_list", obj{"vm_id": "other"}); len(l.Snapshots) != 0 {
		t.Errorf("snapshot_list of another vm: %+v", l)
	}
	wantCode(t, "delete snapshot in use", callErr(t, cs, "snapshot_delete", obj{"snapshot_id": snap}), "snapshot_in_use", true)
	for _, c := range clones.Sandboxes {
		if d := call[mcpserver.Deleted](t, cs, "sandbox_delete", obj{"sandbox_id": c.ID}); d.Deleted != c.ID {
			t.Errorf("delete clone: %+v", d)
		}
	}

	t.Run("HTTP", func(t *testing.T) { httpClient(t, id) })

	if sb = call[mcpserver.Sandbox](t, cs, "sandbox_pause", obj{"sandbox_id": id}); sb.Status != "paused" {
		t.Errorf("pause: %+v", sb)
	}
	wantCode(t, "exec while paused", callErr(t, cs, "sandbox_exec", obj{"sandbox_id": id, "command": "true"}), "vm_not_running", true)
	if sb = call[mcpserver.Sandbox](t, cs, "sandbox_resume", obj{"sandbox_id": id}); sb.Status != "running" {
		t.Errorf("resume: %+v", sb)
	}
	if r = exec(obj{"command": "echo back"}); r.Stdout != "back\n" {
		t.Errorf("exec after resume: %+v", r)
	}
	call[mcpserver.Deleted](t, cs, "sandbox_delete", obj{"sandbox_id": id})
	wantCode(t, "delete twice", callErr(t, cs, "sandbox_delete", obj{"sandbox_id": id}), "vm_not_found", true)
	if d := call[mcpserver.Deleted](t, cs, "snapshot_delete", obj{"snapshot_id": snap}); d.Deleted != snap {
		t.Errorf("snapshot_delete: %+v", d)
	}
	if l = call[mcpserver.Snapshots](t, cs, "snapshot_list", obj{}); len(l.Snapshots) != 0 {
		t.Errorf("snapshots left: %+v", l)
	}
	if sl := call[mcpserver.Sandboxes](t, cs, "sandbox_list", obj{}); len(sl.Sandboxes) != 0 {
		t.Errorf("sandboxes left: %+v", sl)
	}
}

// httpClient: HTTPHandler on 127.0.0.1 through the SDK's streamable client,
// on the running sandbox id (shared with the stdio session: same store).
func httpClient(t *testing.T, id string) {
	srv := httpServer(t)
	c := mcp.NewClient(&mcp.Implementation{Name: "test-http", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &mcp.StreamableClientTransport{Endpoint: srv.URL, MaxRetries: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	if got := cs.InitializeResult().ServerInfo; got.Name != mcpserver.Name || got.Version != "test" {
		t.Errorf("server info %+v", got)
	}
	tools, err := cs.ListTools(context.Background(), nil)
	if err != nil || len(tools.Tools) != len(toolNames) {
		t.Fatalf("tools over HTTP: %v, %v", tools, err)
	}
	if l := call[mcpserver.Sandboxes](t, cs, "sandbox_list", obj{}); len(l.Sandboxes) != 1 || l.Sandboxes[0].ID != id {
		t.Errorf("list over HTTP: %+v", l)
	}
	if r := call[mcpserver.ExecOutput](t, cs, "sandbox_exec", obj{"sandbox_id": id, "command": "echo via-http; cat /root/dir/a.txt"}); r.Stdout != "via-http\nv1 ✓" || !r.OK {
		t.Errorf("exec over HTTP: %+v", r)
	}
	wantCode(t, "missing snapshot over HTTP", callErr(t, cs, "snapshot_restore", obj{"snapshot_id": "nope"}), "snapshot_not_found", true)
}

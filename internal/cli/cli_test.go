package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

var (
	dataDir string
	runDir  string
)

func TestMain(m *testing.M) {
	if _, err := testutil.EnsureImages(context.Background(), image.Busybox); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	root, _ := os.MkdirTemp("/tmp", "smvc")
	dataDir, runDir = filepath.Join(root, "data"), filepath.Join(root, "run")
	os.Setenv("SMOLVM_RUN_DIR", runDir)
	os.Setenv("SMOLVM_COLD_BOOT", "1") // templates are tested in the root package (template_test.go)
	code := m.Run()
	Main([]string{"--data-dir", dataDir, "sandbox", "delete", "--all"}, &bytes.Buffer{}, &bytes.Buffer{})
	os.RemoveAll(root)
	if built.bin != "" {
		os.RemoveAll(filepath.Dir(built.bin))
	}
	os.Exit(code)
}

// smolvm runs the CLI in-process and returns stdout, stderr, exit code.
func cli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := Main(append([]string{"--data-dir", dataDir}, args...), &out, &errb)
	return out.String(), errb.String(), code
}

type envelope struct {
	OK       bool            `json:"ok"`
	Command  string          `json:"command"`
	ExitCode int             `json:"exit_code"`
	Data     json.RawMessage `json:"data"`
	Error    *struct {
		Code, Message, Recovery string
	} `json:"error"`
}

func smolvmJSON(t *testing.T, args ...string) envelope {
	t.Helper()
	out, stderr, code := cli(t, append([]string{"--json"}, args...)...)
	var env envelope
	if err := json.Unmarshal([]byte(out), &env); err != nil {
		t.Fatalf("smolvm %v --json: not one JSON object: %v\nstdout: %s\nstderr: %s", args, err, out, stderr)
	}
	if env.ExitCode != code {
		t.Errorf("envelope exit_code %d, process exit %d", env.ExitCode, code)
	}
	return env
}

func TestSandboxCLI(t *testing.T) {
	env := smolvmJSON(t, "sandbox", "create", "--name", "cli1", "--image", "busybox", "--allow-domain", "deb.debian.org", "--allow-cidr", "127.0.0.1/32")
	if !env.OK || env.Command != "sandbox create" {
		t.Fatalf("create: %+v %s", env, env.Data)
	}
	defer cli(t, "sandbox", "delete", "cli1")

	out, stderr, code := cli(t, "sandbox", "exec", "cli1", "--", "echo hi; echo oops >&2; exit 4")
	if out != "hi\n" || stderr != "oops\n" || code != 4 {
		t.Errorf("exec: %q %q %d", out, stderr, code)
	}
	out, _, code = cli(t, "sandbox", "exec", "cli1", "--", "printf", "%s-%s", "a b", "c")
	if out != "a b-c" || code != 0 {
		t.Errorf("exec argv: %q %d", out, code)
	}
	env = smolvmJSON(t, "sandbox", "exec", "cli1", "--", "exit 3")
	if env.OK || env.ExitCode != 3 || env.Error != nil {
		t.Errorf("exec --json exit 3: %+v", env)
	}
	start := time.Now()
	_, stderr, code = cli(t, "sandbox", "exec", "cli1", "--timeout", "2s", "--", "sleep", "60")
	if el := time.Since(start); code != 124 || !strings.Contains(stderr, "timed out") || el > 5*time.Second {
		t.Errorf("timeout: exit %d after %v, %q; want 124 within 5 s", code, el, stderr)
	}
	// Output past the capture limit: cut and flagged in --json, streamed
	// in full (with a notice) in text mode.
	env = smolvmJSON(t, "sandbox", "exec", "cli1", "--", "head -c 5000000 /dev/zero")
	var res struct {
		Stdout    string `json:"stdout"`
		Truncated bool   `json:"truncated"`
	}
	json.Unmarshal(env.Data, &res)
	if !env.OK || !res.Truncated || len(res.Stdout) != 4<<20 {
		t.Errorf("exec --json of 5 MB: ok %v, truncated %v, %d bytes kept", env.OK, res.Truncated, len(res.Stdout))
	}
	out, stderr, code = cli(t, "sandbox", "exec", "cli1", "--", "head -c 5000000 /dev/zero")
	if len(out) != 5000000 || code != 0 || !strings.Contains(stderr, "capture limit") {
		t.Errorf("exec of 5 MB: %d bytes, exit %d, %q", len(out), code, stderr)
	}
	t.Run("interactive", func(t *testing.T) { testInteractiveCLI(t, "cli1") })

	f := filepath.Join(t.TempDir(), "f.txt")
	os.WriteFile(f, []byte("file-data"), 0o640)
	if _, e, c := cli(t, "sandbox", "file", "upload", "cli1", f, "/root/f.txt"); c != 0 {
		t.Fatalf("upload: %s", e)
	}
	back := filepath.Join(t.TempDir(), "back.txt")
	if _, e, c := cli(t, "sandbox", "file", "download", "cli1", "/root/f.txt", back); c != 0 {
		t.Fatalf("download: %s", e)
	}
	if b, _ := os.ReadFile(back); string(b) != "file-data" {
		t.Errorf("downloaded %q", b)
	}
	// The guest's mode arrives masked by the umask, without setuid.
	if _, e, c := cli(t, "sandbox", "exec", "cli1", "--", "cp /root/f.txt /root/suid && chmod 4777 /root/suid"); c != 0 {
		t.Fatalf("chmod: %s", e)
	}
	old := syscall.Umask(0o022)
	_, e, c := cli(t, "sandbox", "file", "download", "cli1", "/root/suid", back)
	syscall.Umask(old)
	if st, err := os.Stat(back); c != 0 || err != nil {
		t.Errorf("download: %v %s", err, e)
	} else if st.Mode() != 0o755 {
		t.Errorf("download of a 4777 guest file under umask 022: mode %v, want -rwxr-xr-x", st.Mode())
	}

	for _, step := range [][]string{{"pause"}, {"resume"}, {"stop"}, {"start"}} {
		if _, e, c := cli(t, append([]string{"sandbox"}, append(step, "cli1")...)...); c != 0 {
			t.Fatalf("%v: %s", step, e)
		}
	}
	if out, _, _ := cli(t, "sandbox", "exec", "cli1", "--", "cat /root/f.txt"); out != "file-data" {
		t.Errorf("after stop/start: %q", out)
	}
	// The allow-list survives stop/start; a refused connection shows in info.
	if _, _, code := cli(t, "sandbox", "exec", "cli1", "--", "nc -w 5 203.0.113.1 80 </dev/null"); code == 0 {
		t.Error("the guest reached 203.0.113.1 outside its allow-list")
	}
	if out, _, _ := cli(t, "sandbox", "info", "cli1"); !strings.Contains(out, "allowlist domain:deb.debian.org cidr:127.0.0.1/32") ||
		!strings.Contains(out, "tcp 203.0.113.1:80: not in allow-list") {
		t.Errorf("info lacks the policy or the refusal:\n%s", out)
	}
	env = smolvmJSON(t, "sandbox", "info", "cli1")
	var info struct {
		ID, Status string
	}
	json.Unmarshal(env.Data, &info)
	if info.ID != "cli1" || info.Status != "running" {
		t.Errorf("info: %s", env.Data)
	}
	if out, _, _ := cli(t, "sandbox", "list"); !strings.Contains(out, "cli1") || !strings.Contains(out, "running") {
		t.Errorf("list: %q", out)
	}
	if out, _, _ := cli(t, "sandbox", "logs", "cli1"); !strings.Contains(out, "SMOLVM-AGENT READY") {
		t.Errorf("logs lack the agent's ready line: %q", out)
	}
}

func TestSnapshotCLI(t *testing.T) {
	if env := smolvmJSON(t, "sandbox", "create", "--name", "snapcli", "--image", "busybox", "--no-network"); !env.OK {
		t.Fatalf("create: %+v", env)
	}
	defer cli(t, "sandbox", "delete", "snapcli")
	cli(t, "sandbox", "exec", "snapcli", "--", "echo v1 > /tmp/mem")
	env := smolvmJSON(t, "sandbox", "snapshot", "create", "snapcli", "--snapshot-id", "cp1", "--snapshot-type", "diff", "--resume-source")
	var snap struct {
		ID   string `json:"snapshot_id"`
		Type string `json:"snapshot_type"`
		Size int64  `json:"size_bytes"`
	}
	json.Unmarshal(env.Data, &snap)
	if !env.OK || snap.ID != "cp1" || snap.Type != "diff" || snap.Size <= 0 {
		t.Fatalf("snapshot create: %+v %s", env, env.Data)
	}
	cli(t, "sandbox", "exec", "snapcli", "--", "echo v2 > /tmp/mem")
	if env := smolvmJSON(t, "sandbox", "snapshot", "create", "snapcli", "--snapshot-id", "cp1"); env.OK || env.Error.Code != "snapshot_exists" {
		t.Errorf("duplicate: %+v", env)
	}
	// Two processes create the same id at once: exactly one snapshot, the
	// other process is told it exists, and nothing half-written is left.
	bin := cliBinary(t)
	results := make([]envelope, 2)
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() {
			out, _ := exec.Command(bin, "--data-dir", dataDir, "--json", "sandbox", "snapshot", "create", "snapcli",
				"--snapshot-id", "race1", "--resume-source").Output()
			if err := json.Unmarshal(out, &results[i]); err != nil {
				t.Errorf("process %d: %v: %q", i, err, out)
			}
		})
	}
	wg.Wait()
	if ok0, ok1 := results[0].OK, results[1].OK; ok0 == ok1 {
		t.Errorf("concurrent creates of one id: ok %v and %v, want exactly one: %+v %+v", ok0, ok1, results[0], results[1])
	}
	for _, r := range results {
		if !r.OK && (r.Error == nil || r.Error.Code != "snapshot_exists") {
			t.Errorf("the losing create: %+v", r)
		}
	}
	if out, _, _ := cli(t, "sandbox", "snapshot", "list", "--vm-id", "snapcli"); strings.Count(out, "race1") != 1 {
		t.Errorf("list after the race: %q", out)
	}
	if ents, _ := os.ReadDir(filepath.Join(dataDir, "snapshots")); len(ents) > 0 {
		for _, e := range ents {
			if strings.Contains(e.Name(), ".tmp-") || strings.HasPrefix(e.Name(), ".trash-") {
				t.Errorf("left in the snapshot dir: %s", e.Name())
			}
		}
	}
	if env := smolvmJSON(t, "sandbox", "snapshot", "delete", "race1"); !env.OK {
		t.Errorf("delete race1: %+v", env)
	}
	if env := smolvmJSON(t, "sandbox", "snapshot", "create", "snapcli", "--snapshot-id", "Bad/Id"); env.OK || env.Error.Code != "invalid_id" || env.ExitCode != 2 {
		t.Errorf("bad id: %+v", env)
	}
	if env := smolvmJSON(t, "sandbox", "snapshot", "create", "snapcli", "--snapshot-type", "ram"); env.OK || env.Error.Code != "invalid_config" {
		t.Errorf("bad type: %+v", env)
	}
	out, _, _ := cli(t, "sandbox", "snapshot", "list", "--vm-id", "snapcli")
	if !strings.Contains(out, "cp1") || !strings.Contains(out, "diff") {
		t.Errorf("list: %q", out)
	}
	env = smolvmJSON(t, "sandbox", "snapshot", "restore", "cp1", "--resume")
	if !env.OK {
		t.Fatalf("restore: %+v", env)
	}
	if out, _, _ := cli(t, "sandbox", "exec", "snapcli", "--", "cat /tmp/mem"); out != "v1\n" {
		t.Errorf("restored memory state: %q", out)
	}
	env = smolvmJSON(t, "sandbox", "snapshot", "restore", "cp1")
	if env.OK || env.Error.Code != "snapshot_already_restored" || !strings.Contains(env.Error.Recovery, "--force") {
		t.Errorf("second restore: %+v", env)
	}
	cli(t, "sandbox", "exec", "snapcli", "--", "echo v3 > /tmp/mem")
	if env := smolvmJSON(t, "sandbox", "snapshot", "restore", "cp1", "--resume", "--force"); !env.OK {
		t.Fatalf("forced restore: %+v", env)
	}
	if out, _, _ := cli(t, "sandbox", "exec", "snapcli", "--", "cat /tmp/mem"); out != "v1\n" {
		t.Errorf("after forced restore: %q", out)
	}
	env = smolvmJSON(t, "sandbox", "snapshot", "restore", "cp1", "--clones", "2", "--resume")
	var clones []struct{ ID, Status string }
	json.Unmarshal(env.Data, &clones)
	if !env.OK || len(clones) != 2 {
		t.Fatalf("fork: %+v %s", env, env.Data)
	}
	for _, c := range clones {
		if out, _, _ := cli(t, "sandbox", "exec", c.ID, "--", "hostname; cat /tmp/mem"); out != c.ID+"\nv1\n" {
			t.Errorf("clone %s: %q", c.ID, out)
		}
		cli(t, "sandbox", "delete", c.ID)
	}
	if env := smolvmJSON(t, "sandbox", "snapshot", "restore", "cp1", "--clones", "0"); env.OK || env.Error.Code != "invalid_config" {
		t.Errorf("--clones 0: %+v", env)
	}
	if env := smolvmJSON(t, "sandbox", "snapshot", "delete", "cp1"); env.OK || env.Error.Code != "snapshot_in_use" {
		t.Errorf("delete in use: %+v", env)
	}
	env = smolvmJSON(t, "sandbox", "snapshot", "inspect", "cp1", "--verify")
	var inspected struct {
		Restored bool `json:"restored"`
	}
	if !env.OK || json.Unmarshal(env.Data, &inspected) != nil || !inspected.Restored {
		t.Errorf("inspect: %+v %s", env, env.Data)
	}
	cli(t, "sandbox", "stop", "snapcli")
	if env := smolvmJSON(t, "sandbox", "snapshot", "delete", "cp1"); !env.OK {
		t.Errorf("delete: %+v", env)
	}
	if env := smolvmJSON(t, "sandbox", "snapshot", "inspect", "cp1"); env.Error == nil || env.Error.Code != "snapshot_not_found" {
		t.Errorf("inspect deleted: %+v", env)
	}
}

func TestErrorsNameTheFix(t *testing.T) {
	cases := []struct {
		args     []string
		code     string
		recovery string
	}{
		{[]string{"sandbox", "exec", "nope", "--", "true"}, "vm_not_found", "smolvm sandbox list --all"},
		{[]string{"sandbox", "create", "--name", "UPPER"}, "invalid_id", ""},
		{[]string{"sandbox", "create", "--memory", "1"}, "invalid_config", "--memory 512"},
		{[]string{"sandbox", "create", "--image", "nope"}, "invalid_config", "--image debian"},
		{[]string{"sandbox", "create", "--allow-cidr", "nope"}, "invalid_config", "--allow-cidr"},
		{[]string{"sandbox", "create", "--allow-domain", "*"}, "invalid_config", "--allow-domain"},
		{[]string{"sandbox", "snapshot", "restore", "missing"}, "snapshot_not_found", "smolvm sandbox snapshot list"},
		{[]string{"image", "rm", "nope"}, "", ""},
	}
	for _, c := range cases {
		env := smolvmJSON(t, c.args...)
		if env.OK || env.Error == nil || env.ExitCode == 0 {
			t.Errorf("%v: %+v", c.args, env)
			continue
		}
		if c.code != "" && env.Error.Code != c.code {
			t.Errorf("%v: code %q, want %q (%s)", c.args, env.Error.Code, c.code, env.Error.Message)
		}
		if !strings.Contains(env.Error.Recovery, c.recovery) {
			t.Errorf("%v: recovery %q lacks %q", c.args, env.Error.Recovery, c.recovery)
		}
	}
	if _, stderr, code := cli(t, "sandbox", "exec", "nope", "--", "true"); code == 0 || !strings.Contains(stderr, "fix:") {
		t.Errorf("human error: %d %q", code, stderr)
	}
	// Nothing left behind by the failed creates.
	out, _, _ := cli(t, "sandbox", "list", "--all")
	if strings.Contains(out, "UPPER") || len(strings.Split(strings.TrimSpace(out), "\n")) > 1 && strings.Contains(out, "created") {
		t.Errorf("failed creates left records: %q", out)
	}
}

// TestCreateKilled kills `smolvm sandbox create` with SIGKILL while it
// boots: the VM must be visible in `list --all`, and `delete` must remove
// it and its QEMU process.
var built struct {
	once sync.Once
	bin  string
	err  error
}

// cliBinary builds cmd/smolvm once per test process, for tests that need
// the CLI as separate processes.
func cliBinary(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		dir, err := os.MkdirTemp("", "smolvm-cli-")
		if err != nil {
			built.err = err
			return
		}
		built.bin = filepath.Join(dir, "smolvm")
		if out, err := exec.Command("go", "build", "-o", built.bin, "../../cmd/smolvm").CombinedOutput(); err != nil {
			built.err = fmt.Errorf("build: %v\n%s", err, out)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.bin
}

func TestCreateKilled(t *testing.T) {
	bin := cliBinary(t)
	cmd := exec.Command(bin, "--data-dir", dataDir, "sandbox", "create", "--name", "killed", "--image", "busybox")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill it once QEMU is up but before the agent answers.
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && len(qemuFor("killed")) == 0 {
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if len(qemuFor("killed")) == 0 {
		t.Log("qemu had not started when the CLI was killed")
	}
	out, _, _ := cli(t, "sandbox", "list", "--all")
	if !strings.Contains(out, "killed") {
		t.Fatalf("list --all does not show the interrupted VM:\n%s", out)
	}
	if _, e, c := cli(t, "sandbox", "delete", "killed"); c != 0 {
		t.Fatalf("delete: %s", e)
	}
	time.Sleep(200 * time.Millisecond)
	if p := qemuFor("killed"); len(p) > 0 {
		t.Errorf("orphan qemu after delete: %v", p)
	}
	if out, _, _ := cli(t, "sandbox", "list", "--all"); strings.Contains(out, "killed") {
		t.Errorf("still listed: %s", out)
	}
}

// qemuFor returns pids of QEMU processes of the VM named id in this test's data dir.
func qemuFor(id string) []string {
	out, _ := exec.Command("pgrep", "-f", "qemu-system.*"+filepath.Join(dataDir, "vms", id)).Output()
	return strings.Fields(string(out))
}

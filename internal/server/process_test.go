package server

import (
	"bufio"
	"bytes"
	"context"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// serveProc is `smolvm serve` as a subprocess.
type serveProc struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan error
}

func startServe(t *testing.T, bin, dataDir, sock string) *serveProc {
	t.Helper()
	cmd := exec.Command(bin, "--data-dir", dataDir, "serve", "--socket", sock)
	p := &serveProc{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-p.done
		}
	})
	c := unixClient(sock)
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := c.Get("http://smolvm/v1/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		select {
		case err := <-p.done:
			t.Fatalf("smolvm serve exited: %v\n%s", err, p.stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("smolvm serve did not answer in 30 s\n%s", p.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *serveProc) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-p.done:
		return err
	case <-time.After(40 * time.Second):
		t.Fatalf("smolvm serve did not exit\n%s", p.stderr)
		return nil
	}
}

// TestServeProcess runs `smolvm serve` as a subprocess: a second one on the
// same data dir is refused; SIGKILL in the middle of a snapshot leaves a
// state the next start reconciles (no half snapshot listed or left on
// disk, the sandbox usable); SIGTERM shuts down gracefully, leaving the
// sandbox running, and a restarted daemon serves it.
func TestServeProcess(t *testing.T) {
	t.Parallel()
	needImages(t)
	ctx := context.Background()
	t0 := time.Now()
	bin, err := testutil.BuildCommand(ctx, t.TempDir(), "smolvm")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built smolvm in %v", time.Since(t0).Round(time.Millisecond))
	dataDir := t.TempDir()
	sock := filepath.Join(testutil.ShortDir(t), "api.sock")
	sp := loadSpec(t)
	c := unixClient(sock)
	t.Cleanup(func() {
		m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dataDir, Logger: quietLogger()})
		if err == nil {
			if vm, err := m.Open(ctx, "k1"); err == nil {
				vm.Delete(ctx)
			}
			m.Close()
		}
	})

	p := startServe(t, bin, dataDir, sock)
	// One daemon per data dir.
	out, err := exec.Command(bin, "--data-dir", dataDir, "serve", "--socket", sock+"2").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "pid "+itoa(p.cmd.Process.Pid)) {
		t.Errorf("second daemon: %v\n%s", err, out)
	}

	resp, b := sp.call(t, c, "POST", "/v1/sandboxes", jsonBody(map[string]any{"name": "k1", "image": "busybox", "memory_mib": 256}))
	wantStatus(t, "create", resp, b, 201)

	// SIGKILL mid-snapshot: once its temp dir is made, before it is published.
	req, _ := http.NewRequest("POST", "http://smolvm/v1/sandboxes/k1/snapshots", jsonBody(map[string]any{"snapshot_id": "ks1"}))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/x-ndjson")
	sresp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(sresp.Body)
	killed := false
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("snapshot progress ended before the kill: %v", err)
		}
		if strings.Contains(line, `"type":"result"`) {
			t.Fatalf("the snapshot finished before the kill: %s", line)
		}
		if strings.Contains(line, "make temp dir") {
			p.cmd.Process.Signal(syscall.SIGKILL)
			killed = true
			break
		}
	}
	sresp.Body.Close()
	if !killed {
		t.Fatal("no kill")
	}
	p.wait(t)

	p = startServe(t, bin, dataDir, sock)
	resp, b = sp.call(t, c, "GET", "/v1/snapshots", nil)
	wantStatus(t, "list after kill", resp, b, 200)
	listed := map[string]bool{}
	for _, s := range decodeAs[struct{ Snapshots []smolvm.SnapshotInfo }](t, b).Snapshots {
		listed[s.ID] = true
		for _, a := range []string{s.Artifacts.State, s.Artifacts.Memory, s.Artifacts.Disk} {
			if a == "" {
				continue
			}
			if _, err := os.Stat(a); err != nil {
				t.Errorf("listed snapshot %s lacks %s", s.ID, a)
			}
		}
	}
	entries, _ := os.ReadDir(filepath.Join(dataDir, "snapshots"))
	for _, e := range entries {
		if !listed[e.Name()] && !strings.HasPrefix(e.Name(), "tmpl-") {
			t.Errorf("snapshot dir %s left on disk, not listed (listed: %v)", e.Name(), listed)
		}
	}
	resp, b = sp.call(t, c, "GET", "/v1/snapshots/ks1", nil)
	if listed["ks1"] != (resp.StatusCode == 200) {
		t.Errorf("list and get disagree on ks1: %v, %d", listed["ks1"], resp.StatusCode)
	}
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/k1", nil)
	wantStatus(t, "k1 after kill", resp, b, 200)
	info := decodeAs[smolvm.Info](t, b)
	t.Logf("after SIGKILL mid-snapshot and a restart: snapshots listed %v, k1 %s", listed, info.Status)
	if info.Status == smolvm.StatusPaused {
		resp, b = sp.call(t, c, "POST", "/v1/sandboxes/k1/resume", nil)
		wantStatus(t, "resume k1", resp, b, 200)
	} else if info.Status != smolvm.StatusRunning {
		t.Fatalf("k1 after the kill: %s (%s)", info.Status, info.LastError)
	}
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/k1/exec", jsonBody(map[string]any{"command": "echo ok"}))
	if r := decodeAs[ExecResult](t, b); r.Stdout != "ok\n" {
		t.Fatalf("exec after the kill: %s", b)
	}
	// The snapshot id is free again (or taken by a complete snapshot).
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/k1/snapshots", jsonBody(map[string]any{"snapshot_id": "ks1", "resume_source": true}))
	if !listed["ks1"] {
		wantStatus(t, "snapshot again", resp, b, 201)
	}

	// Graceful shutdown: the sandbox keeps running.
	resp, b = sp.call(t, c, "GET", "/v1/sandboxes/k1", nil)
	pid := decodeAs[smolvm.Info](t, b).PID
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.wait(t); err != nil {
		t.Errorf("SIGTERM: exit %v\n%s", err, p.stderr)
	}
	if pid == 0 || syscall.Kill(pid, 0) != nil {
		t.Fatalf("the VMM (pid %d) did not survive the daemon's shutdown", pid)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after shutdown: %v", err)
	}
	p = startServe(t, bin, dataDir, sock)
	resp, b = sp.call(t, c, "POST", "/v1/sandboxes/k1/exec", jsonBody(map[string]any{"command": "echo again"}))
	if r := decodeAs[ExecResult](t, b); r.Stdout != "again\n" {
		t.Fatalf("the restarted daemon does not serve k1: %s", b)
	}
	resp, b = sp.call(t, c, "DELETE", "/v1/sandboxes/k1", nil)
	wantStatus(t, "delete", resp, b, 204)
	resp, b = sp.call(t, c, "DELETE", "/v1/snapshots/ks1", nil)
	wantStatus(t, "delete snapshot", resp, b, 204)
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.wait(t); err != nil {
		t.Errorf("SIGTERM: exit %v\n%s", err, p.stderr)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

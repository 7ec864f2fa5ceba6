// Package python_test runs the Python client's tests (clients/python/tests)
// from `go test ./...` (scripts/test), in parallel with the Go packages:
// it builds smolvm and its network sidecar from this tree, makes sure the
// images carry this tree's agent, runs the Python test modules at once
// against one daemon (the first client to connect starts it) on a data dir
// of their own, then deletes what they left and stops the daemon. A failed
// Python test fails this test; a missing python3 fails it too.
package python_test

import (
	"bytes"
	"context"
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

// modules run in parallel, each in its own interpreter; the slowest (the
// seed page, in order) sets the wall time.
var modules = []string{"tests.test_seed_page", "tests.test_client", "tests.test_unit", "tests.test_install"}

func TestPythonClient(t *testing.T) {
	testutil.RequireQEMU(t)
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Fatalf("python3 is needed for the Python client's tests (scripts/setup installs it): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if _, err := testutil.EnsureImages(ctx, image.Debian); err != nil {
		t.Fatal(err)
	}
	root := testutil.ShortDir(t)
	bin := filepath.Join(root, "bin")
	if err := os.Mkdir(bin, 0o700); err != nil {
		t.Fatal(err)
	}
	smolvmBin, err := testutil.BuildCommand(ctx, bin, "smolvm")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testutil.BuildCommand(ctx, bin, "smolvm-net"); err != nil { // found next to smolvm
		t.Fatal(err)
	}
	dataDir := filepath.Join(root, "data")
	runDir := filepath.Join(root, "run")
	env := append(os.Environ(),
		"SMOLVM_BIN="+smolvmBin,
		"SMOLVM_PY_TEST_DIR="+root,
		"SMOLVM_RUN_DIR="+runDir,
		"PYTHONDONTWRITEBYTECODE=1",
		"PYTHONUNBUFFERED=1",
	)
	env = withoutVars(env, "SMOLVM_API_SOCKET", "SMOLVM_API_URL", "SMOLVM_API_TOKEN", "SMOLVM_DATA_DIR", "SMOLVM_COLD_BOOT", "SMOLVM_NET_HELPER")
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cleanup(t, python, dir, env, bin, dataDir, runDir) })
	var wg sync.WaitGroup
	outs := make([]bytes.Buffer, len(modules))
	errs := make([]error, len(modules))
	for i, mod := range modules {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.CommandContext(ctx, python, "-m", "unittest", "-v", mod)
			cmd.Dir, cmd.Env = dir, env
			cmd.Stdout, cmd.Stderr = &outs[i], &outs[i]
			cmd.WaitDelay = 10 * time.Second
			errs[i] = cmd.Run()
		}()
	}
	wg.Wait()
	for i, mod := range modules {
		if errs[i] != nil {
			t.Errorf("python3 -m unittest %s: %v\n%s", mod, errs[i], outs[i].String())
		} else if testing.Verbose() {
			t.Logf("python3 -m unittest %s:\n%s", mod, lastLines(outs[i].String(), 3))
		}
	}
}

// cleanup deletes the sandboxes the Python tests left (through the daemon:
// tests/cleanup.py), stops the daemon (SIGTERM, its graceful shutdown) and
// kills whatever of theirs still runs, which fails the test.
func cleanup(t *testing.T, python, dir string, env []string, bin, dataDir, runDir string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "tests/cleanup.py")
	cmd.Dir, cmd.Env = dir, append(env, "SMOLVM_DATA_DIR="+dataDir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("deleting the sandboxes the Python tests left: %v\n%s", err, out)
	}
	stop := func(dirs ...string) []int {
		var pids []int
		for _, d := range dirs {
			pids = append(pids, testutil.ProcessesFor(d)...)
		}
		return pids
	}
	for _, pid := range stop(bin) {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(stop(bin)) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if left := stop(bin, dataDir, runDir); len(left) > 0 {
		for _, pid := range left {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		t.Errorf("processes of the Python tests still ran after cleanup (killed): %v", left)
	}
}

func withoutVars(env []string, names ...string) []string {
	out := env[:0:0]
next:
	for _, kv := range env {
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

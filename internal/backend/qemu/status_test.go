package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/qmp/qmptest"
)

// fakeVMM is a process whose cmdline names the VM's QMP socket (what
// processAlive checks) plus a fake QMP server (qmptest) on that socket.
func fakeVMM(t *testing.T, status string) (backend.Machine, *exec.Cmd) {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "smvf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := qmpSocket(dir)
	// A loop, not a lone "sleep 60": sh would exec that in place and the
	// process's cmdline would lose the socket path processAlive looks for.
	cmd := exec.Command("/bin/sh", "-c", "while :; do sleep 1; done", "socket,id=qmp,path="+sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	qmptest.Start(t, sock, func(write func(string), req map[string]any) {
		switch req["execute"] {
		case "query-status":
			write(qmptest.Return(req, fmt.Sprintf(`{"status": %q, "running": false}`, status)))
		case "cont":
			write(qmptest.Error(req, "GenericError", "Resetting the Virtual Machine is required"))
		default:
			write(qmptest.Return(req, ""))
		}
	})
	m := backend.Machine{Spec: backend.Spec{ID: "f", Dir: dir, RunDir: dir}, PID: cmd.Process.Pid}
	return m, cmd
}

// A VM stuck in internal-error (as after a KVM emulation failure) reports
// StatusError; once its process dies, StatusStopped; never a hang.
func TestStatusInternalErrorAndDeadProcess(t *testing.T) {
	m, cmd := fakeVMM(t, "internal-error")
	b := New(Options{StopTimeout: 300 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !processAlive(m) {
		t.Fatal("fake VMM not recognised as alive")
	}
	st, err := b.Status(ctx, m)
	if err != nil || st != backend.StatusError {
		t.Fatalf("status = %s, %v; want error", st, err)
	}
	err = b.Resume(ctx, m)
	if err == nil {
		t.Fatal("resume of an internal-error VM succeeded")
	}
	t.Logf("resume: %v", err)

	// A pid whose cmdline does not name our socket is not ours.
	other := m
	other.RunDir = "/tmp/someone-else"
	if processAlive(other) {
		t.Fatal("pid reuse guard failed")
	}

	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	start := time.Now()
	st, err = b.Status(ctx, m)
	if err != nil || st != backend.StatusStopped || time.Since(start) > time.Second {
		t.Fatalf("status after death = %s, %v after %v; want stopped at once", st, err, time.Since(start))
	}
	if err := b.Pause(ctx, m); err == nil {
		t.Fatal("pause of a dead VM succeeded")
	}
	if err := b.Stop(ctx, m); err != nil {
		t.Fatalf("stop of a dead VM: %v", err)
	}
	if _, err := os.Stat(filepath.Join(m.RunDir, qmpSocketName)); err == nil {
		t.Error("stop left the QMP socket")
	}
}

// Stop kills a VMM that ignores quit.
func TestStopKillsUnresponsive(t *testing.T) {
	m, cmd := fakeVMM(t, "running")
	b := New(Options{StopTimeout: 200 * time.Millisecond})
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := b.Stop(ctx, m); err != nil {
		t.Fatal(err)
	}
	// When Stop returns the process is dead: gone, a zombie waiting for its
	// parent (this test) to reap it, or still exiting with its address
	// space already released (empty cmdline). Checked at once, not with a
	// deadline, so a loaded machine cannot make it flaky.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", m.PID)); err == nil {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", m.PID))
		i := strings.LastIndexByte(string(st), ')')
		zombie := i >= 0 && (strings.HasPrefix(string(st[i+1:]), " Z") || strings.HasPrefix(string(st[i+1:]), " X"))
		if !zombie && len(cmdline) > 0 {
			t.Fatalf("process still alive after Stop: %s (cmdline %q)", st, cmdline)
		}
	}
	<-done
	t.Logf("stop took %v", time.Since(start))
}

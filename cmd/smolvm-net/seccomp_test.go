package main

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSeccompDeniesExec runs the filter in a child process (it cannot be
// undone) and checks exec and mount fail with EPERM while sockets work.
func TestSeccompDeniesExec(t *testing.T) {
	if os.Getenv("SMOLVM_NET_SECCOMP_CHILD") == "1" {
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			t.Fatal(err)
		}
		if err := installSeccomp(); err != nil {
			t.Fatal(err)
		}
		if err := exec.Command("/bin/true").Run(); !errors.Is(err, syscall.EPERM) {
			t.Fatalf("exec after seccomp: %v", err)
		}
		if err := unix.Mount("none", "/mnt", "tmpfs", 0, ""); !errors.Is(err, syscall.EPERM) {
			t.Fatalf("mount after seccomp: %v", err)
		}
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatalf("socketpair after seccomp: %v", err)
		}
		unix.Close(fds[0])
		unix.Close(fds[1])
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSeccompDeniesExec$", "-test.v")
	cmd.Env = append(os.Environ(), "SMOLVM_NET_SECCOMP_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child: %v\n%s", err, out)
	}
}

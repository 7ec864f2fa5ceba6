package main

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
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

// TestDropPrivilegesEveryThread runs the sidecar's real dropPrivileges in
// child processes while other goroutines keep the scheduler busy, and
// checks every thread of the child ends with NoNewPrivs 1 and Seccomp 2.
// (A sidecar once failed to start with "seccomp: permission denied": the
// goroutine moved to another OS thread between no_new_privs and seccomp.
// This test did not reproduce that race in 300 children without the fix;
// it checks the confinement of every thread, the fix is by construction.)
func TestDropPrivilegesEveryThread(t *testing.T) {
	if os.Getenv("SMOLVM_NET_DROP_CHILD") == "1" {
		stop := make(chan struct{})
		for i := 0; i < 8; i++ {
			go func() {
				for {
					select {
					case <-stop:
						return
					default:
						runtime.Gosched()
					}
				}
			}()
		}
		err := dropPrivileges()
		close(stop)
		if err != nil {
			t.Fatal(err)
		}
		tasks, _ := os.ReadDir("/proc/self/task")
		for _, task := range tasks {
			b, err := os.ReadFile("/proc/self/task/" + task.Name() + "/status")
			if err != nil {
				t.Fatal(err)
			}
			s := string(b)
			if !strings.Contains(s, "\nNoNewPrivs:\t1\n") || !strings.Contains(s, "\nSeccomp:\t2\n") {
				t.Fatalf("thread %s is not confined:\n%s", task.Name(), s)
			}
		}
		return
	}
	for i := 0; i < 3; i++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestDropPrivilegesEveryThread$", "-test.v")
		cmd.Env = append(os.Environ(), "SMOLVM_NET_DROP_CHILD=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("child %d: %v\n%s", i, err, out)
		}
	}
}

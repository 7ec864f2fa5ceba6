package store

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Child processes: the test binary re-executes itself with -test.run
// selecting TestHelperProcess and these variables naming what to do.
const (
	envChild = "SMOLVM_STORE_TEST_CHILD" // "reserve" or "lock"
	envDir   = "SMOLVM_STORE_TEST_DIR"
	envN     = "SMOLVM_STORE_TEST_N"
)

// TestHelperProcess is not a test: it is the body of the child processes.
// Protocol: the child prints lines on stdout and reads lines on stdin.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(envChild)
	if mode == "" {
		t.Skip("helper process for the multi-process tests")
	}
	dir := os.Getenv(envDir)
	ctx := context.Background()
	in := bufio.NewScanner(os.Stdin)
	fail := func(err error) {
		fmt.Println("error", err)
		os.Exit(1)
	}
	switch mode {
	case "reserve":
		// ready → wait for "go" → reserve snap-0..snap-(N-1), print
		// "won ID" for each reservation this process got.
		var n int
		fmt.Sscan(os.Getenv(envN), &n)
		s, err := Open(ctx, dir)
		if err != nil {
			fail(err)
		}
		fmt.Println("ready")
		in.Scan()
		for i := range n {
			id := fmt.Sprintf("snap-%d", i)
			err := s.ReserveSnapshot(ctx, Snapshot{ID: id, VMID: "vm", Backend: "qemu", Type: "full"})
			switch {
			case err == nil:
				fmt.Println("won", id)
			case !errors.Is(err, ErrExists):
				fail(err)
			}
		}
		s.Close()
	case "lock":
		// lock VM "vm1" → "locked" → wait for a line (or EOF) → unlock →
		// "unlocked".
		unlock, err := LockVM(ctx, dir, "vm1")
		if err != nil {
			fail(err)
		}
		fmt.Println("locked")
		in.Scan()
		unlock()
		fmt.Println("unlocked")
	default:
		fail(fmt.Errorf("unknown mode %q", mode))
	}
	os.Exit(0)
}

type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // stdout lines; closed at EOF
}

func startChild(t *testing.T, mode, dir string, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), envChild+"="+mode, envDir+"="+dir)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 1000)}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			c.lines <- sc.Text()
		}
		close(c.lines)
	}()
	t.Cleanup(func() {
		stdin.Close()
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return c
}

// expect waits for the child's next line and checks it.
func (c *child) expect(t *testing.T, want string) {
	t.Helper()
	select {
	case line, ok := <-c.lines:
		if !ok {
			t.Fatalf("child %d: EOF, want %q", c.cmd.Process.Pid, want)
		}
		if line != want {
			t.Fatalf("child %d: got %q, want %q", c.cmd.Process.Pid, line, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("child %d: timed out waiting for %q", c.cmd.Process.Pid, want)
	}
}

// rest returns the child's remaining lines and waits for it to exit
// successfully.
func (c *child) rest(t *testing.T) []string {
	t.Helper()
	var lines []string
	for line := range c.lines {
		if strings.HasPrefix(line, "error") {
			t.Errorf("child %d: %s", c.cmd.Process.Pid, line)
		}
		lines = append(lines, line)
	}
	if err := c.cmd.Wait(); err != nil {
		t.Fatalf("child %d: %v", c.cmd.Process.Pid, err)
	}
	return lines
}

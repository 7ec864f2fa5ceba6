package cli

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/ptyutil"
)

// testInteractiveCLI runs exec -i, exec --tty and shell as separate
// processes against the running sandbox vm (TestSandboxCLI's): piped
// stdin with EOF, SIGINT forwarded, and a terminal on a host pty pair
// (size, resize by SIGWINCH, Ctrl-C, exit codes).
func testInteractiveCLI(t *testing.T, vm string) {
	bin := cliBinary(t)
	command := func(args ...string) *exec.Cmd {
		return exec.Command(bin, append([]string{"--data-dir", dataDir, "sandbox"}, args...)...)
	}
	t.Run("stdin", func(t *testing.T) {
		data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16+7) // 1 MiB + 112 bytes
		cmd := command("exec", "-i", vm, "--", "wc -c; exit 7")
		cmd.Stdin = bytes.NewReader(data)
		out, err := cmd.Output()
		if cmd.ProcessState.ExitCode() != 7 || strings.TrimSpace(string(out)) != fmt.Sprint(len(data)) {
			t.Fatalf("exec -i wc -c: %q, exit %d (%v), want %d and 7", out, cmd.ProcessState.ExitCode(), err, len(data))
		}
	})
	t.Run("sigint", func(t *testing.T) {
		cmd := command("exec", "-i", vm, "--", "echo ready; sleep 100")
		stdin, _ := cmd.StdinPipe()
		defer stdin.Close()
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 6)
		if _, err := io.ReadFull(stdout, buf); err != nil || string(buf) != "ready\n" {
			t.Fatalf("ready: %q %v", buf, err)
		}
		cmd.Process.Signal(syscall.SIGINT)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatal("exec -i did not end after SIGINT")
		}
		if code := cmd.ProcessState.ExitCode(); code != 130 {
			t.Fatalf("exit %d after SIGINT, want 130", code)
		}
	})
	t.Run("tty", func(t *testing.T) {
		term := onPTY(t, 30, 90, command("exec", "-i", "--tty", vm, "--",
			`tty; stty size; while read x; do [ "$x" = q ] && sleep 100; stty size; done`))
		term.waitFor(t, "/dev/pts/")
		term.waitFor(t, "30 90")
		// Our terminal changes size: smolvm gets SIGWINCH and resizes
		// the guest's; each line typed prints the size.
		if err := ptyutil.SetSize(term.master, 50, 132); err != nil {
			t.Fatal(err)
		}
		for i := 0; !strings.Contains(term.seen.String(), "50 132"); i++ {
			if i == 50 {
				t.Fatalf("the guest terminal was not resized: %q", term.seen.String())
			}
			term.master.Write([]byte("\r"))
			term.read(t, 200*time.Millisecond)
		}
		term.master.Write([]byte("q\r"))
		time.Sleep(300 * time.Millisecond)
		term.master.Write([]byte{3}) // Ctrl-C, in raw mode: a byte for the guest's terminal
		if code := term.exit(t); code != 130 {
			t.Fatalf("exit %d after Ctrl-C, want 130; output %q", code, term.seen.String())
		}
	})
	t.Run("shell", func(t *testing.T) {
		term := onPTY(t, 24, 80, command("shell", vm))
		term.master.Write([]byte("echo SHELL$((40+2)); tty; exit 5\r"))
		term.waitFor(t, "SHELL42")
		term.waitFor(t, "/dev/pts/")
		if code := term.exit(t); code != 5 {
			t.Fatalf("shell exit %d, want 5; output %q", code, term.seen.String())
		}
	})
}

// ptyProc is a command running on a host pseudo terminal.
type ptyProc struct {
	cmd    *exec.Cmd
	master *os.File
	seen   bytes.Buffer
	done   chan error
}

// onPTY starts cmd on a new host pty of rows x cols, as its controlling
// terminal.
func onPTY(t *testing.T, rows, cols uint16, cmd *exec.Cmd) *ptyProc {
	t.Helper()
	master, slave, err := ptyutil.Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { master.Close() })
	if err := ptyutil.SetSize(slave, rows, cols); err != nil {
		t.Fatal(err)
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	slave.Close()
	p := &ptyProc{cmd: cmd, master: master, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return p
}

// read reads what the terminal shows within d.
func (p *ptyProc) read(t *testing.T, d time.Duration) {
	p.master.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 4096)
	n, _ := p.master.Read(buf)
	p.seen.Write(buf[:n])
}

func (p *ptyProc) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(p.seen.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("the terminal did not show %q: %q", want, p.seen.String())
		}
		p.read(t, 200*time.Millisecond)
	}
}

// exit waits for the command, reading the terminal meanwhile.
func (p *ptyProc) exit(t *testing.T) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-p.done:
			return p.cmd.ProcessState.ExitCode()
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the command did not exit: %q", p.seen.String())
		}
		p.read(t, 100*time.Millisecond)
	}
}

package smolvm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

// readUntil reads r into seen until it holds want (the session's output
// arrives in pieces).
func readUntil(t *testing.T, r io.Reader, seen *bytes.Buffer, want string) {
	t.Helper()
	buf := make([]byte, 4096)
	for !strings.Contains(seen.String(), want) {
		n, err := r.Read(buf)
		seen.Write(buf[:n])
		if err != nil {
			t.Fatalf("reading for %q: %v; got %q", want, err, seen.String())
		}
	}
}

// TestAttach: interactive sessions in a real VM (the shared one): stdin
// streamed with EOF, a PTY with its size and resizes, signals, and a
// caller that goes away.
func TestAttach(t *testing.T) {
	vm := sharedVM(t)
	t.Run("stdin", func(t *testing.T) {
		ctx := testCtx(t)
		s, err := vm.Attach(ctx, smolvm.ExecSpec{Argv: []string{"wc", "-c"}})
		if err != nil {
			t.Fatal(err)
		}
		data := make([]byte, 1<<20+12345) // over 1 MiB: many flow-control windows
		rand.Read(data)
		go func() {
			s.Stdin.Write(data)
			s.Stdin.Close()
		}()
		out, err := io.ReadAll(s.Stdout)
		if err != nil {
			t.Fatal(err)
		}
		code, err := s.Wait()
		if err != nil || code != 0 {
			t.Fatalf("wait: %d %v", code, err)
		}
		if got := strings.TrimSpace(string(out)); got != fmt.Sprint(len(data)) {
			t.Fatalf("wc -c counted %q of %d bytes", got, len(data))
		}
	})
	t.Run("cat", func(t *testing.T) {
		ctx := testCtx(t)
		s, err := vm.Attach(ctx, smolvm.ExecSpec{Shell: "cat; echo done >&2"})
		if err != nil {
			t.Fatal(err)
		}
		var seen bytes.Buffer
		for _, line := range []string{"one\n", "two\n"} {
			if _, err := s.Stdin.Write([]byte(line)); err != nil {
				t.Fatal(err)
			}
			readUntil(t, s.Stdout, &seen, line) // echoed while cat runs
		}
		s.Stdin.Close()
		stderr, _ := io.ReadAll(s.Stderr)
		if code, err := s.Wait(); err != nil || code != 0 || string(stderr) != "done\n" {
			t.Fatalf("wait: %d %v, stderr %q", code, err, stderr)
		}
	})
	t.Run("tty", func(t *testing.T) {
		ctx := testCtx(t)
		s, err := vm.Attach(ctx, smolvm.ExecSpec{Shell: `tty; stty size; echo TERM=$TERM; read line; stty size; echo "got $line"`,
			TTY: &smolvm.TTYSize{Rows: 33, Cols: 101}, Term: "vt100"})
		if err != nil {
			t.Fatal(err)
		}
		var seen bytes.Buffer
		readUntil(t, s.Stdout, &seen, "TERM=vt100")
		if !regexp.MustCompile(`/dev/pts/\d+`).MatchString(seen.String()) || !strings.Contains(seen.String(), "33 101") {
			t.Fatalf("tty and size: %q", seen.String())
		}
		if err := s.Resize(ctx, smolvm.TTYSize{Rows: 40, Cols: 120}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Stdin.Write([]byte("abc\n")); err != nil {
			t.Fatal(err)
		}
		readUntil(t, s.Stdout, &seen, "got abc")
		if !strings.Contains(seen.String(), "40 120") {
			t.Fatalf("after the resize: %q", seen.String())
		}
		go io.Copy(io.Discard, s.Stdout)
		if code, err := s.Wait(); err != nil || code != 0 {
			t.Fatalf("wait: %d %v", code, err)
		}
	})
	t.Run("signal", func(t *testing.T) {
		ctx := testCtx(t)
		s, err := vm.Attach(ctx, smolvm.ExecSpec{Shell: "sleep 100"})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Signal(ctx, syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		code, err := s.Wait()
		if err != nil || code != 130 {
			t.Fatalf("wait after SIGINT: %d %v, want 130", code, err)
		}
		if err := s.Signal(ctx, syscall.Signal(40)); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Fatalf("signal 40: %v", err)
		}
	})
	t.Run("caller gone", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testCtx(t))
		s, err := vm.Attach(ctx, smolvm.ExecSpec{Argv: []string{"sleep", "1000"}, TTY: &smolvm.TTYSize{Rows: 24, Cols: 80}})
		if err != nil {
			t.Fatal(err)
		}
		pid := s.PID()
		if pid <= 0 {
			t.Fatalf("pid %d", pid)
		}
		cancel()
		if _, err := s.Wait(); !errors.Is(err, context.Canceled) {
			t.Fatalf("wait: %v", err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			res := run(t, vm, fmt.Sprintf("kill -0 %d", pid))
			if res.ExitCode != 0 {
				break // gone
			}
			if time.Now().After(deadline) {
				t.Fatalf("pid %d still runs after its caller went away", pid)
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	t.Run("refusals", func(t *testing.T) {
		ctx := testCtx(t)
		for _, spec := range []smolvm.ExecSpec{{}, {Argv: []string{"sh"}, Shell: "sh"},
			{Shell: "sh", TTY: &smolvm.TTYSize{Rows: 0, Cols: 80}}, {Shell: "sh", TTY: &smolvm.TTYSize{Rows: 1, Cols: 1}, Term: "a b"}} {
			if s, err := vm.Attach(ctx, spec); !errors.Is(err, smolvm.ErrInvalidConfig) {
				if s != nil {
					s.Close()
				}
				t.Errorf("%+v: %v", spec, err)
			}
		}
	})
}

// An interactive shell on a terminal, wired to this process's standard
// streams (what `smolvm sandbox shell` does, without raw mode and resizes).
func ExampleVM_Attach() {
	ctx := context.Background()
	vm, err := smolvm.New(ctx, smolvm.Config{Image: "busybox"})
	if err != nil {
		panic(err)
	}
	defer vm.Delete(ctx)
	if err := vm.Start(ctx); err != nil {
		panic(err)
	}
	s, err := vm.Attach(ctx, smolvm.ExecSpec{Shell: "exec /bin/sh -l", TTY: &smolvm.TTYSize{Rows: 24, Cols: 80}})
	if err != nil {
		panic(err)
	}
	go io.Copy(s.Stdin, os.Stdin)
	go io.Copy(os.Stdout, s.Stdout)
	code, err := s.Wait()
	fmt.Println("exit", code, err)
}

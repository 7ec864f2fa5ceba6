package image

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// cmdSpec describes one external command.
type cmdSpec struct {
	Dir    string
	Env    []string          // added to os.Environ()
	OnLine func(line string) // called for each output line (stdout and stderr)
	Stdout io.Writer         // when set, stdout goes here instead of OnLine
}

// runCmd runs name with args, streaming output lines to OnLine and the
// logger (debug level). The command runs in its own process group, which
// is terminated when ctx ends. The error carries the tail of the output.
func runCmd(ctx context.Context, log *slog.Logger, spec cmdSpec, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = spec.Dir
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		if cmd.Process == nil {
			return nil
		}
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	}
	cmd.WaitDelay = 15 * time.Second

	tail := &tailBuffer{max: 30}
	pr, pw := io.Pipe()
	if spec.Stdout != nil {
		cmd.Stdout = spec.Stdout
	} else {
		cmd.Stdout = pw
	}
	cmd.Stderr = pw

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			tail.add(line)
			if log != nil {
				log.Debug(name, "out", line)
			}
			if spec.OnLine != nil {
				spec.OnLine(line)
			}
		}
		io.Copy(io.Discard, pr)
	}()

	start := time.Now()
	if log != nil {
		log.Debug("exec", "cmd", name, "args", args, "dir", spec.Dir)
	}
	err := cmd.Start()
	if err == nil {
		err = cmd.Wait()
	}
	pw.Close()
	wg.Wait()
	if log != nil {
		log.Debug("exec done", "cmd", name, "elapsed", time.Since(start).Round(time.Millisecond), "err", err)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", name, ctx.Err())
		}
		msg := fmt.Sprintf("%s %s: %v", name, strings.Join(args, " "), err)
		if t := tail.String(); t != "" {
			msg += "\n" + t
		}
		return errors.New(msg)
	}
	return nil
}

// outputCmd runs a short command and returns its stdout.
func outputCmd(ctx context.Context, log *slog.Logger, name string, args ...string) (string, error) {
	var out strings.Builder
	err := runCmd(ctx, log, cmdSpec{Stdout: &out}, name, args...)
	return out.String(), err
}

type tailBuffer struct {
	mu    sync.Mutex
	max   int
	lines []string
}

func (t *tailBuffer) add(s string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, s)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, "\n")
}

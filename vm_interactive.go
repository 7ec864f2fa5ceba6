package smolvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"syscall"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// TTYSize is the size of a terminal, in character cells (1 to 4096 each).
type TTYSize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExecSpec describes an interactive command (VM.Attach). Exactly one of
// Argv (run directly) and Shell (a command line for /bin/sh -c) is set.
type ExecSpec struct {
	Argv  []string          `json:"argv,omitempty"`
	Shell string            `json:"command,omitempty"`
	Env   map[string]string `json:"env,omitempty"`
	Cwd   string            `json:"cwd,omitempty"`
	// TTY runs the command on a pseudo terminal of this size in the
	// guest: its controlling terminal, in a session of its own. Its
	// output then comes merged on Stdout (Stderr stays empty), and input
	// goes through the terminal's line discipline (^C typed on Stdin
	// interrupts the foreground job, as on a local terminal).
	TTY *TTYSize `json:"tty,omitempty"`
	// Term is $TERM on a TTY (default "xterm-256color"), unless Env sets
	// it.
	Term string `json:"term,omitempty"`
}

// Session is an interactive command in a guest (VM.Attach): its standard
// input streams while it runs, its output streams back, and it can be
// resized and signalled. Read Stdout and Stderr concurrently (as with
// os/exec's pipes): output that is not read holds the session (and,
// past a bounded queue, the VM's agent connection). When Attach's ctx
// ends or Close is called before the command exited, the guest kills
// the command's process group; so does an agent whose host connection
// is lost.
type Session struct {
	// Stdin streams to the command's standard input; Close ends it (on
	// a TTY: types ^D). Write blocks while the command does not read.
	Stdin io.WriteCloser
	// Stdout and Stderr yield the command's output and io.EOF after it
	// exited.
	Stdout io.Reader
	Stderr io.Reader

	vm      *VM
	s       *agentclient.Session
	ctx     context.Context
	stdoutW *io.PipeWriter
	stderrW *io.PipeWriter
	closed  atomic.Bool
}

// Attach starts an interactive command in the running VM and returns as
// soon as it runs (a command that cannot start, such as one not found,
// still gives a Session: its error comes on Stderr and Wait returns 127 or
// 126). ctx bounds the whole session: when it ends the command is killed.
// An image whose agent predates interactive commands fails with
// ErrUnsupported (rebuild the image).
func (vm *VM) Attach(ctx context.Context, spec ExecSpec) (*Session, error) {
	req, err := spec.request()
	if err != nil {
		return nil, err
	}
	c, err := vm.agent(ctx, "attach")
	if err != nil {
		return nil, err
	}
	outR, outW := io.Pipe()
	errR, errW := io.Pipe()
	as, err := c.StartExec(ctx, req, outW, errW)
	if err != nil {
		outW.Close()
		errW.Close()
		if errors.Is(err, agentclient.ErrNoInteractive) {
			img := ""
			if inf, ierr := vm.Info(ctx); ierr == nil {
				img = inf.Image
			}
			return nil, &Error{Op: "attach", Message: fmt.Sprintf("attach in vm %s: the guest agent of its image predates interactive commands; rebuild the image and create the sandbox again", vm.id),
				Fix: newFix(FixBuildImage, ArgImage, img), Err: errors.Join(ErrUnsupported, err)}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, vm.agentErr("attach", &Error{Op: "attach", Message: fmt.Sprintf("attach in vm %s: %v", vm.id, err), Err: err})
	}
	s := &Session{Stdout: outR, Stderr: errR, vm: vm, s: as, ctx: ctx, stdoutW: outW, stderrW: errW}
	s.Stdin = sessionStdin{as}
	go func() {
		select {
		case <-as.Done():
			outW.Close()
			errW.Close()
		case <-ctx.Done():
			// Unblock output nobody reads, so that the session can end.
			outW.CloseWithError(ctx.Err())
			errW.CloseWithError(ctx.Err())
		}
	}()
	return s, nil
}

// Validate checks the spec as Attach does (ErrInvalidConfig).
func (spec ExecSpec) Validate() error {
	_, err := spec.request()
	return err
}

// request checks the spec and makes the agent's request of it.
func (spec ExecSpec) request() (agentproto.ExecRequest, error) {
	bad := func(format string, args ...any) (agentproto.ExecRequest, error) {
		return agentproto.ExecRequest{}, newErr("attach", ErrInvalidConfig, Fix{}, fmt.Sprintf(format, args...))
	}
	switch {
	case len(spec.Argv) > 0 && spec.Shell != "":
		return bad("attach: give Argv or Shell, not both")
	case len(spec.Argv) == 0 && spec.Shell == "":
		return bad("attach: empty command: give Argv or Shell")
	}
	req := agentproto.ExecRequest{Argv: spec.Argv, Shell: spec.Shell, Env: spec.Env, Cwd: spec.Cwd, Interactive: true}
	if spec.TTY != nil {
		req.TTY = &agentproto.TTY{Rows: spec.TTY.Rows, Cols: spec.TTY.Cols, Term: spec.Term}
		if err := req.TTY.Validate(); err != nil {
			return bad("attach: %v", err)
		}
	}
	return req, nil
}

// sessionStdin is a Session's Stdin.
type sessionStdin struct{ s *agentclient.Session }

func (w sessionStdin) Write(p []byte) (int, error) { return w.s.Write(p) }
func (w sessionStdin) Close() error                { return w.s.CloseStdin() }

// PID is the command's process id in the guest (0 when it could not
// start).
func (s *Session) PID() int { return s.s.PID }

// Resize changes the size of the command's terminal (a TTY session); the
// guest's kernel sends SIGWINCH to its foreground job.
func (s *Session) Resize(ctx context.Context, size TTYSize) error {
	if err := s.s.Resize(ctx, size.Rows, size.Cols); err != nil {
		return s.err("resize", err)
	}
	return nil
}

// Signal sends sig to the command's process group (on a TTY, also to the
// terminal's foreground job): SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGTERM,
// SIGUSR1, SIGUSR2, SIGPIPE, SIGALRM, SIGCONT, SIGSTOP, SIGTSTP or SIGWINCH.
func (s *Session) Signal(ctx context.Context, sig syscall.Signal) error {
	for name, n := range agentproto.SignalNames {
		if n == int(sig) {
			return s.SignalName(ctx, name)
		}
	}
	return newErr("signal", ErrInvalidConfig, Fix{}, fmt.Sprintf("signal %d (%v) cannot be sent to a guest command", int(sig), sig))
}

// SignalName is Signal by name ("SIGINT", "INT" or "int").
func (s *Session) SignalName(ctx context.Context, name string) error {
	if _, _, err := agentproto.ParseSignal(name); err != nil {
		return newErr("signal", ErrInvalidConfig, Fix{}, err.Error())
	}
	if err := s.s.Signal(ctx, name); err != nil {
		return s.err("signal", err)
	}
	return nil
}

// Wait waits for the command to exit and returns its exit code: 128+N when
// signal N killed it (130 for SIGINT), as a shell reports it. It fails
// when the session ended without the command's exit: Attach's ctx ended
// or Close was called (the command was killed), or the VM's agent was
// lost.
func (s *Session) Wait() (int, error) {
	res, err := s.s.Wait()
	if err != nil {
		if cause := s.ctx.Err(); cause != nil || s.closed.Load() {
			if cause == nil {
				cause = io.ErrClosedPipe
			}
			return -1, &Error{Op: "attach", Message: fmt.Sprintf("attach in vm %s: the session ended before the command (%v); the command was killed", s.vm.id, cause),
				Err: errors.Join(cause, err)}
		}
		return -1, s.err("attach", err)
	}
	return res.ExitCode, nil
}

// Close ends the session: the guest kills the command's process group
// unless it already exited. Output not read yet is dropped.
func (s *Session) Close() error {
	s.closed.Store(true)
	s.stdoutW.CloseWithError(io.ErrClosedPipe)
	s.stderrW.CloseWithError(io.ErrClosedPipe)
	return s.s.Close()
}

func (s *Session) err(op string, err error) error {
	return s.vm.agentErr(op, &Error{Op: op, Message: fmt.Sprintf("%s in vm %s: %v", op, s.vm.id, err), Err: err})
}

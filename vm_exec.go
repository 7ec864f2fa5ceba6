package smolvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// Result is the outcome of a command. A non-zero exit code is a result, not
// an error.
//
// Stdout and Stderr keep at most the output limit of each stream (the first
// DefaultOutputLimit bytes unless WithOutputLimit or Options.OutputLimit
// say otherwise); Truncated says that more was produced and dropped.
// Writers given with WithStdout/WithStderr still get all of it.
//
// TimedOut means the guest killed the command at its WithTimeout. A guest
// that does not end the command within the timeout plus ExecTimeoutGrace
// gets no Result: Run returns an error wrapping ErrTimeout.
type Result struct {
	ExitCode  int           `json:"exit_code"`
	Stdout    string        `json:"stdout"`
	Stderr    string        `json:"stderr"`
	TimedOut  bool          `json:"timed_out,omitempty"`
	Truncated bool          `json:"truncated,omitempty"`
	Duration  time.Duration `json:"duration_ns"`
}

// DefaultOutputLimit is how many bytes of each stream a Result keeps by
// default.
const DefaultOutputLimit = 4 << 20

// ExecTimeoutGrace is how long past a command's WithTimeout the host waits
// for the guest's answer before it gives up (asking the guest to kill the
// command) and returns ErrTimeout.
const ExecTimeoutGrace = 2 * time.Second

// OK reports whether the command exited with status 0.
func (r *Result) OK() bool { return r.ExitCode == 0 && !r.TimedOut }

// Output is stdout with surrounding white space trimmed.
func (r *Result) Output() string { return strings.TrimSpace(r.Stdout) }

// RunOption customizes Run.
type RunOption func(*runOpts)

type runOpts struct {
	timeout        time.Duration
	outputLimit    int
	env            map[string]string
	dir            string
	stdin          []byte
	stdinReader    io.Reader
	stdout, stderr io.Writer
}

// WithTimeout kills the command (its whole process group) after d. The
// guest kills it (Result.TimedOut); should the guest not answer within d
// plus ExecTimeoutGrace, the host stops waiting, asks the guest to kill it
// and Run returns an error wrapping ErrTimeout.
func WithTimeout(d time.Duration) RunOption { return func(o *runOpts) { o.timeout = d } }

// WithOutputLimit keeps at most n bytes of each of stdout and stderr in the
// Result (n <= 0: the default, DefaultOutputLimit or Options.OutputLimit).
// Output past it is dropped and flagged by Result.Truncated; streaming
// writers still get everything.
func WithOutputLimit(n int) RunOption { return func(o *runOpts) { o.outputLimit = n } }

// WithEnv adds environment variables for this command.
func WithEnv(env map[string]string) RunOption { return func(o *runOpts) { o.env = env } }

// WithWorkdir runs the command in dir.
func WithWorkdir(dir string) RunOption { return func(o *runOpts) { o.dir = dir } }

// WithStdin feeds data to the command's standard input.
func WithStdin(data []byte) RunOption {
	return func(o *runOpts) { o.stdin, o.stdinReader = data, nil }
}

// MaxStdinSize bounds what WithStdinReader reads: the agent protocol
// carries a command's standard input whole, in its exec request.
const MaxStdinSize = agentproto.MaxFileSize

// WithStdinReader feeds what r yields to the command's standard input. The
// protocol carries standard input whole (it is not streamed while the
// command runs), so Run reads r to EOF before it starts the command, at
// most MaxStdinSize bytes: a reader that yields more fails Run with
// ErrInvalidConfig and the command does not run. For more data, write it
// to a guest file (VM.WriteFileFrom) and redirect from it, or stream it
// with VM.Attach. A Read that
// blocks holds Run (ctx cannot interrupt it; it is checked once r is
// read), and WithTimeout counts from the start of the command. The last of
// WithStdin and WithStdinReader wins.
func WithStdinReader(r io.Reader) RunOption {
	return func(o *runOpts) { o.stdin, o.stdinReader = nil, r }
}

// WithStdout streams standard output to w while the command runs (it is
// also returned in Result.Stdout).
func WithStdout(w io.Writer) RunOption { return func(o *runOpts) { o.stdout = w } }

// WithStderr streams standard error to w while the command runs.
func WithStderr(w io.Writer) RunOption { return func(o *runOpts) { o.stderr = w } }

// Run runs a shell command line (/bin/sh -c) in the guest.
func (vm *VM) Run(ctx context.Context, command string, opts ...RunOption) (*Result, error) {
	return vm.exec(ctx, agentproto.ExecRequest{Shell: command}, opts)
}

// RunArgs runs argv directly (no shell) in the guest.
func (vm *VM) RunArgs(ctx context.Context, argv []string, opts ...RunOption) (*Result, error) {
	if len(argv) == 0 {
		return nil, newErr("run", ErrInvalidConfig, Fix{}, "empty command")
	}
	return vm.exec(ctx, agentproto.ExecRequest{Argv: argv}, opts)
}

func (vm *VM) exec(ctx context.Context, req agentproto.ExecRequest, opts []RunOption) (*Result, error) {
	var o runOpts
	for _, f := range opts {
		f(&o)
	}
	c, err := vm.agent(ctx, "run commands")
	if err != nil {
		return nil, err
	}
	if o.stdinReader != nil {
		if o.stdin, err = readStdin(o.stdinReader); err != nil {
			return nil, err
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	req.Env, req.Cwd, req.Stdin = o.env, o.dir, o.stdin
	if o.timeout > 0 {
		req.TimeoutMS = o.timeout.Milliseconds()
	}
	limit := o.outputLimit
	if limit <= 0 {
		limit = vm.m.opts.OutputLimit
	}
	if limit <= 0 {
		limit = DefaultOutputLimit
	}
	stdout, stderr := &capBuffer{max: limit}, &capBuffer{max: limit}
	var wout, werr io.Writer = stdout, stderr
	if o.stdout != nil {
		wout = io.MultiWriter(stdout, o.stdout)
	}
	if o.stderr != nil {
		werr = io.MultiWriter(stderr, o.stderr)
	}
	// The host-side deadline: the guest's timeout plus a grace.
	ectx := ctx
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ectx, cancel = context.WithTimeout(ctx, o.timeout+ExecTimeoutGrace)
		defer cancel()
	}
	start := time.Now()
	res, err := c.Exec(ectx, req, wout, werr)
	if err != nil {
		if o.timeout > 0 && ctx.Err() == nil && ectx.Err() != nil {
			return nil, &Error{Op: "run", Message: fmt.Sprintf("run in vm %s: the guest did not end the command within its timeout of %s (+%s grace); "+
				"the host stopped waiting and asked the guest to kill it", vm.id, o.timeout, ExecTimeoutGrace),
				Fix: newFix(FixShowLogs, ArgVM, vm.id), Err: errors.Join(ErrTimeout, err)}
		}
		return nil, vm.agentErr("run", &Error{Op: "run", Message: fmt.Sprintf("run in vm %s: %v", vm.id, err), Err: err})
	}
	out := &Result{ExitCode: res.ExitCode, Stdout: string(stdout.data), Stderr: string(stderr.data),
		TimedOut: res.TimedOut, Truncated: stdout.cut || stderr.cut, Duration: time.Since(start)}
	if res.Error != "" && out.Stderr == "" {
		out.Stderr = res.Error + "\n"
	}
	return out, nil
}

// readStdin reads a WithStdinReader source, at most MaxStdinSize bytes.
func readStdin(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxStdinSize+1))
	if err != nil {
		return nil, &Error{Op: "run", Message: fmt.Sprintf("reading the command's standard input: %v", err), Err: err}
	}
	if len(data) > MaxStdinSize {
		return nil, newErr("run", ErrInvalidConfig, newFix(FixEditOption, ArgOption, "WithStdin", ArgHint, "write the data to a guest file (VM.WriteFileFrom) and redirect the command's input from it"),
			fmt.Sprintf("standard input over %d bytes (MaxStdinSize): the agent protocol carries it whole", MaxStdinSize))
	}
	return data, nil
}

// capBuffer keeps the first max bytes written to it and notes whether more
// came. Writes never fail (the other writers of a MultiWriter still get
// everything).
type capBuffer struct {
	data []byte
	max  int
	cut  bool
}

func (b *capBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.max - len(b.data); room < len(p) {
		b.cut = true
		p = p[:max(room, 0)]
	}
	b.data = append(b.data, p...)
	return n, nil
}

// agentErr gives errors of agent calls their SDK sentinel: ErrTimeout for a
// request the guest did not answer in time, ErrGuestProtocol for a reply
// the host refused.
func (vm *VM) agentErr(op string, err error) error {
	var sentinel error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, agentclient.ErrTimeout):
		sentinel = ErrTimeout
	case errors.Is(err, agentclient.ErrProtocol):
		sentinel = ErrGuestProtocol
	default:
		return err
	}
	msg := err.Error()
	var e *Error
	if errors.As(err, &e) {
		msg = e.Message
	} else {
		msg = fmt.Sprintf("%s in vm %s: %s", op, vm.id, msg)
	}
	return &Error{Op: op, Message: msg, Fix: newFix(FixShowLogs, ArgVM, vm.id), Err: errors.Join(sentinel, err)}
}

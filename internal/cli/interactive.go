package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/smolvm-go/smolvm"
)

// interactiveOpts are exec's -i and --tty.
type interactiveOpts struct {
	stdin   bool // -i: pass our standard input through
	tty     bool // --tty: a pseudo terminal in the guest
	timeout time.Duration
}

// defaultTTYSize is the terminal size given when neither our standard input
// nor output is a terminal.
var defaultTTYSize = smolvm.TTYSize{Rows: 24, Cols: 80}

// runInteractive runs spec as an interactive session (VM.Attach) wired to
// this process's terminal or pipes, and returns the command's exit code.
//
// Signals: without --tty, SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to us
// are forwarded to the guest command (Ctrl-C reaches it, and its exit
// code says so: 130); with --tty our terminal is in raw mode, so Ctrl-C
// is a byte that the guest's terminal turns into SIGINT for its
// foreground job. The session does not end with the CLI's interrupt
// context: the command decides when it ends. Should we be killed, the
// agent connection drops and the guest kills the command.
func (a *app) runInteractive(ctx context.Context, vm *smolvm.VM, spec smolvm.ExecSpec, o interactiveOpts) (int, error) {
	in := os.Stdin
	inTerm := term.IsTerminal(int(in.Fd()))
	sctx := context.WithoutCancel(ctx)
	if o.timeout > 0 {
		var cancel context.CancelFunc
		sctx, cancel = context.WithTimeout(sctx, o.timeout)
		defer cancel()
	}
	if o.tty {
		size := defaultTTYSize
		if r, c, ok := termSize(in, os.Stdout); ok {
			size = smolvm.TTYSize{Rows: r, Cols: c}
		}
		spec.TTY = &size
		if t := os.Getenv("TERM"); t != "" && spec.Term == "" && validTerm(t) {
			spec.Term = t
		}
	}
	// Catch the signals before the session starts: none may kill us
	// between Attach and the forwarding.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGWINCH)
	defer signal.Stop(sigs)

	s, err := vm.Attach(sctx, spec)
	if err != nil {
		return 0, err
	}
	defer s.Close()
	if o.tty && o.stdin && inTerm {
		old, err := term.MakeRaw(int(in.Fd()))
		if err != nil {
			return 0, fmt.Errorf("putting the terminal in raw mode: %w", err)
		}
		defer term.Restore(int(in.Fd()), old)
	}
	if o.stdin {
		go func() {
			_, _ = io.Copy(s.Stdin, in)
			s.Stdin.Close()
		}()
	}
	var outputs sync.WaitGroup
	outputs.Add(2)
	go func() { defer outputs.Done(); _, _ = io.Copy(a.stdout, s.Stdout) }()
	go func() { defer outputs.Done(); _, _ = io.Copy(a.stderr, s.Stderr) }()

	done := make(chan struct{})
	go func() {
		for {
			select {
			case sig := <-sigs:
				if sig == syscall.SIGWINCH {
					if r, c, ok := termSize(in, os.Stdout); ok && o.tty {
						_ = s.Resize(sctx, smolvm.TTYSize{Rows: r, Cols: c})
					}
					continue
				}
				_ = s.Signal(sctx, sig.(syscall.Signal))
			case <-done:
				return
			}
		}
	}()
	code, err := s.Wait()
	close(done)
	outputs.Wait()
	if err != nil {
		if o.timeout > 0 && errors.Is(sctx.Err(), context.DeadlineExceeded) {
			fmt.Fprintf(a.stderr, "smolvm: command timed out after %s (process group killed)\n", o.timeout)
			return 124, nil
		}
		return 0, err
	}
	return code, nil
}

// termSize is the size of the first of the files that is a terminal.
func termSize(files ...*os.File) (rows, cols uint16, ok bool) {
	for _, f := range files {
		if w, h, err := term.GetSize(int(f.Fd())); err == nil && w > 0 && h > 0 {
			return uint16(min(h, 4096)), uint16(min(w, 4096)), true
		}
	}
	return 0, 0, false
}

// validTerm reports whether $TERM can be passed on (a plain name).
func validTerm(t string) bool {
	return len(t) <= 64 && (&smolvm.ExecSpec{Shell: "true", TTY: &defaultTTYSize, Term: t}).Validate() == nil
}

// loginShell runs the guest's login shell: bash when the image has it.
const loginShell = `if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l`

func (a *app) shellCmd() *cobra.Command {
	var tty, noTTY bool
	var envs []string
	var workdir string
	c := &cobra.Command{
		Use:   "shell NAME",
		Short: "Open a login shell in a sandbox (like docker exec -it NAME sh)",
		Long: "Open an interactive login shell (bash when the image has it, else sh) in a running sandbox.\n" +
			"It gets a terminal in the guest when standard input is one (--tty forces it, --no-tty refuses it);\n" +
			"the shell's exit code is the command's.",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if a.json {
				return &smolvm.Error{Message: "sandbox shell is interactive: it has no --json output", Err: smolvm.ErrInvalidConfig}
			}
			env, err := parseEnv(envs)
			if err != nil {
				return err
			}
			o := interactiveOpts{stdin: true, tty: tty || (!noTTY && term.IsTerminal(int(os.Stdin.Fd())))}
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				code, err := a.runInteractive(ctx, vm, smolvm.ExecSpec{Shell: loginShell, Env: env, Cwd: workdir}, o)
				if err != nil {
					return err
				}
				return exitError{code}
			})
		},
	}
	f := c.Flags()
	f.BoolVar(&tty, "tty", false, "give the shell a terminal even when standard input is not one")
	f.BoolVar(&noTTY, "no-tty", false, "no terminal, even when standard input is one")
	f.StringArrayVarP(&envs, "env", "e", nil, "environment variable KEY=VALUE (repeatable)")
	f.StringVarP(&workdir, "workdir", "w", "", "working directory in the guest")
	return c
}

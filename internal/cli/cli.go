package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

// exitError carries a process exit code without an error message (used by
// exec to pass the guest command's exit status through).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

type app struct {
	stdout, stderr io.Writer
	json           bool
	verbose        bool
	dataDir        string
	imageDir       string
	command        string
	out            any // data for the JSON envelope
	exitCode       int
}

// Main runs the CLI and returns the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	a := &app{stdout: stdout, stderr: stderr}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := root.ExecuteContext(ctx)
	return a.finish(err)
}

func (a *app) finish(err error) int {
	code := a.exitCode
	var ee exitError
	switch {
	case errors.As(err, &ee):
		code = ee.code
		err = nil
	case err != nil:
		code = 1
		if smolvm.ErrorCode(err) == "invalid_config" || smolvm.ErrorCode(err) == "invalid_id" {
			code = 2
		}
		if errors.Is(err, smolvm.ErrTimeout) {
			code = 124 // like timeout(1); the host gave up on the guest
		}
	}
	if a.json {
		env := map[string]any{"ok": err == nil && code == 0, "command": a.command, "exit_code": code, "data": a.out, "error": nil}
		if err != nil {
			env["error"] = map[string]any{"code": smolvm.ErrorCode(err), "message": errMessage(err), "recovery": fixText(err)}
		}
		// One line, not indented: an exec result carries up to the output
		// limit per stream, and indenting copies the whole encoding again.
		json.NewEncoder(a.stdout).Encode(env)
		return code
	}
	if err != nil {
		fmt.Fprintf(a.stderr, "error: %s\n", errMessage(err))
		if fix := fixText(err); fix != "" {
			fmt.Fprintf(a.stderr, "fix:   %s\n", fix)
		}
	}
	return code
}

func errMessage(err error) string {
	var e *smolvm.Error
	if errors.As(err, &e) {
		return e.Message
	}
	return err.Error()
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "smolvm",
		Short:         "Disposable, hardware-isolated Linux sandboxes (microVMs) with snapshots",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRun: func(cmd *cobra.Command, args []string) {
			a.command = strings.TrimPrefix(cmd.CommandPath(), "smolvm ")
		},
	}
	pf := root.PersistentFlags()
	pf.BoolVar(&a.json, "json", false, "print one JSON object {ok, command, exit_code, data, error}")
	pf.BoolVarP(&a.verbose, "verbose", "v", false, "log debug details to stderr")
	pf.StringVar(&a.dataDir, "data-dir", "", "state directory (default $SMOLVM_DATA_DIR or ~/.local/state/smolvm)")
	pf.StringVar(&a.imageDir, "image-dir", "", "image cache (default $SMOLVM_IMAGE_DIR or ~/.cache/smolvm/images)")
	root.AddCommand(a.sandboxCmd(), a.imageCmd(), a.templateCmd(), a.doctorCmd(), a.benchCmd(), a.mcpCmd(), a.serveCmd(), a.remoteCmd())
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return &smolvm.Error{Message: err.Error(), Fix: usageFix(c.CommandPath() + " --help"), Err: smolvm.ErrInvalidConfig}
	})
	return root
}

func (a *app) logger() *slog.Logger {
	lvl := slog.LevelInfo
	if a.verbose {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: lvl, ReplaceAttr: func(groups []string, at slog.Attr) slog.Attr {
		if at.Key == slog.TimeKey && len(groups) == 0 {
			return slog.Attr{}
		}
		return at
	}}))
}

// options are the SDK options the global flags select.
func (a *app) options() smolvm.Options {
	return smolvm.Options{DataDir: a.dataDir, ImageDir: a.imageDir, Logger: a.logger()}
}

func (a *app) manager(ctx context.Context) (*smolvm.Manager, error) {
	return smolvm.NewManager(ctx, a.options())
}

// withManager runs fn with a manager that is closed afterwards.
func (a *app) withManager(cmd *cobra.Command, fn func(ctx context.Context, m *smolvm.Manager) error) error {
	ctx := cmd.Context()
	m, err := a.manager(ctx)
	if err != nil {
		return err
	}
	defer m.Close()
	return fn(ctx, m)
}

// print shows data: JSON mode stores it for the envelope, else human runs.
func (a *app) print(data any, human func(w io.Writer)) {
	a.out = data
	if !a.json && human != nil {
		human(a.stdout)
	}
}

func table(w io.Writer, header []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

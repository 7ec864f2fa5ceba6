package cli

import (
	"context"
	"io"
	"os"
	"runtime/debug"

	"github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/mcpserver"
)

// mcpMaxLine bounds one JSON-RPC message read from stdin (a file_write of
// mcpserver.MaxWriteBytes as base64 fits).
const mcpMaxLine = 8 << 20

func (a *app) mcpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "mcp",
		Short: "Serve sandboxes to an AI agent as MCP tools over stdio",
		Long: `Serve sandboxes as Model Context Protocol tools over stdin/stdout (newline-delimited
JSON-RPC), for an MCP client that starts "smolvm mcp" itself. Logs go to stderr only.

Tools: sandbox_create, sandbox_list, sandbox_exec, file_read, file_write,
snapshot_create, snapshot_restore, snapshot_fork, snapshot_list, snapshot_delete,
sandbox_pause, sandbox_resume, sandbox_delete. Sandboxes outlive the session
(they are the same ones "smolvm sandbox list" shows).

Client configuration (Claude Desktop, Cursor, ...):
  {"mcpServers": {"smolvm": {"command": "smolvm", "args": ["mcp"]}}}`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if a.json {
				return &smolvm.Error{Message: "--json does not apply to smolvm mcp (it speaks JSON-RPC on stdout)",
					Fix: usageFix("smolvm mcp"), Err: smolvm.ErrInvalidConfig}
			}
			out, err := a.mcpStdout()
			if err != nil {
				return err
			}
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				// A create may claim a warm pool member: refill as the
				// CLI's creates do (a detached filler).
				s := mcpserver.New(m, cliVersion(), mcpserver.AfterCreate(func() { a.refillPools(ctx, m) }))
				err := s.Run(ctx, &mcp.IOTransport{Reader: os.Stdin, Writer: out, MaxLineLength: mcpMaxLine})
				if ctx.Err() != nil {
					return nil // SIGINT/SIGTERM: a normal end
				}
				return err
			})
		},
	}
}

// mcpStdout is where the JSON-RPC stream goes. When that is the process's
// stdout, the stream gets its own copy of fd 1 and fd 1 is pointed at
// stderr: whatever else writes to stdout (a library, a panic handler)
// lands in the log instead of corrupting the protocol.
func (a *app) mcpStdout() (io.WriteCloser, error) {
	f, ok := a.stdout.(*os.File)
	if !ok || f.Fd() != uintptr(unix.Stdout) {
		return mcpNopCloser{a.stdout}, nil
	}
	fd, err := unix.FcntlInt(uintptr(unix.Stdout), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, err
	}
	if err := unix.Dup3(unix.Stderr, unix.Stdout, 0); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "mcp-stdout"), nil
}

type mcpNopCloser struct{ io.Writer }

func (mcpNopCloser) Close() error { return nil }

// cliVersion is the CLI's version (serve.go's, set by the build), else
// this build's module version ("dev" for a source build).
func cliVersion() string {
	if version != "dev" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

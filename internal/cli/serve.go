package cli

import (
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/server"
)

// version is the daemon's reported version (set by the build, -ldflags -X).
var version = "dev"

func (a *app) serveCmd() *cobra.Command {
	var cfg server.Config
	var tokenFile string
	var printSocket bool
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the HTTP API daemon (unix socket; TCP with --listen)",
		Long: `Run the HTTP API daemon for the data dir: one per data dir. It listens on a unix socket
in the private run dir (mode 0600; --print-socket prints its path), and on TCP with --listen, where
every request needs "Authorization: Bearer <token>" (from $SMOLVM_API_TOKEN, --token-file, or
<data dir>/api-token, created when missing). A non-loopback --listen needs --tls-cert and --tls-key.
SIGTERM or SIGINT shut it down gracefully; sandboxes keep running. The API: GET /openapi.json, docs/api.md.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.Options = a.options()
			if printSocket {
				sock := cfg.Socket
				if sock == "" {
					sock = smolvm.APISocketPath(cfg.Options)
				}
				fmt.Fprintln(a.stdout, sock)
				return nil
			}
			if tokenFile != "" && os.Getenv("SMOLVM_API_TOKEN") == "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return &smolvm.Error{Op: "serve", Message: fmt.Sprintf("--token-file: %v", err), Fix: usageFix("give a readable file holding the token"), Err: smolvm.ErrInvalidConfig}
				}
				cfg.Token = strings.TrimSpace(string(b))
			}
			cfg.Version = version
			ctx := cmd.Context()
			s, err := server.New(ctx, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			return s.Serve(ctx, func() {
				a.logger().Info("smolvm serve ready", "socket", s.Socket(), "pid", os.Getpid())
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Listen, "listen", "", "also listen on TCP HOST:PORT (bearer token required)")
	f.StringVar(&cfg.TLSCert, "tls-cert", "", "TLS certificate for --listen (required off loopback)")
	f.StringVar(&cfg.TLSKey, "tls-key", "", "TLS key for --listen")
	f.StringVar(&tokenFile, "token-file", "", "file holding the bearer token (default $SMOLVM_API_TOKEN, else <data dir>/api-token)")
	f.StringVar(&cfg.Socket, "socket", "", "unix socket path (default: --print-socket's)")
	f.BoolVar(&printSocket, "print-socket", false, "print the unix socket path and exit")
	return cmd
}

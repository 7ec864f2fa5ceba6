package cli

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/lifetime"
	"github.com/smolvm-go/smolvm/internal/mcpserver"
	"github.com/smolvm-go/smolvm/internal/metrics"
	"github.com/smolvm-go/smolvm/internal/server"
	"github.com/smolvm-go/smolvm/internal/wsexec"
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
			cfg.Version = cliVersion()
			ctx := cmd.Context()
			s, err := server.New(ctx, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			if err := wireDaemon(s, cfg.Version, cfg.Options.Logger); err != nil {
				return err
			}
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
	f.Int64Var(&cfg.MaxFileBytes, "max-file-bytes", 4<<30, "largest file an upload or download through the API may hold (bytes)")
	f.IntVar(&cfg.MaxInFlight, "max-in-flight", 64, "long operations and streams (file transfers, exec, create...) in flight at once; more get 429")
	return cmd
}

// wireDaemon gives the daemon the packages it mounts: the lifetime runner
// (internal/lifetime), /metrics and the request metrics around every
// route (internal/metrics), /mcp (internal/mcpserver, with its own body
// cap and deadlines), the interactive exec WebSocket (internal/wsexec, no
// deadline: it lasts as long as its command) and a sandbox's stats. All
// of them are behind the daemon's auth (the socket's 0600, the TCP
// token).
func wireDaemon(s *server.Server, version string, log *slog.Logger) error {
	m := s.Manager()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k, err := lifetime.New(m, log)
	if err != nil {
		return err
	}
	s.SetLifetimes(keeper{k})
	s.Use(metrics.Middleware)
	s.Mount("/metrics", metrics.Handler(m))
	s.Mount("/mcp", mcpserver.HTTPHandler(m, version, mcpserver.AfterCreate(s.RefillPools)))
	s.Mount("GET /v1/sandboxes/{id}/exec/ws", wsexec.Handler(func(r *http.Request) (*smolvm.VM, error) {
		return s.VM(r.Context(), r.PathValue("id"))
	}, wsexec.WithErrorWriter(func(w http.ResponseWriter, _ *http.Request, err error) { server.WriteError(w, err) })))
	s.Mount("GET /v1/sandboxes/{id}/stats", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), statsTimeout)
		defer cancel()
		vm, err := s.VM(ctx, r.PathValue("id"))
		if err != nil {
			server.WriteError(w, err)
			return
		}
		st, err := vm.Stats(ctx)
		if err != nil {
			server.WriteError(w, err)
			return
		}
		server.WriteJSON(w, http.StatusOK, st)
	}))
	return nil
}

// statsTimeout bounds GET /v1/sandboxes/{id}/stats (a quick call).
const statsTimeout = 60 * time.Second

// keeper adapts a lifetime.Keeper to server.Lifetimes (the daemon speaks
// the API's strings; the Keeper its Action).
type keeper struct{ *lifetime.Keeper }

func (k keeper) Set(ctx context.Context, id string, ttl time.Duration, action string, idle time.Duration) error {
	return k.Keeper.Set(ctx, id, ttl, lifetime.Action(action), idle)
}

func (k keeper) AutoPaused(id string) bool {
	l, ok := k.Get(id)
	return ok && l.Paused
}

func (k keeper) Run(ctx context.Context, expired func(id, action string, err error)) error {
	return k.Keeper.Run(ctx, func(id string, a lifetime.Action, err error) { expired(id, string(a), err) })
}

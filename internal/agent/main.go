package agent

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

const usage = `usage:
  smolvm-agent                  as PID 1 (/init): init the VM and serve the host
  smolvm-agent serve [flags]    serve without init duties
  smolvm-agent version

serve flags:
`

// Main is the agent's entry point; it returns the exit status (as PID 1 it
// never returns).
func Main(args []string) int {
	if os.Getpid() == 1 {
		RunInit()
		return 0
	}
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		serveFlags(os.Stderr).PrintDefaults()
		return 2
	}
	switch args[0] {
	case "version", "--version", "-version":
		fmt.Printf("smolvm-agent %s (protocol %d)\n", Version, agentproto.ProtocolVersion)
		return 0
	case "serve":
		return serveMain(args[1:])
	default:
		fmt.Fprintf(os.Stderr, "smolvm-agent: unknown command %q\n%s", args[0], usage)
		return 2
	}
}

type serveConfig struct {
	listen      string
	stdio       bool
	system      bool
	reap        bool
	envFile     string
	profileFile string
}

var serveCfg serveConfig

func serveFlags(out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&serveCfg.listen, "listen", "auto",
		"transport: unix:PATH (behaves like the virtio-serial chardev), virtio:NAME, vsock:PORT, or auto (virtio port "+agentproto.DefaultPortName+", else vsock)")
	fs.BoolVar(&serveCfg.stdio, "stdio", false, "serve one session on stdin/stdout")
	fs.BoolVar(&serveCfg.system, "system", false, "manage the system: set_time, set_identity and shutdown act on this machine")
	fs.BoolVar(&serveCfg.reap, "reap", false, "become a child subreaper and reap every orphan")
	fs.StringVar(&serveCfg.envFile, "env-file", DefaultEnvFile, "persisted environment file")
	fs.StringVar(&serveCfg.profileFile, "profile-file", DefaultProfileFile, "shell profile written by set_env")
	return fs
}

func serveMain(args []string) int {
	fs := serveFlags(os.Stderr)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	c := serveCfg
	if c.reap {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			fmt.Fprintf(os.Stderr, "smolvm-agent: subreaper: %v\n", err)
			return 1
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv := NewServer(Options{System: c.system, Reap: c.reap, EnvFile: c.envFile, ProfileFile: c.profileFile})
	defer srv.Close()
	err := serveOn(ctx, srv, c)
	if err != nil && ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "smolvm-agent: %v\n", err)
		return 1
	}
	return 0
}

func serveOn(ctx context.Context, srv *Server, c serveConfig) error {
	if c.stdio {
		return srv.ServeConn(ctx, stdio{})
	}
	kind, arg, _ := strings.Cut(c.listen, ":")
	switch kind {
	case "auto":
		return serveHost(ctx, srv, agentproto.DefaultPortName)
	case "unix":
		p, err := ListenChardev(arg)
		if err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, agentproto.ReadyLine)
		return srv.ServePort(ctx, p)
	case "virtio":
		path, err := FindVirtioPort(arg)
		if err != nil {
			return err
		}
		p, err := OpenVirtioPort(path)
		if err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, agentproto.ReadyLine)
		return srv.ServePort(ctx, p)
	case "vsock":
		port, err := strconv.ParseUint(arg, 10, 32)
		if err != nil {
			return fmt.Errorf("bad vsock port %q", arg)
		}
		ln, err := ListenVsock(uint32(port))
		if err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, agentproto.ReadyLine)
		return srv.ServeListener(ctx, ln)
	}
	return fmt.Errorf("bad --listen %q", c.listen)
}

type stdio struct{}

func (stdio) Read(p []byte) (int, error)  { return os.Stdin.Read(p) }
func (stdio) Write(p []byte) (int, error) { return os.Stdout.Write(p) }
func (stdio) Close() error                { return os.Stdin.Close() }

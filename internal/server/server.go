// Package server is `smolvm serve`: the HTTP API daemon. Every handler
// calls the SDK (smolvm.Manager, *smolvm.VM), so the CLI, the SDK and the
// daemon share state and locks. The contract is api/openapi.yaml; requests
// are validated against it before a handler runs.
package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/hostprobe"
)

// Lifetimes runs sandbox lifetimes (create's timeout_s / on_timeout /
// idle_timeout_s, POST .../timeout): internal/lifetime implements it (the
// CLI's `serve` adapts its Keeper); the daemon works without one
// (lifetimes are then refused).
type Lifetimes interface {
	Set(ctx context.Context, id string, ttl time.Duration, action string, idle time.Duration) error
	Extend(ctx context.Context, id string, ttl time.Duration) error
	Touch(id string)
	Forget(ctx context.Context, id string) error
	// AutoPaused says the runner paused sandbox id (it is stopped, its
	// memory in a snapshot): start and resume wake it with Resume.
	AutoPaused(id string) bool
	// Resume wakes an auto-paused sandbox (restores its memory) and
	// returns it running.
	Resume(ctx context.Context, id string) (*smolvm.VM, error)
	// Run acts on the lifetimes until ctx ends; expired is called after
	// each action ("pause" or "delete") with its error (nil: done).
	Run(ctx context.Context, expired func(id, action string, err error)) error
}

// Config is the daemon's configuration: one struct for the flags and the
// tests.
type Config struct {
	// Options open the Manager (DataDir, ImageDir, RunDir...). Its Logger,
	// when set, is the daemon's log.
	Options smolvm.Options
	// Socket is the unix socket path; empty: smolvm.APISocketPath(Options).
	Socket string
	// Listen adds a TCP listener ("127.0.0.1:PORT"); every request on it
	// needs the bearer Token. A non-loopback address needs TLSCert and
	// TLSKey.
	Listen          string
	TLSCert, TLSKey string
	// Token is the bearer token for TCP; empty: $SMOLVM_API_TOKEN, else
	// <DataDir>/api-token (created 0600 with 32 random bytes, hex).
	Token string
	// MaxBodyBytes bounds JSON request bodies (default 1 MiB).
	MaxBodyBytes int64
	// RequestTimeout bounds quick calls (default 60 s); LongTimeout long
	// operations: create, start, restore, fork, snapshot, template build
	// (default 10 min). An exec gets its own timeout_s plus ExecGrace.
	RequestTimeout, LongTimeout time.Duration
	// ShutdownTimeout bounds how long a graceful shutdown waits for
	// in-flight requests (default 30 s).
	ShutdownTimeout time.Duration
	// WriteStall bounds how long one streamed event (exec output, progress)
	// may wait for a client that does not read (default 30 s); then the
	// request ends and an exec's command is killed. A command's output is
	// read from the guest only as fast as the client takes it, and the
	// agent connection is shared by every call on the sandbox: a stuck
	// client must not hold the others for longer.
	WriteStall time.Duration
	// MaxFileBytes bounds one file through the API, either way (default 4
	// GiB): an upload whose Content-Length is larger is refused before a
	// byte is read, a chunked one as soon as it passes it, a download the
	// guest announces larger before a byte is spooled (413
	// request_too_large).
	MaxFileBytes int64
	// MaxInFlight bounds the long operations and streams (file transfers,
	// create, snapshot, exec, events...) in flight at once (default 64);
	// one more gets 429 too_many_requests with Retry-After. Every local
	// caller is one client, and so is every holder of the bearer token:
	// the bound is global. Quick calls (health, version, lists) are never
	// refused.
	MaxInFlight int
	// Lifetimes, when set, runs sandbox lifetimes (its Run runs with Serve).
	Lifetimes Lifetimes
	// Extra mounts handlers of other packages: the key is a net/http
	// pattern ("/metrics", "/mcp", "GET /v1/sandboxes/{id}/exec/ws").
	// They are behind the same auth, and outside the spec's validation.
	Extra map[string]http.Handler
	// Version is reported by /v1/health and /v1/version.
	Version string
}

const (
	defaultMaxBody        = 1 << 20
	defaultRequestTimeout = 60 * time.Second
	defaultLongTimeout    = 10 * time.Minute
	defaultMaxFile        = 4 << 30
	defaultMaxInFlight    = 64
	// ExecGrace is added to an exec's timeout_s for its request deadline.
	ExecGrace = 30 * time.Second
	// maxExecTimeout bounds an exec's timeout_s (and one without: the
	// request deadline of an exec that asks for none).
	maxExecTimeout = 24 * time.Hour
)

func (c Config) withDefaults() Config {
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = defaultMaxBody
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = defaultRequestTimeout
	}
	if c.LongTimeout <= 0 {
		c.LongTimeout = defaultLongTimeout
	}
	if c.WriteStall <= 0 {
		c.WriteStall = 30 * time.Second
	}
	if c.MaxFileBytes <= 0 {
		c.MaxFileBytes = defaultMaxFile
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = defaultMaxInFlight
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = 30 * time.Second
	}
	if c.Options.Logger == nil {
		c.Options.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	if c.Socket == "" {
		c.Socket = smolvm.APISocketPath(c.Options)
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	return c
}

// Server is a running daemon's state.
type Server struct {
	cfg    Config
	log    *slog.Logger
	m      *smolvm.Manager
	lock   *os.File
	token  []byte
	events *broker
	mw     []func(http.Handler) http.Handler
	h      http.Handler
	hOnce  sync.Once
	val    *validator

	mu  sync.Mutex
	vms map[string]*smolvm.VM // open handles (agent connections), by id

	// inFlight holds a token per long operation or stream running
	// (Config.MaxInFlight).
	inFlight chan struct{}
	// freeSpace is hostprobe.FreeSpace (a test sets a full disk).
	freeSpace func(dir string) (uint64, string, error)

	// stopping is closed when a graceful shutdown begins: endless streams
	// (events) end then.
	stopping    chan struct{}
	tcpAddr     string      // the TCP listener's address, once Serve listens
	filling     atomic.Bool // a warm pool refill runs (RefillPools)
	refillAgain atomic.Bool // RefillPools was called since the last round began
}

// ErrRunning is wrapped when another daemon serves the data dir.
var ErrRunning = errors.New("a smolvm daemon already serves this data dir")

// New takes the data dir's daemon lock, opens the Manager and reconciles
// the state with what runs. Close releases it.
func New(ctx context.Context, cfg Config) (*Server, error) {
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg, log: cfg.Options.Logger, events: newBroker(), vms: map[string]*smolvm.VM{}, stopping: make(chan struct{}),
		inFlight: make(chan struct{}, cfg.MaxInFlight), freeSpace: hostprobe.FreeSpace}
	opts := cfg.Options
	opts.Logger = slog.New(progressHandler{cfg.Options.Logger.Handler()})
	m, err := smolvm.NewManager(ctx, opts)
	if err != nil {
		return nil, err
	}
	s.m = m
	if s.lock, err = lockDataDir(m.DataDir()); err != nil {
		m.Close()
		return nil, err
	}
	if cfg.Listen != "" {
		if err := s.checkListen(); err != nil {
			s.Close()
			return nil, err
		}
		if s.token, err = loadToken(cfg.Token, m.DataDir()); err != nil {
			s.Close()
			return nil, err
		}
	}
	// Transfers spooled by a daemon that died (handlers.go: putFile, getFile).
	spooled, _ := filepath.Glob(filepath.Join(m.DataDir(), ".upload-*"))
	down, _ := filepath.Glob(filepath.Join(m.DataDir(), ".download-*"))
	for _, f := range append(spooled, down...) {
		os.Remove(f)
	}
	n, removed, err := m.Reconcile(ctx)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.log.Info("state reconciled", "vms", n, "leftovers_removed", removed)
	if s.val, err = newValidator(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// lockDataDir takes <DataDir>/serve.lock (flock, held while the daemon
// runs) and writes our pid in it; a held lock names its holder.
func lockDataDir(dataDir string) (*os.File, error) {
	path := filepath.Join(dataDir, "serve.lock")
	f, err := fsutil.TryLock(path)
	if errors.Is(err, fsutil.ErrBusy) {
		pid := "unknown"
		if b, rerr := os.ReadFile(path); rerr == nil && len(b) > 0 && len(b) < 32 {
			pid = strings.TrimSpace(string(b))
		}
		return nil, &smolvm.Error{Op: "serve", Message: fmt.Sprintf("a smolvm daemon (pid %s) already serves %s", pid, dataDir),
			Fix: smolvm.Fix{Action: smolvm.FixKillProcess, Args: map[string]string{smolvm.ArgPID: pid}}, Err: ErrRunning}
	}
	if err != nil {
		return nil, err
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

// checkListen refuses a non-loopback TCP address without TLS.
func (s *Server) checkListen() error {
	host, _, err := net.SplitHostPort(s.cfg.Listen)
	if err != nil {
		return &smolvm.Error{Op: "serve", Message: fmt.Sprintf("--listen %q: %v", s.cfg.Listen, err), Err: smolvm.ErrInvalidConfig}
	}
	if (s.cfg.TLSCert == "") != (s.cfg.TLSKey == "") {
		return &smolvm.Error{Op: "serve", Message: "--tls-cert and --tls-key go together", Err: smolvm.ErrInvalidConfig}
	}
	ip := net.ParseIP(host)
	loopback := host == "localhost" || (ip != nil && ip.IsLoopback())
	if !loopback && s.cfg.TLSCert == "" {
		return &smolvm.Error{Op: "serve", Message: fmt.Sprintf("--listen %s is not a loopback address: it needs --tls-cert and --tls-key (the bearer token must not cross a network in clear)", s.cfg.Listen),
			Err: smolvm.ErrInvalidConfig}
	}
	return nil
}

// loadToken: the configured token, else $SMOLVM_API_TOKEN, else the
// token file (created 0600, atomically, when missing).
func loadToken(tok, dataDir string) ([]byte, error) {
	if tok == "" {
		tok = os.Getenv("SMOLVM_API_TOKEN")
	}
	if tok == "" {
		path := filepath.Join(dataDir, "api-token")
		b, err := readPrivate(path)
		switch {
		case err == nil:
			tok = strings.TrimSpace(string(b))
		case errors.Is(err, os.ErrNotExist):
			raw := make([]byte, 32)
			rand.Read(raw)
			tok = hex.EncodeToString(raw)
			if err := fsutil.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
				return nil, err
			}
		default:
			return nil, err
		}
	}
	if len(tok) < 16 {
		return nil, &smolvm.Error{Op: "serve", Message: "the API token is shorter than 16 characters", Err: smolvm.ErrInvalidConfig}
	}
	return []byte(tok), nil
}

// readPrivate reads a token file that must be a regular file of ours with
// no group or other permission.
func readPrivate(path string) ([]byte, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o077 != 0 || !ownedByUs(st) {
		return nil, &smolvm.Error{Op: "serve", Message: fmt.Sprintf("token file %s must be a regular file of this user with mode 0600", path),
			Fix: smolvm.Fix{Action: smolvm.FixEditOption, Args: map[string]string{smolvm.ArgOption: "api-token", smolvm.ArgHint: "chmod 600 " + path + " (or remove it: a new one is made)"}},
			Err: smolvm.ErrInvalidConfig}
	}
	return os.ReadFile(path)
}

// Handler is the daemon's whole HTTP handler (auth is per listener: see
// Serve).
// Handler is built on first use (by Serve at the latest): Mount what
// goes in before.
func (s *Server) Handler() http.Handler {
	s.hOnce.Do(func() {
		s.h = s.routes()
		for _, mw := range s.mw {
			s.h = mw(s.h)
		}
	})
	return s.h
}

// Use wraps the whole handler (every route, mounted ones too) in mw, as
// metrics.Middleware; the last Use is the outermost. Call it before
// Handler or Serve.
func (s *Server) Use(mw func(http.Handler) http.Handler) { s.mw = append(s.mw, mw) }

// SetLifetimes sets Config.Lifetimes once the Server (its Manager) exists:
// the lifetime runner needs the Manager. Call it before Serve.
func (s *Server) SetLifetimes(l Lifetimes) { s.cfg.Lifetimes = l }

// WriteError writes err in the API's one error shape, with its status
// (for the handlers mounted from other packages).
func WriteError(w http.ResponseWriter, err error) { writeError(w, err) }

// WriteJSON writes v as a JSON response with status.
func WriteJSON(w http.ResponseWriter, status int, v any) { writeJSON(w, status, v) }

// Mount adds a handler of another package (as Config.Extra does) for
// handlers that need the Server (its Manager, VM, Publish). Call it before
// Handler or Serve.
func (s *Server) Mount(pattern string, h http.Handler) {
	if s.cfg.Extra == nil {
		s.cfg.Extra = map[string]http.Handler{}
	}
	s.cfg.Extra[pattern] = h
}

// VM is the daemon's shared handle on sandbox id (its agent connection is
// shared by every request): for the handlers mounted from other packages.
// Do not Close it.
// A call through it is activity on the sandbox (its idle timeout starts
// again).
func (s *Server) VM(ctx context.Context, id string) (*smolvm.VM, error) {
	vm, err := s.vm(ctx, id)
	if err != nil {
		return nil, s.gone(id, err)
	}
	s.touch(id)
	return vm, nil
}

// Publish sends a lifecycle event to /v1/events subscribers (the lifetime
// runner publishes sandbox.expired).
func (s *Server) Publish(typ, id string) { s.events.publish(Event{Type: typ, ID: id}) }

// Manager is the daemon's SDK manager (for the packages mounted in Extra).
func (s *Server) Manager() *smolvm.Manager { return s.m }

// Socket is the unix socket path the daemon listens on.
func (s *Server) Socket() string { return s.cfg.Socket }

// Serve listens on the unix socket (and TCP when configured) until ctx is
// done, then shuts down gracefully: no new connections, in-flight requests
// get ShutdownTimeout to finish, sandboxes keep running. ready, when not
// nil, is called once the listeners accept.
func (s *Server) Serve(ctx context.Context, ready func()) error {
	ul, err := listenUnix(s.cfg.Socket)
	if err != nil {
		return err
	}
	h := s.Handler()
	servers := []*http.Server{s.httpServer(h)}
	listeners := []net.Listener{ul}
	if s.cfg.Listen != "" {
		tl, err := net.Listen("tcp", s.cfg.Listen)
		if err != nil {
			ul.Close()
			return &smolvm.Error{Op: "serve", Message: fmt.Sprintf("listen on %s: %v", s.cfg.Listen, err), Err: err}
		}
		if s.cfg.TLSCert != "" {
			cert, err := tls.LoadX509KeyPair(s.cfg.TLSCert, s.cfg.TLSKey)
			if err != nil {
				ul.Close()
				tl.Close()
				return &smolvm.Error{Op: "serve", Message: fmt.Sprintf("TLS: %v", err), Err: smolvm.ErrInvalidConfig}
			}
			tl = tls.NewListener(tl, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		}
		s.tcpAddr = tl.Addr().String()
		servers = append(servers, s.httpServer(s.requireToken(h)))
		listeners = append(listeners, tl)
		s.log.Info("listening", "tcp", tl.Addr().String(), "tls", s.cfg.TLSCert != "")
	}
	s.log.Info("listening", "socket", s.cfg.Socket)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, len(servers)+1)
	for i := range servers {
		go func() { errc <- servers[i].Serve(listeners[i]) }()
	}
	if s.cfg.Lifetimes != nil {
		go func() {
			if err := s.cfg.Lifetimes.Run(ctx, s.expired); err != nil && ctx.Err() == nil {
				s.log.Error("lifetimes stopped", "err", err)
			}
		}()
	}
	if ready != nil {
		ready()
	}
	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-errc:
	}
	s.log.Info("shutting down; sandboxes keep running")
	close(s.stopping)
	sctx, scancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer scancel()
	for _, hs := range servers {
		if err := hs.Shutdown(sctx); err != nil {
			hs.Close()
		}
	}
	os.Remove(s.cfg.Socket)
	if errors.Is(serveErr, http.ErrServerClosed) {
		serveErr = nil
	}
	return serveErr
}

func (s *Server) httpServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		MaxHeaderBytes: 64 << 10, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
}

// listenUnix listens on path in a private dir (made 0700, or checked to be
// ours and private), mode 0600. A stale socket (nobody answers) is
// replaced; the daemon lock says nobody else serves this data dir.
func listenUnix(path string) (net.Listener, error) {
	if err := fsutil.PrivateDir(filepath.Dir(path)); err != nil {
		return nil, &smolvm.Error{Op: "serve", Message: fmt.Sprintf("socket dir %s: %v", filepath.Dir(path), err), Err: err}
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, &smolvm.Error{Op: "serve", Message: fmt.Sprintf("%s exists and is not a socket; remove it", path), Err: smolvm.ErrInvalidConfig}
		}
		os.Remove(path)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, &smolvm.Error{Op: "serve", Message: fmt.Sprintf("listen on %s: %v", path, err), Err: err}
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, err
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	return l, nil
}

// requireToken checks "Authorization: Bearer T" in constant time.
func (s *Server) requireToken(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), s.token) != 1 {
			writeError(w, errCode(codeUnauthorized, "missing or wrong bearer token (Authorization: Bearer <token from SMOLVM_API_TOKEN or <data dir>/api-token>)"))
			return
		}
		h.ServeHTTP(w, r)
	})
}

// Close closes the VM handles and the Manager and releases the lock. VMs
// keep running.
func (s *Server) Close() error {
	s.mu.Lock()
	for id, vm := range s.vms {
		vm.Close()
		delete(s.vms, id)
	}
	s.mu.Unlock()
	var err error
	if s.m != nil {
		err = s.m.Close()
	}
	if s.lock != nil {
		s.lock.Close()
	}
	return err
}

func ownedByUs(st os.FileInfo) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	return ok && int(sys.Uid) == os.Geteuid()
}

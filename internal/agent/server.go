package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// Version is the agent version, reported by hello and info. Set it with
// -ldflags "-X github.com/smolvm-go/smolvm/internal/agent.Version=...".
var Version = "dev"

// Default locations of the persisted environment.
const (
	DefaultEnvFile     = "/etc/smolvm/env"
	DefaultProfileFile = "/etc/profile.d/smolvm_env.sh"
)

// DefaultEnv is the base environment of every process the agent starts.
var DefaultEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
}

// Options configure a Server.
type Options struct {
	// System lets the agent manage the machine: set_time, set_identity and
	// shutdown act on the system clock, hostname, entropy pool and power.
	// Without it (and without the hooks below) they fail with "unsupported".
	System bool
	// Reap makes the agent reap every child process, including orphans
	// reparented to it (it is PID 1 or a child subreaper). Without it the
	// agent waits only for the processes it started.
	Reap bool
	// EnvFile is where set_env persists the environment (JSON object);
	// default DefaultEnvFile. ProfileFile receives the same variables as
	// shell exports for login shells; default DefaultProfileFile.
	EnvFile     string
	ProfileFile string
	// BaseEnv is the environment below the persisted one; default DefaultEnv.
	BaseEnv []string
	// Logf logs diagnostics; default log.Printf.
	Logf func(format string, args ...any)

	// Hooks replacing the system operations (tests). When nil, the real
	// operation is used if System is set.
	SetTime     func(time.Time) error
	SetIdentity func(hostname string, seed []byte) error
	PowerOff    func(reboot bool) error
}

// Server executes protocol requests. One Server serves any number of
// sessions at once.
type Server struct {
	opts  Options
	procs *procTable
	start time.Time

	envMu sync.Mutex
	env   map[string]string // persisted environment
}

// NewServer returns a Server. It loads the persisted environment and, with
// Options.Reap, starts reaping children; call Close to stop.
func NewServer(opts Options) *Server {
	if opts.EnvFile == "" {
		opts.EnvFile = DefaultEnvFile
	}
	if opts.ProfileFile == "" {
		opts.ProfileFile = DefaultProfileFile
	}
	if opts.BaseEnv == nil {
		opts.BaseEnv = DefaultEnv
	}
	if opts.Logf == nil {
		opts.Logf = log.Printf
	}
	s := &Server{opts: opts, start: time.Now()}
	s.procs = newProcTable(opts.Reap)
	env, err := loadEnvFile(opts.EnvFile)
	if err != nil {
		opts.Logf("smolvm-agent: %v", err)
	}
	s.env = env
	return s
}

// Close stops the reaper. Processes keep running.
func (s *Server) Close() error {
	s.procs.close()
	return nil
}

func (s *Server) logf(format string, args ...any) { s.opts.Logf("smolvm-agent: "+format, args...) }

// msgWriter sends whole messages to the host.
type msgWriter interface {
	WriteMsg(b []byte) error
}

// Port is a byte stream to the host that outlives host connections, like a
// virtio-serial port. Read returns io.EOF while the host is disconnected (a
// partial line read before must then be discarded). WriteMsg writes one
// whole message, or drops it when no host is connected. WaitHost blocks
// until reading again is worthwhile (a short sleep or a new connection).
type Port interface {
	io.Reader
	WriteMsg(b []byte) error
	WaitHost(ctx context.Context)
	Close() error
}

// ServePort serves one long-lived session on p until ctx ends. Host
// disconnects do not end it.
func (s *Server) ServePort(ctx context.Context, p Port) error {
	stop := context.AfterFunc(ctx, func() { p.Close() })
	defer stop()
	ss := s.newSession(ctx, p)
	lr := agentproto.NewLineReader(p, agentproto.MaxMessageSize)
	for {
		line, err := lr.ReadLine()
		if err != nil {
			var tl *agentproto.TooLongError
			if errors.As(err, &tl) {
				ss.tooLong(tl)
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			if !errors.Is(err, io.EOF) {
				s.logf("read: %v", err)
			}
			lr.Reset()
			p.WaitHost(ctx)
			continue
		}
		ss.handle(line)
	}
}

// ServeConn serves one session on conn until it reaches EOF or fails, or
// ctx ends. It closes conn.
func (s *Server) ServeConn(ctx context.Context, conn io.ReadWriteCloser) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	ss := s.newSession(ctx, &streamWriter{w: conn})
	lr := agentproto.NewLineReader(conn, agentproto.MaxMessageSize)
	for {
		line, err := lr.ReadLine()
		if err != nil {
			var tl *agentproto.TooLongError
			if errors.As(err, &tl) {
				ss.tooLong(tl)
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				// The host may have only closed its sending side: let
				// requests in flight finish and answer.
				ss.wg.Wait()
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		ss.handle(line)
	}
}

// ServeListener serves every connection accepted on ln in its own session
// until ctx ends or Accept fails.
func (s *Server) ServeListener(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Transient (EMFILE, ECONNABORTED...): back off and retry.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.logf("accept: %v", err)
			time.Sleep(delay)
			continue
		}
		delay = 0
		go func() {
			if err := s.ServeConn(ctx, c); err != nil && ctx.Err() == nil {
				s.logf("session: %v", err)
			}
		}()
	}
}

// streamWriter writes whole messages to a stream, one at a time.
type streamWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (sw *streamWriter) WriteMsg(b []byte) error {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	_, err := sw.w.Write(b)
	return err
}

// misbehave, when set (only in agents built with the smolvm_hostile tag, for
// tests), may take a request before the normal handling and answer it
// wrongly on purpose; it returns true when it did.
var misbehave func(ss *session, h agentproto.Header, line []byte) bool

// session is one request stream from the host.
type session struct {
	srv *Server
	ctx context.Context // the server's: requests outlive the session
	w   msgWriter

	mu      sync.Mutex
	cancels map[uint64]context.CancelFunc // running execs by request id
	wg      sync.WaitGroup                // requests in flight
}

func (s *Server) newSession(ctx context.Context, w msgWriter) *session {
	return &session{srv: s, ctx: ctx, w: w, cancels: map[uint64]context.CancelFunc{}}
}

func (ss *session) send(id uint64, typ string, payload any) {
	b, err := agentproto.Marshal(id, typ, payload)
	if err != nil {
		ss.srv.logf("encode %s: %v", typ, err)
		b, err = agentproto.Marshal(id, agentproto.TypeError, toProtoError(err))
		if err != nil {
			return
		}
	}
	// Errors mean the host is gone; the reply is lost, which the protocol
	// tolerates (the host resyncs and drops what it no longer waits for).
	_ = ss.w.WriteMsg(b)
}

func (ss *session) sendError(id uint64, err error) {
	ss.send(id, agentproto.TypeError, toProtoError(err))
}

func (ss *session) tooLong(tl *agentproto.TooLongError) {
	id, ok := agentproto.PeekID(tl.Prefix)
	ss.srv.logf("dropped a message over %d bytes", agentproto.MaxMessageSize)
	if ok {
		ss.sendError(id, &agentproto.Error{Code: agentproto.CodeTooLarge,
			Message: fmt.Sprintf("message exceeds %d bytes", agentproto.MaxMessageSize)})
	}
}

func invalid(format string, args ...any) error {
	return &agentproto.Error{Code: agentproto.CodeInvalid, Message: fmt.Sprintf(format, args...)}
}

// handle dispatches one request line. Quick requests are answered inline;
// anything that may block runs in its own goroutine. The line is decoded
// before handle returns (the buffer is reused).
func (ss *session) handle(line []byte) {
	h, err := agentproto.DecodeHeader(line)
	if err != nil {
		if id, ok := agentproto.PeekID(line); ok {
			ss.sendError(id, invalid("%v", err))
		} else {
			ss.srv.logf("ignoring malformed line (%d bytes): %q", len(line), truncate(line, 80))
		}
		return
	}
	if misbehave != nil && misbehave(ss, h, line) {
		return // a test-only build (tag smolvm_hostile) took the request
	}
	id := h.ID
	decode := func(v any) bool {
		if err := agentproto.DecodePayload(line, v); err != nil {
			ss.sendError(id, invalid("%s: %v", h.Type, err))
			return false
		}
		return true
	}
	// reply runs f in a goroutine and sends its result.
	reply := func(f func() (string, any, error)) {
		ss.wg.Add(1)
		go func() {
			defer ss.wg.Done()
			defer ss.recoverPanic(id)
			typ, payload, err := f()
			if err != nil {
				ss.sendError(id, err)
				return
			}
			ss.send(id, typ, payload)
		}()
	}
	s := ss.srv
	switch h.Type {
	case agentproto.TypePing:
		ss.send(id, agentproto.TypePong, nil)
	case agentproto.TypeHello:
		var req agentproto.HelloRequest
		if decode(&req) {
			ss.send(id, agentproto.TypeHello, agentproto.Hello{
				Nonce:           req.Nonce,
				ProtocolVersion: agentproto.ProtocolVersion,
				AgentVersion:    Version,
				BootID:          bootID(),
			})
		}
	case agentproto.TypeCancel:
		ss.mu.Lock()
		cancel := ss.cancels[id]
		ss.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	case agentproto.TypeInfo:
		reply(func() (string, any, error) { return agentproto.TypeInfo, s.info(), nil })
	case agentproto.TypeExec:
		var req agentproto.ExecRequest
		if decode(&req) {
			ss.startExec(id, req)
		}
	case agentproto.TypeWriteFile:
		var req agentproto.WriteFileRequest
		if decode(&req) {
			reply(func() (string, any, error) { return agentproto.TypeOK, nil, writeFile(req) })
		}
	case agentproto.TypeWriteChunk:
		var req agentproto.WriteChunkRequest
		if decode(&req) {
			reply(func() (string, any, error) { return agentproto.TypeOK, nil, writeChunk(req) })
		}
	case agentproto.TypeCommitFile:
		var req agentproto.CommitFileRequest
		if decode(&req) {
			reply(func() (string, any, error) { return agentproto.TypeOK, nil, commitFile(req) })
		}
	case agentproto.TypeRemoveFile:
		var req agentproto.RemoveFileRequest
		if decode(&req) {
			reply(func() (string, any, error) { return agentproto.TypeOK, nil, removeFile(req) })
		}
	case agentproto.TypeReadChunk:
		var req agentproto.ReadChunkRequest
		if decode(&req) {
			reply(func() (string, any, error) {
				ch, err := readChunk(req)
				return agentproto.TypeChunk, ch, err
			})
		}
	case agentproto.TypeReadFile:
		var req agentproto.ReadFileRequest
		if decode(&req) {
			reply(func() (string, any, error) {
				fd, err := readFile(req.Path)
				return agentproto.TypeFile, fd, err
			})
		}
	case agentproto.TypeSetEnv:
		var req agentproto.SetEnvRequest
		if decode(&req) {
			reply(func() (string, any, error) { return agentproto.TypeOK, nil, s.setEnv(req) })
		}
	case agentproto.TypeGetEnv:
		reply(func() (string, any, error) { return agentproto.TypeEnv, agentproto.EnvData{Env: s.getEnv()}, nil })
	case agentproto.TypeSync:
		reply(func() (string, any, error) { syscall.Sync(); return agentproto.TypeOK, nil, nil })
	case agentproto.TypeSetTime:
		// Inline, not in a goroutine: every request read after it on this
		// session sees the new clock, so the host need not wait for the
		// reply before sending its next request (agentclient.SendSetTime).
		var req agentproto.SetTimeRequest
		if decode(&req) {
			if err := s.setTime(time.Unix(0, req.UnixNanos)); err != nil {
				ss.sendError(id, err)
			} else {
				ss.send(id, agentproto.TypeOK, nil)
			}
		}
	case agentproto.TypeSetIdentity:
		var req agentproto.SetIdentityRequest
		if decode(&req) {
			reply(func() (string, any, error) { return agentproto.TypeOK, nil, s.setIdentity(req) })
		}
	case agentproto.TypeShutdown:
		var req agentproto.ShutdownRequest
		if decode(&req) {
			ss.wg.Add(1)
			go func() {
				defer ss.wg.Done()
				defer ss.recoverPanic(id)
				ss.shutdown(id, req.Reboot)
			}()
		}
	default:
		ss.sendError(id, &agentproto.Error{Code: agentproto.CodeUnknownType, Message: "unknown request type " + h.Type})
	}
}

func (ss *session) recoverPanic(id uint64) {
	if r := recover(); r != nil {
		ss.srv.logf("panic handling request %d: %v\n%s", id, r, debug.Stack())
		ss.sendError(id, &agentproto.Error{Code: agentproto.CodeInternal, Message: fmt.Sprint("agent panic: ", r)})
	}
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// toProtoError converts an error to its wire form.
func toProtoError(err error) *agentproto.Error {
	var pe *agentproto.Error
	if errors.As(err, &pe) {
		return pe
	}
	code := agentproto.CodeIO
	switch {
	case errors.Is(err, agentproto.ErrTooLarge):
		code = agentproto.CodeTooLarge
	case errors.Is(err, fs.ErrNotExist):
		code = agentproto.CodeNotFound
	case errors.Is(err, fs.ErrPermission):
		code = agentproto.CodePermission
	case errors.Is(err, fs.ErrExist):
		code = agentproto.CodeExists
	case errors.Is(err, syscall.EISDIR):
		code = agentproto.CodeIsDir
	case errors.Is(err, syscall.ENOSYS), errors.Is(err, errors.ErrUnsupported):
		code = agentproto.CodeUnsupported
	}
	return &agentproto.Error{Code: code, Message: err.Error()}
}

func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return string(bytes.TrimSpace(b))
}

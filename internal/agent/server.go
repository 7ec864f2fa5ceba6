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
	"sync/atomic"
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

	handlers map[string]handler // by request type

	interactiveSlots chan struct{} // one token per running interactive exec

	// Requests in the background, the heap allocations counted at the
	// last memory release and the release scheduled (memory.go).
	active       atomic.Int64
	memMu        sync.Mutex
	releasedAt   uint64
	releaseTimer *time.Timer
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
	s := &Server{opts: opts, start: time.Now(), interactiveSlots: make(chan struct{}, agentproto.MaxInteractive)}
	s.procs = newProcTable(opts.Reap)
	s.handlers = s.newHandlers()
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
		err := ss.serveLines(lr)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, net.ErrClosed) {
			return err
		}
		if !errors.Is(err, io.EOF) {
			s.logf("read: %v", err)
		}
		ss.hostGone()
		lr.Reset()
		p.WaitHost(ctx)
	}
}

// ServeConn serves one session on conn until it reaches EOF or fails, or
// ctx ends. It closes conn.
func (s *Server) ServeConn(ctx context.Context, conn io.ReadWriteCloser) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	ss := s.newSession(ctx, &streamWriter{w: conn})
	err := ss.serveLines(agentproto.NewLineReader(conn, agentproto.MaxMessageSize))
	ss.hostGone()
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, io.EOF):
		// The host may have only closed its sending side: let requests
		// in flight finish and answer.
		ss.wg.Wait()
		return nil
	case errors.Is(err, net.ErrClosed):
		return nil
	}
	return err
}

// serveLines handles the requests lr reads, answering a line over the
// limit with an error, until reading fails; it returns that error.
func (ss *session) serveLines(lr *agentproto.LineReader) error {
	for {
		line, err := lr.ReadLine()
		if err == nil {
			ss.handle(line)
			continue
		}
		var tl *agentproto.TooLongError
		if !errors.As(err, &tl) {
			return err
		}
		ss.tooLong(tl)
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

	mu          sync.Mutex
	cancels     map[uint64]context.CancelFunc // running execs by request id
	interactive map[uint64]*interactive       // running interactive execs by request id
	wg          sync.WaitGroup                // requests in flight
}

func (s *Server) newSession(ctx context.Context, w msgWriter) *session {
	return &session{srv: s, ctx: ctx, w: w, cancels: map[uint64]context.CancelFunc{}, interactive: map[uint64]*interactive{}}
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
	r := request{ss: ss, id: h.ID, typ: h.Type, line: line}
	if handler := ss.srv.handlers[h.Type]; handler != nil {
		handler(r)
		return
	}
	ss.sendError(h.ID, &agentproto.Error{Code: agentproto.CodeUnknownType, Message: "unknown request type " + h.Type})
}

// request is one request being handled: its header and its line (valid
// only until the handler returns).
type request struct {
	ss   *session
	id   uint64
	typ  string
	line []byte
}

// decode decodes the payload into v, answering an invalid request itself.
func (r request) decode(v any) bool {
	if err := agentproto.DecodePayload(r.line, v); err != nil {
		r.ss.sendError(r.id, invalid("%s: %v", r.typ, err))
		return false
	}
	return true
}

// background runs f in its own goroutine, counted in the session's
// requests in flight; a panic in f is answered as an internal error.
func (r request) background(f func()) {
	r.ss.wg.Add(1)
	r.ss.srv.beginRequest()
	go func() {
		defer r.ss.wg.Done()
		defer r.ss.srv.endRequest()
		defer r.ss.recoverPanic(r.id)
		f()
	}()
}

// reply runs f in the background and sends its result.
func (r request) reply(f func() (string, any, error)) {
	r.background(func() { r.answer(f()) })
}

// answer sends a reply of type typ, or err when it is not nil.
func (r request) answer(typ string, payload any, err error) {
	if err != nil {
		r.ss.sendError(r.id, err)
		return
	}
	r.ss.send(r.id, typ, payload)
}

// handler handles one request type.
type handler func(request)

// withPayload decodes a Req and passes it to f.
func withPayload[Req any](f func(request, Req)) handler {
	return func(r request) {
		var req Req
		if r.decode(&req) {
			f(r, req)
		}
	}
}

// okReply decodes a Req and answers TypeOK (or op's error) from the
// background.
func okReply[Req any](op func(Req) error) handler {
	return withPayload(func(r request, req Req) {
		r.reply(func() (string, any, error) { return agentproto.TypeOK, nil, op(req) })
	})
}

// dataReply decodes a Req and answers op's result as typ from the
// background.
func dataReply[Req, Resp any](typ string, op func(Req) (Resp, error)) handler {
	return withPayload(func(r request, req Req) {
		r.reply(func() (string, any, error) {
			v, err := op(req)
			return typ, v, err
		})
	})
}

// newHandlers maps every request type to its handler.
func (s *Server) newHandlers() map[string]handler {
	return map[string]handler{
		agentproto.TypePing:  func(r request) { r.ss.send(r.id, agentproto.TypePong, nil) },
		agentproto.TypeHello: withPayload(handleHello),
		agentproto.TypeCancel: func(r request) {
			r.ss.cancelExec(r.id)
		},
		agentproto.TypeInfo: func(r request) {
			r.reply(func() (string, any, error) { return agentproto.TypeInfo, s.info(), nil })
		},
		agentproto.TypeExec: withPayload(func(r request, req agentproto.ExecRequest) {
			r.ss.startExec(r.id, req)
		}),
		agentproto.TypeStdin:      withPayload(handleStdin),
		agentproto.TypeResize:     withPayload(handleResize),
		agentproto.TypeSignal:     withPayload(handleSignal),
		agentproto.TypeWriteFile:  okReply(writeFile),
		agentproto.TypeWriteChunk: okReply(writeChunk),
		agentproto.TypeCommitFile: okReply(commitFile),
		agentproto.TypeRemoveFile: okReply(removeFile),
		agentproto.TypeReadChunk:  dataReply(agentproto.TypeChunk, readChunk),
		agentproto.TypeReadFile: dataReply(agentproto.TypeFile, func(req agentproto.ReadFileRequest) (agentproto.FileData, error) {
			return readFile(req.Path)
		}),
		agentproto.TypeSetEnv: okReply(s.setEnv),
		agentproto.TypeGetEnv: func(r request) {
			r.reply(func() (string, any, error) { return agentproto.TypeEnv, agentproto.EnvData{Env: s.getEnv()}, nil })
		},
		agentproto.TypeSync: func(r request) {
			r.reply(func() (string, any, error) {
				if s.opts.System {
					persistIdentityFiles("/", s.logf) // the disk alone must name the VM
				}
				syscall.Sync()
				return agentproto.TypeOK, nil, nil
			})
		},
		// Inline, not in the background: every request read after it on
		// this session sees the new clock, so the host need not wait for
		// the reply before sending its next request
		// (agentclient.SendSetTime).
		agentproto.TypeSetTime: withPayload(func(r request, req agentproto.SetTimeRequest) {
			r.answer(agentproto.TypeOK, nil, s.setTime(time.Unix(0, req.UnixNanos)))
		}),
		agentproto.TypeSetIdentity: okReply(s.setIdentity),
		agentproto.TypeShutdown: withPayload(func(r request, req agentproto.ShutdownRequest) {
			r.background(func() { r.ss.shutdown(r.id, req.Reboot) })
		}),
	}
}

func handleHello(r request, req agentproto.HelloRequest) {
	r.ss.send(r.id, agentproto.TypeHello, agentproto.Hello{
		Nonce:           req.Nonce,
		ProtocolVersion: agentproto.ProtocolVersion,
		AgentVersion:    Version,
		// No BootID: reading it would fix it (agentproto.Hello).
	})
}

// cancelExec cancels the running exec of request id, if any.
func (ss *session) cancelExec(id uint64) {
	ss.mu.Lock()
	cancel := ss.cancels[id]
	ss.mu.Unlock()
	if cancel != nil {
		cancel()
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

// Package wsexec serves interactive commands in a sandbox over a WebSocket
// (the daemon's GET /v1/sandboxes/{id}/exec/ws): VM.Attach, with the
// session's standard input, output, terminal size and signals carried in
// WebSocket messages.
//
// # Protocol
//
// Text messages are JSON objects with a "type"; binary messages carry
// data. Unknown types and fields are refused (the session ends with an
// error message).
//
// Client to server:
//
//	{"type":"start","argv":["ls","-l"]} or {"type":"start","command":"ls -l | wc"}
//	    the first message (within 30 s), once: the command, run directly (argv)
//	    or by /bin/sh -c (command); optional "env":{"K":"V"}, "cwd":"/dir",
//	    "tty":{"rows":R,"cols":C} (a terminal in the guest: output then
//	    comes merged as stdout, and a 0x03 byte typed on it is Ctrl-C),
//	    "term":"xterm-256color" ($TERM on a tty).
//	binary message         bytes for the command's standard input (at most 1 MiB each)
//	{"type":"eof"}         end of the command's standard input (on a tty: ^D)
//	{"type":"resize","rows":R,"cols":C}   the terminal's new size
//	{"type":"signal","signal":"SIGINT"}   a signal for the command's process group (and
//	                                      the terminal's foreground job): SIGHUP, SIGINT,
//	                                      SIGQUIT, SIGKILL, SIGTERM, SIGUSR1, SIGUSR2,
//	                                      SIGPIPE, SIGALRM, SIGCONT, SIGSTOP, SIGTSTP, SIGWINCH
//
// Server to client:
//
//	{"type":"started","pid":N}   the command runs (pid 0: it could not start; its
//	                             error follows on stderr and exit says 127 or 126)
//	binary message               output: the first byte is the stream (1 stdout,
//	                             2 stderr), the rest its data
//	{"type":"exit","exit_code":N}   the last message: the command exited (128+N
//	                                when signal N killed it); a normal closure follows
//	{"type":"error","error":{"code":"...","message":"..."}}   the session failed
//	                                (code as smolvm.ErrorCode); the connection closes
//
// A client that goes away (the connection closes or breaks) ends the
// session: the command's process group is killed. The server keeps reading
// while the command does not read its input, so that it notices a client
// that goes away: it holds at most MaxStdinBuffer bytes of input for the
// command, and a client that sends more ends the session with an error. Output the client does
// not read holds the command (backpressure); a client that reads nothing
// for 60 s while output waits is dropped, which kills the command too.
// The VM that open returns stays open's: the handler does not close it.
package wsexec

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// Bounds.
const (
	// MaxMessage bounds a client message (a stdin chunk, a control message).
	MaxMessage = 1 << 20
	// MaxStdinBuffer bounds the input held for a command that does not
	// read it yet.
	MaxStdinBuffer = 4 << 20
	// StartTimeout bounds the wait for the start message.
	StartTimeout = 30 * time.Second
	// WriteTimeout bounds one message to the client.
	WriteTimeout = 60 * time.Second
	// outputChunk is the most data one output message carries.
	outputChunk = 32 << 10
)

// Output stream bytes of server binary messages.
const (
	StreamStdout = 1
	StreamStderr = 2
)

// Message types.
const (
	TypeStart   = "start"
	TypeEOF     = "eof"
	TypeResize  = "resize"
	TypeSignal  = "signal"
	TypeStarted = "started"
	TypeExit    = "exit"
	TypeError   = "error"
)

// Control is a client's text message.
type Control struct {
	Type string `json:"type"`
	// start
	Argv    []string          `json:"argv,omitempty"`
	Command string            `json:"command,omitempty"`
	Env     map[string]string `json:"env,omitempty"`
	Cwd     string            `json:"cwd,omitempty"`
	TTY     *smolvm.TTYSize   `json:"tty,omitempty"`
	Term    string            `json:"term,omitempty"`
	// resize
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// signal
	Signal string `json:"signal,omitempty"`
}

// ParseControl decodes and checks a client's text message: a known type,
// no unknown fields, fields that belong to its type and are valid.
func ParseControl(data []byte) (Control, error) {
	var c Control
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return Control{}, fmt.Errorf("bad message: %v", err)
	}
	if dec.More() {
		return Control{}, errors.New("bad message: more than one JSON value")
	}
	startFields := len(c.Argv) > 0 || c.Command != "" || c.Env != nil || c.Cwd != "" || c.TTY != nil || c.Term != ""
	sizeFields := c.Rows != 0 || c.Cols != 0
	switch c.Type {
	case TypeStart:
		if sizeFields || c.Signal != "" {
			return Control{}, errors.New("start: resize or signal fields in it")
		}
		if err := c.Spec().Validate(); err != nil {
			return Control{}, err
		}
	case TypeEOF:
		if startFields || sizeFields || c.Signal != "" {
			return Control{}, errors.New("eof takes no fields")
		}
	case TypeResize:
		if startFields || c.Signal != "" {
			return Control{}, errors.New("resize takes rows and cols only")
		}
		if err := (agentproto.ResizeRequest{Rows: c.Rows, Cols: c.Cols}).Validate(); err != nil {
			return Control{}, err
		}
	case TypeSignal:
		if startFields || sizeFields {
			return Control{}, errors.New("signal takes signal only")
		}
		name, _, err := agentproto.ParseSignal(c.Signal)
		if err != nil {
			return Control{}, err
		}
		c.Signal = name
	default:
		return Control{}, fmt.Errorf("unknown message type %q", truncate(c.Type, 32))
	}
	return c, nil
}

// Spec is the command of a start message.
func (c Control) Spec() smolvm.ExecSpec {
	return smolvm.ExecSpec{Argv: c.Argv, Shell: c.Command, Env: c.Env, Cwd: c.Cwd, TTY: c.TTY, Term: c.Term}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// Option customizes Handler.
type Option func(*handler)

// WithErrorWriter answers requests that fail before the WebSocket is
// accepted (open's error) with write; the default writes
// {"error":{"code","message"}} with a status from the error's code.
func WithErrorWriter(write func(w http.ResponseWriter, r *http.Request, err error)) Option {
	return func(h *handler) { h.writeErr = write }
}

// Handler serves interactive sessions: open finds the running VM of the
// request (it validates the id; its error is answered before the upgrade).
// Cross-origin browser requests are refused (coder/websocket's default
// origin check).
func Handler(open func(r *http.Request) (*smolvm.VM, error), opts ...Option) http.Handler {
	h := &handler{open: open, writeErr: writeError}
	for _, o := range opts {
		o(h)
	}
	return h
}

type handler struct {
	open     func(*http.Request) (*smolvm.VM, error)
	writeErr func(http.ResponseWriter, *http.Request, error)
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	vm, err := h.open(r)
	if err != nil {
		h.writeErr(w, r, err)
		return
	}
	// A session lasts as long as its command: the server's read and write
	// deadlines (http.Server ReadTimeout, WriteTimeout) must not cut it.
	// net/http clears them when it hijacks today, but http.Hijacker says
	// a hijacked connection "may have" them: clear them here too.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	_ = rc.SetWriteDeadline(time.Time{})
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		return // Accept answered the request
	}
	conn.SetReadLimit(MaxMessage)
	// The request's context is not cancelled when a hijacked connection
	// closes: the session has its own, ended when reading fails.
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	err = serve(ctx, cancel, conn, vm)
	if err != nil {
		sendError(conn, err)
		status := websocket.StatusInternalError
		if errors.Is(err, smolvm.ErrInvalidConfig) {
			status = websocket.StatusPolicyViolation
		}
		conn.Close(status, "session failed")
		return
	}
	conn.Close(websocket.StatusNormalClosure, "")
}

// serve runs one session on conn; it returns nil after the exit message.
func serve(ctx context.Context, cancel context.CancelFunc, conn *websocket.Conn, vm *smolvm.VM) error {
	sctx, scancel := context.WithTimeout(ctx, StartTimeout)
	typ, data, err := conn.Read(sctx)
	scancel()
	if err != nil {
		return fmt.Errorf("no start message: %w", err)
	}
	if typ != websocket.MessageText {
		return invalid("the first message must be a start message")
	}
	start, err := ParseControl(data)
	if err != nil {
		return invalid("%v", err)
	}
	if start.Type != TypeStart {
		return invalid("the first message must be a start message, not %s", start.Type)
	}
	s, err := vm.Attach(ctx, start.Spec())
	if err != nil {
		return err
	}
	defer s.Close()
	if err := writeJSON(ctx, conn, map[string]any{"type": TypeStarted, "pid": s.PID()}); err != nil {
		return err
	}
	outDone := make(chan error, 2)
	go func() { outDone <- pump(ctx, conn, s.Stdout, StreamStdout) }()
	go func() { outDone <- pump(ctx, conn, s.Stderr, StreamStderr) }()
	readErr := make(chan error, 1)
	go func() { readErr <- readLoop(ctx, conn, s) }()

	waitDone := make(chan struct{})
	var code int
	var werr error
	go func() {
		code, werr = s.Wait()
		close(waitDone)
	}()
	select {
	case <-waitDone:
	case err := <-readErr:
		// The client is gone or broke the protocol: end the session
		// (the command is killed).
		cancel()
		<-waitDone
		return err
	}
	for range 2 {
		if err := <-outDone; err != nil {
			cancel()
			return err
		}
	}
	if werr != nil {
		return werr
	}
	return writeJSON(ctx, conn, map[string]any{"type": TypeExit, "exit_code": code})
}

// readLoop hands the client's messages to the session until reading fails
// or a message is bad. Input goes through a bounded queue, so reading goes
// on while the command does not read.
func readLoop(ctx context.Context, conn *websocket.Conn, s *smolvm.Session) error {
	q := &stdinQueue{wake: make(chan struct{}, 1)}
	go q.feed(ctx, s.Stdin)
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			return fmt.Errorf("client gone: %w", err)
		}
		if typ == websocket.MessageBinary {
			if err := q.push(data); err != nil {
				return err
			}
			continue
		}
		c, err := ParseControl(data)
		if err != nil {
			return invalid("%v", err)
		}
		switch c.Type {
		case TypeStart:
			return invalid("a second start message")
		case TypeEOF:
			q.close()
		case TypeResize:
			_ = s.Resize(ctx, smolvm.TTYSize{Rows: c.Rows, Cols: c.Cols})
		case TypeSignal:
			_ = s.SignalName(ctx, c.Signal)
		}
	}
}

// stdinQueue holds the client's input until the command reads it, at most
// MaxStdinBuffer bytes.
type stdinQueue struct {
	mu   sync.Mutex
	bufs [][]byte
	size int
	eof  bool
	wake chan struct{}
}

func (q *stdinQueue) push(b []byte) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.eof {
		return invalid("input after eof")
	}
	if q.size+len(b) > MaxStdinBuffer {
		return invalid("the client sent %d bytes of input more than the command read (at most %d are held)", q.size+len(b), MaxStdinBuffer)
	}
	q.bufs = append(q.bufs, b)
	q.size += len(b)
	q.notify()
	return nil
}

func (q *stdinQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.eof = true
	q.notify()
}

func (q *stdinQueue) notify() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// feed writes the queue to w until eof (then closes w) or ctx ends. Once
// w fails (the command ended) input is dropped.
func (q *stdinQueue) feed(ctx context.Context, w io.WriteCloser) {
	failed := false
	for {
		q.mu.Lock()
		var b []byte
		if len(q.bufs) > 0 {
			b, q.bufs = q.bufs[0], q.bufs[1:]
		}
		eof := q.eof && b == nil
		q.mu.Unlock()
		switch {
		case b != nil:
			if !failed {
				_, err := w.Write(b)
				failed = err != nil
			}
			q.mu.Lock()
			q.size -= len(b)
			q.mu.Unlock()
			continue
		case eof:
			w.Close()
			return
		}
		select {
		case <-q.wake:
		case <-ctx.Done():
			return
		}
	}
}

// pump sends what r yields as binary messages of stream.
func pump(ctx context.Context, conn *websocket.Conn, r io.Reader, stream byte) error {
	buf := make([]byte, 1+outputChunk)
	buf[0] = stream
	for {
		n, err := r.Read(buf[1:])
		if n > 0 {
			wctx, cancel := context.WithTimeout(ctx, WriteTimeout)
			werr := conn.Write(wctx, websocket.MessageBinary, buf[:1+n])
			cancel()
			if werr != nil {
				return fmt.Errorf("writing output to the client: %w", werr)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func writeJSON(ctx context.Context, conn *websocket.Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, WriteTimeout)
	defer cancel()
	return conn.Write(wctx, websocket.MessageText, b)
}

func invalid(format string, args ...any) error {
	return &smolvm.Error{Message: fmt.Sprintf(format, args...), Err: smolvm.ErrInvalidConfig}
}

// sendError tells the client why the session failed (best effort).
func sendError(conn *websocket.Conn, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = writeJSON(ctx, conn, map[string]any{"type": TypeError, "error": errorBody(err)})
}

func errorBody(err error) map[string]string {
	msg := err.Error()
	var e *smolvm.Error
	if errors.As(err, &e) {
		msg = e.Message
	}
	return map[string]string{"code": smolvm.ErrorCode(err), "message": msg}
}

// writeError is the default answer to a request open refused.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	switch smolvm.ErrorCode(err) {
	case "vm_not_found":
		status = http.StatusNotFound
	case "vm_not_running":
		status = http.StatusConflict
	case "invalid_id", "invalid_config":
		status = http.StatusUnprocessableEntity
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{"error": errorBody(err)})
}

package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smolvm-go/smolvm"
)

// decode reads a JSON body into v: unknown fields, trailing data and
// malformed JSON are invalid_request (422), an oversize body
// request_too_large (413). An empty body leaves v as it is (the defaults).
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		if dec.More() {
			return errCode(codeInvalidRequest, "request body: data after the JSON object")
		}
		var extra json.RawMessage
		if dec.Decode(&extra) != io.EOF {
			return errCode(codeInvalidRequest, "request body: data after the JSON object")
		}
		return nil
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errCode(codeTooLarge, fmt.Sprintf("request body over %d bytes", mbe.Limit))
	}
	return errCode(codeInvalidRequest, "request body: "+err.Error())
}

// sandbox is the handle on the request's sandbox, or false once the
// error is written.
func (s *Server) sandbox(w http.ResponseWriter, r *http.Request, id string) (*smolvm.VM, bool) {
	vm, err := s.vm(r.Context(), id)
	if err != nil {
		writeError(w, s.gone(id, err))
		return nil, false
	}
	s.touch(id) // every call on a sandbox is activity (idle_timeout_s)
	return vm, true
}

// decodeReq decodes the JSON body into a T, or returns false once the
// error is written.
func decodeReq[T any](w http.ResponseWriter, r *http.Request) (T, bool) {
	var req T
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return req, false
	}
	return req, true
}

// vm returns the open handle on sandbox id (one per id, shared by
// requests: it keeps the agent connection).
func (s *Server) vm(ctx context.Context, id string) (*smolvm.VM, error) {
	if err := smolvm.ValidateID(id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	vm := s.vms[id]
	s.mu.Unlock()
	if vm != nil {
		return vm, nil
	}
	vm, err := s.m.Open(ctx, id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if old := s.vms[id]; old != nil {
		vm.Close()
		return old, nil
	}
	s.vms[id] = vm
	return vm, nil
}

// keep remembers a handle the SDK gave (create, restore, fork).
func (s *Server) keep(vm *smolvm.VM) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old := s.vms[vm.ID()]; old != nil && old != vm {
		old.Close()
	}
	s.vms[vm.ID()] = vm
}

// drop forgets a handle (the sandbox is gone, or replaced by a restore).
func (s *Server) drop(id string) {
	s.mu.Lock()
	vm := s.vms[id]
	delete(s.vms, id)
	s.mu.Unlock()
	if vm != nil {
		vm.Close()
	}
}

// touch tells the lifetime runner that sandbox id is in use (exec, files,
// lifecycle calls: what idle_timeout_s counts).
func (s *Server) touch(id string) {
	if s.cfg.Lifetimes != nil {
		s.cfg.Lifetimes.Touch(id)
	}
}

// expired is the lifetime runner's report: a sandbox's lifetime ran out
// and it was paused (stopped, its memory in a snapshot) or deleted. The
// daemon's handle on it is dropped (the next call opens it again) and
// sandbox.expired is published; a failed attempt is logged (the runner
// retries it).
func (s *Server) expired(id, action string, err error) {
	if err != nil {
		s.log.Warn("lifetime: expiry failed; retrying", "vm", id, "action", action, "err", err)
		return
	}
	s.log.Info("lifetime: sandbox expired", "vm", id, "action", action)
	s.drop(id)
	s.Publish("sandbox.expired", id)
}

// wake resumes or starts sandbox id: one the lifetime runner paused is
// restored from its pause's snapshot (its memory comes back), any other
// goes through start (VM.Start) or resume (VM.Resume).
func (s *Server) wake(ctx context.Context, vm *smolvm.VM, op string) (*smolvm.VM, error) {
	if lt := s.cfg.Lifetimes; lt != nil && lt.AutoPaused(vm.ID()) {
		nvm, err := lt.Resume(ctx, vm.ID())
		if err != nil {
			return nil, err
		}
		s.keep(nvm)
		return nvm, nil
	}
	if op == "start" {
		err := vm.Start(ctx)
		if err == nil {
			s.RefillPools() // the start may have claimed a warm pool member
		}
		return vm, err
	}
	return vm, vm.Resume(ctx)
}

// gone drops the handle when err says the sandbox no longer exists.
func (s *Server) gone(id string, err error) error {
	if errors.Is(err, smolvm.ErrVMNotFound) {
		s.drop(id)
	}
	return err
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"ok": true, "version": s.cfg.Version})
}

// APIVersion is the version of the /v1 API.
const APIVersion = 1

func (s *Server) version(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"version": s.cfg.Version, "api_version": APIVersion, "go": runtime.Version()})
}

// longOp runs fn, a long operation. With "Accept: application/x-ndjson" the
// response is 200 NDJSON: progress lines while it runs, then one result
// line (its status and body) or one error line. Otherwise it is the plain
// status and body.
func (s *Server) longOp(w http.ResponseWriter, r *http.Request, status int, fn func(ctx context.Context, step func(string)) (any, error)) {
	if !strings.Contains(r.Header.Get("Accept"), "application/x-ndjson") {
		body, err := fn(r.Context(), func(string) {})
		if err != nil {
			writeError(w, err)
			return
		}
		if body == nil {
			w.WriteHeader(status)
			return
		}
		writeJSON(w, status, body)
		return
	}
	t0 := time.Now()
	out := s.newNDJSON(w)
	defer out.close()
	step := func(name string) {
		out.send(map[string]any{"type": "progress", "step": name, "elapsed_ms": time.Since(t0).Milliseconds()})
	}
	ctx := withProgress(r.Context(), func(name string, _ time.Duration) { step(name) })
	body, err := fn(ctx, step)
	if err != nil {
		d, st := detail(err)
		out.send(map[string]any{"type": "error", "status": st, "error": d})
		return
	}
	out.send(map[string]any{"type": "result", "status": status, "body": body})
}

// ndjson writes one JSON object per line and flushes each; safe for
// concurrent use. The header (200, application/x-ndjson) goes with the
// first line.
type ndjson struct {
	mu      sync.Mutex
	w       http.ResponseWriter
	rc      *http.ResponseController
	started bool
	err     error
	// stalled is called once when a write fails (a client that went away,
	// or one that stopped reading for WriteStall): the exec stream cancels
	// its command then.
	stalled func()
	stall   time.Duration // Config.WriteStall
}

func (s *Server) newNDJSON(w http.ResponseWriter) *ndjson {
	return &ndjson{w: w, rc: http.NewResponseController(w), stalled: func() {}, stall: s.cfg.WriteStall}
}

// close lifts the write deadline (the connection may serve more
// requests) and makes later sends no-ops: a step logged after the handler
// returned must not touch its ResponseWriter.
func (n *ndjson) close() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.started {
		n.rc.SetWriteDeadline(time.Time{})
	}
	if n.err == nil {
		n.err = errStreamClosed
	}
}

var errStreamClosed = errors.New("stream closed")

func (n *ndjson) send(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return n.write(append(b, '\n'))
}

// begin sends the status and headers before any event: a client that
// streams its request body (exec/stream's stdin) waits for them.
func (n *ndjson) begin() error { return n.write(nil) }

// write starts the stream when it has not started and writes b (one
// event line, or nothing), within the stall bound.
func (n *ndjson) write(b []byte) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.err != nil {
		return n.err
	}
	if !n.started {
		n.started = true
		n.w.Header().Set("Content-Type", "application/x-ndjson")
		n.w.Header().Set("X-Content-Type-Options", "nosniff")
		n.w.WriteHeader(http.StatusOK)
	}
	n.rc.SetWriteDeadline(time.Now().Add(n.stall))
	_, err := n.w.Write(b)
	if err == nil {
		err = n.rc.Flush()
	}
	if err != nil {
		n.err = err
		n.stalled()
	}
	return err
}

// CreateRequest is POST /v1/sandboxes: a smolvm.Config plus the daemon's
// own fields.
type CreateRequest struct {
	smolvm.Config
	// Start boots the sandbox (default true).
	Start *bool `json:"start,omitempty"`
	// TimeoutS is the lifetime in seconds (0: none); OnTimeout says what
	// happens when it runs out: "delete" (default) or "pause".
	TimeoutS     int    `json:"timeout_s,omitempty"`
	OnTimeout    string `json:"on_timeout,omitempty"`
	IdleTimeoutS int    `json:"idle_timeout_s,omitempty"`
}

func (s *Server) checkLifetime(timeoutS int, onTimeout string, idleS int) error {
	if timeoutS < 0 || idleS < 0 {
		return errCode(codeInvalidRequest, "timeout_s and idle_timeout_s must not be negative")
	}
	switch onTimeout {
	case "", "delete", "pause":
	default:
		return errCode(codeInvalidRequest, fmt.Sprintf("on_timeout %q: use delete or pause", onTimeout))
	}
	if (timeoutS > 0 || idleS > 0) && s.cfg.Lifetimes == nil {
		return &smolvm.Error{Op: "create", Message: "this daemon runs no lifetimes: timeout_s and idle_timeout_s are not available", Err: smolvm.ErrUnsupported}
	}
	return nil
}

func (s *Server) createSandbox(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeReq[CreateRequest](w, r)
	if !ok {
		return
	}
	if err := s.checkLifetime(req.TimeoutS, req.OnTimeout, req.IdleTimeoutS); err != nil {
		writeError(w, err)
		return
	}
	s.longOp(w, r, http.StatusCreated, func(ctx context.Context, step func(string)) (any, error) {
		step("create")
		vm, err := s.m.New(ctx, req.Config)
		if err != nil {
			return nil, err
		}
		s.keep(vm)
		s.Publish("sandbox.created", vm.ID())
		if req.Start == nil || *req.Start {
			step("start")
			if err := vm.Start(ctx); err != nil {
				// As `sandbox create`: a sandbox that failed to start is
				// removed (its logs are in the error).
				dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
				defer cancel()
				if derr := vm.Delete(dctx); derr == nil {
					s.drop(vm.ID())
					s.Publish("sandbox.deleted", vm.ID())
				}
				return nil, err
			}
			s.Publish("sandbox.started", vm.ID())
			s.RefillPools() // the start may have claimed a warm pool member
		}
		if req.TimeoutS > 0 || req.IdleTimeoutS > 0 {
			action := req.OnTimeout
			if action == "" {
				action = "delete"
			}
			if err := s.cfg.Lifetimes.Set(ctx, vm.ID(), time.Duration(req.TimeoutS)*time.Second, action, time.Duration(req.IdleTimeoutS)*time.Second); err != nil {
				return nil, err
			}
		}
		return vm.Info(ctx)
	})
}

func (s *Server) listSandboxes(w http.ResponseWriter, r *http.Request) {
	all, err := s.m.List(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	infos := []smolvm.Info{}
	for _, i := range all {
		if i.IsSandbox() { // warm pool members and template builders are the SDK's own
			infos = append(infos, i)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"sandboxes": infos})
}

func (s *Server) info(w http.ResponseWriter, r *http.Request, id string, status int) {
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	info, err := vm.Info(r.Context())
	if err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	writeJSON(w, status, info)
}

func (s *Server) getSandbox(w http.ResponseWriter, r *http.Request) {
	s.info(w, r, r.PathValue("id"), http.StatusOK)
}

func (s *Server) deleteSandbox(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	if err := vm.Delete(r.Context()); err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	s.drop(id)
	if s.cfg.Lifetimes != nil {
		s.cfg.Lifetimes.Forget(r.Context(), id)
	}
	s.Publish("sandbox.deleted", id)
	w.WriteHeader(http.StatusNoContent)
}

// lifecycle is POST .../start|stop|pause|resume.
func (s *Server) lifecycle(op string) http.HandlerFunc {
	event := map[string]string{"start": "sandbox.started", "stop": "sandbox.stopped", "pause": "sandbox.paused", "resume": "sandbox.resumed"}[op]
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if err := decode(r, &struct{}{}); err != nil {
			writeError(w, err)
			return
		}
		vm, ok := s.sandbox(w, r, id)
		if !ok {
			return
		}
		s.longOp(w, r, http.StatusOK, func(ctx context.Context, step func(string)) (any, error) {
			step(op)
			var err error
			switch op {
			case "start", "resume":
				vm, err = s.wake(ctx, vm, op)
			case "stop":
				err = vm.Stop(ctx)
			case "pause":
				err = vm.Pause(ctx)
			}
			if err != nil {
				return nil, s.gone(id, err)
			}
			s.Publish(event, id)
			s.touch(id)
			return vm.Info(ctx)
		})
	}
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req struct {
		TimeoutS int `json:"timeout_s"`
	}
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	if req.TimeoutS <= 0 {
		writeError(w, errCode(codeInvalidRequest, "timeout_s must be a positive number of seconds"))
		return
	}
	if err := s.checkLifetime(req.TimeoutS, "", 0); err != nil {
		writeError(w, err)
		return
	}
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	if err := s.cfg.Lifetimes.Extend(r.Context(), id, time.Duration(req.TimeoutS)*time.Second); err != nil {
		writeError(w, err)
		return
	}
	info, err := vm.Info(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

// ExecRequest is POST .../exec.
type ExecRequest struct {
	Command     string            `json:"command,omitempty"`
	Argv        []string          `json:"argv,omitempty"`
	Env         map[string]string `json:"env,omitempty"`
	Cwd         string            `json:"cwd,omitempty"`
	Stdin       string            `json:"stdin,omitempty"`
	TimeoutS    float64           `json:"timeout_s,omitempty"`
	OutputLimit int               `json:"output_limit,omitempty"`
}

// ExecResult is the JSON result of an exec.
type ExecResult struct {
	ExitCode   int    `json:"exit_code"`
	Stdout     string `json:"stdout"`
	Stderr     string `json:"stderr"`
	OK         bool   `json:"ok"`
	TimedOut   bool   `json:"timed_out"`
	Truncated  bool   `json:"truncated"`
	DurationMS int64  `json:"duration_ms"`
}

// MaxOutputLimit bounds an exec's output_limit: the JSON result holds the
// output in the daemon's memory (twice: stdout and stderr).
const MaxOutputLimit = 64 << 20

// DefaultExecTimeout is the timeout of a command that asks for none.
const DefaultExecTimeout = 10 * time.Minute

// execTimeout checks timeout_s and gives the command's timeout.
func execTimeout(sec float64) (time.Duration, error) {
	if sec < 0 || sec > maxExecTimeout.Seconds() {
		return 0, errCode(codeInvalidRequest, fmt.Sprintf("timeout_s %v: must be between 0 and %d (0: the default, %d)", sec, int(maxExecTimeout.Seconds()), int(DefaultExecTimeout.Seconds())))
	}
	if sec == 0 {
		return DefaultExecTimeout, nil
	}
	return time.Duration(sec * float64(time.Second)), nil
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	req, ok := decodeReq[ExecRequest](w, r)
	if !ok {
		return
	}
	if (req.Command == "") == (len(req.Argv) == 0) {
		writeError(w, errCode(codeInvalidRequest, "give either command (a shell command line) or argv"))
		return
	}
	timeout, err := execTimeout(req.TimeoutS)
	if err != nil {
		writeError(w, err)
		return
	}
	if req.OutputLimit < 0 || req.OutputLimit > MaxOutputLimit {
		writeError(w, errCode(codeInvalidRequest, fmt.Sprintf("output_limit must be between 0 (the default, %d) and %d bytes; for more, use exec/stream", smolvm.DefaultOutputLimit, MaxOutputLimit)))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout+ExecGrace)
	defer cancel()
	vm, err := s.vm(ctx, id)
	if err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	opts := []smolvm.RunOption{smolvm.WithTimeout(timeout), smolvm.WithOutputLimit(req.OutputLimit), smolvm.WithEnv(req.Env), smolvm.WithWorkdir(req.Cwd)}
	if req.Stdin != "" {
		opts = append(opts, smolvm.WithStdin([]byte(req.Stdin)))
	}
	s.touch(id)
	var res *smolvm.Result
	if req.Command != "" {
		res, err = vm.Run(ctx, req.Command, opts...)
	} else {
		res, err = vm.RunArgs(ctx, req.Argv, opts...)
	}
	if err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	writeJSON(w, http.StatusOK, ExecResult{ExitCode: res.ExitCode, Stdout: res.Stdout, Stderr: res.Stderr, OK: res.OK(),
		TimedOut: res.TimedOut, Truncated: res.Truncated, DurationMS: res.Duration.Milliseconds()})
}

// streamWriter turns a command's output into NDJSON events.
type streamWriter struct {
	out *ndjson
	typ string
}

func (sw streamWriter) Write(p []byte) (int, error) {
	// A client that went away: the write fails, and the request's context
	// (cancelled with the connection) ends the command in the guest.
	sw.out.send(map[string]any{"type": sw.typ, "data": p}) // []byte → base64
	return len(p), nil
}

// execStream is POST .../exec/stream: the command from the query, its
// stdin from the body, its output as NDJSON events while it runs. A
// client that disconnects cancels the request, which kills the command
// (its process group) in the guest.
func (s *Server) execStream(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	q := r.URL.Query()
	command, argv := q.Get("command"), q["arg"]
	if (command == "") == (len(argv) == 0) {
		writeError(w, errCode(codeInvalidRequest, "give either command=SHELL or one or more arg=A"))
		return
	}
	sec := 0.0
	if v := q.Get("timeout_s"); v != "" {
		var err error
		if sec, err = strconv.ParseFloat(v, 64); err != nil {
			writeError(w, errCode(codeInvalidRequest, "timeout_s: not a number"))
			return
		}
	}
	timeout, err := execTimeout(sec)
	if err != nil {
		writeError(w, err)
		return
	}
	env := map[string]string{}
	for _, kv := range q["env"] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			writeError(w, errCode(codeInvalidRequest, fmt.Sprintf("env %q: use env=KEY=VALUE", kv)))
			return
		}
		env[k] = v
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout+ExecGrace)
	defer cancel()
	vm, err := s.vm(ctx, id)
	if err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	s.touch(id)
	// An interactive session (VM.Attach): stdin streams to the command as
	// the body arrives, EOF closes it. Its context ends with the request's
	// (a client that disconnects), a stalled client or the handler: the
	// guest then kills the command's process group.
	sctx, kill := context.WithCancel(ctx)
	defer kill()
	start := time.Now()
	sess, err := vm.Attach(sctx, smolvm.ExecSpec{Shell: command, Argv: argv, Env: env, Cwd: q.Get("cwd")})
	if err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	defer sess.Close()
	rc := http.NewResponseController(w)
	rc.EnableFullDuplex() // read the body (stdin) while the response is written
	out := s.newNDJSON(w)
	defer out.close()
	out.stalled = kill // a client that stopped reading: kill the command
	out.begin()        // the command runs: 200 and the headers now
	stdinDone := make(chan struct{})
	go func() {
		defer close(stdinDone)
		if r.ContentLength != 0 {
			io.Copy(sess.Stdin, r.Body)
		}
		sess.Stdin.Close()
	}()
	var outputs sync.WaitGroup
	for typ, rd := range map[string]io.Reader{"stdout": sess.Stdout, "stderr": sess.Stderr} {
		outputs.Go(func() { io.Copy(streamWriter{out, typ}, rd) })
	}
	// The timeout: the command's process group is killed (as the guest
	// does for POST .../exec).
	var timedOut atomic.Bool
	timer := time.AfterFunc(timeout, func() {
		timedOut.Store(true)
		tctx, cancel := context.WithTimeout(sctx, 10*time.Second)
		defer cancel()
		if sess.SignalName(tctx, "SIGKILL") != nil {
			kill()
		}
	})
	defer timer.Stop()
	outputs.Wait()
	code, err := sess.Wait()
	timer.Stop()
	// The body may not be read once the handler returns: a read still
	// waiting for the client (the command exited before its stdin ended)
	// is cut.
	select {
	case <-stdinDone:
	default:
		rc.SetReadDeadline(time.Now())
		<-stdinDone
	}
	if err != nil {
		d, _ := detail(s.gone(id, err))
		out.send(map[string]any{"type": "error", "error": d})
		return
	}
	out.send(map[string]any{"type": "exit", "exit_code": code, "timed_out": timedOut.Load(), "duration_ms": time.Since(start).Milliseconds()})
}

// guestPath reads the path query: an absolute guest path.
func guestPath(r *http.Request) (string, error) {
	p := r.URL.Query().Get("path")
	if !strings.HasPrefix(p, "/") || strings.IndexByte(p, 0) >= 0 {
		return "", errCode(codeInvalidRequest, "path: give an absolute guest path (?path=/abs/file)")
	}
	return p, nil
}

func (s *Server) putFile(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	path, err := guestPath(r)
	if err != nil {
		writeError(w, err)
		return
	}
	mode := os.FileMode(0o644)
	if m := r.URL.Query().Get("mode"); m != "" {
		v, err := strconv.ParseUint(m, 8, 32)
		if err != nil || v > 0o7777 {
			writeError(w, errCode(codeInvalidRequest, fmt.Sprintf("mode %q: give octal permission bits, e.g. 0644", m)))
			return
		}
		mode = os.FileMode(v)
	}
	if r.ContentLength > s.cfg.MaxFileBytes {
		writeError(w, s.tooLarge("an upload", r.ContentLength))
		return
	}
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	s.touch(id)
	body, size := io.Reader(r.Body), r.ContentLength
	if size < 0 {
		// Chunked: spool to a private temp file to learn the size (the
		// agent protocol announces it first).
		f, done, n, err := s.spoolBody(r.Body)
		if err != nil {
			writeError(w, err)
			return
		}
		defer done()
		body, size = f, n
	}
	if err := vm.WriteFileFrom(r.Context(), path, body, size, mode); err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) getFile(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	path, err := guestPath(r)
	if err != nil {
		writeError(w, err)
		return
	}
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	s.touch(id)
	// Spooled to a private temp file first: the mode (a header) and the
	// guest's verdict on the whole file are known before the first byte
	// is sent, so a failed read is an error status, not a cut stream. The
	// size the guest announces is checked against Config.MaxFileBytes
	// and the free space before a byte is spooled, and the SDK holds the
	// guest to it.
	f, done, err := s.spoolTemp(".download-*")
	if err != nil {
		writeError(w, err)
		return
	}
	defer done()
	mode, n, err := vm.ReadFileToChecked(r.Context(), path, &capWriter{w: f, max: s.cfg.MaxFileBytes, s: s}, func(size int64) error {
		if size > s.cfg.MaxFileBytes {
			return s.tooLarge("the guest file", size)
		}
		return s.checkRoom(size)
	})
	if err != nil {
		writeError(w, s.gone(id, s.noSpace(err)))
		return
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		writeError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	w.Header().Set("X-Smolvm-File-Mode", fmt.Sprintf("%04o", mode.Perm()))
	w.WriteHeader(http.StatusOK)
	io.Copy(w, f)
}

func (s *Server) exposePort(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req struct {
		HostPort  int `json:"host_port"`
		GuestPort int `json:"guest_port"`
	}
	if err := decode(r, &req); err != nil {
		writeError(w, err)
		return
	}
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	if err := vm.ExposePort(r.Context(), req.HostPort, req.GuestPort); err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	s.info(w, r, id, http.StatusOK)
}

func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	b, err := vm.Logs(r.Context())
	if err != nil {
		writeError(w, s.gone(id, err))
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Write(b)
}

// SnapshotRequest is POST .../snapshots.
type SnapshotRequest struct {
	SnapshotID   string `json:"snapshot_id,omitempty"`
	SnapshotType string `json:"snapshot_type,omitempty"`
	ResumeSource bool   `json:"resume_source,omitempty"`
}

func (s *Server) createSnapshot(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	req, ok := decodeReq[SnapshotRequest](w, r)
	if !ok {
		return
	}
	typ := smolvm.SnapshotType("")
	if req.SnapshotType != "" {
		var err error
		if typ, err = smolvm.ParseSnapshotType(req.SnapshotType); err != nil {
			writeError(w, err)
			return
		}
	}
	if req.SnapshotID != "" {
		if err := smolvm.ValidateID(req.SnapshotID); err != nil {
			writeError(w, err)
			return
		}
	}
	vm, ok := s.sandbox(w, r, id)
	if !ok {
		return
	}
	s.longOp(w, r, http.StatusCreated, func(ctx context.Context, step func(string)) (any, error) {
		info, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: req.SnapshotID, Type: typ, ResumeSource: req.ResumeSource})
		if err != nil {
			return nil, s.gone(id, err)
		}
		s.Publish("snapshot.created", info.ID)
		return info, nil
	})
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request) {
	vmID := r.URL.Query().Get("vm_id")
	if vmID != "" {
		if err := smolvm.ValidateID(vmID); err != nil {
			writeError(w, err)
			return
		}
	}
	snaps, err := s.m.ListSnapshots(r.Context(), smolvm.SnapshotFilter{VMID: vmID})
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"snapshots": snaps})
}

func (s *Server) getSnapshot(w http.ResponseWriter, r *http.Request) {
	info, err := s.m.GetSnapshot(r.Context(), r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, info)
}

func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := s.m.DeleteSnapshot(r.Context(), id); err != nil {
		writeError(w, err)
		return
	}
	s.Publish("snapshot.deleted", id)
	w.WriteHeader(http.StatusNoContent)
}

// RestoreRequest is POST /v1/snapshots/{id}/restore.
type RestoreRequest struct {
	Resume bool `json:"resume,omitempty"`
	Force  bool `json:"force,omitempty"`
}

func (s *Server) restore(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	req, ok := decodeReq[RestoreRequest](w, r)
	if !ok {
		return
	}
	// The id was checked against the spec (invalid_id); the SDK checks it again.
	s.longOp(w, r, http.StatusCreated, func(ctx context.Context, step func(string)) (any, error) {
		vm, err := s.m.FromSnapshot(ctx, id, smolvm.RestoreOptions{Resume: req.Resume, Force: req.Force})
		if err != nil {
			return nil, err
		}
		s.keep(vm)
		s.Publish("snapshot.restored", id)
		return vm.Info(ctx)
	})
}

// ForkRequest is POST /v1/snapshots/{id}/fork.
type ForkRequest struct {
	Count  int  `json:"count"`
	Resume bool `json:"resume,omitempty"`
}

func (s *Server) fork(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	req, ok := decodeReq[ForkRequest](w, r)
	if !ok {
		return
	}
	// The id was checked against the spec (invalid_id); the SDK checks it again.
	s.longOp(w, r, http.StatusCreated, func(ctx context.Context, step func(string)) (any, error) {
		vms, err := s.m.Fork(ctx, id, req.Count, smolvm.ForkOptions{Resume: req.Resume})
		for _, vm := range vms {
			s.keep(vm)
			s.Publish("sandbox.created", vm.ID())
		}
		if err != nil {
			return nil, err
		}
		infos := make([]smolvm.Info, 0, len(vms))
		for _, vm := range vms {
			info, err := vm.Info(ctx)
			if err != nil {
				return nil, err
			}
			infos = append(infos, info)
		}
		return map[string]any{"sandboxes": infos}, nil
	})
}

func (s *Server) listTemplates(w http.ResponseWriter, r *http.Request) {
	ts, err := s.m.ListTemplates(r.Context())
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"templates": ts})
}

// TemplateRequest is POST /v1/templates.
type TemplateRequest struct {
	Image     string `json:"image"`
	MemoryMiB int    `json:"memory_mib,omitempty"`
	CPUs      int    `json:"cpus,omitempty"`
	NoNetwork bool   `json:"no_network,omitempty"`
	Backend   string `json:"backend,omitempty"`
	Accel     string `json:"accel,omitempty"`
}

func (s *Server) buildTemplate(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeReq[TemplateRequest](w, r)
	if !ok {
		return
	}
	s.longOp(w, r, http.StatusCreated, func(ctx context.Context, step func(string)) (any, error) {
		return s.m.BuildTemplate(ctx, req.Image, smolvm.TemplateOptions{MemoryMiB: req.MemoryMiB, CPUs: req.CPUs,
			NoNetwork: req.NoNetwork, Backend: smolvm.BackendName(req.Backend), Accel: smolvm.Accel(req.Accel)})
	})
}

func (s *Server) deleteTemplate(w http.ResponseWriter, r *http.Request) {
	if err := s.m.DeleteTemplate(r.Context(), r.PathValue("key")); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) collectTemplates(w http.ResponseWriter, r *http.Request) {
	s.longOp(w, r, http.StatusOK, func(ctx context.Context, step func(string)) (any, error) {
		return s.m.CollectTemplates(ctx)
	})
}

// eventStream is GET /v1/events: server-sent events, one per lifecycle
// event ("event: <type>", "data: <Event JSON>"), a comment every 15 s to
// keep the connection open.
func (s *Server) eventStream(w http.ResponseWriter, r *http.Request) {
	sub, cancel := s.events.subscribe()
	defer cancel()
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": smolvm events\n\n")
	if rc.Flush() != nil {
		return
	}
	tick := time.NewTicker(15 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-s.stopping:
			return
		case <-tick.C:
			fmt.Fprint(w, ": keep-alive\n\n")
		case e := <-sub.ch:
			b, _ := json.Marshal(e)
			fmt.Fprintf(w, "event: %s\ndata: %s\n\n", e.Type, b)
		}
		if rc.Flush() != nil {
			return
		}
	}
}

package agentclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// ErrNoInteractive is returned by StartExec when the guest agent predates
// interactive execs (an image built before them): it answered the exec
// without "started". The exec was cancelled.
var ErrNoInteractive = errors.New("the guest agent does not support interactive execs (it predates them)")

// Session is a running interactive exec (agentproto's interactive.go):
// standard input streamed with flow control, resize, signal. Its output
// goes to the writers given to StartExec.
type Session struct {
	c   *Client
	id  uint64
	cl  *call
	PID int // the process id in the guest; 0 when it could not start (its error follows as output and exit)

	ctx     context.Context
	cancel  context.CancelFunc
	credits chan struct{} // a token per stdin message that may be sent

	stdinMu sync.Mutex // one stdin writer at a time, in order
	eofSent bool

	done chan struct{}
	res  agentproto.ExecResult
	err  error
}

// StartExec starts an interactive exec (req.Interactive is set for the
// caller) and returns once the guest says the process runs, within the
// call deadline. Output goes to stdout and stderr as it arrives (nil
// discards); a writer that fails is not written again. The session ends
// when the process exits (Wait) or ctx ends: then the guest kills the
// process group. Output writers are called from one goroutine; a writer
// that blocks holds the session's replies (stdin acknowledgements too)
// and, past a queue, the client's reader.
func (c *Client) StartExec(ctx context.Context, req agentproto.ExecRequest, stdout, stderr io.Writer) (*Session, error) {
	req.Interactive = true
	if len(req.Stdin) > 0 {
		return nil, fmt.Errorf("agentclient: exec: an interactive exec streams its stdin (Session.Write)")
	}
	if req.TTY != nil {
		if err := req.TTY.Validate(); err != nil {
			return nil, fmt.Errorf("agentclient: exec: tty: %w", err)
		}
	}
	sctx, cancel := context.WithCancel(ctx)
	id, cl, err := c.start(sctx, agentproto.TypeExec, req, execQueue)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("agentclient: exec: %w", err)
	}
	s := &Session{c: c, id: id, cl: cl, ctx: sctx, cancel: cancel,
		credits: make(chan struct{}, agentproto.StdinWindow), done: make(chan struct{})}
	for range agentproto.StdinWindow {
		s.credits <- struct{}{}
	}
	fail := func(err error) (*Session, error) {
		c.sendCancel(id)
		c.finish(id, cl)
		cancel()
		return nil, fmt.Errorf("agentclient: exec: %w", err)
	}
	wctx, wcancel := c.withDeadline(sctx, agentproto.TypeExec, 0)
	m, err := c.wait(wctx, cl)
	wcancel()
	if err != nil {
		return fail(err)
	}
	switch m.hdr.Type {
	case agentproto.TypeStarted:
		var st agentproto.Started
		if err := agentproto.DecodePayload(m.line, &st); err != nil || st.PID < 0 {
			return fail(fmt.Errorf("%w: bad started reply", ErrProtocol))
		}
		s.PID = st.PID
	case agentproto.TypeError:
		c.finish(id, cl)
		cancel()
		return nil, decodeReply("exec", m, agentproto.TypeStarted, nil)
	case agentproto.TypeOutput, agentproto.TypeExit:
		return fail(ErrNoInteractive)
	default:
		return fail(fmt.Errorf("%w: unexpected reply %q", ErrProtocol, m.hdr.Type))
	}
	go s.loop(stdout, stderr)
	return s, nil
}

// loop hands the session's replies out until its exit, or until its ctx
// ends (the guest is then asked to kill the process).
func (s *Session) loop(stdout, stderr io.Writer) {
	defer close(s.done)
	defer s.cancel()
	defer s.c.finish(s.id, s.cl)
	for {
		m, err := s.c.wait(s.ctx, s.cl)
		if err == nil && m.hdr.Type == agentproto.TypeOutput {
			err = checkOutput(&m)
		}
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, ErrProtocol) {
				s.c.sendCancel(s.id)
			}
			s.err = fmt.Errorf("agentclient: exec: %w", err)
			return
		}
		switch m.hdr.Type {
		case agentproto.TypeStdinAck:
			select {
			case s.credits <- struct{}{}:
			default: // more acks than messages: a confused guest; ignore
			}
		case agentproto.TypeOutput:
			w := &stdout
			if m.out.Stream == agentproto.StreamStderr {
				w = &stderr
			}
			if *w != nil {
				if _, err := (*w).Write(m.out.Data); err != nil {
					*w = nil
				}
			}
		default:
			s.err = decodeReply("exec", m, agentproto.TypeExit, &s.res)
			return
		}
	}
}

// Write sends p to the command's standard input, in messages of at most
// agentproto.MaxStdinChunk, each once the guest acknowledged enough of
// the earlier ones (at most agentproto.StdinWindow in flight): it blocks
// while the command does not read. It fails once the session ended.
func (s *Session) Write(p []byte) (int, error) {
	s.stdinMu.Lock()
	defer s.stdinMu.Unlock()
	if s.eofSent {
		return 0, fmt.Errorf("agentclient: stdin: %w", io.ErrClosedPipe)
	}
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), agentproto.MaxStdinChunk)]
		if err := s.sendStdin(agentproto.StdinRequest{Data: chunk}); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

// CloseStdin ends the command's standard input (on a terminal: types ^D).
// Later calls do nothing.
func (s *Session) CloseStdin() error {
	s.stdinMu.Lock()
	defer s.stdinMu.Unlock()
	if s.eofSent {
		return nil
	}
	s.eofSent = true
	return s.sendStdin(agentproto.StdinRequest{EOF: true})
}

func (s *Session) sendStdin(req agentproto.StdinRequest) error {
	select {
	case <-s.credits:
	case <-s.done:
		return fmt.Errorf("agentclient: stdin: the command ended: %w", io.ErrClosedPipe)
	case <-s.c.closed:
		return fmt.Errorf("agentclient: stdin: %w", s.c.connErr())
	}
	return s.send(s.ctx, agentproto.TypeStdin, req)
}

// send enqueues a message for the session's exec, bounded by the call
// deadline.
func (s *Session) send(ctx context.Context, typ string, payload any) error {
	select {
	case <-s.done:
		return fmt.Errorf("agentclient: %s: the command ended: %w", typ, io.ErrClosedPipe)
	default:
	}
	msg, err := agentproto.Marshal(s.id, typ, payload)
	if err != nil {
		return err
	}
	ctx, cancel := s.c.withDeadline(ctx, typ, 0)
	defer cancel()
	if err := s.c.enqueue(ctx, msg); err != nil {
		return fmt.Errorf("agentclient: %s: %w", typ, err)
	}
	return nil
}

// Resize sets the size of the command's terminal (a TTY exec).
func (s *Session) Resize(ctx context.Context, rows, cols uint16) error {
	req := agentproto.ResizeRequest{Rows: rows, Cols: cols}
	if err := req.Validate(); err != nil {
		return fmt.Errorf("agentclient: resize: %w", err)
	}
	return s.send(ctx, agentproto.TypeResize, req)
}

// Signal sends a signal (a name agentproto.ParseSignal accepts) to the
// command's process group (on a terminal, also to its foreground group).
func (s *Session) Signal(ctx context.Context, sig string) error {
	name, _, err := agentproto.ParseSignal(sig)
	if err != nil {
		return fmt.Errorf("agentclient: signal: %w", err)
	}
	return s.send(ctx, agentproto.TypeSignal, agentproto.SignalRequest{Signal: name})
}

// Done is closed when the session ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Wait waits for the session to end and returns the command's result, or
// why the session ended without one (its ctx ended, the connection was
// lost, the guest broke the protocol).
func (s *Session) Wait() (agentproto.ExecResult, error) {
	<-s.done
	return s.res, s.err
}

// Close ends the session: the guest kills the command's process group
// unless it already exited. It waits for the session's reader to stop.
func (s *Session) Close() error {
	s.cancel()
	<-s.done
	return nil
}

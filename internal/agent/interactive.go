package agent

import (
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/ptyutil"
)

// interactive is the state of one interactive exec (agentproto's
// interactive.go): the standard input the host streams, and the running
// process for resize and signal.
type interactive struct {
	id   uint64
	send func(id uint64, typ string, payload any)
	// stdin queues what the host sent; the host keeps at most
	// agentproto.StdinWindow messages unacknowledged, so it never blocks.
	stdin    chan agentproto.StdinRequest
	overrun  chan struct{} // closed when the host sent past the window
	overOnce sync.Once
	done     chan struct{} // closed when the exec ended
	doneOnce sync.Once
	slots    chan struct{}

	mu  sync.Mutex
	pid int // 0 until the process runs
	p   *execPipes
}

// newInteractive takes one of the server's MaxInteractive slots for the
// exec of request id.
func (s *Server) newInteractive(id uint64, req agentproto.ExecRequest, send func(uint64, string, any)) (*interactive, error) {
	select {
	case s.interactiveSlots <- struct{}{}:
	default:
		return nil, &agentproto.Error{Code: agentproto.CodeTooLarge,
			Message: "too many interactive execs running (at most " + strconv.Itoa(agentproto.MaxInteractive) + ")"}
	}
	return &interactive{id: id, send: send, slots: s.interactiveSlots,
		stdin:   make(chan agentproto.StdinRequest, agentproto.StdinWindow),
		overrun: make(chan struct{}), done: make(chan struct{})}, nil
}

// release ends the exec's stdin feeder and frees its slot.
func (ip *interactive) release() {
	ip.doneOnce.Do(func() {
		close(ip.done)
		<-ip.slots
	})
}

// started tells the host the process runs (pid 0: it could not start; its
// error follows as output and exit). It is a no-op on a nil receiver (not
// an interactive exec).
func (ip *interactive) started(pid int) {
	if ip == nil {
		return
	}
	ip.send(ip.id, agentproto.TypeStarted, agentproto.Started{PID: pid})
}

// run records the running process, feeds its standard input from the
// host's stdin messages, and tells the host it started.
func (ip *interactive) run(pid int, p *execPipes) {
	ip.mu.Lock()
	ip.pid, ip.p = pid, p
	ip.mu.Unlock()
	go ip.feed(p.stdinW, p.tty)
	ip.started(pid)
}

// exited forgets the process (reaped: its pid may be reused), so that no
// later signal or resize reaches another. A no-op on a nil receiver.
func (ip *interactive) exited() {
	if ip == nil {
		return
	}
	ip.mu.Lock()
	ip.pid = 0
	ip.mu.Unlock()
}

// feed writes the queued stdin messages to w (the stdin pipe, or the
// terminal's master) and acknowledges each. EOF closes the pipe; on a
// terminal it types the end-of-file character (^D: it ends input at the
// start of a line in canonical mode, as a keyboard's would). Once w fails
// (the process stopped reading), data is acknowledged and dropped.
func (ip *interactive) feed(w *os.File, tty bool) {
	open := true
	for {
		select {
		case req := <-ip.stdin:
			if open && len(req.Data) > 0 {
				if _, err := w.Write(req.Data); err != nil {
					open = false
				}
			}
			if open && req.EOF {
				if tty {
					_, _ = w.Write([]byte{4})
				} else {
					w.Close()
				}
				open = false
			}
			ip.send(ip.id, agentproto.TypeStdinAck, nil)
		case <-ip.overrun:
			return
		case <-ip.done:
			return
		}
	}
}

// lookup returns the interactive exec of request id on this session.
func (ss *session) lookup(id uint64) *interactive {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.interactive[id]
}

// handleStdin queues standard input for a running interactive exec. It
// never blocks the session's reader: a host past the window loses the
// exec's standard input.
func handleStdin(r request, req agentproto.StdinRequest) {
	ip := r.ss.lookup(r.id)
	if ip == nil {
		return // ended: its exit is on its way
	}
	if err := req.Validate(); err != nil {
		r.ss.srv.logf("exec %d: %v: closing its stdin", r.id, err)
		ip.overrunStdin()
		return
	}
	select {
	case ip.stdin <- req:
	default:
		r.ss.srv.logf("exec %d: the host sent stdin past the window of %d messages: closing its stdin", r.id, agentproto.StdinWindow)
		ip.overrunStdin()
	}
}

// overrunStdin ends the standard input of an exec whose host broke the
// flow control: the feeder stops, and a pipe is closed at once (which
// also wakes a feeder blocked writing to it). A terminal stays open (it
// is the command's output too); its input is dropped.
func (ip *interactive) overrunStdin() {
	ip.overOnce.Do(func() {
		close(ip.overrun)
		ip.mu.Lock()
		defer ip.mu.Unlock()
		if ip.p != nil && !ip.p.tty {
			ip.p.stdinW.Close()
		}
	})
}

// handleResize sets the terminal size of a running TTY exec.
func handleResize(r request, req agentproto.ResizeRequest) {
	ip := r.ss.lookup(r.id)
	if ip == nil {
		return
	}
	if err := req.Validate(); err != nil {
		r.ss.srv.logf("exec %d: resize: %v", r.id, err)
		return
	}
	ip.mu.Lock()
	defer ip.mu.Unlock()
	if ip.pid > 0 && ip.p.tty {
		if err := ptyutil.SetSize(ip.p.outR, req.Rows, req.Cols); err != nil {
			r.ss.srv.logf("exec %d: resize: %v", r.id, err)
		}
	}
}

// handleSignal signals a running interactive exec's process group (and its
// terminal's foreground group).
func handleSignal(r request, req agentproto.SignalRequest) {
	ip := r.ss.lookup(r.id)
	if ip == nil {
		return
	}
	_, n, err := agentproto.ParseSignal(req.Signal)
	if err != nil {
		r.ss.srv.logf("exec %d: signal: %v", r.id, err)
		return
	}
	ip.mu.Lock()
	defer ip.mu.Unlock()
	if ip.pid > 0 {
		ip.p.signal(ip.pid, syscall.Signal(n))
	}
}

// hostGone ends the session's interactive execs: their caller is gone (the
// host disconnected), nobody will end their input or read their output.
func (ss *session) hostGone() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for id := range ss.interactive {
		if cancel := ss.cancels[id]; cancel != nil {
			cancel()
		}
	}
}

// openTTY opens a pseudo terminal of the requested size for a command.
func openTTY(t agentproto.TTY) (*execPipes, error) {
	master, slave, err := ptyutil.Open()
	if err != nil {
		return nil, err
	}
	if err := ptyutil.SetSize(master, t.Rows, t.Cols); err != nil {
		master.Close()
		slave.Close()
		return nil, err
	}
	return &execPipes{tty: true, stdin: slave, outW: slave, errW: slave, outR: master, stdinW: master}, nil
}

// ttyEnv sets $TERM for a command on a terminal, unless the request sets
// it.
func ttyEnv(env []string, req agentproto.ExecRequest) []string {
	if _, ok := req.Env["TERM"]; ok {
		return env
	}
	term := req.TTY.Term
	if term == "" {
		term = agentproto.DefaultTerm
	}
	return append(env, "TERM="+term)
}

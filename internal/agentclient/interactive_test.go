package agentclient

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agent"
	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// The agent server runs in this process (on the host): these tests prove
// the protocol and the agent's handling of interactive execs in
// milliseconds; the SDK's tests (vm_interactive_test.go) prove it in a VM.

func TestInteractiveStdinStreamed(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	var out syncBuffer
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"wc", "-c"}}, &out, nil)
	if err != nil {
		t.Fatal(err)
	}
	if s.PID <= 0 {
		t.Fatalf("pid %d", s.PID)
	}
	// 3 MiB: many times the window (StdinWindow x MaxStdinChunk).
	data := make([]byte, 3<<20)
	rand.Read(data)
	if n, err := s.Write(data); err != nil || n != len(data) {
		t.Fatalf("write: %d %v", n, err)
	}
	if err := s.CloseStdin(); err != nil {
		t.Fatal(err)
	}
	res, err := s.Wait()
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("wait: %+v %v", res, err)
	}
	if got := strings.TrimSpace(out.String()); got != "3145728" {
		t.Fatalf("wc -c counted %q", got)
	}
}

func TestInteractiveCatEchoesWhileRunning(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	pr, pw := io.Pipe()
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"cat"}}, pw, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(pr, buf); err != nil || string(buf) != "hello\n" {
		t.Fatalf("echo: %q %v", buf, err)
	}
	s.CloseStdin()
	go io.Copy(io.Discard, pr)
	if res, err := s.Wait(); err != nil || res.ExitCode != 0 {
		t.Fatalf("wait: %+v %v", res, err)
	}
	if _, err := s.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Fatalf("write after the end: %v", err)
	}
}

func TestInteractiveSignal(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"sleep", "100"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Signal(ctx, "int"); err != nil {
		t.Fatal(err)
	}
	res, err := s.Wait()
	if err != nil || res.ExitCode != 130 || res.Signal != "SIGINT" {
		t.Fatalf("wait: %+v %v", res, err)
	}
	if err := s.Signal(ctx, "SIGBOGUS"); err == nil {
		t.Fatal("unknown signal accepted")
	}
}

func TestInteractiveCallerGoneKills(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx, cancel := context.WithCancel(ctxT(t, 20*time.Second))
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"sleep", "100"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := s.Wait(); !errors.Is(err, context.Canceled) {
		t.Fatalf("wait: %v", err)
	}
	if !processGone(t, s.PID, 5*time.Second) {
		t.Fatalf("pid %d still runs after its caller went away", s.PID)
	}
}

func TestInteractiveHostDisconnectKills(t *testing.T) {
	ta := startAgent(t, agent.Options{})
	c := ta.connect(t)
	s, err := c.StartExec(ctxT(t, 20*time.Second), agentproto.ExecRequest{Argv: []string{"sleep", "100"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Close() // the host process dies: no cancel is sent
	if !processGone(t, s.PID, 5*time.Second) {
		t.Fatalf("pid %d still runs after the host disconnected", s.PID)
	}
}

func TestInteractiveTTY(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	pr, pw := io.Pipe()
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Shell: `tty; stty size; echo TERM=$TERM; read line; stty size; echo "got $line"`,
		TTY: &agentproto.TTY{Rows: 33, Cols: 101}}, pw, nil)
	if err != nil {
		t.Fatal(err)
	}
	var seen bytes.Buffer
	waitFor := func(want string) {
		t.Helper()
		buf := make([]byte, 4096)
		for !strings.Contains(seen.String(), want) {
			n, err := pr.Read(buf)
			seen.Write(buf[:n])
			if err != nil {
				t.Fatalf("reading for %q: %v; got %q", want, err, seen.String())
			}
		}
	}
	waitFor("33 101")
	waitFor("TERM=" + agentproto.DefaultTerm)
	if !strings.Contains(seen.String(), "/dev/pts/") {
		t.Fatalf("tty printed %q", seen.String())
	}
	if err := s.Resize(ctx, 40, 120); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Write([]byte("abc\n")); err != nil {
		t.Fatal(err)
	}
	waitFor("got abc")
	if !strings.Contains(seen.String(), "40 120") {
		t.Fatalf("after resize: %q", seen.String())
	}
	go io.Copy(io.Discard, pr)
	if res, err := s.Wait(); err != nil || res.ExitCode != 0 {
		t.Fatalf("wait: %+v %v", res, err)
	}
}

func TestInteractiveTTYCtrlC(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	pr, pw := io.Pipe()
	go io.Copy(io.Discard, pr)
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"sleep", "100"},
		TTY: &agentproto.TTY{Rows: 24, Cols: 80}}, pw, nil)
	if err != nil {
		t.Fatal(err)
	}
	// ^C typed on the terminal: its line discipline signals the
	// foreground group.
	if _, err := s.Write([]byte{3}); err != nil {
		t.Fatal(err)
	}
	res, err := s.Wait()
	if err != nil || res.ExitCode != 130 {
		t.Fatalf("wait: %+v %v", res, err)
	}
}

func TestInteractiveRefusals(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	for name, req := range map[string]agentproto.ExecRequest{
		"tty size 0":  {Argv: []string{"true"}, TTY: &agentproto.TTY{}},
		"term":        {Argv: []string{"true"}, TTY: &agentproto.TTY{Rows: 1, Cols: 1, Term: "x;rm -rf"}},
		"stdin whole": {Argv: []string{"true"}, Stdin: []byte("x")},
	} {
		if s, err := c.StartExec(ctx, req, nil, nil); err == nil {
			s.Close()
			t.Errorf("%s: accepted", name)
		}
	}
	// Not found: the start failure comes as output and exit 127.
	var errb syncBuffer
	s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"/no/such"}}, nil, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := s.Wait(); err != nil || res.ExitCode != 127 || s.PID != 0 {
		t.Fatalf("missing command: pid %d %+v %v", s.PID, res, err)
	}
}

// startResult is what a StartExec in the background returned.
type startResult struct {
	s   *Session
	err error
}

// scriptedStarts connects a client to a scripted guest. start begins a
// StartExec in the background and returns its result channel and the
// exec request as the guest read it.
func scriptedStarts(t *testing.T) (g *scriptedGuest, c *Client, start func() (chan startResult, agentproto.Header)) {
	g, c = hostileGuest(t)
	return g, c, func() (chan startResult, agentproto.Header) {
		done := make(chan startResult, 1)
		go func() {
			s, err := c.StartExec(ctxT(t, 10*time.Second), agentproto.ExecRequest{Argv: []string{"cat"}}, io.Discard, io.Discard)
			done <- startResult{s, err}
		}()
		h, _ := g.nextReq(t)
		if h.Type != agentproto.TypeExec {
			t.Fatalf("guest got %s, want exec", h.Type)
		}
		return done, h
	}
}

// An agent that predates interactive execs answers with output and exit
// (having ignored the new fields): StartExec says so and cancels it.
func TestInteractiveOldAgent(t *testing.T) {
	g, _, start := scriptedStarts(t)
	done, h := start()
	g.send(t, h.ID, agentproto.TypeExit, agentproto.ExecResult{})
	if h2, _ := g.next(t); h2.Type != agentproto.TypeCancel || h2.ID != h.ID {
		t.Errorf("after an old agent's answer the client sent %+v, want cancel of %d", h2, h.ID)
	}
	if r := <-done; !errors.Is(r.err, ErrNoInteractive) {
		t.Fatalf("StartExec: %v", r.err)
	}
}

// A hostile guest: a bad started reply, no started at all (the call
// deadline), acks it was never owed, output over the bound. Each fails
// only its session, within bounds.
func TestInteractiveHostileGuest(t *testing.T) {
	g, c, start := scriptedStarts(t)
	c.SetCallTimeout(300*time.Millisecond, 0)
	// A negative pid.
	done, h := start()
	g.send(t, h.ID, agentproto.TypeStarted, agentproto.Started{PID: -1})
	if r := <-done; !errors.Is(r.err, ErrProtocol) {
		t.Fatalf("negative pid: %v", r.err)
	}
	g.next(t) // its cancel
	// No started: the call deadline.
	done, _ = start()
	if r := <-done; !errors.Is(r.err, ErrTimeout) {
		t.Fatalf("no started: %v", r.err)
	}
	g.next(t) // its cancel
	// Acks never owed are ignored; output over the bound fails the session.
	done, h = start()
	g.send(t, h.ID, agentproto.TypeStarted, agentproto.Started{PID: 7})
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	for range 3 * agentproto.StdinWindow {
		g.send(t, h.ID, agentproto.TypeStdinAck, nil)
	}
	g.send(t, h.ID, agentproto.TypeOutput, agentproto.Output{Stream: "stdout", Data: make([]byte, agentproto.MaxOutputChunk+1)})
	if _, err := r.s.Wait(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("oversized output: %v", err)
	}
	if len(r.s.credits) > agentproto.StdinWindow {
		t.Fatalf("%d credits", len(r.s.credits))
	}
	if h2, _ := g.next(t); h2.Type != agentproto.TypeCancel || h2.ID != h.ID {
		t.Fatalf("after the protocol violation the client sent %+v, want cancel", h2)
	}
}

// The agent's bounds: at most MaxInteractive interactive execs at once; a
// host that sends stdin past the window loses the command's stdin (it is
// closed: the command sees EOF) and the agent's queue does not grow.
func TestInteractiveAgentBounds(t *testing.T) {
	c := startAgent(t, agent.Options{}).connect(t)
	ctx := ctxT(t, 20*time.Second)
	var sessions []*Session
	defer func() {
		for _, s := range sessions {
			s.Close()
		}
	}()
	for range agentproto.MaxInteractive {
		s, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"sleep", "100"}}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		sessions = append(sessions, s)
	}
	var pe *agentproto.Error
	if _, err := c.StartExec(ctx, agentproto.ExecRequest{Argv: []string{"true"}}, nil, nil); !errors.As(err, &pe) || pe.Code != agentproto.CodeTooLarge {
		t.Fatalf("exec %d: %v", agentproto.MaxInteractive+1, err)
	}
	sessions[0].Close()
	sessions = sessions[1:]
	var out syncBuffer
	// Slots free up as sessions end (the slot is returned just after the exit).
	var s *Session
	for i := 0; ; i++ {
		var err error
		if s, err = c.StartExec(ctx, agentproto.ExecRequest{Shell: "sleep 1; wc -c"}, &out, nil); err == nil {
			break
		}
		if i == 100 {
			t.Fatalf("no slot after a session ended: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Past the window, without waiting for acks.
	const n = 3 * agentproto.StdinWindow
	for range n {
		msg, _ := agentproto.Marshal(s.id, agentproto.TypeStdin, agentproto.StdinRequest{Data: make([]byte, agentproto.MaxStdinChunk)})
		if err := c.enqueue(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	res, err := s.Wait() // no EOF sent: wc ends because its stdin was closed
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("wait: %+v %v", res, err)
	}
	if got := strings.TrimSpace(out.String()); got == "" || got == fmt.Sprint(n*agentproto.MaxStdinChunk) {
		t.Fatalf("wc -c counted %q of %d bytes sent past the window", got, n*agentproto.MaxStdinChunk)
	}
}

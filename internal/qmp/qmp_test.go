package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/qmp/qmptest"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

func TestExecuteAndErrors(t *testing.T) {
	srv := qmptest.Start(t, "", func(w func(string), req map[string]any) {
		id, _ := json.Marshal(req["id"])
		switch req["execute"] {
		case "query-status":
			w(`{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}`)
			w(fmt.Sprintf(`{"return": {"status": "running", "running": true}, "id": %s}`, id))
		case "bad":
			w(fmt.Sprintf(`{"error": {"class": "CommandNotFound", "desc": "The command bad has not been found"}, "id": %s}`, id))
		case "slow":
			// never answers
		}
	})
	events := make(chan Event, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, srv, WithEventChannel(events))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := c.Version(); v.Major != 10 || v.Package != "fake" {
		t.Fatalf("version %+v", v)
	}
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "running" || !st.Running {
		t.Fatalf("query-status: %v %+v", err, st)
	}
	select {
	case ev := <-events:
		if ev.Event != "RESUME" || ev.Timestamp.Unix() != 1 {
			t.Fatalf("event %+v", ev)
		}
	case <-time.After(time.Second):
		t.Fatal("no event")
	}
	err = c.Execute(ctx, "bad", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("want *Error CommandNotFound, got %v", err)
	}
	sctx, scancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer scancel()
	start := time.Now()
	err = c.Execute(sctx, "slow", nil, nil)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Fatalf("slow: %v after %v", err, time.Since(start))
	}
	// Still usable after a timed-out call.
	if err := c.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c.Close() // idempotent
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func TestConcurrentOutOfOrder(t *testing.T) {
	// Replies come back in reverse order of requests to exercise id matching.
	var mu sync.Mutex
	var held []string
	srv := qmptest.Start(t, "", func(w func(string), req map[string]any) {
		id, _ := json.Marshal(req["id"])
		args, _ := req["arguments"].(map[string]any)
		mu.Lock()
		held = append(held, fmt.Sprintf(`{"return": {"n": %v}, "id": %s}`, args["n"], id))
		if len(held) == 8 {
			for i := len(held) - 1; i >= 0; i-- {
				w(held[i])
			}
			held = nil
		}
		mu.Unlock()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, srv)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			var r struct{ N int }
			if err := c.Execute(ctx, "echo", map[string]int{"n": i}, &r); err != nil || r.N != i {
				t.Errorf("call %d: %v %d", i, err, r.N)
			}
		})
	}
	wg.Wait()
}

func TestDialRetriesUntilSocketAppears(t *testing.T) {
	path := filepath.Join(testutil.ShortDir(t), "late.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	go func() {
		time.Sleep(150 * time.Millisecond)
		ln, err := net.Listen("unix", path)
		if err != nil {
			return
		}
		t.Cleanup(func() { ln.Close() })
		qmptest.Serve(ln, nil)
	}()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// Nobody ever listens: Dial ends with the context.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if _, err := Dial(ctx2, filepath.Join(testutil.ShortDir(t), "never.sock")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want deadline exceeded, got %v", err)
	}
}

// An event that reaches the client before the greeting (QEMU emitting
// RESUME while its monitor has not greeted the new client yet) is skipped;
// anything else in place of the greeting is still an error.
func TestEventBeforeGreeting(t *testing.T) {
	serve := func(first string) string {
		path := filepath.Join(testutil.ShortDir(t), "q.sock")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			qmptest.ServeConn(conn, nil, first)
		}()
		return path
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, serve(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}`))
	if err != nil {
		t.Fatalf("event before the greeting: %v", err)
	}
	if v := c.Version(); v.Major != 10 {
		t.Errorf("version after a skipped event: %+v", v)
	}
	c.Close()
	if _, err := Dial(ctx, serve(`{"return": {}}`)); err == nil || !strings.Contains(err.Error(), "unexpected greeting") {
		t.Errorf("a reply in place of the greeting: %v, want unexpected greeting", err)
	}
}

func TestGreetingTimeout(t *testing.T) {
	// A socket that accepts but never greets (QEMU busy with another client).
	path := filepath.Join(testutil.ShortDir(t), "mute.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			time.Sleep(2 * time.Second)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := Dial(ctx, path); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > time.Second {
		t.Fatalf("want deadline exceeded quickly, got %v after %v", err, time.Since(start))
	}
}

func TestServerHangupFailsPending(t *testing.T) {
	// A raw listener so we control the hangup.
	path := filepath.Join(testutil.ShortDir(t), "hup.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		conn.Write([]byte(qmptest.Greeting + "\n"))
		r := bufio.NewReader(conn)
		line, _ := r.ReadBytes('\n')
		var req map[string]any
		json.Unmarshal(line, &req)
		id, _ := json.Marshal(req["id"])
		conn.Write([]byte(fmt.Sprintf(`{"return": {}, "id": %s}`+"\n", id)))
		r.ReadBytes('\n') // the pending command
		conn.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(ctx, "stop", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("want ErrClosed, got %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(time.Second):
		t.Fatal("Done not closed")
	}
	c.Close()
}

// startBareQEMU starts a real QEMU with no guest (-M none) and its QMP
// socket in a fresh short dir, killed when the test ends; it skips when
// QEMU is not installed.
func startBareQEMU(t *testing.T, extra ...string) (dir, sock string, cmd *exec.Cmd) {
	t.Helper()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	dir = testutil.ShortDir(t)
	sock = filepath.Join(dir, "qmp.sock")
	args := append([]string{"-M", "none", "-nodefaults", "-display", "none"}, extra...)
	cmd = exec.Command(qemu, append(args, "-qmp", "unix:"+sock+",server=on,wait=off")...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return dir, sock, cmd
}

// TestRealQEMUSchema talks to a real QEMU (no guest: -M none) and reads the
// ~200 KB query-qmp-schema reply, far over bufio.Scanner's 64 KiB default.
func TestRealQEMUSchema(t *testing.T) {
	_, sock, _ := startBareQEMU(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var events []Event
	var emu sync.Mutex
	c, err := Dial(ctx, sock, WithEventHandler(func(e Event) {
		emu.Lock()
		events = append(events, e)
		emu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.Version().Major < 9 {
		t.Logf("old QEMU %s", c.Version())
	}
	var schema []json.RawMessage
	if err := c.Execute(ctx, "query-qmp-schema", nil, &schema); err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(schema)
	if len(raw) <= 64<<10 {
		t.Fatalf("schema only %d bytes; expected > 64 KiB", len(raw))
	}
	t.Logf("query-qmp-schema: %d entries, %d bytes", len(schema), len(raw))

	out, err := c.HumanMonitorCommand(ctx, "info version")
	if err != nil || !strings.Contains(out, c.Version().String()) {
		t.Fatalf("hmp: %q %v", out, err)
	}
	err = c.Execute(ctx, "no-such-command", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("want CommandNotFound, got %v", err)
	}
	if err := c.Execute(ctx, "quit", nil, nil); err != nil && !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("connection not closed after quit")
	}
	emu.Lock()
	defer emu.Unlock()
	if len(events) == 0 || events[len(events)-1].Event != "SHUTDOWN" {
		t.Fatalf("want SHUTDOWN event, got %+v", events)
	}
}

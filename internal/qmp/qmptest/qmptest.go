// Package qmptest is a fake QMP server for unit tests — NOT QEMU. It greets
// like QEMU 10.0.2, answers qmp_capabilities, and hands every other request
// to the test's handler, so a test can script replies, errors, events,
// reordering and silence. What it proves is the client's side of the
// protocol; QEMU's behaviour is checked only against a real QEMU.
package qmptest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/smolvm-go/smolvm/internal/testutil"
)

// Greeting is the line the server sends first on every connection.
const Greeting = `{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": []}}`

// Handler answers one request (the decoded JSON object). write sends one
// line (a reply or an event; the server adds CRLF as QEMU does) and may be
// called from other goroutines; a handler that writes nothing leaves the
// request unanswered.
type Handler func(write func(line string), req map[string]any)

// RawHandler is a Handler that also gets the connection, for what no
// line-based write can send (a line without its end, say). Its writes to
// conn must not overlap write's.
type RawHandler func(conn net.Conn, write func(line string), req map[string]any)

// Return is the reply line {"return": ret, "id": <req's id>}; ret is raw
// JSON ("{}" when empty).
func Return(req map[string]any, ret string) string {
	if ret == "" {
		ret = "{}"
	}
	return fmt.Sprintf(`{"return": %s, "id": %s}`, ret, ID(req))
}

// Error is the error reply line for req.
func Error(req map[string]any, class, desc string) string {
	c, _ := json.Marshal(class)
	d, _ := json.Marshal(desc)
	return fmt.Sprintf(`{"error": {"class": %s, "desc": %s}, "id": %s}`, c, d, ID(req))
}

// ID is req's id as raw JSON ("null" when absent).
func ID(req map[string]any) string {
	id, _ := json.Marshal(req["id"])
	return string(id)
}

// Start listens on the unix socket path (a fresh one in a testutil.ShortDir
// when path is "") and serves h there until the test ends. It returns the path.
func Start(t testing.TB, path string, h Handler) string {
	t.Helper()
	return StartRaw(t, path, lineHandler(h))
}

// StartRaw is Start for a RawHandler.
func StartRaw(t testing.TB, path string, h RawHandler) string {
	t.Helper()
	if path == "" {
		path = filepath.Join(testutil.ShortDir(t), "qmp.sock")
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go serve(ln, h)
	return path
}

// Serve accepts connections on ln until it is closed and serves each with
// h (ServeConn).
func Serve(ln net.Listener, h Handler) { serve(ln, lineHandler(h)) }

func serve(ln net.Listener, h RawHandler) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		go serveConn(conn, h)
	}
}

// lineHandler is h as a RawHandler; a nil h answers every request with an
// empty return.
func lineHandler(h Handler) RawHandler {
	if h == nil {
		h = func(write func(string), req map[string]any) { write(Return(req, "")) }
	}
	return func(_ net.Conn, write func(string), req map[string]any) { h(write, req) }
}

// ServeConn serves one connection until the client hangs up, then closes
// it. The lines of preamble go out before the greeting (QEMU can emit an
// event there). A nil h answers every request with an empty return.
func ServeConn(conn net.Conn, h Handler, preamble ...string) {
	serveConn(conn, lineHandler(h), preamble...)
}

func serveConn(conn net.Conn, h RawHandler, preamble ...string) {
	defer conn.Close()
	var wmu sync.Mutex
	write := func(s string) {
		wmu.Lock()
		defer wmu.Unlock()
		conn.Write([]byte(s + "\r\n"))
	}
	for _, l := range preamble {
		write(l)
	}
	write(Greeting)
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var req map[string]any
		if json.Unmarshal(line, &req) != nil {
			continue
		}
		if req["execute"] == "qmp_capabilities" {
			write(Return(req, ""))
			continue
		}
		h(conn, write, req)
	}
}

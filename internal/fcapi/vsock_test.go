package fcapi_test

// PROTOCOL TEST — NOT A FIRECRACKER TEST. The listeners here speak the
// host-initiated vsock handshake as firecracker-vsock.md documents it:
// read "CONNECT <port>\n", answer "OK <hostport>\n" (or close the
// connection when nothing listens on the guest port).

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/fcapi"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// vsockListener serves the handshake on a unix socket. reply decides, per
// accepted connection (numbered from 1), what to do after reading the
// CONNECT line: it returns the bytes to send in ONE write, and whether to
// then echo; nil bytes means close at once (no guest listener).
func vsockListener(t *testing.T, sock string, wantPort string, reply func(n int) (first []byte, echo bool)) *atomic.Int32 {
	t.Helper()
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var count atomic.Int32
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			n := int(count.Add(1))
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				line, err := br.ReadString('\n')
				if err != nil || line != "CONNECT "+wantPort+"\n" {
					c.Write([]byte("bad request\n"))
					return
				}
				first, echo := reply(n)
				if first == nil {
					return
				}
				if _, err := c.Write(first); err != nil || !echo {
					return
				}
				io.Copy(c, br)
			}()
		}
	}()
	return &count
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if string(buf) != msg {
		t.Fatalf("echo %q, want %q", buf, msg)
	}
}

func TestVsockHandshake(t *testing.T) {
	sock := filepath.Join(testutil.ShortDir(t), "v.sock")
	vsockListener(t, sock, "1024", func(int) ([]byte, bool) { return []byte("OK 1073741824\n"), true })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := fcapi.DialVsock(ctx, sock, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(*net.UnixConn); !ok {
		t.Errorf("with nothing buffered the raw *net.UnixConn should be returned, got %T", c)
	}
	roundTrip(t, c, "hello agent\n")
}

// The guest's first bytes arrive in the same read as the OK line: they must
// come out of the returned conn, before anything read later.
func TestVsockHandshakeKeepsBytesAfterOK(t *testing.T) {
	sock := filepath.Join(testutil.ShortDir(t), "v.sock")
	vsockListener(t, sock, "1024", func(int) ([]byte, bool) { return []byte("OK 1234\nHELLO from guest\n"), true })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := fcapi.DialVsock(ctx, sock, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !fcapi.IsVsockConn(c) {
		t.Fatalf("bytes after the OK line were not kept: got %T", c)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// Small reads: the pending bytes are drained across several Reads.
	got := make([]byte, 0, 32)
	buf := make([]byte, 4)
	for len(got) < len("HELLO from guest\n") {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
	}
	if string(got) != "HELLO from guest\n" {
		t.Fatalf("first bytes %q", got)
	}
	// The conn still works both ways after the pending bytes are gone, and
	// keeps the half-close the agent client may use.
	roundTrip(t, c, "ping\n")
	if cw, ok := c.(interface{ CloseWrite() error }); !ok {
		t.Errorf("%T has no CloseWrite", c)
	} else if err := cw.CloseWrite(); err != nil {
		t.Error(err)
	}
}

// Firecracker closes the host connection while nothing listens on the guest
// port: Dial retries until the guest listener is up.
func TestVsockRetriesUntilGuestListens(t *testing.T) {
	sock := filepath.Join(testutil.ShortDir(t), "v.sock")
	count := vsockListener(t, sock, "52", func(n int) ([]byte, bool) {
		if n < 3 {
			return nil, false
		}
		return []byte("OK 99\n"), true
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := fcapi.DialVsock(ctx, sock, 52)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := count.Load(); n != 3 {
		t.Errorf("%d attempts, want 3", n)
	}
	roundTrip(t, c, "x")
}

// The socket appears only after Firecracker starts the VM.
func TestVsockRetriesUntilSocketExists(t *testing.T) {
	sock := filepath.Join(testutil.ShortDir(t), "v.sock")
	go func() {
		time.Sleep(150 * time.Millisecond)
		vsockListener(t, sock, "1024", func(int) ([]byte, bool) { return []byte("OK 1\n"), true })
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := fcapi.DialVsock(ctx, sock, 1024)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestVsockGivesUp(t *testing.T) {
	sock := filepath.Join(testutil.ShortDir(t), "v.sock")
	vsockListener(t, sock, "1024", func(int) ([]byte, bool) { return nil, false })

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := fcapi.DialVsock(ctx, sock, 1024)
	if !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("want DeadlineExceeded wrapping the last EOF, got %v", err)
	}

	// Check stops the retries at once.
	dead := errors.New("vmm exited")
	d := fcapi.VsockDialer{Path: sock, Check: func() error { return dead }}
	if _, err := d.Dial(context.Background(), 1024); !errors.Is(err, dead) {
		t.Fatalf("want the Check error, got %v", err)
	}
}

func TestVsockBadReplies(t *testing.T) {
	for _, reply := range []string{"ERR no\n", "OK\n", "OK abc\n", strings.Repeat("O", 100)} {
		sock := filepath.Join(testutil.ShortDir(t), "v.sock")
		vsockListener(t, sock, "7", func(int) ([]byte, bool) { return []byte(reply), true })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := fcapi.VsockDialer{Path: sock}.DialOnce(ctx, 7)
		cancel()
		if err == nil {
			t.Errorf("reply %q accepted", reply)
		}
	}
}

// A handshake that never answers is bounded by the per-attempt timeout.
func TestVsockHandshakeTimeout(t *testing.T) {
	sock := filepath.Join(testutil.ShortDir(t), "v.sock")
	block := make(chan struct{})
	defer close(block)
	vsockListener(t, sock, "7", func(int) ([]byte, bool) { <-block; return nil, false })
	start := time.Now()
	_, err := fcapi.VsockDialer{Path: sock, HandshakeTimeout: 100 * time.Millisecond}.DialOnce(context.Background(), 7)
	if err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("err %v after %v", err, time.Since(start))
	}
}

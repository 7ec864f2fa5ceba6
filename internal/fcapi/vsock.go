package fcapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/retry"
)

// maxOKLine bounds the handshake reply ("OK 1073741824\n" is 14 bytes).
const maxOKLine = 64

// VsockDialer opens host-initiated connections to a guest vsock port
// through Firecracker's vsock unix socket: it connects to Path, sends
// "CONNECT <port>\n" and expects "OK <hostport>\n". Firecracker closes the
// connection when nothing listens on the guest port, so Dial retries.
type VsockDialer struct {
	Path string // the vsock device's uds_path

	// HandshakeTimeout bounds one connect+handshake attempt (default 5 s).
	HandshakeTimeout time.Duration
	// RetryInterval is the first pause between attempts; it doubles up to
	// 250 ms (default 10 ms).
	RetryInterval time.Duration
	// Check, when set, runs before every retry; a non-nil error stops Dial
	// at once and is returned (e.g. "the VMM process exited").
	Check func() error
}

// DialVsock is VsockDialer{Path: udsPath}.Dial(ctx, port).
func DialVsock(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	return VsockDialer{Path: udsPath}.Dial(ctx, port)
}

// Dial retries DialOnce until it succeeds, Check fails or ctx ends. The
// returned error wraps ctx.Err() and the last attempt's error.
func (d VsockDialer) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	return retry.Do(ctx, retry.Policy{First: d.RetryInterval, Max: 250 * time.Millisecond},
		func(ctx context.Context) (net.Conn, error) {
			conn, err := d.DialOnce(ctx, port)
			if err != nil && ctx.Err() == nil && d.Check != nil {
				if cerr := d.Check(); cerr != nil {
					return nil, retry.Stop(cerr)
				}
			}
			return conn, err
		})
}

// DialOnce makes one connect+handshake attempt. Bytes the guest sent in the
// same read as the OK line are kept and returned by the first Read.
func (d VsockDialer) DialOnce(ctx context.Context, port uint32) (net.Conn, error) {
	ht := d.HandshakeTimeout
	if ht <= 0 {
		ht = 5 * time.Second
	}
	actx, cancel := context.WithTimeout(ctx, ht)
	defer cancel()

	var nd net.Dialer
	c, err := nd.DialContext(actx, "unix", d.Path)
	if err != nil {
		return nil, fmt.Errorf("fcapi: vsock dial: %w", err)
	}
	uc := c.(*net.UnixConn)
	dl, _ := actx.Deadline()
	_ = uc.SetDeadline(dl)
	// Unblock reads/writes if ctx is cancelled before the deadline.
	stop := context.AfterFunc(actx, func() { _ = uc.SetDeadline(time.Unix(1, 0)) })
	pending, err := handshake(uc, port)
	if !stop() || err != nil {
		uc.Close()
		if err == nil {
			err = actx.Err()
		}
		return nil, fmt.Errorf("fcapi: vsock CONNECT %d: %w", port, err)
	}
	_ = uc.SetDeadline(time.Time{})
	if len(pending) == 0 {
		return uc, nil
	}
	return &vsockConn{conn: uc, pending: pending}, nil
}

// handshake sends CONNECT and reads the OK line; it returns whatever was
// read after the newline.
func handshake(c net.Conn, port uint32) ([]byte, error) {
	if _, err := io.WriteString(c, "CONNECT "+strconv.FormatUint(uint64(port), 10)+"\n"); err != nil {
		return nil, err
	}
	buf := make([]byte, 0, 512)
	tmp := make([]byte, 512)
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if i := bytes.IndexByte(buf, '\n'); i >= 0 {
			if err := parseOK(buf[:i]); err != nil {
				return nil, err
			}
			return bytes.Clone(buf[i+1:]), nil
		}
		if len(buf) > maxOKLine {
			return nil, fmt.Errorf("no newline in the first %d bytes of the reply %q", len(buf), buf[:maxOKLine])
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("connection closed before OK (nothing listening on the guest port yet?): %w", io.ErrUnexpectedEOF)
			}
			return nil, err
		}
	}
}

func parseOK(line []byte) error {
	s := strings.TrimSuffix(string(line), "\r")
	rest, ok := strings.CutPrefix(s, "OK ")
	if !ok {
		return fmt.Errorf("unexpected reply %q (want \"OK <port>\")", s)
	}
	if _, err := strconv.ParseUint(rest, 10, 32); err != nil {
		return fmt.Errorf("unexpected reply %q: bad host port", s)
	}
	return nil
}

// vsockConn is a handshaken connection whose first reads drain the bytes
// that arrived together with the OK line. It deliberately does not embed
// the *net.UnixConn so that no WriterTo/ReaderFrom shortcut can bypass Read.
type vsockConn struct {
	conn    *net.UnixConn
	pending []byte
}

func (c *vsockConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.conn.Read(p)
}

func (c *vsockConn) Write(p []byte) (int, error)        { return c.conn.Write(p) }
func (c *vsockConn) Close() error                       { return c.conn.Close() }
func (c *vsockConn) CloseWrite() error                  { return c.conn.CloseWrite() }
func (c *vsockConn) CloseRead() error                   { return c.conn.CloseRead() }
func (c *vsockConn) LocalAddr() net.Addr                { return c.conn.LocalAddr() }
func (c *vsockConn) RemoteAddr() net.Addr               { return c.conn.RemoteAddr() }
func (c *vsockConn) SetDeadline(t time.Time) error      { return c.conn.SetDeadline(t) }
func (c *vsockConn) SetReadDeadline(t time.Time) error  { return c.conn.SetReadDeadline(t) }
func (c *vsockConn) SetWriteDeadline(t time.Time) error { return c.conn.SetWriteDeadline(t) }

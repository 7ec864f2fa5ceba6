package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smolvm-go/smolvm/internal/retry"
)

// Error is an error reply from QEMU.
type Error struct {
	Class string // e.g. "GenericError", "CommandNotFound", "DeviceNotActive"
	Desc  string
}

func (e *Error) Error() string {
	if e.Class == "" {
		return "qmp: " + e.Desc
	}
	return fmt.Sprintf("qmp: %s (%s)", e.Desc, e.Class)
}

// ErrClosed is returned by calls on a Client whose connection is closed
// (by Close, or because QEMU went away).
var ErrClosed = errors.New("qmp: connection closed")

// Event is an asynchronous QMP event.
type Event struct {
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp time.Time       `json:"-"`
}

// Version is QEMU's version from the greeting.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

func (v Version) String() string {
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
}

// Option configures Dial.
type Option func(*config)

type config struct {
	onEvent func(Event)
	events  chan<- Event
}

// WithEventHandler calls fn for every event, in order, from the goroutine that
// reads the socket. fn must not block for long and must not call Execute and
// wait for its reply (that would deadlock the reader).
func WithEventHandler(fn func(Event)) Option {
	return func(c *config) { c.onEvent = fn }
}

// WithEventChannel sends every event to ch. When ch is full the event is
// dropped rather than stalling replies. ch is never closed by the Client.
func WithEventChannel(ch chan<- Event) Option {
	return func(c *config) { c.events = ch }
}

// Client is a QMP connection. It is safe for concurrent use.
type Client struct {
	conn    net.Conn
	cfg     config
	version Version

	writeMu sync.Mutex
	nextID  atomic.Uint64

	mu      sync.Mutex
	pending map[string]chan response
	err     error // set once the reader stops

	done      chan struct{}
	closeOnce sync.Once
}

type response struct {
	Return json.RawMessage `json:"return"`
	Error  *Error          `json:"error"`
}

// wire forms
type message struct {
	QMP       json.RawMessage `json:"QMP"`
	ID        json.RawMessage `json:"id"`
	Return    json.RawMessage `json:"return"`
	Error     *wireError      `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

type wireError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

type greeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
}

// Dial connects to the QMP socket at path, retrying until the socket accepts
// a connection or ctx ends, then reads the greeting and enters command mode.
func Dial(ctx context.Context, path string, opts ...Option) (*Client, error) {
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	var d net.Dialer
	conn, err := retry.Do(ctx, retry.Policy{First: 5 * time.Millisecond, Max: 80 * time.Millisecond},
		func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "unix", path) })
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	c, err := newClient(ctx, conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient runs the QMP handshake over an established connection. The
// Client owns conn afterwards.
func NewClient(ctx context.Context, conn net.Conn, opts ...Option) (*Client, error) {
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	c, err := newClient(ctx, conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func newClient(ctx context.Context, conn net.Conn, cfg config) (*Client, error) {
	r := bufio.NewReader(conn)

	// Handshake: bounded by ctx through the connection deadline.
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	var m message
	for {
		line, err := readLine(r)
		if err != nil {
			stop()
			return nil, handshakeErr(ctx, "read greeting", err)
		}
		m = message{}
		if err := json.Unmarshal(line, &m); err == nil && m.QMP == nil && m.Event != "" {
			// QEMU can emit an event (RESUME as a cold-booted VM starts)
			// to a client that connected before its monitor has sent
			// the greeting; it comes first on the wire. Skip it.
			continue
		}
		if err != nil || m.QMP == nil {
			stop()
			return nil, fmt.Errorf("qmp: unexpected greeting %q", truncate(line, 200))
		}
		break
	}
	stop()
	var g greeting
	_ = json.Unmarshal(m.QMP, &g)
	conn.SetReadDeadline(time.Time{})

	c := &Client{
		conn: conn,
		cfg:  cfg,
		version: Version{
			Major: g.Version.QEMU.Major, Minor: g.Version.QEMU.Minor,
			Micro: g.Version.QEMU.Micro, Package: g.Version.Package,
		},
		pending: make(map[string]chan response),
		done:    make(chan struct{}),
	}
	go c.readLoop(r)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func handshakeErr(ctx context.Context, what string, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("qmp: %s: %w", what, ctx.Err())
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("qmp: %s: %w", what, context.DeadlineExceeded)
	}
	return fmt.Errorf("qmp: %s: %w", what, err)
}

// Version returns QEMU's version as announced in the greeting.
func (c *Client) Version() Version { return c.version }

// Done is closed when the connection ends (Close, or QEMU hung up).
func (c *Client) Done() <-chan struct{} { return c.done }

// MaxLine bounds one message from QEMU. The largest reply we ask for,
// query-qmp-schema, is about 210 KB on QEMU 10; a QEMU taken over by its
// guest is hostile, so a longer line ends the connection instead of
// growing host memory without end.
const MaxLine = 16 << 20

// ErrLineTooLong is wrapped when QEMU sends a message over MaxLine.
var ErrLineTooLong = errors.New("qmp: message from QEMU exceeds the size limit")

// readLine reads one newline-terminated message of at most MaxLine bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(line)+len(frag) > MaxLine {
			return nil, fmt.Errorf("%w (%d bytes)", ErrLineTooLong, MaxLine)
		}
		if cap(line)-len(line) < len(frag) { // grow by doubling, up to MaxLine
			grown := make([]byte, len(line), min(max(2*cap(line), len(line)+len(frag)), MaxLine))
			copy(grown, line)
			line = grown
		}
		line = append(line, frag...)
		if err != bufio.ErrBufferFull {
			return line, err
		}
	}
}

func (c *Client) readLoop(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = readLine(r)
		if len(line) > 0 && err == nil {
			c.dispatch(line)
		}
		if err != nil {
			break
		}
	}
	c.mu.Lock()
	if c.err == nil {
		c.err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	pending := c.pending
	c.pending = nil
	c.mu.Unlock()
	for _, ch := range pending {
		close(ch)
	}
	c.closeOnce.Do(func() { c.conn.Close() })
	close(c.done)
}

func (c *Client) dispatch(line []byte) {
	var m message
	if err := json.Unmarshal(line, &m); err != nil {
		return // not JSON; ignore
	}
	switch {
	case m.Event != "":
		ev := Event{Event: m.Event, Data: m.Data}
		if m.Timestamp != nil {
			ev.Timestamp = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
		}
		if c.cfg.onEvent != nil {
			c.cfg.onEvent(ev)
		}
		if c.cfg.events != nil {
			select {
			case c.cfg.events <- ev:
			default:
			}
		}
	case m.ID != nil:
		var id string
		if err := json.Unmarshal(m.ID, &id); err != nil {
			return
		}
		c.mu.Lock()
		ch := c.pending[id]
		delete(c.pending, id)
		c.mu.Unlock()
		if ch == nil {
			return // reply to a call that gave up
		}
		resp := response{Return: m.Return}
		if m.Error != nil {
			resp.Error = &Error{Class: m.Error.Class, Desc: m.Error.Desc}
		}
		ch <- resp // buffered
	}
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        string `json:"id"`
}

// Execute runs cmd with args (marshalled to JSON; nil for none) and decodes
// the "return" value into result (nil to discard). A QEMU error reply is
// returned as *Error. The call gives up when ctx ends; a late reply is
// discarded.
func (c *Client) Execute(ctx context.Context, cmd string, args any, result any) error {
	return c.execute(ctx, cmd, args, result, nil)
}

func (c *Client) execute(ctx context.Context, cmd string, args any, result any, oob []byte) error {
	id := "smolvm-" + strconv.FormatUint(c.nextID.Add(1), 10)
	b, err := json.Marshal(request{Execute: cmd, Arguments: args, ID: id})
	if err != nil {
		return fmt.Errorf("qmp: %s: marshal arguments: %w", cmd, err)
	}
	b = append(b, '\n')

	ch := make(chan response, 1)
	c.mu.Lock()
	if c.pending == nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		if c.pending != nil {
			delete(c.pending, id)
		}
		c.mu.Unlock()
	}

	if err := c.write(ctx, b, oob); err != nil {
		forget()
		return fmt.Errorf("qmp: %s: %w", cmd, err)
	}

	select {
	case resp, ok := <-ch:
		if !ok {
			c.mu.Lock()
			err := c.err
			c.mu.Unlock()
			return fmt.Errorf("qmp: %s: %w", cmd, err)
		}
		if resp.Error != nil {
			return resp.Error
		}
		if result != nil && resp.Return != nil {
			if err := json.Unmarshal(resp.Return, result); err != nil {
				return fmt.Errorf("qmp: %s: decode reply: %w", cmd, err)
			}
		}
		return nil
	case <-ctx.Done():
		forget()
		return fmt.Errorf("qmp: %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) write(ctx context.Context, b, oob []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, _ := ctx.Deadline() // zero = none
	c.conn.SetWriteDeadline(dl)
	stop := context.AfterFunc(ctx, func() { c.conn.SetWriteDeadline(time.Unix(1, 0)) })
	n, err := c.writeMsg(b, oob)
	stop()
	if err != nil {
		if n > 0 && n < len(b) {
			// A torn command would corrupt the stream: give up the connection.
			go c.Close()
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		select {
		case <-c.done:
			return ErrClosed
		default:
		}
		return err
	}
	return nil
}

// HumanMonitorCommand runs an HMP command through QMP and returns its output.
func (c *Client) HumanMonitorCommand(ctx context.Context, cmdline string) (string, error) {
	var out string
	err := c.Execute(ctx, "human-monitor-command",
		map[string]string{"command-line": cmdline}, &out)
	return out, err
}

// Close closes the connection. Pending calls fail with ErrClosed. It is
// idempotent and safe to call concurrently.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.err == nil {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	c.closeOnce.Do(func() { c.conn.Close() })
	<-c.done
	return nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

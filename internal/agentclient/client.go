package agentclient

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	pathpkg "path"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/retry"
)

// Dialer opens a new connection to the guest agent's stream.
type Dialer func(ctx context.Context) (net.Conn, error)

// ErrDisconnected is wrapped by the errors of calls that failed because the
// connection to the agent was lost or closed.
var ErrDisconnected = errors.New("agent connection lost")

// ErrClosed is returned by calls on a closed Client. It wraps
// ErrDisconnected.
var ErrClosed = fmt.Errorf("%w: client closed", ErrDisconnected)

// ErrProtocol is wrapped by the errors of calls whose reply broke the
// protocol: a reply over its size bound (agentproto.ReplyLimit), an output
// message over agentproto.MaxOutputChunk, a malformed payload, a file that
// does not match its announced size. Only that call fails; the connection
// stays up.
var ErrProtocol = errors.New("the guest agent broke the protocol")

// ErrSizeMismatch is returned (wrapped) when a guest file read in chunks
// holds more or fewer bytes than the guest announced. It wraps ErrProtocol.
var ErrSizeMismatch = fmt.Errorf("%w: the file's data does not match its announced size", ErrProtocol)

// ErrTimeout is wrapped by the errors of calls that got no reply within
// their host-side deadline (see CallTimeout). The caller's own context
// ending is reported as the context's error instead.
var ErrTimeout = errors.New("the guest agent did not answer in time")

// Host-side deadlines of calls other than Exec (whose bound is the
// caller's: the command may legitimately run for hours). A call that moves
// data gets PerMiB more for each MiB it moves.
const (
	DefaultCallTimeout = 60 * time.Second
	PerMiBTimeout      = time.Second
	// syncTimeoutFactor: sync flushes the whole guest page cache.
	syncTimeoutFactor = 3
)

// VersionError reports an agent speaking another protocol version.
type VersionError struct {
	Agent        int    // the agent's protocol version
	AgentVersion string // the agent's build version
}

func (e *VersionError) Error() string {
	return fmt.Sprintf("agentclient: agent %s speaks protocol %d, want %d", e.AgentVersion, e.Agent, agentproto.ProtocolVersion)
}

// helloInterval is how often Connect repeats hello until it is answered.
const helloInterval = 75 * time.Millisecond

// dialRetry is the pause between failed dials.
const dialRetry = 20 * time.Millisecond

// Client is a connection to one guest agent. It is safe for concurrent use.
type Client struct {
	conn  net.Conn
	hello agentproto.Hello

	nextMu sync.Mutex
	next   uint64

	wq chan []byte // messages for the writer goroutine

	mu      sync.Mutex
	pending map[uint64]*call
	nonces  map[string]bool // hello nonces of this connect, until synced
	synced  chan struct{}   // closed when a hello reply matched
	err     error           // why the connection is gone

	dropped atomic.Uint64 // replies for no pending call

	callTimeout atomic.Int64 // base host-side deadline of a call (ns)
	perMiB      atomic.Int64 // added per MiB a call moves (ns)

	closed    chan struct{} // closed when the connection is gone
	closeOnce sync.Once
	done      chan struct{} // reader and writer finished
}

// call is one request waiting for its reply (or replies, for exec).
type call struct {
	ch      chan inbound
	abandon chan struct{} // closed when the caller stopped waiting
}

type inbound struct {
	hdr  agentproto.Header
	line []byte
	err  error             // the reply broke the protocol (wraps ErrProtocol)
	out  agentproto.Output // decoded output message (Exec)
}

// Connect dials the agent, retrying dial errors until ctx ends, and resyncs
// the stream. On success the Client owns the connection. When ctx ends
// first the error wraps ctx.Err() and names the last attempt's error (not
// wrapped: a connect that timed out is a timeout).
func Connect(ctx context.Context, dial Dialer) (*Client, error) {
	c, err := retry.Do(ctx, retry.Policy{First: dialRetry}, func(ctx context.Context) (*Client, error) {
		conn, err := dial(ctx)
		if err != nil {
			return nil, err
		}
		c, err := newClient(ctx, conn)
		if err == nil {
			return c, nil
		}
		var ve *VersionError
		if ctx.Err() != nil || errors.As(err, &ve) {
			return nil, retry.Stop(err)
		}
		// The stream failed during resync (the VMM dropped us, for
		// instance): dial again.
		return nil, err
	})
	if g, ok := errors.AsType[*retry.GiveUpError](err); ok {
		if g.Last != nil {
			return nil, fmt.Errorf("agentclient: connect: %w (last error: %v)", g.Err, g.Last)
		}
		return nil, fmt.Errorf("agentclient: connect: %w", g.Err)
	}
	return c, err
}

func randUint64() uint64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return binary.LittleEndian.Uint64(b[:])
}

func newClient(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{
		conn:    conn,
		next:    randUint64(),
		wq:      make(chan []byte, 64),
		pending: map[uint64]*call{},
		nonces:  map[string]bool{},
		synced:  make(chan struct{}),
		closed:  make(chan struct{}),
		done:    make(chan struct{}),
	}
	c.SetCallTimeout(0, 0)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); c.readLoop() }()
	go func() { defer wg.Done(); c.writeLoop() }()
	go func() { wg.Wait(); close(c.done) }()

	if err := c.resync(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// resync terminates any partial line in the guest, then sends hellos until
// one is answered.
func (c *Client) resync(ctx context.Context) error {
	if err := c.enqueue(ctx, []byte("\n")); err != nil {
		return err
	}
	prefix := make([]byte, 12)
	rand.Read(prefix)
	base := base64.RawURLEncoding.EncodeToString(prefix)
	t := time.NewTicker(helloInterval)
	defer t.Stop()
	for i := 0; ; i++ {
		nonce := fmt.Sprintf("%s-%d", base, i)
		c.mu.Lock()
		c.nonces[nonce] = true
		c.mu.Unlock()
		msg, err := agentproto.Marshal(c.newID(), agentproto.TypeHello,
			agentproto.HelloRequest{Nonce: nonce, ProtocolVersion: agentproto.ProtocolVersion})
		if err != nil {
			return err
		}
		// Do not block on a stalled stream: hellos are repeated anyway.
		select {
		case c.wq <- msg:
		default:
		}
		select {
		case <-c.synced:
			c.mu.Lock()
			c.nonces = nil
			c.mu.Unlock()
			if c.hello.ProtocolVersion != agentproto.ProtocolVersion {
				return &VersionError{Agent: c.hello.ProtocolVersion, AgentVersion: c.hello.AgentVersion}
			}
			return nil
		case <-c.closed:
			return fmt.Errorf("agentclient: resync: %w", c.connErr())
		case <-ctx.Done():
			return fmt.Errorf("agentclient: resync: no hello reply: %w", ctx.Err())
		case <-t.C:
		}
	}
}

func (c *Client) newID() uint64 {
	c.nextMu.Lock()
	defer c.nextMu.Unlock()
	c.next++
	if c.next == 0 {
		c.next++
	}
	return c.next
}

// Hello returns the agent's answer to the hello that synced this Client.
func (c *Client) Hello() agentproto.Hello { return c.hello }

// readLoop reads replies and hands them to their calls. Memory stays
// bounded whatever the guest sends: no line over agentproto.MaxReplySize is
// buffered, a reply over its type's bound is replaced by an error for its
// call, and each call queues a bounded number of replies; when a call's
// queue is full the loop waits (backpressure on the guest) rather than
// buffering more.
func (c *Client) readLoop() {
	lr := agentproto.NewLineReader(c.conn, agentproto.MaxReplySize)
	for {
		line, err := lr.ReadLine()
		if err != nil {
			var tl *agentproto.TooLongError
			if errors.As(err, &tl) {
				if id, ok := agentproto.PeekID(tl.Prefix); ok {
					if !c.deliver(id, inbound{err: fmt.Errorf("%w: a reply over %d bytes", ErrProtocol, agentproto.MaxReplySize)}) {
						return
					}
				}
				continue
			}
			c.fail(err)
			return
		}
		h, err := agentproto.DecodeHeader(line)
		if err != nil {
			continue // garbage: a partial line from before a snapshot...
		}
		if h.Type == agentproto.TypeHello {
			if len(line) < agentproto.MaxSmallReply {
				c.onHello(line)
			}
			continue
		}
		msg := inbound{hdr: h}
		if lim := agentproto.ReplyLimit(h.Type); len(line)+1 > lim {
			msg.err = fmt.Errorf("%w: %s reply of %d bytes (max %d)", ErrProtocol, h.Type, len(line)+1, lim)
		}
		if !c.deliver(h.ID, msg, line) {
			return
		}
	}
}

// deliver queues msg (with a copy of line) for call id, waiting while the
// call's queue is full. It returns false when the connection is gone.
func (c *Client) deliver(id uint64, msg inbound, line ...[]byte) bool {
	c.mu.Lock()
	cl := c.pending[id]
	c.mu.Unlock()
	if cl == nil {
		c.dropped.Add(1)
		return true // stale: its caller is gone, or it predates this Client
	}
	if msg.err == nil && len(line) > 0 {
		msg.line = append([]byte(nil), line[0]...)
	}
	select {
	case cl.ch <- msg:
	case <-cl.abandon:
	case <-c.closed:
		return false
	}
	return true
}

func (c *Client) onHello(line []byte) {
	var h agentproto.Hello
	if agentproto.DecodePayload(line, &h) != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nonces == nil || !c.nonces[h.Nonce] {
		return
	}
	select {
	case <-c.synced:
	default:
		c.hello = h
		close(c.synced)
	}
}

func (c *Client) writeLoop() {
	for {
		select {
		case b := <-c.wq:
			if _, err := c.conn.Write(b); err != nil {
				c.fail(err)
				return
			}
		case <-c.closed:
			return
		}
	}
}

// fail marks the connection gone.
func (c *Client) fail(err error) {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		if errors.Is(err, net.ErrClosed) && c.err == nil {
			err = ErrClosed
		}
		if !errors.Is(err, ErrDisconnected) {
			err = fmt.Errorf("%w: %v", ErrDisconnected, err)
		}
		c.err = err
		c.mu.Unlock()
		close(c.closed)
		c.conn.Close()
	})
}

func (c *Client) connErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		return ErrDisconnected
	}
	return c.err
}

// Close closes the connection. Pending calls fail with ErrClosed. It is
// idempotent.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	<-c.done
	return nil
}

// Done is closed when the connection is gone; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.closed }

// Err returns nil while connected, else why the connection is gone.
func (c *Client) Err() error {
	select {
	case <-c.closed:
		return c.connErr()
	default:
		return nil
	}
}

func (c *Client) enqueue(ctx context.Context, b []byte) error {
	select {
	case <-c.closed:
		return c.connErr()
	default:
	}
	select {
	case c.wq <- b:
		return nil
	case <-c.closed:
		return c.connErr()
	case <-ctx.Done():
		return ctx.Err()
	}
}

// start registers a call and sends its request.
func (c *Client) start(ctx context.Context, typ string, payload any, buf int) (uint64, *call, error) {
	id := c.newID()
	msg, err := agentproto.Marshal(id, typ, payload)
	if err != nil {
		return 0, nil, err
	}
	cl := &call{ch: make(chan inbound, buf), abandon: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return 0, nil, c.connErr()
	}
	c.pending[id] = cl
	c.mu.Unlock()
	if err := c.enqueue(ctx, msg); err != nil {
		c.finish(id, cl)
		return 0, nil, err
	}
	return id, cl, nil
}

func (c *Client) finish(id uint64, cl *call) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
	close(cl.abandon)
}

// wait waits for the next reply of a call. A reply that broke the
// protocol is returned as its error.
func (c *Client) wait(ctx context.Context, cl *call) (inbound, error) {
	select {
	case m := <-cl.ch:
		return m, m.err
	default:
	}
	select {
	case m := <-cl.ch:
		return m, m.err
	case <-c.closed:
		return inbound{}, c.connErr()
	case <-ctx.Done():
		if cause := context.Cause(ctx); errors.Is(cause, ErrTimeout) {
			return inbound{}, cause
		}
		return inbound{}, ctx.Err()
	}
}

// SetCallTimeout sets the host-side deadline of every call but Exec: base
// (DefaultCallTimeout when <= 0), plus perMiB (PerMiBTimeout when <= 0)
// for each MiB the call moves; sync gets three times base.
func (c *Client) SetCallTimeout(base, perMiB time.Duration) {
	if base <= 0 {
		base = DefaultCallTimeout
	}
	if perMiB <= 0 {
		perMiB = PerMiBTimeout
	}
	c.callTimeout.Store(int64(base))
	c.perMiB.Store(int64(perMiB))
}

// callTimeout returns the host-side deadline of a call of type typ that
// moves size bytes.
func (c *Client) timeoutFor(typ string, size int64) time.Duration {
	d := time.Duration(c.callTimeout.Load())
	if typ == agentproto.TypeSync {
		d *= syncTimeoutFactor
	}
	return d + time.Duration(max(size, 0)>>20)*time.Duration(c.perMiB.Load())
}

// withDeadline bounds ctx by the call's host-side deadline; when it
// passes, the context's cause wraps ErrTimeout.
func (c *Client) withDeadline(ctx context.Context, typ string, size int64) (context.Context, context.CancelFunc) {
	d := c.timeoutFor(typ, size)
	return context.WithTimeoutCause(ctx, d, fmt.Errorf("%w (no %s reply within %s)", ErrTimeout, typ, d))
}

// roundTrip sends a request and decodes the single reply of type want into
// out (which may be nil), waiting at most the call's host-side deadline.
func (c *Client) roundTrip(ctx context.Context, typ string, payload any, want string, out any) error {
	return c.roundTripSized(ctx, typ, payload, want, out, 0)
}

// roundTripSized is roundTrip for a call that moves size bytes.
func (c *Client) roundTripSized(ctx context.Context, typ string, payload any, want string, out any, size int64) error {
	ctx, cancel := c.withDeadline(ctx, typ, size)
	defer cancel()
	id, cl, err := c.start(ctx, typ, payload, 1)
	if err != nil {
		return fmt.Errorf("agentclient: %s: %w", typ, err)
	}
	defer c.finish(id, cl)
	m, err := c.wait(ctx, cl)
	if err != nil {
		return fmt.Errorf("agentclient: %s: %w", typ, err)
	}
	return decodeReply(typ, m, want, out)
}

func decodeReply(typ string, m inbound, want string, out any) error {
	switch m.hdr.Type {
	case want:
		if out == nil {
			return nil
		}
		if err := agentproto.DecodePayload(m.line, out); err != nil {
			return fmt.Errorf("agentclient: %s: %w: %v", typ, ErrProtocol, err)
		}
		return nil
	case agentproto.TypeError:
		e := &agentproto.Error{}
		if err := agentproto.DecodePayload(m.line, e); err != nil {
			return fmt.Errorf("agentclient: %s: %w: %v", typ, ErrProtocol, err)
		}
		return e
	default:
		return fmt.Errorf("agentclient: %s: %w: unexpected reply %q", typ, ErrProtocol, m.hdr.Type)
	}
}

// Ping measures a round trip that does not fork in the guest.
func (c *Client) Ping(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	err := c.roundTrip(ctx, agentproto.TypePing, nil, agentproto.TypePong, nil)
	return time.Since(start), err
}

// Info describes the guest.
func (c *Client) Info(ctx context.Context) (agentproto.Info, error) {
	var inf agentproto.Info
	err := c.roundTrip(ctx, agentproto.TypeInfo, nil, agentproto.TypeInfo, &inf)
	return inf, err
}

// Exec runs a process in the guest. Output is written to stdout and stderr
// (either may be nil) as it arrives. A non-zero exit status is not an
// error. When ctx ends first, the guest is asked to kill the process group
// and Exec returns ctx's error. A failing writer does not stop the
// process; its first error is returned with the result.
func (c *Client) Exec(ctx context.Context, req agentproto.ExecRequest, stdout, stderr io.Writer) (agentproto.ExecResult, error) {
	id, cl, err := c.start(ctx, agentproto.TypeExec, req, execQueue)
	if err != nil {
		return agentproto.ExecResult{}, fmt.Errorf("agentclient: exec: %w", err)
	}
	defer c.finish(id, cl)
	var werr error
	for {
		m, err := c.wait(ctx, cl)
		if err == nil && m.hdr.Type == agentproto.TypeOutput {
			err = checkOutput(&m)
		}
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, ErrProtocol) {
				c.sendCancel(id)
			}
			return agentproto.ExecResult{}, fmt.Errorf("agentclient: exec: %w", err)
		}
		switch m.hdr.Type {
		case agentproto.TypeOutput:
			o := m.out
			w := stdout
			if o.Stream == agentproto.StreamStderr {
				w = stderr
			}
			if w != nil && werr == nil {
				if _, err := w.Write(o.Data); err != nil {
					werr = fmt.Errorf("agentclient: exec: writing %s: %w", o.Stream, err)
				}
			}
		default:
			var res agentproto.ExecResult
			if err := decodeReply("exec", m, agentproto.TypeExit, &res); err != nil {
				return agentproto.ExecResult{}, err
			}
			return res, werr
		}
	}
}

// execQueue is how many replies of one Exec may wait for its caller
// (each at most agentproto.MaxOutputMessage bytes: under 3 MiB); when it
// is full, the reader waits for the caller.
const execQueue = 64

// checkOutput decodes an output message into m.out and checks it.
func checkOutput(m *inbound) error {
	if err := agentproto.DecodePayload(m.line, &m.out); err != nil {
		return fmt.Errorf("%w: bad output message: %v", ErrProtocol, err)
	}
	if len(m.out.Data) > agentproto.MaxOutputChunk {
		return fmt.Errorf("%w: output message of %d bytes (max %d)", ErrProtocol, len(m.out.Data), agentproto.MaxOutputChunk)
	}
	if m.out.Stream != agentproto.StreamStdout && m.out.Stream != agentproto.StreamStderr {
		return fmt.Errorf("%w: output for unknown stream %q", ErrProtocol, m.out.Stream)
	}
	return nil
}

// sendCancel asks the guest to stop request id, without waiting long.
func (c *Client) sendCancel(id uint64) {
	msg, err := agentproto.Marshal(id, agentproto.TypeCancel, nil)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = c.enqueue(ctx, msg)
}

// WriteFile writes a file in the guest atomically, creating missing parent
// directories. mode's permission bits (and setuid/setgid/sticky) are
// applied; 0 means 0644.
func (c *Client) WriteFile(ctx context.Context, path string, data []byte, mode fs.FileMode) error {
	if len(data) > agentproto.MaxFileSize {
		return fmt.Errorf("agentclient: write_file %s: %d bytes: %w (max %d)", path, len(data), agentproto.ErrTooLarge, agentproto.MaxFileSize)
	}
	return c.roundTripSized(ctx, agentproto.TypeWriteFile, agentproto.WriteFileRequest{
		Path: path, Data: data, Mode: agentproto.FileModeToUnix(mode), Mkdirs: true,
	}, agentproto.TypeOK, nil, int64(len(data)))
}

// WriteFileFrom writes the size bytes r yields to path in the guest,
// atomically, creating missing parent directories (mode as in WriteFile).
// Up to agentproto.ChunkSize bytes go in one write_file. Larger files go in
// chunks into a temporary file next to path, which commit_file renames over
// it; on failure the temporary file is removed. An agent that predates
// chunks still takes files up to agentproto.MaxFileSize, in one message.
func (c *Client) WriteFileFrom(ctx context.Context, path string, r io.Reader, size int64, mode fs.FileMode) error {
	if size < 0 {
		return fmt.Errorf("agentclient: write %s: negative size %d", path, size)
	}
	buf := make([]byte, min(size, agentproto.ChunkSize))
	read := func(b []byte) error {
		if _, err := io.ReadFull(r, b); err != nil {
			return fmt.Errorf("agentclient: write %s: reading the source: %w", path, err)
		}
		return nil
	}
	if size <= agentproto.ChunkSize {
		if err := read(buf); err != nil {
			return err
		}
		return c.WriteFile(ctx, path, buf, mode)
	}
	dir, base := pathpkg.Split(pathpkg.Clean(path))
	tmp := dir + "." + base + ".smolvm-" + strconv.FormatUint(randUint64(), 36)
	var off int64
	for off < size {
		n := min(int64(len(buf)), size-off)
		if err := read(buf[:n]); err != nil {
			c.removeQuiet(ctx, tmp, off > 0)
			return err
		}
		err := c.roundTripSized(ctx, agentproto.TypeWriteChunk, agentproto.WriteChunkRequest{
			Path: tmp, Offset: off, Data: buf[:n], Mkdirs: off == 0}, agentproto.TypeOK, nil, n)
		if err != nil {
			if off == 0 && isUnknownType(err) && size <= agentproto.MaxFileSize {
				whole := make([]byte, size)
				copy(whole, buf[:n])
				if err := read(whole[n:]); err != nil {
					return err
				}
				return c.WriteFile(ctx, path, whole, mode)
			}
			c.removeQuiet(ctx, tmp, !isUnknownType(err))
			if isUnknownType(err) {
				return fmt.Errorf("agentclient: write %s: %d bytes: %w (max %d for this guest agent; a newer agent, from a rebuilt image, takes any size)",
					path, size, agentproto.ErrTooLarge, agentproto.MaxFileSize)
			}
			return err
		}
		off += n
	}
	err := c.roundTripSized(ctx, agentproto.TypeCommitFile, agentproto.CommitFileRequest{
		Temp: tmp, Path: path, Size: size, Mode: agentproto.FileModeToUnix(mode)}, agentproto.TypeOK, nil, size)
	if err != nil {
		c.removeQuiet(ctx, tmp, true)
	}
	return err
}

// removeQuiet removes a guest file, best effort, even when ctx is done.
func (c *Client) removeQuiet(ctx context.Context, path string, exists bool) {
	if !exists {
		return
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	c.roundTrip(rctx, agentproto.TypeRemoveFile, agentproto.RemoveFileRequest{Path: path}, agentproto.TypeOK, nil)
}

// ErrFileChanged is returned (wrapped) when a guest file read in chunks
// changed size or mtime between them.
var ErrFileChanged = errors.New("the file changed while it was being read")

// MaxUnsizedFile bounds what ReadFileTo reads of a file whose size the
// guest reports as 0 (procfs and sysfs files, which report no size).
const MaxUnsizedFile = 16 << 20

// ReadFileTo writes the guest file path to w and returns its mode and size.
// It reads agentproto.ChunkSize bytes per request, so any size works; a file
// whose size or mtime changes between requests fails with ErrFileChanged.
// An agent that predates chunks is read with one read_file (files up to
// about agentproto.ChunkSize).
//
// The guest is not trusted: the size it announces in the first chunk bounds
// what is written to w (never a byte past it), and a file that turns out
// longer or shorter than announced, or a chunk longer than asked for,
// fails with an error wrapping ErrSizeMismatch. A file announced with size
// 0 (procfs) is read up to MaxUnsizedFile.
func (c *Client) ReadFileTo(ctx context.Context, path string, w io.Writer) (fs.FileMode, int64, error) {
	return c.ReadFileToChecked(ctx, path, w, nil)
}

// ReadFileToChecked is ReadFileTo with check, when not nil, called with
// the size the guest announces (0: unknown, read up to MaxUnsizedFile)
// before the first byte is written to w; an error from check ends the
// read and is returned as it is.
func (c *Client) ReadFileToChecked(ctx context.Context, path string, w io.Writer, check func(size int64) error) (fs.FileMode, int64, error) {
	var first agentproto.Chunk
	var off int64
	limit := int64(-1) // bytes the file may hold; -1 until the first chunk
	mismatch := func(format string, args ...any) error {
		return fmt.Errorf("agentclient: read %s: %w (%s)", path, ErrSizeMismatch, fmt.Sprintf(format, args...))
	}
	for i := 0; ; i++ {
		length := agentproto.ChunkSize
		if limit >= 0 {
			// One byte more than announced when the rest fits in a chunk:
			// the guest's answer then shows the end of the file.
			length = int(min(int64(agentproto.ChunkSize), limit-off+1))
		}
		var ch agentproto.Chunk
		err := c.roundTripSized(ctx, agentproto.TypeReadChunk, agentproto.ReadChunkRequest{Path: path, Offset: off, Length: length},
			agentproto.TypeChunk, &ch, int64(length))
		if err != nil {
			if i == 0 && isUnknownType(err) {
				data, mode, err := c.ReadFile(ctx, path)
				if err != nil {
					return 0, 0, err
				}
				if check != nil {
					if err := check(int64(len(data))); err != nil {
						return 0, 0, err
					}
				}
				_, err = w.Write(data)
				return mode, int64(len(data)), err
			}
			return 0, off, err
		}
		if i == 0 {
			first = ch
			switch {
			case ch.Size < 0:
				return 0, 0, mismatch("negative size %d", ch.Size)
			case ch.Size == 0:
				limit = MaxUnsizedFile
			default:
				limit = ch.Size
			}
			if check != nil {
				if err := check(ch.Size); err != nil {
					return 0, 0, err
				}
			}
		} else if ch.Size != first.Size || ch.MtimeNS != first.MtimeNS {
			return 0, off, fmt.Errorf("agentclient: read %s: %w (size %d -> %d)", path, ErrFileChanged, first.Size, ch.Size)
		}
		n := int64(len(ch.Data))
		if n > int64(length) {
			return 0, off, mismatch("asked for %d bytes at %d, got %d", length, off, n)
		}
		if off+n > limit {
			if first.Size == 0 {
				return 0, off, fmt.Errorf("agentclient: read %s: a file without a size over %d bytes: %w", path, limit, agentproto.ErrTooLarge)
			}
			return 0, off, mismatch("announced %d bytes, sent more", first.Size)
		}
		if _, err := w.Write(ch.Data); err != nil {
			return 0, off, err
		}
		off += n
		if n < int64(length) {
			if first.Size > 0 && off != first.Size {
				return 0, off, mismatch("announced %d bytes, sent %d", first.Size, off)
			}
			return agentproto.UnixToFileMode(first.Mode), off, nil
		}
	}
}

// isUnknownType reports whether the agent did not know the request type.
func isUnknownType(err error) bool {
	var pe *agentproto.Error
	return errors.As(err, &pe) && pe.Code == agentproto.CodeUnknownType
}

// ReadFile reads a whole file from the guest.
func (c *Client) ReadFile(ctx context.Context, path string) ([]byte, fs.FileMode, error) {
	var fd agentproto.FileData
	if err := c.roundTripSized(ctx, agentproto.TypeReadFile, agentproto.ReadFileRequest{Path: path}, agentproto.TypeFile, &fd, agentproto.ChunkSize); err != nil {
		return nil, 0, err
	}
	if fd.Data == nil {
		fd.Data = []byte{}
	}
	return fd.Data, agentproto.UnixToFileMode(fd.Mode), nil
}

// SetEnv changes the guest's persisted environment (seen by every later
// Exec and by login shells): unset names are removed, then set is applied.
func (c *Client) SetEnv(ctx context.Context, set map[string]string, unset []string) error {
	return c.roundTrip(ctx, agentproto.TypeSetEnv, agentproto.SetEnvRequest{Set: set, Unset: unset}, agentproto.TypeOK, nil)
}

// GetEnv returns the guest's persisted environment.
func (c *Client) GetEnv(ctx context.Context) (map[string]string, error) {
	var e agentproto.EnvData
	if err := c.roundTrip(ctx, agentproto.TypeGetEnv, nil, agentproto.TypeEnv, &e); err != nil {
		return nil, err
	}
	if e.Env == nil {
		e.Env = map[string]string{}
	}
	return e.Env, nil
}

// Sync flushes the guest's filesystems.
func (c *Client) Sync(ctx context.Context) error {
	return c.roundTrip(ctx, agentproto.TypeSync, nil, agentproto.TypeOK, nil)
}

// SetTime sets the guest's wall clock (after boot and after every restore).
func (c *Client) SetTime(ctx context.Context, t time.Time) error {
	return c.roundTrip(ctx, agentproto.TypeSetTime, agentproto.SetTimeRequest{UnixNanos: t.UnixNano()}, agentproto.TypeOK, nil)
}

// SendSetTime sends a set_time request and returns without waiting for its
// reply; wait returns the result. The agent applies set_time before it
// reads the next request of the session, so any request sent through c
// after SendSetTime returns sees the new clock.
func (c *Client) SendSetTime(ctx context.Context, t time.Time) (wait func(context.Context) error, err error) {
	const typ = agentproto.TypeSetTime
	id, cl, err := c.start(ctx, typ, agentproto.SetTimeRequest{UnixNanos: t.UnixNano()}, 1)
	if err != nil {
		return nil, fmt.Errorf("agentclient: %s: %w", typ, err)
	}
	return func(ctx context.Context) error {
		defer c.finish(id, cl)
		ctx, cancel := c.withDeadline(ctx, typ, 0)
		defer cancel()
		m, err := c.wait(ctx, cl)
		if err != nil {
			return fmt.Errorf("agentclient: %s: %w", typ, err)
		}
		return decodeReply(typ, m, agentproto.TypeOK, nil)
	}, nil
}

// SetIdentity gives the guest a new hostname (empty keeps it) and mixes
// seed into its random pool (used for clones).
func (c *Client) SetIdentity(ctx context.Context, hostname string, seed []byte) error {
	return c.roundTrip(ctx, agentproto.TypeSetIdentity, agentproto.SetIdentityRequest{Hostname: hostname, Seed: seed}, agentproto.TypeOK, nil)
}

// SetIdentityRequest sends a full identity change (hostname, entropy seed
// and the MAC address of eth0); used when a snapshot is forked into clones.
func (c *Client) SetIdentityRequest(ctx context.Context, req agentproto.SetIdentityRequest) error {
	return c.roundTrip(ctx, agentproto.TypeSetIdentity, req, agentproto.TypeOK, nil)
}

// Shutdown syncs the guest's disks and powers it off. A connection lost
// once the request was sent counts as success.
func (c *Client) Shutdown(ctx context.Context) error {
	return c.shutdown(ctx, false)
}

// Reboot syncs and reboots the guest (Firecracker treats a guest reboot as
// the end of the VM).
func (c *Client) Reboot(ctx context.Context) error {
	return c.shutdown(ctx, true)
}

func (c *Client) shutdown(ctx context.Context, reboot bool) error {
	id, cl, err := c.start(ctx, agentproto.TypeShutdown, agentproto.ShutdownRequest{Reboot: reboot}, 1)
	if err != nil {
		return fmt.Errorf("agentclient: shutdown: %w", err)
	}
	defer c.finish(id, cl)
	wctx, cancel := c.withDeadline(ctx, agentproto.TypeShutdown, 0)
	defer cancel()
	m, err := c.wait(wctx, cl)
	if err != nil {
		if errors.Is(err, ErrDisconnected) && !errors.Is(err, ErrClosed) {
			return nil
		}
		return fmt.Errorf("agentclient: shutdown: %w", err)
	}
	return decodeReply("shutdown", m, agentproto.TypeOK, nil)
}

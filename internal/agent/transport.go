package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// writeSlice is how long one write waits before the agent checks whether
// the host is still there.
const writeSlice = 250 * time.Millisecond

// hupGrace is how long a write waits for a host that seems gone while the
// reader has not seen it leave.
const hupGrace = 300 * time.Millisecond

// VirtioPort is a virtio-serial port (/dev/vportNpM) opened by the agent.
//
// While no host is connected the kernel makes read return 0 (EOF) and poll
// report POLLHUP at once, and writes would block. VirtioPort turns that
// into the Port contract: EOF on Read, a blocking wait in WaitHost, and
// WriteMsg drops messages while the host is away rather than blocking.
//
// WaitHost cannot use poll (POLLHUP is permanent while nobody is connected)
// and must not sleep-poll: four ports polled every few milliseconds kept
// an idle guest's vCPU busy (a quarter of a host core per idle VM under
// TCG). It blocks in an edge-triggered epoll instead: the kernel's
// virtio_console wakes the port's wait queue when the host opens the port
// (VIRTIO_CONSOLE_PORT_OPEN) and when data arrives, and with EPOLLET each
// such wake-up is reported once rather than the permanent POLLHUP.
//
// The descriptor is non-blocking and driven with poll(2) directly rather
// than through the Go netpoller: one request costs fewer thread wake-ups,
// which matters in a single-vCPU (and often emulated) guest.
type VirtioPort struct {
	fd   int
	path string
	wake [2]int // pipe: Close writes to it to end a blocked poll

	// use is read-held by Read and WriteMsg while they use the
	// descriptors; Close takes it to close them.
	use       sync.RWMutex
	closeOnce sync.Once
	closed    atomic.Bool

	// away is set when a read saw EOF (no host) and cleared by data from
	// the host; while set, messages are dropped without a syscall.
	away atomic.Bool

	wmu   sync.Mutex
	dirty bool // a message was cut short: start the next one on a new line

	ep int // epoll: the port edge-triggered, the wake pipe
}

// waitHostMax bounds one WaitHost, so a kernel that did not wake the port
// on a host connect would cost at most this much latency, and ctx is
// looked at again.
const waitHostMax = 1000 // ms

// FindVirtioPort returns the /dev path of the virtio-serial port with the
// given name, found through /sys/class/virtio-ports/*/name (there is no
// udev to create /dev/virtio-ports/NAME).
func FindVirtioPort(name string) (string, error) {
	names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			continue
		}
		if strings.TrimSpace(string(b)) == name {
			return "/dev/" + filepath.Base(filepath.Dir(n)), nil
		}
	}
	return "", fmt.Errorf("virtio-serial port %q: %w", name, os.ErrNotExist)
}

// OpenVirtioPort opens the port device at path.
func OpenVirtioPort(path string) (*VirtioPort, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	p := &VirtioPort{fd: fd, path: path, ep: -1}
	if err := unix.Pipe2(p.wake[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		unix.Close(fd)
		return nil, err
	}
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err == nil {
		err = errors.Join(
			unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(fd)}),
			unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, p.wake[0], &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(p.wake[0])}))
		if err != nil {
			unix.Close(ep)
		}
	}
	if err != nil {
		unix.Close(fd)
		unix.Close(p.wake[0])
		unix.Close(p.wake[1])
		return nil, fmt.Errorf("%s: epoll: %w", path, err)
	}
	p.ep = ep
	return p, nil
}

// poll waits for events on the port (timeout in ms, -1 = none). It returns
// net.ErrClosed once Close was called.
func (p *VirtioPort) poll(events int16, timeout int) (int16, error) {
	for {
		if p.closed.Load() {
			return 0, net.ErrClosed
		}
		fds := []unix.PollFd{{Fd: int32(p.fd), Events: events}, {Fd: int32(p.wake[0]), Events: unix.POLLIN}}
		_, err := unix.Poll(fds, timeout)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if fds[1].Revents != 0 || p.closed.Load() {
			return 0, net.ErrClosed
		}
		return fds[0].Revents, nil
	}
}

// Read implements Port: io.EOF means the host is not connected.
func (p *VirtioPort) Read(b []byte) (int, error) {
	p.use.RLock()
	defer p.use.RUnlock()
	if p.closed.Load() {
		return 0, net.ErrClosed
	}
	for {
		n, err := unix.Read(p.fd, b)
		switch {
		case n > 0:
			p.away.Store(false)
			return n, nil
		case err == nil: // 0 bytes: nobody on the host side
			p.away.Store(true)
			return 0, io.EOF
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			if _, err := p.poll(unix.POLLIN, -1); err != nil {
				return 0, err
			}
		default:
			// The port was unplugged or similar: handled like a
			// disconnect, the caller waits and retries.
			p.away.Store(true)
			return 0, fmt.Errorf("%s: %w (%w)", p.path, io.EOF, err)
		}
	}
}

// WaitHost blocks until the port's state changes (a host connected, data
// arrived), Close is called, or waitHostMax passed (the caller looks at its
// ctx between waits). The port is registered edge-triggered since Open, so
// a connect between the caller's EOF and this wait is not lost: it is
// reported here at once.
func (p *VirtioPort) WaitHost(ctx context.Context) {
	p.use.RLock()
	defer p.use.RUnlock()
	if p.closed.Load() || ctx.Err() != nil {
		return
	}
	var evs [2]unix.EpollEvent
	for {
		if _, err := unix.EpollWait(p.ep, evs[:], waitHostMax); err != unix.EINTR {
			return
		}
	}
}

// WriteMsg writes one message. It waits as long as it takes while a host
// is connected (replies to a connected host are never dropped) and drops
// the message once the host is gone.
func (p *VirtioPort) WriteMsg(b []byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	p.use.RLock()
	defer p.use.RUnlock()
	if p.closed.Load() {
		return net.ErrClosed
	}
	if p.away.Load() {
		return errHostAway
	}
	if p.dirty {
		b = append([]byte{'\n'}, b...)
	}
	var hupSince time.Time
	for len(b) > 0 {
		n, err := unix.Write(p.fd, b)
		if n > 0 {
			b = b[n:]
			p.dirty = len(b) > 0
			hupSince = time.Time{}
			continue
		}
		switch err {
		case unix.EINTR:
		case unix.EAGAIN:
			rev, err := p.poll(unix.POLLOUT, int(writeSlice/time.Millisecond))
			if err != nil {
				return err
			}
			if rev&unix.POLLHUP != 0 && rev&unix.POLLOUT == 0 {
				// No host. Right after a host connects, its data can
				// reach us before the kernel has processed the port-open
				// event: wait a little unless the reader saw the host go.
				if hupSince.IsZero() {
					hupSince = time.Now()
				}
				if p.away.Load() || time.Since(hupSince) > hupGrace {
					return errHostAway
				}
				time.Sleep(time.Millisecond)
			}
		default:
			if err == nil {
				err = io.ErrShortWrite
			}
			return err
		}
	}
	p.dirty = false
	return nil
}

// Close closes the port, ending a blocked Read or WriteMsg.
func (p *VirtioPort) Close() error {
	p.closeOnce.Do(func() {
		p.closed.Store(true)
		unix.Write(p.wake[1], []byte{1})
		p.use.Lock() // wait for Read and WriteMsg to leave
		unix.Close(p.ep)
		unix.Close(p.fd)
		unix.Close(p.wake[0])
		unix.Close(p.wake[1])
		p.use.Unlock()
	})
	return nil
}

var errHostAway = errors.New("host not connected: message dropped")

// ChardevPort emulates on a unix socket what QEMU's virtio-serial chardev
// gives the guest: one long-lived port, to which one host connection at a
// time is attached (a new connection replaces the previous one). Reads
// return io.EOF while no host is attached; messages written then are
// dropped. It lets the host-side protocol be exercised without a VM.
type ChardevPort struct {
	ln net.Listener

	wmu sync.Mutex // serializes writers, like the single virtio queue

	mu      sync.Mutex
	cur     net.Conn
	changed chan struct{} // closed and replaced whenever cur changes
	closed  bool
}

// ListenChardev listens on the unix socket path (removing a stale socket).
func ListenChardev(path string) (*ChardevPort, error) {
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	return NewChardevPort(ln), nil
}

// NewChardevPort serves a port on ln (which it takes over).
func NewChardevPort(ln net.Listener) *ChardevPort {
	p := &ChardevPort{ln: ln, changed: make(chan struct{})}
	go p.acceptLoop()
	return p
}

// Addr is the listening address.
func (p *ChardevPort) Addr() net.Addr { return p.ln.Addr() }

func (p *ChardevPort) acceptLoop() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		if p.cur != nil {
			p.cur.Close()
		}
		p.cur = c
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
	}
}

func (p *ChardevPort) current() (net.Conn, chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cur, p.changed
}

func (p *ChardevPort) detach(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == c {
		c.Close()
		p.cur = nil
		close(p.changed)
		p.changed = make(chan struct{})
	}
}

// Read implements Port.
func (p *ChardevPort) Read(b []byte) (int, error) {
	p.mu.Lock()
	c, closed := p.cur, p.closed
	p.mu.Unlock()
	if closed {
		return 0, net.ErrClosed
	}
	if c == nil {
		return 0, io.EOF
	}
	n, err := c.Read(b)
	if err != nil {
		p.detach(c)
		if n > 0 {
			return n, nil
		}
		return 0, io.EOF
	}
	return n, nil
}

// WaitHost blocks until a host connection is attached (or 100 ms passed).
func (p *ChardevPort) WaitHost(ctx context.Context) {
	c, changed := p.current()
	if c != nil {
		return
	}
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	select {
	case <-changed:
	case <-t.C:
	case <-ctx.Done():
	}
}

// WriteMsg implements Port.
func (p *ChardevPort) WriteMsg(b []byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	c, _ := p.current()
	if c == nil {
		return errHostAway
	}
	_, err := c.Write(b)
	if err != nil {
		return errHostAway
	}
	return nil
}

// Close stops listening and drops the current connection.
func (p *ChardevPort) Close() error {
	p.mu.Lock()
	p.closed = true
	if p.cur != nil {
		p.cur.Close()
		p.cur = nil
	}
	p.mu.Unlock()
	return p.ln.Close()
}

// vsock

type vsockAddr struct{ cid, port uint32 }

func (a vsockAddr) Network() string { return "vsock" }
func (a vsockAddr) String() string  { return fmt.Sprintf("vsock:%d:%d", a.cid, a.port) }

type vsockListener struct {
	f      *os.File
	addr   vsockAddr
	closed atomic.Bool
}

// ListenVsock listens on AF_VSOCK port (any CID).
func ListenVsock(port uint32) (net.Listener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock bind port %d: %w", port, err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("vsock listen: %w", err)
	}
	return &vsockListener{f: os.NewFile(uintptr(fd), "vsock-listener"), addr: vsockAddr{unix.VMADDR_CID_ANY, port}}, nil
}

func (l *vsockListener) Accept() (net.Conn, error) {
	rc, err := l.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var sa unix.Sockaddr
	var aerr error
	err = rc.Read(func(fd uintptr) bool {
		nfd, sa, aerr = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		return aerr != unix.EAGAIN
	})
	if err != nil {
		if l.closed.Load() || errors.Is(err, os.ErrClosed) {
			return nil, net.ErrClosed
		}
		return nil, err
	}
	if aerr != nil {
		return nil, aerr
	}
	remote := vsockAddr{}
	if vm, ok := sa.(*unix.SockaddrVM); ok {
		remote = vsockAddr{vm.CID, vm.Port}
	}
	return &vsockConn{File: os.NewFile(uintptr(nfd), "vsock"), local: l.addr, remote: remote}, nil
}

func (l *vsockListener) Close() error {
	l.closed.Store(true)
	return l.f.Close()
}

func (l *vsockListener) Addr() net.Addr { return l.addr }

type vsockConn struct {
	*os.File
	local, remote vsockAddr
}

func (c *vsockConn) LocalAddr() net.Addr  { return c.local }
func (c *vsockConn) RemoteAddr() net.Addr { return c.remote }

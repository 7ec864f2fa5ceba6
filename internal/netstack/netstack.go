// Package netstack is the guest's user-mode network: a gVisor TCP/IP stack
// (gvisor.dev/gvisor/pkg/tcpip) fed with the Ethernet frames of QEMU's
// stream netdev. Every TCP connection and UDP flow the guest opens ends in
// this stack and is checked against the VM's netpolicy before the sidecar
// dials the destination from the host; DNS at 10.0.2.3 is answered here
// from the host's resolvers; host port forwards are served here too.
// cmd/smolvm-net runs it, one process per VM.
package netstack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

// The guest-side addressing the agent configures (docs/CONTRACTS.md).
var (
	GatewayIP = netip.MustParseAddr("10.0.2.2") // the sidecar; maps to the host's 127.0.0.1 (policy permitting)
	DNSIP     = netip.MustParseAddr("10.0.2.3")
	GuestIP   = netip.MustParseAddr("10.0.2.15")
	hostLoop  = netip.MustParseAddr("127.0.0.1")
	// gatewayMAC is the sidecar's Ethernet address (locally administered).
	gatewayMAC = tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")
)

// Limits per VM.
const (
	MaxTCPConns   = 512     // concurrent guest TCP connections (egress + forwards)
	tcpBufferMax  = 1 << 20 // per connection and direction in the stack
	MaxUDPFlows   = 256     // concurrent UDP flows
	MaxDNSFlows   = 64      // concurrent DNS flows
	MaxForwards   = 64      // host port forwards
	dialTimeout   = 10 * time.Second
	udpIdle       = 60 * time.Second
	nicID         = tcpip.NICID(1)
	channelQueue  = 1024
	linkMTU       = 1500
	maxInFlightSY = 256
)

// Forward is one host port forward: HostAddr:HostPort on the host to
// GuestPort in the guest (TCP).
type Forward struct {
	HostAddr  string `json:"host_addr,omitempty"` // IP literal; default 127.0.0.1
	HostPort  int    `json:"host_port"`
	GuestPort int    `json:"guest_port"`
}

// Validate checks the ports and that HostAddr is an IP literal.
func (f Forward) Validate() error {
	if f.HostPort < 1 || f.HostPort > 65535 || f.GuestPort < 1 || f.GuestPort > 65535 {
		return fmt.Errorf("netstack: forward %d -> %d: ports must be 1-65535", f.HostPort, f.GuestPort)
	}
	if f.HostAddr != "" {
		if a, err := netip.ParseAddr(f.HostAddr); err != nil || a.Zone() != "" {
			return fmt.Errorf("netstack: forward host address %q is not an IP address", f.HostAddr)
		}
	}
	return nil
}

func (f Forward) hostAddrPort() string {
	a := f.HostAddr
	if a == "" {
		a = "127.0.0.1"
	}
	return net.JoinHostPort(a, strconv.Itoa(f.HostPort))
}

// Config is what the launcher hands the sidecar (JSON on its stdin).
type Config struct {
	Policy   netpolicy.Policy `json:"policy"`
	Forwards []Forward        `json:"forwards,omitempty"`
	// Resolvers are host DNS servers (ip or ip:port); empty: /etc/resolv.conf.
	Resolvers []string `json:"resolvers,omitempty"`
}

// Net is one VM's network.
type Net struct {
	log     *slog.Logger
	stack   *stack.Stack
	link    *channel.Endpoint
	chk     *netpolicy.Checker
	dns     *dnsServer
	tcpConn atomic.Int64
	udpFlow atomic.Int64
	dnsFlow atomic.Int64

	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	forwards map[string]net.Listener // by host addr:port
}

// New builds the stack. hostAddrs are the host's interface addresses.
func New(cfg Config, hostAddrs []netip.Addr, log *slog.Logger) (*Net, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	chk, err := netpolicy.NewChecker(cfg.Policy, hostAddrs)
	if err != nil {
		return nil, err
	}
	if chk.Policy().Mode == netpolicy.ModeNone {
		return nil, errors.New("netstack: policy mode none: the VM has no network")
	}
	resolvers, err := resolverAddrs(cfg.Resolvers)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &Net{log: log, chk: chk, ctx: ctx, cancel: cancel, forwards: map[string]net.Listener{}}
	n.dns = &dnsServer{chk: chk, upstream: resolvers, log: log}

	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	sack := tcpip.TCPSACKEnabled(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack)
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &mod)
	// Bound each connection's buffers (gVisor's default maximum is 4 MiB
	// each way): MaxTCPConns x 2 x tcpBufferMax is the worst case.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 128 << 10, Max: tcpBufferMax}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 128 << 10, Max: tcpBufferMax}
	s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd)
	n.link = channel.New(channelQueue, linkMTU+header.EthernetMinimumSize, gatewayMAC)
	if e := s.CreateNIC(nicID, ethernet.New(n.link)); e != nil {
		cancel()
		return nil, fmt.Errorf("netstack: create NIC: %s", e)
	}
	for _, a := range []netip.Addr{GatewayIP, DNSIP} {
		pa := tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber, AddressWithPrefix: tcpip.AddrFrom4(a.As4()).WithPrefix()}
		if e := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); e != nil {
			cancel()
			return nil, fmt.Errorf("netstack: add address %s: %s", a, e)
		}
	}
	// Accept packets for any destination (the guest's egress) and answer
	// from it (spoofing), like a NAT gateway.
	s.SetPromiscuousMode(nicID, true)
	s.SetSpoofing(nicID, true)
	guestNet, _ := tcpip.NewSubnet(tcpip.AddrFrom4([4]byte{10, 0, 2, 0}), tcpip.MaskFromBytes([]byte{255, 255, 255, 0}))
	s.SetRouteTable([]tcpip.Route{{Destination: guestNet, NIC: nicID}})
	n.stack = s

	tf := tcp.NewForwarder(s, 0, maxInFlightSY, n.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tf.HandlePacket)
	uf := udp.NewForwarder(s, n.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
		// A refused flow is left unhandled: the stack answers ICMP port
		// unreachable, so the guest fails fast (ECONNREFUSED) instead of
		// waiting for a reply.
		if dst := fromTCPIP(id.LocalAddress); dst != DNSIP || id.LocalPort != 53 {
			if reason := n.chk.Check(target(dst)); reason != "" {
				n.chk.Refuse("udp", netip.AddrPortFrom(dst, id.LocalPort).String(), reason)
				return false
			}
		}
		return uf.HandlePacket(id, pkt)
	})

	for _, f := range cfg.Forwards {
		if err := n.Expose(f); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

// Checker returns the policy checker (stats).
func (n *Net) Checker() *netpolicy.Checker { return n.chk }

// frameBytes returns the bytes of the frames the guest sent (the NIC
// received) and received (the NIC sent).
func (n *Net) frameBytes() (tx, rx uint64) {
	nic, ok := n.stack.NICInfo()[nicID]
	if !ok {
		return 0, 0
	}
	return nic.Stats.Rx.Bytes.Value(), nic.Stats.Tx.Bytes.Value()
}

// Run moves frames between conn (QEMU's end of the stream) and the stack
// until QEMU closes it. It then closes the stack and every forward.
func (n *Net) Run(conn io.ReadWriteCloser) error {
	errc := make(chan error, 2)
	go func() { errc <- readFrames(conn, n.link) }()
	go func() { errc <- writeFrames(n.ctx, conn, n.link) }()
	err := <-errc
	n.Close()
	conn.Close()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// Close stops everything.
func (n *Net) Close() {
	n.cancel()
	n.mu.Lock()
	for k, l := range n.forwards {
		l.Close()
		delete(n.forwards, k)
	}
	n.mu.Unlock()
	n.link.Close()
}

func fromTCPIP(a tcpip.Address) netip.Addr {
	ad, _ := netip.AddrFromSlice(a.AsSlice())
	return ad.Unmap()
}

// target maps a guest destination to the host address to dial: the
// gateway stands for the host's 127.0.0.1, as in QEMU's slirp.
func target(dst netip.Addr) netip.Addr {
	if dst == GatewayIP {
		return hostLoop
	}
	return dst
}

func (n *Net) handleTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst := fromTCPIP(id.LocalAddress)
	port := id.LocalPort
	dest := netip.AddrPortFrom(dst, port).String()
	if dst == DNSIP && port == 53 {
		n.serveDNSTCP(r)
		return
	}
	to := target(dst)
	if reason := n.chk.Check(to); reason != "" {
		if to != dst {
			reason += " (" + dst.String() + " is the host's " + to.String() + ")"
		}
		n.chk.Refuse("tcp", dest, reason)
		r.Complete(true)
		return
	}
	if n.tcpConn.Add(1) > MaxTCPConns {
		n.tcpConn.Add(-1)
		n.chk.Refuse("tcp", dest, "too many connections")
		r.Complete(true)
		return
	}
	defer n.tcpConn.Add(-1)
	ctx, cancel := context.WithTimeout(n.ctx, dialTimeout)
	var d net.Dialer
	out, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(to, port).String())
	cancel()
	if err != nil {
		n.log.Debug("dial failed", "dest", dest, "err", err)
		r.Complete(true)
		return
	}
	n.chk.Allow()
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	r.Complete(false)
	if terr != nil {
		out.Close()
		return
	}
	relay(gonet.NewTCPConn(&wq, ep), out.(*net.TCPConn))
}

// halfCloser is a connection whose write side can be shut.
type halfCloser interface {
	net.Conn
	CloseWrite() error
}

// relay copies both ways until both directions end.
func relay(a, b halfCloser) {
	var wg sync.WaitGroup
	cp := func(dst, src halfCloser) {
		defer wg.Done()
		io.Copy(dst, src)
		dst.CloseWrite()
	}
	wg.Add(2)
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}

func (n *Net) handleUDP(r *udp.ForwarderRequest) {
	id := r.ID()
	dst := fromTCPIP(id.LocalAddress)
	port := id.LocalPort
	dest := netip.AddrPortFrom(dst, port).String()
	if dst == DNSIP && port == 53 {
		if n.dnsFlow.Add(1) > MaxDNSFlows {
			n.dnsFlow.Add(-1)
			return
		}
		var wq waiter.Queue
		ep, terr := r.CreateEndpoint(&wq)
		if terr != nil {
			n.dnsFlow.Add(-1)
			return
		}
		go func() {
			defer n.dnsFlow.Add(-1)
			n.dns.serveUDP(n.ctx, gonet.NewUDPConn(&wq, ep))
		}()
		return
	}
	to := target(dst)
	if reason := n.chk.Check(to); reason != "" {
		n.chk.Refuse("udp", dest, reason)
		return
	}
	if n.udpFlow.Add(1) > MaxUDPFlows {
		n.udpFlow.Add(-1)
		n.chk.Refuse("udp", dest, "too many UDP flows")
		return
	}
	out, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(to, port)))
	if err != nil {
		n.udpFlow.Add(-1)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		n.udpFlow.Add(-1)
		out.Close()
		return
	}
	n.chk.Allow()
	in := gonet.NewUDPConn(&wq, ep)
	go func() {
		defer n.udpFlow.Add(-1)
		relayUDP(n.ctx, in, out)
	}()
}

// relayUDP copies datagrams both ways until the flow is idle for udpIdle.
func relayUDP(ctx context.Context, in *gonet.UDPConn, out *net.UDPConn) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	var once sync.Once
	stop := func() { once.Do(func() { close(done); in.Close(); out.Close() }) }
	cp := func(dst, src net.Conn) {
		defer stop()
		buf := make([]byte, 65535)
		for {
			src.SetReadDeadline(time.Now().Add(udpIdle))
			k, err := src.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, last.Load())) < udpIdle {
					continue
				}
				return
			}
			last.Store(time.Now().UnixNano())
			if _, err := dst.Write(buf[:k]); err != nil {
				return
			}
		}
	}
	go cp(out, in)
	go cp(in, out)
	select {
	case <-done:
	case <-ctx.Done():
		stop()
	}
}

// Expose starts serving a host port forward.
func (n *Net) Expose(f Forward) error {
	if err := f.Validate(); err != nil {
		return err
	}
	key := f.hostAddrPort()
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.ctx.Err() != nil {
		return errors.New("netstack: closed")
	}
	if _, ok := n.forwards[key]; ok {
		return fmt.Errorf("netstack: %s is already forwarded", key)
	}
	if len(n.forwards) >= MaxForwards {
		return fmt.Errorf("netstack: at most %d port forwards", MaxForwards)
	}
	ln, err := net.Listen("tcp", key)
	if err != nil {
		return fmt.Errorf("netstack: forward %s: %w", key, err)
	}
	n.forwards[key] = ln
	go n.serveForward(ln, f.GuestPort)
	return nil
}

func (n *Net) serveForward(ln net.Listener, guestPort int) {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		if n.tcpConn.Add(1) > MaxTCPConns {
			n.tcpConn.Add(-1)
			c.Close()
			continue
		}
		go func() {
			defer n.tcpConn.Add(-1)
			ctx, cancel := context.WithTimeout(n.ctx, dialTimeout)
			g, err := gonet.DialTCPWithBind(ctx, n.stack,
				tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(GatewayIP.As4())},
				tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(GuestIP.As4()), Port: uint16(guestPort)},
				ipv4.ProtocolNumber)
			cancel()
			if err != nil {
				c.Close()
				return
			}
			relay(g, c.(*net.TCPConn))
		}()
	}
}

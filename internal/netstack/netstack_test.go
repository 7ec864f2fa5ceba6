package netstack

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"
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

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

// fakeGuest is a second gVisor stack playing the guest (10.0.2.15/24,
// gateway 10.0.2.2) on the other end of the stream: the sidecar's code
// runs as with QEMU, without a VM (and under -race).
type fakeGuest struct {
	s *stack.Stack
}

func newPair(t *testing.T, cfg Config) (*Net, *fakeGuest) {
	t.Helper()
	// Non-blocking, so that os.File uses the poller and Close interrupts
	// the readers (the sidecar's fd 3 is blocking: QEMU closes the peer).
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	side, guestEnd := os.NewFile(uintptr(fds[0]), "side"), os.NewFile(uintptr(fds[1]), "guest")
	if len(cfg.Resolvers) == 0 {
		cfg.Resolvers = []string{"127.0.0.1:1"}
	}
	n, err := New(cfg, []netip.Addr{netip.MustParseAddr("192.0.2.2")}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { n.Run(side); close(done) }()

	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	link := channel.New(256, 1514, tcpip.LinkAddress("\x52\x54\x00\x12\x34\x56"))
	if e := s.CreateNIC(1, ethernet.New(link)); e != nil {
		t.Fatal(e)
	}
	s.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: tcpip.AddrFrom4([4]byte{10, 0, 2, 15}), PrefixLen: 24}}, stack.AddressProperties{})
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, Gateway: tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), NIC: 1}})
	ctx, cancel := context.WithCancel(context.Background())
	go readFrames(guestEnd, link)
	go writeFrames(ctx, guestEnd, link)
	t.Cleanup(func() {
		cancel()
		guestEnd.Close() // the sidecar sees EOF and stops
		<-done
		s.Close()
	})
	return n, &fakeGuest{s: s}
}

func (g *fakeGuest) dial(ctx context.Context, addr string) (net.Conn, error) {
	ap := netip.MustParseAddrPort(addr)
	return gonet.DialContextTCP(ctx, g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4(ap.Addr().As4()), Port: ap.Port()}, ipv4.ProtocolNumber)
}

func hostEcho(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

func echoOnce(t *testing.T, c net.Conn) {
	t.Helper()
	msg := bytes.Repeat([]byte("x"), 300<<10)
	go c.Write(msg)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the stack: %v", err)
	}
}

func TestFakeGuestPolicy(t *testing.T) {
	port := hostEcho(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Default mode: 10.0.2.2 (the host's loopback) is refused with an RST.
	n, g := newPair(t, Config{})
	if c, err := g.dial(ctx, fmt.Sprintf("10.0.2.2:%d", port)); err == nil {
		c.Close()
		t.Fatal("guest reached the host's loopback in the default mode")
	}
	if _, err := g.dial(ctx, "192.0.2.2:80"); err == nil {
		t.Fatal("guest reached the host's own address")
	}
	// UDP to a refused address: ICMP port unreachable, the guest's
	// socket reports the refusal at once.
	u, err := gonet.DialUDP(g.s, nil, &tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{169, 254, 169, 254}), Port: 53}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	u.Write([]byte("hello"))
	u.Close()
	sent := n.stack.Stats().ICMP.V4.PacketsSent.DstUnreachable
	got := g.s.Stats().ICMP.V4.PacketsReceived.DstUnreachable
	for i := 0; i < 100 && got.Value() == 0; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	if sent.Value() != 1 || got.Value() != 1 {
		t.Errorf("UDP to metadata: %d ICMP unreachable sent, %d received, want 1", sent.Value(), got.Value())
	}
	st := n.Checker().Stats()
	if st.Refused != 3 || st.LastRefused[2].Dest != "169.254.169.254:53" || !strings.HasPrefix(st.LastRefused[0].Reason, "loopback") || st.LastRefused[1].Reason != "host-address" {
		t.Errorf("stats %+v", st)
	}

	// An explicit 127.0.0.1/32: reachable, data flows both ways.
	n2, g2 := newPair(t, Config{Policy: netpolicy.Policy{AllowCIDRs: []string{"127.0.0.1/32"}}})
	c, err := g2.dial(ctx, fmt.Sprintf("10.0.2.2:%d", port))
	if err != nil {
		t.Fatalf("allowed loopback: %v", err)
	}
	echoOnce(t, c)
	c.Close()
	if st := n2.Checker().Stats(); st.Allowed != 1 {
		t.Errorf("stats %+v", st)
	}
	// The frames of that connection were counted both ways.
	if tx, rx := n2.frameBytes(); tx == 0 || rx == 0 {
		t.Errorf("frame bytes: guest sent %d, received %d", tx, rx)
	}
}

func TestFakeGuestForwardAndDNS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	hostPort := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	n, g := newPair(t, Config{
		Policy:    netpolicy.Policy{Mode: netpolicy.ModeAllowlist, AllowDomains: []string{"*.example.com"}},
		Forwards:  []Forward{{HostPort: hostPort, GuestPort: 8080}},
		Resolvers: []string{fakeResolver(t)},
	})
	// A guest server behind the forward.
	gl, err := gonet.ListenTCP(g.s, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 15}), Port: 8080}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer gl.Close()
	go func() {
		c, err := gl.Accept()
		if err == nil {
			io.Copy(c, c)
			c.Close()
		}
	}()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c)
	c.Close()
	if err := n.Expose(Forward{HostPort: hostPort, GuestPort: 1}); err == nil {
		t.Error("the same host port forwarded twice")
	}
	if err := n.Expose(Forward{HostAddr: "localhost", HostPort: 1, GuestPort: 1}); err == nil {
		t.Error("a host name accepted as forward address")
	}

	// DNS over UDP at 10.0.2.3: an allowed name is answered and its
	// address learnt; another gets NXDOMAIN.
	dns := func(name string) dnsmessage.RCode {
		u, err := gonet.DialUDP(g.s, nil, &tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{10, 0, 2, 3}), Port: 53}, ipv4.ProtocolNumber)
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		u.Write(query(t, name, dnsmessage.TypeA))
		u.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		k, err := u.Read(buf)
		if err != nil {
			t.Fatalf("dns %s: %v", name, err)
		}
		var p dnsmessage.Parser
		h, err := p.Start(buf[:k])
		if err != nil || h.ID != 0x4242 {
			t.Fatalf("dns %s: %+v %v", name, h, err)
		}
		return h.RCode
	}
	if rc := dns("www.example.com."); rc != dnsmessage.RCodeSuccess {
		t.Errorf("allowed name: %v", rc)
	}
	if rc := dns("evil.org."); rc != dnsmessage.RCodeNameError {
		t.Errorf("refused name: %v", rc)
	}
	if n.Checker().Check(netip.MustParseAddr("203.0.113.7")) != "" {
		t.Error("answer not learnt")
	}
	_ = ctx
}

// FuzzFrames feeds arbitrary frames (what a hostile guest controls) through
// the stream reader into the stack. The policy lets nothing out, so no
// input can make the fuzzer send traffic anywhere.
func FuzzFrames(f *testing.F) {
	f.Add([]byte{0, 0, 0, 14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 8, 0})
	f.Add(binary.BigEndian.AppendUint32(nil, 1<<30))
	n, err := New(Config{Policy: netpolicy.Policy{Mode: netpolicy.ModeAllowlist}, Resolvers: []string{"127.0.0.1:1"}}, nil, nil)
	if err != nil {
		f.Fatal(err)
	}
	defer n.Close()
	f.Fuzz(func(t *testing.T, stream []byte) {
		readFrames(bytes.NewReader(stream), n.link)
		for n.link.Drain() > 0 {
		}
	})
}

package netstack

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

const (
	dnsIdle        = 30 * time.Second
	dnsUpstreamTTL = 2 * time.Second // per upstream attempt
	maxDNSMsg      = 65535
	maxUDPAnswer   = 4096
)

type dnsServer struct {
	chk      *netpolicy.Checker
	upstream []string // host:port
	log      *slog.Logger
}

// resolverAddrs returns the host resolvers as host:port: the configured
// ones, else the nameservers of /etc/resolv.conf.
func resolverAddrs(cfg []string) ([]string, error) {
	if len(cfg) == 0 {
		f, err := os.Open("/etc/resolv.conf")
		if err == nil {
			sc := bufio.NewScanner(io.LimitReader(f, 1<<20))
			for sc.Scan() {
				fs := strings.Fields(sc.Text())
				if len(fs) >= 2 && fs[0] == "nameserver" {
					cfg = append(cfg, fs[1])
				}
			}
			f.Close()
		}
		if len(cfg) == 0 {
			return nil, errors.New("netstack: no DNS resolver: /etc/resolv.conf names no nameserver")
		}
	}
	var out []string
	for _, s := range cfg {
		if ap, err := netip.ParseAddrPort(s); err == nil {
			out = append(out, ap.String())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("netstack: resolver %q is not an IP address", s)
		}
		out = append(out, netip.AddrPortFrom(a.WithZone(""), 53).String())
		if len(out) == 3 {
			break
		}
	}
	return out, nil
}

// serveUDP answers the queries of one guest UDP flow to 10.0.2.3:53.
func (d *dnsServer) serveUDP(ctx context.Context, c *gonet.UDPConn) {
	defer c.Close()
	buf := make([]byte, maxDNSMsg)
	for ctx.Err() == nil {
		c.SetReadDeadline(time.Now().Add(dnsIdle))
		k, err := c.Read(buf)
		if err != nil {
			return
		}
		resp := d.answer(ctx, buf[:k])
		if resp == nil {
			continue
		}
		if len(resp) > maxUDPAnswer {
			resp = truncated(resp)
		}
		c.Write(resp)
	}
}

// serveDNSTCP answers DNS over TCP (length-prefixed) on 10.0.2.3:53.
func (n *Net) serveDNSTCP(r *tcp.ForwarderRequest) {
	if n.dnsFlow.Add(1) > MaxDNSFlows {
		n.dnsFlow.Add(-1)
		r.Complete(true)
		return
	}
	defer n.dnsFlow.Add(-1)
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	r.Complete(false)
	if terr != nil {
		return
	}
	c := gonet.NewTCPConn(&wq, ep)
	defer c.Close()
	var l [2]byte
	for n.ctx.Err() == nil {
		c.SetDeadline(time.Now().Add(dnsIdle))
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return
		}
		msg := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, msg); err != nil {
			return
		}
		resp := n.dns.answer(n.ctx, msg)
		if resp == nil || len(resp) > maxDNSMsg {
			return
		}
		out := binary.BigEndian.AppendUint16(nil, uint16(len(resp)))
		if _, err := c.Write(append(out, resp...)); err != nil {
			return
		}
	}
}

// answer returns the reply to one query, or nil to drop it.
func (d *dnsServer) answer(ctx context.Context, query []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response {
		return nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return reply(h, nil, dnsmessage.RCodeFormatError)
	}
	q := qs[0]
	name := q.Name.String()
	if !d.chk.AllowName(name) {
		d.chk.Refuse("dns", strings.TrimSuffix(name, "."), "name not in allow-list")
		return reply(h, &q, dnsmessage.RCodeNameError)
	}
	resp, err := d.forward(ctx, query, h.ID)
	if err != nil {
		d.log.Debug("dns upstream failed", "name", name, "err", err)
		return reply(h, &q, dnsmessage.RCodeServerFailure)
	}
	if d.chk.Policy().Mode == netpolicy.ModeAllowlist {
		learn(d.chk, resp, q.Name.String())
	}
	return resp
}

// reply builds an answerless reply with rcode.
func reply(h dnsmessage.Header, q *dnsmessage.Question, rcode dnsmessage.RCode) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{
		ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired,
		RecursionAvailable: true, RCode: rcode,
	})
	b.EnableCompression()
	if q != nil {
		if b.StartQuestions() != nil || b.Question(*q) != nil {
			return nil
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil
	}
	return out
}

// truncated returns resp cut to its header and question with TC set, so the
// guest retries over TCP.
func truncated(resp []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil {
		return nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return nil
	}
	out := reply(h, &qs[0], h.RCode)
	if len(out) >= 3 {
		out[2] |= 0x02 // TC
	}
	return out
}

// forward asks the host's resolvers, with a fresh ID, and returns the
// answer carrying the guest's ID.
func (d *dnsServer) forward(ctx context.Context, query []byte, id uint16) ([]byte, error) {
	q := append([]byte(nil), query...)
	var rid [2]byte
	rand.Read(rid[:])
	copy(q, rid[:])
	want := binary.BigEndian.Uint16(rid[:])
	var last error = errors.New("no resolver")
	for _, up := range d.upstream {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		resp, err := exchange(ctx, up, q, want)
		if err != nil {
			last = err
			continue
		}
		binary.BigEndian.PutUint16(resp, id)
		return resp, nil
	}
	return nil, last
}

func exchange(ctx context.Context, up string, q []byte, id uint16) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, dnsUpstreamTTL)
	defer cancel()
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "udp", up)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	dead, _ := ctx.Deadline()
	c.SetDeadline(dead)
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, maxDNSMsg)
	for {
		k, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		var p dnsmessage.Parser
		h, err := p.Start(buf[:k])
		if err != nil || !h.Response || h.ID != id {
			continue // not our answer
		}
		if h.Truncated {
			return tcpExchange(ctx, up, q)
		}
		return append([]byte(nil), buf[:k]...), nil
	}
}

// tcpExchange asks over TCP (the UDP answer was truncated).
func tcpExchange(ctx context.Context, up string, q []byte) ([]byte, error) {
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "tcp", up)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	dead, _ := ctx.Deadline()
	c.SetDeadline(dead)
	if _, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(q))), q...)); err != nil {
		return nil, err
	}
	var l [2]byte
	if _, err := io.ReadFull(c, l[:]); err != nil {
		return nil, err
	}
	resp := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(c, resp); err != nil {
		return nil, err
	}
	if len(resp) < 12 {
		return nil, errors.New("short DNS answer")
	}
	return resp, nil
}

// learn makes the addresses the answer gives for qname (following its
// CNAME chain) reachable for their TTL.
func learn(chk *netpolicy.Checker, resp []byte, qname string) {
	var p dnsmessage.Parser
	if _, err := p.Start(resp); err != nil {
		return
	}
	if err := p.SkipAllQuestions(); err != nil {
		return
	}
	answers, err := p.AllAnswers()
	if err != nil {
		return
	}
	names := map[string]bool{strings.ToLower(qname): true}
	for range 8 { // CNAME chains are short; bound the passes
		grew := false
		for _, a := range answers {
			if c, ok := a.Body.(*dnsmessage.CNAMEResource); ok && names[strings.ToLower(a.Header.Name.String())] {
				t := strings.ToLower(c.CNAME.String())
				if !names[t] {
					names[t] = true
					grew = true
				}
			}
		}
		if !grew {
			break
		}
	}
	for _, a := range answers {
		if !names[strings.ToLower(a.Header.Name.String())] {
			continue
		}
		ttl := time.Duration(a.Header.TTL) * time.Second
		switch b := a.Body.(type) {
		case *dnsmessage.AResource:
			chk.Learn(netip.AddrFrom4(b.A), ttl)
		case *dnsmessage.AAAAResource:
			chk.Learn(netip.AddrFrom16(b.AAAA), ttl)
		}
	}
}

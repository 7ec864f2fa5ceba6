package netstack

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

func query(t testing.TB, name string, typ dnsmessage.Type) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x4242, RecursionDesired: true})
	b.StartQuestions()
	b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET})
	out, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// fakeResolver answers every A question with a CNAME to cdn.example.net and
// 203.0.113.7 for it, on 127.0.0.1.
func fakeResolver(t *testing.T) string {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 4096)
		for {
			k, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var p dnsmessage.Parser
			h, err := p.Start(buf[:k])
			if err != nil {
				continue
			}
			q, _ := p.Question()
			b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, RecursionAvailable: true})
			b.StartQuestions()
			b.Question(q)
			b.StartAnswers()
			cdn := dnsmessage.MustNewName("cdn.example.net.")
			b.CNAMEResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.CNAMEResource{CNAME: cdn})
			b.AResource(dnsmessage.ResourceHeader{Name: cdn, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: [4]byte{203, 0, 113, 7}})
			b.AResource(dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("other.example.org."), Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: [4]byte{203, 0, 113, 8}})
			out, _ := b.Finish()
			pc.WriteTo(out, from)
		}
	}()
	return pc.LocalAddr().String()
}

func TestDNSAllowlist(t *testing.T) {
	chk, err := netpolicy.NewChecker(netpolicy.Policy{Mode: netpolicy.ModeAllowlist, AllowDomains: []string{"*.example.com"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := &dnsServer{chk: chk, upstream: []string{fakeResolver(t)}, log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	resp := d.answer(ctx, query(t, "www.example.com.", dnsmessage.TypeA))
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil || h.ID != 0x4242 || h.RCode != dnsmessage.RCodeSuccess {
		t.Fatalf("allowed name: %+v %v", h, err)
	}
	if chk.Check(netip.MustParseAddr("203.0.113.7")) != "" {
		t.Error("the CNAME target's address was not learnt")
	}
	if chk.Check(netip.MustParseAddr("203.0.113.8")) == "" {
		t.Error("an unrelated answer record was learnt")
	}

	resp = d.answer(ctx, query(t, "evil.org.", dnsmessage.TypeA))
	h, err = p.Start(resp)
	if err != nil || h.RCode != dnsmessage.RCodeNameError || h.ID != 0x4242 {
		t.Fatalf("refused name: %+v %v", h, err)
	}
	if s := chk.Stats(); s.DNSRefused != 1 || s.LastRefused[0].Dest != "evil.org" {
		t.Errorf("stats %+v", s)
	}
	if d.answer(ctx, []byte{1, 2, 3}) != nil {
		t.Error("answered garbage")
	}
}

func FuzzDNSAnswer(f *testing.F) {
	f.Add(query(f, "www.example.com.", dnsmessage.TypeA))
	f.Add(query(f, "x.org.", dnsmessage.TypeAAAA))
	f.Add([]byte{0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0})
	chk, _ := netpolicy.NewChecker(netpolicy.Policy{Mode: netpolicy.ModeAllowlist, AllowDomains: []string{"*.example.com"}}, nil)
	d := &dnsServer{chk: chk, log: slog.New(slog.DiscardHandler)} // no upstream: allowed names get SERVFAIL
	f.Fuzz(func(t *testing.T, msg []byte) {
		d.answer(context.Background(), msg)
		learn(chk, msg, "www.example.com.")
		truncated(msg)
	})
}

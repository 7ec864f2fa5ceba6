package netpolicy

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"
)

func TestValidate(t *testing.T) {
	good := []Policy{
		{},
		{Mode: ModeDefault, AllowCIDRs: []string{"127.0.0.1/32"}},
		{Mode: ModeAllowlist, AllowDomains: []string{"deb.debian.org", "*.pypi.org", "Files.PythonHosted.org."}, AllowCIDRs: []string{"1.2.3.4", "2001:db8::/32"}},
		{Mode: ModeNone},
	}
	for _, p := range good {
		if err := p.Validate(); err != nil {
			t.Errorf("%+v: %v", p, err)
		}
	}
	bad := []Policy{
		{Mode: "open"},
		{Mode: ModeNone, AllowCIDRs: []string{"1.2.3.4/32"}},
		{Mode: ModeDefault, AllowDomains: []string{"example.com"}},
		{Mode: ModeAllowlist, AllowDomains: []string{"*"}},
		{Mode: ModeAllowlist, AllowDomains: []string{"*.com"}},
		{Mode: ModeAllowlist, AllowDomains: []string{"a.*.com"}},
		{Mode: ModeAllowlist, AllowDomains: []string{"exa mple.com"}},
		{Mode: ModeAllowlist, AllowDomains: []string{"-x.com"}},
		{Mode: ModeAllowlist, AllowDomains: []string{""}},
		{Mode: ModeAllowlist, AllowDomains: []string{"a..com"}},
		{Mode: ModeAllowlist, AllowCIDRs: []string{"1.2.3.4/33"}},
		{Mode: ModeAllowlist, AllowCIDRs: []string{"fe80::1%eth0/128"}},
		{Mode: ModeAllowlist, AllowCIDRs: []string{"example.com"}},
	}
	for _, p := range bad {
		if err := p.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("%+v: accepted (%v)", p, err)
		}
	}
	n := Policy{Mode: ModeAllowlist, AllowDomains: []string{"A.com.", "a.com"}, AllowCIDRs: []string{"10.1.2.3/8", "10.0.0.0/8"}}.Normalize()
	if len(n.AllowDomains) != 1 || n.AllowDomains[0] != "a.com" || len(n.AllowCIDRs) != 1 || n.AllowCIDRs[0] != "10.0.0.0/8" {
		t.Errorf("normalize: %+v", n)
	}
}

func TestMatchDomain(t *testing.T) {
	pats := []string{"deb.debian.org", "*.pythonhosted.org"}
	for name, want := range map[string]bool{
		"deb.debian.org": true, "DEB.Debian.ORG.": true, "debian.org": false, "x.deb.debian.org": false,
		"files.pythonhosted.org": true, "a.b.pythonhosted.org": true, "pythonhosted.org": false,
		"evilpythonhosted.org": false, "deb.debian.org.evil.com": false, "": false, ".": false,
	} {
		if got := MatchDomain(pats, name); got != want {
			t.Errorf("MatchDomain(%q) = %v, want %v", name, got, want)
		}
	}
}

func TestCheckDefault(t *testing.T) {
	host := []netip.Addr{netip.MustParseAddr("192.0.2.2")}
	c, err := NewChecker(Policy{}, host)
	if err != nil {
		t.Fatal(err)
	}
	for a, want := range map[string]string{
		"203.0.113.80": "", "8.8.8.8": "", "2606:4700::1": "",
		"127.0.0.1": "loopback", "127.8.9.1": "loopback", "::1": "loopback",
		"169.254.169.254": "link-local", "fe80::1": "link-local",
		"10.0.2.2": "private", "172.16.0.1": "private", "172.31.255.255": "private", "192.168.0.1": "private", "fd00::1": "private",
		"100.64.0.1": "cgnat", "224.0.0.1": "multicast", "ff02::1": "multicast", "255.255.255.255": "reserved",
		"0.0.0.0": "unspecified", "::": "unspecified", "192.0.2.2": "host-address",
		"::ffff:127.0.0.1": "loopback", "172.32.0.1": "",
	} {
		if got := c.Check(netip.MustParseAddr(a)); got != want {
			t.Errorf("Check(%s) = %q, want %q", a, got, want)
		}
	}
}

func TestExplicitCIDROpensOnlyInside(t *testing.T) {
	c, _ := NewChecker(Policy{Mode: ModeAllowlist, AllowCIDRs: []string{"0.0.0.0/0", "127.0.0.1/32", "10.0.0.0/8", "::/0"}}, []netip.Addr{netip.MustParseAddr("192.0.2.2")})
	for a, want := range map[string]string{
		"1.1.1.1": "", "127.0.0.1": "", "127.0.0.2": "loopback", "10.9.9.9": "",
		"169.254.169.254": "link-local", "192.168.1.1": "private", "192.0.2.2": "host-address", "::1": "loopback",
	} {
		if got := c.Check(netip.MustParseAddr(a)); got != want {
			t.Errorf("Check(%s) = %q, want %q", a, got, want)
		}
	}
	h, _ := NewChecker(Policy{Mode: ModeAllowlist, AllowCIDRs: []string{"192.0.2.2/32"}}, []netip.Addr{netip.MustParseAddr("192.0.2.2")})
	if r := h.Check(netip.MustParseAddr("192.0.2.2")); r != "" {
		t.Errorf("host address named explicitly: %q", r)
	}
}

func TestAllowlistLearn(t *testing.T) {
	c, _ := NewChecker(Policy{Mode: ModeAllowlist, AllowDomains: []string{"*.example.com"}}, nil)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	a := netip.MustParseAddr("93.184.216.34")
	if c.Check(a) != "not in allow-list" {
		t.Fatal("unlearnt address allowed")
	}
	if !c.AllowName("www.example.com.") || c.AllowName("example.org") {
		t.Fatal("AllowName")
	}
	c.Learn(a, time.Second) // clamped up to MinLearnTTL
	if r := c.Check(a); r != "" {
		t.Fatalf("learnt address refused: %q", r)
	}
	now = now.Add(MinLearnTTL + time.Second)
	if c.Check(a) == "" {
		t.Fatal("expired address still allowed")
	}
	c.Learn(netip.MustParseAddr("127.0.0.1"), time.Hour) // DNS rebinding
	if c.Check(netip.MustParseAddr("127.0.0.1")) != "loopback" {
		t.Fatal("DNS opened loopback")
	}
	for i := 0; i < MaxLearned+100; i++ {
		c.Learn(netip.AddrFrom4([4]byte{8, byte(i >> 16), byte(i >> 8), byte(i)}), time.Hour)
	}
	if len(c.learned) > MaxLearned {
		t.Fatalf("learned %d > %d", len(c.learned), MaxLearned)
	}
	for i := 0; i < 3*MaxLastRefused; i++ {
		c.Refuse("tcp", fmt.Sprint("x", i), "r")
	}
	c.Refuse("dns", "n", "r")
	c.Refuse("dns", "n", "r") // a retry
	s := c.Stats()
	if len(s.LastRefused) != MaxLastRefused || s.Refused != 3*MaxLastRefused || s.DNSRefused != 2 ||
		s.LastRefused[MaxLastRefused-1].Proto != "dns" || s.LastRefused[MaxLastRefused-1].Count != 2 || s.LastRefused[0].Dest != fmt.Sprint("x", 2*MaxLastRefused+1) {
		t.Fatalf("stats %+v", s)
	}
}

func FuzzMatchDomain(f *testing.F) {
	for _, s := range []string{"deb.debian.org", "*.example.com", "a.b.example.com.", "", "*", "xn--a.com", "A..b"} {
		f.Add(s, "x.example.com")
	}
	f.Fuzz(func(t *testing.T, pattern, name string) {
		p, err := ParseDomainPattern(pattern)
		if err != nil {
			return
		}
		if (Policy{Mode: ModeAllowlist, AllowDomains: []string{pattern}}).Validate() != nil {
			t.Fatalf("ParseDomainPattern accepted %q but Validate refused it", pattern)
		}
		if MatchDomain([]string{p}, name) {
			// A match is the name itself or a name below the wildcard's base.
			n := normalizeName(name)
			if base, ok := cutWildcard(p); ok {
				if len(n) <= len(base)+1 || n[len(n)-len(base)-1:] != "."+base {
					t.Fatalf("%q matched %q", p, name)
				}
			} else if n != p {
				t.Fatalf("%q matched %q", p, name)
			}
		}
	})
}

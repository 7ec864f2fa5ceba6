// Package netpolicy is the guest network policy: which destinations a
// guest may reach through the network sidecar (cmd/smolvm-net), and the
// matcher the sidecar checks every outbound flow and DNS question against.
//
// Two modes:
//   - default: the public internet is reachable; the host's loopback,
//     link-local (cloud metadata), private, CGNAT, multicast, broadcast and
//     unspecified ranges and the host's own interface addresses are not.
//   - allowlist: only AllowCIDRs and the addresses DNS answered for an
//     AllowDomains name (for the answer's TTL, bounded) are reachable, and
//     DNS answers only allowed names. The deny ranges still apply.
//
// A deny range is opened only by an AllowCIDRs prefix that lies inside it
// (127.0.0.1/32 opens that one loopback address; 0.0.0.0/0 opens none): a
// broad prefix never reaches the host by accident. Addresses learnt from
// DNS never open a deny range (no DNS rebinding into the host).
package netpolicy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Modes.
const (
	ModeDefault   = "default"
	ModeAllowlist = "allowlist"
	ModeNone      = "none"
)

// Limits on a policy (it is written into argv-free config, but still bounded).
const (
	MaxDomains = 256
	MaxCIDRs   = 256
)

// Policy is a VM's network policy. The zero value is the default mode.
type Policy struct {
	Mode         string   `json:"mode,omitempty"` // "", default, allowlist, none
	AllowDomains []string `json:"allow_domains,omitempty"`
	AllowCIDRs   []string `json:"allow_cidrs,omitempty"`
}

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid network policy")

// EffectiveMode is Mode with "" read as ModeDefault.
func (p Policy) EffectiveMode() string {
	if p.Mode == "" {
		return ModeDefault
	}
	return p.Mode
}

// Validate checks the mode, every domain pattern and every CIDR.
func (p Policy) Validate() error {
	switch p.EffectiveMode() {
	case ModeDefault, ModeAllowlist:
	case ModeNone:
		if len(p.AllowDomains)+len(p.AllowCIDRs) > 0 {
			return fmt.Errorf("%w: mode none takes no allow-domain or allow-cidr", ErrInvalid)
		}
	default:
		return fmt.Errorf("%w: unknown mode %q (use default, allowlist or none)", ErrInvalid, p.Mode)
	}
	if len(p.AllowDomains) > MaxDomains || len(p.AllowCIDRs) > MaxCIDRs {
		return fmt.Errorf("%w: at most %d domains and %d CIDRs", ErrInvalid, MaxDomains, MaxCIDRs)
	}
	if p.EffectiveMode() == ModeDefault && len(p.AllowDomains) > 0 {
		return fmt.Errorf("%w: allow-domain needs mode allowlist (every name resolves in the default mode)", ErrInvalid)
	}
	for _, d := range p.AllowDomains {
		if _, err := ParseDomainPattern(d); err != nil {
			return err
		}
	}
	for _, c := range p.AllowCIDRs {
		if _, err := ParseCIDR(c); err != nil {
			return err
		}
	}
	return nil
}

// Normalize returns p with names lower-cased and CIDRs in canonical form,
// duplicates dropped. It assumes Validate passed.
func (p Policy) Normalize() Policy {
	out := Policy{Mode: p.EffectiveMode()}
	for _, d := range p.AllowDomains {
		n, err := ParseDomainPattern(d)
		if err == nil && !slices.Contains(out.AllowDomains, n) {
			out.AllowDomains = append(out.AllowDomains, n)
		}
	}
	for _, c := range p.AllowCIDRs {
		pf, err := ParseCIDR(c)
		if err == nil && !slices.Contains(out.AllowCIDRs, pf.String()) {
			out.AllowCIDRs = append(out.AllowCIDRs, pf.String())
		}
	}
	return out
}

// ParseCIDR parses a prefix ("10.1.2.0/24") or a single address ("1.2.3.4",
// read as /32 or /128) and masks it.
func ParseCIDR(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%w: CIDR %q: %v", ErrInvalid, s, err)
		}
		if p.Addr().Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%w: CIDR %q has a zone", ErrInvalid, s)
		}
		return unmapPrefix(p).Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%w: CIDR %q is neither a prefix nor an address", ErrInvalid, s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func unmapPrefix(p netip.Prefix) netip.Prefix {
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p
}

// ParseDomainPattern checks a domain name or a "*.example.com" wildcard and
// returns it lower-cased without a trailing dot. A wildcard matches names
// below the domain at any depth, not the domain itself.
func ParseDomainPattern(s string) (string, error) {
	n := strings.ToLower(strings.TrimSuffix(s, "."))
	base := strings.TrimPrefix(n, "*.")
	if strings.Contains(base, "*") {
		return "", fmt.Errorf("%w: domain %q: only a leading \"*.\" wildcard is allowed", ErrInvalid, s)
	}
	if !validName(base) {
		return "", fmt.Errorf("%w: domain %q is not a valid host name", ErrInvalid, s)
	}
	if base != n && !strings.Contains(base, ".") {
		return "", fmt.Errorf("%w: domain %q: a wildcard needs at least two labels after \"*.\" (no top-level wildcards)", ErrInvalid, s)
	}
	return n, nil
}

// validName: 1-253 characters, labels of 1-63 letters, digits, '-' and
// '_' not starting or ending with '-'.
func validName(n string) bool {
	if n == "" || len(n) > 253 {
		return false
	}
	for l := range strings.SplitSeq(n, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// MatchDomain reports whether name (a DNS question name, any case, with or
// without the trailing dot) matches one of the normalized patterns.
func MatchDomain(patterns []string, name string) bool {
	n := strings.ToLower(strings.TrimSuffix(name, "."))
	if !validName(n) {
		return false
	}
	for _, p := range patterns {
		if base, ok := strings.CutPrefix(p, "*."); ok {
			if strings.HasSuffix(n, "."+base) {
				return true
			}
		} else if n == p {
			return true
		}
	}
	return false
}

// A named deny range.
type denyRange struct {
	prefix netip.Prefix
	reason string
}

var denyRanges = func() []denyRange {
	var out []denyRange
	add := func(reason string, cidrs ...string) {
		for _, c := range cidrs {
			out = append(out, denyRange{netip.MustParsePrefix(c), reason})
		}
	}
	add("unspecified", "0.0.0.0/8", "::/128")
	add("loopback", "127.0.0.0/8", "::1/128")
	add("link-local", "169.254.0.0/16", "fe80::/10")
	add("private", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
	add("cgnat", "100.64.0.0/10")
	add("multicast", "224.0.0.0/4", "ff00::/8")
	add("reserved", "240.0.0.0/4") // includes 255.255.255.255 broadcast
	add("ipv4-mapped", "::ffff:0:0/96")
	return out
}()

// DenyReason returns why addr is in the built-in deny list ("" when it is
// not). It also covers hostAddrs, the host's own interface addresses.
func DenyReason(addr netip.Addr, hostAddrs []netip.Addr) string {
	addr = addr.Unmap()
	for _, r := range denyRanges {
		if r.prefix.Contains(addr) {
			return r.reason
		}
	}
	if slices.Contains(hostAddrs, addr) {
		return "host-address"
	}
	return ""
}

// opens reports whether an explicit allow prefix opens the deny range that
// contains addr: the prefix must contain addr and lie inside every deny
// range that contains addr (a host address counts as a /32 or /128).
func opens(allow []netip.Prefix, addr netip.Addr, hostAddrs []netip.Addr) bool {
	addr = addr.Unmap()
	var ranges []netip.Prefix
	for _, r := range denyRanges {
		if r.prefix.Contains(addr) {
			ranges = append(ranges, r.prefix)
		}
	}
	if slices.Contains(hostAddrs, addr) {
		ranges = append(ranges, netip.PrefixFrom(addr, addr.BitLen()))
	}
	for _, p := range allow {
		if !p.Contains(addr) {
			continue
		}
		inside := true
		for _, r := range ranges {
			if p.Bits() < r.Bits() || !r.Contains(p.Addr()) {
				inside = false
				break
			}
		}
		if inside {
			return true
		}
	}
	return false
}

func normalizeName(n string) string { return strings.ToLower(strings.TrimSuffix(n, ".")) }

func cutWildcard(p string) (string, bool) { return strings.CutPrefix(p, "*.") }

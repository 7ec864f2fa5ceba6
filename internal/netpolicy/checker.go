package netpolicy

import (
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// Bounds on what a Checker remembers.
const (
	MaxLearned     = 4096             // addresses learnt from DNS answers
	MinLearnTTL    = 30 * time.Second // an answer's addresses stay reachable at least this long
	MaxLearnTTL    = 10 * time.Minute // and at most this long
	MaxLastRefused = 16               // last refusal reasons kept
)

// Refusal is one refused flow or DNS question.
type Refusal struct {
	Time   time.Time `json:"time"`
	Proto  string    `json:"proto"`  // tcp, udp, dns
	Dest   string    `json:"dest"`   // addr:port or the DNS name
	Reason string    `json:"reason"` // "loopback", "not in allow-list", ...
	Count  int       `json:"count"`  // repeats in a row (retries); Time is the last
}

// Stats is what the sidecar reports about refusals.
type Stats struct {
	Policy      Policy    `json:"policy"`
	Allowed     uint64    `json:"allowed"`
	Refused     uint64    `json:"refused"`
	DNSRefused  uint64    `json:"dns_refused"`
	LastRefused []Refusal `json:"last_refused,omitempty"`
	// TxBytes and RxBytes are the bytes of the Ethernet frames the guest
	// sent and received (the netstack's NIC counters; the Checker leaves
	// them 0).
	TxBytes uint64 `json:"tx_bytes,omitempty"`
	RxBytes uint64 `json:"rx_bytes,omitempty"`
}

// Checker decides whether a guest may reach a destination. It is safe for
// concurrent use.
type Checker struct {
	policy    Policy
	allow     []netip.Prefix
	hostAddrs []netip.Addr
	now       func() time.Time

	mu      sync.Mutex
	learned map[netip.Addr]time.Time // expiry
	stats   Stats
}

// NewChecker compiles a validated policy. hostAddrs are the host's own
// interface addresses (denied like loopback).
func NewChecker(p Policy, hostAddrs []netip.Addr) (*Checker, error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	p = p.Normalize()
	c := &Checker{policy: p, now: time.Now, learned: map[netip.Addr]time.Time{}}
	for _, s := range p.AllowCIDRs {
		pf, _ := ParseCIDR(s)
		c.allow = append(c.allow, pf)
	}
	for _, a := range hostAddrs {
		c.hostAddrs = append(c.hostAddrs, a.Unmap().WithZone(""))
	}
	c.stats.Policy = p
	return c, nil
}

// Policy returns the normalized policy.
func (c *Checker) Policy() Policy { return c.policy }

// Check returns "" when the guest may reach addr, else the reason it may
// not. It does not count: the caller calls Refuse or Allow.
func (c *Checker) Check(addr netip.Addr) string {
	addr = addr.Unmap()
	if !addr.IsValid() {
		return "invalid address"
	}
	explicit := false
	for _, p := range c.allow {
		if p.Contains(addr) {
			explicit = true
			break
		}
	}
	if r := DenyReason(addr, c.hostAddrs); r != "" {
		if opens(c.allow, addr, c.hostAddrs) {
			return ""
		}
		return r
	}
	if c.policy.EffectiveMode() == ModeDefault || explicit {
		return ""
	}
	c.mu.Lock()
	exp, ok := c.learned[addr]
	c.mu.Unlock()
	if ok && c.now().Before(exp) {
		return ""
	}
	return "not in allow-list"
}

// AllowName reports whether DNS may answer name (always in the default mode).
func (c *Checker) AllowName(name string) bool {
	if c.policy.EffectiveMode() != ModeAllowlist {
		return true
	}
	return MatchDomain(c.policy.AllowDomains, name)
}

// Learn makes addr reachable for ttl (clamped to [MinLearnTTL, MaxLearnTTL])
// because DNS answered it for an allowed name. Deny ranges still apply.
func (c *Checker) Learn(addr netip.Addr, ttl time.Duration) {
	ttl = max(MinLearnTTL, min(ttl, MaxLearnTTL))
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.learned) >= MaxLearned {
		for a, exp := range c.learned {
			if !now.Before(exp) {
				delete(c.learned, a)
			}
		}
		if len(c.learned) >= MaxLearned {
			for a := range c.learned { // drop an arbitrary entry
				delete(c.learned, a)
				break
			}
		}
	}
	if exp := now.Add(ttl); exp.After(c.learned[addr.Unmap()]) {
		c.learned[addr.Unmap()] = exp
	}
}

// Allow counts an allowed flow.
func (c *Checker) Allow() {
	c.mu.Lock()
	c.stats.Allowed++
	c.mu.Unlock()
}

// Refuse counts a refused flow (proto tcp/udp) or DNS question (proto dns)
// and keeps its reason among the last MaxLastRefused.
func (c *Checker) Refuse(proto, dest, reason string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if proto == "dns" {
		c.stats.DNSRefused++
	} else {
		c.stats.Refused++
	}
	r := Refusal{Time: c.now().UTC(), Proto: proto, Dest: dest, Reason: reason, Count: 1}
	if k := len(c.stats.LastRefused); k > 0 {
		if l := &c.stats.LastRefused[k-1]; l.Proto == proto && l.Dest == dest && l.Reason == reason {
			l.Count++ // a retry: keep one entry so retries do not push out other reasons
			l.Time = r.Time
			return
		}
	}
	if len(c.stats.LastRefused) >= MaxLastRefused {
		c.stats.LastRefused = append(c.stats.LastRefused[:0], c.stats.LastRefused[1:]...)
	}
	c.stats.LastRefused = append(c.stats.LastRefused, r)
}

// Stats returns a copy of the counters.
func (c *Checker) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.LastRefused = append([]Refusal(nil), c.stats.LastRefused...)
	return s
}

// String describes a refusal for people.
func (r Refusal) String() string {
	return fmt.Sprintf("%s %s %s: %s", r.Time.Format(time.RFC3339), r.Proto, r.Dest, r.Reason)
}

package smolvm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

// NetworkMode selects what a guest may reach.
type NetworkMode string

const (
	// NetworkDefault: the public internet, never the host's loopback,
	// link-local (cloud metadata), private, CGNAT, multicast or reserved
	// ranges, nor the host's own addresses. AllowCIDRs open exceptions.
	NetworkDefault NetworkMode = "default"
	// NetworkAllowlist: only AllowCIDRs and the addresses DNS answers for
	// AllowDomains names; DNS answers only those names.
	NetworkAllowlist NetworkMode = "allowlist"
	// NetworkNone: no network device at all (Config.NoNetwork).
	NetworkNone NetworkMode = "none"
)

// NetworkPolicy is a VM's guest network policy. The zero value is
// NetworkDefault.
//
// The deny ranges (loopback, link-local, private, CGNAT, the host's
// addresses, ...) apply in every mode. An AllowCIDRs prefix opens one only
// when it lies inside it: 127.0.0.1/32 lets the guest reach a server on the
// host's 127.0.0.1 (through 10.0.2.2), 0.0.0.0/0 opens none of them.
// Addresses learnt through DNS never open a deny range.
type NetworkPolicy struct {
	Mode NetworkMode `json:"mode,omitempty"`
	// AllowDomains are host names ("deb.debian.org") or wildcards
	// ("*.pythonhosted.org": names below it, not itself). Allowlist mode only.
	AllowDomains []string `json:"allow_domains,omitempty"`
	// AllowCIDRs are prefixes the guest may reach.
	AllowCIDRs []netip.Prefix `json:"allow_cidrs,omitempty"`
}

// NetworkStats is what the network sidecar of a running VM counted.
type NetworkStats struct {
	Allowed     uint64           `json:"allowed"`      // connections and flows let through
	Refused     uint64           `json:"refused"`      // connections and flows refused
	DNSRefused  uint64           `json:"dns_refused"`  // DNS questions refused (name not allowed)
	LastRefused []NetworkRefusal `json:"last_refused"` // the most recent refusals, oldest first
	// TxBytes and RxBytes are the bytes of the Ethernet frames the guest
	// sent and received through the sidecar.
	TxBytes uint64 `json:"tx_bytes"`
	RxBytes uint64 `json:"rx_bytes"`
}

// NetworkRefusal is one refused connection, flow or DNS question.
type NetworkRefusal struct {
	Time   time.Time `json:"time"`
	Proto  string    `json:"proto"` // tcp, udp, dns
	Dest   string    `json:"dest"`  // address:port, or the DNS name
	Reason string    `json:"reason"`
	Count  int       `json:"count"` // refusals in a row of the same flow (retries); Time is the last
}

// toBackend converts a policy to the spec's form.
func (p NetworkPolicy) toBackend() netpolicy.Policy {
	out := netpolicy.Policy{Mode: string(p.Mode), AllowDomains: append([]string(nil), p.AllowDomains...)}
	for _, c := range p.AllowCIDRs {
		out.AllowCIDRs = append(out.AllowCIDRs, c.String())
	}
	return out
}

func policyFromBackend(p netpolicy.Policy) NetworkPolicy {
	out := NetworkPolicy{Mode: NetworkMode(p.EffectiveMode()), AllowDomains: append([]string(nil), p.AllowDomains...)}
	for _, c := range p.AllowCIDRs {
		if pf, err := netip.ParsePrefix(c); err == nil {
			out.AllowCIDRs = append(out.AllowCIDRs, pf)
		}
	}
	return out
}

// resolveNetwork folds NoNetwork into the policy and validates it. It
// returns the normalized policy.
func (c Config) resolveNetwork() (NetworkPolicy, error) {
	p := c.Network
	if c.NoNetwork {
		if p.Mode != "" && p.Mode != NetworkNone || len(p.AllowDomains)+len(p.AllowCIDRs) > 0 {
			return p, newErr("validate", ErrInvalidConfig, newFix(FixUnsetOption, ArgOption, "NoNetwork", ArgOr, "Network"),
				"NoNetwork contradicts the network policy "+string(p.Mode))
		}
		p.Mode = NetworkNone
	}
	for _, c := range p.AllowCIDRs {
		if !c.IsValid() {
			return p, newErr("validate", ErrInvalidConfig, newFix(FixEditOption, ArgOption, "Network.AllowCIDRs", ArgHint, "give prefixes such as 203.0.113.0/24 or 127.0.0.1/32"), "invalid CIDR in the network policy")
		}
	}
	bp := p.toBackend()
	if err := bp.Validate(); err != nil {
		if errors.Is(err, netpolicy.ErrInvalid) {
			return p, newErr("validate", ErrInvalidConfig, newFix(FixEditAllowLists), err.Error())
		}
		return p, err
	}
	return policyFromBackend(bp.Normalize()), nil
}

// NetworkStats asks the network sidecar of a running VM what it let through
// and refused. A VM without networking returns ErrUnsupported.
func (vm *VM) NetworkStats(ctx context.Context) (NetworkStats, error) {
	rec, err := vm.m.record(ctx, vm.id)
	if err != nil {
		return NetworkStats{}, err
	}
	if !rec.Machine.Network {
		return NetworkStats{}, newErr("network stats", ErrUnsupported, Fix{}, fmt.Sprintf("vm %s has networking off", vm.id))
	}
	b, err := vm.m.backend(rec.Backend)
	if err != nil {
		return NetworkStats{}, err
	}
	sb, ok := backend.As[backend.NetStatser](b)
	if !ok {
		return NetworkStats{}, newErr("network stats", ErrUnsupported, Fix{}, "the "+rec.Backend+" backend has no network sidecar")
	}
	s, err := sb.NetStats(ctx, rec.Machine)
	if err != nil {
		if errors.Is(err, backend.ErrNotRunning) {
			return NetworkStats{}, newErr("network stats", ErrVMNotRunning, newFix(FixStartVM, ArgVM, vm.id), fmt.Sprintf("vm %s is not running", vm.id))
		}
		return NetworkStats{}, err
	}
	out := NetworkStats{Allowed: s.Allowed, Refused: s.Refused, DNSRefused: s.DNSRefused, TxBytes: s.TxBytes, RxBytes: s.RxBytes}
	for _, r := range s.LastRefused {
		out.LastRefused = append(out.LastRefused, NetworkRefusal(r))
	}
	return out, nil
}

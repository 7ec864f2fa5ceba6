package smolvm

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// An imported archive keeps its network mode and allowed domains but not
// its allowed CIDRs (127.0.0.1/32 would open this host's loopback to the
// guest) nor its port forwards.
func TestImportNarrowsNetwork(t *testing.T) {
	cfg := Config{Name: "v", Network: NetworkPolicy{Mode: NetworkAllowlist, AllowDomains: []string{"deb.debian.org"},
		AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}},
		PortForwards: []PortForward{{HostPort: 8080, GuestPort: 80}}}
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	man := snapshot.Manifest{ID: "s", VMConfig: raw, Spec: backend.Spec{Network: true,
		NetPolicy:    netpolicy.Policy{Mode: "allowlist", AllowDomains: []string{"deb.debian.org"}, AllowCIDRs: []string{"127.0.0.1/32"}},
		PortForwards: []backend.PortForward{{HostPort: 8080, GuestPort: 80}}}}
	dropped, err := narrowImportedNetwork(&man)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"allow-cidr 127.0.0.1/32", "port forward 8080:80"}; !cmp.Equal(dropped, want) {
		t.Errorf("dropped %q, want %q", dropped, want)
	}
	want := netpolicy.Policy{Mode: "allowlist", AllowDomains: []string{"deb.debian.org"}}
	if !cmp.Equal(man.Spec.NetPolicy, want) || man.Spec.PortForwards != nil || !man.Spec.Network {
		t.Errorf("spec after import: policy %+v, forwards %v, network %v", man.Spec.NetPolicy, man.Spec.PortForwards, man.Spec.Network)
	}
	var got Config
	if err := json.Unmarshal(man.VMConfig, &got); err != nil {
		t.Fatal(err)
	}
	if got.Network.Mode != NetworkAllowlist || !cmp.Equal(got.Network.AllowDomains, []string{"deb.debian.org"}) ||
		got.Network.AllowCIDRs != nil || got.PortForwards != nil {
		t.Errorf("config after import: %+v", got)
	}
}

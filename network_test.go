package smolvm_test

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

// hostHTTP serves "hello guest" on the host's 127.0.0.1 and returns its port.
func hostHTTP(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "hello guest") })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// pyConnect is a guest command that opens a TCP connection to host:port
// with a 10 s timeout and prints "connected" on success.
func pyConnect(hostport string) string {
	h, p, _ := strings.Cut(hostport, ":")
	return fmt.Sprintf(`python3 -c 'import socket; socket.create_connection(("%s", %s), timeout=10); print("connected")'`, h, p)
}

func refused(st *smolvm.NetworkStats, dest, reason string) bool {
	return st != nil && slices.ContainsFunc(st.LastRefused, func(r smolvm.NetworkRefusal) bool {
		return strings.HasPrefix(r.Dest, dest) && strings.HasPrefix(r.Reason, reason)
	})
}

func hostAddress() string {
	as, _ := net.InterfaceAddrs()
	for _, a := range as {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
			return p.Addr().String()
		}
	}
	return ""
}

func TestNetworkPolicyValidation(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	for _, cfg := range []smolvm.Config{
		{Image: "busybox", Network: smolvm.NetworkPolicy{Mode: "open"}},
		{Image: "busybox", Network: smolvm.NetworkPolicy{Mode: smolvm.NetworkAllowlist, AllowDomains: []string{"*"}}},
		{Image: "busybox", Network: smolvm.NetworkPolicy{AllowDomains: []string{"example.com"}}}, // domains need the allowlist mode
		{Image: "busybox", NoNetwork: true, Network: smolvm.NetworkPolicy{Mode: smolvm.NetworkAllowlist}},
		{Image: "busybox", Network: smolvm.NetworkPolicy{Mode: smolvm.NetworkNone}, PortForwards: []smolvm.PortForward{{HostPort: 1, GuestPort: 1}}},
		{Image: "busybox", Network: smolvm.NetworkPolicy{AllowCIDRs: []netip.Prefix{{}}}},
	} {
		if _, err := m.New(ctx, cfg); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("%+v: %v", cfg.Network, err)
		}
	}
	vm, err := m.New(ctx, smolvm.Config{Image: "busybox", Network: smolvm.NetworkPolicy{Mode: smolvm.NetworkNone}})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if info, _ := vm.Info(ctx); info.Network || info.NetworkPolicy != nil {
		t.Errorf("mode none: %+v", info)
	}
}

// TestDebianNetworkDefault: in the default mode apt-get update works (the
// mirror here is public address space, 203.0.113.0/24), but the guest
// cannot open a connection to a server on the host's 127.0.0.1 (through
// 10.0.2.2 or the host's address), metadata, or a private address (the
// host's own resolver at 10.255.255.53 included). The VM is the shared
// debian one: the zero Config (TestPython3OnDebian checks its defaults).
func TestDebianNetworkDefault(t *testing.T) {
	t.Parallel() // runs beside the other parallel VM tests, on the second core
	vm := sharedDebianVM(t)
	port := hostHTTP(t)
	dests := map[string]string{
		fmt.Sprintf("10.0.2.2:%d", port): "loopback",
		"169.254.169.254:80":             "link-local",
		"10.255.255.53:53":               "private",
		"192.168.0.1:80":                 "private",
	}
	if h := hostAddress(); h != "" {
		dests[fmt.Sprintf("%s:%d", h, port)] = ""
	}
	for dest := range dests {
		if res := run(t, vm, pyConnect(dest)); res.OK() || strings.Contains(res.Stdout, "connected") {
			t.Errorf("guest connected to %s", dest)
		}
	}
	// UDP to a refused address fails at once (ICMP port unreachable).
	udp := `python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect(("169.254.169.254", 53)); s.send(b"x")
try:
    s.recv(1)
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")'`
	if out := mustOK(t, vm, udp); out != "refused" {
		t.Errorf("UDP to metadata: %q, want refused", out)
	}
	t0 := time.Now()
	res := run(t, vm, "apt-get update 2>&1 | tail -n 5")
	t.Logf("apt-get update: %v", time.Since(t0).Round(time.Millisecond))
	if !res.OK() || strings.Contains(res.Stdout, "Err:") || strings.Contains(res.Stdout, "Could not") || !strings.Contains(res.Stdout, "Reading package lists") {
		t.Errorf("apt-get update: exit %d\n%s%s", res.ExitCode, res.Stdout, res.Stderr)
	}
	info, err := vm.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	for dest, reason := range dests {
		if !refused(info.NetworkStats, dest, reason) {
			t.Errorf("no refusal %q for %s in %+v", reason, dest, info.NetworkStats)
		}
	}
}

// TestDebianNetworkAllowlist: with the apt mirror's name allowed, apt works;
// other hosts fail, with a reason the host can show.
func TestDebianNetworkAllowlist(t *testing.T) {
	t.Parallel() // its own VMs: runs beside the other parallel VM tests, on the second core
	m := newManager(t)
	vm := boot(t, m, smolvm.Config{Name: "netallow", Network: smolvm.NetworkPolicy{
		Mode: smolvm.NetworkAllowlist, AllowDomains: []string{"deb.debian.org"}}})
	port := hostHTTP(t)
	// apt-get update fetches and checks the signed release file of each
	// suite in sources.list (all on deb.debian.org) but not the package
	// lists, whose decompression and parsing take the emulated guest 10-20
	// s and prove nothing about the network (TestDebianNetworkDefault runs
	// the whole apt-get update).
	t0 := time.Now()
	res := run(t, vm, "apt-get update -o Acquire::IndexTargets::deb::Packages::DefaultEnabled=false -o Acquire::Languages=none 2>&1 | tail -n 8")
	t.Logf("apt-get update (release files): %v", time.Since(t0).Round(time.Millisecond))
	if !res.OK() || strings.Count(res.Stdout, "InRelease") < 3 || strings.Contains(res.Stdout, "Err:") || strings.Contains(res.Stdout, "Could not") || !strings.Contains(res.Stdout, "Reading package lists") {
		t.Errorf("apt-get update: exit %d\n%s%s", res.ExitCode, res.Stdout, res.Stderr)
	}
	// Another public host (the mirror network's 203.0.113.1), a name that
	// is not allowed, and the host's loopback.
	for _, dest := range []string{"203.0.113.1:80", fmt.Sprintf("10.0.2.2:%d", port)} {
		if res := run(t, vm, pyConnect(dest)); res.OK() {
			t.Errorf("guest connected to %s", dest)
		}
	}
	if res := run(t, vm, `python3 -c 'import socket; print(socket.gethostbyname("security.debian.org"))'`); res.OK() {
		t.Errorf("DNS answered a name outside the allow-list: %q", res.Stdout)
	}
	info, err := vm.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.NetworkPolicy == nil || info.NetworkPolicy.Mode != smolvm.NetworkAllowlist || !slices.Equal(info.NetworkPolicy.AllowDomains, []string{"deb.debian.org"}) {
		t.Errorf("policy %+v", info.NetworkPolicy)
	}
	st := info.NetworkStats
	if !refused(st, "203.0.113.1:80", "not in allow-list") || !refused(st, fmt.Sprintf("10.0.2.2:%d", port), "loopback") ||
		!refused(st, "security.debian.org", "name not in allow-list") || st.Allowed == 0 {
		t.Errorf("stats %+v", st)
	}
	// A fork of a snapshot keeps the policy.
	ctx := testCtx(t)
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "netallow-snap", ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	clones, err := m.Fork(ctx, "netallow-snap", 1, smolvm.ForkOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	clone := clones[0]
	defer clone.Close()
	if res := run(t, clone, pyConnect("203.0.113.1:80")); res.OK() {
		t.Error("forked guest connected outside its allow-list")
	}
	ci, err := clone.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ci.NetworkPolicy == nil || ci.NetworkPolicy.Mode != smolvm.NetworkAllowlist || !refused(ci.NetworkStats, "203.0.113.1:80", "not in allow-list") {
		t.Errorf("fork: policy %+v stats %+v", ci.NetworkPolicy, ci.NetworkStats)
	}
}

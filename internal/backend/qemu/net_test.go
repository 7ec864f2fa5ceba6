package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/agentproto"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// hostServer serves "hello guest" on 127.0.0.1 and returns its port.
func hostServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "hello guest")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

// guestRun runs script and returns its exit code and combined output.
func guestRun(t *testing.T, c *agentclient.Client, script string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.OpTimeout)
	defer cancel()
	var out strings.Builder
	res, err := c.Exec(ctx, agentproto.ExecRequest{Shell: script + " 2>&1"}, &out, &out)
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	return res.ExitCode, out.String()
}

func freePort(t *testing.T) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// serveInGuest starts a one-shot HTTP answer on guestPort and fetches it
// through hostPort on the host.
func fetchThroughForward(t *testing.T, c *agentclient.Client, hostPort, guestPort int, body string) {
	t.Helper()
	testutil.Run(t, c, fmt.Sprintf("(echo -e 'HTTP/1.0 200 OK\\r\\n\\r\\n%s' | nc -l -p %d >/dev/null 2>&1 &) ; sleep 0.3", body, guestPort))
	// A plain TCP read, not an HTTP client: nc answers as soon as the
	// connection opens, before any request, and Go's HTTP transport drops
	// bytes that arrive before it wrote its request ("unsolicited response
	// on idle HTTP channel"), after which the one-shot nc is gone.
	var got string
	for i := 0; i < 50 && !strings.Contains(got, body); i++ {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort), 5*time.Second)
		if err == nil {
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			b, _ := io.ReadAll(io.LimitReader(conn, 256))
			conn.Close()
			got = string(b)
		}
		if !strings.Contains(got, body) {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !strings.Contains(got, body) {
		t.Errorf("host got %q through forward %d -> %d", got, hostPort, guestPort)
	}
}

func hasRefusal(s netpolicy.Stats, dest, reason string) bool {
	return slices.ContainsFunc(s.LastRefused, func(r netpolicy.Refusal) bool {
		return strings.HasPrefix(r.Dest, dest) && strings.HasPrefix(r.Reason, reason)
	})
}

// TestNetworkPolicyDefault boots a guest on the sidecar network in the
// default mode: it reaches the public internet (the package mirror here)
// and DNS, but not the host's loopback (through 10.0.2.2), the host's own
// address, metadata or private addresses; port forwards and ExposePort
// work; the sidecar exits with the VM.
func TestNetworkPolicyDefault(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{Logger: testLogger()})
	port := hostServer(t)
	fwd := freePort(t)
	spec := testutil.Spec(t, img, "netdef", testutil.SpecOptions{Network: true,
		PortForwards: []backend.PortForward{{HostPort: fwd, GuestPort: 8080}}})
	m := testutil.Boot(t, b, spec)
	c := testutil.Agent(t, b, m)

	hostAddr := ""
	if as, err := net.InterfaceAddrs(); err == nil {
		for _, a := range as {
			if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLoopback() {
				hostAddr = p.Addr().String()
				break
			}
		}
	}
	blocked := map[string]string{
		"10.0.2.2:" + strconv.Itoa(port):  "loopback",
		"169.254.169.254:80":              "link-local",
		"192.168.1.1:80":                  "private",
		"10.1.2.3:80":                     "private",
		"100.64.0.1:80":                   "cgnat",
		"127.0.0.1:" + strconv.Itoa(port): "", // the guest's own loopback: no server there
	}
	if hostAddr != "" {
		blocked[hostAddr+":"+strconv.Itoa(port)] = "" // reason depends on the range: checked below
	}
	for dest := range blocked {
		if code, out := guestRun(t, c, "timeout 20 wget -q -O - http://"+dest+"/"); code == 0 || strings.Contains(out, "hello guest") {
			t.Errorf("guest reached %s: exit %d %q", dest, code, out)
		}
	}
	// DNS through the sidecar and egress to a public address (the package
	// mirror here resolves to 203.0.113.0/24).
	if code, out := guestRun(t, c, "nslookup deb.debian.org 10.0.2.3"); code != 0 || !strings.Contains(out, "Address") {
		t.Errorf("nslookup: exit %d %q", code, out)
	}
	if code, out := guestRun(t, c, "timeout 20 wget -q -O - http://deb.debian.org/debian/dists/bookworm/InRelease | head -c 200"); code != 0 || !strings.Contains(out, "Origin: Debian") {
		t.Errorf("public egress: exit %d %q", code, out)
	}
	st, err := b.NetStats(ctxFor(t, time.Minute), m)
	if err != nil {
		t.Fatal(err)
	}
	for dest, reason := range blocked {
		if reason != "" && !hasRefusal(st, dest, reason) {
			t.Errorf("no refusal %s for %s in %+v", reason, dest, st.LastRefused)
		}
	}
	if hostAddr != "" && !hasRefusal(st, hostAddr+":", "") {
		t.Errorf("no refusal for the host address %s in %+v", hostAddr, st.LastRefused)
	}
	if st.Policy.Mode != netpolicy.ModeDefault || st.Allowed == 0 {
		t.Errorf("stats %+v", st)
	}

	// Port forwards: the boot-time one and one added at run time.
	fetchThroughForward(t, c, fwd, 8080, "from-guest-boot")
	fwd2 := freePort(t)
	if err := b.ExposePort(ctxFor(t, time.Minute), m, backend.PortForward{HostPort: fwd2, GuestPort: 8081}); err != nil {
		t.Fatal(err)
	}
	fetchThroughForward(t, c, fwd2, 8081, "from-guest-exposed")
	if err := b.ExposePort(ctxFor(t, time.Minute), m, backend.PortForward{HostPort: fwd2, GuestPort: 8082}); err == nil {
		t.Error("exposing the same host port twice succeeded")
	}

	// The sidecar runs unprivileged (when we are root) and goes with the
	// VM by itself: kill QEMU outright and it sees the stream close.
	if m.NetPID <= 0 || syscall.Kill(m.NetPID, 0) != nil {
		t.Fatalf("sidecar pid %d not running", m.NetPID)
	}
	status, _ := os.ReadFile("/proc/" + strconv.Itoa(m.NetPID) + "/status")
	if !strings.Contains(string(status), "NoNewPrivs:\t1") || !strings.Contains(string(status), "Seccomp:\t2") {
		t.Errorf("sidecar without no_new_privs or seccomp:\n%s", status)
	}
	if os.Geteuid() == 0 && !strings.Contains(string(status), "Uid:\t65534\t65534\t65534\t65534") {
		t.Errorf("sidecar of a root launcher kept its uid:\n%s", status)
	}
	syscall.Kill(m.PID, syscall.SIGKILL)
	gone := false
	for i := 0; i < 100 && !gone; i++ {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(m.NetPID) + "/cmdline")
		gone = err != nil || !strings.Contains(string(b), "smolvm-net")
		time.Sleep(50 * time.Millisecond)
	}
	if !gone {
		t.Errorf("sidecar %d still running 5 s after QEMU was killed", m.NetPID)
	}
	if err := b.Stop(ctxFor(t, time.Minute), m); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(netSocket(m.RunDir)); err == nil {
		t.Error("net.sock left behind")
	}
}

// TestNetworkPolicyAllowlist: only the allowed name (and what it resolves
// to) and the explicitly allowed host loopback address are reachable; DNS
// refuses other names; refusals are counted with their reasons.
func TestNetworkPolicyAllowlist(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{Logger: testLogger()})
	port := hostServer(t)
	spec := testutil.Spec(t, img, "netallow", testutil.SpecOptions{Network: true})
	spec.NetPolicy = netpolicy.Policy{Mode: netpolicy.ModeAllowlist, AllowDomains: []string{"deb.debian.org"}, AllowCIDRs: []string{"127.0.0.1/32"}}
	m := testutil.Boot(t, b, spec)
	c := testutil.Agent(t, b, m)

	if code, out := guestRun(t, c, fmt.Sprintf("timeout 20 wget -q -O - http://10.0.2.2:%d/", port)); code != 0 || out != "hello guest" {
		t.Errorf("explicitly allowed host loopback: exit %d %q", code, out)
	}
	if code, out := guestRun(t, c, "timeout 20 wget -q -O - http://deb.debian.org/debian/dists/bookworm/InRelease | head -c 200"); code != 0 || !strings.Contains(out, "Origin: Debian") {
		t.Errorf("allowed domain: exit %d %q", code, out)
	}
	if code, out := guestRun(t, c, "nslookup example.com 10.0.2.3"); code == 0 && strings.Contains(out, "Address: ") && !strings.Contains(out, "10.0.2.3") {
		t.Errorf("DNS answered a name outside the allow-list: %q", out)
	}
	// A public address nobody resolved for us (the mirror network, another host).
	if code, out := guestRun(t, c, "timeout 20 wget -q -O - http://203.0.113.1/"); code == 0 {
		t.Errorf("reached an address outside the allow-list: %q", out)
	}
	if code, out := guestRun(t, c, "timeout 20 wget -q -O - http://169.254.169.254/"); code == 0 {
		t.Errorf("reached metadata: %q", out)
	}
	st, err := b.NetStats(ctxFor(t, time.Minute), m)
	if err != nil {
		t.Fatal(err)
	}
	if !hasRefusal(st, "203.0.113.1:80", "not in allow-list") || !hasRefusal(st, "example.com", "name not in allow-list") ||
		!hasRefusal(st, "169.254.169.254:80", "link-local") || st.DNSRefused == 0 || st.Refused < 2 {
		t.Errorf("refusals: %+v", st)
	}
	if st.Policy.Mode != netpolicy.ModeAllowlist || !slices.Equal(st.Policy.AllowDomains, []string{"deb.debian.org"}) {
		t.Errorf("policy %+v", st.Policy)
	}
}

// TestNetworkForwardBusy: a boot-time forward whose host port is taken
// fails Start with the sidecar's reason, and leaves nothing running.
func TestNetworkForwardBusy(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU")
	}
	testutil.RequireQEMU(t)
	if err := testutil.EnsureNetHelper(context.Background()); err != nil {
		t.Fatal(err)
	}
	img := testutil.Image(t, "busybox")
	b := New(Options{Logger: testLogger()})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	spec := testutil.Spec(t, img, "netbusy", testutil.SpecOptions{Network: true,
		PortForwards: []backend.PortForward{{HostPort: ln.Addr().(*net.TCPAddr).Port, GuestPort: 22}}})
	ctx := ctxFor(t, time.Minute)
	if err := b.Prepare(ctx, spec); err != nil {
		t.Fatal(err)
	}
	m, err := b.Start(ctx, spec)
	if err == nil {
		b.Stop(ctx, m)
		t.Fatal("Start succeeded with the forward's host port taken")
	}
	if !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("error does not say why: %v", err)
	}
	if pids := testutil.ProcessesFor(spec.RunDir); len(pids) > 0 {
		t.Errorf("processes left: %v", pids)
	}
	helper := os.Getenv(NetHelperEnv)
	for i := 0; ; i++ {
		left := 0
		for _, pid := range procfs.Others() {
			if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline"); err == nil && strings.HasPrefix(string(b), helper+"\x00") {
				left++
			}
		}
		if left == 0 {
			break
		}
		if i == 100 {
			t.Fatalf("%d sidecars of this test binary still running", left)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestNetHelperMissing(t *testing.T) {
	t.Setenv(NetHelperEnv, "/nonexistent/smolvm-net")
	if _, err := NetHelper(); !errors.Is(err, ErrNetHelperMissing) || !strings.Contains(err.Error(), "scripts/setup") {
		t.Errorf("bad helper path: %v", err)
	}
	t.Setenv(NetHelperEnv, "")
	t.Setenv("PATH", t.TempDir())
	if p, err := NetHelper(); err == nil {
		// Only a smolvm-net next to the test binary could be found.
		exe, _ := os.Executable()
		if filepath.Dir(p) != filepath.Dir(exe) {
			t.Errorf("found %s", p)
		}
	} else if !errors.Is(err, ErrNetHelperMissing) || !strings.Contains(err.Error(), "go build -o bin/smolvm-net ./cmd/smolvm-net") {
		t.Errorf("no helper: %v", err)
	}
}

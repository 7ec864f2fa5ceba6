package smolvm_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// The injection of issue 9: QEMU's guestfwd=...-cmd: runs a host command
// whenever the guest connects.
const hostfwdInjection = "127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:80-cmd:touch pwned,hostfwd=tcp:127.0.0.1"

// qemuOf lists the live processes whose command line mentions s.
func processesMentioning(s string) []int {
	var out []int
	for _, pid := range procfs.Others() {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err == nil && bytes.Contains(b, []byte(s)) {
			out = append(out, pid)
		}
	}
	return out
}

// TestHostileConfigRefusedBeforeAnything: a hostile value in a Config is
// refused by New (the Manager's and the package-level one) with
// ErrInvalidConfig, before any record, file or process exists.
func TestHostileConfigRefusedBeforeAnything(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	pf := func(addr string) []smolvm.PortForward {
		return []smolvm.PortForward{{HostAddr: addr, HostPort: 2222, GuestPort: 22}}
	}
	cases := []struct {
		name string
		cfg  smolvm.Config
	}{
		{"hostfwd injection", smolvm.Config{Image: "busybox", PortForwards: pf(hostfwdInjection)}},
		{"host name", smolvm.Config{Image: "busybox", PortForwards: pf("localhost")}},
		{"addr with port", smolvm.Config{Image: "busybox", PortForwards: pf("127.0.0.1:80")}},
		{"ipv6 on qemu user networking", smolvm.Config{Image: "busybox", PortForwards: pf("::1")}},
		{"env name with shell", smolvm.Config{Image: "busybox", Env: map[string]string{"A;reboot": "x"}}},
		{"env name with digit first", smolvm.Config{Image: "busybox", Env: map[string]string{"1A": "x"}}},
		{"env name with =", smolvm.Config{Image: "busybox", Env: map[string]string{"A=B": "x"}}},
		{"env value with NUL", smolvm.Config{Image: "busybox", Env: map[string]string{"A": "x\x00y"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.cfg.Name = "hostile"
			_, err := m.New(ctx, c.cfg)
			if !errors.Is(err, smolvm.ErrInvalidConfig) {
				t.Fatalf("New: %v, want ErrInvalidConfig", err)
			}
			if fixOf(err).IsZero() && !strings.Contains(err.Error(), "address") && !strings.Contains(err.Error(), "environment") {
				t.Errorf("error says nothing useful: %v", err)
			}
		})
	}
	// The package-level New (default Options from the environment).
	_, err := smolvm.New(ctx, smolvm.Config{Name: "hostile", Image: "busybox", PortForwards: pf(hostfwdInjection)})
	if !errors.Is(err, smolvm.ErrInvalidConfig) {
		t.Fatalf("smolvm.New: %v, want ErrInvalidConfig", err)
	}
	// Nothing exists: no record, no VM dir, no QEMU (nor qemu-img) for it.
	if infos, _ := m.List(ctx); len(infos) != 0 {
		t.Errorf("records left: %+v", infos)
	}
	for _, dir := range []string{filepath.Join(m.DataDir(), "vms"), filepath.Join(os.Getenv("SMOLVM_DATA_DIR"), "vms", "hostile")} {
		if ents, err := os.ReadDir(dir); err == nil && len(ents) != 0 {
			t.Errorf("files left in %s: %v", dir, ents)
		}
	}
	if _, err := os.Stat("pwned"); err == nil {
		t.Error("the injected command ran")
	}
	if pids := processesMentioning("guestfwd"); len(pids) != 0 {
		t.Errorf("processes with guestfwd in their argv: %v", pids)
	}
	if pids := processesMentioning(filepath.Join(m.DataDir(), "vms")); len(pids) != 0 {
		t.Errorf("processes for this data dir: %v", pids)
	}
	// Every interface is an explicit opt-in: written out, it is accepted.
	vm, err := m.New(ctx, smolvm.Config{Name: "everywhere", Image: "busybox", PortForwards: pf("0.0.0.0")})
	if err != nil {
		t.Fatalf("explicit 0.0.0.0: %v", err)
	}
	defer vm.Close()
	info, err := vm.Info(ctx)
	if err != nil || len(info.PortForwards) != 1 || info.PortForwards[0].HostAddr != "0.0.0.0" {
		t.Errorf("info: %+v %v", info.PortForwards, err)
	}
	vm.Delete(ctx)
}

// TestConfigPortForwardEndToEnd: a forward from Config (served by the
// VM's network sidecar) binds 127.0.0.1 when HostAddr is empty and carries
// a connection to the guest.
func TestConfigPortForwardEndToEnd(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hostPort := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	m := newManager(t)
	vm := boot(t, m, smolvm.Config{Name: "pf", Image: "busybox", MemoryMiB: 256,
		PortForwards: []smolvm.PortForward{{HostPort: hostPort, GuestPort: 8080}}})
	ctx := testCtx(t)
	info, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(info.PID) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	// The network sidecar serves the forward: QEMU's argv has none, and
	// the host socket listens on 127.0.0.1 only.
	if bytes.Contains(cmdline, []byte("hostfwd")) {
		t.Fatalf("QEMU argv has a hostfwd: %q", bytes.ReplaceAll(cmdline, []byte{0}, []byte(" ")))
	}
	if got := tcpListeners(t, hostPort); len(got) != 1 || got[0] != "0100007F" {
		t.Fatalf("listeners on port %d: %q, want only 127.0.0.1 (0100007F)", hostPort, got)
	}
	if _, err := vm.Run(ctx, "(while true; do echo -e 'HTTP/1.0 200 OK\\r\\n\\r\\nfrom-guest' | nc -l -p 8080 >/dev/null 2>&1; done &) ; sleep 0.3"); err != nil {
		t.Fatal(err)
	}
	body := getThroughPort(hostPort, "from-guest", 30*time.Second)
	if !strings.Contains(string(body), "from-guest") {
		t.Errorf("host got %q through the forwarded port", body)
	}
}

// tcpListeners returns the local addresses (hex, as /proc/net/tcp writes
// them) of the IPv4 sockets listening on port.
func tcpListeners(t *testing.T, port int) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "0A" { // LISTEN
			continue
		}
		addr, p, ok := strings.Cut(f[1], ":")
		if n, err := strconv.ParseInt(p, 16, 32); ok && err == nil && int(n) == port {
			out = append(out, addr)
		}
	}
	return out
}

// TestTamperedManifestRefused: the manifest on disk is data. One that
// names a file outside the snapshot dir (with the digest of that file) or
// that was edited into another valid manifest is refused with
// ErrSnapshotCorrupt; the original restores.
func TestTamperedManifestRefused(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "tamper", Image: "busybox", NoNetwork: true, MemoryMiB: 256})
	// A full snapshot: the last restore is a restore, not a second boot.
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "tampered", Type: smolvm.SnapshotFull}); err != nil {
		t.Fatal(err)
	}
	vm.Delete(ctx)
	dir := filepath.Join(m.DataDir(), "snapshots", "tampered")
	manPath := filepath.Join(dir, snapshot.ManifestName)
	orig, err := os.ReadFile(manPath)
	if err != nil {
		t.Fatal(err)
	}
	man, err := snapshot.ParseManifest(orig)
	if err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(m.DataDir(), "secret") // dir/../../secret
	if err := os.WriteFile(secret, []byte("host secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sum, size, err := snapshot.Digest(secret)
	if err != nil {
		t.Fatal(err)
	}
	write := func(m snapshot.Manifest) {
		t.Helper()
		b, _ := json.Marshal(m)
		if err := os.WriteFile(manPath, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	traversal := man
	traversal.Artifacts = append([]snapshot.Artifact(nil), man.Artifacts...)
	traversal.Result.Artifacts = append([]backend.Artifact(nil), man.Result.Artifacts...)
	for i := range traversal.Artifacts {
		if traversal.Artifacts[i].Role == "disk" {
			traversal.Artifacts[i].Name, traversal.Artifacts[i].SHA256, traversal.Artifacts[i].Size = "../../secret", sum, size
			traversal.Result.Artifacts[i].Name = "../../secret"
		}
	}
	write(traversal)
	_, err = m.FromSnapshot(ctx, "tampered", smolvm.RestoreOptions{})
	if !errors.Is(err, smolvm.ErrSnapshotCorrupt) || !strings.Contains(err.Error(), "not a plain file name") {
		t.Errorf("manifest naming ../../secret: %v", err)
	}
	edited := man
	edited.Spec.MemoryMiB = 512 // valid, but not what was recorded
	write(edited)
	_, err = m.FromSnapshot(ctx, "tampered", smolvm.RestoreOptions{})
	if !errors.Is(err, smolvm.ErrSnapshotCorrupt) || !strings.Contains(err.Error(), "differs from the copy in the database") {
		t.Errorf("edited manifest: %v", err)
	}
	if err := m.VerifySnapshot(ctx, "tampered"); !errors.Is(err, smolvm.ErrSnapshotCorrupt) {
		t.Errorf("verify of the edited manifest: %v", err)
	}
	if infos, _ := m.List(ctx); len(infos) != 0 {
		t.Errorf("refused restores left VMs: %+v", infos)
	}
	if err := os.WriteFile(manPath, orig, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := m.FromSnapshot(ctx, "tampered", smolvm.RestoreOptions{Resume: true})
	if err != nil {
		t.Fatalf("the original manifest: %v", err)
	}
	defer r.Close()
	if got := mustOK(t, r, "echo restored"); got != "restored" {
		t.Errorf("restored vm: %q", got)
	}
}

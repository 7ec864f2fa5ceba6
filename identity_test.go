package smolvm_test

import (
	"encoding/hex"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

// guestIdentity is what a user in the guest sees of its identity.
type guestIdentity struct {
	Hostname  string
	MachineID string // /etc/machine-id
	MAC       string // eth0's, as `ip link` shows it ("" without a network)
	Random    string // 16 bytes of /dev/urandom, hex
	Clock     int64  // date +%s
	Cmdline   string // /proc/cmdline
	// BootID is /proc/sys/kernel/random/boot_id when the caller read it
	// (identityOf does not: the kernel fixes it when first read, so a
	// source VM read before its snapshot passes its boot_id to clones).
	BootID string

	// The host's clock just before and just after the guest answered.
	HostBefore, HostAfter int64
}

// identityOf asks vm, in one command, what a user would ask to tell two
// sandboxes apart.
func identityOf(t testing.TB, vm *smolvm.VM) guestIdentity {
	t.Helper()
	before := time.Now().Unix()
	out := mustOK(t, vm, `hostname; cat /etc/machine-id
ip link show eth0 2>/dev/null | awk '$1 == "link/ether" { print $2 }' | grep . || echo
head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo
date +%s; cat /proc/cmdline`)
	after := time.Now().Unix()
	l := strings.Split(out, "\n")
	if len(l) != 6 {
		t.Fatalf("identity of %s: %q", vm.ID(), out)
	}
	clock, err := strconv.ParseInt(l[4], 10, 64)
	if err != nil {
		t.Fatalf("identity of %s: date %q", vm.ID(), l[4])
	}
	return guestIdentity{Hostname: l[0], MachineID: l[1], MAC: l[2], Random: l[3], Clock: clock, Cmdline: l[5],
		HostBefore: before, HostAfter: after}
}

// checkIdentity fails unless the guest shows the identity the SDK reports
// (Info) and the host's clock within 2 s.
func checkIdentity(t testing.TB, vm *smolvm.VM, id guestIdentity) {
	t.Helper()
	info, err := vm.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if id.Hostname != vm.ID() || info.Hostname != vm.ID() {
		t.Errorf("%s: hostname %q, Info says %q", vm.ID(), id.Hostname, info.Hostname)
	}
	if b, err := hex.DecodeString(id.MachineID); err != nil || len(b) != 16 || id.MachineID != strings.ToLower(id.MachineID) {
		t.Errorf("%s: machine-id %q, want 32 lowercase hex digits", vm.ID(), id.MachineID)
	}
	if id.MachineID != info.MachineID {
		t.Errorf("%s: machine-id %q, Info says %q", vm.ID(), id.MachineID, info.MachineID)
	}
	if info.Network && (id.MAC == "" || id.MAC != info.MAC) {
		t.Errorf("%s: eth0 MAC %q, Info says %q", vm.ID(), id.MAC, info.MAC)
	}
	if id.Clock < id.HostBefore-2 || id.Clock > id.HostAfter+2 {
		t.Errorf("%s: guest clock %d, host %d..%d: more than 2 s apart", vm.ID(), id.Clock, id.HostBefore, id.HostAfter)
	}
}

// checkDistinct fails when two guests share any part of their identity.
func checkDistinct(t testing.TB, ids map[string]guestIdentity) {
	t.Helper()
	for _, field := range []struct {
		name string
		get  func(guestIdentity) string
	}{
		{"hostname", func(g guestIdentity) string { return g.Hostname }},
		{"machine-id", func(g guestIdentity) string { return g.MachineID }},
		{"MAC", func(g guestIdentity) string { return g.MAC }},
		{"urandom bytes", func(g guestIdentity) string { return g.Random }},
		{"boot_id", func(g guestIdentity) string { return g.BootID }},
	} {
		seen := map[string]string{}
		for vm, g := range ids {
			v := field.get(g)
			if v == "" && field.name == "boot_id" {
				continue // not read
			}
			if other, ok := seen[v]; ok {
				t.Errorf("%s and %s share their %s %q", vm, other, field.name, v)
			}
			seen[v] = vm
		}
	}
}

// TestIdentityOnReadOnlyRoot: a guest whose root file system is read-only
// still shows a clone its own identity in /etc: the agent keeps the files
// in /run (behind /etc links made while the root was writable, or bound
// over /etc/hostname and /etc/machine-id), so no file keeps the source
// VM's name or machine-id.
func TestIdentityOnReadOnlyRoot(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "rosource", Image: "busybox", NoNetwork: true})
	src := mustOK(t, vm, "cat /etc/machine-id; mount -o remount,ro / && ! touch /etc/probe 2>/dev/null && echo read-only")
	if !strings.HasSuffix(src, "\nread-only") {
		t.Fatalf("source root not read-only: %q", src)
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "ro"}); err != nil {
		t.Fatal(err)
	}
	clones, err := m.Fork(ctx, "ro", 1, smolvm.ForkOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	c := clones[0]
	defer c.Close()
	id := identityOf(t, c)
	checkIdentity(t, c, id)
	if got := mustOK(t, c, "cat /etc/hostname; ! touch /etc/probe 2>/dev/null && echo still read-only"); got != c.ID()+"\nstill read-only" {
		t.Errorf("clone's /etc/hostname on a read-only root: %q, want %q", got, c.ID())
	}
	if strings.HasPrefix(src, id.MachineID) {
		t.Errorf("clone shows the source's machine-id %s", id.MachineID)
	}
}

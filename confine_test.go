package smolvm_test

import (
	"os"
	"strconv"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm"
)

// vmmIDs returns the Uid line and Seccomp mode of a VM's VMM process.
func vmmIDs(t *testing.T, vm *smolvm.VM) (uid, seccomp string) {
	t.Helper()
	info, err := vm.Info(testCtx(t))
	if err != nil || info.PID <= 0 {
		t.Fatalf("info of %s: %+v %v", vm.ID(), info, err)
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(info.PID) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "Uid":
			f := strings.Fields(v)
			if len(f) != 4 || f[0] != f[1] || f[1] != f[2] || f[2] != f[3] {
				t.Errorf("%s: uids %q differ", vm.ID(), v)
			}
			if len(f) > 0 {
				uid = f[0]
			}
		case "Seccomp":
			seccomp = strings.TrimSpace(v)
		}
	}
	return uid, seccomp
}

// TestVMMConfinedAsRoot: a VM created as root runs its QEMU under a uid of
// its own (non-zero, kept across a stop and start), under seccomp; its
// snapshot's files are 0600; clones forked from it each get another uid.
func TestVMMConfinedAsRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the VMM drops its privileges only when smolvm runs as root")
	}
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "confined", Image: "busybox"})
	uid, sc := vmmIDs(t, vm)
	if uid == "" || uid == "0" || sc != "2" {
		t.Fatalf("VMM uid %q seccomp %q, want a non-zero uid and 2", uid, sc)
	}
	if n, _ := strconv.Atoi(uid); n < smolvm.DefaultUIDBase || n >= smolvm.DefaultUIDBase+smolvm.DefaultUIDCount {
		t.Errorf("uid %s outside the default range", uid)
	}
	mustOK(t, vm, "echo kept > /root/kept; sync")
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if again, _ := vmmIDs(t, vm); again != uid {
		t.Errorf("uid after restart %s, want the VM's own %s", again, uid)
	}
	snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "confined-snap"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{snap.Artifacts.Memory, snap.Artifacts.State, snap.Artifacts.Disk} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", p, st.Mode().Perm())
		}
	}
	clones, err := m.Fork(ctx, "confined-snap", 2, smolvm.ForkOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{uid: true}
	for _, c := range clones {
		defer c.Close()
		cu, csc := vmmIDs(t, c)
		if cu == "0" || seen[cu] || csc != "2" {
			t.Errorf("clone %s: uid %s (taken: %v) seccomp %s", c.ID(), cu, seen, csc)
		}
		seen[cu] = true
		if out := mustOK(t, c, "cat /root/kept"); strings.TrimSpace(out) != "kept" {
			t.Errorf("clone %s: %q", c.ID(), out)
		}
	}
}

// TestDoctorReportsConfinement: doctor states seccomp, the uid drop (on as
// root, off otherwise) and why per-VM cgroup limits are on or off.
func TestDoctorReportsConfinement(t *testing.T) {
	m := newManager(t)
	checks, err := m.Doctor(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]smolvm.Check{}
	for _, c := range checks {
		got[c.Name] = c
	}
	if c := got["seccomp"]; !c.OK || !strings.Contains(c.Detail, "-sandbox") {
		t.Errorf("seccomp check %+v", c)
	}
	wantDrop := "off:"
	if os.Geteuid() == 0 {
		wantDrop = "on:"
	}
	if c := got["uid drop"]; !c.OK || !strings.HasPrefix(c.Detail, wantDrop) {
		t.Errorf("uid drop check %+v, want %q", c, wantDrop)
	}
	c, ok := got["cgroup limits"]
	if !ok || !(strings.HasPrefix(c.Detail, "on:") || strings.HasPrefix(c.Detail, "off (") && !c.Fix.IsZero()) {
		t.Errorf("cgroup check %+v", c)
	}
	t.Logf("cgroup limits: %s", c.Detail)
}

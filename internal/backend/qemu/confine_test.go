package qemu

import (
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/cgroup"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

func TestConfineArgs(t *testing.T) {
	spec := testSpec()
	l := testLaunch()
	args := mustArgs(t, spec, l)
	if got := argsAfter(args, "-sandbox"); !slices.Equal(got, []string{sandboxDeny}) {
		t.Errorf("-sandbox = %q, want %q", got, sandboxDeny)
	}
	if slices.Contains(args, "-run-with") {
		t.Errorf("-run-with without a uid: %q", args)
	}
	l.RunAsUID, l.RunAsGID, l.Chroot = 1900000001, 1900000001, "/run/x,y/root"
	args = mustArgs(t, spec, l)
	if got := argsAfter(args, "-sandbox"); !slices.Equal(got, []string{sandboxDrop}) {
		t.Errorf("-sandbox = %q, want %q", got, sandboxDrop)
	}
	if got := argsAfter(args, "-run-with"); !slices.Equal(got, []string{"user=1900000001:1900000001,chroot=/run/x,,y/root"}) {
		t.Errorf("-run-with = %q", got)
	}
	// Every mode denies spawning, obsolete calls and resource control.
	for _, s := range []string{sandboxDeny, sandboxDrop} {
		for _, want := range []string{"on", "obsolete=deny", "spawn=deny", "resourcecontrol=deny"} {
			if !slices.Contains(strings.Split(s, ","), want) {
				t.Errorf("%q lacks %s", s, want)
			}
		}
	}
}

// procStatus returns the fields of /proc/PID/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			out[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return out
}

// checkConfined asserts that m's QEMU runs as uid (all four ids), without
// capabilities, under a seccomp filter, chrooted into its empty dir.
func checkConfined(t *testing.T, m backend.Machine, uid int) {
	t.Helper()
	st := procStatus(t, m.PID)
	u := strconv.Itoa(uid)
	if want := strings.Join([]string{u, u, u, u}, " "); st["Uid"] != want || st["Gid"] != want {
		t.Errorf("%s: Uid %q Gid %q, want %q", m.ID, st["Uid"], st["Gid"], want)
	}
	if st["Seccomp"] != "2" || st["NoNewPrivs"] != "1" || st["CapEff"] != "0000000000000000" {
		t.Errorf("%s: Seccomp %q NoNewPrivs %q CapEff %q, want 2, 1, none", m.ID, st["Seccomp"], st["NoNewPrivs"], st["CapEff"])
	}
	if root, err := os.Readlink("/proc/" + strconv.Itoa(m.PID) + "/root"); err != nil || root != filepath.Join(m.RunDir, chrootDirName) {
		t.Errorf("%s: root %q (%v), want its chroot dir", m.ID, root, err)
	}
}

func checkPrivate(t *testing.T, dir string, res backend.SnapshotResult) {
	t.Helper()
	for _, a := range res.Artifacts {
		st, err := os.Stat(filepath.Join(dir, a.Name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("artifact %s has mode %v, want 0600", a.Name, st.Mode().Perm())
		}
	}
}

// TestQEMUDropsPrivileges runs as root: each VM's QEMU drops to the uid in
// its spec, chrooted, under seccomp, and still boots, runs commands, takes
// full, disk and diff snapshots (the diff one of a restored VM goes through
// the normalize helper VM) and restores them: every file it needs after
// start-up reaches it as a descriptor. Snapshot artifacts are 0600.
func TestQEMUDropsPrivileges(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	if os.Geteuid() != 0 {
		t.Skip("the privilege drop happens only when smolvm runs as root")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{Logger: testLogger()})
	root := testutil.ShortDir(t)
	const uid0 = 1_900_000_100
	withUID := func(s backend.Spec, uid int) backend.Spec {
		s.RunAsUID, s.RunAsGID = uid, uid
		return s
	}
	src := testutil.Boot(t, b, withUID(testutil.SpecIn(root, img, "src", testutil.SpecOptions{}), uid0))
	checkConfined(t, src, uid0)
	c := testutil.Agent(t, b, src)
	testutil.Run(t, c, "echo state-1 > /run/marker; echo disk-1 > /var/marker; sync")

	snap := func(m backend.Machine, kind backend.SnapshotKind, name string) (string, backend.SnapshotResult) {
		t.Helper()
		dir := filepath.Join(root, name)
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		res, err := b.Snapshot(ctxFor(t, 2*time.Minute), m, kind, dir)
		if err != nil {
			t.Fatalf("%s snapshot of %s: %v", kind, m.ID, err)
		}
		checkPrivate(t, dir, res)
		return dir, res
	}
	restore := func(dir string, kind backend.SnapshotKind, res backend.SnapshotResult, id string, uid int) backend.Machine {
		t.Helper()
		spec := withUID(testutil.SpecIn(root, img, id, testutil.SpecOptions{}), uid)
		m, err := b.Restore(ctxFor(t, 2*time.Minute), backend.RestoreRequest{Spec: spec, SnapshotDir: dir, Kind: kind, Result: res, Resume: true})
		if err != nil {
			t.Fatalf("restore %s: %v", id, err)
		}
		testutil.StopOnCleanup(t, b, m)
		checkConfined(t, m, uid)
		return m
	}

	fdir, fres := snap(src, backend.SnapshotFull, "full")
	if fres.MemoryFormat != MemoryRaw {
		t.Fatalf("memory format %q, want raw", fres.MemoryFormat)
	}
	ddir, dres := snap(src, backend.SnapshotDisk, "disk")

	r1 := restore(fdir, backend.SnapshotFull, fres, "r1", uid0+1)
	r1c := testutil.Agent(t, b, r1)
	if out := testutil.Run(t, r1c, "cat /run/marker; echo state-2 > /run/marker"); strings.TrimSpace(out) != "state-1" {
		t.Fatalf("restored marker %q", out)
	}
	// A restored VM maps RAM privately: its snapshot is a stream one that
	// a helper QEMU (same uid, also confined) makes mappable.
	xdir, xres := snap(r1, backend.SnapshotDiff, "diff")
	if xres.MemoryFormat != MemoryRaw {
		t.Errorf("diff snapshot of a restored VM kept format %q (normalize failed; see log)", xres.MemoryFormat)
	}
	if p := testutil.ProcessesFor(filepath.Join(xdir, ".norm")); len(p) > 0 {
		t.Errorf("normalize helper still running: %v", p)
	}
	r2 := restore(xdir, backend.SnapshotDiff, xres, "r2", uid0+2)
	if out := testutil.Run(t, testutil.Agent(t, b, r2), "cat /run/marker /var/marker"); strings.Join(strings.Fields(out), " ") != "state-2 disk-1" {
		t.Fatalf("diff restore markers %q", out)
	}

	r3 := restore(ddir, backend.SnapshotDisk, dres, "r3", uid0+3)
	if out := testutil.Run(t, testutil.Agent(t, b, r3), "cat /var/marker"); strings.TrimSpace(out) != "disk-1" {
		t.Fatalf("disk restore marker %q", out)
	}
}

func TestMemoryLimit(t *testing.T) {
	if got := memoryLimit(512, backend.AccelKVM); got != (512+vmmOverheadMiB)<<20 {
		t.Errorf("kvm: %d", got)
	}
	if got := memoryLimit(512, backend.AccelTCG); got != (512+vmmOverheadMiB+tcgCacheMiB)<<20 {
		t.Errorf("tcg: %d", got)
	}
}

// TestCleanupRemovesGroupOfLaunchID: a machine whose dir is named after
// another id than its spec's (a warm pool member a VM claimed: launched
// as the member, recorded under the VM's id) has its group, named after
// the dir, removed on cleanup, as well as a group under its own id.
func TestCleanupRemovesGroupOfLaunchID(t *testing.T) {
	parent := t.TempDir()
	b := &Backend{log: slog.New(slog.DiscardHandler)}
	b.cgOnce.Do(func() {})
	b.cg = cgroup.Support{OK: true, Parent: parent}
	for _, id := range []string{"pool-ab-1", "vm1", "other"} {
		if err := os.Mkdir(filepath.Join(parent, cgroup.GroupName(id)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	m := backend.Machine{Spec: backend.Spec{ID: "vm1", Dir: filepath.Join(t.TempDir(), "vms", "pool-ab-1")}, MemoryFile: "/nonexistent/ram"}
	b.cleanup(m)
	for id, want := range map[string]bool{"pool-ab-1": false, "vm1": false, "other": true} {
		_, err := os.Stat(filepath.Join(parent, cgroup.GroupName(id)))
		if (err == nil) != want {
			t.Errorf("group of %s exists = %v, want %v", id, err == nil, want)
		}
	}
}

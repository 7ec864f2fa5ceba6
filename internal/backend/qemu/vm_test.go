package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestQEMUMemoryMapping checks the QEMU-specific memory handling on a real
// VM: shared RAM file under /dev/shm, sparse raw snapshots (twice in a row
// from the paused state), private CoW restores that never touch the
// snapshot, RAM-in-stream snapshots of restored VMs (even before they ever
// ran), and cleanup of the RAM file.
func TestQEMUMemoryMapping(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{Logger: testLogger()})
	root := testutil.ShortDir(t)
	spec := testutil.SpecIn(root, img, "src", testutil.SpecOptions{})
	m := testutil.Boot(t, b, spec)

	if !m.MemoryShared || !strings.HasPrefix(m.MemoryFile, "/dev/shm/smolvm-") {
		t.Fatalf("memory file %q shared=%v", m.MemoryFile, m.MemoryShared)
	}
	argv, ok := processCmdline(m)
	if !ok {
		t.Fatal("process not found")
	}
	joined := strings.Join(argv, " ")
	if !strings.Contains(joined, "tsc_early_khz=") || !strings.Contains(joined, "-accel tcg") {
		t.Errorf("argv lacks TCG settings: %s", joined)
	}
	c := testutil.Agent(t, b, m)
	testutil.Run(t, c, "echo state-1 > /run/marker")

	if err := b.ExposePort(ctxFor(t, time.Minute), m, backend.PortForward{HostPort: 1, GuestPort: 1}); !errors.Is(err, backend.ErrUnsupported) {
		t.Errorf("expose port without network: %v, want ErrUnsupported", err)
	}

	// Two snapshots in a row: the second starts from "postmigrate".
	var snaps []string
	var results []backend.SnapshotResult
	for i := range 2 {
		dir := filepath.Join(root, "snap"+string(rune('a'+i)))
		os.Mkdir(dir, 0o755)
		t0 := time.Now()
		res, err := b.Snapshot(ctxFor(t, time.Minute), m, backend.SnapshotFull, dir)
		if err != nil {
			t.Fatalf("snapshot %d: %v", i, err)
		}
		t.Logf("snapshot %d: %v", i, time.Since(t0))
		if res.MemoryFormat != MemoryRaw {
			t.Fatalf("memory format %q, want raw", res.MemoryFormat)
		}
		mem := filepath.Join(dir, MemoryFile)
		st, _ := os.Stat(mem)
		if st.Size() != int64(spec.MemoryMiB)<<20 || allocatedBytes(mem) >= st.Size()/2 {
			t.Errorf("memory.raw: size %d, allocated %d; want full size, sparse", st.Size(), allocatedBytes(mem))
		}
		snaps, results = append(snaps, dir), append(results, res)
	}
	before := fileSum(t, filepath.Join(snaps[0], MemoryFile))

	// Restore paused; the restored VM maps the snapshot privately.
	rspec := testutil.SpecIn(root, img, "r1", testutil.SpecOptions{})
	t0 := time.Now()
	r, err := b.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: rspec, SnapshotDir: snaps[0], Kind: backend.SnapshotFull, Result: results[0]})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restore (paused): %v", time.Since(t0))
	testutil.StopOnCleanup(t, b, r)
	if r.MemoryShared || r.MemoryFile != filepath.Join(snaps[0], MemoryFile) {
		t.Errorf("restored memory %q shared=%v; want private map of the snapshot", r.MemoryFile, r.MemoryShared)
	}
	if st, _ := b.Status(ctxFor(t, time.Minute), r); st != backend.StatusPaused {
		t.Errorf("restored status %s, want paused", st)
	}
	// Snapshot a restored VM that never ran. Its RAM is a private mapping,
	// so it goes through the stream and a helper QEMU: the result is raw
	// (mappable) again, and nothing of the helper is left.
	sdir := filepath.Join(root, "snapr")
	os.Mkdir(sdir, 0o755)
	res, err := b.Snapshot(ctxFor(t, time.Minute), r, backend.SnapshotFull, sdir)
	if err != nil {
		t.Fatalf("snapshot of a restored VM: %v", err)
	}
	if res.MemoryFormat != MemoryRaw {
		t.Errorf("memory format %q, want raw", res.MemoryFormat)
	}
	if ents, _ := os.ReadDir(sdir); len(ents) != len(res.Artifacts) {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("snapshot dir holds %v, want only the %d artifacts", names, len(res.Artifacts))
	}
	if p := testutil.ProcessesFor(sdir); len(p) > 0 {
		t.Errorf("helper QEMU still running: %v", p)
	}
	// The stream path itself (what the helper restores from).
	stdir := filepath.Join(root, "snaps")
	os.Mkdir(stdir, 0o755)
	sres, err := b.snapshot(ctxFor(t, time.Minute), r, backend.SnapshotFull, stdir)
	if err != nil || sres.MemoryFormat != MemoryStream {
		t.Fatalf("stream snapshot of a restored VM: %v, format %q", err, sres.MemoryFormat)
	}
	// When the helper cannot start (here: its RunDir cannot be created),
	// the stream snapshot is kept intact and nothing else is left.
	badM := r
	badM.RunDir = "/proc/no-such-dir/vm"
	kept, err := b.normalize(ctxFor(t, time.Minute), badM, backend.SnapshotFull, stdir, sres)
	if err != nil || kept.MemoryFormat != MemoryStream {
		t.Errorf("normalize with a failing helper: %v, format %q; want the stream snapshot back", err, kept.MemoryFormat)
	}
	if ents, _ := os.ReadDir(stdir); len(ents) != len(sres.Artifacts) {
		t.Errorf("after a failed normalize the dir holds %d entries, want the %d stream artifacts", len(ents), len(sres.Artifacts))
	}
	if err := b.Resume(ctxFor(t, time.Minute), r); err != nil {
		t.Fatal(err)
	}
	rc := testutil.Agent(t, b, r)
	if out := testutil.Run(t, rc, "cat /run/marker; echo changed > /run/marker"); strings.TrimSpace(out) != "state-1" {
		t.Errorf("restored marker %q", out)
	}
	// Writes went to the private mapping, not the snapshot.
	if err := b.Stop(ctxFor(t, time.Minute), r); err != nil {
		t.Fatal(err)
	}
	if fileSum(t, filepath.Join(snaps[0], MemoryFile)) != before {
		t.Error("snapshot memory image modified by the restored VM")
	}

	// The normalized snapshot of the restored VM maps privately again.
	rnspec := testutil.SpecIn(root, img, "rnorm", testutil.SpecOptions{})
	rn, err := b.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: rnspec, SnapshotDir: sdir, Kind: backend.SnapshotFull, Result: res, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if rn.MemoryShared || rn.MemoryFile != filepath.Join(sdir, MemoryFile) {
		t.Errorf("restore of the normalized snapshot: memory %q shared=%v; want a private map of it", rn.MemoryFile, rn.MemoryShared)
	}
	rnc := testutil.Agent(t, b, rn)
	if out := testutil.Run(t, rnc, "cat /run/marker"); strings.TrimSpace(out) != "state-1" {
		t.Errorf("normalized-restored marker %q", out)
	}
	rnc.Close()
	if err := b.Stop(ctxFor(t, time.Minute), rn); err != nil {
		t.Fatal(err)
	}

	// Restore the stream snapshot: RAM is loaded into a fresh shared file.
	r2spec := testutil.SpecIn(root, img, "r2", testutil.SpecOptions{})
	r2, err := b.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: r2spec, SnapshotDir: stdir, Kind: backend.SnapshotFull, Result: sres, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	testutil.StopOnCleanup(t, b, r2)
	if !r2.MemoryShared || !strings.HasPrefix(r2.MemoryFile, "/dev/shm/") {
		t.Errorf("stream restore memory %q shared=%v", r2.MemoryFile, r2.MemoryShared)
	}
	r2c := testutil.Agent(t, b, r2)
	if out := testutil.Run(t, r2c, "cat /run/marker"); strings.TrimSpace(out) != "state-1" {
		t.Errorf("stream-restored marker %q", out)
	}
	// A diff snapshot of a restored VM (chain: overlay -> snapshot disk ->
	// nothing) is rebased onto the base image and restores.
	testutil.Run(t, r2c, "echo r2-disk > /var/r2-marker && sync")
	ddir := filepath.Join(root, "snapd")
	os.Mkdir(ddir, 0o755)
	dres, err := b.Snapshot(ctxFor(t, time.Minute), r2, backend.SnapshotDiff, ddir)
	if err != nil {
		t.Fatalf("diff snapshot of a restored VM: %v", err)
	}
	ii, err := b.info(ctxFor(t, time.Minute), filepath.Join(ddir, DiskFile), "qcow2")
	if err != nil || ii.backingPath() != img.Rootfs || dres.BaseImage != img.Rootfs {
		t.Fatalf("diff disk backing %q (base image %q), want %s: %v", ii.backingPath(), dres.BaseImage, img.Rootfs, err)
	}
	r3spec := testutil.SpecIn(root, img, "r3", testutil.SpecOptions{})
	r3, err := b.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: r3spec, SnapshotDir: ddir, Kind: backend.SnapshotDiff, Result: dres, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	testutil.StopOnCleanup(t, b, r3)
	r3c := testutil.Agent(t, b, r3)
	if out := testutil.Run(t, r3c, "cat /run/marker /var/r2-marker"); strings.Join(strings.Fields(out), " ") != "state-1 r2-disk" {
		t.Errorf("diff restore of a restored VM: %q", out)
	}
	r3c.Close()
	if err := b.Stop(ctxFor(t, time.Minute), r3); err != nil {
		t.Fatal(err)
	}
	if err := b.Resume(ctxFor(t, time.Minute), r2); err != nil {
		t.Fatal(err)
	}

	// A mismatched memory size is refused before QEMU starts.
	bad := testutil.SpecIn(root, img, "bad", testutil.SpecOptions{MemoryMiB: 512})
	if _, err := b.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: bad, SnapshotDir: snaps[1], Kind: backend.SnapshotFull, Result: results[1]}); err == nil || !strings.Contains(err.Error(), "MiB") {
		t.Errorf("restore with another memory size: %v", err)
	}

	// A migration left running by a snapshot whose process was killed
	// (QEMU carries on without its client): Resume ends it, so that its
	// completion does not stop the VM again right after the cont, and the
	// next snapshot is not refused with "a migration is in progress".
	orphanMigration(t, b, m, filepath.Join(root, "orphan1"))
	if err := b.Resume(ctxFor(t, time.Minute), m); err != nil {
		t.Fatalf("resume with an orphaned migration: %v", err)
	}
	if st := migrationStatus(t, b, m); !migrationDone(st) {
		t.Errorf("after Resume the orphaned migration is %q, want it ended", st)
	}
	if st, _ := b.Status(ctxFor(t, time.Minute), m); st != backend.StatusRunning {
		t.Errorf("after Resume the VM is %s, want running", st)
	}
	testutil.Run(t, c, "echo alive")
	orphanMigration(t, b, m, filepath.Join(root, "orphan2"))
	odir := filepath.Join(root, "snapo")
	os.Mkdir(odir, 0o755)
	if res, err := b.Snapshot(ctxFor(t, time.Minute), m, backend.SnapshotFull, odir); err != nil || res.MemoryFormat != MemoryRaw {
		t.Errorf("snapshot with an orphaned migration: %v (format %q)", err, res.MemoryFormat)
	}

	for _, mm := range []backend.Machine{r2, m} {
		if err := b.Stop(ctxFor(t, time.Minute), mm); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(mm.MemoryFile); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("RAM file %s left after stop", mm.MemoryFile)
		}
		if _, err := os.Stat(filepath.Dir(mm.MemoryFile)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("RAM dir of %s left after stop", mm.ID)
		}
	}
	if _, err := os.Stat(filepath.Join(snaps[0], MemoryFile)); err != nil {
		t.Errorf("stop removed the snapshot's memory image: %v", err)
	}
}

// orphanMigration leaves m with a migration in flight whose QMP client is
// gone, as a snapshot create that was killed mid-way does. RAM goes into
// the stream at 1 MiB/s, so the migration runs for minutes.
func orphanMigration(t *testing.T, b *Backend, m backend.Machine, path string) {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	c, err := b.dialQMP(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	steps := []func() error{
		func() error { return execQMP(ctx, c, "cont", nil, nil) }, // leaves postmigrate
		func() error { return execQMP(ctx, c, "stop", nil, nil) },
		func() error { return setMigrationCaps(ctx, c, false, false) },
		func() error {
			return execQMP(ctx, c, "migrate-set-parameters", map[string]any{"max-bandwidth": 1 << 20}, nil)
		},
		func() error { return execQMP(ctx, c, "migrate", map[string]any{"channels": fileChannel(path)}, nil) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("starting a migration: %v", err)
		}
	}
	c.Close()
	if st := migrationStatus(t, b, m); migrationDone(st) {
		t.Fatalf("the migration is %q once its client left; the test needs it in flight", st)
	}
}

func migrationStatus(t *testing.T, b *Backend, m backend.Machine) string {
	t.Helper()
	ctx := ctxFor(t, time.Minute)
	c, err := b.dialQMP(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var st migrateStatus
	if err := execQMP(ctx, c, "query-migrate", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st.Status
}

// TestQEMUKilledProcess: a VMM that dies under us reads as stopped at once
// and Stop still cleans up.
func TestQEMUKilledProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{})
	spec := testutil.Spec(t, img, "k", testutil.SpecOptions{})
	m := testutil.Boot(t, b, spec)
	if st, err := b.Status(ctxFor(t, time.Minute), m); err != nil || st != backend.StatusRunning {
		t.Fatalf("status %s %v", st, err)
	}
	syscall.Kill(m.PID, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := b.Status(ctxFor(t, time.Minute), m)
		if err == nil && st == backend.StatusStopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status after SIGKILL: %s %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := b.Resume(ctxFor(t, time.Minute), m); !errors.Is(err, backend.ErrNotRunning) {
		t.Errorf("resume of a dead VM: %v", err)
	}
	if _, err := b.Snapshot(ctxFor(t, time.Minute), m, backend.SnapshotFull, t.TempDir()); !errors.Is(err, backend.ErrNotRunning) {
		t.Errorf("snapshot of a dead VM: %v", err)
	}
	if err := b.Stop(ctxFor(t, time.Minute), m); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{qmpSocket(m.RunDir), agentSocket(m.RunDir), m.MemoryFile} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left behind", p)
		}
	}
}

// TestQEMUQ35 boots the q35 fallback machine (PCI devices), snapshots it
// and restores it: the restore must reproduce the q35 device layout.
func TestQEMUQ35(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs")
	}
	testutil.RequireQEMU(t)
	img := testutil.Image(t, "busybox")
	b := New(Options{Machine: MachineQ35, Logger: testLogger()})
	root := testutil.ShortDir(t)
	spec := testutil.SpecIn(root, img, "q", testutil.SpecOptions{Network: true})
	m := testutil.Boot(t, b, spec)
	c := testutil.Agent(t, b, m)
	testutil.Run(t, c, "echo q35 > /run/marker && grep -q ' / ext4' /proc/mounts && ip addr show eth0 | grep -q 10.0.2.15")
	dir := filepath.Join(root, "snap")
	os.Mkdir(dir, 0o755)
	res, err := b.Snapshot(ctxFor(t, time.Minute), m, backend.SnapshotFull, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(ctxFor(t, time.Minute), m); err != nil {
		t.Fatal(err)
	}
	// Restore through a microvm-configured backend: the snapshot's recorded
	// machine type wins.
	b2 := New(Options{Logger: testLogger()})
	rspec := testutil.SpecIn(root, img, "q2", testutil.SpecOptions{Network: true})
	r, err := b2.Restore(ctxFor(t, time.Minute), backend.RestoreRequest{Spec: rspec, SnapshotDir: dir, Kind: backend.SnapshotFull, Result: res, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	testutil.StopOnCleanup(t, b2, r)
	rc := testutil.Agent(t, b2, r)
	if out := testutil.Run(t, rc, "cat /run/marker"); strings.TrimSpace(out) != "q35" {
		t.Errorf("marker %q", out)
	}
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

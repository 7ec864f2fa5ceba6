package smolvm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/store"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// startWorkload leaves memory-only state in the guest: a file in tmpfs and a
// background counter process, plus a file on disk.
func startWorkload(t *testing.T, vm *smolvm.VM) {
	t.Helper()
	mustOK(t, vm, "echo in-memory > /tmp/marker; echo on-disk > /root/disk-marker; sync; "+
		"(while true; do echo tick >> /tmp/ticks; sleep 0.2; done) >/dev/null 2>&1 & echo $! > /tmp/counter.pid")
}

// checkWorkload reports what survived: tmpfs marker, counter process, disk file.
func checkWorkload(t *testing.T, vm *smolvm.VM) (tmpfs, process, disk bool) {
	t.Helper()
	res := run(t, vm, "cat /tmp/marker 2>/dev/null")
	tmpfs = res.Output() == "in-memory"
	res = run(t, vm, "kill -0 $(cat /tmp/counter.pid 2>/dev/null) 2>/dev/null && echo alive")
	if res.Output() == "alive" {
		// and it is still counting (a tick every 0.2 s; under a busy
		// host's TCG a few may be late, so up to 10 s)
		ticks := func() int {
			n, _ := strconv.Atoi(run(t, vm, "wc -l < /tmp/ticks").Output())
			return n
		}
		a := ticks()
		for deadline := time.Now().Add(10 * time.Second); !process && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
			process = ticks() > a
		}
	}
	disk = run(t, vm, "cat /root/disk-marker 2>/dev/null").Output() == "on-disk"
	return
}

// TestSnapshotTypesPreserveState snapshots one cold-booted VM three times
// (disk and diff with ResumeSource, so it runs on; full last, which
// leaves it paused) and restores each snapshot in turn into the VM's id:
// each type brings back what it holds (memory: the tmpfs file and the
// running process; the disk), the host's clock and the VM's own names.
func TestSnapshotTypesPreserveState(t *testing.T) {
	t.Parallel() // its own VMs: runs beside the other parallel VM tests, on the second core
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "src-types", Image: "busybox", NoNetwork: true})
	startWorkload(t, vm)
	srcInfo, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	snaps := map[smolvm.SnapshotType]*smolvm.SnapshotInfo{}
	for _, typ := range []smolvm.SnapshotType{smolvm.SnapshotDisk, smolvm.SnapshotDiff, smolvm.SnapshotFull} {
		// Put the guest clock an hour behind: the restore must set it
		// before the first command runs.
		mustOK(t, vm, "date -s @$(( $(date +%s) - 3600 )) >/dev/null")
		resume := typ != smolvm.SnapshotFull
		snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "s-" + string(typ), Type: typ, ResumeSource: resume})
		if err != nil {
			t.Fatalf("%s snapshot: %v", typ, err)
		}
		if st, _ := vm.Status(ctx); (st == smolvm.StatusPaused) == resume {
			t.Errorf("source after a %s snapshot (resume source %v): %s", typ, resume, st)
		}
		if snap.Type != typ || snap.VMID != vm.ID() || snap.SizeBytes <= 0 || snap.Artifacts.Disk == "" {
			t.Errorf("info: %+v", snap)
		}
		if (snap.Artifacts.Memory == "" && snap.Artifacts.State == "") != (typ == smolvm.SnapshotDisk) {
			t.Errorf("memory artifacts for %s: %+v", typ, snap.Artifacts)
		}
		if typ == smolvm.SnapshotDiff && snap.ParentImage == "" {
			t.Errorf("diff snapshot without parent image")
		}
		snaps[typ] = snap
	}
	vm.Close()
	for _, typ := range []smolvm.SnapshotType{smolvm.SnapshotFull, smolvm.SnapshotDiff, smolvm.SnapshotDisk} {
		t.Run(string(typ), func(t *testing.T) {
			snap := snaps[typ]
			if snap == nil {
				t.Fatal("no snapshot")
			}
			// The first restore replaces the paused source; the next ones
			// restore into the deleted VM.
			restored, err := m.FromSnapshot(ctx, snap.ID, smolvm.RestoreOptions{Resume: true})
			if err != nil {
				t.Fatal(err)
			}
			defer restored.Close()
			if restored.ID() != srcInfo.ID {
				t.Errorf("restored id %s, want %s", restored.ID(), srcInfo.ID)
			}
			// The first command already sees the host's clock (the restore
			// sends it without waiting; the agent applies it first).
			guest, _ := strconv.ParseInt(mustOK(t, restored, "date +%s"), 10, 64)
			if d := time.Now().Unix() - guest; d > 5 || d < -5 {
				t.Errorf("guest clock off by %ds in the first command after restore", d)
			}
			// Its own names, also when it booted from the disk alone (the
			// agent keeps them on tmpfs and puts them back on the disk
			// when the host syncs it before a disk snapshot).
			if got, want := mustOK(t, restored, "hostname; cat /etc/hostname /etc/machine-id"), srcInfo.ID+"\n"+srcInfo.ID+"\n"+srcInfo.MachineID; got != want {
				t.Errorf("%s restore: hostname, /etc/hostname, /etc/machine-id = %q, want %q", typ, got, want)
			}
			tmpfs, proc, disk := checkWorkload(t, restored)
			wantMem := typ != smolvm.SnapshotDisk
			if tmpfs != wantMem || proc != wantMem || !disk {
				t.Errorf("%s restore: tmpfs=%v process=%v disk=%v; want tmpfs=%v process=%v disk=true", typ, tmpfs, proc, disk, wantMem, wantMem)
			}
			if err := restored.Delete(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestCheckpointAndRetry is the seed page's "checkpoint and retry" example.
func TestCheckpointAndRetry(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "agent-box", Image: "busybox", NoNetwork: true})
	mustOK(t, vm, "mkdir -p /opt/app && echo 'print 42' > /opt/app/setup-done")
	snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "before-experiment"})
	if err != nil {
		t.Fatal(err)
	}
	vm.Close()

	vm, err = m.FromSnapshot(ctx, snap.ID, smolvm.RestoreOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := vm.Status(ctx); st != smolvm.StatusRunning {
		t.Errorf("restored with Resume: %s", st)
	}
	res := run(t, vm, "rm -rf /opt/app; exit 1") // the experiment fails and breaks things
	if res.OK() {
		t.Fatal("experiment should fail")
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	vm.Close()

	// Again without Force: refused.
	if _, err := m.FromSnapshot(ctx, snap.ID, smolvm.RestoreOptions{Resume: true}); !errors.Is(err, smolvm.ErrSnapshotRestored) {
		t.Fatalf("second restore without force: %v", err)
	}
	vm, err = m.FromSnapshot(ctx, snap.ID, smolvm.RestoreOptions{Resume: true, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if got := mustOK(t, vm, "cat /opt/app/setup-done"); got != "print 42" {
		t.Errorf("after rollback: %q", got)
	}
	info, _ := m.GetSnapshot(ctx, snap.ID)
	if !info.Restored || info.RestoredVMID != "agent-box" || info.RestoreCount != 2 {
		t.Errorf("snapshot info after restores: %+v", info)
	}

	// Delete is refused while the restored VM runs, and allowed once it stops.
	if err := m.DeleteSnapshot(ctx, snap.ID); !errors.Is(err, smolvm.ErrSnapshotInUse) {
		t.Fatalf("delete while running: %v", err)
	}
	mustOK(t, vm, "echo after > /root/after-restore")
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// Delete waits for the lock of each VM it detaches: while another
	// holder has it, nothing is detached or deleted.
	unlockVM, err := store.LockVM(ctx, m.DataDir(), vm.ID())
	if err != nil {
		t.Fatal(err)
	}
	lctx, cancel := context.WithTimeout(ctx, time.Second)
	err = m.DeleteSnapshot(lctx, snap.ID)
	cancel()
	unlockVM()
	if !errors.Is(err, store.ErrLocked) {
		t.Fatalf("delete while another holder has the VM's lock: %v, want store.ErrLocked", err)
	}
	if i, err := vm.Info(ctx); err != nil || i.RestoredFrom != snap.ID {
		t.Errorf("after the refused delete: restored from %q (%v), want %q", i.RestoredFrom, err, snap.ID)
	}
	if _, err := os.Stat(info.Dir); err != nil {
		t.Errorf("snapshot dir after the refused delete: %v", err)
	}
	if err := m.DeleteSnapshot(ctx, snap.ID); err != nil {
		t.Fatalf("delete after stop: %v", err)
	}
	if _, err := os.Stat(info.Dir); !os.IsNotExist(err) {
		t.Errorf("snapshot dir left: %v", err)
	}
	if _, err := m.GetSnapshot(ctx, snap.ID); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
		t.Errorf("get after delete: %v", err)
	}
	// The stopped VM that came from it keeps its data and boots.
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := mustOK(t, vm, "cat /root/after-restore /opt/app/setup-done"); got != "after\nprint 42" {
		t.Errorf("vm restored from a deleted snapshot: %q", got)
	}
}

func TestSnapshotRules(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "rules", Image: "busybox", NoNetwork: true})

	for _, id := range []string{"../x", "A", "a/b", strings.Repeat("a", 65), "-a", ".", ""} {
		if id == "" {
			continue
		}
		_, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: id})
		if !errors.Is(err, smolvm.ErrInvalidID) || !strings.Contains(err.Error(), "lowercase letters") {
			t.Errorf("id %q: %v", id, err)
		}
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{Type: "memory"}); !errors.Is(err, smolvm.ErrInvalidConfig) {
		t.Errorf("bad type: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(m.DataDir(), "snapshots")); len(ents) != 0 {
		t.Errorf("invalid snapshots wrote %v", ents)
	}
	// Generated id, string type, resume source.
	s1, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{Type: "disk", ResumeSource: true})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(s1.ID, "snap-rules-") || len(s1.ID) > 64 {
		t.Errorf("generated id %q", s1.ID)
	}
	if got := mustOK(t, vm, "echo still running"); got != "still running" {
		t.Errorf("after ResumeSource: %q", got)
	}
	s2, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{Type: "disk", ResumeSource: true})
	if err != nil || s2.ID == s1.ID {
		t.Errorf("two generated ids in one second: %v %v", s2, err)
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: s1.ID}); !errors.Is(err, smolvm.ErrSnapshotExists) {
		t.Errorf("duplicate id: %v", err)
	}
	other := boot(t, m, smolvm.Config{Name: "other", Image: "busybox", NoNetwork: true})
	if _, err := other.Snapshot(ctx, smolvm.SnapshotOptions{ID: "of-other", Type: smolvm.SnapshotDisk, ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	list, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{VMID: "rules"})
	all, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
	if len(list) != 2 || len(all) != 3 {
		t.Errorf("list by vm: %d, all: %d", len(list), len(all))
	}
	if _, err := m.FromSnapshot(ctx, "missing", smolvm.RestoreOptions{}); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
		t.Errorf("restore missing: %v", err)
	}
	if err := m.DeleteSnapshot(ctx, "missing"); !errors.Is(err, smolvm.ErrSnapshotNotFound) {
		t.Errorf("delete missing: %v", err)
	}
	// A disk snapshot of a paused VM still flushes the guest's page cache
	// first, and leaves the VM paused.
	mustOK(t, other, "echo unsynced > /root/late")
	if err := other.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Snapshot(ctx, smolvm.SnapshotOptions{ID: "paused-disk-snap", Type: smolvm.SnapshotDisk}); err != nil {
		t.Fatal(err)
	}
	if st, _ := other.Status(ctx); st != smolvm.StatusPaused {
		t.Errorf("after a disk snapshot of a paused vm: %s", st)
	}
	// A stopped VM cannot be snapshotted.
	if err := other.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Snapshot(ctx, smolvm.SnapshotOptions{}); !errors.Is(err, smolvm.ErrVMNotRunning) {
		t.Errorf("snapshot of stopped vm: %v", err)
	}
	other.Close()
	// Restored into the stopped VM it came from.
	r2, err := m.FromSnapshot(ctx, "paused-disk-snap", smolvm.RestoreOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := mustOK(t, r2, "cat /root/late"); got != "unsynced" {
		t.Errorf("disk restore lost a write made just before the snapshot: %q", got)
	}
	r2.Delete(ctx)
	r2.Close()

	// A corrupted artifact is reported, not booted; the VM is left alone.
	corrupt, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "to-corrupt", ResumeSource: true})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(corrupt.Artifacts.State, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("garbage!"), 100)
	f.Close()
	if _, err := m.FromSnapshot(ctx, "to-corrupt", smolvm.RestoreOptions{Resume: true}); !errors.Is(err, smolvm.ErrSnapshotCorrupt) ||
		!strings.Contains(err.Error(), corrupt.Artifacts.State) {
		t.Errorf("corrupt restore: %v", err)
	}
	if st, _ := vm.Status(ctx); st != smolvm.StatusRunning {
		t.Errorf("source vm after refused restore: %s", st)
	}

	// A restore that fails mid-way (a memory image that passes the quick
	// check but crashes the guest: the VMM runs, the agent never answers)
	// is rolled back: into the existing VM, its record and files come back;
	// into a deleted one, nothing of it is left. No VMM runs either way,
	// and the snapshot is not counted as restored.
	bad, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "bad-memory", ResumeSource: true})
	if err != nil {
		t.Fatal(err)
	}
	if bad.Artifacts.Memory == "" {
		t.Fatalf("snapshot without a memory file: %+v", bad.Artifacts)
	}
	corruptKeepingStat(t, bad.Artifacts.Memory)
	info, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vmDir, runDir := info.Dir, info.RunDir
	disk, err := os.Stat(filepath.Join(vmDir, "disk.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	checkRolledBack := func(when string) {
		t.Helper()
		if p := testutil.ProcessesFor(vmDir); len(p) > 0 {
			t.Errorf("%s: VMM %v left running", when, p)
		}
		if left, _ := filepath.Glob(vmDir + ".*"); len(left) > 0 {
			t.Errorf("%s: left next to the VM dir: %v", when, left)
		}
		if s, err := m.GetSnapshot(ctx, bad.ID); err != nil || s.Restored || s.RestoreCount != 0 {
			t.Errorf("%s: snapshot after the failed restore: %+v, %v", when, s, err)
		}
	}
	t0 := time.Now()
	_, err = m.FromSnapshot(ctx, bad.ID, smolvm.RestoreOptions{Resume: true})
	if err == nil || !strings.Contains(err.Error(), "restore of snapshot bad-memory failed") {
		t.Fatalf("restore of a crashing memory image into the existing vm: %v", err)
	}
	t.Logf("failed restore into the existing vm (%v): %v", time.Since(t0).Round(time.Millisecond), err)
	checkRolledBack("into the existing vm")
	if info, err := vm.Info(ctx); err != nil || info.Status != smolvm.StatusStopped ||
		!strings.Contains(info.LastError, "restore of snapshot bad-memory failed") || info.RestoredFrom != "" {
		t.Errorf("the replaced vm after the failed restore: %+v, %v", info, err)
	}
	if back, err := os.Stat(filepath.Join(vmDir, "disk.qcow2")); err != nil || !os.SameFile(disk, back) {
		t.Errorf("the replaced vm's disk did not come back: %v", err)
	}
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	_, err = m.FromSnapshot(ctx, bad.ID, smolvm.RestoreOptions{Resume: true})
	if err == nil || !strings.Contains(err.Error(), "restore of snapshot bad-memory failed") {
		t.Fatalf("restore of a crashing memory image into a deleted vm: %v", err)
	}
	checkRolledBack("into a deleted vm")
	if _, err := m.Open(ctx, vm.ID()); !errors.Is(err, smolvm.ErrVMNotFound) {
		t.Errorf("the failed restore left a record: %v", err)
	}
	for _, d := range []string{vmDir, runDir} {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the failed restore left %s: %v", d, err)
		}
	}
}

// corruptKeepingStat fills a file with int3 opcodes (0xCC) and puts its
// modification time back: the quick check (size and mtime of large
// artifacts) passes, a guest running on it crashes at once.
func corruptKeepingStat(t *testing.T, path string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := bytes.Repeat([]byte{0xCC}, 1<<20)
	for off := int64(0); off < st.Size(); off += int64(len(buf)) {
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), st.Size()-off)], off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, st.ModTime(), st.ModTime()); err != nil {
		t.Fatal(err)
	}
}

func TestDiffSnapshotNeedsBaseImage(t *testing.T) {
	// A private image cache, so renaming its base image disturbs no other test.
	ctx := testCtx(t)
	imgDir := privateImageDir(t, image.Busybox)
	img, err := image.Open(imgDir, image.Busybox)
	if err != nil {
		t.Fatal(err)
	}
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: t.TempDir(), ImageDir: imgDir, RunDir: filepath.Join(testRoot, "run"), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	defer cleanupAll(m.DataDir())
	vm := boot(t, m, smolvm.Config{Name: "diffy", Image: "busybox", NoNetwork: true})
	startWorkload(t, vm)
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "d1", Type: smolvm.SnapshotDiff, ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "f1", Type: smolvm.SnapshotFull}); err != nil {
		t.Fatal(err)
	}
	vm.Close()
	if err := os.Rename(img.Rootfs, img.Rootfs+".away"); err != nil {
		t.Fatal(err)
	}
	defer os.Rename(img.Rootfs+".away", img.Rootfs)
	_, err = m.FromSnapshot(ctx, "d1", smolvm.RestoreOptions{Resume: true})
	if !errors.Is(err, smolvm.ErrBackingImageMissing) || !strings.Contains(err.Error(), img.Rootfs) ||
		fixOf(err).Action != smolvm.FixRestoreBaseImage && fixOf(err).Action != smolvm.FixFullSnapshot {
		t.Fatalf("diff restore without base: %v (fix %+v)", err, fixOf(err))
	}
	restored, err := m.FromSnapshot(ctx, "f1", smolvm.RestoreOptions{Resume: true})
	if err != nil {
		t.Fatalf("full restore without base: %v", err)
	}
	defer restored.Close()
	if tmpfs, proc, disk := checkWorkload(t, restored); !tmpfs || !proc || !disk {
		t.Errorf("full restore: tmpfs=%v process=%v disk=%v", tmpfs, proc, disk)
	}
}

// privateImageDir makes an image cache under testRoot holding the built
// image name of the test cache, without building it again: its root file
// system hard-linked (a rename there leaves the test cache's alone), the
// kernels and initramfs dirs linked by symlink.
func privateImageDir(t *testing.T, name string) string {
	t.Helper()
	dir, err := os.MkdirTemp(testRoot, "private-images")
	if err != nil {
		t.Fatal(err)
	}
	src, err := image.Open(testImageDir, name)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"kernels", "initramfs"} {
		if err := os.Symlink(filepath.Join(testImageDir, d), filepath.Join(dir, d)); err != nil {
			t.Fatal(err)
		}
	}
	rel, err := filepath.Rel(testImageDir, src.Rootfs)
	if err != nil || strings.HasPrefix(rel, "..") {
		t.Fatalf("root file system %s outside %s", src.Rootfs, testImageDir)
	}
	rootfs := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(rootfs), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(src.Rootfs, rootfs); err != nil {
		// Another file system: a sparse copy.
		if out, err := exec.Command("cp", "--sparse=always", src.Rootfs, rootfs).CombinedOutput(); err != nil {
			t.Fatalf("copying %s: %v\n%s", src.Rootfs, err, out)
		}
	}
	man, err := os.ReadFile(filepath.Join(testImageDir, "images", name, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "images", name), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "images", name, "manifest.json"), man, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestSnapshotCreateAndRestoreKilled kills a CLI snapshot create at several
// points: nothing half-written is ever listed, and the next create cleans
// up. Then it kills CLI restores once their QEMU is up, into the existing
// VM and into a deleted one: the VM stays listed, a second restore replaces
// what the first left, and once the VM is deleted no QEMU and no file of it
// is left.
func TestSnapshotCreateAndRestoreKilled(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "killme", Image: "busybox", NoNetwork: true, MemoryMiB: 256})
	vm.Close()
	cli := smolvmBinary(t)
	for i, delay := range []time.Duration{50 * time.Millisecond, 150 * time.Millisecond, 300 * time.Millisecond} {
		id := "killed-" + strconv.Itoa(i)
		cmd := exec.Command(cli, "--data-dir", m.DataDir(), "--image-dir", testImageDir, "sandbox", "snapshot", "create", "killme", "--snapshot-id", id, "--resume-source")
		cmd.Env = append(os.Environ(), "SMOLVM_RUN_DIR="+filepath.Join(testRoot, "run"))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		snaps, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
		for _, s := range snaps {
			// Either it completed before the kill (then it is whole) or it is not listed.
			if err := m.VerifySnapshot(ctx, s.ID); err != nil {
				t.Errorf("listed snapshot %s is not whole: %v", s.ID, err)
			}
		}
	}
	vm, err := m.Open(ctx, "killme")
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	// A create killed mid-migration leaves QEMU migrating without a client;
	// Resume ends that migration, so it cannot stop the VM again later.
	if st, _ := vm.Status(ctx); st == smolvm.StatusPaused {
		if err := vm.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "after-kills", Type: smolvm.SnapshotDisk, ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	snaps, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
	ents, _ := os.ReadDir(filepath.Join(m.DataDir(), "snapshots"))
	if len(ents) != len(snaps) {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("snapshot dir holds %v but %d snapshots are listed", names, len(snaps))
	}

	if _, err := vm.Run(ctx, "echo restored-state > /run/marker"); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "for-restore", ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	info, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vmDir := info.Dir
	leftovers := func() []string {
		left, _ := filepath.Glob(vmDir + ".*")
		return left
	}
	// killRestore runs a CLI restore and kills it once the restoring QEMU
	// (the one with -incoming) is up.
	killRestore := func() {
		t.Helper()
		cmd := exec.Command(cli, "--data-dir", m.DataDir(), "--image-dir", testImageDir, "sandbox", "snapshot", "restore", "for-restore", "--force")
		cmd.Env = append(os.Environ(), "SMOLVM_RUN_DIR="+filepath.Join(testRoot, "run"))
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		defer func() { <-exited }()
		defer cmd.Process.Signal(syscall.SIGKILL)
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
			for _, pid := range testutil.ProcessesFor(vmDir) {
				if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(b), "\x00-incoming\x00") {
					return
				}
			}
			select {
			case <-exited:
				t.Fatalf("the restore ended before its QEMU was seen: %s", out.String())
			default:
			}
		}
		t.Fatal("the restoring QEMU did not appear")
	}

	// Into the existing VM: the second restore stops what the first left
	// and removes the files it had moved aside.
	vm.Close()
	killRestore()
	vm, err = m.FromSnapshot(ctx, "for-restore", smolvm.RestoreOptions{Resume: true, Force: true})
	if err != nil {
		t.Fatalf("restore after a killed restore: %v", err)
	}
	if r, err := vm.Run(ctx, "cat /run/marker"); err != nil || r.Output() != "restored-state" {
		t.Errorf("restored marker %v, %v", r, err)
	}
	if p := testutil.ProcessesFor(vmDir); len(p) != 1 {
		t.Errorf("%d QEMU processes for the VM after the second restore, want 1", len(p))
	}
	if l := leftovers(); len(l) > 0 {
		t.Errorf("left next to the VM dir: %v", l)
	}

	// Into a deleted VM: the VM is listed, with the reason, and Delete
	// stops its QEMU.
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	killRestore()
	vm, err = m.Open(ctx, "killme")
	if err != nil {
		t.Fatalf("the VM of a killed restore is not listed: %v", err)
	}
	if info, _ := vm.Info(ctx); info.Status != smolvm.StatusStopped || !strings.Contains(info.LastError, "interrupted") {
		t.Errorf("after a killed restore: status %s, last error %q", info.Status, info.LastError)
	}
	strays := func() []smolvm.Check {
		checks, err := m.Doctor(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []smolvm.Check
		for _, c := range checks {
			if c.Name == "stray vmm" {
				out = append(out, c)
			}
		}
		return out
	}
	if s := strays(); len(s) != 1 || !strings.Contains(s[0].Detail, "vm killme is stopped") || s[0].Fix.Action != smolvm.FixResolveStrayVMM || s[0].Fix.Arg(smolvm.ArgVM) != "killme" {
		t.Errorf("doctor on the VMM a killed restore left: %+v", s)
	}
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if s := strays(); len(s) != 0 {
		t.Errorf("doctor after Delete: %+v", s)
	}
	if p := testutil.ProcessesFor(vmDir); len(p) > 0 {
		t.Errorf("QEMU %v left running after Delete", p)
	}
	if _, err := os.Stat(vmDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("VM dir left after Delete: %v", err)
	}
	if l := leftovers(); len(l) > 0 {
		t.Errorf("left next to the VM dir: %v", l)
	}
}

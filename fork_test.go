package smolvm_test

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return fmt.Sprintf("%x", h.Sum(nil))
}

func TestForkClones(t *testing.T) {
	m := newManager(t)
	ctx := testCtx(t)
	vm := boot(t, m, smolvm.Config{Name: "parent", Image: "busybox"})
	mustOK(t, vm, "echo prepared > /root/prepared; echo in-ram > /tmp/ram")
	parentID := identityOf(t, vm)
	// An hour behind: each clone must get the host's clock.
	mustOK(t, vm, "date -s @$(( $(date +%s) - 3600 )) >/dev/null")
	snap, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "forkme"})
	if err != nil {
		t.Fatal(err)
	}
	sums := map[string]string{}
	for _, p := range []string{snap.Artifacts.Memory, snap.Artifacts.State, snap.Artifacts.Disk} {
		sums[p] = fileSum(t, p)
	}

	clones, err := m.Fork(ctx, "forkme", 3, smolvm.ForkOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(clones) != 3 {
		t.Fatalf("%d clones", len(clones))
	}
	// The parent booted cold: it shows the identity the SDK reports.
	checkIdentity(t, vm, parentID)
	// Each clone is told its own identity: hostname (its id), MAC,
	// machine-id, CRNG and the host's clock (the parent's was an hour
	// behind); nothing it shows names the parent.
	ids := map[string]guestIdentity{}
	for i, c := range clones {
		defer c.Close()
		if !strings.HasPrefix(c.ID(), "parent-clone-") {
			t.Errorf("clone id %q", c.ID())
		}
		id := identityOf(t, c)
		checkIdentity(t, c, id)
		if strings.Contains(id.Cmdline, "parent") {
			t.Errorf("clone %d: /proc/cmdline names the source vm: %q", i, id.Cmdline)
		}
		out := mustOK(t, c, "cat /root/prepared /tmp/ram /etc/hostname; dmesg | grep -c parent; cat /proc/sys/kernel/random/boot_id")
		lines := strings.Split(out, "\n")
		if len(lines) != 5 || strings.Join(lines[:4], " ") != "prepared in-ram "+c.ID()+" 0" {
			t.Errorf("clone %d: state, /etc/hostname, dmesg lines naming the source, boot_id: %q", i, out)
		} else {
			id.BootID = lines[4]
		}
		ids[c.ID()] = id
	}
	checkDistinct(t, ids)
	// A file written in one clone is absent in the others.
	mustOK(t, clones[0], "echo mine > /root/only-in-0")
	for _, c := range clones[1:] {
		if res := run(t, c, "test -e /root/only-in-0"); res.OK() {
			t.Errorf("clone %s sees clone 0's file", c.ID())
		}
	}
	// The snapshot's files are byte-identical after the clones ran.
	for p, sum := range sums {
		if got := fileSum(t, p); got != sum {
			t.Errorf("%s changed while clones ran", p)
		}
	}
	// A snapshot of a clone (a restored VM, whose RAM is a private mapping)
	// is a mappable memory image again: its own clones map it and share it.
	mustOK(t, clones[0], "echo second > /tmp/ram2")
	s2, err := clones[0].Snapshot(ctx, smolvm.SnapshotOptions{ID: "forkme2", ResumeSource: true})
	if err != nil {
		t.Fatal(err)
	}
	if s2.Artifacts.Memory == "" {
		t.Errorf("snapshot of a clone has no memory image: %+v", s2.Artifacts)
	}
	grand, err := m.Fork(ctx, "forkme2", 2, smolvm.ForkOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range grand {
		if out := mustOK(t, g, "cat /tmp/ram2 /root/only-in-0 /root/prepared"); out != "second\nmine\nprepared" {
			t.Errorf("clone of a clone's snapshot %s: %q", g.ID(), out)
		}
		info, err := g.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if maps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/maps", info.PID)); !strings.Contains(string(maps), s2.Artifacts.Memory) {
			t.Errorf("clone %s does not map %s", g.ID(), s2.Artifacts.Memory)
		}
		g.Delete(ctx)
		g.Close()
	}

	// A clone has no kernel loaded (a restore leaves out -kernel, which would
	// keep a copy in every QEMU): a guest reboot stops it, and Start boots
	// it cold from its own disk.
	rb := clones[2]
	rb.Run(ctx, "reboot -f") // the agent goes away mid-request: an error is expected
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		st, err := rb.Status(ctx)
		if err == nil && st == smolvm.StatusStopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("clone after a guest reboot: status %v, %v; want stopped", st, err)
		}
	}
	if err := rb.Start(ctx); err != nil {
		t.Fatalf("start after a guest reboot: %v", err)
	}
	if out := mustOK(t, rb, "cat /root/prepared; hostname"); out != "prepared\n"+rb.ID() {
		t.Errorf("clone booted cold after its reboot: %q", out)
	}

	// Clones count for the delete rule, not for restore-once.
	if err := m.DeleteSnapshot(ctx, "forkme"); !errors.Is(err, smolvm.ErrSnapshotInUse) {
		t.Errorf("delete while clones run: %v", err)
	}
	if info, _ := m.GetSnapshot(ctx, "forkme"); info.Restored {
		t.Errorf("fork marked the snapshot restored")
	}
	// Bad input fails before anything starts.
	before, _ := m.List(ctx)
	if _, err := m.Fork(ctx, "forkme", 0, smolvm.ForkOptions{}); !errors.Is(err, smolvm.ErrInvalidConfig) {
		t.Errorf("n=0: %v", err)
	}
	if _, err := m.Fork(ctx, "forkme", 65, smolvm.ForkOptions{}); !errors.Is(err, smolvm.ErrInvalidConfig) {
		t.Errorf("n=65: %v", err)
	}
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "diskonly", Type: smolvm.SnapshotDisk}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Fork(ctx, "diskonly", 2, smolvm.ForkOptions{}); !errors.Is(err, smolvm.ErrUnsupported) || !strings.Contains(err.Error(), "no memory to share") {
		t.Errorf("fork of a disk snapshot: %v", err)
	}
	if after, _ := m.List(ctx); len(after) != len(before) {
		t.Errorf("refused forks left VMs: %d -> %d", len(before), len(after))
	}
}

// Restore time must not depend on guest RAM: both a small and a large guest
// restore and answer (the figures are in smolvm bench suite).
func TestRestoreLargeAndSmallGuest(t *testing.T) {
	t.Parallel() // its own VMs: runs beside the other parallel VM tests, on the second core
	m := newManager(t)
	ctx := testCtx(t)
	for _, mem := range []int{256, 2048} {
		name := fmt.Sprintf("mem%d", mem)
		vm := boot(t, m, smolvm.Config{Name: name, Image: "busybox", MemoryMiB: mem, NoNetwork: true})
		mustOK(t, vm, "echo x > /tmp/x")
		if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: name}); err != nil {
			t.Fatal(err)
		}
		vm.Close()
		r, err := m.FromSnapshot(ctx, name, smolvm.RestoreOptions{Resume: true})
		if err != nil {
			t.Fatalf("%d MiB: %v", mem, err)
		}
		if got := mustOK(t, r, "cat /tmp/x; grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2"); !strings.HasPrefix(got, "x\n") {
			t.Errorf("%d MiB restore: %q", mem, got)
		}
		r.Delete(ctx)
		r.Close()
	}
}

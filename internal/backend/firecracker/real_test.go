package firecracker

// REAL FIRECRACKER TEST. It needs a `firecracker` binary on PATH, a working
// /dev/kvm and the busybox image built with a vmlinux (smolvm image build
// busybox, Firecracker kernel); otherwise it skips and says why. It does not
// run on the development machine (no Firecracker there; its KVM is PVM).
//
// TODO(lead): once internal/backend/backendtest exists, also run
// backendtest.Run(t, factory) from here with the same skip conditions.

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/image"
)

// realBackend returns a Backend on the real firecracker, or skips.
func realBackend(t *testing.T) *Backend {
	t.Helper()
	if _, err := exec.LookPath("firecracker"); err != nil {
		t.Skip("firecracker binary not on PATH: real Firecracker tests need it and a working /dev/kvm")
	}
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("/dev/kvm is not usable (%v): real Firecracker tests need it", err)
	}
	kvm.Close()
	b, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func realImage(t *testing.T) image.Image {
	t.Helper()
	img, err := image.Open("", image.Busybox)
	if err != nil {
		t.Skipf("busybox image not built (%v): real Firecracker tests need it", err)
	}
	if img.Vmlinux == "" {
		t.Skip("busybox image has no vmlinux: build it with the Firecracker (uncompressed) kernel")
	}
	return img
}

func realSpec(t *testing.T, img image.Image, id string) backend.Spec {
	dir := filepath.Join(t.TempDir(), id)
	return backend.Spec{
		ID: id, Dir: dir, RunDir: shortDir(t),
		Kernel: img.Vmlinux, Initrd: img.Initrd, BaseDisk: img.Rootfs,
		Disk: filepath.Join(dir, "disk.raw"), DiskFormat: "raw",
		MemoryMiB: 256, CPUs: 1, Accel: backend.AccelKVM,
		KernelArgs: img.KernelArgs,
	}
}

func connectAgent(t *testing.T, b *Backend, m backend.Machine) *agentclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cl, err := agentclient.Connect(ctx, func(ctx context.Context) (net.Conn, error) { return b.DialAgent(ctx, m) })
	if err != nil {
		t.Fatalf("agent: %v\n--- log ---\n%s", err, logTail(m.Dir))
	}
	t.Cleanup(func() { cl.Close() })
	if _, err := cl.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	return cl
}

func TestRealFirecrackerBootSnapshotRestore(t *testing.T) {
	b := realBackend(t)
	img := realImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if v, err := b.Version(ctx); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("firecracker %s", v)
	}

	spec := realSpec(t, img, "fc-real-a")
	if err := b.Prepare(ctx, spec); err != nil {
		t.Fatal(err)
	}
	m, err := b.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), m) })
	connectAgent(t, b, m).Close()

	if err := b.Pause(ctx, m); err != nil {
		t.Fatal(err)
	}
	if err := b.Resume(ctx, m); err != nil {
		t.Fatal(err)
	}
	snap := t.TempDir()
	res, err := b.Snapshot(ctx, m, backend.SnapshotFull, snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Stop(ctx, m); err != nil {
		t.Fatal(err)
	}

	rspec := realSpec(t, img, "fc-real-b")
	r, err := b.Restore(ctx, backend.RestoreRequest{Spec: rspec, SnapshotDir: snap, Kind: backend.SnapshotFull, Result: res, Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Stop(context.Background(), r) })
	if st, err := b.Status(ctx, r); err != nil || st != backend.StatusRunning {
		t.Fatalf("restored status %q, %v", st, err)
	}
	connectAgent(t, b, r)
}

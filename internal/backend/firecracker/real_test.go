package firecracker

// REAL FIRECRACKER TEST: the backend conformance suite on real Firecracker
// microVMs. It needs a `firecracker` binary on PATH and a working /dev/kvm,
// and skips without them (the development machine has no Firecracker, and
// its KVM is PVM). With them, it needs the busybox image built with an
// uncompressed vmlinux (a kernel with VIRTIO_MMIO_CMDLINE_DEVICES).

import (
	"os"
	"os/exec"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/backendtest"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// requireFirecracker skips unless a real Firecracker can run here.
func requireFirecracker(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("firecracker"); err != nil {
		t.Skip("firecracker binary not on PATH: real Firecracker tests need it and a working /dev/kvm")
	}
	kvm, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("/dev/kvm is not usable (%v): real Firecracker tests need it", err)
	}
	kvm.Close()
}

func TestConformance(t *testing.T) {
	requireFirecracker(t)
	if testing.Short() {
		t.Skip("boots VMs")
	}
	img := testutil.Image(t, "busybox")
	if img.Vmlinux == "" {
		t.Fatal("the busybox image has no vmlinux: rebuild it with the uncompressed (Firecracker) kernel")
	}
	backendtest.Run(t, func(t *testing.T) (backend.Backend, backend.Spec) {
		b, err := New(Options{})
		if err != nil {
			t.Fatal(err)
		}
		spec := testutil.BaseSpec(img, testutil.SpecOptions{Accel: backend.AccelKVM})
		spec.Kernel = img.Vmlinux
		spec.DiskFormat = "raw"
		return b, spec
	})
}

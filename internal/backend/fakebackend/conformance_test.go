package fakebackend_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/backendtest"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend"
)

// fakeKernel writes a file the fake accepts as a bzImage (the boot
// protocol magic at 0x202) and returns its path.
func fakeKernel(t *testing.T, dir string) string {
	t.Helper()
	k := make([]byte, 4096)
	copy(k[0x202:], "HdrS")
	p := filepath.Join(dir, "bzImage")
	if err := os.WriteFile(p, k, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConformance(t *testing.T) {
	backendtest.RunWith(t, func(t *testing.T) (backend.Backend, backend.Spec) {
		dir := t.TempDir()
		base := filepath.Join(dir, "rootfs.ext4")
		if err := os.WriteFile(base, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		return fakebackend.NewHost().Backend(), backend.Spec{Kernel: fakeKernel(t, dir), BaseDisk: base,
			DiskFormat: backend.DiskRaw, MemoryMiB: 256, CPUs: 1}
	}, backendtest.Options{ModelGuest: true})
}

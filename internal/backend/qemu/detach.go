package qemu

import (
	"context"
	"fmt"
	"os"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Detach makes a stopped machine's disk self-contained: the qcow2 overlay is
// flattened with its whole backing chain (e.g. a snapshot's disk it was
// restored onto), so that chain can be deleted without losing data.
func (b *Backend) Detach(ctx context.Context, m backend.Machine) error {
	if processAlive(m) {
		return fmt.Errorf("qemu: detach %s: %w (stop it first)", m.ID, backend.ErrUnsupported)
	}
	if _, err := os.Stat(m.Disk); err != nil {
		return err
	}
	tmp := m.Disk + ".detach.tmp"
	os.Remove(tmp)
	format := diskFormat(m)
	if err := checkImageFormat(format); err != nil {
		return fmt.Errorf("qemu: detach %s: %w", m.ID, err)
	}
	// Explicit formats: the source is never probed (-f), the output is qcow2 (-O).
	if err := b.qemuImg(ctx, "convert", "-f", format, "-O", "qcow2", m.Disk, tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := private(tmp); err != nil { // qemu-img creates it 0644
		os.Remove(tmp)
		return err
	}
	if err := fsutil.SyncFile(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, m.Disk); err != nil {
		os.Remove(tmp)
		return err
	}
	return fsutil.SyncDir(m.Dir)
}

// FlattenDisk implements backend.DiskFlattener: qemu-img convert of the
// snapshot disk src (qcow2, read with its backing chain) to dst (qcow2,
// without one), made private. Explicit formats, so nothing is probed; -U
// because VMs restored from the snapshot hold src open as their backing
// file (read-only: the file never changes, and the caller holds the
// snapshot's lock). dst must not exist; it is removed on error.
func (b *Backend) FlattenDisk(ctx context.Context, src, dst string) error {
	if _, err := os.Lstat(dst); err == nil {
		return fmt.Errorf("qemu: flatten disk: %s: %w", dst, os.ErrExist)
	}
	if err := b.qemuImg(ctx, "convert", "-U", "-f", "qcow2", "-O", "qcow2", src, dst); err != nil {
		os.Remove(dst)
		return fmt.Errorf("qemu: flatten disk: %w", err)
	}
	if err := private(dst); err != nil { // qemu-img creates it 0644
		os.Remove(dst)
		return err
	}
	return nil
}

// HostTSCkHz is the host TSC frequency in kHz the backend passes to microvm
// guests under TCG as tsc_early_khz (0 when unknown).
func HostTSCkHz() int { return hostTSCkHz(defaultHost.CPUInfo) }

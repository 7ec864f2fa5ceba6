package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/store"
)

// hostRecord describes this host for a snapshot of rec taken on b: what
// the backend says the VM's state depends on (backend.HostDescriber; nil
// when the backend describes nothing) and the guest's kernel and image
// digests, when the VM's image in the cache is still the one it booted.
func (m *Manager) hostRecord(ctx context.Context, b backend.Backend, rec store.VM) (*snapshot.Host, error) {
	d, ok := backend.As[backend.HostDescriber](b)
	if !ok {
		return nil, nil
	}
	bh, err := d.DescribeHost(ctx, rec.Machine.Accel)
	if err != nil {
		return nil, fmt.Errorf("describing this host for the manifest: %w", err)
	}
	h := &snapshot.Host{Host: bh}
	var cfg Config
	if json.Unmarshal(rec.Config, &cfg) != nil || cfg.Image == "" {
		return h, nil
	}
	img, err := image.Open(m.opts.ImageDir, cfg.Image)
	spec := rec.Machine.Spec
	if err != nil || img.Rootfs != spec.BaseDisk {
		return h, nil // rebuilt or removed since the VM booted: digests unknown
	}
	h.Image, h.ImageSHA256, h.KernelRelease = img.Name, img.Manifest.Rootfs.SHA256, img.Manifest.KernelRelease
	switch {
	case spec.Kernel == img.Kernel:
		h.KernelSHA256 = img.Manifest.Kernel.SHA256
	case img.Manifest.Vmlinux != nil && spec.Kernel == img.Vmlinux:
		h.KernelSHA256 = img.Manifest.Vmlinux.SHA256
	}
	return h, nil
}

// checkHost refuses to load the memory snapshot man on b when the host it
// was taken on differs from this one in a way that makes loading its state
// unsafe (backend.CompareHost): ErrHostIncompatible, saying what differs,
// with the fix to create a new VM from the image. Harmless differences
// are logged at debug. A disk snapshot (a cold boot) and a manifest
// without Host (format 1, or a backend that describes no host) pass.
func (m *Manager) checkHost(ctx context.Context, op string, man snapshot.Manifest, b backend.Backend) error {
	if man.Host == nil || man.Type == SnapshotDisk {
		return nil
	}
	d, ok := backend.As[backend.HostDescriber](b)
	if !ok {
		return nil
	}
	accel := man.Spec.Accel
	if r, ok := backend.As[backend.AccelResolver](b); ok {
		a, err := r.ResolveAccel(accel)
		if err != nil {
			return m.hostIncompatible(op, man, []string{fmt.Sprintf("accelerator %s, which this host cannot use (%v)", man.Host.Accel, err)}, err)
		}
		accel = a
	}
	cur, err := d.DescribeHost(ctx, accel)
	if err != nil {
		return fmt.Errorf("describing this host to check snapshot %s: %w", man.ID, err)
	}
	unsafe, harmless := backend.CompareHost(man.Host.Host, cur)
	if len(unsafe) > 0 {
		return m.hostIncompatible(op, man, unsafe, nil)
	}
	if len(harmless) > 0 {
		m.log.Debug("snapshot taken on a different but compatible host", "snapshot", man.ID, "differences", strings.Join(harmless, "; "))
	}
	return nil
}

// hostIncompatible is the ErrHostIncompatible error for snapshot man.
func (m *Manager) hostIncompatible(op string, man snapshot.Manifest, diffs []string, cause error) error {
	img := man.Host.Image
	if img == "" {
		var cfg Config
		if json.Unmarshal(man.VMConfig, &cfg) == nil {
			img = cfg.Image
		}
	}
	if img == "" {
		img = DefaultImage
	}
	return &Error{Op: op,
		Message: fmt.Sprintf("snapshot %s was taken on a host this one cannot load it from: it recorded %s",
			man.ID, strings.Join(diffs, "; ")),
		Fix: newFix(FixNewFromImage, ArgImage, img, ArgSnapshot, man.ID),
		Err: errors.Join(ErrHostIncompatible, cause)}
}

package smolvm

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend"
	"github.com/smolvm-go/smolvm/internal/snapshot"
)

// newTempManager is a Manager on a fresh data dir under /tmp (short: the
// run dir holds unix sockets), removed with the Manager at the test's end.
func newTempManager(t *testing.T, ctx context.Context, prefix string) *Manager {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	m, err := NewManager(ctx, Options{DataDir: filepath.Join(dir, "data"), RunDir: filepath.Join(dir, "run"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// TestHostCompatRules (fake backend, milliseconds): a new snapshot's
// manifest carries the Host the backend describes; a restore, fork or
// template start on a host that differs unsafely (accelerator, VMM major
// version, CPU vendor under KVM) is refused with ErrHostIncompatible, says
// what differs, names the fix, and changes nothing; a harmless difference
// (a patch version) restores; a format 1 manifest without Host restores.
func TestHostCompatRules(t *testing.T) {
	t.Setenv("SMOLVM_COLD_BOOT", "") // templates on for "template start" (TestMain turns them off)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := newTempManager(t, ctx, "smvhc")
	fake := fakebackend.Default
	cfg := Config{Name: "hsrc", Image: "busybox", Backend: fakebackend.Name, NoNetwork: true, MemoryMiB: 256, ColdBoot: true}
	vm, err := m.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Delete(context.Background())
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	kvm := func(vendor string) func(*backend.Host) {
		return func(h *backend.Host) {
			h.Accel, h.CPUVendor, h.CPUFlags = backend.AccelKVM, vendor, []string{"fpu", "sse2"}
		}
	}
	take := func(id string, edit func(*backend.Host)) snapshot.Manifest {
		t.Helper()
		if edit != nil {
			defer fake.SetHostInfo(edit)()
		}
		if _, err := vm.Snapshot(ctx, SnapshotOptions{ID: id, Type: SnapshotFull, ResumeSource: true}); err != nil {
			t.Fatal(err)
		}
		man, err := snapshot.ReadManifest(filepath.Join(m.snapRoot(), id))
		if err != nil {
			t.Fatal(err)
		}
		return man
	}
	man := take("h1", nil)
	if man.FormatVersion != snapshot.FormatVersion || man.Host == nil || man.Host.VMM != fakebackend.Name || man.Host.Accel != backend.AccelTCG ||
		man.Host.VMMVersion != "1.0.0" || man.Host.Image != "busybox" || man.Host.ImageSHA256 == "" || man.Host.KernelSHA256 == "" {
		t.Fatalf("manifest host = %+v (format %d)", man.Host, man.FormatVersion)
	}
	take("hk", kvm("GenuineIntel"))

	refused := []struct {
		name, snap, want string
		edit             func(*backend.Host)
	}{
		{"accelerator", "h1", "accelerator tcg, this host uses kvm", func(h *backend.Host) { h.Accel = backend.AccelKVM }},
		{"vmm major", "h1", "fake 1.0.0, this host has 2.0.0", func(h *backend.Host) { h.VMMVersion = "2.0.0" }},
		{"machine type", "h1", "machine type fake, this host uses other", func(h *backend.Host) { h.MachineType = "other" }},
		{"cpu vendor under kvm", "hk", "cpu vendor GenuineIntel, this host has AuthenticAMD", kvm("AuthenticAMD")},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			defer fake.SetHostInfo(tc.edit)()
			before, _ := m.List(ctx)
			check := func(what string, err error) {
				t.Helper()
				var e *Error
				if !errors.Is(err, ErrHostIncompatible) || !errors.As(err, &e) || e.Fix.Action != FixNewFromImage ||
					e.Fix.Arg(ArgImage) != "busybox" || !strings.Contains(err.Error(), tc.want) || ErrorCode(err) != "host_incompatible" {
					t.Fatalf("%s: %v, want ErrHostIncompatible saying %q", what, err, tc.want)
				}
			}
			_, err := m.FromSnapshot(ctx, tc.snap, RestoreOptions{Force: true})
			check("FromSnapshot", err)
			_, err = m.Fork(ctx, tc.snap, 2, ForkOptions{})
			check("Fork", err)
			after, _ := m.List(ctx)
			if len(after) != len(before) {
				t.Fatalf("vms %d before, %d after a refused restore", len(before), len(after))
			}
			if s, err := m.GetSnapshot(ctx, tc.snap); err != nil || s.RestoreCount != 0 {
				t.Fatalf("snapshot after a refused restore: %+v, %v", s, err)
			}
			if st, _ := vm.Status(ctx); st != StatusRunning {
				t.Fatalf("source vm %s after a refused restore", st)
			}
		})
	}

	t.Run("template start", func(t *testing.T) {
		// A template is keyed by what its memory image depends on of the
		// host: after a VMM major upgrade a create builds a new template
		// (never a refused restore) and the old one is stale.
		tcfg := cfg
		tcfg.Name, tcfg.ColdBoot = "ht1", false
		first, err := m.New(ctx, tcfg) // its first Start builds the template
		if err != nil {
			t.Fatal(err)
		}
		defer first.Delete(context.Background())
		if err := first.Start(ctx); err != nil {
			t.Fatal(err)
		}
		before, err := m.ListTemplates(ctx)
		if err != nil || len(before) != 1 || before[0].Stale {
			t.Fatalf("templates before the upgrade: %+v, %v", before, err)
		}
		defer fake.SetHostInfo(func(h *backend.Host) { h.VMMVersion = "3.1.0" })()
		tcfg.Name = "ht2"
		second, err := m.New(ctx, tcfg)
		if err != nil {
			t.Fatal(err)
		}
		defer second.Delete(context.Background())
		if err := second.Start(ctx); err != nil {
			t.Fatalf("Start after a VMM major upgrade: %v, want a new template built", err)
		}
		if info, err := second.Info(ctx); err != nil || info.Status != StatusRunning || info.RestoredFrom == before[0].SnapshotID {
			t.Fatalf("vm after the upgrade: %+v, %v; want running, not from the old template", info, err)
		}
		after, err := m.ListTemplates(ctx)
		if err != nil || len(after) != 2 {
			t.Fatalf("templates after the upgrade: %+v, %v; want the old (stale) and a new one", after, err)
		}
		for _, ti := range after {
			old := ti.Key == before[0].Key
			if ti.Stale != old || (old && !strings.Contains(ti.StaleReason, "made on another host")) {
				t.Errorf("template %s (old %v): stale %v %q", ti.Key[:12], old, ti.Stale, ti.StaleReason)
			}
		}
		// An old template restored directly (its key no longer matches any
		// create) is still refused by the host check.
		snap, err := m.loadSnapshot(ctx, before[0].SnapshotID, false)
		if err != nil {
			t.Fatal(err)
		}
		b, err := m.backend(fakebackend.Name)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.checkHost(ctx, "start", snap, b); !errors.Is(err, ErrHostIncompatible) {
			t.Fatalf("host check of the old template: %v, want ErrHostIncompatible", err)
		}
	})

	t.Run("patch version restores", func(t *testing.T) {
		defer fake.SetHostInfo(func(h *backend.Host) { h.VMMVersion = "1.0.7" })()
		clones, err := m.Fork(ctx, "h1", 1, ForkOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range clones {
			c.Delete(ctx)
		}
	})

	t.Run("format 1 manifest restores", func(t *testing.T) {
		// Rewrite h1 as a format 1 manifest (no Host), on disk and in the
		// database, as a snapshot taken before Host existed; the host now
		// differs in every way that would refuse a format 2 one.
		man, err := snapshot.ReadManifest(filepath.Join(m.snapRoot(), "h1"))
		if err != nil {
			t.Fatal(err)
		}
		man.FormatVersion, man.Host = 1, nil
		for i, a := range man.Artifacts { // format 1 digests are bound to the layout
			if man.Artifacts[i].SHA256, _, err = snapshot.LegacyDigest(filepath.Join(m.snapRoot(), "h1", a.Name)); err != nil {
				t.Fatal(err)
			}
		}
		if err := snapshot.WriteManifest(filepath.Join(m.snapRoot(), "h1"), man); err != nil {
			t.Fatal(err)
		}
		row, err := m.store.GetSnapshot(ctx, "h1")
		if err != nil {
			t.Fatal(err)
		}
		row.Manifest, _ = json.Marshal(man)
		if err := m.store.UpdateSnapshot(ctx, row); err != nil {
			t.Fatal(err)
		}
		defer fake.SetHostInfo(func(h *backend.Host) { h.Accel, h.VMMVersion = backend.AccelKVM, "9.0.0" })()
		clones, err := m.Fork(ctx, "h1", 1, ForkOptions{})
		if err != nil {
			t.Fatalf("fork of a format 1 snapshot: %v", err)
		}
		for _, c := range clones {
			c.Delete(ctx)
		}
	})
}

package smolvm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// An imported archive keeps its network mode and allowed domains but not
// its allowed CIDRs (127.0.0.1/32 would open this host's loopback to the
// guest) nor its port forwards.
func TestImportNarrowsNetwork(t *testing.T) {
	cfg := Config{Name: "v", Network: NetworkPolicy{Mode: NetworkAllowlist, AllowDomains: []string{"deb.debian.org"},
		AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}},
		PortForwards: []PortForward{{HostPort: 8080, GuestPort: 80}}}
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	man := snapshot.Manifest{ID: "s", VMConfig: raw, Spec: backend.Spec{Network: true,
		NetPolicy:    netpolicy.Policy{Mode: "allowlist", AllowDomains: []string{"deb.debian.org"}, AllowCIDRs: []string{"127.0.0.1/32"}},
		PortForwards: []backend.PortForward{{HostPort: 8080, GuestPort: 80}}}}
	dropped, err := narrowImportedNetwork(&man)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"allow-cidr 127.0.0.1/32", "port forward 8080:80"}; !cmp.Equal(dropped, want) {
		t.Errorf("dropped %q, want %q", dropped, want)
	}
	want := netpolicy.Policy{Mode: "allowlist", AllowDomains: []string{"deb.debian.org"}}
	if !cmp.Equal(man.Spec.NetPolicy, want) || man.Spec.PortForwards != nil || !man.Spec.Network {
		t.Errorf("spec after import: policy %+v, forwards %v, network %v", man.Spec.NetPolicy, man.Spec.PortForwards, man.Spec.Network)
	}
	var got Config
	if err := json.Unmarshal(man.VMConfig, &got); err != nil {
		t.Fatal(err)
	}
	if got.Network.Mode != NetworkAllowlist || !cmp.Equal(got.Network.AllowDomains, []string{"deb.debian.org"}) ||
		got.Network.AllowCIDRs != nil || got.PortForwards != nil {
		t.Errorf("config after import: %+v", got)
	}
}

// TestImportBaseDigestAndSpace (fake backend, milliseconds): an archive of
// a diff snapshot whose base image is at the recorded path here but with
// another digest is refused with ErrBackingImageMissing naming both
// digests; an archive the snapshot dir's filesystem has no room for is
// refused with ErrNoSpace and the disk fix; both before anything is
// written (nothing listed, nothing left); with room, the same archive
// imports.
func TestImportBaseDigestAndSpace(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := fakeFullSnapshot(t, ctx, "smvxs", "x1")
	man, err := snapshot.ReadManifest(filepath.Join(src.snapRoot(), "x1"))
	if err != nil {
		t.Fatal(err)
	}
	if man.Host == nil || man.Host.ImageSHA256 == "" || man.Spec.BaseDisk == "" {
		t.Fatalf("the fake snapshot records no image digest or base disk: %+v", man.Host)
	}
	var archive bytes.Buffer
	if err := src.ExportSnapshot(ctx, "x1", &archive); err != nil {
		t.Fatal(err)
	}
	refused := func(t *testing.T, m *Manager, a []byte, want error, naming ...string) *Error {
		t.Helper()
		_, err := m.ImportSnapshot(ctx, bytes.NewReader(a), ImportOptions{})
		var e *Error
		if !errors.Is(err, want) || !errors.As(err, &e) {
			t.Fatalf("import: %v; want %v", err, want)
		}
		for _, n := range naming {
			if !strings.Contains(err.Error(), n) {
				t.Errorf("the error does not name %q: %v", n, err)
			}
		}
		if l, _ := m.ListSnapshots(ctx, SnapshotFilter{}); len(l) != 0 {
			t.Errorf("listed after a refused import: %+v", l)
		}
		if ents, _ := os.ReadDir(m.snapRoot()); len(ents) != 0 {
			t.Errorf("left in the snapshot dir: %v", ents)
		}
		return e
	}

	t.Run("base image with another digest", func(t *testing.T) {
		other := strings.Repeat("0", 64)
		diff := testutil.RewriteArchive(t, archive.Bytes(), func(name string, data []byte) (string, []byte) {
			if name != snapshot.ManifestName {
				return name, data
			}
			var m map[string]any
			if err := json.Unmarshal(data, &m); err != nil {
				t.Fatal(err)
			}
			m["type"], m["base_image"] = "diff", man.Spec.BaseDisk
			m["result"].(map[string]any)["base_image"] = man.Spec.BaseDisk
			m["host"].(map[string]any)["image_sha256"] = other
			data, _ = json.Marshal(m)
			return name, data
		})
		e := refused(t, newTempManager(t, ctx, "smvxd"), diff, ErrBackingImageMissing, other, man.Host.ImageSHA256, man.Spec.BaseDisk)
		if e.Fix.Action != FixRestoreBaseImage {
			t.Errorf("fix %+v", e.Fix)
		}
		// The same manifest with the image's own digest passes the check,
		// which reads the digest the image cache recorded.
		dm := man
		dm.Type, dm.BaseImage, dm.Result.BaseImage = SnapshotDiff, man.Spec.BaseDisk, man.Spec.BaseDisk
		if err := src.checkBaseDigest("restore", dm); err != nil {
			t.Errorf("the image's own digest: %v", err)
		}
		h := *man.Host
		h.ImageSHA256, dm.Host = other, &h
		if err := src.checkBaseDigest("restore", dm); !errors.Is(err, ErrBackingImageMissing) {
			t.Errorf("restore with another digest: %v", err)
		}
	})

	t.Run("no space", func(t *testing.T) {
		dst := newTempManager(t, ctx, "smvxf")
		var asked string
		free := int64(1 << 20)
		dst.statfs = func(p string) (int64, error) { asked = p; return free, nil }
		e := refused(t, dst, archive.Bytes(), ErrNoSpace, "MiB free")
		if e.Fix.Action != FixFreeResources || e.Fix.Arg(ArgResource) != ResourceDisk || e.Fix.Arg(ArgPath) != asked {
			t.Errorf("fix %+v (statfs asked about %s)", e.Fix, asked)
		}
		if rel, err := filepath.Rel(dst.opts.DataDir, asked); err != nil || !filepath.IsLocal(rel) && rel != "." {
			t.Errorf("statfs asked about %s, outside the data dir %s", asked, dst.opts.DataDir)
		}
		// With room it imports.
		noDisk := withoutFakeDisk(t, archive.Bytes())
		free = importNeed(man) + spaceMargin(importNeed(man)) // exactly enough
		if _, err := dst.ImportSnapshot(ctx, bytes.NewReader(noDisk), ImportOptions{}); err != nil {
			t.Fatalf("with room: %v", err)
		}
	})

	t.Run("rule", func(t *testing.T) {
		m := newTempManager(t, ctx, "smvxr")
		m.statfs = func(string) (int64, error) { return 0, errors.New("statfs unsupported") }
		if err := m.checkSpace("x", "/", 1<<40, "x"); err != nil {
			t.Errorf("a filesystem that cannot be asked: %v", err)
		}
		m.statfs = func(string) (int64, error) { return 100<<20 + spaceMargin(100<<20) - 1, nil }
		if err := m.checkSpace("x", "/", 100<<20, "x"); !errors.Is(err, ErrNoSpace) {
			t.Errorf("one byte short: %v", err)
		}
		// A manifest's allocated size is bounded by its artifacts' sizes.
		big := snapshot.Manifest{SizeBytes: 1 << 50, Artifacts: []snapshot.Artifact{{Size: 1 << 20}, {Size: 10}}}
		if got := importNeed(big); got != 1<<20+10+2*4096 {
			t.Errorf("importNeed of a manifest claiming 1 PiB: %d", got)
		}
		big.SizeBytes = 5000
		if got := importNeed(big); got != 5000 {
			t.Errorf("importNeed: %d", got)
		}
	})
}

// startFakeVM starts a VM of the fake backend in m, deleted at the end of
// the test.
func startFakeVM(t *testing.T, ctx context.Context, m *Manager, name string) *VM {
	t.Helper()
	vm, err := m.New(ctx, Config{Name: name, Image: "busybox", Backend: fakebackend.Name, NoNetwork: true, MemoryMiB: 256, ColdBoot: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Delete(context.Background()) })
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return vm
}

// fakeFullSnapshot returns a new Manager (data dir prefix) holding a full
// snapshot id of a running fake-backend VM.
func fakeFullSnapshot(t *testing.T, ctx context.Context, prefix, id string) *Manager {
	t.Helper()
	m := newTempManager(t, ctx, prefix)
	vm := startFakeVM(t, ctx, m, id+"src")
	if _, err := vm.Snapshot(ctx, SnapshotOptions{ID: id, Type: SnapshotFull, ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	return m
}

// withoutFakeDisk drops the fake backend's disk from an archive (a tar,
// which import's qcow2 check refuses) and from its manifest.
func withoutFakeDisk(t *testing.T, archive []byte) []byte {
	return testutil.RewriteArchive(t, archive, func(name string, data []byte) (string, []byte) {
		switch name {
		case fakebackend.DiskFile:
			return name, nil
		case snapshot.ManifestName:
			var m snapshot.Manifest
			if err := json.Unmarshal(data, &m); err != nil {
				t.Fatal(err)
			}
			isDisk := func(role string) bool { return role == "disk" }
			m.Artifacts = slices.DeleteFunc(m.Artifacts, func(a snapshot.Artifact) bool { return isDisk(a.Role) })
			m.Result.Artifacts = slices.DeleteFunc(m.Result.Artifacts, func(a backend.Artifact) bool { return isDisk(a.Role) })
			data, _ = json.Marshal(m)
		}
		return name, data
	})
}

// rewriteSnapshot changes the manifest of snapshot id of m with mod, on
// disk and in the database.
func rewriteSnapshot(t *testing.T, ctx context.Context, m *Manager, id string, mod func(dir string, man *snapshot.Manifest)) {
	t.Helper()
	dir := filepath.Join(m.snapRoot(), id)
	man, err := snapshot.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	mod(dir, &man)
	if err := snapshot.WriteManifest(dir, man); err != nil {
		t.Fatal(err)
	}
	row, err := m.store.GetSnapshot(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	row.Manifest, _ = json.Marshal(man)
	if err := m.store.UpdateSnapshot(ctx, row); err != nil {
		t.Fatal(err)
	}
}

// redescribe rewrites snapshot id of m as a build writing manifest format
// would have: each artifact's digest (snapshot.DigestFormat: the extent
// digest below format 3), size and mtime of the file as it is now.
func redescribe(t *testing.T, ctx context.Context, m *Manager, id string, format int) {
	t.Helper()
	rewriteSnapshot(t, ctx, m, id, func(dir string, man *snapshot.Manifest) {
		man.FormatVersion = format
		for i, a := range man.Artifacts {
			d, size, err := snapshot.DigestFormat(filepath.Join(dir, a.Name), format)
			st, serr := os.Stat(filepath.Join(dir, a.Name))
			if err != nil || serr != nil {
				t.Fatal(err, serr)
			}
			man.Artifacts[i].SHA256, man.Artifacts[i].Size, man.Artifacts[i].MtimeNS = d, size, st.ModTime().UnixNano()
		}
	})
}

// checkUpgraded: snapshot id of m has a format 3 manifest whose digests
// are the content digests of its files, and verifies in full.
func checkUpgraded(t *testing.T, ctx context.Context, m *Manager, id string) {
	t.Helper()
	dir := filepath.Join(m.snapRoot(), id)
	man, err := snapshot.ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if man.FormatVersion != snapshot.FormatVersion {
		t.Errorf("%s has format %d, want %d", id, man.FormatVersion, snapshot.FormatVersion)
	}
	for _, a := range man.Artifacts {
		if d, _, err := snapshot.Digest(filepath.Join(dir, a.Name)); err != nil || d != a.SHA256 {
			t.Errorf("%s: digest %s (%v), manifest %s", a.Name, d, err, a.SHA256)
		}
	}
	if _, err := m.loadSnapshot(ctx, id, true); err != nil {
		t.Errorf("full verify of %s: %v", id, err)
	}
}

// TestImportLegacyFormat (fake backend, milliseconds): a format 2 snapshot
// (extent digests, as builds before format 3 wrote) still verifies and
// exports; its archive imports, checked with its own digests, and lands
// as a format 3 manifest with content digests; a changed byte fails it.
func TestImportLegacyFormat(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := fakeFullSnapshot(t, ctx, "smvlg", "l1")
	redescribe(t, ctx, src, "l1", 2)
	if _, err := src.loadSnapshot(ctx, "l1", true); err != nil {
		t.Fatalf("full verify of a format 2 snapshot: %v", err)
	}
	var archive bytes.Buffer
	if err := src.ExportSnapshot(ctx, "l1", &archive); err != nil {
		t.Fatalf("export of a format 2 snapshot: %v", err)
	}
	noDisk := withoutFakeDisk(t, archive.Bytes())
	dst := newTempManager(t, ctx, "smvlh")
	if _, err := dst.ImportSnapshot(ctx, bytes.NewReader(noDisk), ImportOptions{}); err != nil {
		t.Fatalf("import of a format 2 archive: %v", err)
	}
	checkUpgraded(t, ctx, dst, "l1")
	flipped := testutil.RewriteArchive(t, noDisk, func(name string, data []byte) (string, []byte) {
		if name != snapshot.ManifestName {
			data = bytes.Clone(data)
			data[len(data)-1] ^= 1
		}
		return name, data
	})
	if _, err := dst.ImportSnapshot(ctx, bytes.NewReader(flipped), ImportOptions{SnapshotID: "l2"}); !errors.Is(err, ErrSnapshotCorrupt) {
		t.Errorf("a changed byte in a format 2 archive: %v", err)
	}
}

// TestExportFlattenFullIsNoOp (fake backend, milliseconds): a full
// snapshot has no backing file, so a flattened export of it is the same
// archive, byte for byte, and leaves no temporary file. (The flattened
// export of a real diff snapshot is TestExportImport/flatten.)
func TestExportFlattenFullIsNoOp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := fakeFullSnapshot(t, ctx, "smvff", "f1")
	var full, flat bytes.Buffer
	if err := m.ExportSnapshot(ctx, "f1", &full); err != nil {
		t.Fatal(err)
	}
	if err := m.ExportSnapshot(ctx, "f1", &flat, ExportOptions{Flatten: true}); err != nil {
		t.Fatal(err)
	}
	if full.Len() == 0 || !bytes.Equal(flat.Bytes(), full.Bytes()) {
		t.Errorf("flattening a full snapshot changed its archive (%d bytes, flattened %d): it has no backing file, a no-op", full.Len(), flat.Len())
	}
	if left, _ := filepath.Glob(filepath.Join(m.DataDir(), ".export-*")); len(left) != 0 {
		t.Errorf("the flattened export left %v", left)
	}
}

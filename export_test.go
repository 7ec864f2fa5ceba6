package smolvm_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestExportImport: a full snapshot exported, imported into a fresh data
// dir (same image cache) and restored has its running process and tmpfs
// file back; a diff snapshot travels too (its base image is in the shared
// cache). Hostile archives built from the real export are refused with
// the right sentinel, and nothing is listed or left in the data dir.
func TestExportImport(t *testing.T) {
	t.Parallel() // its own VMs and data dirs: runs beside the other parallel VM tests
	ctx := testCtx(t)
	src := newManager(t)
	// The smallest guest memory (MinMemoryMiB): every export and import
	// below zstd-compresses or hashes the memory file, under -race too.
	vm := boot(t, src, smolvm.Config{Name: "travel", Image: "busybox", NoNetwork: true, MemoryMiB: smolvm.MinMemoryMiB})
	startWorkload(t, vm)
	// What the base image holds, read from the guest's disk: a flattened
	// import must give the same bytes with the page cache dropped.
	baseSum := run(t, vm, "md5sum /bin/busybox").Output()
	if _, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "d1", Type: smolvm.SnapshotDiff, ResumeSource: true}); err != nil {
		t.Fatal(err)
	}
	info, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: "f1", Type: smolvm.SnapshotFull})
	if err != nil {
		t.Fatal(err)
	}
	var full, diff, flat bytes.Buffer
	t0 := time.Now()
	if err := src.ExportSnapshot(ctx, "f1", &full); err != nil {
		t.Fatal(err)
	}
	exportTime := time.Since(t0)
	if err := src.ExportSnapshot(ctx, "d1", &diff); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if err := src.ExportSnapshot(ctx, "d1", &flat, smolvm.ExportOptions{Flatten: true}); err != nil {
		t.Fatal(err)
	}
	t.Logf("diff snapshot: export %d bytes; flattened %d bytes in %v", diff.Len(), flat.Len(), time.Since(t0))
	// (That a flattened export of a full snapshot is the same archive is
	// TestExportFlattenFullIsNoOp, fake backend: one real export fewer.)
	if left, _ := filepath.Glob(filepath.Join(src.DataDir(), ".export-*")); len(left) != 0 {
		t.Errorf("the flattened export left %v", left)
	}
	// A diff snapshot whose disk changed (its mtime put back, so only a
	// hash notices) fails a flattened export as it fails any other.
	corruptKeepingStat(t, filepath.Join(src.DataDir(), "snapshots", "d1", "disk.qcow2"))
	if err := src.ExportSnapshot(ctx, "d1", io.Discard, smolvm.ExportOptions{Flatten: true}); !errors.Is(err, smolvm.ErrSnapshotCorrupt) {
		t.Errorf("flattened export of a changed disk: %v", err)
	}
	// The source VM stays paused after the full snapshot: delete it (its
	// snapshots stay), or its QEMU would outlive the test.
	if err := vm.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	src.Close()
	vm.Close()

	dst := newManager(t)
	t0 = time.Now()
	got, err := dst.ImportSnapshot(ctx, bytes.NewReader(full.Bytes()), smolvm.ImportOptions{SnapshotID: "moved"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("full snapshot: %d bytes allocated, export %d bytes in %v, import in %v", info.SizeBytes, full.Len(), exportTime, time.Since(t0))
	if got.ID != "moved" || got.VMID != info.VMID || got.Type != smolvm.SnapshotFull {
		t.Fatalf("imported %+v", got)
	}
	if _, err := dst.ImportSnapshot(ctx, bytes.NewReader(full.Bytes()), smolvm.ImportOptions{SnapshotID: "moved"}); !errors.Is(err, smolvm.ErrSnapshotExists) {
		t.Fatalf("second import under the same id: %v", err)
	}
	if err := dst.VerifySnapshot(ctx, "moved"); err != nil {
		t.Fatal(err)
	}
	restored, err := dst.FromSnapshot(ctx, "moved", smolvm.RestoreOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	if tmpfs, proc, disk := checkWorkload(t, restored); !tmpfs || !proc || !disk {
		t.Errorf("restore of the imported snapshot: tmpfs=%v process=%v disk=%v", tmpfs, proc, disk)
	}
	restored.Delete(ctx)
	restored.Close()
	if _, err := dst.ImportSnapshot(ctx, bytes.NewReader(diff.Bytes()), smolvm.ImportOptions{}); err != nil {
		t.Fatalf("diff import with its base image present: %v", err)
	}
	if err := dst.VerifySnapshot(ctx, "d1"); err != nil {
		t.Fatal(err)
	}

	t.Run("flatten", func(t *testing.T) { flattenedImport(t, flat.Bytes(), info.VMID, baseSum) })
	t.Run("hostile", func(t *testing.T) { hostileImports(t, full.Bytes(), diff.Bytes()) })
}

// flattenedImport: the flattened archive of a diff snapshot is a full
// snapshot that names no base image (manifest, backend result, spec);
// imported into a fresh data dir its disk has no backing file, and its
// restore has the workload back and reads the base image's files from
// the flattened disk (page cache dropped). A memory restore needs no
// kernel or root filesystem on the host; the spec still names the
// kernel, which a cold boot of the restored VM would use.
func flattenedImport(t *testing.T, archive []byte, vmID, baseSum string) {
	ctx := testCtx(t)
	ar, err := snapshot.OpenArchive(bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	man := ar.Manifest()
	ar.Close()
	if man.Type != smolvm.SnapshotFull || man.BaseImage != "" || man.Result.BaseImage != "" || man.Spec.BaseDisk != "" {
		t.Fatalf("flattened manifest: type %s, base image %q / %q, base disk %q", man.Type, man.BaseImage, man.Result.BaseImage, man.Spec.BaseDisk)
	}
	dst := newManager(t)
	got, err := dst.ImportSnapshot(ctx, bytes.NewReader(archive), smolvm.ImportOptions{SnapshotID: "flat"})
	if err != nil {
		t.Fatal(err)
	}
	if got.Type != smolvm.SnapshotFull || got.VMID != vmID {
		t.Fatalf("imported %+v", got)
	}
	disk := filepath.Join(dst.DataDir(), "snapshots", "flat", "disk.qcow2")
	if back, err := snapshot.CheckQcow2(disk, ""); err != nil || back != "" {
		t.Fatalf("the imported disk has backing file %q (%v)", back, err)
	}
	vm, err := dst.FromSnapshot(ctx, "flat", smolvm.RestoreOptions{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { vm.Delete(ctx); vm.Close() }()
	if tmpfs, proc, disk := checkWorkload(t, vm); !tmpfs || !proc || !disk {
		t.Errorf("restore of the flattened snapshot: tmpfs=%v process=%v disk=%v", tmpfs, proc, disk)
	}
	if sum := run(t, vm, "sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /bin/busybox").Output(); sum != baseSum || sum == "" {
		t.Errorf("a base image file read from the flattened disk: %q, want %q", sum, baseSum)
	}
}

func rewriteManifest(t *testing.T, archive []byte, mod func(m map[string]any)) []byte {
	return testutil.RewriteArchive(t, archive, func(name string, data []byte) (string, []byte) {
		if name != "manifest.json" {
			return name, data
		}
		var m map[string]any
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
		mod(m)
		data, _ = json.Marshal(m)
		return name, data
	})
}

// withForeignBacking rewrites the disk's qcow2 header to name backing as
// its backing file, and the manifest's digest to match.
func withForeignBacking(t *testing.T, archive []byte, backing string) []byte {
	var digest string
	out := testutil.RewriteArchive(t, archive, func(name string, data []byte) (string, []byte) {
		if name != "disk.qcow2" {
			return name, data
		}
		data = bytes.Clone(data)
		p := data[8:] // first extent: offset, length, bytes from offset 0
		if binary.BigEndian.Uint64(p) != 0 || binary.BigEndian.Uint64(p[8:]) < 4096 {
			t.Fatal("the disk's first extent does not hold its header")
		}
		hdr := p[16:]
		const at = 3072
		binary.BigEndian.PutUint64(hdr[8:], at)
		binary.BigEndian.PutUint32(hdr[16:], uint32(len(backing)))
		copy(hdr[at:], backing)
		digest = packedDigest(t, data)
		return name, data
	})
	return rewriteManifest(t, out, func(m map[string]any) {
		for _, a := range m["artifacts"].([]any) {
			if a := a.(map[string]any); a["name"] == "disk.qcow2" {
				a["sha256"] = digest
			}
		}
	})
}

// packedDigest is the snapshot digest (snapshot.Digest) of a packed
// artifact entry of an export archive (apparent size, then offset, length
// and bytes per data extent): the file it unpacks to, hashed.
func packedDigest(t *testing.T, packed []byte) string {
	f, err := os.CreateTemp(t.TempDir(), "packed")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for p := packed[8:]; len(p) >= 16; {
		off, n := binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:16])
		if _, err := f.WriteAt(p[16:16+n], int64(off)); err != nil {
			t.Fatal(err)
		}
		p = p[16+n:]
	}
	if err := f.Truncate(int64(binary.BigEndian.Uint64(packed))); err != nil {
		t.Fatal(err)
	}
	sum, _, err := snapshot.Digest(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

func hostileImports(t *testing.T, full, diff []byte) {
	// One byte of state.bin changed: it comes before memory.raw in the
	// archive, so the import fails there. (Changing memory.raw too, as this
	// did, cost a second encoding of its 60 MB, 4 s under -race, and the
	// import never read it.)
	flipped := testutil.RewriteArchive(t, full, func(name string, data []byte) (string, []byte) {
		if name == "state.bin" {
			data = bytes.Clone(data)
			data[len(data)-1] ^= 1
		}
		return name, data
	})
	cases := []struct {
		name    string
		archive []byte
		want    error
		naming  string
	}{
		{"manifest names ../x", rewriteManifest(t, full, func(m map[string]any) {
			m["artifacts"].([]any)[0].(map[string]any)["name"] = "../x"
			m["result"].(map[string]any)["artifacts"].([]any)[0].(map[string]any)["name"] = "../x"
		}), smolvm.ErrSnapshotCorrupt, "../x"},
		{"wrong digest", flipped, smolvm.ErrSnapshotCorrupt, "checksum"},
		{"foreign backing file", withForeignBacking(t, full, "/etc/passwd"), smolvm.ErrSnapshotCorrupt, "/etc/passwd"},
		{"base image outside the image cache", rewriteManifest(t, withForeignBacking(t, diff, "/etc/passwd"), func(m map[string]any) {
			m["base_image"] = "/etc/passwd"
			m["result"].(map[string]any)["base_image"] = "/etc/passwd"
		}), smolvm.ErrSnapshotCorrupt, "outside this host's image cache"},
		{"kernel outside the image cache", rewriteManifest(t, full, func(m map[string]any) {
			m["spec"].(map[string]any)["kernel"] = "/etc/shadow"
		}), smolvm.ErrSnapshotCorrupt, "/etc/shadow"},
		{"unknown format version", rewriteManifest(t, full, func(m map[string]any) { m["format_version"] = 99 }), smolvm.ErrUnsupported, "format 99"},
		{"truncated", full[:len(full)*2/3], smolvm.ErrSnapshotCorrupt, "truncated"},
		{"diff without its base image", rewriteManifest(t, diff, func(m map[string]any) {
			m["base_image"] = "/nonexistent/rootfs.ext4"
			m["result"].(map[string]any)["base_image"] = "/nonexistent/rootfs.ext4"
		}), smolvm.ErrBackingImageMissing, "/nonexistent/rootfs.ext4"},
		{"diff whose base image here has another digest", rewriteManifest(t, diff, func(m map[string]any) {
			m["host"].(map[string]any)["image_sha256"] = strings.Repeat("0", 64)
		}), smolvm.ErrBackingImageMissing, strings.Repeat("0", 64)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := testCtx(t)
			m := newManager(t)
			_, err := m.ImportSnapshot(ctx, bytes.NewReader(c.archive), smolvm.ImportOptions{})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.naming) {
				t.Fatalf("err = %v; want %v naming %q", err, c.want, c.naming)
			}
			if l, _ := m.ListSnapshots(ctx, smolvm.SnapshotFilter{}); len(l) != 0 {
				t.Errorf("listed after a refused import: %+v", l)
			}
			if ents, _ := os.ReadDir(filepath.Join(m.DataDir(), "snapshots")); len(ents) != 0 {
				t.Errorf("left in the data dir: %v", ents)
			}
		})
	}
}

package snapshot

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/qemu"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// qcow2Header is a minimal qcow2 v3 header: backing file name (if any)
// right after the header extensions; incompat are its incompatible
// feature bits; ext is one header extension (type, data) or none.
func qcow2Header(backing string, incompat uint64, extType uint32, extData string) []byte {
	b := make([]byte, 512)
	be := binary.BigEndian
	copy(b, qcow2Magic)
	be.PutUint32(b[4:], 3)
	be.PutUint32(b[20:], 16)
	be.PutUint64(b[24:], 1<<20)
	be.PutUint64(b[72:], incompat)
	be.PutUint32(b[96:], 4)
	be.PutUint32(b[100:], 104)
	at := 104
	if extType != 0 {
		be.PutUint32(b[at:], extType)
		be.PutUint32(b[at+4:], uint32(len(extData)))
		copy(b[at+8:], extData)
		at += 8 + (len(extData)+7)&^7
	}
	at += 8 // end extension (zeros)
	if backing != "" {
		be.PutUint64(b[8:], uint64(at))
		be.PutUint32(b[16:], uint32(len(backing)))
		copy(b[at:], backing)
	}
	return b
}

// testSnapshot writes a qemu snapshot dir (a small state, a sparse 8 MiB
// memory image with two data extents, a qcow2 disk) and its manifest.
func testSnapshot(t testing.TB, disk []byte) (string, Manifest) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, qemu.StateFile), []byte("device state"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, qemu.MemoryFile), os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(bytes.Repeat([]byte("ram!"), 4096), 1<<20)
	f.WriteAt(bytes.Repeat([]byte("more"), 1024), 5<<20)
	f.Truncate(8 << 20)
	f.Close()
	if err := os.WriteFile(filepath.Join(dir, qemu.DiskFile), disk, 0o600); err != nil {
		t.Fatal(err)
	}
	res := []backend.Artifact{{Role: "state", Name: qemu.StateFile}, {Role: "memory", Name: qemu.MemoryFile}, {Role: "disk", Name: qemu.DiskFile}}
	arts, size, err := Describe(dir, res)
	if err != nil {
		t.Fatal(err)
	}
	m := testManifest("snap1", arts)
	m.SizeBytes = size
	return dir, m
}

func export(t testing.TB, dir string, m Manifest) []byte {
	var buf bytes.Buffer
	if err := WriteArchive(&buf, dir, m); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func rewrite(t testing.TB, archive []byte, fn func(name string, data []byte) (string, []byte)) []byte {
	return testutil.RewriteArchive(t, archive, fn)
}

// rewriteManifest changes the archive's manifest with mod.
func rewriteManifest(t testing.TB, archive []byte, mod func(*Manifest)) []byte {
	return rewrite(t, archive, func(name string, data []byte) (string, []byte) {
		if name != ManifestName {
			return name, data
		}
		var m Manifest
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
		mod(&m)
		data, _ = json.Marshal(m)
		return name, data
	})
}

func importTo(archive []byte, dir string) error {
	ar, err := OpenArchive(bytes.NewReader(archive))
	if err != nil {
		return err
	}
	defer ar.Close()
	return ar.Extract(dir)
}

// TestArchiveRoundTrip: an exported snapshot extracts to files with the
// same digests (so the same data and the same holes), and the archive of
// a mostly empty memory image is small.
func TestArchiveRoundTrip(t *testing.T) {
	dir, m := testSnapshot(t, qcow2Header("", 0, 0, ""))
	archive := export(t, dir, m)
	if len(archive) > 64<<10 {
		t.Errorf("archive of an 8 MiB sparse snapshot is %d bytes", len(archive))
	}
	out := t.TempDir()
	if err := importTo(archive, out); err != nil {
		t.Fatal(err)
	}
	for _, a := range m.Artifacts {
		sum, size, err := Digest(filepath.Join(out, a.Name))
		if err != nil || sum != a.SHA256 || size != a.Size {
			t.Errorf("%s: digest %s size %d err %v; want %s %d", a.Name, sum, size, err, a.SHA256, a.Size)
		}
		if st, _ := os.Stat(filepath.Join(out, a.Name)); st.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v", a.Name, st.Mode())
		}
	}
	if alloc, _ := Allocated(out); alloc > 1<<20 {
		t.Errorf("extracted snapshot allocates %d bytes: holes were filled", alloc)
	}
	if err := Verify(out, m, true); err != nil {
		t.Error(err)
	}
}

// legacySnapshot is testSnapshot described as format 2 (extent digests).
func legacySnapshot(t testing.TB) (string, Manifest) {
	dir, m := testSnapshot(t, qcow2Header("", 0, 0, ""))
	m.FormatVersion = 2
	for i, a := range m.Artifacts {
		d, _, err := LegacyDigest(filepath.Join(dir, a.Name))
		if err != nil {
			t.Fatal(err)
		}
		m.Artifacts[i].SHA256 = d
	}
	return dir, m
}

// TestArchiveLegacyFormat: a format 2 snapshot (extent digests, as older
// builds wrote) still exports and imports, checked with its own digest;
// a changed byte fails it, and so do content digests under format 2.
func TestArchiveLegacyFormat(t *testing.T) {
	dir, m := legacySnapshot(t)
	archive := export(t, dir, m)
	out := t.TempDir()
	if err := importTo(archive, out); err != nil {
		t.Fatal(err)
	}
	if err := Verify(out, m, true); err != nil {
		t.Error(err)
	}
	flipped := rewrite(t, archive, func(name string, data []byte) (string, []byte) {
		if name == "memory.raw" {
			data = bytes.Clone(data)
			data[len(data)-1] ^= 1
		}
		return name, data
	})
	if err := importTo(flipped, t.TempDir()); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a changed byte in a format 2 archive: %v", err)
	}
	_, m3 := testSnapshot(t, qcow2Header("", 0, 0, ""))
	mixed := rewriteManifest(t, archive, func(m *Manifest) { m.Artifacts = m3.Artifacts })
	if err := importTo(mixed, t.TempDir()); !errors.Is(err, ErrCorrupt) {
		t.Errorf("content digests in a format 2 archive: %v", err)
	}
	// And a format 3 archive's digests under format 2 fail the same way.
	dir3, m3 := testSnapshot(t, qcow2Header("", 0, 0, ""))
	relabeled := rewriteManifest(t, export(t, dir3, m3), func(m *Manifest) { m.FormatVersion = 2 })
	if err := importTo(relabeled, t.TempDir()); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a format 3 archive relabeled format 2: %v", err)
	}
}

// TestArchiveHostile: each hostile archive is refused with the right
// sentinel and nothing outside the extraction dir is written.
func TestArchiveHostile(t *testing.T) {
	dir, m := testSnapshot(t, qcow2Header("", 0, 0, ""))
	good := export(t, dir, m)
	flip := func(target string) []byte {
		return rewrite(t, good, func(name string, data []byte) (string, []byte) {
			if name == target {
				data = bytes.Clone(data)
				data[len(data)-1] ^= 1
			}
			return name, data
		})
	}
	cases := []struct {
		name    string
		archive []byte
		want    error
	}{
		{"manifest names ../x", rewriteManifest(t, good, func(m *Manifest) {
			m.Artifacts[0].Name, m.Result.Artifacts[0].Name = "../x", "../x"
		}), ErrCorrupt},
		{"entry named ../x", rewrite(t, good, func(name string, data []byte) (string, []byte) {
			if name == qemu.StateFile {
				name = "../x"
			}
			return name, data
		}), ErrCorrupt},
		{"wrong digest", flip(qemu.MemoryFile), ErrCorrupt},
		{"unknown format version", rewriteManifest(t, good, func(m *Manifest) { m.FormatVersion = FormatVersion + 1 }), ErrNewer},
		{"format version 0", rewriteManifest(t, good, func(m *Manifest) { m.FormatVersion = 0 }), ErrCorrupt},
		{"truncated", good[:len(good)/2], ErrCorrupt},
		{"truncated in an artifact", good[:len(good)-len(good)/8], ErrCorrupt},
		{"empty", nil, ErrCorrupt},
		{"extra entry", rewrite(t, good, func(name string, data []byte) (string, []byte) {
			if name == qemu.DiskFile {
				name = qemu.ConfigFile
			}
			return name, data
		}), ErrCorrupt},
		{"missing artifact", rewrite(t, good, func(name string, data []byte) (string, []byte) {
			if name == qemu.DiskFile {
				return name, nil
			}
			return name, data
		}), ErrCorrupt},
		{"artifact larger than the manifest", rewriteManifest(t, good, func(m *Manifest) { m.Artifacts[1].Size = 4 << 20 }), ErrCorrupt},
		{"manifest not first", rewrite(t, good, func(name string, data []byte) (string, []byte) {
			if name == ManifestName {
				return "other.json", data
			}
			return name, data
		}), ErrCorrupt},
		{"manifest too large", rewrite(t, good, func(name string, data []byte) (string, []byte) {
			if name == ManifestName {
				return name, append(bytes.Clone(data), bytes.Repeat([]byte(" "), MaxManifestSize)...)
			}
			return name, data
		}), ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			parent := t.TempDir()
			out := filepath.Join(parent, "snap")
			os.Mkdir(out, 0o700)
			err := importTo(c.archive, out)
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			if ents, _ := os.ReadDir(parent); len(ents) != 1 {
				t.Errorf("import wrote outside its dir: %v", ents)
			}
		})
	}
}

// TestCheckQcow2: a qcow2 may have no backing file or exactly the one
// allowed; a foreign backing file, an external data file, unknown
// incompatible features and a foreign backing format are refused.
func TestCheckQcow2(t *testing.T) {
	const base = "/img/rootfs.ext4"
	cases := []struct {
		name    string
		hdr     []byte
		allowed string
		want    error
	}{
		{"no backing", qcow2Header("", 0, 0, ""), "", nil},
		{"no backing, base allowed", qcow2Header("", 0, 0, ""), base, nil},
		{"declared backing", qcow2Header(base, 0, qcow2ExtBackFmt, "raw"), base, nil},
		{"dirty and extended l2", qcow2Header("", 1|1<<4, 0, ""), "", nil},
		{"foreign backing", qcow2Header("/etc/passwd", 0, 0, ""), base, ErrForeignBacking},
		{"backing with none allowed", qcow2Header(base, 0, qcow2ExtBackFmt, "raw"), "", ErrForeignBacking},
		{"declared backing without a format", qcow2Header(base, 0, 0, ""), base, ErrForeignBacking},
		{"relative backing", qcow2Header("../../etc/passwd", 0, 0, ""), base, ErrForeignBacking},
		{"external data file bit", qcow2Header("", 1<<2, 0, ""), "", ErrForeignBacking},
		{"external data file ext", qcow2Header("", 0, qcow2ExtDataFile, "/etc/shadow"), "", ErrForeignBacking},
		{"unknown incompat", qcow2Header("", 1<<9, 0, ""), "", ErrForeignBacking},
		{"backing format vmdk", qcow2Header(base, 0, qcow2ExtBackFmt, "vmdk"), base, ErrForeignBacking},
		{"not qcow2", []byte("raw disk data, no header"), "", ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "disk.qcow2")
			os.WriteFile(p, c.hdr, 0o600)
			_, err := CheckQcow2(p, c.allowed)
			if !errors.Is(err, c.want) || (c.want == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
		})
	}
}

// FuzzImport feeds arbitrary bytes to the archive reader: it must never
// panic, and it writes only inside its dir.
func FuzzImport(f *testing.F) {
	dir, m := testSnapshot(f, qcow2Header("", 0, 0, ""))
	good := export(f, dir, m)
	f.Add(good)
	f.Add(good[:len(good)/2])
	ldir, lm := legacySnapshot(f)
	f.Add(export(f, ldir, lm))
	f.Add(rewriteManifest(f, good, func(m *Manifest) { m.Artifacts[1].Size = 1 << 40 }))
	f.Fuzz(func(t *testing.T, data []byte) {
		parent := t.TempDir()
		out := filepath.Join(parent, "snap")
		os.Mkdir(out, 0o700)
		if err := importTo(data, out); err != nil && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNewer) {
			t.Logf("non-sentinel error: %v", err)
		}
		if ents, _ := os.ReadDir(parent); len(ents) != 1 {
			t.Fatalf("import wrote outside its dir: %v", ents)
		}
	})
}

package image

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRootfsSHA256: the digest the cache recorded is returned without
// hashing when its manifest names the file at its current size; a file
// the cache does not describe (no manifest, another size, another path)
// is hashed.
func TestRootfsSHA256(t *testing.T) {
	dir := t.TempDir()
	rdir := filepath.Join(dir, "rootfs", "busybox-0123")
	if err := os.MkdirAll(rdir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(rdir, "rootfs.ext4")
	data := []byte("a root filesystem")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(data)
	real := hex.EncodeToString(h[:])
	recorded := strings.Repeat("ab", 32) // not the file's: proves it was not hashed
	writeManifest := func(rel string, size int64) {
		t.Helper()
		b, _ := json.Marshal(rootfsManifest{FormatVersion: FormatVersion, Name: "busybox", Key: "0123",
			Rootfs: File{Path: rel, SHA256: recorded, Size: size}})
		if err := os.WriteFile(filepath.Join(rdir, manifestName), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	check := func(name, want string, wantRecorded bool) {
		t.Helper()
		sum, rec, err := RootfsSHA256(dir, path)
		if err != nil || sum != want || rec != wantRecorded {
			t.Errorf("%s: %s recorded=%v %v; want %s recorded=%v", name, sum, rec, err, want, wantRecorded)
		}
	}
	check("no manifest", real, false)
	writeManifest("rootfs/busybox-0123/rootfs.ext4", int64(len(data)))
	check("recorded", recorded, true)
	writeManifest("rootfs/busybox-0123/rootfs.ext4", 99)
	check("another size", real, false)
	writeManifest("rootfs/other-1/rootfs.ext4", int64(len(data)))
	check("another file", real, false)
	if _, _, err := RootfsSHA256(dir, filepath.Join(rdir, "missing")); err == nil {
		t.Error("a missing file has a digest")
	}
}

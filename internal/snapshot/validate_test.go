package snapshot

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/qemu"
)

// testManifest is a valid qemu manifest of snapshot id with arts.
func testManifest(id string, arts []Artifact) Manifest {
	var res backend.SnapshotResult
	for _, a := range arts {
		res.Artifacts = append(res.Artifacts, backend.Artifact{Role: a.Role, Name: a.Name})
	}
	res.MemoryFormat = "raw"
	return Manifest{FormatVersion: FormatVersion, ID: id, VMID: "vm1", Backend: "qemu", Type: backend.SnapshotFull,
		CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC), VMConfig: json.RawMessage(`{"name":"vm1"}`),
		Spec: backend.Spec{ID: "vm1", Dir: "/data/vms/vm1", RunDir: "/tmp/smolvm-0/abc", Kernel: "/img/bzImage",
			Disk: "/data/vms/vm1/disk.qcow2", DiskFormat: "qcow2", MemoryMiB: 256, CPUs: 1, Network: true,
			MAC: "52:54:00:12:34:56", PortForwards: []backend.PortForward{{HostPort: 8080, GuestPort: 80}}},
		Result: res, Artifacts: arts}
}

// testHost is a valid Host section.
func testHost() *Host {
	return &Host{Host: backend.Host{Accel: backend.AccelKVM, VMM: "qemu", VMMVersion: "10.0.2", MachineType: "microvm",
		CPUModelArg: "host", CPUVendor: "GenuineIntel", CPUModel: "Intel(R) Xeon(R)", CPUFlags: []string{"fpu", "sse4_2", "avx2"}},
		Image: "debian", ImageSHA256: sum("rootfs"), KernelRelease: "6.1.0-40-cloud-amd64", KernelSHA256: sum("kernel")}
}

// TestManifestHostFormats: a format 2 manifest with a Host and a format 1
// manifest without one (written before Host existed) both parse; the
// Host survives a round trip.
func TestManifestHostFormats(t *testing.T) {
	arts := []Artifact{{Role: "memory", Name: "memory.raw", Size: 4, SHA256: sum("m")}, {Role: "state", Name: "state.bin", Size: 4, SHA256: sum("s")}}
	m := testManifest("s1", arts)
	m.Host = testHost()
	data, _ := json.Marshal(m)
	got, err := ParseManifest(data)
	if err != nil {
		t.Fatalf("format 2 with host: %v", err)
	}
	if got.Host == nil || got.Host.CPUVendor != "GenuineIntel" || got.Host.VMMVersion != "10.0.2" || got.Host.ImageSHA256 != sum("rootfs") || !Same(got, m) {
		t.Fatalf("host did not round-trip: %+v", got.Host)
	}
	old := testManifest("s1", arts)
	old.FormatVersion = 1
	data, _ = json.Marshal(old)
	if !strings.Contains(string(data), `"format_version":1`) || strings.Contains(string(data), `"host"`) {
		t.Fatalf("not a format 1 manifest: %s", data)
	}
	if _, err := ParseManifest(data); err != nil {
		t.Fatalf("format 1 manifest refused: %v", err)
	}
}

// TestKnownArtifactsMatchQEMU: the known set is what the QEMU backend
// declared when it registered, and that is what it writes.
func TestKnownArtifactsMatchQEMU(t *testing.T) {
	q, _ := knownArtifacts("qemu")
	if q["state"] != qemu.StateFile || q["memory"] != qemu.MemoryFile || q["disk"] != qemu.DiskFile || q[qemu.RoleConfig] != qemu.ConfigFile {
		t.Fatalf("KnownArtifacts[qemu] = %v", q)
	}
}

func sum(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }

// TestManifestValidation: each hostile manifest is refused with ErrCorrupt
// (ErrNewer for a newer format), by Validate, ParseManifest and Verify,
// and no error panics.
func TestManifestValidation(t *testing.T) {
	good := []Artifact{{Role: "memory", Name: "memory.raw", Size: 4, SHA256: sum("m")}, {Role: "state", Name: "state.bin", Size: 4, SHA256: sum("s")}}
	cases := []struct {
		name string
		mod  func(*Manifest)
		want error
	}{
		{"traversal with matching digest", func(m *Manifest) {
			m.Artifacts[0].Name = "../../secret"
			m.Result.Artifacts[0].Name = "../../secret"
		}, ErrCorrupt},
		{"absolute name", func(m *Manifest) { m.Artifacts[0].Name, m.Result.Artifacts[0].Name = "/etc/shadow", "/etc/shadow" }, ErrCorrupt},
		{"subdir name", func(m *Manifest) { m.Artifacts[0].Name, m.Result.Artifacts[0].Name = "x/memory.raw", "x/memory.raw" }, ErrCorrupt},
		{"dot", func(m *Manifest) { m.Artifacts[0].Name, m.Result.Artifacts[0].Name = ".", "." }, ErrCorrupt},
		{"other role's name", func(m *Manifest) { m.Artifacts[0].Name, m.Result.Artifacts[0].Name = "state.bin", "state.bin" }, ErrCorrupt},
		{"unknown name", func(m *Manifest) { m.Artifacts[0].Name, m.Result.Artifacts[0].Name = "manifest.json", "manifest.json" }, ErrCorrupt},
		{"unknown role", func(m *Manifest) { m.Artifacts[0].Role, m.Result.Artifacts[0].Role = "meta", "meta" }, ErrCorrupt},
		{"result names an undigested file", func(m *Manifest) { m.Result.Artifacts[0].Name = "../../secret" }, ErrCorrupt},
		{"result has an extra file", func(m *Manifest) {
			m.Result.Artifacts = append(m.Result.Artifacts, backend.Artifact{Role: "disk", Name: "disk.qcow2"})
		}, ErrCorrupt},
		{"duplicate role", func(m *Manifest) {
			m.Artifacts = append(m.Artifacts, m.Artifacts[0])
			m.Result.Artifacts = append(m.Result.Artifacts, m.Result.Artifacts[0])
		}, ErrCorrupt},
		{"short sha256", func(m *Manifest) { m.Artifacts[0].SHA256 = "abc" }, ErrCorrupt},
		{"empty sha256", func(m *Manifest) { m.Artifacts[0].SHA256 = "" }, ErrCorrupt},
		{"uppercase sha256", func(m *Manifest) { m.Artifacts[0].SHA256 = strings.ToUpper(sum("m")) }, ErrCorrupt},
		{"non-hex sha256", func(m *Manifest) { m.Artifacts[0].SHA256 = strings.Repeat("g", 64) }, ErrCorrupt},
		{"negative size", func(m *Manifest) { m.Artifacts[0].Size = -1 }, ErrCorrupt},
		{"negative total size", func(m *Manifest) { m.SizeBytes = -1 }, ErrCorrupt},
		{"format_version -7", func(m *Manifest) { m.FormatVersion = -7 }, ErrCorrupt},
		{"format_version 0", func(m *Manifest) { m.FormatVersion = 0 }, ErrCorrupt},
		{"format_version newer", func(m *Manifest) { m.FormatVersion = FormatVersion + 1 }, ErrNewer},
		{"host in format 1", func(m *Manifest) { m.FormatVersion, m.Host = 1, testHost() }, ErrCorrupt},
		{"host accel", func(m *Manifest) { m.Host = testHost(); m.Host.Accel = "hvf" }, ErrCorrupt},
		{"host version", func(m *Manifest) { m.Host = testHost(); m.Host.VMMVersion = "10" }, ErrCorrupt},
		{"host long model", func(m *Manifest) { m.Host = testHost(); m.Host.CPUModel = strings.Repeat("x", 257) }, ErrCorrupt},
		{"host control char", func(m *Manifest) { m.Host = testHost(); m.Host.CPUVendor = "Intel\n" }, ErrCorrupt},
		{"host flag", func(m *Manifest) { m.Host = testHost(); m.Host.CPUFlags = []string{"sse2", "a b"} }, ErrCorrupt},
		{"host flags", func(m *Manifest) { m.Host = testHost(); m.Host.CPUFlags = make([]string, backend.MaxHostFlags+1) }, ErrCorrupt},
		{"host digest", func(m *Manifest) { m.Host = testHost(); m.Host.ImageSHA256 = "abc" }, ErrCorrupt},
		{"host image", func(m *Manifest) { m.Host = testHost(); m.Host.Image = "../x" }, ErrCorrupt},
		{"host kernel release", func(m *Manifest) { m.Host = testHost(); m.Host.KernelRelease = "6.1 x" }, ErrCorrupt},
		{"vm id traversal", func(m *Manifest) { m.VMID, m.Spec.ID = "../x", "../x" }, ErrCorrupt},
		{"snapshot id", func(m *Manifest) { m.ID = "A B" }, ErrCorrupt},
		{"backend", func(m *Manifest) { m.Backend = "vbox" }, ErrCorrupt},
		{"type", func(m *Manifest) { m.Type = "weird" }, ErrCorrupt},
		{"memory format", func(m *Manifest) { m.Result.MemoryFormat = "file:/etc" }, ErrCorrupt},
		{"relative base image", func(m *Manifest) { m.BaseImage, m.Result.BaseImage = "base.ext4", "base.ext4" }, ErrCorrupt},
		{"two base images", func(m *Manifest) { m.BaseImage = "/img/a" }, ErrCorrupt},
		{"spec port forward injection", func(m *Manifest) {
			m.Spec.PortForwards[0].HostAddr = "127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:80-cmd:touch pwned,hostfwd=tcp:127.0.0.1"
		}, ErrCorrupt},
		{"spec mac injection", func(m *Manifest) { m.Spec.MAC = "52:54:00:12:34:56,romfile=/etc/shadow" }, ErrCorrupt},
		{"spec relative kernel", func(m *Manifest) { m.Spec.Kernel = "bzImage" }, ErrCorrupt},
		{"spec of another vm", func(m *Manifest) { m.Spec.ID = "other" }, ErrCorrupt},
	}
	base := t.TempDir()
	dir := filepath.Join(base, "snapshots", "s1") // ../../secret is base/secret
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, "memory.raw"), []byte("mmmm"), 0o600)
	os.WriteFile(filepath.Join(dir, "state.bin"), []byte("ssss"), 0o600)
	secret := filepath.Join(base, "secret")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := testManifest("s1", append([]Artifact(nil), good...))
			if err := m.Validate(); err != nil {
				t.Fatalf("base manifest: %v", err)
			}
			c.mod(&m)
			err := m.Validate()
			if !errors.Is(err, c.want) {
				t.Fatalf("Validate = %v, want %v", err, c.want)
			}
			if c.want == ErrCorrupt && !strings.Contains(err.Error(), "delete it and take a new one") {
				t.Errorf("error does not say what to do: %v", err)
			}
			data, _ := json.Marshal(m)
			if _, err := ParseManifest(data); !errors.Is(err, c.want) {
				t.Errorf("ParseManifest = %v", err)
			}
			if err := Verify(dir, m, true); !errors.Is(err, c.want) {
				t.Errorf("Verify = %v", err)
			}
		})
	}
	// The traversal target exists with the digest the manifest claims:
	// still refused (by name, before any file is opened).
	if err := os.WriteFile(secret, []byte("mmmm"), 0o600); err != nil {
		t.Fatal(err)
	}
	{
		arts, _, err := Describe(filepath.Dir(secret), []backend.Artifact{{Role: "memory", Name: "secret"}})
		if err != nil {
			t.Fatal(err)
		}
		m := testManifest("s1", []Artifact{{Role: "memory", Name: "../../secret", Size: arts[0].Size, SHA256: arts[0].SHA256}})
		if err := Verify(dir, m, true); !errors.Is(err, ErrCorrupt) {
			t.Errorf("traversal with a matching digest: %v", err)
		}
	}
}

func TestParseManifestStrict(t *testing.T) {
	m := testManifest("s1", []Artifact{{Role: "state", Name: "state.bin", Size: 1, SHA256: sum("x")}})
	data, _ := json.MarshalIndent(m, "", "  ")
	got, err := ParseManifest(data)
	if err != nil || !Same(got, m) {
		t.Fatalf("round trip: %v", err)
	}
	for name, bad := range map[string]string{
		"unknown field": strings.Replace(string(data), `"id"`, `"extra": 1, "id"`, 1),
		"trailing data": string(data) + "{}",
		"not json":      "nope",
		"huge":          `{"id":"` + strings.Repeat("a", MaxManifestSize) + `"}`,
	} {
		if _, err := ParseManifest([]byte(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		}
	}
	other := m
	other.Spec.MemoryMiB = 512
	if Same(m, other) {
		t.Error("Same ignores the spec")
	}
}

// FuzzParseManifest: no input panics; what parses is valid, and survives
// a write/read round trip unchanged.
func FuzzParseManifest(f *testing.F) {
	m := testManifest("s1", []Artifact{{Role: "memory", Name: "memory.raw", Size: 4, SHA256: sum("m")}})
	data, _ := json.Marshal(m)
	f.Add(data)
	f.Add([]byte(strings.Replace(string(data), "memory.raw", "../../secret", -1)))
	f.Add([]byte(strings.Replace(string(data), sum("m"), "abc", -1)))
	f.Add([]byte(`{"format_version":-7}`))
	m.Host = testHost()
	withHost, _ := json.Marshal(m)
	f.Add(withHost)
	f.Add([]byte(strings.Replace(string(withHost), `"sse4_2"`, `"a\u0000b"`, 1)))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := ParseManifest(data)
		if err != nil {
			return
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("parsed but invalid: %v", err)
		}
		for _, a := range m.Artifacts {
			if !filepath.IsLocal(a.Name) || strings.ContainsRune(a.Name, '/') || len(a.SHA256) != 64 {
				t.Fatalf("artifact %+v passed", a)
			}
		}
		again, _ := json.Marshal(m)
		m2, err := ParseManifest(again)
		if err != nil || !Same(m, m2) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

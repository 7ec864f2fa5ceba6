package snapshot

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// MinFormatVersion is the oldest manifest format this code reads.
const MinFormatVersion = 1

// MaxManifestSize bounds a manifest file: it is read whole.
const MaxManifestSize = 1 << 20

// knownArtifacts is the file each artifact role may name in a snapshot of
// the backend called name: what the backend declared when it registered
// (backend.Registration.Artifacts). A manifest naming anything else, or a
// backend that is not registered or takes no snapshots, is refused.
func knownArtifacts(name string) (map[string]string, bool) {
	r, ok := backend.Lookup(name)
	if !ok || len(r.Artifacts) == 0 {
		return nil, false
	}
	return r.Artifacts, true
}

// corrupt is an ErrCorrupt that says what is wrong and what to do.
func corrupt(format string, a ...any) error {
	return fmt.Errorf("%w: manifest %s; the snapshot cannot be trusted: delete it and take a new one", ErrCorrupt, fmt.Sprintf(format, a...))
}

// validSHA256 reports whether s is 64 lowercase hex digits.
func validSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// checkArtifactName checks that name is a plain local file name (no
// separator, not "." or "..", filepath.IsLocal) and the one backend writes
// for role.
func checkArtifactName(backendName, role, name string) error {
	if name == "" || !filepath.IsLocal(name) || filepath.Base(name) != name || strings.ContainsAny(name, "/\\\x00") {
		return corrupt("names artifact %q (%s), which is not a plain file name in the snapshot dir", name, role)
	}
	known, _ := knownArtifacts(backendName)
	want, ok := known[role]
	if !ok {
		return corrupt("has an artifact of unknown role %q for backend %s", role, backendName)
	}
	if name != want {
		return corrupt("names the %s artifact %q; %s snapshots name it %q", role, name, backendName, want)
	}
	return nil
}

// Validate checks a manifest as data from outside: the format version in
// the supported range (newer: ErrNewer), ids, type and backend from their
// known sets, every artifact a plain file name from the backend's known set
// with a well-formed sha256 and a non-negative size, the backend's result
// naming exactly the artifacts that carry digests, the base image an
// absolute clean path, and the launch spec valid by type
// (backend.Spec.Validate). Errors wrap ErrCorrupt (or ErrNewer).
func (m Manifest) Validate() error {
	if m.FormatVersion > FormatVersion {
		return fmt.Errorf("%w: snapshot %s has format %d, this smolvm reads up to %d; upgrade smolvm to restore it",
			ErrNewer, m.ID, m.FormatVersion, FormatVersion)
	}
	if m.FormatVersion < MinFormatVersion {
		return corrupt("has format_version %d; supported are %d to %d", m.FormatVersion, MinFormatVersion, FormatVersion)
	}
	if err := backend.ValidateID(m.ID); err != nil {
		return corrupt("has an invalid snapshot id: %v", err)
	}
	if err := backend.ValidateID(m.VMID); err != nil {
		return corrupt("has an invalid vm id: %v", err)
	}
	if _, ok := knownArtifacts(m.Backend); !ok {
		return corrupt("names unknown backend %q", m.Backend)
	}
	switch m.Type {
	case backend.SnapshotFull, backend.SnapshotDiff, backend.SnapshotDisk:
	default:
		return corrupt("has unknown type %q", m.Type)
	}
	if m.SizeBytes < 0 {
		return corrupt("has a negative size %d", m.SizeBytes)
	}
	digested := map[backend.Artifact]bool{}
	roles := map[string]bool{}
	for _, a := range m.Artifacts {
		if err := checkArtifactName(m.Backend, a.Role, a.Name); err != nil {
			return err
		}
		if roles[a.Role] {
			return corrupt("lists the %s artifact twice", a.Role)
		}
		roles[a.Role] = true
		if !validSHA256(a.SHA256) {
			return corrupt("has a malformed sha256 %q for %s (want 64 hex digits)", a.SHA256, a.Name)
		}
		if a.Size < 0 {
			return corrupt("has a negative size %d for %s", a.Size, a.Name)
		}
		digested[backend.Artifact{Role: a.Role, Name: a.Name}] = true
	}
	// Restore opens the files the backend's result names: each must be one
	// whose digest was checked, and every digested one must be named.
	if len(m.Result.Artifacts) != len(digested) {
		return corrupt("lists %d artifacts with digests but the backend result names %d", len(digested), len(m.Result.Artifacts))
	}
	for _, a := range m.Result.Artifacts {
		if !digested[a] {
			return corrupt("has backend artifact %q (%s) without a digest", a.Name, a.Role)
		}
	}
	switch m.Result.MemoryFormat {
	case "", "raw", "stream":
	default:
		return corrupt("has unknown memory format %q", m.Result.MemoryFormat)
	}
	if m.Result.BaseImage != m.BaseImage {
		return corrupt("has two different base images (%q, %q)", m.BaseImage, m.Result.BaseImage)
	}
	if err := backend.ValidatePath("base image", m.BaseImage, false); err != nil {
		return corrupt("%v", err)
	}
	if m.Spec.ID != m.VMID {
		return corrupt("has spec id %q for vm %q", m.Spec.ID, m.VMID)
	}
	if err := m.Spec.Validate(); err != nil {
		return corrupt("has an invalid launch spec: %v", err)
	}
	if len(m.VMConfig) > 0 && !json.Valid(m.VMConfig) {
		return corrupt("has an invalid vm_config")
	}
	if m.Host != nil {
		if m.FormatVersion < 2 {
			return corrupt("has a host section in format %d (added in format 2)", m.FormatVersion)
		}
		if err := m.Host.validate(); err != nil {
			return corrupt("has an invalid host section: %v", err)
		}
	}
	return nil
}

// validate checks a Host read from a manifest: the backend's part
// (backend.Host.Validate) and bounded, well-formed guest fields.
func (h Host) validate() error {
	if err := h.Host.Validate(); err != nil {
		return err
	}
	if h.Image != "" {
		if err := backend.ValidateID(h.Image); err != nil {
			return fmt.Errorf("image name: %v", err)
		}
	}
	for _, d := range []string{h.ImageSHA256, h.KernelSHA256} {
		if d != "" && !validSHA256(d) {
			return fmt.Errorf("malformed sha256 %q", d)
		}
	}
	if len(h.KernelRelease) > 128 || strings.ContainsFunc(h.KernelRelease, func(r rune) bool { return r <= ' ' || r > '~' }) {
		return fmt.Errorf("malformed kernel release %q", h.KernelRelease)
	}
	return nil
}

// ParseManifest decodes and validates a manifest (see Manifest.Validate).
// Unknown fields are refused: a manifest is written by this code only.
func ParseManifest(data []byte) (Manifest, error) {
	var m Manifest
	if len(data) > MaxManifestSize {
		return m, corrupt("is %d bytes; at most %d", len(data), MaxManifestSize)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&m); err != nil {
		return Manifest{}, corrupt("does not parse: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Manifest{}, corrupt("has data after the JSON object")
	}
	if err := m.Validate(); err != nil {
		return Manifest{}, err
	}
	return m, nil
}

// readBounded reads at most MaxManifestSize+1 bytes of path.
func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, MaxManifestSize+1))
}

// Same reports whether two manifests are equal as data (their canonical
// JSON encodings match): restore checks the manifest on disk against the
// copy the database holds.
func Same(a, b Manifest) bool {
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && bytes.Equal(ja, jb)
}

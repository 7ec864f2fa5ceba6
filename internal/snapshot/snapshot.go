package snapshot

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// FormatVersion is the manifest format this code writes and reads.
// Format 2 added Host; format 3 changed the artifacts' digest from one over
// the data extents (LegacyDigest, formats 1-2) to one over the contents
// only (Digest). Formats 1 and 2 are still read and verified.
const FormatVersion = 3

// ManifestName is the manifest's file name inside a snapshot dir.
const ManifestName = "manifest.json"

// Artifact is one file of a snapshot with its digest.
type Artifact struct {
	Role   string `json:"role"` // memory, state, disk, config
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // Digest (format 3) or LegacyDigest (formats 1-2)
	// MtimeNS is the file's modification time when it was hashed. Verify
	// re-hashes a file only when its size or mtime changed (restores stay
	// fast for large memory images); a changed file is always re-hashed.
	MtimeNS int64 `json:"mtime_ns"`
}

// Manifest describes a snapshot. It is written last, atomically.
type Manifest struct {
	FormatVersion int                    `json:"format_version"`
	ID            string                 `json:"id"`
	VMID          string                 `json:"vm_id"`
	Backend       string                 `json:"backend"`
	Type          backend.SnapshotKind   `json:"type"`
	CreatedAt     time.Time              `json:"created_at"`
	VMConfig      json.RawMessage        `json:"vm_config"` // the SDK's Config of the VM
	Spec          backend.Spec           `json:"spec"`      // launch spec at snapshot time
	Result        backend.SnapshotResult `json:"result"`    // what the backend wrote
	Artifacts     []Artifact             `json:"artifacts"`
	BaseImage     string                 `json:"base_image,omitempty"` // diff: the disk's backing file
	SizeBytes     int64                  `json:"size_bytes"`           // allocated on disk
	// Host is what the snapshot's state depends on in the host that took
	// it (format 2; nil for a backend that describes no host, and in
	// format 1 manifests). Restore compares it with this host.
	Host *Host `json:"host,omitempty"`
}

// Host is the backend's description of the host (backend.Host) plus the
// guest the snapshot ran: the kernel and the image's root filesystem,
// by digest, when the VM's image was still the one in the cache.
type Host struct {
	backend.Host
	Image         string `json:"image,omitempty"`          // image name
	ImageSHA256   string `json:"image_sha256,omitempty"`   // digest of its root filesystem
	KernelRelease string `json:"kernel_release,omitempty"` // uname -r of the guest kernel
	KernelSHA256  string `json:"kernel_sha256,omitempty"`  // digest of the kernel image
}

// Errors.
var (
	ErrCorrupt    = errors.New("snapshot artifact corrupt")
	ErrNewer      = errors.New("snapshot format is newer than this smolvm")
	ErrIncomplete = errors.New("snapshot incomplete")
)

// Describe hashes the files of arts in dir and makes each durable: every
// file is fsynced while it is being hashed, so the disk flushes a large
// memory image during the time its digest takes (backends leave artifacts
// unsynced for this). It returns the artifacts and the dir's allocated size.
func Describe(dir string, arts []backend.Artifact) ([]Artifact, int64, error) {
	out := make([]Artifact, len(arts))
	errs := make([]error, 2*len(arts))
	var wg sync.WaitGroup
	for i, a := range arts {
		p := filepath.Join(dir, a.Name)
		wg.Add(2)
		go func() {
			defer wg.Done()
			errs[2*i] = fsutil.SyncFile(p)
		}()
		go func() {
			defer wg.Done()
			sum, size, err := Digest(p)
			if err != nil {
				errs[2*i+1] = err
				return
			}
			st, err := os.Stat(p)
			if err != nil {
				errs[2*i+1] = err
				return
			}
			out[i] = Artifact{Role: a.Role, Name: a.Name, Size: size, SHA256: sum, MtimeNS: st.ModTime().UnixNano()}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, 0, err
	}
	alloc, err := Allocated(dir)
	return out, alloc, err
}

// Allocated is the disk space the files under dir use.
func Allocated(dir string) (int64, error) {
	var total int64
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			total += st.Blocks * 512
		} else {
			total += info.Size()
		}
		return nil
	})
	return total, err
}

// Verify checks every artifact of m in dir: present, same size, and the
// same digest (the one of m's format, DigestFormat; re-hashed when the file's mtime or size changed since it was
// hashed, or always when full is set).
// The manifest is validated first (Manifest.Validate): only plain file
// names from the backend's known set are opened.
func Verify(dir string, m Manifest, full bool) error {
	if err := m.Validate(); err != nil {
		return err
	}
	for _, a := range m.Artifacts {
		p := filepath.Join(dir, a.Name)
		st, err := os.Lstat(p) // a symlink is not an artifact
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrCorrupt, p, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("%w: %s is not a regular file", ErrCorrupt, p)
		}
		if st.Size() != a.Size {
			return fmt.Errorf("%w: %s is %d bytes, the manifest says %d", ErrCorrupt, p, st.Size(), a.Size)
		}
		if !full && st.ModTime().UnixNano() == a.MtimeNS && (a.Role == "memory" || a.Role == "disk") {
			continue // unchanged since hashed and large: trust the stat (full re-hashes)
		}
		sum, _, err := DigestFormat(p, m.FormatVersion)
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrCorrupt, p, err)
		}
		if sum != a.SHA256 {
			return fmt.Errorf("%w: %s does not match its checksum (sha256 %s, manifest %s)", ErrCorrupt, p, sum[:12], a.SHA256[:12]) // both 64 digits: validated
		}
	}
	return nil
}

// WriteManifest writes dir/manifest.json atomically and fsyncs the dir.
func WriteManifest(dir string, m Manifest) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFile(filepath.Join(dir, ManifestName), data, 0o600)
}

// ReadManifest reads dir/manifest.json (at most MaxManifestSize bytes) and
// validates it (ParseManifest).
func ReadManifest(dir string) (Manifest, error) {
	data, err := readBounded(filepath.Join(dir, ManifestName))
	if err != nil {
		return Manifest{}, fmt.Errorf("%w: %v", ErrIncomplete, err)
	}
	m, err := ParseManifest(data)
	if err != nil {
		return Manifest{}, fmt.Errorf("%s: %w", dir, err)
	}
	return m, nil
}

func nonce() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// TempDir creates root/<id>.tmp-<nonce> for a snapshot being written.
func TempDir(root, id string) (string, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return "", err
	}
	d := filepath.Join(root, id+".tmp-"+nonce())
	return d, os.Mkdir(d, 0o700)
}

// Publish renames a complete temp dir to root/<id> and fsyncs root.
func Publish(tmp, root, id string) (string, error) {
	if err := fsutil.SyncDir(tmp); err != nil {
		return "", err
	}
	final := filepath.Join(root, id)
	if err := os.Rename(tmp, final); err != nil {
		return "", err
	}
	return final, fsutil.SyncDir(root)
}

// Remove deletes a snapshot dir: first renamed out of the way (so it is
// never seen half-deleted), then removed.
func Remove(root, id string) error {
	final := filepath.Join(root, id)
	trash := filepath.Join(root, ".trash-"+id+"-"+nonce())
	if err := os.Rename(final, trash); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	fsutil.SyncDir(root)
	return os.RemoveAll(trash)
}

// Cleanup removes leftovers under root: temp dirs whose id is not being
// written by a live process (busy reports whether an id is still being
// created), trash dirs, and complete dirs that known does not list.
// It returns how many entries it removed.
func Cleanup(root string, busy func(id string) bool, known func(id string) bool) (int, error) {
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range ents {
		name := e.Name()
		var id string
		switch {
		case strings.HasPrefix(name, ".trash-"):
		case strings.Contains(name, ".tmp-"):
			id = name[:strings.Index(name, ".tmp-")]
			if busy(id) {
				continue
			}
		default:
			if known(name) || busy(name) {
				continue
			}
		}
		if err := os.RemoveAll(filepath.Join(root, name)); err == nil {
			n++
		}
	}
	return n, nil
}

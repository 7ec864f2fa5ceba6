package image

import (
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// FormatVersion is the manifest format written by this package. Manifests
// with another format_version are treated as not built.
const FormatVersion = 1

// File is one artifact of a manifest. Path is relative to the cache dir.
type File struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"` // apparent size in bytes
}

// Manifest is dir/images/<name>/manifest.json: it binds a kernel, an
// initramfs and a root filesystem.
type Manifest struct {
	FormatVersion int       `json:"format_version"`
	Name          string    `json:"name"`
	CreatedAt     time.Time `json:"created_at"`

	KernelFlavor  string `json:"kernel_flavor"`  // "debian-cloud" | "minimal"
	KernelID      string `json:"kernel_id"`      // directory name under kernels/
	KernelRelease string `json:"kernel_release"` // uname -r of the guest kernel
	KernelArgs    string `json:"kernel_args"`    // extra guest command line

	Kernel  File   `json:"kernel"`            // bzImage (QEMU)
	Vmlinux *File  `json:"vmlinux,omitempty"` // uncompressed ELF kernel (Firecracker), when built
	Initrd  File   `json:"initrd"`
	Rootfs  File   `json:"rootfs"`
	Modules []File `json:"modules,omitempty"` // modules inside the initramfs, in load order

	AgentSHA256  string `json:"agent_sha256"`
	InitrdKey    string `json:"initrd_key"`
	RootfsKey    string `json:"rootfs_key"`
	RootfsRecipe string `json:"rootfs_recipe"`
}

// kernelManifest is dir/kernels/<id>/manifest.json.
type kernelManifest struct {
	FormatVersion int       `json:"format_version"`
	ID            string    `json:"id"`
	Flavor        string    `json:"flavor"`
	Release       string    `json:"release"`         // uname -r
	Package       string    `json:"package"`         // Debian package the kernel comes from
	Version       string    `json:"package_version"` // its version
	InputKey      string    `json:"input_key,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	Kernel        File      `json:"kernel"`
	Vmlinux       *File     `json:"vmlinux,omitempty"`
	Config        *File     `json:"config,omitempty"`
	Modules       []File    `json:"modules,omitempty"` // load order; paths relative to the cache dir
	ModuleNames   []string  `json:"module_names,omitempty"`
}

// initrdManifest is dir/initramfs/<kernel-id>/<key>/manifest.json.
type initrdManifest struct {
	FormatVersion int       `json:"format_version"`
	Key           string    `json:"key"`
	KernelID      string    `json:"kernel_id"`
	AgentSHA256   string    `json:"agent_sha256"`
	CreatedAt     time.Time `json:"created_at"`
	Initrd        File      `json:"initrd"`
	Entries       int       `json:"entries"` // cpio records, trailer excluded
}

// rootfsManifest is dir/rootfs/<name>-<key>/manifest.json.
type rootfsManifest struct {
	FormatVersion int       `json:"format_version"`
	Name          string    `json:"name"`
	Key           string    `json:"key"`
	Recipe        string    `json:"recipe"`
	Packages      []string  `json:"packages,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	ContentBytes  int64     `json:"content_bytes"` // size of the staged tree
	Rootfs        File      `json:"rootfs"`
}

const manifestName = "manifest.json"

// fileSum hashes the file at dir/rel and returns its File entry.
func fileSum(dir, rel string) (File, error) {
	sum, n, err := sha256File(filepath.Join(dir, rel))
	if err != nil {
		return File{}, err
	}
	return File{Path: filepath.ToSlash(rel), SHA256: sum, Size: n}, nil
}

// checkFiles verifies that each file exists with its recorded size (cheap;
// Verify re-hashes).
func checkFiles(dir string, files ...File) error {
	for _, f := range files {
		if f.Path == "" {
			return fmt.Errorf("manifest entry without a path")
		}
		st, err := os.Stat(filepath.Join(dir, filepath.FromSlash(f.Path)))
		if err != nil {
			return err
		}
		if st.Size() != f.Size {
			return fmt.Errorf("%s: size %d, manifest says %d", f.Path, st.Size(), f.Size)
		}
	}
	return nil
}

// verifyFiles re-hashes each file and compares with the manifest.
func verifyFiles(dir string, files ...File) error {
	for _, f := range files {
		sum, n, err := sha256File(filepath.Join(dir, filepath.FromSlash(f.Path)))
		if err != nil {
			return err
		}
		if n != f.Size {
			return fmt.Errorf("%s: size %d, manifest says %d", f.Path, n, f.Size)
		}
		if sum != f.SHA256 {
			return fmt.Errorf("%s: sha256 %s, manifest says %s", f.Path, sum, f.SHA256)
		}
	}
	return nil
}

// RootfsSHA256 returns the sha256 of the root filesystem file at path (an
// absolute path under the cache dir) and whether it was recorded rather
// than hashed. It costs a small read when the cache's manifest next to
// the file (rootfs/<name>-<key>/manifest.json) names that file with its
// current size: the digest recorded when it was built (a file changed in
// place at the same size is not noticed, as image.Open does not notice
// it). Otherwise it hashes the whole file, holes included: seconds per
// GiB (sha256sum took 10 s for the 2 GiB debian root filesystem on a
// shared 2-core host), so that happens only for a file the cache does not
// describe.
func RootfsSHA256(dir, path string) (string, bool, error) {
	dir, err := absDir(dir)
	if err != nil {
		return "", false, err
	}
	var rm rootfsManifest
	if readJSON(filepath.Join(filepath.Dir(path), manifestName), &rm) == nil && rm.Rootfs.SHA256 != "" &&
		filepath.Join(dir, filepath.FromSlash(rm.Rootfs.Path)) == filepath.Clean(path) {
		if st, err := os.Stat(path); err == nil && st.Size() == rm.Rootfs.Size {
			return rm.Rootfs.SHA256, true, nil
		}
	}
	sum, _, err := sha256File(path)
	return sum, false, err
}

package image

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Kernel flavors.
const (
	KernelDebianCloud = "debian-cloud" // Debian's linux-image-cloud-amd64 + virtio modules in the initramfs
	KernelMinimal     = "minimal"      // built from linux-source-6.1 with microvm.fragment, everything built in
)

const cloudMetaPackage = "linux-image-cloud-amd64"

// ensureKernel returns a cached kernel of the requested flavor, fetching or
// building one when none is usable.
func (b *builder) ensureKernel(ctx context.Context, prev *Manifest) (kernelManifest, error) {
	switch b.o.Kernel {
	case KernelDebianCloud:
		return b.ensureCloudKernel(ctx, prev)
	case KernelMinimal:
		return b.ensureMinimalKernel(ctx, prev)
	default:
		return kernelManifest{}, fmt.Errorf("unknown kernel flavor %q (want %q or %q)", b.o.Kernel, KernelDebianCloud, KernelMinimal)
	}
}

// loadKernel reads and checks kernels/<id>/manifest.json.
func (b *builder) loadKernel(id string) (kernelManifest, error) {
	var km kernelManifest
	if id == "" || strings.ContainsAny(id, `/\`) {
		return km, fmt.Errorf("bad kernel id %q", id)
	}
	if err := readJSON(filepath.Join(b.dir, "kernels", id, manifestName), &km); err != nil {
		return km, err
	}
	if km.FormatVersion != FormatVersion || km.ID != id {
		return km, fmt.Errorf("kernel %s: stale manifest", id)
	}
	files := append([]File{km.Kernel}, km.Modules...)
	if km.Vmlinux != nil {
		files = append(files, *km.Vmlinux)
	}
	if err := checkFiles(b.dir, files...); err != nil {
		return km, fmt.Errorf("kernel %s: %w", id, err)
	}
	return km, nil
}

// cachedKernels lists usable kernels of a flavor, newest first.
func (b *builder) cachedKernels(flavor string) []kernelManifest {
	ents, _ := os.ReadDir(filepath.Join(b.dir, "kernels"))
	var out []kernelManifest
	for _, e := range ents {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), flavor+"-") {
			continue
		}
		km, err := b.loadKernel(e.Name())
		if err == nil && km.Flavor == flavor {
			out = append(out, km)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CreatedAt.After(out[j].CreatedAt) })
	return out
}

func (b *builder) ensureCloudKernel(ctx context.Context, prev *Manifest) (kernelManifest, error) {
	usable := func(km kernelManifest) bool {
		return km.Flavor == KernelDebianCloud && slices.Equal(km.ModuleNames, GuestModules)
	}
	if !b.o.Force {
		// The kernel the image already uses, else the newest cached one:
		// no apt round trip when the cache is warm.
		if prev != nil && prev.KernelFlavor == KernelDebianCloud {
			if km, err := b.loadKernel(prev.KernelID); err == nil && usable(km) {
				return b.ensureVmlinux(ctx, km)
			}
		}
		for _, km := range b.cachedKernels(KernelDebianCloud) {
			if usable(km) {
				return b.ensureVmlinux(ctx, km)
			}
		}
	}

	b.step("kernel: resolving "+cloudMetaPackage, 0.02)
	pkg, ver, debSum, err := b.resolveCloudKernel(ctx)
	if err != nil {
		return kernelManifest{}, err
	}
	release := strings.TrimPrefix(pkg, "linux-image-")
	id := fmt.Sprintf("%s-%s-%s", KernelDebianCloud, release, strings.ReplaceAll(ver, ":", "_"))
	if !b.o.Force {
		if km, err := b.loadKernel(id); err == nil && usable(km) {
			return b.ensureVmlinux(ctx, km)
		}
	}

	b.step(fmt.Sprintf("kernel: downloading %s %s", pkg, ver), 0.05)
	deb, err := b.downloadDeb(ctx, pkg, ver, debSum)
	if err != nil {
		return kernelManifest{}, err
	}

	work, err := b.tempDir("kernel")
	if err != nil {
		return kernelManifest{}, err
	}
	defer removeAllSafe(work)
	tree := filepath.Join(work, "pkg")
	b.step("kernel: extracting "+filepath.Base(deb), 0.4)
	if err := os.MkdirAll(tree, 0o755); err != nil {
		return kernelManifest{}, err
	}
	if err := runCmd(ctx, b.log, cmdSpec{}, "dpkg-deb", "-x", deb, tree); err != nil {
		return kernelManifest{}, err
	}
	modRoot, modRelease, err := kernelModuleRoot(tree)
	if err != nil {
		return kernelManifest{}, err
	}
	if modRelease != release {
		b.log.Warn("kernel release differs from package name", "package", pkg, "modules", modRelease)
		release = modRelease
	}

	b.step("kernel: resolving module closure", 0.7)
	mods, err := ModuleClosure(modRoot, GuestModules)
	if err != nil {
		return kernelManifest{}, err
	}

	out := filepath.Join(work, "out")
	if err := os.MkdirAll(filepath.Join(out, "modules"), 0o755); err != nil {
		return kernelManifest{}, err
	}
	vmlinuz := filepath.Join(tree, "boot", "vmlinuz-"+release)
	if err := copyFile(vmlinuz, filepath.Join(out, "vmlinuz"), 0o644); err != nil {
		return kernelManifest{}, fmt.Errorf("kernel image: %w", err)
	}
	hasConfig := copyFile(filepath.Join(tree, "boot", "config-"+release), filepath.Join(out, "config"), 0o644) == nil
	var order strings.Builder
	for _, m := range mods {
		name := filepath.Base(m.Path)
		if err := copyFile(filepath.Join(modRoot, m.Path), filepath.Join(out, "modules", name), 0o644); err != nil {
			return kernelManifest{}, err
		}
		order.WriteString(name + "\n")
	}
	if err := os.WriteFile(filepath.Join(out, "modules", "load.order"), []byte(order.String()), 0o644); err != nil {
		return kernelManifest{}, err
	}

	rel := func(p string) string { return filepath.ToSlash(filepath.Join("kernels", id, p)) }
	km := kernelManifest{
		FormatVersion: FormatVersion,
		ID:            id,
		Flavor:        KernelDebianCloud,
		Release:       release,
		Package:       pkg,
		Version:       ver,
		CreatedAt:     time.Now().UTC(),
		ModuleNames:   slices.Clone(GuestModules),
	}
	if km.Kernel, err = fileSumAs(out, "vmlinuz", rel("vmlinuz")); err != nil {
		return km, err
	}
	if hasConfig {
		f, err := fileSumAs(out, "config", rel("config"))
		if err != nil {
			return km, err
		}
		km.Config = &f
	}
	for _, m := range mods {
		name := filepath.Base(m.Path)
		f, err := fileSumAs(out, filepath.Join("modules", name), rel("modules/"+name))
		if err != nil {
			return km, err
		}
		km.Modules = append(km.Modules, f)
	}
	if b.o.Vmlinux {
		b.step("kernel: extracting vmlinux", 0.85)
		if err := ExtractVmlinux(filepath.Join(out, "vmlinuz"), filepath.Join(out, "vmlinux")); err != nil {
			return km, err
		}
		f, err := fileSumAs(out, "vmlinux", rel("vmlinux"))
		if err != nil {
			return km, err
		}
		km.Vmlinux = &f
	}
	if err := writeJSONAtomic(filepath.Join(out, manifestName), km); err != nil {
		return km, err
	}
	if err := publishDir(out, filepath.Join(b.dir, "kernels", id)); err != nil {
		return km, err
	}
	b.log.Info("kernel cached", "id", id, "modules", len(mods))
	return km, nil
}

// fileSumAs hashes dir/name and records it under the cache-relative path rel.
func fileSumAs(dir, name, rel string) (File, error) {
	f, err := fileSum(dir, name)
	f.Path = rel
	return f, err
}

// ensureVmlinux adds an uncompressed vmlinux to a cached kernel when the
// build asks for one and it is missing.
func (b *builder) ensureVmlinux(ctx context.Context, km kernelManifest) (kernelManifest, error) {
	if !b.o.Vmlinux || km.Vmlinux != nil {
		return km, nil
	}
	b.step("kernel: extracting vmlinux", 0.5)
	kdir := filepath.Join(b.dir, "kernels", km.ID)
	// ExtractVmlinux writes atomically: no half-written vmlinux is seen.
	if err := ExtractVmlinux(filepath.Join(b.dir, filepath.FromSlash(km.Kernel.Path)), filepath.Join(kdir, "vmlinux")); err != nil {
		return km, err
	}
	f, err := fileSumAs(kdir, "vmlinux", filepath.ToSlash(filepath.Join("kernels", km.ID, "vmlinux")))
	if err != nil {
		return km, err
	}
	km.Vmlinux = &f
	if err := writeJSONAtomic(filepath.Join(kdir, manifestName), km); err != nil {
		return km, err
	}
	return km, ctx.Err()
}

// resolveCloudKernel finds the concrete package behind
// linux-image-cloud-amd64, its candidate version and .deb sha256.
func (b *builder) resolveCloudKernel(ctx context.Context) (pkg, ver, sum string, err error) {
	try := func() error {
		out, err := outputCmd(ctx, b.log, "apt-cache", "depends", cloudMetaPackage)
		if err != nil {
			return err
		}
		pkg = ""
		sc := bufio.NewScanner(strings.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
				pkg = f[1]
				break
			}
		}
		if pkg == "" {
			return fmt.Errorf("apt-cache depends %s: no linux-image dependency in:\n%s", cloudMetaPackage, out)
		}
		ver, sum, err = b.aptCandidate(ctx, pkg)
		return err
	}
	if err = try(); err != nil {
		b.log.Info("apt lookup failed; running apt-get update", "err", err)
		if uerr := b.aptUpdate(ctx); uerr != nil {
			return "", "", "", fmt.Errorf("%w (apt-get update: %v)", err, uerr)
		}
		err = try()
	}
	return pkg, ver, sum, err
}

// aptCandidate returns the candidate version of pkg and the sha256 of its .deb.
func (b *builder) aptCandidate(ctx context.Context, pkg string) (ver, sum string, err error) {
	out, err := outputCmd(ctx, b.log, "apt-cache", "show", "--no-all-versions", pkg)
	if err != nil {
		return "", "", err
	}
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "Version: "); ok && ver == "" {
			ver = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "SHA256: "); ok && sum == "" {
			sum = strings.TrimSpace(v)
		}
	}
	if ver == "" {
		return "", "", fmt.Errorf("apt-cache show %s: no Version", pkg)
	}
	return ver, sum, nil
}

func (b *builder) aptUpdate(ctx context.Context) error {
	b.step("apt-get update", -1)
	return runCmd(ctx, b.log, cmdSpec{OnLine: b.lineStep("apt-get update")}, "apt-get", "update")
}

// downloadDeb returns the path of pkg_ver's .deb in the download cache,
// fetching it with apt-get download when missing. wantSum (optional) is the
// sha256 apt expects; a cached file that does not match is fetched again.
func (b *builder) downloadDeb(ctx context.Context, pkg, ver, wantSum string) (string, error) {
	dl := b.downloadDir()
	if err := os.MkdirAll(dl, 0o755); err != nil {
		return "", err
	}
	pattern := filepath.Join(dl, fmt.Sprintf("%s_%s_*.deb", pkg, strings.ReplaceAll(ver, ":", "%3a")))
	if m, _ := filepath.Glob(pattern); len(m) > 0 {
		if wantSum == "" {
			return m[0], nil
		}
		if sum, _, err := sha256File(m[0]); err == nil && sum == wantSum {
			return m[0], nil
		}
		b.log.Warn("cached package does not match apt's checksum; fetching again", "file", m[0])
	}
	tmp, err := os.MkdirTemp(dl, ".download-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	get := func() error {
		return runCmd(ctx, b.log, cmdSpec{Dir: tmp, OnLine: b.lineStep("apt-get download")}, "apt-get", "download", pkg+"="+ver)
	}
	if err := get(); err != nil {
		if ctx.Err() != nil {
			return "", err
		}
		b.log.Info("apt-get download failed; running apt-get update", "err", err)
		if uerr := b.aptUpdate(ctx); uerr != nil {
			return "", fmt.Errorf("%w (apt-get update: %v)", err, uerr)
		}
		if err := get(); err != nil {
			return "", err
		}
	}
	got, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(got) != 1 {
		return "", fmt.Errorf("apt-get download %s: expected one .deb, found %d", pkg, len(got))
	}
	if wantSum != "" {
		sum, _, err := sha256File(got[0])
		if err != nil {
			return "", err
		}
		if sum != wantSum {
			return "", fmt.Errorf("%s: sha256 %s, apt says %s", filepath.Base(got[0]), sum, wantSum)
		}
	}
	if err := fsutil.SyncFile(got[0]); err != nil {
		return "", err
	}
	final := filepath.Join(dl, filepath.Base(got[0]))
	if err := os.Rename(got[0], final); err != nil {
		return "", err
	}
	if err := os.Chmod(final, 0o644); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	return final, fsutil.SyncDir(dl)
}

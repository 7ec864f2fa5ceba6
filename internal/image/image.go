package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Sentinel errors.
var (
	// ErrNotBuilt: the image is not in the cache (or its files are gone).
	// The wrapping message names the command that fixes it.
	ErrNotBuilt = errors.New("image not built")
	// ErrUnknownImage: no recipe for that image name.
	ErrUnknownImage = errors.New("unknown image")
)

// Names lists the images Build knows how to make.
var Names = []string{Busybox, Debian}

// DefaultKernelArgs are added to the guest command line of every image:
// init_on_free keeps memory snapshots small.
const DefaultKernelArgs = "init_on_free=1"

// Image is a built image: absolute paths of its artifacts.
type Image struct {
	Name       string
	Dir        string // the cache directory the image belongs to
	Kernel     string // bzImage for QEMU
	Vmlinux    string // uncompressed ELF kernel (Firecracker); empty unless built
	Initrd     string // initramfs with the agent as /init
	Rootfs     string // raw ext4 base disk; use it read-only (overlay or copy per VM)
	KernelArgs string
	RootfsSize int64 // apparent size of Rootfs in bytes
	Manifest   Manifest
}

// BuildOptions configure Build.
type BuildOptions struct {
	Dir       string // cache dir; default DefaultDir()
	Name      string // "busybox" | "debian"; default "debian"
	AgentPath string // static guest agent binary, packed as /init (required)
	Kernel    string // "debian-cloud" (default) | "minimal"
	Vmlinux   bool   // also extract an uncompressed vmlinux (for Firecracker)
	Force     bool   // rebuild every piece even when cached
	// DownloadDir caches downloaded .deb files; default Dir/downloads.
	// Tests point it at the default cache to avoid refetching.
	DownloadDir string
	Mirror      string // Debian mirror for debootstrap; default http://deb.debian.org/debian
	// Progress, when set, receives each step (a human readable line) and
	// the estimated overall fraction done in [0,1].
	Progress func(step string, frac float64)
	Logger   *slog.Logger
}

// DefaultDir returns the image cache directory: $SMOLVM_IMAGE_DIR, else
// $XDG_CACHE_HOME/smolvm/images, else ~/.cache/smolvm/images.
func DefaultDir() string {
	if d := os.Getenv("SMOLVM_IMAGE_DIR"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_CACHE_HOME"); filepath.IsAbs(d) {
		return filepath.Join(d, "smolvm", "images")
	}
	if home, err := os.UserHomeDir(); err == nil && home != "" {
		return filepath.Join(home, ".cache", "smolvm", "images")
	}
	return filepath.Join(os.TempDir(), "smolvm", "images")
}

// builder carries one Build's state.
type builder struct {
	o   BuildOptions
	dir string
	log *slog.Logger

	lo, hi   float64 // overall fraction range of the current stage
	lastFrac float64
	lastStep string
}

// step reports progress; frac is the fraction of the current stage done
// (negative: unknown, keep the last value).
func (b *builder) step(s string, frac float64) {
	f := b.lastFrac
	if frac >= 0 {
		f = b.lo + (b.hi-b.lo)*min(frac, 1)
		if f < b.lastFrac {
			f = b.lastFrac
		}
	}
	b.lastFrac = f
	if s != b.lastStep {
		b.log.Debug("build step", "image", b.o.Name, "step", s, "frac", fmt.Sprintf("%.2f", f))
		b.lastStep = s
	}
	if b.o.Progress != nil {
		b.o.Progress(s, f)
	}
}

// lineStep returns an output-line callback that reports "prefix: line".
func (b *builder) lineStep(prefix string) func(string) {
	return func(line string) {
		if line = strings.TrimSpace(line); line != "" {
			b.step(prefix+": "+line, -1)
		}
	}
}

func (b *builder) stage(lo, hi float64) { b.lo, b.hi = lo, hi }

func (b *builder) downloadDir() string {
	if b.o.DownloadDir != "" {
		return b.o.DownloadDir
	}
	return filepath.Join(b.dir, "downloads")
}

// tempDir makes a fresh staging directory under dir/tmp (same file system
// as the cache, so publishing is a rename).
func (b *builder) tempDir(prefix string) (string, error) {
	t := filepath.Join(b.dir, "tmp")
	if err := os.MkdirAll(t, 0o755); err != nil {
		return "", err
	}
	d, err := os.MkdirTemp(t, prefix+"-")
	if err != nil {
		return "", err
	}
	// Published pieces keep this mode: readable by everyone, like the files.
	return d, os.Chmod(d, 0o755)
}

func absDir(dir string) (string, error) {
	if dir == "" {
		dir = DefaultDir()
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return abs, nil
}

func validName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, `/\`) || strings.HasPrefix(name, ".") {
		return fmt.Errorf("%w: invalid image name %q", ErrUnknownImage, name)
	}
	return nil
}

// Build makes sure image o.Name is built in o.Dir and returns it. Each piece
// (kernel, initramfs, rootfs) is cached separately and keyed by its inputs,
// so a Build whose inputs did not change is a fast no-op, and a new agent
// binary only rebuilds the initramfs. Concurrent Builds on one cache dir
// (even from several processes) are serialized.
func Build(ctx context.Context, o BuildOptions) (Image, error) {
	start := time.Now()
	if o.Name == "" {
		o.Name = Debian
	}
	if o.Kernel == "" {
		o.Kernel = KernelDebianCloud
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if err := validName(o.Name); err != nil {
		return Image{}, err
	}
	if o.Kernel != KernelDebianCloud && o.Kernel != KernelMinimal {
		return Image{}, fmt.Errorf("unknown kernel %q (want %q or %q)", o.Kernel, KernelDebianCloud, KernelMinimal)
	}
	if o.AgentPath == "" {
		return Image{}, errors.New("image build: AgentPath (the static guest agent binary) is required")
	}
	agent, err := os.ReadFile(o.AgentPath)
	if err != nil {
		return Image{}, fmt.Errorf("image build: agent: %w", err)
	}
	if len(agent) == 0 {
		return Image{}, fmt.Errorf("image build: agent %s is empty", o.AgentPath)
	}
	if isELF(agent) && !isStaticELF(o.AgentPath) {
		return Image{}, fmt.Errorf("image build: agent %s is dynamically linked; build it with CGO_ENABLED=0", o.AgentPath)
	}
	agentSum := sha256Hex(agent)
	dir, err := absDir(o.Dir)
	if err != nil {
		return Image{}, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Image{}, err
	}
	if real, err := filepath.EvalSymlinks(dir); err == nil {
		dir = real
	}
	b := &builder{o: o, dir: dir, log: o.Logger.With("image", o.Name)}

	unlock, err := lockCache(ctx, dir, func() {
		b.step("waiting for another build in "+dir, 0)
	})
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	if err := b.cleanTmp(); err != nil {
		return Image{}, err
	}

	var prev *Manifest
	var pm Manifest
	if err := readJSON(filepath.Join(dir, "images", o.Name, manifestName), &pm); err == nil && pm.FormatVersion == FormatVersion {
		prev = &pm
	}

	// Stage weights (fractions of the whole build).
	kEnd, iEnd := 0.75, 0.8
	switch {
	case o.Kernel == KernelMinimal:
		kEnd, iEnd = 0.9, 0.91
	case o.Name == Debian:
		kEnd, iEnd = 0.15, 0.17
	}

	b.stage(0, 0.01)
	plan, err := b.planRootfs(ctx)
	if err != nil {
		return Image{}, err
	}
	b.stage(0.01, kEnd)
	km, err := b.ensureKernel(ctx, prev)
	if err != nil {
		return Image{}, fmt.Errorf("image %s: kernel: %w", o.Name, err)
	}
	b.stage(kEnd, iEnd)
	im, err := b.ensureInitramfs(ctx, km, agent, agentSum)
	if err != nil {
		return Image{}, fmt.Errorf("image %s: initramfs: %w", o.Name, err)
	}
	b.stage(iEnd, 0.99)
	rm, err := b.ensureRootfs(ctx, plan, prev)
	if err != nil {
		return Image{}, fmt.Errorf("image %s: rootfs: %w", o.Name, err)
	}
	b.stage(0.99, 1)

	m := Manifest{
		FormatVersion: FormatVersion,
		Name:          o.Name,
		CreatedAt:     time.Now().UTC(),
		KernelFlavor:  km.Flavor,
		KernelID:      km.ID,
		KernelRelease: km.Release,
		KernelArgs:    DefaultKernelArgs,
		Kernel:        km.Kernel,
		Vmlinux:       km.Vmlinux,
		Initrd:        im.Initrd,
		Rootfs:        rm.Rootfs,
		Modules:       km.Modules,
		AgentSHA256:   agentSum,
		InitrdKey:     im.Key,
		RootfsKey:     rm.Key,
		RootfsRecipe:  rm.Recipe,
	}
	if prev != nil && sameBinding(*prev, m) {
		b.log.Debug("image up to date", "elapsed", time.Since(start))
		b.step("image "+o.Name+": up to date", 1)
		return imageFrom(dir, *prev), nil
	}
	b.step("image "+o.Name+": writing manifest", 0.5)
	if err := writeJSONAtomic(filepath.Join(dir, "images", o.Name, manifestName), m); err != nil {
		return Image{}, err
	}
	b.step("image "+o.Name+": done", 1)
	b.log.Info("image built", "dir", dir, "kernel", km.ID, "initrd", im.Initrd.Path, "rootfs", rm.Rootfs.Path,
		"elapsed", time.Since(start).Round(time.Millisecond))
	return imageFrom(dir, m), nil
}

// sameBinding reports whether two manifests bind the same artifacts.
func sameBinding(a, b Manifest) bool {
	a.CreatedAt, b.CreatedAt = time.Time{}, time.Time{}
	ja, _ := jsonString(a)
	jb, _ := jsonString(b)
	return ja == jb
}

// cleanTmp removes staging dirs left by interrupted builds. The caller
// holds the cache lock, so no other build is using them.
func (b *builder) cleanTmp() error {
	t := filepath.Join(b.dir, "tmp")
	ents, err := os.ReadDir(t)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	stale, _ := filepath.Glob(filepath.Join(shmDir, b.stagePrefix()+"*"))
	for _, e := range ents {
		stale = append(stale, filepath.Join(t, e.Name()))
	}
	for _, d := range stale {
		if err := removeAllSafe(d); err != nil {
			return fmt.Errorf("clean staging dir: %w", err)
		}
	}
	return nil
}

func imageFrom(dir string, m Manifest) Image {
	abs := func(f File) string { return filepath.Join(dir, filepath.FromSlash(f.Path)) }
	img := Image{
		Name:       m.Name,
		Dir:        dir,
		Kernel:     abs(m.Kernel),
		Initrd:     abs(m.Initrd),
		Rootfs:     abs(m.Rootfs),
		KernelArgs: m.KernelArgs,
		RootfsSize: m.Rootfs.Size,
		Manifest:   m,
	}
	if m.Vmlinux != nil {
		img.Vmlinux = abs(*m.Vmlinux)
	}
	return img
}

func notBuilt(name, dir, why string) error {
	return fmt.Errorf("%w: image %q in %s %s; run `smolvm image build %s`", ErrNotBuilt, name, dir, why, name)
}

func isKnown(name string) bool {
	for _, n := range Names {
		if n == name {
			return true
		}
	}
	return false
}

// Open returns the built image name from the cache dir (default
// DefaultDir() when dir is empty), checking that its files exist with
// their recorded sizes. A missing image gives an error wrapping
// ErrNotBuilt (or ErrUnknownImage for a name with no recipe).
func Open(dir, name string) (Image, error) {
	if err := validName(name); err != nil {
		return Image{}, err
	}
	dir, err := absDir(dir)
	if err != nil {
		return Image{}, err
	}
	var m Manifest
	err = readJSON(filepath.Join(dir, "images", name, manifestName), &m)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if !isKnown(name) {
			return Image{}, fmt.Errorf("%w: %q (known images: %s)", ErrUnknownImage, name, strings.Join(Names, ", "))
		}
		return Image{}, notBuilt(name, dir, "is not built")
	case err != nil:
		return Image{}, notBuilt(name, dir, fmt.Sprintf("has an unreadable manifest (%v)", err))
	case m.FormatVersion != FormatVersion:
		return Image{}, notBuilt(name, dir, fmt.Sprintf("was built with manifest format %d (want %d)", m.FormatVersion, FormatVersion))
	}
	files := []File{m.Kernel, m.Initrd, m.Rootfs}
	if m.Vmlinux != nil {
		files = append(files, *m.Vmlinux)
	}
	if err := checkFiles(dir, files...); err != nil {
		return Image{}, notBuilt(name, dir, fmt.Sprintf("is incomplete (%v)", err))
	}
	return imageFrom(dir, m), nil
}

// List returns the images built in dir, sorted by name. Images whose
// manifest cannot be read are skipped.
func List(dir string) ([]Image, error) {
	dir, err := absDir(dir)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Join(dir, "images"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Image
	for _, e := range ents {
		if !e.IsDir() || validName(e.Name()) != nil {
			continue
		}
		var m Manifest
		if err := readJSON(filepath.Join(dir, "images", e.Name(), manifestName), &m); err != nil || m.FormatVersion != FormatVersion {
			continue
		}
		out = append(out, imageFrom(dir, m))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Remove deletes image name from the cache and then the root filesystems
// and initramfs no remaining image uses. Kernels and downloads are kept.
// VMs whose disks are overlays on a removed rootfs lose their backing file.
func Remove(dir, name string) error {
	if err := validName(name); err != nil {
		return err
	}
	dir, err := absDir(dir)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "images", name, manifestName)); errors.Is(err, fs.ErrNotExist) {
		return notBuilt(name, dir, "is not built")
	}
	unlock, err := lockCache(context.Background(), dir, nil)
	if err != nil {
		return err
	}
	defer unlock()
	// Rename first so the image disappears atomically from List and Open.
	imgDir := filepath.Join(dir, "images", name)
	gone := filepath.Join(dir, "images", fmt.Sprintf(".removed-%s-%d", name, time.Now().UnixNano()))
	if err := os.Rename(imgDir, gone); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return notBuilt(name, dir, "is not built")
		}
		return err
	}
	if err := fsutil.SyncDir(filepath.Dir(imgDir)); err != nil {
		return err
	}
	if err := os.RemoveAll(gone); err != nil {
		return err
	}
	return gc(dir)
}

// gc removes rootfs and initramfs dirs no image manifest references.
func gc(dir string) error {
	imgs, err := List(dir)
	if err != nil {
		return err
	}
	used := map[string]bool{}
	for _, img := range imgs {
		used[filepath.Dir(img.Rootfs)] = true
		used[filepath.Dir(img.Initrd)] = true
	}
	var errs []error
	rootfs, _ := filepath.Glob(filepath.Join(dir, "rootfs", "*"))
	initrds, _ := filepath.Glob(filepath.Join(dir, "initramfs", "*", "*"))
	for _, d := range append(rootfs, initrds...) {
		if !used[d] {
			if err := os.RemoveAll(d); err != nil {
				errs = append(errs, err)
			}
		}
	}
	kdirs, _ := filepath.Glob(filepath.Join(dir, "initramfs", "*"))
	for _, d := range kdirs {
		os.Remove(d) // only when empty
	}
	return errors.Join(errs...)
}

// Verify re-hashes the image's kernel, vmlinux, initramfs and rootfs and
// compares them with the manifest.
func Verify(img Image) error {
	m := img.Manifest
	check := []struct {
		path string
		f    File
	}{{img.Kernel, m.Kernel}, {img.Initrd, m.Initrd}, {img.Rootfs, m.Rootfs}}
	if m.Vmlinux != nil && img.Vmlinux != "" {
		check = append(check, struct {
			path string
			f    File
		}{img.Vmlinux, *m.Vmlinux})
	}
	for _, c := range check {
		if c.path == "" || c.f.SHA256 == "" {
			return fmt.Errorf("image %s: manifest has no sum for %q", img.Name, c.f.Path)
		}
		sum, n, err := sha256File(c.path)
		if err != nil {
			return fmt.Errorf("image %s: %w; rebuild with `smolvm image build %s`", img.Name, err, img.Name)
		}
		if n != c.f.Size || sum != c.f.SHA256 {
			return fmt.Errorf("image %s: %s does not match its manifest (sha256 %s, %d bytes; want %s, %d bytes); rebuild with `smolvm image build --force %s`",
				img.Name, c.path, sum, n, c.f.SHA256, c.f.Size, img.Name)
		}
	}
	return nil
}

// ProgressTo returns a BuildOptions.Progress function that writes one line
// per new step to w, such as "[ 42%] rootfs: debootstrap: Unpacking bash...".
func ProgressTo(w io.Writer) func(step string, frac float64) {
	var mu sync.Mutex
	last := ""
	return func(step string, frac float64) {
		mu.Lock()
		defer mu.Unlock()
		if step == last {
			return
		}
		last = step
		fmt.Fprintf(w, "[%3.0f%%] %s\n", frac*100, step)
	}
}

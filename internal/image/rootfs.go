package image

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Image names.
const (
	Busybox = "busybox"
	Debian  = "debian"
)

// Rootfs recipes. Changing a recipe string invalidates cached root
// filesystems built from it.
const (
	busyboxRecipe = "busybox/1"
	debianRecipe  = "debian/2"
)

const (
	busyboxRootfsSize = 64 << 20 // sparse
	debianRootfsSize  = 2 << 30  // sparse; room to apt-get install
	debianSuite       = "bookworm"
	defaultMirror     = "http://deb.debian.org/debian"
	guestHostname     = "smolvm"
	guestDNS          = "10.0.2.3"
)

var debianInclude = []string{"python3", "ca-certificates"}

// rootfsPlan is what ensureRootfs needs to know about one image name.
type rootfsPlan struct {
	name     string
	recipe   string
	packages []string
	size     int64
	key      string
	stage    func(ctx context.Context, dir string) error
	// tmpfsStage stages the tree in /dev/shm when it has room: dpkg
	// fsyncs every file it unpacks, which is slow on a real disk.
	tmpfsStage bool
}

// planRootfs resolves the recipe and content key for an image name.
func (b *builder) planRootfs(ctx context.Context) (rootfsPlan, error) {
	switch b.o.Name {
	case Busybox:
		bb, sum, err := b.staticBusybox(ctx)
		if err != nil {
			return rootfsPlan{}, err
		}
		p := rootfsPlan{
			name:     Busybox,
			recipe:   busyboxRecipe,
			packages: []string{"busybox-static sha256:" + sum},
			size:     busyboxRootfsSize,
		}
		p.stage = func(ctx context.Context, dir string) error { return b.stageBusybox(ctx, dir, bb) }
		p.key = rootfsKey(p)
		return p, nil
	case Debian:
		p := rootfsPlan{
			name:     Debian,
			recipe:   debianRecipe,
			packages: append([]string{"debootstrap " + debianSuite + " minbase"}, debianInclude...),
			size:     debianRootfsSize,
		}
		p.stage = b.stageDebian
		p.tmpfsStage = true
		p.key = rootfsKey(p)
		return p, nil
	}
	return rootfsPlan{}, fmt.Errorf("%w: %q (known: %s, %s)", ErrUnknownImage, b.o.Name, Busybox, Debian)
}

func rootfsKey(p rootfsPlan) string {
	s := fmt.Sprintf("%s\nsize %d\n%s\n", p.recipe, p.size, strings.Join(p.packages, "\n"))
	return sha256Hex([]byte(s))[:16]
}

// loadRootfs reads and checks rootfs/<dirName>/manifest.json.
func (b *builder) loadRootfs(dirName, key string) (rootfsManifest, error) {
	var rm rootfsManifest
	if dirName == "" || strings.ContainsAny(dirName, `/\`) {
		return rm, fmt.Errorf("bad rootfs dir %q", dirName)
	}
	if err := readJSON(filepath.Join(b.dir, "rootfs", dirName, manifestName), &rm); err != nil {
		return rm, err
	}
	if rm.FormatVersion != FormatVersion || rm.Key != key {
		return rm, fmt.Errorf("rootfs %s: stale manifest", dirName)
	}
	return rm, checkFiles(b.dir, rm.Rootfs)
}

// ensureRootfs returns the cached root filesystem for the plan, building it
// when missing. A forced rebuild never overwrites an existing rootfs file
// (VM overlays may use it as their backing file): it goes to a new dir.
func (b *builder) ensureRootfs(ctx context.Context, p rootfsPlan, prev *Manifest) (rootfsManifest, error) {
	base := p.name + "-" + p.key
	if !b.o.Force {
		if prev != nil && prev.RootfsKey == p.key {
			if d := pathComponent(prev.Rootfs.Path, 1); d != "" {
				if rm, err := b.loadRootfs(d, p.key); err == nil {
					return rm, nil
				}
			}
		}
		if rm, err := b.loadRootfs(base, p.key); err == nil {
			return rm, nil
		}
	}
	dirName := base
	for i := 2; ; i++ {
		if _, err := os.Lstat(filepath.Join(b.dir, "rootfs", dirName)); os.IsNotExist(err) {
			break
		}
		dirName = fmt.Sprintf("%s.%d", base, i)
	}

	work, err := b.tempDir("rootfs-" + p.name)
	if err != nil {
		return rootfsManifest{}, err
	}
	defer removeAllSafe(work)
	stage := filepath.Join(work, "stage")
	if p.tmpfsStage {
		if s, ok := b.tmpfsStageDir(); ok {
			stage = s
			defer removeAllSafe(stage)
		}
	}
	out := filepath.Join(work, "out")
	for _, d := range []string{stage, out} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return rootfsManifest{}, err
		}
		// The stage dir becomes the root directory of the file system.
		if err := os.Chmod(d, 0o755); err != nil {
			return rootfsManifest{}, err
		}
	}
	start := time.Now()
	if err := p.stage(ctx, stage); err != nil {
		return rootfsManifest{}, err
	}
	content, err := dirSize(stage)
	if err != nil {
		return rootfsManifest{}, err
	}
	size := p.size
	if min := content*2 + 32<<20; size < min {
		size = (min + (1<<20 - 1)) &^ (1<<20 - 1)
	}
	b.step(fmt.Sprintf("rootfs: mkfs.ext4 (%d MiB content, %d MiB image)", content>>20, size>>20), 0.9)
	img := filepath.Join(out, "rootfs.ext4")
	if err := makeExt4(ctx, b, stage, img, size); err != nil {
		return rootfsManifest{}, err
	}
	// The staged tree is not needed any more; free the space before publishing.
	if err := removeAllSafe(stage); err != nil {
		return rootfsManifest{}, err
	}
	b.step("rootfs: hashing", 0.96)
	rel := filepath.ToSlash(filepath.Join("rootfs", dirName))
	rm := rootfsManifest{
		FormatVersion: FormatVersion,
		Name:          p.name,
		Key:           p.key,
		Recipe:        p.recipe,
		Packages:      p.packages,
		CreatedAt:     time.Now().UTC(),
		ContentBytes:  content,
	}
	if rm.Rootfs, err = fileSumAs(out, "rootfs.ext4", rel+"/rootfs.ext4"); err != nil {
		return rm, err
	}
	if err := writeJSONAtomic(filepath.Join(out, manifestName), rm); err != nil {
		return rm, err
	}
	if err := publishDir(out, filepath.Join(b.dir, "rootfs", dirName)); err != nil {
		return rm, err
	}
	b.log.Info("rootfs cached", "name", p.name, "path", rm.Rootfs.Path, "content_bytes", content, "elapsed", time.Since(start).Round(time.Millisecond))
	return rm, nil
}

const shmDir = "/dev/shm"

// stagePrefix names tmpfs staging dirs of this cache dir, so that cleanTmp
// (under this cache's lock) only removes its own leftovers.
func (b *builder) stagePrefix() string {
	return "smolvm-stage-" + sha256Hex([]byte(b.dir))[:8] + "-"
}

// tmpfsStageDir makes a staging dir on /dev/shm when that is a tmpfs
// mounted without nodev and noexec, with at least 2 GiB free.
func (b *builder) tmpfsStageDir() (string, bool) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(shmDir, &st); err != nil || st.Type != tmpfsMagic {
		return "", false
	}
	// debootstrap needs device nodes and executables in its target.
	const stNoDev, stNoExec = 0x4, 0x8
	if st.Flags&(stNoDev|stNoExec) != 0 {
		return "", false
	}
	if free := int64(st.Bavail) * int64(st.Bsize); free < 2<<30 {
		return "", false
	}
	d, err := os.MkdirTemp(shmDir, b.stagePrefix())
	if err != nil {
		return "", false
	}
	b.log.Debug("staging on tmpfs", "dir", d)
	return d, true
}

const tmpfsMagic = 0x01021994

// pathComponent returns the i-th slash-separated component of p.
func pathComponent(p string, i int) string {
	parts := strings.Split(p, "/")
	if i < len(parts) {
		return parts[i]
	}
	return ""
}

// makeExt4 creates a sparse file of size bytes and formats it as ext4 with
// the contents of stage, owned by root.
func makeExt4(ctx context.Context, b *builder, stage, img string, size int64) error {
	f, err := os.OpenFile(img, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	args := []string{"-q", "-F", "-d", stage, "-E", "root_owner=0:0", "-L", "smolvm-root", "-m", "0"}
	if size > 512<<20 {
		// The default journal of a 2 GiB file system is 64 MiB, allocated
		// in every copy of the image; 16 MiB is plenty for a sandbox.
		args = append(args, "-J", "size=16")
	}
	err = runCmd(ctx, b.log, cmdSpec{}, "mkfs.ext4", append(args, img)...)
	if err != nil {
		return err
	}
	return fsutil.SyncFile(img)
}

// isStaticELF reports whether path is an ELF executable without a program
// interpreter (statically linked).
func isStaticELF(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return false
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

// staticBusybox returns a statically linked busybox: the host's when it is
// one, else the one from the busybox-static package.
func (b *builder) staticBusybox(ctx context.Context) (string, string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if isStaticELF(p) {
			sum, _, err := sha256File(p)
			return p, sum, err
		}
	}
	ver, debSum, err := b.aptCandidate(ctx, "busybox-static")
	if err != nil {
		if uerr := b.aptUpdate(ctx); uerr != nil {
			return "", "", err
		}
		if ver, debSum, err = b.aptCandidate(ctx, "busybox-static"); err != nil {
			return "", "", err
		}
	}
	deb, err := b.downloadDeb(ctx, "busybox-static", ver, debSum)
	if err != nil {
		return "", "", err
	}
	dst := filepath.Join(b.downloadDir(), fmt.Sprintf("busybox-static_%s.busybox", strings.ReplaceAll(ver, ":", "%3a")))
	if !isStaticELF(dst) {
		work, err := b.tempDir("busybox")
		if err != nil {
			return "", "", err
		}
		defer removeAllSafe(work)
		if err := runCmd(ctx, b.log, cmdSpec{}, "dpkg-deb", "-x", deb, work); err != nil {
			return "", "", err
		}
		var src string
		for _, p := range []string{"bin/busybox", "usr/bin/busybox"} {
			if isStaticELF(filepath.Join(work, p)) {
				src = filepath.Join(work, p)
				break
			}
		}
		if src == "" {
			return "", "", fmt.Errorf("%s: no static busybox inside", deb)
		}
		if err := copyFile(src, dst, 0o755); err != nil {
			return "", "", err
		}
	}
	sum, _, err := sha256File(dst)
	return dst, sum, err
}

// stageBusybox lays out a busybox root filesystem in dir.
func (b *builder) stageBusybox(ctx context.Context, dir, busybox string) error {
	b.step("rootfs: staging busybox", 0.1)
	for _, d := range []struct {
		p    string
		mode os.FileMode
	}{
		{"bin", 0o755}, {"sbin", 0o755}, {"usr/bin", 0o755}, {"usr/sbin", 0o755},
		{"etc/profile.d", 0o755}, {"dev", 0o755}, {"proc", 0o555}, {"sys", 0o555},
		{"run", 0o755}, {"var/log", 0o755}, {"var/tmp", 0o1777}, {"tmp", 0o1777},
		{"root", 0o700}, {"home", 0o755}, {"mnt", 0o755},
	} {
		p := filepath.Join(dir, d.p)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return err
		}
		if err := os.Chmod(p, d.mode); err != nil {
			return err
		}
	}
	if err := copyFile(busybox, filepath.Join(dir, "bin/busybox"), 0o755); err != nil {
		return err
	}
	list, err := outputCmd(ctx, b.log, busybox, "--list-full")
	if err != nil {
		return err
	}
	n := 0
	for _, app := range strings.Fields(list) {
		app = strings.TrimPrefix(app, "/")
		if !strings.Contains(app, "/") || strings.Contains(app, "..") || app == "bin/busybox" {
			continue // e.g. "linuxrc"
		}
		p := filepath.Join(dir, app)
		if _, err := os.Lstat(p); err == nil {
			continue
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.Symlink("/bin/busybox", p); err != nil {
			return err
		}
		n++
	}
	if _, err := os.Lstat(filepath.Join(dir, "bin/sh")); err != nil {
		if err := os.Symlink("/bin/busybox", filepath.Join(dir, "bin/sh")); err != nil {
			return err
		}
	}
	b.log.Debug("busybox applets linked", "count", n)
	files := map[string]string{
		"etc/passwd":      "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/group":       "root:x:0:\nnogroup:x:65534:\n",
		"etc/shadow":      "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n",
		"etc/hostname":    guestHostname + "\n",
		"etc/hosts":       "127.0.0.1\tlocalhost\n127.0.1.1\t" + guestHostname + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"etc/resolv.conf": "nameserver " + guestDNS + "\n",
		"etc/profile": `export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME="${HOME:-/root}"
for f in /etc/profile.d/*.sh; do [ -r "$f" ] && . "$f"; done
unset f
`,
		"etc/os-release": "NAME=\"smolvm busybox\"\nID=busybox\nPRETTY_NAME=\"smolvm busybox\"\n",
	}
	for name, content := range files {
		mode := os.FileMode(0o644)
		if name == "etc/shadow" {
			mode = 0o600
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), mode); err != nil {
			return err
		}
	}
	return nil
}

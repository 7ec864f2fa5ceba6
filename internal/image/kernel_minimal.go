package image

import (
	"bufio"
	"context"
	_ "embed"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// MicrovmFragment is the kernel config fragment of the minimal kernel:
// everything a microVM needs built in, no modules.
//
//go:embed microvm.fragment
var MicrovmFragment string

const (
	minimalRecipe    = "minimal/1" // bump when the build steps change
	linuxSourcePkg   = "linux-source-6.1"
	linuxSourceTarXZ = "/usr/src/linux-source-6.1.tar.xz"
)

// minimalBuildDeps are installed with apt-get before building.
var minimalBuildDeps = []string{linuxSourcePkg, "flex", "bison", "libelf-dev", "bc", "make", "gcc", "xz-utils"}

func minimalInputKey() string {
	return sha256Hex([]byte(minimalRecipe + "\n" + linuxSourcePkg + "\n" + MicrovmFragment))[:12]
}

// ensureMinimalKernel builds (about 17 minutes on 2 cores) or reuses the
// minimal kernel: linux-source-6.1 + tinyconfig + MicrovmFragment.
func (b *builder) ensureMinimalKernel(ctx context.Context, prev *Manifest) (kernelManifest, error) {
	key := minimalInputKey()
	if !b.o.Force {
		if prev != nil && prev.KernelFlavor == KernelMinimal {
			if km, err := b.loadKernel(prev.KernelID); err == nil && km.InputKey == key {
				return b.ensureVmlinux(ctx, km)
			}
		}
		for _, km := range b.cachedKernels(KernelMinimal) {
			if km.InputKey == key {
				return b.ensureVmlinux(ctx, km)
			}
		}
	}
	if os.Geteuid() != 0 {
		return kernelManifest{}, fmt.Errorf("building the minimal kernel installs %s with apt-get: needs root", strings.Join(minimalBuildDeps, " "))
	}
	b.step("kernel: installing "+strings.Join(minimalBuildDeps, " "), 0.01)
	install := func() error {
		return runCmd(ctx, b.log, cmdSpec{OnLine: b.lineStep("apt-get install"), Env: []string{"DEBIAN_FRONTEND=noninteractive"}},
			"apt-get", append([]string{"install", "-y", "-q", "--no-install-recommends"}, minimalBuildDeps...)...)
	}
	if err := install(); err != nil {
		if ctx.Err() != nil {
			return kernelManifest{}, err
		}
		if uerr := b.aptUpdate(ctx); uerr != nil {
			return kernelManifest{}, fmt.Errorf("%w (apt-get update: %v)", err, uerr)
		}
		if err := install(); err != nil {
			return kernelManifest{}, err
		}
	}
	srcVer, err := outputCmd(ctx, b.log, "dpkg-query", "-W", "-f=${Version}", linuxSourcePkg)
	if err != nil {
		return kernelManifest{}, err
	}
	srcVer = strings.TrimSpace(srcVer)

	work, err := b.tempDir("kernel-minimal")
	if err != nil {
		return kernelManifest{}, err
	}
	defer removeAllSafe(work)
	src, err := extractLinuxSource(ctx, b, work)
	if err != nil {
		return kernelManifest{}, err
	}
	if err := ConfigureMinimalKernel(ctx, src, b.log, b.lineStep("kernel config")); err != nil {
		return kernelManifest{}, err
	}
	jobs := fmt.Sprint(runtime.NumCPU())
	b.step("kernel: make -j"+jobs+" bzImage vmlinux (takes about 17 minutes on 2 cores)", 0.12)
	kb := &kbuildProgress{b: b, total: 2100}
	if err := runCmd(ctx, b.log, cmdSpec{Dir: src, OnLine: kb.line}, "make", "-j"+jobs, "bzImage", "vmlinux"); err != nil {
		return kernelManifest{}, err
	}
	return b.publishMinimalKernel(ctx, src, srcVer, work)
}

// publishMinimalKernel caches the bzImage, vmlinux and .config of the built
// kernel tree src (from linux-source version srcVer) under kernels/.
func (b *builder) publishMinimalKernel(ctx context.Context, src, srcVer, work string) (kernelManifest, error) {
	key := minimalInputKey()
	release, err := outputCmd(ctx, b.log, "make", "-s", "-C", src, "kernelrelease")
	if err != nil {
		return kernelManifest{}, err
	}
	release = strings.TrimSpace(release)

	id := fmt.Sprintf("%s-%s-%s", KernelMinimal, release, key)
	out := filepath.Join(work, "out")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return kernelManifest{}, err
	}
	for _, c := range [][2]string{{"arch/x86/boot/bzImage", "bzImage"}, {"vmlinux", "vmlinux"}, {".config", "config"}} {
		if err := copyFile(filepath.Join(src, c[0]), filepath.Join(out, c[1]), 0o644); err != nil {
			return kernelManifest{}, err
		}
	}
	rel := func(p string) string { return filepath.ToSlash(filepath.Join("kernels", id, p)) }
	km := kernelManifest{
		FormatVersion: FormatVersion,
		ID:            id,
		Flavor:        KernelMinimal,
		Release:       release,
		Package:       linuxSourcePkg,
		Version:       srcVer,
		InputKey:      key,
		CreatedAt:     time.Now().UTC(),
	}
	if km.Kernel, err = fileSumAs(out, "bzImage", rel("bzImage")); err != nil {
		return km, err
	}
	vm, err := fileSumAs(out, "vmlinux", rel("vmlinux"))
	if err != nil {
		return km, err
	}
	km.Vmlinux = &vm
	cfg, err := fileSumAs(out, "config", rel("config"))
	if err != nil {
		return km, err
	}
	km.Config = &cfg
	if err := writeJSONAtomic(filepath.Join(out, manifestName), km); err != nil {
		return km, err
	}
	if err := publishDir(out, filepath.Join(b.dir, "kernels", id)); err != nil {
		return km, err
	}
	b.log.Info("minimal kernel cached", "id", id)
	return km, nil
}

// extractLinuxSource unpacks /usr/src/linux-source-6.1.tar.xz into work and
// returns the source directory.
func extractLinuxSource(ctx context.Context, b *builder, work string) (string, error) {
	b.step("kernel: extracting "+linuxSourceTarXZ, 0.05)
	if err := runCmd(ctx, b.log, cmdSpec{}, "tar", "-C", work, "-xJf", linuxSourceTarXZ); err != nil {
		return "", err
	}
	m, _ := filepath.Glob(filepath.Join(work, "linux-source-*"))
	if len(m) != 1 {
		return "", fmt.Errorf("%s: expected one linux-source-* directory, found %d", linuxSourceTarXZ, len(m))
	}
	return m[0], nil
}

// ConfigureMinimalKernel writes the minimal kernel's .config in the kernel
// source tree src: make tinyconfig, merge MicrovmFragment, make
// olddefconfig. It fails when an option of the fragment did not survive
// olddefconfig (missing dependency or a renamed symbol).
func ConfigureMinimalKernel(ctx context.Context, src string, log *slog.Logger, onLine func(string)) error {
	spec := cmdSpec{Dir: src, OnLine: onLine}
	if err := runCmd(ctx, log, spec, "make", "tinyconfig"); err != nil {
		return err
	}
	cfgPath := filepath.Join(src, ".config")
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	want := parseFragment(MicrovmFragment)
	merged := mergeConfig(string(cfg), want)
	if err := os.WriteFile(cfgPath, []byte(merged), 0o644); err != nil {
		return err
	}
	if err := runCmd(ctx, log, spec, "make", "olddefconfig"); err != nil {
		return err
	}
	cfg, err = os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	got := parseConfig(string(cfg))
	var lost []string
	for _, kv := range want {
		g, ok := got[kv[0]]
		if kv[1] == "n" {
			if ok && g != "n" {
				lost = append(lost, fmt.Sprintf("%s=%s (want n)", kv[0], g))
			}
			continue
		}
		if g != kv[1] {
			if g == "" {
				g = "unset"
			}
			lost = append(lost, fmt.Sprintf("%s=%s (want %s)", kv[0], g, kv[1]))
		}
	}
	if len(lost) > 0 {
		return fmt.Errorf("kernel config: options of the fragment not applied: %s", strings.Join(lost, ", "))
	}
	return nil
}

// parseFragment returns the CONFIG_X=value lines of a fragment, in order.
// "# CONFIG_X is not set" is returned as value "n".
func parseFragment(s string) [][2]string {
	var out [][2]string
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, ok := notSet(line); ok {
			out = append(out, [2]string{k, "n"})
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			out = append(out, [2]string{k, v})
		}
	}
	return out
}

func notSet(line string) (string, bool) {
	if strings.HasPrefix(line, "# CONFIG_") && strings.HasSuffix(line, " is not set") {
		return strings.TrimSuffix(strings.TrimPrefix(line, "# "), " is not set"), true
	}
	return "", false
}

// parseConfig maps each symbol of a .config to its value ("n" when not set).
func parseConfig(s string) map[string]string {
	m := map[string]string{}
	for _, kv := range parseFragment(s) {
		m[kv[0]] = kv[1]
	}
	return m
}

// kconfigChoices are the choice groups the fragment selects a member of.
// Selecting one member must unset the others, or olddefconfig keeps the
// member tinyconfig picked.
var kconfigChoices = [][]string{
	{"CONFIG_KERNEL_GZIP", "CONFIG_KERNEL_BZIP2", "CONFIG_KERNEL_LZMA", "CONFIG_KERNEL_XZ", "CONFIG_KERNEL_LZO", "CONFIG_KERNEL_LZ4", "CONFIG_KERNEL_ZSTD"},
	{"CONFIG_UNWINDER_ORC", "CONFIG_UNWINDER_FRAME_POINTER", "CONFIG_UNWINDER_GUESS"},
}

// mergeConfig overrides (or appends) the fragment's symbols in a .config.
func mergeConfig(cfg string, frag [][2]string) string {
	want := map[string]string{}
	for _, kv := range frag {
		want[kv[0]] = kv[1]
	}
	for _, group := range kconfigChoices {
		for _, sym := range group {
			if want[sym] != "y" {
				continue
			}
			for _, other := range group {
				if other != sym {
					if _, set := want[other]; !set {
						want[other] = "n"
						frag = append(frag, [2]string{other, "n"})
					}
				}
			}
		}
	}
	render := func(k, v string) string {
		if v == "n" {
			return "# " + k + " is not set"
		}
		return k + "=" + v
	}
	var b strings.Builder
	done := map[string]bool{}
	for _, line := range strings.Split(strings.TrimRight(cfg, "\n"), "\n") {
		k, ok := notSet(strings.TrimSpace(line))
		if !ok {
			if kk, _, ok2 := strings.Cut(line, "="); ok2 && strings.HasPrefix(kk, "CONFIG_") {
				k, ok = kk, true
			}
		}
		if v, hit := want[k]; ok && hit {
			if !done[k] {
				b.WriteString(render(k, v) + "\n")
				done[k] = true
			}
			continue
		}
		b.WriteString(line + "\n")
	}
	for _, kv := range frag {
		if !done[kv[0]] {
			b.WriteString(render(kv[0], kv[1]) + "\n")
			done[kv[0]] = true
		}
	}
	return b.String()
}

// kbuildProgress estimates kernel build progress from kbuild's output lines.
type kbuildProgress struct {
	b     *builder
	n     int
	total int
	last  time.Time
}

func (k *kbuildProgress) line(s string) {
	k.n++
	if time.Since(k.last) < 2*time.Second {
		return
	}
	k.last = time.Now()
	frac := 0.12 + 0.86*min(1, float64(k.n)/float64(k.total))
	k.b.step("kernel: build: "+strings.TrimSpace(s), frac)
}

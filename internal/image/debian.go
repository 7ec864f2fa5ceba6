package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// stageDebian runs debootstrap (minbase + python3 + ca-certificates) into
// dir and trims the result while keeping apt usable in the guest.
func (b *builder) stageDebian(ctx context.Context, dir string) error {
	if os.Geteuid() != 0 {
		return errors.New("building the debian image needs root (debootstrap)")
	}
	mirror := b.o.Mirror
	if mirror == "" {
		mirror = defaultMirror
	}
	cache := filepath.Join(b.downloadDir(), "debootstrap")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return err
	}
	b.step("rootfs: debootstrap "+debianSuite+" (minbase, "+strings.Join(debianInclude, ",")+")", 0.02)
	prog := &debootstrapProgress{b: b}
	err := runCmd(ctx, b.log, cmdSpec{OnLine: prog.line, Env: []string{"DEBIAN_FRONTEND=noninteractive", "LC_ALL=C"}},
		"debootstrap", "--variant=minbase", "--include="+strings.Join(debianInclude, ","),
		"--cache-dir="+cache, debianSuite, dir, mirror)
	// debootstrap mounts /proc and /sys inside the target; an interrupted
	// run can leave them behind.
	if uerr := unmountUnder(dir); uerr != nil && err == nil {
		err = uerr
	}
	if err != nil {
		return err
	}
	b.step("rootfs: configuring and trimming the debian tree", 0.86)
	return finishDebian(dir, mirror)
}

// finishDebian writes the guest configuration and removes what a sandbox
// does not need (package caches, apt lists, docs, man pages, locales).
func finishDebian(dir, mirror string) error {
	files := map[string]string{
		"etc/apt/sources.list": fmt.Sprintf("deb %[1]s %[2]s main\ndeb %[1]s %[2]s-updates main\ndeb http://deb.debian.org/debian-security %[2]s-security main\n",
			mirror, debianSuite),
		"etc/hostname":    guestHostname + "\n",
		"etc/hosts":       "127.0.0.1\tlocalhost\n127.0.1.1\t" + guestHostname + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"etc/resolv.conf": "nameserver " + guestDNS + "\n",
		"etc/fstab":       "# The root file system is mounted by the smolvm agent.\n",
		// Keep later apt-get installs small too.
		"etc/dpkg/dpkg.cfg.d/01-smolvm-nodoc": `path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
`,
		"etc/apt/apt.conf.d/01-smolvm": "Acquire::Languages \"none\";\n",
	}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		os.Remove(p) // resolv.conf may be a symlink
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return err
		}
	}
	// Clones must not share an identity.
	if _, err := os.Stat(filepath.Join(dir, "etc/machine-id")); err == nil {
		if err := os.WriteFile(filepath.Join(dir, "etc/machine-id"), nil, 0o444); err != nil {
			return err
		}
	}
	// Empty these directories but keep them (and apt's partial/ and lock).
	for _, d := range []string{
		"var/cache/apt/archives", "var/lib/apt/lists", "usr/share/man", "usr/share/info",
		"usr/share/lintian", "usr/share/linda", "var/cache/man", "usr/share/locale",
	} {
		if err := emptyDir(filepath.Join(dir, d), func(rel string) bool {
			return rel == "partial" || rel == "lock" || rel == "locale.alias"
		}); err != nil {
			return err
		}
	}
	for _, g := range []string{"var/cache/apt/*.bin", "var/cache/debconf/*-old", "var/lib/dpkg/*-old", "var/log/*.log", "var/log/apt/*"} {
		m, _ := filepath.Glob(filepath.Join(dir, g))
		for _, p := range m {
			os.RemoveAll(p)
		}
	}
	// Docs: keep only the copyright files.
	doc := filepath.Join(dir, "usr/share/doc")
	return filepath.WalkDir(doc, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if p == doc {
			return nil
		}
		if !d.IsDir() && d.Name() != "copyright" {
			return os.Remove(p)
		}
		return nil
	})
}

// emptyDir removes everything in dir except top-level names keep accepts.
func emptyDir(dir string, keep func(string) bool) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range ents {
		if keep(e.Name()) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// debootstrapProgress turns debootstrap's "I: ..." lines into progress.
type debootstrapProgress struct {
	b     *builder
	phase int
	n     int
}

// phases of a debootstrap run: the line prefixes that start each, the
// fraction of the rootfs stage at which it starts, and the typical number
// of lines it prints.
var debootstrapPhases = []struct {
	prefixes []string
	start    float64
	lines    int
}{
	{[]string{"I: Retrieving", "I: Checking", "I: Valid", "I: Resolving", "I: Found"}, 0.02, 250},
	{[]string{"I: Extracting"}, 0.40, 25},
	{[]string{"I: Installing core", "I: Unpacking required"}, 0.48, 26},
	{[]string{"I: Configuring required"}, 0.58, 25},
	{[]string{"I: Unpacking the base"}, 0.66, 90},
	{[]string{"I: Configuring the base"}, 0.74, 90},
	{[]string{"I: Base system installed"}, 0.85, 1},
}

func (p *debootstrapProgress) line(s string) {
	s = strings.TrimSpace(s)
	if s == "" {
		return
	}
next:
	for i := p.phase + 1; i < len(debootstrapPhases); i++ {
		for _, pre := range debootstrapPhases[i].prefixes {
			if strings.HasPrefix(s, pre) {
				p.phase, p.n = i, 0
				break next
			}
		}
	}
	p.n++
	ph := debootstrapPhases[p.phase]
	end := 0.85
	if p.phase+1 < len(debootstrapPhases) {
		end = debootstrapPhases[p.phase+1].start
	}
	frac := ph.start + (end-ph.start)*min(1, float64(p.n)/float64(ph.lines))
	p.b.step("rootfs: debootstrap: "+strings.TrimPrefix(s, "I: "), frac)
}

package image

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// GuestModules are the modules the Debian cloud kernel needs in the
// initramfs for a microVM (virtio transports, disk, network, console,
// vsock, rng). ext4 is built into that kernel.
var GuestModules = []string{
	"virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio",
	"virtio_pci", "virtio_mmio", "virtio_blk", "failover", "net_failover",
	"virtio_net", "virtio_console", "vsock", "vmw_vsock_virtio_transport_common",
	"vmw_vsock_virtio_transport", "virtio-rng", "virtio_balloon",
}

// Module is one kernel module of a closure.
type Module struct {
	Name    string   // canonical name (underscores), e.g. "virtio_pci"
	Path    string   // path relative to the module root, e.g. "kernel/drivers/virtio/virtio_pci.ko"
	Depends []string // canonical names from .modinfo depends=
}

// ModInfo reads the .modinfo section of a .ko file: key=value pairs
// (keys may repeat, e.g. alias).
func ModInfo(path string) (map[string][]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("modinfo %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("modinfo %s: no .modinfo section", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("modinfo %s: %w", path, err)
	}
	out := map[string][]string{}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok || k == "" {
			continue
		}
		out[k] = append(out[k], v)
	}
	return out, nil
}

// canonModName maps a module or file name to the kernel's canonical form:
// no directory, no .ko suffix, dashes as underscores.
func canonModName(s string) string {
	s = filepath.Base(s)
	s = strings.TrimSuffix(s, ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// ModuleClosure resolves names (dashes and underscores are equivalent) to
// .ko files under modRoot (a lib/modules/<version> directory), adds their
// dependencies transitively from each module's .modinfo depends= field,
// and returns them dependencies first. Among independent modules the order
// of names is kept. It does not need depmod or modules.dep.
func ModuleClosure(modRoot string, names []string) ([]Module, error) {
	index := map[string]string{} // canonical name -> path relative to modRoot
	err := filepath.WalkDir(modRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && strings.HasSuffix(p, ".ko") {
			rel, err := filepath.Rel(modRoot, p)
			if err != nil {
				return err
			}
			n := canonModName(p)
			if prev, dup := index[n]; !dup || rel < prev {
				index[n] = rel
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan modules: %w", err)
	}
	if len(index) == 0 {
		return nil, fmt.Errorf("no .ko files under %s", modRoot)
	}

	const (
		unvisited = iota
		visiting
		done
	)
	state := map[string]int{}
	var out []Module
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("module dependency cycle: %s -> %s", strings.Join(chain, " -> "), name)
		}
		rel, ok := index[name]
		if !ok {
			if len(chain) > 0 {
				return fmt.Errorf("module %s (needed by %s) not found under %s", name, chain[len(chain)-1], modRoot)
			}
			return fmt.Errorf("module %s not found under %s", name, modRoot)
		}
		state[name] = visiting
		info, err := ModInfo(filepath.Join(modRoot, rel))
		if err != nil {
			return err
		}
		var deps []string
		for _, v := range info["depends"] {
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, canonModName(d))
				}
			}
		}
		sort.Strings(deps)
		for _, d := range deps {
			if err := visit(d, append(chain, name)); err != nil {
				return err
			}
		}
		state[name] = done
		out = append(out, Module{Name: name, Path: rel, Depends: deps})
		return nil
	}
	for _, n := range names {
		if err := visit(canonModName(n), nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// kernelModuleRoot returns the single lib/modules/<version> directory in an
// extracted kernel package tree, and the version.
func kernelModuleRoot(tree string) (string, string, error) {
	for _, base := range []string{"lib/modules", "usr/lib/modules"} {
		ents, err := os.ReadDir(filepath.Join(tree, base))
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				return filepath.Join(tree, base, e.Name()), e.Name(), nil
			}
		}
	}
	return "", "", fmt.Errorf("no lib/modules/<version> in %s", tree)
}

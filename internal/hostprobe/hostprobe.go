// Package hostprobe answers questions about this host that backends ask
// when they decide whether (and how) they can run VMs here: whether KVM
// can run stock guest kernels (not PVM), whether a binary is on PATH and
// which version it is, how much disk space a directory has.
package hostprobe

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Env names the host files the probes read (overridable in tests).
type Env struct {
	DevKVM    string // /dev/kvm
	CPUInfo   string // /proc/cpuinfo
	PVMModule string // /sys/module/kvm_pvm
}

// Default is the real host.
var Default = Env{DevKVM: "/dev/kvm", CPUInfo: "/proc/cpuinfo", PVMModule: "/sys/module/kvm_pvm"}

// KVMUnusable returns why KVM cannot run stock guest kernels here, or ""
// when it can: /dev/kvm opens read-write, the CPU has the vmx or svm flag
// and the kvm_pvm module is not loaded.
func KVMUnusable(env Env) string {
	f, err := os.OpenFile(env.DevKVM, os.O_RDWR, 0)
	if err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist):
			return env.DevKVM + " does not exist"
		case errors.Is(err, os.ErrPermission):
			return env.DevKVM + " is not accessible: permission denied"
		default:
			return fmt.Sprintf("cannot open %s: %v", env.DevKVM, err)
		}
	}
	f.Close()
	if IsPVM(env) {
		return env.DevKVM + " is PVM: kvm_pvm loaded"
	}
	flags, err := cpuFlags(env.CPUInfo)
	if err != nil {
		return "cannot read " + env.CPUInfo + ": " + err.Error()
	}
	if !flags["vmx"] && !flags["svm"] {
		return "CPU has no vmx/svm flag"
	}
	return ""
}

// IsPVM reports whether /dev/kvm is PVM (the kvm_pvm module is loaded).
func IsPVM(env Env) bool {
	_, err := os.Stat(env.PVMModule)
	return err == nil
}

// Binary returns the absolute path of name on PATH, or "" and why not.
func Binary(name string) (path, reason string) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", name + " is not on PATH"
	}
	return p, ""
}

// VersionTimeout bounds Version: a binary that does not answer --version
// in this time is reported as not runnable.
const VersionTimeout = 10 * time.Second

// Version runs "path --version" (at most VersionTimeout) and returns the
// first line of its output.
func Version(ctx context.Context, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, VersionTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", path, err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line), nil
}

// FreeSpace returns the bytes an unprivileged user may still write on the
// file system of dir, measured at dir or, when dir does not exist yet, at
// its nearest existing parent (returned as at).
func FreeSpace(dir string) (free uint64, at string, err error) {
	at = filepath.Clean(dir)
	for {
		if _, err := os.Stat(at); err == nil || at == "/" || at == "." {
			break
		}
		at = filepath.Dir(at)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(at, &st); err != nil {
		return 0, at, fmt.Errorf("statfs %s: %w", at, err)
	}
	return st.Bavail * uint64(st.Bsize), at, nil
}

func cpuFlags(path string) (map[string]bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	flags := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, f := range strings.Fields(v) {
			flags[f] = true
		}
		break
	}
	return flags, sc.Err()
}

// CPU is the first processor of /proc/cpuinfo: vendor_id, model name and
// flags (sorted as the kernel lists them).
type CPU struct {
	Vendor string
	Model  string
	Flags  []string
}

// ReadCPU reads the first processor's vendor, model name and flags.
func ReadCPU(env Env) (CPU, error) {
	var c CPU
	b, err := os.ReadFile(env.CPUInfo)
	if err != nil {
		return c, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if sc.Text() == "" && c.Vendor != "" {
			break // end of the first processor
		}
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "vendor_id":
			c.Vendor = strings.TrimSpace(v)
		case "model name":
			c.Model = strings.TrimSpace(v)
		case "flags":
			c.Flags = strings.Fields(v)
		}
	}
	return c, sc.Err()
}

// Package hostprobe answers questions about this host that backends ask
// when they decide whether (and how) they can run VMs here: whether KVM
// can run stock guest kernels (not PVM), whether a binary is on PATH.
package hostprobe

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
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

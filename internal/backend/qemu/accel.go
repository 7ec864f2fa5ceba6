package qemu

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/hostprobe"
)

// hostEnv names the host files the probes read (overridable in tests).
type hostEnv = hostprobe.Env

var defaultHost = hostprobe.Default

func kvmUnusable(env hostEnv) string { return hostprobe.KVMUnusable(env) }
func isPVM(env hostEnv) bool         { return hostprobe.IsPVM(env) }

// ProbeAccel resolves the requested accelerator on this host. For AccelAuto
// it returns AccelKVM only if /dev/kvm opens read-write, the CPU has the vmx
// or svm flag and the kvm_pvm module is not loaded; otherwise AccelTCG and a
// one-line notice naming the reason, which the caller should log once.
// AccelKVM and AccelTCG are returned as forced (with a warning notice when
// KVM is forced on a host where it looks unusable).
func ProbeAccel(req backend.Accel) (backend.Accel, string, error) {
	return probeAccel(req, defaultHost)
}

func probeAccel(req backend.Accel, env hostEnv) (backend.Accel, string, error) {
	switch req {
	case backend.AccelTCG:
		return backend.AccelTCG, "", nil
	case backend.AccelKVM:
		if reason := kvmUnusable(env); reason != "" {
			return backend.AccelKVM, fmt.Sprintf("warning: KVM forced but it looks unusable here (%s)", reason), nil
		}
		return backend.AccelKVM, "", nil
	case backend.AccelAuto, "":
		if reason := kvmUnusable(env); reason != "" {
			return backend.AccelTCG, fmt.Sprintf("notice: KVM unusable here (%s) — using TCG software emulation (slower)", reason), nil
		}
		return backend.AccelKVM, "", nil
	default:
		return "", "", fmt.Errorf("qemu: unknown accelerator %q (want auto, kvm or tcg)", req)
	}
}

// hostTSCkHz reads the first "cpu MHz" line of /proc/cpuinfo as kHz
// ("2445.404" -> 2445404). It returns 0 when unknown.
func hostTSCkHz(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		return parseMHzAsKHz(strings.TrimSpace(v))
	}
	return 0
}

func parseMHzAsKHz(s string) int {
	whole, frac, _ := strings.Cut(s, ".")
	w, err := strconv.Atoi(whole)
	if err != nil || w <= 0 {
		return 0
	}
	frac = (frac + "000")[:3]
	f, err := strconv.Atoi(frac)
	if err != nil {
		return 0
	}
	return w*1000 + f
}

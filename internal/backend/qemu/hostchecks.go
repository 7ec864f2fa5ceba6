package qemu

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/hostprobe"
)

// hostChecks is what the QEMU backend needs from the host: the emulator
// and qemu-img, the network sidecar, an accelerator (KVM, else TCG) and
// seccomp (QEMU always runs under -sandbox).
func hostChecks(ctx context.Context) []backend.Check {
	var out []backend.Check
	qemuPath, err := lookBinary("", "qemu-system-x86_64")
	if err != nil {
		out = append(out, backend.Check{Name: "qemu", Status: backend.CheckFail, Detail: "qemu-system-x86_64 not found",
			Fix: "scripts/setup (or: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils)"})
	} else if v, err := hostprobe.Version(ctx, qemuPath); err != nil {
		out = append(out, backend.Check{Name: "qemu", Status: backend.CheckFail, Detail: "cannot run " + qemuPath + ": " + err.Error(),
			Fix: "scripts/setup"})
	} else {
		out = append(out, backend.Check{Name: "qemu", Status: backend.CheckOK, Detail: v})
	}

	if _, err := lookBinary("", "qemu-img"); err != nil {
		out = append(out, backend.Check{Name: "qemu-img", Status: backend.CheckFail, Detail: "qemu-img not found", Fix: "apt-get install qemu-utils"})
	} else {
		out = append(out, backend.Check{Name: "qemu-img", Status: backend.CheckOK, Detail: "found"})
	}

	if p, err := NetHelper(); err != nil {
		out = append(out, backend.Check{Name: "network sidecar", Status: backend.CheckFail, Detail: err.Error(),
			Fix: "scripts/setup (or: go build -o bin/smolvm-net ./cmd/smolvm-net next to bin/smolvm)"})
	} else {
		out = append(out, backend.Check{Name: "network sidecar", Status: backend.CheckOK, Detail: p})
	}

	out = append(out, accelCheck(defaultHost))
	if qemuPath != "" {
		out = append(out, seccompCheck(ctx, qemuPath))
	}
	return out
}

// accelCheck reports the accelerator "auto" picks: KVM, else TCG (works,
// slowly: a warning with the reason).
func accelCheck(env hostEnv) backend.Check {
	acc, notice, err := probeAccel(backend.AccelAuto, env)
	switch {
	case err != nil:
		return backend.Check{Name: "accel", Status: backend.CheckFail, Detail: err.Error()}
	case acc == backend.AccelKVM:
		return backend.Check{Name: "accel", Status: backend.CheckOK, Detail: "kvm"}
	}
	return backend.Check{Name: "accel", Status: backend.CheckWarn, Detail: "tcg (software emulation): " + notice,
		Fix: "for hardware speed, run on a host with usable KVM (vmx/svm, /dev/kvm)"}
}

// seccompCheck: QEMU always runs under -sandbox, so a QEMU or kernel
// without it cannot start VMs. As root QEMU needs elevateprivileges=allow
// for its uid drop (no capabilities are left after it); otherwise deny.
func seccompCheck(ctx context.Context, qemuPath string) backend.Check {
	c := backend.Check{Name: "seccomp", Status: backend.CheckOK}
	ctx, cancel := context.WithTimeout(ctx, hostprobe.VersionTimeout)
	defer cancel()
	if b, err := os.ReadFile("/proc/sys/kernel/seccomp/actions_avail"); err != nil {
		c.Status, c.Detail = backend.CheckFail, "the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
		c.Fix = "run on a kernel with seccomp filter support: QEMU is always started with -sandbox on"
	} else if help, err := exec.CommandContext(ctx, qemuPath, "-help").Output(); err != nil {
		c.Status, c.Detail = backend.CheckFail, "cannot run "+qemuPath+": "+err.Error()
		c.Fix = "scripts/setup"
	} else if !bytes.Contains(help, []byte("\n-sandbox")) {
		c.Status, c.Detail = backend.CheckFail, qemuPath+" was built without seccomp (-sandbox)"
		c.Fix = "install a QEMU built with libseccomp (Debian's qemu-system-x86 is)"
	} else {
		elevate := "elevateprivileges=deny"
		if os.Geteuid() == 0 {
			elevate = "elevateprivileges=allow (needed for the uid drop; no capabilities after it), chrooted to an empty dir"
		}
		c.Detail = "QEMU runs under -sandbox (obsolete, spawn, resourcecontrol denied; " + elevate +
			"; kernel actions: " + strings.TrimSpace(string(b)) + ")"
	}
	return c
}

package qemu

import (
	"bytes"
	"os"
	"os/exec"
	"strings"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// QEMU registers itself. It is usable on any host (TCG when KVM is not),
// so "auto" takes it when nothing ranks higher; a missing binary is
// reported when a VM starts.
func init() {
	backend.Register(backend.Registration{
		Name:       "qemu",
		New:        func(o backend.Options) (backend.Backend, error) { return New(Options{Logger: o.Logger}), nil },
		AutoRank:   0,
		VMMComms:   []string{"qemu-system"},
		HostChecks: hostChecks,
	})
}

// hostChecks reports seccomp: QEMU always runs under -sandbox, so a QEMU
// or kernel without it cannot start VMs. Nothing when QEMU is not installed.
func hostChecks() []backend.HostCheck {
	qemuPath, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil
	}
	c := backend.HostCheck{Name: "seccomp", OK: true}
	if b, err := os.ReadFile("/proc/sys/kernel/seccomp/actions_avail"); err != nil {
		c.OK, c.Detail = false, "the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)"
		c.Fix = "run on a kernel with seccomp filter support: QEMU is always started with -sandbox on"
	} else if help, err := exec.Command(qemuPath, "-help").Output(); err != nil {
		c.OK, c.Detail = false, "cannot run "+qemuPath+": "+err.Error()
		c.Fix = "scripts/setup"
	} else if !bytes.Contains(help, []byte("\n-sandbox")) {
		c.OK, c.Detail = false, qemuPath+" was built without seccomp (-sandbox)"
		c.Fix = "install a QEMU built with libseccomp (Debian's qemu-system-x86 is)"
	} else {
		c.Detail = "QEMU runs under -sandbox (obsolete, spawn, resourcecontrol denied; kernel actions: " + strings.TrimSpace(string(b)) + ")"
	}
	return []backend.HostCheck{c}
}

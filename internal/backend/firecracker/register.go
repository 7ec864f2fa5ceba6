package firecracker

import (
	"os"
	"os/exec"
	"path/filepath"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/hostprobe"
)

// Firecracker registers itself. "auto" prefers it (rank 10) when its
// binary is on PATH and KVM is usable: it cannot run without KVM.
func init() {
	backend.Register(backend.Registration{
		Name: Name,
		New: func(backend.Options) (backend.Backend, error) {
			b, err := New(Options{})
			if err != nil {
				return nil, err
			}
			return b, nil
		},
		Usable:     usable,
		AutoRank:   10,
		VMMComms:   []string{"firecracker"},
		HostChecks: hostChecks,
	})
}

func usable() string {
	if _, why := hostprobe.Binary("firecracker"); why != "" {
		return why
	}
	if why := hostprobe.KVMUnusable(hostprobe.Default); why != "" {
		return "KVM unusable: " + why
	}
	return ""
}

// hostChecks reports whether Firecracker VMs start through the jailer.
// Nothing when Firecracker is not installed.
func hostChecks() []backend.HostCheck {
	fc, err := exec.LookPath("firecracker")
	if err != nil {
		return nil
	}
	c := backend.HostCheck{Name: "fc jailer", OK: true}
	jl := filepath.Join(filepath.Dir(fc), "jailer")
	if _, err := os.Stat(jl); err != nil {
		c.Detail = "no jailer next to " + fc + ": Firecracker VMs run unjailed"
		c.Fix = "install the jailer of the same Firecracker release next to it"
	} else if os.Geteuid() != 0 {
		c.Detail = jl + " found, but it needs root: Firecracker VMs run unjailed"
	} else {
		c.Detail = "on: Firecracker VMs start through " + jl + " (own uid, chroot; snapshots of jailed VMs are not supported yet)"
	}
	return []backend.HostCheck{c}
}

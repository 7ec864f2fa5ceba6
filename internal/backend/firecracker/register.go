package firecracker

import (
	"context"
	"os"
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
		Artifacts:  map[string]string{"state": stateFile, "memory": memoryFile, "disk": diskFile, "meta": metaFile},
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

// hostChecks reports the Firecracker binary (optional: only this backend
// needs it), whether this host can run it (KVM), and whether its VMs start
// through the jailer.
func hostChecks(ctx context.Context) []backend.Check {
	fc, why := hostprobe.Binary("firecracker")
	if why != "" {
		return []backend.Check{{Name: "firecracker", Status: backend.CheckOK,
			Detail: "not installed (optional; only the firecracker backend needs it)"}}
	}
	c := backend.Check{Name: "firecracker", Status: backend.CheckOK}
	if v, err := hostprobe.Version(ctx, fc); err != nil {
		c.Status, c.Detail, c.Fix = backend.CheckFail, "cannot run "+fc+": "+err.Error(), "install Firecracker v1.16"
	} else if why := usable(); why != "" {
		c.Status, c.Detail = backend.CheckWarn, v+", but it cannot run VMs here: "+why
		c.Fix = "optional: run on a host with usable KVM (vmx/svm, /dev/kvm) to use it"
	} else {
		c.Detail = v
	}

	j := backend.Check{Name: "fc jailer", Status: backend.CheckOK}
	jl := filepath.Join(filepath.Dir(fc), "jailer")
	if _, err := os.Stat(jl); err != nil {
		j.Status, j.Detail = backend.CheckWarn, "no jailer next to "+fc+": Firecracker VMs run unjailed"
		j.Fix = "install the jailer of the same Firecracker release next to it"
	} else if os.Geteuid() != 0 {
		j.Status, j.Detail = backend.CheckWarn, jl+" found, but it needs root: Firecracker VMs run unjailed"
		j.Fix = "optional: run smolvm as root to jail Firecracker VMs"
	} else {
		j.Detail = "on: Firecracker VMs start through " + jl + " (own uid, chroot; snapshots of jailed VMs are not supported yet)"
	}
	return []backend.Check{c, j}
}

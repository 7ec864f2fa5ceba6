package qemu

import "github.com/smolvm-go/smolvm/internal/backend"

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
		Artifacts:  map[string]string{"state": StateFile, "memory": MemoryFile, "disk": DiskFile, RoleConfig: ConfigFile},
	})
}

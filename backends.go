package smolvm

// The backends the SDK ships with. Each registers itself with
// internal/backend from its init function; this file is the only place the
// SDK names them. Everything else asks the registry (backend.Lookup,
// backend.Choose) and the backend's Capabilities.
import (
	_ "github.com/smolvm-go/smolvm/internal/backend/firecracker" // registers "firecracker"
	_ "github.com/smolvm-go/smolvm/internal/backend/qemu"        // registers "qemu"
)

// DefaultBackend is the backend a Config without one uses.
const DefaultBackend = "qemu"

// The names of the backends above, for Config.Backend.
const (
	BackendQEMU        BackendName = "qemu"
	BackendFirecracker BackendName = "firecracker"
)

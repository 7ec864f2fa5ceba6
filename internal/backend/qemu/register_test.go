package qemu

import (
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestRegistrationDeclaresWhatTheSDKNeeds: QEMU is registered, always
// usable for "auto" (TCG fallback), and its capabilities state its kernel
// and disk formats and a Detach it really implements.
func TestRegistrationDeclaresWhatTheSDKNeeds(t *testing.T) {
	r, ok := backend.Lookup("qemu")
	if !ok || r.Usable != nil || len(r.VMMComms) == 0 {
		t.Fatalf("registration %+v (found %v)", r, ok)
	}
	b, err := r.New(backend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	caps := b.Capabilities()
	if caps.KernelFormat != backend.KernelBzImage || caps.DiskFormat != backend.DiskQcow2 {
		t.Errorf("formats %q %q", caps.KernelFormat, caps.DiskFormat)
	}
	if _, ok := backend.As[backend.Detacher](b); !caps.Detach || !ok {
		t.Errorf("Detach declared %v, implemented %v", caps.Detach, ok)
	}
}

// The network stats of the sidecar are reachable through the declared
// optional interface, not a method the SDK has to guess.
var _ backend.NetStatser = (*Backend)(nil)

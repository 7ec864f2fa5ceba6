package firecracker

import (
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestRegistration: Firecracker is registered above QEMU's rank for
// "auto", and declares no Detach (its disk is a self-contained copy) and
// implements none.
func TestRegistration(t *testing.T) {
	r, ok := backend.Lookup(Name)
	if !ok || r.Usable == nil || r.AutoRank <= 0 || len(r.VMMComms) == 0 {
		t.Fatalf("registration %+v (found %v)", r, ok)
	}
	var b backend.Backend = &Backend{}
	if _, ok := backend.As[backend.Detacher](b); ok || b.Capabilities().Detach {
		t.Errorf("Detach implemented %v, declared %v", ok, b.Capabilities().Detach)
	}
	if why := r.Usable(); why == "" {
		t.Logf("firecracker is usable here")
	} else {
		t.Logf("firecracker is not usable here: %s", why)
	}
}

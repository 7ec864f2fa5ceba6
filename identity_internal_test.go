package smolvm

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// TestSpecCarriesIdentityOffTheCommandLine: a new VM's spec names the VM
// nowhere on the kernel command line (a memory image keeps it), carries a
// valid machine-id of its own, and the identity the guest is told is the
// spec's; a clone's spec gets a new MAC and machine-id.
func TestSpecCarriesIdentityOffTheCommandLine(t *testing.T) {
	dir := t.TempDir()
	m, err := NewManager(context.Background(), Options{DataDir: dir, RunDir: dir + "/run", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	cfg := Config{Image: "busybox"}.withDefaults()
	const id = "identity-probe_1"
	a := m.specFor(id, cfg, "/k", "/i", "/r", "init_on_free=1")
	b := m.specFor(id, cfg, "/k", "/i", "/r", "init_on_free=1")
	if strings.Contains(a.KernelArgs, id) || strings.Contains(a.KernelArgs, "smol.hostname") {
		t.Errorf("kernel command line names the VM: %q", a.KernelArgs)
	}
	if !agentproto.ValidMachineID(a.MachineID) || a.MachineID == b.MachineID {
		t.Errorf("machine-ids %q and %q: want two valid, distinct ones", a.MachineID, b.MachineID)
	}
	if err := a.Validate(); err != nil {
		t.Errorf("spec refused: %v", err)
	}
	req := identityFor(a)
	if req.Hostname != id || req.MAC != a.MAC || req.MachineID != a.MachineID || req.Validate() != nil {
		t.Errorf("identity for the spec: %+v", req)
	}
	c := m.cloneSpec(a, "identity-probe_1-clone-1")
	if c.MachineID == a.MachineID || c.MAC == a.MAC || !agentproto.ValidMachineID(c.MachineID) {
		t.Errorf("clone spec keeps the source's identity: mac %s, machine-id %s", c.MAC, c.MachineID)
	}
	// An old snapshot's command line carries smol.hostname: its clones
	// boot cold (after a guest reboot) with their own.
	a.KernelArgs += " smol.hostname=" + id
	if c := m.cloneSpec(a, "x-clone-2"); !strings.Contains(c.KernelArgs, "smol.hostname=x-clone-2") || strings.Contains(c.KernelArgs, "="+id) {
		t.Errorf("old snapshot's clone: %q", c.KernelArgs)
	}
}

package qemu

import (
	"fmt"
	"path/filepath"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// RestoreInvocation is how Restore launches and loads QEMU for a memory
// snapshot: the argv and the QMP steps, for a caller that drives the same
// QEMU by hand (the benchmarks' bare-QEMU baseline). It shares
// applySnapshotLaunch with Restore.
type RestoreInvocation struct {
	Args         []string // argv without the binary (-incoming defer, -S)
	QMPSocket    string
	AgentSocket  string // agent port 0
	StateFile    string // migrate-incoming from a "file" channel at offset 0
	IgnoreShared bool   // migration capabilities to set before migrate-incoming
	MappedRAM    bool
}

// RestoreArgv returns what Restore would launch for the full or diff
// snapshot in snapDir (res from its manifest) with spec, whose Dir and
// RunDir the caller picks and whose Disk is the writable qcow2 overlay over
// the snapshot's disk, which the caller creates. It reproduces Restore's
// launch configuration: the snapshotted machine and CPU model, and the
// memory image mapped privately and read-only ("raw" memory). For a
// "stream" snapshot the guest RAM is a fresh shared file whose directory
// the caller must create (launch does that for Restore).
func (b *Backend) RestoreArgv(spec backend.Spec, snapDir string, res backend.SnapshotResult) (RestoreInvocation, error) {
	arts := map[string]string{}
	for _, a := range res.Artifacts {
		arts[a.Role] = filepath.Join(snapDir, a.Name)
	}
	if arts["state"] == "" {
		return RestoreInvocation{}, fmt.Errorf("qemu: restore argv: not a memory snapshot (no %s)", StateFile)
	}
	var cfg *snapshotConfig
	if p := arts[RoleConfig]; p != "" {
		c, err := readSnapshotConfig(p)
		if err != nil {
			return RestoreInvocation{}, err
		}
		cfg = c
	}
	if arts["disk"] != "" {
		spec.DiskFormat = "qcow2"
	} else {
		spec.Disk, spec.DiskFormat = "", ""
	}
	l, err := b.freshLaunch(spec)
	if err != nil {
		return RestoreInvocation{}, err
	}
	if res.MemoryFormat == MemoryRaw && arts["memory"] == "" {
		return RestoreInvocation{}, fmt.Errorf("qemu: restore argv: snapshot has no memory artifact (%s)", MemoryFile)
	}
	var inv RestoreInvocation
	inv.IgnoreShared, inv.MappedRAM = applySnapshotLaunch(&l, cfg, res.MemoryFormat, arts["memory"])
	if inv.Args, err = buildArgs(spec, l); err != nil {
		return RestoreInvocation{}, err
	}
	inv.QMPSocket = qmpSocket(spec.RunDir)
	inv.AgentSocket = agentSocket(spec.RunDir)
	inv.StateFile = arts["state"]
	return inv, nil
}

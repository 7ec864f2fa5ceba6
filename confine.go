package smolvm

import (
	"context"
	"fmt"
	"os"
	"os/user"
	"strconv"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/cgroup"
)

// When smolvm runs as root, each VM's VMM drops to a uid of its own,
// allocated from [UIDBase, UIDBase+UIDCount) and recorded in the state
// database (released when the VM is deleted). The default range sits above
// the ranges systemd hands to containers (up to 1879048191) and below
// 2^31, where some tools misbehave; SMOLVM_UID_BASE and SMOLVM_UID_COUNT
// move it. The uid is also the VM's gid.
const (
	DefaultUIDBase  = 1_900_000_000
	DefaultUIDCount = 65536
)

// uidRange returns the configured uid range.
func uidRange() (base, count int, err error) {
	base, count = DefaultUIDBase, DefaultUIDCount
	for _, v := range []struct {
		env string
		dst *int
	}{{"SMOLVM_UID_BASE", &base}, {"SMOLVM_UID_COUNT", &count}} {
		if s := os.Getenv(v.env); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n <= 0 {
				return 0, 0, &Error{Op: "start", Message: fmt.Sprintf("%s=%q is not a positive integer", v.env, s),
					Fix: newFix(FixSetEnv, ArgEnv, v.env, ArgHint, "unset it or set a number (default base "+strconv.Itoa(DefaultUIDBase)+")")}
			}
			*v.dst = n
		}
	}
	if base < 1000 || base+count-1 > 1<<31-2 {
		return 0, 0, &Error{Op: "start", Message: fmt.Sprintf("uid range %d+%d is outside 1000..2147483646", base, count),
			Fix: newFix(FixSetEnv, ArgEnv, "SMOLVM_UID_BASE,SMOLVM_UID_COUNT", ArgHint, "set SMOLVM_UID_BASE and SMOLVM_UID_COUNT to a range of unused uids")}
	}
	return base, count, nil
}

// uidInUse reports whether uid or gid names an existing user or group
// (never handed to a VM).
func uidInUse(uid int) bool {
	s := strconv.Itoa(uid)
	if _, err := user.LookupId(s); err == nil {
		return true
	}
	_, err := user.LookupGroupId(s)
	return err == nil
}

// runAs fills in the uid spec's VMM drops to: the VM's own uid when smolvm
// runs as root (assigned on first use, then the same on every start), none
// otherwise. A spec copied from a snapshot or another VM gets this VM's
// uid, never the source's.
func (m *Manager) runAs(ctx context.Context, spec *backend.Spec) error {
	spec.RunAsUID, spec.RunAsGID = 0, 0
	if os.Geteuid() != 0 {
		return nil
	}
	base, count, err := uidRange()
	if err != nil {
		return err
	}
	uid, err := m.store.AssignUID(ctx, spec.ID, base, count, uidInUse)
	if err != nil {
		return &Error{Op: "start", Message: fmt.Sprintf("no uid for the VMM of %s: %v", spec.ID, err),
			Fix: newFix(FixFreeResources, ArgResource, ResourceUIDs), Err: err}
	}
	spec.RunAsUID, spec.RunAsGID = uid, uid
	return nil
}

// confinementChecks reports the confinement the SDK sets up for every
// backend's VMM on this host: the per-VM uid drop (root only) and per-VM
// cgroup limits. (Each backend reports its own, such as seccomp or a
// jailer, in its registration's HostChecks.)
func confinementChecks() []Check {
	var out []Check
	c := Check{Name: "uid drop", Status: CheckOK}
	if os.Geteuid() == 0 {
		base, count, err := uidRange()
		if err != nil {
			c.Status, c.Detail = CheckFail, err.Error()
		} else {
			c.Detail = fmt.Sprintf("on: each VM gets its own uid (%d..%d) for its VMM to drop to", base, base+count-1)
		}
	} else {
		c.Detail = fmt.Sprintf("off: smolvm runs as uid %d (not root), so every VMM runs as that uid", os.Geteuid())
	}
	out = append(out, c)

	c = Check{Name: "cgroup limits", Status: CheckOK}
	if s := cgroup.Detect(); s.OK {
		c.Detail = "on: each VM's VMM runs in its own cgroup under " + s.Parent + " (memory = RAM + overhead, cpu.max = vCPUs, pids.max)"
	} else {
		c.Status, c.Detail = CheckWarn, "off (VMs run without per-VM memory/cpu/pids limits): "+s.Reason
		c.Fix = newFix(FixConfigureHost, ArgEnv, cgroup.EnvParent, ArgHint, "optional: run on a cgroup v2 host with memory, cpu and pids delegated (or set "+cgroup.EnvParent+" to a delegated, empty cgroup)")
	}
	return append(out, c)
}

// hostFix types the advice of a backend's host check: the project's setup
// script, or the backend's own (front-end neutral) words.
func hostFix(advice string) Fix {
	switch advice {
	case "":
		return Fix{}
	case "scripts/setup":
		return newFix(FixRunSetup)
	}
	return newFix(FixConfigureHost, ArgHint, advice)
}

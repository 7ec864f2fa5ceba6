package smolvm

import (
	"errors"
	"strings"
)

// FixAction names what fixes an error (or a failed doctor check). It is a
// stable, machine-readable string; a front end (the CLI, an HTTP API)
// renders it in its own words, [Fix.String] gives neutral ones. The
// arguments each action carries in [Fix.Args] are listed with it.
type FixAction string

// The fix actions. Arguments are named by the Arg* constants.
const (
	FixStartVM  FixAction = "start_vm"  // ArgVM
	FixResumeVM FixAction = "resume_vm" // ArgVM
	FixStopVM   FixAction = "stop_vm"   // ArgVM
	FixListVMs  FixAction = "list_vms"  // list every VM, stopped ones too
	FixDeleteVM FixAction = "delete_vm" // ArgVM
	// FixChooseVMName: delete the VM named ArgVM, or create with another
	// Config.Name.
	FixChooseVMName FixAction = "choose_vm_name"
	// FixDeleteFailedVMs: list the VMs and delete the failed ones.
	FixDeleteFailedVMs FixAction = "delete_failed_vms"
	// FixResolveStrayVMM: a VMM still runs for the VM ArgVM, which is not
	// running: delete it (or start it, or restore its snapshot again).
	FixResolveStrayVMM FixAction = "resolve_stray_vmm"
	FixKillProcess     FixAction = "kill_process" // ArgPID
	// FixRemovePool: set the warm pool of image ArgImage to size 0 (its
	// members are deleted).
	FixRemovePool FixAction = "remove_pool"
	FixShowLogs   FixAction = "show_logs" // ArgVM: read the VM's console and VMM logs
	// FixRunDoctor: run [Manager.Doctor]; with ArgVM, then read that VM's
	// logs.
	FixRunDoctor FixAction = "run_doctor"

	FixListSnapshots FixAction = "list_snapshots"
	// FixChooseSnapshotID: take the snapshot with another
	// SnapshotOptions.ID, or delete the snapshot ArgSnapshot.
	FixChooseSnapshotID FixAction = "choose_snapshot_id"
	// FixRetakeSnapshot: delete the snapshot ArgSnapshot and take a new one.
	FixRetakeSnapshot FixAction = "retake_snapshot"
	// FixRestoreForce: restore ArgSnapshot again with RestoreOptions.Force.
	FixRestoreForce FixAction = "restore_force"
	// FixRestoreOnce: restore the disk snapshot ArgSnapshot once (or create
	// VMs from its disk); fork full or diff snapshots.
	FixRestoreOnce FixAction = "restore_once"
	// FixFullSnapshot: take a full snapshot (SnapshotOptions.Type
	// SnapshotFull) next time.
	FixFullSnapshot FixAction = "full_snapshot"
	// FixRestoreBaseImage: the base image ArgPath of a diff snapshot is
	// gone: build the image again, or take full snapshots from now on.
	FixRestoreBaseImage FixAction = "restore_base_image"
	FixBuildImage       FixAction = "build_image" // ArgImage, optional ArgKernel (a kernel flavour)
	FixListImages       FixAction = "list_images"
	// FixListTemplates: list the templates (Manager.ListTemplates).
	FixListTemplates FixAction = "list_templates"
	// FixCollectTemplates: delete the stale templates
	// (Manager.CollectTemplates).
	FixCollectTemplates FixAction = "collect_templates"
	// FixNewFromImage: the snapshot ArgSnapshot cannot be restored on this
	// host: create a new VM from the image ArgImage (a cold boot; the
	// snapshot's memory is not used).
	FixNewFromImage FixAction = "new_from_image"
	// FixPullSnapshot: the snapshot ArgSnapshot is not in this data dir:
	// list the snapshots, or pull it from the remote store that has it
	// (add that remote first, as the default to pull automatically).
	FixPullSnapshot FixAction = "pull_snapshot"

	// FixAddRemote: add a remote snapshot store (Manager.AddRemote), named
	// ArgRemote when given.
	FixAddRemote FixAction = "add_remote"
	// FixRemoveRemote: remove the remote ArgRemote, or choose another name.
	FixRemoveRemote FixAction = "remove_remote"
	// FixCheckRemote: the remote ArgRemote did not answer: check that its
	// endpoint ArgValue is up and reachable from this host, or change the
	// remote.
	FixCheckRemote FixAction = "check_remote"
	// FixListRemoteSnapshots: list the snapshots in the remote ArgRemote.
	FixListRemoteSnapshots FixAction = "list_remote_snapshots"

	// FixSetOption: set the option ArgOption (a Config, Options or
	// SnapshotOptions field, or "Fork.n") to ArgValue, to one of
	// ArgChoices (comma-separated), or to a number from ArgMin to ArgMax.
	FixSetOption FixAction = "set_option"
	// FixUnsetOption: leave the option ArgOption unset (or, with ArgOr,
	// that other option instead).
	FixUnsetOption FixAction = "unset_option"
	// FixEditOption: change the value of ArgOption as ArgHint says.
	FixEditOption FixAction = "edit_option"
	// FixDisableNetwork: set Config.NoNetwork, or use backend ArgBackend
	// (one that enforces a network policy).
	FixDisableNetwork FixAction = "disable_network"
	// FixRecreateWithNetwork: create the VM again with networking on.
	FixRecreateWithNetwork FixAction = "recreate_with_network"
	// FixEditAllowLists: give Network.AllowDomains as domain names and
	// Network.AllowCIDRs as CIDR prefixes.
	FixEditAllowLists FixAction = "edit_allow_lists"
	// FixRenameEnv: rename the environment variable ArgEnv of Config.Env.
	FixRenameEnv FixAction = "rename_env"

	// FixSetEnv: set (or unset) the host environment variable(s) ArgEnv
	// (comma-separated) as ArgHint says.
	FixSetEnv FixAction = "set_env"
	// FixFreeResources: free the host resource ArgResource (ResourceMemory,
	// ResourceUIDs, or ResourceDisk on the filesystem of ArgPath).
	FixFreeResources FixAction = "free_resources"
	// FixRemoveDir: a directory is not private (another user may have
	// planted it): remove it (ArgPath, when known; "the directory named
	// above" otherwise), or set ArgEnv to a private directory.
	FixRemoveDir FixAction = "remove_dir"
	// FixRunSetup: prepare the host (QEMU, the network sidecar): the
	// project's scripts/setup.
	FixRunSetup FixAction = "run_setup"
	// FixInstallBackend: install the VMM of backend ArgBackend on PATH, or
	// use backend ArgDefault.
	FixInstallBackend FixAction = "install_backend"
	// FixConfigureHost: change the host as ArgHint says (a doctor check).
	FixConfigureHost FixAction = "configure_host"
)

// Argument names of [Fix.Args].
const (
	ArgVM       = "vm"
	ArgSnapshot = "snapshot"
	ArgImage    = "image"
	ArgKernel   = "kernel"
	ArgOption   = "option"
	ArgValue    = "value"
	ArgChoices  = "choices"
	ArgMin      = "min"
	ArgMax      = "max"
	ArgOr       = "or"
	ArgHint     = "hint"
	ArgEnv      = "env"
	ArgPath     = "path"
	ArgPID      = "pid"
	ArgBackend  = "backend"
	ArgDefault  = "default"
	ArgResource = "resource"
	ArgRemote   = "remote"
)

// Values of ArgResource.
const (
	ResourceMemory = "memory" // host memory (fork fewer clones)
	ResourceUIDs   = "uids"   // the uid range VMMs drop to
	ResourceDisk   = "disk"   // free space on the filesystem of ArgPath
)

// Fix is a typed recovery: an action and its arguments. The zero Fix
// means none.
type Fix struct {
	Action FixAction         `json:"action"`
	Args   map[string]string `json:"args,omitempty"`
}

// newFix builds a Fix from key/value pairs; empty values are left out.
func newFix(a FixAction, kv ...string) Fix {
	f := Fix{Action: a}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			continue
		}
		if f.Args == nil {
			f.Args = map[string]string{}
		}
		f.Args[kv[i]] = kv[i+1]
	}
	return f
}

// IsZero reports whether f is no fix.
func (f Fix) IsZero() bool { return f.Action == "" }

// Arg returns the argument named key ("" when absent).
func (f Fix) Arg(key string) string { return f.Args[key] }

// FixActions lists every action the SDK returns (a front end's renderer
// tests that it has words for each).
func FixActions() []FixAction {
	out := make([]FixAction, 0, len(neutralFix))
	for a := range neutralFix {
		out = append(out, a)
	}
	return out
}

// String describes the fix in neutral words (no front end's commands).
func (f Fix) String() string {
	if r, ok := neutralFix[f.Action]; ok {
		return r(f)
	}
	return string(f.Action)
}

var neutralFix = map[FixAction]func(Fix) string{
	FixStartVM:  func(f Fix) string { return "start vm " + f.Arg(ArgVM) },
	FixResumeVM: func(f Fix) string { return "resume vm " + f.Arg(ArgVM) },
	FixStopVM:   func(f Fix) string { return "stop vm " + f.Arg(ArgVM) },
	FixListVMs:  func(Fix) string { return "list all vms" },
	FixDeleteVM: func(f Fix) string { return "delete vm " + f.Arg(ArgVM) },
	FixChooseVMName: func(f Fix) string {
		return "delete vm " + f.Arg(ArgVM) + ", or choose another name"
	},
	FixDeleteFailedVMs: func(Fix) string { return "list all vms and delete the failed ones" },
	FixResolveStrayVMM: func(f Fix) string {
		return "delete vm " + f.Arg(ArgVM) + " (or start it, or restore its snapshot again)"
	},
	FixKillProcess: func(f Fix) string { return "kill process " + f.Arg(ArgPID) },
	FixRemovePool:  func(f Fix) string { return "remove the warm pool of image " + f.Arg(ArgImage) },
	FixShowLogs:    func(f Fix) string { return "read the logs of vm " + f.Arg(ArgVM) },
	FixRunDoctor: func(f Fix) string {
		if vm := f.Arg(ArgVM); vm != "" {
			return "run doctor, then read the logs of vm " + vm
		}
		return "run doctor"
	},
	FixListSnapshots: func(Fix) string { return "list snapshots" },
	FixChooseSnapshotID: func(f Fix) string {
		return "choose another snapshot id, or delete snapshot " + f.Arg(ArgSnapshot)
	},
	FixRetakeSnapshot: func(f Fix) string {
		return "delete snapshot " + f.Arg(ArgSnapshot) + " and take a new snapshot"
	},
	FixRestoreForce: func(f Fix) string { return "restore snapshot " + f.Arg(ArgSnapshot) + " with Force" },
	FixRestoreOnce: func(f Fix) string {
		return "restore snapshot " + f.Arg(ArgSnapshot) + " once or create VMs from its disk; fork full or diff snapshots"
	},
	FixFullSnapshot: func(Fix) string { return "take a full snapshot" },
	FixRestoreBaseImage: func(f Fix) string {
		return "restore the base image " + f.Arg(ArgPath) + " (build the image again), or take a full snapshot next time"
	},
	FixBuildImage: func(f Fix) string {
		if k := f.Arg(ArgKernel); k != "" {
			return "build image " + f.Arg(ArgImage) + " with the " + k + " kernel"
		}
		return "build image " + f.Arg(ArgImage)
	},
	FixListImages:       func(Fix) string { return "list images" },
	FixListTemplates:    func(Fix) string { return "list templates" },
	FixCollectTemplates: func(Fix) string { return "delete the stale templates" },
	FixNewFromImage: func(f Fix) string {
		return "create a new VM from image " + f.Arg(ArgImage) + " (snapshot " + f.Arg(ArgSnapshot) + " needs a compatible host)"
	},
	FixPullSnapshot: func(f Fix) string {
		return "list snapshots; or pull snapshot " + f.Arg(ArgSnapshot) + " from the remote store that has it (add it as the default remote to pull automatically)"
	},
	FixAddRemote: func(f Fix) string {
		if r := f.Arg(ArgRemote); r != "" {
			return "add a remote named " + r + " (or use a configured one)"
		}
		return "add a remote (the first one added is the default)"
	},
	FixRemoveRemote: func(f Fix) string {
		if r := f.Arg(ArgRemote); r != "" {
			return "remove remote " + r + ", or choose another name"
		}
		return "remove a remote"
	},
	FixCheckRemote: func(f Fix) string {
		return "check that the endpoint " + orWord(f.Arg(ArgValue), "(AWS)") + " of remote " + f.Arg(ArgRemote) + " is up and reachable from this host, or change the remote"
	},
	FixListRemoteSnapshots: func(f Fix) string { return "list the snapshots in remote " + f.Arg(ArgRemote) },
	FixSetOption: func(f Fix) string {
		s := "set " + f.Arg(ArgOption)
		switch {
		case f.Arg(ArgChoices) != "":
			return s + " to one of " + strings.ReplaceAll(f.Arg(ArgChoices), ",", ", ")
		case f.Arg(ArgMin) != "":
			return s + " between " + f.Arg(ArgMin) + " and " + f.Arg(ArgMax)
		}
		return s + " to " + f.Arg(ArgValue)
	},
	FixUnsetOption: func(f Fix) string {
		if or := f.Arg(ArgOr); or != "" {
			return "unset " + f.Arg(ArgOption) + " or " + or
		}
		return "unset " + f.Arg(ArgOption)
	},
	FixEditOption: func(f Fix) string { return hintOr(f, "change the value of "+f.Arg(ArgOption)) },
	FixDisableNetwork: func(f Fix) string {
		return "set NoNetwork, or use backend " + f.Arg(ArgBackend)
	},
	FixRecreateWithNetwork: func(Fix) string { return "recreate the vm with networking on (NoNetwork unset)" },
	FixEditAllowLists: func(Fix) string {
		return "give Network.AllowDomains as domain names and Network.AllowCIDRs as CIDR prefixes"
	},
	FixRenameEnv:     func(Fix) string { return "rename the variable, e.g. MY_VAR" },
	FixSetEnv:        func(f Fix) string { return hintOr(f, "set "+f.Arg(ArgEnv)) },
	FixFreeResources: freeResources,
	FixRemoveDir: func(f Fix) string {
		if p := f.Arg(ArgPath); p != "" {
			return "stop the VMs using it, then remove " + p + "; or set " + f.Arg(ArgEnv) + " to a private directory"
		}
		return "remove the directory named above (another user may have planted it), or set " + f.Arg(ArgEnv) + " to a private directory"
	},
	FixRunSetup: func(Fix) string { return "set up the host (scripts/setup)" },
	FixInstallBackend: func(f Fix) string {
		return "install " + f.Arg(ArgBackend) + " on PATH, or use backend " + f.Arg(ArgDefault)
	},
	FixConfigureHost: func(f Fix) string { return hintOr(f, "change the host configuration") },
}

// orWord is s, or else the word given.
func orWord(s, otherwise string) string {
	if s != "" {
		return s
	}
	return otherwise
}

// hintOr is the fix's ArgHint, or else the words given.
func hintOr(f Fix, otherwise string) string {
	if h := f.Arg(ArgHint); h != "" {
		return h
	}
	return otherwise
}

// freeResources words FixFreeResources (the same for every front end).
func freeResources(f Fix) string {
	switch f.Arg(ArgResource) {
	case ResourceMemory:
		return "fork fewer clones, or free host memory"
	case ResourceUIDs:
		return "delete unused VMs, or widen the range with SMOLVM_UID_BASE / SMOLVM_UID_COUNT"
	case ResourceDisk:
		return "free disk space on the filesystem of " + f.Arg(ArgPath) + " (delete snapshots or VMs no longer needed)"
	}
	return "free host " + f.Arg(ArgResource)
}

// FixOf returns the fix carried by err, if any.
func FixOf(err error) (Fix, bool) {
	var e *Error
	if errors.As(err, &e) && !e.Fix.IsZero() {
		return e.Fix, true
	}
	return Fix{}, false
}

// Package fixtext words the SDK's typed fixes (smolvm.Fix) as the CLI's
// commands and flags. The CLI's human and --json output and the HTTP API's
// "recovery" field use the same words.
package fixtext

import (
	"strings"

	"github.com/smolvm-go/smolvm"
)

// Usage is the CLI's own fix for its usage errors (a flag's syntax, a
// missing argument): the words are in ArgHint.
const Usage smolvm.FixAction = "cli_usage"

// UsageFix is a CLI-only fix in the CLI's words.
func UsageFix(words string) smolvm.Fix {
	return smolvm.Fix{Action: Usage, Args: map[string]string{smolvm.ArgHint: words}}
}

// optionFlags words an SDK option (a Config, Options or SnapshotOptions
// field, "Fork.n") as the CLI flag that sets it.
var optionFlags = map[string]string{
	"MemoryMiB":            "--memory",
	"CPUs":                 "--cpus",
	"Backend":              "--backend",
	"Accel":                "--accel",
	"Image":                "--image",
	"NoNetwork":            "--no-network",
	"Network":              "the allow-lists",
	"SnapshotOptions.Type": "--snapshot-type",
	"Fork.n":               "--clones",
}

// flag is the CLI flag for an option (the option's own name when the CLI
// has none).
func flag(option string) string {
	if f, ok := optionFlags[option]; ok {
		return f
	}
	return option
}

// neutral: the SDK's own words are the CLI's.
func neutral(f smolvm.Fix) string { return f.String() }

// Words renders each fix action in the CLI's words (commands, flags).
var Words = map[smolvm.FixAction]func(smolvm.Fix) string{
	smolvm.FixStartVM:  func(f smolvm.Fix) string { return "smolvm sandbox start " + f.Arg(smolvm.ArgVM) },
	smolvm.FixResumeVM: func(f smolvm.Fix) string { return "smolvm sandbox resume " + f.Arg(smolvm.ArgVM) },
	smolvm.FixStopVM:   func(f smolvm.Fix) string { return "smolvm sandbox stop " + f.Arg(smolvm.ArgVM) },
	smolvm.FixListVMs:  func(smolvm.Fix) string { return "smolvm sandbox list --all" },
	smolvm.FixDeleteVM: func(f smolvm.Fix) string { return "smolvm sandbox delete " + f.Arg(smolvm.ArgVM) },
	smolvm.FixChooseVMName: func(f smolvm.Fix) string {
		return "smolvm sandbox delete " + f.Arg(smolvm.ArgVM) + ", or choose another --name"
	},
	smolvm.FixDeleteFailedVMs: func(smolvm.Fix) string {
		return "smolvm sandbox list --all; smolvm sandbox delete NAME"
	},
	smolvm.FixResolveStrayVMM: func(f smolvm.Fix) string {
		return "smolvm sandbox delete " + f.Arg(smolvm.ArgVM) + " (or start it, or restore its snapshot again)"
	},
	smolvm.FixKillProcess: func(f smolvm.Fix) string { return "kill " + f.Arg(smolvm.ArgPID) },
	smolvm.FixRemovePool: func(f smolvm.Fix) string {
		return "smolvm template pool " + f.Arg(smolvm.ArgImage) + " --size 0 (with the pool's --memory/--cpus)"
	},
	smolvm.FixShowLogs: func(f smolvm.Fix) string { return "smolvm sandbox logs " + f.Arg(smolvm.ArgVM) },
	smolvm.FixRunDoctor: func(f smolvm.Fix) string {
		if vm := f.Arg(smolvm.ArgVM); vm != "" {
			return "smolvm doctor; then smolvm sandbox logs " + vm
		}
		return "smolvm doctor"
	},
	smolvm.FixListSnapshots: func(smolvm.Fix) string { return "smolvm sandbox snapshot list" },
	smolvm.FixChooseSnapshotID: func(f smolvm.Fix) string {
		return "choose another --snapshot-id, or smolvm sandbox snapshot delete " + f.Arg(smolvm.ArgSnapshot)
	},
	smolvm.FixRetakeSnapshot: func(f smolvm.Fix) string {
		return "smolvm sandbox snapshot delete " + f.Arg(smolvm.ArgSnapshot) + " and take a new snapshot"
	},
	smolvm.FixRestoreForce: func(f smolvm.Fix) string {
		return "smolvm sandbox snapshot restore " + f.Arg(smolvm.ArgSnapshot) + " --force"
	},
	smolvm.FixRestoreOnce: func(f smolvm.Fix) string {
		return "restore it once (smolvm sandbox snapshot restore " + f.Arg(smolvm.ArgSnapshot) +
			") or create VMs from its disk; fork full or diff snapshots"
	},
	smolvm.FixFullSnapshot: func(smolvm.Fix) string { return "take a full snapshot (--snapshot-type full)" },
	smolvm.FixRestoreBaseImage: func(smolvm.Fix) string {
		return "restore the base image (smolvm image build), or take a full snapshot (--snapshot-type full) next time"
	},
	smolvm.FixBuildImage: func(f smolvm.Fix) string {
		s := "smolvm image build " + f.Arg(smolvm.ArgImage)
		if k := f.Arg(smolvm.ArgKernel); k != "" {
			s += " --kernel " + k
		}
		return s
	},
	smolvm.FixListImages:       func(smolvm.Fix) string { return "smolvm image ls" },
	smolvm.FixListTemplates:    func(smolvm.Fix) string { return "smolvm template ls" },
	smolvm.FixCollectTemplates: func(smolvm.Fix) string { return "smolvm template gc" },
	smolvm.FixNewFromImage: func(f smolvm.Fix) string {
		return "smolvm sandbox create --image " + f.Arg(smolvm.ArgImage) + " (snapshot " + f.Arg(smolvm.ArgSnapshot) +
			" can only be restored on a host with the same accelerator, VMM major version and machine type)"
	},
	smolvm.FixPullSnapshot: func(f smolvm.Fix) string {
		return "smolvm sandbox snapshot list; or smolvm sandbox snapshot pull " + f.Arg(smolvm.ArgSnapshot) +
			" --remote NAME (smolvm remote add NAME s3://BUCKET/PREFIX --endpoint URL first; the default remote is pulled from automatically)"
	},
	smolvm.FixAddRemote: func(f smolvm.Fix) string {
		name := f.Arg(smolvm.ArgRemote)
		if name == "" {
			name = "NAME"
		}
		return "smolvm remote add " + name + " s3://BUCKET/PREFIX --endpoint URL (smolvm remote ls shows the configured ones)"
	},
	smolvm.FixRemoveRemote: func(f smolvm.Fix) string {
		if r := f.Arg(smolvm.ArgRemote); r != "" {
			return "smolvm remote rm " + r + ", or choose another name"
		}
		return "smolvm remote ls; smolvm remote rm NAME"
	},
	smolvm.FixCheckRemote: func(f smolvm.Fix) string {
		e := f.Arg(smolvm.ArgValue)
		if e == "" {
			e = "(AWS)"
		}
		return "check that " + e + " answers from this host; or smolvm remote rm " + f.Arg(smolvm.ArgRemote) + " and add it again with the right --endpoint"
	},
	smolvm.FixListRemoteSnapshots: func(f smolvm.Fix) string {
		return "smolvm sandbox snapshot list --remote " + f.Arg(smolvm.ArgRemote)
	},
	smolvm.FixSetOption: func(f smolvm.Fix) string {
		s := "use " + flag(f.Arg(smolvm.ArgOption)) + " "
		switch c := strings.Split(f.Arg(smolvm.ArgChoices), ","); {
		case len(c) > 1:
			return s + strings.Join(c[:len(c)-1], ", ") + " or " + c[len(c)-1]
		case f.Arg(smolvm.ArgMin) != "":
			return s + "between " + f.Arg(smolvm.ArgMin) + " and " + f.Arg(smolvm.ArgMax)
		}
		return s + f.Arg(smolvm.ArgValue)
	},
	smolvm.FixUnsetOption: func(f smolvm.Fix) string {
		s := "drop " + flag(f.Arg(smolvm.ArgOption))
		if or := f.Arg(smolvm.ArgOr); or != "" {
			s += " or " + flag(or)
		}
		return s
	},
	smolvm.FixEditOption: neutral,
	smolvm.FixDisableNetwork: func(f smolvm.Fix) string {
		return "add --no-network, or use --backend " + f.Arg(smolvm.ArgBackend)
	},
	smolvm.FixRecreateWithNetwork: func(smolvm.Fix) string { return "recreate the vm without --no-network" },
	smolvm.FixEditAllowLists: func(smolvm.Fix) string {
		return "use --allow-domain NAME / --allow-cidr CIDR (see smolvm sandbox create --help)"
	},
	smolvm.FixRenameEnv: func(smolvm.Fix) string { return "rename the variable, e.g. -e MY_VAR=value" },
	smolvm.FixSetEnv:    neutral,
	smolvm.FixFreeResources: func(f smolvm.Fix) string {
		if f.Arg(smolvm.ArgResource) == smolvm.ResourceDisk {
			return "free disk space on the filesystem of " + f.Arg(smolvm.ArgPath) +
				" (smolvm sandbox snapshot list, then smolvm sandbox snapshot delete ID)"
		}
		return f.String()
	},
	smolvm.FixRemoveDir: func(f smolvm.Fix) string {
		if p := f.Arg(smolvm.ArgPath); p != "" {
			return "stop the VMs using it, then rm -r " + p + "; or set " + f.Arg(smolvm.ArgEnv) + " to a private directory"
		}
		return f.String()
	},
	smolvm.FixRunSetup: func(smolvm.Fix) string { return "scripts/setup" },
	smolvm.FixInstallBackend: func(f smolvm.Fix) string {
		return "install " + f.Arg(smolvm.ArgBackend) + " on PATH, or use --backend " + f.Arg(smolvm.ArgDefault)
	},
	smolvm.FixConfigureHost: neutral,
	Usage:                   func(f smolvm.Fix) string { return f.Arg(smolvm.ArgHint) },
}

// Render words a fix for the CLI ("" for none). An action the CLI
// has no words for (a newer SDK's) falls back to the SDK's neutral words.
func Render(f smolvm.Fix) string {
	if f.IsZero() {
		return ""
	}
	if r, ok := Words[f.Action]; ok {
		return r(f)
	}
	return f.String()
}

// Text is the CLI's words for the fix err carries ("" for none).
func Text(err error) string {
	f, _ := smolvm.FixOf(err)
	return Render(f)
}

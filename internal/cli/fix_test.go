package cli

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/smolvm-go/smolvm"
)

func fx(a smolvm.FixAction, kv ...string) smolvm.Fix {
	f := smolvm.Fix{Action: a, Args: map[string]string{}}
	for i := 0; i+1 < len(kv); i += 2 {
		f.Args[kv[i]] = kv[i+1]
	}
	return f
}

// TestFixWords: every fix the SDK returns is worded exactly as the CLI
// printed it when the SDK held the words, and no action is left without
// CLI words.
func TestFixWords(t *testing.T) {
	const (
		vm   = smolvm.ArgVM
		snap = smolvm.ArgSnapshot
		opt  = smolvm.ArgOption
		val  = smolvm.ArgValue
		hint = smolvm.ArgHint
	)
	cases := []struct {
		fix  smolvm.Fix
		want string
	}{
		{fx(smolvm.FixStartVM, vm, "life"), "smolvm sandbox start life"},
		{fx(smolvm.FixResumeVM, vm, "a"), "smolvm sandbox resume a"},
		{fx(smolvm.FixStopVM, vm, "a"), "smolvm sandbox stop a"},
		{fx(smolvm.FixListVMs), "smolvm sandbox list --all"},
		{fx(smolvm.FixDeleteVM, vm, "a"), "smolvm sandbox delete a"},
		{fx(smolvm.FixChooseVMName, vm, "a"), "smolvm sandbox delete a, or choose another --name"},
		{fx(smolvm.FixDeleteFailedVMs), "smolvm sandbox list --all; smolvm sandbox delete NAME"},
		{fx(smolvm.FixResolveStrayVMM, vm, "killme"), "smolvm sandbox delete killme (or start it, or restore its snapshot again)"},
		{fx(smolvm.FixKillProcess, smolvm.ArgPID, "42"), "kill 42"},
		{fx(smolvm.FixRemovePool, smolvm.ArgImage, "busybox"), "smolvm template pool busybox --size 0 (with the pool's --memory/--cpus)"},
		{fx(smolvm.FixShowLogs, vm, "a"), "smolvm sandbox logs a"},
		{fx(smolvm.FixRunDoctor), "smolvm doctor"},
		{fx(smolvm.FixRunDoctor, vm, "a"), "smolvm doctor; then smolvm sandbox logs a"},
		{fx(smolvm.FixListSnapshots), "smolvm sandbox snapshot list"},
		{fx(smolvm.FixChooseSnapshotID, snap, "s"), "choose another --snapshot-id, or smolvm sandbox snapshot delete s"},
		{fx(smolvm.FixRetakeSnapshot, snap, "s"), "smolvm sandbox snapshot delete s and take a new snapshot"},
		{fx(smolvm.FixRestoreForce, snap, "s"), "smolvm sandbox snapshot restore s --force"},
		{fx(smolvm.FixRestoreOnce, snap, "s"), "restore it once (smolvm sandbox snapshot restore s) or create VMs from its disk; fork full or diff snapshots"},
		{fx(smolvm.FixFullSnapshot), "take a full snapshot (--snapshot-type full)"},
		{fx(smolvm.FixRestoreBaseImage, smolvm.ArgPath, "/img/rootfs"), "restore the base image (smolvm image build), or take a full snapshot (--snapshot-type full) next time"},
		{fx(smolvm.FixBuildImage, smolvm.ArgImage, "debian"), "smolvm image build debian"},
		{fx(smolvm.FixCollectTemplates), "smolvm template gc"},
		{fx(smolvm.FixNewFromImage, smolvm.ArgImage, "debian", snap, "s1"), "smolvm sandbox create --image debian (snapshot s1 can only be restored on a host with the same accelerator, VMM major version and machine type)"},
		{fx(smolvm.FixListTemplates), "smolvm template ls"},
		{fx(smolvm.FixBuildImage, smolvm.ArgImage, "busybox", smolvm.ArgKernel, "minimal"), "smolvm image build busybox --kernel minimal"},
		{fx(smolvm.FixListImages), "smolvm image ls"},
		{fx(smolvm.FixSetOption, opt, "MemoryMiB", val, "512"), "use --memory 512"},
		{fx(smolvm.FixSetOption, opt, "CPUs", val, "1"), "use --cpus 1"},
		{fx(smolvm.FixSetOption, opt, "Backend", val, "qemu"), "use --backend qemu"},
		{fx(smolvm.FixSetOption, opt, "Accel", val, "auto"), "use --accel auto"},
		{fx(smolvm.FixSetOption, opt, "Image", val, "debian"), "use --image debian"},
		{fx(smolvm.FixSetOption, opt, "SnapshotOptions.Type", smolvm.ArgChoices, "full,diff,disk"), "use --snapshot-type full, diff or disk"},
		{fx(smolvm.FixSetOption, opt, "Fork.n", smolvm.ArgMin, "1", smolvm.ArgMax, "16"), "use --clones between 1 and 16"},
		{fx(smolvm.FixUnsetOption, opt, "NoNetwork"), "drop --no-network"},
		{fx(smolvm.FixUnsetOption, opt, "NoNetwork", smolvm.ArgOr, "Network"), "drop --no-network or the allow-lists"},
		{fx(smolvm.FixEditOption, opt, "Network.AllowCIDRs", hint, "give prefixes such as 203.0.113.0/24 or 127.0.0.1/32"), "give prefixes such as 203.0.113.0/24 or 127.0.0.1/32"},
		{fx(smolvm.FixEditOption, hint, "fix the configuration (see the message)"), "fix the configuration (see the message)"},
		{fx(smolvm.FixDisableNetwork, smolvm.ArgBackend, "qemu"), "add --no-network, or use --backend qemu"},
		{fx(smolvm.FixRecreateWithNetwork, vm, "a"), "recreate the vm without --no-network"},
		{fx(smolvm.FixEditAllowLists), "use --allow-domain NAME / --allow-cidr CIDR (see smolvm sandbox create --help)"},
		{fx(smolvm.FixRenameEnv, smolvm.ArgEnv, "1X"), "rename the variable, e.g. -e MY_VAR=value"},
		{fx(smolvm.FixSetEnv, smolvm.ArgEnv, "SMOLVM_DATA_DIR", hint, "check permissions of the data dir or set SMOLVM_DATA_DIR"), "check permissions of the data dir or set SMOLVM_DATA_DIR"},
		{fx(smolvm.FixFreeResources, smolvm.ArgResource, smolvm.ResourceMemory), "fork fewer clones, or free host memory"},
		{fx(smolvm.FixFreeResources, smolvm.ArgResource, smolvm.ResourceUIDs), "delete unused VMs, or widen the range with SMOLVM_UID_BASE / SMOLVM_UID_COUNT"},
		{fx(smolvm.FixFreeResources, smolvm.ArgResource, smolvm.ResourceDisk, smolvm.ArgPath, "/var/lib/smolvm"),
			"free disk space on the filesystem of /var/lib/smolvm (smolvm sandbox snapshot list, then smolvm sandbox snapshot delete ID)"},
		{fx(smolvm.FixRemoveDir, smolvm.ArgPath, "/run/smolvm", smolvm.ArgEnv, "SMOLVM_RUN_DIR"), "stop the VMs using it, then rm -r /run/smolvm; or set SMOLVM_RUN_DIR to a private directory"},
		{fx(smolvm.FixRemoveDir, smolvm.ArgEnv, "SMOLVM_RUN_DIR"), "remove the directory named above (another user may have planted it), or set SMOLVM_RUN_DIR to a private directory"},
		{fx(smolvm.FixRunSetup), "scripts/setup"},
		{fx(smolvm.FixPullSnapshot, snap, "s1"), "smolvm sandbox snapshot list; or smolvm sandbox snapshot pull s1 --remote NAME (smolvm remote add NAME s3://BUCKET/PREFIX --endpoint URL first; the default remote is pulled from automatically)"},
		{fx(smolvm.FixAddRemote, smolvm.ArgRemote, "origin"), "smolvm remote add origin s3://BUCKET/PREFIX --endpoint URL (smolvm remote ls shows the configured ones)"},
		{fx(smolvm.FixRemoveRemote, smolvm.ArgRemote, "origin"), "smolvm remote rm origin, or choose another name"},
		{fx(smolvm.FixCheckRemote, smolvm.ArgRemote, "origin", val, "http://127.0.0.1:9000"), "check that http://127.0.0.1:9000 answers from this host; or smolvm remote rm origin and add it again with the right --endpoint"},
		{fx(smolvm.FixListRemoteSnapshots, smolvm.ArgRemote, "origin"), "smolvm sandbox snapshot list --remote origin"},
		{fx(smolvm.FixInstallBackend, smolvm.ArgBackend, "firecracker", smolvm.ArgDefault, "qemu"), "install firecracker on PATH, or use --backend qemu"},
		{fx(smolvm.FixConfigureHost, hint, "install the jailer of the same Firecracker release next to it"), "install the jailer of the same Firecracker release next to it"},
		{usageFix("use -e KEY=VALUE"), "use -e KEY=VALUE"},
		{smolvm.Fix{}, ""},
	}
	covered := map[smolvm.FixAction]bool{}
	for _, c := range cases {
		covered[c.fix.Action] = true
		if got := renderFix(c.fix); got != c.want {
			t.Errorf("%+v: %q, want %q", c.fix, got, c.want)
		}
	}
	for _, a := range smolvm.FixActions() {
		if _, ok := fixWords[a]; !ok {
			t.Errorf("action %s has no CLI words", a)
		}
		if !covered[a] {
			t.Errorf("action %s is not in the table", a)
		}
	}
	err := errors.Join(errors.New("context"), &smolvm.Error{Message: "m", Fix: fx(smolvm.FixResumeVM, vm, "a"), Err: smolvm.ErrVMNotRunning})
	if got := fixText(err); got != "smolvm sandbox resume a" {
		t.Errorf("fixText of a wrapped error: %q", got)
	}
	if got := fixText(errors.New("plain")); got != "" {
		t.Errorf("fixText without a fix: %q", got)
	}
}

// TestFixWordsOfSDKErrors: the fixes of errors the SDK really returns
// (refused before any VM starts) come out in the CLI words of before.
func TestFixWordsOfSDKErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: filepath.Join(dir, "data"), ImageDir: filepath.Join(dir, "images"),
		RunDir: filepath.Join(dir, "run")})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	newVM := func(c smolvm.Config) error {
		if c.Image == "" {
			c.Image = "busybox"
		}
		vm, err := m.New(ctx, c)
		if err == nil {
			vm.Delete(ctx)
			t.Errorf("New(%+v) succeeded", c)
		}
		return err
	}
	pf := []smolvm.PortForward{{HostPort: 8080, GuestPort: 80}}
	_, typeErr := smolvm.ParseSnapshotType("nope")
	_, forkErr := m.Fork(ctx, "snap", 0, smolvm.ForkOptions{})
	_, restoreErr := m.FromSnapshot(ctx, "missing", smolvm.RestoreOptions{})
	_, openErr := m.Open(ctx, "missing")
	cases := []struct {
		err  error
		want string
	}{
		{newVM(smolvm.Config{MemoryMiB: 1}), "use --memory 512"},
		{newVM(smolvm.Config{CPUs: 999}), "use --cpus 1"},
		{newVM(smolvm.Config{Backend: "nope"}), "use --backend qemu"},
		{newVM(smolvm.Config{Accel: "nope"}), "use --accel auto"},
		{newVM(smolvm.Config{NoNetwork: true, PortForwards: pf}), "drop --no-network"},
		{newVM(smolvm.Config{NoNetwork: true, Network: smolvm.NetworkPolicy{AllowDomains: []string{"example.com"}}}), "drop --no-network or the allow-lists"},
		{newVM(smolvm.Config{Network: smolvm.NetworkPolicy{AllowDomains: []string{"*"}}}), "use --allow-domain NAME / --allow-cidr CIDR (see smolvm sandbox create --help)"},
		{newVM(smolvm.Config{Env: map[string]string{"1X": "a"}}), "rename the variable, e.g. -e MY_VAR=value"},
		{newVM(smolvm.Config{Image: "nope"}), "use --image debian"},
		{newVM(smolvm.Config{}), "smolvm image build busybox"},
		{typeErr, "use --snapshot-type full, diff or disk"},
		{forkErr, "use --clones between 1 and 64"},
		{restoreErr, "smolvm sandbox snapshot list; or smolvm sandbox snapshot pull missing --remote NAME (smolvm remote add NAME s3://BUCKET/PREFIX --endpoint URL first; the default remote is pulled from automatically)"},
		{openErr, "smolvm sandbox list --all"},
	}
	for i, c := range cases {
		if got := fixText(c.err); got != c.want {
			t.Errorf("case %d: %v: fix %q, want %q", i, c.err, got, c.want)
		}
	}
}

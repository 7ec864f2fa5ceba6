// Package smolvm runs disposable, hardware-isolated Linux computers for AI
// agents: microVMs (QEMU; Firecracker where a host allows it) in which
// commands run through a guest agent, with snapshots that save a sandbox
// and bring it back, or fork it into many.
//
// # Managers and VMs
//
// A [Manager] owns a data directory (SMOLVM_DATA_DIR): the state database,
// each VM's files and the snapshots. Several processes may use one data
// directory at once. The package-level [New], [Open], [FromSnapshot] and
// [Fork] make a Manager with the default [Options] for the handles they
// return; closing the last of those handles closes it.
//
// A [VM] is a handle on one sandbox:
//
//	vm, err := smolvm.New(ctx, smolvm.Config{Image: "busybox"}) // created, not started
//	err = vm.Start(ctx)                                          // boots; returns once the agent answers
//	res, err := vm.Run(ctx, "echo hi")                           // res.ExitCode, res.Stdout, res.Stderr
//	err = vm.Close()                                             // the VM keeps running
//	vm, err = smolvm.Open(ctx, "sbx-...")                        // later, from any process
//	err = vm.Delete(ctx)                                         // stops it and removes its files
//
// The lifecycle is created → running ⇄ paused, → stopped (Start boots it
// again from its disk), and Delete from any state. Run and RunArgs take
// [RunOption] values ([WithTimeout], [WithEnv], [WithWorkdir], [WithStdin]
// or [WithStdinReader], [WithStdout], [WithStderr], [WithOutputLimit]); a
// non-zero exit code is a [Result], not an error. Files move with
// [VM.UploadFile] and [VM.DownloadFile] (host paths, atomic on both sides),
// [VM.WriteFile] and [VM.ReadFile] (bytes), or [VM.WriteFileFrom] and
// [VM.ReadFileTo] (an io.Reader and an io.Writer); large files stream in
// chunks.
//
// # Snapshots, restore and fork
//
// [VM.Snapshot] saves a running or paused VM: [SnapshotFull] (memory,
// device state and a self-contained disk), [SnapshotDiff] (the disk as an
// overlay on the VM's base image) or [SnapshotDisk] (the disk only).
// [Manager.FromSnapshot] recreates the snapshot's VM with its id; a
// snapshot restores once unless [RestoreOptions].Force. [Manager.Fork]
// restores one memory snapshot into up to [MaxClones] new VMs that share
// its unchanged memory pages, each with a new identity (hostname, MAC,
// machine-id, random state, clock); every VM, booted or restored, is given
// its identity the same way, and none of it is on the kernel command line. A snapshot cannot be deleted while a VM restored
// or forked from it runs. Every snapshot is written in a temporary
// directory, fsynced and renamed into place before it is listed, and its
// manifest and artifacts are checked before a restore uses them.
//
// # Errors
//
// Errors are [*Error] values: Message says what went wrong and Fix what to
// do next, as a typed [Fix] (a [FixAction] and its arguments, e.g.
// [FixResumeVM] with the VM's id; [FixOf] finds it) that a front end words
// in its own terms. They wrap sentinels to test with errors.Is: [ErrVMNotFound],
// [ErrVMNotRunning], [ErrInvalidConfig], [ErrUnsupported], [ErrBoot],
// [ErrSnapshotNotFound], [ErrSnapshotInUse], [ErrSnapshotRestored],
// [ErrSnapshotCorrupt], [ErrHostIncompatible], [ErrTimeout], [ErrGuestProtocol], and the others
// declared with them. [ErrorCode] gives each a stable code string. A
// [*ForkError] lists the clones that failed; errors.Is sees each one's
// cause.
//
// # Security
//
// The guest and every caller are treated as hostile. Caller values are
// typed and validated before they reach a VMM command line or a path;
// guest replies are bounded and checked (a reply that breaks the protocol
// fails with ErrGuestProtocol); every wait on the guest has a host-side
// deadline; snapshot manifests are data, not trust; each VM's network
// traffic goes through a sidecar that enforces its [NetworkPolicy] (by
// default the public internet only: never the host's loopback, private
// ranges or cloud metadata); the VMM runs confined; files with guest data
// are private to their owner. What holds, and the test that proves each
// wall, is in docs/security.md; the VMM's confinement is in
// docs/confinement.md.
package smolvm

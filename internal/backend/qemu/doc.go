// Package qemu implements backend.Backend with QEMU (qemu-system-x86_64).
//
// Each VM is one detached QEMU process (its own session, not killed when the
// launching process exits) controlled through a QMP unix socket in the VM's
// RunDir; the guest agent is reached through a virtio-serial port exposed as
// RunDir/agent.sock. Guest RAM lives in a memory-backend-file shared mapping
// under /dev/shm, so a snapshot copies it as a sparse raw image (device state
// goes through a "file:" migration with x-ignore-shared), and a restore maps
// that image privately (copy-on-write): restore time does not depend on RAM
// size and the snapshot files are never modified. VMs whose RAM is not a
// shared file (restored ones) migrate RAM into the state file (mapped-ram
// format); Snapshot then restores that, paused, into a short-lived helper
// QEMU with a shared RAM file and snapshots the helper, so the result is a
// raw, mappable image again (the stream form is kept if that step fails).
//
// A restore launches QEMU without -kernel/-initrd (the guest booted long
// ago; QEMU would otherwise hold a copy of both in its own memory, 15 MiB
// per clone) and with -no-reboot: a guest reboot in a restored VM ends its
// QEMU, the VM shows as stopped, and Start boots it cold from its disk.
// A snapshot's artifacts are written without fsync: the caller flushes them
// while it hashes them (see backend.Backend.Snapshot).
//
// Every operation can be run by a different process than the one that
// started the VM: all it needs is the persisted backend.Machine. The
// Backend holds no process-wide state. PIDs are always checked against
// /proc/<pid>/cmdline (which must name the VM's RunDir) before signalling,
// to guard against PID reuse.
//
// Accelerator: ProbeAccel picks KVM only when it is really usable; hosts
// whose /dev/kvm is PVM (kvm_pvm) or lacks vmx/svm get TCG with a notice.
// Under TCG on the microvm machine the kernel gets tsc_early_khz, because
// microvm has no HPET/PM timer to calibrate the TSC against.
package qemu

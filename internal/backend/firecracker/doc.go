// Package firecracker is the Firecracker backend: it implements
// backend.Backend by running one detached `firecracker --api-sock` process
// per VM and driving it through internal/fcapi.
//
// Layout of one VM (RUNDIR = Spec.RunDir, DIR = Spec.Dir):
//
//	RUNDIR/fc.sock         API socket
//	RUNDIR/vsock.sock      vsock device socket (host-initiated CONNECT 1024 reaches the agent)
//	RUNDIR/rootfs          symlink to Spec.Disk; the drive's path_on_host is the relative "rootfs"
//	DIR/firecracker.log    Firecracker's stdout+stderr, which includes the guest serial console
//	DIR/console.log        symlink to firecracker.log (where tools look for a console)
//	DIR/firecracker.pid    the VMM's pid
//
// The process runs with RUNDIR as its working directory. Firecracker pins
// the drive path into the snapshot state file and requires it to be
// "accessible at the same relative path" on load, so the drive is attached
// by the relative name "rootfs": a restored VM gets its own RUNDIR/rootfs
// symlink pointing at its own disk copy, and the pinned path resolves there
// (no PATCH /drives needed; that call is post-boot and could not help the
// load open the file anyway). The vsock socket is moved with the load
// request's vsock_override, and a TAP with network_overrides.
//
// The guest boots the uncompressed vmlinux in Spec.Kernel (it needs
// VIRTIO_MMIO_CMDLINE_DEVICES) with Spec.Initrd as initramfs; the disk, when
// Spec.Disk is set, is attached as /dev/vda with is_root_device=false so the
// kernel stays on the initramfs and the agent mounts /dev/vda
// (smol.root=/dev/vda is added unless KernelArgs names a root). The command
// line starts with "console=ttyS0 reboot=k panic=1 pci=off".
//
// Networking: only as root, as a TAP device created with `ip tuntap` and
// attached as eth0; no addresses, NAT or DHCP are configured (pass smol.ip=
// etc. in Spec.KernelArgs and set up the host side yourself). Without root a
// VM that asks for a network starts without one and says so in its log.
//
// Snapshots: the VM is paused, PUT /snapshot/create (type Full) writes
// "vmstate" and "memory", and the disk is copied to "disk" (FICLONE reflink
// when the filesystem supports it, else a sparse copy; "diff" differs from
// "full" only in name: Firecracker's dirty-page Diff snapshots are not used).
// Every kind captures state+memory, as the original SmolVM does on
// Firecracker, but kind "disk" reports MemoryFormat "" because it is
// restored by a cold boot of the saved disk. "full" and "diff" are restored
// by PUT /snapshot/load with the File memory backend, which maps the memory
// file MAP_PRIVATE (so the snapshot directory must outlive the restored VM).
// "firecracker.json" (artifact role "meta") records how the snapshot was
// taken: disk copy method, network interface, pinned drive path.
package firecracker

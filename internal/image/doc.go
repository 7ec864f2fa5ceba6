// Package image builds and caches guest images: a kernel (the Debian cloud
// kernel, or a minimal kernel built from linux-source-6.1), an initramfs
// holding the guest agent as /init plus the kernel modules it needs, and a
// raw ext4 root filesystem (busybox, or Debian bookworm minbase with
// python3, ca-certificates and a working apt). Everything is built offline
// from Debian packages with apt-get download, dpkg-deb, debootstrap and
// mkfs.ext4; the module closure (no depmod), the initramfs (newc cpio) and
// vmlinux extraction are done in Go.
//
// Cache layout (dir is SMOLVM_IMAGE_DIR, see DefaultDir):
//
//	dir/.lock                                    flock held while building or removing
//	dir/tmp/                                     staging; cleaned by the next Build
//	dir/downloads/*.deb                          packages fetched with apt-get download
//	dir/downloads/debootstrap/                   debootstrap's package cache
//	dir/kernels/<kernel-id>/manifest.json        vmlinuz (debian-cloud) or bzImage (minimal),
//	                                             optional vmlinux, config,
//	                                             modules/*.ko + modules/load.order
//	dir/initramfs/<kernel-id>/<key>/             initramfs.cpio.gz + manifest.json
//	dir/rootfs/<name>-<key>/                     rootfs.ext4 + manifest.json
//	dir/images/<name>/manifest.json              binds kernel + initramfs + rootfs
//
// Every piece is built in dir/tmp and renamed into place only when complete
// (files are fsynced first, the manifest is written last), so a half-built
// piece or image is never seen. Pieces are keyed by their inputs: the
// initramfs by the agent binary and module set, the rootfs by its recipe
// and package list. A Build whose inputs did not change only reads the
// manifests and stats the files (milliseconds); a new agent rebuilds only
// the initramfs. Manifests hold sha256 sums that Verify re-checks.
//
// A forced rebuild of a rootfs never overwrites the old file, which VM
// overlays may still use as their backing file; Remove deletes the root
// filesystems and initramfs no remaining image refers to.
package image

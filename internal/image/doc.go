// Package image builds and caches guest images: a kernel (the Debian cloud
// kernel, or a minimal kernel built from linux-source), an initramfs holding
// the guest agent as /init plus the kernel modules it needs, and a raw ext4
// root filesystem (busybox or Debian bookworm). Everything is built offline
// from Debian packages.
//
// Cache layout (dir is SMOLVM_IMAGE_DIR, see DefaultDir):
//
//	dir/.lock                                    flock held while building or removing
//	dir/tmp/                                     staging; cleaned by the next Build
//	dir/downloads/*.deb                          packages fetched with apt-get download
//	dir/downloads/debootstrap/                   debootstrap's package cache
//	dir/kernels/<kernel-id>/manifest.json        kernel (vmlinuz or bzImage), optional vmlinux,
//	                                             config, modules/*.ko + modules/load.order
//	dir/initramfs/<kernel-id>/<key>/             initramfs.cpio.gz + manifest.json
//	dir/rootfs/<name>-<key>/                     rootfs.ext4 + manifest.json
//	dir/images/<name>/manifest.json              binds kernel + initramfs + rootfs
//
// Every piece is built in dir/tmp and renamed into place only when complete
// (files are fsynced first, the manifest is written last), so a half-built
// piece or image is never seen. Pieces are keyed by their inputs: changing
// the agent binary rebuilds only the initramfs.
package image

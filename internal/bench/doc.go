// Package bench measures SmolVM on the host it runs on: cold boot to the
// first command result against bare QEMU booting the same kernel, initramfs
// and disk; command round trip against a raw request on the same
// virtio-serial channel; host memory of an idle VM; and snapshot create,
// size and restore per snapshot type. Pairs run alternately in one run and
// are reported as medians. The smolvm bench command prints these.
package bench

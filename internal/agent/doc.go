// Package agent is the SmolVM guest agent. It runs as /init (PID 1) inside the
// initramfs of every VM: it mounts the basic filesystems, loads kernel
// modules, switches into the root disk, configures networking, reaps orphaned
// processes and then serves the agentproto protocol to the host over a
// virtio-serial port (QEMU) or AF_VSOCK port 1024 (Firecracker).
//
// When it is not PID 1 it skips the init duties and serves on a transport
// given on the command line (a unix socket that behaves like QEMU's
// virtio-serial chardev, or stdin/stdout); this is how the protocol is tested
// on the host.
//
// The transports differ in how they survive the host going away:
//
//   - A Port (virtio-serial, or its unix-socket emulation) is one long-lived
//     session. While the host is disconnected, reads return EOF: the agent
//     drops any partial line, sleeps briefly and reads again; replies written
//     while nobody listens are dropped, never waited for. Requests keep
//     running across reconnects, so a late reply may reach a new host
//     connection; the host ignores replies whose id is not pending.
//   - A net.Listener (vsock) gives one session per connection; sessions run
//     concurrently and a session ends with its connection (processes it
//     started keep running; their output is discarded).
package agent

// Command smolvm-agent is the SmolVM guest agent. Built static
// (CGO_ENABLED=0 go build -trimpath -ldflags "-s -w"), it is /init in every
// VM's initramfs; as PID 1 it initialises the VM and serves the host. Not
// as PID 1 it serves without init duties:
//
//	smolvm-agent serve --listen unix:/path/agent.sock   # behaves like the virtio-serial chardev
//	smolvm-agent serve --stdio
//	smolvm-agent version
//
// See package internal/agent.
package main

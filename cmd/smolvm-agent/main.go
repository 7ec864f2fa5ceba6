// Command smolvm-agent is the SmolVM guest agent. Built static
// (CGO_ENABLED=0), it is /init in every VM's initramfs; see package
// internal/agent.
package main

import (
	"os"

	"github.com/smolvm-go/smolvm/internal/agent"
)

func main() {
	os.Exit(agent.Main(os.Args[1:]))
}

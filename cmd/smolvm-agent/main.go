package main

import (
	"os"

	"github.com/smolvm-go/smolvm/internal/agent"
)

func main() {
	os.Exit(agent.Main(os.Args[1:]))
}

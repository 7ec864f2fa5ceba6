// Command smolvm is the SmolVM command line: sandboxes (microVMs), their
// snapshots, guest images and host checks.
package main

import (
	"os"

	"github.com/smolvm-go/smolvm/internal/cli"
)

func main() { os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr)) }

// Package atomicfile is a forwarder to fsutil, kept only for the one call
// in vm.go (edited on another branch while this one moved the helpers).
//
// Deprecated: use fsutil.Write / fsutil.WriteFile; delete this package
// once vm.go calls fsutil.Write.
package atomicfile

import (
	"io"
	"os"

	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// Write is fsutil.Write.
func Write(path string, fill func(w io.Writer) (os.FileMode, error)) error {
	return fsutil.Write(path, fill)
}

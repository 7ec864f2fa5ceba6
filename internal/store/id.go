package store

import (
	"errors"
	"fmt"

	"github.com/smolvm-go/smolvm/internal/backend"
)

// MaxIDLen is the longest id ValidID accepts.
const MaxIDLen = 64

// ErrInvalidID is wrapped by ValidID's errors.
var ErrInvalidID = errors.New("invalid id")

// ValidID reports whether s can be used as a VM or snapshot id: the one
// rule of backend.ValidateID (1–64 characters of lowercase ASCII letters,
// digits, '-' and '_', starting and ending with a letter or digit). Ids
// become file and directory names, so nothing else (no '/', '.', upper
// case, unicode, NUL) is allowed. Its errors wrap ErrInvalidID.
func ValidID(s string) error {
	if backend.ValidateID(s) != nil {
		return fmt.Errorf("%w %q: must be 1–64 characters of lowercase letters, digits, '-' and '_', starting and ending with a letter or digit", ErrInvalidID, s)
	}
	return nil
}

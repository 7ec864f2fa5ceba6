package store

import (
	"errors"
	"fmt"
)

// MaxIDLen is the longest id ValidID accepts.
const MaxIDLen = 64

// ErrInvalidID is wrapped by ValidID's errors.
var ErrInvalidID = errors.New("invalid id")

// ValidID reports whether s can be used as a VM or snapshot id: 1–64
// characters of lowercase ASCII letters, digits, '-' and '_', starting and
// ending with a letter or digit. Ids become file and directory names, so
// nothing else (no '/', '.', upper case, unicode, NUL) is allowed.
func ValidID(s string) error {
	if !validID(s) {
		return fmt.Errorf("%w %q: must be 1–64 characters of lowercase letters, digits, '-' and '_', starting and ending with a letter or digit", ErrInvalidID, s)
	}
	return nil
}

func validID(s string) bool {
	if len(s) == 0 || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '-' || c == '_') && i != 0 && i != len(s)-1:
		default:
			return false
		}
	}
	return true
}

package store

import (
	"errors"
	"strings"
	"testing"
)

func TestValidID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"a", true},
		{"7", true},
		{"vm-1", true},
		{"my_vm-2", true},
		{"a-_-b", true},
		{strings.Repeat("a", 64), true},

		{"", false},
		{strings.Repeat("a", 65), false},
		{"../x", false},
		{".", false},
		{"..", false},
		{"a/b", false},
		{"/abs", false},
		{"A", false},
		{"vmA", false},
		{"-a", false},
		{"a-", false},
		{"_a", false},
		{"a_", false},
		{"-", false},
		{"a.b", false},
		{"a b", false},
		{"é", false},
		{"vm\u0131", false}, // dotless i
		{"a\x00b", false},
		{"a\n", false},
		{"a\\b", false},
	}
	for _, tt := range tests {
		err := ValidID(tt.id)
		if (err == nil) != tt.ok {
			t.Errorf("ValidID(%q) = %v, want ok=%v", tt.id, err, tt.ok)
			continue
		}
		if err != nil {
			if !errors.Is(err, ErrInvalidID) {
				t.Errorf("ValidID(%q) = %v, does not wrap ErrInvalidID", tt.id, err)
			}
			const rule = "must be 1–64 characters of lowercase letters, digits, '-' and '_', starting and ending with a letter or digit"
			if !strings.Contains(err.Error(), rule) {
				t.Errorf("ValidID(%q) = %q, want the rule in the message", tt.id, err)
			}
			if strings.ContainsRune(err.Error(), 0) {
				t.Errorf("ValidID(%q): message contains a raw NUL", tt.id)
			}
		}
	}
}

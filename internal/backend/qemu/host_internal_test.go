package qemu

import "testing"

func TestParseVersion(t *testing.T) {
	for line, want := range map[string]string{
		"QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)": "10.0.2",
		"QEMU emulator version 8.2": "8.2",
	} {
		if got, err := parseVersion(line); err != nil || got != want {
			t.Errorf("parseVersion(%q) = %q, %v; want %q", line, got, err, want)
		}
	}
	for _, line := range []string{"", "qemu 10.0.2", "QEMU emulator version x"} {
		if got, err := parseVersion(line); err == nil {
			t.Errorf("parseVersion(%q) = %q, want an error", line, got)
		}
	}
}

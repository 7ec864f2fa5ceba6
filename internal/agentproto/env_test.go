package agentproto

import "testing"

func TestValidEnvName(t *testing.T) {
	for _, ok := range []string{"A", "_", "a_1", "LD_PRELOAD", "PATH"} {
		if !ValidEnvName(ok) {
			t.Errorf("%q refused", ok)
		}
	}
	for _, bad := range []string{"", "1A", "A;reboot", "A=B", "A B", "A-B", "A\x00", "Ä", "$(x)"} {
		if ValidEnvName(bad) {
			t.Errorf("%q accepted", bad)
		}
	}
}

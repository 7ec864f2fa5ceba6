package cli

import (
	"strings"
	"testing"
)

// TestMCPRefusesJSON: --json would put an envelope on the stdout that
// carries JSON-RPC; smolvm mcp refuses it (and serves nothing).
func TestMCPRefusesJSON(t *testing.T) {
	env := smolvmJSON(t, "mcp")
	if env.OK || env.ExitCode != 2 || env.Error == nil || env.Error.Code != "invalid_config" || !strings.Contains(env.Error.Message, "--json") {
		t.Errorf("smolvm --json mcp: %+v", env)
	}
}

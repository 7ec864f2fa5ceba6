package cli

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend"
)

// TestDoctorCLI: doctor renders the SDK's checks (JSON: name, ok, status,
// detail, fix) and exits 1 when one fails (here: an empty image dir).
func TestDoctorCLI(t *testing.T) {
	empty := t.TempDir()
	env := smolvmJSON(t, "--image-dir", empty, "doctor")
	if env.OK || env.ExitCode != 1 || env.Command != "doctor" {
		t.Errorf("envelope ok %v, exit %d, command %q", env.OK, env.ExitCode, env.Command)
	}
	var checks []map[string]any
	if err := json.Unmarshal(env.Data, &checks); err != nil {
		t.Fatal(err)
	}
	byName := map[string]map[string]any{}
	for _, c := range checks {
		byName[c["name"].(string)] = c
		if _, ok := c["detail"]; !ok || c["ok"] != (c["status"] != "fail") {
			t.Errorf("check %v", c)
		}
	}
	if c := byName["image busybox"]; c["ok"] != false || c["status"] != "fail" || c["fix"] != "smolvm image build busybox" {
		t.Errorf("image check %v", c)
	}
	for _, want := range []string{"vms", "run dir", "snapshots"} {
		if byName[want] == nil {
			t.Errorf("no %q check in %v", want, checks)
		}
	}

	out, _, code := cli(t, "--image-dir", empty, "doctor")
	if code != 1 || !strings.Contains(out, "[FAIL] image busybox") || !strings.Contains(out, "fix: smolvm image build busybox") {
		t.Errorf("human doctor (exit %d):\n%s", code, out)
	}
}

func TestRenderChecks(t *testing.T) {
	var b strings.Builder
	renderChecks(&b, []smolvm.Check{
		{Name: "a", OK: true, Status: smolvm.CheckOK, Detail: "fine"},
		{Name: "b", OK: true, Status: smolvm.CheckWarn, Detail: "slow", Fix: smolvm.Fix{Action: smolvm.FixConfigureHost, Args: map[string]string{smolvm.ArgHint: "get KVM"}}},
		{Name: "c", Status: smolvm.CheckFail, Detail: "broken"},
	})
	want := "[ok  ] a              fine\n" +
		"[warn] b              slow\n" +
		"                      fix: get KVM\n" +
		"[FAIL] c              broken\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

// TestBackendFlagListsRegistry: --backend's help names every registered
// backend, not a list written into the CLI.
// A backend registered here (never usable, so "auto" never picks it)
// must show up.
func TestBackendFlagListsRegistry(t *testing.T) {
	backend.Register(backend.Registration{Name: "zz-cli-test", AutoRank: -1,
		New:    func(backend.Options) (backend.Backend, error) { return nil, backend.ErrVMMNotFound },
		Usable: func() string { return "test only" }})
	out, _, _ := cli(t, "sandbox", "create", "--help")
	for _, n := range append(backend.Names(), backend.Auto) {
		if !strings.Contains(out, n) {
			t.Errorf("--help does not name backend %q:\n%s", n, out)
		}
	}
}

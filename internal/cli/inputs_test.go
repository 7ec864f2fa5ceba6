package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

func TestParsePort(t *testing.T) {
	for in, want := range map[string]smolvm.PortForward{
		"8080:80":          {HostAddr: "127.0.0.1", HostPort: 8080, GuestPort: 80},
		"127.0.0.1:1:2":    {HostAddr: "127.0.0.1", HostPort: 1, GuestPort: 2},
		"0.0.0.0:8080:80":  {HostAddr: "0.0.0.0", HostPort: 8080, GuestPort: 80},
		"[::1]:8080:80":    {HostAddr: "::1", HostPort: 8080, GuestPort: 80},
		"[::]:65535:65535": {HostAddr: "::", HostPort: 65535, GuestPort: 65535},
	} {
		got, err := parsePort(in)
		if err != nil || got != want {
			t.Errorf("parsePort(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "80", ":80", "80:", "0:80", "80:0", "65536:80", "+80:80", "-1:80", "8080:80:",
		"localhost:8080:80", "::1:8080:80", "[127.0.0.1]:8080:80", "[::1:8080:80", "fe80::1%eth0:1:2", "[fe80::1%eth0]:1:2",
		"127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:80-cmd:touch pwned,hostfwd=tcp:127.0.0.1:1:2",
		"1.2.3.4:5:6:7",
	} {
		if pf, err := parsePort(in); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("parsePort(%q) = %+v, %v; want ErrInvalidConfig", in, pf, err)
		}
	}
}

func TestParseEnv(t *testing.T) {
	got, err := parseEnv([]string{"A=hello,LD_PRELOAD=/x", "B=", "C=x=y", "A2=1", "A2=2"})
	want := map[string]string{"A": "hello,LD_PRELOAD=/x", "B": "", "C": "x=y", "A2": "2"}
	if err != nil || !maps.Equal(got, want) {
		t.Errorf("parseEnv = %v, %v; want %v", got, err, want)
	}
	for _, bad := range []string{"A", "=x", ""} {
		if _, err := parseEnv([]string{bad}); !errors.Is(err, smolvm.ErrInvalidConfig) {
			t.Errorf("parseEnv(%q): %v", bad, err)
		}
	}
}

// TestEnvFlagKeepsCommas: the -e flags of create and exec hand the value
// through whole (pflag's StringToString split it at commas).
func TestEnvFlagKeepsCommas(t *testing.T) {
	a := &app{}
	for name, cmd := range map[string]*cobra.Command{"create": a.createCmd(), "exec": a.execCmd()} {
		if err := cmd.ParseFlags([]string{"-e", "A=hello,LD_PRELOAD=/x", "--env", "B=1,2"}); err != nil {
			t.Fatal(err)
		}
		vals, err := cmd.Flags().GetStringArray("env")
		if err != nil {
			t.Fatal(err)
		}
		env, err := parseEnv(vals)
		if err != nil || !maps.Equal(env, map[string]string{"A": "hello,LD_PRELOAD=/x", "B": "1,2"}) {
			t.Errorf("%s -e: %v %v", name, env, err)
		}
	}
}

// TestEnvAndPortFlagsInVM: on a real VM, create -e keeps commas in one
// variable, exec -e too, and -p ADDR:HOST:GUEST binds that address.
func TestEnvAndPortFlagsInVM(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	env := smolvmJSON(t, "sandbox", "create", "--name", "cli-env", "--image", "busybox",
		"-e", "A=hello,LD_PRELOAD=/x", "-p", fmt.Sprintf("127.0.0.1:%d:8080", port))
	if !env.OK {
		t.Fatalf("create: %+v %s", env, env.Data)
	}
	defer cli(t, "sandbox", "delete", "cli-env")
	out, stderr, code := cli(t, "sandbox", "exec", "cli-env", "-e", "B=x,y=z", "--", `echo "$A|${LD_PRELOAD-unset}|$B|${y-unset}"`)
	if code != 0 || strings.TrimSpace(out) != "hello,LD_PRELOAD=/x|unset|x,y=z|unset" {
		t.Errorf("exec: %q %q %d", out, stderr, code)
	}
	var info struct {
		PortForwards []smolvm.PortForward `json:"port_forwards"`
	}
	json.Unmarshal(env.Data, &info)
	if len(info.PortForwards) != 1 || info.PortForwards[0] != (smolvm.PortForward{HostAddr: "127.0.0.1", HostPort: port, GuestPort: 8080}) {
		t.Errorf("info: forwards %+v", info.PortForwards)
	}
	// A hostile -p is refused before anything is created.
	_, stderr, code = cli(t, "sandbox", "create", "--name", "cli-bad", "--image", "busybox", "-p", "localhost:8080:80")
	if code == 0 || !strings.Contains(stderr, "invalid port mapping") {
		t.Errorf("create -p localhost:...: %d %q", code, stderr)
	}
	_, stderr, code = cli(t, "sandbox", "create", "--name", "cli-bad", "--image", "busybox", "-e", "A;reboot=1")
	if code == 0 || !strings.Contains(stderr, "invalid environment variable name") {
		t.Errorf("create -e 'A;reboot=1': %d %q", code, stderr)
	}
	if out, _, _ := cli(t, "sandbox", "list", "--all"); strings.Contains(out, "cli-bad") {
		t.Errorf("refused create left a sandbox: %q", out)
	}
}

func TestHostPortString(t *testing.T) {
	for want, pf := range map[string]smolvm.PortForward{
		"127.0.0.1:80": {HostPort: 80}, "0.0.0.0:1": {HostAddr: "0.0.0.0", HostPort: 1}, "[::1]:8080": {HostAddr: "::1", HostPort: 8080},
	} {
		if got := hostPortString(pf); got != want {
			t.Errorf("hostPortString(%+v) = %q, want %q", pf, got, want)
		}
	}
}

// TestIsSandbox: ls, delete --all and completion leave out pool members
// and template builders.
func TestIsSandbox(t *testing.T) {
	for _, c := range []struct {
		i    smolvm.Info
		want bool
	}{
		{smolvm.Info{ID: "a"}, true},
		{smolvm.Info{ID: "pool-1234abcd-0123456789ab", Pool: true}, false},
		{smolvm.Info{ID: "template-build-0123", TemplateBuilder: true}, false},
	} {
		if got := isSandbox(c.i); got != c.want {
			t.Errorf("isSandbox(%s) = %v, want %v", c.i.ID, got, c.want)
		}
	}
}

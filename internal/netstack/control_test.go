package netstack

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

func TestControlValidatesEveryMessage(t *testing.T) {
	n, err := New(Config{Policy: netpolicy.Policy{Mode: netpolicy.ModeAllowlist}, Resolvers: []string{"127.0.0.1:1"}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	for in, want := range map[string]string{
		"":                                "bad request",
		"not json\n":                      "bad request",
		`{"op":"stats","extra":1}` + "\n": "unknown field",
		`{"op":"reboot"}` + "\n":          "unknown op",
		`{"op":"expose"}` + "\n":          "no forward",
		`{"op":"expose","forward":{"host_addr":"127.0.0.1,guestfwd=x","host_port":1,"guest_port":1}}` + "\n": "not an IP address",
		`{"op":"expose","forward":{"host_port":0,"guest_port":1}}` + "\n":                                    "ports must be",
		`{"op":"expose","forward":{"host_port":70000,"guest_port":1}}` + "\n":                                "ports must be",
		`{"op":"stats"}` + strings.Repeat(" ", 5000) + "\n":                                                  "bad request",
	} {
		rep := n.control(strings.NewReader(in))
		if rep.OK || !strings.Contains(rep.Error, want) {
			t.Errorf("%.60q: %+v, want error with %q", in, rep, want)
		}
	}
	if rep := n.control(strings.NewReader(`{"op":"stats"}` + "\n")); !rep.OK || rep.Stats == nil || rep.Stats.Policy.Mode != netpolicy.ModeAllowlist {
		t.Errorf("stats: %+v", rep)
	}

	// Over the socket, with the client the backend uses.
	sock := filepath.Join(t.TempDir(), "net.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go n.ServeControl(ln)
	if _, err := Call(context.Background(), sock, Request{Op: "stats"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Call(context.Background(), sock, Request{Op: "expose", Forward: &Forward{HostPort: 1, GuestPort: 0}}); err == nil || !strings.Contains(err.Error(), "ports must be") {
		t.Errorf("bad expose over the socket: %v", err)
	}
}

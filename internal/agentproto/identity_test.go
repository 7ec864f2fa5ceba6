package agentproto

import (
	"bytes"
	"encoding/json"
	"net"
	"strings"
	"testing"
)

func TestSetIdentityRequestValidate(t *testing.T) {
	good := SetIdentityRequest{Hostname: "my_vm-1.x", Seed: make([]byte, MaxSeedLen), MAC: "52:54:00:ab:cd:ef",
		MachineID: "0123456789abcdef0123456789abcdef"}
	if err := good.Validate(); err != nil {
		t.Fatalf("%+v: %v", good, err)
	}
	if err := (SetIdentityRequest{}).Validate(); err != nil {
		t.Errorf("empty request (keeps everything): %v", err)
	}
	for name, mut := range map[string]func(*SetIdentityRequest){
		"hostname too long":       func(r *SetIdentityRequest) { r.Hostname = strings.Repeat("a", MaxHostnameLen+1) },
		"hostname with a space":   func(r *SetIdentityRequest) { r.Hostname = "a b" },
		"hostname with a slash":   func(r *SetIdentityRequest) { r.Hostname = "../x" },
		"hostname with a newline": func(r *SetIdentityRequest) { r.Hostname = "a\nb" },
		"seed too long":           func(r *SetIdentityRequest) { r.Seed = make([]byte, MaxSeedLen+1) },
		"mac of 8 bytes":          func(r *SetIdentityRequest) { r.MAC = "00:00:00:00:fe:80:00:00" },
		"mac not hex":             func(r *SetIdentityRequest) { r.MAC = "52:54:00:zz:cd:ef" },
		"machine-id uppercase":    func(r *SetIdentityRequest) { r.MachineID = "0123456789ABCDEF0123456789abcdef" },
		"machine-id short":        func(r *SetIdentityRequest) { r.MachineID = "0123456789abcdef0123456789abcde" },
		"machine-id long":         func(r *SetIdentityRequest) { r.MachineID = "0123456789abcdef0123456789abcdef0" },
		"machine-id with newline": func(r *SetIdentityRequest) { r.MachineID = "0123456789abcdef0123456789abcde\n" },
		"machine-id a uuid":       func(r *SetIdentityRequest) { r.MachineID = "01234567-89ab-cdef-0123-456789abcdef" },
		"machine-id all zero":     func(r *SetIdentityRequest) { r.MachineID = strings.Repeat("0", MachineIDLen) },
	} {
		r := good
		mut(&r)
		if err := r.Validate(); err == nil {
			t.Errorf("%s: %+v accepted", name, r)
		}
	}
	if !ValidHostname(strings.Repeat("a", MaxHostnameLen)) || ValidHostname("") {
		t.Error("hostname length bounds")
	}
}

// TestSetIdentityRequestCompatible: the new field is optional on the wire
// both ways: an older host's request (no machine_id) decodes with it
// empty, and an older agent, which knows no machine_id, still decodes a
// new request (encoding/json ignores unknown fields).
func TestSetIdentityRequestCompatible(t *testing.T) {
	var r SetIdentityRequest
	if err := DecodePayload([]byte(`{"id":3,"type":"set_identity","hostname":"a","seed":"AQI=","mac":"52:54:00:00:00:01"}`), &r); err != nil {
		t.Fatal(err)
	}
	if r.MachineID != "" || r.Hostname != "a" || !bytes.Equal(r.Seed, []byte{1, 2}) || r.Validate() != nil {
		t.Errorf("old request decoded as %+v", r)
	}
	line, err := Marshal(4, TypeSetIdentity, SetIdentityRequest{Hostname: "b", MachineID: "0123456789abcdef0123456789abcdef"})
	if err != nil {
		t.Fatal(err)
	}
	var old struct {
		Hostname string `json:"hostname,omitempty"`
		Seed     []byte `json:"seed,omitempty"`
		MAC      string `json:"mac,omitempty"`
	}
	if err := DecodePayload(line, &old); err != nil || old.Hostname != "b" {
		t.Errorf("an older agent reads %s as %+v, %v", line, old, err)
	}
}

// FuzzSetIdentityRequest: whatever line the host sends, decoding never
// panics, and a request that Validate accepts is one the agent can apply
// as is: a hostname of at most 64 safe bytes (no '/', no whitespace), a
// bounded seed, a 6-byte MAC, a machine-id of 32 lowercase hex digits.
func FuzzSetIdentityRequest(f *testing.F) {
	for _, s := range []string{
		`{"id":1,"type":"set_identity","hostname":"vm-1","seed":"AAEC","mac":"52:54:00:12:34:56","machine_id":"0123456789abcdef0123456789abcdef"}`,
		`{"id":1,"type":"set_identity","machine_id":"00000000000000000000000000000000"}`,
		`{"id":1,"type":"set_identity","machine_id":"0123456789ABCDEF0123456789abcdef"}`,
		`{"id":1,"type":"set_identity","machine_id":"0123456789abcdef0123456789abcdef\n"}`,
		`{"id":1,"type":"set_identity","machine_id":12}`,
		`{"id":1,"type":"set_identity","hostname":"../../etc","mac":"00:00:00:00:fe:80:00:00"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		var r SetIdentityRequest
		if DecodePayload(line, &r) != nil || r.Validate() != nil {
			return
		}
		if len(r.Hostname) > MaxHostnameLen || strings.ContainsAny(r.Hostname, "/ \t\n\x00") {
			t.Fatalf("hostname %q accepted", r.Hostname)
		}
		if len(r.Seed) > MaxSeedLen {
			t.Fatalf("seed of %d bytes accepted", len(r.Seed))
		}
		if r.MAC != "" {
			if hw, err := net.ParseMAC(r.MAC); err != nil || len(hw) != 6 {
				t.Fatalf("mac %q accepted", r.MAC)
			}
		}
		if r.MachineID != "" {
			if len(r.MachineID) != MachineIDLen || strings.Trim(r.MachineID, "0123456789abcdef") != "" || strings.Trim(r.MachineID, "0") == "" {
				t.Fatalf("machine-id %q accepted", r.MachineID)
			}
		}
		// What was accepted survives a round trip unchanged.
		b, err := Marshal(1, TypeSetIdentity, r)
		if err != nil {
			t.Fatal(err)
		}
		var again SetIdentityRequest
		if err := json.Unmarshal(b, &again); err != nil || again.MachineID != r.MachineID || again.Hostname != r.Hostname || again.MAC != r.MAC {
			t.Fatalf("round trip %+v -> %+v (%v)", r, again, err)
		}
	})
}

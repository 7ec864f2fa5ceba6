package qmp

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/qmp/qmptest"
)

// TestRealQEMUAddFD hands a file to a real QEMU with add-fd and checks that
// QEMU holds a descriptor of that very file (its /proc fd link), listed in
// query-fdsets, and that remove-fd releases it.
func TestRealQEMUAddFD(t *testing.T) {
	dir, sock, cmd := startBareQEMU(t, "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	path := filepath.Join(dir, "handed")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	var added struct {
		FdsetID int `json:"fdset-id"`
		FD      int `json:"fd"`
	}
	if err := c.ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": "test"}, &added, f); err != nil {
		t.Fatal(err)
	}
	f.Close() // QEMU has its own copy
	link, err := os.Readlink("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/fd/" + strconv.Itoa(added.FD))
	if err != nil || link != path {
		t.Fatalf("QEMU's fd %d is %q (%v), want %s", added.FD, link, err, path)
	}
	var sets []struct {
		FdsetID int `json:"fdset-id"`
		FDs     []struct {
			FD     int    `json:"fd"`
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	if err := c.Execute(ctx, "query-fdsets", nil, &sets); err != nil {
		t.Fatal(err)
	}
	if len(sets) != 1 || sets[0].FdsetID != added.FdsetID || len(sets[0].FDs) != 1 ||
		sets[0].FDs[0].FD != added.FD || sets[0].FDs[0].Opaque != "test" {
		t.Fatalf("query-fdsets = %+v, want fdset %d with fd %d", sets, added.FdsetID, added.FD)
	}
	if err := c.Execute(ctx, "remove-fd", map[string]any{"fdset-id": added.FdsetID}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Readlink("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/fd/" + strconv.Itoa(added.FD)); err == nil {
		t.Fatalf("QEMU still holds fd %d after remove-fd", added.FD)
	}

	// Without a descriptor, add-fd fails in QEMU (nothing was sent).
	err = c.Execute(ctx, "add-fd", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) {
		t.Fatalf("add-fd without a descriptor: want a QMP error, got %v", err)
	}
}

// TestExecuteWithFileNeedsUnixSocket: over a connection that cannot carry
// descriptors the call fails before anything is written.
func TestExecuteWithFileNeedsUnixSocket(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		b.Write([]byte(qmptest.Greeting + "\n"))
		buf := make([]byte, 4096)
		n, _ := b.Read(buf) // qmp_capabilities
		_ = n
		b.Write([]byte(`{"return": {}, "id": "smolvm-1"}` + "\n"))
		for {
			if _, err := b.Read(buf); err != nil {
				return
			}
			t.Error("something was written for a call that must fail first")
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := NewClient(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": "x"}, nil, f); !errors.Is(err, ErrNoFDPassing) {
		t.Fatalf("want ErrNoFDPassing, got %v", err)
	}
}

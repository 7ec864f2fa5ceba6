package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestVsockListenerClose(t *testing.T) {
	ln, err := ListenVsock(40123)
	if err != nil {
		t.Skipf("no vsock here: %v", err)
	}
	if ln.Addr().String() != "vsock:4294967295:40123" {
		t.Errorf("addr %s", ln.Addr())
	}
	errc := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond)
	ln.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("accept after close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end Accept")
	}
}

func TestServePortEndsOnClose(t *testing.T) {
	dir, err := os.MkdirTemp("", "sp")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	p, err := ListenChardev(filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(Options{EnvFile: filepath.Join(dir, "env"), Logf: t.Logf})
	defer srv.Close()
	done := make(chan error, 1)
	go func() { done <- srv.ServePort(context.Background(), p) }()
	time.Sleep(20 * time.Millisecond)
	p.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("ServePort: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServePort kept running on a closed port")
	}
}

package agent

import (
	"errors"
	"net"
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

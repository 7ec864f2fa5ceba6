package qmp

import (
	"context"
	"errors"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/qmp/qmptest"
)

// TestOversizedReplyEndsConnection: a QEMU that answers with a line longer
// than MaxLine (a compromised QEMU is hostile) ends the connection with
// ErrLineTooLong instead of growing the client's memory with the line. The
// server streams 256 MiB without a newline from one reused buffer, so what
// the process allocates is the client's.
func TestOversizedReplyEndsConnection(t *testing.T) {
	chunk := []byte(strings.Repeat("x", 1<<20))
	path := qmptest.StartRaw(t, "", func(conn net.Conn, _ func(string), _ map[string]any) {
		conn.Write([]byte(`{"return": "`))
		for i := 0; i < 256; i++ {
			if _, err := conn.Write(chunk); err != nil {
				return // the client hung up, as it should
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err = c.Execute(ctx, "query-status", nil, nil)
	runtime.ReadMemStats(&after)
	if err == nil {
		t.Fatal("Execute returned no error for an oversized reply")
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("connection still open after an oversized reply")
	}
	if !errors.Is(c.err, ErrLineTooLong) {
		t.Fatalf("connection error = %v, want ErrLineTooLong", c.err)
	}
	// Up to MaxLine is held before the client gives up (append doubling:
	// about 2×MaxLine allocated over the line's life), never the 256 MiB sent.
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 3*MaxLine {
		t.Fatalf("client allocated %d MiB reading the reply; bound is %d MiB", grown>>20, 3*MaxLine>>20)
	} else {
		t.Logf("%v; allocated %d MiB", err, grown>>20)
	}
}

package qmp

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestOversizedReplyEndsConnection: a QEMU that answers with a line longer
// than MaxLine (a compromised QEMU is hostile) ends the connection with
// ErrLineTooLong instead of growing the client's memory with the line.
func TestOversizedReplyEndsConnection(t *testing.T) {
	chunk := strings.Repeat("x", 1<<20)
	srv := startFake(t, func(w func(string), req map[string]any) {
		// A reply that never ends within MaxLine: 2×MaxLine of one string.
		var b strings.Builder
		b.WriteString(`{"return": "`)
		for b.Len() < 2*MaxLine {
			b.WriteString(chunk)
		}
		w(b.String() + `"}`)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, srv.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err = c.Execute(ctx, "query-status", nil, nil)
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
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	// The client may hold up to MaxLine before it gives up, never the
	// 2×MaxLine the server sent (with append's doubling, at most ~2×MaxLine
	// allocated in total over the line's life).
	if grown := after.TotalAlloc - before.TotalAlloc; grown > 3*MaxLine {
		t.Fatalf("client allocated %d bytes reading the reply; bound is %d", grown, 3*MaxLine)
	}
	t.Logf("%v; allocated %d MiB", err, (after.TotalAlloc-before.TotalAlloc)>>20)
}

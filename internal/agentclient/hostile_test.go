package agentclient

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

// hostileGuest connects a Client to a scripted guest that answered hello.
func hostileGuest(t *testing.T) (*scriptedGuest, *Client) {
	t.Helper()
	g, dial := newScripted(t)
	go g.answerHello(t)
	c, err := Connect(ctxT(t, 10*time.Second), dial)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return g, c
}

// nextReq returns the next request other than hello.
func (g *scriptedGuest) nextReq(t *testing.T) (agentproto.Header, []byte) {
	t.Helper()
	for {
		h, line := g.next(t)
		if h.Type != agentproto.TypeHello {
			return h, line
		}
	}
}

// An output message over MaxOutputChunk, a reply over its type's bound
// and a reply over the reader's bound each fail their call with
// ErrProtocol; the exec is cancelled in the guest and the connection
// stays usable.
func TestOversizedRepliesFailTheirCall(t *testing.T) {
	g, c := hostileGuest(t)
	ctx := ctxT(t, 30*time.Second)
	for _, tc := range []struct {
		name string
		send func(id uint64)
	}{
		{"output over the chunk size", func(id uint64) {
			g.send(t, id, agentproto.TypeOutput, agentproto.Output{Stream: "stdout", Data: make([]byte, agentproto.MaxOutputChunk+1)})
		}},
		{"output of an unknown stream", func(id uint64) {
			g.send(t, id, agentproto.TypeOutput, agentproto.Output{Stream: "stdin", Data: []byte("x")})
		}},
		{"malformed output", func(id uint64) {
			g.write(t, fmt.Sprintf(`{"id":%d,"type":"output","stream":"stdout","data":"!!!"}`+"\n", id))
		}},
		{"exit reply over its bound", func(id uint64) {
			g.write(t, fmt.Sprintf(`{"id":%d,"type":"exit","error":"%s"}`+"\n", id, strings.Repeat("x", agentproto.MaxSmallReply)))
		}},
		{"line over MaxReplySize", func(id uint64) {
			g.write(t, fmt.Sprintf(`{"id":%d,"type":"output","data":"`, id))
			chunk := bytes.Repeat([]byte("A"), 1<<20)
			for range agentproto.MaxReplySize>>20 + 1 {
				g.write(t, string(chunk))
			}
			g.write(t, "\"}\n")
		}},
	} {
		done := make(chan error, 1)
		go func() {
			_, err := c.Exec(ctx, agentproto.ExecRequest{Argv: []string{"x"}}, io.Discard, io.Discard)
			done <- err
		}()
		h, _ := g.nextReq(t)
		if h.Type != agentproto.TypeExec {
			t.Fatalf("%s: got %s", tc.name, h.Type)
		}
		tc.send(h.ID)
		if err := <-done; !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: Exec returned %v, want ErrProtocol", tc.name, err)
		}
		if h2, _ := g.nextReq(t); h2.Type != agentproto.TypeCancel || h2.ID != h.ID {
			t.Errorf("%s: guest got %s %d, want cancel %d", tc.name, h2.Type, h2.ID, h.ID)
		}
	}
	// Still connected: a ping works.
	go func() {
		h, _ := g.nextReq(t)
		g.send(t, h.ID, agentproto.TypePong, nil)
	}()
	if _, err := c.Ping(ctx); err != nil {
		t.Fatalf("ping after the bad replies: %v", err)
	}
}

// A guest that lies about a file's size never gets more than the
// announced bytes written, and the read fails with ErrSizeMismatch.
func TestReadFileToHoldsTheGuestToItsSize(t *testing.T) {
	g, c := hostileGuest(t)
	ctx := ctxT(t, 30*time.Second)
	// The guest answers every read_chunk with the current case's reply.
	var reply atomic.Pointer[func(agentproto.ReadChunkRequest) agentproto.Chunk]
	go func() {
		for {
			line, err := g.lr.ReadLine()
			if err != nil {
				return
			}
			h, err := agentproto.DecodeHeader(line)
			if err != nil || h.Type != agentproto.TypeReadChunk {
				continue
			}
			var req agentproto.ReadChunkRequest
			if agentproto.DecodePayload(line, &req) != nil {
				continue
			}
			b, _ := agentproto.Marshal(h.ID, agentproto.TypeChunk, (*reply.Load())(req))
			if _, err := g.conn.Write(b); err != nil {
				return
			}
		}
	}()
	for _, tc := range []struct {
		name  string
		reply func(req agentproto.ReadChunkRequest) agentproto.Chunk
		max   int // bytes the writer may see
		err   error
	}{
		{"more than announced", func(req agentproto.ReadChunkRequest) agentproto.Chunk {
			return agentproto.Chunk{Size: 10, Data: make([]byte, req.Length)}
		}, 0, ErrSizeMismatch},
		{"less than announced", func(req agentproto.ReadChunkRequest) agentproto.Chunk {
			return agentproto.Chunk{Size: 1 << 20, Data: make([]byte, 10)}
		}, 10, ErrSizeMismatch},
		{"more than asked", func(req agentproto.ReadChunkRequest) agentproto.Chunk {
			return agentproto.Chunk{Size: 1 << 30, Data: make([]byte, req.Length+1)}
		}, 0, ErrSizeMismatch},
		{"negative size", func(req agentproto.ReadChunkRequest) agentproto.Chunk {
			return agentproto.Chunk{Size: -1, Data: []byte("x")}
		}, 0, ErrSizeMismatch},
		{"endless file without a size", func(req agentproto.ReadChunkRequest) agentproto.Chunk {
			return agentproto.Chunk{Size: 0, Data: make([]byte, req.Length)}
		}, MaxUnsizedFile, agentproto.ErrTooLarge},
	} {
		reply.Store(&tc.reply)
		var w countWriter
		_, _, err := c.ReadFileTo(ctx, "/f", &w)
		if !errors.Is(err, tc.err) || w.n > int64(tc.max) {
			t.Errorf("%s: %v after %d bytes, want %v within %d", tc.name, err, w.n, tc.err, tc.max)
		}
	}
	// ReadFileToChecked: check sees the announced size before w sees a
	// byte, and its error ends the read as it is.
	huge := func(req agentproto.ReadChunkRequest) agentproto.Chunk {
		return agentproto.Chunk{Size: 1 << 40, Data: make([]byte, req.Length)}
	}
	reply.Store(&huge)
	refuse := errors.New("too large for the caller")
	var w countWriter
	var announced int64
	_, _, err := c.ReadFileToChecked(ctx, "/f", &w, func(size int64) error { announced = size; return refuse })
	if err != refuse || w.n != 0 || announced != 1<<40 {
		t.Errorf("refused by check: %v after %d bytes, announced %d", err, w.n, announced)
	}
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

// A guest that never answers: every call but Exec ends at its host-side
// deadline with ErrTimeout.
func TestCallsHaveAHostSideDeadline(t *testing.T) {
	g, c := hostileGuest(t)
	go io.Copy(io.Discard, g.conn) // read requests, answer none
	c.SetCallTimeout(200*time.Millisecond, 10*time.Millisecond)
	ctx := ctxT(t, 30*time.Second)
	start := time.Now()
	_, err := c.Ping(ctx)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("ping: %v, want ErrTimeout", err)
	}
	if _, _, err := c.ReadFileTo(ctx, "/f", io.Discard); !errors.Is(err, ErrTimeout) {
		t.Errorf("read: %v, want ErrTimeout", err)
	}
	if err := c.Sync(ctx); !errors.Is(err, ErrTimeout) {
		t.Errorf("sync: %v, want ErrTimeout", err)
	}
	// 0.2 s + 0.28 s for the 8 MiB chunk + 0.6 s.
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("took %v", el)
	}
	if got := c.timeoutFor(agentproto.TypeWriteChunk, 8<<20); got != 200*time.Millisecond+80*time.Millisecond {
		t.Errorf("timeout of an 8 MiB chunk: %v", got)
	}
}

// A guest flooding output while the caller is slow: the reader waits for
// the caller (bounded queue), so the host's heap does not grow with the
// flood.
func TestOutputFloodIsBackpressured(t *testing.T) {
	g, c := hostileGuest(t)
	ctx := ctxT(t, 60*time.Second)
	const total = 256 << 20
	block := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		first := true
		w := writerFunc(func(p []byte) (int, error) {
			if first {
				first = false
				<-block // a slow caller
			}
			return len(p), nil
		})
		_, err := c.Exec(ctx, agentproto.ExecRequest{Argv: []string{"x"}}, w, io.Discard)
		done <- err
	}()
	h, _ := g.nextReq(t)
	msg, _ := agentproto.Marshal(h.ID, agentproto.TypeOutput, agentproto.Output{Stream: "stdout", Data: make([]byte, agentproto.MaxOutputChunk)})
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	sent := make(chan int, 1)
	go func() {
		n := 0
		for n < total {
			if _, err := g.conn.Write(msg); err != nil {
				break
			}
			n += agentproto.MaxOutputChunk
		}
		sent <- n
	}()
	time.Sleep(time.Second)
	var during runtime.MemStats
	runtime.ReadMemStats(&during)
	close(block)
	n := <-sent
	g.send(t, h.ID, agentproto.TypeExit, agentproto.ExecResult{})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	growth := int64(during.HeapInuse) - int64(before.HeapInuse)
	t.Logf("heap growth while the caller was blocked: %d KiB; sent %d MiB", growth>>10, n>>20)
	if growth > 16<<20 {
		t.Errorf("heap grew by %d MiB while the caller was blocked", growth>>20)
	}
}

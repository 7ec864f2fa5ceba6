//go:build smolvm_hostile

// This file is only in agents built with -tags smolvm_hostile: a hostile
// guest for the host's tests (internal/testutil HostileImage). Requests
// named below are answered wrongly on purpose; everything else is served
// as usual, so the agent still boots the VM and answers hello.
//
//	exec ["hostile-flood", MiB, stream]  output messages of MaxOutputChunk as fast as
//	                                     possible (MiB total, default 1024; stream stdout,
//	                                     stderr or both), then exit 0; cancel stops it
//	exec ["hostile-silent"]              never answers, ignores cancel
//	exec ["hostile-oversize"]            one output message 4x over MaxOutputChunk
//	exec ["hostile-huge-line"]           one 16 MiB line with the request's id
//	exec ["hostile-malformed"]           garbage lines, then a bad output message
//	exec ["hostile-console", MiB]        writes MiB of text to /dev/console, then exit 0
//	read_chunk /hostile/more             announces 10 bytes, sends what was asked
//	read_chunk /hostile/less             announces 1 MiB, sends 10 bytes
//	read_chunk /hostile/silent           never answers
package agent

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/smolvm-go/smolvm/internal/agentproto"
)

func init() { misbehave = hostile }

func hostile(ss *session, h agentproto.Header, line []byte) bool {
	switch h.Type {
	case agentproto.TypeExec:
		var req agentproto.ExecRequest
		if agentproto.DecodePayload(line, &req) != nil || len(req.Argv) == 0 || !strings.HasPrefix(req.Argv[0], "hostile-") {
			return false
		}
		arg := func(i int, def string) string {
			if i < len(req.Argv) {
				return req.Argv[i]
			}
			return def
		}
		id := h.ID
		switch req.Argv[0] {
		case "hostile-silent":
		case "hostile-flood":
			mib, _ := strconv.Atoi(arg(1, "1024"))
			go ss.hostileFlood(id, int64(mib)<<20, arg(2, "stdout"))
		case "hostile-oversize":
			ss.send(id, agentproto.TypeOutput, agentproto.Output{Stream: agentproto.StreamStdout,
				Data: bytes.Repeat([]byte("x"), 4*agentproto.MaxOutputChunk)})
		case "hostile-huge-line":
			b := make([]byte, 0, 16<<20+64)
			b = fmt.Appendf(b, `{"id":%d,"type":"output","stream":"stdout","data":"`, id)
			b = append(b, bytes.Repeat([]byte("QUFB"), (16<<20)/4)...)
			b = append(b, "\"}\n"...)
			ss.w.WriteMsg(b)
		case "hostile-malformed":
			for _, l := range []string{
				"not json at all\n",
				`{"id":` + "\n",
				fmt.Sprintf(`{"id":%d,"type":"OUTPUT; rm -rf /"}`+"\n", id),
				fmt.Sprintf(`{"id":%d,"type":"%s"}`+"\n", id, strings.Repeat("a", 100)),
				"\x00\x01\x02\xff\n",
				fmt.Sprintf(`{"id":%d,"type":"output","stream":"stdout","data":"@@@@"}`+"\n", id),
			} {
				ss.w.WriteMsg([]byte(l))
			}
		case "hostile-console":
			mib, _ := strconv.Atoi(arg(1, "16"))
			go func() {
				n, err := floodConsole(int64(mib) << 20)
				res := agentproto.ExecResult{ExitCode: 0}
				if err != nil {
					res.ExitCode, res.Error = 1, err.Error()
				}
				ss.send(id, agentproto.TypeOutput, agentproto.Output{Stream: agentproto.StreamStdout, Data: []byte(strconv.FormatInt(n, 10) + "\n")})
				ss.send(id, agentproto.TypeExit, res)
			}()
		default:
			return false
		}
		return true
	case agentproto.TypeReadChunk:
		var req agentproto.ReadChunkRequest
		if agentproto.DecodePayload(line, &req) != nil {
			return false
		}
		switch req.Path {
		case "/hostile/more":
			ss.send(h.ID, agentproto.TypeChunk, agentproto.Chunk{Size: 10, Mode: 0o644, Data: bytes.Repeat([]byte("m"), req.Length)})
		case "/hostile/less":
			ss.send(h.ID, agentproto.TypeChunk, agentproto.Chunk{Size: 1 << 20, Mode: 0o644, Data: []byte("0123456789")})
		case "/hostile/silent":
		default:
			return false
		}
		return true
	}
	return false
}

// hostileFlood sends total bytes of output as fast as the channel takes
// them, stopping early on cancel, then exits 0.
func (ss *session) hostileFlood(id uint64, total int64, stream string) {
	ctx, cancel := context.WithCancel(ss.ctx)
	ss.mu.Lock()
	ss.cancels[id] = cancel
	ss.mu.Unlock()
	defer func() {
		ss.mu.Lock()
		delete(ss.cancels, id)
		ss.mu.Unlock()
		cancel()
	}()
	msgs := map[string][]byte{}
	for _, st := range []string{agentproto.StreamStdout, agentproto.StreamStderr} {
		msgs[st], _ = agentproto.Marshal(id, agentproto.TypeOutput, agentproto.Output{Stream: st, Data: bytes.Repeat([]byte("F"), agentproto.MaxOutputChunk)})
	}
	var sent int64
	for i := 0; sent < total && ctx.Err() == nil; i++ {
		st := stream
		if stream == "both" {
			st = []string{agentproto.StreamStdout, agentproto.StreamStderr}[i%2]
		}
		if ss.w.WriteMsg(msgs[st]) != nil {
			return
		}
		sent += agentproto.MaxOutputChunk
	}
	ss.send(id, agentproto.TypeExit, agentproto.ExecResult{Canceled: ctx.Err() != nil})
}

// floodConsole writes n bytes of text lines to the console.
func floodConsole(n int64) (int64, error) {
	f, err := os.OpenFile("/dev/console", os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	line := []byte(strings.Repeat("console flood ", 4) + "0123456789abcdef\n")
	buf := bytes.Repeat(line, 64<<10/len(line))
	var done int64
	for done < n {
		m, err := f.Write(buf[:min(int64(len(buf)), n-done)])
		done += int64(m)
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

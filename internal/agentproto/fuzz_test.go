package agentproto

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"
)

// splitReader yields its data in reads of at most n bytes.
type splitReader struct {
	data []byte
	n    int
}

func (r *splitReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), r.n)], r.data)
	r.data = r.data[k:]
	return k, nil
}

// FuzzLineReader: on any byte stream, any read size and any limit, the
// reader returns exactly the non-blank lines within the limit (without
// their newline and trailing CR) and one TooLongError per longer line, in
// order, never a line over the limit, and never holds more than limit+1
// bytes of buffer plus its initial 64 KiB.
func FuzzLineReader(f *testing.F) {
	f.Add([]byte("a\nbb\n\n ccc\r\n"), uint16(3), uint8(1))
	f.Add([]byte(`{"id":1,"type":"ok"}`+"\n"+`{"id":2,"type":"output","data":"`+string(bytes.Repeat([]byte("A"), 300))+`"}`+"\nx\n"), uint16(64), uint8(7))
	f.Add(bytes.Repeat([]byte("x"), 5000), uint16(100), uint8(255))
	f.Add([]byte("\r\n\r\n\n"), uint16(1), uint8(2))
	f.Fuzz(func(t *testing.T, data []byte, max uint16, step uint8) {
		limit := int(max)%4096 + 1
		n := int(step) + 1
		type item struct {
			line    string
			tooLong bool
		}
		var want []item
		rest := data
		for {
			i := bytes.IndexByte(rest, '\n')
			if i < 0 {
				break
			}
			seg := rest[:i]
			rest = rest[i+1:]
			if i+1 > limit {
				want = append(want, item{tooLong: true})
				continue
			}
			seg = bytes.TrimSuffix(seg, []byte("\r"))
			if len(bytes.TrimSpace(seg)) == 0 {
				continue
			}
			want = append(want, item{line: string(seg)})
		}
		lr := NewLineReader(&splitReader{data: data, n: n}, limit)
		var got []item
		for {
			line, err := lr.ReadLine()
			if cap(lr.buf) > max2(64<<10, 2*(limit+1)) {
				t.Fatalf("buffer grew to %d for limit %d", cap(lr.buf), limit)
			}
			var tl *TooLongError
			if errors.As(err, &tl) {
				if !errors.Is(err, ErrTooLarge) || len(tl.Prefix) > 64 {
					t.Fatalf("bad TooLongError %v (prefix %d bytes)", err, len(tl.Prefix))
				}
				got = append(got, item{tooLong: true})
				continue
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("unexpected error %v", err)
			}
			if len(line)+1 > limit || bytes.IndexByte(line, '\n') >= 0 {
				t.Fatalf("line of %d bytes over limit %d or with a newline", len(line), limit)
			}
			got = append(got, item{line: string(line)})
		}
		if len(got) != len(want) {
			t.Fatalf("got %d items, want %d:\n%+v\n%+v", len(got), len(want), got, want)
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("item %d: got %+v, want %+v", i, got[i], want[i])
			}
		}
	})
}

func max2(a, b int) int {
	if a > b {
		return a
	}
	return b
}

// FuzzDecodeHeader: DecodeHeader never panics, accepts only well-formed
// types (1-32 bytes of [a-z_]) and only JSON or Marshal's shape; ReplyLimit
// is within MaxReplySize for every type.
func FuzzDecodeHeader(f *testing.F) {
	for _, s := range []string{
		`{"id":7,"type":"exec","shell":"x"}`,
		`{"id":7,"type":"ping"}`,
		`{"type":"ping","id":9}`,
		`{"id":7,"type":"pi\u006eg"}`,
		`{"id":18446744073709551615,"type":"output","data":"AAAA"}`,
		`{"id":1,"type":"` + string(bytes.Repeat([]byte("a"), 40)) + `"}`,
		`{"id":1,"type":"A;B"}`,
		`{"id":1,"type":"ok"`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		h, err := DecodeHeader(line)
		if lim := ReplyLimit(h.Type); lim <= 0 || lim > MaxReplySize {
			t.Fatalf("ReplyLimit(%q) = %d", h.Type, lim)
		}
		if err != nil {
			return
		}
		if !validType(h.Type) {
			t.Fatalf("accepted type %q", h.Type)
		}
		// A line encoding/json rejects is accepted only through the fast
		// path, which needs Marshal's shape.
		var j Header
		if json.Unmarshal(line, &j) != nil && !bytes.HasPrefix(line, []byte(`{"id":`)) {
			t.Fatalf("%q: accepted, but it is not JSON", line)
		}
	})
}

// FuzzInteractive: the interactive exec requests (stdin, resize, signal,
// an exec's tty) decode and validate any line without panicking, and what
// validates is within bounds.
func FuzzInteractive(f *testing.F) {
	for _, s := range []string{
		`{"id":1,"type":"stdin","data":"aGk=","eof":true}`,
		`{"id":1,"type":"resize","rows":24,"cols":80}`,
		`{"id":1,"type":"signal","signal":"SIGINT"}`,
		`{"id":1,"type":"exec","argv":["sh"],"tty":{"rows":1,"cols":2,"term":"xterm"}}`,
		`{"id":1,"type":"signal","signal":"int"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		var st StdinRequest
		if DecodePayload(line, &st) == nil && st.Validate() == nil && len(st.Data) > MaxStdinChunk {
			t.Fatalf("stdin of %d bytes validated", len(st.Data))
		}
		var rs ResizeRequest
		if DecodePayload(line, &rs) == nil && rs.Validate() == nil && (rs.Rows == 0 || rs.Cols == 0 || rs.Rows > MaxTTYSize || rs.Cols > MaxTTYSize) {
			t.Fatalf("size %+v validated", rs)
		}
		var sg SignalRequest
		if DecodePayload(line, &sg) == nil {
			if name, n, err := ParseSignal(sg.Signal); err == nil && (SignalNames[name] != n || n < 1 || n > 31) {
				t.Fatalf("signal %q parsed as %s %d", sg.Signal, name, n)
			}
		}
		var ex ExecRequest
		if DecodePayload(line, &ex) == nil && ex.TTY != nil && ex.TTY.Validate() == nil {
			for _, c := range ex.TTY.Term {
				if c > 127 || c == ';' || c == ' ' || c == '\'' {
					t.Fatalf("term %q validated", ex.TTY.Term)
				}
			}
		}
	})
}

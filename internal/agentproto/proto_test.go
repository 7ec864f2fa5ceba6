package agentproto

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestMarshalRoundTrip(t *testing.T) {
	req := ExecRequest{Argv: []string{"sh", "-c", "echo \"hi\"\n"}, Env: map[string]string{"A": "line1\nline2"}, Stdin: []byte{0, '\n', 255}, TimeoutMS: 5}
	b, err := Marshal(18446744073709551615, TypeExec, req)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Count(b, []byte("\n")) != 1 || b[len(b)-1] != '\n' {
		t.Fatalf("not one line: %q", b)
	}
	if !bytes.HasPrefix(b, []byte(`{"id":18446744073709551615,"type":"exec","argv":`)) {
		t.Errorf("layout: %s", b)
	}
	h, err := DecodeHeader(b)
	if err != nil || h != (Header{ID: 18446744073709551615, Type: TypeExec}) {
		t.Fatalf("header %+v %v", h, err)
	}
	var got ExecRequest
	if err := DecodePayload(b, &got); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(req, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	// Empty payloads.
	for _, p := range []any{nil, struct{}{}, ShutdownRequest{}} {
		b, err := Marshal(1, TypePing, p)
		if err != nil || string(b) != `{"id":1,"type":"ping"}`+"\n" {
			t.Errorf("%T: %q %v", p, b, err)
		}
	}
	if _, err := Marshal(1, TypePing, []int{1}); err == nil {
		t.Error("non-object payload accepted")
	}
	defer func(l int) { marshalLimit = l }(marshalLimit)
	marshalLimit = 1000
	if _, err := Marshal(1, TypeWriteFile, WriteFileRequest{Data: make([]byte, 1000)}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("oversized: %v", err)
	}
	if _, err := Marshal(1, TypeWriteFile, WriteFileRequest{Data: make([]byte, 600)}); err != nil {
		t.Errorf("under the limit: %v", err)
	}
	// The error payload is a Go error.
	var e error = &Error{Code: CodeNotFound, Message: "x: no such file"}
	if e.Error() != "agent: x: no such file (not_found)" {
		t.Errorf("%q", e.Error())
	}
}

func TestPeekID(t *testing.T) {
	for in, want := range map[string]uint64{
		`{"id":42,"type":"x"`:                   42,
		`{"id":18446744073709551615,"type":"x"`: 18446744073709551615,
	} {
		if id, ok := PeekID([]byte(in)); !ok || id != want {
			t.Errorf("%s: %d %v", in, id, ok)
		}
	}
	for _, in := range []string{``, `{"id":`, `{"id":12`, `{"type":"x","id":1}`, `{"id":-1,`, `{"id":99999999999999999999,`} {
		if _, ok := PeekID([]byte(in)); ok {
			t.Errorf("%q accepted", in)
		}
	}
}

func readAll(lr *LineReader) ([]string, error) {
	var out []string
	for {
		l, err := lr.ReadLine()
		if err != nil {
			var tl *TooLongError
			if errors.As(err, &tl) {
				out = append(out, "TOOLONG:"+string(tl.Prefix[:min(8, len(tl.Prefix))]))
				continue
			}
			return out, err
		}
		out = append(out, string(l))
	}
}

func TestLineReader(t *testing.T) {
	long := strings.Repeat("x", 100)
	in := "a\n\n  \nb\r\n" + `{"id":7,` + long + "\nc\n" + "partial"
	for name, r := range map[string]io.Reader{
		"whole":   strings.NewReader(in),
		"onebyte": iotest.OneByteReader(strings.NewReader(in)),
		"dataerr": iotest.DataErrReader(strings.NewReader(in)),
	} {
		lr := NewLineReader(r, 50)
		got, err := readAll(lr)
		if err != io.EOF {
			t.Errorf("%s: err %v", name, err)
		}
		if diff := cmp.Diff([]string{"a", "b", `TOOLONG:{"id":7,`, "c"}, got); diff != "" {
			t.Errorf("%s (-want +got):\n%s", name, diff)
		}
	}
	// A partial line survives an error unless Reset.
	pr, pw := io.Pipe()
	lr := NewLineReader(pr, 0)
	go func() {
		pw.Write([]byte("hel"))
		pw.CloseWithError(io.ErrUnexpectedEOF)
	}()
	if _, err := lr.ReadLine(); err != io.ErrUnexpectedEOF {
		t.Fatal(err)
	}
	lr.r = strings.NewReader("lo\n")
	if l, err := lr.ReadLine(); err != nil || string(l) != "hello" {
		t.Errorf("kept partial: %q %v", l, err)
	}
	lr.r = strings.NewReader("garbage")
	lr.ReadLine()
	lr.Reset()
	lr.r = strings.NewReader("fresh\n")
	if l, err := lr.ReadLine(); err != nil || string(l) != "fresh" {
		t.Errorf("after reset: %q %v", l, err)
	}
}

func TestFileModes(t *testing.T) {
	for u, m := range map[uint32]fs.FileMode{
		0o644:  0o644,
		0o4755: 0o755 | fs.ModeSetuid,
		0o2750: 0o750 | fs.ModeSetgid,
		0o1777: 0o777 | fs.ModeSticky,
	} {
		if got := UnixToFileMode(u); got != m {
			t.Errorf("UnixToFileMode(%o) = %v, want %v", u, got, m)
		}
		if got := FileModeToUnix(m); got != u {
			t.Errorf("FileModeToUnix(%v) = %o, want %o", m, got, u)
		}
	}
	if got := FileModeToUnix(fs.ModeDir | 0o755); got != 0o755 {
		t.Errorf("dir bit leaked: %o", got)
	}
}

func TestDecodeHeaderFastAndSlow(t *testing.T) {
	for in, want := range map[string]Header{
		`{"id":7,"type":"exec","shell":"x"}`: {7, "exec"},
		`{"id":7,"type":"ping"}`:             {7, "ping"},
		`{"type":"ping","id":9}`:             {9, "ping"},
		`{ "id": 3, "type": "set_env" }`:     {3, "set_env"},
		`{"id":7,"type":"pi\u006eg"}`:        {7, "ping"},
		`{"id":7,"type":"write_file","data":` + `"` + strings.Repeat("A", 1000) + `"}`: {7, "write_file"},
	} {
		h, err := DecodeHeader([]byte(in))
		if err != nil || h != want {
			t.Errorf("%.40s: %+v %v, want %+v", in, h, err, want)
		}
	}
	for _, in := range []string{`{"id":7,"type":"ping"`, `{"id":7}`, `not json`, `{"id":7,"type":""}`} {
		if h, err := DecodeHeader([]byte(in)); err == nil {
			t.Errorf("%s accepted: %+v", in, h)
		}
	}
}

// chunkReader yields one n-byte line of 'x' in small chunks.
type chunkReader struct{ left, chunk int }

var xs = bytes.Repeat([]byte("x"), 4096)

func (r *chunkReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.chunk, r.left)], xs)
	r.left -= n
	if r.left == 0 {
		p[n-1] = '\n'
	}
	return n, nil
}

// A large line arriving in small reads (virtio-serial gives 4 KiB at a
// time) must cost linear time: the reader must not rescan what it has.
func TestLineReaderLargeLineLinear(t *testing.T) {
	const size = 32 << 20 // quadratic rescanning: ~128 GB of memchr
	start := time.Now()
	lr := NewLineReader(&chunkReader{left: size, chunk: 4096}, 0)
	line, err := lr.ReadLine()
	if err != nil || len(line) != size-1 {
		t.Fatalf("%d %v", len(line), err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("took %v: quadratic?", el)
	}
}

// decodeBoth decodes line with DecodePayload and with encoding/json alone.
func decodeBoth[T any](line []byte) (fast, slow T, fastErr, slowErr error) {
	fastErr = DecodePayload(line, &fast)
	slowErr = json.Unmarshal(line, &slow)
	return
}

// TestDecodePayloadBlob: the direct decoding of bulk fields gives what
// encoding/json gives, takes the fast path on what Marshal writes, and
// leaves lines of any other shape to encoding/json.
func TestDecodePayloadBlob(t *testing.T) {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	mustMarshal := func(typ string, v any) []byte {
		b, err := Marshal(9, typ, v)
		if err != nil {
			t.Fatal(err)
		}
		return bytes.TrimSuffix(b, []byte("\n"))
	}
	wf := []any{
		WriteFileRequest{Path: "/tmp/x", Data: data, Mode: 0o755, Mkdirs: true},
		WriteFileRequest{Path: `/tmp/,"data":"AAAA\` + "\n\"}", Data: []byte("hi")},
		WriteFileRequest{Path: "/tmp/empty", Data: []byte{}},
		WriteFileRequest{Path: "/tmp/nil"},
	}
	for _, v := range wf {
		line := mustMarshal(TypeWriteFile, v)
		if _, _, ok := cutBlob(line, "data"); !ok && v.(WriteFileRequest).Data != nil {
			t.Errorf("Marshal's write_file line not taken on the fast path: %.80s", line)
		}
		fast, slow, fe, se := decodeBoth[WriteFileRequest](line)
		if fe != nil || se != nil {
			t.Fatalf("decode: %v / %v", fe, se)
		}
		if diff := cmp.Diff(slow, fast); diff != "" {
			t.Errorf("write_file %.60s: fast path differs (-json +fast):\n%s", line, diff)
		}
	}
	// An env key named like the blob field, in a nested object before it.
	exec := mustMarshal(TypeExec, ExecRequest{Argv: []string{"cat"}, Env: map[string]string{"a": "1", "stdin": "not-it", "x": `,"stdin":"`}, Stdin: []byte("real stdin")})
	fe, se, e1, e2 := decodeBoth[ExecRequest](exec)
	if e1 != nil || e2 != nil || string(fe.Stdin) != "real stdin" {
		t.Fatalf("exec: %q %v %v", fe.Stdin, e1, e2)
	}
	if diff := cmp.Diff(se, fe); diff != "" {
		t.Errorf("exec: fast path differs:\n%s", diff)
	}
	// Shapes left to encoding/json, or errors on both paths.
	for _, line := range []string{
		`{"id":1,"type":"file","data":"aGk\/","mode":420}`, // escaped slash
		`{"id":1,"type":"file","data":null,"mode":420}`,
		`{"data":"aGk=","mode":420}`, // first member
		`{"id":1,"type":"file","mode":420}`,
		`{"id":1,"type":"file","data":"aGk=","data":"Ynll"}`, // repeated: the last wins
		`{"id":1,"type":"file","x":{"a":[1,{"b":"}"}]},"data":"aGk=","mode":7}`,
		`{"id":1,"type":"file","x":{"a":1,"data":"aGk="},"mode":7}`, // nested: not the field
		`{"id":1,"type":"file","data":"a!k=","mode":420}`,           // not base64
		`{"id":1,"type":"file","data":"aGk=","mode":}`,              // broken after the blob
		`{"id":1,"type":"file","data":"aGk=`,                        // unterminated
	} {
		fast, slow, fe, se := decodeBoth[FileData]([]byte(line))
		if (fe == nil) != (se == nil) {
			t.Errorf("%s: fast err %v, json err %v", line, fe, se)
			continue
		}
		if diff := cmp.Diff(slow, fast); fe == nil && diff != "" {
			t.Errorf("%s: fast path differs (-json +fast):\n%s", line, diff)
		}
	}
}

// FuzzDecodePayload: on any line, DecodePayload succeeds exactly when
// encoding/json does, with the same result.
func FuzzDecodePayload(f *testing.F) {
	for _, s := range []string{
		`{"id":1,"type":"write_file","path":"/a","data":"aGk=","mode":420}`,
		`{"id":1,"type":"write_file","path":"/a\\","data":"aGk=","mkdirs":true}`,
		`{"id":1,"type":"write_file","path":"/a,\"data\":\"x","data":""}`,
		`{"id":1,"type":"write_file","data":"aGk=","data":"aGk="}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		fast, slow, fe, se := decodeBoth[WriteFileRequest](line)
		if (fe == nil) != (se == nil) {
			t.Fatalf("%q: fast err %v, json err %v", line, fe, se)
		}
		if fe == nil {
			if diff := cmp.Diff(slow, fast); diff != "" {
				t.Fatalf("%q: (-json +fast):\n%s", line, diff)
			}
		}
	})
}

package agentproto

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strconv"
)

// ProtocolVersion is the version of this protocol. It is carried by hello in
// both directions; it changes only on incompatible changes.
const ProtocolVersion = 1

// MaxMessageSize bounds one encoded message (one line, newline included).
// Longer lines are rejected by both sides.
const MaxMessageSize = 128 << 20

// MaxFileSize bounds the data of one write_file or read_file. Base64 inflates
// data by 4/3, and the rest of the message must fit too.
const MaxFileSize = 64 << 20

// MaxOutputChunk bounds the data of one output message.
const MaxOutputChunk = 32 << 10

// DefaultPortName is the virtio-serial port name the agent serves on.
const DefaultPortName = "org.smolvm.agent"

// MaxPorts bounds how many virtio-serial ports the agent serves: the port
// DefaultPortName plus DefaultPortName.1 ... DefaultPortName.(MaxPorts-1),
// one per concurrent host connection (QEMU's socket chardev accepts one
// client at a time).
const MaxPorts = 8

// DefaultVsockPort is the AF_VSOCK port the agent listens on when there is no
// virtio-serial port (Firecracker).
const DefaultVsockPort = 1024

// ReadyLine is printed on the guest console once the agent serves.
const ReadyLine = "SMOLVM-AGENT READY"

// Message types. Requests travel host → guest, replies guest → host.
const (
	TypeHello       = "hello" // request and reply
	TypePing        = "ping"
	TypePong        = "pong"
	TypeInfo        = "info" // request and reply
	TypeExec        = "exec"
	TypeOutput      = "output"
	TypeExit        = "exit"
	TypeCancel      = "cancel"
	TypeWriteFile   = "write_file"
	TypeReadFile    = "read_file"
	TypeWriteChunk  = "write_chunk"
	TypeCommitFile  = "commit_file"
	TypeRemoveFile  = "remove_file"
	TypeReadChunk   = "read_chunk"
	TypeFile        = "file"
	TypeChunk       = "chunk"
	TypeSetEnv      = "set_env"
	TypeGetEnv      = "get_env"
	TypeEnv         = "env"
	TypeSync        = "sync"
	TypeSetTime     = "set_time"
	TypeSetIdentity = "set_identity"
	TypeShutdown    = "shutdown"
	TypeOK          = "ok"
	TypeError       = "error"
)

// Header is the part common to every message.
type Header struct {
	ID   uint64 `json:"id"`
	Type string `json:"type"`
}

// HelloRequest starts a session. The guest echoes Nonce.
type HelloRequest struct {
	Nonce           string `json:"nonce"`
	ProtocolVersion int    `json:"protocol_version"`
}

// Hello is the guest's answer to HelloRequest.
type Hello struct {
	Nonce           string `json:"nonce"`
	ProtocolVersion int    `json:"protocol_version"`
	AgentVersion    string `json:"agent_version"`
	// BootID is no longer sent (agents of this version leave it empty):
	// the kernel draws its boot_id when it is first read, so an agent that
	// read it on every connect fixed it in a template's memory and every
	// VM restored from that template shared it. Info still reports it.
	BootID string `json:"boot_id,omitempty"`
}

// Info describes the guest.
type Info struct {
	AgentVersion    string `json:"agent_version"`
	ProtocolVersion int    `json:"protocol_version"`
	UptimeMS        int64  `json:"uptime_ms"` // since kernel boot (CLOCK_BOOTTIME)
	Hostname        string `json:"hostname"`
	KernelRelease   string `json:"kernel_release"`
	BootID          string `json:"boot_id"` // /proc/sys/kernel/random/boot_id (reading it fixes it)
	Arch            string `json:"arch"`
	PID             int    `json:"pid"`    // the agent's pid (1 when it is init)
	System          bool   `json:"system"` // the agent manages the system (clock, hostname, power)
}

// ExecRequest runs a process. Exactly one of Argv and Shell is set; Shell runs
// through /bin/sh -c. Env is merged over the agent's defaults and the
// persisted environment. Cwd defaults to $HOME when it exists, else "/".
// The process gets its own process group; on timeout or cancel the whole
// group is killed with SIGKILL.
type ExecRequest struct {
	Argv      []string          `json:"argv,omitempty"`
	Shell     string            `json:"shell,omitempty"`
	Env       map[string]string `json:"env,omitempty"`
	Cwd       string            `json:"cwd,omitempty"`
	Stdin     []byte            `json:"stdin,omitempty"`
	TimeoutMS int64             `json:"timeout_ms,omitempty"` // 0 = none
	// Interactive streams standard input (stdin messages) while the
	// command runs, and takes resize and signal (interactive.go); Stdin
	// must then be empty. TTY runs the command on a pseudo terminal (and
	// implies Interactive). Agents older than these fields ignore them.
	Interactive bool `json:"interactive,omitempty"`
	TTY         *TTY `json:"tty,omitempty"`
}

// Stream names in Output.
const (
	StreamStdout = "stdout"
	StreamStderr = "stderr"
)

// Output is a chunk of a running process's output.
type Output struct {
	Stream string `json:"stream"`
	Data   []byte `json:"data"`
}

// ExecResult ends an exec. A non-zero ExitCode is a normal result. When the
// process was killed by a signal, ExitCode is 128+signal and Signal names it.
// When the process could not be started, ExitCode is 127 (126 when it is not
// executable) and Error says why.
type ExecResult struct {
	ExitCode   int    `json:"exit_code"`
	Signal     string `json:"signal,omitempty"`
	TimedOut   bool   `json:"timed_out,omitempty"`
	Canceled   bool   `json:"canceled,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	Error      string `json:"error,omitempty"`
}

// WriteFileRequest writes a file atomically (temp file in the same directory,
// fsync, chmod, rename, fsync of the directory). Mode is the Unix permission
// bits (including setuid/setgid/sticky); 0 means 0644.
type WriteFileRequest struct {
	Path   string `json:"path"`
	Data   []byte `json:"data"`
	Mode   uint32 `json:"mode,omitempty"`
	Mkdirs bool   `json:"mkdirs,omitempty"`
}

// ReadFileRequest reads a whole file.
type ReadFileRequest struct {
	Path string `json:"path"`
}

// FileData answers ReadFileRequest. Mode holds Unix permission bits.
type FileData struct {
	Data []byte `json:"data"`
	Mode uint32 `json:"mode"`
}

// Files larger than one message carries travel in chunks (the host picks
// ChunkSize): write_chunk writes at an offset of a temporary file that
// the host names next to the target, commit_file makes that file the
// target atomically, remove_file drops it after a failure; read_chunk reads
// a range and reports the file's size and mtime, so that the host can tell
// a file that changed between chunks. Agents older than these requests
// answer them with CodeUnknownType.

// ChunkSize is the data size of one write_chunk or read_chunk.
const ChunkSize = 8 << 20

// Bounds on the replies a host accepts (one line, newline included). They
// are tight on purpose: a guest is untrusted, and every reply the host
// reads is held in its memory. ReplyLimit gives the bound of each type.
const (
	// replyOverhead is room for the fields around a reply's data.
	replyOverhead = 64 << 10
	// MaxSmallReply bounds replies without bulk data (hello, pong, info,
	// exit, ok, error).
	MaxSmallReply = 64 << 10
	// MaxOutputMessage bounds one output message: MaxOutputChunk bytes of
	// data, base64, plus its header.
	MaxOutputMessage = (MaxOutputChunk+2)/3*4 + 1024
	// MaxReplySize bounds the largest reply (a chunk of ChunkSize bytes,
	// base64, or a file or env reply of the same size). The host reads no
	// longer line; its reader never buffers more.
	MaxReplySize = (ChunkSize+2)/3*4 + replyOverhead
)

// ReplyLimit returns the largest encoded size (newline included) the host
// accepts for a reply of type typ.
func ReplyLimit(typ string) int {
	switch typ {
	case TypeOutput:
		return MaxOutputMessage
	case TypeChunk, TypeFile, TypeEnv:
		return MaxReplySize
	default:
		return MaxSmallReply
	}
}

// WriteChunkRequest writes Data at Offset of the file Path (created with
// mode 0600 when missing; its parent directories too with Mkdirs).
type WriteChunkRequest struct {
	Path   string `json:"path"`
	Offset int64  `json:"offset"`
	Data   []byte `json:"data"`
	Mkdirs bool   `json:"mkdirs,omitempty"`
}

// CommitFileRequest checks that Temp holds Size bytes, fsyncs it, sets Mode
// (as in WriteFileRequest), renames it to Path and fsyncs the directory.
// Temp must be in Path's directory.
type CommitFileRequest struct {
	Temp string `json:"temp"`
	Path string `json:"path"`
	Size int64  `json:"size"`
	Mode uint32 `json:"mode,omitempty"`
}

// RemoveFileRequest removes a file; a missing file is not an error.
type RemoveFileRequest struct {
	Path string `json:"path"`
}

// ReadChunkRequest reads up to Length bytes at Offset (Length at most
// ChunkSize).
type ReadChunkRequest struct {
	Path   string `json:"path"`
	Offset int64  `json:"offset"`
	Length int    `json:"length"`
}

// Chunk answers ReadChunkRequest (reply type "chunk"): the bytes read, and
// the file's mode, size and mtime when they were read. Fewer bytes than
// asked mean the end of the file.
type Chunk struct {
	Data    []byte `json:"data"`
	Mode    uint32 `json:"mode"`
	Size    int64  `json:"size"`
	MtimeNS int64  `json:"mtime_ns"`
}

// SetEnvRequest changes the persisted environment given to every exec:
// first Unset names are removed, then Set is applied.
type SetEnvRequest struct {
	Set   map[string]string `json:"set,omitempty"`
	Unset []string          `json:"unset,omitempty"`
}

// EnvData answers get_env with the persisted environment.
type EnvData struct {
	Env map[string]string `json:"env"`
}

// SetTimeRequest sets the guest wall clock.
type SetTimeRequest struct {
	UnixNanos int64 `json:"unix_nanos"`
}

// SetIdentityRequest gives a guest its identity: the host sends it to every
// VM right after boot or restore (a cold boot, a fork clone, a VM restored
// from a template all take the same path). Every field is optional: an
// empty one keeps what the guest has. Validate bounds each field; the agent
// refuses a request that fails it.
type SetIdentityRequest struct {
	// Hostname becomes the kernel hostname and /etc/hostname.
	Hostname string `json:"hostname,omitempty"`
	// Seed is mixed into the kernel's random pool, and the CRNG is then
	// reseeded (clones of one memory image share its CRNG state).
	Seed []byte `json:"seed,omitempty"`
	// MAC, when set, becomes eth0's hardware address.
	MAC string `json:"mac,omitempty"`
	// MachineID, when set, becomes /etc/machine-id (32 lowercase hex
	// digits, as systemd writes it; ValidMachineID). Agents older than
	// this field ignore it.
	MachineID string `json:"machine_id,omitempty"`
}

// Bounds of SetIdentityRequest's fields.
const (
	MaxHostnameLen = 64  // the kernel's limit (HOST_NAME_MAX)
	MaxSeedLen     = 512 // bytes of entropy one request may add
	MachineIDLen   = 32  // hex digits of a machine-id
)

// Validate checks every field of the request against its bounds: a hostname
// ValidHostname accepts; a seed of at most MaxSeedLen bytes; a 6-byte MAC;
// a machine-id ValidMachineID accepts.
func (r SetIdentityRequest) Validate() error {
	if r.Hostname != "" && !ValidHostname(r.Hostname) {
		return fmt.Errorf("invalid hostname %q: want at most %d letters, digits, '-', '.' or '_'", r.Hostname, MaxHostnameLen)
	}
	if len(r.Seed) > MaxSeedLen {
		return fmt.Errorf("seed of %d bytes: at most %d", len(r.Seed), MaxSeedLen)
	}
	if r.MAC != "" {
		if hw, err := net.ParseMAC(r.MAC); err != nil || len(hw) != 6 {
			return fmt.Errorf("invalid mac %q: want six hex pairs such as 52:54:00:12:34:56", r.MAC)
		}
	}
	if r.MachineID != "" && !ValidMachineID(r.MachineID) {
		return fmt.Errorf("invalid machine-id %q: want %d lowercase hex digits, not all zero", r.MachineID, MachineIDLen)
	}
	return nil
}

// ValidHostname reports whether h is a hostname the agent sets: 1 to
// MaxHostnameLen letters, digits, '-', '.' and '_' (VM ids may hold '_';
// Linux takes any bytes, DNS names would not).
func ValidHostname(h string) bool {
	if h == "" || len(h) > MaxHostnameLen {
		return false
	}
	for i := 0; i < len(h); i++ {
		switch c := h[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.', c == '_':
		default:
			return false
		}
	}
	return true
}

// ValidMachineID reports whether id is a machine-id as machine-id(5)
// defines it: 32 lowercase hexadecimal digits, not all zero.
func ValidMachineID(id string) bool {
	if len(id) != MachineIDLen {
		return false
	}
	zero := true
	for i := 0; i < len(id); i++ {
		switch c := id[i]; {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'f':
			zero = zero && c == '0'
		default:
			return false
		}
	}
	return !zero
}

// ShutdownRequest powers the guest off (or reboots it) after syncing disks.
type ShutdownRequest struct {
	Reboot bool `json:"reboot,omitempty"`
}

// Error codes.
const (
	CodeInvalid     = "invalid"      // malformed or contradictory request
	CodeUnknownType = "unknown_type" // the agent does not know this request type
	CodeNotFound    = "not_found"
	CodePermission  = "permission"
	CodeExists      = "exists"
	CodeIsDir       = "is_dir"
	CodeTooLarge    = "too_large"
	CodeUnsupported = "unsupported"
	CodeIO          = "io"
	CodeInternal    = "internal"
)

// Error is a failure reported by the guest agent. It is both the payload of
// an "error" message and a Go error.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string {
	if e.Code == "" {
		return "agent: " + e.Message
	}
	return fmt.Sprintf("agent: %s (%s)", e.Message, e.Code)
}

// marshalLimit is MaxMessageSize; tests lower it.
var marshalLimit = MaxMessageSize

// ErrTooLarge is returned (wrapped) for messages over MaxMessageSize.
var ErrTooLarge = errors.New("message exceeds maximum size")

// Marshal encodes one message: the header followed by the fields of payload
// (a struct, or nil for none), terminated by a newline.
func Marshal(id uint64, typ string, payload any) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(64)
	buf.WriteString(`{"id":`)
	buf.WriteString(strconv.FormatUint(id, 10))
	buf.WriteString(`,"type":`)
	t, err := json.Marshal(typ)
	if err != nil {
		return nil, err
	}
	buf.Write(t)
	if payload != nil {
		p, err := json.Marshal(payload)
		if err != nil {
			return nil, fmt.Errorf("agentproto: encode %s: %w", typ, err)
		}
		if len(p) < 2 || p[0] != '{' || p[len(p)-1] != '}' {
			return nil, fmt.Errorf("agentproto: payload of %s is not an object", typ)
		}
		if len(p) > 2 {
			buf.WriteByte(',')
			buf.Write(p[1 : len(p)-1])
		}
	}
	buf.WriteString("}\n")
	if buf.Len() > marshalLimit {
		return nil, fmt.Errorf("agentproto: %s message of %d bytes: %w (%d)", typ, buf.Len(), ErrTooLarge, marshalLimit)
	}
	return buf.Bytes(), nil
}

// DecodeHeader decodes the header of one line. Lines written by Marshal
// are recognised from their first bytes, without scanning the (possibly
// large) rest; anything else is decoded as JSON.
func DecodeHeader(line []byte) (Header, error) {
	if h, ok := fastHeader(line); ok {
		return h, nil
	}
	var h Header
	if err := json.Unmarshal(line, &h); err != nil {
		return h, fmt.Errorf("agentproto: bad message: %w", err)
	}
	if h.Type == "" {
		return h, errors.New("agentproto: message without type")
	}
	if !validType(h.Type) {
		return Header{}, fmt.Errorf("agentproto: bad message type %q", truncateString(h.Type, 40))
	}
	return h, nil
}

// MaxTypeLen bounds the length of a message type.
const MaxTypeLen = 32

// validType reports whether t looks like a message type: 1 to MaxTypeLen
// bytes of [a-z_]. (Unknown types of that shape are answered, others are
// malformed.)
func validType(t string) bool {
	if len(t) == 0 || len(t) > MaxTypeLen {
		return false
	}
	for i := 0; i < len(t); i++ {
		if (t[i] < 'a' || t[i] > 'z') && t[i] != '_' {
			return false
		}
	}
	return true
}

func truncateString(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// fastHeader parses the `{"id":N,"type":"T"` prefix Marshal writes.
func fastHeader(line []byte) (Header, bool) {
	id, ok := PeekID(line)
	if !ok {
		return Header{}, false
	}
	rest := line[bytes.IndexByte(line, ',')+1:]
	const tp = `"type":"`
	if !bytes.HasPrefix(rest, []byte(tp)) {
		return Header{}, false
	}
	rest = rest[len(tp):]
	end := 0
	for end < len(rest) && (rest[end] >= 'a' && rest[end] <= 'z' || rest[end] == '_') {
		end++
	}
	if end == 0 || end > MaxTypeLen || end+1 >= len(rest) || rest[end] != '"' || (rest[end+1] != ',' && rest[end+1] != '}') {
		return Header{}, false
	}
	if rest[len(rest)-1] != '}' {
		return Header{}, false
	}
	return Header{ID: id, Type: string(rest[:end])}, true
}

// DecodePayload decodes the payload fields of a line into v.
//
// Payloads that carry bulk data (write_file, exec stdin, file, output)
// have their base64 field decoded directly, and only the rest of the line
// through encoding/json: its scanner steps through every byte of a value,
// which cost an emulated guest 3 s for the 22 MB line of a 16 MiB
// write_file. The result is the same as json.Unmarshal's.
func DecodePayload(line []byte, v any) error {
	var blob []byte
	var dst *[]byte
	if bc, ok := v.(blobCarrier); ok {
		var key string
		key, dst = bc.blobField()
		if rest, val, ok := cutBlob(line, key); ok {
			blob = make([]byte, base64.StdEncoding.DecodedLen(len(val)))
			n, err := base64.StdEncoding.Decode(blob, val)
			if err != nil {
				return fmt.Errorf("agentproto: bad payload: %s: %w", key, err)
			}
			blob, line = blob[:n], rest
		}
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("agentproto: bad payload: %w", err)
	}
	if blob != nil {
		*dst = blob // after the rest: the member cut out was the last of its key
	}
	return nil
}

// blobCarrier is a payload with one []byte field that may be large.
type blobCarrier interface {
	// blobField returns the field's JSON key and the field.
	blobField() (key string, dst *[]byte)
}

func (r *WriteFileRequest) blobField() (string, *[]byte)  { return "data", &r.Data }
func (r *ExecRequest) blobField() (string, *[]byte)       { return "stdin", &r.Stdin }
func (f *FileData) blobField() (string, *[]byte)          { return "data", &f.Data }
func (r *WriteChunkRequest) blobField() (string, *[]byte) { return "data", &r.Data }
func (c *Chunk) blobField() (string, *[]byte)             { return "data", &c.Data }
func (o *Output) blobField() (string, *[]byte)            { return "data", &o.Data }

// cutBlob finds the string value of key in the top-level object of line,
// written as `,"key":"...",` or `...}` right after another member's value,
// with only base64 bytes in it (as Marshal writes it), and no member of
// that key after it. It returns line without that member, and the value.
// Then the rest is valid JSON exactly when line is. ok is false when the
// line is not shaped so; encoding/json then decodes it all. Only the bytes
// before and after the value are scanned one by one.
func cutBlob(line []byte, key string) (rest, val []byte, ok bool) {
	if len(line) == 0 || line[0] != '{' {
		return nil, nil, false
	}
	pat := []byte(`,"` + key + `":"`)
	depth, inStr, esc := 0, false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		if inStr {
			switch {
			case esc:
				esc = false
			case c == '\\':
				esc = true
			case c == '"':
				inStr = false
			}
			continue
		}
		switch c {
		case '"':
			inStr = true
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case ',':
			if depth != 1 || !bytes.HasPrefix(line[i:], pat) {
				continue
			}
			// The member must follow a value (not "{" or a key) ...
			if !bytes.ContainsAny(line[i-1:i], `"}]0123456789el`) {
				return nil, nil, false
			}
			start := i + len(pat)
			end := bytes.IndexByte(line[start:], '"')
			if end < 0 {
				return nil, nil, false
			}
			val, after := line[start:start+end], line[start+end+1:]
			// ... hold base64 only (its decoder skips CR and LF, which a
			// JSON string cannot hold raw) and be followed by a member or
			// the end, and by no other member of that key.
			if hasAnyByte(val, '\\', '\r', '\n') || len(after) == 0 || (after[0] != ',' && after[0] != '}') ||
				bytes.Contains(after, []byte(`"`+key+`"`)) {
				return nil, nil, false
			}
			rest = make([]byte, 0, i+len(after))
			rest = append(rest, line[:i]...)
			rest = append(rest, after...)
			return rest, val, true
		}
	}
	return nil, nil, false
}

// hasAnyByte reports whether b holds any of cs (IndexByte per byte: it is
// vectorized, unlike a byte loop over a large b).
func hasAnyByte(b []byte, cs ...byte) bool {
	for _, c := range cs {
		if bytes.IndexByte(b, c) >= 0 {
			return true
		}
	}
	return false
}

// PeekID extracts the id from the start of a message written by Marshal
// (`{"id":N,`), for answering a message too large to decode.
func PeekID(prefix []byte) (uint64, bool) {
	const p = `{"id":`
	if !bytes.HasPrefix(prefix, []byte(p)) {
		return 0, false
	}
	rest := prefix[len(p):]
	end := 0
	for end < len(rest) && end < 20 && rest[end] >= '0' && rest[end] <= '9' {
		end++
	}
	if end == 0 || end >= len(rest) || rest[end] != ',' {
		return 0, false
	}
	id, err := strconv.ParseUint(string(rest[:end]), 10, 64)
	return id, err == nil
}

// LineReader reads newline-terminated messages, bounding their size.
// It is not safe for concurrent use.
type LineReader struct {
	r    io.Reader
	max  int
	buf  []byte // buffered bytes: buf[s:e]
	s, e int
	scan int // buf[s:s+scan] holds no newline
	// skipping is set while discarding the rest of an over-long line.
	skipping bool
	// prefix of the over-long line, kept for PeekID.
	tooLongPrefix []byte
}

// NewLineReader returns a LineReader with the given maximum line size
// (MaxMessageSize when max <= 0).
func NewLineReader(r io.Reader, max int) *LineReader {
	if max <= 0 {
		max = MaxMessageSize
	}
	return &LineReader{r: r, max: max, buf: make([]byte, 64<<10)}
}

// TooLongError reports a line over the size limit. The rest of the line has
// been discarded; Prefix holds its first bytes.
type TooLongError struct {
	Prefix []byte
}

func (e *TooLongError) Error() string { return "agentproto: " + ErrTooLarge.Error() }

// Unwrap makes errors.Is(err, ErrTooLarge) true.
func (e *TooLongError) Unwrap() error { return ErrTooLarge }

// Reset discards any buffered partial line (after the peer went away).
func (lr *LineReader) Reset() {
	lr.s, lr.e, lr.scan = 0, 0, 0
	lr.skipping = false
	lr.tooLongPrefix = nil
}

// ReadLine returns the next line without its newline. The slice is valid
// until the next call. Empty lines are skipped. On an over-long line it
// returns a *TooLongError once the whole line has been skipped. Errors from
// the underlying reader are returned as is; a partial line read before an
// error stays buffered until Reset (or until the rest arrives).
func (lr *LineReader) ReadLine() ([]byte, error) {
	if lr.s == lr.e && len(lr.buf) > 1<<20 {
		// Drop the memory of a past large message.
		lr.buf = make([]byte, 64<<10)
		lr.s, lr.e, lr.scan = 0, 0, 0
	}
	for {
		// Look for a newline in the bytes not scanned yet.
		if j := bytes.IndexByte(lr.buf[lr.s+lr.scan:lr.e], '\n'); j >= 0 {
			i := lr.scan + j
			line := lr.buf[lr.s : lr.s+i]
			lr.s += i + 1
			lr.scan = 0
			if lr.skipping {
				lr.skipping = false
				err := &TooLongError{Prefix: lr.tooLongPrefix}
				lr.tooLongPrefix = nil
				return nil, err
			}
			if i+1 > lr.max {
				return nil, &TooLongError{Prefix: append([]byte(nil), line[:min(64, len(line))]...)}
			}
			if len(line) > 0 && line[len(line)-1] == '\r' {
				line = line[:len(line)-1]
			}
			if len(bytes.TrimSpace(line)) == 0 {
				continue
			}
			return line, nil
		}
		lr.scan = lr.e - lr.s
		if lr.skipping {
			lr.s, lr.e, lr.scan = 0, 0, 0
		} else if lr.e-lr.s >= lr.max {
			lr.skipping = true
			lr.tooLongPrefix = append([]byte(nil), lr.buf[lr.s:lr.s+min(64, lr.e-lr.s)]...)
			lr.s, lr.e, lr.scan = 0, 0, 0
		}
		// Make room.
		if lr.s > 0 {
			n := copy(lr.buf, lr.buf[lr.s:lr.e])
			lr.s, lr.e = 0, n
		}
		if lr.e == len(lr.buf) {
			nb := make([]byte, min(2*len(lr.buf), lr.max+1))
			if len(nb) <= len(lr.buf) {
				nb = make([]byte, 2*len(lr.buf))
			}
			copy(nb, lr.buf[:lr.e])
			lr.buf = nb
		}
		n, err := lr.r.Read(lr.buf[lr.e:])
		lr.e += n
		if err != nil {
			if n > 0 && bytes.IndexByte(lr.buf[lr.e-n:lr.e], '\n') >= 0 {
				// Deliver complete lines first; the error comes back on the
				// next read of the underlying reader.
				continue
			}
			return nil, err
		}
	}
}

// FileModeToUnix converts permission bits of an fs.FileMode to Unix mode bits.
func FileModeToUnix(m fs.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		u |= 0o1000
	}
	return u
}

// UnixToFileMode converts Unix permission bits to an fs.FileMode.
func UnixToFileMode(u uint32) fs.FileMode {
	m := fs.FileMode(u & 0o777)
	if u&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if u&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if u&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m
}

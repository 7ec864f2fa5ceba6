package agentproto

import (
	"fmt"
	"strings"
)

// Interactive execs (protocol version 1, optional: older agents ignore the
// new exec fields and answer the new request types with CodeUnknownType).
//
// An exec request with Interactive set streams the command's standard
// input while it runs instead of carrying it whole: the agent answers
// "started" as soon as the process runs (an agent that predates
// interactive execs never does: its first reply is output or exit, and the
// host then cancels the exec), and then takes, on the exec's request id:
//
//   - "stdin" {data, eof}: bytes for the command's standard input (at most
//     MaxStdinChunk per message), and/or its end. The agent answers each
//     with "stdin_ack" {} once it wrote the data; the host keeps at most
//     StdinWindow stdin messages unacknowledged. A host that sends more
//     loses the command's standard input (it is closed).
//   - "resize" {rows, cols}: the window size of the command's terminal.
//   - "signal" {signal}: a signal (SignalNames) for the command's process
//     group (with a TTY: the terminal's foreground process group).
//
// None of these three is answered with anything but stdin_ack: a request
// for an exec that is not running (any more) is dropped, since the exit
// reply is on its way. With TTY set the command runs on a new pseudo
// terminal (its controlling terminal, in a new session); its output comes
// merged as stdout. Every reply is a small one (MaxSmallReply).
const (
	TypeStarted  = "started"
	TypeStdin    = "stdin"
	TypeStdinAck = "stdin_ack"
	TypeResize   = "resize"
	TypeSignal   = "signal"
)

// MaxStdinChunk bounds the data of one stdin message.
const MaxStdinChunk = MaxOutputChunk

// StdinWindow is how many stdin messages the host may have sent and not
// seen acknowledged.
const StdinWindow = 16

// MaxInteractive bounds the interactive execs one agent runs at once.
const MaxInteractive = 64

// TTY asks for a pseudo terminal of Rows x Cols. Term becomes $TERM
// (default DefaultTerm).
type TTY struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
	Term string `json:"term,omitempty"`
}

// DefaultTerm is $TERM of a TTY exec that names none.
const DefaultTerm = "xterm-256color"

// MaxTermLen bounds TTY.Term.
const MaxTermLen = 64

// Validate checks the size (1 to 4096 rows and columns, as a terminal has)
// and that Term is a plain name.
func (t TTY) Validate() error {
	if err := validSize(t.Rows, t.Cols); err != nil {
		return err
	}
	if len(t.Term) > MaxTermLen {
		return fmt.Errorf("term of %d bytes: at most %d", len(t.Term), MaxTermLen)
	}
	for i := 0; i < len(t.Term); i++ {
		if c := t.Term[i]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '+') {
			return fmt.Errorf("term %q: only letters, digits and -._+", t.Term)
		}
	}
	return nil
}

// MaxTTYSize bounds the rows and columns of a terminal.
const MaxTTYSize = 4096

func validSize(rows, cols uint16) error {
	if rows == 0 || cols == 0 || rows > MaxTTYSize || cols > MaxTTYSize {
		return fmt.Errorf("terminal size %dx%d: rows and columns must be 1 to %d", rows, cols, MaxTTYSize)
	}
	return nil
}

// Started answers an interactive exec once the process runs.
type Started struct {
	PID int `json:"pid"`
}

// StdinRequest carries standard input of a running interactive exec.
type StdinRequest struct {
	Data []byte `json:"data,omitempty"`
	EOF  bool   `json:"eof,omitempty"`
}

func (r *StdinRequest) blobField() (string, *[]byte) { return "data", &r.Data }

// Validate bounds the data.
func (r StdinRequest) Validate() error {
	if len(r.Data) > MaxStdinChunk {
		return fmt.Errorf("stdin of %d bytes: at most %d per message", len(r.Data), MaxStdinChunk)
	}
	return nil
}

// ResizeRequest changes the terminal size of a running TTY exec.
type ResizeRequest struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// Validate checks the size as TTY.Validate does.
func (r ResizeRequest) Validate() error { return validSize(r.Rows, r.Cols) }

// SignalRequest sends a signal to a running interactive exec.
type SignalRequest struct {
	Signal string `json:"signal"` // a name of SignalNames, such as "SIGINT"
}

// SignalNames are the signals a host may send, by name, with their Linux
// numbers (the same on every architecture the project runs: x86-64 and
// arm64).
var SignalNames = map[string]int{
	"SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGKILL": 9, "SIGUSR1": 10, "SIGUSR2": 12,
	"SIGPIPE": 13, "SIGALRM": 14, "SIGTERM": 15, "SIGCONT": 18, "SIGSTOP": 19, "SIGTSTP": 20, "SIGWINCH": 28,
}

// ParseSignal accepts a signal of SignalNames, with or without its "SIG"
// prefix, in any case, and returns its canonical name and number.
func ParseSignal(s string) (string, int, error) {
	if len(s) > 16 {
		return "", 0, fmt.Errorf("unknown signal %q", truncateString(s, 16))
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	n, ok := SignalNames[name]
	if !ok {
		return "", 0, fmt.Errorf("unknown signal %q: want one of SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGTERM, SIGUSR1, SIGUSR2, SIGPIPE, SIGALRM, SIGCONT, SIGSTOP, SIGTSTP, SIGWINCH", s)
	}
	return name, n, nil
}

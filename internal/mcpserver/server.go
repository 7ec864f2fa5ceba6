// Package mcpserver serves the SDK's sandboxes, exec, files and snapshots as
// Model Context Protocol tools (github.com/modelcontextprotocol/go-sdk): New
// builds the server, `smolvm mcp` runs it over stdio and HTTPHandler serves
// it over streamable HTTP (the daemon mounts it at /mcp). Every tool calls
// the SDK (*smolvm.Manager), so the CLI, the daemon and MCP clients share
// state and locks. Callers are untrusted: every argument is checked against
// the tool's input schema by the MCP SDK and again here (ids with
// smolvm.ValidateID before any lookup, absolute guest paths, ranges), every
// call has a deadline, and every output is bounded (see the Max* constants).
// Tool errors are results with isError set whose text is one JSON object
// {"error":{"code","message","recovery"}}: the SDK's error code, its message
// and the CLI's words for its fix.
package mcpserver

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fixtext"
)

// Name is the MCP implementation name the server announces.
const Name = "smolvm"

// Deadlines of the tool calls (the SDK's own host-side bounds apply within
// them): quick calls (list, pause, file transfers of at most a few MiB),
// long ones (create, snapshot, restore, fork, delete). An exec gets its
// timeout plus smolvm.ExecTimeoutGrace plus execSlack.
const (
	quickDeadline = 60 * time.Second
	longDeadline  = 10 * time.Minute
	execSlack     = 5 * time.Second
)

// MaxRequestBytes bounds one HTTP request body of HTTPHandler (a file_write
// of MaxWriteBytes as base64 fits with room to spare).
const MaxRequestBytes = 4 << 20

// New returns an MCP server whose tools drive m. version is the server's
// version as announced to clients. The server keeps no state of its own:
// sandboxes and snapshots it creates outlive the session (they are the
// SDK's, listed by `smolvm sandbox list`).
func New(m *smolvm.Manager, version string, opts ...Option) *mcp.Server {
	s := mcp.NewServer(&mcp.Implementation{Name: Name, Title: "SmolVM sandboxes", Version: version},
		&mcp.ServerOptions{
			Instructions: instructions,
			// No logging capability: the server sends no log notifications.
			Capabilities: &mcp.ServerCapabilities{},
		})
	t := &tools{m: m}
	for _, o := range opts {
		o(t)
	}
	t.register(s)
	s.AddReceivingMiddleware(errorResults)
	return s
}

const instructions = `SmolVM gives you disposable Linux sandboxes (microVMs). Create one with sandbox_create, ` +
	`run shell commands with sandbox_exec, move files with file_write/file_read, and save the whole ` +
	`machine with snapshot_create: snapshot_restore brings it back (once, unless force), snapshot_fork ` +
	`starts N copies. Sandboxes keep running after this session: delete them with sandbox_delete. ` +
	`A failed call returns {"error":{"code","message","recovery"}}; recovery says what to do next.`

// HTTPHandler serves New(m, version) over MCP's streamable HTTP transport,
// stateless (each request stands alone: no session is held in memory
// between requests, so a client that goes away leaks nothing). Request
// bodies are bounded (MaxRequestBytes), cross-origin browser requests are
// refused, and on a loopback TCP address a Host header that is not loopback
// is refused (DNS rebinding). Authentication is the mounting server's job
// (the daemon's unix socket or bearer token).
func HTTPHandler(m *smolvm.Manager, version string, opts ...Option) http.Handler {
	s := New(m, version, opts...)
	h := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return s }, &mcp.StreamableHTTPOptions{
		Stateless:           true,
		MaxRequestBodyBytes: MaxRequestBytes,
	})
	return http.NewCrossOriginProtection().Handler(h)
}

// Option configures New and HTTPHandler.
type Option func(*tools)

// AfterCreate calls fn after each sandbox_create that started its sandbox
// (a start may claim a warm pool member: fn refills the pools, as the CLI
// does after its creates). fn must not block.
func AfterCreate(fn func()) Option { return func(t *tools) { t.afterCreate = fn } }

// recovery is the CLI's words for the fix err carries ("" for none): the
// same text as the HTTP API's and `--json`'s.
func recovery(err error) string { return fixtext.Text(err) }

// ErrorBody is the text of a failed tool call, the same shape as the HTTP
// API's errors: {"error":{"code","message","recovery"}}.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail is one tool error.
type ErrorDetail struct {
	// Code is smolvm.ErrorCode of the error ("vm_not_found",
	// "snapshot_already_restored", ...), or "invalid_request" for arguments
	// the tool's input schema refused.
	Code     string `json:"code"`
	Message  string `json:"message"`
	Recovery string `json:"recovery,omitempty"`
}

// toolError marks an error a tool handler returned (as opposed to the MCP
// SDK's own refusal of arguments that break the input schema).
type toolError struct{ err error }

func (e *toolError) Error() string { return e.err.Error() }
func (e *toolError) Unwrap() error { return e.err }

// detail is the error body of err.
func detail(err error) ErrorDetail {
	var te *toolError
	if !errors.As(err, &te) {
		return ErrorDetail{Code: "invalid_request", Message: err.Error(),
			Recovery: "call tools/list and pass the arguments the tool's inputSchema describes"}
	}
	msg := te.err.Error()
	var e *smolvm.Error
	if errors.As(te.err, &e) {
		msg = e.Message
	}
	return ErrorDetail{Code: smolvm.ErrorCode(te.err), Message: msg, Recovery: recovery(te.err)}
}

// errorResults rewrites every failed tool call's content as an ErrorBody.
func errorResults(next mcp.MethodHandler) mcp.MethodHandler {
	return func(ctx context.Context, method string, req mcp.Request) (mcp.Result, error) {
		res, err := next(ctx, method, req)
		r, ok := res.(*mcp.CallToolResult)
		if err != nil || !ok || !r.IsError || r.GetError() == nil {
			return res, err
		}
		b, merr := json.Marshal(ErrorBody{Error: detail(r.GetError())})
		if merr != nil {
			return res, err
		}
		r.Content = []mcp.Content{&mcp.TextContent{Text: string(b)}}
		r.StructuredContent = nil
		return r, nil
	}
}

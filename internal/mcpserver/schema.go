package mcpserver

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/google/jsonschema-go/jsonschema"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// rule narrows one property of a tool's input schema beyond what its Go
// type says (ranges, choices, patterns, lengths, defaults). The MCP SDK
// validates every call against the schema before the handler runs; the
// handlers check again (the schema is the client's documentation, the
// handler is the wall).
type rule func(*jsonschema.Schema)

func minMax(lo, hi float64) rule {
	return func(s *jsonschema.Schema) { s.Minimum, s.Maximum = &lo, &hi }
}

func oneOf(v ...any) rule { return func(s *jsonschema.Schema) { s.Enum = v } }

func maxLen(n int) rule { return func(s *jsonschema.Schema) { s.MaxLength = &n } }

func pattern(p string) rule { return func(s *jsonschema.Schema) { s.Pattern = p } }

func maxItems(n int) rule { return func(s *jsonschema.Schema) { s.MaxItems = &n } }

// each applies r to an array's items.
func each(r rule) rule { return func(s *jsonschema.Schema) { r(s.Items) } }

// values applies r to a map's values.
func values(r rule) rule { return func(s *jsonschema.Schema) { r(s.AdditionalProperties) } }

func byDefault(v any) rule {
	return func(s *jsonschema.Schema) {
		b, err := json.Marshal(v)
		if err != nil {
			panic(err)
		}
		s.Default = b
	}
}

// rules maps property names to their rules.
type rules map[string][]rule

// inputSchema is In's schema with the rules applied.
func inputSchema[In any](r rules) *jsonschema.Schema {
	s, err := jsonschema.For[In](nil)
	if err != nil {
		panic(fmt.Sprintf("input schema of %T: %v", *new(In), err))
	}
	for name, list := range r {
		p, ok := s.Properties[name]
		if !ok {
			panic(fmt.Sprintf("input schema of %T has no property %q", *new(In), name))
		}
		for _, f := range list {
			f(p)
		}
	}
	return s
}

// spec describes one tool.
type spec struct {
	name, title, desc string
	// deadline bounds the call (0: the handler sets its own).
	deadline time.Duration
	// readOnly: the tool changes nothing; destructive: it removes
	// something (a sandbox, a snapshot, a file's old content).
	readOnly, destructive bool
	rules                 rules
}

// add registers h as the tool sp: the input schema from In with sp's
// rules, the output schema from Out (derived by the MCP SDK), a deadline,
// and errors marked as the tool's own (errorResults words them).
func add[In, Out any](s *mcp.Server, sp spec, h func(context.Context, In) (Out, error)) {
	destructive, closed := sp.destructive, false
	t := &mcp.Tool{
		Name: sp.name, Title: sp.title, Description: sp.desc,
		InputSchema: inputSchema[In](sp.rules),
		Annotations: &mcp.ToolAnnotations{Title: sp.title, ReadOnlyHint: sp.readOnly,
			DestructiveHint: &destructive, OpenWorldHint: &closed},
	}
	mcp.AddTool(s, t, func(ctx context.Context, _ *mcp.CallToolRequest, in In) (*mcp.CallToolResult, Out, error) {
		if sp.deadline > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, sp.deadline)
			defer cancel()
		}
		out, err := h(ctx, in)
		if err != nil {
			var zero Out
			return nil, zero, &toolError{err: err}
		}
		return nil, out, nil
	})
}

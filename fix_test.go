package smolvm_test

import (
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm"
)

// fixOf is the fix err carries (the zero Fix when none).
func fixOf(err error) smolvm.Fix {
	f, _ := smolvm.FixOf(err)
	return f
}

// sampleArgs fills every argument an action may read.
var sampleArgs = map[string]string{
	smolvm.ArgVM: "vm1", smolvm.ArgSnapshot: "snap1", smolvm.ArgImage: "busybox", smolvm.ArgKernel: "minimal",
	smolvm.ArgOption: "MemoryMiB", smolvm.ArgValue: "512", smolvm.ArgChoices: "full,diff,disk", smolvm.ArgMin: "1",
	smolvm.ArgMax: "16", smolvm.ArgOr: "Network", smolvm.ArgHint: "do this", smolvm.ArgEnv: "SMOLVM_RUN_DIR",
	smolvm.ArgPath: "/run/x", smolvm.ArgPID: "42", smolvm.ArgBackend: "firecracker", smolvm.ArgDefault: "qemu",
	smolvm.ArgResource: smolvm.ResourceMemory, smolvm.ArgRemote: "origin",
}

// TestFixNeutralWords: every action has neutral words, which name no
// CLI command or flag, and an Error shows them.
func TestFixNeutralWords(t *testing.T) {
	actions := smolvm.FixActions()
	if len(actions) < 30 {
		t.Fatalf("only %d fix actions", len(actions))
	}
	for _, a := range actions {
		for _, args := range []map[string]string{sampleArgs, nil} {
			f := smolvm.Fix{Action: a, Args: args}
			s := f.String()
			if s == "" || s == string(a) {
				t.Errorf("%s: no neutral words (%q)", a, s)
			}
			if strings.Contains(s, "smolvm ") || strings.Contains(s, "--") {
				t.Errorf("%s: CLI words in %q", a, s)
			}
			e := &smolvm.Error{Message: "it failed", Fix: f, Err: smolvm.ErrInvalidConfig}
			if got := e.Error(); got != "it failed (fix: "+s+")" {
				t.Errorf("%s: Error() = %q", a, got)
			}
			if got, ok := smolvm.FixOf(e); !ok || got.Action != a {
				t.Errorf("%s: FixOf = %+v, %v", a, got, ok)
			}
		}
	}
	if f, ok := smolvm.FixOf(&smolvm.Error{Message: "x"}); ok || !f.IsZero() {
		t.Errorf("FixOf without a fix: %+v %v", f, ok)
	}
	if got := (&smolvm.Error{Message: "x"}).Error(); got != "x" {
		t.Errorf("Error() without a fix: %q", got)
	}
}

// TestFixJSON: a fix is {"action", "args"}; a check without one has no
// "fix" field.
func TestFixJSON(t *testing.T) {
	f := smolvm.Fix{Action: smolvm.FixResumeVM, Args: map[string]string{smolvm.ArgVM: "a"}}
	b, err := json.Marshal(smolvm.Check{Name: "n", Fix: f})
	if err != nil || string(b) != `{"name":"n","ok":false,"status":"","detail":"","fix":{"action":"resume_vm","args":{"vm":"a"}}}` {
		t.Errorf("check with a fix: %s %v", b, err)
	}
	b, err = json.Marshal(smolvm.Check{Name: "n", OK: true})
	if err != nil || string(b) != `{"name":"n","ok":true,"status":"","detail":""}` {
		t.Errorf("check without a fix: %s %v", b, err)
	}
}

// cliWords matches a CLI command or flag in a string: the SDK's errors
// and fixes carry typed actions, and the CLI words them.
var cliWords = regexp.MustCompile(`\bsmolvm (sandbox|image|doctor|bench)\b|(^|[\s(])(--[a-z]|-[a-zA-Z]\b)`)

// TestNoCLIWordsInSource scans every string literal of the root package
// (tests aside) for CLI commands and flags.
func TestNoCLIWordsInSource(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil || len(files) == 0 {
		t.Fatal(files, err)
	}
	fset := token.NewFileSet()
	scanned := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			lit, ok := n.(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				return true
			}
			scanned++
			s, err := strconv.Unquote(lit.Value)
			if err != nil {
				t.Fatalf("%s: %v", fset.Position(lit.Pos()), err)
			}
			if cliWords.MatchString(s) {
				t.Errorf("%s: CLI words in %q", fset.Position(lit.Pos()), s)
			}
			return true
		})
	}
	if scanned < 100 {
		t.Fatalf("scanned only %d string literals", scanned)
	}
	// The pattern does catch what it is meant to.
	for _, s := range []string{"smolvm sandbox start x", "use --memory 512", "rename it, e.g. -e A=b", "(--snapshot-type full)", "-p 8080:80"} {
		if !cliWords.MatchString(s) {
			t.Errorf("pattern misses %q", s)
		}
	}
	for _, s := range []string{"--- guest console ---", "-clone-%d-%s", "non-empty"} {
		if cliWords.MatchString(s) {
			t.Errorf("pattern matches %q", s)
		}
	}
}

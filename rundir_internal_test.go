package smolvm

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDefaultRunDir: $XDG_RUNTIME_DIR/smolvm when XDG_RUNTIME_DIR is an
// absolute private directory of ours, short enough that every socket path
// under it fits sun_path; /tmp/smolvm-<euid> otherwise.
func TestDefaultRunDir(t *testing.T) {
	fallback := filepath.Join(os.TempDir(), fmt.Sprintf("smolvm-%d", os.Geteuid()))
	private := t.TempDir()
	if err := os.Chmod(private, 0o700); err != nil {
		t.Fatal(err)
	}
	open := t.TempDir()
	if err := os.Chmod(open, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(private, link); err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(private, strings.Repeat("x", maxRunDir))
	if err := os.Mkdir(long, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ xdg, want string }{
		{private, filepath.Join(private, "smolvm")},
		{"", fallback},
		{open, fallback},
		{link, fallback},
		{long, fallback},
		{"relative/dir", fallback},
		{filepath.Join(private, "missing"), fallback},
	} {
		t.Setenv("XDG_RUNTIME_DIR", c.xdg)
		if got := defaultRunDir(); got != c.want {
			t.Errorf("XDG_RUNTIME_DIR=%q: run dir %q, want %q", c.xdg, got, c.want)
		}
	}
	// The longest accepted default still leaves room for every socket.
	x := filepath.Join("/", strings.Repeat("y", maxRunDir-len("/smolvm")-1))
	sock := filepath.Join(x, "smolvm", "0123456789ab", "agent.3.sock")
	if len(sock) > 107 {
		t.Errorf("socket path of %d bytes under the longest default run dir", len(sock))
	}
	t.Setenv("SMOLVM_RUN_DIR", "")
	t.Setenv("XDG_RUNTIME_DIR", private)
	if o := (Options{}).withDefaults(); o.RunDir != filepath.Join(private, "smolvm") {
		t.Errorf("Options default RunDir %q", o.RunDir)
	}
}

package testutil

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"

	"github.com/smolvm-go/smolvm/internal/fsutil"
	"github.com/smolvm-go/smolvm/internal/image"
)

var ensure struct {
	once  sync.Once
	agent string
	err   error
}

// ModuleRoot is the root of this source tree.
func ModuleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// EnsureImages builds the guest agent from this source tree and makes sure
// the named images (default busybox and debian) in ImageDir carry it: a
// no-op (about a second) when the cache is current, an initramfs rebuild
// when the agent changed. Images missing entirely are built (the debian
// image takes a minute or two; scripts/setup normally did it). It returns
// the agent binary's path, valid for the life of the test process.
func EnsureImages(ctx context.Context, names ...string) (string, error) {
	if len(names) == 0 {
		names = []string{image.Busybox, image.Debian}
	}
	ensure.once.Do(func() {
		ensure.agent, ensure.err = buildTestAgent(ctx)
		if ensure.err == nil {
			ensure.err = EnsureNetHelper(ctx)
		}
	})
	if ensure.err != nil {
		return "", fmt.Errorf("building the guest agent: %w", ensure.err)
	}
	for _, n := range names {
		if _, err := image.Build(ctx, image.BuildOptions{Dir: ImageDir(), Name: n, AgentPath: ensure.agent}); err != nil {
			return "", fmt.Errorf("image %s: %w (run scripts/setup)", n, err)
		}
	}
	return ensure.agent, nil
}

// buildTestAgent builds the agent into one private dir per user
// (/tmp/smolvm-test-agent-<euid>, 0700, owner-checked), under a temp name
// renamed over smolvm-agent: test processes of every package share the
// path (the builds of one tree are identical, and a rename never leaves a
// half-written file at it), and nothing piles up per process as a temp dir
// each did.
func buildTestAgent(ctx context.Context) (string, error) {
	dir := filepath.Join(os.TempDir(), "smolvm-test-agent-"+strconv.Itoa(os.Geteuid()))
	if err := fsutil.PrivateDir(dir); err != nil {
		return "", err
	}
	tmp := filepath.Join(dir, "smolvm-agent.tmp-"+strconv.Itoa(os.Getpid()))
	if err := image.BuildAgent(ctx, ModuleRoot(), tmp); err != nil {
		os.Remove(tmp)
		return "", err
	}
	agent := filepath.Join(dir, "smolvm-agent")
	if err := os.Rename(tmp, agent); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return agent, nil
}

var netHelper struct {
	once sync.Once
	err  error
}

// EnsureNetHelper builds the network sidecar (cmd/smolvm-net) from this
// source tree once per test process and points $SMOLVM_NET_HELPER at it,
// unless the caller set that variable already.
func EnsureNetHelper(ctx context.Context) error {
	netHelper.once.Do(func() { netHelper.err = buildNetHelper(ctx) })
	return netHelper.err
}

// BuildCommand builds the command in ./cmd/NAME of this module into
// dir/NAME as scripts/setup does (CGO_ENABLED=0, never with -race even when
// the tests run with it) and returns its path: tests that measure or run
// a real binary use it.
func BuildCommand(ctx context.Context, dir, name string) (string, error) {
	out := filepath.Join(dir, name)
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", out, "./cmd/"+name)
	cmd.Dir = ModuleRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building %s: %w\n%s", name, err, b)
	}
	return out, nil
}

func buildNetHelper(ctx context.Context) error {
	if os.Getenv("SMOLVM_NET_HELPER") != "" {
		return nil
	}
	// One private dir per user; in it a dir per test process (a test
	// may count the sidecars started from its own binary path), and the
	// dirs of processes that are gone are removed (a fresh temp dir per
	// process, never removed, had piled up 8 MB each in /tmp).
	base := filepath.Join(os.TempDir(), fmt.Sprintf("smolvm-test-bin-%d", os.Geteuid()))
	if err := fsutil.PrivateDir(base); err != nil {
		return err
	}
	if ents, err := os.ReadDir(base); err == nil {
		for _, e := range ents {
			if pid, err := strconv.Atoi(e.Name()); err == nil && pid != os.Getpid() && syscall.Kill(pid, 0) == syscall.ESRCH {
				os.RemoveAll(filepath.Join(base, e.Name()))
			}
		}
	}
	dir := filepath.Join(base, strconv.Itoa(os.Getpid()))
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	out, err := BuildCommand(ctx, dir, "smolvm-net")
	if err != nil {
		return err
	}
	return os.Setenv("SMOLVM_NET_HELPER", out)
}

package smolvm_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// The tests in this package boot real VMs (QEMU; TCG where KVM is not
// usable). They need scripts/setup to have run (QEMU, the images).

var (
	testImageDir string
	testRoot     string // data + run dirs of this test binary
)

func TestMain(m *testing.M) {
	if os.Getenv("SMOLVM_TEST_CHILD") != "" {
		os.Exit(m.Run())
	}
	root, err := os.MkdirTemp("/tmp", "smvt")
	if err != nil {
		panic(err)
	}
	testRoot = root
	testImageDir = image.DefaultDir()
	if err := ensureImages(); err != nil {
		fmt.Fprintf(os.Stderr, "test setup: %v\nrun scripts/setup first\n", err)
		os.Exit(1)
	}
	// Package-level helpers (smolvm.New, Open, FromSnapshot) and the
	// examples read these.
	os.Setenv("SMOLVM_DATA_DIR", filepath.Join(root, "default"))
	os.Setenv("SMOLVM_RUN_DIR", filepath.Join(root, "run"))
	// Tests boot cold (each has its own data dir, where a template would
	// first be built); template_test.go turns templates on for its own.
	os.Setenv("SMOLVM_COLD_BOOT", "1")
	code := m.Run()
	for _, sh := range []*sharedBox{&shared, &sharedDebian} {
		if sh.vm != nil {
			sh.vm.Delete(context.Background())
			sh.m.Close()
		}
	}
	cleanupAll(filepath.Join(root, "default"))
	os.RemoveAll(root)
	os.Exit(code)
}

// ensureImages builds the guest agent from this source tree and makes sure
// the busybox and debian images carry it (a no-op when the cache is current).
func ensureImages() error {
	agent, err := testutil.EnsureImages(context.Background())
	testAgent = agent
	return err
}

var testAgent string

// cleanupAll deletes every VM left in a data dir (tests that fail midway).
func cleanupAll(dataDir string) {
	ctx := context.Background()
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dataDir, ImageDir: testImageDir, Logger: quietLogger()})
	if err != nil {
		return
	}
	defer m.Close()
	infos, _ := m.List(ctx)
	for _, i := range infos {
		if vm, err := m.Open(ctx, i.ID); err == nil {
			vm.Delete(ctx)
			vm.Close()
		}
	}
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newManager returns a manager on a fresh data dir, closed (and its VMs
// deleted) when the test ends.
func newManager(t testing.TB) *smolvm.Manager {
	t.Helper()
	dir, err := os.MkdirTemp(testRoot, "d")
	if err != nil {
		t.Fatal(err)
	}
	m, err := smolvm.NewManager(context.Background(), smolvm.Options{DataDir: dir, ImageDir: testImageDir,
		RunDir: filepath.Join(testRoot, "run"), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		infos, _ := m.List(ctx)
		for _, i := range infos {
			if vm, err := m.Open(ctx, i.ID); err == nil {
				vm.Delete(ctx)
				vm.Close()
			}
		}
		m.Close()
	})
	return m
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// boot creates and starts a VM.
func boot(t testing.TB, m *smolvm.Manager, cfg smolvm.Config) *smolvm.VM {
	t.Helper()
	ctx := testCtx(t)
	vm, err := m.New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	return vm
}

// sharedBox is one running VM that tests share (each cold boot costs
// seconds of a core under TCG), booted by the first test that asks.
type sharedBox struct {
	once sync.Once
	m    *smolvm.Manager
	vm   *smolvm.VM
	err  error
}

// boot creates (config's Config) and starts the box's VM, once, in its
// own data dir under testRoot.
func (sh *sharedBox) boot(t *testing.T, dataDir string, config func() (smolvm.Config, error)) *smolvm.VM {
	t.Helper()
	sh.once.Do(func() {
		ctx := context.Background()
		var cfg smolvm.Config
		if cfg, sh.err = config(); sh.err != nil {
			return
		}
		sh.m, sh.err = smolvm.NewManager(ctx, smolvm.Options{DataDir: filepath.Join(testRoot, dataDir), ImageDir: testImageDir,
			RunDir: filepath.Join(testRoot, "run"), Logger: quietLogger()})
		if sh.err != nil {
			return
		}
		sh.vm, sh.err = sh.m.New(ctx, cfg)
		if sh.err == nil {
			sh.err = sh.vm.Start(ctx)
		}
	})
	if sh.err != nil {
		t.Fatalf("shared vm (%s): %v", dataDir, sh.err)
	}
	return sh.vm
}

// shared is one running busybox VM that read-mostly tests share.
var shared sharedBox

func sharedVM(t *testing.T) *smolvm.VM {
	t.Helper()
	return shared.boot(t, "shared", func() (smolvm.Config, error) {
		// The default network policy plus one explicit exception: the
		// host's 127.0.0.1, so tests can serve the guest from the host.
		return smolvm.Config{Name: "shared", Image: "busybox", Env: map[string]string{"FROM_CONFIG": "cfg"},
			Network: smolvm.NetworkPolicy{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}}, nil
	})
}

// sharedDebian is one running debian VM of the zero Config (debian, 512
// MiB, 1 vCPU, the default network policy) that tests share: a debian
// boot is the slowest there is.
var sharedDebian sharedBox

func sharedDebianVM(t *testing.T) *smolvm.VM {
	t.Helper()
	return sharedDebian.boot(t, "shared-debian", func() (smolvm.Config, error) { return smolvm.Config{}, nil })
}

func run(t testing.TB, vm *smolvm.VM, cmd string, opts ...smolvm.RunOption) *smolvm.Result {
	t.Helper()
	res, err := vm.Run(testCtx(t), cmd, opts...)
	if err != nil {
		t.Fatalf("Run(%q): %v", cmd, err)
	}
	return res
}

func mustOK(t testing.TB, vm *smolvm.VM, cmd string) string {
	t.Helper()
	res := run(t, vm, cmd)
	if !res.OK() {
		t.Fatalf("Run(%q): exit %d\nstdout: %s\nstderr: %s", cmd, res.ExitCode, res.Stdout, res.Stderr)
	}
	return res.Output()
}

// qemuProcessesUnder lists QEMU pids whose command line mentions dir.
func qemuProcessesUnder(dir string) []string {
	out, _ := exec.Command("pgrep", "-f", "qemu-system.*"+dir).Output()
	return strings.Fields(string(out))
}

// getThroughPort fetches http://127.0.0.1:hostPort/ (a port forwarded to
// the guest) until the body contains want or within has passed, and
// returns the last body.
func getThroughPort(hostPort int, want string, within time.Duration) []byte {
	// A plain TCP exchange, not Go's HTTP client: a one-shot `nc -l` in the
	// guest answers as soon as the connection opens, before any request,
	// and the HTTP transport drops such bytes ("unsolicited response on
	// idle HTTP channel"), after which nc is gone. The request is still
	// sent, for real HTTP servers; the reply is read whole (headers too).
	var body []byte
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", hostPort), 5*time.Second)
		if err == nil {
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(conn, "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
			body, _ = io.ReadAll(io.LimitReader(conn, 1<<20))
			conn.Close()
			if strings.Contains(string(body), want) {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return body
}

// cliBinary is the smolvm CLI built from this tree (as scripts/setup
// builds it), once per test binary.
var cliBinary struct {
	once sync.Once
	path string
	err  error
}

func smolvmBinary(t testing.TB) string {
	t.Helper()
	cliBinary.once.Do(func() {
		dir, err := os.MkdirTemp(testRoot, "bin")
		if err != nil {
			cliBinary.err = err
			return
		}
		cliBinary.path, cliBinary.err = testutil.BuildCommand(context.Background(), dir, "smolvm")
	})
	if cliBinary.err != nil {
		t.Fatal(cliBinary.err)
	}
	return cliBinary.path
}

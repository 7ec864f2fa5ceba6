package image

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/u-root/u-root/pkg/cpio"
)

// sharedDownloads is the download cache of the real default cache dir, so
// tests do not fetch the kernel package again.
func sharedDownloads() string { return filepath.Join(DefaultDir(), "downloads") }

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

// fakeAgent writes a stand-in agent binary (the initramfs only packs its bytes).
func fakeAgent(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	d, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		parent := filepath.Dir(d)
		if parent == d {
			t.Fatal("go.mod not found")
		}
		d = parent
	}
}

var (
	agentOnce sync.Once
	agentPath string
	agentErr  error
	agentDir  string
)

// realAgent builds cmd/smolvm-agent once per test binary; skips when it
// does not exist or does not build yet. SMOLVM_TEST_AGENT names a prebuilt
// agent binary to use instead.
func realAgent(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("SMOLVM_TEST_AGENT"); p != "" {
		return p
	}
	root := moduleRoot(t)
	if _, err := os.Stat(filepath.Join(root, "cmd", "smolvm-agent")); err != nil {
		t.Skip("cmd/smolvm-agent does not exist yet")
	}
	agentOnce.Do(func() {
		agentDir, agentErr = os.MkdirTemp("", "smolvm-agent-")
		if agentErr != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		agentPath = filepath.Join(agentDir, "smolvm-agent")
		agentErr = BuildAgent(ctx, root, agentPath)
	})
	if agentErr != nil {
		t.Skipf("cmd/smolvm-agent does not build: %v", agentErr)
	}
	return agentPath
}

var (
	kernelTreeOnce sync.Once
	kernelTree     string
	kernelTreeErr  error
)

// extractedCloudKernel returns a dpkg-deb -x tree of the Debian cloud
// kernel package (downloaded into the shared download cache if needed).
func extractedCloudKernel(t *testing.T) string {
	t.Helper()
	needTools(t, "apt-get", "apt-cache", "dpkg-deb")
	kernelTreeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		b := &builder{o: BuildOptions{DownloadDir: sharedDownloads()}, log: slog.New(slog.DiscardHandler)}
		var deb string
		deb, kernelTreeErr = cachedOrFetchedCloudDeb(ctx, b)
		if kernelTreeErr != nil {
			return
		}
		kernelTree, kernelTreeErr = os.MkdirTemp("", "smolvm-kernel-tree-")
		if kernelTreeErr != nil {
			return
		}
		kernelTreeErr = runCmd(ctx, nil, cmdSpec{}, "dpkg-deb", "-x", deb, kernelTree)
	})
	if kernelTreeErr != nil {
		t.Fatalf("kernel package: %v", kernelTreeErr)
	}
	return kernelTree
}

// cachedOrFetchedCloudDeb prefers a cloud kernel .deb already in the
// download cache (no apt round trip) and fetches one otherwise.
func cachedOrFetchedCloudDeb(ctx context.Context, b *builder) (string, error) {
	if m, _ := filepath.Glob(filepath.Join(b.downloadDir(), "linux-image-*-cloud-amd64_*.deb")); len(m) > 0 {
		return m[len(m)-1], nil
	}
	pkg, ver, sum, err := b.resolveCloudKernel(ctx)
	if err != nil {
		return "", err
	}
	return b.downloadDeb(ctx, pkg, ver, sum)
}

func TestMain(m *testing.M) {
	code := m.Run()
	if kernelTree != "" {
		os.RemoveAll(kernelTree)
	}
	if agentDir != "" {
		os.RemoveAll(agentDir)
	}
	os.Exit(code)
}

// readInitramfs returns the records (with contents) of a gzip'd cpio file.
func readInitramfs(t *testing.T, path string) ([]cpio.Record, map[string][]byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || st.Size()%4096 != 0 {
		t.Errorf("initramfs %s is not padded to 4 KiB (size %d): QEMU may place it over the ACPI tables", path, st.Size())
	}
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	zr.Multistream(false) // zero padding follows the gzip member
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	rr := cpio.Newc.Reader(bytes.NewReader(raw))
	var recs []cpio.Record
	data := map[string][]byte{}
	for {
		r, err := rr.ReadRecord()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read cpio: %v", err)
		}
		if r.Mode&cpio.S_IFMT == cpio.S_IFREG {
			b, err := io.ReadAll(io.NewSectionReader(r.ReaderAt, 0, int64(r.FileSize)))
			if err != nil {
				t.Fatal(err)
			}
			data[r.Name] = b
		}
		recs = append(recs, r)
	}
	return recs, data
}

// hostTSCkHz returns the host CPU frequency in kHz from /proc/cpuinfo.
func hostTSCkHz() (int, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil && mhz > 0 {
				return int(mhz * 1000), nil
			}
		}
	}
	return 0, errors.New("no cpu MHz in /proc/cpuinfo")
}

// bootUntilReady boots img on QEMU microvm (TCG) and fails the test unless
// the agent's READY line appears on the console within timeout. It returns
// the time to READY and the console output.
func bootUntilReady(t *testing.T, img Image, timeout time.Duration) (time.Duration, string) {
	t.Helper()
	d, console, err := tryBoot(img, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return d, console
}

// tryBoot boots img on QEMU microvm (TCG) with the rootfs as a snapshot=on
// virtio-blk disk and the agent's virtio-serial port, and waits for the
// agent's READY line on the serial console. QEMU is killed before
// returning. The error carries the console output.
func tryBoot(img Image, timeout time.Duration) (time.Duration, string, error) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return 0, "", err
	}
	khz, err := hostTSCkHz()
	if err != nil {
		return 0, "", err
	}
	run, err := os.MkdirTemp("", "smi-")
	if err != nil {
		return 0, "", err
	}
	defer os.RemoveAll(run)
	appendArgs := fmt.Sprintf("console=ttyS0 panic=-1 tsc_early_khz=%d smol.root=/dev/vda %s", khz, img.KernelArgs)
	args := []string{
		"-M", "microvm", "-accel", "tcg", "-m", "256", "-smp", "1",
		"-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", appendArgs,
		"-drive", "id=root,file=" + img.Rootfs + ",format=raw,if=none,snapshot=on",
		"-device", "virtio-blk-device,drive=root",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + filepath.Join(run, "agent.sock") + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=org.smolvm.agent",
		"-no-reboot",
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, "", err
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, "", err
	}
	var (
		mu      sync.Mutex
		console strings.Builder
	)
	consoleText := func() string {
		mu.Lock()
		defer mu.Unlock()
		return console.String()
	}
	ready := make(chan time.Duration, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			mu.Lock()
			console.WriteString(line + "\n")
			mu.Unlock()
			if strings.Contains(line, "SMOLVM-AGENT READY") {
				ready <- time.Since(start)
				return
			}
		}
		close(ready)
	}()
	kill := func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	select {
	case d, ok := <-ready:
		kill()
		cmd.Wait()
		if ok {
			return d, consoleText(), nil
		}
		return 0, consoleText(), fmt.Errorf("QEMU exited before READY (stderr: %s)\nconsole:\n%s", stderr.String(), consoleText())
	case <-ctx.Done():
		kill()
		<-ready
		cmd.Wait()
		return 0, consoleText(), fmt.Errorf("no READY within %v (stderr: %s)\nconsole:\n%s", timeout, stderr.String(), consoleText())
	}
}

package smolvm_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// templateImageDir makes a private image cache holding busybox with extra
// kernel arguments args (kernel and root filesystem shared by symlink, the
// initramfs copied): setArgs rewrites its manifest, which is what a
// rebuild does to the image's content identity. The guest shows the
// arguments it booted with in /proc/cmdline, so a VM tells which template
// it came from.
func templateImageDir(t *testing.T) (dir string, setArgs func(string)) {
	t.Helper()
	src := testImageDir
	dir, err := os.MkdirTemp(testRoot, "img")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(src, "images", image.Busybox, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var man image.Manifest
	if err := json.Unmarshal(raw, &man); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"kernels", "rootfs"} {
		if err := os.Symlink(filepath.Join(src, d), filepath.Join(dir, d)); err != nil {
			t.Fatal(err)
		}
	}
	initrd, err := os.ReadFile(filepath.Join(src, man.Initrd.Path))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, filepath.Dir(man.Initrd.Path)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, man.Initrd.Path), initrd, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "images", image.Busybox), 0o755); err != nil {
		t.Fatal(err)
	}
	base := man.KernelArgs
	setArgs = func(extra string) {
		man.KernelArgs = strings.TrimSpace(base + " " + extra)
		b, _ := json.Marshal(man)
		p := filepath.Join(dir, "images", image.Busybox, "manifest.json")
		if err := os.WriteFile(p+".tmp", b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			t.Fatal(err)
		}
	}
	return dir, setArgs
}

// TestTemplates proves templates on real VMs (QEMU), sharing one data dir
// and two template builds: a create from a template runs its first
// command with the caller's env, ports, network policy and hostname; two
// creates from one template are distinct VMs with their own disks; a
// changed image makes the next creates (5 CLI processes at once) build
// and use one new template, never the old one, which is then stale:
// doctor reports it and gc collects it once unused (a stopped VM from it
// keeps working: its second start boots cold from its own disk);
// `sandbox create --cold`
// boots; a template that fails verification fails the create and leaves
// no VM. The rules on the fake backend: TestTemplateRules.
func TestTemplates(t *testing.T) {
	testutil.RequireQEMU(t)
	t.Setenv("SMOLVM_COLD_BOOT", "") // templates on (TestMain turns them off)
	ctx := testCtx(t)
	imgDir, setArgs := templateImageDir(t)
	setArgs("smol.imgtest=1")
	dataDir, err := os.MkdirTemp(testRoot, "tm")
	if err != nil {
		t.Fatal(err)
	}
	runDir := filepath.Join(testRoot, "run")
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dataDir, ImageDir: imgDir, RunDir: runDir, Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cleanupAll(dataDir)
		m.Close()
	})
	bin := smolvmBinary(t)
	var cliEnv []string // this process's, with templates on
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SMOLVM_COLD_BOOT=") {
			cliEnv = append(cliEnv, kv)
		}
	}
	cli := func(args ...string) (map[string]any, error) {
		cmd := exec.CommandContext(ctx, bin, append([]string{"--data-dir", dataDir, "--image-dir", imgDir, "--json"}, args...)...)
		cmd.Env = cliEnv
		out, err := cmd.Output()
		var env map[string]any
		if jerr := json.Unmarshal(out, &env); jerr != nil {
			return nil, fmt.Errorf("%v: %v: %q", args, err, out)
		}
		if ok, _ := env["ok"].(bool); !ok {
			return env, fmt.Errorf("%v failed: %s", args, out)
		}
		return env, nil
	}

	var a, b *smolvm.VM
	var first smolvm.TemplateInfo
	t.Run("CreateFromTemplate", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		hostPort := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		policy := smolvm.NetworkPolicy{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}
		var err error
		a, err = m.New(ctx, smolvm.Config{Name: "tpl-a", Image: "busybox", MemoryMiB: 256, Env: map[string]string{"TPL_ENV": "from-a"},
			Network: policy, PortForwards: []smolvm.PortForward{{HostPort: hostPort, GuestPort: 8080}}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.Close() })
		if err := a.Start(ctx); err != nil {
			t.Fatalf("Start: %v", err)
		}
		// The first command after Start: env, hostname, template's boot.
		out := mustOK(t, a, `echo "$TPL_ENV $(hostname)"; cat /proc/cmdline`)
		if !strings.HasPrefix(out, "from-a tpl-a\n") || !strings.Contains(out, "smol.imgtest=1") {
			t.Errorf("first command in a: %q, want env from-a, hostname tpl-a, a kernel booted with smol.imgtest=1", out)
		}
		l, err := m.ListTemplates(ctx)
		if err != nil || len(l) != 1 || l[0].Stale {
			t.Fatalf("templates: %+v, %v", l, err)
		}
		first = l[0]
		info, _ := a.Info(ctx)
		if info.Template != first.Key || info.NetworkPolicy == nil || len(info.NetworkPolicy.AllowCIDRs) != 1 || len(info.PortForwards) != 1 {
			t.Errorf("info of a: template %q (want %q), policy %+v, ports %+v", info.Template, first.Key, info.NetworkPolicy, info.PortForwards)
		}
		run(t, a, "(echo -e 'HTTP/1.0 200 OK\\r\\n\\r\\nfrom-template' | nc -l -p 8080 >/dev/null 2>&1 &) ; sleep 0.3")
		body := getThroughPort(hostPort, "from-template", 5*time.Second)
		if !strings.Contains(string(body), "from-template") {
			t.Errorf("host got %q through the port the caller asked for", body)
		}

		b, err = m.New(ctx, smolvm.Config{Name: "tpl-b", Image: "busybox", MemoryMiB: 256, Env: map[string]string{"TPL_ENV": "from-b"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		if err := b.Start(ctx); err != nil {
			t.Fatalf("Start b: %v", err)
		}
		if out := strings.TrimSpace(mustOK(t, b, `echo "$TPL_ENV $(hostname)"`)); out != "from-b tpl-b" {
			t.Errorf("b: %q", out)
		}
		mustOK(t, a, "echo only-in-a > /root/tpl-marker && sync")
		if res := run(t, b, "cat /root/tpl-marker"); res.OK() {
			t.Errorf("a file written in a is in b: %q", res.Stdout)
		}
		if l, _ := m.ListTemplates(ctx); len(l) != 1 || l[0].Uses != 2 {
			t.Errorf("after two creates: %+v, want one template used twice", l)
		}
		ia, _ := a.Info(ctx)
		ib, _ := b.Info(ctx)
		if ia.Dir == ib.Dir {
			t.Errorf("a and b share %s", ia.Dir)
		}
	})
	if first.Key == "" {
		t.Fatal("no template")
	}

	t.Run("ChangedImageFiveProcesses", func(t *testing.T) {
		setArgs("smol.imgtest=2") // the image is rebuilt
		l, _ := m.ListTemplates(ctx)
		if len(l) != 1 || !l[0].Stale {
			t.Fatalf("after the image changed: %+v, want the template stale", l)
		}
		var wg sync.WaitGroup
		errs := make([]error, 5)
		for i := range 5 {
			wg.Go(func() {
				_, errs[i] = cli("sandbox", "create", "--name", fmt.Sprintf("tpl-p%d", i), "--image", "busybox", "--memory", "256")
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Errorf("process %d: %v", i, err)
			}
		}
		hosts := map[string]bool{}
		for i := range 5 {
			vm, err := m.Open(ctx, fmt.Sprintf("tpl-p%d", i))
			if err != nil {
				t.Fatal(err)
			}
			out := mustOK(t, vm, "hostname; cat /proc/cmdline")
			if !strings.Contains(out, "smol.imgtest=2") || strings.Contains(out, "smol.imgtest=1") {
				t.Errorf("tpl-p%d runs %q: want the new image's template", i, out)
			}
			hosts[strings.SplitN(out, "\n", 2)[0]] = true
			info, _ := vm.Info(ctx)
			if info.Template == "" || info.Template == first.Key {
				t.Errorf("tpl-p%d: template %q (old %q)", i, info.Template, first.Key)
			}
			vm.Close()
		}
		if len(hosts) != 5 {
			t.Errorf("hostnames of the 5 sandboxes: %v", hosts)
		}
		l, _ = m.ListTemplates(ctx)
		current := 0
		for _, tm := range l {
			if !tm.Stale {
				current++
				if tm.Uses != 5 {
					t.Errorf("the new template was used %d times, want 5", tm.Uses)
				}
			}
		}
		if len(l) != 2 || current != 1 {
			t.Errorf("templates after 5 concurrent creates: %+v, want the old (stale) and one new", l)
		}
	})

	t.Run("StaleReportedAndCollected", func(t *testing.T) {
		checks, err := m.Doctor(ctx)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, c := range checks {
			if c.Name == "templates" {
				found = true
				if c.Status != smolvm.CheckWarn || c.Fix.Action != smolvm.FixCollectTemplates {
					t.Errorf("doctor's templates check: %+v", c)
				}
			}
		}
		if !found {
			t.Errorf("doctor has no templates check: %+v", checks)
		}
		env, err := cli("template", "ls")
		if err != nil {
			t.Fatal(err)
		}
		if list, _ := env["data"].([]any); len(list) != 2 {
			t.Errorf("template ls: %v, want 2 templates", env["data"])
		}
		res, err := m.CollectTemplates(ctx)
		if err != nil || len(res.Removed) != 0 || len(res.Kept) != 1 {
			t.Errorf("gc while a and b run: %+v, %v; want the stale template kept", res, err)
		}
		// b stops: gc then removes the template, making b's disk
		// independent of it first; b's next start boots cold from its
		// own disk, with its data.
		a.Delete(ctx)
		mustOK(t, b, "echo kept-in-b > /root/b-marker && sync")
		if err := b.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		env, err = cli("template", "gc")
		if err != nil {
			t.Fatal(err)
		}
		if data, _ := json.Marshal(env["data"]); !strings.Contains(string(data), first.Key) {
			t.Errorf("template gc: %s, want %s removed", data, first.Key)
		}
		for _, tm := range mustTemplates(t, m) {
			if tm.Key == first.Key {
				t.Errorf("stale template still listed after gc")
			}
		}
		if _, err := os.Stat(filepath.Join(dataDir, "snapshots", first.SnapshotID)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the collected template's files: %v", err)
		}
		if err := b.Start(ctx); err != nil {
			t.Fatalf("second start of b after its template was collected: %v", err)
		}
		if out := strings.TrimSpace(mustOK(t, b, `cat /root/b-marker; echo "$TPL_ENV"; cat /proc/cmdline`)); !strings.HasPrefix(out, "kept-in-b\nfrom-b\n") {
			t.Errorf("b after a cold second start: %q", out)
		}
		if info, _ := b.Info(ctx); info.Template != first.Key || info.RestoredFrom != "" {
			t.Errorf("b: template %q, restored from %q", info.Template, info.RestoredFrom)
		}
		b.Delete(ctx)
	})

	t.Run("ColdCLI", func(t *testing.T) {
		if _, err := cli("sandbox", "create", "--cold", "--name", "tpl-cold", "--image", "busybox", "--memory", "256"); err != nil {
			t.Fatal(err)
		}
		vm, err := m.Open(ctx, "tpl-cold")
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if info, _ := vm.Info(ctx); info.Template != "" {
			t.Errorf("--cold: template %q", info.Template)
		}
		if out := strings.TrimSpace(mustOK(t, vm, "hostname")); out != "tpl-cold" {
			t.Errorf("hostname %q", out)
		}
	})

	t.Run("CorruptTemplateLeavesNoVM", func(t *testing.T) {
		l := mustTemplates(t, m)
		if len(l) != 1 {
			t.Fatalf("templates: %+v", l)
		}
		state := filepath.Join(dataDir, "snapshots", l[0].SnapshotID, "state.bin")
		st, err := os.Stat(state)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s has mode %v, want private", state, st.Mode().Perm())
		}
		f, err := os.OpenFile(state, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		f.Write([]byte("x"))
		f.Close()
		_, err = cli("sandbox", "create", "--name", "tpl-bad", "--image", "busybox", "--memory", "256")
		if err == nil || !strings.Contains(err.Error(), "snapshot_corrupt") {
			t.Errorf("create from a corrupt template: %v, want snapshot_corrupt", err)
		}
		if _, err := m.Open(ctx, "tpl-bad"); !errors.Is(err, smolvm.ErrVMNotFound) {
			t.Errorf("the failed create left a VM: %v", err)
		}
	})
}

func mustTemplates(t *testing.T, m *smolvm.Manager) []smolvm.TemplateInfo {
	t.Helper()
	l, err := m.ListTemplates(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return l
}

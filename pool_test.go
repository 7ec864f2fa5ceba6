package smolvm_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/procfs"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// TestPool proves the warm pool on real VMs (QEMU, networking on), on one
// data dir: a pool of 2 is filled; a create claims a member and its first
// command sees the caller's env, hostname, machine-id and MAC; doctor
// finds no stray VMM (the claimed VM runs in the member's dirs); 5 CLI
// creates at once give 5 distinct working sandboxes, two of them claimed
// members and never one twice; the detached fillers the creates start
// bring the pool back to 2 and exit; removing the pool deletes its
// members; no process is left. The rules on the fake backend:
// TestPoolRules.
func TestPool(t *testing.T) {
	testutil.RequireQEMU(t)
	t.Setenv("SMOLVM_COLD_BOOT", "") // templates on (TestMain turns them off)
	ctx := testCtx(t)
	dataDir, err := os.MkdirTemp(testRoot, "pl")
	if err != nil {
		t.Fatal(err)
	}
	m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dataDir, ImageDir: testImageDir, RunDir: filepath.Join(testRoot, "run"), Logger: quietLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.SetPool(ctx, "busybox", smolvm.TemplateOptions{MemoryMiB: 256}, 0)
		cleanupAll(dataDir)
		m.Close()
	})
	bin := smolvmBinary(t)
	var cliEnv []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "SMOLVM_COLD_BOOT=") {
			cliEnv = append(cliEnv, kv)
		}
	}
	var (
		outMu   sync.Mutex
		lastOut []byte // the last successful command's output (read after sequential calls)
	)
	cli := func(args ...string) error {
		cmd := exec.CommandContext(ctx, bin, append([]string{"--data-dir", dataDir, "--image-dir", testImageDir, "--json"}, args...)...)
		cmd.Env = cliEnv
		out, err := cmd.Output()
		var env map[string]any
		if jerr := json.Unmarshal(out, &env); jerr != nil {
			return fmt.Errorf("%v: %v: %q", args, err, out)
		}
		if ok, _ := env["ok"].(bool); !ok {
			return fmt.Errorf("%v failed: %s", args, out)
		}
		outMu.Lock()
		lastOut = out
		outMu.Unlock()
		return nil
	}
	opts := smolvm.TemplateOptions{MemoryMiB: 256}
	pool := func(t *testing.T) smolvm.PoolInfo {
		t.Helper()
		l, err := m.Pools(ctx)
		if err != nil || len(l) != 1 {
			t.Fatalf("Pools = %+v, %v", l, err)
		}
		return l[0]
	}
	member := func(t *testing.T, vm *smolvm.VM) (string, smolvm.Info) {
		t.Helper()
		info, err := vm.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if d := filepath.Base(info.Dir); d != info.ID {
			return d, info
		}
		return "", info
	}
	// create makes and starts a VM of the pool's shape (cfg's image and
	// memory are filled in), closed when the test ends.
	create := func(t *testing.T, cfg smolvm.Config) *smolvm.VM {
		t.Helper()
		cfg.Image, cfg.MemoryMiB = "busybox", 256
		vm, err := m.New(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { vm.Close() })
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("Start %s: %v", cfg.Name, err)
		}
		return vm
	}
	// The first command: env, hostname, machine-id and eth0's MAC.
	identity := func(t *testing.T, vm *smolvm.VM, info smolvm.Info, env string) {
		t.Helper()
		out := mustOK(t, vm, `echo "$POOL_ENV $(hostname) $(cat /etc/machine-id) $(cat /sys/class/net/eth0/address)"`)
		want := fmt.Sprintf("%s %s %s %s", env, info.ID, info.MachineID, info.MAC)
		if strings.TrimSpace(out) != want {
			t.Errorf("%s: first command says %q, want %q", info.ID, strings.TrimSpace(out), want)
		}
	}

	if err := m.SetPool(ctx, "busybox", opts, 2); err != nil {
		t.Fatal(err)
	}
	if err := m.FillPools(ctx); err != nil {
		t.Fatal(err)
	}
	if p := pool(t); p.Ready != 2 || len(p.PIDs) != 4 || p.IdleMemoryKiB <= 0 { // 2 VMMs, 2 sidecars
		t.Fatalf("pool after filling: %+v", p)
	}

	t.Run("CreateClaims", func(t *testing.T) {
		members := pool(t).Members
		vm := create(t, smolvm.Config{Name: "pl-a", Env: map[string]string{"POOL_ENV": "from-a"}})
		mem, info := member(t, vm)
		if mem == "" || (mem != members[0] && mem != members[1]) {
			t.Fatalf("pl-a runs in %s, not a member of %v", info.Dir, members)
		}
		identity(t, vm, info, "from-a")
		// Nothing the user sees names the member it was.
		if out := mustOK(t, vm, "cat /proc/cmdline /etc/hostname; dmesg; uname -n"); strings.Contains(out, mem) || strings.Contains(out, "pool-") {
			t.Errorf("the claimed VM shows the member's name %s: %q", mem, out)
		}
		if logs, err := vm.Logs(ctx); err != nil || strings.Contains(string(logs), mem) {
			t.Errorf("the claimed VM's logs name the member %s (%v): %q", mem, err, logs)
		}
		if p := pool(t); p.Ready != 1 {
			t.Errorf("pool after the claim: %+v (Start never refills)", p)
		}
		checks, err := m.Doctor(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range checks {
			if c.Name == "stray vmm" {
				t.Errorf("doctor: %+v", c)
			}
		}
		// A second start boots cold from the VM's own disk (in the
		// member's dir) and keeps the VM's identity.
		mustOK(t, vm, "echo kept > /root/pool-marker && sync")
		if err := vm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if err := vm.Start(ctx); err != nil {
			t.Fatalf("second start of a claimed VM: %v", err)
		}
		identity(t, vm, info, "from-a")
		if out := strings.TrimSpace(mustOK(t, vm, "cat /root/pool-marker")); out != "kept" {
			t.Errorf("after a restart: %q", out)
		}
		if err := vm.Delete(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(info.Dir); !os.IsNotExist(err) {
			t.Errorf("the claimed member's dir is left after Delete: %v", err)
		}
		// Port forwards: the member's sidecar has none, so the template
		// is restored instead.
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		hostPort := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		pv := create(t, smolvm.Config{Name: "pl-port", PortForwards: []smolvm.PortForward{{HostPort: hostPort, GuestPort: 8080}}})
		if mem, info := member(t, pv); mem != "" || info.Template == "" {
			t.Errorf("a create with a port forward claimed %q (template %q); want the template restored", mem, info.Template)
		}
		if p := pool(t); p.Ready != 1 {
			t.Errorf("pool after a create with ports: %+v", p)
		}
		pv.Delete(ctx)
		if err := m.FillPools(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("FiveProcesses", func(t *testing.T) {
		if p := pool(t); p.Ready != 2 {
			t.Fatalf("pool before: %+v", p)
		}
		var wg sync.WaitGroup
		errs := make([]error, 5)
		for i := range 5 {
			wg.Go(func() {
				errs[i] = cli("sandbox", "create", "--name", fmt.Sprintf("pl-p%d", i), "--image", "busybox", "--memory", "256",
					"--env", fmt.Sprintf("POOL_ENV=p%d", i))
			})
		}
		wg.Wait()
		claimed := map[string]string{}
		macs := map[string]bool{}
		for i := range 5 {
			if errs[i] != nil {
				t.Fatalf("process %d: %v", i, errs[i])
			}
			vm, err := m.Open(ctx, fmt.Sprintf("pl-p%d", i))
			if err != nil {
				t.Fatal(err)
			}
			mem, info := member(t, vm)
			identity(t, vm, info, fmt.Sprintf("p%d", i))
			macs[info.MAC] = true
			if mem != "" {
				if other, ok := claimed[mem]; ok {
					t.Errorf("member %s claimed by %s and %s", mem, other, info.ID)
				}
				claimed[mem] = info.ID
			}
			vm.Close()
		}
		if len(claimed) < 2 || len(macs) != 5 {
			t.Errorf("5 creates from a pool of 2: claimed %v, %d distinct MACs", claimed, len(macs))
		}
		// The creates started detached fillers once they returned: the
		// pool is back to 2, and they exit.
		deadline := time.Now().Add(90 * time.Second)
		for {
			p := pool(t)
			f := fillers(dataDir)
			if p.Ready == 2 && len(f) == 0 {
				break
			}
			if time.Now().After(deadline) {
				log, _ := os.ReadFile(filepath.Join(dataDir, "pool-fill.log"))
				t.Fatalf("pool not refilled: %+v, fillers %v; log:\n%s", p, f, log)
			}
			time.Sleep(200 * time.Millisecond)
		}
		// A member the detached filler made (it has exited) works when
		// claimed.
		vm := create(t, smolvm.Config{Name: "pl-after", Env: map[string]string{"POOL_ENV": "after"}})
		mem, info := member(t, vm)
		if mem == "" {
			t.Fatalf("pl-after did not claim a refilled member: %s", info.Dir)
		}
		identity(t, vm, info, "after")
		vm.Delete(ctx)
		if err := m.FillPools(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("RemoveDeletesMembers", func(t *testing.T) {
		members := pool(t).Members
		// The members are not sandboxes: ls leaves them out, pool ls
		// shows them.
		if err := cli("sandbox", "ls", "--all"); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(lastOut), `"id":"pool-`) {
			t.Errorf("sandbox ls shows pool members: %s", lastOut)
		}
		if err := cli("template", "pool", "ls"); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(lastOut), members[0]) || !strings.Contains(string(lastOut), `"ready":2`) {
			t.Errorf("template pool ls: %s", lastOut)
		}
		if err := cli("template", "pool", "busybox", "--size", "0", "--memory", "256"); err != nil {
			t.Fatal(err)
		}
		if l, _ := m.Pools(ctx); len(l) != 0 {
			t.Errorf("pools after --size 0: %+v", l)
		}
		for _, id := range members {
			if _, err := m.Open(ctx, id); err == nil {
				t.Errorf("member %s left", id)
			}
		}
		cleanupAll(dataDir)
		if left := qemuProcessesUnder(dataDir); len(left) != 0 {
			t.Errorf("QEMU processes left: %v", left)
		}
		if f := fillers(dataDir); len(f) != 0 {
			t.Errorf("fillers left: %v", f)
		}
	})
}

// fillers lists the `smolvm template pool fill` processes of dataDir.
func fillers(dataDir string) []int {
	var out []int
	for _, pid := range procfs.Others() {
		cmd, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		if err == nil && bytes.Contains(cmd, []byte("pool\x00fill")) && bytes.Contains(cmd, []byte(dataDir+"\x00")) {
			out = append(out, pid)
		}
	}
	return out
}

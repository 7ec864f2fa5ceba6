package smolvm_test

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm"
)

// TestStats reads the shared (running, networked) VM's stats through the
// SDK and the CLI and checks them against /proc and the VM's description.
func TestStats(t *testing.T) {
	vm := sharedVM(t)
	ctx := testCtx(t)
	info, err := vm.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Some guest work, so the VMM has used CPU.
	mustOK(t, vm, `i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo $i`)
	// Network counters: 256 KiB fetched from the host (the shared VM's
	// policy opens 127.0.0.1, which the guest reaches as 10.0.2.2).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	const body = 256 << 10
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(make([]byte, body))
	})}
	go srv.Serve(ln)
	defer srv.Close()
	before, err := vm.Stats(ctx)
	if err != nil || before.Network == nil {
		t.Fatalf("stats: %+v, %v", before, err)
	}
	mustOK(t, vm, fmt.Sprintf("wget -q -O /dev/null http://10.0.2.2:%d/", ln.Addr().(*net.TCPAddr).Port))
	st, err := vm.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stats: %+v", st)
	if st.ID != "shared" || st.Status != smolvm.StatusRunning {
		t.Fatalf("id %q status %q", st.ID, st.Status)
	}
	if st.CPU.VMMSeconds <= 0 || st.CPU.Seconds < st.CPU.VMMSeconds || st.CPU.SidecarSeconds < 0 {
		t.Errorf("cpu %+v", st.CPU)
	}
	if st.CPU.WindowSeconds < 0.1 || st.CPU.Percent < 0 || st.CPU.Percent > float64(100*runtime.NumCPU())+20 {
		t.Errorf("cpu percent %.1f over %.3f s", st.CPU.Percent, st.CPU.WindowSeconds)
	}
	created := time.Since(info.CreatedAt).Seconds()
	if st.UptimeSeconds <= 0 || st.UptimeSeconds > created+2 {
		t.Errorf("uptime %.1f s, created %.1f s ago", st.UptimeSeconds, created)
	}
	if st.CPU.Seconds > st.UptimeSeconds*float64(runtime.NumCPU())+1 {
		t.Errorf("cpu %.1f s in %.1f s of uptime", st.CPU.Seconds, st.UptimeSeconds)
	}
	// The VMM's own VmRSS (from /proc/PID/status, not smaps) is within the
	// total; the VMM's PSS is within its share.
	if vmrss := vmRSS(t, info.PID); st.Memory.RSSBytes < vmrss/2 || st.Memory.RSSBytes <= 0 {
		t.Errorf("rss %d, VmRSS of the VMM %d", st.Memory.RSSBytes, vmrss)
	}
	if st.Memory.PSSBytes <= 0 || st.Memory.PSSBytes > st.Memory.RSSBytes || st.Memory.VMMPSSBytes > st.Memory.PSSBytes {
		t.Errorf("memory %+v", st.Memory)
	}
	if st.Memory.GuestBytes != int64(info.MemoryMiB)<<20 {
		t.Errorf("guest bytes %d, want %d MiB", st.Memory.GuestBytes, info.MemoryMiB)
	}
	if st.Disk.AllocatedBytes <= 0 || st.Disk.Files == 0 {
		t.Errorf("disk %+v", st.Disk)
	}
	if st.Network == nil {
		t.Fatal("no network stats for a networked VM")
	}
	if rx, tx := st.Network.RxBytes-before.Network.RxBytes, st.Network.TxBytes-before.Network.TxBytes; rx < body || rx > 2*body || tx == 0 {
		t.Errorf("a %d-byte download moved rx %d, tx %d bytes", body, rx, tx)
	}
	// The CLI's --json stats are the same type.
	c := exec.Command(smolvmBinary(t), "--json", "sandbox", "stats", "shared")
	c.Env = append(os.Environ(), "SMOLVM_DATA_DIR="+filepath.Join(testRoot, "shared"),
		"SMOLVM_RUN_DIR="+filepath.Join(testRoot, "run"), "SMOLVM_IMAGE_DIR="+testImageDir)
	out, err := c.Output()
	if err != nil {
		t.Fatalf("cli: %v\n%s", err, out)
	}
	var env struct {
		OK   bool          `json:"ok"`
		Data *smolvm.Stats `json:"data"`
	}
	if err := json.Unmarshal(out, &env); err != nil || !env.OK || env.Data == nil {
		t.Fatalf("cli output %s: %v", out, err)
	}
	if d := env.Data; d.ID != "shared" || d.Status != smolvm.StatusRunning || d.CPU.Seconds < st.CPU.Seconds || d.Memory.RSSBytes <= 0 {
		t.Errorf("cli stats %+v, sdk %+v", d, st)
	}
}

// vmRSS reads VmRSS of pid from /proc/PID/status, in bytes.
func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "VmRSS:" {
			kib, _ := strconv.ParseInt(f[1], 10, 64)
			return kib << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

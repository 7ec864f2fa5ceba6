package qemu

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agentclient"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// BenchmarkGuestDownload measures how fast a guest fetches 64 MiB from an
// HTTP server on the host's 127.0.0.1 (through 10.0.2.2, allowed
// explicitly) with busybox wget, over QEMU's built-in slirp (the network
// before the sidecar) and over the smolvm-net sidecar, alternating, in the
// same run (ns/op covers one download of each):
//
//	go test -run XXX -bench GuestDownload -benchtime 3x ./internal/backend/qemu
func BenchmarkGuestDownload(b *testing.B) {
	testutil.RequireQEMU(b)
	const size = 64 << 20
	blob := bytes.Repeat([]byte("smolvm-net-bench"), size/16)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(blob)))
		w.Write(blob)
	})}
	go srv.Serve(ln)
	defer srv.Close()
	url := fmt.Sprintf("http://10.0.2.2:%d/blob", ln.Addr().(*net.TCPAddr).Port)
	img := testutil.Image(b, "busybox")
	// Both VMs up at once; the downloads alternate so that the load of
	// other work on the machine hits both alike.
	type vm struct {
		name string
		m    backend.Machine
		c    *agentclient.Client
		took []time.Duration
	}
	var vms []*vm
	for _, mode := range []string{"slirp", "sidecar"} {
		be := New(Options{Logger: testLogger()})
		be.slirp = mode == "slirp"
		spec := testutil.Spec(b, img, "bench-"+mode, testutil.SpecOptions{Network: true})
		spec.NetPolicy = netpolicy.Policy{AllowCIDRs: []string{"127.0.0.1/32"}}
		m := testutil.Boot(b, be, spec)
		c := testutil.Agent(b, be, m)
		testutil.Run(b, c, "wget -q -O /dev/null "+url) // warm up
		vms = append(vms, &vm{name: mode, m: m, c: c})
	}
	load0, cpu0 := loadavg(), cpuTicks(vms[1].m.NetPID)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, v := range vms {
			t0 := time.Now()
			out := testutil.Run(b, v.c, "wget -q -O - "+url+" | wc -c")
			v.took = append(v.took, time.Since(t0))
			if strings.TrimSpace(out) != fmt.Sprint(size) {
				b.Fatalf("%s: guest got %q bytes", v.name, out)
			}
		}
	}
	b.StopTimer()
	for _, v := range vms {
		slices.Sort(v.took)
		med := v.took[len(v.took)/2]
		b.ReportMetric(float64(size)/1e6/med.Seconds(), v.name+"-MB/s")
		b.Logf("%s: median %v min %v max %v", v.name, med, v.took[0], v.took[len(v.took)-1])
	}
	b.Logf("load average before %s, after %s; sidecar %s, CPU %.2f s per 64 MiB download",
		load0, loadavg(), rss(vms[1].m.NetPID), float64(cpuTicks(vms[1].m.NetPID)-cpu0)/100/float64(b.N))
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// rss returns a process's resident and peak memory ("" for pid 0).
func rss(pid int) string {
	if pid <= 0 {
		return "none"
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "VmHWM:") {
			out = append(out, strings.Join(strings.Fields(l), " "))
		}
	}
	return strings.Join(out, ", ")
}

// BenchmarkSidecarStart measures starting the network sidecar until it is
// ready (what a VM start adds), and its exit once the stream closes.
func BenchmarkSidecarStart(b *testing.B) {
	if err := testutil.EnsureNetHelper(context.Background()); err != nil {
		b.Fatal(err)
	}
	be := New(Options{Logger: testLogger()})
	dir := testutil.ShortDir(b)
	spec := backend.Spec{ID: "bench", Dir: dir, RunDir: dir}
	for i := 0; i < b.N; i++ {
		sc, err := be.startNet(context.Background(), spec, true)
		if err == nil {
			err = sc.wait(context.Background())
		}
		if err != nil {
			b.Fatal(err)
		}
		sc.qemuEnd.Close()
		waitNetGone(sc.pid)
	}
}

// cpuTicks is a process's user+system time in clock ticks (USER_HZ 100).
func cpuTicks(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 {
		f := strings.Fields(s[i+1:])
		if len(f) > 13 {
			u, _ := strconv.Atoi(f[11])
			k, _ := strconv.Atoi(f[12])
			return u + k
		}
	}
	return 0
}

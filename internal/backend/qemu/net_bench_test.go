package qemu

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/netpolicy"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

// BenchmarkGuestDownload measures how fast a guest fetches 64 MiB from an
// HTTP server on the host's 127.0.0.1 (through 10.0.2.2, allowed
// explicitly) with busybox wget, over QEMU's built-in slirp (the network
// before the sidecar) and over the smolvm-net sidecar, in the same run:
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
	for _, mode := range []string{"slirp", "sidecar"} {
		b.Run(mode, func(b *testing.B) {
			be := New(Options{Logger: testLogger()})
			be.slirp = mode == "slirp"
			spec := testutil.Spec(b, img, "bench-"+mode, testutil.SpecOptions{Network: true})
			spec.NetPolicy = netpolicy.Policy{AllowCIDRs: []string{"127.0.0.1/32"}}
			m := testutil.Boot(b, be, spec)
			c := testutil.Agent(b, be, m)
			testutil.Run(b, c, "wget -q -O /dev/null "+url) // warm up
			load0 := loadavg()
			b.SetBytes(size)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				out := testutil.Run(b, c, "wget -q -O - "+url+" | wc -c")
				if strings.TrimSpace(out) != fmt.Sprint(size) {
					b.Fatalf("guest got %q bytes", out)
				}
			}
			b.StopTimer()
			b.Logf("%s: load average before %s, after %s; sidecar %s", mode, load0, loadavg(), rss(m.NetPID))
		})
	}
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

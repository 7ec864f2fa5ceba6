package bench

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/agent"
)

func TestNewRowRatioAndGoal(t *testing.T) {
	r := newRow("k", "n", "ms", newFigure("o", "ms", []float64{110, 100, 120}), newFigure("b", "ms", []float64{100, 90, 110}), 1.15, "")
	if r.Ratio != 1.1 || !r.Met {
		t.Fatalf("ratio %v met %v, want 1.1 true", r.Ratio, r.Met)
	}
	r = newRow("k", "n", "ms", newFigure("o", "ms", []float64{300}), newFigure("b", "ms", []float64{100}), 2, "")
	if r.Met {
		t.Fatal("3x met a 2x goal")
	}
	r = newRow("k", "n", "ms", newFigure("o", "ms", nil), newFigure("b", "ms", nil), 2, "")
	if r.Ratio != 0 || r.Met {
		t.Fatalf("no samples: ratio %v met %v", r.Ratio, r.Met)
	}
}

func TestAlternateFlipsOrder(t *testing.T) {
	var got []string
	for i := 0; i < 3; i++ {
		alternate(i, func() error { got = append(got, "a"); return nil }, func() error { got = append(got, "b"); return nil })
	}
	if s := strings.Join(got, ""); s != "abbaab" {
		t.Fatalf("order %s, want abbaab", s)
	}
}

func TestChartIsWellFormedSVG(t *testing.T) {
	rep := SuiteReport{
		Host:   Host{Accel: "tcg", CPU: `AMD "EPYC" <x> & co`, Cores: 2, QEMU: "QEMU 10", Image: "busybox", Date: "2026-11-28"},
		Rounds: 5, CloneRounds: 5,
		Rows: []Row{
			newRow("restore", "restore -> first command", "ms", newFigure("ours", "ms", []float64{80, 90, 100}), newFigure("bare", "ms", []float64{70, 75, 90}), 1.15, "a note"),
			newRow("size", "size", "MiB", newFigure("ours", "MiB", []float64{30}), newFigure("touched", "MiB", []float64{40}), 1.1, strings.Repeat("long note ", 40)),
			{Key: "failed", Name: "not measured", Unit: "ms", Goal: 2, Error: "boom <here>"},
		},
	}
	var buf bytes.Buffer
	if err := WriteChart(&buf, rep); err != nil {
		t.Fatal(err)
	}
	d := xml.NewDecoder(&buf)
	texts := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "text" {
			texts++
		}
	}
	if texts < 10 {
		t.Fatalf("only %d text elements", texts)
	}
}

func TestChartMarksGoal(t *testing.T) {
	rep := SuiteReport{Host: Host{Accel: "tcg"}, Rows: []Row{
		newRow("a", "met row", "ms", newFigure("o", "ms", []float64{100}), newFigure("b", "ms", []float64{100}), 1.15, ""),
		newRow("b", "missed row", "ms", newFigure("o", "ms", []float64{300}), newFigure("b", "ms", []float64{100}), 2, ""),
	}}
	var buf bytes.Buffer
	WriteChart(&buf, rep)
	s := buf.String()
	for _, want := range []string{"1.00×  goal ≤ 1.15×  met", "3.00×  goal ≤ 2.00×  missed", "TCG", "stroke-dasharray"} {
		if !strings.Contains(s, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
}

func TestWrap(t *testing.T) {
	lines := wrap("aa bb cc dd", 5)
	if strings.Join(lines, "|") != "aa bb|cc dd" {
		t.Fatalf("wrap: %q", lines)
	}
}

func TestProcCPUms(t *testing.T) {
	// Burn a little CPU so the figure is positive at 10 ms resolution.
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	ms, err := procCPUms(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if ms <= 0 || ms > 3_600_000 {
		t.Fatalf("procCPUms(self) = %v ms, want a positive figure", ms)
	}
	if _, err := procCPUms(-1); err == nil {
		t.Fatal("procCPUms(-1) succeeded")
	}
}

func TestDiskFloorAndJIT(t *testing.T) {
	dir := t.TempDir()
	for _, sync := range []bool{true, false} {
		d, err := diskFloor(dir, 3<<20, sync)
		if err != nil || d <= 0 {
			t.Fatalf("diskFloor(sync %v) = %v, %v", sync, d, err)
		}
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("diskFloor left %d files", len(left))
	}
	// A Go test binary has no writable+executable mappings.
	if mib, err := jitMiB(os.Getpid()); err != nil || mib != 0 {
		t.Errorf("jitMiB(self) = %v, %v", mib, err)
	}
}

// The raw channel of the round-trip baseline speaks the protocol the real
// agent server serves: hello (agentproto's version), exec, ping.
func TestRawConnAgainstAgentServer(t *testing.T) {
	rc := rawConnToAgentServer(t, func(c net.Conn) net.Conn { return c })
	defer rc.Close()
	for i := range 3 {
		if d, err := rc.exec(i); err != nil || d <= 0 {
			t.Fatalf("exec %d: %v, %v", i, d, err)
		}
		if d, err := rc.ping(i); err != nil || d <= 0 {
			t.Fatalf("ping %d: %v, %v", i, d, err)
		}
	}
}

func TestRotateStartsEachRoundElsewhere(t *testing.T) {
	var got []string
	for i := 0; i < 3; i++ {
		f := func(s string) func() error { return func() error { got = append(got, s); return nil } }
		rotate(i, f("a"), f("b"), f("c"))
	}
	if s := strings.Join(got, ""); s != "abcbcacab" {
		t.Fatalf("order %s, want abcbcacab", s)
	}
	boom := errors.New("boom")
	ran := 0
	err := rotate(0, func() error { ran++; return boom }, func() error { ran++; return nil })
	if !errors.Is(err, boom) || ran != 1 {
		t.Fatalf("rotate after a failure: %v, %d ran", err, ran)
	}
}

func TestInfoAndSkippedRows(t *testing.T) {
	r := newInfoRow("k", "n", "ms", newFigure("o", "ms", []float64{30}), newFigure("b", "ms", []float64{100}), "")
	if r.Ratio != 0.3 || r.Met || !r.Info || r.Goal != 0 || r.Verdict() != "info" {
		t.Fatalf("info row: ratio %v met %v info %v goal %v verdict %q", r.Ratio, r.Met, r.Info, r.Goal, r.Verdict())
	}
	sk := skippedRow("pool-restore", "n", "ms", 0.25, "no warm pool in this build")
	if sk.Verdict() != "not measured: no warm pool in this build" || sk.Met || sk.Ratio != 0 || sk.Goal != 0.25 {
		t.Fatalf("skipped row: %+v, verdict %q", sk, sk.Verdict())
	}
	met := newRow("k", "n", "ms", newFigure("o", "ms", []float64{100}), newFigure("b", "ms", []float64{100}), 1.2, "")
	missed := newRow("k", "n", "ms", newFigure("o", "ms", []float64{300}), newFigure("b", "ms", []float64{100}), 1.2, "")
	if met.Verdict() != "yes" || missed.Verdict() != "no" {
		t.Fatalf("verdicts %q %q", met.Verdict(), missed.Verdict())
	}
	// The template rows' goals: 1.2x a restore, 0.1x a cold boot.
	tmpl := newFigure("t", "ms", []float64{260, 250, 270})
	if r := newRow("template-restore", "n", "ms", tmpl, newFigure("r", "ms", []float64{240}), 1.2, ""); !r.Met {
		t.Errorf("260 ms against a 240 ms restore: ratio %.3f not met", r.Ratio)
	}
	if r := newRow("template-cold", "n", "ms", tmpl, newFigure("c", "ms", []float64{2000}), 0.1, ""); r.Met {
		t.Errorf("260 ms against a 2000 ms boot (0.13x) met a 0.1x goal")
	}
}

func TestFloors(t *testing.T) {
	// 10 restores of 640 ms CPU on 2 cores: 3200 ms; never below one restore.
	if got := cpuFloor(620, 640, 10, 2); got != 3200 {
		t.Errorf("cpuFloor = %v, want 3200", got)
	}
	if got := cpuFloor(620, 50, 10, 2); got != 620 {
		t.Errorf("cpuFloor = %v, want one restore's 620", got)
	}
	if got := cpuFloor(100, 100, 4, 0); got != 400 {
		t.Errorf("cpuFloor with 0 cores = %v, want 400 (one core)", got)
	}
	// One VM of 90 MiB and 9 more TCG caches of 16 MiB.
	if got := memoryFloor(90, 16, 10); got != 234 {
		t.Errorf("memoryFloor = %v, want 234", got)
	}
	if got := memoryFloor(90, 16, 1); got != 90 {
		t.Errorf("memoryFloor of one clone = %v, want 90", got)
	}
}

func TestChartShowsInfoAndSkippedRows(t *testing.T) {
	rep := SuiteReport{Host: Host{Accel: "tcg"}, Rows: []Row{
		newInfoRow("i", "info row", "ms", newFigure("o", "ms", []float64{50}), newFigure("b", "ms", []float64{100}), ""),
		skippedRow("pool-restore", "pool row", "ms", 0.25, "no warm pool in this build"),
	}}
	var buf bytes.Buffer
	if err := WriteChart(&buf, rep); err != nil {
		t.Fatal(err)
	}
	s := buf.String()
	for _, want := range []string{"0.50×  information, no goal", "not measured: no warm pool in this build"} {
		if !strings.Contains(s, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
	if n := strings.Count(s, "stroke-dasharray"); n != 1 { // the legend's only
		t.Errorf("%d dashed goal marks, want only the legend's: an information or skipped row has a goal mark", n)
	}
}

// rawConnToAgentServer serves the real agent protocol on one end of a
// pipe (wrapped by wrap) and returns a raw connection on the other.
func rawConnToAgentServer(t *testing.T, wrap func(net.Conn) net.Conn) *rawConn {
	t.Helper()
	srv := agent.NewServer(agent.Options{EnvFile: filepath.Join(t.TempDir(), "env"), ProfileFile: filepath.Join(t.TempDir(), "profile"),
		Logf: t.Logf})
	guest, host := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go srv.ServeConn(ctx, wrap(guest))
	rc, err := newRawConn(host)
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// gatedConn holds every read while paused is set: a VM that QEMU stopped
// answers nothing until it runs again.
type gatedConn struct {
	net.Conn
	gate chan struct{} // closed while running
	mu   sync.Mutex
}

func (g *gatedConn) Read(p []byte) (int, error) {
	g.mu.Lock()
	gate := g.gate
	g.mu.Unlock()
	<-gate
	return g.Conn.Read(p)
}

func (g *gatedConn) pause(d time.Duration) {
	g.mu.Lock()
	g.gate = make(chan struct{})
	gate := g.gate
	g.mu.Unlock()
	time.AfterFunc(d, func() { close(gate) })
}

// The downtime probe sees a pause of the agent's channel as its longest
// round trip, to within an interval.
func TestPauseProbeMeasuresAPause(t *testing.T) {
	open := make(chan struct{})
	close(open)
	var gc *gatedConn
	rc := rawConnToAgentServer(t, func(c net.Conn) net.Conn { gc = &gatedConn{Conn: c, gate: open}; return gc })
	const pause, interval = 150 * time.Millisecond, 2 * time.Millisecond
	p := newPauseProbe(rc, interval)
	time.Sleep(30 * time.Millisecond)
	gc.pause(pause)
	time.Sleep(pause + 50*time.Millisecond)
	down, n, err := p.finish()
	if err != nil {
		t.Fatal(err)
	}
	if n < 5 || down < pause-5*interval || down > pause+time.Second {
		t.Fatalf("probe: longest round trip %v over %d pings, want about %v", down, n, pause)
	}
}

// TestInfoRowWithoutBaseline: an information figure with nothing to compare
// it with (the pool's idle cost) is "info", not "not measured".
func TestInfoRowWithoutBaseline(t *testing.T) {
	r := newInfoRow("pool-idle", "n", "MiB", newFigure("pss", "MiB", []float64{135}), Figure{}, "")
	if v := r.Verdict(); v != "info" {
		t.Errorf("verdict %q, want info", v)
	}
	if v := newInfoRow("x", "n", "MiB", Figure{}, Figure{}, "").Verdict(); v != "not measured" {
		t.Errorf("empty info row: verdict %q", v)
	}
}

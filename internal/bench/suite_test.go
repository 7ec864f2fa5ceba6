package bench

import (
	"bytes"
	"context"
	"encoding/xml"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
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
	d, err := diskFloor(dir, 3<<20)
	if err != nil || d <= 0 {
		t.Fatalf("diskFloor = %v, %v", d, err)
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
	srv := agent.NewServer(agent.Options{EnvFile: filepath.Join(t.TempDir(), "env"), ProfileFile: filepath.Join(t.TempDir(), "profile"),
		Logf: t.Logf})
	guest, host := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.ServeConn(ctx, guest)
	rc, err := newRawConn(host)
	if err != nil {
		t.Fatal(err)
	}
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

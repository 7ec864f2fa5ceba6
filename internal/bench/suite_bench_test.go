package bench

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/testutil"
)

var (
	suiteRounds  = flag.Int("suite.rounds", 5, "BenchmarkSuite: rounds per row (ours and the baseline alternate)")
	suiteVerbose = flag.Bool("suite.progress", false, "BenchmarkSuite: print each round")
)

// BenchmarkSuite is `smolvm bench suite` under go test: one sub-benchmark
// per group, each running its pairs once with -suite.rounds rounds (so run
// it with -benchtime=1x). For every row it reports the medians and the
// ratio as metrics (ours-<unit>, base-<unit>, ratio, goal-ratio), and logs
// whether the goal was met. It boots real VMs: run it on its own, e.g.
//
//	go test ./internal/bench -run '^$' -bench Suite -benchtime=1x -timeout 30m
//	go test ./internal/bench -run '^$' -bench Suite/create -benchtime=1x -suite.rounds 3
func BenchmarkSuite(b *testing.B) {
	testutil.RequireQEMU(b)
	ctx := context.Background()
	if _, err := testutil.EnsureImages(ctx, "busybox"); err != nil {
		b.Fatal(err)
	}
	for _, group := range SuiteGroups {
		b.Run(group, func(b *testing.B) {
			dir := b.TempDir()
			m, err := smolvm.NewManager(ctx, smolvm.Options{DataDir: dir, ImageDir: testutil.ImageDir(),
				RunDir: testutil.ShortDir(b), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			var progress io.Writer = io.Discard
			if *suiteVerbose {
				progress = os.Stderr
			}
			var rep SuiteReport
			for i := 0; i < b.N; i++ { // -benchtime=1x: once
				rep, err = Suite(ctx, SuiteOptions{Options: Options{Manager: m, Rounds: *suiteRounds, Progress: progress},
					Only: []string{group}})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			for _, r := range rep.Rows {
				unit := strings.ReplaceAll(r.Unit, "/", "-")
				b.ReportMetric(r.Ours.Median, r.Key+"-ours-"+unit)
				b.ReportMetric(r.Baseline.Median, r.Key+"-base-"+unit)
				b.ReportMetric(r.Ratio, r.Key+"-ratio")
				b.Logf("%s: ours %.1f %s, baseline %.1f %s, ratio %.2fx, goal <= %.2fx, met %v (TCG: %v)",
					r.Name, r.Ours.Median, r.Unit, r.Baseline.Median, r.Unit, r.Ratio, r.Goal, r.Met, rep.Host.Accel == "tcg")
			}
			for _, f := range rep.Extras {
				b.Logf("informational: %s: median %.1f %s", f.Name, f.Median, f.Unit)
			}
		})
	}
}

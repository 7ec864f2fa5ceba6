package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/bench"
)

// benchSuiteCmd is `smolvm bench suite`: every figure of the benchmark
// suite against its baseline, medians, ratios and goals.
func (a *app) benchSuiteCmd() *cobra.Command {
	var (
		o         bench.SuiteOptions
		jsonFile  string
		chartFile string
		replay    string
		only      []string
	)
	c := &cobra.Command{
		Use:   "suite",
		Short: "The benchmark suite: restore, RAM size, snapshot create and size, clones, cold boot, templates, each against its baseline or floor",
		Long: `Runs every pair in one run, ours and the baseline alternating (the order changes every round),
and prints medians, ratios and goals:

  restore -> first command (full snapshot)   vs bare QEMU restoring the same state   goal <= 1.15x
  restore -> first command, 2 GiB vs 256 MiB  vs itself                               goal <= 1.2x
  full snapshot create, 200 MiB touched      vs the disk floor (write + fsync)       goal <= 1.1x
  snapshot size                              vs guest memory in use                  goal <= 1.1x
  source downtime of Snapshot(ResumeSource)  vs the whole call                       information
  10 clones -> all answer a command          vs the CPU floor                        goal <= 1.15x
  host memory (PSS) of 10 idle clones        vs one VM + 9 TCG caches (floor)        goal <= 1.2x
  cold boot -> first command                 vs bare QEMU, plain command line        goal <= 1.1x
  init_on_free=1 share of a bare boot        vs bare QEMU without it                 information
  create (template) -> first command         vs restore -> first command             goal <= 1.2x
  create (template) -> first command         vs a cold boot                          goal <= 0.1x
  create from the warm pool -> first command vs restore -> first command             goal <= 0.25x

The peers' mechanisms (QMP snapshot-save, one restore, one restored VM's PSS) stay as information rows.

--json FILE (this command's own flag) writes the report with every sample; --chart FILE.svg draws it.
Every VM and snapshot the suite creates is deleted again. Exit status 1 when a figure could
not be measured; goals that are missed are reported, not failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, g := range only {
				if !slices.Contains(bench.SuiteGroups, g) {
					return &smolvm.Error{Message: fmt.Sprintf("unknown group %q: use %s", g, strings.Join(bench.SuiteGroups, ", ")),
						Fix: usageFix("smolvm bench suite --help"), Err: smolvm.ErrInvalidConfig}
				}
			}
			o.Only = only
			if replay != "" {
				data, err := os.ReadFile(replay)
				if err != nil {
					return err
				}
				var rep bench.SuiteReport
				if err := json.Unmarshal(data, &rep); err != nil {
					return fmt.Errorf("%s: %w", replay, err)
				}
				if chartFile != "" {
					if err := writeChart(chartFile, rep); err != nil {
						return err
					}
				}
				a.print(rep, func(w io.Writer) { printSuite(w, rep) })
				return nil
			}
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				o.Manager, o.Progress = m, a.stderr
				rep, runErr := bench.Suite(ctx, o)
				if jsonFile != "" {
					data, _ := json.MarshalIndent(rep, "", "  ")
					if err := os.WriteFile(jsonFile, append(data, '\n'), 0o644); err != nil {
						return err
					}
				}
				if chartFile != "" {
					if err := writeChart(chartFile, rep); err != nil {
						return err
					}
				}
				a.print(rep, func(w io.Writer) { printSuite(w, rep) })
				return runErr
			})
		},
	}
	f := c.Flags()
	f.StringVar(&o.Image, "image", "busybox", "guest image")
	f.IntVar(&o.Rounds, "rounds", 5, "rounds per pair (medians are reported)")
	f.IntVar(&o.MemoryMiB, "memory", 512, "guest memory in MiB (restore, snapshot create, clone and boot rows)")
	f.IntVar(&o.Clones, "clones", 10, "clones per fork")
	f.IntVar(&o.CloneRounds, "clone-rounds", 0, "rounds of the clone rows (default: --rounds)")
	f.IntVar(&o.SmallMiB, "small-memory", 256, "restore-vs-RAM-size row: the small guest (MiB)")
	f.IntVar(&o.BigMiB, "big-memory", 2048, "restore-vs-RAM-size row: the big guest (MiB)")
	f.IntVar(&o.TouchMiB, "touch", 200, "MiB of random data the guest writes to tmpfs before the snapshot-create row")
	f.StringSliceVar(&only, "only", nil, "run only these groups: "+strings.Join(bench.SuiteGroups, ","))
	f.StringVar(&jsonFile, "json", "", "write the report with every raw sample as JSON to this file")
	f.StringVar(&chartFile, "chart", "", "draw the report as an SVG chart into this file")
	f.StringVar(&replay, "replay", "", "run nothing: print (and --chart) a report saved with --json")
	return c
}

func writeChart(path string, rep bench.SuiteReport) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := bench.WriteChart(f, rep); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func printSuite(w io.Writer, rep bench.SuiteReport) {
	h := rep.Host
	fmt.Fprintf(w, "host: %s, %d cores; %s; accel %s; guest kernel %s; image %s; %s\n", h.CPU, h.Cores, h.QEMU, h.Accel, h.Kernel, h.Image, h.Date)
	if h.Accel == "tcg" {
		fmt.Fprintln(w, "NOTE: figures under TCG (software emulation), not hardware virtualization")
	}
	fmt.Fprintf(w, "rounds %d (clone rows %d); load average %.2f %.2f %.2f at start, %.2f %.2f %.2f at end; %.0f s\n",
		rep.Rounds, rep.CloneRounds, rep.LoadStart[0], rep.LoadStart[1], rep.LoadStart[2], rep.LoadEnd[0], rep.LoadEnd[1], rep.LoadEnd[2], rep.Seconds)
	rows := [][]string{}
	for _, r := range rep.Rows {
		ratio, goal := "-", fmt.Sprintf("<= %.2fx", r.Goal)
		if r.Ratio > 0 {
			ratio = fmt.Sprintf("%.2fx", r.Ratio)
		}
		if r.Info {
			goal = "-"
		}
		ours, base := fmt.Sprintf("%.1f %s", r.Ours.Median, r.Unit), fmt.Sprintf("%.1f %s", r.Baseline.Median, r.Unit)
		if r.Skipped != "" {
			ours, base = "-", "-"
		}
		rows = append(rows, []string{r.Name, ours, base, ratio, goal, r.Verdict(), fmt.Sprint(len(r.Ours.Samples))})
	}
	table(w, []string{"FIGURE (median)", "OURS", "BASELINE", "RATIO", "GOAL", "MET", "N"}, rows)
	for _, r := range rep.Rows {
		if r.Skipped != "" {
			fmt.Fprintf(w, "  %s: not measured: %s\n", r.Key, r.Skipped)
			continue
		}
		fmt.Fprintf(w, "  %s: ours = %s; baseline = %s\n", r.Key, r.Ours.Name, r.Baseline.Name)
		if r.Note != "" {
			fmt.Fprintf(w, "    %s\n", r.Note)
		}
		if r.Error != "" {
			fmt.Fprintf(w, "    error: %s\n", r.Error)
		}
	}
	if len(rep.Extras) > 0 {
		fmt.Fprintln(w, "informational:")
		for _, f := range rep.Extras {
			fmt.Fprintf(w, "  %s: median %.1f %s (n=%d)\n", f.Name, f.Median, f.Unit, len(f.Samples))
		}
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
}

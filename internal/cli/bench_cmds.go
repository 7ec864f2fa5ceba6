package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/bench"
)

type benchFlags struct {
	image    string
	rounds   int
	memory   int
	jsonFile string
	touchMiB int
}

func (f *benchFlags) register(c *cobra.Command) {
	c.Flags().StringVar(&f.image, "image", "busybox", "guest image")
	c.Flags().IntVar(&f.rounds, "rounds", 5, "rounds (medians are reported)")
	c.Flags().IntVar(&f.memory, "memory", 512, "guest memory in MiB")
	c.Flags().StringVar(&f.jsonFile, "out", "", "also write the raw figures as JSON to this file")
}

func (a *app) runBench(cmd *cobra.Command, f *benchFlags, fn func(ctx context.Context, o bench.Options) (bench.Report, error)) error {
	return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
		var progress io.Writer = a.stderr
		o := bench.Options{Manager: m, Image: f.image, Rounds: f.rounds, MemoryMiB: f.memory, Progress: progress}
		rep, err := fn(ctx, o)
		if err != nil {
			return err
		}
		if f.jsonFile != "" {
			data, _ := json.MarshalIndent(rep, "", "  ")
			if err := os.WriteFile(f.jsonFile, data, 0o644); err != nil {
				return err
			}
		}
		a.print(rep, func(w io.Writer) { printReport(w, rep) })
		return nil
	})
}

func printReport(w io.Writer, rep bench.Report) {
	h := rep.Host
	fmt.Fprintf(w, "host: %s, %d cores; %s; accel %s; guest kernel %s; image %s\n", h.CPU, h.Cores, h.QEMU, h.Accel, h.Kernel, h.Image)
	if h.Accel == "tcg" {
		fmt.Fprintln(w, "NOTE: figures under TCG (software emulation), not hardware virtualization")
	}
	rows := [][]string{}
	for _, r := range rep.Ratios {
		goal := ""
		if r.Goal > 0 {
			goal = fmt.Sprintf("<= %.2fx", r.Goal)
		}
		rows = append(rows, []string{r.Name, fmt.Sprintf("%.2f", r.Ours.Median), fmt.Sprintf("%.2f", r.Baseline.Median), fmt.Sprintf("%.2fx", r.Ratio), goal})
	}
	if len(rows) > 0 {
		table(w, []string{"FIGURE (median)", "OURS", "BASELINE", "RATIO", "GOAL"}, rows)
		for _, r := range rep.Ratios {
			fmt.Fprintf(w, "  %s: ours = %s; baseline = %s (n=%d)\n", r.Name, r.Ours.Name, r.Baseline.Name, len(r.Ours.Samples))
		}
	}
	rows = nil
	for _, f := range rep.Figures {
		rows = append(rows, []string{f.Name, fmt.Sprintf("%.2f %s", f.Median, f.Unit), fmt.Sprint(len(f.Samples))})
	}
	if len(rows) > 0 {
		table(w, []string{"FIGURE", "MEDIAN", "N"}, rows)
	}
}

func (a *app) benchBootCmd() *cobra.Command {
	var f benchFlags
	c := &cobra.Command{
		Use:   "boot",
		Short: "Cold boot to first command vs bare QEMU; command round trip vs a raw request; idle VM memory and CPU; file transfer rates",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.runBench(cmd, &f, bench.Boot)
		},
	}
	f.register(c)
	return c
}

func (a *app) benchSnapshotCmd() *cobra.Command {
	var f benchFlags
	c := &cobra.Command{
		Use:   "snapshot",
		Short: "Per snapshot type: create time, size on disk, restore to first command",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.runBench(cmd, &f, func(ctx context.Context, o bench.Options) (bench.Report, error) {
				return bench.Snapshots(ctx, o, f.touchMiB)
			})
		},
	}
	f.register(c)
	c.Flags().IntVar(&f.touchMiB, "touch", 64, "MiB of random data the guest writes to tmpfs before the snapshot")
	return c
}

func (a *app) benchAPICmd() *cobra.Command {
	var f benchFlags
	var clients, execs, sandboxes int
	c := &cobra.Command{
		Use:   "api",
		Short: "The HTTP API daemon: exec round trip through the API vs the SDK's Run; concurrent clients' errors and p50/p99",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.runBench(cmd, &f, func(ctx context.Context, o bench.Options) (bench.Report, error) {
				return bench.API(ctx, o, clients, execs, sandboxes)
			})
		},
	}
	f.register(c)
	c.Flags().IntVar(&clients, "clients", 50, "concurrent clients in the load")
	c.Flags().IntVar(&execs, "execs", 20, "execs per client in the load")
	c.Flags().IntVar(&sandboxes, "sandboxes", 4, "sandboxes the load is spread over")
	return c
}

func (a *app) benchRemoteCmd() *cobra.Command {
	var f benchFlags
	var remoteName string
	var snapshots int
	c := &cobra.Command{
		Use:   "remote",
		Short: "The remote snapshot store: push and pull throughput, and the store bytes of snapshots of one template (dedup)",
		Long: `Runs against a remote added with 'smolvm remote add' (credentials from the usual AWS
environment variables or file), under a fresh prefix of it, with two private data dirs
of its own (host A pushes, host B pulls). The chunks it pushed stay in the store under
that prefix (printed at the end).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.runBench(cmd, &f, func(ctx context.Context, o bench.Options) (bench.Report, error) {
				return bench.Remote(ctx, o, remoteName, snapshots)
			})
		},
	}
	f.register(c)
	c.Flags().StringVar(&remoteName, "remote", "", "remote to measure (default: the default remote)")
	c.Flags().IntVar(&snapshots, "snapshots", 10, "snapshots of one template to push for the dedup figure")
	return c
}

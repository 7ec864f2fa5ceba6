package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

// statsCmd is `sandbox stats NAME`: what the sandbox uses on the host.
func (a *app) statsCmd() *cobra.Command {
	return &cobra.Command{
		Use: "stats NAME", Short: "Show a sandbox's CPU, memory, disk and network use", Args: cobra.ExactArgs(1),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				st, err := vm.Stats(ctx)
				if err != nil {
					return err
				}
				a.print(st, func(w io.Writer) { statsTable(w, st) })
				return nil
			})
		},
	}
}

func statsTable(w io.Writer, st smolvm.Stats) {
	rows := [][]string{{"id", st.ID}, {"status", string(st.Status)},
		{"uptime", fmt.Sprintf("%.0f s", st.UptimeSeconds)},
		{"cpu", fmt.Sprintf("%.2f s (vmm %.2f s, sidecars %.2f s), %.1f%% over %.1f s",
			st.CPU.Seconds, st.CPU.VMMSeconds, st.CPU.SidecarSeconds, st.CPU.Percent, st.CPU.WindowSeconds)},
		{"memory", fmt.Sprintf("rss %s, pss %s (vmm %s), guest %s", humanBytes(st.Memory.RSSBytes),
			humanBytes(st.Memory.PSSBytes), humanBytes(st.Memory.VMMPSSBytes), humanBytes(st.Memory.GuestBytes))},
		{"disk", fmt.Sprintf("%s in %d files", humanBytes(st.Disk.AllocatedBytes), st.Disk.Files)}}
	if n := st.Network; n != nil {
		rows = append(rows, []string{"network", fmt.Sprintf("%d allowed, %d refused, %d DNS names refused; sent %s, received %s",
			n.Allowed, n.Refused, n.DNSRefused, humanBytes(int64(n.TxBytes)), humanBytes(int64(n.RxBytes)))})
	}
	table(w, []string{"FIELD", "VALUE"}, rows)
}

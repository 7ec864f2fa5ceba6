package cli

import "github.com/spf13/cobra"

func (a *app) benchCmd() *cobra.Command {
	c := &cobra.Command{Use: "bench", Short: "Measure boot, command round trip, snapshots and restores on this host"}
	c.AddCommand(a.benchBootCmd(), a.benchSnapshotCmd(), a.benchSuiteCmd(), a.benchAPICmd(), a.benchRemoteCmd())
	return c
}

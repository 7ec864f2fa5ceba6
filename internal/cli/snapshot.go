package cli

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

func (a *app) snapshotCmd() *cobra.Command {
	c := &cobra.Command{Use: "snapshot", Aliases: []string{"snap"}, Short: "Save sandboxes and bring them back"}
	c.AddCommand(a.snapshotCreateCmd(), a.snapshotRestoreCmd(), a.snapshotListCmd(), a.snapshotDeleteCmd(), a.snapshotInspectCmd(), a.snapshotExportCmd(), a.snapshotImportCmd(), a.snapshotPushCmd(), a.snapshotPullCmd())
	return c
}

// snapshotCreateCmd is `snapshot create NAME`.
func (a *app) snapshotCreateCmd() *cobra.Command {
	var sid, stype string
	var resumeSource bool
	create := &cobra.Command{
		Use:               "create NAME",
		Short:             "Snapshot a running or paused sandbox (it stays paused unless --resume-source)",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeVMs,
		RunE: func(cmd *cobra.Command, args []string) error {
			t, err := smolvm.ParseSnapshotType(stype)
			if err != nil {
				return err
			}
			return a.withVM(cmd, args[0], func(ctx context.Context, vm *smolvm.VM) error {
				start := time.Now()
				info, err := vm.Snapshot(ctx, smolvm.SnapshotOptions{ID: sid, Type: t, ResumeSource: resumeSource})
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) {
					fmt.Fprintf(w, "snapshot %s (%s, %s) of %s in %.2fs\n", info.ID, info.Type, humanBytes(info.SizeBytes), info.VMID, time.Since(start).Seconds())
				})
				return nil
			})
		},
	}
	create.Flags().StringVar(&sid, "snapshot-id", "", "snapshot id (default snap-<vm>-<unix seconds>)")
	create.Flags().StringVar(&stype, "snapshot-type", "full", "full, diff or disk")
	create.Flags().BoolVar(&resumeSource, "resume-source", false, "resume the sandbox after the snapshot")
	return create
}

// snapshotRestoreCmd is `snapshot restore ID` (with --clones: a fork).
func (a *app) snapshotRestoreCmd() *cobra.Command {
	var resume, force bool
	var clones int
	restore := &cobra.Command{
		Use:               "restore ID",
		Short:             "Recreate a snapshot's sandbox with the saved state (paused unless --resume)",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeSnapshots,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.Flags().Changed("clones") {
				return a.fork(cmd, args[0], clones, resume)
			}
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				start := time.Now()
				vm, err := m.FromSnapshot(ctx, args[0], smolvm.RestoreOptions{Resume: resume, Force: force})
				if err != nil {
					return err
				}
				defer vm.Close()
				info, err := vm.Info(ctx)
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) {
					fmt.Fprintf(w, "restored %s from %s (%s) in %.2fs\n", info.ID, args[0], info.Status, time.Since(start).Seconds())
				})
				return nil
			})
		},
	}
	restore.Flags().BoolVar(&resume, "resume", false, "run the restored sandbox")
	restore.Flags().BoolVar(&force, "force", false, "restore a snapshot that was restored before")
	restore.Flags().IntVar(&clones, "clones", 0, "fork the snapshot into N new sandboxes (new ids and identities) instead")
	return restore
}

// snapshotListCmd is `snapshot list`.
func (a *app) snapshotListCmd() *cobra.Command {
	var vmID, remoteName string
	list := &cobra.Command{
		Use: "list", Aliases: []string{"ls"}, Short: "List snapshots (of this data dir, or with --remote of a remote store)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.Flags().Changed("remote") {
				return a.remoteSnapshotList(cmd, remoteName)
			}
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				snaps, err := m.ListSnapshots(ctx, smolvm.SnapshotFilter{VMID: vmID})
				if err != nil {
					return err
				}
				a.print(snaps, func(w io.Writer) {
					rows := [][]string{}
					for _, s := range snaps {
						rows = append(rows, []string{s.ID, s.VMID, string(s.Type), humanBytes(s.SizeBytes), fmt.Sprint(s.Restored), s.CreatedAt.Local().Format("2006-01-02 15:04:05")})
					}
					table(w, []string{"ID", "VM", "TYPE", "SIZE", "RESTORED", "CREATED"}, rows)
				})
				return nil
			})
		},
	}
	list.Flags().StringVar(&vmID, "vm-id", "", "only snapshots of this sandbox")
	list.Flags().StringVar(&remoteName, "remote", "", "list the snapshots in this remote store instead")
	return list
}

// snapshotDeleteCmd is `snapshot delete ID`.
func (a *app) snapshotDeleteCmd() *cobra.Command {
	var remoteName string
	del := &cobra.Command{
		Use: "delete ID", Aliases: []string{"rm"}, Short: "Delete a snapshot and all its files (permanent); with --remote, from a remote store", Args: cobra.ExactArgs(1),
		ValidArgsFunction: a.completeSnapshots,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				remove := func() error { return m.DeleteSnapshot(ctx, args[0]) }
				if cmd.Flags().Changed("remote") {
					remove = func() error { return m.DeleteRemoteSnapshot(ctx, remoteName, args[0]) }
				}
				if err := remove(); err != nil {
					return err
				}
				a.print(map[string]string{"deleted": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "deleted %s\n", args[0]) })
				return nil
			})
		},
	}
	del.Flags().StringVar(&remoteName, "remote", "", "delete it from this remote store instead (its index; chunks other snapshots share stay)")
	return del
}

// snapshotInspectCmd is `snapshot inspect ID`.
func (a *app) snapshotInspectCmd() *cobra.Command {
	var verify bool
	inspect := &cobra.Command{
		Use: "inspect ID", Short: "Show a snapshot's metadata and artifacts", Args: cobra.ExactArgs(1),
		ValidArgsFunction: a.completeSnapshots,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				s, err := m.GetSnapshot(ctx, args[0])
				if err != nil {
					return err
				}
				if verify {
					if err := m.VerifySnapshot(ctx, args[0]); err != nil {
						return err
					}
				}
				a.print(s, func(w io.Writer) {
					rows := [][]string{{"id", s.ID}, {"vm", s.VMID}, {"backend", s.Backend}, {"type", string(s.Type)},
						{"created", s.CreatedAt.Local().Format(time.RFC3339)}, {"size", humanBytes(s.SizeBytes)},
						{"memory", fmt.Sprintf("%d MiB", s.MemoryMiB)}, {"restored", fmt.Sprint(s.Restored)},
						{"restored vm", s.RestoredVMID}, {"restore count", fmt.Sprint(s.RestoreCount)},
						{"parent image", s.ParentImage}, {"state", s.Artifacts.State}, {"memory file", s.Artifacts.Memory},
						{"disk", s.Artifacts.Disk}, {"dir", s.Dir}}
					if verify {
						rows = append(rows, []string{"verified", "every artifact matches its sha256"})
					}
					table(w, []string{"FIELD", "VALUE"}, rows)
				})
				return nil
			})
		},
	}
	inspect.Flags().BoolVar(&verify, "verify", false, "re-hash every artifact")
	return inspect
}

func (a *app) completeSnapshots(cmd *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	var ids []string
	a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
		snaps, err := m.ListSnapshots(ctx, smolvm.SnapshotFilter{})
		for _, s := range snaps {
			ids = append(ids, s.ID)
		}
		return err
	})
	return ids, cobra.ShellCompDirectiveNoFileComp
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func (a *app) fork(cmd *cobra.Command, id string, n int, resume bool) error {
	return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
		start := time.Now()
		vms, err := m.Fork(ctx, id, n, smolvm.ForkOptions{Resume: resume})
		infos := []smolvm.Info{}
		for _, vm := range vms {
			if info, ierr := vm.Info(ctx); ierr == nil {
				infos = append(infos, info)
			}
			vm.Close()
		}
		a.print(infos, func(w io.Writer) {
			for _, i := range infos {
				fmt.Fprintf(w, "%s %s\n", i.ID, i.Status)
			}
			fmt.Fprintf(w, "forked %d of %d clones of %s in %.2fs\n", len(infos), n, id, time.Since(start).Seconds())
		})
		return err
	})
}

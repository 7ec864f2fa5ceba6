package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/fsutil"
)

// snapshotExportCmd is `snapshot export ID -o FILE|- [--flatten]`.
func (a *app) snapshotExportCmd() *cobra.Command {
	var (
		out  string
		opts smolvm.ExportOptions
	)
	export := &cobra.Command{
		Use:               "export ID -o FILE|- [--flatten]",
		Short:             "Write a snapshot as one archive (zstd tar) to FILE or stdout",
		Args:              cobra.ExactArgs(1),
		ValidArgsFunction: a.completeSnapshots,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				if out == "-" {
					return m.ExportSnapshot(ctx, args[0], cmd.OutOrStdout(), opts)
				}
				start := time.Now()
				var n int64
				// Written to a temp file and renamed: a failed export leaves no FILE.
				err := fsutil.Write(out, func(w io.Writer) (os.FileMode, error) {
					cw := &countWriter{w: w}
					err := m.ExportSnapshot(ctx, args[0], cw, opts)
					n = cw.n
					return 0o600, err
				})
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "exported %s to %s (%s) in %.2fs\n", args[0], out, humanBytes(n), time.Since(start).Seconds())
				return nil
			})
		},
	}
	export.Flags().StringVarP(&out, "output", "o", "", "archive file, or - for stdout")
	export.Flags().BoolVar(&opts.Flatten, "flatten", false,
		"make a diff snapshot self-contained (its base image merged into the disk): it then restores on a host without that image")
	export.MarkFlagRequired("output")
	return export
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// snapshotImportCmd is `snapshot import FILE|- [--snapshot-id NEW]`.
func (a *app) snapshotImportCmd() *cobra.Command {
	var sid string
	imp := &cobra.Command{
		Use:   "import FILE|-",
		Short: "Add the snapshot in an archive written by export (verified before it is listed)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				r := cmd.InOrStdin()
				if args[0] != "-" {
					f, err := os.Open(args[0])
					if err != nil {
						return err
					}
					defer f.Close()
					r = f
				}
				start := time.Now()
				info, err := m.ImportSnapshot(ctx, r, smolvm.ImportOptions{SnapshotID: sid})
				if err != nil {
					return err
				}
				a.print(info, func(w io.Writer) {
					fmt.Fprintf(w, "imported snapshot %s (%s, %s) of %s in %.2fs\n", info.ID, info.Type, humanBytes(info.SizeBytes), info.VMID, time.Since(start).Seconds())
				})
				return nil
			})
		},
	}
	imp.Flags().StringVar(&sid, "snapshot-id", "", "import under this id instead of the archive's")
	return imp
}

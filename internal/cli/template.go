package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

// templateCmd is `smolvm template ls|build|rm|gc`: the pre-booted
// templates sandboxes are created from (smolvm.Manager's *Template*).
func (a *app) templateCmd() *cobra.Command {
	c := &cobra.Command{Use: "template", Aliases: []string{"templates"}, Short: "List, build and remove the pre-booted templates sandboxes start from",
		Long: `A template is a full snapshot of an image booted to agent-ready with one shape
(memory, vCPUs, network on/off, backend, accelerator). "sandbox create" restores
the matching template instead of booting (and builds it on first use); a rebuilt
image or agent makes a new one. Stale templates are removed by "template gc".`}
	ls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List templates (stale ones are marked)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				list, err := m.ListTemplates(ctx)
				if err != nil {
					return err
				}
				a.print(list, func(w io.Writer) {
					rows := [][]string{}
					for _, t := range list {
						state := "current"
						if t.Stale {
							state = "stale: " + t.StaleReason
						}
						net := "on"
						if !t.Shape.Network {
							net = "off"
						}
						rows = append(rows, []string{t.Key[:16], t.Shape.Image, fmt.Sprintf("%d MiB", t.Shape.MemoryMiB), fmt.Sprint(t.Shape.CPUs),
							net, t.Shape.Backend + "/" + string(t.Shape.Accel), fmt.Sprintf("%.0f MiB", float64(t.SizeBytes)/(1<<20)),
							fmt.Sprint(t.Uses), state})
					}
					table(w, []string{"KEY", "IMAGE", "MEMORY", "CPUS", "NETWORK", "BACKEND", "SIZE", "USES", "STATE"}, rows)
				})
				return nil
			})
		},
	}
	var opts smolvm.TemplateOptions
	build := &cobra.Command{
		Use: "build IMAGE", Short: "Build the template of an image and shape now (a create would on first use)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				t, err := m.BuildTemplate(ctx, args[0], opts)
				if err != nil {
					return err
				}
				a.print(t, func(w io.Writer) {
					fmt.Fprintf(w, "template %s ready (%s, %d MiB)\n", t.Key[:16], t.Shape.Image, t.Shape.MemoryMiB)
				})
				return nil
			})
		},
	}
	f := build.Flags()
	f.IntVar(&opts.MemoryMiB, "memory", 0, "guest memory in MiB (default 512)")
	f.IntVar(&opts.CPUs, "cpus", 0, "vCPUs (default 1)")
	f.BoolVar(&opts.NoNetwork, "no-network", false, "the template of sandboxes without networking")
	f.StringVar((*string)(&opts.Backend), "backend", "", backendFlagHelp())
	f.StringVar((*string)(&opts.Accel), "accel", "", "auto (default), kvm or tcg")
	rm := &cobra.Command{
		Use: "rm KEY", Aliases: []string{"remove", "delete"}, Short: "Remove a template (KEY: at least 8 leading hex digits)", Args: cobra.ExactArgs(1),
		Long: `Remove a template. Refused while a sandbox created from it runs or is paused;
the disks of stopped ones are made independent of it first, so they keep working.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				if err := m.DeleteTemplate(ctx, args[0]); err != nil {
					return err
				}
				a.print(map[string]string{"removed": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "removed %s\n", args[0]) })
				return nil
			})
		},
	}
	gc := &cobra.Command{
		Use: "gc", Short: "Remove stale templates (image rebuilt or gone, agent changed)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				res, err := m.CollectTemplates(ctx)
				if err != nil {
					return err
				}
				a.print(res, func(w io.Writer) {
					for _, t := range res.Removed {
						fmt.Fprintf(w, "removed %s (%s)\n", t.Key[:16], t.StaleReason)
					}
					for k, why := range res.Kept {
						fmt.Fprintf(w, "kept %s: %s\n", k[:16], why)
					}
					if len(res.Removed)+len(res.Kept) == 0 {
						fmt.Fprintln(w, "no stale templates")
					}
				})
				return nil
			})
		},
	}
	c.AddCommand(ls, build, rm, gc)
	return c
}

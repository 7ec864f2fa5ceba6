package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
)

func (a *app) imageDirOrDefault() string {
	if a.imageDir != "" {
		return a.imageDir
	}
	return image.DefaultDir()
}

func (a *app) imageCmd() *cobra.Command {
	c := &cobra.Command{Use: "image", Aliases: []string{"images"}, Short: "Build and manage guest images"}
	var opts image.BuildOptions
	var agent string
	build := &cobra.Command{
		Use:       "build NAME",
		Short:     "Build (or check the cache of) a guest image: debian (default image) or busybox",
		Args:      cobra.ExactArgs(1),
		ValidArgs: image.Names,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			var err error
			if agent == "" {
				agent, err = findAgent(ctx)
				if err != nil {
					return err
				}
			}
			opts.Name, opts.AgentPath, opts.Dir, opts.Logger = args[0], agent, a.imageDirOrDefault(), a.logger()
			if !a.json {
				last := ""
				start := time.Now()
				opts.Progress = func(step string, frac float64) {
					if step == last {
						return
					}
					last = step
					fmt.Fprintf(a.stderr, "[%5.1fs %3.0f%%] %s\n", time.Since(start).Seconds(), frac*100, step)
				}
			}
			img, err := image.Build(ctx, opts)
			if err != nil {
				if errors.Is(err, image.ErrUnknownImage) {
					return &smolvm.Error{Message: err.Error(), Fix: smolvm.Fix{Action: smolvm.FixBuildImage, Args: map[string]string{smolvm.ArgImage: "debian"}}, Err: errors.Join(smolvm.ErrInvalidConfig, err)}
				}
				return err
			}
			a.print(imageRow(img), func(w io.Writer) {
				fmt.Fprintf(w, "image %s ready: kernel %s, rootfs %s\n", img.Name, img.Manifest.KernelRelease, img.Rootfs)
			})
			return nil
		},
	}
	f := build.Flags()
	f.StringVar(&opts.Kernel, "kernel", "", "debian-cloud (default: Debian's cloud kernel + virtio modules) or minimal (build linux-source-6.1 with the microvm fragment, ~20 min)")
	f.BoolVar(&opts.Vmlinux, "vmlinux", false, "also keep an uncompressed vmlinux (Firecracker)")
	f.BoolVar(&opts.Force, "force", false, "rebuild every piece even when cached")
	f.StringVar(&agent, "agent", "", "guest agent binary (default: $SMOLVM_AGENT, smolvm-agent beside this binary, or built from source)")

	ls := &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List built images", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			imgs, err := image.List(a.imageDirOrDefault())
			if err != nil {
				return err
			}
			rows := []map[string]any{}
			for _, img := range imgs {
				rows = append(rows, imageRow(img))
			}
			a.print(rows, func(w io.Writer) {
				t := [][]string{}
				for _, img := range imgs {
					t = append(t, []string{img.Name, img.Manifest.KernelRelease, fmt.Sprintf("%.0f MiB", float64(img.RootfsSize)/(1<<20)), img.Manifest.CreatedAt.Local().Format("2006-01-02 15:04")})
				}
				table(w, []string{"NAME", "KERNEL", "ROOTFS", "BUILT"}, t)
			})
			return nil
		},
	}
	rm := &cobra.Command{
		Use: "rm NAME", Aliases: []string{"remove"}, Short: "Remove a built image", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := image.Remove(a.imageDirOrDefault(), args[0]); err != nil {
				if errors.Is(err, image.ErrNotBuilt) {
					return &smolvm.Error{Message: err.Error(), Fix: smolvm.Fix{Action: smolvm.FixListImages}, Err: errors.Join(smolvm.ErrImageNotBuilt, err)}
				}
				return err
			}
			a.print(map[string]string{"removed": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "removed %s\n", args[0]) })
			return nil
		},
	}
	c.AddCommand(build, ls, rm)
	return c
}

func imageRow(img image.Image) map[string]any {
	return map[string]any{"name": img.Name, "kernel": img.Kernel, "initrd": img.Initrd, "rootfs": img.Rootfs,
		"kernel_release": img.Manifest.KernelRelease, "rootfs_bytes": img.RootfsSize, "created_at": img.Manifest.CreatedAt}
}

// findAgent locates the static guest agent: $SMOLVM_AGENT, smolvm-agent
// beside the running binary, or a build from the module source when the
// working directory is inside it.
func findAgent(ctx context.Context) (string, error) {
	if p := os.Getenv("SMOLVM_AGENT"); p != "" {
		return p, nil
	}
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "smolvm-agent")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	root, err := moduleRoot()
	if err != nil {
		return "", &smolvm.Error{Message: "cannot find the guest agent binary (smolvm-agent)",
			Fix: usageFix("CGO_ENABLED=0 go build -o bin/smolvm-agent ./cmd/smolvm-agent, then pass --agent bin/smolvm-agent"), Err: err}
	}
	out := filepath.Join(root, "bin", "smolvm-agent")
	if err := image.BuildAgent(ctx, root, out); err != nil {
		return "", err
	}
	return out, nil
}

func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(data), "module github.com/smolvm-go/smolvm\n") {
			if _, err := exec.LookPath("go"); err != nil {
				return "", err
			}
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the smolvm source tree")
		}
		dir = parent
	}
}

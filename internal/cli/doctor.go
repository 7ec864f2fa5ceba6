package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/qemu"
	"github.com/smolvm-go/smolvm/internal/image"
)

type check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

func (a *app) doctorCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check the host: QEMU, acceleration, images, disk space (each with its fix)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			checks := []check{}
			add := func(c check) { checks = append(checks, c) }

			if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err != nil {
				add(check{"qemu", false, "qemu-system-x86_64 not found", "scripts/setup (or: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils)"})
			} else {
				v := strings.SplitN(string(out), "\n", 2)[0]
				add(check{"qemu", true, v, ""})
			}
			if _, err := exec.LookPath("qemu-img"); err != nil {
				add(check{"qemu-img", false, "qemu-img not found", "apt-get install qemu-utils"})
			} else {
				add(check{"qemu-img", true, "found", ""})
			}
			if p, err := qemu.NetHelper(); err != nil {
				add(check{"network sidecar", false, err.Error(), "scripts/setup (or: go build -o bin/smolvm-net ./cmd/smolvm-net next to bin/smolvm)"})
			} else {
				add(check{"network sidecar", true, p, ""})
			}
			acc, notice, err := qemu.ProbeAccel(backend.AccelAuto)
			switch {
			case err != nil:
				add(check{"accel", false, err.Error(), ""})
			case acc == backend.AccelKVM:
				add(check{"accel", true, "kvm", ""})
			default:
				add(check{"accel", true, "tcg (software emulation): " + notice, "for hardware speed, run on a host with usable KVM (vmx/svm, /dev/kvm)"})
			}
			if p, err := exec.LookPath("firecracker"); err == nil {
				out, _ := exec.Command(p, "--version").Output()
				add(check{"firecracker", true, strings.SplitN(string(out), "\n", 2)[0], ""})
			} else {
				add(check{"firecracker", true, "not installed (optional; the qemu backend is used)", ""})
			}
			dir := a.imageDirOrDefault()
			for _, name := range image.Names {
				img, err := image.Open(dir, name)
				if err != nil {
					add(check{"image " + name, false, "not built in " + dir, "smolvm image build " + name})
					continue
				}
				add(check{"image " + name, true, fmt.Sprintf("kernel %s, rootfs %s", img.Manifest.KernelRelease, img.Rootfs), ""})
			}
			dataDir := a.dataDir
			if dataDir == "" {
				dataDir = smolvm.DefaultDataDir()
			}
			for _, d := range []struct{ name, path string }{{"disk (data)", dataDir}, {"disk (images)", dir}} {
				p := d.path
				for p != "/" {
					if _, err := os.Stat(p); err == nil {
						break
					}
					p = parentDir(p)
				}
				var st unix.Statfs_t
				if err := unix.Statfs(p, &st); err == nil {
					free := float64(st.Bavail) * float64(st.Bsize) / (1 << 30)
					ok := free >= 4
					fix := ""
					if !ok {
						fix = "free space under " + p + " (snapshots and images need a few GiB)"
					}
					add(check{d.name, ok, fmt.Sprintf("%.1f GiB free under %s", free, p), fix})
				}
			}
			err = a.withManager(cmd, func(ctx context.Context, m *smolvm.Manager) error {
				rep, err := m.Doctor(ctx)
				for _, r := range rep {
					add(check{r.Name, r.OK, r.Detail, renderFix(r.Fix)})
				}
				return err
			})
			if err != nil {
				add(check{"state", false, err.Error(), "check SMOLVM_DATA_DIR"})
			}
			failed := 0
			for _, c := range checks {
				if !c.OK {
					failed++
				}
			}
			a.print(checks, func(w io.Writer) {
				for _, c := range checks {
					mark := "ok  "
					if !c.OK {
						mark = "FAIL"
					}
					fmt.Fprintf(w, "[%s] %-14s %s\n", mark, c.Name, c.Detail)
					if c.Fix != "" {
						fmt.Fprintf(w, "       %-14s fix: %s\n", "", c.Fix)
					}
				}
			})
			if failed > 0 {
				a.exitCode = 1
			}
			return nil
		},
	}
}

func parentDir(p string) string {
	i := strings.LastIndex(strings.TrimRight(p, "/"), "/")
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

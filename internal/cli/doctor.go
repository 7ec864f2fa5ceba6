package cli

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/smolvm-go/smolvm"
)

func (a *app) doctorCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check the host: each backend's VMM and accelerator, images, disk space, state (each with its fix)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			checks := smolvm.Doctor(cmd.Context(), a.options())
			a.print(checkViews(checks), func(w io.Writer) { renderChecks(w, checks) })
			for _, c := range checks {
				if c.Status == smolvm.CheckFail {
					a.exitCode = 1
				}
			}
			return nil
		},
	}
}

// renderChecks prints one line per check, and its fix below it.
func renderChecks(w io.Writer, checks []smolvm.Check) {
	marks := map[smolvm.CheckStatus]string{smolvm.CheckOK: "ok  ", smolvm.CheckWarn: "warn", smolvm.CheckFail: "FAIL"}
	for _, c := range checks {
		fmt.Fprintf(w, "[%s] %-14s %s\n", marks[c.Status], c.Name, c.Detail)
		if !c.Fix.IsZero() {
			fmt.Fprintf(w, "       %-14s fix: %s\n", "", renderFix(c.Fix))
		}
	}
}

// checkView is one doctor check in --json output: the SDK's check with its
// typed fix rendered in the CLI's words (as errors carry "recovery").
type checkView struct {
	Name   string             `json:"name"`
	OK     bool               `json:"ok"`
	Status smolvm.CheckStatus `json:"status"`
	Detail string             `json:"detail"`
	Fix    string             `json:"fix,omitempty"`
}

func checkViews(checks []smolvm.Check) []checkView {
	out := make([]checkView, len(checks))
	for i, c := range checks {
		out[i] = checkView{Name: c.Name, OK: c.OK, Status: c.Status, Detail: c.Detail}
		if !c.Fix.IsZero() {
			out[i].Fix = renderFix(c.Fix)
		}
	}
	return out
}

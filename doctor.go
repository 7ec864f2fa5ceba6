package smolvm

import (
	"context"
	"fmt"
)

// Check is one line of a health report.
type Check struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// Doctor reconciles recorded VMs with their processes, removes what
// interrupted operations left behind (unfinished snapshots), and reports.
func (m *Manager) Doctor(ctx context.Context) ([]Check, error) {
	var out []Check
	infos, err := m.List(ctx)
	if err != nil {
		return nil, err
	}
	counts := map[Status]int{}
	for _, i := range infos {
		counts[i.Status]++
	}
	out = append(out, Check{Name: "vms", OK: true, Detail: fmt.Sprintf("%d running, %d paused, %d stopped, %d created, %d failed (state in %s)",
		counts[StatusRunning], counts[StatusPaused], counts[StatusStopped], counts[StatusCreated], counts[StatusError], m.opts.DataDir)})
	if counts[StatusError] > 0 {
		out[len(out)-1].Fix = "smolvm sandbox list --all; smolvm sandbox delete NAME"
	}
	cleaned, err := m.cleanupSnapshots(ctx)
	if err != nil {
		out = append(out, Check{Name: "snapshots", OK: false, Detail: err.Error()})
	} else {
		out = append(out, Check{Name: "snapshots", OK: true, Detail: fmt.Sprintf("removed %d unfinished snapshot(s)", cleaned)})
	}
	return out, nil
}

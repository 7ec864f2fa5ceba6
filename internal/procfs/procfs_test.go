package procfs

import (
	"os"
	"os/exec"
	"slices"
	"testing"
)

func TestOthers(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	pids := Others()
	if !slices.Contains(pids, cmd.Process.Pid) {
		t.Errorf("child %d not listed", cmd.Process.Pid)
	}
	if slices.Contains(pids, os.Getpid()) {
		t.Error("this process is listed")
	}
}

package cli

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestOpenFillLogRefusesPlants: the detached pool filler's log is opened
// only as a regular file of this user: a symlink, a FIFO (which would hang
// an ordinary open) and a file of another owner are refused.
func TestOpenFillLogRefusesPlants(t *testing.T) {
	dir := t.TempDir()
	ok := filepath.Join(dir, "ok.log")
	f, err := openFillLog(ok)
	if err != nil {
		t.Fatalf("a new log: %v", err)
	}
	f.Close()
	if st, _ := os.Stat(ok); st.Mode().Perm() != 0o600 {
		t.Errorf("log mode %v, want 0600", st.Mode().Perm())
	}

	link := filepath.Join(dir, "link.log")
	os.Symlink(ok, link)
	if f, err := openFillLog(link); err == nil {
		f.Close()
		t.Error("opened through a symlink")
	}
	fifo := filepath.Join(dir, "fifo.log")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := openFillLog(fifo); err == nil {
		f.Close()
		t.Error("opened a FIFO")
	}
	if os.Geteuid() == 0 {
		other := filepath.Join(dir, "other.log")
		os.WriteFile(other, nil, 0o666)
		os.Chown(other, 65534, 65534)
		if f, err := openFillLog(other); err == nil {
			f.Close()
			t.Error("opened another user's file")
		}
	}
}

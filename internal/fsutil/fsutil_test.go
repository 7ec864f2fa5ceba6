package fsutil

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nobody is the uid another local user's directory belongs to in these
// tests (chown needs root).
const nobody = 65534

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test chowns files to another user and must run as root (the project's test setup runs as root)")
	}
}

func TestPrivateDirCreates(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{filepath.Join(root, "a"), filepath.Join(root, "b", "c", "d")} {
		if err := PrivateDir(d); err != nil {
			t.Fatalf("PrivateDir(%s): %v", d, err)
		}
		for p := d; p != root; p = filepath.Dir(p) {
			st, err := os.Lstat(p)
			if err != nil {
				t.Fatal(err)
			}
			if !st.IsDir() || st.Mode().Perm() != 0o700 {
				t.Errorf("%s: mode %v, want a 0700 directory", p, st.Mode())
			}
		}
		// Found again: accepted as it is ours and private.
		if err := PrivateDir(d); err != nil {
			t.Errorf("PrivateDir(%s) again: %v", d, err)
		}
	}
}

func TestPrivateDirCreatesDespiteUmask(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	d := filepath.Join(t.TempDir(), "x")
	if err := PrivateDir(d); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(d); st.Mode().Perm() != 0o700 {
		t.Errorf("mode %v under umask 0, want 0700", st.Mode().Perm())
	}
}

func TestPrivateDirRefuses(t *testing.T) {
	needRoot(t)
	root := t.TempDir()
	other := filepath.Join(root, "elsewhere")
	if err := os.Mkdir(other, 0o700); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		make   func(p string) error
		reason string
	}{
		{"other user 0777", func(p string) error {
			if err := os.Mkdir(p, 0o777); err != nil {
				return err
			}
			os.Chmod(p, 0o777) // past the umask
			return os.Chown(p, nobody, nobody)
		}, "owned by uid 65534"},
		{"other user 0700", func(p string) error {
			if err := os.Mkdir(p, 0o700); err != nil {
				return err
			}
			return os.Chown(p, nobody, nobody)
		}, "owned by uid 65534"},
		{"ours 0777", func(p string) error {
			if err := os.Mkdir(p, 0o700); err != nil {
				return err
			}
			return os.Chmod(p, 0o777)
		}, "mode drwxrwxrwx"},
		{"ours 0750", func(p string) error {
			if err := os.Mkdir(p, 0o700); err != nil {
				return err
			}
			return os.Chmod(p, 0o750)
		}, "mode drwxr-x---"},
		{"ours sticky", func(p string) error {
			if err := os.Mkdir(p, 0o700); err != nil {
				return err
			}
			return os.Chmod(p, 0o700|fs.ModeSticky)
		}, "open to other users"},
		{"symlink to a private dir of ours", func(p string) error { return os.Symlink(other, p) }, "is a symlink"},
		{"dangling symlink", func(p string) error { return os.Symlink(filepath.Join(root, "nowhere"), p) }, "is a symlink"},
		{"regular file", func(p string) error { return os.WriteFile(p, nil, 0o600) }, "not a directory"},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(root, "d"+string(rune('0'+i)))
			if err := c.make(p); err != nil {
				t.Fatal(err)
			}
			before, _ := os.Lstat(p)
			err := PrivateDir(p)
			if !errors.Is(err, ErrUnsafe) {
				t.Fatalf("PrivateDir accepted it: %v", err)
			}
			var ue *UnsafeDirError
			if !errors.As(err, &ue) || ue.Path != p {
				t.Errorf("error %v does not name %s", err, p)
			}
			msg := err.Error()
			if !strings.Contains(msg, c.reason) || !strings.Contains(msg, p) || !strings.Contains(msg, "remove it") {
				t.Errorf("error %q: want the path, %q and what to do", msg, c.reason)
			}
			if err := CheckPrivateDir(p); !errors.Is(err, ErrUnsafe) {
				t.Errorf("CheckPrivateDir: %v", err)
			}
			// Refused as found: not repaired, nothing created in it.
			after, _ := os.Lstat(p)
			if before.Mode() != after.Mode() || before.Sys().(*syscall.Stat_t).Uid != after.Sys().(*syscall.Stat_t).Uid {
				t.Errorf("PrivateDir changed it: %v -> %v", before.Mode(), after.Mode())
			}
		})
	}
	if ents, _ := os.ReadDir(other); len(ents) != 0 {
		t.Errorf("something was written through the symlink: %v", ents)
	}
}

func TestCheckPrivateDirMissing(t *testing.T) {
	if err := CheckPrivateDir(filepath.Join(t.TempDir(), "none")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("got %v, want ErrNotExist", err)
	}
}

func TestLockCreatesPrivateFileAndExcludes(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	p := filepath.Join(t.TempDir(), "x.lock")
	ctx := context.Background()
	unlock, err := Lock(ctx, p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Mode() != 0o600 {
		t.Errorf("lock file mode %v, want 0600", st.Mode())
	}
	if _, err := TryLock(p); !errors.Is(err, ErrBusy) {
		t.Errorf("TryLock of a held lock: %v, want ErrBusy", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	waited := 0
	if _, err := Lock(cctx, p, func() { waited++ }); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Lock of a held lock: %v, want DeadlineExceeded", err)
	}
	if waited != 1 {
		t.Errorf("onWait called %d times, want 1", waited)
	}
	unlock()
	unlock() // idempotent
	f, err := TryLock(p)
	if err != nil {
		t.Fatalf("TryLock after unlock: %v", err)
	}
	f.Close()
}

func TestLockRefusesSymlinkAndFIFO(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "victim")
	if err := os.WriteFile(target, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "agent.0.lock")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	dangling := filepath.Join(dir, "agent.1.lock")
	if err := os.Symlink(filepath.Join(dir, "created-through-link"), dangling); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo.lock")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, p := range []string{link, dangling, fifo} {
		if _, err := Lock(ctx, p, nil); err == nil {
			t.Errorf("Lock(%s) succeeded", p)
		}
		if _, err := TryLock(p); err == nil {
			t.Errorf("TryLock(%s) succeeded", p)
		} else if p != fifo && !strings.Contains(err.Error(), "symlink") {
			t.Errorf("TryLock(%s): %v, want it to say symlink", p, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(dir, "created-through-link")); err == nil {
		t.Error("a file was created through the dangling symlink")
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Errorf("symlink target changed: %q", b)
	}
	if st, _ := os.Stat(target); st.Mode().Perm() != 0o644 {
		t.Errorf("symlink target mode changed: %v", st.Mode())
	}
}

func TestUmaskAndHostMode(t *testing.T) {
	for _, mask := range []int{0o022, 0o077, 0o002, 0} {
		old := syscall.Umask(mask)
		got := Umask()
		syscall.Umask(old)
		if got != fs.FileMode(mask) {
			t.Errorf("Umask() = %#o, want %#o", got, mask)
		}
	}
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	for _, c := range []struct{ in, want fs.FileMode }{
		{0o777 | fs.ModeSetuid, 0o755},
		{0o777 | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky, 0o755},
		{0o666, 0o644},
		{0o600, 0o600},
		{0o4777, 0o755}, // raw unix bits are not fs.FileMode bits: only Perm counts
	} {
		if got := HostMode(c.in); got != c.want {
			t.Errorf("HostMode(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

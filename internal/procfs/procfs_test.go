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

const smapsSample = `55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234   /usr/bin/qemu-system-x86_64
Size:                132 kB
Pss:                 100 kB
Pss_Anon:              0 kB
Pss_File:            100 kB
Anonymous:             0 kB
7f0000000000-7f0040000000 rwxp 00000000 00:00 0
Size:            1048576 kB
Pss:               20480 kB
Pss_Anon:          20480 kB
Pss_File:              0 kB
Anonymous:         20480 kB
7f1000000000-7f1000001000 rw-p 00000000 00:00 0 [heap]
Pss:                   4 kB
Pss_Anon:              4 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me ac
`

func TestParseSmaps(t *testing.T) {
	m, ok := ParseSmaps([]byte(smapsSample))
	want := Memory{Pss: 20584, PssAnon: 20484, PssFile: 100, WXAnon: 20480}
	if !ok || m != want {
		t.Fatalf("ParseSmaps = %+v %v, want %+v", m, ok, want)
	}
	rollup := "00400000-7ffc1b5ff000 ---p 00000000 00:00 0                          [rollup]\nRss: 9000 kB\nPss: 7000 kB\nPss_Anon: 5000 kB\nPss_File: 2000 kB\n"
	if m, ok := ParseSmaps([]byte(rollup)); !ok || m != (Memory{Rss: 9000, Pss: 7000, PssAnon: 5000, PssFile: 2000}) {
		t.Fatalf("rollup = %+v %v", m, ok)
	}
	if _, ok := ParseSmaps([]byte("Rss: 4 kB\n")); ok {
		t.Fatal("no Pss, yet ok")
	}
}

// The real files of this process parse: a Go test binary has Pss and no
// writable+executable mappings.
func TestRollupAndSmapsOfSelf(t *testing.T) {
	r, err := Rollup(os.Getpid())
	if err != nil || r.Pss <= 0 || r.PssAnon <= 0 || r.Rss < r.Pss {
		t.Fatalf("Rollup(self) = %+v, %v", r, err)
	}
	s, err := Smaps(os.Getpid())
	if err != nil || s.Pss <= 0 || s.WXAnon != 0 {
		t.Fatalf("Smaps(self) = %+v, %v", s, err)
	}
	if _, err := Rollup(-1); err == nil {
		t.Fatal("Rollup(-1) succeeded")
	}
}

func FuzzParseSmaps(f *testing.F) {
	f.Add([]byte(smapsSample))
	f.Add([]byte("Pss: -1 kB\nx-y rwxp\nAnonymous: 99999999999999999999 kB\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, _ := ParseSmaps(b)
		if m.Rss < 0 || m.Pss < 0 || m.PssAnon < 0 || m.PssFile < 0 || m.WXAnon < 0 {
			t.Fatalf("negative figure %+v", m)
		}
	})
}

package procfs

import (
	"os"
	"testing"
	"time"
)

const statSample = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 123456 1000000 5000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n"

func TestParseStat(t *testing.T) {
	s, ok := ParseStat([]byte(statSample))
	want := ProcStat{UserTicks: 250, SystemTicks: 75, StartTicks: 123456}
	if !ok || s != want {
		t.Fatalf("ParseStat = %+v %v, want %+v", s, ok, want)
	}
	if s.CPU() != 3250*time.Millisecond {
		t.Fatalf("CPU = %v", s.CPU())
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 x S " + "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21",
		"1 (x) S 1 2 3 4 5 6 7 8 9 10 -5 12 13 14 15 16 17 18 19 20 21"} {
		if _, ok := ParseStat([]byte(bad)); ok {
			t.Errorf("ParseStat(%q) ok", bad)
		}
	}
	boot, ok := ParseBootTime([]byte("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"))
	if !ok || !boot.Equal(time.Unix(1700000000, 0)) {
		t.Fatalf("ParseBootTime = %v %v", boot, ok)
	}
	if got := s.Started(boot); !got.Equal(boot.Add(1234560 * time.Millisecond)) {
		t.Fatalf("Started = %v", got)
	}
	if _, ok := ParseBootTime([]byte("btime -1\n")); ok {
		t.Fatal("negative btime accepted")
	}
}

// This process's own stat parses, and it started after boot and before now.
func TestStatOfSelf(t *testing.T) {
	s, err := Stat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	boot, err := BootTime()
	if err != nil {
		t.Fatal(err)
	}
	if st := s.Started(boot); st.Before(boot) || st.After(time.Now().Add(time.Second)) {
		t.Fatalf("started %v, boot %v", st, boot)
	}
	if _, err := Stat(0); err == nil {
		t.Fatal("Stat(0) succeeded")
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(statSample))
	f.Add([]byte("1 ()) S 99999999999999999999 x"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, ok := ParseStat(b)
		if ok && (s.UserTicks > maxTicks || s.SystemTicks > maxTicks || s.StartTicks > maxTicks) {
			t.Fatalf("out of range %+v", s)
		}
		ParseBootTime(b)
	})
}

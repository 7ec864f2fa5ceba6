package procfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"
)

// ClockTicks is USER_HZ, the unit of the times in /proc/PID/stat (100 on
// every architecture Linux exports to user space through procfs).
const ClockTicks = 100

// ProcStat is what /proc/PID/stat says about a process's CPU use and age.
type ProcStat struct {
	UserTicks, SystemTicks uint64 // utime, stime (ClockTicks per second)
	StartTicks             uint64 // starttime: ticks after boot the process started
}

// CPU returns the process's user+system time.
func (s ProcStat) CPU() time.Duration {
	return time.Duration(s.UserTicks+s.SystemTicks) * (time.Second / ClockTicks)
}

// Stat reads /proc/PID/stat.
func Stat(pid int) (ProcStat, error) {
	if pid <= 0 {
		return ProcStat{}, fmt.Errorf("procfs: invalid pid %d", pid)
	}
	path := "/proc/" + strconv.Itoa(pid) + "/stat"
	b, err := os.ReadFile(path)
	if err != nil {
		return ProcStat{}, err
	}
	s, ok := ParseStat(b)
	if !ok {
		return ProcStat{}, fmt.Errorf("%s: malformed", path)
	}
	return s, nil
}

// maxTicks bounds one time field (about 58 million years at 100 Hz):
// larger is malformed, and sums stay far from overflowing.
const maxTicks = 1 << 50

// ParseStat parses the text of /proc/PID/stat: "PID (COMM) STATE F4 ...".
// COMM may hold spaces and parentheses, so the fields are counted from the
// last ')'. ok is false when the fields it needs are missing or malformed.
func ParseStat(b []byte) (s ProcStat, ok bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return s, false
	}
	f := bytes.Fields(b[i+1:])
	// f[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
	if len(f) < 20 {
		return s, false
	}
	var err error
	get := func(n int) uint64 {
		v, e := strconv.ParseUint(string(f[n-3]), 10, 64)
		if e == nil && v > maxTicks {
			e = errors.New("out of range")
		}
		if e != nil && err == nil {
			err = e
		}
		return v
	}
	s = ProcStat{UserTicks: get(14), SystemTicks: get(15), StartTicks: get(22)}
	if err != nil {
		return ProcStat{}, false
	}
	return s, true
}

// BootTime reads the boot time (btime) from /proc/stat.
func BootTime() (time.Time, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	t, ok := ParseBootTime(b)
	if !ok {
		return time.Time{}, errors.New("/proc/stat: no btime")
	}
	return t, nil
}

// ParseBootTime finds the "btime SECONDS" line of /proc/stat's text.
func ParseBootTime(b []byte) (time.Time, bool) {
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		if rest, ok := bytes.CutPrefix(line, []byte("btime ")); ok {
			sec, err := strconv.ParseInt(string(bytes.TrimSpace(rest)), 10, 64)
			if err != nil || sec <= 0 || sec > 1<<40 {
				return time.Time{}, false
			}
			return time.Unix(sec, 0), true
		}
	}
	return time.Time{}, false
}

// Started returns when the process of s started, from the boot time.
func (s ProcStat) Started(boot time.Time) time.Time {
	return boot.Add(time.Duration(s.StartTicks) * (time.Second / ClockTicks))
}

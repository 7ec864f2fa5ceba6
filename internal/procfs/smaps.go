package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
)

// Memory is what a process's smaps report, summed over its mappings, in
// KiB: the resident set size, the proportional set size and its anonymous
// and file-backed parts (as in smaps_rollup), and the anonymous memory in
// writable+executable mappings (a JIT's code buffer: QEMU's TCG
// translation cache).
type Memory struct {
	Rss                   int64
	Pss, PssAnon, PssFile int64
	WXAnon                int64
}

// Rollup reads /proc/PID/smaps_rollup: Rss, Pss, PssAnon and PssFile (one
// summed mapping, so WXAnon is not known from it).
func Rollup(pid int) (Memory, error) {
	return readSmaps(pid, "smaps_rollup")
}

// Smaps reads /proc/PID/smaps, every mapping: slower than Rollup, and the
// only source of WXAnon.
func Smaps(pid int) (Memory, error) {
	return readSmaps(pid, "smaps")
}

func readSmaps(pid int, name string) (Memory, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/" + name
	b, err := os.ReadFile(path)
	if err != nil {
		return Memory{}, err
	}
	m, ok := ParseSmaps(b)
	if !ok {
		return Memory{}, fmt.Errorf("%s: no Pss", path)
	}
	return m, nil
}

// maxKiB bounds one field (1 PiB): larger is malformed, and the sums stay
// far from overflowing.
const maxKiB = 1 << 40

// ParseSmaps sums the smaps (or smaps_rollup) text b: mapping header lines
// ("START-END PERMS OFFSET DEV INODE [PATH]") followed by "Key: N kB"
// fields. ok reports whether any Pss field was found. Malformed lines are
// skipped.
func ParseSmaps(b []byte) (m Memory, ok bool) {
	wx := false
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		f := bytes.Fields(line)
		if len(f) < 2 {
			continue
		}
		key := f[0]
		if !bytes.HasSuffix(key, []byte{':'}) {
			// A mapping header: its permissions are the second field.
			if bytes.IndexByte(key, '-') > 0 && len(f[1]) == 4 {
				wx = f[1][1] == 'w' && f[1][2] == 'x'
			}
			continue
		}
		kib, err := strconv.ParseInt(string(f[1]), 10, 64)
		if err != nil || kib < 0 || kib > maxKiB {
			continue
		}
		switch string(key) {
		case "Rss:":
			m.Rss += kib
		case "Pss:":
			m.Pss += kib
			ok = true
		case "Pss_Anon:":
			m.PssAnon += kib
		case "Pss_File:":
			m.PssFile += kib
		case "Anonymous:":
			if wx {
				m.WXAnon += kib
			}
		}
	}
	return m, ok
}

package procfs

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// Mount is one line of /proc/PID/mountinfo.
type Mount struct {
	Point     string // the mount point, unescaped
	FSType    string
	SuperOpts string // the super block options ("rw,nsdelegate", ...)
}

// SelfMounts reads and parses /proc/self/mountinfo.
func SelfMounts() ([]Mount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	return ParseMountinfo(string(b)), nil
}

// ParseMountinfo parses the text of a mountinfo file; malformed lines are
// skipped.
func ParseMountinfo(s string) []Mount {
	var out []Mount
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 1 {
			continue
		}
		m := Mount{Point: unescapeOctal(f[4]), FSType: g[0]}
		if len(g) >= 3 {
			m.SuperOpts = g[2]
		}
		out = append(out, m)
	}
	return out
}

// unescapeOctal undoes mountinfo's \040-style escapes.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

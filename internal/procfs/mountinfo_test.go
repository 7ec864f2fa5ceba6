package procfs

import (
	"slices"
	"testing"
)

func TestParseMountinfo(t *testing.T) {
	const mi = `22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 22 0:27 / /mnt/with\040space\134x rw - tmpfs tmpfs rw
this line is malformed
32 22 0:28 / /bad\9 rw - tmpfs
`
	got := ParseMountinfo(mi)
	want := []Mount{
		{Point: "/", FSType: "ext4", SuperOpts: "rw"},
		{Point: "/sys/fs/cgroup", FSType: "cgroup2", SuperOpts: "rw,nsdelegate,memory_recursiveprot"},
		{Point: `/mnt/with space\x`, FSType: "tmpfs", SuperOpts: "rw"},
		{Point: `/bad\9`, FSType: "tmpfs"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("ParseMountinfo:\n got %+v\nwant %+v", got, want)
	}
}

func TestSelfMountsHasRoot(t *testing.T) {
	ms, err := SelfMounts()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(ms, func(m Mount) bool { return m.Point == "/" }) {
		t.Fatalf("no mount at / in %d mounts", len(ms))
	}
}

package snapshot

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDigestUnwrittenExtentCached is the bug of issue 13's verify: on ext4
// an unwritten (fallocated) extent is a hole to SEEK_DATA until its pages
// are cached, and data after; reading the file must not change its digest.
func TestDigestUnwrittenExtentCached(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.qcow2")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, 8<<20); err != nil {
		t.Fatalf("fallocate (the filesystem of %s must support it): %v", p, err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte("qcow"), 1024), 1<<20); err != nil {
		t.Fatal(err)
	}
	f.Sync()
	unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
	before, _ := Extents(f, 8<<20)
	d1, size, err := Digest(p)
	if err != nil || size != 8<<20 {
		t.Fatal(size, err)
	}
	if _, err := io.Copy(io.Discard, f); err != nil { // every page cached
		t.Fatal(err)
	}
	after, _ := Extents(f, 8<<20)
	t.Logf("data extents before the read %v, after %v", before, after)
	d2, _, err := Digest(p)
	if err != nil {
		t.Fatal(err)
	}
	if d1 != d2 {
		t.Fatalf("reading the file changed its digest: %s, then %s", d1[:12], d2[:12])
	}
}

// TestDigestContentOnly: written zeros and holes hash alike; any change
// of a byte, of where the data is, or of the size changes the digest.
func TestDigestContentOnly(t *testing.T) {
	dir := t.TempDir()
	const size = 3<<20 + 1000 // the last block is short
	data := make([]byte, size)
	rand.Read(data[5000:9000])                       // straddles two blocks
	rand.Read(data[1<<20 : 2<<20])                   // a long run
	copy(data[size-10:], "tail bytes")               // in the short last block
	data[2<<20+BlockSize+17] = 1                     // a lone byte
	clear(data[1<<20+BlockSize : 1<<20+2*BlockSize]) // a zero block inside the run
	dense := filepath.Join(dir, "dense")
	if err := os.WriteFile(dense, data, 0o600); err != nil {
		t.Fatal(err)
	}
	// The same contents with every zero 4 KiB block a hole.
	sparse := filepath.Join(dir, "sparse")
	f, _ := os.Create(sparse)
	f.Truncate(size)
	for off := 0; off < size; off += BlockSize {
		b := data[off:min(off+BlockSize, size)]
		if !bytes.Equal(b, zeroBlock[:len(b)]) {
			f.WriteAt(b, int64(off))
		}
	}
	f.Close()
	want, _, err := Digest(dense)
	if err != nil {
		t.Fatal(err)
	}
	if got, _, _ := Digest(sparse); got != want {
		t.Fatalf("holes and written zeros hash differently: %s vs %s", got[:12], want[:12])
	}
	// The legacy digest is the one that differs by layout.
	if l1, _, _ := LegacyDigest(dense); l1 == func() string { l2, _, _ := LegacyDigest(sparse); return l2 }() {
		t.Log("this filesystem reports no holes: the legacy digests agree too")
	}
	// The streaming form (archives) agrees with the file form whatever the
	// pieces: bytes at odd offsets and lengths.
	h := newContentHash()
	for off := 0; off < size; {
		n := min(777+off%5000, size-off)
		if off%3 != 0 || !bytes.Equal(data[off:off+n], make([]byte, n)) { // sometimes a gap for zeros
			h.at(int64(off), int64(n)).Write(data[off : off+n])
		}
		off += n
	}
	if got := h.sum(size); got != want {
		t.Fatalf("the streamed digest %s differs from the file's %s", got[:12], want[:12])
	}
	// Any change shows.
	seen := map[string]string{want: "original"}
	for name, mod := range map[string]func([]byte) []byte{
		"a byte in a run":     func(b []byte) []byte { b[5000] ^= 1; return b },
		"a byte in the tail":  func(b []byte) []byte { b[size-1] ^= 1; return b },
		"a zero block filled": func(b []byte) []byte { b[1<<20+BlockSize] = 1; return b },
		"the run moved":       func(b []byte) []byte { return append(make([]byte, BlockSize), b[:size-BlockSize]...) },
		"one byte longer":     func(b []byte) []byte { return append(b, 0) },
		"one block shorter":   func(b []byte) []byte { return b[:size-BlockSize] },
	} {
		p := filepath.Join(dir, "mod")
		if err := os.WriteFile(p, mod(slices.Clone(data)), 0o600); err != nil {
			t.Fatal(err)
		}
		d, _, err := Digest(p)
		if err != nil {
			t.Fatal(err)
		}
		if prev, ok := seen[d]; ok {
			t.Errorf("%s hashes as %s", name, prev)
		}
		seen[d] = name
	}
	// The empty file and an all-zero one differ only by size.
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	zeros := filepath.Join(dir, "zeros")
	os.WriteFile(zeros, make([]byte, BlockSize), 0o600)
	if d1, _, _ := Digest(empty); d1 == func() string { d2, _, _ := Digest(zeros); return d2 }() {
		t.Error("an empty file and a block of zeros hash alike")
	}
}

// Formats 1 and 2 keep their digest: a manifest written with it verifies.
func TestVerifyLegacyFormat(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "memory.raw")
	f, _ := os.Create(p)
	f.Truncate(16 << 20)
	f.WriteAt([]byte("data"), 1<<20)
	f.Close()
	legacy, _, err := LegacyDigest(p)
	if err != nil {
		t.Fatal(err)
	}
	content, _, _ := Digest(p)
	if legacy == content {
		t.Fatal("the two digests agree")
	}
	st, _ := os.Stat(p)
	m := testManifest("x", []Artifact{{Role: "memory", Name: "memory.raw", Size: 16 << 20, SHA256: legacy, MtimeNS: st.ModTime().UnixNano()}})
	for _, format := range []int{1, 2} {
		m.FormatVersion, m.Host = format, nil
		if err := Verify(dir, m, true); err != nil {
			t.Errorf("format %d: %v", format, err)
		}
	}
	m.FormatVersion = 3
	if err := Verify(dir, m, true); err == nil {
		t.Error("a format 3 manifest verified with a legacy digest")
	}
	m.Artifacts[0].SHA256 = content
	if err := Verify(dir, m, true); err != nil {
		t.Error(err)
	}
}

func benchDigest(b *testing.B, fill func([]byte)) {
	p := filepath.Join(b.TempDir(), "memory.raw")
	f, _ := os.Create(p)
	buf := make([]byte, 1<<20)
	for off := int64(0); off < 256<<20; off += int64(len(buf)) {
		fill(buf)
		f.WriteAt(buf, off)
	}
	f.Close()
	b.SetBytes(256 << 20)
	b.ResetTimer()
	for b.Loop() {
		if _, _, err := Digest(p); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDigest hashes a 256 MiB file that is written zeros but for one
// page in 64 (a guest's memory image), and one of random bytes.
func BenchmarkDigest(b *testing.B) {
	b.Run("mostly-zero", func(b *testing.B) {
		benchDigest(b, func(buf []byte) {
			clear(buf)
			for i := 0; i < len(buf); i += 64 * BlockSize {
				rand.Read(buf[i : i+BlockSize])
			}
		})
	})
	b.Run("random", func(b *testing.B) { benchDigest(b, func(buf []byte) { rand.Read(buf) }) })
}

// FuzzDigestStream: the content digest of bytes fed in arbitrary pieces at
// increasing offsets, with gaps where the bytes are zero (as an archive's
// extents arrive), equals the digest of the file holding them.
func FuzzDigestStream(f *testing.F) {
	f.Add([]byte("data"), []byte{3, 200, 17}, uint16(5000))
	f.Add(bytes.Repeat([]byte{0, 1}, 5000), []byte{255, 0, 16, 0}, uint16(0))
	f.Add(make([]byte, 3*BlockSize+7), []byte{64, 64}, uint16(100))
	f.Fuzz(func(t *testing.T, data, cuts []byte, pad uint16) {
		content := append(make([]byte, int(pad)), data...) // data at an unaligned offset
		p := filepath.Join(t.TempDir(), "f")
		if err := os.WriteFile(p, content, 0o600); err != nil {
			t.Fatal(err)
		}
		want, _, err := Digest(p)
		if err != nil {
			t.Fatal(err)
		}
		h := newContentHash()
		for off, i := 0, 0; off < len(content); i++ {
			n := 1 + int(pad)%97
			if len(cuts) > 0 {
				n = 1 + int(cuts[i%len(cuts)])*37
			}
			n = min(n, len(content)-off)
			if piece := content[off : off+n]; i%2 == 0 || !bytes.Equal(piece, make([]byte, n)) {
				h.at(int64(off), int64(n)).Write(piece)
			}
			off += n
		}
		if got := h.sum(int64(len(content))); got != want {
			t.Fatalf("streamed %s, file %s", got[:12], want[:12])
		}
	})
}

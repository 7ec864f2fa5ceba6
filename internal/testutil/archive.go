package testutil

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// RewriteArchive decodes a snapshot export archive (zstd tar), passes each
// entry through fn (a nil data drops the entry) and encodes the result:
// tests build hostile archives from real exports with it. fn gets its own
// copy of each entry's data; the data it returns is kept (for a rewrite of
// the result), so it must not change it afterwards.
//
// The result is one zstd frame per tar entry (and one for the tar's end),
// which decodes as the whole stream does (concatenated frames are one
// stream): a test makes many variants of one export, which differ in one
// small entry, so an entry's frame is encoded once and reused, an archive
// is decoded once, and a variant never (its entries are kept). Each
// costs seconds of CPU under -race.
func RewriteArchive(t testing.TB, archive []byte, fn func(name string, data []byte) (string, []byte)) []byte {
	t.Helper()
	entries, err := decodedArchive(archive)
	if err != nil {
		t.Fatal(err)
	}
	var out, chunk bytes.Buffer
	var outEntries []archiveEntry
	tw := tar.NewWriter(&chunk)
	for _, e := range entries {
		name, data := fn(e.name, bytes.Clone(e.data))
		if data == nil {
			continue
		}
		if bytes.Equal(data, e.data) {
			data = e.data // the cached copy: the result's entries share it
		}
		outEntries = append(outEntries, archiveEntry{name, data})
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(data)), Typeflag: tar.TypeReg})
		tw.Write(data)
		tw.Flush()
		out.Write(archiveFrame(chunk.Bytes()))
		chunk.Reset()
	}
	tw.Close()
	out.Write(archiveFrame(chunk.Bytes()))
	// Variants are rewritten again (a manifest change on top of a disk
	// change): their entries are known, no need to decode them.
	cacheDecoded(sha256.Sum256(out.Bytes()), outEntries)
	return out.Bytes()
}

type archiveEntry struct {
	name string
	data []byte
}

// archives caches decoded archives and encoded frames by the SHA-256 of
// their bytes, for the life of the test process (a few archives of tens
// of MiB).
var archives struct {
	sync.Mutex
	decoded map[[32]byte][]archiveEntry
	frames  map[[32]byte][]byte
	enc     *zstd.Encoder
}

func decodedArchive(archive []byte) ([]archiveEntry, error) {
	key := sha256.Sum256(archive)
	archives.Lock()
	defer archives.Unlock()
	if e, ok := archives.decoded[key]; ok {
		return e, nil
	}
	zr, err := zstd.NewReader(bytes.NewReader(archive))
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	tr := tar.NewReader(zr)
	var entries []archiveEntry
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return nil, err
		}
		entries = append(entries, archiveEntry{hdr.Name, data})
	}
	cacheDecodedLocked(key, entries)
	return entries, nil
}

func cacheDecoded(key [32]byte, entries []archiveEntry) {
	archives.Lock()
	defer archives.Unlock()
	cacheDecodedLocked(key, entries)
}

// cacheDecodedLocked keeps up to 16 archives' entries (the variants of
// one export share its large entries).
func cacheDecodedLocked(key [32]byte, entries []archiveEntry) {
	if archives.decoded == nil || len(archives.decoded) >= 16 {
		archives.decoded = map[[32]byte][]archiveEntry{}
	}
	archives.decoded[key] = entries
}

// archiveFrame returns b encoded as one zstd frame.
func archiveFrame(b []byte) []byte {
	key := sha256.Sum256(b)
	archives.Lock()
	defer archives.Unlock()
	if f, ok := archives.frames[key]; ok {
		return f
	}
	if archives.enc == nil {
		archives.enc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	}
	f := archives.enc.EncodeAll(b, nil)
	if archives.frames == nil || len(archives.frames) >= 64 {
		archives.frames = map[[32]byte][]byte{}
	}
	archives.frames[key] = f
	return f
}

// PackedDigest is the snapshot digest (snapshot.Digest's scheme) of a
// packed artifact entry of an export archive: apparent size, then
// (offset, length, bytes) per data extent.
func PackedDigest(packed []byte) string {
	h := sha256.New()
	size := packed[:8]
	for p := packed[8:]; len(p) >= 16; {
		n := binary.BigEndian.Uint64(p[8:16])
		h.Write(p[:16+n])
		p = p[16+n:]
	}
	h.Write(size)
	return hex.EncodeToString(h.Sum(nil))
}

package testutil

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// RewriteArchive decodes a snapshot export archive (zstd tar), passes each
// entry through fn (a nil data drops the entry) and encodes the result:
// tests build hostile archives from real exports with it. fn must not
// change the data it is given in place (clone it first: it is shared with
// later calls; a change fails the test), nor the data it returns once
// returned (it is kept for a rewrite of the result).
//
// The result is one zstd frame per tar entry (and one for the tar's end),
// which decodes as the whole stream does (concatenated frames are one
// stream): a test makes many variants of one export, which differ in one
// small entry, so an entry's frame is encoded once and reused, an archive
// is decoded once, and a variant never (its entries are kept). Each of
// these, and each copy of a large entry, costs seconds of CPU under -race.
func RewriteArchive(t testing.TB, archive []byte, fn func(name string, data []byte) (string, []byte)) []byte {
	t.Helper()
	entries, err := decodedArchive(archive)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	var outEntries []archiveEntry
	for _, e := range entries {
		name, data := fn(e.name, e.data)
		if sha256.Sum256(e.data) != e.sum {
			t.Fatalf("RewriteArchive: fn changed %s in place: clone the data first", e.name)
		}
		if data == nil {
			continue
		}
		sum := e.sum
		if len(data) != len(e.data) || len(data) > 0 && &data[0] != &e.data[0] {
			sum = sha256.Sum256(data)
		}
		outEntries = append(outEntries, archiveEntry{name, data, sum})
		out.Write(entryFrame(name, data, sum))
	}
	out.Write(entryFrame("", nil, [32]byte{}))
	// Variants are rewritten again (a manifest change on top of a disk
	// change): their entries are known, no need to decode them.
	cacheDecoded(sha256.Sum256(out.Bytes()), outEntries)
	return out.Bytes()
}

type archiveEntry struct {
	name string
	data []byte
	sum  [32]byte // of data
}

// archives caches decoded archives and encoded frames by the SHA-256 of
// what they hold, for the life of the test process (a few archives of
// tens of MiB, whose variants share their large entries).
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
		if hdr.Size < 0 || hdr.Size > 1<<30 {
			return nil, fmt.Errorf("%s: size %d", hdr.Name, hdr.Size)
		}
		data := make([]byte, hdr.Size)
		if _, err := io.ReadFull(tr, data); err != nil {
			return nil, err
		}
		entries = append(entries, archiveEntry{hdr.Name, data, sha256.Sum256(data)})
	}
	cacheDecodedLocked(key, entries)
	return entries, nil
}

func cacheDecoded(key [32]byte, entries []archiveEntry) {
	archives.Lock()
	defer archives.Unlock()
	cacheDecodedLocked(key, entries)
}

// cacheDecodedLocked keeps up to 16 archives' entries.
func cacheDecodedLocked(key [32]byte, entries []archiveEntry) {
	if archives.decoded == nil || len(archives.decoded) >= 16 {
		archives.decoded = map[[32]byte][]archiveEntry{}
	}
	archives.decoded[key] = entries
}

// entryFrame returns the tar entry name holding data (whose SHA-256 is
// sum) as one zstd frame; an empty name gives the tar's end.
func entryFrame(name string, data []byte, sum [32]byte) []byte {
	key := sha256.Sum256(fmt.Appendf(nil, "%q %d %x", name, len(data), sum))
	archives.Lock()
	defer archives.Unlock()
	if f, ok := archives.frames[key]; ok {
		return f
	}
	var chunk bytes.Buffer
	tw := tar.NewWriter(&chunk)
	if name != "" {
		chunk.Grow(len(data) + 2048)
		tw.WriteHeader(&tar.Header{Name: name, Mode: 0o600, Size: int64(len(data)), Typeflag: tar.TypeReg})
		tw.Write(data)
		tw.Flush()
	} else {
		tw.Close()
	}
	if archives.enc == nil {
		archives.enc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	}
	f := archives.enc.EncodeAll(chunk.Bytes(), nil)
	if archives.frames == nil || len(archives.frames) >= 64 {
		archives.frames = map[[32]byte][]byte{}
	}
	archives.frames[key] = f
	return f
}

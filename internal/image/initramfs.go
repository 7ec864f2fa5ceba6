package image

import (
	"bufio"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/u-root/u-root/pkg/cpio"
)

// initrdRecipe changes whenever the initramfs layout changes.
const initrdRecipe = "initramfs/2" // 2: padded to 4 KiB

// InitrdModule is one kernel module to put in the initramfs.
type InitrdModule struct {
	Name string // file name, e.g. "virtio_blk.ko"
	Data []byte
}

// initramfsRecords returns the records of the initramfs, in archive order,
// with explicit directories, root ownership and zero mtimes.
func initramfsRecords(agent []byte, mods []InitrdModule) []cpio.Record {
	var recs []cpio.Record
	dir := func(name string, perm uint64) {
		recs = append(recs, cpio.Directory(name, perm))
	}
	for _, d := range []string{"dev", "proc", "sys", "newroot", "run", "etc", "lib", "lib/modules"} {
		dir(d, 0o755)
	}
	dir("tmp", 0o1777)
	dir("root", 0o700)
	recs = append(recs,
		cpio.CharDev("dev/console", 0o600, 5, 1),
		cpio.CharDev("dev/null", 0o666, 1, 3),
		cpio.StaticRecord(agent, cpio.Info{Name: "init", Mode: cpio.S_IFREG | 0o755}),
	)
	var order strings.Builder
	for _, m := range mods {
		name := path.Join("lib/modules", m.Name)
		recs = append(recs, cpio.StaticRecord(m.Data, cpio.Info{Name: name, Mode: cpio.S_IFREG | 0o644}))
		order.WriteString(m.Name + "\n")
	}
	recs = append(recs, cpio.StaticFile("lib/modules/load.order", order.String(), 0o644))
	for i := range recs {
		recs[i].Ino = uint64(i + 1)
		recs[i].NLink = 1
		if recs[i].Mode&cpio.S_IFMT == cpio.S_IFDIR {
			recs[i].NLink = 2
		}
		recs[i].UID, recs[i].GID, recs[i].MTime = 0, 0, 0
	}
	return recs
}

// WriteInitramfs writes a gzip'd (BestSpeed) newc cpio archive holding the
// agent as /init, a minimal /dev, the mount points the agent uses, and the
// modules under /lib/modules with /lib/modules/load.order. The output is a
// pure function of its inputs. It returns the number of records written.
//
// The archive is padded with zeros to a multiple of 4 KiB (the kernel skips
// zero padding after an archive). QEMU places the initrd at the top of low
// memory, 4 KiB aligned, and on the microvm machine its firmware keeps the
// ACPI tables in the last page there: an initrd whose size ends within a
// page could overwrite them (seen as a corrupt DSDT and a hang at "ACPI:
// Core revision" for some RAM sizes, e.g. 2048 MiB).
func WriteInitramfs(w io.Writer, agent []byte, mods []InitrdModule) (int, error) {
	cw0 := &countingWriter{w: w}
	w = cw0
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return 0, err
	}
	// gzip header without name or mtime: reproducible.
	zw.ModTime = time.Time{}
	bw := bufio.NewWriterSize(zw, 1<<20)
	recs := initramfsRecords(agent, mods)
	cw := cpio.Newc.Writer(bw)
	if err := cpio.WriteRecords(cw, recs); err != nil {
		return 0, err
	}
	if err := cpio.WriteTrailer(cw); err != nil {
		return 0, err
	}
	if err := bw.Flush(); err != nil {
		return 0, err
	}
	if err := zw.Close(); err != nil {
		return 0, err
	}
	if pad := (4096 - cw0.n%4096) % 4096; pad > 0 {
		if _, err := w.Write(make([]byte, pad)); err != nil {
			return 0, err
		}
	}
	return len(recs), nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// initrdKey is the content key of an initramfs: its recipe, the agent
// binary and the module set (names and sums, in order).
func initrdKey(agentSum string, km kernelManifest) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\nagent %s\n", initrdRecipe, agentSum)
	for _, m := range km.Modules {
		fmt.Fprintf(&b, "module %s %s\n", path.Base(m.Path), m.SHA256)
	}
	return sha256Hex([]byte(b.String()))[:16]
}

// ensureInitramfs returns the cached initramfs for this agent and kernel,
// building it when missing.
func (b *builder) ensureInitramfs(ctx context.Context, km kernelManifest, agent []byte, agentSum string) (initrdManifest, error) {
	key := initrdKey(agentSum, km)
	rel := filepath.Join("initramfs", km.ID, key)
	final := filepath.Join(b.dir, rel)
	if !b.o.Force {
		var im initrdManifest
		if err := readJSON(filepath.Join(final, manifestName), &im); err == nil &&
			im.FormatVersion == FormatVersion && im.Key == key && checkFiles(b.dir, im.Initrd) == nil {
			return im, nil
		}
	}
	b.step("initramfs: packing agent and modules", 0.1)
	var mods []InitrdModule
	for _, m := range km.Modules {
		data, err := os.ReadFile(filepath.Join(b.dir, filepath.FromSlash(m.Path)))
		if err != nil {
			return initrdManifest{}, err
		}
		if got := sha256Hex(data); got != m.SHA256 {
			return initrdManifest{}, fmt.Errorf("module %s: sha256 %s, kernel manifest says %s (rebuild with Force)", m.Path, got, m.SHA256)
		}
		mods = append(mods, InitrdModule{Name: path.Base(m.Path), Data: data})
	}
	work, err := b.tempDir("initramfs")
	if err != nil {
		return initrdManifest{}, err
	}
	defer removeAllSafe(work)
	f, err := os.Create(filepath.Join(work, "initramfs.cpio.gz"))
	if err != nil {
		return initrdManifest{}, err
	}
	n, err := WriteInitramfs(f, agent, mods)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return initrdManifest{}, fmt.Errorf("write initramfs: %w", err)
	}
	im := initrdManifest{
		FormatVersion: FormatVersion,
		Key:           key,
		KernelID:      km.ID,
		AgentSHA256:   agentSum,
		CreatedAt:     time.Now().UTC(),
		Entries:       n,
	}
	if im.Initrd, err = fileSumAs(work, "initramfs.cpio.gz", filepath.ToSlash(filepath.Join(rel, "initramfs.cpio.gz"))); err != nil {
		return im, err
	}
	if err := writeJSONAtomic(filepath.Join(work, manifestName), im); err != nil {
		return im, err
	}
	if err := publishDir(work, final); err != nil {
		return im, err
	}
	b.log.Info("initramfs cached", "path", im.Initrd.Path, "bytes", im.Initrd.Size)
	return im, nil
}

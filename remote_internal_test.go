package smolvm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/smolvm-go/smolvm/internal/backend"
	"github.com/smolvm-go/smolvm/internal/backend/fakebackend"
	"github.com/smolvm-go/smolvm/internal/remote"
	"github.com/smolvm-go/smolvm/internal/snapshot"
	"github.com/smolvm-go/smolvm/internal/testutil/memstore"
	"golang.org/x/sys/unix"
)

// SetRemoteStores makes m open stores[name] for the remote called name
// (an unknown name is unreachable).
func SetRemoteStores(m *Manager, stores map[string]remote.Store) {
	m.openStore = func(_ context.Context, r Remote) (remote.Store, error) {
		if st, ok := stores[r.Name]; ok {
			return st, nil
		}
		return nil, fmt.Errorf("%w: no store %s", remote.ErrUnreachable, r.Name)
	}
}

func remotesManager(t *testing.T) *Manager {
	t.Helper()
	return newTempManager(t, context.Background(), "remotes")
}

// TestRemotesConfig: remotes.json is written atomically with mode 0600,
// the first remote is the default, names/URLs/endpoints are validated
// (credentials in an endpoint refused), and a file that is not ours,
// open to others, a symlink, of a newer version, with an unknown field
// (a credential a user added) or inconsistent is refused, not used.
func TestRemotesConfig(t *testing.T) {
	ctx := context.Background()
	m := remotesManager(t)
	if rs, err := m.Remotes(ctx); err != nil || len(rs) != 0 {
		t.Fatalf("no config: %v %v", rs, err)
	}
	if _, err := m.findRemote(""); !errors.Is(err, ErrRemoteNotFound) || fixAction(err) != FixAddRemote {
		t.Fatalf("no default remote: %v", err)
	}
	if err := m.AddRemote(ctx, Remote{Name: "origin", URL: "s3://bucket-a/snaps", Endpoint: "http://127.0.0.1:7070"}); err != nil {
		t.Fatal(err)
	}
	if err := m.AddRemote(ctx, Remote{Name: "second", URL: "s3://bucket-b", Region: "eu-west-1"}); err != nil {
		t.Fatal(err)
	}
	rs, err := m.Remotes(ctx)
	if err != nil || len(rs) != 2 || !rs[0].Default || rs[1].Default || rs[0].Endpoint != "http://127.0.0.1:7070" || rs[1].Region != "eu-west-1" {
		t.Fatalf("remotes %+v %v", rs, err)
	}
	st, err := os.Lstat(m.remotesPath())
	if err != nil || st.Mode().Perm() != 0o600 || !st.Mode().IsRegular() {
		t.Fatalf("remotes.json: %v %v", st, err)
	}
	ents, _ := os.ReadDir(m.DataDir())
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("temp file left in the data dir: %s", e.Name())
		}
	}
	for _, c := range []struct {
		r    Remote
		want error
	}{
		{Remote{Name: "origin", URL: "s3://bucket-c"}, ErrRemoteExists},
		{Remote{Name: "Bad Name", URL: "s3://bucket-c"}, ErrInvalidID},
		{Remote{Name: "c", URL: "http://bucket-c"}, ErrInvalidConfig},
		{Remote{Name: "c", URL: "s3://bucket-c/../x"}, ErrInvalidConfig},
		{Remote{Name: "c", URL: "s3://bucket-c", Endpoint: "http://AKIA:secret@127.0.0.1:9000"}, ErrInvalidConfig},
		{Remote{Name: "c", URL: "s3://bucket-c", Endpoint: "http://127.0.0.1:9000/path"}, ErrInvalidConfig},
		{Remote{Name: "c", URL: "s3://bucket-c", Endpoint: "http://127.0.0.1:9000?x=1"}, ErrInvalidConfig},
		{Remote{Name: "c", URL: "s3://bucket-c", Endpoint: "ftp://127.0.0.1"}, ErrInvalidConfig},
		{Remote{Name: "c", URL: "s3://bucket-c", Region: "US EAST"}, ErrInvalidConfig},
	} {
		if err := m.AddRemote(ctx, c.r); !errors.Is(err, c.want) {
			t.Errorf("AddRemote(%+v) = %v, want %v", c.r, err, c.want)
		}
	}
	data, _ := os.ReadFile(m.remotesPath())
	if bytes.Contains(data, []byte("secret")) || bytes.Contains(data, []byte("bucket-c")) {
		t.Errorf("a refused remote reached the file: %s", data)
	}
	if err := m.SetDefaultRemote(ctx, "second"); err != nil {
		t.Fatal(err)
	}
	if r, err := m.findRemote(""); err != nil || r.Name != "second" {
		t.Fatalf("default after SetDefaultRemote: %+v %v", r, err)
	}
	if err := m.SetDefaultRemote(ctx, "nope"); !errors.Is(err, ErrRemoteNotFound) {
		t.Errorf("SetDefaultRemote(nope) = %v", err)
	}
	if err := m.RemoveRemote(ctx, "second"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.findRemote(""); !errors.Is(err, ErrRemoteNotFound) {
		t.Errorf("the removed default is still used: %v", err)
	}
	if err := m.RemoveRemote(ctx, "second"); !errors.Is(err, ErrRemoteNotFound) || fixAction(err) != FixAddRemote {
		t.Errorf("RemoveRemote of a missing remote: %v", err)
	}

	// The file is data: refused, never used, when it is not as written.
	good, _ := os.ReadFile(m.remotesPath())
	write := func(b []byte, mode os.FileMode) {
		os.Remove(m.remotesPath())
		if err := os.WriteFile(m.remotesPath(), b, mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(m.remotesPath(), mode)
	}
	for _, c := range []struct {
		name string
		data string
		mode os.FileMode
		want error
	}{
		{"open to others", string(good), 0o644, ErrInvalidConfig},
		{"unknown field", `{"version":1,"remotes":[{"name":"a","url":"s3://bucket-a","secret_key":"x"}]}`, 0o600, ErrInvalidConfig},
		{"newer version", `{"version":2,"remotes":[]}`, 0o600, ErrUnsupported},
		{"no version", `{"remotes":[]}`, 0o600, ErrInvalidConfig},
		{"default not listed", `{"version":1,"default":"b","remotes":[{"name":"a","url":"s3://bucket-a"}]}`, 0o600, ErrInvalidConfig},
		{"twice", `{"version":1,"remotes":[{"name":"a","url":"s3://bucket-a"},{"name":"a","url":"s3://bucket-b"}]}`, 0o600, ErrInvalidConfig},
		{"credentials in the endpoint", `{"version":1,"remotes":[{"name":"a","url":"s3://bucket-a","endpoint":"http://k:s@h:1"}]}`, 0o600, ErrInvalidConfig},
		{"data after it", `{"version":1,"remotes":[]} {}`, 0o600, ErrInvalidConfig},
		{"too big", `{"version":1,"remotes":[]}` + strings.Repeat(" ", maxRemotesFile), 0o600, ErrInvalidConfig},
	} {
		write([]byte(c.data), c.mode)
		if _, err := m.Remotes(ctx); !errors.Is(err, c.want) || fixAction(err) != FixEditOption {
			t.Errorf("%s: Remotes = %v, want %v with a fix", c.name, err, c.want)
		}
		if err := m.AddRemote(ctx, Remote{Name: "z", URL: "s3://bucket-z"}); err == nil {
			t.Errorf("%s: AddRemote over a refused file succeeded", c.name)
		}
	}
	os.Remove(m.remotesPath())
	target := filepath.Join(t.TempDir(), "elsewhere.json")
	os.WriteFile(target, good, 0o600)
	if err := os.Symlink(target, m.remotesPath()); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Remotes(ctx); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("symlinked remotes.json: %v", err)
	}
	os.Remove(m.remotesPath())
	if os.Geteuid() == 0 {
		write(good, 0o600)
		os.Chown(m.remotesPath(), 65534, 65534)
		if _, err := m.Remotes(ctx); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("remotes.json of another user: %v", err)
		}
	}
}

func fixAction(err error) FixAction {
	f, _ := FixOf(err)
	return f.Action
}

// TestRemoteErrorsMap: the store's errors come out as the SDK's sentinels
// with what to do next; a missing remote or snapshot says how to get one.
func TestRemoteErrorsMap(t *testing.T) {
	ctx := context.Background()
	m := remotesManager(t)
	if _, err := m.ListRemoteSnapshots(ctx, ""); !errors.Is(err, ErrRemoteNotFound) || fixAction(err) != FixAddRemote {
		t.Errorf("no remote: %v", err)
	}
	if err := m.AddRemote(ctx, Remote{Name: "origin", URL: "s3://bucket-a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.ListRemoteSnapshots(ctx, "other"); !errors.Is(err, ErrRemoteNotFound) || ErrorCode(err) != "remote_not_found" {
		t.Errorf("unknown remote: %v", err)
	}
	st := memstore.New()
	SetRemoteStores(m, map[string]remote.Store{"origin": st})
	for _, c := range []struct {
		cause error
		want  error
		fix   FixAction
		code  string
	}{
		{remote.ErrAuth, ErrRemoteAuth, FixSetEnv, "remote_auth"},
		{remote.ErrUnreachable, ErrRemoteUnreachable, FixCheckRemote, "remote_unreachable"},
	} {
		st.FailGet = func(string) error { return c.cause }
		st.Set("snapshots/x.json", []byte("{}"))
		_, err := m.PullSnapshot(ctx, "x", PullOptions{})
		if !errors.Is(err, c.want) || fixAction(err) != c.fix || ErrorCode(err) != c.code {
			t.Errorf("%v: pull = %v (code %s)", c.cause, err, ErrorCode(err))
		}
	}
	st.FailGet = nil
	st.Delete(ctx, "snapshots/x.json")
	_, err := m.PullSnapshot(ctx, "x", PullOptions{})
	if f, _ := FixOf(err); !errors.Is(err, ErrSnapshotNotFound) || f.Action != FixListRemoteSnapshots || f.Arg(ArgRemote) != "origin" {
		t.Errorf("pull of a snapshot the remote lacks: %v (fix %+v)", err, f)
	}
	if err := m.DeleteRemoteSnapshot(ctx, "", "x"); !errors.Is(err, ErrSnapshotNotFound) {
		t.Errorf("delete of a snapshot the remote lacks: %v", err)
	}
	if ents, _ := os.ReadDir(m.pullsDir()); len(ents) != 0 {
		t.Errorf("refused pulls left staging dirs: %v", ents)
	}
}

// PushedManifestFor encodes the manifest m (as decoded JSON, which a test
// may have made hostile) as PushSnapshot sends it: each artifact found in
// dir gets its digest and extents from there.
func PushedManifestFor(dir string, m map[string]any) ([]byte, error) {
	var arts []snapshot.Artifact
	exts := map[string][][2]int64{}
	for _, x := range m["artifacts"].([]any) {
		a := x.(map[string]any)
		name, _ := a["name"].(string)
		arts = append(arts, snapshot.Artifact{Name: name})
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			continue // a name the pull must refuse
		}
		format, _ := m["format_version"].(float64)
		d, ext, _, err := snapshot.DigestFile(f, int(format))
		f.Close()
		if err != nil {
			return nil, err
		}
		a["sha256"], exts[name] = d, ext
	}
	manJSON, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return encodePushed(manJSON, arts, exts)
}

// TestAutoPullChoosesDefaultRemote: a restore or fork of a snapshot this
// data dir lacks asks the default remote, and only it; with no default
// remote the not-found error names pulling.
func TestAutoPullChoosesDefaultRemote(t *testing.T) {
	ctx := context.Background()
	m := remotesManager(t)
	if _, err := m.FromSnapshot(ctx, "x", RestoreOptions{}); !errors.Is(err, ErrSnapshotNotFound) || fixAction(err) != FixPullSnapshot {
		t.Fatalf("no remote: %v", err)
	}
	a, b := memstore.New(), memstore.New()
	a.Set("snapshots/x.json", []byte(`{"not":"an index"}`)) // only a has something under that id
	SetRemoteStores(m, map[string]remote.Store{"a": a, "b": b})
	for _, r := range []string{"a", "b"} {
		if err := m.AddRemote(ctx, Remote{Name: r, URL: "s3://bucket-" + r}); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.SetDefaultRemote(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	_, err := m.Fork(ctx, "x", 1, ForkOptions{})
	if f, _ := FixOf(err); !errors.Is(err, ErrSnapshotNotFound) || f.Action != FixListRemoteSnapshots || f.Arg(ArgRemote) != "b" ||
		!strings.Contains(err.Error(), "default remote b") {
		t.Fatalf("default b (which lacks x): %v (fix %+v)", err, f)
	}
	if err := m.SetDefaultRemote(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	_, err = m.FromSnapshot(ctx, "x", RestoreOptions{})
	if !errors.Is(err, ErrSnapshotCorrupt) || !strings.Contains(err.Error(), "remote a") {
		t.Fatalf("default a (whose index of x is garbage): %v", err)
	}
	if l, _ := m.ListSnapshots(ctx, SnapshotFilter{}); len(l) != 0 {
		t.Errorf("listed after refused auto-pulls: %+v", l)
	}
}

// TestPullStagingSweep: the snapshot sweep removes an interrupted pull's
// staging dir once it is a day old, and keeps a younger one for a resume.
func TestPullStagingSweep(t *testing.T) {
	m := remotesManager(t)
	old, young := filepath.Join(m.pullsDir(), "old"), filepath.Join(m.pullsDir(), "young")
	for _, d := range []string{old, young} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(d, "memory.raw"), []byte("x"), 0o600)
	}
	past := time.Now().Add(-pullKeep - time.Hour)
	os.Chtimes(filepath.Join(old, "memory.raw"), past, past)
	os.Chtimes(old, past, past)
	m.cleanupSnapshots(context.Background())
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("a day-old staging dir is kept: %v", err)
	}
	if _, err := os.Stat(young); err != nil {
		t.Errorf("a young staging dir is removed: %v", err)
	}
}

// WrapRemoteStores makes m open its remotes' S3 stores through wrap (nil:
// as they are).
func WrapRemoteStores(m *Manager, wrap func(remote.Store) remote.Store) {
	m.openStore = func(ctx context.Context, r Remote) (remote.Store, error) {
		st, err := remote.NewS3(ctx, remote.S3Config{URL: r.URL, Endpoint: r.Endpoint, Region: r.Region})
		if err != nil || wrap == nil {
			return st, err
		}
		return wrap(st), nil
	}
}

// FuzzParsePushed: a remote snapshot's manifest (hostile bytes) never
// panics the parser, and what it accepts has extents in order inside each
// artifact.
func FuzzParsePushed(f *testing.F) {
	man := []byte(`{"format_version":2,"id":"s","vm_id":"v","backend":"qemu","type":"full"}`)
	f.Add([]byte(`{"smolvm_remote_format":1,"manifest":` + string(man) + `,"extents":{}}`))
	f.Add([]byte(`{"smolvm_remote_format":1,"manifest":{},"extents":{"state.bin":"AAEBAg=="}}`))
	f.Add([]byte(`{"smolvm_remote_format":2}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, ext, err := parsePushed(data)
		if err != nil {
			return
		}
		for _, a := range m.Artifacts {
			end := int64(0)
			for _, e := range ext[a.Name] {
				if e[0] < end || e[1] <= 0 || e[0]+e[1] > a.Size {
					t.Fatalf("accepted extent %v of %s (%d bytes) after %d", e, a.Name, a.Size, end)
				}
				end = e[0] + e[1]
			}
		}
	})
}

// FuzzParseRemotes: remotes.json (bytes on disk) never panics the parser,
// and what it accepts is valid remotes with a listed default.
func FuzzParseRemotes(f *testing.F) {
	f.Add([]byte(`{"version":1,"default":"a","remotes":[{"name":"a","url":"s3://bucket-a/p","endpoint":"http://127.0.0.1:9000"}]}`))
	f.Add([]byte(`{"version":1,"remotes":[]}`))
	f.Add([]byte(`{"version":2}`))
	m := &Manager{opts: Options{DataDir: "/nonexistent"}}
	f.Fuzz(func(t *testing.T, data []byte) {
		rf, err := m.parseRemotes(data)
		if err != nil {
			return
		}
		for _, r := range rf.Remotes {
			if err := validateRemote(r); err != nil {
				t.Fatalf("accepted %+v: %v", r, err)
			}
		}
		if _, ok := rf.find(rf.Default); rf.Default != "" && !ok {
			t.Fatalf("accepted default %q not listed", rf.Default)
		}
	})
}

// TestPushPullFormats (fake backend, memory store, milliseconds): with an
// unwritten extent in its memory file, a format 3 snapshot still verifies
// in full after its push read it, and pulls as is; a format 2 one (extent
// digests) verifies after its push too (which drops the page cache of
// what it read for that format only), pulls laid out as pushed, checked
// with its own digests, and lands as format 3.
func TestPushPullFormats(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src := newTempManager(t, ctx, "smvpp")
	vm := startFakeVM(t, ctx, src, "psrc")
	st := memstore.New()
	dst := newTempManager(t, ctx, "smvpq")
	for _, m := range []*Manager{src, dst} {
		SetRemoteStores(m, map[string]remote.Store{"origin": st})
		if err := m.AddRemote(ctx, Remote{Name: "origin", URL: "s3://bucket"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"p3", "p2"} {
		if _, err := vm.Snapshot(ctx, SnapshotOptions{ID: id, Type: SnapshotFull, ResumeSource: true}); err != nil {
			t.Fatal(err)
		}
		// Without the fake's disk (a tar, which an import's qcow2 check refuses).
		rewriteSnapshot(t, ctx, src, id, func(_ string, man *snapshot.Manifest) {
			isDisk := func(role string) bool { return role == "disk" }
			man.Artifacts = slices.DeleteFunc(man.Artifacts, func(a snapshot.Artifact) bool { return isDisk(a.Role) })
			man.Result.Artifacts = slices.DeleteFunc(man.Result.Artifacts, func(a backend.Artifact) bool { return isDisk(a.Role) })
		})
		{
			// An unwritten extent, as a qcow2's preallocation has: a hole to
			// SEEK_DATA until the push reads it, data while it is cached.
			mem := filepath.Join(src.snapRoot(), id, fakebackend.MemoryFile)
			f, err := os.OpenFile(mem, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			st, _ := f.Stat()
			if err := unix.Fallocate(int(f.Fd()), 0, st.Size(), 4<<20); err != nil {
				t.Fatal(err)
			}
			f.Sync()
			unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			f.Close()
			redescribe(t, ctx, src, id, map[string]int{"p3": 3, "p2": 2}[id])
		}
		if _, err := src.PushSnapshot(ctx, id, PushOptions{}); err != nil {
			t.Fatalf("push %s: %v", id, err)
		}
		if err := src.VerifySnapshot(ctx, id); err != nil {
			t.Errorf("full verify of %s after its push: %v", id, err)
		}
		if _, err := dst.PullSnapshot(ctx, id, PullOptions{}); err != nil {
			t.Fatalf("pull %s: %v", id, err)
		}
		checkUpgraded(t, ctx, dst, id)
	}
}

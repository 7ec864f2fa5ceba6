package consolelog

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestAppendKeepsTheTail(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	var all []byte
	for i := range 50 {
		chunk := bytes.Repeat([]byte{byte('a' + i%26)}, 100+i*7)
		all = append(all, chunk...)
		if err := Append(p, chunk, 1000); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		want := all[max(len(all)-1000, 0):]
		if !bytes.Equal(got, want) {
			t.Fatalf("after %d appends: %d bytes, want the last %d", i+1, len(got), len(want))
		}
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if err := Append(p, bytes.Repeat([]byte("z"), 5000), 1000); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, bytes.Repeat([]byte("z"), 1000)) {
		t.Errorf("an append over max keeps %d bytes", len(got))
	}
	tail, err := Tail(p, 10)
	if err != nil || string(tail) != "zzzzzzzzzz" {
		t.Errorf("Tail = %q, %v", tail, err)
	}
}

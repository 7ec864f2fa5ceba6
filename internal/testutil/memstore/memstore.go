// Package memstore is an in-memory remote.Store for tests of rules that
// need no object store (behind the interface the S3 store implements).
package memstore

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"

	"github.com/smolvm-go/smolvm/internal/remote"
)

var _ remote.Store = (*Store)(nil)

// Store is an in-memory remote.Store for no-VM rule tests (claims about
// the store are proven against versitygw). FailGet, when set, may fail a
// Get.
type Store struct {
	mu      sync.Mutex
	objs    map[string][]byte
	FailGet func(key string) error
}

// New returns an empty store.
func New() *Store { return &Store{objs: map[string][]byte{}} }

// Put stores r's bytes under key.
func (s *Store) Put(ctx context.Context, key string, r io.Reader, size int64) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.objs[key] = b
	return nil
}

// Get reads key (remote.ErrNotFound when absent).
func (s *Store) Get(ctx context.Context, key string) (io.ReadCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.FailGet != nil {
		if err := s.FailGet(key); err != nil {
			return nil, err
		}
	}
	b, ok := s.objs[key]
	if !ok {
		return nil, fmt.Errorf("%w: %s", remote.ErrNotFound, key)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// Exists reports whether key is stored.
func (s *Store) Exists(ctx context.Context, key string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.objs[key]
	return ok, nil
}

// List returns the keys with prefix, sorted.
func (s *Store) List(ctx context.Context, prefix string) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for k := range s.objs {
		if strings.HasPrefix(k, prefix) {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out, nil
}

// Delete removes key.
func (s *Store) Delete(ctx context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.objs, key)
	return nil
}

// Keys lists the stored keys with prefix.
func (s *Store) Keys(prefix string) []string {
	k, _ := s.List(context.Background(), prefix)
	return k
}

// Set replaces an object (a test corrupting the store).
func (s *Store) Set(key string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.objs[key] = b
}

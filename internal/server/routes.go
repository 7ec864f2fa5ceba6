package server

import (
	"context"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/smolvm-go/smolvm/api"
)

// class is a route's deadline class.
type class int

const (
	quick  class = iota // RequestTimeout
	long                // LongTimeout (also file transfers)
	stream              // its own: exec timeout_s + ExecGrace; events until the client leaves or shutdown
)

// routes builds the mux: each operation of api/openapi.yaml, the Extra
// handlers, 405 (with Allow) for a known path with another method, 404
// for the rest, all in the one error shape.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	methods := map[string][]string{} // path -> methods
	for _, rt := range s.table() {
		methods[rt.path] = append(methods[rt.path], rt.method)
		mux.Handle(rt.method+" "+rt.path, s.wrap(rt.class, rt.h))
	}
	for pattern, h := range s.cfg.Extra {
		method, path, ok := strings.Cut(pattern, " ")
		if !ok {
			method, path = "", pattern
		}
		if method != "" {
			methods[path] = append(methods[path], method)
		}
		if strings.HasPrefix(path, "/v1/sandboxes/") { // exec/ws: a stream on a sandbox
			h = s.limited(h)
		}
		mux.Handle(pattern, s.recoverer(h))
	}
	// A known path with another method: 405 with Allow. These patterns
	// have no method, so they live in a mux of their own (in the main one
	// they would conflict with the method patterns of other paths).
	paths := http.NewServeMux()
	for path, ms := range methods {
		if slices.Contains(ms, "GET") && !slices.Contains(ms, "HEAD") {
			ms = append(ms, "HEAD")
		}
		sort.Strings(ms)
		allow := strings.Join(ms, ", ")
		paths.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, errCode(codeMethodNotAllowed, "method "+r.Method+" is not allowed on "+r.URL.Path+"; allowed: "+allow))
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if h, pattern := paths.Handler(r); pattern != "" {
			h.ServeHTTP(w, r)
			return
		}
		writeError(w, errCode(codeNotFound, "no such route: "+r.Method+" "+r.URL.Path+" (see GET /openapi.json)"))
	})
	return mux
}

// route is one operation of api/openapi.yaml.
type route struct {
	method, path string
	class        class
	h            http.HandlerFunc
}

// table is every operation of the spec the daemon itself serves (the spec's
// x-smolvm-extra paths come from Config.Extra). TestSpecMatchesRoutes
// holds the two equal.
func (s *Server) table() []route {
	return []route{
		{"GET", "/openapi.json", quick, s.openapi},
		{"GET", "/v1/health", quick, s.health},
		{"GET", "/v1/version", quick, s.version},
		{"POST", "/v1/sandboxes", long, s.createSandbox},
		{"GET", "/v1/sandboxes", quick, s.listSandboxes},
		{"GET", "/v1/sandboxes/{id}", quick, s.getSandbox},
		{"DELETE", "/v1/sandboxes/{id}", long, s.deleteSandbox},
		{"POST", "/v1/sandboxes/{id}/start", long, s.lifecycle("start")},
		{"POST", "/v1/sandboxes/{id}/stop", long, s.lifecycle("stop")},
		{"POST", "/v1/sandboxes/{id}/pause", quick, s.lifecycle("pause")},
		{"POST", "/v1/sandboxes/{id}/resume", quick, s.lifecycle("resume")},
		{"POST", "/v1/sandboxes/{id}/timeout", quick, s.setTimeout},
		{"POST", "/v1/sandboxes/{id}/exec", stream, s.exec},
		{"POST", "/v1/sandboxes/{id}/exec/stream", stream, s.execStream},
		{"PUT", "/v1/sandboxes/{id}/files", long, s.putFile},
		{"GET", "/v1/sandboxes/{id}/files", long, s.getFile},
		{"POST", "/v1/sandboxes/{id}/ports", quick, s.exposePort},
		{"GET", "/v1/sandboxes/{id}/logs", quick, s.logs},
		{"POST", "/v1/sandboxes/{id}/snapshots", long, s.createSnapshot},
		{"GET", "/v1/snapshots", quick, s.listSnapshots},
		{"GET", "/v1/snapshots/{id}", quick, s.getSnapshot},
		{"DELETE", "/v1/snapshots/{id}", long, s.deleteSnapshot},
		{"POST", "/v1/snapshots/{id}/restore", long, s.restore},
		{"POST", "/v1/snapshots/{id}/fork", long, s.fork},
		{"GET", "/v1/templates", quick, s.listTemplates},
		{"POST", "/v1/templates", long, s.buildTemplate},
		{"DELETE", "/v1/templates/{key}", long, s.deleteTemplate},
		{"POST", "/v1/templates/gc", long, s.collectTemplates},
		{"GET", "/v1/events", stream, s.eventStream},
	}
}

// admit takes a place among the long operations and streams in flight
// (release it with <-s.inFlight), or answers 429 with Retry-After and
// says false when Config.MaxInFlight are.
func (s *Server) admit(w http.ResponseWriter) bool {
	select {
	case s.inFlight <- struct{}{}:
		return true
	default:
		w.Header().Set("Retry-After", "1")
		writeError(w, errCode(codeTooMany, fmt.Sprintf("%d long operations and streams are in flight, the daemon's limit (smolvm serve --max-in-flight): retry later", s.cfg.MaxInFlight)))
		return false
	}
}

// limited is h behind admit: for the mounted streams (exec/ws).
func (s *Server) limited(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.admit(w) {
			return
		}
		defer func() { <-s.inFlight }()
		h.ServeHTTP(w, r)
	})
}

// wrap gives a spec operation its deadline, its place among the long
// operations in flight (Config.MaxInFlight; quick calls take none), JSON
// body limit, validation against the spec and panic recovery.
func (s *Server) wrap(c class, h http.HandlerFunc) http.Handler {
	return s.recoverer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var cancel context.CancelFunc = func() {}
		switch c {
		case quick:
			r = r.WithContext(ctxTimeout(r.Context(), s.cfg.RequestTimeout, &cancel))
		case long:
			r = r.WithContext(ctxTimeout(r.Context(), s.cfg.LongTimeout, &cancel))
		}
		defer cancel()
		if c != quick {
			if !s.admit(w) {
				return
			}
			defer func() { <-s.inFlight }()
		}
		if !rawBody(r) {
			r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
		}
		if err := s.val.request(r); err != nil {
			writeError(w, err)
			return
		}
		h(w, r)
	}))
}

func ctxTimeout(ctx context.Context, d time.Duration, cancel *context.CancelFunc) context.Context {
	ctx, *cancel = context.WithTimeout(ctx, d)
	return ctx
}

// rawBody: the request body is streamed data (a file, a command's stdin),
// not a JSON document; it has no size limit.
func rawBody(r *http.Request) bool {
	return r.Method == "PUT" || strings.HasSuffix(r.URL.Path, "/exec/stream")
}

func isJSON(ct string) bool {
	return strings.HasPrefix(strings.ToLower(strings.TrimSpace(ct)), "application/json")
}

// recoverer turns a handler's panic into a 500 in the error shape (the
// daemon keeps serving the others).
func (s *Server) recoverer(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				buf := make([]byte, 8<<10)
				buf = buf[:runtime.Stack(buf, false)]
				s.log.Error("handler panic", "route", r.Method+" "+r.URL.Path, "panic", v, "stack", string(buf))
				writeError(w, errCode("internal", "internal error"))
			}
		}()
		h.ServeHTTP(w, r)
	})
}

func (s *Server) openapi(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Write(api.JSON())
}

package server

import (
	"context"
	"log/slog"
	"time"
)

type progressKey struct{}

// progressFunc receives one step of a long operation.
type progressFunc func(step string, elapsed time.Duration)

func withProgress(ctx context.Context, f progressFunc) context.Context {
	return context.WithValue(ctx, progressKey{}, f)
}

func progressOf(ctx context.Context) progressFunc {
	f, _ := ctx.Value(progressKey{}).(progressFunc)
	return f
}

// progressHandler is the Manager's log handler: it passes records to the
// daemon's log, and hands the SDK's step records ("step" attribute, logged
// with the request's context) to the request that asked for progress.
type progressHandler struct{ slog.Handler }

func (h progressHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return progressOf(ctx) != nil || h.Handler.Enabled(ctx, l)
}

func (h progressHandler) Handle(ctx context.Context, r slog.Record) error {
	if f := progressOf(ctx); f != nil {
		var step string
		var elapsed time.Duration
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "step":
				step = a.Value.String()
			case "elapsed":
				elapsed = a.Value.Duration()
			}
			return true
		})
		if step != "" {
			f(r.Message+": "+step, elapsed)
		}
	}
	if !h.Handler.Enabled(ctx, r.Level) {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h progressHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return progressHandler{h.Handler.WithAttrs(as)}
}

func (h progressHandler) WithGroup(name string) slog.Handler {
	return progressHandler{h.Handler.WithGroup(name)}
}

package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm"
	"github.com/smolvm-go/smolvm/internal/image"
	"github.com/smolvm-go/smolvm/internal/server"
)

// API measures the HTTP API daemon (internal/server) in this process, on
// a unix socket, with its own data dir (so it runs beside a daemon that
// serves the user's): the exec round trip through the API against the
// SDK's Run on the same VM in the same run (goal <= 1.3x), and a load of
// clients x execs spread over sandboxes (errors, p50, p99).
func API(ctx context.Context, o Options, clients, execs, sandboxes int) (Report, error) {
	o.defaults()
	img, err := image.Open(o.Manager.ImageDir(), o.Image)
	if err != nil {
		return Report{}, err
	}
	rep := Report{Host: hostInfo(o, img)}
	dir, err := os.MkdirTemp("", "smolvm-bench-api-")
	if err != nil {
		return rep, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "api.sock")
	s, err := server.New(ctx, server.Config{
		Options: smolvm.Options{DataDir: filepath.Join(dir, "data"), ImageDir: o.Manager.ImageDir(),
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))},
		Socket: sock,
	})
	if err != nil {
		return rep, err
	}
	defer s.Close()
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	ready := make(chan struct{})
	go func() { served <- s.Serve(sctx, func() { close(ready) }) }()
	defer func() { stop(); <-served }()
	select {
	case <-ready:
	case err := <-served:
		return rep, err
	}
	transport := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: clients + 4,
	}
	defer transport.CloseIdleConnections()
	c := &http.Client{Transport: transport}

	ids := make([]string, sandboxes)
	defer func() {
		for _, id := range ids {
			if id != "" {
				call(context.WithoutCancel(ctx), c, "DELETE", "/v1/sandboxes/"+id, nil, nil)
			}
		}
	}()
	for i := range ids {
		id := fmt.Sprintf("bench-api-%d", i)
		t0 := time.Now()
		if err := call(ctx, c, "POST", "/v1/sandboxes", map[string]any{"name": id, "image": o.Image, "memory_mib": o.MemoryMiB, "no_network": true}, nil); err != nil {
			return rep, fmt.Errorf("create %s: %w", id, err)
		}
		ids[i] = id
		fmt.Fprintf(o.Progress, "sandbox %s created through the API in %.0f ms\n", id, ms(time.Since(t0)))
	}

	// Round trip: API exec vs the SDK's Run on the same VM, alternating.
	vm, err := s.Manager().Open(ctx, ids[0])
	if err != nil {
		return rep, err
	}
	defer vm.Close()
	n := 20 * o.Rounds
	var apiT, sdkT []float64
	for i := range n {
		t0 := time.Now()
		var res server.ExecResult
		if err := call(ctx, c, "POST", "/v1/sandboxes/"+ids[0]+"/exec", map[string]any{"command": "true"}, &res); err != nil || !res.OK {
			return rep, fmt.Errorf("API exec: %v %+v", err, res)
		}
		apiT = append(apiT, ms(time.Since(t0)))
		t0 = time.Now()
		if _, err := vm.Run(ctx, "true"); err != nil {
			return rep, err
		}
		sdkT = append(sdkT, ms(time.Since(t0)))
		if i == 0 || (i+1)%20 == 0 {
			fmt.Fprintf(o.Progress, "round trip %d/%d: API %.1f ms, SDK %.1f ms\n", i+1, n, apiT[i], sdkT[i])
		}
	}
	rep.Ratios = append(rep.Ratios, newRatio("exec round trip through the API (ms)",
		newFigure("POST /v1/sandboxes/{id}/exec {\"command\":\"true\"} over the unix socket", "ms", apiT),
		newFigure("SDK VM.Run(\"true\") on the same VM", "ms", sdkT), 1.3))

	// Load: clients at once, each execs times, over the sandboxes.
	var mu sync.Mutex
	var lat []float64
	errs := 0
	var wg sync.WaitGroup
	t0 := time.Now()
	for k := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cc := &http.Client{Transport: transport}
			id := ids[k%len(ids)]
			for j := range execs {
				t := time.Now()
				var res server.ExecResult
				err := call(ctx, cc, "POST", "/v1/sandboxes/"+id+"/exec", map[string]any{"command": fmt.Sprintf("echo %d-%d", k, j)}, &res)
				d := ms(time.Since(t))
				mu.Lock()
				lat = append(lat, d)
				if err != nil || res.Stdout != fmt.Sprintf("%d-%d\n", k, j) {
					errs++
					if errs <= 5 {
						fmt.Fprintf(o.Progress, "load error (client %d, exec %d): %v %+v\n", k, j, err, res)
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	wall := time.Since(t0)
	fmt.Fprintf(o.Progress, "load: %d clients x %d execs over %d sandboxes in %.1f s, %d errors\n", clients, execs, sandboxes, wall.Seconds(), errs)
	what := fmt.Sprintf("%d clients x %d execs over %d sandboxes", clients, execs, sandboxes)
	rep.Figures = append(rep.Figures,
		newFigure("exec latency under load, p50 ("+what+")", "ms", []float64{percentile(lat, 50)}),
		newFigure("exec latency under load, p99 ("+what+")", "ms", []float64{percentile(lat, 99)}),
		newFigure("errors under load ("+what+")", "count", []float64{float64(errs)}),
		newFigure("throughput under load ("+what+")", "execs/s", []float64{float64(len(lat)) / wall.Seconds()}))
	return rep, nil
}

// percentile is the p-th percentile (nearest rank) of s.
func percentile(s []float64, p float64) float64 {
	if len(s) == 0 {
		return 0
	}
	c := slices.Clone(s)
	slices.Sort(c)
	k := int(float64(len(c))*p/100+0.5) - 1
	return c[max(0, min(k, len(c)-1))]
}

// call does one JSON request; a non-2xx answer is an error with its body.
func call(ctx context.Context, c *http.Client, method, path string, body, out any) error {
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://smolvm"+path, r)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, bytes.TrimSpace(b))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

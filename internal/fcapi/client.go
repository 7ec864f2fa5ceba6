package fcapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// DefaultTimeout bounds a call whose context carries no deadline.
const DefaultTimeout = 10 * time.Second

// maxBody caps how much of a response body is read.
const maxBody = 1 << 20

// Error is a non-2xx answer from the Firecracker API.
type Error struct {
	Op           string // method and path, e.g. "PUT /snapshot/create"
	Status       int    // HTTP status code
	FaultMessage string // Firecracker's fault_message (or the raw body when it was not JSON)
}

func (e *Error) Error() string {
	msg := e.FaultMessage
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	return fmt.Sprintf("firecracker %s: %d: %s", e.Op, e.Status, msg)
}

// Client talks to one Firecracker process over its API socket. It is safe
// for concurrent use. Close releases idle connections.
type Client struct {
	socketPath string
	httpc      *http.Client
	transport  *http.Transport

	// Timeout bounds a call whose context has no deadline; zero means
	// DefaultTimeout. Set it before the first call.
	Timeout time.Duration
}

// New returns a client for the API socket at socketPath. Nothing is dialled
// until the first call.
func New(socketPath string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socketPath)
		},
		DisableCompression:     true,
		MaxIdleConns:           1,
		MaxIdleConnsPerHost:    1,
		IdleConnTimeout:        30 * time.Second,
		MaxResponseHeaderBytes: 64 << 10,
	}
	return &Client{
		socketPath: socketPath,
		transport:  tr,
		httpc:      &http.Client{Transport: tr},
	}
}

// SocketPath is the API socket this client dials.
func (c *Client) SocketPath() string { return c.socketPath }

// Close drops idle keep-alive connections. The client stays usable.
func (c *Client) Close() error {
	c.transport.CloseIdleConnections()
	return nil
}

// PutBootSource sets the kernel, initrd and command line (pre-boot).
func (c *Client) PutBootSource(ctx context.Context, b BootSource) error {
	return c.do(ctx, http.MethodPut, "/boot-source", b, nil)
}

// PutMachineConfig sets vCPUs and memory (pre-boot).
func (c *Client) PutMachineConfig(ctx context.Context, m MachineConfig) error {
	return c.do(ctx, http.MethodPut, "/machine-config", m, nil)
}

// GetMachineConfig returns the current machine configuration.
func (c *Client) GetMachineConfig(ctx context.Context) (MachineConfig, error) {
	var m MachineConfig
	err := c.do(ctx, http.MethodGet, "/machine-config", nil, &m)
	return m, err
}

// PutDrive creates or replaces drive d.DriveID (pre-boot).
func (c *Client) PutDrive(ctx context.Context, d Drive) error {
	if d.DriveID == "" {
		return errors.New("fcapi: PutDrive: empty drive_id")
	}
	return c.do(ctx, http.MethodPut, "/drives/"+url.PathEscape(d.DriveID), d, nil)
}

// PatchDrive updates drive d.DriveID after boot or after a snapshot load
// (new backing file and/or rate limiter).
func (c *Client) PatchDrive(ctx context.Context, d PartialDrive) error {
	if d.DriveID == "" {
		return errors.New("fcapi: PatchDrive: empty drive_id")
	}
	return c.do(ctx, http.MethodPatch, "/drives/"+url.PathEscape(d.DriveID), d, nil)
}

// PutNetworkInterface attaches a TAP-backed interface (pre-boot).
func (c *Client) PutNetworkInterface(ctx context.Context, n NetworkInterface) error {
	if n.IfaceID == "" {
		return errors.New("fcapi: PutNetworkInterface: empty iface_id")
	}
	return c.do(ctx, http.MethodPut, "/network-interfaces/"+url.PathEscape(n.IfaceID), n, nil)
}

// PutVsock configures the vsock device (pre-boot).
func (c *Client) PutVsock(ctx context.Context, v Vsock) error {
	return c.do(ctx, http.MethodPut, "/vsock", v, nil)
}

// PutLogger configures Firecracker's own log output.
func (c *Client) PutLogger(ctx context.Context, l Logger) error {
	return c.do(ctx, http.MethodPut, "/logger", l, nil)
}

// PutMetrics configures the metrics output file or pipe.
func (c *Client) PutMetrics(ctx context.Context, m Metrics) error {
	return c.do(ctx, http.MethodPut, "/metrics", m, nil)
}

// Action runs a synchronous action (ActionInstanceStart, ...).
func (c *Client) Action(ctx context.Context, actionType string) error {
	return c.do(ctx, http.MethodPut, "/actions", InstanceActionInfo{ActionType: actionType}, nil)
}

// StartInstance boots the configured microVM.
func (c *Client) StartInstance(ctx context.Context) error {
	return c.Action(ctx, ActionInstanceStart)
}

// PatchVM sets the VM state (VMPaused or VMResumed).
func (c *Client) PatchVM(ctx context.Context, state string) error {
	return c.do(ctx, http.MethodPatch, "/vm", VM{State: state}, nil)
}

// Pause pauses the vCPUs. Pausing a paused VM succeeds.
func (c *Client) Pause(ctx context.Context) error { return c.PatchVM(ctx, VMPaused) }

// Resume resumes the vCPUs. Resuming a running VM succeeds.
func (c *Client) Resume(ctx context.Context) error { return c.PatchVM(ctx, VMResumed) }

// CreateSnapshot writes the VM state and memory files; the VM must be paused.
func (c *Client) CreateSnapshot(ctx context.Context, s SnapshotCreate) error {
	return c.do(ctx, http.MethodPut, "/snapshot/create", s, nil)
}

// LoadSnapshot loads a snapshot into a fresh Firecracker process (nothing
// but the logger and metrics may have been configured). On failure
// Firecracker exits.
func (c *Client) LoadSnapshot(ctx context.Context, s SnapshotLoad) error {
	return c.do(ctx, http.MethodPut, "/snapshot/load", s, nil)
}

// InstanceInfo returns GET / (id, state, VMM version).
func (c *Client) InstanceInfo(ctx context.Context) (InstanceInfo, error) {
	var i InstanceInfo
	err := c.do(ctx, http.MethodGet, "/", nil, &i)
	return i, err
}

// Version returns the Firecracker build version from GET /version.
func (c *Client) Version(ctx context.Context) (string, error) {
	var v FirecrackerVersion
	if err := c.do(ctx, http.MethodGet, "/version", nil, &v); err != nil {
		return "", err
	}
	return v.FirecrackerVersion, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	op := method + " " + path
	if _, ok := ctx.Deadline(); !ok {
		t := c.Timeout
		if t <= 0 {
			t = DefaultTimeout
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, t)
		defer cancel()
	}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("fcapi: %s: encode body: %w", op, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, body)
	if err != nil {
		return fmt.Errorf("fcapi: %s: %w", op, err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.httpc.Do(req)
	if err != nil {
		return fmt.Errorf("fcapi: %s: %w", op, unwrapURLError(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("fcapi: %s: read response: %w", op, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return &Error{Op: op, Status: resp.StatusCode, FaultMessage: faultMessage(data)}
	}
	if out == nil {
		return nil
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return fmt.Errorf("fcapi: %s: empty response body (status %d)", op, resp.StatusCode)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("fcapi: %s: decode response: %w", op, err)
	}
	return nil
}

// faultMessage extracts fault_message from an error body, falling back to
// the trimmed body text.
func faultMessage(data []byte) string {
	var f faultBody
	if err := json.Unmarshal(data, &f); err == nil && f.FaultMessage != "" {
		return f.FaultMessage
	}
	return strings.TrimSpace(string(data))
}

// unwrapURLError drops net/http's *url.Error wrapper ("Put
// \"http://localhost/vm\": ...") which only repeats the op; the cause (dial
// error, context deadline) stays reachable with errors.Is.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

package netstack

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/smolvm-go/smolvm/internal/netpolicy"
)

// The control channel: a unix socket in the VM's private run dir (the
// launcher creates it and hands the listener to the sidecar). One JSON
// request line per connection, one JSON reply line.

const (
	maxControlLine  = 4096
	controlDeadline = 5 * time.Second
	maxControlConns = 8
)

// Request is one control request.
type Request struct {
	Op      string   `json:"op"` // "expose", "stats"
	Forward *Forward `json:"forward,omitempty"`
}

// Reply answers a Request.
type Reply struct {
	OK    bool             `json:"ok"`
	Error string           `json:"error,omitempty"`
	Stats *netpolicy.Stats `json:"stats,omitempty"`
}

// ServeControl serves the control channel on ln until it is closed or the
// network stops.
func (n *Net) ServeControl(ln net.Listener) {
	go func() {
		<-n.ctx.Done()
		ln.Close()
	}()
	sem := make(chan struct{}, maxControlConns)
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		select {
		case sem <- struct{}{}:
		default:
			c.Close()
			continue
		}
		go func() {
			defer func() { <-sem }()
			defer c.Close()
			c.SetDeadline(time.Now().Add(controlDeadline))
			rep := n.control(c)
			b, _ := json.Marshal(rep)
			c.Write(append(b, '\n'))
		}()
	}
}

func (n *Net) control(r io.Reader) Reply {
	line, err := bufio.NewReaderSize(io.LimitReader(r, maxControlLine), maxControlLine).ReadSlice('\n')
	if err != nil {
		return Reply{Error: "bad request: want one JSON line of at most 4 KiB"}
	}
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return Reply{Error: "bad request: " + err.Error()}
	}
	switch req.Op {
	case "stats":
		s := n.chk.Stats()
		s.TxBytes, s.RxBytes = n.frameBytes()
		return Reply{OK: true, Stats: &s}
	case "expose":
		if req.Forward == nil {
			return Reply{Error: "expose: no forward"}
		}
		if err := n.Expose(*req.Forward); err != nil {
			return Reply{Error: err.Error()}
		}
		return Reply{OK: true}
	default:
		return Reply{Error: fmt.Sprintf("unknown op %q", req.Op)}
	}
}

// Call sends one request to the control socket at path and returns the
// reply; a reply with an error becomes an error.
func Call(ctx context.Context, path string, req Request) (Reply, error) {
	ctx, cancel := context.WithTimeout(ctx, controlDeadline)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return Reply{}, fmt.Errorf("network sidecar: %w", err)
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	b, _ := json.Marshal(req)
	if _, err := c.Write(append(b, '\n')); err != nil {
		return Reply{}, fmt.Errorf("network sidecar: %w", err)
	}
	line, err := bufio.NewReaderSize(io.LimitReader(c, 1<<20), 1<<16).ReadBytes('\n')
	if err != nil {
		return Reply{}, fmt.Errorf("network sidecar: reading reply: %w", err)
	}
	var rep Reply
	if err := json.Unmarshal(line, &rep); err != nil {
		return Reply{}, fmt.Errorf("network sidecar: bad reply: %w", err)
	}
	if !rep.OK {
		return rep, fmt.Errorf("network sidecar: %s", rep.Error)
	}
	return rep, nil
}

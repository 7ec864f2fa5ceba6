package bench

import (
	"context"
	"sync"
	"time"

	"github.com/smolvm-go/smolvm"
)

// probeInterval is how often the downtime probe pings the guest.
const probeInterval = 5 * time.Millisecond

// pauseProbe measures how long a running VM stops answering: it pings the
// guest agent on a channel of its own (one ping in flight, a new one every
// interval) and keeps the longest round trip. A ping sent while the VM is
// stopped waits in QEMU's chardev until the guest runs again, so the
// longest round trip spans the stop; it under-counts by at most one
// interval (a ping is sent at most that long after the stop) and
// over-counts by one normal round trip (about 1 ms under TCG).
//
// Why not QEMU's own STOP and RESUME events: the VM has one QMP socket,
// and QEMU's socket chardev serves one client at a time. The backend holds
// that client from its stop to the end of the save and dials it again for
// the cont, so no second client can listen (or poll query-status) while
// the VM is stopped; its connect would wait until the snapshot is over.
type pauseProbe struct {
	rc   *rawConn
	stop chan struct{}
	done chan struct{}

	mu  sync.Mutex
	max time.Duration
	n   int
	err error
}

// startPauseProbe opens a spare agent channel of the VM info describes and
// starts pinging.
func startPauseProbe(ctx context.Context, info smolvm.Info, interval time.Duration) (*pauseProbe, error) {
	rc, err := rawChannel(ctx, info)
	if err != nil {
		return nil, err
	}
	return newPauseProbe(rc, interval), nil
}

// newPauseProbe starts pinging on rc, which it closes in finish.
func newPauseProbe(rc *rawConn, interval time.Duration) *pauseProbe {
	p := &pauseProbe{rc: rc, stop: make(chan struct{}), done: make(chan struct{})}
	go p.run(interval)
	return p
}

func (p *pauseProbe) run(interval time.Duration) {
	defer close(p.done)
	for i := 0; ; i++ {
		t0 := time.Now()
		d, err := p.rc.ping(i)
		p.mu.Lock()
		if err != nil {
			p.err = err
		} else {
			p.n++
			p.max = max(p.max, d)
		}
		p.mu.Unlock()
		if err != nil {
			return
		}
		wait := time.NewTimer(time.Until(t0.Add(interval)))
		select {
		case <-p.stop:
			wait.Stop()
			return
		case <-wait.C:
		}
	}
}

// finish stops the probe and returns the longest round trip and how many
// pings were answered.
func (p *pauseProbe) finish() (time.Duration, int, error) {
	close(p.stop)
	p.rc.c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a ping in flight ends by then
	<-p.done
	p.rc.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.max, p.n, p.err
}

package netstack

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// maxFrame bounds one Ethernet frame on the QEMU stream (the stream netdev
// carries no offloads: frames are at most MTU + 14 + a VLAN tag; allow
// jumbo-ish headroom, refuse anything larger as a broken stream).
const maxFrame = 65536

// ErrFrameTooLarge means the stream announced a frame over maxFrame.
var ErrFrameTooLarge = errors.New("netstack: frame larger than 64 KiB on the QEMU stream")

// readFrames reads QEMU's stream netdev framing (a 4-byte big-endian length,
// then one Ethernet frame) from r and injects each frame into ep. It returns
// at EOF (QEMU closed its end) or on the first error.
func readFrames(conn io.Reader, ep *channel.Endpoint) error {
	r := bufio.NewReaderSize(conn, 256<<10) // several frames per read(2)
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n > maxFrame {
			return fmt.Errorf("%w (%d bytes)", ErrFrameTooLarge, n)
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(r, frame); err != nil {
			return err
		}
		if n < 14 {
			continue // runt: not even an Ethernet header
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
		ep.InjectInbound(0, pkt) // the ethernet wrapper reads the type
		pkt.DecRef()
	}
}

// writeFrames sends the stack's outbound frames to w in the same framing
// until ctx ends or a write fails. Frames already queued go out together
// in one write(2) (up to writeBatch bytes).
func writeFrames(ctx context.Context, w io.Writer, ep *channel.Endpoint) error {
	const writeBatch = 256 << 10
	buf := make([]byte, 0, writeBatch+4+maxFrame)
	for {
		pkt := ep.ReadContext(ctx)
		if pkt == nil {
			return ctx.Err()
		}
		buf = buf[:0]
		for pkt != nil {
			start := len(buf)
			buf = append(buf, 0, 0, 0, 0)
			for _, s := range pkt.AsSlices() {
				buf = append(buf, s...)
			}
			pkt.DecRef()
			if n := len(buf) - start - 4; n > maxFrame {
				buf = buf[:start]
			} else {
				binary.BigEndian.PutUint32(buf[start:], uint32(n))
			}
			if len(buf) >= writeBatch {
				break
			}
			pkt = ep.Read()
		}
		if _, err := w.Write(buf); err != nil {
			return err
		}
	}
}

// onceCloser closes c once.
type onceCloser struct {
	io.Closer
	once sync.Once
}

func (c *onceCloser) Close() {
	c.once.Do(func() { c.Closer.Close() })
}

package server

import (
	"context"
	"time"
)

// poolFillTimeout bounds one background refill of the warm pools.
const poolFillTimeout = 10 * time.Minute

// RefillPools brings the warm pools back to their size in the background
// after a create that may have claimed a member (as the CLI does after
// its creates). One refill runs at a time; a call while one runs makes it
// go round once more (a claim it may have missed). Each round is bounded
// by 10 minutes and cancelled when the daemon shuts down; a failure is
// logged. FillPools finds full pools full (for a data dir without pools
// it is one store query).
func (s *Server) RefillPools() {
	s.refillAgain.Store(true)
	if !s.filling.CompareAndSwap(false, true) {
		return
	}
	go func() {
		for {
			for s.refillAgain.Swap(false) {
				s.fillPools()
			}
			s.filling.Store(false)
			// A call between the last round and the Store above.
			if !s.refillAgain.Load() || !s.filling.CompareAndSwap(false, true) {
				return
			}
		}
	}()
}

// fillPools is one refill round.
func (s *Server) fillPools() {
	ctx, cancel := context.WithTimeout(context.Background(), poolFillTimeout)
	defer cancel()
	select {
	case <-s.stopping:
		return
	default:
	}
	go func() {
		select {
		case <-s.stopping:
			cancel()
		case <-ctx.Done():
		}
	}()
	start := time.Now()
	if err := s.m.FillPools(ctx); err != nil {
		s.log.Warn("warm pools: refill failed", "err", err, "elapsed", time.Since(start).Round(time.Millisecond))
		return
	}
	s.log.Debug("warm pools: full", "elapsed", time.Since(start).Round(time.Millisecond))
}

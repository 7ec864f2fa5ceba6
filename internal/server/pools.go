package server

import (
	"context"
	"time"
)

// poolFillTimeout bounds one background refill of the warm pools.
const poolFillTimeout = 10 * time.Minute

// RefillPools brings the warm pools back to their size in the background
// after a create that may have claimed a member (as the CLI does after
// its creates): at most one refill runs at a time (a request while one
// runs is dropped: the running one fills the pools anyway), each within
// 10 minutes, cancelled when the daemon shuts down; its outcome is
// logged. Nothing runs when every pool is full.
func (s *Server) RefillPools() {
	if !s.filling.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.filling.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), poolFillTimeout)
		defer cancel()
		go func() {
			select {
			case <-s.stopping:
				cancel()
			case <-ctx.Done():
			}
		}()
		pools, err := s.m.Pools(ctx)
		if err != nil {
			s.log.Warn("warm pools: cannot list them", "err", err)
			return
		}
		short := false
		for _, p := range pools {
			short = short || p.Ready < p.Size
		}
		if !short {
			return
		}
		start := time.Now()
		s.log.Info("warm pools: refilling")
		if err := s.m.FillPools(ctx); err != nil {
			s.log.Warn("warm pools: refill failed", "err", err, "elapsed", time.Since(start).Round(time.Millisecond))
			return
		}
		s.log.Info("warm pools: refilled", "elapsed", time.Since(start).Round(time.Millisecond))
	}()
}

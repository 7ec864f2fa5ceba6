package server

import (
	"sync"
	"time"
)

// Event is one lifecycle event on GET /v1/events.
type Event struct {
	Type string    `json:"type"` // sandbox.created|started|stopped|paused|resumed|deleted|expired, snapshot.created|deleted|restored
	ID   string    `json:"id"`
	Time time.Time `json:"time"`
}

// eventQueue bounds what one slow subscriber may hold: past it, new events
// are not queued for it (publishing never waits for a subscriber).
const eventQueue = 256

type subscriber struct {
	ch chan Event
}

// broker fans events out to the subscribers of /v1/events. Publishing
// never blocks.
type broker struct {
	mu   sync.Mutex
	subs map[*subscriber]struct{}
}

func newBroker() *broker { return &broker{subs: map[*subscriber]struct{}{}} }

func (b *broker) subscribe() (*subscriber, func()) {
	s := &subscriber{ch: make(chan Event, eventQueue)}
	b.mu.Lock()
	b.subs[s] = struct{}{}
	b.mu.Unlock()
	return s, func() {
		b.mu.Lock()
		delete(b.subs, s)
		b.mu.Unlock()
	}
}

func (b *broker) publish(e Event) {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := range b.subs {
		select {
		case s.ch <- e:
		default: // a subscriber 256 events behind misses this one
		}
	}
}

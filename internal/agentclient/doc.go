// Package agentclient is the host side of the SmolVM agent protocol
// (package agentproto).
//
// Connect dials the guest agent and resyncs the stream: it first writes a
// lone newline (terminating any partial line the guest may hold from before
// a snapshot), then sends hello requests with fresh random nonces until the
// agent echoes one of them; everything read before that reply is
// discarded. Request ids start at a random 64-bit value per Client, and
// replies whose id is not pending are dropped, so a reply to a request that
// was in flight when a snapshot was taken is never mistaken for the answer
// to a new request.
//
// A Client multiplexes any number of concurrent calls over one connection.
// Every call honours its context; cancelling an Exec also asks the guest to
// kill the process group. When the connection drops, pending and later
// calls fail with an error wrapping ErrDisconnected; reconnect with
// Connect.
package agentclient

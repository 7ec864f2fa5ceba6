// Package qmp is a small client for the QEMU Machine Protocol over a unix
// socket.
//
// A Client reads QEMU's greeting, negotiates capabilities, and then
// multiplexes commands (matched to replies by "id") and asynchronous events
// over one connection. Lines are read with bufio.Reader.ReadBytes, so there
// is no limit on the size of a reply (query-qmp-schema is ~200 KB). Every
// call honours its context; a Client is safe for concurrent use and Close is
// idempotent.
//
// QEMU serves one QMP client per socket at a time: while one Client is
// connected, further connections wait for the greeting. Callers that share a
// VM between processes should therefore keep connections short.
package qmp

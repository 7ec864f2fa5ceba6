// Package agentproto defines the wire protocol spoken between the host and
// the SmolVM guest agent.
//
// The protocol is newline-delimited JSON: every message is one JSON object on
// one line. Every object carries "id" (a uint64 chosen by the host for each
// request; replies carry the id of the request they answer) and "type",
// followed by the fields of the typed payload for that type, flattened into
// the same object:
//
//	{"id":7,"type":"exec","argv":["ls","-l"],"timeout_ms":5000}
//	{"id":7,"type":"output","stream":"stdout","data":"dG90YWwgMAo="}
//	{"id":7,"type":"exit","exit_code":0,"duration_ms":3}
//
// []byte fields are base64 (encoding/json). encoding/json never emits a raw
// newline, so a newline always ends a message.
//
// Requests (host → guest) and their replies:
//
//	hello        HelloRequest     → hello   Hello          (resync after connect)
//	ping         -                → pong    -
//	info         -                → info    Info
//	exec         ExecRequest      → output  Output (0..n), then exit ExecResult
//	exec         ExecRequest with interactive (or tty)
//	                              → started Started, then output (0..n), stdin_ack (one per
//	                                stdin), exit ExecResult (interactive.go)
//	stdin        StdinRequest     → stdin_ack (on the exec's id)
//	resize       ResizeRequest    → (nothing; on the exec's id)
//	signal       SignalRequest    → (nothing; on the exec's id)
//	cancel       -                → (nothing; the running exec ends with canceled=true)
//	write_file   WriteFileRequest → ok
//	read_file    ReadFileRequest  → file    FileData
//	write_chunk  WriteChunkRequest → ok     (files over one message: see ChunkSize)
//	commit_file  CommitFileRequest → ok
//	remove_file  RemoveFileRequest → ok
//	read_chunk   ReadChunkRequest → chunk   Chunk
//	set_env      SetEnvRequest    → ok
//	get_env      -                → env     EnvData
//	sync         -                → ok
//	set_time     SetTimeRequest   → ok
//	set_identity SetIdentityRequest → ok
//	shutdown     ShutdownRequest  → ok (then the guest powers off or reboots)
//
// Any request may instead be answered by an "error" message (Error).
//
// Connections are not reliable boundaries: a guest restored from a snapshot
// may answer requests sent to it before the snapshot. Hosts therefore resync
// on every connect (a "hello" with a fresh nonce, discarding everything read
// before the matching reply) and drop replies whose id is not pending.
package agentproto

// Package fcapi is a small client for the Firecracker HTTP API (the v1.16
// contract; testdata/firecracker-api.yaml is a copy of the swagger file we
// were given, whose info.version reads 1.17.0-dev) spoken over the
// API unix socket, plus the host side of the Firecracker vsock handshake
// ("CONNECT <port>\n" / "OK <hostport>\n").
//
// Every request body is a typed struct whose json tags match the API schema;
// a test validates each body the client can send against the swagger file.
// Non-2xx answers become *Error carrying the HTTP status and Firecracker's
// fault_message. Every call honours its context; a context without a
// deadline gets DefaultTimeout.
//
// The package knows nothing about processes or files: starting Firecracker
// and deciding what to configure is internal/backend/firecracker's job.
package fcapi

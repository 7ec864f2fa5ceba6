// Package backendtest is the conformance suite every backend.Backend runs
// against real VMs: start and agent reachability, status, pause/resume,
// port exposure, stop hygiene (no process, no sockets), failed starts that
// leave nothing behind, and full/diff/disk snapshots restored with memory
// state (a tmpfs file and a running background process) and disk state
// preserved, snapshot files left byte-identical. Subtests for capabilities
// the backend does not declare are skipped, naming the capability.
//
// The suite boots one VM and shares it between subtests; restores are
// stopped as soon as they are checked, to keep the load low on small TCG
// hosts.
package backendtest

// Package backend defines the narrow interface every VMM driver (QEMU,
// Firecracker) implements, with declared capabilities, the persisted
// Spec/Machine records, and the sentinel errors callers match with errors.Is.
// The conformance suite in backend/backendtest runs against every backend.
package backend

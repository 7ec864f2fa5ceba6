// Package testutil holds helpers for tests that boot real VMs, in any
// package: locating the cached guest images (failing, not skipping, with
// "run scripts/setup" when they are missing), short temporary directories
// for unix sockets, specs with sensible test defaults, and cleanups that
// always leave no VMM process behind — including a watchdog that kills
// tracked VMM processes if the test binary itself dies (timeout panic,
// SIGKILL), since VMMs are started detached from their parent.
//
// This machine has 2 cores and runs guests under TCG: keep VM counts low
// and share booted VMs between subtests.
package testutil

// Package cli is the cobra command tree of the smolvm command: sandbox,
// snapshot, image, doctor and bench commands, with human output (tables) and
// a --json envelope:
//
//	{"ok":bool,"command":"sandbox exec","exit_code":N,"data":...,"error":{"code","message","recovery"}}
package cli

// Package snapshot holds the on-disk format of a snapshot: the versioned
// manifest.json, artifact digests (sparse-aware sha256), verification before
// restore, and the directory protocol that makes creation atomic:
//
//	<root>/<id>.tmp-<nonce>/   being written (never listed)
//	<root>/<id>/               complete: every artifact and the manifest fsynced
//	<root>/.trash-<id>-<nonce> being deleted
//
// A snapshot is listed only when its directory is complete and its state
// row is committed; Cleanup removes whatever an interrupted create or delete
// left behind.
package snapshot

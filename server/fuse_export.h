/*
 * `siphon serve --fuse MOUNTPOINT`: every disk as a regular file of its
 * virtual size in a FUSE file system, for VMMs and tools that only take a
 * path (qemu -drive file=MOUNTPOINT/EXPORT,format=raw, cloud-hypervisor,
 * dd). Like the NBD server, a client of the public API: read and write go
 * through siphon's guest I/O (copy-on-read, never clobbered by the
 * stream), fsync is a flush, fallocate's PUNCH_HOLE and ZERO_RANGE are
 * discard and write-zeroes, lseek's SEEK_DATA and SEEK_HOLE come from the
 * chain's block status. Unaligned writes are read-modify-write of the
 * 512-byte blocks around them, one at a time per file.
 *
 * Threads: libfuse's multi-threaded loop, on threads of its own.
 */
#ifndef SIPHON_SERVER_FUSE_EXPORT_H
#define SIPHON_SERVER_FUSE_EXPORT_H

#include <stdbool.h>

#include "server/nbd_server.h"
#include "siphon.h"

struct fuse_export;

/*
 * Mount an empty file system at mountpoint (an existing directory) and
 * serve it on libfuse's threads. -errno with a message in msg.
 */
int fuse_export_start(const char *mountpoint, nbd_log_fn log, void *opaque,
		      struct fuse_export **out);

/*
 * Show disk as the file name (the export name): the export takes the
 * handle (released when removed, stopped, and no open file uses it).
 * read_only: the file is mode 0444 and refuses writes. Thread safe.
 * -EEXIST, -ENOMEM, -EINVAL (the handle stays the caller's then).
 */
int fuse_export_add(struct fuse_export *fx, const char *name, siphon_disk *disk,
		    bool read_only);

/* Remove the file name (open files keep working). Thread safe. -ENOENT. */
int fuse_export_remove(struct fuse_export *fx, const char *name);

/*
 * Unmount (lazily when files are still open), stop the loop, release
 * every disk handle and free. NULL ok.
 */
void fuse_export_stop(struct fuse_export *fx);

#endif

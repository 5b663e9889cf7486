/*
 * The write log, private to io/: a record of every successful change to a
 * writable file, for deterministic crash testing.
 *
 * Once sio_iolog_start() (io.h) has named a file, every write,
 * fsync, fdatasync, fallocate and truncate that succeeds on a sio_file
 * opened writable (sync helpers and sio_queue alike) appends one record to
 * it, in completion order. A test replays the records onto a copy of the
 * image as it was before the run: any prefix that ends at a sync record is
 * a state the disk may hold after a power failure, and so is such a prefix
 * plus any subset of the writes that follow it up to the next sync.
 *
 * Record layout (native byte order; x86_64 and the like: little endian),
 * 32 bytes of header, then the path, then the data of a write:
 *
 *   char     magic[4]   "SXIO"
 *   uint8_t  op         SIO_OP_WRITE, SIO_OP_FSYNC, SIO_OP_FDATASYNC,
 *                       SIO_OP_FALLOCATE, or SIO_IOLOG_TRUNCATE
 *   uint8_t  pad[3]     zero
 *   uint32_t mode       fallocate mode, else 0
 *   uint32_t path_len   bytes of path that follow the header (no NUL)
 *   uint64_t off        write/fallocate offset; truncate: the new size
 *   uint64_t len        write/fallocate length (data bytes that follow)
 *
 * Each record goes out in one writev() to a descriptor opened O_APPEND,
 * under a process-wide mutex, so records never interleave.
 */
#ifndef SIPHON_IO_IOLOG_H
#define SIPHON_IO_IOLOG_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/io.h"

/* Op code of a truncate record (not a request op: truncate is sync only). */
#define SIO_IOLOG_TRUNCATE 100

/*
 * True when the log was started and f is writable: the caller should log.
 * Thread safe.
 */
bool sio_iolog_wanted(const struct sio_file *f);

/*
 * Append a write of len bytes at off, taken from buf or (buf NULL) from the
 * first len bytes of iov[0..iovcnt). Returns 0, or -errno with a message
 * naming the log: the caller fails the request, so that a test never
 * replays an incomplete log.
 */
int sio_iolog_write(const struct sio_file *f, const void *buf,
		    const struct iovec *iov, int iovcnt, uint64_t len,
		    uint64_t off);

/*
 * Append a record without data: op SIO_OP_FSYNC, SIO_OP_FDATASYNC,
 * SIO_OP_FALLOCATE (mode, off, len) or SIO_IOLOG_TRUNCATE (off = size).
 * Returns 0 or -errno, as sio_iolog_write().
 */
int sio_iolog_op(const struct sio_file *f, int op, int mode, uint64_t off,
		 uint64_t len);

#endif

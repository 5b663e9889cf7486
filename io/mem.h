/*
 * Memory files, private to io/: what file.c and queue.c call so that a
 * sio_file opened on a memory file (sio_mem_create() in io.h) reads and
 * writes its bytes without io_uring. See io.h for the test-facing calls.
 */
#ifndef SIPHON_IO_MEM_H
#define SIPHON_IO_MEM_H

#include <stdint.h>
#include <sys/stat.h>

#include "io/io.h"

/*
 * sio_file_open() of a path that a memory file is registered at: 1 and
 * *out (a new sio_file on it, opened with flags), 0 when no memory file is
 * registered at path (open the filesystem's file), or -errno with a
 * message (-EEXIST for SIO_EXCL, -ENOMEM, ...). Thread safe.
 */
int sio_mem_open(const char *path, unsigned flags, struct sio_file **out);

/* The sio_file f of a memory file is being closed: drop its reference. */
void sio_mem_put(struct sio_mem *m);

/*
 * One request on the memory file of f: a read (the part past the end
 * reads as zeros), a write, FSYNC/FDATASYNC (nothing to make durable:
 * counted, maybe failed) or FALLOCATE (mode, off, len). The file's own
 * fault rule (sio_mem_fail) is applied and the request counted first.
 * 0 or -errno with a message naming the path.
 */
int sio_mem_io(struct sio_file *f, enum sio_op op, void *buf, uint64_t len,
	       uint64_t off, int mode);

/*
 * stat(2) of a memory file registered at path: 1 and *st, 0 when there is
 * none, -errno.
 */
int sio_mem_stat(const char *path, struct stat *st);

#endif

/*
 * io_uring setup shared by the synchronous helpers (file.c) and the async
 * queue (queue.c), private to io/.
 */
#ifndef SIPHON_IO_RING_H
#define SIPHON_IO_RING_H

#include <liburing.h>

/*
 * io_uring_queue_init with entries (clamped by the kernel), preferring the
 * cheaper task-run flags and dropping them on kernels that do not know them.
 * Returns 0, or -errno with a message (prefixed by what, e.g. a path) that
 * says io_uring is unavailable and why.
 */
int sio_ring_init(struct io_uring *ring, unsigned entries, const char *what);

#endif

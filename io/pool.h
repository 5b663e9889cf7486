/*
 * A pool of equal-sized aligned buffers for the bulk data path.
 *
 * The copy engine needs a few large buffers over and over; allocating and
 * freeing each one lets the C library's heap grow and fragment (resident
 * memory far above what is live) and costs page faults on every reuse. A
 * pool keeps up to max_free buffers for the next user and frees the rest.
 *
 * Not thread safe: a pool belongs to the thread that owns its queue.
 */
#ifndef SIPHON_IO_POOL_H
#define SIPHON_IO_POOL_H

#include <stddef.h>

struct sio_pool;

/* Buffers of buf_size bytes (SIO_BUF_ALIGN aligned); NULL on ENOMEM. */
struct sio_pool *sio_pool_create(size_t buf_size, unsigned max_free);

/* Free the pool and the buffers it keeps. NULL is a no-op. */
void sio_pool_destroy(struct sio_pool *p);

/* A buffer of the pool's size, or NULL on ENOMEM. */
void *sio_pool_get(struct sio_pool *p);

/* Give back a buffer from sio_pool_get(). NULL is a no-op. */
void sio_pool_put(struct sio_pool *p, void *buf);

#endif

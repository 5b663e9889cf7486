/*
 * Buffer pool: see pool.h. The free list is threaded through the buffers
 * themselves, so the pool costs one small struct.
 */
#include <stdlib.h>

#include "io.h"
#include "pool.h"

struct free_buf {
	struct free_buf *next;
};

struct sio_pool {
	size_t buf_size;
	unsigned max_free;
	unsigned nfree;
	struct free_buf *free;
};

struct sio_pool *sio_pool_create(size_t buf_size, unsigned max_free)
{
	struct sio_pool *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	p->buf_size = buf_size < sizeof(struct free_buf)
			      ? sizeof(struct free_buf)
			      : buf_size;
	p->max_free = max_free;
	return p;
}

void sio_pool_destroy(struct sio_pool *p)
{
	struct free_buf *b;

	if (!p)
		return;
	while ((b = p->free)) {
		p->free = b->next;
		sio_buf_free(b);
	}
	free(p);
}

void *sio_pool_get(struct sio_pool *p)
{
	struct free_buf *b = p->free;

	if (!b)
		return sio_buf_alloc(p->buf_size);
	p->free = b->next;
	p->nfree--;
	return b;
}

void sio_pool_put(struct sio_pool *p, void *buf)
{
	struct free_buf *b = buf;

	if (!buf)
		return;
	if (p->nfree >= p->max_free) {
		sio_buf_free(buf);
		return;
	}
	b->next = p->free;
	p->free = b;
	p->nfree++;
}

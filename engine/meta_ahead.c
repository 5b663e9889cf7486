/*
 * Metadata read-ahead (see meta_ahead.h).
 *
 * Per layer: `next`, the guest offset from which the driver is asked next
 * (never behind the planner), and a ring of the guest offsets of planned
 * slices, dropped once the planner is past them. A read's result is only
 * a hint to the driver: a failed read is forgotten (the planner's own
 * synchronous read will meet and report the error), and the driver
 * refuses bytes that may have gone stale meanwhile.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "meta_ahead.h"

struct ma_layer {
	struct img *img;
	uint64_t next;
	uint64_t planned[META_AHEAD_SLICES]; /* ring of guest offsets */
	unsigned head;
	unsigned count;
};

struct ma_read {
	struct meta_ahead *m;
	struct ma_layer *layer;
	struct img_meta_req meta;
	struct sio_req io;
	uint8_t *buf;
	uint64_t cap;
	bool busy;
};

struct meta_ahead {
	struct sio_queue *q;
	struct ma_layer *layers;
	unsigned nlayers;
	unsigned inflight;
	struct ma_read reads[META_AHEAD_READS];
};

int meta_ahead_create(struct img *top, struct img *base, struct sio_queue *q,
		      struct meta_ahead **out)
{
	struct meta_ahead *m;
	struct img *l;
	unsigned n = 0, i;

	*out = NULL;
	for (l = top; l && l != base; l = l->backing)
		n += img_can_read_ahead(l);
	if (!n)
		return 0;
	m = calloc(1, sizeof(*m));
	if (m)
		m->layers = calloc(n, sizeof(*m->layers));
	if (!m || !m->layers) {
		free(m);
		return sx_error(ENOMEM, "stream: out of memory");
	}
	for (l = top; l && l != base; l = l->backing)
		if (img_can_read_ahead(l))
			m->layers[m->nlayers++].img = l;
	for (i = 0; i < META_AHEAD_READS; i++)
		m->reads[i].m = m;
	m->q = q;
	*out = m;
	return 0;
}

void meta_ahead_destroy(struct meta_ahead *m)
{
	unsigned i;

	if (!m)
		return;
	for (i = 0; i < META_AHEAD_READS; i++)
		sio_buf_free(m->reads[i].buf);
	free(m->layers);
	free(m);
}

unsigned meta_ahead_inflight(const struct meta_ahead *m)
{
	return m ? m->inflight : 0;
}

static void read_done(struct sio_req *io, int res)
{
	struct ma_read *r = io->priv;
	struct img *img = r->layer->img;

	if (res >= 0)
		img_meta_fill(img, &r->meta, r->buf);
	r->busy = false;
	r->m->inflight--;
}

static struct ma_read *free_read(struct meta_ahead *m)
{
	unsigned i;

	for (i = 0; i < META_AHEAD_READS; i++)
		if (!m->reads[i].busy)
			return &m->reads[i];
	return NULL;
}

/* Plan and start one read for layer l; false when there is none to do. */
static bool start_one(struct meta_ahead *m, struct ma_layer *l,
		      struct ma_read *r)
{
	struct img *img = l->img;
	struct img_meta_req *mr = &r->meta;
	struct sio_file *f;

	if (!img_meta_want(img, l->next, mr, 1, &l->next))
		return false;
	f = mr->file;
	if (!sx_is_aligned(mr->host_off | mr->len, f->align)) {
		/*
		 * Slices smaller than the file's direct-I/O alignment (tiny
		 * clusters): every one would be; the driver's own reads
		 * bounce. No read-ahead for this layer.
		 */
		l->next = img->size;
		return false;
	}
	if (r->cap < mr->len) {
		sio_buf_free(r->buf);
		r->cap = 0;
		r->buf = sio_buf_alloc(mr->len);
		if (!r->buf)
			return false;
		r->cap = mr->len;
	}
	r->layer = l;
	r->io = (struct sio_req){
		.op = SIO_OP_READ,
		.file = f,
		.buf = r->buf,
		.off = mr->host_off,
		.len = mr->len,
		.done = read_done,
		.priv = r,
	};
	if (sio_queue_submit(m->q, &r->io) < 0)
		return false;
	r->busy = true;
	m->inflight++;
	l->planned[(l->head + l->count++) % META_AHEAD_SLICES] = mr->guest_off;
	return true;
}

void meta_ahead_pump(struct meta_ahead *m, uint64_t pos)
{
	struct ma_read *r;
	unsigned i;

	if (!m)
		return;
	for (i = 0; i < m->nlayers; i++) {
		struct ma_layer *l = &m->layers[i];

		while (l->count && l->planned[l->head] < pos) {
			l->head = (l->head + 1) % META_AHEAD_SLICES;
			l->count--;
		}
		if (l->next < pos)
			l->next = pos;
		while (l->count < META_AHEAD_SLICES && l->next < l->img->size &&
		       (r = free_read(m)))
			if (!start_one(m, l, r))
				break;
	}
}

/*
 * The engine side of one disk (see disk.h): the img chain, the guest
 * engine, the current stream and the scheduler that paces it.
 *
 * Invariants: the scheduler has a stream exactly while e->s exists, and is
 * told of every guest submission and of the guest's drain before each
 * decision; while swap_pending the guest engine holds new requests, and the
 * swap runs only with no guest request in flight (they may read the layers
 * it closes).
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "engine/disk.h"
#include "common/error.h"
#include "engine/guest.h"
#include "engine/sched.h"
#include "engine/stream.h"
#include "formats/image.h"
#include "formats/port.h"
#include "io/io.h"
#include "io/nbd.h"

struct edisk {
	struct img *img;
	struct sio_queue *q;
	struct extent_pool *pool; /* the loop's, for streams, or NULL */
	struct guest *guest;
	struct stream *s;
	struct img *s_base; /* the stream's base layer, or NULL */
	bool swap_pending; /* finalized: drop the old chain when idle */
	struct img *swap_base; /* what stays below the top */
	struct sched sched;
	struct img_port *port; /* the top's metadata port, on q */
	/* sio_sync_waits() taken on the worker for this disk, per phase. */
	uint64_t waits[EDISK_PHASES];
};

/* edisk_test_set_flush_bytes(): 0 in production. */
static _Atomic uint64_t test_flush_bytes;

/* Bracket a piece of this disk's work on the worker (see waits[]). */
#define WAITS_BEGIN() uint64_t waits_at_ = sio_sync_waits()
#define WAITS_END(e, phase) \
	((e)->waits[(phase)] += sio_sync_waits() - waits_at_)

int edisk_open(const char *path, const struct edisk_opts *o, struct edisk **out)
{
	const struct edisk_opts none = {0};
	struct sio_nbd_opts nbd;
	struct edisk *e;
	unsigned flags;
	int ret;

	if (!o)
		o = &none;
	flags = IMG_OPEN_RDWR | (o->buffered ? IMG_OPEN_BUFFERED : 0);
	nbd = (struct sio_nbd_opts){.reconnect_ms = o->nbd_reconnect_ms,
				    .timeout_ms = o->nbd_timeout_ms,
				    .connections = o->nbd_connections};
	e = calloc(1, sizeof(*e));
	if (!e)
		return sx_error(ENOMEM, "out of memory");
	ret = img_open_nbd(path, o->fmt, flags, &nbd, &e->img);
	if (ret < 0) {
		free(e);
		return ret;
	}
	sched_init(&e->sched);
	*out = e;
	return 0;
}

uint64_t edisk_size(const struct edisk *e)
{
	return e->img->size;
}

uint64_t edisk_cluster_size(const struct edisk *e)
{
	return e->img->cluster_size;
}

/* Hand the scheduler's copy-on-read decision to the guest engine. */
static void apply_cor(struct edisk *e)
{
	struct sched_cor c = sched_cor(&e->sched);

	if (e->guest)
		guest_set_cor(e->guest, c.on, c.may_yield);
}

int edisk_bind(struct edisk *e, struct sio_queue *q)
{
	WAITS_BEGIN();
	int ret = img_port_queue_create(q, &e->port);

	if (ret >= 0) {
		img_set_port(e->img, e->port);
		ret = guest_create(e->img, q, &e->guest);
	}
	if (ret >= 0) {
		e->q = q;
		apply_cor(e);
		ret = 0;
	}
	WAITS_END(e, EDISK_ATTACH);
	return ret;
}

void edisk_set_extent_pool(struct edisk *e, struct extent_pool *pool)
{
	e->pool = pool;
}

void edisk_close(struct edisk *e)
{
	if (!e)
		return;
	/* Closing flushes and trims: the EDISK_FINAL phase, never reported. */
	if (e->s)
		stream_destroy(e->s);
	guest_destroy(e->guest);
	img_close(e->img);
	img_port_queue_destroy(e->port);
	free(e);
}

void edisk_guest_submit(struct edisk *e, struct guest_req *req, uint64_t now)
{
	WAITS_BEGIN();

	sched_guest_submitted(&e->sched, now);
	guest_submit(e->guest, req);
	WAITS_END(e, EDISK_RUN);
}

void edisk_guest_stats(const struct edisk *e, struct guest_stats *st)
{
	guest_get_stats(e->guest, st);
}

void edisk_set_cor_mode(struct edisk *e, int mode)
{
	sched_set_cor_mode(&e->sched, mode);
	apply_cor(e);
}

/* Close the layers between the top and swap_base once nobody reads them. */
static void do_swap(struct edisk *e)
{
	WAITS_BEGIN();

	if (guest_inflight(e->guest))
		return;
	img_drop_layers(e->img, e->swap_base);
	WAITS_END(e, EDISK_FINAL);
	e->swap_pending = false;
	guest_hold(e->guest, false);
}

void edisk_kick(struct edisk *e)
{
	if (e->swap_pending)
		do_swap(e);
	{
		WAITS_BEGIN();

		guest_kick(e->guest);
		WAITS_END(e, EDISK_RUN);
	}
}

bool edisk_idle(const struct edisk *e)
{
	return guest_idle(e->guest) && !e->swap_pending;
}

int edisk_stream_create(struct edisk *e, const struct edisk_stream_params *p,
			struct stream **out)
{
	const char *base = p->base;
	struct stream_opts so = {0};
	struct img *b = NULL;
	int ret;

	if (e->s)
		return sx_error(EBUSY, "%s: a stream exists", e->img->path);
	if (base) {
		b = img_find_backing(e->img, base);
		if (!b)
			return sx_error(EINVAL,
					"%s: base %s is not in its backing "
					"chain",
					e->img->path, base);
	}
	so.top = e->img;
	so.base = b;
	so.q = e->q;
	so.speed = p->speed;
	so.max_inflight = p->queue_depth;
	so.extent_bytes = p->extent_size;
	so.on_error = p->on_error;
	so.lock = guest_stream_lock;
	so.unlock = guest_stream_unlock;
	so.lock_opaque = e->guest;
	so.copier = guest_copier(e->guest);
	so.flush_bytes = atomic_load(&test_flush_bytes);
	so.pool = e->pool;
	{
		WAITS_BEGIN();

		ret = stream_create(&so, &e->s);
		WAITS_END(e, EDISK_RUN);
	}
	if (ret < 0) {
		e->s = NULL;
		return ret;
	}
	e->s_base = b;
	sched_stream_started(&e->sched);
	apply_cor(e);
	*out = e->s;
	return 0;
}

void edisk_stream_destroy(struct edisk *e, bool completed)
{
	WAITS_BEGIN();

	if (!e->s)
		return;
	stream_destroy(e->s);
	e->s = NULL;
	sched_stream_ended(&e->sched);
	apply_cor(e);
	if (completed) {
		/* Guest reads must stop seeing the dropped layers. */
		e->swap_pending = true;
		e->swap_base = e->s_base;
		guest_hold(e->guest, true);
	}
	e->s_base = NULL;
	WAITS_END(e, EDISK_FINAL);
}

bool edisk_stream_pump(struct edisk *e, uint64_t limit, bool aborting,
		       uint64_t now, uint64_t *timer_ns)
{
	struct sched_limits l;
	uint64_t until, wait = 0;
	bool ret = false;
	WAITS_BEGIN();

	*timer_ns = 0;
	if (guest_idle(e->guest))
		sched_guest_drained(&e->sched);
	if (!stream_inflight(e->s))
		sched_stream_io_drained(&e->sched, now);
	if (!sched_stream_may_issue(&e->sched, now, aborting, &until)) {
		*timer_ns = until - now;
		goto out;
	}
	l = sched_stream_limits(&e->sched, now);
	stream_set_limits(e->s, l.max_inflight, l.extent_bytes);
	stream_pump(e->s, limit, &wait);
	if (!stream_inflight(e->s) && stream_planned(e->s, limit))
		ret = true;
	else if (stream_inflight(e->s))
		sched_stream_io_started(&e->sched, now);
	else if (wait)
		*timer_ns = wait;
out:
	WAITS_END(e, EDISK_RUN);
	return ret;
}

int edisk_stream_finish(struct edisk *e)
{
	WAITS_BEGIN();
	int ret = stream_finish(e->s);

	WAITS_END(e, EDISK_FINAL);
	return ret;
}

void edisk_loop_waits(struct edisk *e, uint64_t n)
{
	e->waits[EDISK_RUN] += n;
}

uint64_t edisk_sync_waits(const struct edisk *e, enum edisk_phase phase)
{
	return phase < EDISK_PHASES ? e->waits[phase] : 0;
}

void edisk_test_set_flush_bytes(uint64_t bytes)
{
	atomic_store(&test_flush_bytes, bytes);
}

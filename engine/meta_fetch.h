/*
 * Reading one missing piece of metadata for a parked request.
 *
 * The nowait status calls (formats/image.h img_chain_piece_nowait() and
 * friends) answer -EAGAIN and a struct img_meta_miss where a layer's
 * metadata (an L2 slice) is not in memory. The request that asked parks;
 * a meta_fetch reads the slice on the owner's queue, installs it in the
 * layer's cache (img_meta_fill) and calls the request back, which asks
 * again. So the owner's thread never waits for a metadata read.
 *
 * Progress: what was installed is only a hint (the driver may refuse it,
 * or evict it before the request asks again), so a request counts its
 * misses in a row (meta_fetch.misses) and, after META_FETCH_TRIES of
 * them or a failed read, asks once synchronously (meta_fetch_sync()),
 * which always answers and reports a real error with its message. A
 * failed request to an NBD layer is not asked again: its error is the
 * answer (meta_fetch_take_error()), since asking synchronously would wait
 * for the server on the owner's thread, for a second reconnect window.
 *
 * A struct meta_fetch is embedded in the request (no allocation on the
 * path where the metadata is cached; the read's buffer is allocated per
 * miss). Threads: the owner's only.
 */
#ifndef SIPHON_ENGINE_META_FETCH_H
#define SIPHON_ENGINE_META_FETCH_H

#include <stdbool.h>
#include <stdint.h>

#include "formats/image.h"
#include "io/io.h"

#define META_FETCH_TRIES 4u

struct meta_fetch;
typedef void (*meta_fetch_fn)(struct meta_fetch *f, int res);

struct meta_fetch {
	struct img_meta_miss miss; /* filled by the nowait call */
	unsigned misses; /* in a row; reset by meta_fetch_hit() */
	bool busy; /* a read is in flight */
	int err; /* a failed fetch from an NBD layer: the answer, or 0 */

	/* Private to meta_fetch.c. */
	struct sio_req io;
	uint8_t *buf;
	uint64_t skip; /* bytes of buf before the metadata */
	meta_fetch_fn done;
	void *priv;
};

/*
 * Read f->miss on q, install it, then done(f, res) (res 0 or -errno; the
 * caller asks again either way) from sio_queue_run(). 0 when started,
 * -errno when not (done does not run). f->misses counts the miss.
 */
int meta_fetch_start(struct meta_fetch *f, struct sio_queue *q,
		     meta_fetch_fn done, void *priv);

/*
 * A nowait call returned ret: when it missed (-EAGAIN, f->miss.layer
 * set), start the fetch (true: parked, done(f, res) runs later). false:
 * ret is the answer (the count of misses starts again), or the fetch could
 * not start and meta_fetch_sync() now says to ask synchronously.
 */
bool meta_fetch_park(struct meta_fetch *f, int ret, struct sio_queue *q,
		     meta_fetch_fn done, void *priv);

/* The next question must be asked synchronously (see the top). */
bool meta_fetch_sync(const struct meta_fetch *f);

/* A question was answered: the count of misses in a row starts again. */
static inline void meta_fetch_hit(struct meta_fetch *f)
{
	f->misses = 0;
	f->err = 0;
}

/*
 * Before asking synchronously (meta_fetch_sync()): the error of a failed
 * fetch from an NBD layer, which is then the answer, or 0 (ask). The count
 * of misses starts again either way.
 */
static inline int meta_fetch_take_error(struct meta_fetch *f)
{
	int err = f->err;

	meta_fetch_hit(f);
	return err;
}

#endif

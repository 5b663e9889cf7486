/*
 * qcow2 write ordering: the flush that makes metadata durable in an order
 * that leaves at most leaked clusters after a crash at any instant, and the
 * write state of an image opened for writing.
 *
 * One flush covers everything written since the last one:
 *  1. fdatasync the data (guest data, copy-on-write data, stream data);
 *  2. write dirty refcount blocks, fdatasync; then the dirty refcount table
 *     entries, fdatasync (a new block is durable before the entry that
 *     points at it);
 *  3. write dirty L2 slices, fdatasync (new L2 tables were zero-filled
 *     before and are covered by this sync too);
 *  4. write dirty L1 entries, fdatasync;
 *  5. apply the queued refcount decreases in memory; they reach the disk in
 *     step 2 of a later flush (or when their block is evicted).
 * A step that wrote nothing skips its fdatasync. Refcount increases may
 * reach the disk at any time (a crash then leaks, never corrupts). Evicting
 * a dirty L2 slice from the cache runs steps 1 and 2 before the slice is
 * written, so an L2 entry never reaches the disk before its data and
 * refcounts; the slice is synced in step 3 of the next flush, before L1.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "qcow2.h"

/* Steps 1 and 2: what any L2 write must wait for. */
static int order_before_l2(struct img *img, struct qcow2 *s)
{
	int ret;

	if (s->w.data_dirty) {
		ret = sio_fdatasync(img->file);
		if (ret)
			return sx_error(ret, "%s: cannot sync data: %s",
					img->path, strerror(-ret));
		s->w.data_dirty = false;
	}
	return qcow2_rc_flush(img, s);
}

int qcow2_write_table_range(struct img *img, const uint64_t *table, uint64_t lo,
			    uint64_t hi, uint64_t table_offset)
{
	uint64_t *be, i;
	int ret;

	be = malloc((hi - lo) * 8);
	if (!be)
		return -ENOMEM;
	for (i = lo; i < hi; i++)
		be[i - lo] = htobe64(table[i]);
	ret = sio_pwrite(img->file, be, (hi - lo) * 8, table_offset + lo * 8);
	free(be);
	if (!ret)
		ret = sio_fdatasync(img->file);
	return ret;
}

int qcow2_l2_store(void *opaque, uint64_t key, void *buf, size_t len)
{
	struct img *img = opaque;
	struct qcow2 *s = img->priv;
	int ret;

	ret = order_before_l2(img, s);
	if (ret)
		return ret;
	ret = qcow2_check_overlap(img, s, key, len, "an L2 table");
	if (ret)
		return ret;
	ret = sio_pwrite(img->file, buf, len, key);
	if (ret)
		return sx_error(ret, "%s: cannot write L2 table at 0x%llx: %s",
				img->path, (unsigned long long)key,
				strerror(-ret));
	s->w.l2_unsynced = true;
	return 0;
}

int qcow2_l2_store_many(void *opaque, const uint64_t *keys,
			uint8_t *const *bufs, unsigned n, size_t len)
{
	struct img *img = opaque;
	struct qcow2 *s = img->priv;
	struct sio_wvec v[64];
	unsigned i;
	int ret;

	if (n > 64)
		return -EINVAL;
	ret = order_before_l2(img, s);
	if (ret)
		return ret;
	for (i = 0; i < n; i++) {
		ret = qcow2_check_overlap(img, s, keys[i], len, "an L2 table");
		if (ret)
			return ret;
		v[i] = (struct sio_wvec){bufs[i], len, keys[i]};
	}
	ret = sio_pwrite_many(img->file, v, n);
	if (ret)
		return sx_error(ret, "%s: cannot write L2 tables: %s",
				img->path, strerror(-ret));
	s->w.l2_unsynced = true;
	return 0;
}

int qcow2_flush_locked(struct img *img, struct qcow2 *s)
{
	int ret;

	if (!s->w.on)
		return 0;
	ret = order_before_l2(img, s);
	if (ret)
		return ret;
	ret = qcow2_l2cache_flush(&s->l2cache);
	if (ret)
		return ret;
	if (s->w.l2_unsynced) {
		ret = sio_fdatasync(img->file);
		if (ret)
			return sx_error(ret, "%s: cannot sync L2 tables: %s",
					img->path, strerror(-ret));
		s->w.l2_unsynced = false;
	}
	ret = qcow2_l1_flush(img, s);
	if (ret)
		return ret;
	/* Every reference removal is durable now. */
	return qcow2_rc_apply_frees(img, s);
}

int qcow2_flush(struct img *img)
{
	struct qcow2 *s = img->priv;
	int ret;

	if (!img->writable)
		return 0;
	pthread_mutex_lock(&s->lock);
	ret = qcow2_flush_locked(img, s);
	pthread_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_write_open(struct img *img, struct qcow2 *s)
{
	int ret;

	ret = qcow2_check_writable(img, s);
	if (ret)
		return ret;
	s->w.zero_cluster = sio_buf_alloc(s->cluster_size);
	if (!s->w.zero_cluster)
		return -ENOMEM;
	memset(s->w.zero_cluster, 0, s->cluster_size);
	ret = qcow2_rc_init_write(img, s);
	if (ret)
		return ret;
	ret = sio_file_size(img->file, &s->w.open_size);
	if (ret)
		return ret;
	ret = qcow2_clear_autoclear(img, s);
	if (ret)
		return ret;
	s->w.on = true;
	return 0;
}

void qcow2_write_close(struct img *img, struct qcow2 *s)
{
	bool frees;

	if (s->w.on) {
		/*
		 * close cannot fail: errors are dropped here (callers that
		 * care flush first). A second flush writes the decreases
		 * that the first one applied, so nothing is left leaked.
		 */
		frees = s->w.n_frees != 0;
		if (!qcow2_flush_locked(img, s) && frees)
			qcow2_flush_locked(img, s);
		qcow2_trim_tail(img, s);
		s->w.on = false;
	}
	qcow2_rc_fini_write(s);
	sio_buf_free(s->w.zero_cluster);
	s->w.zero_cluster = NULL;
}

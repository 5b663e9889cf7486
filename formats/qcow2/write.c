/*
 * qcow2 guest-facing writes: alloc_run/commit_run for the stream engine,
 * pwrite with copy-on-write, write_zeroes and discard.
 *
 * Everything here changes metadata in memory only (refcounts in the
 * refcount-block cache, L2 entries in the L2 cache, L1 in s->l1); flush.c
 * writes it back in the crash-consistent order. Data is written before the
 * L2 entry that points at it is changed, and a host cluster that loses its
 * last reference is freed through the deferred-free queue, so it is not
 * reused before the change is durable.
 *
 * Invariants kept for every guest cluster written here:
 *  - a cluster written in place is a normal (or zero-allocated) cluster with
 *    COPIED set (refcount 1); anything else gets a new host cluster;
 *  - the new cluster holds, outside the bytes written, exactly what the
 *    guest read there before (backing data, zeros, decompressed data, the
 *    old cluster's data): copy-on-write;
 *  - with extended L2 only the touched subclusters are written and marked
 *    allocated when the cluster was unallocated; partial subclusters are
 *    completed from what they showed before;
 *  - backing data is never exposed: write_zeroes and discard turn clusters
 *    into zero clusters when something could show through.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "qcow2.h"

#define ALL_SUBCLUSTERS 0xffffffffu
#define ZERO_BITMAP_ALL ((uint64_t)ALL_SUBCLUSTERS << 32)
/* Deferred frees kept in memory before a flush applies them. */
#define MAX_DEFERRED_FREES 4096u

/* The write operations accept 512-aligned ranges (or ranges to the end). */
static int check_write(struct img *img, uint64_t off, uint64_t len,
		       const char *op)
{
	struct qcow2 *s = img->priv;

	if (!img->writable || !s->w.on)
		return sx_error(-EROFS, "%s: image is not open for writing",
				img->path);
	if (!sx_range_within(off, len, img->size) || off % 512 ||
	    (len % 512 && off + len != img->size))
		return sx_error(
			-EINVAL,
			"%s: %s of [0x%llx, +%llu) is outside the image (size %llu) or not 512-byte aligned",
			img->path, op, (unsigned long long)off,
			(unsigned long long)len, (unsigned long long)img->size);
	return 0;
}

static uint32_t unit_mask(unsigned first, unsigned last)
{
	uint64_t m = ((1ull << (last - first + 1)) - 1) << first;

	return (uint32_t)m;
}

/* What the layers below show at [goff, goff + len): zeros past the end. */
static int read_below(struct img *img, uint8_t *buf, uint64_t len,
		      uint64_t goff)
{
	if (!img->read_below) {
		memset(buf, 0, len);
		return 0;
	}
	return img->read_below(img, buf, len, goff);
}

/*
 * What unit sc of the cluster at guest offset cl shows now, bytes
 * [rel, rel + len) of the cluster, into dst. cbuf: the decompressed
 * cluster for a compressed entry.
 */
static int unit_base(struct img *img, struct qcow2 *s,
		     const struct qcow2_l2e *e, const uint8_t *cbuf,
		     unsigned sc, uint8_t *dst, uint64_t cl, uint64_t rel,
		     uint64_t len)
{
	uint32_t bit = s->extended_l2 ? 1u << sc : ALL_SUBCLUSTERS;

	switch (e->type) {
	case QCOW2_C_COMPRESSED:
		memcpy(dst, cbuf + rel, len);
		return 0;
	case QCOW2_C_ZERO_PLAIN:
	case QCOW2_C_ZERO_ALLOC:
		memset(dst, 0, len);
		return 0;
	case QCOW2_C_UNALLOC:
	case QCOW2_C_NORMAL:
		break;
	}
	if (e->alloc & bit)
		return sio_pread(img->file, dst, len, e->host_off + rel);
	if (e->zero & bit) {
		memset(dst, 0, len);
		return 0;
	}
	return read_below(img, dst, len, cl + rel);
}

/* Queue the free of whatever host space entry e holds. */
static int free_entry(struct img *img, struct qcow2 *s,
		      const struct qcow2_l2e *e)
{
	if (e->type == QCOW2_C_COMPRESSED)
		return qcow2_free_deferred(img, s, e->coff, e->csize);
	if ((e->type == QCOW2_C_NORMAL || e->type == QCOW2_C_ZERO_ALLOC) &&
	    e->host_off)
		return qcow2_free_deferred(img, s, e->host_off,
					   s->cluster_size);
	return 0;
}

/* An entry's first word as it is now (for extended L2 entries). */
static uint64_t entry_word(const struct qcow2_l2e *e)
{
	if (e->type != QCOW2_C_NORMAL)
		return 0;
	return e->host_off | (e->copied ? QCOW2_OFLAG_COPIED : 0);
}

/*
 * Write [off, off + len), inside one cluster. dbuf and cbuf are cluster
 * sized scratch buffers.
 */
static int write_cluster(struct img *img, struct qcow2 *s, const uint8_t *ubuf,
			 uint64_t off, uint64_t len, uint8_t *dbuf,
			 uint8_t *cbuf)
{
	uint64_t cs = s->cluster_size, usz = s->subcluster_size;
	uint64_t cl = off & ~(cs - 1), rel = off - cl;
	unsigned first = (unsigned)(rel / usz);
	unsigned last = (unsigned)((rel + len - 1) / usz), u;
	uint32_t touched =
		s->extended_l2 ? unit_mask(first, last) : ALL_SUBCLUSTERS;
	uint64_t host, got, a, b, word, bitmap = 0;
	struct qcow2_l2e e;
	bool inplace;
	int ret;

	ret = qcow2_get_l2e(img, s, cl, &e);
	if (ret)
		return ret;
	inplace = e.copied &&
		  (e.type == QCOW2_C_NORMAL || e.type == QCOW2_C_ZERO_ALLOC);
	if (inplace && e.type == QCOW2_C_NORMAL &&
	    (e.alloc & touched) == touched) {
		/* Allocated and ours: no metadata changes. */
		ret = qcow2_check_overlap(img, s, e.host_off + rel, len,
					  "guest data");
		if (ret)
			return ret;
		ret = sio_pwrite(img->file, ubuf, len, e.host_off + rel);
		if (ret)
			return ret;
		s->w.data_dirty = true;
		return 0;
	}
	if (e.type == QCOW2_C_COMPRESSED) {
		ret = qcow2_read_compressed_entry(img, s, &e, cl, cbuf);
		if (ret)
			return ret;
	}

	/*
	 * The span to write: standard clusters are written whole; with
	 * subclusters only the touched ones, unless the cluster moves (then
	 * every allocated subcluster moves with it).
	 */
	if (s->extended_l2 && (inplace || e.type == QCOW2_C_UNALLOC)) {
		a = first * usz;
		b = (last + 1) * usz;
	} else {
		a = 0;
		b = cs;
	}
	for (u = (unsigned)(a / usz); u < b / usz; u++) {
		uint64_t us = u * usz;

		if (rel <= us && us + usz <= rel + len)
			continue; /* overwritten entirely */
		ret = unit_base(img, s, &e, cbuf, u, dbuf + us - a, cl, us,
				usz);
		if (ret)
			return ret;
	}
	memcpy(dbuf + rel - a, ubuf, len);

	if (inplace) {
		host = e.host_off;
		ret = qcow2_check_overlap(img, s, host + a, b - a,
					  "guest data");
		if (ret)
			return ret;
	} else {
		ret = qcow2_alloc_clusters(img, s, 1, &host, &got);
		if (ret)
			return ret;
	}
	ret = sio_pwrite(img->file, dbuf, b - a, host + a);
	if (ret)
		goto undo;
	s->w.data_dirty = true;

	word = host | QCOW2_OFLAG_COPIED;
	if (s->extended_l2) {
		uint32_t alloc = e.alloc | touched;
		uint32_t zero = e.zero & ~touched;

		if (e.type == QCOW2_C_COMPRESSED) {
			alloc = ALL_SUBCLUSTERS;
			zero = 0;
		}
		bitmap = alloc | ((uint64_t)zero << 32);
	}
	ret = qcow2_l2_set(img, s, cl, word, bitmap);
	if (ret)
		goto undo;
	if (!inplace)
		ret = free_entry(img, s, &e);
	return ret;
undo:
	/* A new cluster nothing points at can go back at once. */
	if (!inplace)
		qcow2_rc_update(img, s, host >> s->cluster_bits, -1);
	return ret;
}

static int pwrite_locked(struct img *img, struct qcow2 *s, const uint8_t *buf,
			 uint64_t len, uint64_t off, uint8_t *dbuf,
			 uint8_t *cbuf)
{
	int ret = 0;

	while (len && !ret) {
		uint64_t n = sx_min(len, s->cluster_size -
						 (off & (s->cluster_size - 1)));

		ret = write_cluster(img, s, buf, off, n, dbuf, cbuf);
		buf += n;
		off += n;
		len -= n;
	}
	return ret;
}

/* Two cluster-sized scratch buffers for write_cluster. */
static int scratch_alloc(struct qcow2 *s, uint8_t **dbuf, uint8_t **cbuf)
{
	*dbuf = sio_buf_alloc(s->cluster_size);
	*cbuf = sio_buf_alloc(s->cluster_size);
	if (*dbuf && *cbuf)
		return 0;
	sio_buf_free(*dbuf);
	sio_buf_free(*cbuf);
	return -ENOMEM;
}

int qcow2_pwrite(struct img *img, const void *buf, uint64_t len, uint64_t off)
{
	struct qcow2 *s = img->priv;
	uint8_t *dbuf, *cbuf;
	int ret;

	ret = check_write(img, off, len, "write");
	if (ret || !len)
		return ret;
	if (scratch_alloc(s, &dbuf, &cbuf))
		return sx_error(-ENOMEM, "%s: out of memory", img->path);
	pthread_mutex_lock(&s->lock);
	ret = pwrite_locked(img, s, buf, len, off, dbuf, cbuf);
	pthread_mutex_unlock(&s->lock);
	sio_buf_free(dbuf);
	sio_buf_free(cbuf);
	return ret;
}

/* A whole cluster reads as zeros from now on (v3). */
static int zero_whole(struct img *img, struct qcow2 *s, uint64_t cl)
{
	struct qcow2_l2e e;
	bool keep;
	int ret;

	ret = qcow2_get_l2e(img, s, cl, &e);
	if (ret)
		return ret;
	/* A cluster of ours keeps its host cluster (zero-allocated). */
	keep = e.copied &&
	       (e.type == QCOW2_C_NORMAL || e.type == QCOW2_C_ZERO_ALLOC);
	if (!s->extended_l2) {
		if (e.type == QCOW2_C_ZERO_PLAIN ||
		    (keep && e.type == QCOW2_C_ZERO_ALLOC))
			return 0;
		ret = qcow2_l2_set(img, s, cl,
				   keep ? e.host_off | QCOW2_OFLAG_COPIED |
						   QCOW2_OFLAG_ZERO
					: QCOW2_OFLAG_ZERO,
				   0);
	} else {
		if (!e.alloc && e.zero == ALL_SUBCLUSTERS &&
		    (keep || e.type == QCOW2_C_UNALLOC))
			return 0;
		ret = qcow2_l2_set(img, s, cl,
				   keep ? e.host_off | QCOW2_OFLAG_COPIED : 0,
				   ZERO_BITMAP_ALL);
	}
	if (!ret && !keep)
		ret = free_entry(img, s, &e);
	return ret;
}

/* Subclusters in mask read as zeros (extended L2, not compressed). */
static int zero_units(struct img *img, struct qcow2 *s, uint64_t cl,
		      const struct qcow2_l2e *e, uint32_t mask)
{
	uint32_t alloc = e->alloc & ~mask, zero = e->zero | mask;

	if (alloc == e->alloc && zero == e->zero)
		return 0;
	return qcow2_l2_set(img, s, cl, entry_word(e),
			    alloc | ((uint64_t)zero << 32));
}

/* Zero data for [off, end) inside one cluster, unless it reads zero. */
static int zero_data(struct img *img, struct qcow2 *s, uint64_t off,
		     uint64_t end, uint8_t *dbuf, uint8_t *cbuf)
{
	struct qcow2_l2e e;
	int ret;

	end = sx_min(end, img->size);
	if (off >= end)
		return 0;
	if (!s->extended_l2) {
		ret = qcow2_get_l2e(img, s, off, &e);
		if (ret)
			return ret;
		if (e.type == QCOW2_C_ZERO_PLAIN ||
		    e.type == QCOW2_C_ZERO_ALLOC ||
		    (e.type == QCOW2_C_UNALLOC && !img->backing_name))
			return 0;
	}
	return write_cluster(img, s, s->w.zero_cluster, off, end - off, dbuf,
			     cbuf);
}

/* Too many queued frees: apply them (a flush) to bound the memory. */
static int bound_frees(struct img *img, struct qcow2 *s)
{
	/* A flush in flight applies them when it ends. */
	if (s->w.n_frees < MAX_DEFERRED_FREES || qcow2_flush_busy_locked(s))
		return 0;
	return qcow2_flush_locked(img, s);
}

/* The end of a range, with the image's last partial cluster made whole. */
static uint64_t effective_end(struct img *img, struct qcow2 *s, uint64_t end)
{
	uint64_t r;

	if (end == img->size && !sx_align_up(end, s->cluster_size, &r))
		return r;
	return end;
}

static int write_zeroes_locked(struct img *img, struct qcow2 *s, uint64_t off,
			       uint64_t len, uint8_t *dbuf, uint8_t *cbuf)
{
	uint64_t cs = s->cluster_size, usz = s->subcluster_size;
	uint64_t end = effective_end(img, s, off + len), cur = off;
	int ret = 0;

	while (cur < end && !ret) {
		uint64_t cl = sx_align_down(cur, cs);
		uint64_t c_end = sx_min(end, cl + cs), u0, u1;
		struct qcow2_l2e e;

		ret = bound_frees(img, s);
		if (ret)
			break;
		if (s->hdr.version < 3) {
			ret = zero_data(img, s, cur, c_end, dbuf, cbuf);
		} else if (cur == cl && c_end == cl + cs) {
			ret = zero_whole(img, s, cl);
		} else if (!s->extended_l2) {
			ret = zero_data(img, s, cur, c_end, dbuf, cbuf);
		} else {
			ret = qcow2_get_l2e(img, s, cl, &e);
			if (ret)
				break;
			u0 = (cur - cl + usz - 1) / usz;
			u1 = (c_end - cl) / usz;
			if (e.type == QCOW2_C_COMPRESSED || u0 >= u1) {
				ret = zero_data(img, s, cur, c_end, dbuf, cbuf);
			} else {
				ret = zero_units(img, s, cl, &e,
						 unit_mask((unsigned)u0,
							   (unsigned)u1 - 1));
				if (!ret)
					ret = zero_data(img, s, cur,
							cl + u0 * usz, dbuf,
							cbuf);
				if (!ret)
					ret = zero_data(img, s, cl + u1 * usz,
							c_end, dbuf, cbuf);
			}
		}
		cur = c_end;
	}
	return ret;
}

int qcow2_write_zeroes(struct img *img, uint64_t off, uint64_t len,
		       unsigned flags)
{
	struct qcow2 *s = img->priv;
	uint8_t *dbuf, *cbuf;
	int ret;

	ret = check_write(img, off, len, "write zeroes");
	if (ret || !len)
		return ret;
	if (flags & ~IMG_WZ_NO_FALLBACK)
		return sx_error(-EINVAL, "%s: unknown write_zeroes flags 0x%x",
				img->path, flags);
	if (s->hdr.version < 3 && (flags & IMG_WZ_NO_FALLBACK))
		return sx_error(-ENOTSUP,
				"%s: version 2 images have no zero clusters",
				img->path);
	if (scratch_alloc(s, &dbuf, &cbuf))
		return sx_error(-ENOMEM, "%s: out of memory", img->path);
	pthread_mutex_lock(&s->lock);
	ret = write_zeroes_locked(img, s, off, len, dbuf, cbuf);
	pthread_mutex_unlock(&s->lock);
	sio_buf_free(dbuf);
	sio_buf_free(cbuf);
	return ret;
}

/*
 * One whole cluster: a zero cluster when a backing file could show
 * through, unallocated otherwise; its host space is freed.
 */
static int discard_cluster(struct img *img, struct qcow2 *s, uint64_t cl,
			   bool backing)
{
	struct qcow2_l2e e;
	bool done;
	int ret;

	ret = qcow2_get_l2e(img, s, cl, &e);
	if (ret)
		return ret;
	if (!s->extended_l2) {
		done = backing ? e.type == QCOW2_C_ZERO_PLAIN
			       : e.type == QCOW2_C_UNALLOC;
		if (done)
			return 0;
		ret = qcow2_l2_set(img, s, cl, backing ? QCOW2_OFLAG_ZERO : 0,
				   0);
	} else {
		done = e.type == QCOW2_C_UNALLOC && !e.alloc &&
		       e.zero == (backing ? ALL_SUBCLUSTERS : 0);
		if (done)
			return 0;
		ret = qcow2_l2_set(img, s, cl, 0,
				   backing ? ZERO_BITMAP_ALL : 0);
	}
	if (!ret)
		ret = free_entry(img, s, &e);
	return ret;
}

int qcow2_discard(struct img *img, uint64_t off, uint64_t len)
{
	struct qcow2 *s = img->priv;
	uint64_t cs = s->cluster_size, end, cl;
	bool backing = img->backing_name != NULL;
	int ret;

	ret = check_write(img, off, len, "discard");
	if (ret || !len)
		return ret;
	/* v2 has no zero clusters: unallocating would expose the backing. */
	if (backing && s->hdr.version < 3)
		return 0;
	end = effective_end(img, s, off + len);
	pthread_mutex_lock(&s->lock);
	/* Whole clusters only: discard is advisory. */
	if (sx_align_up(off, cs, &cl))
		cl = end;
	for (; cl + cs <= end && !ret; cl += cs) {
		ret = bound_frees(img, s);
		if (!ret)
			ret = discard_cluster(img, s, cl, backing);
	}
	pthread_mutex_unlock(&s->lock);
	return ret;
}

int qcow2_alloc_run(struct img *img, uint64_t off, uint64_t nclusters,
		    uint64_t *host_off, uint64_t *got)
{
	struct qcow2 *s = img->priv;
	uint64_t left, host = 0, n = 0;
	int ret;

	if (!img->writable || !s->w.on)
		return sx_error(-EROFS, "%s: image is not open for writing",
				img->path);
	if (!nclusters || off >= img->size ||
	    !sx_is_aligned(off, s->cluster_size))
		return sx_error(-EINVAL,
				"%s: bad allocation at 0x%llx (%llu clusters)",
				img->path, (unsigned long long)off,
				(unsigned long long)nclusters);
	left = (img->size - off + s->cluster_size - 1) >> s->cluster_bits;
	pthread_mutex_lock(&s->lock);
	ret = qcow2_alloc_clusters(img, s, sx_min(nclusters, left), &host, &n);
	pthread_mutex_unlock(&s->lock);
	if (ret)
		return ret;
	*host_off = host;
	*got = n;
	return 0;
}

void qcow2_release_run(struct img *img, uint64_t host_off, uint64_t nclusters)
{
	struct qcow2 *s = img->priv;
	uint64_t i;

	/*
	 * Nothing points at these clusters, so the decrease may reach the
	 * disk at once: no deferral as for freed clusters.
	 */
	pthread_mutex_lock(&s->lock);
	for (i = 0; i < nclusters; i++)
		qcow2_rc_update(img, s, (host_off >> s->cluster_bits) + i, -1);
	pthread_mutex_unlock(&s->lock);
}

int qcow2_commit_run(struct img *img, uint64_t off, uint64_t nclusters,
		     uint64_t host_off, unsigned flags)
{
	struct qcow2 *s = img->priv;
	uint64_t cs = s->cluster_size, i, left;
	int ret;

	if (!img->writable || !s->w.on)
		return sx_error(-EROFS, "%s: image is not open for writing",
				img->path);
	left = off < img->size ? (img->size - off + cs - 1) >> s->cluster_bits
			       : 0;
	if (!nclusters || nclusters > left || !sx_is_aligned(off, cs) ||
	    !sx_is_aligned(host_off, cs))
		return sx_error(
			-EINVAL,
			"%s: bad commit of %llu clusters at 0x%llx (host 0x%llx)",
			img->path, (unsigned long long)nclusters,
			(unsigned long long)off, (unsigned long long)host_off);
	pthread_mutex_lock(&s->lock);
	ret = qcow2_check_overlap(img, s, host_off, nclusters * cs,
				  "streamed data");
	if (ret)
		goto out;
	/* The engine wrote the data: it must be synced before these L2s. */
	s->w.data_dirty = true;
	for (i = 0; i < nclusters && !ret; i++) {
		uint64_t goff = off + i * cs, host = host_off + i * cs;
		struct qcow2_l2e e;

		ret = qcow2_get_l2e(img, s, goff, &e);
		if (ret)
			break;
		if ((flags & IMG_COMMIT_REPLACE_SHARED) &&
		    e.type == QCOW2_C_NORMAL && !e.copied) {
			/*
			 * A copy of a cluster shared with a snapshot (the
			 * caller held the cluster locked since it read it):
			 * ours from now on, the snapshot's loses a reference
			 * once the new entry is durable.
			 */
			ret = bound_frees(img, s);
			if (!ret)
				ret = qcow2_l2_set(
					img, s, goff, host | QCOW2_OFLAG_COPIED,
					s->extended_l2 ? ALL_SUBCLUSTERS : 0);
			if (!ret)
				ret = free_entry(img, s, &e);
			continue;
		}
		if (e.type != QCOW2_C_UNALLOC || e.alloc || e.zero) {
			/*
			 * Written meanwhile (a guest write, write_zeroes):
			 * that is newer than the copy. Nothing points at the
			 * copy: give its cluster back now.
			 */
			ret = qcow2_rc_update(img, s, host >> s->cluster_bits,
					      -1);
			continue;
		}
		ret = qcow2_l2_set(img, s, goff, host | QCOW2_OFLAG_COPIED,
				   s->extended_l2 ? ALL_SUBCLUSTERS : 0);
	}
out:
	pthread_mutex_unlock(&s->lock);
	return ret;
}

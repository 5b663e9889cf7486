/*
 * Guest I/O calls of the public API: disk handles, validation, and the
 * marshalling of requests to the disk's worker.
 *
 * A siphon_disk handle is the disk itself (struct disk) with a reference
 * held, so that detaching never frees it under a VMM that still has it; a
 * detached disk refuses new requests (-ENOENT) because its worker is gone.
 *
 * A request is one allocation (struct api_req: the engine's guest_req, the
 * user's callback and a copy of the iovec array) that the worker owns from
 * disk_guest_post() until it calls complete(), which calls the user back
 * and frees it. Requests in flight never outlive the worker: it only exits
 * once the guest engine is idle, and detach waits for it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domain.h"

/* Most runs one block status request finds (1 MiB of engine memory). */
#define STATUS_MAX_EXTENTS 65536u

/* Where a block status request's answer goes (the caller's memory). */
struct status_out {
	struct siphon_extent *ext;
	unsigned *n;
};

struct api_req {
	struct guest_req g;
	struct disk *d;
	siphon_io_fn cb;
	void *opaque;
	struct status_out st; /* STATUS: g.ext is the engine's copy */
	struct iovec iov[];
};

static struct disk *to_disk(siphon_disk *h)
{
	return (struct disk *)h;
}

SIPHON_API int siphon_disk_get(siphon_domain *dom, const char *path,
			       siphon_disk **out)
{
	struct disk *d;
	int ret;

	if (!dom || !out)
		return sx_error(EINVAL, "domain or out is NULL");
	ret = dom_get_disk(dom, path, &d);
	if (ret < 0)
		return ret;
	*out = (siphon_disk *)d;
	return 0;
}

SIPHON_API void siphon_disk_put(siphon_disk *disk)
{
	if (disk)
		dom_put_disk(to_disk(disk));
}

SIPHON_API int siphon_disk_get_size(siphon_disk *disk, uint64_t *size)
{
	if (!disk || !size)
		return sx_error(EINVAL, "disk or size is NULL");
	*size = to_disk(disk)->size;
	return 0;
}

SIPHON_API int siphon_disk_set_copy_on_read(siphon_disk *disk, int mode)
{
	if (!disk)
		return sx_error(EINVAL, "disk is NULL");
	if (mode != SIPHON_COR_AUTO && mode != SIPHON_COR_ON &&
	    mode != SIPHON_COR_OFF)
		return sx_error(EINVAL, "unknown copy-on-read mode %d", mode);
	atomic_store(&to_disk(disk)->cor_mode, mode);
	/* The worker applies it when it next takes requests. */
	disk_wake(to_disk(disk));
	return 0;
}

SIPHON_API int siphon_disk_get_stats(siphon_disk *disk,
				     struct siphon_disk_stats *stats)
{
	struct siphon_disk_stats st = {0};
	struct disk_cmd cmd = {0};
	size_t len;
	int ret;

	if (!disk || !stats)
		return sx_error(EINVAL, "disk or stats is NULL");
	if (stats->size < sizeof(size_t) + sizeof(uint64_t))
		return sx_error(EINVAL, "stats size %zu too small",
				stats->size);
	cmd.kind = DISK_CMD_GUEST_STATS;
	ret = disk_cmd_call(to_disk(disk), &cmd);
	if (ret < 0)
		return ret;
	st.size = sizeof(st);
	st.cor_bytes = cmd.stats.cor_bytes;
	st.cor_skipped = cmd.stats.cor_skipped;
	st.lock_waits = cmd.stats.waits;
	st.sync_waits = cmd.sync_waits[1];
	st.sync_waits_attach = cmd.sync_waits[0];
	st.sync_waits_finalize = cmd.sync_waits[2];
	len = stats->size < sizeof(st) ? stats->size : sizeof(st);
	memcpy(stats, &st, len);
	stats->size = len;
	return 0;
}

/* ---- requests ---- */

static const char *op_name(enum guest_op op)
{
	switch (op) {
	case GUEST_READ:
		return "read";
	case GUEST_WRITE:
		return "write";
	case GUEST_FLUSH:
		return "flush";
	case GUEST_DISCARD:
		return "discard";
	case GUEST_WRITE_ZEROES:
		return "write zeroes";
	case GUEST_STATUS:
		return "block status";
	}
	return "?";
}

static void api_complete(struct guest_req *g, int ret)
{
	struct api_req *r = (struct api_req *)g;
	char why[SX_ERROR_MAX / 2];

	/*
	 * The callback's siphon_get_error() (the worker's message): what
	 * failed below, when the last message recorded here was about this
	 * errno, else strerror; either way naming the disk and the request.
	 */
	if (ret < 0) {
		snprintf(why, sizeof(why), "%s",
			 sx_last_errno() == -ret ? sx_last_error()
						 : strerror(-ret));
		sx_error(ret, "%s: guest %s at %llu failed: %s", r->d->path,
			 op_name(g->op), (unsigned long long)g->off, why);
	}
	if (g->op == GUEST_STATUS && ret >= 0) {
		for (unsigned i = 0; i < g->ext_n; i++)
			r->st.ext[i] = (struct siphon_extent){
				.len = g->ext[i].len,
				.flags = (g->ext[i].flags & GUEST_EXT_HOLE
						  ? SIPHON_EXTENT_HOLE
						  : 0) |
					 (g->ext[i].flags & GUEST_EXT_ZERO
						  ? SIPHON_EXTENT_ZERO
						  : 0)};
		*r->st.n = g->ext_n;
	}
	r->cb((siphon_disk *)r->d, ret, r->opaque);
	free(g->ext);
	free(r);
}

static int check_range(struct disk *d, enum guest_op op, uint64_t off,
		       uint64_t len)
{
	uint64_t size = d->size;

	if (len > SIPHON_IO_MAX_BYTES && op != GUEST_STATUS)
		return sx_error(EINVAL, "%s: %s of %llu bytes: more than %u",
				d->path, op_name(op), (unsigned long long)len,
				SIPHON_IO_MAX_BYTES);
	if (off > size || len > size - off)
		return sx_error(EINVAL,
				"%s: %s of [%llu, +%llu) is beyond the end "
				"(%llu)",
				d->path, op_name(op), (unsigned long long)off,
				(unsigned long long)len,
				(unsigned long long)size);
	if (off % 512 || (len % 512 && off + len != size))
		return sx_error(EINVAL,
				"%s: %s of [%llu, +%llu) is not 512-byte "
				"aligned",
				d->path, op_name(op), (unsigned long long)off,
				(unsigned long long)len);
	return 0;
}

static int submit(siphon_disk *disk, enum guest_op op, const struct iovec *iov,
		  int iovcnt, uint64_t off, uint64_t len, unsigned flags,
		  const struct status_out *st, siphon_io_fn cb, void *opaque)
{
	struct disk *d = to_disk(disk);
	unsigned allowed = 0, gflags = 0;
	struct api_req *r;
	int i, ret;

	if (!d || !cb)
		return sx_error(EINVAL, "disk or callback is NULL");
	if (op == GUEST_READ)
		allowed = SIPHON_IO_NO_COR;
	else if (op == GUEST_WRITE)
		allowed = SIPHON_IO_FUA;
	else if (op == GUEST_WRITE_ZEROES)
		allowed = SIPHON_IO_FUA | SIPHON_IO_FAST_ZERO;
	if (flags & ~allowed)
		return sx_error(EINVAL, "%s: %s: flags 0x%x not allowed",
				d->path, op_name(op), flags & ~allowed);
	if (op == GUEST_READ || op == GUEST_WRITE) {
		if (iovcnt < 0 || iovcnt > SIPHON_IO_MAX_IOV ||
		    (!iov && iovcnt))
			return sx_error(EINVAL, "%s: bad iovec (%d elements)",
					d->path, iovcnt);
		len = 0;
		for (i = 0; i < iovcnt; i++) {
			if (iov[i].iov_len > SIPHON_IO_MAX_BYTES ||
			    (iov[i].iov_len && !iov[i].iov_base))
				return sx_error(EINVAL, "%s: bad iovec element",
						d->path);
			len += iov[i].iov_len;
		}
	}
	if (op != GUEST_FLUSH) {
		ret = check_range(d, op, off, len);
		if (ret < 0)
			return ret;
	}
	if (op == GUEST_STATUS && (!st->ext || !st->n || !*st->n))
		return sx_error(EINVAL, "%s: block status: no room for extents",
				d->path);
	r = malloc(sizeof(*r) + (size_t)iovcnt * sizeof(struct iovec));
	if (!r)
		return sx_error(ENOMEM, "out of memory");
	memset(r, 0, sizeof(*r));
	if (iovcnt)
		memcpy(r->iov, iov, (size_t)iovcnt * sizeof(struct iovec));
	if (flags & SIPHON_IO_FUA)
		gflags |= GUEST_F_FUA;
	if (flags & SIPHON_IO_NO_COR)
		gflags |= GUEST_F_NO_COR;
	if (flags & SIPHON_IO_FAST_ZERO)
		gflags |= GUEST_F_FAST_ZERO;
	r->g.op = op;
	r->g.flags = gflags;
	r->g.iov = r->iov;
	r->g.iovcnt = iovcnt;
	r->g.off = off;
	r->g.len = len;
	r->g.complete = api_complete;
	if (op == GUEST_STATUS) {
		/* Fewer runs than asked for is an answer too (siphon.h). */
		r->g.ext_max = *st->n < STATUS_MAX_EXTENTS ? *st->n
							   : STATUS_MAX_EXTENTS;
		r->g.ext = calloc(r->g.ext_max, sizeof(*r->g.ext));
		if (!r->g.ext) {
			free(r);
			return sx_error(ENOMEM, "out of memory");
		}
		r->st = *st;
	}
	r->d = d;
	r->cb = cb;
	r->opaque = opaque;
	ret = disk_guest_post(d, &r->g);
	if (ret < 0) {
		free(r->g.ext);
		free(r);
	}
	return ret;
}

SIPHON_API int siphon_disk_aio_read(siphon_disk *disk, const struct iovec *iov,
				    int iovcnt, uint64_t off, unsigned flags,
				    siphon_io_fn cb, void *opaque)
{
	return submit(disk, GUEST_READ, iov, iovcnt, off, 0, flags, NULL, cb,
		      opaque);
}

SIPHON_API int siphon_disk_aio_write(siphon_disk *disk, const struct iovec *iov,
				     int iovcnt, uint64_t off, unsigned flags,
				     siphon_io_fn cb, void *opaque)
{
	return submit(disk, GUEST_WRITE, iov, iovcnt, off, 0, flags, NULL, cb,
		      opaque);
}

SIPHON_API int siphon_disk_aio_flush(siphon_disk *disk, unsigned flags,
				     siphon_io_fn cb, void *opaque)
{
	return submit(disk, GUEST_FLUSH, NULL, 0, 0, 0, flags, NULL, cb,
		      opaque);
}

SIPHON_API int siphon_disk_aio_discard(siphon_disk *disk, uint64_t off,
				       uint64_t len, unsigned flags,
				       siphon_io_fn cb, void *opaque)
{
	return submit(disk, GUEST_DISCARD, NULL, 0, off, len, flags, NULL, cb,
		      opaque);
}

SIPHON_API int siphon_disk_aio_block_status(siphon_disk *disk, uint64_t off,
					    uint64_t len, unsigned flags,
					    struct siphon_extent *ext,
					    unsigned *n, siphon_io_fn cb,
					    void *opaque)
{
	struct status_out st = {.ext = ext, .n = n};

	return submit(disk, GUEST_STATUS, NULL, 0, off, len, flags, &st, cb,
		      opaque);
}

SIPHON_API int siphon_disk_aio_write_zeroes(siphon_disk *disk, uint64_t off,
					    uint64_t len, unsigned flags,
					    siphon_io_fn cb, void *opaque)
{
	return submit(disk, GUEST_WRITE_ZEROES, NULL, 0, off, len, flags, NULL,
		      cb, opaque);
}

/* ---- synchronous wrappers ---- */

struct waiter {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	int ret;
	char msg[SX_ERROR_MAX]; /* the worker's message when ret < 0 */
};

static void wake_waiter(siphon_disk *disk, int ret, void *opaque)
{
	struct waiter *w = opaque;

	(void)disk;
	pthread_mutex_lock(&w->lock);
	w->ret = ret;
	if (ret < 0)
		snprintf(w->msg, sizeof(w->msg), "%s", sx_last_error());
	w->done = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

static int sync_call(siphon_disk *disk, enum guest_op op,
		     const struct iovec *iov, int iovcnt, uint64_t off,
		     uint64_t len, unsigned flags, const struct status_out *st)
{
	struct waiter w = {.done = false};
	int ret;

	if (disk && disk_is_worker(to_disk(disk)))
		return sx_error(EDEADLK,
				"%s: synchronous I/O from its own completion",
				to_disk(disk)->path);
	pthread_mutex_init(&w.lock, NULL);
	pthread_cond_init(&w.cond, NULL);
	ret = submit(disk, op, iov, iovcnt, off, len, flags, st, wake_waiter,
		     &w);
	if (ret >= 0) {
		pthread_mutex_lock(&w.lock);
		while (!w.done)
			pthread_cond_wait(&w.cond, &w.lock);
		pthread_mutex_unlock(&w.lock);
		ret = w.ret;
		/* The worker's message, on the caller's thread. */
		if (ret < 0)
			sx_error(ret, "%s", w.msg);
	}
	pthread_cond_destroy(&w.cond);
	pthread_mutex_destroy(&w.lock);
	return ret;
}

SIPHON_API int siphon_disk_read(siphon_disk *disk, const struct iovec *iov,
				int iovcnt, uint64_t off, unsigned flags)
{
	return sync_call(disk, GUEST_READ, iov, iovcnt, off, 0, flags, NULL);
}

SIPHON_API int siphon_disk_write(siphon_disk *disk, const struct iovec *iov,
				 int iovcnt, uint64_t off, unsigned flags)
{
	return sync_call(disk, GUEST_WRITE, iov, iovcnt, off, 0, flags, NULL);
}

SIPHON_API int siphon_disk_pread(siphon_disk *disk, void *buf, size_t len,
				 uint64_t off, unsigned flags)
{
	struct iovec v = {.iov_base = buf, .iov_len = len};

	return sync_call(disk, GUEST_READ, &v, 1, off, 0, flags, NULL);
}

SIPHON_API int siphon_disk_pwrite(siphon_disk *disk, const void *buf,
				  size_t len, uint64_t off, unsigned flags)
{
	struct iovec v = {.iov_base = (void *)buf, .iov_len = len};

	return sync_call(disk, GUEST_WRITE, &v, 1, off, 0, flags, NULL);
}

SIPHON_API int siphon_disk_flush(siphon_disk *disk, unsigned flags)
{
	return sync_call(disk, GUEST_FLUSH, NULL, 0, 0, 0, flags, NULL);
}

SIPHON_API int siphon_disk_discard(siphon_disk *disk, uint64_t off,
				   uint64_t len, unsigned flags)
{
	return sync_call(disk, GUEST_DISCARD, NULL, 0, off, len, flags, NULL);
}

SIPHON_API int siphon_disk_write_zeroes(siphon_disk *disk, uint64_t off,
					uint64_t len, unsigned flags)
{
	return sync_call(disk, GUEST_WRITE_ZEROES, NULL, 0, off, len, flags,
			 NULL);
}

SIPHON_API int siphon_disk_block_status(siphon_disk *disk, uint64_t off,
					uint64_t len, unsigned flags,
					struct siphon_extent *ext, unsigned *n)
{
	struct status_out st = {.ext = ext, .n = n};

	return sync_call(disk, GUEST_STATUS, NULL, 0, off, len, flags, &st);
}

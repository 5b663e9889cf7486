/*
 * qcow2 cluster mapping: the active L1 table, L2 entry decoding (standard
 * and extended entries, compressed descriptors) and block_status.
 *
 * Entries are decoded with pure functions so they can be unit-tested; every
 * host offset found in a table is checked against the file before it is
 * reported. An L1 entry of 0 maps a whole L2 table's worth of guest space to
 * "unallocated" without any I/O, which keeps maps of large sparse overlays
 * fast. block_status walks units: subclusters with extended L2, clusters
 * otherwise, and merges neighbours that have the same status (and, for data,
 * contiguous host offsets).
 *
 * Write path: qcow2_l2_set changes one L2 entry in the cache (marking the
 * slice dirty), creating the L2 table first when the L1 entry is empty. A
 * new table is zero-filled on disk before use (a reused cluster may hold
 * garbage, and slices that are never dirtied are read back from disk); its
 * L1 entry is only changed in memory and reaches the disk in
 * qcow2_l1_flush, after the L2 writes are synced. L1 and L2 entries that
 * the writer creates carry COPIED (refcount 1).
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd.h"
#include "qcow2.h"

int qcow2_l2e_decode(const struct qcow2 *s, uint64_t word, uint64_t bitmap,
		     struct qcow2_l2e *out, const char **why)
{
	struct qcow2_l2e e = {0};
	bool has_off;
	uint64_t off;

	e.copied = word & QCOW2_OFLAG_COPIED;
	if (word & QCOW2_OFLAG_COMPRESSED) {
		if (e.copied) {
			*why = "compressed cluster entry has the COPIED flag";
			return -EINVAL;
		}
		/* Compressed clusters are all-or-nothing: no bitmap. */
		if (s->extended_l2 && bitmap) {
			*why = "compressed cluster entry has a subcluster bitmap";
			return -EINVAL;
		}
		e.type = QCOW2_C_COMPRESSED;
		qcow2_decode_compressed(s, word, &e.coff, &e.csize);
		e.alloc = UINT32_MAX;
		*out = e;
		return 0;
	}

	off = word & QCOW2_L2E_OFFSET_MASK;
	if (!sx_is_aligned(off, s->cluster_size)) {
		*why = "data cluster offset unaligned";
		return -EINVAL;
	}
	/*
	 * Offset 0 means "no cluster", except in an external data file where
	 * 0 is a valid offset: clusters there always have refcount 1, so
	 * COPIED tells the two apart.
	 */
	has_off = off ||
		  ((s->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
		   e.copied);

	if (s->extended_l2) {
		e.alloc = (uint32_t)bitmap;
		e.zero = (uint32_t)(bitmap >> 32);
		if (e.alloc & e.zero) {
			*why = "subcluster both allocated and zero";
			return -EINVAL;
		}
		if (!has_off && e.alloc) {
			*why = "subclusters allocated in a cluster without offset";
			return -EINVAL;
		}
		e.type = has_off ? QCOW2_C_NORMAL : QCOW2_C_UNALLOC;
		e.host_off = off;
		*out = e;
		return 0;
	}

	if (word & QCOW2_OFLAG_ZERO) {
		if (s->hdr.version < 3) {
			*why = "zero cluster entry in a version 2 image";
			return -EINVAL;
		}
		e.type = has_off ? QCOW2_C_ZERO_ALLOC : QCOW2_C_ZERO_PLAIN;
		e.zero = UINT32_MAX;
	} else if (has_off) {
		e.type = QCOW2_C_NORMAL;
		e.alloc = UINT32_MAX;
	} else {
		e.type = QCOW2_C_UNALLOC;
	}
	e.host_off = off;
	*out = e;
	return 0;
}

void qcow2_decode_compressed(const struct qcow2 *s, uint64_t word,
			     uint64_t *coff, uint64_t *csize)
{
	uint64_t sectors;

	*coff = word & s->coff_mask;
	sectors = ((word >> s->csize_shift) & s->csize_mask) + 1;
	/* The count includes the sector the data starts in. */
	*csize = sectors * QCOW2_COMPRESSED_SECTOR -
		 (*coff & (QCOW2_COMPRESSED_SECTOR - 1));
}

enum img_status qcow2_l2e_unit_status(const struct qcow2 *s,
				      const struct qcow2_l2e *e, unsigned sc,
				      uint64_t *host, bool *host_valid)
{
	uint32_t bit = s->extended_l2 ? 1u << sc : UINT32_MAX;
	uint64_t rel = s->extended_l2 ? (uint64_t)sc * s->subcluster_size : 0;

	*host_valid = false;
	*host = 0;
	switch (e->type) {
	case QCOW2_C_COMPRESSED:
		return IMG_COMPRESSED;
	case QCOW2_C_ZERO_PLAIN:
		return IMG_ZERO;
	case QCOW2_C_ZERO_ALLOC:
		*host = e->host_off + rel;
		*host_valid = true;
		return IMG_ZERO;
	case QCOW2_C_UNALLOC:
	case QCOW2_C_NORMAL:
		break;
	}
	if (e->alloc & bit) {
		*host = e->host_off + rel;
		*host_valid = true;
		return IMG_DATA;
	}
	if (e->zero & bit) {
		/* Like qemu's map: the zero unit keeps its offset if any. */
		if (e->type == QCOW2_C_NORMAL) {
			*host = e->host_off + rel;
			*host_valid = true;
		}
		return IMG_ZERO;
	}
	return IMG_UNALLOC;
}

int qcow2_load_l1(struct img *img, struct qcow2 *s)
{
	uint64_t i, bytes = s->l1_size * 8;
	int ret;

	if (!s->l1_size)
		return 0;
	s->l1 = malloc(bytes);
	if (!s->l1)
		return -ENOMEM;
	/* On failure sio_pread's message (naming the file) stands. */
	ret = sio_pread(img->file, s->l1, bytes, s->hdr.l1_table_offset);
	if (ret)
		return ret;
	for (i = 0; i < s->l1_size; i++)
		s->l1[i] = be64toh(s->l1[i]);
	return 0;
}

/* Is [host, host + 1) inside the file? Refresh the size once if not. */
static int check_host(struct img *img, struct qcow2 *s, bool data,
		      uint64_t host)
{
	uint64_t limit = data ? s->data_file_size : s->file_size;
	int ret;

	if (host < limit)
		return 0;
	/* The file may have grown since open (a writer, preallocation). */
	ret = qcow2_refresh_file_size(img, s);
	if (ret)
		return ret;
	limit = data ? s->data_file_size : s->file_size;
	return host < limit ? 0 : -EINVAL;
}

/*
 * The L2 slice holding the entry for guest cluster `cluster` whose table is
 * at l2_off. *idx is the entry's index within the slice and *slice_entries
 * the number of entries in a slice; both depend only on the cluster and are
 * set on every path, failures included (the caller's loop bounds are then
 * never indeterminate, whatever the compiler can prove about sx_error()'s
 * return value). *slice is set only on success; returns 0 or -errno.
 */
static int get_slice_req(struct img *img, struct qcow2 *s, uint64_t l2_off,
			 uint64_t cluster, uint64_t guest, uint8_t **slice,
			 uint64_t *idx, uint64_t *slice_entries,
			 struct img_meta_req *req);

static int get_slice(struct img *img, struct qcow2 *s, uint64_t l2_off,
		     uint64_t cluster, uint64_t guest, uint8_t **slice,
		     uint64_t *idx, uint64_t *slice_entries)
{
	return get_slice_req(img, s, l2_off, cluster, guest, slice, idx,
			     slice_entries, NULL);
}

/*
 * get_slice; with req, a slice that is not cached is not read: -EAGAIN
 * and *req describes the read (for meta_fill).
 */
static int get_slice_req(struct img *img, struct qcow2 *s, uint64_t l2_off,
			 uint64_t cluster, uint64_t guest, uint8_t **slice,
			 uint64_t *idx, uint64_t *slice_entries,
			 struct img_meta_req *req)
{
	uint64_t per_slice = s->l2cache.slice_size / s->l2_entry_size;
	uint64_t in_table = cluster & (s->l2_entries - 1);
	uint64_t key = l2_off + (in_table / per_slice) * s->l2cache.slice_size;
	int ret;

	*idx = in_table % per_slice;
	*slice_entries = per_slice;
	if (!sx_is_aligned(l2_off, s->cluster_size))
		return sx_error(
			-EINVAL,
			"%s: L2 table offset 0x%llx unaligned (guest offset 0x%llx)",
			img->path, (unsigned long long)l2_off,
			(unsigned long long)guest);
	ret = check_host(img, s, false, l2_off + s->cluster_size - 1);
	if (ret == -EINVAL)
		return sx_error(
			-EINVAL,
			"%s: L2 table at 0x%llx is beyond the end of the file (guest offset 0x%llx)",
			img->path, (unsigned long long)l2_off,
			(unsigned long long)guest);
	if (ret)
		return ret;
	/* One lookup on a hit, as for the synchronous walk. */
	if (req && qcow2_l2cache_get_cached(&s->l2cache, key, slice) == 0)
		return 0;
	if (req) {
		uint64_t per_guest = per_slice << s->cluster_bits;

		*req = (struct img_meta_req){
			.file = img->file,
			.host_off = key,
			.len = s->l2cache.slice_size,
			.guest_off = guest - guest % per_guest,
			.tag = s->l2cache.gen,
		};
		return -EAGAIN;
	}
	ret = qcow2_l2cache_get(&s->l2cache, key, false, slice);
	if (ret)
		return sx_error(
			ret,
			"%s: cannot read L2 table at 0x%llx (guest offset 0x%llx)",
			img->path, (unsigned long long)l2_off,
			(unsigned long long)guest);
	return 0;
}

static int decode_at(struct img *img, struct qcow2 *s, const uint8_t *slice,
		     uint64_t idx, uint64_t guest, struct qcow2_l2e *e)
{
	const uint8_t *p = slice + idx * s->l2_entry_size;
	uint64_t word, bitmap = 0;
	const char *why = "";
	int ret;

	memcpy(&word, p, 8);
	word = be64toh(word);
	if (s->extended_l2) {
		memcpy(&bitmap, p + 8, 8);
		bitmap = be64toh(bitmap);
	}
	ret = qcow2_l2e_decode(s, word, bitmap, e, &why);
	if (ret)
		return sx_error(
			ret,
			"%s: corrupt L2 entry 0x%016llx: %s (guest offset 0x%llx)",
			img->path, (unsigned long long)word, why,
			(unsigned long long)guest);
	if (e->type == QCOW2_C_COMPRESSED) {
		if (s->data_file)
			return sx_error(
				-EINVAL,
				"%s: compressed cluster in an image with an external data file (guest offset 0x%llx)",
				img->path, (unsigned long long)guest);
		if (check_host(img, s, false, e->coff))
			return sx_error(
				-EINVAL,
				"%s: compressed cluster at 0x%llx is beyond the end of the file (guest offset 0x%llx)",
				img->path, (unsigned long long)e->coff,
				(unsigned long long)guest);
	} else if (e->type == QCOW2_C_NORMAL || e->type == QCOW2_C_ZERO_ALLOC) {
		ret = check_host(img, s, true, e->host_off);
		if (ret == -EINVAL)
			return sx_error(
				-EINVAL,
				"%s: data cluster at 0x%llx is beyond the end of the %s (guest offset 0x%llx)",
				img->path, (unsigned long long)e->host_off,
				s->data_file ? "data file" : "file",
				(unsigned long long)guest);
		if (ret)
			return ret;
	}
	return 0;
}

int qcow2_get_l2e(struct img *img, struct qcow2 *s, uint64_t off,
		  struct qcow2_l2e *out)
{
	uint64_t cluster = off >> s->cluster_bits;
	uint64_t l1_idx = cluster >> s->l2_bits;
	uint64_t l2_off, idx, per;
	uint8_t *slice;
	int ret;

	if (l1_idx >= s->l1_size || !(s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK)) {
		memset(out, 0, sizeof(*out));
		return 0;
	}
	l2_off = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
	ret = get_slice(img, s, l2_off, cluster, off, &slice, &idx, &per);
	if (ret)
		return ret;
	return decode_at(img, s, slice, idx, off, out);
}

/* The run being built by block_status. */
struct run {
	bool have;
	enum img_status st;
	bool host_valid;
	bool shared; /* data shared with a snapshot (COPIED clear) */
	uint64_t host; /* host offset of the run's first byte */
	uint64_t len;
};

/* Try to append a unit; false when it has a different status. */
static bool run_add(struct run *r, enum img_status st, bool host_valid,
		    uint64_t host, uint64_t len, bool shared)
{
	if (!r->have) {
		r->have = true;
		r->st = st;
		r->host_valid = host_valid;
		r->shared = shared;
		r->host = host;
		r->len = len;
		return true;
	}
	if (r->st != st || r->host_valid != host_valid || r->shared != shared ||
	    st == IMG_COMPRESSED)
		return false;
	if (host_valid && r->host + r->len != host)
		return false;
	r->len += len;
	return true;
}

/*
 * qemu's judgement of metadata preallocation: the image refcounts at least
 * 10/9 of (and two more than) the clusters its file occupies on disk. Such
 * images have data clusters over host holes, and qemu then asks the host
 * file whether a data run reads as zeros. Decided once per open, with
 * s->lock held; counting stops as soon as the threshold is met.
 */
static bool looks_preallocated(struct img *img, struct qcow2 *s)
{
	uint64_t real, threshold, n = 0, c, end, E, covered;
	struct stat st;

	if (s->prealloc)
		return s->prealloc == 2;
	s->prealloc = 1;
	/* An export has no host blocks to count (and no descriptor). */
	if (sio_file_is_nbd(img->file) || fstat(img->file->fd, &st) < 0)
		return false;
	real = (uint64_t)st.st_blocks * 512 / s->cluster_size;
	threshold = sx_max(real * 10 / 9, real + 2);
	end = ((uint64_t)st.st_size + s->cluster_size - 1) >> s->cluster_bits;
	if (end < threshold)
		return false; /* not even every cluster of the file would do */
	/*
	 * Only clusters with a refcount block can count: a sparse file of
	 * 16 TiB with small clusters would otherwise be walked cluster by
	 * cluster (billions of reads) at the first data extent.
	 */
	E = s->rc.block_entries;
	if (sx_mul(s->rc.table_entries, E, &covered) == 0)
		end = sx_min(end, covered);
	for (c = 0; c < end && n < threshold; c++) {
		uint64_t rc;

		if (c % E == 0 && !s->rc.table[c / E]) {
			c += E - 1; /* no block: every refcount is 0 */
			continue;
		}
		if (qcow2_refcount_get(img, s, c, &rc) < 0)
			return false;
		n += rc > 0;
	}
	if (n >= threshold)
		s->prealloc = 2;
	return s->prealloc == 2;
}

static int block_status(struct img *img, uint64_t off, uint64_t len,
			struct img_extent *ext, struct img_meta_req *req);

int qcow2_block_status(struct img *img, uint64_t off, uint64_t len,
		       struct img_extent *ext)
{
	return block_status(img, off, len, ext, NULL);
}

int qcow2_block_status_nowait(struct img *img, uint64_t off, uint64_t len,
			      struct img_extent *ext, struct img_meta_req *req)
{
	return block_status(img, off, len, ext, req);
}

/*
 * Both block_status entries; with req, an L2 slice that is not cached ends
 * the walk: the prefix found so far is the answer, or -EAGAIN and *req
 * when there is none.
 */
static int block_status(struct img *img, uint64_t off, uint64_t len,
			struct img_extent *ext, struct img_meta_req *req)
{
	struct qcow2 *s = img->priv;
	uint64_t end, cur = off;
	uint64_t table_span = s->cluster_size << s->l2_bits;
	struct run r = {0};
	bool stop = false;
	int ret = 0;

	if (off >= img->size || !len)
		return sx_error(
			-EINVAL,
			"%s: block status at 0x%llx (length %llu) outside the image (size %llu)",
			img->path, (unsigned long long)off,
			(unsigned long long)len, (unsigned long long)img->size);
	end = off + sx_min(len, img->size - off);

	pthread_mutex_lock(&s->lock);
	while (cur < end && !stop) {
		uint64_t cluster = cur >> s->cluster_bits;
		uint64_t l1_idx = cluster >> s->l2_bits;
		uint64_t l2_off, idx, per;
		uint8_t *slice;

		if (l1_idx >= s->l1_size ||
		    !(s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK)) {
			/* No L2 table: the whole table's span is unallocated. */
			uint64_t span_end = (l1_idx + 1) * table_span;

			if (l1_idx >= s->l1_size)
				span_end = end;
			span_end = sx_min(span_end, end);
			if (!run_add(&r, IMG_UNALLOC, false, 0, span_end - cur,
				     false))
				break;
			cur = span_end;
			continue;
		}

		l2_off = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
		ret = get_slice_req(img, s, l2_off, cluster, cur, &slice, &idx,
				    &per, req);
		if (ret == -EAGAIN && req && r.have) {
			ret = 0; /* the prefix is the answer */
			break;
		}
		if (ret)
			goto fail;

		/* Walk this slice's entries; the slice stays cached meanwhile. */
		for (; idx < per && cur < end && !stop; idx++) {
			uint64_t cl_start = cur & ~(s->cluster_size - 1);
			uint64_t cl_end = cl_start + s->cluster_size;
			struct qcow2_l2e e;
			unsigned sc;

			ret = decode_at(img, s, slice, idx, cur, &e);
			if (ret)
				goto fail;
			sc = (unsigned)((cur - cl_start) / s->subcluster_size);
			while (cur < end && cur < cl_end) {
				uint64_t u_end = cl_start +
						 (sc + 1) * s->subcluster_size;
				uint64_t host, n;
				bool hv;
				enum img_status st;

				st = qcow2_l2e_unit_status(s, &e, sc, &host,
							   &hv);
				u_end = sx_min(u_end, end);
				n = u_end - cur;
				if (hv)
					host += cur - (cl_start +
						       sc * s->subcluster_size);
				if (!run_add(&r, st, hv, host, n,
					     st == IMG_DATA && !e.copied)) {
					stop = true;
					break;
				}
				cur = u_end;
				sc++;
				if (st == IMG_COMPRESSED && cur < cl_end) {
					/* One compressed cluster per extent. */
					r.len += sx_min(cl_end, end) - cur;
					cur = sx_min(cl_end, end);
				}
			}
			if (r.have && r.st == IMG_COMPRESSED)
				stop = true;
		}
	}

fail:
	/*
	 * A bad entry after a good prefix: report the prefix; the caller's
	 * next call starts at the bad entry and gets the error then.
	 */
	if (ret && !r.have)
		goto out;
	ret = 0;
	memset(ext, 0, sizeof(*ext));
	if (r.st == IMG_DATA && !s->data_file)
		ext->host_refine = looks_preallocated(img, s);
	ext->status = r.st;
	ext->len = r.len;
	ext->host_valid = r.host_valid;
	ext->shared = r.shared;
	if (r.host_valid) {
		ext->host_off = r.host;
		ext->file = s->data_file ? s->data_file : img->file;
	}
out:
	pthread_mutex_unlock(&s->lock);
	return ret;
}

/* ---- write path ---- */

/* Most L1 entries one meta_want call looks at, so a call stays short. */
#define META_SCAN_L1 4096u

unsigned qcow2_meta_want(struct img *img, uint64_t off,
			 struct img_meta_req *reqs, unsigned n, uint64_t *next)
{
	struct qcow2 *s = img->priv;
	uint64_t slice = s->l2cache.slice_size;
	uint64_t per_slice = slice / s->l2_entry_size;
	uint64_t slice_span = per_slice << s->cluster_bits;
	uint64_t cluster, l1_idx, l1_end, key, in_table;
	unsigned got = 0;

	*next = img->size;
	if (off >= img->size)
		return 0;
	cluster = off >> s->cluster_bits;
	l1_idx = cluster >> s->l2_bits;
	/* From the slice holding off. */
	in_table = (cluster & (s->l2_entries - 1)) / per_slice * per_slice;
	l1_end = sx_min(s->l1_size, l1_idx + META_SCAN_L1);

	pthread_mutex_lock(&s->lock);
	for (; l1_idx < l1_end && got < n; l1_idx++, in_table = 0) {
		uint64_t l2_off = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
		uint64_t guest = l1_idx << (s->l2_bits + s->cluster_bits);

		if (!l2_off || !sx_is_aligned(l2_off, s->cluster_size) ||
		    l2_off + s->cluster_size > s->file_size)
			continue; /* nothing to read, or for block_status */
		for (; in_table < s->l2_entries && got < n;
		     in_table += per_slice) {
			uint64_t g = guest + (in_table << s->cluster_bits);

			if (g >= img->size)
				break;
			key = l2_off + in_table * s->l2_entry_size;
			if (qcow2_l2cache_has(&s->l2cache, key))
				continue;
			reqs[got++] = (struct img_meta_req){
				.file = img->file,
				.host_off = key,
				.len = slice,
				.guest_off = g,
				.tag = s->l2cache.gen,
			};
			*next = g + slice_span;
		}
		if (got == n && in_table < s->l2_entries)
			break; /* the next call goes on inside this table */
	}
	if (got < n)
		*next = l1_idx < s->l1_size
				? l1_idx << (s->l2_bits + s->cluster_bits)
				: img->size;
	pthread_mutex_unlock(&s->lock);
	*next = sx_min(sx_max(*next, off), img->size);
	return got;
}

void qcow2_meta_fill(struct img *img, const struct img_meta_req *req,
		     const void *buf)
{
	struct qcow2 *s = img->priv;

	if (req->len != s->l2cache.slice_size)
		return;
	pthread_mutex_lock(&s->lock);
	/* An error making room is the next block_status's to meet. */
	(void)qcow2_l2cache_insert(&s->l2cache, req->host_off, buf, req->tag);
	pthread_mutex_unlock(&s->lock);
}

void qcow2_l1_mark_dirty(struct qcow2 *s, uint64_t i)
{
	struct qcow2_wstate *w = &s->w;

	if (w->l1_dirty_lo >= w->l1_dirty_hi) {
		w->l1_dirty_lo = i;
		w->l1_dirty_hi = i + 1;
		return;
	}
	w->l1_dirty_lo = sx_min(w->l1_dirty_lo, i);
	w->l1_dirty_hi = sx_max(w->l1_dirty_hi, i + 1);
}

/*
 * L1 entry l1_idx points at a table shared with a snapshot (refcount > 1):
 * give the active layer its own copy. The copy is written to a new
 * cluster before the L1 entry changes in memory (l2_unsynced: the next
 * flush syncs it before writing L1), and the old table loses one
 * reference through the deferred-free queue, so the decrease is durable
 * only after the new L1 entry is. Data clusters keep their refcounts: the
 * copy references them for the active layer as the old table did, and
 * their COPIED flags stay clear, so writes to them copy too.
 */
static int copy_shared_l2(struct img *img, struct qcow2 *s, uint64_t l1_idx,
			  uint64_t old, uint64_t *l2_off)
{
	uint64_t host, got;
	uint8_t *buf;
	int ret;

	buf = sio_buf_alloc(s->cluster_size);
	if (!buf)
		return -ENOMEM;
	/* Never written while shared: the file holds the latest bytes. */
	ret = sio_pread(img->file, buf, s->cluster_size, old);
	if (ret) {
		sx_error(ret,
			 "%s: cannot read the shared L2 table at 0x%llx: %s",
			 img->path, (unsigned long long)old, strerror(-ret));
		goto out;
	}
	ret = qcow2_alloc_clusters(img, s, 1, &host, &got);
	if (ret)
		goto out;
	qcow2_l2cache_drop(&s->l2cache, host, s->cluster_size);
	ret = sio_pwrite(img->file, buf, s->cluster_size, host);
	if (!ret)
		ret = qcow2_free_deferred(img, s, old, s->cluster_size);
	if (ret) {
		qcow2_rc_update(img, s, host >> s->cluster_bits, -1);
		sx_error(ret, "%s: cannot copy the shared L2 table: %s",
			 img->path, strerror(-ret));
		goto out;
	}
	s->w.l2_unsynced = true;
	s->l1[l1_idx] = host | QCOW2_OFLAG_COPIED;
	qcow2_l1_mark_dirty(s, l1_idx);
	*l2_off = host;
out:
	sio_buf_free(buf);
	return ret;
}

/*
 * The L2 table of L1 entry l1_idx, ready to be written: created if absent,
 * copied if shared with a snapshot.
 */
static int l2_table_for_write(struct img *img, struct qcow2 *s, uint64_t l1_idx,
			      uint64_t *l2_off)
{
	uint64_t e = s->l1[l1_idx], off = e & QCOW2_L1E_OFFSET_MASK;
	uint64_t host, got, rc;
	int ret;

	if (!off) {
		ret = qcow2_alloc_clusters(img, s, 1, &host, &got);
		if (ret)
			return ret;
		qcow2_l2cache_drop(&s->l2cache, host, s->cluster_size);
		ret = sio_pwrite(img->file, s->w.zero_cluster, s->cluster_size,
				 host);
		if (ret) {
			qcow2_rc_update(img, s, host >> s->cluster_bits, -1);
			return sx_error(ret,
					"%s: cannot write a new L2 table: %s",
					img->path, strerror(-ret));
		}
		/* Synced with the L2 writes, before the L1 entry. */
		s->w.l2_unsynced = true;
		s->l1[l1_idx] = host | QCOW2_OFLAG_COPIED;
		qcow2_l1_mark_dirty(s, l1_idx);
		*l2_off = host;
		return 0;
	}
	if (!sx_is_aligned(off, s->cluster_size))
		return sx_error(-EINVAL, "%s: L2 table offset 0x%llx unaligned",
				img->path, (unsigned long long)off);
	if (!(e & QCOW2_OFLAG_COPIED)) {
		ret = qcow2_refcount_get(img, s, off >> s->cluster_bits, &rc);
		if (ret)
			return ret;
		if (rc == 0)
			return sx_error(
				-EINVAL,
				"%s: L2 table at 0x%llx has refcount 0 (corrupt image; siphon check -r all)",
				img->path, (unsigned long long)off);
		if (rc > 1)
			return copy_shared_l2(img, s, l1_idx, off, l2_off);
		/* Ours alone (a snapshot was deleted): only the flag is stale. */
		s->l1[l1_idx] = e | QCOW2_OFLAG_COPIED;
		qcow2_l1_mark_dirty(s, l1_idx);
	}
	ret = qcow2_check_overlap(img, s, off, s->cluster_size, "an L2 table");
	if (ret)
		return ret;
	*l2_off = off;
	return 0;
}

int qcow2_l2_set(struct img *img, struct qcow2 *s, uint64_t guest_off,
		 uint64_t word, uint64_t bitmap)
{
	uint64_t cluster = guest_off >> s->cluster_bits;
	uint64_t l1_idx = cluster >> s->l2_bits;
	uint64_t per_slice = s->l2cache.slice_size / s->l2_entry_size;
	uint64_t in_table = cluster & (s->l2_entries - 1);
	uint64_t l2_off = 0, key;
	uint8_t *slice, *p;
	int ret;

	if (l1_idx >= s->l1_size)
		return sx_error(-EINVAL,
				"%s: guest offset 0x%llx beyond the L1 table",
				img->path, (unsigned long long)guest_off);
	ret = l2_table_for_write(img, s, l1_idx, &l2_off);
	if (ret)
		return ret;
	key = l2_off + (in_table / per_slice) * s->l2cache.slice_size;
	ret = qcow2_l2cache_get(&s->l2cache, key, true, &slice);
	if (ret)
		return sx_error(ret, "%s: cannot load L2 table at 0x%llx: %s",
				img->path, (unsigned long long)l2_off,
				strerror(-ret));
	p = slice + (in_table % per_slice) * s->l2_entry_size;
	word = htobe64(word);
	memcpy(p, &word, 8);
	if (s->extended_l2) {
		bitmap = htobe64(bitmap);
		memcpy(p + 8, &bitmap, 8);
	}
	return 0;
}

int qcow2_l1_flush(struct img *img, struct qcow2 *s)
{
	struct qcow2_wstate *w = &s->w;
	uint64_t lo = w->l1_dirty_lo, hi = w->l1_dirty_hi;
	int ret;

	if (lo >= hi)
		return 0;
	ret = qcow2_write_table_range(img, s->l1, lo, hi,
				      s->hdr.l1_table_offset);
	if (ret)
		return sx_error(ret, "%s: cannot write the L1 table: %s",
				img->path, strerror(-ret));
	w->l1_dirty_lo = w->l1_dirty_hi = 0;
	return 0;
}

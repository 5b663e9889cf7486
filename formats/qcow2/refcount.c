/*
 * qcow2 refcounts: geometry, the refcount table, reading and updating
 * refcounts, and host cluster allocation.
 *
 * refcount_bits = 1 << refcount_order (1..64). Entries of 8 bits or more are
 * big-endian; narrower ones are packed LSB-first within each byte. The
 * table is contiguous, loaded whole at open (bounded like qemu does at 8 MiB)
 * and kept host-endian; a table entry of 0 means the whole block is free.
 *
 * Write path. Refcount blocks live in a small LRU cache (bounded in bytes);
 * table entries are changed in memory and remembered as a dirty range.
 * Invariants:
 *  - a table entry of 0 means no cluster of its range is in use, so a new
 *    block for that range can describe itself: it goes in the first cluster
 *    of its own range;
 *  - every cluster handed out is refcounted in memory before it is returned;
 *  - a table entry reaches the disk only after the block it points at is
 *    durable (qcow2_rc_flush writes blocks, syncs, then the entries);
 *  - decreases are queued (qcow2_free_deferred) and applied only after the
 *    L2/L1 change that dropped the reference is durable, so a cluster is
 *    never reused while an on-disk table may still point at it;
 *  - the table grows by writing a new table (covering itself and the new
 *    blocks it needs) elsewhere, syncing, switching the two header fields in
 *    one write, syncing, and only then freeing the old table.
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

uint64_t qcow2_refcount_entry_get(const uint8_t *block, unsigned order,
				  uint64_t idx)
{
	unsigned bits = 1u << order;
	const uint8_t *p;
	uint64_t v = 0;
	unsigned i;

	if (bits < 8) {
		unsigned shift = (unsigned)(idx * bits % 8);

		return (block[idx * bits / 8] >> shift) & ((1u << bits) - 1);
	}
	p = block + idx * (bits / 8);
	for (i = 0; i < bits / 8; i++)
		v = (v << 8) | p[i];
	return v;
}

void qcow2_refcount_entry_set(uint8_t *block, unsigned order, uint64_t idx,
			      uint64_t value)
{
	unsigned bits = 1u << order;
	uint8_t *p;
	unsigned i;

	if (bits < 8) {
		unsigned shift = (unsigned)(idx * bits % 8);
		uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);

		p = &block[idx * bits / 8];
		*p = (uint8_t)((*p & ~mask) | ((value << shift) & mask));
		return;
	}
	p = block + idx * (bits / 8);
	for (i = bits / 8; i > 0; i--) {
		p[i - 1] = (uint8_t)value;
		value >>= 8;
	}
}

static int rc_get_cached(struct img *img, struct qcow2 *s, uint64_t cluster,
			 uint64_t *refcount);

void qcow2_refcount_free(struct qcow2 *s)
{
	free(s->rc.table);
	s->rc.table = NULL;
	free(s->rc.blocks);
	s->rc.blocks = NULL;
	s->rc.n_blocks = 0;
}

int qcow2_refcount_init(struct img *img, struct qcow2 *s)
{
	struct qcow2_refcount *rc = &s->rc;
	const struct qcow2_header *h = &s->hdr;
	uint64_t bytes, i;
	int ret;

	if (h->refcount_order > 6)
		return sx_error(-EINVAL,
				"%s: refcount_order %u out of range (0..6)",
				img->path, h->refcount_order);
	if (h->version < 3 && h->refcount_order != 4)
		return sx_error(-EINVAL,
				"%s: version 2 images have 16-bit refcounts",
				img->path);
	rc->order = h->refcount_order;
	rc->bits = 1u << rc->order;
	rc->block_entries = s->cluster_size * 8 / rc->bits;
	rc->table_offset = h->refcount_table_offset;

	if (!h->refcount_table_clusters)
		return sx_error(
			-EINVAL,
			"%s: image has no refcount table (refcount_table_clusters is 0)",
			img->path);
	if ((uint64_t)h->refcount_table_clusters >
	    QCOW2_MAX_REFTABLE_BYTES / s->cluster_size)
		return sx_error(-EINVAL,
				"%s: refcount table too large (%u clusters)",
				img->path, h->refcount_table_clusters);
	bytes = (uint64_t)h->refcount_table_clusters << s->cluster_bits;
	if (!sx_is_aligned(rc->table_offset, s->cluster_size))
		return sx_error(-EINVAL,
				"%s: refcount table offset 0x%llx is unaligned",
				img->path,
				(unsigned long long)rc->table_offset);
	if (!sx_range_within(rc->table_offset, bytes, s->file_size))
		return sx_error(
			-EINVAL,
			"%s: refcount table at 0x%llx (%llu bytes) is beyond the end of the file (%llu bytes)",
			img->path, (unsigned long long)rc->table_offset,
			(unsigned long long)bytes,
			(unsigned long long)s->file_size);

	rc->table_entries = bytes / 8;
	rc->blocks_stale = true;
	rc->table = malloc(bytes);
	if (!rc->table)
		return -ENOMEM;
	ret = sio_pread(img->file, rc->table, bytes, rc->table_offset);
	if (ret)
		return ret;
	for (i = 0; i < rc->table_entries; i++)
		rc->table[i] = be64toh(rc->table[i]);
	return 0;
}

int qcow2_refcount_get(struct img *img, struct qcow2 *s, uint64_t cluster,
		       uint64_t *refcount)
{
	struct qcow2_refcount *rc = &s->rc;

	/* Opened for writing: the cache is newer than the disk. */
	if (s->w.on)
		return rc_get_cached(img, s, cluster, refcount);

	uint64_t t_idx = cluster / rc->block_entries;
	uint64_t b_idx = cluster % rc->block_entries;
	uint64_t block, byte_off, pos;
	unsigned nbytes;
	uint8_t buf[8] = {0};
	int ret;

	if (t_idx >= rc->table_entries) {
		*refcount = 0;
		return 0;
	}
	block = rc->table[t_idx] & QCOW2_REFT_OFFSET_MASK;
	if (!block) {
		*refcount = 0;
		return 0;
	}
	if (!sx_is_aligned(block, s->cluster_size))
		return sx_error(
			-EINVAL,
			"%s: refcount block offset 0x%llx unaligned (refcount table index %llu)",
			img->path, (unsigned long long)block,
			(unsigned long long)t_idx);
	if (!sx_range_within(block, s->cluster_size, s->file_size))
		return sx_error(
			-EINVAL,
			"%s: refcount block at 0x%llx is beyond the end of the file",
			img->path, (unsigned long long)block);

	/* Read only the bytes holding the entry. */
	byte_off = b_idx * rc->bits / 8;
	nbytes = rc->bits >= 8 ? rc->bits / 8 : 1;
	if (sx_add(block, byte_off, &pos))
		return -EOVERFLOW;
	ret = sio_pread(img->file, buf, nbytes, pos);
	if (ret)
		return ret;
	/* buf holds the entry at index b_idx modulo the entries in a byte. */
	*refcount = qcow2_refcount_entry_get(
		buf, rc->order, rc->bits >= 8 ? 0 : b_idx % (8 / rc->bits));
	return 0;
}

/* ---- write path ---- */

static uint64_t rc_max(const struct qcow2 *s)
{
	return s->rc.bits == 64 ? UINT64_MAX : (1ull << s->rc.bits) - 1;
}

static void rt_mark_dirty(struct qcow2 *s, uint64_t lo, uint64_t hi)
{
	struct qcow2_wstate *w = &s->w;

	if (w->rt_dirty_lo >= w->rt_dirty_hi) {
		w->rt_dirty_lo = lo;
		w->rt_dirty_hi = hi;
		return;
	}
	w->rt_dirty_lo = sx_min(w->rt_dirty_lo, lo);
	w->rt_dirty_hi = sx_max(w->rt_dirty_hi, hi);
}

int qcow2_rc_init_write(struct img *img, struct qcow2 *s)
{
	struct qcow2_wstate *w = &s->w;
	uint64_t n = QCOW2_RCACHE_BYTES / s->cluster_size, i, off;

	/*
	 * Every refcount block the table names must be in the file: the
	 * write path loads blocks without the read path's check (a block
	 * past the end reads as zeros) and writes them back where the table
	 * says, so a corrupt entry would grow the file to that offset (up
	 * to 16 EiB, sparse) and put refcounts there.
	 */
	for (i = 0; i < s->rc.table_entries; i++) {
		off = s->rc.table[i] & QCOW2_REFT_OFFSET_MASK;
		if (!off)
			continue;
		if (!sx_is_aligned(off, s->cluster_size) ||
		    !sx_range_within(off, s->cluster_size, s->file_size))
			return sx_error(
				-EINVAL,
				"%s: refcount block at 0x%llx (refcount table index %llu) is unaligned or beyond the end of the file (%llu bytes)",
				img->path, (unsigned long long)off,
				(unsigned long long)i,
				(unsigned long long)s->file_size);
	}
	n = sx_max(sx_min(n, QCOW2_RCACHE_MAX_SLOTS), QCOW2_RCACHE_MIN_SLOTS);
	w->rc_slots = calloc(n, sizeof(*w->rc_slots));
	if (!w->rc_slots)
		return -ENOMEM;
	w->rc_nslots = (unsigned)n;
	w->free_hint = 1;
	return 0;
}

void qcow2_rc_fini_write(struct qcow2 *s)
{
	struct qcow2_wstate *w = &s->w;
	unsigned i;

	for (i = 0; w->rc_slots && i < w->rc_nslots; i++)
		sio_buf_free(w->rc_slots[i].data);
	free(w->rc_slots);
	w->rc_slots = NULL;
	w->rc_nslots = 0;
	free(w->frees);
	w->frees = NULL;
	w->n_frees = w->cap_frees = 0;
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
	return a < b + blen && b < a + alen;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Rebuild rc->blocks from the table: 0 or -ENOMEM. */
static int sort_blocks(struct qcow2_refcount *rc)
{
	uint64_t i, n = 0, *b;

	b = realloc(rc->blocks, sx_max(rc->table_entries, 1) * sizeof(*b));
	if (!b)
		return -ENOMEM;
	rc->blocks = b;
	for (i = 0; i < rc->table_entries; i++)
		if (rc->table[i] & QCOW2_REFT_OFFSET_MASK)
			b[n++] = rc->table[i] & QCOW2_REFT_OFFSET_MASK;
	qsort(b, n, sizeof(*b), cmp_u64);
	rc->n_blocks = n;
	rc->blocks_stale = false;
	return 0;
}

/* Whether a refcount block (cs bytes at each offset) overlaps the range. */
static bool hits_block(const struct qcow2_refcount *rc, uint64_t cs,
		       uint64_t off, uint64_t len)
{
	uint64_t lo = 0, hi = rc->n_blocks;

	/* The first block that ends after off ... */
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;

		if (rc->blocks[mid] + cs <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	/* ... overlaps when it starts before the range ends. */
	return lo < rc->n_blocks && rc->blocks[lo] < off + len;
}

const char *qcow2_overlap_core(struct qcow2 *s, uint64_t off, uint64_t len)
{
	struct qcow2_refcount *rc = &s->rc;
	uint64_t l1_bytes = 0, i;
	const char *hit = NULL;

	/* An L1 table too large to round up ends the file anyway. */
	if (sx_align_up(s->l1_size * 8, s->cluster_size, &l1_bytes))
		l1_bytes = UINT64_MAX - s->hdr.l1_table_offset;
	if (overlaps(off, len, 0, s->cluster_size))
		return "header";
	if (s->l1_size && overlaps(off, len, s->hdr.l1_table_offset, l1_bytes))
		return "L1 table";
	if (overlaps(off, len, rc->table_offset, rc->table_entries * 8))
		return "refcount table";
	if (qcow2_snapshots_overlap(s, off, len, &hit))
		return hit;
	if (!rc->blocks_stale || sort_blocks(rc) == 0)
		return hits_block(rc, s->cluster_size, off, len)
			       ? "refcount block"
			       : NULL;
	/* No memory for the sorted copy: walk the table. */
	for (i = 0; i < rc->table_entries; i++) {
		uint64_t b = rc->table[i] & QCOW2_REFT_OFFSET_MASK;

		if (b && overlaps(off, len, b, s->cluster_size))
			return "refcount block";
	}
	return NULL;
}

int qcow2_check_overlap(struct img *img, struct qcow2 *s, uint64_t off,
			uint64_t len, const char *what)
{
	const char *hit = qcow2_overlap_core(s, off, len);

	if (!hit)
		hit = qcow2_bitmaps_overlap(s, off, len);
	if (!hit)
		return 0;
	return sx_error(
		-EIO,
		"%s: refusing to write %s at 0x%llx (%llu bytes): it overlaps the %s (corrupt image?)",
		img->path, what, (unsigned long long)off,
		(unsigned long long)len, hit);
}

static int rc_write_slot(struct img *img, struct qcow2 *s,
			 struct qcow2_rcslot *slot)
{
	uint64_t off = s->rc.table[slot->t_idx] & QCOW2_REFT_OFFSET_MASK;
	int ret;

	ret = sio_pwrite(img->file, slot->data, s->cluster_size, off);
	if (ret)
		return sx_error(
			ret, "%s: cannot write refcount block at 0x%llx: %s",
			img->path, (unsigned long long)off, strerror(-ret));
	slot->dirty = false;
	s->w.rc_unsynced = true;
	s->w.rc_wgen++;
	return 0;
}

/*
 * The cached block of table index t (whose table entry is non-zero, or
 * which is being created: fresh = zero-filled, dirty). The pointer stays
 * valid until the next rc_slot call.
 */
static int rc_slot(struct img *img, struct qcow2 *s, uint64_t t, bool fresh,
		   struct qcow2_rcslot **out)
{
	struct qcow2_wstate *w = &s->w;
	struct qcow2_rcslot *slot = NULL, *victim = NULL;
	uint64_t off;
	unsigned i;
	int ret;

	for (i = 0; i < w->rc_nslots; i++) {
		struct qcow2_rcslot *c = &w->rc_slots[i];

		if (c->used && c->t_idx == t) {
			slot = c;
			break;
		}
		if (c->used && c->pinned)
			continue; /* a flush is writing a copy of it */
		if (!c->used) {
			if (!victim || victim->used)
				victim = c;
		} else if (!victim ||
			   (victim->used && c->stamp < victim->stamp)) {
			victim = c;
		}
	}
	if (slot) {
		slot->stamp = ++w->rc_tick;
		if (fresh) {
			memset(slot->data, 0, s->cluster_size);
			slot->dirty = true;
		}
		*out = slot;
		return 0;
	}
	if (!victim)
		return sx_error(-EAGAIN,
				"%s: every refcount block cached is being "
				"flushed; retry after the flush",
				img->path);
	if (victim->used && victim->dirty) {
		/*
		 * Safe while a flush is in flight too: the victim is not
		 * pinned, so no write of this block is in flight, and a
		 * refcount block may reach the disk at any time.
		 */
		ret = rc_write_slot(img, s, victim);
		if (ret)
			return ret;
	}
	victim->used = false;
	if (!victim->data) {
		victim->data = sio_buf_alloc(s->cluster_size);
		if (!victim->data)
			return -ENOMEM;
	}
	off = s->rc.table[t] & QCOW2_REFT_OFFSET_MASK;
	if (fresh) {
		memset(victim->data, 0, s->cluster_size);
	} else {
		if (!off || !sx_is_aligned(off, s->cluster_size))
			return sx_error(
				-EINVAL,
				"%s: refcount block offset 0x%llx invalid (refcount table index %llu)",
				img->path, (unsigned long long)off,
				(unsigned long long)t);
		ret = sio_pread(img->file, victim->data, s->cluster_size, off);
		if (ret)
			return ret;
	}
	victim->t_idx = t;
	victim->used = true;
	victim->pinned = false;
	victim->dirty = fresh;
	victim->stamp = ++w->rc_tick;
	*out = victim;
	return 0;
}

static int rc_get_cached(struct img *img, struct qcow2 *s, uint64_t cluster,
			 uint64_t *refcount)
{
	uint64_t t = cluster / s->rc.block_entries;
	struct qcow2_rcslot *slot;
	int ret;

	if (t >= s->rc.table_entries || !s->rc.table[t]) {
		*refcount = 0;
		return 0;
	}
	ret = rc_slot(img, s, t, false, &slot);
	if (ret)
		return ret;
	*refcount = qcow2_refcount_entry_get(slot->data, s->rc.order,
					     cluster % s->rc.block_entries);
	return 0;
}

/*
 * Grow the refcount table so that it has entry t (t >= table_entries).
 * Every cluster from t's range up is free (nothing beyond the table is in
 * use), so the new table and the blocks that describe it go at the start
 * of t's range.
 */
static int rc_grow_table(struct img *img, struct qcow2 *s, uint64_t t)
{
	struct qcow2_refcount *rc = &s->rc;
	uint64_t cs = s->cluster_size, E = rc->block_entries;
	uint64_t per_cl = cs / 8, old_n = rc->table_entries;
	uint64_t old_off = rc->table_offset;
	uint64_t old_cl = old_n / per_cl;
	uint64_t new_n, nt, nb = 0, p = t * E, first = t, last, i, x;
	uint64_t *table = NULL;
	uint8_t *buf = NULL, hdr[12];
	unsigned k;
	int ret;

	if (qcow2_flush_busy_locked(s))
		return sx_error(-EAGAIN,
				"%s: cannot grow the refcount table while a "
				"flush is in flight; retry after it",
				img->path);
	new_n = sx_max(t + 1, old_n + old_n / 2);
	for (;;) {
		uint64_t nb2;

		nt = (new_n + per_cl - 1) / per_cl;
		for (;;) {
			last = (p + nt + nb - 1) / E;
			nb2 = last - first + 1;
			if (nb2 == nb)
				break;
			nb = nb2;
		}
		if (last < new_n)
			break;
		new_n = last + 1;
	}
	new_n = nt * per_cl;
	if (nt * cs > QCOW2_MAX_REFTABLE_BYTES || nt > UINT32_MAX)
		return sx_error(
			-EFBIG,
			"%s: the refcount table would exceed %u MiB; the image is too large for its cluster size and refcount width",
			img->path, QCOW2_MAX_REFTABLE_BYTES >> 20);

	table = calloc(new_n, 8);
	buf = sio_buf_alloc((nt + nb) * cs);
	if (!table || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	memset(buf, 0, (nt + nb) * cs);
	memcpy(table, rc->table, old_n * 8);
	for (i = 0; i < nb; i++)
		table[first + i] = (p + nt + i) * cs;
	for (i = 0; i < new_n; i++) {
		uint64_t be = htobe64(table[i]);

		memcpy(buf + i * 8, &be, 8);
	}
	/* The new table and blocks are in use: refcount 1 in the new blocks. */
	for (x = p; x < p + nt + nb; x++)
		qcow2_refcount_entry_set(buf + (nt + x / E - first) * cs,
					 rc->order, x % E, 1);

	/* Every block the new table points at is durable before it is live. */
	for (k = 0; k < s->w.rc_nslots; k++) {
		struct qcow2_rcslot *c = &s->w.rc_slots[k];

		if (c->used && c->dirty) {
			ret = rc_write_slot(img, s, c);
			if (ret)
				goto out;
		}
	}
	ret = sio_pwrite(img->file, buf, (nt + nb) * cs, p * cs);
	if (ret)
		goto out;
	ret = sio_fdatasync(img->file);
	if (ret)
		goto out;
	s->w.rc_unsynced = false;

	/* One write switches refcount_table_offset and _clusters. */
	{
		uint64_t off_be = htobe64(p * cs);
		uint32_t ncl_be = htobe32((uint32_t)nt);

		memcpy(hdr, &off_be, 8);
		memcpy(hdr + 8, &ncl_be, 4);
	}
	ret = sio_pwrite(img->file, hdr, sizeof(hdr), 48);
	if (ret)
		goto out;
	ret = sio_fdatasync(img->file);
	if (ret)
		goto out;

	memcpy(s->hdr_raw + 48, hdr, sizeof(hdr));
	s->hdr.refcount_table_offset = p * cs;
	s->hdr.refcount_table_clusters = (uint32_t)nt;
	free(rc->table);
	rc->table = table;
	rc->blocks_stale = true;
	table = NULL;
	rc->table_offset = p * cs;
	rc->table_entries = new_n;
	s->w.rt_dirty_lo = s->w.rt_dirty_hi = 0;

	/* The header no longer points at the old table: free it now. */
	for (i = 0; i < old_cl; i++) {
		ret = qcow2_rc_update(img, s, old_off / cs + i, -1);
		if (ret)
			goto out;
	}
out:
	free(table);
	sio_buf_free(buf);
	if (ret)
		ret = sx_error(ret, "%s: cannot grow the refcount table: %s",
			       img->path, strerror(-ret));
	return ret;
}

/*
 * Make sure the range of table index t has a block: grow the table, or
 * create a block that describes itself in the first cluster of its range.
 */
static int rc_ensure_block(struct img *img, struct qcow2 *s, uint64_t t)
{
	struct qcow2_rcslot *slot;
	uint64_t off;
	int ret;

	if (t >= s->rc.table_entries) {
		ret = rc_grow_table(img, s, t);
		if (ret)
			return ret;
	}
	if (s->rc.table[t])
		return 0;
	if (sx_mul(t * s->rc.block_entries, s->cluster_size, &off) ||
	    off > QCOW2_L2E_OFFSET_MASK)
		return sx_error(-EFBIG, "%s: image file too large", img->path);
	ret = qcow2_check_overlap(img, s, off, s->cluster_size,
				  "a new refcount block");
	if (ret)
		return ret;
	s->rc.table[t] = off;
	s->rc.blocks_stale = true;
	rt_mark_dirty(s, t, t + 1);
	ret = rc_slot(img, s, t, true, &slot);
	if (ret) {
		s->rc.table[t] = 0;
		s->rc.blocks_stale = true;
		return ret;
	}
	qcow2_refcount_entry_set(slot->data, s->rc.order, 0, 1);
	return 0;
}

int qcow2_rc_update(struct img *img, struct qcow2 *s, uint64_t cluster,
		    int delta)
{
	uint64_t t = cluster / s->rc.block_entries;
	uint64_t idx = cluster % s->rc.block_entries, v;
	struct qcow2_rcslot *slot;
	int ret;

	if (delta > 0) {
		ret = rc_ensure_block(img, s, t);
		if (ret)
			return ret;
	} else if (t >= s->rc.table_entries || !s->rc.table[t]) {
		return sx_error(
			-EIO,
			"%s: freeing host cluster 0x%llx that has no refcount block (corrupt image?)",
			img->path,
			(unsigned long long)(cluster * s->cluster_size));
	}
	ret = rc_slot(img, s, t, false, &slot);
	if (ret)
		return ret;
	v = qcow2_refcount_entry_get(slot->data, s->rc.order, idx);
	if (delta > 0 && v >= rc_max(s))
		return sx_error(
			-EINVAL,
			"%s: refcount of host cluster 0x%llx would overflow %u-bit refcounts",
			img->path,
			(unsigned long long)(cluster * s->cluster_size),
			s->rc.bits);
	if (delta < 0 && v == 0)
		return sx_error(
			-EIO,
			"%s: refcount of host cluster 0x%llx would drop below zero (corrupt image?)",
			img->path,
			(unsigned long long)(cluster * s->cluster_size));
	v = delta > 0 ? v + 1 : v - 1;
	qcow2_refcount_entry_set(slot->data, s->rc.order, idx, v);
	slot->dirty = true;
	if (v == 0 && cluster < s->w.free_hint)
		s->w.free_hint = cluster;
	return 0;
}

bool qcow2_rc_cached(const struct qcow2 *s, uint64_t t)
{
	unsigned i;

	for (i = 0; i < s->w.rc_nslots; i++)
		if (s->w.rc_slots[i].used && s->w.rc_slots[i].t_idx == t)
			return true;
	return false;
}

bool qcow2_rc_advance_hint(struct qcow2 *s, uint64_t *t)
{
	struct qcow2_wstate *w = &s->w;
	uint64_t E = s->rc.block_entries, c = sx_max(w->free_hint, 1), i;
	const struct qcow2_rcslot *slot;
	unsigned k;

	for (;;) {
		*t = c / E;
		/* No block: all free there (the allocation makes it). */
		if (*t >= s->rc.table_entries || !s->rc.table[*t])
			break;
		for (k = 0, slot = NULL; k < w->rc_nslots && !slot; k++)
			if (w->rc_slots[k].used && w->rc_slots[k].t_idx == *t)
				slot = &w->rc_slots[k];
		if (!slot)
			return false;
		for (i = c % E; i < E; i++)
			if (!qcow2_refcount_entry_get(slot->data, s->rc.order,
						      i))
				break;
		if (i < E) {
			c = *t * E + i;
			break;
		}
		c = (*t + 1) * E;
	}
	w->free_hint = c;
	return true;
}

bool qcow2_rc_frees_missing(const struct qcow2 *s, size_t n, uint64_t *t)
{
	const struct qcow2_wstate *w = &s->w;
	uint64_t E = s->rc.block_entries, a, b, off;
	size_t k;

	for (k = 0; k < sx_min(n, w->n_frees); k++) {
		if (!w->frees[k].count)
			continue;
		a = w->frees[k].cluster / E;
		b = (w->frees[k].cluster + w->frees[k].count - 1) / E;
		for (; a <= b && a < s->rc.table_entries; a++) {
			off = s->rc.table[a] & QCOW2_REFT_OFFSET_MASK;
			/* No block or a bad one: the free reports it. */
			if (!off || !sx_is_aligned(off, s->cluster_size) ||
			    qcow2_rc_cached(s, a))
				continue;
			*t = a;
			return true;
		}
	}
	return false;
}

int qcow2_rc_install(struct img *img, struct qcow2 *s, uint64_t t,
		     const void *buf)
{
	struct qcow2_rcslot *slot;
	int ret;

	if (qcow2_rc_cached(s, t))
		return 0; /* what is cached may be newer than buf */
	ret = rc_slot(img, s, t, true, &slot);
	if (ret)
		return ret;
	memcpy(slot->data, buf, s->cluster_size);
	slot->dirty = false;
	return 0;
}

uint64_t qcow2_grow_target(const struct qcow2 *s, uint64_t end, uint64_t *from)
{
	uint64_t step;

	if (end <= s->w.grown_to || end <= s->w.open_size)
		return 0;
	step = sx_min(sx_max(end / 8, 8u << 20), 128u << 20);
	*from = sx_max(s->w.grown_to, s->w.open_size);
	return sx_align_down(end + step, s->cluster_size);
}

/* Extend the file well past end (see qcow2_wstate.grown_to). */
static void grow_ahead(struct img *img, struct qcow2 *s, uint64_t end)
{
	uint64_t target, from = 0;

	if (s->w.no_grow)
		return;
	target = qcow2_grow_target(s, end, &from);
	if (!target)
		return;
	/*
	 * Allocated blocks, not just a larger size: a direct write into a
	 * hole needs block allocation, which io_uring hands to a worker, and
	 * its workers run writes to one file one at a time. Best effort:
	 * without it (no fallocate, or no room for the slack) writes are only
	 * slower.
	 */
	if (sio_fallocate(img->file, 0, from, target - from) == 0 ||
	    sio_file_truncate(img->file, target) == 0)
		s->w.grown_to = target;
}

/*
 * Cut the tail grow_ahead() left: back to the end of the last
 * cluster in use, never below the size the file had when opened. Runs
 * after the final flush, so the refcounts it reads are the file's.
 */
void qcow2_trim_tail(struct img *img, struct qcow2 *s)
{
	uint64_t E = s->rc.block_entries, c, t;
	struct qcow2_rcslot *slot;

	if (!s->w.grown_to)
		return;
	/* Down from the end, a refcount block at a time. */
	for (c = s->w.grown_to / s->cluster_size; c > 0;) {
		t = (c - 1) / E;
		if (t >= s->rc.table_entries || !s->rc.table[t]) {
			c = t * E; /* no block: all free */
			continue;
		}
		if (rc_slot(img, s, t, false, &slot) < 0)
			return;
		for (; c > t * E; c--)
			if (qcow2_refcount_entry_get(slot->data, s->rc.order,
						     (c - 1) % E))
				goto found;
	}
found:
	if (sio_file_truncate(img->file,
			      sx_max(c * s->cluster_size, s->w.open_size)) == 0)
		s->w.grown_to = 0;
}

int qcow2_alloc_clusters(struct img *img, struct qcow2 *s, uint64_t n,
			 uint64_t *host, uint64_t *got)
{
	uint64_t E = s->rc.block_entries, c = sx_max(s->w.free_hint, 1);
	uint64_t start, run = 0, t, i;
	struct qcow2_rcslot *slot;
	int ret;

	if (!n)
		return -EINVAL;
	/* First fit: the first free cluster from the hint. */
	for (;;) {
		t = c / E;
		ret = rc_ensure_block(img, s, t);
		if (ret)
			return ret;
		ret = rc_slot(img, s, t, false, &slot);
		if (ret)
			return ret;
		for (i = c % E; i < E; i++) {
			if (!qcow2_refcount_entry_get(slot->data, s->rc.order,
						      i))
				break;
		}
		if (i < E)
			break;
		c = (t + 1) * E;
	}
	start = t * E + i;
	/* Extend while free; stop at a range without a block (it needs one). */
	for (c = start; run < n; c++, run++) {
		if (c / E != t) {
			t = c / E;
			if (t >= s->rc.table_entries || !s->rc.table[t])
				break;
			ret = rc_slot(img, s, t, false, &slot);
			if (ret)
				return ret;
		}
		if (qcow2_refcount_entry_get(slot->data, s->rc.order, c % E))
			break;
	}
	if (start * s->cluster_size > QCOW2_L2E_OFFSET_MASK)
		return sx_error(-EFBIG, "%s: image file too large", img->path);
	ret = qcow2_check_overlap(img, s, start * s->cluster_size,
				  run * s->cluster_size, "a new cluster");
	if (ret)
		return ret;
	for (i = 0; i < run; i++) {
		ret = qcow2_rc_update(img, s, start + i, 1);
		if (ret) {
			/* Undo what was taken; the rest was never touched. */
			while (i--)
				qcow2_rc_update(img, s, start + i, -1);
			return ret;
		}
	}
	s->w.free_hint = start + run;
	grow_ahead(img, s, (start + run) * s->cluster_size);
	*host = start * s->cluster_size;
	*got = run;
	return 0;
}

int qcow2_free_deferred(struct img *img, struct qcow2 *s, uint64_t off,
			uint64_t len)
{
	struct qcow2_wstate *w = &s->w;
	uint64_t first = off >> s->cluster_bits;
	uint64_t count = ((off + len - 1) >> s->cluster_bits) - first + 1;

	(void)img;
	if (!len)
		return 0;
	if (w->n_frees > w->frees_frozen &&
	    w->frees[w->n_frees - 1].cluster + w->frees[w->n_frees - 1].count ==
		    first) {
		w->frees[w->n_frees - 1].count += count;
		return 0;
	}
	if (w->n_frees == w->cap_frees) {
		size_t cap = w->cap_frees ? w->cap_frees * 2 : 16;
		struct qcow2_free *f = realloc(w->frees, cap * sizeof(*f));

		if (!f)
			return -ENOMEM;
		w->frees = f;
		w->cap_frees = cap;
	}
	w->frees[w->n_frees].cluster = first;
	w->frees[w->n_frees].count = count;
	w->n_frees++;
	return 0;
}

int qcow2_rc_apply_frees(struct img *img, struct qcow2 *s)
{
	struct qcow2_wstate *w = &s->w;
	int ret = 0;

	while (w->n_frees) {
		struct qcow2_free *f = &w->frees[w->n_frees - 1];

		while (f->count) {
			ret = qcow2_rc_update(img, s, f->cluster + f->count - 1,
					      -1);
			if (ret)
				return ret;
			f->count--;
		}
		w->n_frees--;
	}
	return ret;
}

int qcow2_rc_apply_frees_upto(struct img *img, struct qcow2 *s, size_t n)
{
	struct qcow2_wstate *w = &s->w;
	size_t k = sx_min(n, w->n_frees), rest = w->n_frees - k;
	int ret = 0;

	/* From the last of the n down, so a failure leaves [0, k) queued. */
	while (k) {
		struct qcow2_free *f = &w->frees[k - 1];

		while (f->count) {
			ret = qcow2_rc_update(img, s, f->cluster + f->count - 1,
					      -1);
			if (ret)
				goto out;
			f->count--;
		}
		k--;
	}
out:
	/* No frees queued at all: w->frees may be NULL. */
	if (rest)
		memmove(w->frees + k, w->frees + w->n_frees - rest,
			rest * sizeof(*w->frees));
	w->n_frees = k + rest;
	return ret;
}

int qcow2_rc_snapshot(struct qcow2 *s, struct qcow2_snap *snap)
{
	struct qcow2_wstate *w = &s->w;
	unsigned i, n = 0;

	for (i = 0; i < w->rc_nslots; i++)
		n += w->rc_slots[i].used && w->rc_slots[i].dirty;
	if (qcow2_snap_alloc(snap, n) < 0)
		return -ENOMEM;
	for (i = 0; i < w->rc_nslots && n; i++) {
		struct qcow2_rcslot *c = &w->rc_slots[i];

		if (!c->used || !c->dirty)
			continue;
		if (qcow2_snap_add(snap,
				   s->rc.table[c->t_idx] &
					   QCOW2_REFT_OFFSET_MASK,
				   i, c->data, s->cluster_size) < 0) {
			qcow2_snap_free(snap);
			return -ENOMEM;
		}
	}
	for (i = 0; i < snap->n; i++) {
		w->rc_slots[snap->slots[i]].dirty = false;
		w->rc_slots[snap->slots[i]].pinned = true;
	}
	return 0;
}

void qcow2_rc_unpin(struct qcow2 *s, struct qcow2_snap *snap, bool failed)
{
	unsigned k;

	for (k = 0; k < snap->n; k++) {
		struct qcow2_rcslot *c = &s->w.rc_slots[snap->slots[k]];

		if (c->used && c->pinned) {
			c->pinned = false;
			if (failed)
				c->dirty = true;
		}
	}
	qcow2_snap_free(snap);
}

int qcow2_rc_flush(struct img *img, struct qcow2 *s)
{
	struct qcow2_wstate *w = &s->w;
	uint64_t lo = w->rt_dirty_lo, hi = w->rt_dirty_hi;
	unsigned k;
	int ret;

	for (k = 0; k < w->rc_nslots; k++) {
		struct qcow2_rcslot *c = &w->rc_slots[k];

		if (c->used && c->dirty) {
			ret = rc_write_slot(img, s, c);
			if (ret)
				return ret;
		}
	}
	if (w->rc_unsynced) {
		ret = sio_fdatasync(img->file);
		if (ret)
			return ret;
		w->rc_unsynced = false;
	}
	if (lo >= hi)
		return 0;
	/* The blocks these entries point at are durable now. */
	ret = qcow2_write_table_range(img, s->rc.table, lo, hi,
				      s->rc.table_offset);
	if (ret)
		return sx_error(ret, "%s: cannot write the refcount table: %s",
				img->path, strerror(-ret));
	w->rt_dirty_lo = w->rt_dirty_hi = 0;
	return 0;
}

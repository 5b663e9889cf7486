/*
 * qcow2 consistency check and repair (drv->check, and the repair a
 * read-write open runs on a dirty image).
 *
 * Every reference the metadata holds is counted: cluster 0, the active L1
 * table and each snapshot's, every L2 table they point at and every data
 * or compressed cluster those point at (once per L1 table, as snapshots
 * share by refcount), the refcount table and blocks, the snapshot table,
 * and, while the autoclear bit says they are consistent, the bitmap
 * directory, tables and data. The counts are compared with the refcounts on
 * disk: higher on disk is a leak, lower (or a cluster both metadata and
 * something else) a corruption, as qemu-img check classifies them; so are
 * pointers that are unaligned, past the end of the file or carry reserved
 * bits, entries that cannot be valid, and COPIED flags (active L1 and its
 * L2 tables) that disagree with the refcount.
 *
 * Memory is bounded: references are counted for one window of the host
 * file at a time (16-bit saturating counters, o->window clusters, default
 * 4 Mi: 16 MiB of counters with the on-disk copies), walking the tables
 * once per window. A file of up to 4 Mi clusters (256 GiB at 64 KiB
 * clusters) takes one pass; per-entry findings are reported by the first.
 *
 * Repairs (wfile set) are the safe ones: leaked refcounts are lowered
 * (REPAIR_LEAKS), refcounts too low are raised and COPIED flags are set
 * right (REPAIR_ALL); both only ever move an on-disk value to what the
 * metadata says, so any order is crash safe. Where the refcount table has
 * no block for clusters in use, REPAIR_ALL writes one into a free cluster
 * of the range it covers (describing itself, so no other block changes),
 * makes it durable, then links it (new_block()). What cannot be repaired
 * that way (no free cluster in the range, a range past the end of the
 * refcount table, a table entry that points somewhere bad) is left alone
 * and reported.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/bytes.h"
#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "qcow2.h"

#define CK_WINDOW_DEFAULT (1ull << 22)
#define CK_SAT UINT16_MAX
/* Bits of an L1 entry besides the offset and COPIED: reserved. */
#define CK_L1_RESERVED (~(QCOW2_L1E_OFFSET_MASK | QCOW2_OFLAG_COPIED))
/* Reserved bits of a standard (uncompressed) L2 entry: 1-8 and 56-61. */
#define CK_L2_RESERVED 0x3f000000000001feull
#define CK_REFT_RESERVED 0x1ffull
#define CK_BMT_OFFSET_MASK 0x00fffffffffffe00ull
#define CK_MAX_BITMAP_DIR (64ull << 20)
/* L2 tables that follow each other in the file are read this much at once. */
#define CK_L2_BATCH (2ull << 20)
/*
 * L2 reads ahead of the walk: batches and bytes in flight at most, and
 * the free slots that start a refill (submitted in one call). Scattered
 * tables are read one cluster at a time, so the depth is what keeps the
 * device busy: a 1 TiB preallocated image (2048 tables of 64 KiB, 512 MiB
 * apart) was walked in 116 ms with 32 slots, 72 ms with 128, where fio
 * reading the same clusters 32 deep took 85 ms for them and the blocks.
 */
#define CK_RA_SLOTS 128u
#define CK_RA_BYTES (8ull << 20)
#define CK_RA_REFILL 32u
/* Refcount blocks read together (load_refcounts()): bytes of buffers. */
#define CK_RB_BYTES (4ull << 20)
/*
 * Clusters whose counts agree with their refcounts are passed over this
 * many at a time (an agreeing count is never a finding: a count too high
 * for the refcount width differs from any refcount on disk).
 */
#define CK_SKIP 512u

struct ck_table {
	uint64_t off;
	uint64_t entries;
};

/* What a walk of the tables does (bits). */
enum ck_walk {
	CK_COUNT = 1, /* count references (and per-entry findings) */
	CK_COPIED = 2, /* compare COPIED flags with the window's refcounts */
};

/* Entries j..j+n-1 of an L2 table: clusters host..host+n-1, one flag. */
struct ck_run {
	uint64_t host; /* cluster index */
	uint32_t j;
	uint32_t n : 31;
	uint32_t copied : 1;
};

#define CK_RUNS_MAX (256u << 10) /* 4 MiB of runs */
#define CK_NO_RUNS UINT32_MAX

struct ck {
	struct img *img;
	struct qcow2 *s;
	struct sio_file *wf; /* repairs go here; NULL: report only */
	unsigned repair;
	struct img_check_report *r;
	uint64_t cs;
	unsigned cbits; /* log2(cs) */
	unsigned wbits; /* log2 of the window with several windows */
	uint64_t file_size;
	uint64_t nclusters; /* clusters of the file */
	/*
	 * Clusters counted and compared: the file's and the one after it,
	 * which a reference may reach by less than a cluster (a compressed
	 * cluster's tail); qemu counts it then, and so do we (only when
	 * something references it).
	 */
	uint64_t ncount;
	uint64_t w0, wn; /* the window: clusters [w0, w0 + wn) */
	uint16_t *refs; /* references counted in the window */
	uint16_t *drc; /* refcounts on disk (after repair) */
	uint8_t *meta; /* bit set: referenced as metadata */
	bool first; /* first window: per-entry findings and statistics */
	uint8_t *buf; /* one cluster: a refcount block */
	uint8_t *l2b; /* L2 tables read together: l2b_len bytes from l2b_off */
	uint64_t l2b_off, l2b_len, l2b_cap;
	uint64_t *tbl; /* a snapshot's L1 table or a bitmap table */
	size_t tbl_cap; /* bytes */
	struct ck_table *snaps;
	size_t nsnaps;
	uint64_t snap_bytes;
	struct ck_table *bmts;
	size_t nbmts;
	uint64_t bm_dir_off, bm_dir_bytes;
	uint64_t next_host; /* fragmentation statistic */
	/*
	 * Per active L1 entry, the windows its L2 table references (bit w,
	 * bit 63 for 63 and up), found by the first window's walk: later
	 * windows read only the L2 tables that reference them. NULL with
	 * a single window.
	 */
	uint64_t *wmask;
	/*
	 * Later windows of a report-only check count an active L2 table
	 * from runs recorded by the first window's walk, instead of reading
	 * and walking it again: a table is recorded when every entry it has
	 * is the common kind (a standard data cluster inside the file, no
	 * flag but COPIED), as runs of consecutive clusters with one COPIED
	 * flag, CK_RUNS_MAX runs in all. The first walk reads every table;
	 * without the runs each later window read again every table that
	 * reaches it (a 1 TiB preallocated image, five windows: 271 MiB read
	 * instead of 174.5, bench/README.md).
	 * run_first[i] is the first run of L1 entry i (CK_NO_RUNS: not
	 * recorded, read it), run_n[i] their count. NULL: not recording.
	 */
	struct ck_run *runs;
	uint64_t nruns;
	uint32_t *run_first, *run_n;
	uint64_t max_rc;
	/* far_refcount(): a refcount block, and its index + 1 (0: none) */
	uint8_t *far_buf;
	uint64_t far_t;
	bool wrote; /* repairs written, not yet synced */
	struct ck_ra *ra; /* L2 read-ahead; NULL: synchronous reads */
};

/*
 * L2 read-ahead: the walk of an L1 table reads its L2 tables in L1 order,
 * so the batches it will want next (the same batches l2_table() would
 * read: tables adjacent in the file read together) are read on a queue
 * ahead of it, up to CK_RA_SLOTS batches and CK_RA_BYTES. Batches form a
 * ring in L1 order; the head is the one being walked. A batch the walk
 * does not ask for (it cannot happen unless the planning and the walk
 * disagree) is dropped; with nothing planned the walk reads itself, as
 * without read-ahead (memory files, no io_uring). Any repair write drops
 * the batches ahead, as they may hold a table it changed.
 */
struct ck_ra_slot {
	struct sio_req req;
	uint8_t *buf;
	uint64_t off, len; /* the bytes read */
	uint64_t first; /* the L1 entry of the first table in them */
	bool done;
	int res;
};

struct ck_ra {
	struct sio_queue *q;
	struct ck_ra_slot slot[CK_RA_SLOTS];
	unsigned head, count;
	uint64_t bytes; /* of the batches in the ring */
	const uint64_t *l1; /* the walk planned for */
	uint64_t n, next; /* its entries, the next one to plan */
	bool active;
	/* Refcount blocks read together (load_refcounts()): nrb buffers. */
	struct ck_ra_slot rb[CK_RA_SLOTS];
	unsigned nrb;
};

static void finding(struct ck *k, unsigned kind, uint64_t off, bool repaired,
		    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void finding(struct ck *k, unsigned kind, uint64_t off, bool repaired,
		    const char *fmt, ...)
{
	struct img_check_report *r = k->r;
	va_list ap;

	r->kinds[kind]++;
	if (kind == IMG_CK_LEAK) {
		r->found_leaks++;
		r->leaks_fixed += repaired;
	} else {
		r->found_corruptions++;
		r->corruptions_fixed += repaired;
	}
	if (r->n_findings >= IMG_CHECK_MAX_FINDINGS)
		return;
	struct img_check_finding *f = &r->findings[r->n_findings++];

	f->kind = (uint8_t)kind;
	f->repaired = repaired;
	f->offset = off;
	va_start(ap, fmt);
	vsnprintf(f->what, sizeof(f->what), fmt, ap);
	va_end(ap);
}

/*
 * Whether cluster is counted in this window: the last window may reach
 * past the clusters counted (k->ncount), and what lies there must be
 * judged as in a single window, which ends at k->ncount (found by the
 * fuzzer's two-ways check: COPIED flags of entries two clusters past the
 * end were compared with refcounts in the last of several windows only).
 */
static bool in_window(const struct ck *k, uint64_t cluster)
{
	return cluster >= k->w0 && cluster - k->w0 < k->wn &&
	       cluster < k->ncount;
}

/*
 * Count one reference to every cluster [off, off + len) touches. A region
 * reaching a cluster or more past the end of the file is not counted: a
 * corruption (qemu's rule, so a last partial cluster is fine).
 */
static __attribute__((noinline)) void
inc_slow(struct ck *k, uint64_t off, uint64_t len, bool meta, const char *what)
{
	uint64_t end, c, c0, c1;

	if (!len)
		return;
	if (sx_add(off, len, &end) ||
	    (end > k->file_size && end - k->file_size >= k->cs)) {
		if (k->first)
			finding(k, IMG_CK_PAST_EOF, off, false,
				"%s at 0x%llx (%llu bytes) is past the end of the file (%llu bytes)",
				what, (unsigned long long)off,
				(unsigned long long)len,
				(unsigned long long)k->file_size);
		return;
	}
	c0 = sx_max(off >> k->cbits, k->w0);
	c1 = sx_min(((end - 1) >> k->cbits) + 1, k->w0 + k->wn);
	for (c = c0; c < c1; c++) {
		uint64_t i = c - k->w0;

		if (k->refs[i] < CK_SAT)
			k->refs[i]++;
		if (meta)
			k->meta[i / 8] |= (uint8_t)(1u << (i % 8));
	}
}

/* inc() of the common case inlined: one data cluster inside the file. */
static inline void inc(struct ck *k, uint64_t off, uint64_t len, bool meta,
		       const char *what)
{
	/* The common case: one whole cluster inside the file. */
	if (!meta && len == k->cs && !(off & (k->cs - 1)) &&
	    off < k->file_size) {
		uint64_t i = (off >> k->cbits) - k->w0;

		if (i < k->wn && k->refs[i] < CK_SAT)
			k->refs[i]++;
		return;
	}
	inc_slow(k, off, len, meta, what);
}

static bool is_meta(const struct ck *k, uint64_t i)
{
	return k->meta[i / 8] & (1u << (i % 8));
}

/* Read len bytes at off; what lies past the end of the file reads as 0. */
static int read_at(struct ck *k, void *buf, uint64_t len, uint64_t off)
{
	uint64_t n = off < k->file_size ? sx_min(len, k->file_size - off) : 0;
	int ret;

	if (!len)
		return 0;
	if (n) {
		ret = sio_pread(k->img->file, buf, n, off);
		if (ret)
			return sx_error(ret, "%s: cannot read 0x%llx: %s",
					k->img->path, (unsigned long long)off,
					strerror(-ret));
	}
	memset((uint8_t *)buf + n, 0, len - n);
	return 0;
}

static void ra_drop_ahead(struct ck *k);

static int write_at(struct ck *k, const void *buf, uint64_t len, uint64_t off)
{
	int ret;

	ra_drop_ahead(k);
	ret = sio_pwrite(k->wf, buf, len, off);

	if (ret)
		return sx_error(ret, "%s: cannot write a repair at 0x%llx: %s",
				k->img->path, (unsigned long long)off,
				strerror(-ret));
	k->wrote = true;
	return 0;
}

static int tbl_reserve(struct ck *k, uint64_t bytes)
{
	uint64_t *p;

	if (bytes <= k->tbl_cap)
		return 0;
	p = sio_buf_alloc(bytes);
	if (!p)
		return -ENOMEM;
	sio_buf_free(k->tbl);
	k->tbl = p;
	k->tbl_cap = bytes;
	return 0;
}

/* ---- the tables other than L1/L2, parsed once ---- */

static int parse_snapshots(struct ck *k)
{
	const struct qcow2_header *h = &k->s->hdr;
	uint64_t pos = h->snapshots_offset;
	uint8_t e[40];
	uint32_t i;
	int ret;

	if (!h->nb_snapshots)
		return 0;
	k->snaps = calloc(h->nb_snapshots, sizeof(*k->snaps));
	if (!k->snaps)
		return -ENOMEM;
	if (!sx_is_aligned(pos, k->cs)) {
		finding(k, IMG_CK_UNALIGNED, pos, false,
			"snapshot table at 0x%llx is not cluster aligned",
			(unsigned long long)pos);
		return 0;
	}
	for (i = 0; i < h->nb_snapshots; i++) {
		uint64_t l1_off, len, next;
		uint32_t l1_size, extra;
		uint16_t id_len, name_len;

		if (!sx_range_within(pos, sizeof(e), k->file_size)) {
			finding(k, IMG_CK_BAD_TABLE, pos, false,
				"snapshot %u of %u at 0x%llx is past the end of the file",
				i + 1, h->nb_snapshots,
				(unsigned long long)pos);
			break;
		}
		ret = read_at(k, e, sizeof(e), pos);
		if (ret)
			return ret;
		memcpy(&l1_off, e, 8);
		l1_off = be64toh(l1_off);
		memcpy(&l1_size, e + 8, 4);
		l1_size = be32toh(l1_size);
		memcpy(&id_len, e + 12, 2);
		id_len = be16toh(id_len);
		memcpy(&name_len, e + 14, 2);
		name_len = be16toh(name_len);
		memcpy(&extra, e + 36, 4);
		extra = be32toh(extra);
		len = sizeof(e) + (uint64_t)extra + id_len + name_len;
		len = (len + 7) & ~7ull;
		if (sx_add(pos, len, &next) || next > k->file_size) {
			finding(k, IMG_CK_BAD_TABLE, pos, false,
				"snapshot %u of %u at 0x%llx is incomplete (runs past the end of the file)",
				i + 1, h->nb_snapshots,
				(unsigned long long)pos);
			break;
		}
		/* Version 3 snapshots carry the large VM state and disk size. */
		if (h->version >= 3 && extra < 16)
			finding(k, IMG_CK_BAD_TABLE, pos, false,
				"snapshot %u of %u is incomplete: %u bytes of extra data, version 3 needs 16",
				i + 1, h->nb_snapshots, extra);
		if ((uint64_t)l1_size * 8 > QCOW2_MAX_L1_BYTES ||
		    !sx_is_aligned(l1_off, k->cs)) {
			finding(k, IMG_CK_BAD_TABLE, l1_off, false,
				"snapshot %u: L1 table at 0x%llx (%u entries) is unaligned or too large",
				i + 1, (unsigned long long)l1_off, l1_size);
		} else {
			k->snaps[k->nsnaps].off = l1_off;
			k->snaps[k->nsnaps].entries = l1_size;
			k->nsnaps++;
		}
		pos = next;
	}
	k->snap_bytes = pos - h->snapshots_offset;
	return 0;
}

static int parse_bitmaps(struct ck *k)
{
	const struct qcow2_ext *x = qcow2_find_ext(k->s, QCOW2_EXT_BITMAPS);
	uint64_t pos, end, n;
	uint8_t *dir;
	uint32_t nb;
	int ret;

	/* Without the autoclear bit the bitmaps are stale: qemu drops them. */
	if (!x || !(k->s->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	if (x->len < 24) {
		finding(k, IMG_CK_BAD_TABLE, 0, false,
			"bitmaps extension too short (%u bytes)", x->len);
		return 0;
	}
	memcpy(&nb, x->data, 4);
	nb = be32toh(nb);
	memcpy(&k->bm_dir_bytes, x->data + 8, 8);
	k->bm_dir_bytes = be64toh(k->bm_dir_bytes);
	memcpy(&k->bm_dir_off, x->data + 16, 8);
	k->bm_dir_off = be64toh(k->bm_dir_off);
	if (!nb)
		return 0;
	if (k->bm_dir_bytes > CK_MAX_BITMAP_DIR ||
	    !sx_is_aligned(k->bm_dir_off, k->cs) ||
	    !sx_range_within(k->bm_dir_off, k->bm_dir_bytes, k->file_size)) {
		finding(k, IMG_CK_BAD_TABLE, k->bm_dir_off, false,
			"bitmap directory at 0x%llx (%llu bytes) is unaligned, too large or past the end of the file",
			(unsigned long long)k->bm_dir_off,
			(unsigned long long)k->bm_dir_bytes);
		k->bm_dir_bytes = 0;
		return 0;
	}
	dir = malloc(k->bm_dir_bytes ? k->bm_dir_bytes : 1);
	/* No more entries than the directory holds (24 bytes each at least). */
	k->bmts = calloc(sx_max(sx_min(nb, k->bm_dir_bytes / 24), 1),
			 sizeof(*k->bmts));
	if (!dir || !k->bmts) {
		free(dir);
		return -ENOMEM;
	}
	ret = read_at(k, dir, k->bm_dir_bytes, k->bm_dir_off);
	if (ret) {
		free(dir);
		return ret;
	}
	pos = 0;
	end = k->bm_dir_bytes;
	for (n = 0; n < nb; n++) {
		uint64_t toff, len;
		uint32_t tsize, extra;
		uint16_t name_len;

		if (end - pos < 24) {
			finding(k, IMG_CK_BAD_TABLE, k->bm_dir_off + pos, false,
				"bitmap directory ends inside entry %llu",
				(unsigned long long)n + 1);
			break;
		}
		memcpy(&toff, dir + pos, 8);
		toff = be64toh(toff);
		memcpy(&tsize, dir + pos + 8, 4);
		tsize = be32toh(tsize);
		memcpy(&name_len, dir + pos + 18, 2);
		name_len = be16toh(name_len);
		memcpy(&extra, dir + pos + 20, 4);
		extra = be32toh(extra);
		len = (24 + (uint64_t)extra + name_len + 7) & ~7ull;
		if (len > end - pos) {
			finding(k, IMG_CK_BAD_TABLE, k->bm_dir_off + pos, false,
				"bitmap directory entry %llu runs past the directory",
				(unsigned long long)n + 1);
			break;
		}
		if (!sx_is_aligned(toff, k->cs) ||
		    (uint64_t)tsize * 8 > QCOW2_MAX_L1_BYTES)
			finding(k, IMG_CK_BAD_TABLE, toff, false,
				"bitmap table at 0x%llx (%u entries) is unaligned or too large",
				(unsigned long long)toff, tsize);
		else
			k->bmts[k->nbmts++] = (struct ck_table){
				.off = toff, .entries = tsize};
		pos += len;
	}
	free(dir);
	return 0;
}

/* ---- counting ---- */

/* Refcount block of refcount-table entry t: its offset, 0 if none. */
static uint64_t rblock(struct ck *k, uint64_t t)
{
	uint64_t e = k->s->rc.table[t];
	uint64_t off = e & QCOW2_REFT_OFFSET_MASK;

	if (!off || !sx_is_aligned(off, k->cs) ||
	    off >> k->cbits >= k->nclusters)
		return 0;
	return off;
}

/*
 * The refcount blocks, counted last (as qemu does): a block referenced by
 * anything counted before it (by another table entry too) is corruption,
 * as in qemu-img check, whatever its refcount says.
 */
static void count_refblocks(struct ck *k)
{
	const struct qcow2_refcount *rc = &k->s->rc;
	uint64_t t;

	for (t = 0; t < rc->table_entries; t++) {
		uint64_t e = rc->table[t];
		uint64_t off = e & QCOW2_REFT_OFFSET_MASK;

		/*
		 * Reserved bits are a corruption in an empty entry too (as
		 * qemu counts them). qemu then leaves the block uncounted, and
		 * reports its cluster leaked: it is counted here, as what it
		 * is, so that -r leaks never frees a refcount block in use.
		 */
		if (k->first && (e & CK_REFT_RESERVED))
			finding(k, IMG_CK_RESERVED, off, false,
				"refcount table entry %llu has reserved bits set (0x%llx)",
				(unsigned long long)t, (unsigned long long)e);
		if (!off)
			continue;
		if (!sx_is_aligned(off, k->cs)) {
			if (k->first)
				finding(k, IMG_CK_UNALIGNED, off, false,
					"refcount block %llu at 0x%llx is not cluster aligned",
					(unsigned long long)t,
					(unsigned long long)off);
			continue;
		}
		if (off >> k->cbits >= k->nclusters) {
			if (k->first)
				finding(k, IMG_CK_PAST_EOF, off, false,
					"refcount block %llu at 0x%llx is past the end of the file",
					(unsigned long long)t,
					(unsigned long long)off);
			continue;
		}
		inc(k, off, k->cs, true, "refcount block");
		/*
		 * References past what the refcount width holds are counted
		 * as overflows (compare_window()), not here: qemu's count
		 * stops at the width.
		 */
		if (in_window(k, off >> k->cbits) &&
		    sx_min(k->refs[(off >> k->cbits) - k->w0], k->max_rc) != 1)
			finding(k, IMG_CK_OVERLAP, off, false,
				"refcount block %llu at 0x%llx is also referenced elsewhere (%u references)",
				(unsigned long long)t, (unsigned long long)off,
				k->refs[(off >> k->cbits) - k->w0]);
	}
}

/* The refcount on disk of cluster c of the window, after repairs. */
static uint64_t disk_rc(const struct ck *k, uint64_t c)
{
	return k->drc[c - k->w0];
}

static bool has_data_file(const struct ck *k)
{
	return k->s->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE;
}

/*
 * COPIED flags are set right by any repair: lowering a leaked refcount to
 * 1 makes a clear flag wrong (as qemu-img check -r leaks does too).
 */
static bool copied_fix(const struct ck *k)
{
	return k->wf && k->repair >= IMG_CHECK_REPAIR_LEAKS;
}

static uint64_t window_bit(const struct ck *k, uint64_t cluster)
{
	return 1ull << sx_min(cluster >> k->wbits, 63);
}

/* The window bits of clusters c..c+n-1 (n >= 1). */
static uint64_t window_bits(const struct ck *k, uint64_t c, uint64_t n)
{
	uint64_t a = sx_min(c >> k->wbits, 63);
	uint64_t b = sx_min((c + n - 1) >> k->wbits, 63);

	return (~0ull >> (63 - (b - a))) << a;
}

/* The first window's walk notes what windows an active L2 table reaches. */
static __attribute__((noinline)) void
note_window_slow(struct ck *k, uint64_t l1i, uint64_t off, uint64_t len)
{
	uint64_t c;

	for (c = off >> k->cbits;
	     c <= (off + len - 1) >> k->cbits && c / k->wn < 64;
	     c += k->wn - c % k->wn)
		k->wmask[l1i] |= window_bit(k, c);
	if (c / k->wn >= 64 && c <= (off + len - 1) >> k->cbits)
		k->wmask[l1i] |= 1ull << 63;
}

static inline void note_window(struct ck *k, uint64_t l1i, uint64_t off,
			       uint64_t len)
{
	if (!k->wmask || !k->first || !len)
		return;
	if (len == k->cs && !(off & (k->cs - 1))) {
		k->wmask[l1i] |= window_bit(k, off >> k->cbits);
		return;
	}
	note_window_slow(k, l1i, off, len);
}

/*
 * The refcount on disk of cluster c, which lies past every window (past
 * the clusters counted): 0 where no refcount block covers it, as qemu
 * reads it, else the block's entry (a block may describe clusters past
 * the file). False when the entry cannot be read (qemu skips the flag
 * then too). The block read last is kept.
 */
static bool far_refcount(struct ck *k, uint64_t c, uint64_t *rc)
{
	const struct qcow2_refcount *rc_ = &k->s->rc;
	uint64_t t = c / rc_->block_entries, off;

	*rc = 0;
	if (t >= rc_->table_entries)
		return true;
	off = rc_->table[t] & QCOW2_REFT_OFFSET_MASK;
	if (!off)
		return true;
	if (!sx_is_aligned(off, k->cs))
		return false;
	if (k->far_t != t + 1) {
		if (!k->far_buf && !(k->far_buf = sio_buf_alloc(k->cs)))
			return false;
		k->far_t = 0;
		if (read_at(k, k->far_buf, k->cs, off))
			return false;
		k->far_t = t + 1;
	}
	*rc = qcow2_refcount_entry_get(k->far_buf, rc_->order,
				       c % rc_->block_entries);
	return true;
}

/*
 * Whether this walk compares the COPIED flag of an entry naming cluster c,
 * and the refcount it compares with (*rc): the window's for a cluster in
 * it; for one past every window, the first window compares it, as qemu
 * does, against what the refcount blocks say (0, mostly).
 */
static bool copied_rc(struct ck *k, uint64_t c, uint64_t *rc)
{
	if (in_window(k, c)) {
		*rc = disk_rc(k, c);
		return true;
	}
	return c >= k->ncount && k->first && far_refcount(k, c, rc);
}

/* A data cluster's COPIED flag disagrees with its refcount (in window). */
static __attribute__((noinline)) void copied_finding(struct ck *k, uint8_t *p,
						     uint64_t word,
						     uint64_t guest,
						     uint64_t rc, bool *changed)
{
	uint64_t off = word & QCOW2_L2E_OFFSET_MASK;
	bool fix = copied_fix(k);

	finding(k,
		word & QCOW2_OFLAG_COPIED ? IMG_CK_COPIED : IMG_CK_COPIED_CLEAR,
		off, fix,
		"COPIED flag of the data cluster at 0x%llx (guest 0x%llx) is %s, refcount %llu",
		(unsigned long long)off, (unsigned long long)guest,
		word & QCOW2_OFLAG_COPIED ? "set" : "clear",
		(unsigned long long)rc);
	if (fix) {
		sx_put_be64(p, word ^ QCOW2_OFLAG_COPIED);
		*changed = true;
	}
}

/* Entry j (its bytes at p) of the L2 table of L1 entry l1i: any kind. */
static __attribute__((noinline)) void walk_entry(struct ck *k, uint8_t *p,
						 uint64_t j, uint64_t l1i,
						 bool active, unsigned pass,
						 bool *changed)
{
	struct qcow2 *s = k->s;
	uint64_t word = sx_be64(p);
	uint64_t bm = s->extended_l2 ? sx_be64(p + 8) : 0;
	uint64_t guest = ((l1i << s->l2_bits) + j) << s->cluster_bits;
	struct qcow2_l2e e;
	const char *why = NULL;
	uint64_t rc;

	if (!word && !bm)
		return;
	if (!(word & QCOW2_OFLAG_COMPRESSED) &&
	    !sx_is_aligned(word & QCOW2_L2E_OFFSET_MASK, k->cs)) {
		if ((pass & CK_COUNT) && k->first)
			finding(k, IMG_CK_UNALIGNED,
				word & QCOW2_L2E_OFFSET_MASK, false,
				"data cluster at 0x%llx (guest 0x%llx) is not cluster aligned",
				(unsigned long long)(word &
						     QCOW2_L2E_OFFSET_MASK),
				(unsigned long long)guest);
		/*
		 * Counted all the same, as qemu counts it: a cluster's worth
		 * of references from that offset (the two clusters it
		 * touches, which -r leaks then never frees), its COPIED flag
		 * against the refcount of the first.
		 */
		e = (struct qcow2_l2e){
			.type = QCOW2_C_NORMAL,
			.copied = word & QCOW2_OFLAG_COPIED,
			.host_off = word & QCOW2_L2E_OFFSET_MASK,
			.alloc = UINT32_MAX,
		};
	} else if (!s->extended_l2 && (word & QCOW2_L2E_OFFSET_MASK) &&
		   !(word & ~(QCOW2_L2E_OFFSET_MASK | QCOW2_OFLAG_COPIED))) {
		/* The common entry, decoded here: a data cluster. */
		e = (struct qcow2_l2e){
			.type = QCOW2_C_NORMAL,
			.copied = word & QCOW2_OFLAG_COPIED,
			.host_off = word & QCOW2_L2E_OFFSET_MASK,
			.alloc = UINT32_MAX,
		};
	} else if ((word & QCOW2_OFLAG_COMPRESSED) &&
		   (word & QCOW2_OFLAG_COPIED)) {
		/* A corruption, then counted without the flag (as qemu). */
		if ((pass & CK_COUNT) && k->first)
			finding(k, IMG_CK_BAD_ENTRY,
				word & QCOW2_L2E_OFFSET_MASK, false,
				"L2 entry of guest 0x%llx: compressed cluster entry has the COPIED flag",
				(unsigned long long)guest);
		if (qcow2_l2e_decode(s, word & ~QCOW2_OFLAG_COPIED, bm, &e,
				     &why))
			goto bad;
	} else if (qcow2_l2e_decode(s, word, bm, &e, &why)) {
	bad:
		if ((pass & CK_COUNT) && k->first)
			finding(k, IMG_CK_BAD_ENTRY,
				word & QCOW2_L2E_OFFSET_MASK, false,
				"L2 entry of guest 0x%llx: %s",
				(unsigned long long)guest, why);
		return;
	}
	if ((pass & CK_COUNT) && k->first && e.type != QCOW2_C_COMPRESSED &&
	    (word & CK_L2_RESERVED))
		finding(k, IMG_CK_RESERVED, e.host_off, false,
			"L2 entry of guest 0x%llx has reserved bits set (0x%016llx)",
			(unsigned long long)guest, (unsigned long long)word);
	switch (e.type) {
	case QCOW2_C_COMPRESSED:
		if (!(pass & CK_COUNT))
			break;
		if (has_data_file(k)) {
			if (k->first)
				finding(k, IMG_CK_BAD_ENTRY, e.coff, false,
					"compressed cluster (guest 0x%llx) in an image with an external data file",
					(unsigned long long)guest);
			break;
		}
		inc(k, e.coff, e.csize, false, "compressed cluster");
		if (active)
			note_window(k, l1i, e.coff, e.csize);
		if (k->first && active) {
			k->r->allocated_clusters++;
			k->r->compressed_clusters++;
			/* fragmented by nature, as qemu counts */
			k->r->fragmented_clusters++;
		}
		break;
	case QCOW2_C_NORMAL:
	case QCOW2_C_ZERO_ALLOC:
		if (pass & CK_COUNT) {
			if (!has_data_file(k))
				inc(k, e.host_off, k->cs, false,
				    "data cluster");
			if (active && !has_data_file(k))
				note_window(k, l1i, e.host_off, k->cs);
			if (k->first && active) {
				k->r->allocated_clusters++;
				if (k->next_host && e.host_off != k->next_host)
					k->r->fragmented_clusters++;
				k->next_host = e.host_off + k->cs;
			}
		}
		if (!(pass & CK_COPIED) || has_data_file(k) ||
		    !copied_rc(k, e.host_off >> k->cbits, &rc))
			break;
		if ((rc == 1) != e.copied)
			copied_finding(k, p, word, guest, rc, changed);
		break;
	case QCOW2_C_ZERO_PLAIN:
	case QCOW2_C_UNALLOC:
		break;
	}
}

/*
 * Entries j..j+n-1 of the table being recorded (its runs from first on)
 * name clusters c..c+n-1 with one COPIED flag: extend its last run or add
 * one. False when the runs are full.
 */
static bool record(struct ck *k, uint64_t first, uint64_t c, uint64_t j,
		   uint64_t n, uint64_t copied)
{
	struct ck_run *r = k->nruns > first ? &k->runs[k->nruns - 1] : NULL;

	if (r && r->host + r->n == c && r->j + r->n == j &&
	    r->copied == !!copied && r->n + n < (1u << 30)) {
		r->n += (uint32_t)n;
		return true;
	}
	if (k->nruns >= CK_RUNS_MAX)
		return false;
	k->runs[k->nruns++] = (struct ck_run){.host = c,
					      .j = (uint32_t)j,
					      .n = (uint32_t)n,
					      .copied = !!copied};
	return true;
}

/* Whether a later window counts the table of L1 entry i from its runs. */
static bool replays(const struct ck *k, uint64_t i, bool active)
{
	return active && !k->first && k->run_first &&
	       k->run_first[i] != CK_NO_RUNS;
}

/*
 * The window's part of the table of L1 entry i from its runs: what
 * walk_l2() does in a later window (references counted, COPIED flags
 * compared; never a repair: recorded only without a file to repair).
 */
static void replay(struct ck *k, uint64_t l1i, unsigned pass)
{
	const uint64_t w0 = k->w0, wn = k->wn;
	const uint64_t base = l1i << k->s->l2_bits;
	uint64_t r, c;

	for (r = k->run_first[l1i]; r < k->run_first[l1i] + k->run_n[l1i];
	     r++) {
		const struct ck_run *run = &k->runs[r];
		uint64_t lo = sx_max(run->host, w0);
		uint64_t hi = sx_min(run->host + run->n, w0 + wn);

		for (c = lo; c < hi; c++) {
			uint64_t i = c - w0;
			uint64_t word;
			uint8_t be[8];
			bool changed = false;

			if ((pass & CK_COUNT) && k->refs[i] < CK_SAT)
				k->refs[i]++;
			if (!(pass & CK_COPIED) ||
			    (k->drc[i] == 1) == (bool)run->copied)
				continue;
			word = (c << k->cbits) |
			       (run->copied ? QCOW2_OFLAG_COPIED : 0);
			sx_put_be64(be, word);
			copied_finding(k, be, word,
				       (base + run->j + (c - run->host))
					       << k->cbits,
				       k->drc[i], &changed);
		}
	}
}

/*
 * How many entries from j on (of n, at most max) continue the run word
 * starts: each names the cluster after the one before it, with the same
 * flags (1 at least).
 */
static uint64_t run_len(const uint8_t *l2, uint64_t j, uint64_t n,
			uint64_t word, uint64_t cs, uint64_t max)
{
	uint64_t m = 1, end = sx_min(n - j, max);

	while (m < end && sx_be64(l2 + (j + m) * 8) == word + m * cs)
		m++;
	return m;
}

/*
 * One L2 table (its bytes at l2) of L1 entry l1i. COUNT: count its
 * references (per-entry findings and statistics in the first window,
 * active table only for the statistics). COPIED: compare the flags of its
 * entries in the window with the refcounts; *changed when a flag was
 * repaired in l2. The common entry (a data cluster inside the file, no
 * flag but COPIED) of a standard table is handled in the loop here, a run
 * of them (the clusters that follow each other in the file, as written in
 * order) at a time; any other entry by walk_entry().
 */
static void walk_l2(struct ck *k, uint8_t *l2, uint64_t l1i, bool active,
		    unsigned pass, bool *changed)
{
	struct qcow2 *s = k->s;
	const uint64_t cs = k->cs, w0 = k->w0, wn = k->wn;
	const uint64_t fsz = k->file_size, base = l1i << s->l2_bits;
	const unsigned cbits = k->cbits;
	const bool count = pass & CK_COUNT, copied = pass & CK_COPIED;
	const bool stats = count && k->first && active;
	/* A run ends before the file does and before its offsets carry. */
	const uint64_t room = sx_min(fsz, 1ull << 56);
	uint16_t *const refs = k->refs;
	uint64_t *wm =
		count && active && k->wmask && k->first ? &k->wmask[l1i] : NULL;
	/* This table's runs, recorded from rec_first while rec stays true. */
	const uint64_t rec_first = k->nruns;
	bool rec = wm && k->runs;
	uint64_t j, n;

	/* qemu counts fragmentation within each L2 table. */
	k->next_host = 0;

	if (s->extended_l2 || has_data_file(k)) {
		rec = false;
		for (j = 0; j < s->l2_entries; j++)
			walk_entry(k, l2 + j * s->l2_entry_size, j, l1i, active,
				   pass, changed);
		return;
	}
	for (j = 0; j < s->l2_entries; j += n) {
		uint8_t *p = l2 + j * 8;
		uint64_t word = sx_be64(p), off = word & QCOW2_L2E_OFFSET_MASK;
		uint64_t c, lo, hi, i;

		n = 1;
		if (!word)
			continue;
		if ((word & ~(QCOW2_L2E_OFFSET_MASK | QCOW2_OFLAG_COPIED)) ||
		    !off || (off & (cs - 1)) || off >= fsz) {
			rec = false;
			walk_entry(k, p, j, l1i, active, pass, changed);
			continue;
		}
		c = off >> cbits;
		n = run_len(l2, j, s->l2_entries, word, cs,
			    ((room - off - 1) >> cbits) + 1);
		if (rec)
			rec = record(k, rec_first, c, j, n,
				     word & QCOW2_OFLAG_COPIED);
		/* The run's part of the window: window clusters lo..hi-1. */
		lo = sx_max(c, w0) - w0;
		hi = sx_max(sx_min(c + n, w0 + wn), w0) - w0;
		if (count) {
			for (i = lo; i < hi; i++)
				refs[i] += refs[i] < CK_SAT;
			if (wm)
				*wm |= window_bits(k, c, n);
			if (stats) {
				k->r->allocated_clusters += n;
				if (k->next_host && off != k->next_host)
					k->r->fragmented_clusters++;
				k->next_host = off + n * cs;
			}
		}
		if (!copied)
			continue;
		for (i = lo; i < hi; i++)
			if ((k->drc[i] == 1) != !!(word & QCOW2_OFLAG_COPIED)) {
				uint64_t m = i + w0 - c;

				copied_finding(k, p + m * 8, word + m * cs,
					       (base + j + m) << cbits,
					       k->drc[i], changed);
			}
	}
	if (wm && k->runs) {
		if (rec) {
			k->run_first[l1i] = (uint32_t)rec_first;
			k->run_n[l1i] = (uint32_t)(k->nruns - rec_first);
		} else {
			k->nruns = rec_first; /* dropped: read it again */
		}
	}
}

/* Whether this walk reads the L2 table of L1 entry i. */
static bool wants_l2(const struct ck *k, uint64_t i, bool active)
{
	/* Later windows: only the tables that reference them. */
	return !active || !k->wmask || k->first ||
	       (k->wmask[i] & window_bit(k, k->w0));
}

/*
 * The bytes to read for the L2 table of L1 entry i, with the tables the
 * next entries name while they follow it in the file (one request instead
 * of many; metadata written in order lies that way).
 */
static uint64_t batch_len(const struct ck *k, const uint64_t *l1, uint64_t n,
			  uint64_t i, bool active)
{
	uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK, len = k->cs, j;

	for (j = i + 1; j < n && len < k->l2b_cap && wants_l2(k, j, active) &&
			!replays(k, j, active);
	     j++)
		if ((l1[j] & QCOW2_L1E_OFFSET_MASK) != off + len)
			break;
		else
			len += k->cs;
	return len;
}

/* Whether walk_l1 reads the L2 table of entry i (its conditions). */
static bool walk_reads(const struct ck *k, const uint64_t *l1, uint64_t i,
		       bool active)
{
	uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK;

	return off && sx_is_aligned(off, k->cs) && off < k->file_size &&
	       wants_l2(k, i, active) && !replays(k, i, active);
}

static void ra_done(struct sio_req *req, int res)
{
	struct ck_ra_slot *sl = req->priv;

	sl->done = true;
	sl->res = res < 0 ? res : 0;
}

static void ra_wait(struct ck_ra *ra, struct ck_ra_slot *sl)
{
	while (!sl->done)
		if (sio_queue_run(ra->q, 1) < 0)
			break;
	if (!sl->done) {
		/* The queue failed: nothing will complete it. */
		sl->done = true;
		sl->res = -EIO;
	}
}

/* Drop the head batch (waiting for its read first). */
static void ra_pop(struct ck_ra *ra)
{
	struct ck_ra_slot *sl = &ra->slot[ra->head];

	ra_wait(ra, sl);
	sio_buf_free(sl->buf);
	sl->buf = NULL;
	ra->bytes -= sl->len;
	ra->head = (ra->head + 1) % CK_RA_SLOTS;
	ra->count--;
}

/*
 * Start reading batches ahead of the walk while there is room, once
 * CK_RA_REFILL slots are free (or none is in use): submitted together,
 * they cost one system call and one doorbell of the device, not one each.
 */
static void ra_plan(struct ck *k)
{
	struct ck_ra *ra = k->ra;

	if (ra->count && ra->count + CK_RA_REFILL > CK_RA_SLOTS)
		return;
	while (ra->next < ra->n && ra->count < CK_RA_SLOTS &&
	       ra->bytes < CK_RA_BYTES) {
		uint64_t i = ra->next, off, len;
		struct ck_ra_slot *sl;

		if (!walk_reads(k, ra->l1, i, ra->active)) {
			ra->next++;
			continue;
		}
		off = ra->l1[i] & QCOW2_L1E_OFFSET_MASK;
		len = batch_len(k, ra->l1, ra->n, i, ra->active);
		/* Past the end reads as zeros: left to read_at(). */
		if (off + len > k->file_size) {
			ra->next++;
			continue;
		}
		sl = &ra->slot[(ra->head + ra->count) % CK_RA_SLOTS];
		*sl = (struct ck_ra_slot){.off = off, .len = len, .first = i};
		sl->buf = sio_buf_alloc(len);
		if (!sl->buf)
			return;
		sl->req = (struct sio_req){
			.op = SIO_OP_READ,
			.file = k->img->file,
			.buf = sl->buf,
			.off = off,
			.len = len,
			.done = ra_done,
			.priv = sl,
		};
		if (sio_queue_submit(ra->q, &sl->req) < 0) {
			sio_buf_free(sl->buf);
			sl->buf = NULL;
			return;
		}
		ra->count++;
		ra->bytes += len;
		ra->next += len / k->cs;
	}
	sio_queue_run(ra->q, 0);
}

/* A new walk: nothing read ahead for the last one is kept. */
static void ra_start(struct ck *k, const uint64_t *l1, uint64_t n, bool active)
{
	struct ck_ra *ra = k->ra;

	if (!ra)
		return;
	while (ra->count)
		ra_pop(ra);
	ra->l1 = l1;
	ra->n = n;
	ra->next = 0;
	ra->active = active;
}

static void ra_drop_ahead(struct ck *k)
{
	struct ck_ra *ra = k->ra;
	struct ck_ra_slot *sl;

	if (!ra || ra->count <= 1)
		return;
	/* Keep the head: the table being walked (and changed). */
	while (ra->count > 1) {
		sl = &ra->slot[(ra->head + ra->count - 1) % CK_RA_SLOTS];
		ra_wait(ra, sl);
		sio_buf_free(sl->buf);
		sl->buf = NULL;
		ra->bytes -= sl->len;
		ra->count--;
	}
	/* Plan again after the head. */
	sl = &ra->slot[ra->head];
	ra->next = sl->first + sl->len / k->cs;
}

/*
 * The L2 table of entry i from the batches read ahead: 1 when found (*l2
 * set), 0 when none holds it (not planned: the caller reads it), -errno
 * when its read failed. Batches before i are done with.
 */
static int ra_table(struct ck *k, uint64_t i, uint64_t off, uint8_t **l2)
{
	struct ck_ra *ra = k->ra;

	if (!ra)
		return 0;
	ra_plan(k);
	while (ra->count) {
		struct ck_ra_slot *sl = &ra->slot[ra->head];
		uint64_t end = sl->first + sl->len / k->cs;

		if (i < sl->first)
			return 0;
		if (i < end && off >= sl->off && off - sl->off < sl->len) {
			ra_wait(ra, sl);
			if (sl->res)
				return sx_error(sl->res,
						"%s: cannot read 0x%llx: %s",
						k->img->path,
						(unsigned long long)sl->off,
						strerror(-sl->res));
			*l2 = sl->buf + (off - sl->off);
			return 1;
		}
		ra_pop(ra);
		ra_plan(k);
	}
	return 0;
}

/*
 * The L2 table of L1 entry i in *l2: from the batch read last (ahead, or
 * by the last call), or read now with the tables that follow it in the
 * file. Changes made through *l2 keep the batch current.
 */
static int l2_table(struct ck *k, const uint64_t *l1, uint64_t n, uint64_t i,
		    bool active, uint8_t **l2)
{
	uint64_t off = l1[i] & QCOW2_L1E_OFFSET_MASK, len;
	int ret;

	if (k->l2b_len && off >= k->l2b_off && off - k->l2b_off < k->l2b_len) {
		*l2 = k->l2b + (off - k->l2b_off);
		return 0;
	}
	ret = ra_table(k, i, off, l2);
	if (ret)
		return ret < 0 ? ret : 0;
	len = batch_len(k, l1, n, i, active);
	k->l2b_len = 0;
	ret = read_at(k, k->l2b, len, off);
	if (ret)
		return ret;
	k->l2b_off = off;
	k->l2b_len = len;
	*l2 = k->l2b;
	return 0;
}

/* Walk an L1 table of n entries (host-endian) at l1_off. */
static int walk_l1(struct ck *k, uint64_t *l1, uint64_t n, uint64_t l1_off,
		   bool active, unsigned pass)
{
	uint64_t i;
	int ret;

	/* The batch may be stale: repairs wrote refcount blocks since. */
	k->l2b_len = 0;
	ra_start(k, l1, n, active);
	for (i = 0; i < n; i++) {
		uint64_t e = l1[i], off = e & QCOW2_L1E_OFFSET_MASK, rc;
		bool changed = false;
		uint8_t *l2 = NULL;

		if ((pass & CK_COUNT) && k->first && (e & CK_L1_RESERVED))
			finding(k, IMG_CK_RESERVED, off, false,
				"L1 entry %llu has reserved bits set (0x%016llx)",
				(unsigned long long)i, (unsigned long long)e);
		if (!off)
			continue;
		if (!sx_is_aligned(off, k->cs)) {
			if ((pass & CK_COUNT) && k->first)
				finding(k, IMG_CK_UNALIGNED, off, false,
					"L2 table at 0x%llx (L1 entry %llu) is not cluster aligned",
					(unsigned long long)off,
					(unsigned long long)i);
			continue;
		}
		if (pass & CK_COUNT)
			inc(k, off, k->cs, true, "L2 table");
		if ((pass & CK_COPIED) && copied_rc(k, off >> k->cbits, &rc) &&
		    (rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
			bool fix = copied_fix(k);

			finding(k,
				e & QCOW2_OFLAG_COPIED ? IMG_CK_COPIED
						       : IMG_CK_COPIED_CLEAR,
				off, fix,
				"COPIED flag of the L2 table at 0x%llx (L1 entry %llu) is %s, refcount %llu",
				(unsigned long long)off, (unsigned long long)i,
				e & QCOW2_OFLAG_COPIED ? "set" : "clear",
				(unsigned long long)rc);
			if (fix) {
				uint8_t be[8];

				l1[i] = e ^ QCOW2_OFLAG_COPIED;
				sx_put_be64(be, l1[i]);
				ret = write_at(k, be, 8, l1_off + i * 8);
				if (ret)
					return ret;
			}
		}
		if (off >= k->file_size)
			continue; /* reads as zeros: nothing to count */
		if (!wants_l2(k, i, active))
			continue;
		if (replays(k, i, active)) {
			replay(k, i, pass);
			continue;
		}
		ret = l2_table(k, l1, n, i, active, &l2);
		if (ret)
			return ret;
		walk_l2(k, l2, i, active, pass, &changed);
		if (changed) {
			ret = write_at(k, l2, k->cs, off);
			if (ret)
				return ret;
		}
	}
	return 0;
}

/*
 * Read a table of 64-bit entries into k->tbl: 0, or 1 when the table does
 * not lie within the file (counting it reported that; a hostile
 * table must not cost reads of zeros).
 */
static int read_table(struct ck *k, const struct ck_table *t)
{
	uint64_t i;
	int ret;

	if (!sx_range_within(t->off, t->entries * 8, k->file_size))
		return 1;

	ret = tbl_reserve(k, t->entries * 8);
	if (ret)
		return ret;
	ret = read_at(k, k->tbl, t->entries * 8, t->off);
	if (ret)
		return ret;
	for (i = 0; i < t->entries; i++)
		k->tbl[i] = be64toh(k->tbl[i]);
	return 0;
}

static int count_window(struct ck *k)
{
	struct qcow2 *s = k->s;
	size_t i;
	int ret;

	inc(k, 0, k->cs, true, "header");
	inc(k, s->hdr.l1_table_offset, s->l1_size * 8, true, "L1 table");
	/*
	 * Without repairs the refcounts loaded for the window are final, so
	 * the COPIED flags are compared in the same walk.
	 */
	ret = walk_l1(k, s->l1, s->l1_size, s->hdr.l1_table_offset, true,
		      k->wf ? CK_COUNT : CK_COUNT | CK_COPIED);
	if (ret)
		return ret;
	inc(k, s->hdr.snapshots_offset, k->snap_bytes, true, "snapshot table");
	for (i = 0; i < k->nsnaps; i++) {
		inc(k, k->snaps[i].off, k->snaps[i].entries * 8, true,
		    "snapshot L1 table");
		ret = read_table(k, &k->snaps[i]);
		if (ret < 0)
			return ret;
		if (ret)
			continue;
		ret = walk_l1(k, k->tbl, k->snaps[i].entries, k->snaps[i].off,
			      false, CK_COUNT);
		if (ret)
			return ret;
	}
	inc(k, k->s->rc.table_offset, k->s->rc.table_entries * 8, true,
	    "refcount table");
	inc(k, k->bm_dir_off, k->bm_dir_bytes, true, "bitmap directory");
	for (i = 0; i < k->nbmts; i++) {
		uint64_t j;

		inc(k, k->bmts[i].off, k->bmts[i].entries * 8, true,
		    "bitmap table");
		ret = read_table(k, &k->bmts[i]);
		if (ret < 0)
			return ret;
		if (ret)
			continue;
		for (j = 0; j < k->bmts[i].entries; j++) {
			uint64_t off = k->tbl[j] & CK_BMT_OFFSET_MASK;

			if (!off)
				continue;
			if (!sx_is_aligned(off, k->cs)) {
				if (k->first)
					finding(k, IMG_CK_UNALIGNED, off, false,
						"bitmap data cluster at 0x%llx is not cluster aligned",
						(unsigned long long)off);
				continue;
			}
			inc(k, off, k->cs, true, "bitmap data cluster");
		}
	}
	count_refblocks(k);
	return 0;
}

/* Refcount block t (its bytes at p) into the window's k->drc. */
static void load_block(struct ck *k, uint64_t t, const uint8_t *p)
{
	const struct qcow2_refcount *rc = &k->s->rc;
	uint64_t E = rc->block_entries, c;
	uint64_t lo = sx_max(t * E, k->w0);
	uint64_t hi = sx_min((t + 1) * E, k->w0 + k->wn);

	if (rc->order == 4) {
		/* 16-bit refcounts, the default: copied as they are. */
		for (c = lo; c < hi; c++)
			k->drc[c - k->w0] = sx_be16(p + 2 * (c - t * E));
		return;
	}
	for (c = lo; c < hi; c++) {
		uint64_t v = qcow2_refcount_entry_get(p, rc->order, c - t * E);

		k->drc[c - k->w0] = (uint16_t)sx_min(v, CK_SAT);
	}
}

/*
 * Load the on-disk refcounts of the window into k->drc: the blocks read
 * together on the read-ahead queue (as many as its nrb buffers, up to
 * CK_RB_BYTES), else one by one.
 */
static int load_refcounts(struct ck *k)
{
	const struct qcow2_refcount *rc = &k->s->rc;
	uint64_t E = rc->block_entries, t = k->w0 / E;
	uint64_t tend = sx_min((k->w0 + k->wn + E - 1) / E, rc->table_entries);
	unsigned max = k->ra && k->ra->nrb ? k->ra->nrb : 1;
	struct ck_ra_slot *sl = k->ra && k->ra->nrb ? k->ra->rb : NULL;
	int ret = 0;

	memset(k->drc, 0, k->wn * sizeof(*k->drc));
	while (t < tend) {
		unsigned n = 0, m;

		/* Up to max blocks in flight, then each in the window. */
		for (; t < tend && n < max; t++) {
			uint64_t off = rblock(k, t);

			if (!off)
				continue;
			if (!sl) {
				ret = read_at(k, k->buf, k->cs, off);
				if (ret)
					return ret;
				load_block(k, t, k->buf);
				continue;
			}
			sl[n] = (struct ck_ra_slot){.buf = sl[n].buf,
						    .off = off,
						    .len = k->cs,
						    .first = t};
			sl[n].req = (struct sio_req){
				.op = SIO_OP_READ,
				.file = k->img->file,
				.buf = sl[n].buf,
				.off = off,
				.len = k->cs,
				.done = ra_done,
				.priv = &sl[n],
			};
			if (sio_queue_submit(k->ra->q, &sl[n].req) < 0) {
				sl[n].done = true;
				sl[n].res = -EIO;
			}
			n++;
		}
		if (n)
			sio_queue_run(k->ra->q, 0);
		for (m = 0; m < n; m++) {
			ra_wait(k->ra, &sl[m]);
			if (sl[m].res && !ret)
				ret = sx_error(sl[m].res,
					       "%s: cannot read 0x%llx: %s",
					       k->img->path,
					       (unsigned long long)sl[m].off,
					       strerror(-sl[m].res));
			if (!ret)
				load_block(k, sl[m].first, sl[m].buf);
		}
		if (ret)
			return ret;
	}
	return 0;
}

static int sync_repairs(struct ck *k);

/*
 * -r all, refcount-table entry t empty while clusters of its range
 * [lo, hi) (the window's part of it) are referenced: a new refcount block
 * in a free cluster of that range (no reference, and no refcount since no
 * block covers it): the cluster just past the file when the range reaches
 * it, else the first free one inside (the old block's, when its entry was
 * cleared). It describes itself, so that no other block changes. Its offset into *off and its bytes (all zero but its own
 * refcount 1) into k->buf; the caller raises the others and writes the
 * block, then link_new_block() links it. 0 and *off 0 when there is
 * nothing to do or no free cluster (the image is then marked corrupt).
 */
static int new_block(struct ck *k, uint64_t t, uint64_t lo, uint64_t hi,
		     uint64_t *off)
{
	const struct qcow2_refcount *rc = &k->s->rc;
	uint64_t c, free_c = UINT64_MAX;
	bool used = false;

	*off = 0;
	if (!k->wf || k->repair < IMG_CHECK_REPAIR_ALL ||
	    t >= rc->table_entries || rc->table[t])
		return 0;
	for (c = lo; c < hi; c++) {
		if (k->refs[c - k->w0])
			used = true;
		else if (free_c == UINT64_MAX && c)
			free_c = c;
	}
	/*
	 * Past the file when the range reaches there (as qemu's rebuild
	 * writes at the end): never anyone's bytes, where a free cluster
	 * inside may be what a bad pointer (reported, not counted) names.
	 */
	if (k->nclusters >= lo && k->nclusters < hi &&
	    !k->refs[k->nclusters - k->w0])
		free_c = k->nclusters;
	if (!used || free_c == UINT64_MAX)
		return 0;
	memset(k->buf, 0, k->cs);
	qcow2_refcount_entry_set(k->buf, rc->order,
				 free_c - t * rc->block_entries, 1);
	k->refs[free_c - k->w0] = 1;
	k->drc[free_c - k->w0] = 1;
	k->meta[(free_c - k->w0) / 8] |=
		(uint8_t)(1u << ((free_c - k->w0) % 8));
	*off = free_c << k->cbits;
	return 0;
}

/*
 * Point refcount-table entry t at the block just written at off: the
 * block made durable first, so that no crash leaves the table naming a
 * block that is not there.
 */
static int link_new_block(struct ck *k, uint64_t t, uint64_t off)
{
	struct qcow2_refcount *rc = &k->s->rc;
	uint8_t be[8];
	int ret;

	ret = sync_repairs(k);
	if (ret)
		return ret;
	sx_put_be64(be, off);
	ret = write_at(k, be, 8, rc->table_offset + t * 8);
	if (ret)
		return ret;
	rc->table[t] = off;
	rc->blocks_stale = true;
	if (off >> k->cbits >= k->nclusters) {
		k->nclusters = (off >> k->cbits) + 1;
		k->file_size = k->nclusters << k->cbits;
	}
	return 0;
}

/* Compare the window's counts with the refcounts; repair what may be. */
static int compare_window(struct ck *k)
{
	const struct qcow2_refcount *rc = &k->s->rc;
	uint64_t E = rc->block_entries, t, c;
	bool nosnap = !k->s->hdr.nb_snapshots;
	int ret;

	for (t = k->w0 / E; t * E < k->w0 + k->wn; t++) {
		uint64_t off = t < rc->table_entries ? rblock(k, t) : 0;
		uint64_t lo = sx_max(t * E, k->w0);
		uint64_t hi =
			sx_min(sx_min((t + 1) * E, k->w0 + k->wn), k->ncount);
		bool changed = false, created = false;

		if (lo >= hi)
			break;
		if (!off) {
			ret = new_block(k, t, lo, hi, &off);
			if (ret)
				return ret;
			created = changed = off != 0;
		}
		for (c = lo; c < hi; c++) {
			uint64_t i = c - k->w0;
			uint64_t ref, have, host;
			unsigned kind;
			bool fix;

			/* Clusters that agree, skipped CK_SKIP at a time. */
			if (!(i % CK_SKIP) && hi - c >= CK_SKIP &&
			    !memcmp(&k->refs[i], &k->drc[i],
				    CK_SKIP * sizeof(*k->refs))) {
				c += CK_SKIP - 1;
				continue;
			}
			ref = k->refs[i];
			have = k->drc[i];
			host = c * k->cs;

			/* Past the file: only what something references. */
			if (c >= k->nclusters && !ref)
				continue;
			if (ref > k->max_rc) {
				/*
				 * Each reference past the width is an overflow
				 * (qemu's count stops there, reporting each),
				 * and the refcount is then compared with the
				 * most it can hold.
				 */
				finding(k, IMG_CK_OVERFLOW, host, false,
					"cluster at 0x%llx has %llu references, %llu more than %u-bit refcounts hold",
					(unsigned long long)host,
					(unsigned long long)ref,
					(unsigned long long)(ref - k->max_rc),
					rc->bits);
				k->r->kinds[IMG_CK_OVERFLOW] +=
					ref - k->max_rc - 1;
				k->r->found_corruptions += ref - k->max_rc - 1;
				ref = k->max_rc;
			}
			if (have == ref || (have == CK_SAT && ref == CK_SAT))
				continue;
			if (have > ref) {
				fix = k->wf && off &&
				      k->repair >= IMG_CHECK_REPAIR_LEAKS;
				finding(k, IMG_CK_LEAK, host, fix,
					"leaked cluster at 0x%llx: refcount %llu, references %llu",
					(unsigned long long)host,
					(unsigned long long)have,
					(unsigned long long)ref);
			} else {
				kind = ref >= 2 && have >= 1 &&
						       (is_meta(k, i) || nosnap)
					       ? IMG_CK_OVERLAP
					       : IMG_CK_REFCOUNT_LOW;
				fix = k->wf && off &&
				      k->repair >= IMG_CHECK_REPAIR_ALL;
				finding(k, kind, host, fix,
					"%s at 0x%llx: refcount %llu, references %llu%s",
					kind == IMG_CK_OVERLAP
						? "cluster used twice"
						: "refcount too low",
					(unsigned long long)host,
					(unsigned long long)have,
					(unsigned long long)ref,
					is_meta(k, i) ? " (metadata)" : "");
			}
			if (!fix)
				continue;
			/* The block's bytes are needed only to change them. */
			if (!changed) {
				ret = read_at(k, k->buf, k->cs, off);
				if (ret)
					return ret;
			}
			qcow2_refcount_entry_set(k->buf, rc->order, c - t * E,
						 ref);
			k->drc[i] = (uint16_t)ref;
			changed = true;
		}
		if (changed) {
			ret = write_at(k, k->buf, k->cs, off);
			if (ret)
				return ret;
		}
		if (created) {
			ret = link_new_block(k, t, off);
			if (ret)
				return ret;
		}
	}
	/* The end of what is in use, after repairs. */
	for (c = sx_min(k->w0 + k->wn, k->ncount); c > k->w0; c--)
		if ((c - 1 < k->nclusters && k->drc[c - 1 - k->w0]) ||
		    k->refs[c - 1 - k->w0]) {
			k->r->image_end_offset =
				sx_max(k->r->image_end_offset, c * k->cs);
			break;
		}
	return 0;
}

static int sync_repairs(struct ck *k)
{
	int ret;

	if (!k->wrote)
		return 0;
	ret = sio_fdatasync(k->wf);
	if (ret)
		return sx_error(ret, "%s: cannot sync the repairs: %s",
				k->img->path, strerror(-ret));
	k->wrote = false;
	return 0;
}

/*
 * After a repair: cut a tail of the file that nothing uses (refcount 0
 * and no reference), the way a clean close leaves the file.
 */
static int trim_tail(struct ck *k)
{
	uint64_t end = sx_max(k->r->image_end_offset, k->cs);
	int ret;

	if (has_data_file(k) || end >= k->file_size)
		return 0;
	ret = sio_file_truncate(k->wf, end);
	if (ret)
		return sx_error(ret, "%s: cannot trim the free tail: %s",
				k->img->path, strerror(-ret));
	k->r->trimmed_bytes = k->file_size - end;
	k->file_size = end;
	return 0;
}

/*
 * Read-ahead for a local file (memory files and NBD exports read
 * synchronously); without a queue (no io_uring) too.
 */
static void ra_init(struct ck *k)
{
	struct sio_file *f = k->img->file;
	struct ck_ra *ra;

	if (f->mem || sio_file_is_nbd(f))
		return;
	ra = calloc(1, sizeof(*ra));
	if (!ra)
		return;
	if (sio_queue_create(CK_RA_SLOTS, &ra->q) < 0) {
		free(ra);
		return;
	}
	/* Without buffers for them, refcount blocks are read one by one. */
	while (ra->nrb < sx_min(CK_RA_SLOTS, sx_max(CK_RB_BYTES / k->cs, 1)) &&
	       (ra->rb[ra->nrb].buf = sio_buf_alloc(k->cs)))
		ra->nrb++;
	k->ra = ra;
}

static void ra_fini(struct ck *k)
{
	if (!k->ra)
		return;
	while (k->ra->count)
		ra_pop(k->ra);
	while (k->ra->nrb)
		sio_buf_free(k->ra->rb[--k->ra->nrb].buf);
	sio_queue_destroy(k->ra->q);
	free(k->ra);
	k->ra = NULL;
}

static int run(struct ck *k, uint64_t window)
{
	struct qcow2 *s = k->s;
	uint64_t E = s->rc.block_entries;
	int ret;

	k->cs = s->cluster_size;
	k->cbits = s->cluster_bits;
	k->max_rc = s->rc.bits == 64 ? UINT64_MAX : (1ull << s->rc.bits) - 1;
	ret = sio_file_size(k->img->file, &k->file_size);
	if (ret)
		return ret;
	k->nclusters = (k->file_size + k->cs - 1) >> k->cbits;
	k->ncount = k->nclusters + 1;
	k->r->total_clusters = (k->img->size + k->cs - 1) >> k->cbits;
	k->r->file_size = k->file_size;
	if (!window)
		window = CK_WINDOW_DEFAULT;
	/*
	 * Windows of whole refcount blocks (a power of two, as the blocks),
	 * so each block is read once.
	 */
	window = sx_max(1ull << (63 - __builtin_clzll(window)), E);
	k->wbits = (unsigned)__builtin_ctzll(window);
	k->wn = sx_min(window, k->ncount);
	k->refs = calloc(k->wn, sizeof(*k->refs));
	k->drc = calloc(k->wn, sizeof(*k->drc));
	k->meta = calloc((k->wn + 7) / 8, 1);
	k->buf = sio_buf_alloc(k->cs);
	/* No batch reaches past the file: a small image gets a small one. */
	k->l2b_cap = sx_max(CK_L2_BATCH >> k->cbits, 1) * k->cs;
	k->l2b_cap = sx_min(k->l2b_cap, sx_max(k->nclusters, 1) << k->cbits);
	k->l2b = sio_buf_alloc(k->l2b_cap);
	if (!k->refs || !k->drc || !k->meta || !k->buf || !k->l2b)
		return -ENOMEM;
	if (k->ncount > k->wn && s->l1_size) {
		k->wmask = calloc(s->l1_size, sizeof(*k->wmask));
		if (!k->wmask)
			return -ENOMEM;
	}
	/* Runs for the later windows (report only; without memory: reads). */
	if (k->wmask && !k->wf) {
		k->runs = malloc(CK_RUNS_MAX * sizeof(*k->runs));
		k->run_first = malloc(s->l1_size * sizeof(*k->run_first));
		k->run_n = calloc(s->l1_size, sizeof(*k->run_n));
		if (!k->runs || !k->run_first || !k->run_n) {
			free(k->runs);
			free(k->run_first);
			free(k->run_n);
			k->runs = NULL;
			k->run_first = k->run_n = NULL;
		} else {
			memset(k->run_first, 0xff,
			       s->l1_size * sizeof(*k->run_first));
		}
	}
	k->first = true;
	ra_init(k);
	ret = parse_snapshots(k);
	if (!ret)
		ret = parse_bitmaps(k);
	if (ret)
		return ret;
	for (k->w0 = 0; k->w0 < k->ncount; k->w0 += k->wn) {
		memset(k->refs, 0, k->wn * sizeof(*k->refs));
		memset(k->meta, 0, (k->wn + 7) / 8);
		k->r->passes++;
		ret = load_refcounts(k);
		if (!ret)
			ret = count_window(k);
		if (!ret)
			ret = compare_window(k);
		if (!ret)
			ret = sync_repairs(k);
		/* COPIED flags against the refcounts as repaired. */
		if (!ret && k->wf)
			ret = walk_l1(k, s->l1, s->l1_size,
				      s->hdr.l1_table_offset, true, CK_COPIED);
		if (!ret)
			ret = sync_repairs(k);
		if (ret)
			return ret;
		k->first = false;
		if (k->nclusters == 0)
			break;
	}
	if (k->wf && (k->r->leaks_fixed || k->r->corruptions_fixed))
		ret = trim_tail(k);
	if (!ret && k->wf && k->r->trimmed_bytes)
		ret = sio_fsync(k->wf);
	k->r->file_size = k->file_size;
	return ret;
}

int qcow2_check_image(struct img *img, struct qcow2 *s, struct sio_file *wfile,
		      const struct img_check_opts *o,
		      struct img_check_report *r)
{
	struct ck k = {
		.img = img,
		.s = s,
		.wf = o->repair ? wfile : NULL,
		.repair = o->repair,
		.r = r,
	};
	int ret;

	ret = run(&k, o->window);
	ra_fini(&k);
	free(k.refs);
	free(k.drc);
	free(k.meta);
	free(k.wmask);
	free(k.runs);
	free(k.run_first);
	free(k.run_n);
	sio_buf_free(k.buf);
	sio_buf_free(k.far_buf);
	sio_buf_free(k.l2b);
	sio_buf_free(k.tbl);
	free(k.snaps);
	free(k.bmts);
	return ret;
}

/* Set or clear incompatible feature bits on disk (v3 only). */
int qcow2_set_incompat(struct img *img, struct qcow2 *s, struct sio_file *f,
		       uint64_t set, uint64_t clear)
{
	uint64_t v = (s->hdr.incompatible_features | set) & ~clear;
	uint8_t be[8];
	int ret;

	if (s->hdr.version < 3)
		return -ENOTSUP;
	if (v == s->hdr.incompatible_features)
		return 0;
	sx_put_be64(be, v);
	ret = sio_pwrite(f, be, 8, 72);
	if (!ret)
		ret = sio_fdatasync(f);
	if (ret)
		return sx_error(ret, "%s: cannot update the header: %s",
				img->path, strerror(-ret));
	s->hdr.incompatible_features = v;
	memcpy(s->hdr_raw + 72, be, 8);
	s->dirty = v & QCOW2_INCOMPAT_DIRTY;
	s->corrupt = v & QCOW2_INCOMPAT_CORRUPT;
	return 0;
}

int qcow2_check(struct img *img, struct sio_file *wfile,
		const struct img_check_opts *o, struct img_check_report *r)
{
	struct qcow2 *s = img->priv;
	int ret;

	ret = qcow2_check_image(img, s, wfile, o, r);
	if (ret || !o->repair || !wfile)
		return ret;
	if (r->found_corruptions > r->corruptions_fixed) {
		/* Left unrepaired: no writer may trust the image. */
		if (o->repair >= IMG_CHECK_REPAIR_ALL && s->hdr.version < 3)
			r->unmarkable = true;
		else if (o->repair >= IMG_CHECK_REPAIR_ALL && !s->corrupt &&
			 !qcow2_set_incompat(img, s, wfile,
					     QCOW2_INCOMPAT_CORRUPT, 0))
			r->marked_corrupt = true;
		return 0;
	}
	/* Consistent now: a dirty or corrupt mark has served its purpose. */
	if (s->dirty && r->found_leaks == r->leaks_fixed &&
	    !qcow2_set_incompat(img, s, wfile, 0, QCOW2_INCOMPAT_DIRTY))
		r->cleared_dirty = true;
	if (s->corrupt && o->repair >= IMG_CHECK_REPAIR_ALL &&
	    r->found_leaks == r->leaks_fixed)
		qcow2_set_incompat(img, s, wfile, 0, QCOW2_INCOMPAT_CORRUPT);
	return 0;
}

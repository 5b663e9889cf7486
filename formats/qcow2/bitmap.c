/*
 * qcow2 persistent dirty bitmaps (the bitmaps extension): what a writer
 * must do so that qemu finds them correct afterwards.
 *
 * The extension points at a directory of variable-length entries; each
 * names a bitmap, its granularity, flags, and a one-level table of data
 * clusters (entry 0: the cluster reads as zeros, entry 1: as ones). The
 * whole extension means something only while autoclear bit 0 is set: a
 * writer that does not update the bitmaps clears that bit, and qemu then
 * drops them. This writer keeps them instead, as qemu does:
 *
 *  - open (read-write, bit 0 set): the directory is validated against the
 *    file (qcow2_bitmaps_parse); a bitmap of an unknown type, with unknown
 *    flags, with extra data not marked compatible or with a granularity
 *    qemu does not support makes the open fail (we could not keep it
 *    right). Enabled (auto) bitmaps that are consistent are tracked: table
 *    and data into memory. Bitmaps IN_USE already (a writer crashed) are
 *    inconsistent and disabled ones must not change: both are left exactly
 *    as they are. The tracked ones get IN_USE in the directory, synced,
 *    before the open returns, so before any guest write.
 *  - guest writes, write-zeroes and discards set bits in memory
 *    (qcow2_mark_dirty, through img_mark_dirty() from the guest entry
 *    points only: a stream or copy-on-read writes what the guest already
 *    saw and dirties nothing). Bits are only ever set, never cleared.
 *  - clean close, after the final flush (qcow2_bitmaps_store): data
 *    clusters with new bits are written (in place where they exist: the
 *    bitmap is IN_USE meanwhile, so a torn state is never trusted; fresh
 *    refcounted clusters where the table entry was 0; an all-ones cluster
 *    cannot change), synced; the refcount blocks of fresh clusters,
 *    synced; the tables that changed, synced; then IN_USE cleared in the
 *    directory, synced. A crash before the last write leaves the bitmaps
 *    IN_USE (qemu treats them as after its own crash) and at most leaked
 *    clusters; after it, everything they point at is durable. Like qemu,
 *    bitmaps are stored only at close, not on every flush: a flush leaves
 *    them IN_USE and the spec allows the file to lag behind meanwhile.
 *
 * Memory is bounded by the file: the tables together must fit it (they
 * cannot overlap), and only tracked bitmaps' bits are kept (at most 512
 * MiB in all, calloc'd so that what no data cluster fills stays
 * untouched).
 *
 * The directory is rewritten in place (flags only) and the tables keep
 * their place (their size is fixed by the virtual size), so the extension
 * in cluster 0 never changes. Every bitmap's directory, table and data
 * clusters are kept in s->bm.meta so that the overlap check
 * (qcow2_check_overlap) refuses to put anything else on them.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/bytes.h"
#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "qcow2.h"

/* Directory entry flags and type. */
#define BM_IN_USE (1u << 0)
#define BM_AUTO (1u << 1)
#define BM_EXTRA_COMPAT (1u << 2)
#define BM_KNOWN_FLAGS (BM_IN_USE | BM_AUTO | BM_EXTRA_COMPAT)
#define BM_TYPE_DIRTY 1u

/* Limits (qemu's too, where it has them). */
#define BM_MAX_BITMAPS 65535u
#define BM_MAX_NAME 1023u
#define BM_MAX_DIR (64ull << 20)
#define BM_MIN_GRAN 9u
#define BM_MAX_GRAN 31u
#define BM_MAX_DATA (512ull << 20) /* one bitmap's bits in memory */
#define BM_MAX_DATA_ALL (512ull << 20) /* all tracked bitmaps' bits */
#define BM_ENTRY_HEAD 24u

/* Bitmap table entries. */
#define BMT_OFFSET_MASK 0x00fffffffffffe00ull
#define BMT_ALL_ONES 1ull

/* `siphon info` lists this many bitmaps at most. */
#define BM_INFO_MAX 16

void qcow2_bitmaps_free(struct qcow2_bitmaps *bm)
{
	uint32_t i;

	for (i = 0; bm->bms && i < bm->n; i++) {
		free(bm->bms[i].name);
		free(bm->bms[i].table);
		free(bm->bms[i].data);
		free(bm->bms[i].changed);
	}
	free(bm->bms);
	free(bm->dir);
	free(bm->meta);
	memset(bm, 0, sizeof(*bm));
}

/* Bytes of bits a bitmap of granularity 2^bits has for the image. */
static uint64_t data_bytes(uint64_t size, unsigned bits)
{
	uint64_t nbits = 0, bytes = 0;

	/* bits <= 63 and size < 2^63: none of these overflows. */
	sx_div_round_up(size, 1ull << bits, &nbits);
	sx_div_round_up(nbits, 8, &bytes);
	return bytes;
}

/* Data clusters a bitmap of granularity 2^bits needs for the image. */
static uint64_t table_entries(const struct qcow2 *s, uint64_t size,
			      unsigned bits)
{
	uint64_t clusters = 0;

	sx_div_round_up(data_bytes(size, bits), s->cluster_size, &clusters);
	return clusters;
}

static int cmp_name(const void *a, const void *b)
{
	const struct qcow2_bitmap *x = *(const struct qcow2_bitmap *const *)a;
	const struct qcow2_bitmap *y = *(const struct qcow2_bitmap *const *)b;

	return strcmp(x->name, y->name);
}

/* Names must be unique: sort pointers, compare neighbours. */
static int check_unique(struct img *img, struct qcow2_bitmaps *bm)
{
	const struct qcow2_bitmap **v;
	uint32_t i;
	int ret = 0;

	if (bm->n < 2)
		return 0;
	v = malloc(bm->n * sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (i = 0; i < bm->n; i++)
		v[i] = &bm->bms[i];
	qsort(v, bm->n, sizeof(*v), cmp_name);
	for (i = 1; i < bm->n && !ret; i++) {
		if (!strcmp(v[i - 1]->name, v[i]->name))
			ret = sx_error(
				-EINVAL,
				"%s: bitmap directory: two bitmaps are named '%s'",
				img->path, v[i]->name);
	}
	free(v);
	return ret;
}

/* Entry i at dir[pos, end): fills b, *len (the padded entry size). */
static int parse_entry(struct img *img, const struct qcow2 *s,
		       const struct qcow2_bitmaps *bm, uint32_t i, uint64_t pos,
		       struct qcow2_bitmap *b, uint64_t *len)
{
	const uint8_t *e = bm->dir + pos;
	uint64_t left = bm->dir_size - pos, raw, want, k;
	uint16_t name_len;

	if (left < BM_ENTRY_HEAD)
		return sx_error(
			-EINVAL,
			"%s: bitmap directory: entry %u at byte %llu runs past the directory (%llu bytes)",
			img->path, i, (unsigned long long)pos,
			(unsigned long long)bm->dir_size);
	b->entry_pos = pos;
	b->table_off = sx_be64(e);
	b->table_size = sx_be32(e + 8);
	b->flags = sx_be32(e + 12);
	b->type = e[16];
	b->gran_bits = e[17];
	name_len = sx_be16(e + 18);
	b->extra_size = sx_be32(e + 20);
	raw = BM_ENTRY_HEAD + (uint64_t)b->extra_size + name_len;
	*len = (raw + 7) & ~7ull;
	if (*len > left)
		return sx_error(
			-EINVAL,
			"%s: bitmap directory: entry %u (%llu bytes with name and extra data) runs past the directory (%llu bytes)",
			img->path, i, (unsigned long long)*len,
			(unsigned long long)bm->dir_size);
	if (!name_len || name_len > BM_MAX_NAME)
		return sx_error(
			-EINVAL,
			"%s: bitmap directory: entry %u has a name of %u bytes (1..%u)",
			img->path, i, name_len, BM_MAX_NAME);
	if (memchr(e + BM_ENTRY_HEAD + b->extra_size, '\0', name_len))
		return sx_error(
			-EINVAL,
			"%s: bitmap directory: the name of entry %u contains a NUL byte",
			img->path, i);
	b->name = strndup((const char *)e + BM_ENTRY_HEAD + b->extra_size,
			  name_len);
	if (!b->name)
		return -ENOMEM;
	for (k = raw; k < *len; k++) {
		if (e[k])
			return sx_error(
				-EINVAL,
				"%s: bitmap '%s': the padding of its directory entry is not zero",
				img->path, b->name);
	}
	if (b->gran_bits > 63)
		return sx_error(-EINVAL,
				"%s: bitmap '%s': granularity_bits %u (0..63)",
				img->path, b->name, b->gran_bits);
	want = table_entries(s, s->hdr.size, b->gran_bits);
	if (b->table_size != want)
		return sx_error(
			-EINVAL,
			"%s: bitmap '%s': its table has %u entries, but a %llu-byte image at granularity %llu needs %llu",
			img->path, b->name, b->table_size,
			(unsigned long long)s->hdr.size,
			(unsigned long long)(1ull << b->gran_bits),
			(unsigned long long)want);
	if (b->table_size &&
	    (!b->table_off || !sx_is_aligned(b->table_off, s->cluster_size) ||
	     !sx_range_within(b->table_off, (uint64_t)b->table_size * 8,
			      s->file_size)))
		return sx_error(
			-EINVAL,
			"%s: bitmap '%s': its table at 0x%llx (%u entries) is unaligned or not inside the file (%llu bytes)",
			img->path, b->name, (unsigned long long)b->table_off,
			b->table_size, (unsigned long long)s->file_size);
	return 0;
}

int qcow2_bitmaps_ext_check(struct img *img, const struct qcow2 *s,
			    const struct qcow2_ext *x)
{
	uint32_t n, reserved;
	uint64_t dir_size, dir_off;

	if (x->len != 24)
		return sx_error(-EINVAL,
				"%s: bitmaps extension has %u bytes, not 24",
				img->path, x->len);
	n = sx_be32(x->data);
	reserved = sx_be32(x->data + 4);
	dir_size = sx_be64(x->data + 8);
	dir_off = sx_be64(x->data + 16);
	if (!n || n > BM_MAX_BITMAPS || reserved)
		return sx_error(
			-EINVAL,
			"%s: bitmaps extension: %u bitmaps (1..%u), reserved field 0x%x (must be 0)",
			img->path, n, BM_MAX_BITMAPS, reserved);
	if (dir_size > BM_MAX_DIR || !sx_is_aligned(dir_off, s->cluster_size))
		return sx_error(
			-EINVAL,
			"%s: bitmaps extension: directory at 0x%llx (%llu bytes) is unaligned or larger than %llu bytes",
			img->path, (unsigned long long)dir_off,
			(unsigned long long)dir_size,
			(unsigned long long)BM_MAX_DIR);
	return 0;
}

int qcow2_bitmaps_parse(struct img *img, const struct qcow2 *s,
			struct qcow2_bitmaps *bm)
{
	const struct qcow2_ext *x = qcow2_find_ext(s, QCOW2_EXT_BITMAPS);
	uint64_t pos = 0, len = 0;
	uint32_t i;
	int ret;

	memset(bm, 0, sizeof(*bm));
	if (!x)
		return 0;
	ret = qcow2_bitmaps_ext_check(img, s, x);
	if (ret)
		return ret;
	bm->n = sx_be32(x->data);
	bm->dir_size = sx_be64(x->data + 8);
	bm->dir_off = sx_be64(x->data + 16);
	if (bm->dir_size < (uint64_t)bm->n * BM_ENTRY_HEAD || !bm->dir_off ||
	    !sx_range_within(bm->dir_off, bm->dir_size, s->file_size))
		return sx_error(
			-EINVAL,
			"%s: bitmap directory at 0x%llx (%llu bytes for %u bitmaps) is unaligned, too small, too large or not inside the file (%llu bytes)",
			img->path, (unsigned long long)bm->dir_off,
			(unsigned long long)bm->dir_size, bm->n,
			(unsigned long long)s->file_size);
	bm->dir = malloc(bm->dir_size);
	bm->bms = calloc(bm->n, sizeof(*bm->bms));
	if (!bm->dir || !bm->bms)
		return -ENOMEM;
	ret = sio_pread(img->file, bm->dir, bm->dir_size, bm->dir_off);
	if (ret)
		return sx_error(ret, "%s: cannot read the bitmap directory: %s",
				img->path, strerror(-ret));
	for (i = 0; i < bm->n; i++) {
		ret = parse_entry(img, s, bm, i, pos, &bm->bms[i], &len);
		if (ret)
			return ret;
		pos += len;
	}
	if (pos != bm->dir_size)
		return sx_error(
			-EINVAL,
			"%s: bitmap directory: its %u entries take %llu bytes, the extension says %llu",
			img->path, bm->n, (unsigned long long)pos,
			(unsigned long long)bm->dir_size);
	return check_unique(img, bm);
}

/* What makes bitmap b impossible to keep right, or NULL. */
static const char *unusable(const struct qcow2_bitmap *b, char *buf,
			    size_t size)
{
	if (b->type != BM_TYPE_DIRTY)
		snprintf(buf, size, "has unknown type %u", b->type);
	else if (b->flags & ~BM_KNOWN_FLAGS)
		snprintf(buf, size, "has unknown flags 0x%x",
			 b->flags & ~BM_KNOWN_FLAGS);
	else if (b->extra_size && !(b->flags & BM_EXTRA_COMPAT))
		snprintf(buf, size,
			 "has %u bytes of extra data not marked compatible",
			 b->extra_size);
	else if (b->gran_bits < BM_MIN_GRAN || b->gran_bits > BM_MAX_GRAN)
		snprintf(buf, size,
			 "has granularity 2^%u (supported: 2^%u to 2^%u)",
			 b->gran_bits, BM_MIN_GRAN, BM_MAX_GRAN);
	else
		return NULL;
	return buf;
}

static int add_meta(struct qcow2_bitmaps *bm, size_t *cap, uint64_t off,
		    uint64_t len)
{
	struct qcow2_range *n;

	if (bm->nmeta == *cap) {
		*cap = *cap ? *cap * 2 : 64;
		n = realloc(bm->meta, *cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		bm->meta = n;
	}
	bm->meta[bm->nmeta++] = (struct qcow2_range){off, len};
	return 0;
}

static int cmp_range(const void *a, const void *b)
{
	const struct qcow2_range *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

/*
 * Sort the metadata ranges; two bitmaps sharing a cluster, or one
 * overlapping what qcow2 itself keeps, is a corrupt directory.
 */
static int meta_finish(struct img *img, struct qcow2 *s,
		       struct qcow2_bitmaps *bm)
{
	const char *hit;
	size_t i;

	qsort(bm->meta, bm->nmeta, sizeof(*bm->meta), cmp_range);
	for (i = 0; i < bm->nmeta; i++) {
		if (i &&
		    bm->meta[i].off < bm->meta[i - 1].off + bm->meta[i - 1].len)
			return sx_error(
				-EINVAL,
				"%s: bitmap metadata at 0x%llx is used twice (bitmap directory, tables and data clusters must not overlap)",
				img->path, (unsigned long long)bm->meta[i].off);
		hit = qcow2_overlap_core(s, bm->meta[i].off, bm->meta[i].len);
		if (hit)
			return sx_error(
				-EINVAL,
				"%s: bitmap metadata at 0x%llx overlaps the %s",
				img->path, (unsigned long long)bm->meta[i].off,
				hit);
	}
	return 0;
}

/* A tracked bitmap's clusters are rewritten in place: they must be its own. */
static int check_owned(struct img *img, struct qcow2 *s,
		       const struct qcow2_bitmap *b, uint64_t off, uint64_t len)
{
	uint64_t c, rc;
	int ret;

	for (c = off >> s->cluster_bits; c << s->cluster_bits < off + len;
	     c++) {
		ret = qcow2_refcount_get(img, s, c, &rc);
		if (ret)
			return ret;
		if (rc != 1)
			return sx_error(
				-EINVAL,
				"%s: bitmap '%s': cluster 0x%llx has refcount %llu, not 1; see `siphon check`",
				img->path, b->name,
				(unsigned long long)(c << s->cluster_bits),
				(unsigned long long)rc);
	}
	return 0;
}

/* Read and check b's table; with b->tracked also its data. */
static int load_bitmap(struct img *img, struct qcow2 *s, struct qcow2_bitmap *b,
		       size_t *cap, uint64_t *total)
{
	struct qcow2_bitmaps *bm = &s->bm;
	uint64_t cs = s->cluster_size, tbytes = (uint64_t)b->table_size * 8;
	uint64_t i, e, off, n;
	int ret;

	if (!b->table_size)
		return 0;
	b->table = malloc(tbytes);
	if (!b->table)
		return -ENOMEM;
	ret = sio_pread(img->file, b->table, tbytes, b->table_off);
	if (ret)
		return sx_error(ret,
				"%s: bitmap '%s': cannot read its table: %s",
				img->path, b->name, strerror(-ret));
	ret = add_meta(bm, cap, b->table_off,
		       sx_align_down(tbytes + cs - 1, cs));
	if (ret)
		return ret;
	if (b->tracked) {
		b->data_bytes = data_bytes(s->hdr.size, b->gran_bits);
		*total += b->data_bytes;
		if (b->data_bytes > BM_MAX_DATA || *total > BM_MAX_DATA_ALL)
			return sx_error(
				-EFBIG,
				"%s: bitmap '%s' is too large to keep in memory (%llu bytes, %llu with the ones before it; at most %llu, %llu in all)",
				img->path, b->name,
				(unsigned long long)b->data_bytes,
				(unsigned long long)*total,
				(unsigned long long)BM_MAX_DATA,
				(unsigned long long)BM_MAX_DATA_ALL);
		/* calloc: pages no data cluster fills stay untouched. */
		b->data = calloc(b->data_bytes, 1);
		b->changed = calloc(b->table_size, 1);
		if (!b->data || !b->changed)
			return -ENOMEM;
		ret = check_owned(img, s, b, b->table_off, tbytes);
		if (ret)
			return ret;
	}
	for (i = 0; i < b->table_size; i++) {
		e = be64toh(b->table[i]);
		b->table[i] = e;
		off = e & BMT_OFFSET_MASK;
		if ((e & ~(BMT_OFFSET_MASK | BMT_ALL_ONES)) ||
		    (off && (e & BMT_ALL_ONES)) ||
		    (off && (!sx_is_aligned(off, cs) ||
			     !sx_range_within(off, cs, s->file_size))))
			return sx_error(
				-EINVAL,
				"%s: bitmap '%s': table entry %llu (0x%016llx) has reserved bits set, is unaligned or points past the end of the file",
				img->path, b->name, (unsigned long long)i,
				(unsigned long long)e);
		/* The bytes of data cluster i (the last may be short). */
		n = b->data ? sx_min(cs, b->data_bytes - i * cs) : 0;
		if (!off) {
			if (b->data && e == BMT_ALL_ONES)
				memset(b->data + i * cs, 0xff, n);
			continue;
		}
		ret = add_meta(bm, cap, off, cs);
		if (ret)
			return ret;
		if (!b->data)
			continue;
		ret = check_owned(img, s, b, off, cs);
		if (ret)
			return ret;
		ret = sio_pread(img->file, b->data + i * cs, n, off);
		if (ret)
			return sx_error(
				ret,
				"%s: bitmap '%s': cannot read its data at 0x%llx: %s",
				img->path, b->name, (unsigned long long)off,
				strerror(-ret));
	}
	return 0;
}

int qcow2_bitmaps_open(struct img *img, struct qcow2 *s)
{
	struct qcow2_bitmaps *bm = &s->bm;
	uint64_t total = 0, tables = 0;
	size_t cap = 0;
	char why[96];
	uint32_t i;
	int ret;

	if (s->hdr.version < 3 || !qcow2_find_ext(s, QCOW2_EXT_BITMAPS) ||
	    !(s->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
		return 0;
	ret = qcow2_bitmaps_parse(img, s, bm);
	if (ret)
		goto out;
	for (i = 0; i < bm->n; i++) {
		struct qcow2_bitmap *b = &bm->bms[i];

		if (unusable(b, why, sizeof(why))) {
			ret = sx_error(
				-ENOTSUP,
				"%s: bitmap '%s' %s: siphon cannot keep it consistent, so the image can only be opened read-only",
				img->path, b->name, why);
			goto out;
		}
		b->tracked = (b->flags & BM_AUTO) && !(b->flags & BM_IN_USE);
		/*
		 * Tables must not overlap, so together they fit the file:
		 * a directory whose tables do not is corrupt, and reading
		 * them all first would cost memory without bound.
		 */
		tables += sx_align_down((uint64_t)b->table_size * 8 +
						s->cluster_size - 1,
					s->cluster_size);
		if (tables > s->file_size) {
			ret = sx_error(
				-EINVAL,
				"%s: bitmap directory: the tables up to bitmap '%s' take %llu bytes, more than the file (%llu bytes)",
				img->path, b->name, (unsigned long long)tables,
				(unsigned long long)s->file_size);
			goto out;
		}
	}
	ret = add_meta(bm, &cap, bm->dir_off,
		       sx_align_down(bm->dir_size + s->cluster_size - 1,
				     s->cluster_size));
	for (i = 0; !ret && i < bm->n; i++)
		ret = load_bitmap(img, s, &bm->bms[i], &cap, &total);
	if (!ret)
		ret = meta_finish(img, s, bm);
	if (ret)
		goto out;
	for (i = 0; i < bm->n; i++)
		bm->ntracked += bm->bms[i].tracked;
	bm->on = true;
out:
	if (ret)
		qcow2_bitmaps_free(bm);
	return ret;
}

/* Write the directory with IN_USE set (in_use) or clear on tracked ones. */
static int write_dir(struct img *img, struct qcow2 *s, bool in_use)
{
	struct qcow2_bitmaps *bm = &s->bm;
	uint8_t *p;
	uint32_t i, f;
	int ret;

	for (i = 0; i < bm->n; i++) {
		if (!bm->bms[i].tracked)
			continue;
		p = bm->dir + bm->bms[i].entry_pos + 12;
		f = sx_be32(p);
		sx_put_be32(p, in_use ? f | BM_IN_USE : f & ~BM_IN_USE);
	}
	ret = sio_pwrite(img->file, bm->dir, bm->dir_size, bm->dir_off);
	if (!ret)
		ret = sio_fdatasync(img->file);
	if (ret)
		return sx_error(ret,
				"%s: cannot write the bitmap directory: %s",
				img->path, strerror(-ret));
	bm->in_use = in_use;
	return 0;
}

int qcow2_bitmaps_mark_in_use(struct img *img, struct qcow2 *s)
{
	if (!s->bm.on || !s->bm.ntracked)
		return 0;
	return write_dir(img, s, true);
}

/* Set bits [first, last] of b. */
static void set_bits(const struct qcow2 *s, struct qcow2_bitmap *b,
		     uint64_t first, uint64_t last)
{
	uint64_t i = first / 8, end = last / 8;
	uint8_t mask;

	for (; i <= end; i++) {
		mask = 0xff;
		if (i == first / 8)
			mask &= (uint8_t)(0xff << (first % 8));
		if (i == end)
			mask &= (uint8_t)(0xff >> (7 - last % 8));
		if ((b->data[i] & mask) == mask)
			continue;
		b->data[i] |= mask;
		b->changed[i >> s->cluster_bits] = 1;
	}
}

void qcow2_mark_dirty(struct img *img, uint64_t off, uint64_t len)
{
	struct qcow2 *s = img->priv;
	struct qcow2_bitmaps *bm = &s->bm;
	uint64_t last;
	uint32_t i;

	/*
	 * ntracked only changes at open and close, with no guest I/O: the
	 * common case (no bitmaps) costs no lock on the guest path.
	 */
	if (!len || off >= img->size || !bm->ntracked)
		return;
	last = off + sx_min(len, img->size - off) - 1;
	pthread_mutex_lock(&s->lock);
	for (i = 0; bm->ntracked && i < bm->n; i++) {
		struct qcow2_bitmap *b = &bm->bms[i];

		if (b->tracked && b->data)
			set_bits(s, b, off >> b->gran_bits,
				 last >> b->gran_bits);
	}
	pthread_mutex_unlock(&s->lock);
}

const char *qcow2_bitmaps_overlap(const struct qcow2 *s, uint64_t off,
				  uint64_t len)
{
	const struct qcow2_bitmaps *bm = &s->bm;
	size_t lo = 0, hi = bm->nmeta, mid;

	if (!len)
		return NULL;
	/* The first range that ends after off. */
	while (lo < hi) {
		mid = lo + (hi - lo) / 2;
		if (bm->meta[mid].off + bm->meta[mid].len <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < bm->nmeta && bm->meta[lo].off < off + len)
		return "bitmap metadata";
	return NULL;
}

/* One bitmap cluster to write, after the overlap check. */
static int write_cluster(struct img *img, struct qcow2 *s,
			 const struct qcow2_bitmap *b, const void *buf,
			 uint64_t len, uint64_t off, const char *what)
{
	const char *hit = qcow2_overlap_core(s, off, len);
	int ret;

	if (hit)
		return sx_error(
			-EIO,
			"%s: bitmap '%s': refusing to write its %s at 0x%llx: it overlaps the %s (corrupt image?)",
			img->path, b->name, what, (unsigned long long)off, hit);
	ret = sio_pwrite(img->file, buf, len, off);
	if (ret)
		return sx_error(ret, "%s: bitmap '%s': cannot write its %s: %s",
				img->path, b->name, what, strerror(-ret));
	return 0;
}

/*
 * Data clusters with new bits: allocate where needed, write them (whole
 * clusters through buf, cs bytes: the unused tail bits stay zero).
 */
static int store_data(struct img *img, struct qcow2 *s, struct qcow2_bitmap *b,
		      uint8_t *buf, bool *table_dirty)
{
	uint64_t cs = s->cluster_size, i, host, got, n;
	int ret;

	for (i = 0; i < b->table_size; i++) {
		if (!b->changed[i])
			continue;
		n = sx_min(cs, b->data_bytes - i * cs);
		memcpy(buf, b->data + i * cs, n);
		memset(buf + n, 0, cs - n);
		if (!(b->table[i] & BMT_OFFSET_MASK)) {
			/* 0 (an all-ones cluster cannot gain bits). */
			ret = qcow2_alloc_clusters(img, s, 1, &host, &got);
			if (ret)
				return ret;
			b->table[i] = host;
			*table_dirty = true;
		}
		ret = write_cluster(img, s, b, buf, cs,
				    b->table[i] & BMT_OFFSET_MASK,
				    "data cluster");
		if (ret)
			return ret;
	}
	return 0;
}

static int store_table(struct img *img, struct qcow2 *s,
		       const struct qcow2_bitmap *b)
{
	uint64_t *be, i;
	int ret;

	be = malloc((uint64_t)b->table_size * 8);
	if (!be)
		return -ENOMEM;
	for (i = 0; i < b->table_size; i++)
		be[i] = htobe64(b->table[i]);
	ret = write_cluster(img, s, b, be, (uint64_t)b->table_size * 8,
			    b->table_off, "table");
	free(be);
	return ret;
}

int qcow2_bitmaps_store(struct img *img, struct qcow2 *s)
{
	struct qcow2_bitmaps *bm = &s->bm;
	bool *tdirty = NULL, any_table = false, any_data = false;
	uint8_t *buf = NULL;
	uint32_t i;
	uint64_t c;
	int ret = 0;

	if (!bm->on || !bm->in_use)
		return 0;
	tdirty = calloc(bm->n, sizeof(*tdirty));
	buf = sio_buf_alloc(s->cluster_size);
	if (!tdirty || !buf) {
		ret = -ENOMEM;
		goto out;
	}
	/* 1. Data clusters (fresh ones refcounted in memory), then synced. */
	for (i = 0; i < bm->n && !ret; i++) {
		struct qcow2_bitmap *b = &bm->bms[i];

		if (!b->tracked || !b->data)
			continue;
		for (c = 0; c < b->table_size; c++)
			any_data |= b->changed[c];
		ret = store_data(img, s, b, buf, &tdirty[i]);
		any_table |= tdirty[i];
	}
	if (!ret && any_data) {
		ret = sio_fdatasync(img->file);
		if (ret)
			ret = sx_error(ret, "%s: cannot sync bitmap data: %s",
				       img->path, strerror(-ret));
	}
	/* 2. The refcounts of fresh clusters, before a table points there. */
	if (!ret && any_table)
		ret = qcow2_rc_flush(img, s);
	/* 3. Tables that changed, synced. */
	for (i = 0; i < bm->n && !ret; i++) {
		if (tdirty[i])
			ret = store_table(img, s, &bm->bms[i]);
	}
	if (!ret && any_table) {
		ret = sio_fdatasync(img->file);
		if (ret)
			ret = sx_error(ret, "%s: cannot sync bitmap tables: %s",
				       img->path, strerror(-ret));
	}
	/* 4. Only now are the bitmaps consistent: IN_USE off, synced. */
	if (!ret)
		ret = write_dir(img, s, false);
out:
	free(tdirty);
	sio_buf_free(buf);
	return ret;
}

/* name for `siphon info`: valid UTF-8 kept (else '?'), cut to fit. */
static void print_name(const char *name, char *out, size_t size)
{
	const unsigned char *p = (const unsigned char *)name;
	size_t o = 0, n, k;

	while (*p && o + 8 < size) {
		if (*p < 0x80)
			n = 1;
		else if ((*p & 0xe0) == 0xc0 && *p >= 0xc2)
			n = 2;
		else if ((*p & 0xf0) == 0xe0)
			n = 3;
		else if ((*p & 0xf8) == 0xf0 && *p <= 0xf4)
			n = 4;
		else
			n = 0;
		for (k = 1; k < n; k++) {
			if ((p[k] & 0xc0) != 0x80) {
				n = 0;
				break;
			}
		}
		if (!n || *p < 0x20 || *p == 0x7f) {
			out[o++] = '?';
			p++;
			continue;
		}
		memcpy(out + o, p, n);
		o += n;
		p += n;
	}
	if (*p)
		o += (size_t)snprintf(out + o, size - o, "...");
	out[o] = '\0';
}

/* "in-use, auto" as qemu-img info names them; "none". */
static void flag_list(uint32_t flags, char *out, size_t size)
{
	static const struct {
		uint32_t bit;
		const char *name;
	} names[] = {
		{BM_IN_USE, "in-use"},
		{BM_AUTO, "auto"},
		{~BM_KNOWN_FLAGS, "unknown"},
	};
	size_t used = 0, k;

	out[0] = '\0';
	for (k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
		if (!(flags & names[k].bit) || used >= size)
			continue;
		used += (size_t)snprintf(out + used, size - used, "%s%s",
					 used ? ", " : "", names[k].name);
	}
	if (!used)
		snprintf(out, size, "none");
}

int qcow2_bitmaps_info(struct img *img, const struct qcow2 *s,
		       struct img_info_item *items, int n)
{
	struct qcow2_bitmaps bm;
	char name[120], flags[48];
	int i = 0;
	uint32_t k;

	if (n <= 0)
		return 0;
	snprintf(items[0].key, sizeof(items[0].key), "bitmaps");
	if (!qcow2_find_ext(s, QCOW2_EXT_BITMAPS)) {
		snprintf(items[0].value, sizeof(items[0].value), "none");
		return 1;
	}
	if (!(s->hdr.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS)) {
		/* qemu ignores them too. */
		snprintf(items[0].value, sizeof(items[0].value),
			 "inconsistent (autoclear bit 0 is clear)");
		return 1;
	}
	if (qcow2_bitmaps_parse(img, s, &bm)) {
		snprintf(items[0].value, sizeof(items[0].value), "invalid: %s",
			 sx_last_error());
		qcow2_bitmaps_free(&bm);
		return 1;
	}
	snprintf(items[0].value, sizeof(items[0].value), "%u", bm.n);
	i = 1;
	for (k = 0; k < bm.n && k < BM_INFO_MAX && i < n; k++, i++) {
		const struct qcow2_bitmap *b = &bm.bms[k];

		print_name(b->name, name, sizeof(name));
		flag_list(b->flags, flags, sizeof(flags));
		snprintf(items[i].key, sizeof(items[i].key), "bitmap[%u]", k);
		snprintf(items[i].value, sizeof(items[i].value),
			 "%s (granularity %llu, flags: %s%s)", name,
			 (unsigned long long)(1ull << b->gran_bits), flags,
			 b->type == BM_TYPE_DIRTY ? "" : ", unknown type");
	}
	if (bm.n > BM_INFO_MAX && i < n) {
		snprintf(items[i].key, sizeof(items[i].key),
			 "bitmaps_unlisted");
		snprintf(items[i].value, sizeof(items[i].value), "%u",
			 bm.n - BM_INFO_MAX);
		i++;
	}
	qcow2_bitmaps_free(&bm);
	return i;
}

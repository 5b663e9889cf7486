/*
 * qcow2 header: parse and validate the fixed header, the header extensions
 * and the feature-name table from an in-memory copy of cluster 0.
 *
 * Every field that later code trusts is checked here against the file size
 * and the cluster geometry, with checked arithmetic, so that the lookup code
 * only needs to check what lives in tables (L1/L2 entries). Extensions are
 * kept in file order with their raw bytes so that a header rewrite can
 * reproduce unknown ones verbatim.
 *
 * For writing it also refuses what the write path does not handle (a
 * damaged snapshot table, external data files), clears the autoclear bits
 * it does not maintain before the first write, and rewrites the backing
 * reference (set_backing) as one write of a rebuilt cluster 0.
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

void qcow2_set_geometry(struct qcow2 *s, unsigned cluster_bits,
			bool extended_l2)
{
	s->cluster_bits = cluster_bits;
	s->cluster_size = 1ull << cluster_bits;
	s->extended_l2 = extended_l2;
	s->l2_entry_size = extended_l2 ? 16 : 8;
	s->l2_bits = cluster_bits - (extended_l2 ? 4 : 3);
	s->l2_entries = 1ull << s->l2_bits;
	s->subcluster_size = extended_l2 ? s->cluster_size / QCOW2_SUBCLUSTERS
					 : s->cluster_size;
	/* Compressed descriptor: offset bits below csize_shift, then sectors. */
	s->csize_shift = 62 - (cluster_bits - 8);
	s->csize_mask = (1ull << (cluster_bits - 8)) - 1;
	s->coff_mask = (1ull << s->csize_shift) - 1;
}

const char *qcow2_feature_name(const struct qcow2 *s, unsigned type,
			       unsigned bit)
{
	size_t i;

	for (i = 0; i < s->n_features; i++) {
		if (s->features[i].type == type && s->features[i].bit == bit &&
		    s->features[i].name[0])
			return s->features[i].name;
	}
	return NULL;
}

const struct qcow2_ext *qcow2_find_ext(const struct qcow2 *s, uint32_t magic)
{
	size_t i;

	for (i = 0; i < s->n_exts; i++) {
		if (s->exts[i].magic == magic)
			return &s->exts[i];
	}
	return NULL;
}

void qcow2_header_free(struct qcow2 *s)
{
	size_t i;

	for (i = 0; i < s->n_exts; i++)
		free(s->exts[i].data);
	free(s->exts);
	s->exts = NULL;
	s->n_exts = 0;
	free(s->features);
	s->features = NULL;
	s->n_features = 0;
	free(s->hdr_raw);
	s->hdr_raw = NULL;
	free(s->data_file_name);
	s->data_file_name = NULL;
}

/* A string from an extension payload: no NUL inside, not empty. */
static int ext_string(struct img *img, const struct qcow2_ext *e,
		      const char *what, size_t max, char **out)
{
	char *str;

	if (e->len == 0 || e->len > max)
		return sx_error(-EINVAL, "%s: %s extension has bad length %u",
				img->path, what, e->len);
	if (memchr(e->data, '\0', e->len))
		return sx_error(-EINVAL, "%s: %s contains a NUL byte",
				img->path, what);
	str = strndup((const char *)e->data, e->len);
	if (!str)
		return -ENOMEM;
	*out = str;
	return 0;
}

static int parse_feature_table(struct qcow2 *s, const struct qcow2_ext *e)
{
	size_t n = e->len / 48, i;

	if (!n)
		return 0;
	s->features = calloc(n, sizeof(*s->features));
	if (!s->features)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		const uint8_t *p = e->data + i * 48;

		s->features[i].type = p[0];
		s->features[i].bit = p[1];
		memcpy(s->features[i].name, p + 2, 46);
		s->features[i].name[46] = '\0';
	}
	s->n_features = n;
	return 0;
}

/*
 * Walk the extension area [start, end) of cluster 0. Extensions are 8-byte
 * aligned records of (magic, len, payload padded to 8); magic 0 ends the list
 * and so does running into `end` (qemu accepts a list without terminator).
 * As in qemu, every record's header and length must fit in the area, the
 * end marker's too; the padding of the last may reach past it.
 */
static int parse_extensions(struct img *img, struct qcow2 *s,
			    const uint8_t *buf, uint64_t start, uint64_t end)
{
	uint64_t off = start;
	int ret;

	while (off < end) {
		uint32_t magic, len;
		uint64_t next;
		struct qcow2_ext *n;

		if (end - off < 8)
			return sx_error(
				-EINVAL,
				"%s: header extension at offset %llu: its 8-byte header runs past the extension area (ends at %llu)",
				img->path, (unsigned long long)off,
				(unsigned long long)end);
		magic = sx_be32(buf + off);
		len = sx_be32(buf + off + 4);
		if (len > end - off - 8)
			return sx_error(
				-EINVAL,
				"%s: header extension 0x%08x at offset %llu (length %u) runs past the extension area (ends at %llu)",
				img->path, magic, (unsigned long long)off, len,
				(unsigned long long)end);
		if (magic == QCOW2_EXT_END)
			break;
		next = off + 8 + (((uint64_t)len + 7) & ~7ull);
		n = realloc(s->exts, (s->n_exts + 1) * sizeof(*n));
		if (!n)
			return -ENOMEM;
		s->exts = n;
		n = &s->exts[s->n_exts];
		n->magic = magic;
		n->len = len;
		n->data = NULL;
		if (len) {
			n->data = malloc(len);
			if (!n->data)
				return -ENOMEM;
			memcpy(n->data, buf + off + 8, len);
		}
		s->n_exts++;
		off = next;
	}

	/* Known extensions, in the order qemu gives them meaning. */
	for (size_t i = 0; i < s->n_exts; i++) {
		const struct qcow2_ext *e = &s->exts[i];

		switch (e->magic) {
		case QCOW2_EXT_BACKING_FMT:
			free(img->backing_fmt);
			img->backing_fmt = NULL;
			ret = ext_string(img, e, "backing format",
					 QCOW2_MAX_BACKING_NAME,
					 &img->backing_fmt);
			if (ret)
				return ret;
			break;
		case QCOW2_EXT_FEATURE_TABLE:
			free(s->features);
			s->features = NULL;
			s->n_features = 0;
			ret = parse_feature_table(s, e);
			if (ret)
				return ret;
			break;
		case QCOW2_EXT_DATA_FILE:
			free(s->data_file_name);
			s->data_file_name = NULL;
			ret = ext_string(img, e, "external data file name",
					 QCOW2_MAX_EXT_NAME,
					 &s->data_file_name);
			if (ret)
				return ret;
			break;
		case QCOW2_EXT_BITMAPS:
			/*
			 * nb_bitmaps, reserved, dir size, dir offset: any
			 * other length is refused, and while the bitmaps are
			 * marked consistent (the autoclear bit) so are fields
			 * no bitmap directory can have (as qemu opens it).
			 */
			if (e->len != 24)
				return sx_error(
					-EINVAL,
					"%s: bitmaps extension has %u bytes, not 24",
					img->path, e->len);
			s->has_bitmaps = sx_be32(e->data) != 0;
			if (s->hdr.autoclear_features &
			    QCOW2_AUTOCLEAR_BITMAPS) {
				ret = qcow2_bitmaps_ext_check(img, s, e);
				if (ret)
					return ret;
			}
			break;
		default:
			break;
		}
	}
	return 0;
}

static void parse_fixed(struct qcow2_header *h, const uint8_t *buf)
{
	h->magic = sx_be32(buf + 0);
	h->version = sx_be32(buf + 4);
	h->backing_file_offset = sx_be64(buf + 8);
	h->backing_file_size = sx_be32(buf + 16);
	h->cluster_bits = sx_be32(buf + 20);
	h->size = sx_be64(buf + 24);
	h->crypt_method = sx_be32(buf + 32);
	h->l1_size = sx_be32(buf + 36);
	h->l1_table_offset = sx_be64(buf + 40);
	h->refcount_table_offset = sx_be64(buf + 48);
	h->refcount_table_clusters = sx_be32(buf + 56);
	h->nb_snapshots = sx_be32(buf + 60);
	h->snapshots_offset = sx_be64(buf + 64);
	if (h->version >= 3) {
		h->incompatible_features = sx_be64(buf + 72);
		h->compatible_features = sx_be64(buf + 80);
		h->autoclear_features = sx_be64(buf + 88);
		h->refcount_order = sx_be32(buf + 96);
		h->header_length = sx_be32(buf + 100);
	} else {
		h->refcount_order = 4;
		h->header_length = QCOW2_V2_HEADER_LEN;
	}
}

/* Name every unknown incompatible bit: "bit 5 (foo), bit 9". */
static int refuse_incompat(struct img *img, struct qcow2 *s, uint64_t bits)
{
	char list[512] = "";
	size_t used = 0;
	unsigned b;

	for (b = 0; b < 64; b++) {
		const char *name;
		int n;

		if (!(bits & (1ull << b)))
			continue;
		name = qcow2_feature_name(s, 0, b);
		if (name)
			n = snprintf(list + used, sizeof(list) - used,
				     "%sbit %u (%s)", used ? ", " : "", b,
				     name);
		else
			n = snprintf(list + used, sizeof(list) - used,
				     "%sbit %u", used ? ", " : "", b);
		if (n < 0 || (size_t)n >= sizeof(list) - used)
			break;
		used += n;
	}
	return sx_error(-ENOTSUP,
			"%s: unsupported qcow2 incompatible feature: %s",
			img->path, list);
}

/* A table of `bytes` at offset must be cluster aligned and inside the file. */
static int check_table(struct img *img, struct qcow2 *s, const char *what,
		       uint64_t offset, uint64_t bytes, uint64_t file_size)
{
	if (!sx_is_aligned(offset, s->cluster_size))
		return sx_error(-EINVAL, "%s: %s offset 0x%llx is unaligned",
				img->path, what, (unsigned long long)offset);
	if (!sx_range_within(offset, bytes, file_size))
		return sx_error(
			-EINVAL,
			"%s: %s at 0x%llx (%llu bytes) is beyond the end of the file (%llu bytes)",
			img->path, what, (unsigned long long)offset,
			(unsigned long long)bytes,
			(unsigned long long)file_size);
	return 0;
}

static int check_geometry(struct img *img, struct qcow2 *s, uint64_t file_size)
{
	struct qcow2_header *h = &s->hdr;
	uint64_t bytes_per_l1e, need, l1_bytes;

	if (h->size > INT64_MAX)
		return sx_error(-EINVAL, "%s: virtual size %llu is too large",
				img->path, (unsigned long long)h->size);

	/* One L1 entry maps one L2 table's worth of clusters. */
	bytes_per_l1e = s->cluster_size << s->l2_bits;
	if (sx_div_round_up(h->size, bytes_per_l1e, &need))
		return -EINVAL;
	if ((uint64_t)h->l1_size > QCOW2_MAX_L1_BYTES / 8)
		return sx_error(
			-EINVAL,
			"%s: active L1 table too large (%u entries, at most %u)",
			img->path, h->l1_size, QCOW2_MAX_L1_BYTES / 8);
	if (h->l1_size < need)
		return sx_error(
			-EINVAL,
			"%s: L1 table too small (%u entries) for virtual size %llu (needs %llu)",
			img->path, h->l1_size, (unsigned long long)h->size,
			(unsigned long long)need);
	l1_bytes = (uint64_t)h->l1_size * 8;
	if (h->l1_size && check_table(img, s, "L1 table", h->l1_table_offset,
				      l1_bytes, file_size))
		return -EINVAL;

	if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
		return sx_error(-EINVAL, "%s: too many snapshots (%u)",
				img->path, h->nb_snapshots);
	if (h->nb_snapshots && check_table(img, s, "snapshot table",
					   h->snapshots_offset, 0, file_size))
		return -EINVAL;
	return 0;
}

/* backing_file_offset/size: inside cluster 0, after the fixed header. */
static int parse_backing_name(struct img *img, struct qcow2 *s,
			      const uint8_t *buf, size_t len)
{
	struct qcow2_header *h = &s->hdr;
	char *name;

	if (!h->backing_file_offset || !h->backing_file_size)
		return 0;
	if (h->backing_file_size > QCOW2_MAX_BACKING_NAME)
		return sx_error(
			-EINVAL,
			"%s: backing file name too long (%u bytes, at most %u)",
			img->path, h->backing_file_size,
			QCOW2_MAX_BACKING_NAME);
	if (h->backing_file_offset < h->header_length ||
	    !sx_range_within(h->backing_file_offset, h->backing_file_size,
			     s->cluster_size) ||
	    !sx_range_within(h->backing_file_offset, h->backing_file_size, len))
		return sx_error(
			-EINVAL,
			"%s: backing file name at offset %llu (%u bytes) is not inside the first cluster",
			img->path, (unsigned long long)h->backing_file_offset,
			h->backing_file_size);
	if (memchr(buf + h->backing_file_offset, '\0', h->backing_file_size))
		return sx_error(-EINVAL,
				"%s: backing file name contains a NUL byte",
				img->path);
	name = strndup((const char *)buf + h->backing_file_offset,
		       h->backing_file_size);
	if (!name)
		return -ENOMEM;
	img->backing_name = name;
	return 0;
}

int qcow2_parse_header(struct img *img, struct qcow2 *s, const uint8_t *buf,
		       size_t len, uint64_t file_size)
{
	struct qcow2_header *h = &s->hdr;
	uint64_t ext_end, unknown;
	int ret;

	if (len < QCOW2_V2_HEADER_LEN || file_size < QCOW2_V2_HEADER_LEN)
		return sx_error(-EINVAL,
				"%s: truncated qcow2 header (%llu bytes)",
				img->path, (unsigned long long)file_size);
	memset(h, 0, sizeof(*h));
	h->magic = sx_be32(buf);
	if (h->magic != QCOW2_MAGIC)
		return sx_error(-EINVAL, "%s: not a qcow2 image (bad magic)",
				img->path);
	h->version = sx_be32(buf + 4);
	if (h->version != 2 && h->version != 3)
		return sx_error(
			-ENOTSUP,
			"%s: unsupported qcow2 version %u (2 and 3 are supported)",
			img->path, h->version);
	if (h->version >= 3 &&
	    (len < QCOW2_V3_HEADER_LEN || file_size < QCOW2_V3_HEADER_LEN))
		return sx_error(-EINVAL,
				"%s: truncated qcow2 v3 header (%llu bytes)",
				img->path, (unsigned long long)file_size);
	parse_fixed(h, buf);

	if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
	    h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return sx_error(
			-EINVAL,
			"%s: unsupported cluster size: cluster_bits %u (must be %u..%u, 512 bytes to 2 MiB)",
			img->path, h->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
			QCOW2_MAX_CLUSTER_BITS);
	if (h->version >= 3) {
		if (h->header_length < QCOW2_V3_HEADER_LEN ||
		    h->header_length % 8)
			return sx_error(
				-EINVAL,
				"%s: bad header_length %u (at least %u, a multiple of 8)",
				img->path, h->header_length,
				QCOW2_V3_HEADER_LEN);
		if (h->header_length > (1ull << h->cluster_bits))
			return sx_error(
				-EINVAL,
				"%s: header_length %u exceeds the cluster size",
				img->path, h->header_length);
		if (h->header_length > len || h->header_length > file_size)
			return sx_error(
				-EINVAL,
				"%s: truncated qcow2 header (header_length %u, file %llu bytes)",
				img->path, h->header_length,
				(unsigned long long)file_size);
		if (h->header_length > QCOW2_V3_HEADER_LEN)
			h->compression_type = buf[104];
	}
	if (h->crypt_method != 0)
		return sx_error(
			-ENOTSUP,
			"%s: encrypted images are not supported (crypt_method %u)",
			img->path, h->crypt_method);

	s->hdr_raw = malloc(h->header_length);
	if (!s->hdr_raw)
		return -ENOMEM;
	memcpy(s->hdr_raw, buf, h->header_length);

	qcow2_set_geometry(s, h->cluster_bits,
			   h->incompatible_features & QCOW2_INCOMPAT_EXTL2);
	if (len > s->cluster_size)
		len = s->cluster_size;

	/*
	 * The extensions end where the backing name starts, or with cluster
	 * 0. Parse them before refusing features so the message can name an
	 * unknown bit from the feature table.
	 */
	ext_end = s->cluster_size;
	if (h->backing_file_offset && h->backing_file_offset < ext_end)
		ext_end = h->backing_file_offset;
	if (ext_end > len)
		ext_end = len;
	if (ext_end < h->header_length)
		return sx_error(
			-EINVAL,
			"%s: backing file offset %llu lies inside the header",
			img->path, (unsigned long long)h->backing_file_offset);
	ret = parse_extensions(img, s, buf, h->header_length, ext_end);
	if (ret)
		return ret;

	unknown = h->incompatible_features & ~QCOW2_INCOMPAT_MASK;
	if (unknown)
		return refuse_incompat(img, s, unknown);
	if (h->incompatible_features & QCOW2_INCOMPAT_CORRUPT) {
		s->corrupt = true;
		if (img->writable)
			return sx_error(
				-EROFS,
				"%s: image is marked corrupt (incompatible bit 1); it can only be opened read-only",
				img->path);
	}
	s->dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;

	if (h->compression_type != QCOW2_COMPRESSION_ZLIB &&
	    h->compression_type != QCOW2_COMPRESSION_ZSTD)
		return sx_error(-ENOTSUP, "%s: unknown compression type %u",
				img->path, h->compression_type);
	if (h->compression_type == QCOW2_COMPRESSION_ZLIB &&
	    (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))
		return sx_error(
			-EINVAL,
			"%s: compression type is deflate but incompatible bit 3 (compression type) is set",
			img->path);
	if (h->compression_type != QCOW2_COMPRESSION_ZLIB &&
	    !(h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION))
		return sx_error(
			-EINVAL,
			"%s: compression type %u needs incompatible bit 3 (compression type), which is clear",
			img->path, h->compression_type);

	if (s->extended_l2 && h->cluster_bits < QCOW2_MIN_EXT_L2_CLUSTER_BITS)
		return sx_error(
			-EINVAL,
			"%s: extended L2 entries need clusters of at least 16 KiB (cluster_bits %u)",
			img->path, h->cluster_bits);
	if (h->refcount_order > 6)
		return sx_error(-EINVAL,
				"%s: refcount_order %u out of range (0..6)",
				img->path, h->refcount_order);
	if ((h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
	    !s->data_file_name)
		return sx_error(
			-EINVAL,
			"%s: image uses an external data file but names none (extension 0x%08x missing)",
			img->path, QCOW2_EXT_DATA_FILE);

	ret = check_geometry(img, s, file_size);
	if (ret)
		return ret;
	ret = parse_backing_name(img, s, buf, len);
	if (ret)
		return ret;

	img->size = h->size;
	img->cluster_size = (uint32_t)s->cluster_size;
	s->l1_size = h->l1_size;
	s->file_size = file_size;
	s->data_file_size = file_size;
	return 0;
}

int qcow2_check_writable(struct img *img, struct qcow2 *s)
{
	const struct qcow2_header *h = &s->hdr;

	/* Snapshots are kept (copy-on-write), but only a table read whole. */
	if (s->snap_bad[0])
		return sx_error(
			-EINVAL,
			"%s: the snapshot table is damaged (%s); siphon check or qemu-img check -r all can tell more",
			img->path, s->snap_bad);
	if (h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
		return sx_error(
			-ENOTSUP,
			"%s: images with an external data file cannot be written",
			img->path);
	/* A dirty image is repaired when opened (flush.c). */
	return 0;
}

int qcow2_clear_autoclear(struct img *img, struct qcow2 *s)
{
	struct qcow2_header *h = &s->hdr;
	uint64_t keep = h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
	uint64_t be;
	int ret;

	/*
	 * Unknown autoclear features must be dropped by anyone who does not
	 * understand them, and so must the bitmaps bit unless this writer
	 * keeps the bitmaps (bitmap.c): clear them before the first write.
	 */
	if (s->bm.on)
		keep |= h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS;
	if (h->version < 3 || h->autoclear_features == keep)
		return 0;
	be = htobe64(keep);
	ret = sio_pwrite(img->file, &be, 8, 88);
	if (!ret)
		ret = sio_fdatasync(img->file);
	if (ret)
		return sx_error(
			ret, "%s: cannot clear the autoclear feature bits: %s",
			img->path, strerror(-ret));
	h->autoclear_features = keep;
	memcpy(s->hdr_raw + 88, &be, 8);
	return 0;
}

static void free_exts(struct qcow2_ext *exts, size_t n)
{
	size_t i;

	for (i = 0; exts && i < n; i++)
		free(exts[i].data);
	free(exts);
}

/* Copy of one extension, payload duplicated. */
static int ext_dup(struct qcow2_ext *dst, uint32_t magic, const void *data,
		   uint32_t len)
{
	dst->magic = magic;
	dst->len = len;
	dst->data = NULL;
	if (!len)
		return 0;
	dst->data = malloc(len);
	if (!dst->data)
		return -ENOMEM;
	memcpy(dst->data, data, len);
	return 0;
}

int qcow2_set_backing(struct img *img, const char *name, const char *fmt)
{
	struct qcow2 *s = img->priv;
	struct qcow2_ext *exts = NULL;
	char *new_name = NULL, *new_fmt = NULL;
	size_t n = 0, i;
	uint8_t *buf = NULL;
	int ret;

	if (!img->writable || !s->w.on)
		return sx_error(-EROFS, "%s: image is not open for writing",
				img->path);
	if (!name)
		fmt = NULL; /* no backing file, no backing format */
	if (fmt && strlen(fmt) > QCOW2_MAX_BACKING_NAME)
		return sx_error(-ENAMETOOLONG, "%s: backing format too long",
				img->path);
	pthread_mutex_lock(&s->lock);
	if (qcow2_flush_busy_locked(s)) {
		ret = sx_error(-EAGAIN,
			       "%s: cannot change the backing file while a "
			       "flush is in flight; retry after it",
			       img->path);
		goto out;
	}
	exts = calloc(s->n_exts + 1, sizeof(*exts));
	buf = sio_buf_alloc(s->cluster_size);
	if ((name && !(new_name = strdup(name))) ||
	    (fmt && !(new_fmt = strdup(fmt))) || !exts || !buf) {
		ret = sx_error(-ENOMEM, "%s: out of memory", img->path);
		goto out;
	}
	/* The backing format first, then every other extension in order. */
	if (fmt) {
		ret = ext_dup(&exts[n++], QCOW2_EXT_BACKING_FMT, fmt,
			      (uint32_t)strlen(fmt));
		if (ret)
			goto out;
	}
	for (i = 0; i < s->n_exts; i++) {
		if (s->exts[i].magic == QCOW2_EXT_BACKING_FMT)
			continue;
		ret = ext_dup(&exts[n++], s->exts[i].magic, s->exts[i].data,
			      s->exts[i].len);
		if (ret)
			goto out;
	}
	ret = qcow2_build_cluster0(&s->hdr, s->hdr_raw, exts, n, name, buf,
				   s->cluster_size);
	if (ret) {
		ret = sx_error(
			ret, "%s: cannot rewrite the header: %s", img->path,
			ret == -ENOSPC
				? "the backing file name does not fit in the first cluster"
				: strerror(-ret));
		goto out;
	}
	/* One write of cluster 0: the old or the new header, never a mix. */
	ret = sio_pwrite(img->file, buf, s->cluster_size, 0);
	if (!ret)
		ret = sio_fdatasync(img->file);
	if (ret) {
		ret = sx_error(ret, "%s: cannot write the header: %s",
			       img->path, strerror(-ret));
		goto out;
	}
	s->hdr.backing_file_offset = sx_be64(buf + 8);
	s->hdr.backing_file_size = sx_be32(buf + 16);
	memcpy(s->hdr_raw, buf, s->hdr.header_length);
	free_exts(s->exts, s->n_exts);
	s->exts = exts;
	s->n_exts = n;
	exts = NULL;
	free(img->backing_name);
	img->backing_name = new_name;
	new_name = NULL;
	free(img->backing_fmt);
	img->backing_fmt = new_fmt;
	new_fmt = NULL;
out:
	pthread_mutex_unlock(&s->lock);
	free_exts(exts, n);
	free(new_name);
	free(new_fmt);
	sio_buf_free(buf);
	return ret;
}

/*
 * The qcow2 driver: vtable glue (probe, open, close, info) over header.c,
 * cluster.c, l2cache.c, compress.c and refcount.c.
 *
 * open reads cluster 0, validates it, loads the active L1 and the refcount
 * table, sets up the bounded L2 cache and opens the external data file if
 * the image has one. On failure everything it allocated is released and
 * img->backing_name/backing_fmt are reset to NULL, so a failed open needs
 * no close (calling close anyway is harmless). The image-level strings set
 * on success belong to struct img (the chain layer frees them).
 *
 * Opened for writing (img->writable), open also refuses what the write path
 * cannot write (header.c: qcow2_check_writable), sets up the write state
 * (flush.c) and gives the L2 cache its store hook; close flushes first.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "qcow2.h"

static int qcow2_probe(const uint8_t *buf, size_t len)
{
	static const uint8_t magic[4] = {'Q', 'F', 'I', 0xfb};

	if (len >= 4 && !memcmp(buf, magic, 4))
		return 100;
	return 0;
}

int qcow2_refresh_file_size(struct img *img, struct qcow2 *s)
{
	uint64_t size;
	int ret;

	ret = sio_file_size(img->file, &size);
	if (ret)
		return ret;
	if (!s->data_file)
		s->data_file_size = size;
	s->file_size = size;
	if (s->data_file) {
		ret = sio_file_size(s->data_file, &size);
		if (ret)
			return ret;
		s->data_file_size = size;
	}
	return 0;
}

static int l2_load(void *opaque, uint64_t key, void *buf, size_t len)
{
	struct img *img = opaque;

	return sio_pread(img->file, buf, len, key);
}

static void qcow2_close(struct img *img)
{
	struct qcow2 *s = img->priv;

	if (!s)
		return;
	if (s->lock_init)
		pthread_mutex_lock(&s->lock);
	qcow2_write_close(img, s);
	if (s->lock_init)
		pthread_mutex_unlock(&s->lock);
	qcow2_l2cache_fini(&s->l2cache);
	free(s->l1);
	s->l1 = NULL;
	qcow2_refcount_free(s);
	qcow2_snapshots_free(s);
	qcow2_header_free(s);
	sio_file_close(s->data_file);
	s->data_file = NULL;
	free(s->data_file_path);
	s->data_file_path = NULL;
	if (s->lock_init) {
		pthread_mutex_destroy(&s->lock);
		s->lock_init = false;
	}
}

/* The data file name resolves relative to the image's directory. */
static int open_data_file(struct img *img, struct qcow2 *s)
{
	const char *name = s->data_file_name;
	const char *slash = strrchr(img->path, '/');
	unsigned flags = img->writable ? SIO_RDWR : SIO_RDONLY;
	int ret;

	if (name[0] == '/' || !slash)
		s->data_file_path = strdup(name);
	else if (asprintf(&s->data_file_path, "%.*s/%s",
			  (int)(slash - img->path), img->path, name) < 0)
		s->data_file_path = NULL;
	if (!s->data_file_path)
		return -ENOMEM;
	if (img->file && !img->file->direct)
		flags |= SIO_BUFFERED;
	ret = sio_file_open(s->data_file_path, flags, &s->data_file);
	if (ret)
		return sx_error(ret,
				"%s: cannot open external data file %s: %s",
				img->path, s->data_file_path, strerror(-ret));
	return qcow2_refresh_file_size(img, s);
}

static int init_cache(struct img *img, struct qcow2 *s)
{
	size_t slice = sx_min(s->cluster_size, QCOW2_L2CACHE_MAX_SLICE);
	uint64_t nslots = (img->writable ? QCOW2_L2CACHE_WRITE_BYTES
					 : QCOW2_L2CACHE_DEFAULT_BYTES) /
			  slice;
	uint64_t total = s->l1_size * (s->cluster_size / slice);
	int ret;

	/* No more slots than the image can ever have slices. */
	nslots = sx_max(sx_min(nslots, total), QCOW2_L2CACHE_MIN_SLOTS);

	ret = qcow2_l2cache_init(&s->l2cache, slice, (uint32_t)nslots, l2_load,
				 img->writable ? qcow2_l2_store : NULL, img);
	if (ret == 0 && img->writable)
		s->l2cache.store_many = qcow2_l2_store_many;
	return ret;
}

static int qcow2_open(struct img *img)
{
	struct qcow2 *s = img->priv;
	uint64_t file_size, len;
	uint8_t *buf = NULL;
	int ret;

	memset(s, 0, sizeof(*s));
	ret = pthread_mutex_init(&s->lock, NULL);
	if (ret)
		return -ret;
	s->lock_init = true;

	ret = sio_file_size(img->file, &file_size);
	if (ret)
		goto out;
	/*
	 * Cluster 0 holds header, extensions and backing name: read it all,
	 * in a buffer of the cluster's size (not the largest one's: 2 MiB
	 * for every open cost an mmap, and under ASan its shadow).
	 */
	buf = malloc(512);
	if (!buf) {
		ret = -ENOMEM;
		goto out;
	}
	len = sx_min(file_size, 512);
	ret = sio_pread(img->file, buf, len, 0);
	if (ret)
		goto out;
	if (len >= 24) {
		uint32_t bits = ((uint32_t)buf[20] << 24) |
				((uint32_t)buf[21] << 16) |
				((uint32_t)buf[22] << 8) | buf[23];
		uint8_t *big;

		if (bits >= QCOW2_MIN_CLUSTER_BITS &&
		    bits <= QCOW2_MAX_CLUSTER_BITS &&
		    sx_min(file_size, 1ull << bits) > len) {
			len = sx_min(file_size, 1ull << bits);
			big = realloc(buf, len);
			if (!big) {
				ret = -ENOMEM;
				goto out;
			}
			buf = big;
			ret = sio_pread(img->file, buf, len, 0);
			if (ret)
				goto out;
		}
	}
	ret = qcow2_parse_header(img, s, buf, len, file_size);
	if (ret)
		goto out;
	ret = qcow2_snapshots_load(img, s);
	if (ret)
		goto out;
	if (img->writable) {
		ret = qcow2_check_writable(img, s);
		if (ret)
			goto out;
	}
	ret = qcow2_load_l1(img, s);
	if (ret)
		goto out;
	ret = qcow2_refcount_init(img, s);
	if (ret)
		goto out;
	ret = init_cache(img, s);
	if (ret)
		goto out;
	if (s->hdr.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) {
		ret = open_data_file(img, s);
		if (ret)
			goto out;
	}
	if (img->writable)
		ret = qcow2_write_open(img, s);
out:
	free(buf);
	if (ret) {
		qcow2_close(img);
		free(img->backing_name);
		img->backing_name = NULL;
		free(img->backing_fmt);
		img->backing_fmt = NULL;
	}
	return ret;
}

static void add_item(struct img_info_item *items, int n, int *i,
		     const char *key, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

static void add_item(struct img_info_item *items, int n, int *i,
		     const char *key, const char *fmt, ...)
{
	va_list ap;

	if (*i >= n)
		return;
	snprintf(items[*i].key, sizeof(items[*i].key), "%s", key);
	va_start(ap, fmt);
	vsnprintf(items[*i].value, sizeof(items[*i].value), fmt, ap);
	va_end(ap);
	(*i)++;
}

/* "0 (dirty), 4 (extended_l2)" for the set bits of one feature class. */
static void feature_list(const struct qcow2 *s, unsigned type, uint64_t bits,
			 char *out, size_t size)
{
	size_t used = 0;
	unsigned b;

	snprintf(out, size, "none");
	for (b = 0; b < 64 && used < size; b++) {
		const char *name;
		int n;

		if (!(bits & (1ull << b)))
			continue;
		name = qcow2_feature_name(s, type, b);
		n = snprintf(out + used, size - used, "%s%u (%s)",
			     used ? ", " : "", b, name ? name : "unknown");
		if (n < 0)
			break;
		used += (size_t)n;
	}
}

static int qcow2_info(struct img *img, struct img_info_item *items, int n)
{
	const struct qcow2 *s = img->priv;
	const struct qcow2_header *h = &s->hdr;
	char list[208];
	size_t e;
	int i = 0;

	add_item(items, n, &i, "version", "%u", h->version);
	add_item(items, n, &i, "compat", "%s",
		 h->version >= 3 ? "1.1" : "0.10");
	add_item(items, n, &i, "cluster_size", "%llu",
		 (unsigned long long)s->cluster_size);
	add_item(items, n, &i, "refcount_bits", "%u", 1u << h->refcount_order);
	add_item(items, n, &i, "compression_type", "%s",
		 h->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd"
							       : "zlib");
	feature_list(s, 0, h->incompatible_features, list, sizeof(list));
	add_item(items, n, &i, "incompatible_features", "%s", list);
	feature_list(s, 1, h->compatible_features, list, sizeof(list));
	add_item(items, n, &i, "compatible_features", "%s", list);
	feature_list(s, 2, h->autoclear_features, list, sizeof(list));
	add_item(items, n, &i, "autoclear_features", "%s", list);
	add_item(items, n, &i, "extended_l2", "%s",
		 s->extended_l2 ? "true" : "false");
	add_item(items, n, &i, "dirty", "%s", s->dirty ? "true" : "false");
	add_item(items, n, &i, "corrupt", "%s", s->corrupt ? "true" : "false");
	add_item(items, n, &i, "lazy_refcounts", "%s",
		 h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS
			 ? "true"
			 : "false");
	if (s->data_file_name)
		add_item(items, n, &i, "data_file", "%s%s", s->data_file_name,
			 h->autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW
				 ? " (raw)"
				 : "");
	add_item(items, n, &i, "snapshots", "%u", h->nb_snapshots);
	if (i < n)
		i += qcow2_bitmaps_info(img, s, items + i, n - i);
	add_item(items, n, &i, "l1_size", "%llu",
		 (unsigned long long)s->l1_size);
	add_item(items, n, &i, "header_extensions", "%zu", s->n_exts);
	for (e = 0; e < s->n_exts; e++) {
		switch (s->exts[e].magic) {
		case QCOW2_EXT_BACKING_FMT:
		case QCOW2_EXT_FEATURE_TABLE:
		case QCOW2_EXT_BITMAPS:
		case QCOW2_EXT_CRYPTO:
		case QCOW2_EXT_DATA_FILE:
			break;
		default:
			add_item(items, n, &i, "unknown_extension",
				 "0x%08x (%u bytes)", s->exts[e].magic,
				 s->exts[e].len);
		}
	}
	return i;
}

const struct img_driver img_driver_qcow2 = {
	.name = "qcow2",
	.priv_size = sizeof(struct qcow2),
	.probe = qcow2_probe,
	.open = qcow2_open,
	.close = qcow2_close,
	.block_status = qcow2_block_status,
	.read_compressed = qcow2_read_compressed,
	.info = qcow2_info,
	.snapshots = qcow2_snapshots,
	.alloc_run = qcow2_alloc_run,
	.commit_run = qcow2_commit_run,
	.release_run = qcow2_release_run,
	.pwrite = qcow2_pwrite,
	.write_zeroes = qcow2_write_zeroes,
	.discard = qcow2_discard,
	.set_backing = qcow2_set_backing,
	.flush = qcow2_flush,
	.create = qcow2_create,
	.meta_want = qcow2_meta_want,
	.meta_fill = qcow2_meta_fill,
	.flush_start = qcow2_flush_start,
	.flush_wait = qcow2_flush_wait,
	.block_status_nowait = qcow2_block_status_nowait,
	.prepare_write = qcow2_prepare_write,
	.prepare_discard = qcow2_prepare_discard,
	.check = qcow2_check,
	.mark_dirty = qcow2_mark_dirty,
};

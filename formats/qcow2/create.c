/*
 * Creating an empty qcow2 image.
 *
 * Layout, as qemu lays it out: cluster 0 the header, then the refcount
 * table, the refcount blocks that cover the metadata, then the L1 table.
 * The refcount table and blocks are sized together by a fixpoint, since
 * more metadata clusters may need more refcount blocks, which may need a
 * larger table (e.g. 512-byte clusters with 64-bit refcounts).
 *
 * The file is extended with ftruncate first, so the L1 table and unused
 * refcount entries read as zeros without being written, and cluster 0 is
 * written last: a crash during creation leaves no valid-looking image.
 */
#define _GNU_SOURCE
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

#define QCOW2_DEFAULT_CLUSTER_BITS 16
#define QCOW2_V3_CREATE_HEADER_LEN 112 /* with compression type, padded */

struct feature_name {
	uint8_t type;
	uint8_t bit;
	const char *name;
};

/* The names qemu writes, so tools show them in errors. */
static const struct feature_name feature_names[] = {
	{0, 0, "dirty bit"},
	{0, 1, "corrupt bit"},
	{0, 2, "external data file"},
	{0, 3, "compression type"},
	{0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"},
	{2, 1, "raw external data"},
};

#define N_FEATURES (sizeof(feature_names) / sizeof(feature_names[0]))

static int log2_exact(uint64_t v)
{
	int b = 0;

	if (!sx_is_pow2(v))
		return -1;
	while ((1ull << b) != v)
		b++;
	return b;
}

int qcow2_create(struct sio_file *f, const struct img_create_opts *o)
{
	struct qcow2_header h = {0};
	struct qcow2_ext exts[2];
	uint8_t ftable[N_FEATURES * 48];
	size_t n_exts = 0, i;
	uint64_t cs, l2_entries, l1_size, l1c, rt = 1, rb = 1, meta, rb_entries;
	uint64_t rt_off, rb_off, l1_off, span;
	uint8_t *buf = NULL;
	int cbits, rbits_order, ret;

	cs = o->cluster_size ? o->cluster_size
			     : 1u << QCOW2_DEFAULT_CLUSTER_BITS;
	cbits = log2_exact(cs);
	if (cbits < (int)QCOW2_MIN_CLUSTER_BITS ||
	    cbits > (int)QCOW2_MAX_CLUSTER_BITS)
		return sx_error(
			EINVAL,
			"%s: cluster size must be a power of two from 512 to 2M",
			f->path);
	rbits_order = log2_exact(o->refcount_bits ? o->refcount_bits : 16);
	if (rbits_order < 0 || rbits_order > 6)
		return sx_error(
			EINVAL,
			"%s: refcount bits must be a power of two from 1 to 64",
			f->path);
	if (o->compat_v2 &&
	    (rbits_order != 4 || o->extended_l2 || o->lazy_refcounts))
		return sx_error(
			EINVAL,
			"%s: compat=0.10 allows neither refcount_bits other than 16, extended_l2 nor lazy_refcounts",
			f->path);
	if (o->extended_l2 && cbits < (int)QCOW2_MIN_EXT_L2_CLUSTER_BITS)
		return sx_error(
			EINVAL,
			"%s: extended_l2 needs a cluster size of at least 16k",
			f->path);
	if (o->backing_fmt && !o->backing)
		return sx_error(EINVAL,
				"%s: a backing format needs a backing file",
				f->path);

	l2_entries = cs / (o->extended_l2 ? 16 : 8);
	span = cs * l2_entries;
	l1_size = o->size / span + (o->size % span != 0);
	if (l1_size * 8 > QCOW2_MAX_L1_BYTES)
		return sx_error(
			EFBIG,
			"%s: size too large for cluster size %llu (L1 table over %u MiB)",
			f->path, (unsigned long long)cs,
			QCOW2_MAX_L1_BYTES >> 20);
	l1c = l1_size * 8 / cs + ((l1_size * 8) % cs != 0);
	if (!l1c)
		l1c = 1;

	/* Refcount table and blocks that cover all metadata, themselves too. */
	rb_entries = cs * 8 / (1u << rbits_order);
	for (;;) {
		uint64_t nrb, nrt;

		meta = 1 + rt + rb + l1c;
		nrb = meta / rb_entries + (meta % rb_entries != 0);
		nrt = nrb * 8 / cs + ((nrb * 8) % cs != 0);
		if (nrb == rb && nrt == rt)
			break;
		rb = nrb;
		rt = nrt;
	}
	rt_off = cs;
	rb_off = rt_off + rt * cs;
	l1_off = rb_off + rb * cs;

	buf = sio_buf_alloc((rt + rb) * cs);
	if (!buf)
		return sx_error(ENOMEM, "%s: out of memory", f->path);
	memset(buf, 0, (rt + rb) * cs);
	for (i = 0; i < rb; i++)
		sx_put_be64(buf + i * 8, rb_off + i * cs);
	for (i = 0; i < meta; i++)
		qcow2_refcount_entry_set(buf + rt * cs, (unsigned)rbits_order,
					 i, 1);

	ret = sio_file_truncate(f, 0);
	if (ret == 0)
		ret = sio_file_truncate(f, l1_off + l1c * cs);
	if (ret == 0)
		ret = sio_pwrite(f, buf, (rt + rb) * cs, rt_off);
	if (ret < 0)
		goto out;

	h.version = o->compat_v2 ? 2 : 3;
	h.cluster_bits = (uint32_t)cbits;
	h.size = o->size;
	h.l1_size = (uint32_t)l1_size;
	h.l1_table_offset = l1_off;
	h.refcount_table_offset = rt_off;
	h.refcount_table_clusters = (uint32_t)rt;
	h.refcount_order = (uint32_t)rbits_order;
	h.header_length =
		o->compat_v2 ? QCOW2_V2_HEADER_LEN : QCOW2_V3_CREATE_HEADER_LEN;
	if (o->extended_l2)
		h.incompatible_features |= QCOW2_INCOMPAT_EXTL2;
	if (o->lazy_refcounts)
		h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;

	if (o->backing_fmt) {
		exts[n_exts].magic = QCOW2_EXT_BACKING_FMT;
		exts[n_exts].len = (uint32_t)strlen(o->backing_fmt);
		exts[n_exts].data = (uint8_t *)o->backing_fmt;
		n_exts++;
	}
	if (!o->compat_v2) {
		memset(ftable, 0, sizeof(ftable));
		for (i = 0; i < N_FEATURES; i++) {
			ftable[i * 48] = feature_names[i].type;
			ftable[i * 48 + 1] = feature_names[i].bit;
			strncpy((char *)ftable + i * 48 + 2,
				feature_names[i].name, 46);
		}
		exts[n_exts].magic = QCOW2_EXT_FEATURE_TABLE;
		exts[n_exts].len = sizeof(ftable);
		exts[n_exts].data = ftable;
		n_exts++;
	}
	memset(buf, 0, cs);
	ret = qcow2_build_cluster0(&h, NULL, exts, n_exts, o->backing, buf, cs);
	if (ret == -ENOSPC && !o->compat_v2) {
		/*
		 * The feature-name table is a courtesy: leave it out where it
		 * does not fit (512-byte clusters with a backing file), as
		 * qemu does.
		 */
		ret = qcow2_build_cluster0(&h, NULL, exts, n_exts - 1,
					   o->backing, buf, cs);
	}
	if (ret < 0) {
		char why[SX_ERROR_MAX];

		snprintf(why, sizeof(why), "%s", sx_last_error());
		sx_error(ret, "%s: %s", f->path, why);
		goto out;
	}
	ret = sio_pwrite(f, buf, cs, 0);
	if (ret == 0)
		ret = sio_fsync(f);
out:
	sio_buf_free(buf);
	return ret;
}

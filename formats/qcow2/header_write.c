/*
 * Building cluster 0: the header, its extensions and the backing file name.
 *
 * The header is always rewritten as a whole first cluster in one write, so
 * a crash leaves either the old or the new header, never a mix (a cluster
 * write of at most one device block is atomic in practice; qemu relies on
 * the same). Fields the writer does not know are preserved: the caller
 * passes the raw header bytes as read (trailing unknown fields included)
 * and every extension it does not rewrite, verbatim and in order.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <string.h>

#include "common/bytes.h"
#include "common/error.h"
#include "qcow2.h"

static size_t pad8(size_t v)
{
	return (v + 7) & ~(size_t)7;
}

int qcow2_build_cluster0(const struct qcow2_header *h, const uint8_t *hdr_raw,
			 const struct qcow2_ext *exts, size_t n_exts,
			 const char *backing, uint8_t *buf, size_t cs)
{
	size_t hlen = h->version >= 3 ? h->header_length : QCOW2_V2_HEADER_LEN;
	size_t pos, blen = backing ? strlen(backing) : 0, i;

	if (hlen < (h->version >= 3 ? QCOW2_V3_HEADER_LEN
				    : QCOW2_V2_HEADER_LEN) ||
	    hlen > cs)
		return sx_error(EINVAL, "qcow2: bad header length %zu", hlen);
	if (blen > QCOW2_MAX_BACKING_NAME)
		return sx_error(ENAMETOOLONG,
				"backing file name longer than %u bytes",
				QCOW2_MAX_BACKING_NAME);
	memset(buf, 0, cs);
	if (hdr_raw)
		memcpy(buf, hdr_raw, hlen);

	/* Extensions, then the end marker, then the backing name. */
	pos = hlen;
	for (i = 0; i < n_exts; i++) {
		if (exts[i].magic == QCOW2_EXT_END)
			continue;
		if (pos + 8 + pad8(exts[i].len) + 8 + blen > cs)
			goto nospace;
		sx_put_be32(buf + pos, exts[i].magic);
		sx_put_be32(buf + pos + 4, exts[i].len);
		if (exts[i].len)
			memcpy(buf + pos + 8, exts[i].data, exts[i].len);
		pos += 8 + pad8(exts[i].len);
	}
	if (pos + 8 + blen > cs)
		goto nospace;
	pos += 8; /* end marker: already zero */

	sx_put_be32(buf + 0, QCOW2_MAGIC);
	sx_put_be32(buf + 4, h->version);
	sx_put_be64(buf + 8, blen ? pos : 0);
	sx_put_be32(buf + 16, (uint32_t)blen);
	if (blen)
		memcpy(buf + pos, backing, blen);
	sx_put_be32(buf + 20, h->cluster_bits);
	sx_put_be64(buf + 24, h->size);
	sx_put_be32(buf + 32, h->crypt_method);
	sx_put_be32(buf + 36, h->l1_size);
	sx_put_be64(buf + 40, h->l1_table_offset);
	sx_put_be64(buf + 48, h->refcount_table_offset);
	sx_put_be32(buf + 56, h->refcount_table_clusters);
	sx_put_be32(buf + 60, h->nb_snapshots);
	sx_put_be64(buf + 64, h->snapshots_offset);
	if (h->version >= 3) {
		sx_put_be64(buf + 72, h->incompatible_features);
		sx_put_be64(buf + 80, h->compatible_features);
		sx_put_be64(buf + 88, h->autoclear_features);
		sx_put_be32(buf + 96, h->refcount_order);
		sx_put_be32(buf + 100, (uint32_t)hlen);
		if (hlen > QCOW2_V3_HEADER_LEN)
			buf[104] = h->compression_type;
	}
	return 0;
nospace:
	return sx_error(
		ENOSPC,
		"the header, its extensions and the backing file name do not fit in the first cluster (%zu bytes)",
		cs);
}

/*
 * qcow2 refcounts: geometry, the refcount table, and reading one refcount.
 *
 * refcount_bits = 1 << refcount_order (1..64). Entries of 8 bits or more are
 * big-endian; narrower ones are packed LSB-first within each byte. The
 * table is contiguous, loaded whole at open (bounded like qemu does at 8 MiB)
 * and kept host-endian; a table entry of 0 means the whole block is free.
 *
 * The write path will extend this file (allocation, refcount updates in the
 * crash-consistent order of QCOW2-NOTES.md): the entry accessors below work
 * on a block in on-disk layout in both directions for that reason.
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

void qcow2_refcount_free(struct qcow2 *s)
{
	free(s->rc.table);
	s->rc.table = NULL;
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

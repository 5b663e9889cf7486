/*
 * qcow2 internal snapshots: the snapshot table read at open (the list
 * `siphon info` shows, and the ranges the overlap check protects).
 *
 * The table is never rewritten here: a writer keeps it byte for byte and
 * makes the active layer's writes copy-on-write wherever a cluster or an
 * L2 table is shared with a snapshot (cluster.c l2_table_for_write,
 * write.c write_cluster), so each snapshot keeps reading as it did.
 *
 * A table that cannot be read whole (an entry past the end of the file,
 * an L1 table out of range) does not fail a read-only open, as the data
 * of the active layer is still readable and `siphon check` must be able
 * to report it; s->snap_bad says why, and a read-write open is refused
 * (qcow2_check_writable), since the snapshots could not be protected.
 *
 * Entry layout (spec): l1_table_offset u64, l1_size u32, id_len u16,
 * name_len u16, date_sec u32, date_nsec u32, vm_clock_nsec u64,
 * vm_state_size u32, extra_size u32, then extra data (vm_state_size_large
 * u64, disk_size u64, icount u64 as far as present), the id, the name,
 * padding to a multiple of 8.
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

#define ENTRY_FIXED 40u
/* qemu writes 24 bytes of extra data and reads at most 1024. */
#define MAX_EXTRA 1024u

static void set_bad(struct qcow2 *s, uint32_t i, const char *fmt, uint64_t a)
{
	snprintf(s->snap_bad, sizeof(s->snap_bad), "snapshot %u of %u: ", i + 1,
		 s->hdr.nb_snapshots);
	snprintf(s->snap_bad + strlen(s->snap_bad),
		 sizeof(s->snap_bad) - strlen(s->snap_bad), fmt,
		 (unsigned long long)a);
}

/* Read bytes [pos, pos + len) of the table, or say why not. */
static int read_part(struct img *img, struct qcow2 *s, uint32_t i, void *buf,
		     uint64_t len, uint64_t pos)
{
	int ret;

	if (!sx_range_within(pos, len, s->file_size)) {
		set_bad(s, i, "entry at 0x%llx runs past the end of the file",
			pos);
		return 1;
	}
	ret = sio_pread(img->file, buf, len, pos);
	if (ret)
		return sx_error(ret, "%s: cannot read the snapshot table: %s",
				img->path, strerror(-ret));
	return 0;
}

/* Entry i at *pos: parsed into s->snaps[s->n_snaps], *pos moved past it. */
static int load_one(struct img *img, struct qcow2 *s, uint32_t i, uint64_t *pos)
{
	struct qcow2_snapshot *sn = &s->snaps[s->n_snaps];
	uint8_t e[ENTRY_FIXED], *var;
	uint64_t l1_off, var_len, end, l1_bytes;
	uint32_t l1_size, extra, id_len, name_len;
	int ret;

	ret = read_part(img, s, i, e, sizeof(e), *pos);
	if (ret)
		return ret;
	l1_off = sx_be64(e);
	l1_size = (uint32_t)sx_be32(e + 8);
	id_len = (uint32_t)sx_be16(e + 12);
	name_len = (uint32_t)sx_be16(e + 14);
	extra = (uint32_t)sx_be32(e + 36);
	if (extra > MAX_EXTRA) {
		set_bad(s, i, "%llu bytes of extra data (at most 1024)", extra);
		return 1;
	}
	var_len = (uint64_t)extra + id_len + name_len;
	var = malloc(var_len + 1);
	if (!var)
		return -ENOMEM;
	ret = read_part(img, s, i, var, var_len, *pos + sizeof(e));
	if (ret)
		goto out;
	ret = 1;
	l1_bytes = (uint64_t)l1_size * 8;
	if (l1_bytes > QCOW2_MAX_L1_BYTES ||
	    !sx_is_aligned(l1_off, s->cluster_size) ||
	    !sx_range_within(l1_off, l1_bytes, s->file_size)) {
		set_bad(s, i,
			"L1 table at 0x%llx is unaligned, too large or past the end of the file",
			l1_off);
		goto out;
	}
	sn->l1_offset = l1_off;
	sn->l1_size = l1_size;
	sn->pub.date_sec = sx_be32(e + 16);
	sn->pub.date_nsec = (uint32_t)sx_be32(e + 20);
	sn->pub.vm_clock_nsec = sx_be64(e + 24);
	sn->pub.vm_state_size = sx_be32(e + 32);
	sn->pub.disk_size = UINT64_MAX;
	sn->pub.icount = UINT64_MAX;
	if (extra >= 8)
		sn->pub.vm_state_size = sx_be64(var);
	if (extra >= 16)
		sn->pub.disk_size = sx_be64(var + 8);
	if (extra >= 24)
		sn->pub.icount = sx_be64(var + 16);
	sn->id = strndup((char *)var + extra, id_len);
	sn->name = strndup((char *)var + extra + id_len, name_len);
	if (!sn->id || !sn->name) {
		ret = -ENOMEM;
		goto out;
	}
	sn->pub.id = sn->id;
	sn->pub.name = sn->name;
	end = *pos + sizeof(e) + var_len;
	*pos = (end + 7) & ~7ull;
	s->n_snaps++;
	ret = 0;
out:
	free(var);
	return ret;
}

int qcow2_snapshots_load(struct img *img, struct qcow2 *s)
{
	uint64_t pos = s->hdr.snapshots_offset, n;
	uint32_t i;
	int ret = 0;

	s->snap_bad[0] = '\0';
	if (!s->hdr.nb_snapshots)
		return 0;
	/* No more entries than the file holds (40 bytes each at least). */
	n = pos < s->file_size ? (s->file_size - pos) / ENTRY_FIXED : 0;
	n = sx_min(n, s->hdr.nb_snapshots);
	s->snaps = calloc(sx_max(n, 1), sizeof(*s->snaps));
	if (!s->snaps)
		return -ENOMEM;
	for (i = 0; i < s->hdr.nb_snapshots; i++) {
		if (i == n) {
			set_bad(s, i,
				"entry at 0x%llx runs past the end of the file",
				pos);
			break;
		}
		ret = load_one(img, s, i, &pos);
		if (ret)
			break;
	}
	s->snap_table_bytes = pos - s->hdr.snapshots_offset;
	return ret < 0 ? ret : 0;
}

void qcow2_snapshots_free(struct qcow2 *s)
{
	uint32_t i;

	for (i = 0; i < s->n_snaps; i++) {
		free(s->snaps[i].id);
		free(s->snaps[i].name);
	}
	free(s->snaps);
	s->snaps = NULL;
	s->n_snaps = 0;
}

int qcow2_snapshots(struct img *img, struct img_snapshot *out, int n)
{
	const struct qcow2 *s = img->priv;
	uint32_t i;

	for (i = 0; i < s->n_snaps && (int)i < n; i++)
		out[i] = s->snaps[i].pub;
	return (int)s->n_snaps;
}

bool qcow2_snapshots_overlap(const struct qcow2 *s, uint64_t off, uint64_t len,
			     const char **hit)
{
	uint32_t i;

	if (s->snap_table_bytes &&
	    off < s->hdr.snapshots_offset + s->snap_table_bytes &&
	    s->hdr.snapshots_offset < off + len) {
		*hit = "snapshot table";
		return true;
	}
	for (i = 0; i < s->n_snaps; i++) {
		uint64_t a = s->snaps[i].l1_offset;
		uint64_t b = a + (uint64_t)s->snaps[i].l1_size * 8;

		if (b > a && off < b && a < off + len) {
			*hit = "L1 table of a snapshot";
			return true;
		}
	}
	return false;
}

/*
 * `siphon map`: the allocation map of a whole chain.
 *
 * The JSON output is byte-for-byte that of `qemu-img map --output=json`
 * (qemu 7.2) so either can be the oracle for the other: one entry per line,
 * walked top down, "offset" only where the host offset is known, adjacent
 * entries merged when depth/present/zero/data agree and their offsets (if
 * any) are contiguous. The status -> flags rules are in map_entry_at().
 *
 * One qemu quirk is reproduced on purpose: where the driver says a data run
 * is worth refining (ext.host_refine: qcow2 files that look metadata-
 * preallocated), the host file is asked too, and a hole there reads as
 * zeros ("zero": true, "data": true) with the run clipped to the hole.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd.h"
#include "cmd.h"

/* qemu-img asks at most 1 GiB at a time; merging hides the difference. */
#define MAP_STEP (1ULL << 30)

struct map_entry {
	uint64_t start;
	uint64_t len;
	uint64_t offset;
	unsigned depth;
	bool present;
	bool zero;
	bool data;
	bool has_offset;
	const char *file; /* path of the file holding offset, or NULL */
};

struct map_state {
	struct img *img;
};

/* The first entry at off, from the chain's status. */
static int map_entry_at(struct map_state *ms, uint64_t off,
			struct map_entry *me)
{
	struct img *img = ms->img;
	struct img_extent e;
	unsigned depth;
	int ret;

	ret = img_chain_status(img, NULL, off,
			       sx_min(img->size - off, MAP_STEP), &e, &depth);
	if (ret < 0)
		return ret;
	memset(me, 0, sizeof(*me));
	me->start = off;
	me->len = e.len;
	me->depth = depth;
	switch (e.status) {
	case IMG_DATA:
		me->present = true;
		me->data = true;
		me->has_offset = e.host_valid;
		/* What the host file says (see the top comment). */
		if (e.host_valid && e.file && e.host_refine &&
		    img_host_hole(e.file, e.host_off, &me->len))
			me->zero = true;
		break;
	case IMG_COMPRESSED:
		/* qemu knows no single host offset for compressed data. */
		me->present = true;
		me->data = true;
		break;
	case IMG_ZERO:
		me->present = true;
		me->zero = true;
		/* Zeros an NBD export stores: qemu calls them data. */
		me->data = e.zero_data;
		me->has_offset = e.host_valid;
		break;
	case IMG_UNALLOC:
	default:
		/* Nothing in the chain: reads as zeros, present in no layer. */
		me->zero = true;
		break;
	}
	if (me->has_offset) {
		me->offset = e.host_off;
		me->file = e.file ? e.file->path : NULL;
	}
	return 0;
}

static bool mergeable(const struct map_entry *a, const struct map_entry *b)
{
	if (!a->len)
		return false;
	if (a->depth != b->depth || a->present != b->present ||
	    a->zero != b->zero || a->data != b->data ||
	    a->has_offset != b->has_offset)
		return false;
	if (a->has_offset && a->offset + a->len != b->offset)
		return false;
	return true;
}

static void print_json(const struct map_entry *me, bool first)
{
	if (!first)
		printf(",\n");
	printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
	       ", \"depth\": %u, \"present\": %s, \"zero\": %s, \"data\": %s",
	       me->start, me->len, me->depth, me->present ? "true" : "false",
	       me->zero ? "true" : "false", me->data ? "true" : "false");
	if (me->has_offset)
		printf(", \"offset\": %" PRIu64, me->offset);
	putchar('}');
}

static void print_entry(const struct map_entry *me, enum tool_output out,
			bool first)
{
	char start[24], len[24], off[24] = "-";

	if (out == TOOL_OUT_JSON) {
		print_json(me, first);
		return;
	}
	if (first)
		printf("%-18s %-18s %5s  %-7s %-5s %-5s %-18s %s\n", "start",
		       "length", "depth", "present", "zero", "data", "offset",
		       "file");
	snprintf(start, sizeof(start), "0x%" PRIx64, me->start);
	snprintf(len, sizeof(len), "0x%" PRIx64, me->len);
	if (me->has_offset)
		snprintf(off, sizeof(off), "0x%" PRIx64, me->offset);
	printf("%-18s %-18s %5u  %-7s %-5s %-5s %-18s %s\n", start, len,
	       me->depth, me->present ? "yes" : "no", me->zero ? "yes" : "no",
	       me->data ? "yes" : "no", off,
	       me->file ? me->file : (me->has_offset ? "" : "-"));
}

static int map_image(struct img *img, bool probed, enum tool_output out)
{
	(void)probed; /* map looks the same either way */
	struct map_entry cur = {0}, next;
	struct map_state ms = {.img = img};
	bool first = true;
	int ret;

	if (out == TOOL_OUT_JSON)
		putchar('[');
	while (cur.start + cur.len < img->size) {
		ret = map_entry_at(&ms, cur.start + cur.len, &next);
		if (ret < 0)
			goto out;
		if (mergeable(&cur, &next)) {
			cur.len += next.len;
			continue;
		}
		if (cur.len) {
			print_entry(&cur, out, first);
			first = false;
		}
		cur = next;
	}
	/* Like qemu-img, an empty image still gets its one empty entry. */
	print_entry(&cur, out, first);
	ret = 0;
out:
	if (out == TOOL_OUT_JSON)
		printf(ret < 0 ? "\n" : "]\n");
	return ret;
}

static void map_help(FILE *f)
{
	fprintf(f,
		"Usage: siphon map [-f FMT] [--output=human|json] IMAGE\n\n"
		"Print the allocation map of IMAGE and its backing chain: for "
		"each run of\nguest bytes, the layer that decides it (depth, 0 "
		"= IMAGE), whether a layer\nholds it (present), whether it "
		"reads as zeros, whether it is data, and\nwhere it lives in "
		"that layer's file (offset, when known).\n"
		"--output=json prints exactly what `qemu-img map "
		"--output=json` prints.\n\n"
		"Options:\n"
		"  -f, --format FMT    IMAGE is in format FMT (qcow2, raw) "
		"instead of probed\n"
		"      --output=OUT    human (default) or json\n"
		"  -h, --help          this help\n\n%s",
		tool_exit_help);
}

static int map_run(const struct siphon_cmd *cmd, int argc, char **argv)
{
	return tool_run_on_image(cmd, argc, argv, map_image);
}

const struct siphon_cmd cmd_map = {
	.name = "map",
	.summary = "print the allocation map of an image chain",
	.run = map_run,
	.help = map_help,
};

/*
 * `siphon info`: what an image and each layer of its backing chain are:
 * format (and whether it was probed), sizes, format-specific facts, how each
 * file is accessed (O_DIRECT or buffered) and how much each layer holds.
 *
 * "allocated" counts the guest bytes a layer itself maps to data (its own
 * block_status, not the chain's); "disk size" is what the file occupies on
 * disk (st_blocks).
 *
 * An NBD layer (io/nbd.h) has no file on this host: instead of a disk size
 * it shows the export (canonical URI, server, export name, size) and what
 * the server offers (multi-conn, base:allocation block status, block
 * sizes), from sio_nbd_get_info().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd.h"
#include "cmd.h"
#include "json.h"

#define MAX_INFO_ITEMS 64

struct layer_info {
	uint64_t allocated; /* guest bytes mapped to data in this layer */
	uint64_t compressed; /* guest bytes in compressed clusters */
	uint64_t disk_size; /* st_blocks * 512; 0 for an NBD layer */
	bool probed;
	bool nbd; /* an NBD export: nbd is valid, disk_size is not */
	struct sio_nbd_info nbdi;
	struct img_info_item items[MAX_INFO_ITEMS];
	int nitems;
	struct img_snapshot *snaps; /* malloc'ed: nsnaps of them */
	int nsnaps;
};

/* The layer's internal snapshots (malloc'ed), or NULL: none, or -errno. */
static int snapshots_of(struct img *img, struct img_snapshot **out)
{
	int n = img_snapshots(img, NULL, 0), got;

	*out = NULL;
	if (n <= 0)
		return n;
	*out = calloc((size_t)n, sizeof(**out));
	if (!*out)
		return -ENOMEM;
	got = img_snapshots(img, *out, n);
	return got < n ? got : n;
}

static int layer_scan(struct img *img, bool probed, struct layer_info *li)
{
	uint64_t off = 0;
	struct stat st;
	int ret;

	free(li->snaps);
	memset(li, 0, sizeof(*li));
	li->probed = probed;
	while (off < img->size) {
		struct img_extent e;

		ret = img_block_status(img, off, img->size - off, &e);
		if (ret < 0)
			return ret;
		if (e.status == IMG_DATA)
			li->allocated += e.len;
		else if (e.status == IMG_COMPRESSED)
			li->compressed += e.len;
		off += e.len;
	}
	if (sio_file_is_nbd(img->file)) {
		li->nbd = true;
		ret = sio_nbd_get_info(img->file, &li->nbdi);
		if (ret < 0)
			return sx_error(ret, "%s: no NBD information",
					img->path);
	} else if (fstat(img->file->fd, &st) < 0) {
		return sx_error(-errno, "%s: fstat: %s", img->path,
				strerror(errno));
	} else {
		li->disk_size = (uint64_t)st.st_blocks * 512;
	}
	li->nitems = img_get_info(img, li->items, MAX_INFO_ITEMS);
	if (li->nitems < 0)
		return li->nitems;
	if (li->nitems > MAX_INFO_ITEMS)
		li->nitems = MAX_INFO_ITEMS;
	li->nsnaps = snapshots_of(img, &li->snaps);
	return li->nsnaps < 0 ? li->nsnaps : 0;
}

/* s for a terminal: control bytes shown as '?', at most max bytes. */
static void printable(const char *s, char *out, size_t size)
{
	size_t i;

	for (i = 0; s[i] && i + 1 < size; i++)
		out[i] =
			(unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
	out[i] = '\0';
}

/* The table qemu-img snapshot -l prints, indented. */
static void human_snapshots(const char *in, const struct img_snapshot *sn,
			    int n)
{
	char id[64], name[256], size[32], date[32], clock[32], icount[24];
	uint64_t ms, secs;
	struct tm tm;
	time_t t;
	int i;

	printf("%ssnapshot list:\n", in);
	printf("%s    %-9s %-16s %8s%20s%13s%11s\n", in, "ID", "TAG", "VM SIZE",
	       "DATE", "VM CLOCK", "ICOUNT");
	for (i = 0; i < n; i++) {
		printable(sn[i].id, id, sizeof(id));
		printable(sn[i].name, name, sizeof(name));
		tool_human_size(sn[i].vm_state_size, size, sizeof(size));
		t = (time_t)sn[i].date_sec;
		if (localtime_r(&t, &tm))
			strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
		else
			snprintf(date, sizeof(date), "?");
		ms = sn[i].vm_clock_nsec / 1000000;
		secs = ms / 1000;
		snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02u:%02u.%03u",
			 secs / 3600, (unsigned)(secs / 60 % 60),
			 (unsigned)(secs % 60), (unsigned)(ms % 1000));
		if (sn[i].icount == UINT64_MAX)
			icount[0] = '\0';
		else
			snprintf(icount, sizeof(icount), "%" PRIu64,
				 sn[i].icount);
		printf("%s    %-9s %-16s %8s%20s%13s%11s\n", in, id, name, size,
		       date, clock, icount);
	}
}

/* The same, with qemu-img info's names. */
static void json_snapshots(struct json_out *j, const struct img_snapshot *sn,
			   int n)
{
	int i;

	json_begin_array(j, "snapshots");
	for (i = 0; i < n; i++) {
		json_begin_object(j, NULL);
		json_str(j, "id", sn[i].id);
		json_str(j, "name", sn[i].name);
		json_u64(j, "vm-state-size", sn[i].vm_state_size);
		json_u64(j, "date-sec", sn[i].date_sec);
		json_u64(j, "date-nsec", sn[i].date_nsec);
		json_u64(j, "vm-clock-sec", sn[i].vm_clock_nsec / 1000000000);
		json_u64(j, "vm-clock-nsec", sn[i].vm_clock_nsec % 1000000000);
		if (sn[i].icount != UINT64_MAX)
			json_u64(j, "icount", sn[i].icount);
		json_end_object(j);
	}
	json_end_array(j);
}

static void print_size_line(const char *indent, const char *what, uint64_t v)
{
	char buf[32];

	printf("%s%s: %s (%" PRIu64 " bytes)\n", indent, what,
	       tool_human_size(v, buf, sizeof(buf)), v);
}

/* The NBD lines of a layer (human output). */
static void human_nbd(const char *in, const struct sio_nbd_info *n)
{
	printf("%snbd uri: %s\n", in, n->uri);
	printf("%snbd server: %s\n", in, n->server);
	printf("%snbd export: '%s'\n", in, n->export_name);
	print_size_line(in, "nbd export size", n->size);
	printf("%snbd multi-conn: %s\n", in, n->can_multi_conn ? "yes" : "no");
	printf("%snbd connections: %u per worker\n", in, n->connections);
	printf("%snbd block status: %s\n", in,
	       n->block_status ? "yes (base:allocation)" : "no");
	printf("%snbd block sizes: min %" PRIu32 ", preferred %" PRIu32
	       ", max %" PRIu32 " (0: not advertised), request %" PRIu32 "\n",
	       in, n->min_block, n->pref_block, n->max_block, n->max_request);
}

static void human_layer(struct img *img, const struct layer_info *li)
{
	const char *in = "    ";
	int i;

	printf("layer %u: %s\n", img->depth, img->path);
	printf("%sformat: %s%s\n", in, img_format(img),
	       li->probed ? " (probed)" : "");
	print_size_line(in, "virtual size", img->size);
	printf("%scluster size: %" PRIu32 "\n", in, img->cluster_size);
	for (i = 0; i < li->nitems; i++)
		printf("%s%s: %s\n", in, li->items[i].key, li->items[i].value);
	if (li->nsnaps)
		human_snapshots(in, li->snaps, li->nsnaps);
	if (img->backing_name)
		printf("%sbacking file: %s%s%s\n", in, img->backing_name,
		       img->backing_fmt ? ", format " : "",
		       img->backing_fmt ? img->backing_fmt : "");
	if (li->nbd)
		printf("%sio: NBD, alignment %" PRIu32 "\n", in,
		       img->file->align);
	else if (img->file->direct)
		printf("%sio: O_DIRECT, alignment %" PRIu32 "\n", in,
		       img->file->align);
	else
		printf("%sio: buffered\n", in);
	if (li->nbd)
		human_nbd(in, &li->nbdi);
	print_size_line(in, "allocated", li->allocated);
	if (li->compressed)
		print_size_line(in, "compressed", li->compressed);
	if (!li->nbd)
		print_size_line(in, "disk size", li->disk_size);
}

static void json_layer(struct json_out *j, struct img *img,
		       const struct layer_info *li)
{
	int i;

	json_begin_object(j, NULL);
	json_u64(j, "depth", img->depth);
	json_str(j, "filename", img->path);
	json_str(j, "format", img_format(img));
	json_bool(j, "format-probed", li->probed);
	json_u64(j, "virtual-size", img->size);
	json_u64(j, "cluster-size", img->cluster_size);
	if (img->backing_name)
		json_str(j, "backing-filename", img->backing_name);
	if (img->backing_fmt)
		json_str(j, "backing-format", img->backing_fmt);
	json_begin_object(j, "io");
	json_bool(j, "direct", img->file->direct);
	json_u64(j, "alignment", img->file->align);
	json_end_object(j);
	if (li->nbd) {
		const struct sio_nbd_info *n = &li->nbdi;

		json_begin_object(j, "nbd");
		json_str(j, "uri", n->uri);
		json_str(j, "server", n->server);
		json_str(j, "export", n->export_name);
		json_u64(j, "size", n->size);
		json_bool(j, "multi-conn", n->can_multi_conn);
		json_u64(j, "connections", n->connections);
		json_bool(j, "block-status", n->block_status);
		json_u64(j, "min-block", n->min_block);
		json_u64(j, "preferred-block", n->pref_block);
		json_u64(j, "max-block", n->max_block);
		json_u64(j, "max-request", n->max_request);
		json_end_object(j);
	}
	json_u64(j, "allocated-bytes", li->allocated);
	json_u64(j, "compressed-bytes", li->compressed);
	if (!li->nbd)
		json_u64(j, "actual-size", li->disk_size);
	json_begin_object(j, "format-specific");
	for (i = 0; i < li->nitems; i++)
		json_str(j, li->items[i].key, li->items[i].value);
	json_end_object(j);
	if (li->nsnaps)
		json_snapshots(j, li->snaps, li->nsnaps);
	json_end_object(j);
}

static int info_image(struct img *top, bool top_probed, enum tool_output out)
{
	static struct layer_info li;
	struct img *img, *parent = NULL;
	struct json_out j;
	unsigned n = 0;
	int ret = 0;

	for (img = top; img; img = img->backing)
		n++;

	if (out == TOOL_OUT_JSON) {
		json_init(&j, stdout);
		json_begin_object(&j, NULL);
		json_str(&j, "filename", top->path);
		json_str(&j, "format", img_format(top));
		json_bool(&j, "format-probed", top_probed);
		json_u64(&j, "virtual-size", top->size);
		json_u64(&j, "cluster-size", top->cluster_size);
		json_u64(&j, "chain-length", n);
		json_begin_array(&j, "chain");
	} else {
		char buf[32];

		printf("image: %s\n", top->path);
		printf("format: %s%s\n", img_format(top),
		       top_probed ? " (probed)" : "");
		printf("virtual size: %s (%" PRIu64 " bytes)\n",
		       tool_human_size(top->size, buf, sizeof(buf)), top->size);
		printf("cluster size: %" PRIu32 "\n", top->cluster_size);
		printf("chain: %u layer%s\n", n, n == 1 ? "" : "s");
	}

	for (img = top; img; parent = img, img = img->backing) {
		/* Whether a layer's format was probed is its parent's fact. */
		bool probed = parent ? parent->backing_fmt_probed : top_probed;

		ret = layer_scan(img, probed, &li);
		if (ret < 0)
			break;
		if (out == TOOL_OUT_JSON)
			json_layer(&j, img, &li);
		else
			human_layer(img, &li);
	}

	if (out == TOOL_OUT_JSON) {
		json_end_array(&j);
		json_end_object(&j);
		json_finish(&j);
	}
	free(li.snaps);
	li.snaps = NULL;
	return ret;
}

static void info_help(FILE *f)
{
	fprintf(f,
		"Usage: siphon info [-f FMT] [--output=human|json] IMAGE\n\n"
		"Describe IMAGE and every layer of its backing chain: format "
		"(and whether\nit was probed), virtual size, cluster size, "
		"format-specific facts (for\nqcow2 also the internal snapshots, "
		"as `qemu-img snapshot -l` lists them,\nand the persistent dirty "
		"bitmaps), how the file is accessed (O_DIRECT\nand its "
		"alignment, or buffered), the bytes the layer itself maps to "
		"data\n(allocated) and the file's size on disk.\n\n"
		"Options:\n"
		"  -f, --format FMT    IMAGE is in format FMT (qcow2, raw) "
		"instead of probed\n"
		"      --output=OUT    human (default) or json\n"
		"  -h, --help          this help\n\n%s",
		tool_exit_help);
}

static int info_run(const struct siphon_cmd *cmd, int argc, char **argv)
{
	return tool_run_on_image(cmd, argc, argv, info_image);
}

const struct siphon_cmd cmd_info = {
	.name = "info",
	.summary = "describe an image and its backing chain",
	.run = info_run,
	.help = info_help,
};

/*
 * `siphon check`: the consistency check of an image's metadata (the
 * facade's img_check), with qemu-img check's exit codes and a JSON report
 * whose counters carry qemu-img check --output=json's names, so scripts
 * written for one read the other.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "common/error.h"
#include "formats/image.h"
#include "cmd.h"
#include "json.h"

/* qemu-img check's exit codes. */
enum check_exit {
	CHECK_CLEAN = 0,
	CHECK_FAILED = 1, /* the check could not be done, or a bad command */
	CHECK_CORRUPT = 2,
	CHECK_LEAKS = 3,
	CHECK_UNSUPPORTED = 63, /* the format has nothing to check */
};

static void check_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon check [-r leaks|all] [-U] [-f FMT] [--output=human|json] IMAGE\n"
		"\n"
		"Check IMAGE's metadata against its reference counts: every L1, L2,\n"
		"refcount, snapshot and bitmap table reference is counted and compared\n"
		"with the refcount the image stores; pointers past the end of the file,\n"
		"unaligned or with reserved bits, invalid entries and COPIED flags that\n"
		"disagree with the refcount are reported. The backing chain is not\n"
		"opened. Each finding is a leak (a refcount too high: space wasted,\n"
		"nothing wrong is read) or a corruption (anything else), as qemu-img\n"
		"check counts them. Memory stays bounded for any file size: large files\n"
		"are counted in several passes.\n"
		"\n"
		"With -r the image is opened for writing (it must not be in use):\n"
		"  -r leaks   lower the refcounts of leaked clusters and cut a free tail\n"
		"             of the file\n"
		"  -r all     also raise refcounts that are too low (writing a new\n"
		"             refcount block where the table has none for clusters in\n"
		"             use) and set COPIED flags right; if a corruption is left\n"
		"             that cannot be repaired this way, the image is marked\n"
		"             corrupt so no writer trusts it (a version 2 image has\n"
		"             no such mark: the output says so instead)\n"
		"A repaired image is checked again; the exit code tells what is left.\n"
		"\n"
		"Options:\n"
		"  -r, --repair leaks|all  repair (see above)\n"
		"  -f, --format FMT        IMAGE's format (default: probe)\n"
		"      --output=OUT        human (default) or json\n"
		"  -q, --quiet             human output: only the summary line\n"
		"  -U, --force-share       check an image another program has open for\n"
		"                          writing (read-only; its writes in flight may\n"
		"                          show as leaks or worse); not with -r\n"
		"      --window N          count references for N host clusters per\n"
		"                          pass (default 4Mi: 16 MiB of memory; the\n"
		"                          file is covered in as many passes as needed)\n"
		"  -h, --help              this help\n"
		"\n"
		"Exit codes (those of qemu-img check):\n"
		"  0   no errors (after a repair: none left)\n"
		"  1   the check could not be completed (I/O error, unreadable image,\n"
		"      bad command line)\n"
		"  2   corruption found\n"
		"  3   leaked clusters found, no corruption\n"
		"  63  the format has no metadata to check (raw)\n");
}

static int exit_for(const struct img_check_report *r)
{
	if (r->corruptions)
		return CHECK_CORRUPT;
	if (r->leaks)
		return CHECK_LEAKS;
	return CHECK_CLEAN;
}

static void print_json(const char *path, const char *fmt,
		       const struct img_check_report *r, int code)
{
	struct json_out j;
	unsigned i;

	json_init(&j, stdout);
	json_begin_object(&j, NULL);
	json_str(&j, "filename", path);
	json_str(&j, "format", fmt);
	json_u64(&j, "check-errors", 0);
	json_u64(&j, "leaks", r->leaks);
	json_u64(&j, "corruptions", r->corruptions);
	json_u64(&j, "leaks-fixed", r->leaks_fixed);
	json_u64(&j, "corruptions-fixed", r->corruptions_fixed);
	json_u64(&j, "image-end-offset", r->image_end_offset);
	json_u64(&j, "total-clusters", r->total_clusters);
	json_u64(&j, "allocated-clusters", r->allocated_clusters);
	json_u64(&j, "fragmented-clusters", r->fragmented_clusters);
	json_u64(&j, "compressed-clusters", r->compressed_clusters);
	json_u64(&j, "found-leaks", r->found_leaks);
	json_u64(&j, "found-corruptions", r->found_corruptions);
	json_begin_object(&j, "kinds");
	for (i = 0; i < IMG_CK_NKINDS; i++)
		json_u64(&j, img_check_kind_name(i), r->kinds[i]);
	json_end_object(&j);
	json_begin_array(&j, "findings");
	for (i = 0; i < r->n_findings; i++) {
		const struct img_check_finding *f = &r->findings[i];

		json_begin_object(&j, NULL);
		json_str(&j, "kind", img_check_kind_name(f->kind));
		json_str(&j, "class",
			 f->kind == IMG_CK_LEAK ? "leak" : "corruption");
		json_u64(&j, "offset", f->offset);
		json_bool(&j, "repaired", f->repaired);
		json_str(&j, "message", f->what);
		json_end_object(&j);
	}
	json_end_array(&j);
	json_u64(&j, "findings-omitted",
		 r->found_leaks + r->found_corruptions - r->n_findings);
	json_u64(&j, "trimmed-bytes", r->trimmed_bytes);
	json_bool(&j, "marked-corrupt", r->marked_corrupt);
	json_bool(&j, "corrupt-unmarkable", r->unmarkable);
	json_u64(&j, "passes", r->passes);
	json_u64(&j, "exit-code", (uint64_t)code);
	json_end_object(&j);
	json_finish(&j);
}

static void print_human(const char *path, const struct img_check_report *r,
			bool quiet)
{
	uint64_t shown = r->n_findings;
	unsigned i;

	for (i = 0; !quiet && i < r->n_findings; i++) {
		const struct img_check_finding *f = &r->findings[i];

		printf("%s %s: %s\n", f->repaired ? "Repaired" : "ERROR",
		       f->kind == IMG_CK_LEAK ? "leak" : "corruption", f->what);
	}
	if (!quiet && r->found_leaks + r->found_corruptions > shown)
		printf("... and %llu more\n",
		       (unsigned long long)(r->found_leaks +
					    r->found_corruptions - shown));
	if (r->leaks_fixed || r->corruptions_fixed)
		printf("%s: repaired %llu leaked clusters and %llu corruptions%s\n",
		       path, (unsigned long long)r->leaks_fixed,
		       (unsigned long long)r->corruptions_fixed,
		       r->trimmed_bytes ? ", trimmed the free tail" : "");
	if (r->marked_corrupt)
		printf("%s: corruption left that cannot be repaired: the image is now marked corrupt\n",
		       path);
	if (r->unmarkable)
		printf("%s: corruption left that cannot be repaired, and a version 2 image has no bit to mark it corrupt with: do not write to it (copy its data out with qemu-img convert)\n",
		       path);
	if (!r->leaks && !r->corruptions)
		printf("%s: no errors were found\n", path);
	else
		printf("%s: %llu leaked clusters, %llu corruptions%s\n", path,
		       (unsigned long long)r->leaks,
		       (unsigned long long)r->corruptions,
		       r->corruptions
			       ? " (the image is damaged; data may be lost)"
			       : " (space is wasted; -r leaks reclaims it)");
	if (!quiet)
		printf("%llu/%llu = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n"
		       "Image end offset: %llu\n",
		       (unsigned long long)r->allocated_clusters,
		       (unsigned long long)r->total_clusters,
		       r->total_clusters
			       ? 100.0 * (double)r->allocated_clusters /
					 (double)r->total_clusters
			       : 0.0,
		       r->allocated_clusters
			       ? 100.0 * (double)r->fragmented_clusters /
					 (double)r->allocated_clusters
			       : 0.0,
		       r->allocated_clusters
			       ? 100.0 * (double)r->compressed_clusters /
					 (double)r->allocated_clusters
			       : 0.0,
		       (unsigned long long)r->image_end_offset);
}

static int check_run(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"repair", required_argument, NULL, 'r'},
		{"format", required_argument, NULL, 'f'},
		{"output", required_argument, NULL, 'o'},
		{"quiet", no_argument, NULL, 'q'},
		{"window", required_argument, NULL, 'w'},
		{"force-share", no_argument, NULL, 'U'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	struct img_check_opts o = {.repair = IMG_CHECK_NO_REPAIR};
	struct img_check_report r;
	enum tool_output out = TOOL_OUT_HUMAN;
	const char *fmt = NULL, *path, *shown;
	bool quiet = false;
	int c, ret, code;

	while ((c = getopt_long(argc, argv, ":r:f:qUh", opts, NULL)) != -1) {
		switch (c) {
		case 'r':
			if (!strcmp(optarg, "leaks"))
				o.repair = IMG_CHECK_REPAIR_LEAKS;
			else if (!strcmp(optarg, "all"))
				o.repair = IMG_CHECK_REPAIR_ALL;
			else {
				tool_usage(
					cmd,
					"-r takes 'leaks' or 'all', not '%s'",
					optarg);
				return CHECK_FAILED;
			}
			break;
		case 'f':
			fmt = optarg;
			break;
		case 'o':
			if (!tool_parse_output(optarg, &out)) {
				tool_usage(cmd, "unknown output '%s'", optarg);
				return CHECK_FAILED;
			}
			break;
		case 'q':
			quiet = true;
			break;
		case 'U':
			o.force_share = true;
			break;
		case 'w':
			if (tool_parse_bytes(optarg, &o.window) < 0 ||
			    !o.window) {
				tool_usage(
					cmd,
					"--window takes a cluster count, not '%s'",
					optarg);
				return CHECK_FAILED;
			}
			break;
		case 'h':
			cmd->help(stdout);
			return CHECK_CLEAN;
		default:
			tool_bad_option(cmd, c, argv);
			return CHECK_FAILED;
		}
	}
	if (optind != argc - 1) {
		tool_usage(cmd, "expected one IMAGE");
		return CHECK_FAILED;
	}
	path = argv[optind];
	shown = fmt;
	if (!shown) {
		shown = img_probe_format(path, &ret);
		if (!shown) {
			tool_fail(ret);
			return CHECK_FAILED;
		}
	}
	if (!img_format_checks(shown)) {
		fprintf(stderr,
			"siphon: %s: %s images have no metadata to check\n",
			path, shown);
		return CHECK_UNSUPPORTED;
	}
	ret = img_check(path, shown, &o, &r);
	if (ret < 0) {
		tool_fail(ret);
		return CHECK_FAILED;
	}
	code = exit_for(&r);
	if (out == TOOL_OUT_JSON)
		print_json(path, shown, &r, code);
	else
		print_human(path, &r, quiet);
	fflush(stdout);
	return code;
}

const struct siphon_cmd cmd_check = {
	.name = "check",
	.summary = "check (and repair) an image's metadata, as qemu-img check",
	.run = check_run,
	.help = check_help,
};

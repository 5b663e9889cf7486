/*
 * `siphon create`: a new, empty image through img_create().
 *
 * An overlay (-b) takes its backing file's virtual size unless SIZE is
 * given. The backing file is opened read-only (its own chain is not
 * followed), resolved relative to IMAGE's directory as every reader will
 * resolve it, both to check that it exists and to learn its size and, when
 * -F is missing, its format; a probed format is stored and the output says
 * it was probed. -u skips the backing file entirely (then SIZE is required).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/error.h"
#include "formats/image.h"
#include "cmd.h"

/* Room for the -o strings of one command line. */
#define MAX_OPT_ARGS 16

static void create_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon create [OPTIONS] IMAGE [SIZE]\n"
		"\n"
		"Create IMAGE (replacing an existing file that is not in use), of\n"
		"SIZE bytes (K, M, G, T suffixes; rounded up to a multiple of 512).\n"
		"With -b, IMAGE is an overlay of BACKING and SIZE defaults to\n"
		"BACKING's virtual size. A relative BACKING is stored as given\n"
		"and resolved from IMAGE's directory. BACKING may be an NBD\n"
		"export: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH\n"
		"or QEMU's json:{...} (the size then comes from the server).\n"
		"\n"
		"Options:\n"
		"  -f, --format FMT          qcow2 (default) or raw\n"
		"  -b, --backing BACKING     backing file of the new overlay\n"
		"  -F, --backing-format FMT  BACKING's format (default: probe it;\n"
		"                            the output says so)\n"
		"  -u, --unsafe              do not open BACKING (SIZE required)\n"
		"  -o, --options OPTS        comma-separated qcow2 options:\n"
		"        cluster_size=SIZE       512 .. 2M, a power of two (64k)\n"
		"        compat=0.10|1.1         qcow2 version 2 or 3 (1.1)\n"
		"        extended_l2=on|off      32 subclusters per cluster (off)\n"
		"        refcount_bits=N         1, 2, 4, 8, 16, 32 or 64 (16)\n"
		"        lazy_refcounts=on|off   (off; needs compat=1.1)\n"
		"        backing_file=, backing_fmt=  same as -b, -F\n"
		"  -q, --quiet               print nothing on success\n"
		"  -h, --help                this help\n"
		"\n"
		"%s",
		tool_exit_help);
}

static int parse_on_off(const char *v, bool *out)
{
	if (!strcmp(v, "on") || !strcmp(v, "true")) {
		*out = true;
		return 0;
	}
	if (!strcmp(v, "off") || !strcmp(v, "false")) {
		*out = false;
		return 0;
	}
	return -EINVAL;
}

struct create_args {
	struct img_create_opts o;
	const char *backing;
	const char *backing_fmt;
};

/* Apply one -o string (modified in place). Returns 0 or TOOL_USAGE. */
static int parse_opts(const struct siphon_cmd *cmd, char *s,
		      struct create_args *a)
{
	char *save = NULL, *tok, *val;
	uint64_t v;

	for (tok = strtok_r(s, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		val = strchr(tok, '=');
		if (!val)
			return tool_usage(cmd, "option '%s' needs a value",
					  tok);
		*val++ = '\0';
		if (!strcmp(tok, "cluster_size")) {
			if (tool_parse_bytes(val, &v) < 0 || v > UINT32_MAX)
				return tool_usage(cmd, "bad cluster_size '%s'",
						  val);
			a->o.cluster_size = (uint32_t)v;
		} else if (!strcmp(tok, "compat")) {
			if (!strcmp(val, "0.10") || !strcmp(val, "v2"))
				a->o.compat_v2 = true;
			else if (!strcmp(val, "1.1") || !strcmp(val, "v3"))
				a->o.compat_v2 = false;
			else
				return tool_usage(cmd,
						  "compat takes 0.10 or 1.1, "
						  "not '%s'",
						  val);
		} else if (!strcmp(tok, "extended_l2")) {
			if (parse_on_off(val, &a->o.extended_l2) < 0)
				return tool_usage(
					cmd, "extended_l2 takes on or off");
		} else if (!strcmp(tok, "lazy_refcounts")) {
			if (parse_on_off(val, &a->o.lazy_refcounts) < 0)
				return tool_usage(
					cmd, "lazy_refcounts takes on or off");
		} else if (!strcmp(tok, "refcount_bits")) {
			if (tool_parse_bytes(val, &v) < 0 || v < 1 || v > 64)
				return tool_usage(cmd,
						  "refcount_bits takes 1..64, "
						  "not '%s'",
						  val);
			a->o.refcount_bits = (unsigned)v;
		} else if (!strcmp(tok, "backing_file")) {
			a->backing = val;
		} else if (!strcmp(tok, "backing_fmt")) {
			a->backing_fmt = val;
		} else {
			return tool_usage(cmd, "unknown option '%s'", tok);
		}
	}
	return 0;
}

static bool same_file(const char *a, const char *b)
{
	struct stat sa, sb;

	return stat(a, &sa) == 0 && stat(b, &sb) == 0 &&
	       sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static int create_run(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"format", required_argument, NULL, 'f'},
		{"backing", required_argument, NULL, 'b'},
		{"backing-format", required_argument, NULL, 'F'},
		{"unsafe", no_argument, NULL, 'u'},
		{"options", required_argument, NULL, 'o'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	struct create_args a = {0};
	const char *fmt = "qcow2", *path;
	char *optv[MAX_OPT_ARGS] = {0}, *bpath = NULL;
	char hsize[32];
	struct img *bimg = NULL;
	bool quiet = false, unsafe = false, probed = false, have_size = false;
	int nopt = 0, c, i, ret = 0, rc = TOOL_USAGE;

	while ((c = getopt_long(argc, argv, ":f:b:F:uo:qh", opts, NULL)) !=
	       -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'b':
			a.backing = optarg;
			break;
		case 'F':
			a.backing_fmt = optarg;
			break;
		case 'u':
			unsafe = true;
			break;
		case 'o':
			if (nopt == MAX_OPT_ARGS) {
				rc = tool_usage(cmd, "too many -o options");
				goto out;
			}
			optv[nopt] = strdup(optarg);
			if (!optv[nopt++]) {
				ret = -ENOMEM;
				goto fail;
			}
			break;
		case 'q':
			quiet = true;
			break;
		case 'h':
			create_help(stdout);
			rc = TOOL_OK;
			goto out;
		default:
			rc = tool_bad_option(cmd, c, argv);
			goto out;
		}
	}
	for (i = 0; i < nopt; i++) {
		rc = parse_opts(cmd, optv[i], &a);
		if (rc)
			goto out;
	}
	rc = TOOL_USAGE;
	if (optind >= argc || argc - optind > 2) {
		rc = tool_usage(cmd, "expected IMAGE [SIZE]");
		goto out;
	}
	path = argv[optind];
	if (optind + 1 < argc) {
		if (tool_parse_bytes(argv[optind + 1], &a.o.size) < 0) {
			rc = tool_usage(cmd, "bad SIZE '%s'", argv[optind + 1]);
			goto out;
		}
		have_size = true;
	}
	if (a.backing && !a.backing[0])
		a.backing = NULL;
	if (a.backing_fmt && !a.backing) {
		rc = tool_usage(cmd, "-F needs -b");
		goto out;
	}
	if (!a.backing && !have_size) {
		rc = tool_usage(cmd, "SIZE is required without -b");
		goto out;
	}
	if (a.backing && unsafe && !have_size) {
		rc = tool_usage(cmd, "SIZE is required with -u");
		goto out;
	}

	if (a.backing && !unsafe) {
		bpath = tool_resolve_backing(path, a.backing);
		if (!bpath) {
			ret = -ENOMEM;
			goto fail;
		}
		if (same_file(bpath, path)) {
			ret = sx_error(-EINVAL,
				       "%s: the image cannot be its own "
				       "backing file",
				       path);
			goto fail;
		}
		ret = img_open(bpath, a.backing_fmt, IMG_OPEN_NO_BACKING,
			       &bimg);
		if (ret < 0)
			goto fail;
		if (!a.backing_fmt) {
			a.backing_fmt = img_format(bimg);
			probed = true;
		}
		if (!have_size)
			a.o.size = bimg->size;
	}
	/* As qemu-img does: guests address 512-byte sectors. */
	if (a.o.size % 512) {
		if (a.o.size > UINT64_MAX - 511) {
			rc = tool_usage(cmd, "SIZE too large");
			goto out;
		}
		a.o.size += 512 - a.o.size % 512;
	}
	a.o.backing = a.backing;
	a.o.backing_fmt = a.backing_fmt;
	ret = img_create(path, fmt, &a.o);
	if (ret < 0)
		goto fail;
	if (!quiet) {
		printf("Formatting '%s', fmt=%s size=%" PRIu64 " (%s)", path,
		       fmt, a.o.size,
		       tool_human_size(a.o.size, hsize, sizeof(hsize)));
		if (a.o.cluster_size)
			printf(" cluster_size=%" PRIu32, a.o.cluster_size);
		if (a.o.compat_v2)
			printf(" compat=0.10");
		if (a.o.refcount_bits)
			printf(" refcount_bits=%u", a.o.refcount_bits);
		if (a.o.extended_l2)
			printf(" extended_l2=on");
		if (a.o.lazy_refcounts)
			printf(" lazy_refcounts=on");
		if (a.backing)
			printf(" backing_file=%s", a.backing);
		if (a.backing_fmt)
			printf(" backing_fmt=%s", a.backing_fmt);
		printf("\n");
		if (probed)
			printf("Backing format '%s' was probed from %s; pass -F "
			       "to state it.\n",
			       a.backing_fmt, bpath);
		if (a.backing && !have_size && !unsafe)
			printf("Size taken from the backing file.\n");
	}
	rc = TOOL_OK;
	goto out;
fail:
	rc = tool_fail(ret);
out:
	img_close(bimg);
	free(bpath);
	for (i = 0; i < nopt; i++)
		free(optv[i]);
	return rc;
}

const struct siphon_cmd cmd_create = {
	.name = "create",
	.summary = "create an image (or an overlay of a backing file)",
	.run = create_run,
	.help = create_help,
};

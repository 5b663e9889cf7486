/*
 * `siphon rebase -u`: point an image at another backing file, header only.
 *
 * Unsafe by design, like `qemu-img rebase -u`: no data moves, so the guest
 * view changes unless the new backing file holds the same data where the
 * image has none. The old backing chain is not opened (it may be gone; that
 * is a common reason to rebase). The header is rewritten by the driver's
 * set_backing(), which keeps the header extensions it does not know.
 *
 * A safe rebase (copy what differs, then switch) is `siphon stream --base`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/error.h"
#include "formats/image.h"
#include "io/nbd_name.h"
#include "cmd.h"

static void rebase_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon rebase -u -b NEW [-F FMT] [-f FMT] IMAGE\n"
		"\n"
		"Rewrite IMAGE's header so that its backing file is NEW (stored as\n"
		"given; a relative name is resolved from IMAGE's directory), without\n"
		"copying any data. -b '' removes the backing reference. Header\n"
		"extensions siphon does not know are kept.\n"
		"\n"
		"Only unsafe mode (-u) is supported: it is correct only when NEW holds\n"
		"the same data as the old chain wherever IMAGE holds none. To move an\n"
		"image onto a base while keeping its contents, use\n"
		"`siphon stream --base BASE IMAGE`.\n"
		"\n"
		"Options:\n"
		"  -u, --unsafe              header-only rebase (required)\n"
		"  -b, --backing NEW         the new backing file ('' for none)\n"
		"  -F, --backing-format FMT  NEW's format (default: probe NEW if it\n"
		"                            exists; the output says so)\n"
		"  -f, --format FMT          IMAGE's format (default: probe)\n"
		"  -q, --quiet               print nothing on success\n"
		"  -h, --help                this help\n"
		"\n"
		"%s",
		tool_exit_help);
}

static int rebase_run(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"unsafe", no_argument, NULL, 'u'},
		{"backing", required_argument, NULL, 'b'},
		{"backing-format", required_argument, NULL, 'F'},
		{"format", required_argument, NULL, 'f'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *fmt = NULL, *backing = NULL, *bfmt = NULL, *path;
	struct img *img = NULL;
	char *bpath = NULL;
	bool unsafe = false, quiet = false, probed = false;
	struct stat st;
	int c, ret = 0, rc = TOOL_ERR;

	while ((c = getopt_long(argc, argv, ":ub:F:f:qh", opts, NULL)) != -1) {
		switch (c) {
		case 'u':
			unsafe = true;
			break;
		case 'b':
			backing = optarg;
			break;
		case 'F':
			bfmt = optarg;
			break;
		case 'f':
			fmt = optarg;
			break;
		case 'q':
			quiet = true;
			break;
		case 'h':
			rebase_help(stdout);
			return TOOL_OK;
		default:
			return tool_bad_option(cmd, c, argv);
		}
	}
	if (!unsafe)
		return tool_usage(cmd,
				  "only unsafe (header-only) rebase is "
				  "supported: add -u; for a safe rebase that "
				  "keeps the image's contents use "
				  "`siphon stream --base BASE IMAGE`");
	if (!backing)
		return tool_usage(cmd, "-b NEW is required (-b '' removes "
				       "the backing file)");
	if (optind != argc - 1)
		return tool_usage(cmd, "expected one IMAGE");
	path = argv[optind];
	if (!backing[0]) {
		backing = NULL;
		if (bfmt)
			return tool_usage(cmd, "-F makes no sense with -b ''");
	}

	if (backing && !bfmt) {
		bpath = tool_resolve_backing(path, backing);
		if (!bpath) {
			ret = -ENOMEM;
			goto fail;
		}
		/*
		 * Probe NEW when it is there; an absent NEW is stored bare,
		 * and so is an NBD export that cannot be reached.
		 */
		if (sio_nbd_name_is_remote(bpath)) {
			bfmt = img_probe_format(bpath, &ret);
			probed = bfmt != NULL;
		} else if (stat(bpath, &st) == 0) {
			bfmt = img_probe_format(bpath, &ret);
			if (!bfmt)
				goto fail;
			probed = true;
		}
	}

	ret = img_open(path, fmt, IMG_OPEN_RDWR | IMG_OPEN_NO_BACKING, &img);
	if (ret < 0)
		goto fail;
	ret = img_set_backing(img, backing, bfmt);
	if (ret < 0)
		goto fail;
	ret = img_flush(img);
	if (ret < 0)
		goto fail;
	if (!quiet) {
		if (backing)
			printf("%s: backing file is now '%s' (format %s%s)\n",
			       path, backing, bfmt ? bfmt : "unknown",
			       probed ? ", probed" : "");
		else
			printf("%s: backing file removed\n", path);
		if (backing && !bfmt)
			printf("Warning: %s does not exist; no backing format "
			       "stored\n",
			       bpath);
	}
	rc = TOOL_OK;
	goto out;
fail:
	rc = tool_fail(ret);
out:
	img_close(img);
	free(bpath);
	return rc;
}

const struct siphon_cmd cmd_rebase = {
	.name = "rebase",
	.summary = "change an image's backing file (header only, -u)",
	.run = rebase_run,
	.help = rebase_help,
};

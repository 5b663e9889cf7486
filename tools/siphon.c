/*
 * `siphon`: the command-line front end. Dispatches `siphon CMD ARGS...` to a
 * command from the table below and owns what they share: error printing,
 * usage errors, exit codes (0 ok, 1 error, 2 usage), global --help/--version.
 *
 * New commands slot in as a cmd_<name>.c defining a struct siphon_cmd plus
 * one line in `commands`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "io/nbd.h"
#include "siphon.h"
#include "cmd.h"

#ifndef SIPHON_VERSION
#define SIPHON_VERSION "unknown"
#endif

static const struct siphon_cmd *const commands[] = {
	&cmd_info,   &cmd_map,	 &cmd_dump, &cmd_stream, &cmd_create,
	&cmd_rebase, &cmd_check, &cmd_io,   &cmd_serve,	 &cmd_ctl,
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

const char tool_exit_help[] = "Exit codes:\n"
			      "  0  success\n"
			      "  1  error (bad or unsupported image, I/O "
			      "error, missing file, ...)\n"
			      "  2  usage error (bad option or argument)\n";

int tool_fail(int err)
{
	const char *msg = sx_last_error();

	if (err > 0)
		err = -err;
	/* A stale message from an earlier, handled failure must not show. */
	if (!msg[0] || sx_last_errno() != -err)
		msg = strerror(-err);
	fflush(stdout);
	fprintf(stderr, "siphon: %s\n", msg);
	return TOOL_ERR;
}

int tool_usage(const struct siphon_cmd *cmd, const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "siphon %s: ", cmd->name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry 'siphon help %s'.\n", cmd->name);
	return TOOL_USAGE;
}

int tool_bad_option(const struct siphon_cmd *cmd, int c, char **argv)
{
	if (c == ':')
		return tool_usage(cmd, "option '%s' needs an argument",
				  argv[optind - 1]);
	return tool_usage(cmd, "unknown option '%s'", argv[optind - 1]);
}

int tool_run_on_image(const struct siphon_cmd *cmd, int argc, char **argv,
		      int (*fn)(struct img *img, bool probed,
				enum tool_output out))
{
	static const struct option opts[] = {
		{"format", required_argument, NULL, 'f'},
		{"output", required_argument, NULL, 'o'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	enum tool_output out = TOOL_OUT_HUMAN;
	const char *fmt = NULL;
	struct img *img = NULL;
	int c, ret;

	while ((c = getopt_long(argc, argv, "+:f:h", opts, NULL)) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'o':
			if (!tool_parse_output(optarg, &out))
				return tool_usage(cmd, "unknown output '%s'",
						  optarg);
			break;
		case 'h':
			cmd->help(stdout);
			return TOOL_OK;
		default:
			return tool_bad_option(cmd, c, argv);
		}
	}
	if (argc - optind != 1)
		return tool_usage(cmd, "expected one IMAGE");

	ret = img_open(argv[optind], fmt, 0, &img);
	if (ret < 0)
		return tool_fail(ret);
	ret = fn(img, fmt == NULL, out);
	img_close(img);
	if (fflush(stdout) != 0 && ret >= 0)
		ret = sx_error(-errno, "stdout: %s", strerror(errno));
	return ret < 0 ? tool_fail(ret) : TOOL_OK;
}

bool tool_parse_output(const char *arg, enum tool_output *out)
{
	if (!strcmp(arg, "human")) {
		*out = TOOL_OUT_HUMAN;
		return true;
	}
	if (!strcmp(arg, "json")) {
		*out = TOOL_OUT_JSON;
		return true;
	}
	return false;
}

bool tool_parse_on_error(const char *arg, unsigned *out)
{
	if (!strcmp(arg, "stop")) {
		*out = SIPHON_ON_ERROR_STOP;
		return true;
	}
	if (!strcmp(arg, "pause")) {
		*out = SIPHON_ON_ERROR_PAUSE;
		return true;
	}
	return false;
}

char *tool_resolve_backing(const char *image, const char *backing)
{
	const char *slash = strrchr(image, '/');
	char *out = NULL;

	/* NBD names are never relative to the image's directory. */
	if (backing[0] == '/' || !slash || sio_nbd_name_is_remote(backing))
		return strdup(backing);
	if (asprintf(&out, "%.*s/%s", (int)(slash - image), image, backing) < 0)
		return NULL;
	return out;
}

int tool_parse_bytes(const char *s, uint64_t *out)
{
	uint64_t v = 0, mult = 1;
	const char *p = s;

	if (!s || *p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		if (v > (INT64_MAX - (uint64_t)(*p - '0')) / 10)
			return -ERANGE;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	switch (*p) {
	case 'k':
	case 'K':
		mult = 1ULL << 10;
		break;
	case 'm':
	case 'M':
		mult = 1ULL << 20;
		break;
	case 'g':
	case 'G':
		mult = 1ULL << 30;
		break;
	case 't':
	case 'T':
		mult = 1ULL << 40;
		break;
	default:
		break;
	}
	if (mult > 1)
		p++;
	if (mult > 1 && p[0] == 'i' && p[1] == 'B')
		p += 2;
	else if (*p == 'B')
		p++;
	if (*p)
		return -EINVAL;
	if (v > INT64_MAX / mult)
		return -ERANGE;
	*out = v * mult;
	return 0;
}

const char *tool_human_size(uint64_t v, char *buf, size_t len)
{
	static const char *const units[] = {"B",   "KiB", "MiB", "GiB",
					    "TiB", "PiB", "EiB"};
	unsigned u = 0;
	double x = (double)v;

	while (x >= 1024 && u < 6) {
		x /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%" PRIu64 " B", v);
	else if (x == (double)(uint64_t)x)
		snprintf(buf, len, "%" PRIu64 " %s", (uint64_t)x, units[u]);
	else
		snprintf(buf, len, "%.3g %s", x, units[u]);
	return buf;
}

static const struct siphon_cmd *find_cmd(const char *name)
{
	size_t i;

	for (i = 0; i < N_COMMANDS; i++)
		if (!strcmp(commands[i]->name, name))
			return commands[i];
	return NULL;
}

static void usage(FILE *out)
{
	size_t i;

	fprintf(out, "Usage: siphon [--help | --version] COMMAND [ARGS...]\n"
		     "       siphon help COMMAND\n\n"
		     "Disk images and their backing chains.\n\n"
		     "Commands:\n");
	for (i = 0; i < N_COMMANDS; i++)
		fprintf(out, "  %-8s %s\n", commands[i]->name,
			commands[i]->summary);
	fprintf(out, "\nEvery command takes --help.\n\n%s", tool_exit_help);
}

/*
 * The test hooks of io/, from the tool's environment: SIPHON_FAULT (fault
 * and error rules, io.h sio_fault_parse) and SIPHON_IO_LOG (the write log
 * of the crash tests). The library itself never reads the environment.
 */
static int install_test_hooks(void)
{
	const char *spec = getenv("SIPHON_FAULT");
	const char *log = getenv("SIPHON_IO_LOG");

	if (spec && spec[0] && sio_fault_parse(spec) < 0) {
		fprintf(stderr, "siphon: SIPHON_FAULT: %s\n", sx_last_error());
		return TOOL_USAGE;
	}
	if (log && log[0] && sio_iolog_start(log) < 0) {
		fprintf(stderr, "siphon: SIPHON_IO_LOG: %s\n", sx_last_error());
		return TOOL_ERR;
	}
	return TOOL_OK;
}

int main(int argc, char **argv)
{
	const struct siphon_cmd *cmd;
	int ret;

	if (argc < 2) {
		usage(stderr);
		return TOOL_USAGE;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return TOOL_OK;
	}
	if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
		printf("siphon %s\n", SIPHON_VERSION);
		return TOOL_OK;
	}
	if (!strcmp(argv[1], "help")) {
		if (argc == 2) {
			usage(stdout);
			return TOOL_OK;
		}
		cmd = find_cmd(argv[2]);
		if (!cmd || argc > 3) {
			fprintf(stderr,
				"siphon: unknown command '%s'\n"
				"Try 'siphon --help'.\n",
				argv[2]);
			return TOOL_USAGE;
		}
		cmd->help(stdout);
		return TOOL_OK;
	}
	if (argv[1][0] == '-') {
		fprintf(stderr,
			"siphon: unknown option '%s'\n"
			"Try 'siphon --help'.\n",
			argv[1]);
		return TOOL_USAGE;
	}
	cmd = find_cmd(argv[1]);
	if (!cmd) {
		fprintf(stderr,
			"siphon: unknown command '%s'\n"
			"Try 'siphon --help'.\n",
			argv[1]);
		return TOOL_USAGE;
	}
	ret = install_test_hooks();
	if (ret != TOOL_OK)
		return ret;
	/* Commands parse their own options from a fresh getopt state. */
	optind = 0;
	opterr = 0;
	return cmd->run(cmd, argc - 1, argv + 1);
}

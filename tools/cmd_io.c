/*
 * `siphon io`: apply qemu-io-like commands to an image through the format
 * driver's write path, so a test can run the same workload through siphon
 * and through qemu-io and compare the results.
 *
 * Every command is parsed before the image is opened (a typo is a usage
 * error, not a half-applied workload). Commands run in order, synchronously;
 * the first failure stops the run. The image is flushed at the end (also
 * after a failure, to keep what completed). The image is opened read-write
 * (taking the writer lock) unless every command only reads or sleeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "cmd.h"

/* Largest piece of a command handed to the driver at once. */
#define IO_CHUNK (4u << 20)

/* What qemu-io writes when no pattern is given. */
#define IO_DEFAULT_PATTERN 0xcd

/* Tokens of one command, at most. */
#define IO_MAX_TOKENS 8

enum io_kind {
	IO_WRITE,
	IO_WRITE_ZEROES,
	IO_DISCARD,
	IO_READ,
	IO_FLUSH,
	IO_SLEEP,
};

struct io_op {
	enum io_kind kind;
	bool verify; /* read -P */
	uint8_t pattern;
	uint64_t off;
	uint64_t len; /* IO_SLEEP: milliseconds */
	char *text; /* the command as given, for messages */
};

struct io_script {
	struct io_op *ops;
	size_t n, cap;
};

static void io_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon io [OPTIONS] IMAGE [COMMAND...]\n"
		"\n"
		"Apply COMMANDs (each one argument, e.g. 'write -P 0xab 0 64k') to\n"
		"IMAGE in order, through siphon's write path, then flush. Offsets and\n"
		"lengths take k, M, G, T suffixes.\n"
		"\n"
		"Commands (as qemu-io spells them):\n"
		"  write [-P PATTERN] OFF LEN  write bytes of PATTERN (default 0xcd)\n"
		"  write -z [-u] OFF LEN       make the range read as zeros\n"
		"                              (-u accepted for qemu-io's sake)\n"
		"  discard OFF LEN             discard the range\n"
		"  read [-P PATTERN] OFF LEN   read the range; with -P, check every\n"
		"                              byte (a mismatch is an error naming\n"
		"                              the first bad offset)\n"
		"  flush                       make everything so far durable\n"
		"  sleep MS                    wait MS milliseconds\n"
		"\n"
		"Options:\n"
		"  -f, --format FMT     IMAGE's format (default: probe)\n"
		"  -s, --script FILE    also read commands from FILE ('-': stdin),\n"
		"                       one per line ('#' comments); they run\n"
		"                       before the command-line ones\n"
		"  -q, --quiet          print nothing for successful commands\n"
		"  -h, --help           this help\n"
		"\n"
		"%s",
		tool_exit_help);
}

static int parse_pattern(const char *s, uint8_t *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 0);
	if (errno || end == s || *end || v < 0 || v > 255)
		return -EINVAL;
	*out = (uint8_t)v;
	return 0;
}

/* Parse one command line into op. Returns 0 or TOOL_USAGE (printed). */
static int parse_op(const struct siphon_cmd *cmd, const char *line,
		    struct io_op *op)
{
	char *copy = strdup(line), *save = NULL, *tok;
	char *t[IO_MAX_TOKENS];
	int n = 0, i = 1, rc = TOOL_USAGE;
	bool zero = false, have_pat = false;

	memset(op, 0, sizeof(*op));
	if (!copy)
		return tool_usage(cmd, "out of memory");
	for (tok = strtok_r(copy, " \t\r\n", &save); tok;
	     tok = strtok_r(NULL, " \t\r\n", &save)) {
		if (n == IO_MAX_TOKENS)
			goto bad;
		t[n++] = tok;
	}
	if (n == 0)
		goto bad;
	if (!strcmp(t[0], "flush") && n == 1) {
		op->kind = IO_FLUSH;
		goto ok;
	}
	if (!strcmp(t[0], "sleep") && n == 2) {
		op->kind = IO_SLEEP;
		if (tool_parse_bytes(t[1], &op->len) < 0)
			goto bad;
		goto ok;
	}
	if (strcmp(t[0], "write") && strcmp(t[0], "read") &&
	    strcmp(t[0], "discard"))
		goto bad;
	op->kind = !strcmp(t[0], "write")  ? IO_WRITE
		   : !strcmp(t[0], "read") ? IO_READ
					   : IO_DISCARD;
	op->pattern = IO_DEFAULT_PATTERN;
	for (; i < n && t[i][0] == '-'; i++) {
		if (!strcmp(t[i], "-P") && op->kind != IO_DISCARD &&
		    i + 1 < n) {
			if (parse_pattern(t[++i], &op->pattern) < 0)
				goto bad;
			have_pat = true;
		} else if (!strcmp(t[i], "-z") && op->kind == IO_WRITE) {
			zero = true;
		} else if (!strcmp(t[i], "-u") && op->kind == IO_WRITE) {
			/* unmap allowed: the guest view is zeros either way */
		} else {
			goto bad;
		}
	}
	if (n - i != 2 || tool_parse_bytes(t[i], &op->off) < 0 ||
	    tool_parse_bytes(t[i + 1], &op->len) < 0)
		goto bad;
	if (zero && have_pat)
		goto bad;
	if (zero)
		op->kind = IO_WRITE_ZEROES;
	op->verify = op->kind == IO_READ && have_pat;
ok:
	op->text = strdup(line);
	if (!op->text) {
		rc = tool_usage(cmd, "out of memory");
		goto out;
	}
	rc = 0;
	goto out;
bad:
	rc = tool_usage(cmd, "bad command '%s'", line);
out:
	free(copy);
	return rc;
}

static int script_add(const struct siphon_cmd *cmd, struct io_script *sc,
		      const char *line)
{
	struct io_op *ops;

	if (sc->n == sc->cap) {
		sc->cap = sc->cap ? sc->cap * 2 : 64;
		ops = realloc(sc->ops, sc->cap * sizeof(*ops));
		if (!ops)
			return tool_usage(cmd, "out of memory");
		sc->ops = ops;
	}
	if (parse_op(cmd, line, &sc->ops[sc->n]))
		return TOOL_USAGE;
	sc->n++;
	return 0;
}

static int script_load(const struct siphon_cmd *cmd, struct io_script *sc,
		       const char *file)
{
	FILE *f = strcmp(file, "-") ? fopen(file, "r") : stdin;
	char *line = NULL, *p;
	size_t cap = 0;
	int rc = 0;

	if (!f)
		return tool_usage(cmd, "cannot open script %s: %s", file,
				  strerror(errno));
	while (getline(&line, &cap, f) >= 0) {
		for (p = line; *p == ' ' || *p == '\t'; p++)
			;
		if (!*p || *p == '\n' || *p == '#')
			continue;
		p[strcspn(p, "\r\n")] = '\0';
		rc = script_add(cmd, sc, p);
		if (rc)
			break;
	}
	free(line);
	if (f != stdin)
		fclose(f);
	return rc;
}

static void script_free(struct io_script *sc)
{
	size_t i;

	for (i = 0; i < sc->n; i++)
		free(sc->ops[i].text);
	free(sc->ops);
}

static bool modifies(const struct io_script *sc)
{
	size_t i;

	for (i = 0; i < sc->n; i++)
		if (sc->ops[i].kind != IO_READ && sc->ops[i].kind != IO_SLEEP)
			return true;
	return false;
}

/* Read op's range and compare it with its pattern. */
static int do_read(struct img *img, const struct io_op *op, uint8_t *buf)
{
	uint64_t pos, n, i;
	int ret = 0;

	for (pos = 0; pos < op->len; pos += n) {
		n = sx_min(IO_CHUNK, op->len - pos);
		ret = img_pread(img, buf, n, op->off + pos);
		if (ret < 0)
			return ret;
		if (!op->verify)
			continue;
		for (i = 0; i < n; i++) {
			if (buf[i] != op->pattern)
				return sx_error(-EIO,
						"%s: '%s': pattern mismatch at "
						"offset %" PRIu64
						": found 0x%02x, expected "
						"0x%02x",
						img->path, op->text,
						op->off + pos + i, buf[i],
						op->pattern);
		}
	}
	return ret;
}

static int do_write(struct img *img, const struct io_op *op, uint8_t *buf)
{
	uint64_t pos, n;
	int ret = 0;

	memset(buf, op->pattern, sx_min(IO_CHUNK, op->len));
	for (pos = 0; pos < op->len && ret >= 0; pos += n) {
		n = sx_min(IO_CHUNK, op->len - pos);
		ret = img_pwrite(img, buf, n, op->off + pos);
	}
	return ret;
}

static void do_sleep(uint64_t ms)
{
	struct timespec ts = {
		.tv_sec = (time_t)(ms / 1000),
		.tv_nsec = (long)(ms % 1000) * 1000000L,
	};

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static int run_op(struct img *img, const struct io_op *op, uint8_t *buf,
		  bool quiet)
{
	const char *verb = "wrote";
	int ret = 0;

	if (op->kind != IO_FLUSH && op->kind != IO_SLEEP &&
	    !sx_range_within(op->off, op->len, img->size))
		return sx_error(-EINVAL,
				"%s: '%s': range past the end of the image "
				"(%" PRIu64 " bytes)",
				img->path, op->text, img->size);
	/* `siphon io` is a guest: its changes dirty persistent bitmaps. */
	if (op->len && (op->kind == IO_WRITE || op->kind == IO_WRITE_ZEROES ||
			op->kind == IO_DISCARD))
		img_mark_dirty(img, op->off, op->len);
	switch (op->kind) {
	case IO_WRITE:
		ret = do_write(img, op, buf);
		break;
	case IO_WRITE_ZEROES:
		ret = op->len ? img_write_zeroes(img, op->off, op->len, 0) : 0;
		break;
	case IO_DISCARD:
		verb = "discard";
		ret = op->len ? img_discard(img, op->off, op->len) : 0;
		break;
	case IO_READ:
		verb = "read";
		ret = do_read(img, op, buf);
		break;
	case IO_FLUSH:
		ret = img_flush(img);
		break;
	case IO_SLEEP:
		do_sleep(op->len);
		break;
	}
	if (ret < 0 || quiet)
		return ret;
	if (op->kind == IO_FLUSH || op->kind == IO_SLEEP)
		printf("%s\n", op->text);
	else
		printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64
		       "\n",
		       verb, op->len, op->len, op->off);
	fflush(stdout);
	return 0;
}

static int io_run(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"format", required_argument, NULL, 'f'},
		{"script", required_argument, NULL, 's'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *fmt = NULL, *script = NULL, *path;
	struct io_script sc = {0};
	struct img *img = NULL;
	uint8_t *buf = NULL;
	bool quiet = false, writing;
	char msg[512];
	int c, i, ret = 0, rc = TOOL_USAGE;
	size_t k;

	/* '+': stop at IMAGE; commands such as 'write -P 1 0 4k' follow. */
	while ((c = getopt_long(argc, argv, "+f:s:qh", opts, NULL)) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 's':
			script = optarg;
			break;
		case 'q':
			quiet = true;
			break;
		case 'h':
			io_help(stdout);
			rc = TOOL_OK;
			goto out;
		default:
			rc = tool_usage(cmd, "unknown option '%s'",
					argv[optind - 1]);
			goto out;
		}
	}
	if (optind >= argc) {
		rc = tool_usage(cmd, "expected IMAGE [COMMAND...]");
		goto out;
	}
	path = argv[optind];
	if (script && script_load(cmd, &sc, script))
		goto out;
	for (i = optind + 1; i < argc; i++)
		if (script_add(cmd, &sc, argv[i]))
			goto out;
	if (sc.n == 0) {
		rc = tool_usage(cmd, "no commands");
		goto out;
	}

	writing = modifies(&sc);
	ret = img_open(path, fmt, writing ? IMG_OPEN_RDWR : 0, &img);
	if (ret < 0)
		goto fail;
	buf = sio_buf_alloc(IO_CHUNK);
	if (!buf) {
		ret = sx_error(-ENOMEM, "%s: out of memory", path);
		goto fail;
	}
	for (k = 0; k < sc.n; k++) {
		ret = run_op(img, &sc.ops[k], buf, quiet);
		if (ret < 0)
			break;
	}
	if (writing) {
		if (ret < 0) {
			/* Keep what completed, and the first error's message. */
			snprintf(msg, sizeof(msg), "%s", sx_last_error());
			if (img_flush(img) < 0 && msg[0])
				sx_error(ret, "%s", msg);
		} else {
			ret = img_flush(img);
		}
	}
	if (ret < 0)
		goto fail;
	rc = TOOL_OK;
	goto out;
fail:
	rc = tool_fail(ret);
out:
	img_close(img);
	sio_buf_free(buf);
	script_free(&sc);
	return rc;
}

const struct siphon_cmd cmd_io = {
	.name = "io",
	.summary = "apply qemu-io-like writes, zeroes, discards, reads",
	.run = io_run,
	.help = io_help,
};

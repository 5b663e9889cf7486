/*
 * `siphon ctl SOCKET COMMAND [ARGS]`: a client of `siphon serve
 * --control SOCKET` (the protocol is in server/control.h). Sends one
 * request, prints the reply (a table or a message; the reply's JSON line
 * with --output=json), exits 0 when the daemon said ok and 1 with the
 * daemon's errno name and message when it did not. `events` prints the
 * events as they come until the daemon goes away.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/error.h"
#include "common/json_parse.h"
#include "cmd.h"
#include "json.h"

static void ctl_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon ctl [--output=human|json] SOCKET COMMAND [ARGS]\n"
		"\n"
		"Drive a `siphon serve --control SOCKET` daemon.\n"
		"\n"
		"Commands:\n"
		"  info                         every disk: export, size, its stream\n"
		"  attach IMAGE[=EXPORT]        attach IMAGE and export it\n"
		"  detach DISK                  stop exporting DISK and detach it\n"
		"  stream DISK [--base BASE] [--speed RATE] [--on-error=stop|pause]\n"
		"                               stream DISK in the background; with\n"
		"                               pause it pauses on ENOSPC, EDQUOT or\n"
		"                               EIO (info: paused) until resumed\n"
		"  stream DISK --step CURSOR    one increment from CURSOR (0 opens\n"
		"                               the stream); prints the new cursor\n"
		"                               and the end\n"
		"  abort DISK                   stop DISK's stream cleanly\n"
		"  resume DISK                  resume DISK's paused stream\n"
		"  set-speed DISK RATE          change its limit (0 = unlimited)\n"
		"  events                       print stream events as they come\n"
		"  quit                         shut the daemon down cleanly\n"
		"\n"
		"DISK is an image's path or its export name. RATE is bytes/s with\n"
		"K, M, G suffixes.\n"
		"\n"
		"Options:\n"
		"  -o, --output FMT   human (default) or json: the daemon's reply\n"
		"                     line as it came\n"
		"  -h, --help         this help\n"
		"\n"
		"Exit codes:\n"
		"  0  the daemon did it\n"
		"  1  the daemon refused (its errno name and message are printed),\n"
		"     or it could not be reached\n"
		"  2  usage error (bad option or argument)\n");
}

/* Append "key":"value" (escaped) to the request being built in f. */
static void req_str(FILE *f, const char *key, const char *v)
{
	fputc(',', f);
	json_string(f, key);
	fputc(':', f);
	json_string(f, v);
}

static void req_u64(FILE *f, const char *key, uint64_t v)
{
	fputc(',', f);
	json_string(f, key);
	fprintf(f, ":%" PRIu64, v);
}

/*
 * DISK as the daemon knows it: a file here (named with a '/', or present
 * in this directory) by its absolute path, anything else (an export
 * name) as given.
 */
static const char *disk_arg(const char *arg, char *buf)
{
	if ((strchr(arg, '/') || access(arg, F_OK) == 0) && realpath(arg, buf))
		return buf;
	return arg;
}

static int connect_to(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return sx_error(-ENAMETOOLONG, "%s: path too long", path);
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return sx_error(-errno, "socket: %s", strerror(errno));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = errno;

		close(fd);
		return sx_error(-err, "%s: cannot reach the daemon: %s", path,
				strerror(err));
	}
	return fd;
}

/* One line from fd into a malloc'd string (NULL at EOF or error). */
static char *read_line(int fd, char **buf, size_t *have)
{
	size_t cap = *have + 4096;
	char *nl;

	for (;;) {
		if (*buf && (nl = memchr(*buf, '\n', *have))) {
			size_t len = (size_t)(nl - *buf);
			char *line = strndup(*buf, len);

			memmove(*buf, nl + 1, *have - len - 1);
			*have -= len + 1;
			return line;
		}
		if (*have > (1u << 20))
			return NULL;
		char *b = realloc(*buf, cap);

		if (!b)
			return NULL;
		*buf = b;
		ssize_t n = read(fd, *buf + *have, cap - *have);

		if (n <= 0)
			return NULL;
		*have += (size_t)n;
		cap = *have + 4096;
	}
}

static const char *jstr(const struct sx_json *o, const char *k)
{
	const struct sx_json *v = sx_json_get(o, k);

	return v && v->type == SX_JSON_STRING ? v->str : "";
}

static uint64_t ju64(const struct sx_json *o, const char *k)
{
	const struct sx_json *v = sx_json_get(o, k);
	int64_t i = 0;

	if (v && sx_json_int64(v, &i) < 0)
		i = 0;
	return (uint64_t)i;
}

static void print_info(const struct sx_json *r)
{
	const struct sx_json *disks = sx_json_get(r, "disks");
	char sz[32];

	printf("%-16s %10s  %-10s %-24s %s\n", "EXPORT", "SIZE", "STREAM",
	       "PROGRESS", "PATH");
	for (size_t i = 0; disks && i < disks->count; i++) {
		const struct sx_json *d = &disks->items[i];
		const struct sx_json *st = sx_json_get(d, "stream");
		char prog[64] = "-";

		if (st) {
			uint64_t cur = ju64(st, "cur"), end = ju64(st, "end");

			snprintf(prog, sizeof(prog),
				 "%.1f%% (%" PRIu64 "/%" PRIu64 ")",
				 end ? 100.0 * (double)cur / (double)end : 0.0,
				 cur, end);
		}
		printf("%-16s %10s  %-10s %-24s %s\n", jstr(d, "export"),
		       tool_human_size(ju64(d, "size"), sz, sizeof(sz)),
		       st ? jstr(st, "state") : "-", prog, jstr(d, "path"));
		if (st && *jstr(st, "message"))
			printf("%16s  %s: %s\n", "", jstr(st, "errno"),
			       jstr(st, "message"));
	}
}

static void print_event(const struct sx_json *e)
{
	printf("%s %s (%" PRIu64 " bytes copied)%s%s\n", jstr(e, "path"),
	       jstr(e, "event"), ju64(e, "bytes_copied"),
	       *jstr(e, "error") ? ": " : "", jstr(e, "error"));
}

static int ctl_run_cmd(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"output", required_argument, NULL, 'o'},
		{"base", required_argument, NULL, 'b'},
		{"speed", required_argument, NULL, 's'},
		{"step", required_argument, NULL, 'S'},
		{"on-error", required_argument, NULL, 'E'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	enum tool_output out = TOOL_OUT_HUMAN;
	const char *base = NULL, *on_error = NULL, *sock, *verb;
	uint64_t speed = 0, cursor = 0;
	bool has_speed = false, step = false;
	char abs[PATH_MAX], *req = NULL, *line = NULL, *buf = NULL;
	size_t reqlen = 0, have = 0;
	struct sx_json *r = NULL;
	int c, fd = -1, rc = TOOL_ERR, ret;
	FILE *f;

	/* Options may follow the command (stream DISK --speed R). */
	while ((c = getopt_long(argc, argv, ":o:b:s:h", opts, NULL)) != -1) {
		switch (c) {
		case 'o':
			if (!tool_parse_output(optarg, &out))
				return tool_usage(cmd, "unknown output '%s'",
						  optarg);
			break;
		case 'b':
			base = optarg;
			break;
		case 's':
			if (tool_parse_bytes(optarg, &speed) < 0)
				return tool_usage(cmd, "bad --speed '%s'",
						  optarg);
			has_speed = true;
			break;
		case 'S':
			if (tool_parse_bytes(optarg, &cursor) < 0)
				return tool_usage(cmd, "bad --step '%s'",
						  optarg);
			step = true;
			break;
		case 'E':
			if (strcmp(optarg, "stop") && strcmp(optarg, "pause"))
				return tool_usage(cmd,
						  "--on-error takes stop or "
						  "pause, not '%s'",
						  optarg);
			on_error = optarg;
			break;
		case 'h':
			ctl_help(stdout);
			return TOOL_OK;
		default:
			return tool_bad_option(cmd, c, argv);
		}
	}
	if (argc - optind < 2)
		return tool_usage(cmd, "expected SOCKET COMMAND");
	sock = argv[optind++];
	verb = argv[optind++];
	f = open_memstream(&req, &reqlen);
	if (!f)
		return tool_fail(-ENOMEM);
	fputs("{\"cmd\":", f);
	json_string(f, verb);
	if (!strcmp(verb, "info") || !strcmp(verb, "events") ||
	    !strcmp(verb, "quit")) {
		if (optind != argc) {
			fclose(f);
			free(req);
			return tool_usage(cmd, "%s takes no argument", verb);
		}
	} else if (!strcmp(verb, "attach")) {
		char *arg, *eq, *slash;

		if (argc - optind != 1) {
			fclose(f);
			free(req);
			return tool_usage(cmd, "attach takes IMAGE[=EXPORT]");
		}
		arg = argv[optind];
		eq = strrchr(arg, '=');
		if (eq && eq != arg && eq[1] && !strchr(eq + 1, '/')) {
			*eq = 0;
			req_str(f, "export", eq + 1);
		}
		slash = realpath(arg, abs);
		req_str(f, "image", slash ? abs : arg);
	} else if (!strcmp(verb, "detach") || !strcmp(verb, "abort") ||
		   !strcmp(verb, "resume") || !strcmp(verb, "stream") ||
		   !strcmp(verb, "set-speed")) {
		int want = !strcmp(verb, "set-speed") ? 2 : 1;

		if (argc - optind != want) {
			fclose(f);
			free(req);
			return tool_usage(cmd, "%s takes DISK%s", verb,
					  want == 2 ? " RATE" : "");
		}
		req_str(f, "path", disk_arg(argv[optind], abs));
		if (want == 2) {
			if (tool_parse_bytes(argv[optind + 1], &speed) < 0) {
				fclose(f);
				free(req);
				return tool_usage(cmd, "bad RATE '%s'",
						  argv[optind + 1]);
			}
			req_u64(f, "speed", speed);
		}
		if (!strcmp(verb, "stream")) {
			if (base)
				req_str(f, "base", base);
			if (has_speed)
				req_u64(f, "speed", speed);
			if (step)
				req_u64(f, "cursor", cursor);
			if (on_error)
				req_str(f, "on_error", on_error);
		}
	} else {
		fclose(f);
		free(req);
		return tool_usage(cmd, "unknown command '%s'", verb);
	}
	fputs("}\n", f);
	fclose(f);

	fd = connect_to(sock);
	if (fd < 0) {
		rc = tool_fail(fd);
		goto out;
	}
	if (write(fd, req, reqlen) != (ssize_t)reqlen) {
		rc = tool_fail(sx_error(-EIO, "%s: cannot send: %s", sock,
					strerror(errno)));
		goto out;
	}
	line = read_line(fd, &buf, &have);
	if (!line) {
		rc = tool_fail(sx_error(-EIO,
					"%s: the daemon closed the "
					"connection without a reply",
					sock));
		goto out;
	}
	ret = sx_json_parse(line, strlen(line), &r);
	if (ret < 0) {
		rc = tool_fail(
			sx_error(-EPROTO, "%s: bad reply: %s", sock, line));
		goto out;
	}
	if (out == TOOL_OUT_JSON)
		printf("%s\n", line);
	if (!sx_json_get(r, "ok") ||
	    sx_json_get(r, "ok")->type != SX_JSON_TRUE) {
		fflush(stdout);
		fprintf(stderr, "siphon: %s: %s\n", jstr(r, "errno"),
			jstr(r, "error"));
		rc = TOOL_ERR;
		goto out;
	}
	rc = TOOL_OK;
	if (out == TOOL_OUT_HUMAN) {
		if (!strcmp(verb, "info"))
			print_info(r);
		else if (!strcmp(verb, "attach"))
			printf("attached %s as export '%s'\n", jstr(r, "path"),
			       jstr(r, "export"));
		else if (!strcmp(verb, "stream") && step)
			printf("cursor %" PRIu64 " of %" PRIu64 "\n",
			       ju64(r, "cursor"), ju64(r, "end"));
	}
	if (!strcmp(verb, "events")) {
		fflush(stdout);
		for (;;) {
			struct sx_json *e = NULL;

			free(line);
			line = read_line(fd, &buf, &have);
			if (!line)
				break;
			if (out == TOOL_OUT_JSON) {
				printf("%s\n", line);
			} else if (sx_json_parse(line, strlen(line), &e) == 0) {
				print_event(e);
				sx_json_free(e);
			}
			fflush(stdout);
		}
	}
out:
	sx_json_free(r);
	free(line);
	free(buf);
	free(req);
	if (fd >= 0)
		close(fd);
	return rc;
}

const struct siphon_cmd cmd_ctl = {
	.name = "ctl",
	.summary = "drive a `siphon serve --control` daemon",
	.run = ctl_run_cmd,
	.help = ctl_help,
};

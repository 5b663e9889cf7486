/*
 * `siphon stream`: offline population of an image from its backing chain.
 *
 * Opens the image read-write (its chain read-only), runs the stream engine
 * to the end on one io_uring queue, and drops the backing reference (or
 * points it at --base). On a terminal it draws a progress line on stderr;
 * with --output=json it prints JSON lines on stdout: progress events, then
 * one summary. Ctrl-C (SIGINT) or SIGTERM abort cleanly: in-flight work
 * completes, metadata is flushed, and a later run resumes where it stopped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "engine/stream.h"
#include "formats/image.h"
#include "io/io.h"
#include "cmd.h"
#include "json.h"

/* Exit code when interrupted, as shells report a SIGINT death. */
#define TOOL_INTERRUPTED 130

static struct stream *volatile running;

static void on_signal(int sig)
{
	(void)sig;
	/* stream_request_abort only stores to a lock-free atomic. */
	if (running)
		stream_request_abort(running);
}

struct stream_ui {
	enum tool_output output;
	bool bar;
	uint32_t cluster_size;
	struct timespec t0;
};

static double elapsed(const struct stream_ui *ui)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)(t.tv_sec - ui->t0.tv_sec) +
	       (double)(t.tv_nsec - ui->t0.tv_nsec) / 1e9;
}

static double percent(const struct stream_progress *p)
{
	return p->end ? 100.0 * (double)p->cur / (double)p->end : 100.0;
}

static void print_counters_json(const struct stream_progress *p)
{
	printf("\"cur\": %" PRIu64 ", \"end\": %" PRIu64
	       ", \"percent\": %.2f, \"bytes_copied\": %" PRIu64
	       ", \"bytes_skipped\": %" PRIu64 ", \"bytes_zero\": %" PRIu64
	       ", \"rate\": %" PRIu64,
	       p->cur, p->end, percent(p), p->bytes_copied, p->bytes_skipped,
	       p->bytes_zero, p->rate);
}

static void on_progress(void *opaque, const struct stream_progress *p)
{
	struct stream_ui *ui = opaque;
	double pct = percent(p), secs = elapsed(ui), eta = -1;
	char done[32];
	int i, fill;

	if (ui->output == TOOL_OUT_JSON) {
		printf("{\"event\": \"progress\", ");
		print_counters_json(p);
		printf(", \"seconds\": %.3f}\n", secs);
		fflush(stdout);
		return;
	}
	if (!ui->bar)
		return;
	if (p->cur && p->cur < p->end)
		eta = secs * (double)(p->end - p->cur) / (double)p->cur;
	fill = (int)(pct / 100.0 * 30.0);
	fprintf(stderr, "\r[");
	for (i = 0; i < 30; i++)
		fputc(i < fill ? '#' : '.', stderr);
	fprintf(stderr, "] %5.1f%%  %s copied  %7.1f MiB/s", pct,
		tool_human_size(p->bytes_copied, done, sizeof(done)),
		/* The engine's rate needs half a second; average before. */
		(p->rate    ? (double)p->rate
		 : secs > 0 ? (double)p->bytes_copied / secs
			    : 0.0) /
			1048576.0);
	if (eta >= 0)
		fprintf(stderr, "  ETA %02d:%02d", (int)eta / 60,
			(int)eta % 60);
	else
		fprintf(stderr, "           ");
	fflush(stderr);
}

/* "100M", "1.5G", "4096": bytes, binary suffixes. */
static int parse_size(const char *s, uint64_t *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || v < 0)
		return -EINVAL;
	switch (*end) {
	case 'k':
	case 'K':
		v *= 1024.0;
		end++;
		break;
	case 'm':
	case 'M':
		v *= 1048576.0;
		end++;
		break;
	case 'g':
	case 'G':
		v *= 1073741824.0;
		end++;
		break;
	case '\0':
		break;
	default:
		return -EINVAL;
	}
	if (*end == 'i' && end[1] == 'B')
		end += 2;
	else if (*end == 'B')
		end++;
	if (*end || v > 1.8e19)
		return -EINVAL;
	*out = (uint64_t)v;
	return 0;
}

/* The layer of top's chain that is the file at path. */
static int find_base(struct img *top, const char *path, struct img **out)
{
	struct stat want, st;
	struct img *l;

	if (stat(path, &want) < 0)
		return sx_error(errno, "%s: %s", path, strerror(errno));
	for (l = top->backing; l; l = l->backing) {
		if (stat(l->path, &st) == 0 && st.st_dev == want.st_dev &&
		    st.st_ino == want.st_ino) {
			*out = l;
			return 0;
		}
	}
	return sx_error(EINVAL, "%s: not in the backing chain of %s", path,
			top->path);
}

static void stream_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon stream [OPTIONS] IMAGE\n"
		"\n"
		"Copy every cluster IMAGE does not hold yet from its backing chain into\n"
		"IMAGE, then drop the backing reference (or, with --base, point it at\n"
		"BASE). Interrupting (Ctrl-C) stops cleanly; running the command again\n"
		"resumes, skipping what is already local.\n"
		"\n"
		"Options:\n"
		"  -f, --format FMT      format of IMAGE (default: probe)\n"
		"  -b, --base BASE       stream only the layers above BASE (a file of\n"
		"                        the chain); IMAGE's backing becomes BASE\n"
		"  -s, --speed RATE      limit to RATE bytes/s (K, M, G suffixes;\n"
		"                        0 = unlimited, the default)\n"
		"  -q, --queue-depth N   extents in flight (default %d)\n"
		"  -e, --extent-size SZ  bytes per extent (default %d KiB)\n"
		"      --progress        draw progress on stderr (default on a\n"
		"                        terminal)\n"
		"      --no-progress     do not\n"
		"  -o, --output FMT      human (default) or json: JSON lines on stdout,\n"
		"                        {\"event\": \"progress\", ...} then one summary\n"
		"                        {\"event\": \"done\"|\"aborted\"|\"failed\", ...}\n"
		"  -h, --help            this help\n"
		"\n"
		"%s"
		"  130 interrupted; the image is consistent, run again to resume\n",
		STREAM_DEFAULT_INFLIGHT, STREAM_DEFAULT_EXTENT / 1024,
		tool_exit_help);
}

static void summary(const struct stream_ui *ui, const char *path,
		    const struct stream_progress *p, int ret)
{
	const char *event = ret == 0		? "done"
			    : ret == -ECANCELED ? "aborted"
						: "failed";
	double secs = elapsed(ui);
	char b1[32], b2[32], b3[32];

	if (ui->output == TOOL_OUT_JSON) {
		printf("{\"event\": \"%s\", \"image\": ", event);
		json_string(stdout, path);
		printf(", ");
		print_counters_json(p);
		printf(", \"seconds\": %.3f, \"finalized\": %s", secs,
		       p->finalized ? "true" : "false");
		if (ret < 0) {
			printf(", \"error\": ");
			json_string(stdout, sx_last_error()[0]
						    ? sx_last_error()
						    : strerror(-ret));
		}
		printf("}\n");
		return;
	}
	if (ui->bar)
		fputc('\n', stderr);
	if (ret == 0)
		printf("%s: streamed in %.2f s: %s copied, %s already local, "
		       "%s zero%s\n",
		       path, secs,
		       tool_human_size(p->bytes_copied, b1, sizeof(b1)),
		       tool_human_size(p->bytes_skipped, b2, sizeof(b2)),
		       tool_human_size(p->bytes_zero, b3, sizeof(b3)),
		       p->finalized ? "; backing reference updated" : "");
	else if (ret == -ECANCELED)
		fprintf(stderr,
			"siphon: %s: aborted at %.1f%% (cluster %" PRIu64
			" of %" PRIu64 "), %s copied; run again to resume\n",
			path, percent(p), p->cur, p->end,
			tool_human_size(p->bytes_copied, b1, sizeof(b1)));
}

static int stream_run_cmd(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"format", required_argument, NULL, 'f'},
		{"base", required_argument, NULL, 'b'},
		{"speed", required_argument, NULL, 's'},
		{"queue-depth", required_argument, NULL, 'q'},
		{"extent-size", required_argument, NULL, 'e'},
		{"progress", no_argument, NULL, 'P'},
		{"no-progress", no_argument, NULL, 'N'},
		{"output", required_argument, NULL, 'o'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *fmt = NULL, *base_path = NULL, *path;
	struct stream_opts so = {0};
	struct stream_ui ui = {0};
	struct stream_progress p = {0};
	struct sio_queue *q = NULL;
	struct stream *s = NULL;
	struct img *top = NULL;
	struct sigaction sa = {0}, old_int, old_term;
	int progress = -1, c, ret, rc = TOOL_ERR;
	uint64_t v;

	while ((c = getopt_long(argc, argv, "+:f:b:s:q:e:o:h", opts, NULL)) !=
	       -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'b':
			base_path = optarg;
			break;
		case 's':
			if (parse_size(optarg, &so.speed) < 0)
				return tool_usage(cmd, "bad --speed '%s'",
						  optarg);
			break;
		case 'q':
			if (parse_size(optarg, &v) < 0 || v < 1 || v > 1024)
				return tool_usage(
					cmd, "--queue-depth takes 1..1024");
			so.max_inflight = (unsigned)v;
			break;
		case 'e':
			if (parse_size(optarg, &v) < 0 || v < 512 ||
			    v > (64u << 20))
				return tool_usage(
					cmd, "--extent-size takes 512..64M");
			so.extent_bytes = v;
			break;
		case 'P':
			progress = 1;
			break;
		case 'N':
			progress = 0;
			break;
		case 'o':
			if (!tool_parse_output(optarg, &ui.output))
				return tool_usage(cmd, "unknown output '%s'",
						  optarg);
			break;
		case 'h':
			stream_help(stdout);
			return TOOL_OK;
		default:
			return tool_bad_option(cmd, c, argv);
		}
	}
	if (optind != argc - 1)
		return tool_usage(cmd, "expected one IMAGE");
	path = argv[optind];
	ui.bar = progress == 1 || (progress == -1 && isatty(STDERR_FILENO));
	if (ui.output == TOOL_OUT_JSON && progress == 0)
		so.progress_ms = UINT32_MAX;

	ret = img_open(path, fmt, IMG_OPEN_RDWR, &top);
	if (ret < 0)
		goto fail;
	if (base_path) {
		ret = find_base(top, base_path, &so.base);
		if (ret < 0)
			goto fail;
	}
	so.max_inflight =
		so.max_inflight ? so.max_inflight : STREAM_DEFAULT_INFLIGHT;
	ret = sio_queue_create(so.max_inflight * 4, &q);
	if (ret < 0)
		goto fail;
	so.top = top;
	so.q = q;
	so.progress = on_progress;
	so.progress_opaque = &ui;
	ret = stream_create(&so, &s);
	if (ret < 0)
		goto fail;

	clock_gettime(CLOCK_MONOTONIC, &ui.t0);
	running = s;
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	ret = stream_run(s, UINT64_MAX, 0);
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	running = NULL;

	stream_get_progress(s, &p);
	summary(&ui, path, &p, ret);
	if (ret == -ECANCELED)
		rc = TOOL_INTERRUPTED;
	else if (ret < 0)
		rc = tool_fail(ret);
	else
		rc = TOOL_OK;
	goto out;
fail:
	rc = tool_fail(ret);
out:
	stream_destroy(s);
	sio_queue_destroy(q);
	img_close(top);
	return rc;
}

const struct siphon_cmd cmd_stream = {
	.name = "stream",
	.summary = "copy what an image lacks from its backing chain, then "
		   "drop the backing",
	.run = stream_run_cmd,
	.help = stream_help,
};

/*
 * `siphon stream`: offline population of an image from its backing chain.
 *
 * A client of the public API, running exactly the path a VMM runs: a domain
 * with the image attached (read-write, its chain read-only), a CONTINUOUS
 * stream, progress from siphon_get_block_stream_info_ex() while it runs and
 * the domain's event when it ends; the engine drops the backing reference
 * (or points it at --base). On a terminal it draws a progress line on
 * stderr; with --output=json it prints JSON lines on stdout: progress
 * events, then one summary. Ctrl-C (SIGINT) or SIGTERM abort cleanly
 * (siphon_block_stream_abort): in-flight work completes, metadata is
 * flushed, and a later run resumes where it stopped.
 *
 * --on-error=pause: a stream that runs out of space (or meets EIO, EDQUOT)
 * pauses instead of failing; the tool says so once, then resumes it every
 * RETRY_SECONDS, or sooner when the image's filesystem has more room
 * (statvfs), until it completes or is interrupted.
 *
 * The signal handler only writes a byte to a pipe; the main loop polls that
 * pipe next to the domain's event fd, so no siphon call runs in a handler.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "common/error.h"
#include "io/nbd.h"
#include "io/nbd_name.h"
#include "siphon.h"
#include "cmd.h"
#include "json.h"

/* The library documents io's defaults and limits as its own. */
_Static_assert(
	SIPHON_NBD_DEFAULT_RECONNECT_MS == SIO_NBD_DEFAULT_RECONNECT_MS &&
		SIPHON_NBD_DEFAULT_TIMEOUT_MS == SIO_NBD_DEFAULT_TIMEOUT_MS &&
		SIPHON_NBD_DEFAULT_CONNECTIONS == SIO_NBD_DEFAULT_CONNECTIONS &&
		SIPHON_NBD_MAX_CONNECTIONS == SIO_NBD_MAX_CONNECTIONS &&
		SIPHON_NBD_OFF == SIO_NBD_OFF,
	"siphon.h and io/nbd.h disagree on NBD settings");

/* Exit code when interrupted, as shells report a SIGINT death. */
#define TOOL_INTERRUPTED 130

/* --on-error=pause: resume a paused stream this often (or on more room). */
#define RETRY_SECONDS 2
/* How often, while paused, the free space is looked at. */
#define PAUSED_POLL_MS 250

/* Written by the signal handler, polled by the main loop. */
static int sig_pipe[2] = {-1, -1};

static void on_signal(int sig)
{
	char c = (char)sig;
	int saved = errno;

	if (write(sig_pipe[1], &c, 1) < 0) {
		/* full: an abort is already pending */
	}
	errno = saved;
}

/* What the tool shows of a stream, from the extended info. */
struct stream_progress {
	uint64_t cur; /* clusters below cur are local */
	uint64_t end; /* clusters of the top */
	uint64_t bytes_copied;
	uint64_t bytes_skipped;
	uint64_t bytes_zero;
	uint64_t rate;
	bool finalized;
	int state; /* enum siphon_stream_state */
	int error; /* positive errno while paused or once failed */
	/* The pipeline (siphon_block_stream_info_ex, since 0.1.2). */
	uint64_t inflight_bytes;
	uint64_t window_bytes;
	uint64_t request_bytes;
	uint64_t device_rate;
	uint64_t latency_us;
	uint64_t read_request_bytes;
	uint64_t write_request_bytes;
};

struct stream_ui {
	enum tool_output output;
	bool bar;
	struct timespec t0;
	unsigned pauses; /* PAUSED events seen */
};

/* --on-error=pause: the tool's side of a pause. */
struct pause_state {
	bool paused; /* the last event was PAUSED, not resumed since */
	bool announced; /* said so; not again until it moved on */
	uint64_t at; /* clusters_done when it paused */
	uint64_t offset; /* the same in bytes */
	uint64_t free_bytes; /* room on the image's filesystem then */
	double retry_at; /* elapsed() of the next resume */
};

static const char *errno_name(int err)
{
	const char *n = strerrorname_np(err);

	return n ? n : "EIO";
}

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
	printf(", \"inflight_bytes\": %" PRIu64 ", \"window_bytes\": %" PRIu64
	       ", \"request_bytes\": %" PRIu64 ", \"device_rate\": %" PRIu64
	       ", \"latency_us\": %" PRIu64 ", \"read_request_bytes\": %" PRIu64
	       ", \"write_request_bytes\": %" PRIu64,
	       p->inflight_bytes, p->window_bytes, p->request_bytes,
	       p->device_rate, p->latency_us, p->read_request_bytes,
	       p->write_request_bytes);
	printf(", \"state\": \"%s\"", siphon_stream_state_name(p->state));
	if (p->error)
		printf(", \"errno\": \"%s\"", errno_name(p->error));
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
	if (p->state == SIPHON_STREAM_PAUSED) {
		fprintf(stderr, "] %5.1f%%  %s copied  paused: %s", pct,
			tool_human_size(p->bytes_copied, done, sizeof(done)),
			strerror(p->error));
		fflush(stderr);
		return;
	}
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

/*
 * Seconds (a decimal, 0..3600) as milliseconds, at least 1 unless 0 (which
 * turns the setting off): 0, or -EINVAL.
 */
static int parse_seconds(const char *s, unsigned *ms)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (end == s || *end || errno || !(v >= 0 && v <= 3600))
		return -EINVAL;
	*ms = (unsigned)(v * 1000 + 0.5);
	if (v > 0 && !*ms)
		*ms = 1;
	return 0;
}

static void stream_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon stream [OPTIONS] IMAGE\n"
		"\n"
		"Copy every cluster IMAGE does not hold yet from its backing chain into\n"
		"IMAGE, then drop the backing reference (or, with --base, point it at\n"
		"BASE). Interrupting (Ctrl-C) stops cleanly; running the command again\n"
		"resumes, skipping what is already local. Backing layers may be NBD\n"
		"exports (nbd://, nbd+unix://, json:); a dropped connection is made\n"
		"again for up to 10 s (--nbd-reconnect) while the copy waits, then\n"
		"the stream fails and a later run resumes.\n"
		"\n"
		"Options:\n"
		"  -f, --format FMT      format of IMAGE (default: probe)\n"
		"  -b, --base BASE       stream only the layers above BASE (a file of\n"
		"                        the chain); IMAGE's backing becomes BASE\n"
		"  -s, --speed RATE      limit to RATE bytes/s (K, M, G suffixes;\n"
		"                        0 = unlimited, the default)\n"
		"  -q, --queue-depth N   fix the copy extents in flight, 1..1024\n"
		"                        (default: the engine steers the bytes in\n"
		"                        flight by what the device delivers)\n"
		"  -e, --extent-size SZ  fix the bytes per extent, 512..64M (default:\n"
		"                        chosen the same way, 256K..8M)\n"
		"  -m, --buffer-size SZ  copy buffers in flight at most, 1M..1G\n"
		"                        (default 32M; with both -q and -e, at least\n"
		"                        their product)\n"
		"      --on-error=stop|pause\n"
		"                        when the stream's own I/O fails: stop (the\n"
		"                        default: it fails, exit 1) or, on ENOSPC,\n"
		"                        EDQUOT or EIO, pause: say so, keep what was\n"
		"                        copied, and resume every %d s (sooner when\n"
		"                        the image's filesystem has more room) until\n"
		"                        it completes or is interrupted\n"
		"      --progress        draw progress on stderr (default on a\n"
		"                        terminal)\n"
		"      --no-progress     do not\n"
		"      --nbd-reconnect SECONDS\n"
		"                        how long a dropped NBD connection is tried\n"
		"                        again, with backoff, before reads fail and\n"
		"                        the stream ends (0..3600, default 10; 0:\n"
		"                        never)\n"
		"      --nbd-timeout SECONDS\n"
		"                        a server that answers no request for this\n"
		"                        long counts as dropped (0..3600, default\n"
		"                        30; 0: wait forever)\n"
		"      --nbd-connections N\n"
		"                        connections per worker to a server that\n"
		"                        allows several (multi-conn), 1..16\n"
		"                        (default 4)\n"
		"  -o, --output FMT      human (default) or json: JSON lines on stdout,\n"
		"                        {\"event\": \"progress\", ..., \"state\": ...},\n"
		"                        {\"event\": \"paused\"|\"resumed\", ...} with\n"
		"                        --on-error=pause, then one summary\n"
		"                        {\"event\": \"done\"|\"aborted\"|\"failed\", ...}\n"
		"  -h, --help            this help\n"
		"\n"
		"%s"
		"  130 interrupted; the image is consistent, run again to resume\n",
		RETRY_SECONDS, tool_exit_help);
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
		printf(", \"seconds\": %.3f, \"finalized\": %s, \"pauses\": %u",
		       secs, p->finalized ? "true" : "false", ui->pauses);
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

/* A snapshot of the stream of disk `abs` (the last one once it ended). */
static int get_progress(siphon_domain *dom, const char *abs,
			struct stream_progress *p,
			struct siphon_block_stream_info_ex *out)
{
	struct siphon_block_stream_info_ex x[4];
	int n, i;

	memset(x, 0, sizeof(x));
	x[0].size = sizeof(x[0]);
	n = siphon_get_block_stream_info_ex(dom, x, 4, SIPHON_INFO_ALL);
	if (n < 0)
		return n;
	for (i = 0; i < n && i < 4; i++) {
		if (strcmp(x[i].path, abs))
			continue;
		p->cur = x[i].clusters_done;
		p->end = x[i].clusters;
		p->bytes_copied = x[i].bytes_copied;
		p->bytes_skipped = x[i].bytes_skipped;
		p->bytes_zero = x[i].bytes_zero;
		p->rate = x[i].rate;
		p->finalized = x[i].state == SIPHON_STREAM_COMPLETED;
		p->state = x[i].state;
		p->error = x[i].error;
		p->inflight_bytes = x[i].inflight_bytes;
		p->window_bytes = x[i].window_bytes;
		p->request_bytes = x[i].request_bytes;
		p->device_rate = x[i].device_rate;
		p->latency_us = x[i].latency_us;
		p->read_request_bytes = x[i].read_request_bytes;
		p->write_request_bytes = x[i].write_request_bytes;
		if (out)
			*out = x[i];
		return 1;
	}
	return 0;
}

/* Bytes free for an unprivileged writer on the filesystem of path, or 0. */
static uint64_t free_bytes(const char *path)
{
	struct statvfs sv;

	if (statvfs(path, &sv) < 0)
		return 0;
	return (uint64_t)sv.f_bavail * sv.f_frsize;
}

/* A PAUSED event: say so (once per place it stops at), plan the retry. */
static void on_paused(siphon_domain *dom, const char *abs, struct stream_ui *ui,
		      struct pause_state *ps, const struct siphon_event *ev)
{
	struct siphon_block_stream_info_ex x;
	struct stream_progress p;

	ui->pauses++;
	ps->paused = true;
	ps->free_bytes = free_bytes(abs);
	ps->retry_at = elapsed(ui) + RETRY_SECONDS;
	if (get_progress(dom, abs, &p, &x) <= 0)
		return;
	if (ps->announced && ps->at == x.clusters_done)
		return; /* the same place again: said already */
	ps->announced = true;
	ps->at = x.clusters_done;
	ps->offset = x.clusters_done * x.cluster_size;
	if (ui->output == TOOL_OUT_JSON) {
		printf("{\"event\": \"paused\", \"image\": ");
		json_string(stdout, abs);
		printf(", \"errno\": \"%s\", \"error\": ",
		       errno_name(ev->error));
		json_string(stdout, ev->message);
		printf(", \"offset\": %" PRIu64 ", \"retry_seconds\": %d, ",
		       ps->offset, RETRY_SECONDS);
		print_counters_json(&p);
		printf(", \"seconds\": %.3f}\n", elapsed(ui));
		fflush(stdout);
		return;
	}
	if (ui->bar)
		fputc('\n', stderr);
	fprintf(stderr,
		"siphon: paused: %s: %s at offset %" PRIu64
		"; retrying every %d s\n",
		abs, strerror(ev->error), ps->offset, RETRY_SECONDS);
	fflush(stderr);
}

/* Paused: resume when it is time, or when the filesystem has more room. */
static int maybe_resume(siphon_domain *dom, const char *abs,
			struct stream_ui *ui, struct pause_state *ps)
{
	int ret;

	if (elapsed(ui) < ps->retry_at && free_bytes(abs) <= ps->free_bytes)
		return 0;
	ret = siphon_block_stream_resume(dom, abs, 0);
	/* Not paused (any more): its event is on the way. */
	if (ret < 0 && ret != -EINVAL && ret != -ESRCH && ret != -ECANCELED)
		return ret;
	ps->paused = false;
	return 0;
}

/* It copied past the place it paused at: say it goes on. */
static void check_resumed(const char *abs, struct stream_ui *ui,
			  struct pause_state *ps,
			  const struct stream_progress *p)
{
	if (!ps->announced || ps->paused || p->state != SIPHON_STREAM_RUNNING ||
	    p->cur <= ps->at)
		return;
	ps->announced = false;
	if (ui->output == TOOL_OUT_JSON) {
		printf("{\"event\": \"resumed\", \"image\": ");
		json_string(stdout, abs);
		printf(", \"offset\": %" PRIu64 ", \"seconds\": %.3f}\n",
		       ps->offset, elapsed(ui));
		fflush(stdout);
		return;
	}
	if (ui->bar)
		fputc('\n', stderr);
	fprintf(stderr, "siphon: resumed: %s: from offset %" PRIu64 "\n", abs,
		ps->offset);
	fflush(stderr);
}

/*
 * Wait for the stream's end event, reporting progress every progress_ms
 * and turning a signal into an abort; a PAUSED event (--on-error=pause) is
 * announced and the stream resumed as maybe_resume() says. Returns 0
 * (completed), -ECANCELED (aborted), or the failure's -errno with its
 * message recorded.
 */
static int wait_stream(siphon_domain *dom, const char *abs,
		       struct stream_ui *ui, int progress_ms)
{
	struct siphon_event ev = {.size = sizeof(ev)};
	struct pause_state ps = {0};
	struct pollfd pfd[2];
	struct stream_progress p;
	bool aborting = false;
	double shown = 0;
	int ret, timeout;

	pfd[0].fd = siphon_domain_event_fd(dom);
	pfd[0].events = POLLIN;
	pfd[1].fd = sig_pipe[0];
	pfd[1].events = POLLIN;
	for (;;) {
		ret = siphon_domain_next_event(dom, &ev);
		if (ret < 0)
			return ret;
		if (ret > 0 && !strcmp(ev.path, abs)) {
			if (ev.kind != SIPHON_EVENT_STREAM_PAUSED)
				break;
			if (!aborting)
				on_paused(dom, abs, ui, &ps, &ev);
			continue;
		}
		timeout = progress_ms;
		/* Paused, or waiting to see it move on: look often. */
		if ((ps.paused || ps.announced) &&
		    (timeout < 0 || timeout > PAUSED_POLL_MS))
			timeout = PAUSED_POLL_MS;
		if (poll(pfd, 2, timeout) < 0 && errno != EINTR)
			return sx_error(-errno, "poll: %s", strerror(errno));
		if ((pfd[1].revents & POLLIN) && !aborting) {
			char c;

			if (read(sig_pipe[0], &c, 1) < 0) {
				/* drained by an earlier read */
			}
			aborting = true;
			ret = siphon_block_stream_abort(dom, abs,
							SIPHON_ABORT_ASYNC);
			if (ret < 0 && ret != -ESRCH)
				return ret;
		}
		if (ps.paused && !aborting) {
			ret = maybe_resume(dom, abs, ui, &ps);
			if (ret < 0)
				return ret;
		}
		if (pfd[0].revents & POLLIN)
			continue;
		if ((progress_ms >= 0 || ps.announced) &&
		    get_progress(dom, abs, &p, NULL) > 0) {
			check_resumed(abs, ui, &ps, &p);
			/* Every progress_ms, however often it looks. */
			if (progress_ms >= 0 &&
			    elapsed(ui) - shown >=
				    progress_ms / 1000.0 - 0.01) {
				shown = elapsed(ui);
				on_progress(ui, &p);
			}
		}
	}
	switch (ev.kind) {
	case SIPHON_EVENT_STREAM_COMPLETED:
		return 0;
	case SIPHON_EVENT_STREAM_CANCELLED:
		return sx_error(-ECANCELED, "%s: stream aborted", abs);
	default:
		return sx_error(-(ev.error ? ev.error : EIO), "%s",
				ev.message[0]
					? ev.message
					: strerror(ev.error ? ev.error : EIO));
	}
}

static int stream_run_cmd(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"format", required_argument, NULL, 'f'},
		{"base", required_argument, NULL, 'b'},
		{"speed", required_argument, NULL, 's'},
		{"queue-depth", required_argument, NULL, 'q'},
		{"extent-size", required_argument, NULL, 'e'},
		{"buffer-size", required_argument, NULL, 'm'},
		{"progress", no_argument, NULL, 'P'},
		{"no-progress", no_argument, NULL, 'N'},
		{"output", required_argument, NULL, 'o'},
		{"nbd-reconnect", required_argument, NULL, 'R'},
		{"nbd-timeout", required_argument, NULL, 'T'},
		{"nbd-connections", required_argument, NULL, 'C'},
		{"on-error", required_argument, NULL, 'E'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	unsigned reconnect_ms = SIPHON_NBD_DEFAULT_RECONNECT_MS;
	unsigned timeout_ms = SIPHON_NBD_DEFAULT_TIMEOUT_MS;
	unsigned connections = SIPHON_NBD_DEFAULT_CONNECTIONS;
	struct siphon_block_stream_params prm = {.size = sizeof(prm)};
	struct siphon_attach_opts ao = {.size = sizeof(ao)};
	struct siphon_domain_opts dopt = {.size = sizeof(dopt)};
	const char *path;
	char abs[PATH_MAX], msg[SX_ERROR_MAX];
	struct stream_ui ui = {0};
	struct stream_progress p = {0};
	siphon_domain *dom = NULL;
	struct sigaction sa = {0}, old_int, old_term;
	int progress = -1, progress_ms = 500, c, ret, rc = TOOL_ERR;
	bool attached = false, handlers = false;
	uint64_t v;

	while ((c = getopt_long(argc, argv, "+:f:b:s:q:e:m:o:h", opts, NULL)) !=
	       -1) {
		switch (c) {
		case 'f':
			ao.format = optarg;
			break;
		case 'b':
			prm.base = optarg;
			break;
		case 's':
			if (parse_size(optarg, &prm.bandwidth) < 0)
				return tool_usage(cmd, "bad --speed '%s'",
						  optarg);
			break;
		case 'q':
			if (parse_size(optarg, &v) < 0 || v < 1 || v > 1024)
				return tool_usage(
					cmd, "--queue-depth takes 1..1024");
			prm.queue_depth = (unsigned)v;
			break;
		case 'e':
			if (parse_size(optarg, &v) < 0 || v < 512 ||
			    v > (64u << 20))
				return tool_usage(
					cmd, "--extent-size takes 512..64M");
			prm.extent_size = v;
			break;
		case 'm':
			if (parse_size(optarg, &v) < 0 || v < (1u << 20) ||
			    v > (1u << 30))
				return tool_usage(cmd,
						  "--buffer-size takes 1M..1G");
			dopt.stream_buffer_bytes = v;
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
		case 'R':
			if (parse_seconds(optarg, &reconnect_ms) < 0)
				return tool_usage(
					cmd,
					"--nbd-reconnect takes 0..3600 "
					"seconds, not '%s'",
					optarg);
			break;
		case 'T':
			if (parse_seconds(optarg, &timeout_ms) < 0)
				return tool_usage(cmd,
						  "--nbd-timeout takes 0..3600 "
						  "seconds, not '%s'",
						  optarg);
			break;
		case 'C':
			if (parse_size(optarg, &v) < 0 || v < 1 ||
			    v > SIPHON_NBD_MAX_CONNECTIONS)
				return tool_usage(
					cmd, "--nbd-connections takes 1..%u",
					SIPHON_NBD_MAX_CONNECTIONS);
			connections = (unsigned)v;
			break;
		case 'E':
			if (!tool_parse_on_error(optarg, &prm.on_error))
				return tool_usage(cmd,
						  "--on-error takes stop or "
						  "pause, not '%s'",
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
	/* 0 on the command line is off; in the attach options, the default. */
	ao.nbd_reconnect_ms = reconnect_ms ? reconnect_ms : SIPHON_NBD_OFF;
	ao.nbd_timeout_ms = timeout_ms ? timeout_ms : SIPHON_NBD_OFF;
	ao.nbd_connections = connections;
	path = argv[optind];
	ui.bar = progress == 1 || (progress == -1 && isatty(STDERR_FILENO));
	/* JSON without progress: only the summary. */
	if (ui.output == TOOL_OUT_JSON && progress == 0)
		progress_ms = -1;
	else if (ui.output != TOOL_OUT_JSON && !ui.bar)
		progress_ms = -1;

	/* An export cannot be written: it can be a base, never IMAGE. */
	if (sio_nbd_name_is_remote(path)) {
		ret = sx_error(-EROFS,
			       "%s: an NBD export is read-only and cannot be "
			       "streamed into; stream an overlay that has it "
			       "as backing file",
			       path);
		goto fail;
	}
	/* Disks are named by the absolute path of their image. */
	if (!realpath(path, abs)) {
		ret = sx_error(-errno, "%s: %s", path, strerror(errno));
		goto fail;
	}
	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		ret = sx_error(-errno, "pipe: %s", strerror(errno));
		goto fail;
	}
	/*
	 * From here on a signal aborts cleanly: one that arrives while the
	 * disk is still being attached waits in the pipe and aborts the
	 * stream as soon as it starts.
	 */
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	handlers = true;
	/* Room for every extent's reads and writes. */
	if (prm.queue_depth)
		dopt.queue_depth = prm.queue_depth * 4;
	/* Both fixed: the buffers they ask for, not fewer. */
	v = (uint64_t)prm.queue_depth * prm.extent_size;
	if (v >
	    (dopt.stream_buffer_bytes ? dopt.stream_buffer_bytes : 32ull << 20))
		dopt.stream_buffer_bytes = v;
	ret = siphon_domain_create(&dopt, &dom);
	if (ret < 0)
		goto fail;
	ret = siphon_disk_attach(dom, abs, &ao);
	if (ret < 0)
		goto fail;
	attached = true;

	clock_gettime(CLOCK_MONOTONIC, &ui.t0);
	ret = siphon_block_stream_ex(dom, abs, NULL, SIPHON_STREAM_CONTINUOUS,
				     &prm);
	if (ret < 0)
		goto fail;
	if (progress_ms >= 0 && get_progress(dom, abs, &p, NULL) > 0)
		on_progress(&ui, &p);
	ret = wait_stream(dom, abs, &ui, progress_ms);

	/* The final counters, as the engine left them; keep the message. */
	snprintf(msg, sizeof(msg), "%s", sx_last_error());
	/* Like every progress line, the last one is drawn in any case. */
	if (get_progress(dom, abs, &p, NULL) > 0)
		on_progress(&ui, &p);
	if (ret == -ECANCELED)
		sx_error(ret,
			 "%s: stream aborted at cluster %" PRIu64
			 " of %" PRIu64,
			 abs, p.cur, p.end);
	else if (ret < 0)
		sx_error(ret, "%s", msg[0] ? msg : strerror(-ret));
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
	if (attached && siphon_disk_detach(dom, abs, 0) < 0 && rc == TOOL_OK)
		rc = tool_fail(-EIO);
	siphon_domain_close(dom);
	if (handlers) {
		sigaction(SIGINT, &old_int, NULL);
		sigaction(SIGTERM, &old_term, NULL);
	}
	if (sig_pipe[0] >= 0) {
		close(sig_pipe[0]);
		close(sig_pipe[1]);
		sig_pipe[0] = sig_pipe[1] = -1;
	}
	return rc;
}

const struct siphon_cmd cmd_stream = {
	.name = "stream",
	.summary = "copy what an image lacks from its backing chain, then "
		   "drop the backing",
	.run = stream_run_cmd,
	.help = stream_help,
};

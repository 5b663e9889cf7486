/*
 * `siphon serve`: attach images and export each over NBD (server/), until
 * SIGTERM or SIGINT; optionally stream every disk in the background while
 * clients use it. A client of the public API like any VMM: the server
 * sends every request through siphon's guest I/O.
 *
 * Shutdown: the signal stops the server (no new connections, no new
 * requests; what is in flight completes and is answered), then every disk
 * is flushed and the domain closed, which aborts the streams cleanly; the
 * images are consistent and a later `siphon serve --stream` or `siphon
 * stream` resumes where this one stopped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "io/nbd.h"
#include "server/control.h"
#include "server/fuse_export.h"
#include "server/nbd_server.h"
#include "siphon.h"
#include "cmd.h"

#define MAX_LISTEN 16

static struct nbd_server *g_server; /* for the signal handler */
static struct ctl *g_ctl; /* for the event callback */

static void on_signal(int sig)
{
	(void)sig;
	nbd_server_stop(g_server);
}

static void on_quit(void *opaque)
{
	nbd_server_stop(opaque);
}

static int g_log_level = NBD_LOG_INFO;
static pthread_mutex_t g_log_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

static void logv(enum nbd_log_level lv, const char *fmt, va_list ap)
{
	if ((int)lv > g_log_level)
		return;
	pthread_mutex_lock(&g_log_mu);
	fprintf(stderr, "siphon serve: %s: ", level_names[lv]);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	pthread_mutex_unlock(&g_log_mu);
}

__attribute__((format(printf, 2, 3))) static void slog(enum nbd_log_level lv,
						       const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	logv(lv, fmt, ap);
	va_end(ap);
}

static void server_log(void *opaque, enum nbd_log_level lv, const char *msg)
{
	(void)opaque;
	slog(lv, "%s", msg);
}

/* Stream events, from the domain's event thread. */
static void on_event(siphon_domain *dom, const struct siphon_event *ev,
		     void *opaque)
{
	(void)dom;
	(void)opaque;
	switch (ev->kind) {
	case SIPHON_EVENT_STREAM_COMPLETED:
		slog(NBD_LOG_INFO,
		     "%s: stream completed (%" PRIu64
		     " bytes copied), no backing file left",
		     ev->path, ev->bytes_copied);
		break;
	case SIPHON_EVENT_STREAM_CANCELLED:
		slog(NBD_LOG_INFO,
		     "%s: stream stopped (%" PRIu64
		     " bytes copied); it resumes next time",
		     ev->path, ev->bytes_copied);
		break;
	case SIPHON_EVENT_STREAM_FAILED:
		slog(NBD_LOG_ERROR, "%s: stream failed: %s", ev->path,
		     ev->message[0] ? ev->message : strerror(ev->error));
		break;
	case SIPHON_EVENT_STREAM_PAUSED:
		slog(NBD_LOG_WARN,
		     "%s; resume it with `siphon ctl SOCKET resume`",
		     ev->message[0] ? ev->message : strerror(ev->error));
		break;
	}
	ctl_event(g_ctl, ev);
}

static void serve_help(FILE *out)
{
	fprintf(out,
		"Usage: siphon serve [OPTIONS] [IMAGE[=EXPORT]...]\n"
		"\n"
		"Attach each IMAGE (its backing chain too) and export it over NBD\n"
		"as EXPORT (default: the image's file name; the first image is\n"
		"also the default export). Every client request goes through\n"
		"siphon's guest I/O: reads of data still in the backing chain\n"
		"see it (and, while a stream runs, copy it into IMAGE), writes\n"
		"land in IMAGE and are never overwritten by the stream. Serves\n"
		"until SIGTERM or SIGINT, then answers what is in flight, stops\n"
		"the streams cleanly, flushes and exits 0; a stream resumes on\n"
		"the next run.\n"
		"\n"
		"Clients: qemu (file=nbd+unix:///EXPORT?socket=PATH), qemu-img,\n"
		"qemu-io, nbdcopy, nbdinfo, fio --ioengine=nbd, nbd-client.\n"
		"Exports advertise multi-conn, flush, FUA, trim, write-zeroes,\n"
		"cache and the base:allocation meta context; requests are\n"
		"512-byte aligned (the advertised minimum block size; unaligned\n"
		"reads are accepted), at most 32 MiB. No TLS.\n"
		"\n"
		"Options:\n"
		"  -l, --listen ADDR     unix:PATH (created mode 0600) or\n"
		"                        tcp:HOST:PORT; repeatable (default:\n"
		"                        unix:siphon.sock in the current\n"
		"                        directory)\n"
		"  -r, --read-only       refuse writes, trims and write-zeroes\n"
		"                        (EPERM); reads may still copy into the\n"
		"                        image while a stream runs\n"
		"      --cache MODE      none (default): a write is answered when\n"
		"                        the disk has it (O_DIRECT, as qemu's\n"
		"                        cache=none); writeback: answered when it is\n"
		"                        handed to the disk (at most 256 writes or\n"
		"                        32 MiB per export ahead), like a disk's\n"
		"                        write cache: later reads see it, FLUSH\n"
		"                        and FUA make it durable, a failure is\n"
		"                        reported by the next FLUSH; writes not yet\n"
		"                        done are lost if the daemon is killed\n"
		"                        (SIGKILL), not on SIGTERM\n"
		"      --stream          stream every disk in the background from\n"
		"                        the start (as `siphon stream`)\n"
		"  -b, --base BASE       with --stream: stream only the layers above\n"
		"                        BASE (a file of each chain)\n"
		"  -s, --speed RATE      with --stream: at most RATE bytes/s per\n"
		"                        disk (K, M, G suffixes; 0 = unlimited)\n"
		"      --on-error=stop|pause\n"
		"                        with --stream: on ENOSPC or an I/O error a\n"
		"                        stream fails (stop, default) or pauses,\n"
		"                        keeping what it copied, until resumed with\n"
		"                        `siphon ctl SOCKET resume DISK` (needs\n"
		"                        --control)\n"
		"  -f, --format FMT      format of every IMAGE (default: probe)\n"
		"      --fuse DIR        also show every disk as a file DIR/EXPORT of\n"
		"                        its virtual size (FUSE): read, write, fsync,\n"
		"                        fallocate punch-hole/zero-range,\n"
		"                        SEEK_DATA/SEEK_HOLE; unmounted at exit\n"
		"  -c, --control PATH    a JSON-lines control socket at PATH (mode\n"
		"                        0600): attach, detach, stream, abort,\n"
		"                        resume, set-speed, info, events, quit; drive\n"
		"                        it with\n"
		"                        `siphon ctl PATH ...` (see siphon help ctl)\n"
		"      --max-connections N\n"
		"                        clients at once, 1..4096 (default %u);\n"
		"                        more are refused\n"
		"      --handshake-timeout SECONDS\n"
		"                        drop a client that has not finished the\n"
		"                        handshake by then (default %u)\n"
		"      --pidfile PATH    write the process id there once serving;\n"
		"                        removed at exit\n"
		"      --log-level LVL   error, warn, info (default) or debug; on\n"
		"                        stderr\n"
		"  -h, --help            this help\n"
		"\n"
		"Exit codes:\n"
		"  0  stopped by a signal, images consistent\n"
		"  1  error (an image, a socket, ...)\n"
		"  2  usage error (bad option or argument)\n",
		NBD_SERVER_DEFAULT_MAX_CONNECTIONS,
		NBD_SERVER_DEFAULT_HANDSHAKE_MS / 1000);
}

/*
 * IMAGE[=EXPORT]: split at the last '=' when what follows names no
 * directory (a path may itself hold '='). arg is modified.
 */
static void split_export(char *arg, const char **image, const char **exp)
{
	char *eq = strrchr(arg, '=');
	const char *slash;

	*image = arg;
	*exp = NULL;
	if (eq && eq != arg && eq[1] && !strchr(eq + 1, '/')) {
		*eq = 0;
		*exp = eq + 1;
	}
	if (!*exp) {
		slash = strrchr(arg, '/');
		*exp = slash ? slash + 1 : arg;
	}
}

static int write_pidfile(const char *path)
{
	char buf[32];
	int fd, n;

	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return sx_error(-errno, "%s: %s", path, strerror(errno));
	n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
	if (write(fd, buf, (size_t)n) != n) {
		int err = errno ? errno : EIO;

		close(fd);
		return sx_error(-err, "%s: %s", path, strerror(err));
	}
	close(fd);
	return 0;
}

static int serve_run_cmd(const struct siphon_cmd *cmd, int argc, char **argv)
{
	static const struct option opts[] = {
		{"listen", required_argument, NULL, 'l'},
		{"read-only", no_argument, NULL, 'r'},
		{"cache", required_argument, NULL, 'C'},
		{"stream", no_argument, NULL, 'S'},
		{"base", required_argument, NULL, 'b'},
		{"speed", required_argument, NULL, 's'},
		{"on-error", required_argument, NULL, 'E'},
		{"format", required_argument, NULL, 'f'},
		{"control", required_argument, NULL, 'c'},
		{"fuse", required_argument, NULL, 'F'},
		{"max-connections", required_argument, NULL, 'M'},
		{"handshake-timeout", required_argument, NULL, 'H'},
		{"pidfile", required_argument, NULL, 'p'},
		{"log-level", required_argument, NULL, 'L'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *listen[MAX_LISTEN], *control = NULL, *fuse = NULL;
	struct fuse_export *fx = NULL;
	unsigned nlisten = 0;
	uint64_t v;
	struct nbd_server_opts so = {.log = server_log};
	struct siphon_block_stream_params prm = {.size = sizeof(prm)};
	struct ctl_opts co = {.log = server_log,
			      .attach = {.size = sizeof(co.attach)}};
	struct siphon_domain_opts dopt = {.size = sizeof(dopt),
					  .event_cb = on_event};
	struct sigaction sa = {0}, old_int, old_term, old_pipe;
	const char *pidfile = NULL, *image, *exp;
	struct nbd_server *srv = NULL;
	siphon_domain *dom = NULL;
	struct ctl *ctl = NULL;
	bool ro = false, stream = false, handlers = false, pid_written = false;
	bool on_error = false;
	int c, ret = 0, rc = TOOL_ERR;
	unsigned i;

	while ((c = getopt_long(argc, argv, "+:l:rb:s:f:c:h", opts, NULL)) !=
	       -1) {
		switch (c) {
		case 'l':
			if (nlisten == MAX_LISTEN)
				return tool_usage(cmd, "at most %d --listen",
						  MAX_LISTEN);
			if (strncmp(optarg, "unix:", 5) &&
			    strncmp(optarg, "tcp:", 4))
				return tool_usage(cmd,
						  "--listen takes unix:PATH or "
						  "tcp:HOST:PORT, not '%s'",
						  optarg);
			listen[nlisten++] = optarg;
			break;
		case 'r':
			ro = true;
			break;
		case 'C':
			if (!strcmp(optarg, "writeback"))
				so.writeback = true;
			else if (!strcmp(optarg, "none"))
				so.writeback = false;
			else
				return tool_usage(cmd,
						  "--cache takes none or "
						  "writeback, not '%s'",
						  optarg);
			break;
		case 'S':
			stream = true;
			break;
		case 'b':
			prm.base = optarg;
			break;
		case 's':
			if (tool_parse_bytes(optarg, &prm.bandwidth) < 0)
				return tool_usage(cmd, "bad --speed '%s'",
						  optarg);
			break;
		case 'E':
			if (!tool_parse_on_error(optarg, &prm.on_error))
				return tool_usage(cmd,
						  "--on-error takes stop or "
						  "pause, not '%s'",
						  optarg);
			on_error = true;
			break;
		case 'f':
			co.attach.format = optarg;
			break;
		case 'c':
			control = optarg;
			break;
		case 'F':
			fuse = optarg;
			break;
		case 'M':
			if (tool_parse_bytes(optarg, &v) < 0 || v < 1 ||
			    v > 4096)
				return tool_usage(
					cmd, "--max-connections takes 1..4096");
			so.max_connections = (unsigned)v;
			break;
		case 'H':
			if (tool_parse_bytes(optarg, &v) < 0 || v < 1 ||
			    v > 3600)
				return tool_usage(cmd, "--handshake-timeout "
						       "takes 1..3600 seconds");
			so.handshake_ms = (unsigned)v * 1000;
			break;
		case 'p':
			pidfile = optarg;
			break;
		case 'L':
			for (i = 0; i < 4; i++)
				if (!strcmp(optarg, level_names[i]))
					break;
			if (i == 4)
				return tool_usage(cmd,
						  "--log-level takes error, "
						  "warn, info or debug");
			g_log_level = (int)i;
			break;
		case 'h':
			serve_help(stdout);
			return TOOL_OK;
		default:
			return tool_bad_option(cmd, c, argv);
		}
	}
	if (optind == argc && !control)
		return tool_usage(cmd, "expected an IMAGE (or --control, to "
				       "attach them later)");
	if (argc - optind > (int)CTL_MAX_DISKS)
		return tool_usage(cmd, "at most %u images", CTL_MAX_DISKS);
	if ((prm.base || prm.bandwidth || on_error) && !stream)
		return tool_usage(cmd, "--base, --speed and --on-error go with "
				       "--stream");
	if (prm.on_error == SIPHON_ON_ERROR_PAUSE && !control)
		return tool_usage(cmd, "--on-error=pause needs --control (a "
				       "paused stream is resumed through it)");
	if (!nlisten)
		listen[nlisten++] = "unix:siphon.sock";

	ret = nbd_server_create(&so, &srv);
	if (ret < 0) {
		sx_error(ret, "cannot create the server: %s", strerror(-ret));
		goto fail;
	}
	ret = siphon_domain_create(&dopt, &dom);
	if (ret < 0)
		goto fail;
	co.dom = dom;
	co.nbd = srv;
	co.read_only = ro;
	co.quit = on_quit;
	co.quit_opaque = srv;
	if (fuse) {
		ret = fuse_export_start(fuse, server_log, NULL, &fx);
		if (ret < 0) {
			sx_error(ret,
				 "cannot mount a FUSE file system on %s: %s",
				 fuse,
				 ret == -ENODEV
					 ? "no /dev/fuse (modprobe fuse, or "
					   "run the container with it)"
					 : strerror(-ret));
			goto fail;
		}
		co.fuse = fx;
	}
	ret = ctl_create(&co, &ctl);
	if (ret < 0)
		goto fail;
	g_ctl = ctl;
	for (; optind < argc; optind++) {
		split_export(argv[optind], &image, &exp);
		if (sio_nbd_name_is_remote(image)) {
			ret = sx_error(-EROFS,
				       "%s: an NBD export cannot be served "
				       "read-write; serve an overlay that "
				       "has it as backing file",
				       image);
			goto fail;
		}
		ret = ctl_attach(ctl, image, exp, NULL);
		if (ret < 0) {
			sx_error(ret, "%s", siphon_get_error());
			goto fail;
		}
	}
	for (i = 0; i < nlisten; i++) {
		ret = nbd_server_listen(srv, listen[i]);
		if (ret < 0) {
			sx_error(ret, "cannot listen on %s: %s", listen[i],
				 strerror(-ret));
			goto fail;
		}
		slog(NBD_LOG_INFO, "listening on %s", listen[i]);
	}
	g_server = srv;
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, &old_pipe);
	handlers = true;
	if (control) {
		ret = ctl_listen(ctl, control);
		if (ret < 0) {
			sx_error(ret, "cannot listen on %s: %s", control,
				 strerror(-ret));
			goto fail;
		}
		slog(NBD_LOG_INFO, "control socket %s", control);
	}
	if (stream) {
		ret = ctl_stream_all(ctl, &prm);
		if (ret < 0)
			goto fail;
	}
	if (pidfile) {
		ret = write_pidfile(pidfile);
		if (ret < 0)
			goto fail;
		pid_written = true;
	}
	ret = nbd_server_run(srv);
	if (ret < 0) {
		sx_error(ret, "server: %s", strerror(-ret));
		goto fail;
	}
	rc = TOOL_OK;
	goto out;
fail:
	rc = tool_fail(ret);
out:
	/* No command may race with the domain's close. */
	ctl_stop(ctl);
	/* Nothing is in flight any more: make what clients wrote durable. */
	if (ctl) {
		ret = ctl_flush_all(ctl);
		if (ret < 0 && rc == TOOL_OK)
			rc = tool_fail(ret);
	}
	/* Releases the disk handles; then the domain stops the streams
	   cleanly, detaches and closes every disk. */
	fuse_export_stop(fx);
	nbd_server_destroy(srv);
	g_server = NULL;
	siphon_domain_close(dom);
	g_ctl = NULL;
	ctl_destroy(ctl);
	if (handlers) {
		sigaction(SIGINT, &old_int, NULL);
		sigaction(SIGTERM, &old_term, NULL);
		sigaction(SIGPIPE, &old_pipe, NULL);
	}
	if (pid_written)
		unlink(pidfile);
	if (rc == TOOL_OK)
		slog(NBD_LOG_INFO, "stopped; images flushed");
	return rc;
}

const struct siphon_cmd cmd_serve = {
	.name = "serve",
	.summary = "export images over NBD to any client, streaming them "
		   "in the background",
	.run = serve_run_cmd,
	.help = serve_help,
};

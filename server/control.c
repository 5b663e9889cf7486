/*
 * The daemon's disk registry and its JSON-lines control socket (see
 * control.h for the protocol).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/json_parse.h"
#include "server/control.h"

struct ctl_disk {
	char path[PATH_MAX];
	char *export_name;
	uint64_t size;
};

struct ctl_client {
	int fd; /* -1: free slot */
	char in[CTL_MAX_LINE + 1];
	size_t in_len;
	bool events; /* subscribed */
	bool dead; /* a send failed: closed by the socket thread */
};

struct ctl {
	struct ctl_opts o;
	pthread_mutex_t mu; /* disks, clients' sends and flags */
	struct ctl_disk disks[CTL_MAX_DISKS];
	unsigned ndisks;
	struct ctl_client cl[CTL_MAX_CLIENTS];
	int lfd;
	char *lpath;
	int wake[2]; /* the socket thread's stop pipe */
	pthread_t thread;
	bool running;
};

#define clog_(c, lv, ...) \
	nbd_logf((c)->o.log, (c)->o.log_opaque, lv, __VA_ARGS__)

/* ---- a one-line JSON writer ---- */

struct jb {
	char *buf;
	size_t len, cap;
	bool oom;
	bool comma[16];
	int depth;
};

static void jb_put(struct jb *j, const char *s, size_t n)
{
	if (j->oom)
		return;
	if (j->len + n + 2 > j->cap) {
		size_t cap = (j->cap ? j->cap * 2 : 256) + n;
		char *b = realloc(j->buf, cap);

		if (!b) {
			j->oom = true;
			return;
		}
		j->buf = b;
		j->cap = cap;
	}
	memcpy(j->buf + j->len, s, n);
	j->len += n;
	j->buf[j->len] = 0;
}

static void jb_puts(struct jb *j, const char *s)
{
	jb_put(j, s, strlen(s));
}

static void jb_string(struct jb *j, const char *s, size_t n)
{
	char esc[8];

	jb_put(j, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (ch == '"' || ch == '\\') {
			esc[0] = '\\';
			esc[1] = (char)ch;
			jb_put(j, esc, 2);
		} else if (ch < 0x20) {
			snprintf(esc, sizeof(esc), "\\u%04x", ch);
			jb_puts(j, esc);
		} else {
			jb_put(j, (const char *)&ch, 1);
		}
	}
	jb_put(j, "\"", 1);
}

static void jb_key(struct jb *j, const char *key)
{
	if (j->comma[j->depth])
		jb_put(j, ",", 1);
	j->comma[j->depth] = true;
	if (key) {
		jb_string(j, key, strlen(key));
		jb_put(j, ":", 1);
	}
}

static void jb_open(struct jb *j, const char *key, const char *c)
{
	jb_key(j, key);
	jb_puts(j, c);
	if (j->depth < 15)
		j->comma[++j->depth] = false;
}

static void jb_close(struct jb *j, const char *c)
{
	jb_puts(j, c);
	if (j->depth)
		j->depth--;
}

static void jb_str(struct jb *j, const char *key, const char *v)
{
	jb_key(j, key);
	jb_string(j, v, strlen(v));
}

static void jb_u64(struct jb *j, const char *key, uint64_t v)
{
	char b[32];

	jb_key(j, key);
	snprintf(b, sizeof(b), "%" PRIu64, v);
	jb_puts(j, b);
}

static void jb_bool(struct jb *j, const char *key, bool v)
{
	jb_key(j, key);
	jb_puts(j, v ? "true" : "false");
}

/* ---- sending ---- */

/* Send one line to a client; caller holds c->mu. */
static void send_line(struct ctl_client *cl, struct jb *j)
{
	size_t off = 0;

	if (cl->fd < 0 || cl->dead || j->oom)
		return;
	jb_put(j, "\n", 1);
	while (off < j->len) {
		ssize_t n = send(cl->fd, j->buf + off, j->len - off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			/* Gone, or not reading: the socket thread closes it. */
			cl->dead = true;
			shutdown(cl->fd, SHUT_RDWR);
			return;
		}
		off += (size_t)n;
	}
}

static const char *errno_name(int err)
{
	const char *n = strerrorname_np(err < 0 ? -err : err);

	return n ? n : "EIO";
}

/* ---- the registry ---- */

static struct ctl_disk *find_disk(struct ctl *c, const char *name)
{
	char abs[PATH_MAX];

	for (unsigned i = 0; i < c->ndisks; i++)
		if (!strcmp(c->disks[i].path, name) ||
		    !strcmp(c->disks[i].export_name, name))
			return &c->disks[i];
	if (realpath(name, abs))
		for (unsigned i = 0; i < c->ndisks; i++)
			if (!strcmp(c->disks[i].path, abs))
				return &c->disks[i];
	return NULL;
}

/* This thread's message for the reply being built (else the library's). */
static __thread char t_msg[512];

static int fail(int err, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static int fail(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(t_msg, sizeof(t_msg), fmt, ap);
	va_end(ap);
	return err;
}

/* The message for err: ours, else the library's, else strerror. */
static const char *message(int err)
{
	if (t_msg[0])
		return t_msg;
	if (siphon_get_error() && siphon_get_error()[0])
		return siphon_get_error();
	return strerror(-err);
}

int ctl_attach(struct ctl *c, const char *path, const char *name, char *out)
{
	char abs[PATH_MAX];
	const char *slash;
	siphon_disk *disk = NULL;
	struct ctl_disk *d;
	uint64_t size = 0;
	int ret;

	t_msg[0] = 0;
	if (!realpath(path, abs))
		return fail(-errno, "%s: %s", path, strerror(errno));
	if (!name || !*name) {
		slash = strrchr(abs, '/');
		name = slash ? slash + 1 : abs;
	}
	pthread_mutex_lock(&c->mu);
	if (c->ndisks == CTL_MAX_DISKS) {
		pthread_mutex_unlock(&c->mu);
		return fail(-ENOSPC, "at most %u disks", CTL_MAX_DISKS);
	}
	for (unsigned i = 0; i < c->ndisks; i++)
		if (!strcmp(c->disks[i].export_name, name)) {
			pthread_mutex_unlock(&c->mu);
			return fail(-EEXIST, "export '%s' is taken (%s)", name,
				    c->disks[i].path);
		}
	pthread_mutex_unlock(&c->mu);
	ret = siphon_disk_attach(c->o.dom, abs, &c->o.attach);
	if (ret < 0)
		return ret;
	ret = siphon_disk_get(c->o.dom, abs, &disk);
	if (ret >= 0)
		ret = siphon_disk_get_size(disk, &size);
	if (ret >= 0) {
		ret = nbd_server_add_export(c->o.nbd, name, disk,
					    c->o.read_only);
		if (ret < 0)
			ret = fail(ret, "export '%s': %s", name,
				   ret == -EEXIST ? "the name is taken"
						  : strerror(-ret));
		else
			disk = NULL; /* the server's now */
	}
	siphon_disk_put(disk);
	disk = NULL;
	if (ret >= 0 && c->o.fuse) {
		ret = siphon_disk_get(c->o.dom, abs, &disk);
		if (ret >= 0)
			ret = fuse_export_add(c->o.fuse, name, disk,
					      c->o.read_only);
		if (ret < 0) {
			siphon_disk_put(disk);
			nbd_server_remove_export(c->o.nbd, name);
			ret = fail(ret, "FUSE file '%s': %s", name,
				   strerror(-ret));
		}
	}
	if (ret >= 0) {
		pthread_mutex_lock(&c->mu);
		d = &c->disks[c->ndisks];
		snprintf(d->path, sizeof(d->path), "%s", abs);
		d->export_name = strdup(name);
		d->size = size;
		if (d->export_name)
			c->ndisks++;
		else
			ret = -ENOMEM;
		pthread_mutex_unlock(&c->mu);
		if (ret < 0) {
			nbd_server_remove_export(c->o.nbd, name);
			if (c->o.fuse)
				fuse_export_remove(c->o.fuse, name);
		}
	}
	if (ret < 0) {
		char keep[512];

		snprintf(keep, sizeof(keep), "%s", message(ret));
		siphon_disk_detach(c->o.dom, abs, 0);
		fail(ret, "%s", keep);
		return ret;
	}
	clog_(c, NBD_LOG_INFO, "export '%s': %s%s", name, abs,
	      c->o.read_only ? " (read-only)" : "");
	if (out)
		snprintf(out, PATH_MAX, "%s", abs);
	return 0;
}

static int ctl_detach(struct ctl *c, const char *name)
{
	char path[PATH_MAX], *exp;
	struct ctl_disk *d;
	int ret;

	pthread_mutex_lock(&c->mu);
	d = find_disk(c, name);
	if (!d) {
		pthread_mutex_unlock(&c->mu);
		return fail(-ENOENT, "%s: no such disk", name);
	}
	snprintf(path, sizeof(path), "%s", d->path);
	exp = d->export_name;
	*d = c->disks[--c->ndisks];
	pthread_mutex_unlock(&c->mu);
	nbd_server_remove_export(c->o.nbd, exp);
	if (c->o.fuse)
		fuse_export_remove(c->o.fuse, exp);
	ret = siphon_disk_detach(c->o.dom, path, 0);
	clog_(c, NBD_LOG_INFO, "export '%s' (%s) detached", exp, path);
	free(exp);
	return ret;
}

/* The path of the i-th disk into path (PATH_MAX): false past the last. */
static bool disk_path_at(struct ctl *c, unsigned i, char *path)
{
	bool ok;

	pthread_mutex_lock(&c->mu);
	ok = i < c->ndisks;
	if (ok)
		snprintf(path, PATH_MAX, "%s", c->disks[i].path);
	pthread_mutex_unlock(&c->mu);
	return ok;
}

int ctl_stream_all(struct ctl *c,
		   const struct siphon_block_stream_params *params)
{
	char path[PATH_MAX];
	int ret = 0;

	for (unsigned i = 0; disk_path_at(c, i, path); i++) {
		ret = siphon_block_stream_ex(c->o.dom, path, NULL,
					     SIPHON_STREAM_CONTINUOUS, params);
		if (ret < 0)
			return ret;
		clog_(c, NBD_LOG_INFO, "%s: streaming", path);
	}
	return 0;
}

int ctl_flush_all(struct ctl *c)
{
	char path[PATH_MAX];
	siphon_disk *disk;
	int ret, first = 0;

	for (unsigned i = 0; disk_path_at(c, i, path); i++) {
		ret = siphon_disk_get(c->o.dom, path, &disk);
		if (ret >= 0) {
			ret = siphon_disk_flush(disk, 0);
			siphon_disk_put(disk);
		}
		if (ret < 0 && !first)
			first = ret;
	}
	return first;
}

/* ---- commands ---- */

static void cmd_info(struct ctl *c, struct jb *j)
{
	struct siphon_block_stream_info_ex *x;
	int n;

	x = calloc(CTL_MAX_DISKS, sizeof(*x));
	if (!x) {
		j->oom = true;
		return;
	}
	x[0].size = sizeof(*x);
	n = siphon_get_block_stream_info_ex(c->o.dom, x, CTL_MAX_DISKS,
					    SIPHON_INFO_ALL);
	if (n > (int)CTL_MAX_DISKS)
		n = CTL_MAX_DISKS;
	jb_open(j, "disks", "[");
	pthread_mutex_lock(&c->mu);
	for (unsigned i = 0; i < c->ndisks; i++) {
		const struct ctl_disk *d = &c->disks[i];

		jb_open(j, NULL, "{");
		jb_str(j, "path", d->path);
		jb_str(j, "export", d->export_name);
		jb_u64(j, "size", d->size);
		jb_bool(j, "read_only", c->o.read_only);
		for (int k = 0; k < n; k++) {
			if (strcmp(x[k].path, d->path))
				continue;
			jb_open(j, "stream", "{");
			jb_str(j, "state",
			       siphon_stream_state_name(x[k].state));
			jb_bool(j, "continuous",
				x[k].flags & SIPHON_STREAM_CONTINUOUS);
			jb_u64(j, "cur", x[k].cur);
			jb_u64(j, "end", x[k].end);
			jb_u64(j, "bytes_copied", x[k].bytes_copied);
			jb_u64(j, "bytes_skipped", x[k].bytes_skipped);
			jb_u64(j, "bytes_zero", x[k].bytes_zero);
			jb_u64(j, "rate", x[k].rate);
			jb_u64(j, "bandwidth", x[k].bandwidth);
			jb_str(j, "base", x[k].base);
			if (x[k].error) {
				jb_str(j, "errno", errno_name(x[k].error));
				jb_str(j, "message", x[k].message);
			}
			jb_close(j, "}");
			break;
		}
		jb_close(j, "}");
	}
	pthread_mutex_unlock(&c->mu);
	jb_close(j, "]");
	free(x);
}

/* A string member, or NULL (absent; *bad set when present but not one). */
static const char *arg_str(const struct sx_json *req, const char *key,
			   bool *bad)
{
	const struct sx_json *v = sx_json_get(req, key);

	if (!v)
		return NULL;
	if (v->type != SX_JSON_STRING || strlen(v->str) != v->len) {
		*bad = true;
		return NULL;
	}
	return v->str;
}

/* A non-negative integer member: 1 and *out, 0 when absent, -EINVAL. */
static int arg_u64(const struct sx_json *req, const char *key, uint64_t *out)
{
	const struct sx_json *v = sx_json_get(req, key);
	int64_t i;

	if (!v)
		return 0;
	if (sx_json_int64(v, &i) < 0 || i < 0)
		return fail(-EINVAL, "'%s' must be a non-negative integer",
			    key);
	*out = (uint64_t)i;
	return 1;
}

/*
 * Run one request; the reply's members after "ok" go into j. Returns 0 or
 * -errno (the reply then says why). *quit when the daemon must stop.
 */
static int run_cmd(struct ctl *c, struct ctl_client *cl,
		   const struct sx_json *req, struct jb *j, bool *quit)
{
	struct siphon_block_stream_params prm = {.size = sizeof(prm)};
	const char *cmd, *path, *image, *name, *base, *on_error;
	char abs[PATH_MAX], dpath[PATH_MAX];
	struct ctl_disk *d;
	uint64_t v = 0, cursor = 0;
	bool bad = false;
	int ret, has;

	cmd = arg_str(req, "cmd", &bad);
	if (!cmd)
		return fail(-EINVAL, "a request needs \"cmd\"");
	path = arg_str(req, "path", &bad);
	if (bad)
		return fail(-EINVAL, "\"path\" must be a string");
	/* Commands on a disk take its path or export name. */
	if (path && strcmp(cmd, "attach")) {
		pthread_mutex_lock(&c->mu);
		d = find_disk(c, path);
		if (d)
			snprintf(dpath, sizeof(dpath), "%s", d->path);
		pthread_mutex_unlock(&c->mu);
		if (!d)
			return fail(-ENOENT, "%s: no such disk", path);
		path = dpath;
	}
	if (!strcmp(cmd, "info")) {
		cmd_info(c, j);
		return 0;
	}
	if (!strcmp(cmd, "quit")) {
		*quit = true;
		return 0;
	}
	if (!strcmp(cmd, "events")) {
		cl->events = true;
		return 0;
	}
	if (!strcmp(cmd, "attach")) {
		image = arg_str(req, "image", &bad);
		name = arg_str(req, "export", &bad);
		if (bad || !image)
			return fail(-EINVAL, "attach needs \"image\" (and "
					     "optionally \"export\") strings");
		ret = ctl_attach(c, image, name, abs);
		if (ret < 0)
			return ret;
		jb_str(j, "path", abs);
		pthread_mutex_lock(&c->mu);
		d = find_disk(c, abs);
		jb_str(j, "export", d ? d->export_name : "");
		pthread_mutex_unlock(&c->mu);
		return 0;
	}
	if (!path)
		return fail(-EINVAL, "%s needs \"path\"", cmd);
	if (!strcmp(cmd, "detach"))
		return ctl_detach(c, path);
	if (!strcmp(cmd, "abort"))
		return siphon_block_stream_abort(c->o.dom, path, 0);
	if (!strcmp(cmd, "resume"))
		return siphon_block_stream_resume(c->o.dom, path, 0);
	if (!strcmp(cmd, "set-speed")) {
		has = arg_u64(req, "speed", &v);
		if (has < 0)
			return has;
		if (!has)
			return fail(-EINVAL, "set-speed needs \"speed\"");
		return siphon_block_stream_set_speed(c->o.dom, path, v, 0);
	}
	if (!strcmp(cmd, "stream")) {
		base = arg_str(req, "base", &bad);
		if (bad)
			return fail(-EINVAL, "\"base\" must be a string");
		prm.base = base;
		on_error = arg_str(req, "on_error", &bad);
		if (bad || (on_error && strcmp(on_error, "stop") &&
			    strcmp(on_error, "pause")))
			return fail(-EINVAL,
				    "\"on_error\" is \"stop\" or \"pause\"");
		if (on_error && !strcmp(on_error, "pause"))
			prm.on_error = SIPHON_ON_ERROR_PAUSE;
		has = arg_u64(req, "speed", &prm.bandwidth);
		if (has < 0)
			return has;
		has = arg_u64(req, "cursor", &cursor);
		if (has < 0)
			return has;
		if (!has)
			return siphon_block_stream_ex(c->o.dom, path, NULL,
						      SIPHON_STREAM_CONTINUOUS,
						      &prm);
		ret = siphon_block_stream_ex(c->o.dom, path, &cursor, 0, &prm);
		if (ret < 0)
			return ret;
		jb_u64(j, "cursor", cursor);
		{
			struct siphon_block_stream_info in[CTL_MAX_DISKS];
			int n = siphon_get_block_stream_info(c->o.dom, in,
							     CTL_MAX_DISKS, 0);

			for (int k = 0; k < n && k < (int)CTL_MAX_DISKS; k++)
				if (!strcmp(in[k].path, path))
					jb_u64(j, "end", in[k].end);
		}
		return 0;
	}
	return fail(-EINVAL, "unknown command '%s'", cmd);
}

/* One line from a client: parse, run, answer. */
static void handle_line(struct ctl *c, struct ctl_client *cl, const char *line,
			size_t len)
{
	struct sx_json *req = NULL;
	const struct sx_json *id;
	struct jb j = {0};
	bool quit = false;
	int ret;

	t_msg[0] = 0;
	ret = sx_json_parse(line, len, &req);
	if (ret < 0)
		ret = fail(-EINVAL, "not JSON: %s", siphon_get_error());
	else if (req->type != SX_JSON_OBJECT)
		ret = fail(-EINVAL, "a request is a JSON object");
	jb_open(&j, NULL, "{");
	id = req && req->type == SX_JSON_OBJECT ? sx_json_get(req, "id") : NULL;
	if (id && id->type == SX_JSON_NUMBER) {
		jb_key(&j, "id");
		jb_puts(&j, id->str);
	} else if (id && id->type == SX_JSON_STRING) {
		jb_key(&j, "id");
		jb_string(&j, id->str, id->len);
	}
	if (ret >= 0) {
		struct jb body = {0};

		ret = run_cmd(c, cl, req, &body, &quit);
		jb_bool(&j, "ok", ret >= 0);
		if (ret >= 0 && body.len) {
			jb_put(&j, ",", 1);
			jb_put(&j, body.buf, body.len);
		}
		if (body.oom)
			j.oom = true;
		free(body.buf);
	} else {
		jb_bool(&j, "ok", false);
	}
	if (ret < 0) {
		jb_str(&j, "errno", errno_name(ret));
		jb_str(&j, "error", message(ret));
	}
	jb_close(&j, "}");
	pthread_mutex_lock(&c->mu);
	send_line(cl, &j);
	pthread_mutex_unlock(&c->mu);
	free(j.buf);
	sx_json_free(req);
	if (quit && c->o.quit) {
		clog_(c, NBD_LOG_INFO, "quit requested on the control socket");
		c->o.quit(c->o.quit_opaque);
	}
}

void ctl_event(struct ctl *c, const struct siphon_event *ev)
{
	struct jb j = {0};
	const char *kind =
		ev->kind == SIPHON_EVENT_STREAM_COMPLETED   ? "completed"
		: ev->kind == SIPHON_EVENT_STREAM_CANCELLED ? "cancelled"
		: ev->kind == SIPHON_EVENT_STREAM_PAUSED    ? "paused"
							    : "failed";

	if (!c)
		return;
	jb_open(&j, NULL, "{");
	jb_str(&j, "event", kind);
	jb_str(&j, "path", ev->path);
	jb_u64(&j, "bytes_copied", ev->bytes_copied);
	if (ev->error) {
		jb_str(&j, "errno", errno_name(ev->error));
		jb_str(&j, "error",
		       ev->message[0] ? ev->message : strerror(ev->error));
	}
	jb_close(&j, "}");
	pthread_mutex_lock(&c->mu);
	for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++) {
		size_t keep = j.len;

		if (c->cl[i].fd >= 0 && c->cl[i].events) {
			send_line(&c->cl[i], &j);
			j.len = keep; /* without the newline it added */
		}
	}
	pthread_mutex_unlock(&c->mu);
	free(j.buf);
}

/* ---- the socket ---- */

static void client_close(struct ctl *c, struct ctl_client *cl)
{
	pthread_mutex_lock(&c->mu);
	close(cl->fd);
	cl->fd = -1;
	cl->events = false;
	cl->dead = false;
	cl->in_len = 0;
	pthread_mutex_unlock(&c->mu);
}

static void client_read(struct ctl *c, struct ctl_client *cl)
{
	ssize_t n = recv(cl->fd, cl->in + cl->in_len, CTL_MAX_LINE - cl->in_len,
			 MSG_DONTWAIT);
	char *nl;

	if (n <= 0) {
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		client_close(c, cl);
		return;
	}
	cl->in_len += (size_t)n;
	while ((nl = memchr(cl->in, '\n', cl->in_len))) {
		size_t len = (size_t)(nl - cl->in);

		handle_line(c, cl, cl->in, len);
		memmove(cl->in, nl + 1, cl->in_len - len - 1);
		cl->in_len -= len + 1;
	}
	if (cl->in_len == CTL_MAX_LINE) {
		struct jb j = {0};

		jb_puts(&j, "{\"ok\":false,\"errno\":\"EINVAL\",\"error\":"
			    "\"request line too long\"}");
		pthread_mutex_lock(&c->mu);
		send_line(cl, &j);
		pthread_mutex_unlock(&c->mu);
		free(j.buf);
		client_close(c, cl);
	}
}

static void *ctl_thread(void *arg)
{
	struct ctl *c = arg;
	struct pollfd p[2 + CTL_MAX_CLIENTS];
	int idx[2 + CTL_MAX_CLIENTS];

	for (;;) {
		nfds_t n = 0;

		p[n++] = (struct pollfd){.fd = c->wake[0], .events = POLLIN};
		p[n++] = (struct pollfd){.fd = c->lfd, .events = POLLIN};
		for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++) {
			if (c->cl[i].fd < 0)
				continue;
			idx[n] = (int)i;
			p[n++] = (struct pollfd){.fd = c->cl[i].fd,
						 .events = POLLIN};
		}
		if (poll(p, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[0].revents)
			break;
		if (p[1].revents & POLLIN) {
			int fd = accept4(c->lfd, NULL, NULL, SOCK_CLOEXEC);
			unsigned i;

			for (i = 0; fd >= 0 && i < CTL_MAX_CLIENTS; i++)
				if (c->cl[i].fd < 0)
					break;
			if (fd >= 0 && i == CTL_MAX_CLIENTS) {
				clog_(c, NBD_LOG_WARN,
				      "control: too many clients, refused");
				close(fd);
			} else if (fd >= 0) {
				pthread_mutex_lock(&c->mu);
				c->cl[i].fd = fd;
				c->cl[i].in_len = 0;
				pthread_mutex_unlock(&c->mu);
			}
		}
		for (nfds_t k = 2; k < n; k++) {
			struct ctl_client *cl = &c->cl[idx[k]];

			if (!p[k].revents || cl->fd != p[k].fd)
				continue;
			if (cl->dead)
				client_close(c, cl);
			else
				client_read(c, cl);
		}
	}
	return NULL;
}

int ctl_create(const struct ctl_opts *o, struct ctl **out)
{
	struct ctl *c = calloc(1, sizeof(*c));

	if (!c)
		return -ENOMEM;
	c->o = *o;
	c->lfd = -1;
	c->wake[0] = c->wake[1] = -1;
	for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++)
		c->cl[i].fd = -1;
	pthread_mutex_init(&c->mu, NULL);
	*out = c;
	return 0;
}

int ctl_listen(struct ctl *c, const char *path)
{
	int ret;

	if (c->lfd >= 0)
		return -EBUSY;
	c->lfd = nbd_unix_listen(path);
	if (c->lfd < 0)
		return c->lfd;
	if (pipe2(c->wake, O_CLOEXEC) < 0) {
		ret = -errno;
		close(c->lfd);
		c->lfd = -1;
		unlink(path);
		return ret;
	}
	c->lpath = strdup(path);
	ret = pthread_create(&c->thread, NULL, ctl_thread, c);
	if (ret) {
		close(c->lfd);
		c->lfd = -1;
		unlink(path);
		return -ret;
	}
	c->running = true;
	return 0;
}

void ctl_stop(struct ctl *c)
{
	if (!c)
		return;
	if (c->running) {
		if (write(c->wake[1], "x", 1) < 0) {
			/* The thread then stops at its next wake-up. */
		}
		pthread_join(c->thread, NULL);
		c->running = false;
	}
	pthread_mutex_lock(&c->mu);
	for (unsigned i = 0; i < CTL_MAX_CLIENTS; i++)
		if (c->cl[i].fd >= 0) {
			close(c->cl[i].fd);
			c->cl[i].fd = -1;
		}
	pthread_mutex_unlock(&c->mu);
	if (c->lfd >= 0)
		close(c->lfd);
	c->lfd = -1;
	if (c->lpath)
		unlink(c->lpath);
	free(c->lpath);
	c->lpath = NULL;
}

void ctl_destroy(struct ctl *c)
{
	if (!c)
		return;
	ctl_stop(c);
	if (c->wake[0] >= 0) {
		close(c->wake[0]);
		close(c->wake[1]);
	}
	for (unsigned i = 0; i < c->ndisks; i++)
		free(c->disks[i].export_name);
	pthread_mutex_destroy(&c->mu);
	free(c);
}

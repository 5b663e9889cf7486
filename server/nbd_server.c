/*
 * The NBD server (nbd_server.h): connections, the handshake's options,
 * the transmission phase's requests and their replies, on one thread.
 *
 * A connection reads into a staging buffer and parses what it holds: the
 * client's flags, option headers and their data, request headers and
 * write payloads (a large payload is received straight into its
 * request's buffer). A request goes to the disk with the asynchronous
 * guest I/O calls; the completion callback, on the disk's worker thread,
 * only pushes the request onto the server's done list and signals the
 * eventfd. The server thread then builds the reply in the request's own
 * memory (room for the header is kept in front of read data, so a read's
 * reply is one contiguous block) and queues it on the connection, which
 * sends its queue with writev as the socket takes it.
 *
 * A connection that must go (EOF, a protocol violation, a send error) is
 * closed at once, but its struct lives until the requests it still has at
 * the disks complete.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "server/nbd_proto.h"
#include "server/nbd_server.h"

#define IN_SIZE (64u * 1024) /* a connection's staging buffer */
#define BUF_ALIGN 4096u /* data buffers: O_DIRECT needs no bounce */
#define MAX_EXPORTS 1024u
#define MAX_LISTENERS 16u
#define OUT_IOV 64 /* replies sent by one writev */
#define STATUS_EXTENTS 1024u /* runs asked for by one BLOCK_STATUS */
#define META_CONTEXT_ID 1u /* base:allocation's id on every connection */
#define SHUTDOWN_DRAIN_MS 5000u /* replies a client may take to read */

/* Write-back: acknowledged writes an export may have at its disk. */
#define WB_MAX_REQS 256u
#define WB_MAX_BYTES (32ull * 1024 * 1024)

/* ---- byte order ---- */

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)((unsigned)p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) << 32 | get32(p + 4);
}

static uint8_t *put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
	return p + 2;
}

static uint8_t *put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
	return p + 4;
}

static uint8_t *put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)(v >> 32));
	return put32(p + 4, (uint32_t)v);
}

/* ---- structures ---- */

enum item_kind { ITEM_LISTENER, ITEM_CONN, ITEM_DONE, ITEM_STOP };

struct item {
	enum item_kind kind;
};

/*
 * An export: held by the table while listed and by each connection that
 * chose it (refs, under exp_mu); the last reference releases the disk.
 */
struct nbd_export {
	char *name;
	siphon_disk *disk;
	uint64_t size;
	bool ro;
	unsigned refs;
	/*
	 * Write-back (nbd_server_opts.writeback; the server thread only):
	 * writes answered before the disk completed them (wb, linked by
	 * wb_prev/wb_next), requests held until those they overlap are done
	 * (held; no write is answered early while one waits, so none
	 * starves), and failures of answered writes (wb_gen counts them;
	 * wb_err is the last one's errno).
	 */
	struct nreq *wb;
	unsigned wb_reqs;
	uint64_t wb_bytes;
	struct nreq *held, **held_tail;
	unsigned wb_gen;
	int wb_err;
};

struct listener {
	struct item it;
	int fd;
	char *unix_path; /* unlinked at destroy */
	char *addr; /* for messages */
};

enum conn_state {
	CS_FLAGS, /* waiting for the client's 32-bit flags */
	CS_OPT_HDR, /* an option's 16-byte header */
	CS_OPT_DATA, /* its data */
	CS_TX_HDR, /* a request's 28-byte header */
	CS_TX_PAYLOAD, /* a write's data */
	CS_CLOSING, /* reads nothing more: replies go out, then close */
};

struct conn;

/*
 * A request, or any reply at all (options too): once built, hdr[0,
 * hdr_len) then [out, out + out_len) is what goes on the wire (out inside
 * mem); sent counts over both.
 */
struct nreq {
	struct conn *c;
	struct nreq *next;
	uint8_t cookie[8];
	uint16_t type, flags;
	uint64_t off;
	uint32_t len;
	int ret; /* the disk's answer: 0 or -errno */
	uint8_t *mem; /* owned */
	uint8_t *data; /* READ: the requested bytes; WRITE: the payload */
	uint32_t got; /* WRITE: payload bytes received */
	unsigned n; /* BLOCK_STATUS: runs */
	struct siphon_extent *ext;
	uint8_t hdr[32];
	unsigned hdr_len;
	const uint8_t *out;
	size_t out_len, out_sent;
	bool counted; /* in the connection's inflight accounting */
	bool early; /* a write already answered (write-back) */
	struct nreq *wb_prev, *wb_next; /* early: the export's list */
};

struct conn {
	struct item it;
	struct nbd_server *s;
	struct conn *prev, *next;
	int fd; /* -1 once closed */
	unsigned id;
	enum conn_state st;
	uint8_t in[IN_SIZE];
	size_t in_len;
	/* options */
	uint32_t opt_type, opt_len, opt_got;
	uint8_t *opt;
	bool no_zeroes, structured, meta;
	struct nbd_export *meta_exp; /* export the meta context is set for */
	struct nbd_export *exp; /* transmission */
	/* transmission */
	struct nreq *wr; /* CS_TX_PAYLOAD: the write being received */
	unsigned inflight; /* at the disks */
	uint64_t inflight_bytes;
	struct nreq *out_head, **out_tail;
	bool want_in, want_out; /* what epoll watches */
	uint64_t deadline_ns; /* handshake (or shutdown drain) deadline */
	unsigned wb_seen; /* the export's wb_gen its FLUSHes have reported */
};

struct nbd_server {
	struct nbd_server_opts o;
	struct nbd_export *exp[MAX_EXPORTS]; /* the first is the default */
	unsigned nexp;
	pthread_mutex_t exp_mu; /* exp, nexp, every export's refs */
	struct listener lis[MAX_LISTENERS];
	unsigned nlis;
	int ep;
	struct item done_it, stop_it;
	int done_fd, stop_fd;
	pthread_mutex_t mu;
	struct nreq *done; /* completed at the disks, for the server thread */
	struct conn *conns;
	atomic_uint nconn;
	unsigned next_id;
	unsigned pending; /* requests at the disks, all connections */
	bool stopping;
	uint64_t stop_deadline_ns;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define logf_(s, lv, ...) \
	nbd_logf((s)->o.log, (s)->o.log_opaque, lv, __VA_ARGS__)

void nbd_logf(nbd_log_fn fn, void *opaque, enum nbd_log_level lv,
	      const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	if (!fn)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fn(opaque, lv, msg);
}

static uint32_t nbd_errno(int err)
{
	switch (err < 0 ? -err : err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
	case EACCES:
		return NBD_EPERM;
	case ENOMEM:
		return NBD_ENOMEM;
	case EINVAL:
		return NBD_EINVAL;
	case ENOSPC:
	case EDQUOT:
		return NBD_ENOSPC;
	case EOVERFLOW:
		return NBD_EOVERFLOW;
	case ENOTSUP:
		return NBD_ENOTSUP;
	case ESHUTDOWN:
	case ENOENT: /* the disk is being detached */
		return NBD_ESHUTDOWN;
	default:
		return NBD_EIO;
	}
}

/* ---- creation ---- */

int nbd_server_create(const struct nbd_server_opts *opts,
		      struct nbd_server **out)
{
	struct nbd_server *s = calloc(1, sizeof(*s));
	struct epoll_event ev = {.events = EPOLLIN};

	if (!s)
		return -ENOMEM;
	if (opts)
		s->o = *opts;
	if (!s->o.max_connections)
		s->o.max_connections = NBD_SERVER_DEFAULT_MAX_CONNECTIONS;
	if (!s->o.handshake_ms)
		s->o.handshake_ms = NBD_SERVER_DEFAULT_HANDSHAKE_MS;
	pthread_mutex_init(&s->mu, NULL);
	pthread_mutex_init(&s->exp_mu, NULL);
	s->ep = epoll_create1(EPOLL_CLOEXEC);
	s->done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	s->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	s->done_it.kind = ITEM_DONE;
	s->stop_it.kind = ITEM_STOP;
	if (s->ep < 0 || s->done_fd < 0 || s->stop_fd < 0)
		goto fail;
	ev.data.ptr = &s->done_it;
	if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->done_fd, &ev) < 0)
		goto fail;
	ev.data.ptr = &s->stop_it;
	if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->stop_fd, &ev) < 0)
		goto fail;
	*out = s;
	return 0;
fail : {
	int err = -errno;

	nbd_server_destroy(s);
	return err;
}
}

static void exp_put(struct nbd_server *s, struct nbd_export *e)
{
	bool last;

	if (!e)
		return;
	pthread_mutex_lock(&s->exp_mu);
	last = !--e->refs;
	pthread_mutex_unlock(&s->exp_mu);
	if (last) {
		siphon_disk_put(e->disk);
		free(e->name);
		free(e);
	}
}

int nbd_server_add_export(struct nbd_server *s, const char *name,
			  siphon_disk *disk, bool read_only)
{
	struct nbd_export *e;
	uint64_t size;
	size_t len;
	int ret;

	if (!s || !name || !disk)
		return -EINVAL;
	len = strlen(name);
	if (!len || len > NBD_MAX_STRING)
		return -EINVAL;
	ret = siphon_disk_get_size(disk, &size);
	if (ret < 0)
		return ret;
	e = calloc(1, sizeof(*e));
	if (!e || !(e->name = strdup(name))) {
		free(e);
		return -ENOMEM;
	}
	e->disk = disk;
	e->size = size;
	e->ro = read_only;
	e->refs = 1;
	e->held_tail = &e->held;
	pthread_mutex_lock(&s->exp_mu);
	ret = s->nexp == MAX_EXPORTS ? -ENOSPC : 0;
	for (unsigned i = 0; i < s->nexp && !ret; i++)
		if (!strcmp(s->exp[i]->name, name))
			ret = -EEXIST;
	if (!ret)
		s->exp[s->nexp++] = e;
	pthread_mutex_unlock(&s->exp_mu);
	if (ret) {
		free(e->name);
		free(e);
	}
	return ret;
}

int nbd_server_remove_export(struct nbd_server *s, const char *name)
{
	struct nbd_export *e = NULL;

	if (!s || !name)
		return -EINVAL;
	pthread_mutex_lock(&s->exp_mu);
	for (unsigned i = 0; i < s->nexp; i++) {
		if (strcmp(s->exp[i]->name, name))
			continue;
		e = s->exp[i];
		memmove(&s->exp[i], &s->exp[i + 1],
			(s->nexp - i - 1) * sizeof(s->exp[0]));
		s->nexp--;
		break;
	}
	pthread_mutex_unlock(&s->exp_mu);
	if (!e)
		return -ENOENT;
	exp_put(s, e);
	return 0;
}

int nbd_unix_listen(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	struct stat st;
	int fd, ret;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	strcpy(sa.sun_path, path);
	/* An old socket is replaced; a file of another kind is not. */
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return -EEXIST;
		unlink(path);
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/*
	 * Linux makes the socket's file with the socket inode's mode (less
	 * the umask): set that to 0600 first, so the node is never open to
	 * others, without touching the process-wide umask. Checked after,
	 * for a kernel that does otherwise.
	 */
	ret = fchmod(fd, 0600);
	if (ret == 0)
		ret = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	if (ret == 0 && lstat(path, &st) == 0 && (st.st_mode & 0177) &&
	    chmod(path, 0600) < 0)
		ret = -1;
	if (ret < 0 || listen(fd, 128) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	return fd;
}

static int listen_unix(struct listener *l, const char *path)
{
	int fd = nbd_unix_listen(path);

	if (fd < 0)
		return fd;
	l->fd = fd;
	l->unix_path = strdup(path);
	return l->unix_path ? 0 : -ENOMEM;
}

static int listen_tcp(struct listener *l, const char *hostport)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
	struct addrinfo *res = NULL, *ai;
	char host[256];
	const char *colon = strrchr(hostport, ':'), *h = host, *port;
	size_t hl;
	int fd = -1, ret, one = 1;

	if (!colon || !colon[1])
		return -EINVAL;
	hl = (size_t)(colon - hostport);
	if (hl >= sizeof(host))
		return -EINVAL;
	memcpy(host, hostport, hl);
	host[hl] = 0;
	if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
		host[hl - 1] = 0;
		h = host + 1;
	}
	port = colon + 1;
	ret = getaddrinfo(*h ? h : NULL, port, &hints, &res);
	if (ret)
		return ret == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL;
	ret = -EADDRNOTAVAIL;
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family,
			    ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    ai->ai_protocol);
		if (fd < 0) {
			ret = -errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 &&
		    listen(fd, 128) == 0)
			break;
		ret = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return ret;
	l->fd = fd;
	return 0;
}

int nbd_server_listen(struct nbd_server *s, const char *addr)
{
	struct epoll_event ev = {.events = EPOLLIN};
	struct listener *l;
	int ret;

	if (!s || !addr)
		return -EINVAL;
	if (s->nlis == MAX_LISTENERS)
		return -ENOSPC;
	l = &s->lis[s->nlis];
	memset(l, 0, sizeof(*l));
	l->it.kind = ITEM_LISTENER;
	l->fd = -1;
	if (!strncmp(addr, "unix:", 5) && addr[5])
		ret = listen_unix(l, addr + 5);
	else if (!strncmp(addr, "tcp:", 4))
		ret = listen_tcp(l, addr + 4);
	else
		ret = -EINVAL;
	if (ret == 0) {
		l->addr = strdup(addr);
		ev.data.ptr = &l->it;
		if (!l->addr || epoll_ctl(s->ep, EPOLL_CTL_ADD, l->fd, &ev) < 0)
			ret = l->addr ? -errno : -ENOMEM;
	}
	if (ret < 0) {
		if (l->fd >= 0)
			close(l->fd);
		if (l->unix_path)
			unlink(l->unix_path);
		free(l->unix_path);
		free(l->addr);
		return ret;
	}
	s->nlis++;
	return 0;
}

/* ---- connections ---- */

static void conn_watch(struct conn *c)
{
	struct epoll_event ev = {.data.ptr = &c->it};
	bool in = c->st != CS_CLOSING &&
		  c->inflight < NBD_SERVER_CONN_MAX_REQS &&
		  c->inflight_bytes < NBD_SERVER_CONN_MAX_BYTES;
	bool out = c->out_head != NULL;

	if (c->fd < 0 || (in == c->want_in && out == c->want_out))
		return;
	ev.events = (in ? EPOLLIN | EPOLLRDHUP : 0) | (out ? EPOLLOUT : 0);
	epoll_ctl(c->s->ep, EPOLL_CTL_MOD, c->fd, &ev);
	c->want_in = in;
	c->want_out = out;
}

static void nreq_free(struct nreq *r)
{
	if (!r)
		return;
	free(r->mem);
	free(r->ext);
	free(r);
}

/*
 * Free the connections that are closed and have nothing at the disks; run
 * between event batches, so that no handler meets a freed connection.
 */
static void conn_reap(struct nbd_server *s)
{
	struct conn *c, *n;

	for (c = s->conns; c; c = n) {
		n = c->next;
		if (c->fd >= 0 || c->inflight)
			continue;
		if (c->prev)
			c->prev->next = c->next;
		else
			s->conns = c->next;
		if (c->next)
			c->next->prev = c->prev;
		free(c->opt);
		nreq_free(c->wr);
		exp_put(s, c->exp);
		exp_put(s, c->meta_exp);
		free(c);
	}
}

/* Close the socket now; the struct goes when the disks are done with it. */
static void conn_close(struct conn *c, const char *why)
{
	struct nreq *r;

	if (c->fd < 0)
		return;
	logf_(c->s, NBD_LOG_DEBUG, "connection %u closed: %s", c->id, why);
	epoll_ctl(c->s->ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	atomic_fetch_sub(&c->s->nconn, 1);
	while ((r = c->out_head)) {
		c->out_head = r->next;
		nreq_free(r);
	}
	c->out_tail = &c->out_head;
}

static void conn_drop(struct conn *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* A client that broke the protocol: say so, then close. */
static void conn_drop(struct conn *c, const char *fmt, ...)
{
	char why[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	logf_(c->s, NBD_LOG_WARN, "connection %u dropped: %s", c->id, why);
	conn_close(c, why);
}

/* Send what the socket takes. */
static void conn_send(struct conn *c)
{
	struct iovec iov[OUT_IOV];
	struct nreq *r;
	ssize_t n;
	int cnt;

	while (c->fd >= 0 && c->out_head) {
		cnt = 0;
		for (r = c->out_head; r && cnt < OUT_IOV - 1; r = r->next) {
			size_t hs = r->out_sent < r->hdr_len ? r->out_sent
							     : r->hdr_len;

			if (hs < r->hdr_len)
				iov[cnt++] = (struct iovec){
					.iov_base = r->hdr + hs,
					.iov_len = r->hdr_len - hs};
			iov[cnt].iov_base =
				(void *)(r->out + (r->out_sent - hs));
			iov[cnt].iov_len = r->out_len - (r->out_sent - hs);
			cnt++;
		}
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};

		n = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			conn_close(c, strerror(errno));
			return;
		}
		while (n > 0 && (r = c->out_head)) {
			size_t left = r->hdr_len + r->out_len - r->out_sent;

			if ((size_t)n < left) {
				r->out_sent += (size_t)n;
				break;
			}
			n -= (ssize_t)left;
			c->out_head = r->next;
			if (!c->out_head)
				c->out_tail = &c->out_head;
			nreq_free(r);
		}
	}
	if (c->fd >= 0 && c->st == CS_CLOSING && !c->out_head && !c->inflight)
		conn_close(c, "finished");
	else if (c->fd >= 0)
		conn_watch(c);
}

static void conn_queue(struct conn *c, struct nreq *r)
{
	r->next = NULL;
	if (c->fd < 0) {
		nreq_free(r);
		return;
	}
	*c->out_tail = r;
	c->out_tail = &r->next;
}

/* A reply of len bytes built by the caller in the returned buffer. */
static uint8_t *reply_new(struct conn *c, size_t len, struct nreq **out)
{
	struct nreq *r = calloc(1, sizeof(*r));

	if (r)
		r->mem = malloc(len ? len : 1);
	if (!r || !r->mem) {
		free(r);
		conn_close(c, "out of memory");
		return NULL;
	}
	r->c = c;
	r->out = r->mem;
	r->out_len = len;
	*out = r;
	return r->mem;
}

/* ---- options ---- */

static void opt_reply(struct conn *c, uint32_t opt, uint32_t type,
		      const void *data, uint32_t len)
{
	struct nreq *r;
	uint8_t *p = reply_new(c, 20 + (size_t)len, &r);

	if (!p)
		return;
	p = put64(p, NBD_REP_MAGIC);
	p = put32(p, opt);
	p = put32(p, type);
	p = put32(p, len);
	if (len)
		memcpy(p, data, len);
	conn_queue(c, r);
}

/* An error reply with a message for the client. */
static void opt_error(struct conn *c, uint32_t opt, uint32_t type,
		      const char *msg)
{
	opt_reply(c, opt, type, msg, (uint32_t)strlen(msg));
}

/* The export of that name (empty: the default), with a reference. */
static struct nbd_export *find_export(struct nbd_server *s, const uint8_t *name,
				      uint32_t len)
{
	struct nbd_export *e = NULL;

	pthread_mutex_lock(&s->exp_mu);
	if (!len && s->nexp)
		e = s->exp[0];
	for (unsigned i = 0; i < s->nexp && !e; i++)
		if (strlen(s->exp[i]->name) == len &&
		    !memcmp(s->exp[i]->name, name, len))
			e = s->exp[i];
	if (e)
		e->refs++;
	pthread_mutex_unlock(&s->exp_mu);
	return e;
}

/* find_export(), or NBD_REP_ERR_UNKNOWN to the option and NULL. */
static struct nbd_export *opt_find_export(struct conn *c, const uint8_t *name,
					  uint32_t len)
{
	struct nbd_export *e = find_export(c->s, name, len);

	if (!e)
		opt_error(c, c->opt_type, NBD_REP_ERR_UNKNOWN,
			  "no such export");
	return e;
}

static uint16_t tx_flags(const struct nbd_export *e)
{
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
		     NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF |
		     NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;

	if (e->ro)
		f |= NBD_FLAG_READ_ONLY;
	else
		f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
		     NBD_FLAG_SEND_FAST_ZERO;
	return f;
}

/* Transmission on e (the connection keeps the reference). */
static void enter_tx(struct conn *c, struct nbd_export *e)
{
	c->exp = e;
	c->wb_seen = e->wb_gen;
	c->st = CS_TX_HDR;
	c->deadline_ns = 0;
	if (c->meta_exp != e)
		c->meta = false;
	logf_(c->s, NBD_LOG_DEBUG, "connection %u: export %s%s", c->id, e->name,
	      c->structured ? " (structured replies)" : "");
}

static void opt_export_name(struct conn *c)
{
	struct nbd_export *e = find_export(c->s, c->opt, c->opt_len);
	struct nreq *r;
	uint8_t *p;
	size_t len = 10 + (c->no_zeroes ? 0 : 124);

	if (!e) {
		/* No way to say no to EXPORT_NAME but to hang up. */
		conn_drop(c, "unknown export in NBD_OPT_EXPORT_NAME");
		return;
	}
	p = reply_new(c, len, &r);
	if (!p) {
		exp_put(c->s, e);
		return;
	}
	memset(p, 0, len);
	p = put64(p, e->size);
	put16(p, tx_flags(e));
	conn_queue(c, r);
	/* Structured replies need NBD_OPT_GO's negotiation order. */
	enter_tx(c, e);
}

/* NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 n, n x u16. */
static void opt_info_go(struct conn *c)
{
	const uint8_t *d = c->opt;
	uint32_t len = c->opt_len, nl, nreq;
	struct nbd_export *e;
	uint8_t buf[16], *p;

	if (len < 6 || (nl = get32(d)) > len - 6 ||
	    (nreq = get16(d + 4 + nl), len != 6 + nl + 2 * nreq)) {
		opt_error(c, c->opt_type, NBD_REP_ERR_INVALID,
			  "malformed NBD_OPT_INFO/GO");
		return;
	}
	e = opt_find_export(c, d + 4, nl);
	if (!e)
		return;
	p = put16(buf, NBD_INFO_EXPORT);
	p = put64(p, e->size);
	put16(p, tx_flags(e));
	opt_reply(c, c->opt_type, NBD_REP_INFO, buf, 12);
	/* Sent whether asked or not: the export's requests need it. */
	p = put16(buf, NBD_INFO_BLOCK_SIZE);
	p = put32(p, NBD_SERVER_MIN_BLOCK);
	p = put32(p, NBD_SERVER_PREF_BLOCK);
	put32(p, NBD_SERVER_MAX_BLOCK);
	opt_reply(c, c->opt_type, NBD_REP_INFO, buf, 14);
	opt_reply(c, c->opt_type, NBD_REP_ACK, NULL, 0);
	if (c->opt_type == NBD_OPT_GO)
		enter_tx(c, e);
	else
		exp_put(c->s, e);
}

static void opt_list(struct conn *c)
{
	uint8_t buf[4 + NBD_MAX_STRING];

	if (c->opt_len) {
		opt_error(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
			  "NBD_OPT_LIST takes no data");
		return;
	}
	pthread_mutex_lock(&c->s->exp_mu);
	for (unsigned i = 0; i < c->s->nexp; i++) {
		uint32_t nl = (uint32_t)strlen(c->s->exp[i]->name);

		put32(buf, nl);
		memcpy(buf + 4, c->s->exp[i]->name, nl);
		opt_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, buf, 4 + nl);
	}
	pthread_mutex_unlock(&c->s->exp_mu);
	opt_reply(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/*
 * LIST_META_CONTEXT and SET_META_CONTEXT: u32 export name length, name,
 * u32 query count, each a u32 length and the query. The one context is
 * base:allocation; listing with no query, or with "base:", shows it.
 */
static void opt_meta(struct conn *c)
{
	const uint8_t *d = c->opt;
	uint32_t len = c->opt_len, nl, nq, pos, ql;
	bool set = c->opt_type == NBD_OPT_SET_META_CONTEXT, found = false;
	struct nbd_export *e;
	const char *name = NBD_META_BASE_ALLOCATION;
	uint32_t bl = (uint32_t)strlen(name);
	uint8_t buf[4 + 64];

	if (set && !c->structured) {
		opt_error(c, c->opt_type, NBD_REP_ERR_INVALID,
			  "meta contexts need structured replies first");
		return;
	}
	if (len < 8 || (nl = get32(d)) > len - 8) {
		opt_error(c, c->opt_type, NBD_REP_ERR_INVALID,
			  "malformed meta context option");
		return;
	}
	nq = get32(d + 4 + nl);
	/* Check every query's framing before answering any. */
	pos = 8 + nl;
	for (uint32_t i = 0; i < nq; i++) {
		if (len - pos < 4 || (ql = get32(d + pos)) > len - pos - 4) {
			opt_error(c, c->opt_type, NBD_REP_ERR_INVALID,
				  "malformed meta context query");
			return;
		}
		pos += 4 + ql;
	}
	if (pos != len) {
		opt_error(c, c->opt_type, NBD_REP_ERR_INVALID,
			  "trailing bytes after the meta context queries");
		return;
	}
	e = opt_find_export(c, d + 4, nl);
	if (!e)
		return;
	pos = 8 + nl;
	for (uint32_t i = 0; i < nq; i++) {
		ql = get32(d + pos);
		if ((ql == bl && !memcmp(d + pos + 4, name, bl)) ||
		    (!set && ql == 5 && !memcmp(d + pos + 4, "base:", 5)))
			found = true;
		pos += 4 + ql;
	}
	if (!set && !nq)
		found = true;
	if (found) {
		put32(buf, set ? META_CONTEXT_ID : 0);
		memcpy(buf + 4, name, bl);
		opt_reply(c, c->opt_type, NBD_REP_META_CONTEXT, buf, 4 + bl);
	}
	if (set) {
		c->meta = found;
		exp_put(c->s, c->meta_exp);
		c->meta_exp = found ? e : NULL;
		if (!found)
			exp_put(c->s, e);
	} else {
		exp_put(c->s, e);
	}
	opt_reply(c, c->opt_type, NBD_REP_ACK, NULL, 0);
}

static void handle_option(struct conn *c)
{
	switch (c->opt_type) {
	case NBD_OPT_EXPORT_NAME:
		opt_export_name(c);
		break;
	case NBD_OPT_ABORT:
		opt_reply(c, NBD_OPT_ABORT, NBD_REP_ACK, NULL, 0);
		c->st = CS_CLOSING;
		break;
	case NBD_OPT_LIST:
		opt_list(c);
		break;
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		opt_info_go(c);
		break;
	case NBD_OPT_STRUCTURED_REPLY:
		if (c->opt_len) {
			opt_error(c, c->opt_type, NBD_REP_ERR_INVALID,
				  "NBD_OPT_STRUCTURED_REPLY takes no data");
			break;
		}
		c->structured = true;
		opt_reply(c, c->opt_type, NBD_REP_ACK, NULL, 0);
		break;
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		opt_meta(c);
		break;
	case NBD_OPT_STARTTLS:
		opt_error(c, c->opt_type, NBD_REP_ERR_UNSUP,
			  "TLS is not supported by this server");
		break;
	default:
		opt_error(c, c->opt_type, NBD_REP_ERR_UNSUP,
			  "option not supported");
		break;
	}
	free(c->opt);
	c->opt = NULL;
}

/* ---- transmission ---- */

static void conn_parse(struct conn *c);

/* A simple reply, or a structured one with the DONE flag: no data. */
static void tx_reply_plain(struct conn *c, struct nreq *r, int err)
{
	uint32_t nerr = nbd_errno(err);
	const char *msg = err ? strerror(-err) : "";
	size_t ml = strlen(msg), len;
	uint8_t *p;

	free(r->mem);
	r->mem = NULL;
	len = !c->structured ? NBD_SIMPLE_REPLY_SIZE
	      : nerr	     ? NBD_STRUCTURED_REPLY_SIZE + 6 + ml
			     : NBD_STRUCTURED_REPLY_SIZE;
	r->mem = malloc(len);
	if (!r->mem) {
		nreq_free(r);
		conn_close(c, "out of memory");
		return;
	}
	p = r->mem;
	if (!c->structured) {
		p = put32(p, NBD_SIMPLE_REPLY_MAGIC);
		p = put32(p, nerr);
		memcpy(p, r->cookie, 8);
	} else {
		p = put32(p, NBD_STRUCTURED_REPLY_MAGIC);
		p = put16(p, NBD_REPLY_FLAG_DONE);
		p = put16(p, nerr ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_NONE);
		memcpy(p, r->cookie, 8);
		p += 8;
		p = put32(p, nerr ? (uint32_t)(6 + ml) : 0);
		if (nerr) {
			p = put32(p, nerr);
			p = put16(p, (uint16_t)ml);
			memcpy(p, msg, ml);
		}
	}
	r->out = r->mem;
	r->out_len = len;
	r->out_sent = 0;
	conn_queue(c, r);
}

/* A read's data, with its header laid in the room before it. */
static void tx_reply_read(struct conn *c, struct nreq *r)
{
	uint8_t *h = r->hdr;

	if (!c->structured) {
		put32(h, NBD_SIMPLE_REPLY_MAGIC);
		put32(h + 4, 0);
		memcpy(h + 8, r->cookie, 8);
		r->hdr_len = NBD_SIMPLE_REPLY_SIZE;
	} else {
		put32(h, NBD_STRUCTURED_REPLY_MAGIC);
		put16(h + 4, NBD_REPLY_FLAG_DONE);
		put16(h + 6, NBD_REPLY_TYPE_OFFSET_DATA);
		memcpy(h + 8, r->cookie, 8);
		put32(h + 16, 8 + r->len);
		put64(h + 20, r->off);
		r->hdr_len = NBD_STRUCTURED_REPLY_SIZE + 8;
	}
	r->out = r->data;
	r->out_len = r->len;
	r->out_sent = 0;
	conn_queue(c, r);
}

static void tx_reply_status(struct conn *c, struct nreq *r)
{
	size_t len = NBD_STRUCTURED_REPLY_SIZE + 4 + 8 * (size_t)r->n;
	uint64_t left = r->len;
	uint8_t *p;

	free(r->mem);
	r->mem = malloc(len);
	if (!r->mem) {
		nreq_free(r);
		conn_close(c, "out of memory");
		return;
	}
	p = put32(r->mem, NBD_STRUCTURED_REPLY_MAGIC);
	p = put16(p, NBD_REPLY_FLAG_DONE);
	p = put16(p, NBD_REPLY_TYPE_BLOCK_STATUS);
	memcpy(p, r->cookie, 8);
	p += 8;
	p = put32(p, (uint32_t)(4 + 8 * r->n));
	p = put32(p, META_CONTEXT_ID);
	for (unsigned i = 0; i < r->n; i++) {
		/* Runs never pass the request (itself below 4 GiB). */
		uint64_t l = r->ext[i].len < left ? r->ext[i].len : left;

		left -= l;
		p = put32(p, (uint32_t)l);
		p = put32(p,
			  (r->ext[i].flags & SIPHON_EXTENT_HOLE ? NBD_STATE_HOLE
								: 0) |
				  (r->ext[i].flags & SIPHON_EXTENT_ZERO
					   ? NBD_STATE_ZERO
					   : 0));
	}
	r->out = r->mem;
	r->out_len = len;
	r->out_sent = 0;
	conn_queue(c, r);
}

/* The server thread: a request came back from its disk. */
static void wb_release(struct nbd_export *e);

/* r is at the disk (or held for it): the connection's accounting. */
static void count_in(struct conn *c, struct nreq *r)
{
	r->counted = true;
	c->inflight++;
	c->inflight_bytes += r->len;
	c->s->pending++;
}

static void count_out(struct conn *c, struct nreq *r)
{
	if (!r->counted)
		return;
	r->counted = false;
	c->inflight--;
	c->inflight_bytes -= r->len;
	c->s->pending--;
}

static void wb_unlink(struct nbd_export *e, struct nreq *r)
{
	if (r->wb_prev)
		r->wb_prev->wb_next = r->wb_next;
	else
		e->wb = r->wb_next;
	if (r->wb_next)
		r->wb_next->wb_prev = r->wb_prev;
	e->wb_reqs--;
	e->wb_bytes -= r->len;
}

static void tx_done(struct nreq *r)
{
	struct conn *c = r->c;
	struct nbd_export *e = c->exp;

	count_out(c, r);
	if (r->early) {
		wb_unlink(e, r);
		if (r->ret < 0) {
			e->wb_err = r->ret;
			e->wb_gen++;
			logf_(c->s, NBD_LOG_ERROR,
			      "export %s: an acknowledged write of %u bytes at "
			      "%llu failed (%s); the next FLUSH reports it",
			      e->name, (unsigned)r->len,
			      (unsigned long long)r->off, strerror(-r->ret));
		}
		nreq_free(r);
		wb_release(e);
		return;
	}
	if (r->type == NBD_CMD_FLUSH && r->ret == 0 && c->wb_seen != e->wb_gen)
		r->ret = e->wb_err;
	if (r->type == NBD_CMD_FLUSH)
		c->wb_seen = e->wb_gen;
	if (c->fd < 0) {
		nreq_free(r);
		return;
	}
	if (r->ret < 0)
		tx_reply_plain(c, r, r->ret);
	else if (r->type == NBD_CMD_READ)
		tx_reply_read(c, r);
	else if (r->type == NBD_CMD_BLOCK_STATUS)
		tx_reply_status(c, r);
	else
		tx_reply_plain(c, r, 0);
}

/* A disk's worker thread: hand the request to the server thread. */
static void io_done(siphon_disk *disk, int ret, void *opaque)
{
	struct nreq *r = opaque;
	struct nbd_server *s = r->c->s;
	uint64_t one = 1;
	bool first;

	(void)disk;
	r->ret = ret;
	pthread_mutex_lock(&s->mu);
	first = !s->done;
	r->next = s->done;
	s->done = r;
	pthread_mutex_unlock(&s->mu);
	if (first && write(s->done_fd, &one, sizeof(one)) < 0) {
		/* The counter is full: the server thread is reading it. */
	}
}

static void take_done(struct nbd_server *s)
{
	struct nreq *list, *r, *rev = NULL;
	uint64_t v;

	if (read(s->done_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return;
	pthread_mutex_lock(&s->mu);
	list = s->done;
	s->done = NULL;
	pthread_mutex_unlock(&s->mu);
	/* Oldest first. */
	while ((r = list)) {
		list = r->next;
		r->next = rev;
		rev = r;
	}
	while ((r = rev)) {
		rev = r->next;
		tx_done(r);
	}
	/* Send, and parse requests held back while too much was in flight. */
	for (struct conn *c = s->conns; c; c = c->next) {
		if (c->fd < 0)
			continue;
		if (c->in_len && (c->st == CS_TX_HDR || c->st == CS_TX_PAYLOAD))
			conn_parse(c);
		if (c->fd >= 0)
			conn_send(c);
	}
}

/* Hand r (header parsed, payload in) to its disk: 0, 1 (answered), -errno. */
static int tx_start(struct conn *c, struct nreq *r)
{
	const struct nbd_export *e = c->exp;
	siphon_disk *d = e->disk;
	unsigned fua = (r->flags & NBD_CMD_FLAG_FUA) ? SIPHON_IO_FUA : 0;
	uint64_t a, b;
	struct iovec v;
	int ret;

	switch (r->type) {
	case NBD_CMD_READ:
	case NBD_CMD_CACHE:
		/* Widen to the 512-byte grid (or the end of the export). */
		a = r->off & ~(uint64_t)(NBD_SERVER_MIN_BLOCK - 1);
		b = r->off + r->len;
		b = (b + NBD_SERVER_MIN_BLOCK - 1) &
		    ~(uint64_t)(NBD_SERVER_MIN_BLOCK - 1);
		if (b > e->size)
			b = e->size;
		if (posix_memalign((void **)&r->mem, BUF_ALIGN,
				   (size_t)(b - a))) {
			r->mem = NULL;
			ret = -ENOMEM;
			break;
		}
		r->data = r->mem + (r->off - a);
		v = (struct iovec){.iov_base = r->mem,
				   .iov_len = (size_t)(b - a)};
		/* CACHE: a read that copies into the top (copy-on-read). */
		ret = siphon_disk_aio_read(d, &v, 1, a, 0, io_done, r);
		break;
	case NBD_CMD_WRITE:
		v = (struct iovec){.iov_base = r->data, .iov_len = r->len};
		ret = siphon_disk_aio_write(d, &v, 1, r->off, fua, io_done, r);
		break;
	case NBD_CMD_FLUSH:
		ret = siphon_disk_aio_flush(d, 0, io_done, r);
		break;
	case NBD_CMD_TRIM:
		/* Advisory: only the whole 512-byte blocks inside. */
		a = (r->off + NBD_SERVER_MIN_BLOCK - 1) &
		    ~(uint64_t)(NBD_SERVER_MIN_BLOCK - 1);
		b = r->off + r->len;
		if (b != e->size)
			b &= ~(uint64_t)(NBD_SERVER_MIN_BLOCK - 1);
		if (b <= a) {
			tx_reply_plain(c, r, 0);
			return 1;
		}
		ret = siphon_disk_aio_discard(d, a, b - a, 0, io_done, r);
		break;
	case NBD_CMD_WRITE_ZEROES:
		ret = siphon_disk_aio_write_zeroes(
			d, r->off, r->len,
			fua | ((r->flags & NBD_CMD_FLAG_FAST_ZERO)
				       ? SIPHON_IO_FAST_ZERO
				       : 0),
			io_done, r);
		break;
	case NBD_CMD_BLOCK_STATUS:
		r->n = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : STATUS_EXTENTS;
		r->ext = calloc(r->n, sizeof(*r->ext));
		if (!r->ext) {
			ret = -ENOMEM;
			break;
		}
		ret = siphon_disk_aio_block_status(d, r->off, r->len, 0, r->ext,
						   &r->n, io_done, r);
		break;
	default:
		ret = -EINVAL;
		break;
	}
	return ret < 0 ? ret : 0;
}

/*
 * Write-back: does r have to wait for writes already answered? A read,
 * CACHE or BLOCK_STATUS must see every answered write it overlaps, and a
 * FLUSH must cover them all. Writes, TRIM and WRITE_ZEROES need not wait:
 * the engine keeps overlapping writes in the order they came (guest.h).
 */
static bool wb_conflicts(const struct nbd_export *e, const struct nreq *r)
{
	const struct nreq *w;

	switch (r->type) {
	case NBD_CMD_FLUSH:
		return e->wb != NULL;
	case NBD_CMD_READ:
	case NBD_CMD_CACHE:
	case NBD_CMD_BLOCK_STATUS:
		for (w = e->wb; w; w = w->wb_next)
			if (r->off < w->off + w->len &&
			    w->off < r->off + r->len)
				return true;
		return false;
	default:
		return false;
	}
}

static bool wb_may_answer(const struct nbd_server *s,
			  const struct nbd_export *e, const struct nreq *r)
{
	return s->o.writeback && r->type == NBD_CMD_WRITE && r->len &&
	       !(r->flags & NBD_CMD_FLAG_FUA) && !e->held &&
	       e->wb_reqs < WB_MAX_REQS && e->wb_bytes + r->len <= WB_MAX_BYTES;
}

/* Answer the write r now; it completes at the disk later (tx_done()). */
static void wb_answer(struct conn *c, struct nreq *r)
{
	struct nbd_export *e = c->exp;
	struct nreq *q = calloc(1, sizeof(*q));

	if (!q)
		return; /* answered when it completes, then */
	q->c = c;
	memcpy(q->cookie, r->cookie, sizeof(q->cookie));
	r->early = true;
	r->wb_prev = NULL;
	r->wb_next = e->wb;
	if (e->wb)
		e->wb->wb_prev = r;
	e->wb = r;
	e->wb_reqs++;
	e->wb_bytes += r->len;
	tx_reply_plain(c, q, 0);
}

static void tx_submit(struct conn *c, struct nreq *r)
{
	struct nbd_export *e = c->exp;
	int ret;

	if (wb_conflicts(e, r)) {
		r->next = NULL;
		*e->held_tail = r;
		e->held_tail = &r->next;
		count_in(c, r);
		return;
	}
	ret = tx_start(c, r);
	if (ret > 0)
		return;
	if (ret < 0) {
		tx_reply_plain(c, r, ret);
		return;
	}
	count_in(c, r);
	if (wb_may_answer(c->s, e, r))
		wb_answer(c, r);
}

/* Write-back: start the held requests that no longer have to wait. */
static void wb_release(struct nbd_export *e)
{
	struct nreq **pp = &e->held, *r;

	while ((r = *pp)) {
		if (wb_conflicts(e, r)) {
			pp = &r->next;
			continue;
		}
		*pp = r->next;
		if (!*pp)
			e->held_tail = pp;
		count_out(r->c, r);
		if (r->c->fd < 0)
			nreq_free(r);
		else
			tx_submit(r->c, r);
	}
}

/* Which command flags each command takes. */
static uint16_t cmd_flags_allowed(uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
		return NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA;
	case NBD_CMD_WRITE:
		return NBD_CMD_FLAG_FUA;
	case NBD_CMD_WRITE_ZEROES:
		return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
		       NBD_CMD_FLAG_FAST_ZERO;
	case NBD_CMD_TRIM:
		return NBD_CMD_FLAG_FUA;
	case NBD_CMD_BLOCK_STATUS:
		return NBD_CMD_FLAG_REQ_ONE;
	default:
		return 0;
	}
}

/*
 * Check a request against the export: 0, or the error its reply carries
 * (the connection stays up). A write's payload is read either way.
 */
static int tx_check(struct conn *c, const struct nreq *r)
{
	const struct nbd_export *e = c->exp;
	bool writes = r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM ||
		      r->type == NBD_CMD_WRITE_ZEROES;

	if (r->type > NBD_CMD_BLOCK_STATUS)
		return -EINVAL;
	if (r->flags & ~cmd_flags_allowed(r->type))
		return -EINVAL;
	if (r->type == NBD_CMD_FLUSH)
		return r->off || r->len ? -EINVAL : 0;
	if (r->off > e->size || r->len > e->size - r->off)
		return writes ? -ENOSPC : -EINVAL;
	if (writes && e->ro)
		return -EPERM;
	if (r->type == NBD_CMD_BLOCK_STATUS) {
		if (!c->meta || !r->len)
			return -EINVAL;
		return 0;
	}
	if (r->len > NBD_SERVER_MAX_BLOCK && r->type != NBD_CMD_TRIM &&
	    r->type != NBD_CMD_WRITE_ZEROES)
		return (r->flags & NBD_CMD_FLAG_DF) ? -EOVERFLOW : -EINVAL;
	if ((r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES) &&
	    (r->off % NBD_SERVER_MIN_BLOCK ||
	     (r->len % NBD_SERVER_MIN_BLOCK && r->off + r->len != e->size)))
		return -EINVAL;
	return 0;
}

/* A request header is in c->in: parse it (returns false: connection gone). */
static bool tx_header(struct conn *c, const uint8_t *h)
{
	struct nreq *r;
	int err;

	if (get32(h) != NBD_REQUEST_MAGIC) {
		conn_drop(c, "bad request magic 0x%08x", get32(h));
		return false;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		conn_close(c, "out of memory");
		return false;
	}
	r->c = c;
	r->flags = get16(h + 4);
	r->type = get16(h + 6);
	memcpy(r->cookie, h + 8, 8);
	r->off = get64(h + 16);
	r->len = get32(h + 24);
	if (r->type == NBD_CMD_DISC) {
		nreq_free(r);
		c->st = CS_CLOSING;
		return true;
	}
	err = tx_check(c, r);
	if (r->type == NBD_CMD_WRITE) {
		if (r->len > NBD_SERVER_MAX_BLOCK) {
			/* Too much to swallow, and no way to skip it. */
			nreq_free(r);
			conn_drop(c, "write of %u bytes, over the maximum",
				  (unsigned)get32(h + 24));
			return false;
		}
		if (posix_memalign((void **)&r->mem, BUF_ALIGN,
				   r->len ? r->len : 1)) {
			r->mem = NULL;
			nreq_free(r);
			conn_close(c, "out of memory");
			return false;
		}
		r->data = r->mem;
		r->ret = err;
		c->wr = r;
		c->st = r->len ? CS_TX_PAYLOAD : CS_TX_HDR;
		if (!r->len) {
			c->wr = NULL;
			if (err)
				tx_reply_plain(c, r, err);
			else
				tx_submit(c, r);
		}
		return true;
	}
	if (err)
		tx_reply_plain(c, r, err);
	else if (!r->len && r->type != NBD_CMD_FLUSH)
		tx_reply_plain(c, r, 0);
	else
		tx_submit(c, r);
	return true;
}

/* The write's payload is complete. */
static void tx_payload_done(struct conn *c)
{
	struct nreq *r = c->wr;

	c->wr = NULL;
	c->st = CS_TX_HDR;
	if (r->ret)
		tx_reply_plain(c, r, r->ret);
	else
		tx_submit(c, r);
}

/* ---- input ---- */

static void consume(struct conn *c, size_t n)
{
	memmove(c->in, c->in + n, c->in_len - n);
	c->in_len -= n;
}

/* Parse what the staging buffer holds. */
static void conn_parse(struct conn *c)
{
	size_t pos = 0;

	while (c->fd >= 0) {
		const uint8_t *p = c->in + pos;
		size_t have = c->in_len - pos;

		switch (c->st) {
		case CS_FLAGS: {
			uint32_t f;

			if (have < 4)
				goto out;
			f = get32(p);
			pos += 4;
			if (f & ~(NBD_FLAG_C_FIXED_NEWSTYLE |
				  NBD_FLAG_C_NO_ZEROES)) {
				conn_drop(c, "unknown client flags 0x%x", f);
				return;
			}
			c->no_zeroes = f & NBD_FLAG_C_NO_ZEROES;
			c->st = CS_OPT_HDR;
			break;
		}
		case CS_OPT_HDR:
			if (have < 16)
				goto out;
			if (get64(p) != NBD_IHAVEOPT) {
				conn_drop(c, "bad option magic");
				return;
			}
			c->opt_type = get32(p + 8);
			c->opt_len = get32(p + 12);
			pos += 16;
			if (c->opt_len > NBD_SERVER_OPT_MAX) {
				conn_drop(c, "option %u of %u bytes, over %u",
					  c->opt_type, c->opt_len,
					  NBD_SERVER_OPT_MAX);
				return;
			}
			c->opt = malloc(c->opt_len ? c->opt_len : 1);
			if (!c->opt) {
				conn_close(c, "out of memory");
				return;
			}
			c->opt_got = 0;
			c->st = CS_OPT_DATA;
			break;
		case CS_OPT_DATA: {
			size_t n = c->opt_len - c->opt_got;

			if (n > have)
				n = have;
			memcpy(c->opt + c->opt_got, p, n);
			c->opt_got += (uint32_t)n;
			pos += n;
			if (c->opt_got < c->opt_len)
				goto out;
			c->st = CS_OPT_HDR;
			handle_option(c);
			break;
		}
		case CS_TX_HDR:
			if (c->inflight >= NBD_SERVER_CONN_MAX_REQS ||
			    c->inflight_bytes >= NBD_SERVER_CONN_MAX_BYTES)
				goto out;
			if (have < NBD_REQUEST_SIZE)
				goto out;
			pos += NBD_REQUEST_SIZE;
			if (!tx_header(c, p))
				return;
			break;
		case CS_TX_PAYLOAD: {
			struct nreq *r = c->wr;
			size_t n = r->len - r->got;

			if (n > have)
				n = have;
			memcpy(r->data + r->got, p, n);
			r->got += (uint32_t)n;
			pos += n;
			if (r->got < r->len)
				goto out;
			tx_payload_done(c);
			break;
		}
		case CS_CLOSING:
			pos = c->in_len; /* ignore the rest */
			goto out;
		}
	}
	return;
out:
	consume(c, pos);
}

static void conn_read(struct conn *c)
{
	ssize_t n;

	while (c->fd >= 0 && c->st != CS_CLOSING) {
		/* A large payload goes straight to its request. */
		if (c->st == CS_TX_PAYLOAD && !c->in_len &&
		    c->wr->len - c->wr->got >= IN_SIZE) {
			n = recv(c->fd, c->wr->data + c->wr->got,
				 c->wr->len - c->wr->got, MSG_DONTWAIT);
			if (n > 0) {
				c->wr->got += (uint32_t)n;
				if (c->wr->got == c->wr->len)
					tx_payload_done(c);
				continue;
			}
		} else {
			if (c->in_len == IN_SIZE)
				break; /* held back by what is in flight */
			n = recv(c->fd, c->in + c->in_len, IN_SIZE - c->in_len,
				 MSG_DONTWAIT);
			if (n > 0) {
				c->in_len += (size_t)n;
				conn_parse(c);
				if (c->fd >= 0 && c->st == CS_TX_HDR &&
				    (c->inflight >= NBD_SERVER_CONN_MAX_REQS ||
				     c->inflight_bytes >=
					     NBD_SERVER_CONN_MAX_BYTES))
					break;
				continue;
			}
		}
		if (n == 0) {
			/* EOF: between requests it is a plain goodbye. */
			if (c->st == CS_TX_HDR && !c->in_len)
				c->st = CS_CLOSING;
			else
				conn_close(c, "the client hung up");
			break;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			conn_close(c, strerror(errno));
		break;
	}
	if (c->fd >= 0)
		conn_send(c);
}

/* Take the connected socket fd (non-blocking) on: greet it. */
static int adopt(struct nbd_server *s, int fd, const char *from)
{
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP};
	struct nreq *r;
	struct conn *c;
	uint8_t *p;
	int one = 1;

	if (s->stopping || atomic_load(&s->nconn) >= s->o.max_connections) {
		logf_(s, NBD_LOG_WARN, "%s: connection refused: %s", from,
		      s->stopping ? "shutting down" : "too many connections");
		close(fd);
		return -EAGAIN;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c = calloc(1, sizeof(*c));
	if (!c) {
		close(fd);
		return -ENOMEM;
	}
	c->it.kind = ITEM_CONN;
	c->s = s;
	c->fd = fd;
	c->id = ++s->next_id;
	c->st = CS_FLAGS;
	c->out_tail = &c->out_head;
	c->want_in = true;
	c->deadline_ns = now_ns() + (uint64_t)s->o.handshake_ms * 1000000ull;
	ev.data.ptr = &c->it;
	if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int err = -errno;

		close(fd);
		free(c);
		return err;
	}
	c->next = s->conns;
	if (s->conns)
		s->conns->prev = c;
	s->conns = c;
	atomic_fetch_add(&s->nconn, 1);
	logf_(s, NBD_LOG_DEBUG, "connection %u on %s", c->id, from);
	/* The fixed newstyle greeting. */
	p = reply_new(c, 18, &r);
	if (!p)
		return 0;
	p = put64(p, NBD_MAGIC);
	p = put64(p, NBD_IHAVEOPT);
	put16(p, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	conn_queue(c, r);
	conn_send(c);
	return 0;
}

static void accept_one(struct nbd_server *s, struct listener *l)
{
	int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

	if (fd < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			logf_(s, NBD_LOG_WARN, "%s: accept: %s", l->addr,
			      strerror(errno));
		return;
	}
	adopt(s, fd, l->addr);
}

int nbd_server_add_connection(struct nbd_server *s, int fd)
{
	int fl;

	if (!s || fd < 0)
		return -EINVAL;
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	return adopt(s, fd, "a connected socket");
}

/* Handshakes past their deadline, and a shutdown's drain. */
static int check_deadlines(struct nbd_server *s)
{
	uint64_t now = now_ns(), next = UINT64_MAX;
	struct conn *c, *n;

	for (c = s->conns; c; c = n) {
		n = c->next;
		if (c->fd < 0 || !c->deadline_ns)
			continue;
		if (c->deadline_ns <= now) {
			conn_drop(c, c->exp ? "replies not read at shutdown"
					    : "handshake timed out");
			continue;
		}
		if (c->deadline_ns < next)
			next = c->deadline_ns;
	}
	if (next == UINT64_MAX)
		return -1;
	return (int)((next - now) / 1000000ull + 1);
}

static void begin_stop(struct nbd_server *s)
{
	uint64_t v;
	struct conn *c, *n;

	if (read(s->stop_fd, &v, sizeof(v)) < 0) {
		/* Counted already. */
	}
	if (s->stopping)
		return;
	s->stopping = true;
	logf_(s, NBD_LOG_INFO, "shutting down: %u connection(s)",
	      atomic_load(&s->nconn));
	for (unsigned i = 0; i < s->nlis; i++) {
		epoll_ctl(s->ep, EPOLL_CTL_DEL, s->lis[i].fd, NULL);
	}
	for (c = s->conns; c; c = n) {
		n = c->next;
		if (c->fd < 0)
			continue;
		if (!c->exp) {
			conn_close(c, "shutting down");
			continue;
		}
		c->st = CS_CLOSING;
		c->deadline_ns = now_ns() + SHUTDOWN_DRAIN_MS * 1000000ull;
		conn_send(c);
	}
}

/* One batch of events, waiting at most timeout ms (-1: the deadlines). */
static int step(struct nbd_server *s, int timeout)
{
	struct epoll_event evs[64];
	int n, dl = check_deadlines(s);

	if (timeout < 0 || (dl >= 0 && dl < timeout))
		timeout = dl;
	n = epoll_wait(s->ep, evs, 64, timeout);
	if (n < 0)
		return errno == EINTR ? 0 : -errno;
	for (int i = 0; i < n; i++) {
		struct item *it = evs[i].data.ptr;

		switch (it->kind) {
		case ITEM_LISTENER:
			accept_one(s, (struct listener *)it);
			break;
		case ITEM_DONE:
			take_done(s);
			break;
		case ITEM_STOP:
			begin_stop(s);
			break;
		case ITEM_CONN: {
			struct conn *c = (struct conn *)it;

			/* Closed by an earlier event of this batch. */
			if (c->fd < 0)
				break;
			if (evs[i].events &
			    (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
				conn_read(c);
			if (c->fd >= 0 && (evs[i].events & EPOLLOUT))
				conn_send(c);
			/* Gone both ways: no reply can reach it. */
			if (c->fd >= 0 &&
			    (evs[i].events & (EPOLLHUP | EPOLLERR)))
				conn_close(c, "the client went away");
			if (c->fd >= 0 && c->st == CS_CLOSING && !c->out_head &&
			    !c->inflight)
				conn_close(c, "finished");
			break;
		}
		}
	}
	conn_reap(s);
	return 0;
}

int nbd_server_run(struct nbd_server *s)
{
	int ret;

	if (!s)
		return -EINVAL;
	while (!s->stopping || s->nconn || s->pending) {
		ret = step(s, -1);
		if (ret < 0)
			return ret;
	}
	conn_reap(s);
	return 0;
}

int nbd_server_step(struct nbd_server *s, int timeout_ms)
{
	int ret;

	if (!s)
		return -EINVAL;
	ret = step(s, timeout_ms);
	if (ret < 0)
		return ret;
	return (int)(atomic_load(&s->nconn) + s->pending);
}

void nbd_server_stop(struct nbd_server *s)
{
	uint64_t one = 1;

	if (s && write(s->stop_fd, &one, sizeof(one)) < 0) {
		/* Full: a stop is pending already. */
	}
}

unsigned nbd_server_connections(struct nbd_server *s)
{
	return s ? atomic_load(&s->nconn) : 0;
}

void nbd_server_destroy(struct nbd_server *s)
{
	struct conn *c;

	if (!s)
		return;
	for (c = s->conns; c; c = c->next)
		conn_close(c, "server destroyed");
	/* Requests still at a disk (no nbd_server_run() to wait for them)
	   keep their connection: it is leaked rather than freed under them. */
	conn_reap(s);
	for (unsigned i = 0; i < s->nlis; i++) {
		close(s->lis[i].fd);
		if (s->lis[i].unix_path)
			unlink(s->lis[i].unix_path);
		free(s->lis[i].unix_path);
		free(s->lis[i].addr);
	}
	for (unsigned i = 0; i < s->nexp; i++)
		exp_put(s, s->exp[i]);
	if (s->ep >= 0)
		close(s->ep);
	if (s->done_fd >= 0)
		close(s->done_fd);
	if (s->stop_fd >= 0)
		close(s->stop_fd);
	pthread_mutex_destroy(&s->mu);
	pthread_mutex_destroy(&s->exp_mu);
	free(s);
}

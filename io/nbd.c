/*
 * NBD exports as sio_files, through libnbd (issue 12). See io/nbd.h for
 * what a user sees and io/nbd_priv.h for what file.c and queue.c call.
 *
 * Two kinds of connection to an export:
 *  - the file's own (struct sio_nbd), opened by sio_nbd_open(), used by the
 *    synchronous helpers and block status through libnbd's blocking calls,
 *    one caller at a time under n->lock; closed when a queue connects to
 *    a server without multi-conn (which may take one client at a time)
 *    and made again by the next synchronous call (sync_make_way());
 *  - a queue's (struct sio_nbd_conn), one per (queue, file), driven
 *    through libnbd's asynchronous calls by the queue that owns it: the
 *    queue polls the socket on its ring and calls sio_nbd_conn_notify().
 *
 * Invariants of a queue's connection:
 *  - a request it holds is in exactly one place: the wait list (some of
 *    its bytes not asked for yet, because the connection has CONN_DEPTH
 *    reads in flight), with libnbd only (every byte asked for, parts > 0),
 *    or the done list (finished, its result in _nbd.err);
 *  - req->_done_bytes counts the bytes asked for, _nbd.parts the reads of
 *    it in flight; a request is finished when both say so (every byte
 *    asked for, none in flight), or at its first error once nothing of it
 *    is in flight any more;
 *  - libnbd's completion callback (read_done) only records: it touches
 *    the request, the counters and the done list, never the caller, and
 *    calls no nbd_* function (libnbd holds the handle's lock there);
 *  - a read libnbd accepted (a cookie) always gets its callback, also when
 *    the connection dies (libnbd fails every command in flight then); a
 *    read it refused (-1) never does.

 *
 * Reconnecting (a queue's connection; io/nbd.h says what a user sees):
 * UP -> (the handle dies: reset, EOF, or the request timeout shut its
 * socket) BACKOFF -> CONNECTING (a new handle, nbd_aio_connect_*, its
 * handshake driven by the same polls) -> UP when ready and the export's
 * size is the one it had; an attempt that fails goes back to BACKOFF with
 * the wait doubled; past window_end, DOWN: what waits fails, and a later
 * request starts a new window. When the handle dies every request not
 * finished goes back to the wait list whole (conn_requeue()): reads are
 * idempotent, and the memory is the caller's until its callback, so
 * sending them again cannot put bytes anywhere but where they belong.
 * The queue arms a timer while sio_nbd_conn_deadline() says so and
 * calls sio_nbd_conn_tick(); a poll armed for an older handle is known by
 * the generation's parity in its tag (queue.c) and ignored. The file's own
 * connection does the same synchronously (sync_revive()), without the
 * request timeout (libnbd's blocking calls have none).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <libnbd.h>

#include "common/checked.h"
#include "common/error.h"
#include "io/io.h"
#include "io/nbd.h"
#include "io/nbd_priv.h"
#include "io/reqlist.h"

/* Largest read when the server advertises no maximum (NBD's safe size). */
#define DEFAULT_MAX_REQUEST (32U << 20)
/* libnbd refuses reads larger than this whatever the server says. */
#define LIBNBD_MAX_REQUEST (64U << 20)
/* Reads a queue's connection keeps in flight at most. */
#define CONN_DEPTH 128
/* Largest block status request (the protocol's lengths are 32-bit). */
#define BS_MAX_REQUEST (1ULL << 31)
/* Bounce buffer for unaligned reads on a server with a minimum block. */
#define BOUNCE_MAX (1U << 20)

struct sio_nbd {
	pthread_mutex_t lock; /* the synchronous connection's one user */
	struct nbd_handle *h;
	uint64_t id; /* tells conns of this file from those of a dead one */
	enum sio_nbd_transport transport;
	char *host, *port, *socket, *export_name;
	char *uri; /* canonical; also the file's path */
	char *server; /* for messages and info */
	uint64_t size;
	uint32_t min_block, pref_block, max_block;
	uint32_t align; /* min_block when > 1, else 1 */
	uint32_t max_io; /* largest read sent */
	bool multi_conn, block_status;
	/* Its settings (io/nbd.h), fixed at open: SIO_NBD_OFF is 0 here. */
	unsigned reconnect_ms, timeout_ms, connections;
	bool parked; /* h closed to make way for a queue's (sync_make_way) */
};

/* Where a queue's connection is (see "Reconnecting" above). */
enum conn_state {
	CONN_UP, /* handshake done: reads go out */
	CONN_CONNECTING, /* a new handle's connect and handshake run */
	CONN_BACKOFF, /* waiting until next_try to connect again */
	CONN_DOWN, /* given up: reads fail (a new one starts over) */
};

struct sio_nbd_conn {
	struct nbd_handle *h; /* NULL in CONN_BACKOFF and CONN_DOWN */
	const struct sio_file *file; /* compared, never dereferenced */
	uint64_t id;
	char *uri;
	char *server;
	/* The export, for connecting again. */
	enum sio_nbd_transport transport;
	char *host, *port, *socket, *export_name;
	uint64_t size; /* the export's: a new connection must say the same */
	uint32_t max_io;
	uint32_t align; /* the export's minimum block (block status) */
	int fd;
	unsigned gen; /* handles made so far: tells polls of old ones */
	enum conn_state state;
	unsigned reconnect_ms, timeout_ms; /* the settings it was made with */
	uint64_t window_end; /* reconnecting gives up then (ns) */
	uint64_t next_try; /* CONN_BACKOFF: connect again then (ns) */
	uint64_t connect_end; /* CONN_CONNECTING: the handshake's limit */
	unsigned backoff_ms;
	uint64_t last_reply; /* a reply came, or the first read went (ns) */
	bool replied; /* read_done ran since last_reply was set */
	unsigned inflight; /* reads and block status in libnbd */
	unsigned cb_runs; /* completions called back (see issued_back()) */
	unsigned held; /* requests submitted and not popped */
	bool dead; /* CONN_DOWN: requests fail with dead_msg */
	bool hung; /* the timeout shut the socket: why it died */
	char dead_msg[640]; /* why it died or was given up */
	char fail_msg[768]; /* what its failed requests say (sio_req_error) */
	struct sio_req *wait_head, *wait_tail;
	struct sio_req *done_head, *done_tail;
};

/* The settings of exports opened from now that do not name their own. */
static _Atomic unsigned nbd_reconnect_ms = SIO_NBD_DEFAULT_RECONNECT_MS;
static _Atomic unsigned nbd_timeout_ms = SIO_NBD_DEFAULT_TIMEOUT_MS;
static _Atomic unsigned nbd_connections = SIO_NBD_DEFAULT_CONNECTIONS;

static atomic_uint_fast64_t next_id = 1;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#define MS_NS 1000000ull
/* Backoff between connection attempts: from the first, doubling to. */
#define BACKOFF_FIRST_MS 50u
#define BACKOFF_MAX_MS 1000u

/* libnbd's message of the last failure on this thread, never NULL. */
static const char *lib_msg(void)
{
	const char *m = nbd_get_error();

	return m && *m ? m : "unknown libnbd error";
}

/* "unix:PATH" or "HOST:PORT" ([HOST] for IPv6): malloc'd, or NULL. */
static char *make_server(const struct sio_nbd *n)
{
	char *s = NULL;
	int r;

	if (n->transport == SIO_NBD_UNIX)
		r = asprintf(&s, "unix:%s", n->socket);
	else if (strchr(n->host, ':'))
		r = asprintf(&s, "[%s]:%s", n->host, n->port);
	else
		r = asprintf(&s, "%s:%s", n->host, n->port);
	return r < 0 ? NULL : s;
}

/* Whether h's connection is gone for good (no reconnect yet). */
static bool lib_is_dead(struct nbd_handle *h)
{
	return nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1;
}

/*
 * Close h, telling an idle server goodbye (NBD_CMD_DISC) if the socket
 * takes it now: never waiting for a server that may be gone or hung, as
 * nbd_shutdown() would. NULL is a no-op.
 */
static void lib_close(struct nbd_handle *h)
{
	if (h && nbd_aio_is_ready(h) == 1 && nbd_aio_in_flight(h) == 0)
		nbd_aio_disconnect(h, 0);
	nbd_close(h);
}

/*
 * What a handshake that never ends most likely means: printf format of
 * the server and the milliseconds waited.
 */
#define HANDSHAKE_HINT                                                      \
	"NBD server %s accepted the connection but did not finish the "     \
	"handshake within %u ms: a server that takes one client at a time " \
	"(qemu-nbd without --shared) may be serving another; siphon opens " \
	"a connection per layer for its own reads and one per worker "      \
	"(start qemu-nbd with --shared=4 or more)"

/* How long a handshake may take, with a request timeout of timeout_ms. */
static unsigned handshake_ms(unsigned timeout_ms)
{
	return timeout_ms ? timeout_ms : SIO_NBD_CONNECT_TIMEOUT_MS;
}

/*
 * Connect h to n's export without libnbd's blocking connect, which waits
 * for ever on a server that accepts and never answers: the handshake gets
 * SIO_NBD_CONNECT_TIMEOUT_MS. 0 (ready), -ETIMEDOUT, or -1 (libnbd's
 * error: nbd_get_errno(), nbd_get_error()).
 */
static int lib_connect_wait(const struct sio_nbd *n, struct nbd_handle *h)
{
	uint64_t end = now_ns() + handshake_ms(n->timeout_ms) * MS_NS, t;
	int r;

	r = n->transport == SIO_NBD_UNIX
		    ? nbd_aio_connect_unix(h, n->socket)
		    : nbd_aio_connect_tcp(h, n->host, n->port);
	if (r < 0)
		return -1;
	while (nbd_aio_is_connecting(h) == 1) {
		t = now_ns();
		if (t >= end)
			return -ETIMEDOUT;
		if (nbd_poll(h, (int)((end - t) / MS_NS + 1)) < 0)
			return -1;
	}
	return nbd_aio_is_ready(h) == 1 ? 0 : -1;
}

/*
 * A connection to n's export, handshake done. 0 and *out, or -errno with
 * a message naming the server and the export (-ETIMEDOUT: the handshake
 * did not finish in time).
 */
static int lib_connect(const struct sio_nbd *n, struct nbd_handle **out)
{
	struct nbd_handle *h;
	const char *msg;
	int r, err, ret = 0;

	h = nbd_create();
	if (!h) {
		err = nbd_get_errno();
		ret = sx_error(err ? -err : -ENOMEM, "%s: nbd_create: %s",
			       n->uri, lib_msg());
		goto out;
	}
	/* The library never prints, whatever LIBNBD_DEBUG says. */
	nbd_set_debug(h, false);
	if (nbd_set_export_name(h, n->export_name) < 0 ||
	    nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0) {
		err = nbd_get_errno();
		ret = sx_error(err ? -err : -EINVAL, "%s: %s", n->uri,
			       lib_msg());
		goto out;
	}
	r = lib_connect_wait(n, h);
	if (r == 0)
		goto out;
	if (r == -ETIMEDOUT) {
		ret = sx_error(-ETIMEDOUT, "%s: " HANDSHAKE_HINT, n->uri,
			       n->server, handshake_ms(n->timeout_ms));
		goto out;
	}
	err = nbd_get_errno();
	msg = lib_msg();
	if (strstr(msg, "TLS"))
		ret = sx_error(-EOPNOTSUPP,
			       "%s: NBD server %s requires TLS for export "
			       "'%s'; TLS is not supported yet (%s)",
			       n->uri, n->server, n->export_name, msg);
	else
		ret = sx_error(err ? -err : -EIO,
			       "%s: cannot open export '%s' on NBD server %s: "
			       "%s",
			       n->uri, n->export_name, n->server, msg);
out:
	if (ret < 0)
		lib_close(h);
	else
		*out = h;
	return ret;
}

/*
 * A failed read or block status on h: -errno with a message naming the
 * server. A lost connection says so and is -EIO.
 */
static int lib_io_error(struct nbd_handle *h, const char *uri, const char *what,
			uint64_t len, uint64_t off)
{
	int err = nbd_get_errno();
	const char *msg = lib_msg();

	if (lib_is_dead(h) || !err)
		return sx_error(-EIO,
				"%s: %s of %" PRIu64 " bytes at offset %" PRIu64
				": connection to the NBD server lost: %s",
				uri, what, len, off, msg);
	return sx_error(-err,
			"%s: %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
			uri, what, len, off, msg);
}

void sio_nbd_free(struct sio_nbd *n)
{
	if (!n)
		return;
	lib_close(n->h);
	pthread_mutex_destroy(&n->lock);
	free(n->host);
	free(n->port);
	free(n->socket);
	free(n->export_name);
	free(n->uri);
	free(n->server);
	free(n);
}

/* Copy what a says into n. 0, -EINVAL or -ENOMEM (messages recorded). */
static int copy_addr(struct sio_nbd *n, const struct sio_nbd_addr *a)
{
	n->transport = a->transport;
	if (a->transport == SIO_NBD_UNIX) {
		if (!a->socket || !*a->socket)
			return sx_error(-EINVAL, "sio_nbd_open: Unix socket "
						 "address without a path");
		n->socket = strdup(a->socket);
		if (!n->socket)
			goto nomem;
	} else if (a->transport == SIO_NBD_TCP) {
		if (!a->host || !*a->host || !a->port || !*a->port)
			return sx_error(-EINVAL, "sio_nbd_open: TCP address "
						 "without host or port");
		n->host = strdup(a->host);
		n->port = strdup(a->port);
		if (!n->host || !n->port)
			goto nomem;
	} else {
		return sx_error(-EINVAL, "sio_nbd_open: unknown transport %d",
				(int)a->transport);
	}
	n->export_name = strdup(a->export_name ? a->export_name : "");
	if (!n->export_name)
		goto nomem;
	n->uri = sio_nbd_addr_uri(&(struct sio_nbd_addr){
		.transport = n->transport,
		.host = n->host,
		.port = n->port,
		.socket = n->socket,
		.export_name = n->export_name,
	});
	n->server = make_server(n);
	if (!n->uri || !n->server)
		goto nomem;
	return 0;
nomem:
	return sx_error(-ENOMEM, "sio_nbd_open: out of memory");
}

/* Sizes and capabilities from the handshake on n->h. */
static int learn_export(struct sio_nbd *n)
{
	int64_t size, v[3];
	int i;

	size = nbd_get_size(n->h);
	if (size < 0)
		return sx_error(-EIO, "%s: cannot get the export's size: %s",
				n->uri, lib_msg());
	n->size = (uint64_t)size;
	for (i = 0; i < 3; i++) {
		v[i] = nbd_get_block_size(n->h, i);
		if (v[i] < 0 || v[i] > UINT32_MAX)
			v[i] = 0;
	}
	n->min_block = (uint32_t)v[LIBNBD_SIZE_MINIMUM];
	n->pref_block = (uint32_t)v[LIBNBD_SIZE_PREFERRED];
	n->max_block = (uint32_t)v[LIBNBD_SIZE_MAXIMUM];
	n->align = 1;
	if (n->min_block > 1 && sx_is_pow2(n->min_block))
		n->align = n->min_block;
	n->max_io = n->max_block ? n->max_block : DEFAULT_MAX_REQUEST;
	n->max_io = (uint32_t)sx_min(n->max_io, LIBNBD_MAX_REQUEST);
	n->max_io = (uint32_t)sx_align_down(n->max_io, n->align);
	if (!n->max_io)
		return sx_error(-EPROTO,
				"%s: server's block sizes make no sense "
				"(minimum %" PRIu32 ", maximum %" PRIu32 ")",
				n->uri, n->min_block, n->max_block);
	n->multi_conn = nbd_can_multi_conn(n->h) == 1;
	n->block_status =
		nbd_can_meta_context(n->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
	return 0;
}

/* A setting of sio_nbd_opts: 0 takes the process-wide value g. */
static unsigned opt_value(unsigned v, unsigned g)
{
	return v == SIO_NBD_OFF ? 0 : v ? v : g;
}

int sio_nbd_open(const struct sio_nbd_addr *a, unsigned flags,
		 struct sio_file **out)
{
	return sio_nbd_open_opts(a, flags, NULL, out);
}

int sio_nbd_open_opts(const struct sio_nbd_addr *a, unsigned flags,
		      const struct sio_nbd_opts *o, struct sio_file **out)
{
	const struct sio_nbd_opts none = {0};
	struct sio_file *f = NULL;
	struct sio_nbd *n = NULL;
	int ret;

	if (!a || !out)
		return sx_error(-EINVAL, "sio_nbd_open: NULL argument");
	if (!o)
		o = &none;
	if (o->connections > SIO_NBD_MAX_CONNECTIONS)
		return sx_error(-EINVAL,
				"NBD export '%s': %u connections asked for, "
				"at most %u",
				a->export_name ? a->export_name : "",
				o->connections, SIO_NBD_MAX_CONNECTIONS);
	if (flags & ~(unsigned)SIO_OPEN_MASK)
		return sx_error(-EINVAL, "sio_nbd_open: invalid flags 0x%x",
				flags);
	if (flags & (SIO_RDWR | SIO_CREATE | SIO_TRUNC | SIO_EXCL))
		return sx_error(-EROFS,
				"NBD export '%s': exports are opened "
				"read-only (write access asked for)",
				a->export_name ? a->export_name : "");
	f = calloc(1, sizeof(*f));
	n = calloc(1, sizeof(*n));
	if (!f || !n) {
		ret = sx_error(-ENOMEM, "sio_nbd_open: out of memory");
		goto out;
	}
	f->fd = -1;
	ret = pthread_mutex_init(&n->lock, NULL);
	if (ret) {
		ret = sx_error(-ret, "sio_nbd_open: pthread_mutex_init: %s",
			       strerror(ret));
		free(n);
		n = NULL;
		goto out;
	}
	n->reconnect_ms =
		opt_value(o->reconnect_ms, atomic_load(&nbd_reconnect_ms));
	n->timeout_ms = opt_value(o->timeout_ms, atomic_load(&nbd_timeout_ms));
	n->connections =
		o->connections ? o->connections : atomic_load(&nbd_connections);
	ret = copy_addr(n, a);
	if (ret < 0)
		goto out;
	ret = lib_connect(n, &n->h);
	if (ret < 0)
		goto out;
	ret = learn_export(n);
	if (ret < 0)
		goto out;
	n->id = atomic_fetch_add(&next_id, 1);
	f->path = strdup(n->uri);
	if (!f->path) {
		ret = sx_error(-ENOMEM, "%s: out of memory", n->uri);
		goto out;
	}
	/* No memory alignment: bytes go through a socket, not DMA. */
	f->align = n->align;
	f->mem_align = 1;
	f->nbd = n;
out:
	if (ret < 0) {
		sio_nbd_free(n);
		if (f)
			free(f->path);
		free(f);
	} else {
		*out = f;
	}
	return ret;
}

const char *sio_req_error(const struct sio_req *req)
{
	return req->file && req->file->nbd ? req->_nbd.msg : NULL;
}

bool sio_file_is_nbd(const struct sio_file *f)
{
	return f && f->nbd;
}

int sio_nbd_get_info(const struct sio_file *f, struct sio_nbd_info *out)
{
	const struct sio_nbd *n;

	if (!sio_file_is_nbd(f) || !out)
		return sx_error(-EINVAL, "sio_nbd_get_info: not an NBD file");
	n = f->nbd;
	memset(out, 0, sizeof(*out));
	out->uri = n->uri;
	out->server = n->server;
	out->export_name = n->export_name;
	out->size = n->size;
	out->min_block = n->min_block;
	out->pref_block = n->pref_block;
	out->max_block = n->max_block;
	out->max_request = n->max_io;
	out->can_multi_conn = n->multi_conn;
	out->connections = sio_nbd_conns_wanted(f);
	out->block_status = n->block_status;
	return 0;
}

uint64_t sio_nbd_size(const struct sio_file *f)
{
	return f->nbd->size;
}

/*
 * h, a new connection to n's export, becomes the file's own if the export
 * still has its size: 0, or -EIO (h closed). Under n->lock.
 */
static int sync_adopt(struct sio_nbd *n, struct nbd_handle *h)
{
	int64_t size = nbd_get_size(h);

	if (size < 0 || (uint64_t)size != n->size) {
		lib_close(h);
		return sx_error(-EIO,
				"%s: after reconnecting the export's size is "
				"%" PRId64 " bytes, not %" PRIu64
				": not the same export, refused",
				n->uri, size, n->size);
	}
	n->h = h;
	return 0;
}

/*
 * The file's own connection is gone (n->h dead, or NULL after a revive
 * that failed): connect again, blocking, with the backoff of the queue's
 * connections, within the reconnect window (io/nbd.h). 0 with n->h
 * ready for the same export, or -errno with a message. Under n->lock.
 */
static int sync_revive(struct sio_nbd *n)
{
	unsigned window = n->reconnect_ms;
	unsigned backoff = BACKOFF_FIRST_MS;
	char last[480];
	uint64_t end = now_ns() + window * MS_NS;
	struct timespec nap;
	struct nbd_handle *h;
	int ret;

	lib_close(n->h);
	n->h = NULL;
	for (;;) {
		ret = lib_connect(n, &h);
		if (ret == 0)
			break;
		if (now_ns() >= end) {
			/* Its message, out of the buffer it is rewritten in. */
			snprintf(last, sizeof(last), "%s", sx_last_error());
			return sx_error(-EIO,
					"%s: connection to the NBD server %s "
					"lost: no connection for %u ms, giving "
					"up (last: %s)",
					n->uri, n->server, window, last);
		}
		nap.tv_sec = backoff / 1000;
		nap.tv_nsec = (long)(backoff % 1000) * 1000000;
		nanosleep(&nap, NULL);
		backoff = sx_min(backoff * 2, BACKOFF_MAX_MS);
	}
	return sync_adopt(n, h);
}

/*
 * The file's own connection made way for a queue's (sync_make_way()):
 * connect again, once. -ETIMEDOUT: a server that takes one client has
 * none free (the message says so); another error: the server went away
 * meanwhile (the caller treats it as a dropped connection). Under
 * n->lock.
 */
static int sync_unpark(struct sio_nbd *n)
{
	struct nbd_handle *h;
	int ret;

	ret = lib_connect(n, &h);
	if (ret < 0)
		return ret;
	ret = sync_adopt(n, h);
	if (ret == 0)
		n->parked = false;
	return ret;
}

/*
 * A queue starts a connection to a server that does not advertise
 * multi-conn, which may take one client at a time (qemu-nbd without
 * --shared): the file's own connection, when idle, makes way (closed;
 * the next synchronous call connects again). One in use stays (trylock:
 * the queue's thread never waits for it).
 */
static void sync_make_way(struct sio_nbd *n)
{
	if (n->multi_conn || pthread_mutex_trylock(&n->lock) != 0)
		return;
	if (n->h) {
		lib_close(n->h);
		n->h = NULL;
		n->parked = true;
	}
	pthread_mutex_unlock(&n->lock);
}

/*
 * Whether a failed call on the file's own connection is worth another
 * try: it made way for a queue's and is made again (sync_unpark()), or
 * it is gone, a reconnect window is set and sync_revive() made a new one.
 * *ret is its error when it failed.
 */
static bool sync_retry(struct sio_nbd *n, int *ret)
{
	if (!n->h && n->parked) {
		*ret = sync_unpark(n);
		if (*ret == 0 || *ret == -ETIMEDOUT)
			return *ret == 0;
		/* Gone meanwhile: as a dropped connection, below. */
		n->parked = false;
	}
	if (n->h && !lib_is_dead(n->h))
		return false; /* the server's error: *ret stays */
	if (!n->reconnect_ms) {
		if (!n->h)
			*ret = sx_error(-EIO,
					"%s: connection to the NBD server %s "
					"lost",
					n->uri, n->server);
		return false;
	}
	*ret = sync_revive(n);
	return *ret == 0;
}

/* Read [off, off + len), within the export, in pieces the server takes. */
static int read_pieces(struct sio_nbd *n, char *buf, uint64_t len, uint64_t off)
{
	uint64_t done, piece;
	int ret;

	for (done = 0; done < len; done += piece) {
		piece = sx_min(len - done, n->max_io);
		if (!n->h && !sync_retry(n, &ret))
			return ret;
		if (nbd_pread(n->h, buf + done, (size_t)piece, off + done, 0) ==
		    0)
			continue;
		ret = lib_io_error(n->h, n->uri, "read", piece, off + done);
		if (!sync_retry(n, &ret))
			return ret;
		piece = 0; /* connected again: the same piece */
	}
	return 0;
}

/*
 * Unaligned read on a server with a minimum block size: the aligned
 * blocks around it, a bounce buffer at a time.
 */
static int read_bounced(struct sio_nbd *n, char *buf, uint64_t len,
			uint64_t off)
{
	uint64_t start, end, pos, from, to, bsz, piece;
	char *bounce = NULL;
	int ret;

	/* A size off the grid leaves its last bytes out of reach: zeros. */
	memset(buf, 0, len);
	start = sx_align_down(off, n->align);
	ret = sx_align_up(off + len, n->align, &end);
	if (ret < 0)
		goto out;
	end = sx_min(end, sx_align_down(n->size, n->align));
	bsz = sx_min(sx_max(sx_align_down(BOUNCE_MAX, n->align), n->align),
		     end - start);
	bounce = malloc(bsz ? bsz : 1);
	if (!bounce) {
		ret = sx_error(-ENOMEM, "%s: read: out of memory", n->uri);
		goto out;
	}
	for (pos = start; pos < end; pos += piece) {
		piece = sx_min(bsz, end - pos);
		ret = read_pieces(n, bounce, piece, pos);
		if (ret < 0)
			goto out;
		from = sx_max(pos, off);
		to = sx_min(pos + piece, off + len);
		if (to > from)
			memcpy(buf + (from - off), bounce + (from - pos),
			       to - from);
	}
out:
	free(bounce);
	return ret;
}

int sio_nbd_pread(struct sio_file *f, void *buf, size_t len, uint64_t off)
{
	struct sio_nbd *n = f->nbd;
	uint64_t avail;
	int ret;

	avail = off >= n->size ? 0 : sx_min(len, n->size - off);
	/* Past the export's end reads as zeros, as past a file's end. */
	memset((char *)buf + avail, 0, len - avail);
	if (!avail)
		return 0;
	sio_count_sync_wait();
	pthread_mutex_lock(&n->lock);
	if (!sx_is_aligned(off, n->align) || !sx_is_aligned(avail, n->align))
		ret = read_bounced(n, buf, avail, off);
	else
		ret = read_pieces(n, buf, avail, off);
	pthread_mutex_unlock(&n->lock);
	return ret;
}

/* Where a block status walk is, for its extent callback. */
struct bs_walk {
	struct sio_nbd_extent *v;
	unsigned max, n;
	uint64_t pos, end; /* next byte to describe, end of the range */
	bool seen; /* base:allocation already answered this request */
	bool full; /* v has no room left */
	struct sio_req *owner; /* a queue's request (status_send), or NULL */
};

/* Add [pos, pos + len) with flags to the walk. false when v is full. */
static bool bs_add(struct bs_walk *w, uint64_t len, uint32_t flags)
{
	if (w->n && w->v[w->n - 1].flags == flags) {
		w->v[w->n - 1].len += len;
	} else if (w->n < w->max) {
		w->v[w->n].len = len;
		w->v[w->n].flags = flags;
		w->n++;
	} else {
		w->full = true;
		return false;
	}
	w->pos += len;
	return true;
}

/*
 * libnbd's extent callback: the base:allocation extents from offset, in
 * (length, flags) pairs, added to the walk from where it is, up to its
 * end. Only records; always 0 (the status is not failed from here).
 */
static int bs_extent(void *user_data, const char *context, uint64_t offset,
		     uint32_t *entries, size_t nr_entries, int *error)
{
	struct bs_walk *w = user_data;
	uint64_t at = offset, from, to;
	uint32_t flags;
	size_t i;

	(void)error;
	/* A server may answer twice (libnbd warns); trust the first. */
	if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) || w->seen)
		return 0;
	w->seen = true;
	for (i = 0; i + 1 < nr_entries; i += 2) {
		from = sx_max(at, w->pos);
		at += entries[i];
		to = sx_min(at, w->end);
		if (at <= w->pos)
			continue;
		if (from != w->pos || to <= from)
			break; /* a gap, or past the range: stop there */
		flags = entries[i + 1] & (SIO_NBD_HOLE | SIO_NBD_ZERO);
		if (!bs_add(w, to - from, flags))
			break;
	}
	return 0;
}

int sio_nbd_block_status(struct sio_file *f, uint64_t off, uint64_t len,
			 struct sio_nbd_extent *v, unsigned max, unsigned *n)
{
	struct bs_walk w = {.v = v, .max = max, .pos = off};
	struct sio_nbd *nb;
	uint64_t start, end, before;
	int ret = 0;

	if (!sio_file_is_nbd(f) || !v || !max || !n)
		return sx_error(-EINVAL, "sio_nbd_block_status: bad arguments");
	nb = f->nbd;
	w.end = off >= nb->size ? off : off + sx_min(len, nb->size - off);
	if (!nb->block_status) {
		if (w.end > off)
			bs_add(&w, w.end - off, 0);
		goto out;
	}
	pthread_mutex_lock(&nb->lock);
	while (w.pos < w.end && !w.full) {
		before = w.pos;
		start = sx_align_down(w.pos, nb->align);
		end = sx_min(w.end, start + BS_MAX_REQUEST);
		if (sx_align_up(end, nb->align, &end) < 0 || end > nb->size)
			end = nb->size;
		w.seen = false;
		if (!nb->h && !sync_retry(nb, &ret))
			break;
		sio_count_sync_wait();
		if (nbd_block_status(nb->h, end - start, start,
				     (nbd_extent_callback){
					     .callback = bs_extent,
					     .user_data = &w,
				     },
				     0) < 0) {
			ret = lib_io_error(nb->h, nb->uri, "block status",
					   end - start, start);
			/* Again, if nothing of it was taken (w as it was). */
			if (w.pos == before && sync_retry(nb, &ret)) {
				ret = 0;
				continue;
			}
			break;
		}
		if (w.pos == before) {
			ret = sx_error(-EIO,
				       "%s: block status at offset %" PRIu64
				       ": the server described nothing",
				       nb->uri, before);
			break;
		}
	}
	pthread_mutex_unlock(&nb->lock);
out:
	if (ret == 0)
		*n = w.n;
	return ret;
}

void sio_nbd_set_connections(unsigned n)
{
	if (!n)
		n = SIO_NBD_DEFAULT_CONNECTIONS;
	atomic_store(&nbd_connections, sx_min(n, SIO_NBD_MAX_CONNECTIONS));
}

unsigned sio_nbd_conns_wanted(const struct sio_file *f)
{
	return f->nbd->multi_conn ? f->nbd->connections : 1;
}

bool sio_nbd_has_block_status(const struct sio_file *f)
{
	return sio_file_is_nbd(f) && f->nbd->block_status;
}

bool sio_nbd_conn_up(const struct sio_nbd_conn *c)
{
	return c->state == CONN_UP;
}

unsigned sio_nbd_conn_held(const struct sio_nbd_conn *c)
{
	return c->held;
}

void sio_nbd_set_timeouts(unsigned reconnect_ms, unsigned timeout_ms)
{
	atomic_store(&nbd_reconnect_ms, reconnect_ms);
	atomic_store(&nbd_timeout_ms, timeout_ms);
}

static int conn_copy(struct sio_nbd_conn *c, const struct sio_nbd *n)
{
	c->transport = n->transport;
	c->uri = strdup(n->uri);
	c->server = strdup(n->server);
	c->export_name = strdup(n->export_name);
	if (n->transport == SIO_NBD_UNIX) {
		c->socket = strdup(n->socket);
	} else {
		c->host = strdup(n->host);
		c->port = strdup(n->port);
	}
	if (!c->uri || !c->server || !c->export_name ||
	    (n->transport == SIO_NBD_UNIX ? !c->socket : !c->host || !c->port))
		return sx_error(-ENOMEM, "%s: out of memory", n->uri);
	return 0;
}

static void conn_advance(struct sio_nbd_conn *c, uint64_t now);

int sio_nbd_conn_open(struct sio_file *f, struct sio_nbd_conn **out)
{
	struct sio_nbd_conn *c;
	struct sio_nbd *n = f->nbd;
	uint64_t now;
	int ret;

	c = calloc(1, sizeof(*c));
	if (!c)
		return sx_error(-ENOMEM, "%s: out of memory", n->uri);
	sync_make_way(n);
	c->file = f;
	c->id = n->id;
	c->max_io = n->max_io;
	c->align = n->align;
	c->size = n->size;
	c->reconnect_ms = n->reconnect_ms;
	c->timeout_ms = n->timeout_ms;
	ret = conn_copy(c, n);
	if (ret < 0)
		goto out;
	/*
	 * Connected the way a dropped connection is connected again: the
	 * owner's thread never waits for the server (its requests do).
	 */
	c->fd = -1;
	c->state = CONN_BACKOFF;
	c->backoff_ms = BACKOFF_FIRST_MS;
	now = now_ns();
	c->next_try = now;
	c->window_end =
		now +
		sx_max(c->reconnect_ms, handshake_ms(c->timeout_ms)) * MS_NS;
	conn_advance(c, now);
out:
	if (ret < 0)
		sio_nbd_conn_close(c);
	else
		*out = c;
	return ret;
}

bool sio_nbd_conn_owns(const struct sio_nbd_conn *c, const struct sio_file *f)
{
	return c->file == f && f->nbd && f->nbd->id == c->id;
}

int sio_nbd_conn_fd(const struct sio_nbd_conn *c)
{
	return c->fd;
}

unsigned sio_nbd_conn_gen(const struct sio_nbd_conn *c)
{
	return c->gen;
}

/* libnbd's completion callback: record, never call back (see the top). */
static int read_done(void *user_data, int *error)
{
	struct sio_req *req = user_data;
	struct sio_nbd_conn *c = req->_nbd.conn;

	c->inflight--;
	c->cb_runs++;
	c->replied = true;
	if (*error && !req->_nbd.err)
		req->_nbd.err = -*error;
	req->_nbd.parts--;
	if (!req->_nbd.parts && req->_done_bytes == req->_nbd.end)
		list_append(&c->done_head, &c->done_tail, req);
	return 1; /* retire the command: nobody asks for it by cookie */
}

/* The memory of req at byte pos, and how much of it one read may fill. */
static char *req_mem(const struct sio_req *req, uint64_t pos, uint64_t max,
		     uint64_t *n)
{
	uint64_t at = 0, len;
	int i;

	if (req->buf) {
		*n = max;
		return (char *)req->buf + pos;
	}
	for (i = 0; i < req->iovcnt; i++) {
		len = req->iov[i].iov_len;
		if (pos < at + len) {
			*n = sx_min(max, at + len - pos);
			return (char *)req->iov[i].iov_base + (pos - at);
		}
		at += len;
	}
	*n = 0; /* unreachable: the queue checked the iovec's length */
	return NULL;
}

/* The head of the wait list asks for nothing more: it leaves the list. */
static void wait_done(struct sio_nbd_conn *c, struct sio_req *req)
{
	list_pop(&c->wait_head, &c->wait_tail);
	if (req->_nbd.err)
		req->_done_bytes = req->_nbd.end; /* the rest is not read */
	if (!req->_nbd.parts)
		list_append(&c->done_head, &c->done_tail, req);
}

/* Give up: every request waiting fails (dead_msg says why). */
static void conn_down(struct sio_nbd_conn *c, const char *why)
{
	struct sio_req *req;

	if (c->h) {
		lib_close(c->h);
		c->h = NULL;
	}
	c->fd = -1;
	c->state = CONN_DOWN;
	c->dead = true;
	if (why)
		snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", why);
	while ((req = c->wait_head)) {
		if (!req->_nbd.err)
			req->_nbd.err = -EIO;
		wait_done(c, req);
	}
}

/*
 * Put back on the wait list, from its first byte, every request the dead
 * connection failed or left unfinished (a successful one keeps its
 * place on the done list): they go to the next connection whole, into
 * the same memory. Nothing of them is in flight any more (libnbd fails
 * every command of a dead handle).
 */
static void conn_requeue(struct sio_nbd_conn *c)
{
	struct sio_req *keep_head = NULL, *keep_tail = NULL;
	struct sio_req *again_head = NULL, *again_tail = NULL, *req;

	while ((req = list_pop(&c->done_head, &c->done_tail))) {
		if (req->_nbd.err)
			list_append(&again_head, &again_tail, req);
		else
			list_append(&keep_head, &keep_tail, req);
	}
	c->done_head = keep_head;
	c->done_tail = keep_tail;
	while ((req = list_pop(&c->wait_head, &c->wait_tail)))
		list_append(&again_head, &again_tail, req);
	for (req = again_head; req; req = req->_next) {
		req->_done_bytes = 0;
		req->_nbd.parts = 0;
		req->_nbd.err = 0;
	}
	c->wait_head = again_head;
	c->wait_tail = again_tail;
	c->inflight = 0;
}

/*
 * The handle died (reset, server gone, the timeout shut it): close it and
 * start reconnecting, or give up when no window is set.
 */
static void conn_died(struct sio_nbd_conn *c, const char *msg, uint64_t now)
{
	char why[sizeof(c->dead_msg)];

	if (c->hung)
		snprintf(why, sizeof(why),
			 "the server did not answer for %u ms", c->timeout_ms);
	else
		snprintf(why, sizeof(why), "%s",
			 msg ? msg : "the server closed the connection");
	c->hung = false;
	lib_close(c->h);
	c->h = NULL;
	c->fd = -1;
	snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", why);
	if (!c->reconnect_ms) {
		conn_down(c, NULL);
		return;
	}
	conn_requeue(c);
	if (c->state == CONN_UP)
		c->window_end = now + c->reconnect_ms * MS_NS;
	c->state = CONN_BACKOFF;
	c->next_try = now;
	if (!c->backoff_ms)
		c->backoff_ms = BACKOFF_FIRST_MS;
}

/* Whether the handle is gone; if so, conn_died(). */
static bool conn_check_dead(struct sio_nbd_conn *c, const char *msg,
			    uint64_t now)
{
	if (!c->h || !lib_is_dead(c->h))
		return false;
	conn_died(c, msg, now);
	return true;
}

/*
 * An attempt failed (dead_msg says how): the next after the backoff, or,
 * without a reconnect window, give up now.
 */
static void conn_retry_later(struct sio_nbd_conn *c, uint64_t now)
{
	c->state = CONN_BACKOFF;
	if (!c->reconnect_ms) {
		conn_down(c, NULL);
		return;
	}
	c->next_try = now + c->backoff_ms * MS_NS;
	c->backoff_ms = sx_min(c->backoff_ms * 2, BACKOFF_MAX_MS);
}

/* Start connecting a new handle, without waiting (CONN_CONNECTING). */
static void conn_start(struct sio_nbd_conn *c, uint64_t now)
{
	struct nbd_handle *h = nbd_create();
	int r = -1;

	if (h) {
		nbd_set_debug(h, false);
		if (nbd_set_export_name(h, c->export_name) == 0 &&
		    nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) ==
			    0)
			r = c->transport == SIO_NBD_UNIX
				    ? nbd_aio_connect_unix(h, c->socket)
				    : nbd_aio_connect_tcp(h, c->host, c->port);
	}
	if (r < 0 || nbd_aio_get_fd(h) < 0) {
		/* Refused at once (no socket, nobody listening): later. */
		snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", lib_msg());
		if (h)
			nbd_close(h);
		conn_retry_later(c, now);
		return;
	}
	c->h = h;
	c->fd = nbd_aio_get_fd(h);
	c->gen++;
	c->state = CONN_CONNECTING;
	c->connect_end = now + handshake_ms(c->timeout_ms) * MS_NS;
}

/*
 * A new handle finished its handshake: the same export (its size), or
 * the layer is refused for good.
 */
static void conn_ready(struct sio_nbd_conn *c, uint64_t now)
{
	int64_t size = nbd_get_size(c->h);
	char why[sizeof(c->dead_msg)];

	if (size < 0 || (uint64_t)size != c->size) {
		snprintf(why, sizeof(why),
			 "after reconnecting the export's size is %" PRId64
			 " bytes, not %" PRIu64
			 ": not the same export, refused",
			 size, c->size);
		c->reconnect_ms = 0; /* never again on this one */
		conn_down(c, why);
		return;
	}
	c->state = CONN_UP;
	c->backoff_ms = 0;
	c->last_reply = now;
	c->replied = false;
}

/* Where the reconnect is, at now: connect, wait, or give up. */
static void conn_advance(struct sio_nbd_conn *c, uint64_t now)
{
	char why[sizeof(c->dead_msg)];

	if (c->state == CONN_CONNECTING) {
		if (nbd_aio_is_ready(c->h) == 1) {
			conn_ready(c, now);
			return;
		}
		if (lib_is_dead(c->h) || now >= c->connect_end) {
			if (lib_is_dead(c->h))
				snprintf(c->dead_msg, sizeof(c->dead_msg), "%s",
					 lib_msg());
			else
				snprintf(c->dead_msg, sizeof(c->dead_msg),
					 HANDSHAKE_HINT, c->server,
					 handshake_ms(c->timeout_ms));
			lib_close(c->h);
			c->h = NULL;
			c->fd = -1;
			conn_retry_later(c, now);
			if (c->state == CONN_DOWN)
				return;
		}
	}
	if (c->state != CONN_BACKOFF && c->state != CONN_CONNECTING)
		return;
	if (now >= c->window_end) {
		snprintf(why, sizeof(why),
			 "no connection for %u ms, giving up (last: %.480s)",
			 c->reconnect_ms, c->dead_msg);
		conn_down(c, why);
		return;
	}
	if (c->state == CONN_BACKOFF && now >= c->next_try)
		conn_start(c, now);
}

/*
 * A command was refused (its call returned -1) with `issued` commands in
 * flight counting it, `runs` completions called back during the call: did
 * libnbd call the refused one back too? It does when the handle dies
 * while sending it (seen with a server killed: a broken pipe): every
 * command of the handle is then retired through its callback, the
 * refused one included, and that callback did its accounting, which the
 * caller must not do again (it underflowed the count in flight and put a
 * request on two lists).
 */
static bool issued_back(unsigned issued, unsigned runs)
{
	return runs >= issued;
}

/*
 * libnbd's completion of a block status command: the request is done,
 * with the extents its walk collected (req->_done_bytes counts them).
 */
static int status_done(void *user_data, int *error)
{
	struct sio_req *req = user_data;
	struct sio_nbd_conn *c = req->_nbd.conn;
	struct bs_walk *w = req->_nbd.walk;

	c->inflight--;
	c->cb_runs++;
	c->replied = true;
	req->_nbd.parts--;
	if (*error && !req->_nbd.err)
		req->_nbd.err = -*error;
	if (!req->_nbd.err && (!w || w->pos == req->off))
		req->_nbd.err = -EIO; /* described nothing */
	req->_done_bytes = !req->_nbd.err && w ? w->n : 0;
	list_append(&c->done_head, &c->done_tail, req);
	return 1;
}

/* The block status walk of a request is no longer needed by libnbd. */
static void walk_free(void *user_data)
{
	struct bs_walk *w = user_data;

	if (w && w->owner && w->owner->_nbd.walk == w)
		w->owner->_nbd.walk = NULL;
	free(w);
}

/*
 * Send the block status request at the head of the wait list (it leaves
 * the list): one command for [off, off + len) clipped to the export and
 * to BS_MAX_REQUEST, its start aligned down to the minimum block. 1 sent,
 * 0 refused (req failed or requeued; *stop when the connection died).
 */
static int status_send(struct sio_nbd_conn *c, struct sio_req *req,
		       uint64_t now, bool *stop)
{
	uint64_t start, end;
	struct bs_walk *w;
	unsigned issued;
	int64_t cookie;
	int err;

	list_pop(&c->wait_head, &c->wait_tail);
	w = calloc(1, sizeof(*w));
	if (!w) {
		req->_nbd.err = -ENOMEM;
		list_append(&c->done_head, &c->done_tail, req);
		return 0;
	}
	w->v = req->buf;
	w->max = (unsigned)req->mode;
	w->pos = req->off;
	w->end = req->off + req->_nbd.end;
	w->owner = req;
	start = sx_align_down(req->off, c->align ? c->align : 1);
	end = sx_min(w->end, start + BS_MAX_REQUEST);
	if (c->align && sx_align_up(end, c->align, &end) < 0)
		end = c->size;
	end = sx_min(end, c->size);
	req->_nbd.walk = w;
	if (!c->inflight)
		c->last_reply = now;
	req->_nbd.parts++;
	c->inflight++;
	issued = c->inflight;
	c->cb_runs = 0;
	cookie = nbd_aio_block_status(c->h, end - start, start,
				      (nbd_extent_callback){
					      .callback = bs_extent,
					      .user_data = w,
					      .free = walk_free,
				      },
				      (nbd_completion_callback){
					      .callback = status_done,
					      .user_data = req,
				      },
				      0);
	if (cookie >= 0)
		return 1;
	err = nbd_get_errno();
	if (issued_back(issued, c->cb_runs)) {
		/* Done through status_done(), with an error. */
		*stop = conn_check_dead(c, lib_msg(), now);
		return 0;
	}
	/* Refused: libnbd calls neither back, but frees the walk. */
	req->_nbd.parts--;
	c->inflight--;
	list_push_front(&c->wait_head, &c->wait_tail, req);
	if (conn_check_dead(c, lib_msg(), now)) {
		*stop = true;
		return 0;
	}
	list_pop(&c->wait_head, &c->wait_tail);
	req->_nbd.err = err ? -err : -EIO;
	list_append(&c->done_head, &c->done_tail, req);
	return 0;
}

/* Ask for more of the waiting requests while there is room in flight. */
static void conn_pump(struct sio_nbd_conn *c, uint64_t now)
{
	struct sio_req *req;
	uint64_t pos, n;
	unsigned issued;
	int64_t cookie;
	bool stop = false;
	char *p;
	int err;

	while ((req = c->wait_head) && c->state == CONN_UP &&
	       c->inflight < CONN_DEPTH) {
		if (req->_nbd.err) {
			wait_done(c, req);
			continue;
		}
		if (req->op == SIO_OP_NBD_STATUS) {
			status_send(c, req, now, &stop);
			if (stop)
				break;
			continue;
		}
		pos = req->_done_bytes;
		p = req_mem(req, pos, sx_min(req->_nbd.end - pos, c->max_io),
			    &n);
		if (!p || !n) {
			req->_nbd.err = -EINVAL;
			wait_done(c, req);
			continue;
		}
		/* Counted before the call: libnbd may finish it inside. */
		if (!c->inflight)
			c->last_reply = now; /* the timeout counts from here */
		req->_done_bytes += n;
		req->_nbd.parts++;
		c->inflight++;
		if (req->_done_bytes == req->_nbd.end)
			list_pop(&c->wait_head, &c->wait_tail);
		issued = c->inflight;
		c->cb_runs = 0;
		cookie = nbd_aio_pread(c->h, p, (size_t)n, req->off + pos,
				       (nbd_completion_callback){
					       .callback = read_done,
					       .user_data = req,
				       },
				       0);
		if (cookie >= 0)
			continue;
		err = nbd_get_errno();
		if (issued_back(issued, c->cb_runs)) {
			/* Failed through read_done(): the rest is requeued. */
			if (conn_check_dead(c, lib_msg(), now))
				break;
			continue;
		}
		/* Refused: libnbd will not call back for this one. */
		req->_nbd.parts--;
		c->inflight--;
		if (req->_done_bytes == req->_nbd.end && c->wait_head != req)
			/* Off the wait list: back on it, at the head. */
			list_push_front(&c->wait_head, &c->wait_tail, req);
		if (conn_check_dead(c, lib_msg(), now))
			break; /* requeued whole: the next connection reads it */
		if (!req->_nbd.err)
			req->_nbd.err = err ? -err : -EIO;
		wait_done(c, req);
	}
	/* A read that libnbd queued may have found the connection dead. */
	if (c->state == CONN_UP && conn_check_dead(c, NULL, now))
		conn_advance(c, now);
}

void sio_nbd_conn_submit(struct sio_nbd_conn *c, struct sio_req *req,
			 uint64_t n)
{
	uint64_t now = now_ns();

	req->_done_bytes = 0;
	req->_nbd.conn = c;
	req->_nbd.end = n;
	req->_nbd.parts = 0;
	req->_nbd.err = 0;
	c->held++;
	list_append(&c->wait_head, &c->wait_tail, req);
	if (c->state == CONN_DOWN) {
		if (!c->reconnect_ms) {
			conn_down(c, NULL); /* fails it with the old reason */
			return;
		}
		/* Given up before: this request gets a window of its own. */
		c->dead = false;
		c->state = CONN_BACKOFF;
		c->next_try = now;
		c->window_end = now + c->reconnect_ms * MS_NS;
		c->backoff_ms = BACKOFF_FIRST_MS;
		conn_advance(c, now);
	}
	conn_pump(c, now);
}

unsigned sio_nbd_conn_events(const struct sio_nbd_conn *c)
{
	unsigned dir, ev = 0;

	if (!c->h || (c->state != CONN_UP && c->state != CONN_CONNECTING))
		return 0;
	dir = nbd_aio_get_direction(c->h);
	if ((dir & LIBNBD_AIO_DIRECTION_READ) &&
	    (c->inflight || c->state == CONN_CONNECTING))
		ev |= POLLIN;
	if (dir & LIBNBD_AIO_DIRECTION_WRITE)
		ev |= POLLOUT;
	/* In flight but libnbd waits for nothing: only a death tells. */
	if (!ev && c->inflight)
		ev = POLLIN;
	return ev;
}

uint64_t sio_nbd_conn_deadline(const struct sio_nbd_conn *c)
{
	switch (c->state) {
	case CONN_BACKOFF:
		return sx_min(c->next_try, c->window_end);
	case CONN_CONNECTING:
		return sx_min(c->window_end, c->connect_end);
	case CONN_UP:
		if (c->inflight && c->timeout_ms)
			return c->last_reply + c->timeout_ms * MS_NS;
		return 0;
	case CONN_DOWN:
		break;
	}
	return 0;
}

void sio_nbd_conn_tick(struct sio_nbd_conn *c)
{
	uint64_t now = now_ns();

	if (c->state == CONN_UP && c->inflight && c->timeout_ms &&
	    now >= c->last_reply + c->timeout_ms * MS_NS && !c->hung) {
		/*
		 * A server that stopped answering: shut the socket, so that
		 * libnbd sees the end, fails what is in flight and the
		 * connection goes the way of any dead one.
		 */
		c->hung = true;
		shutdown(c->fd, SHUT_RDWR);
		return; /* the poll reports it */
	}
	conn_advance(c, now);
	conn_pump(c, now);
}

void sio_nbd_conn_notify(struct sio_nbd_conn *c, int revents)
{
	uint64_t now = now_ns();
	unsigned dir;
	int r = 0;

	if (!c->h)
		goto out;
	if (revents < 0)
		revents = POLLERR; /* let libnbd find out what it was */
	dir = nbd_aio_get_direction(c->h);
	/* Read first: a reply may change what libnbd wants to write. */
	if ((revents & (POLLIN | POLLHUP | POLLERR)) &&
	    (dir & LIBNBD_AIO_DIRECTION_READ))
		r = nbd_aio_notify_read(c->h);
	else if ((revents & (POLLOUT | POLLHUP | POLLERR)) &&
		 (dir & LIBNBD_AIO_DIRECTION_WRITE))
		r = nbd_aio_notify_write(c->h);
	if (c->replied) {
		c->replied = false;
		c->last_reply = now;
	}
	if (c->state == CONN_UP)
		conn_check_dead(c, r < 0 ? lib_msg() : NULL, now);
	conn_advance(c, now);
out:
	conn_pump(c, now);
}

struct sio_req *sio_nbd_conn_pop(struct sio_nbd_conn *c, int *res)
{
	const char *what;
	struct sio_req *req;
	int err;

	req = list_pop(&c->done_head, &c->done_tail);
	if (!req)
		return NULL;
	c->held--;
	err = req->_nbd.err;
	req->_nbd.msg = NULL;
	if (err < 0 && c->dead) {
		snprintf(c->fail_msg, sizeof(c->fail_msg),
			 "connection to the NBD server %s lost (%s)", c->server,
			 c->dead_msg);
		req->_nbd.msg = c->fail_msg;
	}
	what = req->op == SIO_OP_NBD_STATUS ? "block status" : "read";
	if (err < 0 && c->dead)
		err = sx_error(-EIO,
			       "%s: %s of %" PRIu64 " bytes at offset %" PRIu64
			       ": connection to the NBD server %s lost (%s)",
			       c->uri, what, req->_nbd.end, req->off, c->server,
			       c->dead_msg);
	else if (err < 0)
		err = sx_error(
			err,
			"%s: %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s",
			c->uri, what, req->_nbd.end, req->off, strerror(-err));
	*res = err < 0 ? err : (int)req->_done_bytes;
	return req;
}

void sio_nbd_conn_close(struct sio_nbd_conn *c)
{
	if (!c)
		return;
	lib_close(c->h);
	free(c->uri);
	free(c->server);
	free(c->host);
	free(c->port);
	free(c->socket);
	free(c->export_name);
	free(c);
}

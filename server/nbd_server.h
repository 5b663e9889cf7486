/*
 * An NBD server in front of siphon's guest I/O: each export is an attached
 * disk (siphon_disk), served to any number of clients through the public
 * API exactly as a VMM would (copy-on-read, never clobbered by a stream,
 * guest requests first). Written from the protocol specification: fixed
 * newstyle handshake (EXPORT_NAME, ABORT, LIST, INFO, GO,
 * STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT for
 * base:allocation), then READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE,
 * DISC and BLOCK_STATUS with FUA, NO_HOLE, DF and REQ_ONE, simple or
 * structured replies, many requests in flight per connection, replies in
 * completion order.
 *
 * One thread runs the server: nbd_server_run() polls the listening
 * sockets, the connections and an eventfd that the disks' worker threads
 * signal when a request completes (their callbacks only queue the
 * request; the server thread sends every reply). A connection's socket is
 * never read while it has too much in flight (NBD_SERVER_CONN_MAX_*), so a
 * client cannot make the server hold unbounded memory.
 *
 * Bad clients: a request out of range, over the maximum block size, with
 * an unknown command or flag gets an error reply (EINVAL, EPERM on a
 * read-only export, EOVERFLOW); a malformed packet (bad magic, an option
 * longer than NBD_SERVER_OPT_MAX) or a handshake not finished within the
 * timeout closes that connection only. Nothing here prints: messages go
 * to the log callback.
 *
 * Write-back (opts.writeback): a WRITE without FUA is answered once it is
 * at the disk, up to 256 writes or 32 MiB per export (more wait for
 * their completion as without write-back). Every later request still sees
 * it: a READ, CACHE or BLOCK_STATUS that overlaps an answered write that
 * has not completed waits for it, a FLUSH on any connection waits for all
 * of the export's, and the engine keeps overlapping writes in order. A
 * write that fails after its answer is reported by the next FLUSH on each
 * connection (EIO, ENOSPC: its errno) and logged, once per connection as
 * fsync(2) reports writeback errors. What write-back costs: answered
 * writes not yet complete are lost if the process dies (SIGKILL, a
 * crash), as a disk's volatile cache loses them on power loss; a client
 * that needs them durable sends FLUSH or FUA, which NBD already asks of
 * it. Stopping (nbd_server_stop()) completes every one.
 *
 * Alignment: the exports take requests at 512-byte granularity (advertised
 * as the minimum block size); an unaligned read is widened internally, an
 * unaligned write, trim or write-zeroes fails with EINVAL.
 */
#ifndef SIPHON_SERVER_NBD_SERVER_H
#define SIPHON_SERVER_NBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "siphon.h"

/* The block sizes every export advertises (NBD_INFO_BLOCK_SIZE). */
#define NBD_SERVER_MIN_BLOCK 512u
#define NBD_SERVER_PREF_BLOCK 4096u
#define NBD_SERVER_MAX_BLOCK (32u * 1024 * 1024)

/* Longest option a client may send (the rest of the connection's input). */
#define NBD_SERVER_OPT_MAX (64u * 1024)

/* A connection's socket is not read while it has this much in flight. */
#define NBD_SERVER_CONN_MAX_REQS 256u
#define NBD_SERVER_CONN_MAX_BYTES (128ull * 1024 * 1024)

#define NBD_SERVER_DEFAULT_MAX_CONNECTIONS 64u
#define NBD_SERVER_DEFAULT_HANDSHAKE_MS 10000u

enum nbd_log_level {
	NBD_LOG_ERROR,
	NBD_LOG_WARN,
	NBD_LOG_INFO,
	NBD_LOG_DEBUG,
};

typedef void (*nbd_log_fn)(void *opaque, enum nbd_log_level level,
			   const char *msg);

/* Format a message for fn (a no-op when fn is NULL); for server/. */
void nbd_logf(nbd_log_fn fn, void *opaque, enum nbd_log_level lv,
	      const char *fmt, ...) __attribute__((format(printf, 4, 5)));

struct nbd_server_opts {
	unsigned max_connections; /* 0: the default; more are refused */
	/*
	 * Write-back: answer a WRITE (without FUA) as soon as it is handed to
	 * the disk, before the disk completes it, as a disk's volatile cache
	 * does; a FLUSH (or FUA) makes it durable. See "Write-back" above.
	 */
	bool writeback;
	unsigned handshake_ms; /* 0: the default; time to finish the
				  handshake before the connection is dropped */
	nbd_log_fn log; /* NULL: no messages */
	void *log_opaque;
};

struct nbd_server;

/* -errno (ENOMEM, EMFILE) with a message. opts may be NULL. */
int nbd_server_create(const struct nbd_server_opts *opts,
		      struct nbd_server **out);

/*
 * Export disk as name (at most NBD_MAX_STRING bytes, not empty, unique).
 * The first export listed is also the default one (the empty name). The
 * server takes the handle: it is released (siphon_disk_put()) when the
 * export is removed or the server destroyed and no connection uses it any
 * more. Any thread, also while nbd_server_run() serves. -EINVAL, -EEXIST,
 * -ENOSPC, -ENOMEM (the handle stays the caller's then).
 */
int nbd_server_add_export(struct nbd_server *s, const char *name,
			  siphon_disk *disk, bool read_only);

/*
 * A listening Unix socket at path (mode 0600, non-blocking; an old socket
 * there is replaced, another kind of file is not): the fd, or -errno. For
 * server/'s sockets.
 */
int nbd_unix_listen(const char *path);

/*
 * Stop exporting name: new clients no longer find it; connections already
 * on it keep it (their requests fail once the disk is detached). Any
 * thread. -ENOENT.
 */
int nbd_server_remove_export(struct nbd_server *s, const char *name);

/*
 * Listen on addr: "unix:PATH" (the socket is created mode 0600; an old
 * socket file there is replaced, any other file is not) or
 * "tcp:HOST:PORT" (HOST a name or address, [v6] in brackets). Before
 * nbd_server_run() only. -errno with a message.
 */
int nbd_server_listen(struct nbd_server *s, const char *addr);

/*
 * Serve until nbd_server_stop(): then stop accepting, read no more
 * requests, let those in flight complete and their replies go out (a
 * client that does not read them is dropped after a few seconds), close
 * every connection and return 0. -errno (a failure of the poll itself).
 */
int nbd_server_run(struct nbd_server *s);

/*
 * Serve the connected socket fd as a client (it is made non-blocking; the
 * server owns it from now on, whatever the result): for a socket handed
 * over by a supervisor, or a test. Server thread only (before or between
 * nbd_server_run()/nbd_server_step()). -EAGAIN (too many connections, or
 * stopping: fd closed), -ENOMEM, -EINVAL.
 */
int nbd_server_add_connection(struct nbd_server *s, int fd);

/*
 * One round of nbd_server_run(): handle the events that arrive within
 * timeout_ms (0: those already there; -1: until the next). Returns the
 * connections open plus the requests at the disks (0: idle), or -errno.
 * For embedding the server in another loop, and for the fuzz target.
 */
int nbd_server_step(struct nbd_server *s, int timeout_ms);

/* Make nbd_server_run() return. Any thread; async-signal-safe. */
void nbd_server_stop(struct nbd_server *s);

/* Connections now open (any thread, approximate). */
unsigned nbd_server_connections(struct nbd_server *s);

/* Close the listeners (unlinking Unix sockets) and free. NULL ok. */
void nbd_server_destroy(struct nbd_server *s);

#endif

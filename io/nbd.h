/*
 * NBD exports as sio_files (issue 12): a backing layer on an NBD server
 * read through libnbd, so that the formats above io/ read a remote export
 * exactly as they read a local file.
 *
 * An NBD sio_file is read-only. It has no descriptor (fd -1), no direct
 * I/O, and an alignment of 1 unless the server advertises a larger
 * minimum block size; its path is the export's canonical URI, which is
 * also what fault rules (sio_fault_add()) match. The synchronous helpers
 * (sio_pread, ...) read over a connection of the file's own, opened by
 * sio_nbd_open() and shared under a mutex (on a server without multi-conn
 * it makes way while a queue's is open, and is made again by the next
 * synchronous call); a sio_queue reads over a
 * connection of its own per file, opened at its first request, its
 * socket polled on the queue's ring (no thread anywhere). Writes,
 * truncates and fallocates fail with -EROFS; fsync and fdatasync succeed
 * (nothing to flush on a read-only export); reads past the export's end
 * read as zeros, as on files.
 *
 * Threads: as any sio_file (io.h).
 */
#ifndef SIPHON_IO_NBD_H
#define SIPHON_IO_NBD_H

#include <stdbool.h>
#include <stdint.h>

#include "io/nbd_name.h"

struct sio_file;

/*
 * Connect to the export a names and open it as a sio_file: 0 and *out,
 * or -errno with a message naming the server and the export:
 * -EINVAL (bad arguments or flags), -EROFS (SIO_RDWR or a flag that
 * implies it: exports are read-only), -EOPNOTSUPP (the server requires
 * TLS, which is not supported yet), -ENOMEM, or the connection's error
 * (-ECONNREFUSED, -ENOENT for a missing socket or export, ...).
 * The connection asks for the base:allocation meta context. a is only
 * read; the file keeps copies. Thread safe.
 */
int sio_nbd_open(const struct sio_nbd_addr *a, unsigned flags,
		 struct sio_file **out);

/*
 * Settings of one export (sio_nbd_open_opts()), each 0 for the
 * process-wide value (below) at the time of the open, SIO_NBD_OFF to turn
 * a window or timeout off. They hold for the file's own connection and
 * for every queue connection made to it.
 */
#define SIO_NBD_OFF 0xffffffffu
struct sio_nbd_opts {
	unsigned reconnect_ms; /* reconnect window */
	unsigned timeout_ms; /* request timeout */
	unsigned connections; /* per queue with multi-conn, at most MAX */
};

/*
 * sio_nbd_open() with settings of this export's own; o NULL: the
 * process-wide ones. -EINVAL for connections above
 * SIO_NBD_MAX_CONNECTIONS.
 */
int sio_nbd_open_opts(const struct sio_nbd_addr *a, unsigned flags,
		      const struct sio_nbd_opts *o, struct sio_file **out);

/*
 * A connection that drops is connected again, with a backoff (50 ms,
 * doubling to 1 s), for up to the reconnect window; meanwhile the reads
 * on it wait, and afterwards they are sent again whole on the new
 * connection (the export must have the same size, else the layer is
 * refused for good). Past the window they fail with -EIO and a message
 * naming the server; a later read starts a window of its own. A read the
 * server leaves unanswered for the request timeout counts as a dropped
 * connection. 0 turns either off. The defaults below hold until
 * sio_nbd_set_timeouts() changes them for the exports opened after it
 * (process-wide; thread safe), unless the open names its own
 * (sio_nbd_open_opts()).
 */
/*
 * Every connection's handshake (at open, and each reconnect attempt) must
 * finish within the request timeout, or SIO_NBD_CONNECT_TIMEOUT_MS when
 * that is off: a server that accepts and
 * never answers (qemu-nbd busy with its one allowed client) gets a
 * message saying so, not a wait for ever. A queue's first connection is
 * made like a reconnect: its requests wait for it, the queue's thread
 * does not.
 */
#define SIO_NBD_CONNECT_TIMEOUT_MS 10000u
#define SIO_NBD_DEFAULT_RECONNECT_MS 10000u
#define SIO_NBD_DEFAULT_TIMEOUT_MS 30000u
void sio_nbd_set_timeouts(unsigned reconnect_ms, unsigned timeout_ms);

/*
 * Connections a queue opens to one export when the server advertises
 * multi-conn (one otherwise): each holds its own reads in flight, a new
 * one is opened while all the others are busy. n in [1,
 * SIO_NBD_MAX_CONNECTIONS], 0 for the default; process-wide, for the
 * exports opened after it (unless the open names its own).
 */
#define SIO_NBD_DEFAULT_CONNECTIONS 4u
#define SIO_NBD_MAX_CONNECTIONS 16u
void sio_nbd_set_connections(unsigned n);

/* Whether f is an NBD export (sio_nbd_open()). NULL: false. */
bool sio_file_is_nbd(const struct sio_file *f);

/*
 * What `siphon info` shows of an NBD layer. The strings belong to the
 * file and live until it is closed.
 */
struct sio_nbd_info {
	const char *uri; /* canonical URI, as sio_file.path */
	const char *server; /* "unix:PATH" or "HOST:PORT" */
	const char *export_name; /* "" for the default export */
	uint64_t size; /* bytes */
	uint32_t min_block; /* the server's block sizes, 0: not advertised */
	uint32_t pref_block;
	uint32_t max_block;
	uint32_t max_request; /* largest read sent (max_block or 32 MiB) */
	bool can_multi_conn; /* the server allows several connections */
	unsigned connections; /* a queue opens this many at most */
	bool block_status; /* base:allocation is available */
};

/* Fill *out for the NBD file f: 0, or -EINVAL when f is not one. */
int sio_nbd_get_info(const struct sio_file *f, struct sio_nbd_info *out);

/*
 * Whether the server of the NBD file f answers base:allocation (false for
 * any other file). Asking costs no round trip.
 */
bool sio_nbd_has_block_status(const struct sio_file *f);

/* Flags of an extent, as base:allocation defines them. */
enum sio_nbd_extent_flags {
	SIO_NBD_HOLE = 1 << 0, /* not allocated on the server */
	SIO_NBD_ZERO = 1 << 1, /* reads as zeros */
};

/* A run of bytes with the same allocation status. */
struct sio_nbd_extent {
	uint64_t len;
	uint32_t flags; /* enum sio_nbd_extent_flags */
};

/*
 * Allocation status of [off, off + len) of the NBD file f, asked of the
 * server synchronously (on the file's own connection). Fills v[0..*n)
 * with consecutive extents from off, neighbours of equal flags merged,
 * at most max of them: they cover all of the range clipped to the
 * export's end, or a prefix of it when max is reached (ask again from
 * where they end). Without base:allocation on the server, everything is
 * data (one extent, flags 0). *n is 0 when off is at or past the end.
 * Returns 0, -EINVAL (not an NBD file, max 0, NULL argument), -EIO
 * (connection lost, or a reply that makes no progress) or the server's
 * -errno, with a message naming the server. Thread safe.
 */
int sio_nbd_block_status(struct sio_file *f, uint64_t off, uint64_t len,
			 struct sio_nbd_extent *v, unsigned max, unsigned *n);

#endif

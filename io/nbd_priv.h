/*
 * NBD exports, private to io/: what file.c (the synchronous helpers) and
 * queue.c (the asynchronous queue) call for a sio_file that is an NBD
 * export. See io/nbd.h for the interface above io/.
 *
 * The queue's side is a connection (struct sio_nbd_conn) that the queue
 * owns: the queue hands it read requests, polls its socket for the events
 * it asks for, tells it when they happen, and takes back the requests it
 * has finished. The connection never runs a request's callback itself:
 * libnbd's completion callbacks only record results.
 */
#ifndef SIPHON_IO_NBD_PRIV_H
#define SIPHON_IO_NBD_PRIV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/io.h"

/*
 * Read len bytes at off of the NBD file f into buf over its synchronous
 * connection (bytes past the export's end read as zeros). 0 or -errno
 * with a message naming the server. Thread safe (one reader at a time).
 */
int sio_nbd_pread(struct sio_file *f, void *buf, size_t len, uint64_t off);

/* The export's size (from the handshake). */
uint64_t sio_nbd_size(const struct sio_file *f);

/* Disconnect and free what sio_nbd_open() made for f. NULL is a no-op. */
void sio_nbd_free(struct sio_nbd *n);

/*
 * Count a round trip the calling thread waits for (io/file.c, for
 * sio_sync_waits()): the synchronous NBD helpers wait for the server.
 */
void sio_count_sync_wait(void);

struct sio_nbd_conn;

/*
 * A new connection of the calling queue to the NBD file f (connects
 * synchronously). 0 and *out, or -errno with a message naming the server.
 */
int sio_nbd_conn_open(struct sio_file *f, struct sio_nbd_conn **out);

/*
 * Whether c was opened for f (and not for an earlier file that lived at
 * the same address).
 */
bool sio_nbd_conn_owns(const struct sio_nbd_conn *c, const struct sio_file *f);

/*
 * Start reading the first n bytes (0 < n, within the export) of the read
 * req into its memory, or asking the allocation of them (SIO_OP_NBD_STATUS,
 * on a connection to a server with block status). Never fails: an error
 * finishes the request with it. The request is the connection's until
 * sio_nbd_conn_pop() returns it.
 */
void sio_nbd_conn_submit(struct sio_nbd_conn *c, struct sio_req *req,
			 uint64_t n);

/* Whether c's handshake is done and it sends reads. */
bool sio_nbd_conn_up(const struct sio_nbd_conn *c);

/* Requests c holds (submitted, not popped yet). */
unsigned sio_nbd_conn_held(const struct sio_nbd_conn *c);

/*
 * How many connections a queue may open to the NBD file f: the setting
 * (sio_nbd_set_connections()) when the server allows several
 * (multi-conn), else 1.
 */
unsigned sio_nbd_conns_wanted(const struct sio_file *f);

/* The socket to poll (changes when it reconnects; -1 while it has none). */
int sio_nbd_conn_fd(const struct sio_nbd_conn *c);

/*
 * The poll events (POLLIN, POLLOUT) the connection waits for now: POLLIN
 * whenever it has reads in flight, so a poll is always armed while it
 * holds requests that the server must answer.
 */
unsigned sio_nbd_conn_events(const struct sio_nbd_conn *c);

/*
 * Handles the connection has made so far: the socket (sio_nbd_conn_fd())
 * changes with it, and a poll armed for an older one says nothing about
 * the current one.
 */
unsigned sio_nbd_conn_gen(const struct sio_nbd_conn *c);

/*
 * When the connection wants sio_nbd_conn_tick() (CLOCK_MONOTONIC ns), 0
 * for never: the next connection attempt, the end of the reconnect
 * window, the request timeout of what is in flight.
 */
uint64_t sio_nbd_conn_deadline(const struct sio_nbd_conn *c);

/* Time passed: connect again, give up, or catch a hung server. */
void sio_nbd_conn_tick(struct sio_nbd_conn *c);

/* A poll of the socket reported revents (or failed: res < 0). */
void sio_nbd_conn_notify(struct sio_nbd_conn *c, int revents);

/*
 * A finished request, or NULL: *res is its result, 0 (a read), the number
 * of extents (a block status) or -errno (a message naming the server is
 * recorded for an error).
 */
struct sio_req *sio_nbd_conn_pop(struct sio_nbd_conn *c, int *res);

/*
 * Close c (nothing may be in flight: the queue drains first; requests
 * still held are abandoned, their callbacks never run). NULL is a no-op.
 */
void sio_nbd_conn_close(struct sio_nbd_conn *c);

#endif

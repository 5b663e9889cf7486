/*
 * `siphon serve`'s disks and its control socket: the registry of attached
 * disks and their exports, and a JSON-lines protocol on a Unix socket that
 * drives them through the public API (attach, detach, stream, abort,
 * resume, set-speed, info, events, quit). A client of api/ and of the NBD server,
 * like the rest of server/.
 *
 * Protocol: the client sends one JSON object per line (at most
 * CTL_MAX_LINE bytes), the server answers each with one line, in order:
 *
 *   {"cmd": "info"}
 *     {"ok": true, "disks": [{"path", "export", "size", "read_only",
 *      "stream": {"state": "running"|"paused"|"completed"|"cancelled"|
 *      "failed",
 *      "continuous", "cur", "end", "bytes_copied", "bytes_skipped",
 *      "bytes_zero", "rate", "bandwidth", "base", "errno", "message"}
 *      (errno and message once failed or while paused; the stream absent
 *      when the disk never streamed)}, ...]}
 *   {"cmd": "attach", "image": PATH, "export": NAME}     (export optional)
 *     {"ok": true, "path": ABSOLUTE, "export": NAME}
 *   {"cmd": "detach", "path": PATH}
 *   {"cmd": "stream", "path": PATH, "base": B, "speed": BYTES_PER_S,
 *    "on_error": "stop"|"pause"}
 *     CONTINUOUS in the background: {"ok": true}; with "pause" the stream
 *     pauses on ENOSPC, EDQUOT or EIO (state "paused", a "paused" event)
 *     until "resume" (SIPHON_ON_ERROR_PAUSE)
 *   {"cmd": "stream", "path": PATH, "cursor": C}
 *     one increment from the proposal's opaque cursor (0 opens the stream):
 *     {"ok": true, "cursor": NEW, "end": END}
 *   {"cmd": "abort", "path": PATH}
 *   {"cmd": "resume", "path": PATH}
 *     a paused stream goes on (siphon_block_stream_resume(): EINVAL when it
 *     is not paused, ESRCH when there is no stream)
 *   {"cmd": "set-speed", "path": PATH, "speed": BYTES_PER_S}
 *   {"cmd": "events"}
 *     {"ok": true}, then one line per stream that ends, on this connection
 *     until it closes: {"event": "completed"|"cancelled"|"failed"|"paused",
 *     "path", "bytes_copied", "errno", "error"} ("paused" is no end: the
 *     stream's end event follows later)
 *   {"cmd": "quit"}
 *     {"ok": true}; the daemon then shuts down as on SIGTERM.
 *
 * Every request may carry "id" (any JSON number or string), echoed in its
 * reply. A failure answers {"ok": false, "errno": "ENOENT", "error":
 * "message"}. PATH is the image's path (made absolute with the daemon's
 * working directory) or its export name. A line that is not a JSON object,
 * or longer than CTL_MAX_LINE, gets an EINVAL reply (the longer one also
 * closes the connection). At most CTL_MAX_CLIENTS connections at once.
 *
 * Threads: one for the socket (commands run on it, one at a time); events
 * are written from the domain's event thread (ctl_event()).
 */
#ifndef SIPHON_SERVER_CONTROL_H
#define SIPHON_SERVER_CONTROL_H

#include <stdbool.h>

#include "server/fuse_export.h"
#include "server/nbd_server.h"
#include "siphon.h"

#define CTL_MAX_LINE (64u * 1024)
#define CTL_MAX_CLIENTS 16u
#define CTL_MAX_DISKS 256u

struct ctl_opts {
	siphon_domain *dom;
	struct nbd_server *nbd;
	struct fuse_export *fuse; /* also a file per disk there, or NULL */
	struct siphon_attach_opts attach; /* for every attach */
	bool read_only; /* exports refuse writes */
	nbd_log_fn log; /* NULL: no messages */
	void *log_opaque;
	void (*quit)(void *opaque); /* the "quit" command */
	void *quit_opaque;
};

struct ctl;

/* -ENOMEM. */
int ctl_create(const struct ctl_opts *o, struct ctl **out);

/*
 * Attach the image at path (made absolute) and export it as name (NULL:
 * the file's name). The absolute path is copied to abs (PATH_MAX bytes)
 * when abs is not NULL. Thread safe. -errno with a message
 * (siphon_get_error()).
 */
int ctl_attach(struct ctl *c, const char *path, const char *name, char *abs);

/*
 * Start a CONTINUOUS stream on every disk (params as for
 * siphon_block_stream_ex()). -errno with a message at the first failure.
 */
int ctl_stream_all(struct ctl *c,
		   const struct siphon_block_stream_params *params);

/* Serve the protocol on a Unix socket at path (mode 0600). -errno. */
int ctl_listen(struct ctl *c, const char *path);

/* An event of the domain (from its event callback). */
void ctl_event(struct ctl *c, const struct siphon_event *ev);

/*
 * Flush every disk (the daemon's last step before closing the domain).
 * Returns 0 or the first error.
 */
int ctl_flush_all(struct ctl *c);

/*
 * Stop the socket's thread, close its clients and unlink it (before the
 * domain closes: no command may race with that). Events still arriving go
 * nowhere. NULL ok.
 */
void ctl_stop(struct ctl *c);

/* ctl_stop(), then free (after the domain closed). NULL ok. */
void ctl_destroy(struct ctl *c);

#endif

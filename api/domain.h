/*
 * The domain's private state, shared by api/domain.c (handles, lifetimes,
 * events), api/disk_thread.c (the per-disk worker and its command queue) and
 * api/stream_api.c (the stream calls).
 *
 * Threads and ownership:
 *  - The domain has a fixed pool of worker threads (struct dworker); each
 *    attached disk runs on one of them (the least loaded at attach) for its
 *    whole life. That thread alone touches the disk's engine object
 *    (engine/disk.h: img chain, guest engine, stream, scheduler) and its
 *    queue; everything else reaches the disk by posting a disk_cmd.
 *  - dom->lock protects the disk list, every disk's refs, job and last
 *    fields and the fields of a published job marked (L), and the event
 *    queue. stream_get_progress(), stream_request_abort() and
 *    stream_set_speed() on job->s are called under it, which keeps job->s
 *    alive: the worker unpublishes a job under dom->lock before freeing it.
 *  - disk->cmd_lock protects the command list, cmd_closed and cmd->done.
 *  - Guest requests (api/guest_io.c) are posted on their own list
 *    (disk->greqs, under cmd_lock) and handed to the disk's guest engine
 *    (engine/guest.c) before any command or stream work: guest first.
 *  - Lock order: dom->lock, then disk->cmd_lock. No lock is held while
 *    calling the event callback or waiting for the worker.
 *  - A disk is freed when its last reference goes; the list holds one, each
 *    call that found the disk holds one while it uses it.
 */
#ifndef SIPHON_API_DOMAIN_H
#define SIPHON_API_DOMAIN_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/error.h"
#include "engine/disk.h"
#include "engine/extent_pool.h"
#include "engine/guest.h"
#include "engine/stream.h"
#include "engine/worker.h"
#include "siphon.h"

/* Cursors: (cluster << CURSOR_TAG_BITS) | tag, tag != 0; 0 = "open". */
#define CURSOR_TAG_BITS 16
#define CURSOR_TAG_MASK ((1u << CURSOR_TAG_BITS) - 1)
#define CURSOR_MAX_CLUSTERS (UINT64_MAX >> CURSOR_TAG_BITS)

#define DISK_DEFAULT_QUEUE_DEPTH 64

static inline uint64_t cursor_encode(uint64_t cluster, uint16_t tag)
{
	return cluster << CURSOR_TAG_BITS | tag;
}

/* What a finished (or running) stream reports through info_ex. */
struct job_report {
	int state; /* enum siphon_stream_state */
	bool continuous;
	uint16_t tag;
	int error; /* positive errno */
	char message[SIPHON_MESSAGE_MAX];
	char base[SIPHON_PATH_MAX];
	uint64_t speed;
	struct stream_progress progress;
};

struct stream_job {
	uint64_t id;
	struct stream *s; /* (L) valid while published; the edisk's */
	bool continuous;
	uint16_t tag;
	uint64_t speed; /* (L) */
	_Atomic bool abort;
	char base_path[SIPHON_PATH_MAX];
	/* (L) paused (SIPHON_ON_ERROR_PAUSE): written by the worker only */
	bool paused;
	int pause_err; /* positive errno */
	char pause_msg[SIPHON_MESSAGE_MAX];

	/* worker only */
	uint64_t end; /* clusters */
	struct disk_cmd *step; /* the STEP command being run, or NULL */
	uint64_t step_limit; /* its last cluster + 1 */
	int err; /* the worker's own error (queue, flush) */
	char errmsg[SIPHON_MESSAGE_MAX];
	char abort_msg[SIPHON_MESSAGE_MAX]; /* a CANCELLED end's, or "" */
};

enum disk_cmd_kind {
	DISK_CMD_STREAM_START = 1, /* CONTINUOUS */
	DISK_CMD_STREAM_STEP, /* one incremental call */
	DISK_CMD_GUEST_STATS, /* copy the guest engine's counters */
	DISK_CMD_STREAM_RESUME, /* resume a paused stream */
};

/*
 * A request for the worker. The poster owns it; the worker sets ret (and
 * msg on failure), then calls complete() with no lock held, after which it
 * never touches the command again.
 */
struct disk_cmd {
	enum disk_cmd_kind kind;
	struct disk_cmd *next;

	/* stream commands */
	uint64_t cursor; /* in/out */
	uint64_t bandwidth;
	bool set_bandwidth; /* a step: apply bandwidth */
	uint64_t max_bytes;
	uint64_t max_clusters;
	unsigned queue_depth; /* extents in flight, 0: default */
	uint64_t extent_size; /* 0: default */
	const char *base; /* NULL: whole chain */
	int on_error; /* enum siphon_on_error */
	struct guest_stats stats; /* DISK_CMD_GUEST_STATS */
	uint64_t sync_waits[3]; /* DISK_CMD_GUEST_STATS: edisk_sync_waits() */

	int ret;
	char msg[SX_ERROR_MAX];
	void (*complete)(struct disk_cmd *cmd);
	void *priv;
	bool done; /* disk->cmd_lock: for disk_cmd_call() */
};

/*
 * A worker thread: one event loop (engine/worker.h) running the disks
 * assigned to it, each for its whole life.
 */
struct dworker {
	struct siphon_domain *dom;
	struct ew *ew;
	pthread_t thread;
	bool started; /* dom->lock (attach side): thread running */
	unsigned depth; /* its queue's depth */
	_Atomic unsigned ndisks; /* assigned and not retired */

	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct disk *joining; /* lock: disks to take on */
	int init_ret; /* lock: 1 while starting, then 0 or -errno */
	char init_msg[SX_ERROR_MAX];
	bool stop; /* lock: exit once no disk is left */

	/* the worker thread only */
	struct extent_pool *xpool; /* its streams' extent buffers */
	struct disk *disks;
	unsigned rr; /* round robin: the disk whose stream goes first */
};

struct disk {
	struct siphon_domain *dom;
	struct disk *next; /* dom->disks, attach order */
	char *path;
	uint64_t size; /* virtual size: set at attach, never changed */
	uint64_t cluster_size; /* the top's: set at attach, never changed */
	unsigned refs; /* dom->lock */

	/* dom->lock */
	struct stream_job *job; /* running or open stream, or NULL */
	bool has_last;
	struct job_report last; /* the last stream that ended */

	struct dworker *w; /* set at attach, never changed */
	struct disk *wnext; /* w->joining, then w->disks */
	struct edisk *eng; /* the worker's once the disk joined it */
	_Atomic int cor_mode; /* enum siphon_cor_mode */
	int init_ret; /* cmd_lock: joining the worker, 1 while pending */
	char init_msg[SX_ERROR_MAX];
	bool gone; /* cmd_lock: the worker has let go of the disk */

	pthread_mutex_t cmd_lock;
	pthread_cond_t cmd_cond;
	struct disk_cmd *cmds, **cmds_tail; /* cmd_lock */
	struct guest_req *greqs, **greqs_tail; /* cmd_lock */
	bool cmd_closed; /* cmd_lock: worker gone */
	_Atomic bool stop;
};

struct event_node {
	struct event_node *next;
	struct siphon_event ev;
};

struct siphon_domain {
	pthread_mutex_t lock;
	pthread_cond_t job_cond; /* a job ended */
	struct disk *disks;
	uint64_t next_job_id;
	uint16_t next_tag;
	unsigned queue_depth;
	uint64_t stream_buffer_bytes; /* per worker's extent_pool, 0: default */
	struct dworker **workers; /* the pool, nworkers long, fixed */
	unsigned nworkers;

	/* events, under lock */
	struct event_node *ev_head, **ev_tail;
	int event_fd; /* readable while ev_head (no callback) */
	siphon_event_fn event_cb; /* NULL: queue for the fd */
	void *event_opaque;
	pthread_t event_thread;
	pthread_cond_t event_cond;
	bool event_thread_started;
	bool event_stop;
};

/* api/domain.c */
int dom_check_path(const char *path);
/* Find the attached disk named path and take a reference: -ENOENT. */
int dom_get_disk(struct siphon_domain *dom, const char *path,
		 struct disk **out);
void dom_put_disk(struct disk *d);
/* Queue n (malloc'd; NULL: dropped, out of memory). Under dom->lock. */
void dom_push_event_locked(struct siphon_domain *dom, struct event_node *n);
/*
 * Copy a caller's options struct of any version into dst: a shorter one
 * gets zeros for what it does not know, a longer one must hold zeros in the
 * fields this library does not know (-EINVAL). src NULL: all zeros.
 */
int dom_copy_opts(void *dst, size_t dst_size, const void *src, size_t src_size,
		  size_t min_size, const char *what);
/* A new job id and non-zero cursor tag; under dom->lock. */
void dom_new_job_ids(struct siphon_domain *dom, uint64_t *id, uint16_t *tag);

/* api/disk_thread.c */
/* A worker for dom with a queue of depth (its thread starts on first use). */
int dworker_new(struct siphon_domain *dom, unsigned depth,
		struct dworker **out);
/* Stop its thread (no disk left on it) and join it. */
void dworker_stop(struct dworker *w);
/* Stop and free. NULL ok. */
void dworker_free(struct dworker *w);
/* Assign d (d->eng opened) to a worker and wait until it runs there. */
int disk_start(struct disk *d);
/*
 * Abort what runs, wait until the worker has let go of the disk (its
 * images closed, d->eng NULL).
 */
void disk_stop(struct disk *d);
/* Wake the worker (after setting a flag it checks). Any thread. */
void disk_wake(struct disk *d);
/*
 * Post cmd and wait for the worker to complete it; re-records the worker's
 * message on this thread. Returns cmd->ret, -ENOENT if the disk is being
 * detached.
 */
int disk_cmd_call(struct disk *d, struct disk_cmd *cmd);
/* Post without waiting; cmd->complete runs on the worker. */
int disk_cmd_post(struct disk *d, struct disk_cmd *cmd);
/*
 * Post a guest request; its complete() runs on the worker. -ENOENT if the
 * disk is being detached (then complete() never runs).
 */
int disk_guest_post(struct disk *d, struct guest_req *req);
/* This thread is d's worker. */
bool disk_is_worker(const struct disk *d);
/* Worker: wake up after ns even with nothing in flight. */
void disk_arm_timer(struct disk *d, uint64_t ns);

/* Worker: set cmd->ret (and msg on failure) and hand cmd back. */
void disk_cmd_finish(struct disk_cmd *cmd, int ret);

/* api/stream_api.c, run by the worker */
/*
 * Run a stream command. Returns true when it is done (cmd->ret set), false
 * when it goes on as job->step: stream_job_pump() finishes it later, so
 * the step does not hold up guest I/O.
 */
bool stream_cmd_run(struct disk *d, struct disk_cmd *cmd);
/*
 * Worker: drive a CONTINUOUS stream, or a running step, one turn at time
 * now, as the disk's scheduler allows; ends the step or the stream when
 * done.
 */
void stream_job_pump(struct disk *d, uint64_t now);
/*
 * Worker: end an aborted stream that is idle: an incremental one with no
 * step running, or a paused one.
 */
void stream_job_reap(struct disk *d);
/* Worker: stop the job with an error (e.g. the queue failed). */
void stream_job_fail(struct disk *d, int err);

#endif

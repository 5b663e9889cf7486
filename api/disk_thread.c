/*
 * The disks' worker threads and their command queues.
 *
 * The domain has a fixed pool of workers (struct dworker), each one thread
 * running one event loop (engine/worker.h: a sio_queue with a wake-up
 * eventfd and a timer polled through it) for the disks assigned to it; a
 * new disk goes to the least loaded worker, whose thread starts with its
 * first disk. A disk stays on its worker from
 * attach to detach, because the format drivers are not thread safe and a
 * queue belongs to one thread; this keeps every ordering rule of a disk on
 * one thread.
 *
 * Other threads reach a disk through its command list (disk->cmds, under
 * disk->cmd_lock) and its guest request list, then wake the worker. One
 * turn of the loop is: take on newly attached disks; if woken, take every
 * disk's lists (guest requests first, then commands); for every disk, swap
 * the chain if due and start guest requests whose cluster locks dropped;
 * drive the streams, one turn each, starting with a different disk each
 * turn so none goes first every time; kick the guests again; let go of the
 * disks being detached once idle; wait.
 *
 * The pacing of a stream against its guest (guest first, stream paced) is
 * the disk's scheduler's (engine/sched.h), applied by its engine object
 * (engine/disk.h); this file only feeds it the turns. The streams of a
 * worker take their extent buffers from its one pool (engine/extent_pool.h,
 * dom->stream_buffer_bytes): memory does not grow with the disks, and a
 * stream refused a buffer is pumped again after the completions that
 * bring buffers back, which wake this loop.
 *
 * Invariants: the wake-up eventfd is drained before any list is taken, so a
 * post after that always leaves it readable for the next wait; a disk is
 * let go only with no stream job, no guest request in flight or waiting and
 * no swap pending; a worker exits only with no disk left, and reaps its
 * polls before destroying its queue.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domain.h"

/* The worker running on this thread, if any. */
static _Thread_local struct dworker *tls_worker;

bool disk_is_worker(const struct disk *d)
{
	return tls_worker && tls_worker == d->w;
}

void disk_wake(struct disk *d)
{
	ew_wake(d->w->ew);
}

void disk_arm_timer(struct disk *d, uint64_t ns)
{
	ew_arm_timer(d->w->ew, ns);
}

static void cmd_done_wake(struct disk_cmd *cmd)
{
	struct disk *d = cmd->priv;

	pthread_mutex_lock(&d->cmd_lock);
	cmd->done = true;
	pthread_cond_broadcast(&d->cmd_cond);
	pthread_mutex_unlock(&d->cmd_lock);
}

int disk_cmd_post(struct disk *d, struct disk_cmd *cmd)
{
	pthread_mutex_lock(&d->cmd_lock);
	if (d->cmd_closed) {
		pthread_mutex_unlock(&d->cmd_lock);
		return sx_error(ENOENT, "%s: disk is being detached", d->path);
	}
	cmd->next = NULL;
	*d->cmds_tail = cmd;
	d->cmds_tail = &cmd->next;
	pthread_mutex_unlock(&d->cmd_lock);
	disk_wake(d);
	return 0;
}

int disk_guest_post(struct disk *d, struct guest_req *req)
{
	bool first;

	pthread_mutex_lock(&d->cmd_lock);
	if (d->cmd_closed) {
		pthread_mutex_unlock(&d->cmd_lock);
		return sx_error(ENOENT, "%s: disk is being detached", d->path);
	}
	req->next = NULL;
	first = d->greqs == NULL;
	*d->greqs_tail = req;
	d->greqs_tail = &req->next;
	pthread_mutex_unlock(&d->cmd_lock);
	/* One wake-up covers a batch the worker has not taken yet. */
	if (first)
		disk_wake(d);
	return 0;
}

int disk_cmd_call(struct disk *d, struct disk_cmd *cmd)
{
	int ret;

	/* Nothing runs on a worker that calls back in today; keep it so. */
	if (disk_is_worker(d))
		return sx_error(EDEADLK, "%s: call from the disk's own worker",
				d->path);
	cmd->done = false;
	cmd->complete = cmd_done_wake;
	cmd->priv = d;
	ret = disk_cmd_post(d, cmd);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&d->cmd_lock);
	while (!cmd->done)
		pthread_cond_wait(&d->cmd_cond, &d->cmd_lock);
	pthread_mutex_unlock(&d->cmd_lock);
	if (cmd->ret < 0)
		return sx_error(cmd->ret, "%s", cmd->msg);
	return cmd->ret;
}

void disk_cmd_finish(struct disk_cmd *cmd, int ret)
{
	cmd->ret = ret;
	if (ret < 0)
		snprintf(cmd->msg, sizeof(cmd->msg), "%s",
			 sx_last_error()[0] ? sx_last_error() : strerror(-ret));
	cmd->complete(cmd);
}

/* Take both lists; with close, refuse every later post. */
static struct disk_cmd *take_cmds(struct disk *d, bool close,
				  struct guest_req **greqs)
{
	struct disk_cmd *list;

	pthread_mutex_lock(&d->cmd_lock);
	list = d->cmds;
	d->cmds = NULL;
	d->cmds_tail = &d->cmds;
	*greqs = d->greqs;
	d->greqs = NULL;
	d->greqs_tail = &d->greqs;
	if (close)
		d->cmd_closed = true;
	pthread_mutex_unlock(&d->cmd_lock);
	return list;
}

static void handle_cmds(struct disk *d)
{
	struct disk_cmd *cmd, *next;
	struct guest_req *greq, *gnext;
	bool stop = atomic_load(&d->stop);
	uint64_t now = ew_now();

	cmd = take_cmds(d, stop, &greq);
	edisk_set_cor_mode(d->eng, atomic_load(&d->cor_mode));
	for (; greq; greq = gnext) {
		gnext = greq->next;
		if (stop)
			greq->complete(greq, -ENOENT);
		else
			edisk_guest_submit(d->eng, greq, now);
	}
	for (; cmd; cmd = next) {
		next = cmd->next;
		sx_error_clear();
		if (stop) {
			disk_cmd_finish(cmd,
					sx_error(ENOENT,
						 "%s: disk is being detached",
						 d->path));
			continue;
		}
		switch (cmd->kind) {
		case DISK_CMD_STREAM_START:
		case DISK_CMD_STREAM_STEP:
		case DISK_CMD_STREAM_RESUME:
			if (stream_cmd_run(d, cmd))
				disk_cmd_finish(cmd, cmd->ret);
			break;
		case DISK_CMD_GUEST_STATS:
			edisk_guest_stats(d->eng, &cmd->stats);
			cmd->sync_waits[0] =
				edisk_sync_waits(d->eng, EDISK_ATTACH);
			cmd->sync_waits[1] =
				edisk_sync_waits(d->eng, EDISK_RUN);
			cmd->sync_waits[2] =
				edisk_sync_waits(d->eng, EDISK_FINAL);
			disk_cmd_finish(cmd, 0);
			break;
		default:
			disk_cmd_finish(cmd,
					sx_error(EINVAL, "unknown command %d",
						 (int)cmd->kind));
			break;
		}
	}
}

/* Report a joining disk's start-up to disk_start(). */
static void join_done(struct disk *d, int ret)
{
	pthread_mutex_lock(&d->cmd_lock);
	d->init_ret = ret;
	if (ret < 0)
		snprintf(d->init_msg, sizeof(d->init_msg), "%s",
			 sx_last_error());
	pthread_cond_broadcast(&d->cmd_cond);
	pthread_mutex_unlock(&d->cmd_lock);
}

/* Take on the disks attached since the last turn. */
static void take_joining(struct dworker *w)
{
	struct disk *d, *next, **tail;
	int ret;

	pthread_mutex_lock(&w->lock);
	d = w->joining;
	w->joining = NULL;
	pthread_mutex_unlock(&w->lock);
	for (tail = &w->disks; *tail; tail = &(*tail)->wnext)
		;
	for (; d; d = next) {
		next = d->wnext;
		d->wnext = NULL;
		ret = edisk_bind(d->eng, ew_queue(w->ew));
		if (ret < 0) {
			join_done(d, ret);
			continue;
		}
		edisk_set_extent_pool(d->eng, w->xpool);
		*tail = d;
		tail = &d->wnext;
		join_done(d, 0);
		/* Commands may already wait for it. */
		handle_cmds(d);
	}
}

/* The disk's part of a turn before the streams run. */
static void disk_turn(struct disk *d)
{
	edisk_kick(d->eng);
	if (atomic_load(&d->stop) && d->job)
		atomic_store(&d->job->abort, true);
	if (d->job && d->job->abort &&
	    (d->job->paused || (!d->job->continuous && !d->job->step)))
		stream_job_reap(d);
}

static bool has_stream_work(const struct disk *d)
{
	return d->job && !d->job->paused &&
	       (d->job->continuous || d->job->step);
}

/* One pump for every disk with stream work, from a rotating start. */
static void pump_streams(struct dworker *w)
{
	struct disk *d, *first;
	unsigned n = 0, i, start;
	uint64_t now = ew_now();

	for (d = w->disks; d; d = d->wnext)
		n++;
	if (!n)
		return;
	start = w->rr++ % n;
	for (first = w->disks, i = 0; i < start; i++)
		first = first->wnext;
	d = first;
	do {
		if (has_stream_work(d))
			stream_job_pump(d, now);
		d = d->wnext ? d->wnext : w->disks;
	} while (d != first);
}

/* Let go of a stopped, idle disk: refuse what is left, close it. */
static void retire(struct disk *d)
{
	handle_cmds(d);
	edisk_close(d->eng);
	d->eng = NULL;
	atomic_fetch_sub(&d->w->ndisks, 1);
	pthread_mutex_lock(&d->cmd_lock);
	d->gone = true;
	pthread_cond_broadcast(&d->cmd_cond);
	pthread_mutex_unlock(&d->cmd_lock);
}

static bool worker_done(struct dworker *w)
{
	bool done;

	pthread_mutex_lock(&w->lock);
	done = w->stop && !w->joining && !w->disks;
	pthread_mutex_unlock(&w->lock);
	return done;
}

static void worker_loop(struct dworker *w)
{
	struct disk *d, **pp;
	uint64_t waits;
	int ret;

	for (;;) {
		/*
		 * Drain the wake-up before looking at any list, the joining
		 * disks' included: a post after the drain leaves the eventfd
		 * readable for the next wait, one before it is in the list.
		 */
		bool woken = ew_take_wake(w->ew);

		take_joining(w);
		if (woken)
			for (d = w->disks; d; d = d->wnext)
				handle_cmds(d);
		for (d = w->disks; d; d = d->wnext)
			disk_turn(d);
		pump_streams(w);
		/* The pumps and the swaps may have dropped locks or a hold. */
		for (pp = &w->disks; (d = *pp);) {
			edisk_kick(d->eng);
			if (atomic_load(&d->stop) && !d->job &&
			    edisk_idle(d->eng)) {
				*pp = d->wnext;
				retire(d);
				continue;
			}
			pp = &d->wnext;
		}
		if (worker_done(w))
			break;
		waits = ew_sync_waits();
		ret = ew_wait(w->ew);
		/* The completions' waits: every disk of the worker's (disk.h). */
		waits = ew_sync_waits() - waits;
		for (d = w->disks; waits && d; d = d->wnext)
			edisk_loop_waits(d->eng, waits);
		if (ret < 0)
			for (d = w->disks; d; d = d->wnext)
				if (d->job)
					stream_job_fail(d, ret);
	}
}

static void *worker_main(void *arg)
{
	struct dworker *w = arg;
	int ret;

	tls_worker = w;
	/*
	 * The ring is made here: it may only be used by its creator; so is
	 * the pool its streams share (its buffers come back by completions
	 * on this ring, which wake this loop).
	 */
	ret = ew_bind(w->ew, w->depth);
	if (ret >= 0) {
		ret = extent_pool_create(w->dom->stream_buffer_bytes,
					 &w->xpool);
		if (ret < 0) {
			sx_error(ret, "out of memory");
			ew_unbind(w->ew);
		}
	}
	pthread_mutex_lock(&w->lock);
	w->init_ret = ret;
	if (ret < 0)
		snprintf(w->init_msg, sizeof(w->init_msg), "%s",
			 sx_last_error());
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
	if (ret < 0)
		return NULL;
	worker_loop(w);
	ew_unbind(w->ew);
	/* Every disk retired: its streams left, their buffers came back. */
	extent_pool_destroy(w->xpool);
	w->xpool = NULL;
	return NULL;
}

int dworker_new(struct siphon_domain *dom, unsigned depth, struct dworker **out)
{
	struct dworker *w = calloc(1, sizeof(*w));
	int ret;

	if (!w)
		return sx_error(ENOMEM, "out of memory");
	ret = ew_create(&w->ew);
	if (ret < 0) {
		free(w);
		return ret;
	}
	w->dom = dom;
	w->depth = depth;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	*out = w;
	return 0;
}

/* Start w's thread if it does not run yet. Under dom->lock. */
static int dworker_start_locked(struct dworker *w)
{
	int ret;

	if (w->started)
		return 0;
	w->init_ret = 1;
	w->stop = false;
	ret = -pthread_create(&w->thread, NULL, worker_main, w);
	if (ret < 0)
		return sx_error(ret, "cannot start a worker thread: %s",
				strerror(-ret));
	pthread_mutex_lock(&w->lock);
	while (w->init_ret == 1)
		pthread_cond_wait(&w->cond, &w->lock);
	ret = w->init_ret;
	pthread_mutex_unlock(&w->lock);
	if (ret < 0) {
		pthread_join(w->thread, NULL);
		return sx_error(ret, "%s", w->init_msg);
	}
	w->started = true;
	return 0;
}

void dworker_stop(struct dworker *w)
{
	if (!w->started)
		return;
	pthread_mutex_lock(&w->lock);
	w->stop = true;
	pthread_mutex_unlock(&w->lock);
	ew_wake(w->ew);
	pthread_join(w->thread, NULL);
	w->started = false;
}

void dworker_free(struct dworker *w)
{
	if (!w)
		return;
	dworker_stop(w);
	ew_destroy(w->ew);
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
	free(w);
}

/* The least loaded worker of the pool, for a new disk. Under dom->lock. */
static struct dworker *pick_worker(struct siphon_domain *dom)
{
	unsigned i, best = 0;

	for (i = 1; i < dom->nworkers; i++)
		if (atomic_load(&dom->workers[i]->ndisks) <
		    atomic_load(&dom->workers[best]->ndisks))
			best = i;
	return dom->workers[best];
}

int disk_start(struct disk *d)
{
	struct dworker *w;
	int ret;

	pthread_mutex_lock(&d->dom->lock);
	d->w = pick_worker(d->dom);
	ret = dworker_start_locked(d->w);
	if (ret >= 0)
		atomic_fetch_add(&d->w->ndisks, 1);
	pthread_mutex_unlock(&d->dom->lock);
	if (ret < 0) {
		snprintf(d->init_msg, sizeof(d->init_msg), "%s",
			 sx_last_error());
		return sx_error(ret, "%s: %s", d->path, d->init_msg);
	}
	w = d->w;
	d->init_ret = 1;
	pthread_mutex_lock(&w->lock);
	d->wnext = w->joining;
	w->joining = d;
	pthread_mutex_unlock(&w->lock);
	ew_wake(w->ew);
	pthread_mutex_lock(&d->cmd_lock);
	while (d->init_ret == 1)
		pthread_cond_wait(&d->cmd_cond, &d->cmd_lock);
	ret = d->init_ret;
	pthread_mutex_unlock(&d->cmd_lock);
	if (ret < 0) {
		atomic_fetch_sub(&w->ndisks, 1);
		return sx_error(ret, "%s: %s", d->path, d->init_msg);
	}
	return 0;
}

void disk_stop(struct disk *d)
{
	atomic_store(&d->stop, true);
	disk_wake(d);
	pthread_mutex_lock(&d->cmd_lock);
	while (!d->gone)
		pthread_cond_wait(&d->cmd_cond, &d->cmd_lock);
	pthread_mutex_unlock(&d->cmd_lock);
}

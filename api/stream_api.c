/*
 * The stream calls of the public API, and their worker side.
 *
 * A disk has at most one stream job (disk->job): a CONTINUOUS stream, which
 * the worker pumps between commands, or an open incremental stream, which
 * sits idle between calls and moves only inside a STEP command (the worker
 * runs the bounded step with stream_run()). When a job ends, the worker
 * unpublishes it, keeps its report in disk->last for the extended info,
 * queues the event and wakes synchronous aborts, all in one critical
 * section, so a caller whose abort returned finds the event queued.
 *
 * Pause (SIPHON_ON_ERROR_PAUSE): when the engine reports its stream paused
 * (stream_paused(): stopped on ENOSPC, EDQUOT or EIO, drained, flushed if
 * it could be), the job stays published with job->paused set, which takes
 * it out of the worker's pumps; a PAUSED event is queued. A RESUME command
 * clears it on the worker (stream_resume()) and the pumps take it up again;
 * an abort reaps it like an idle incremental stream, after a flush.
 *
 * Cursors: (cluster << CURSOR_TAG_BITS) | tag, where tag (never 0) is the
 * job's, drawn from a per-domain counter with a random start. The tag sits
 * in the low bits so that cur / end still approximates progress; a cursor of
 * another disk, another stream or another domain has a different tag. The
 * cluster part never passes the stream's position, so a forged cursor can
 * never skip clusters that were not copied.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "domain.h"

/* ---- worker side ---- */

static int job_new(struct disk *d, const struct disk_cmd *cmd, bool continuous)
{
	struct siphon_domain *dom = d->dom;
	struct edisk_stream_params sp = {0};
	struct stream_progress p;
	struct stream_job *job;
	int ret;

	job = calloc(1, sizeof(*job));
	if (!job)
		return sx_error(ENOMEM, "out of memory");
	/* The engine wires the stream to the guest's cluster locks. */
	sp.base = cmd->base;
	sp.speed = cmd->bandwidth;
	sp.queue_depth = cmd->queue_depth;
	sp.extent_size = cmd->extent_size;
	sp.on_error = cmd->on_error == SIPHON_ON_ERROR_PAUSE
			      ? STREAM_ON_ERROR_PAUSE
			      : STREAM_ON_ERROR_STOP;
	ret = edisk_stream_create(d->eng, &sp, &job->s);
	if (ret < 0) {
		job->s = NULL;
		goto out;
	}
	stream_get_progress(job->s, &p);
	if (p.end > CURSOR_MAX_CLUSTERS) {
		ret = sx_error(EFBIG,
			       "%s: %llu clusters: too many for a cursor",
			       d->path, (unsigned long long)p.end);
		goto out;
	}
	job->end = p.end;
	job->continuous = continuous;
	job->speed = cmd->bandwidth;
	if (cmd->base)
		snprintf(job->base_path, sizeof(job->base_path), "%s",
			 cmd->base);
	pthread_mutex_lock(&dom->lock);
	dom_new_job_ids(dom, &job->id, &job->tag);
	d->job = job;
	pthread_mutex_unlock(&dom->lock);
	job = NULL;
out:
	if (job) {
		if (job->s)
			edisk_stream_destroy(d->eng, false);
		free(job);
	}
	return ret;
}

/* Under dom->lock (or on the worker for its own job). */
static void job_report_running(struct stream_job *job, struct job_report *r)
{
	memset(r, 0, sizeof(*r));
	r->state = SIPHON_STREAM_RUNNING;
	r->continuous = job->continuous;
	r->tag = job->tag;
	r->speed = job->speed;
	snprintf(r->base, sizeof(r->base), "%s", job->base_path);
	stream_get_progress(job->s, &r->progress);
	if (job->paused) {
		r->state = SIPHON_STREAM_PAUSED;
		r->error = job->pause_err;
		snprintf(r->message, sizeof(r->message), "%s", job->pause_msg);
	}
}

/*
 * End the disk's job. ret is what stream_finish()/stream_run() returned;
 * its message, if any, is this thread's last error.
 */
static void job_end(struct disk *d, int ret)
{
	struct siphon_domain *dom = d->dom;
	struct stream_job *job = d->job;
	struct job_report r;
	struct event_node *n;
	const char *msg = sx_last_error();

	pthread_mutex_lock(&dom->lock); /* job->speed */
	job_report_running(job, &r);
	pthread_mutex_unlock(&dom->lock);
	r.state = SIPHON_STREAM_RUNNING;
	r.error = 0;
	r.message[0] = '\0';
	if (r.progress.finalized) {
		r.state = SIPHON_STREAM_COMPLETED;
	} else if (job->err) {
		r.state = SIPHON_STREAM_FAILED;
		r.error = -job->err;
		msg = job->errmsg;
	} else if (ret == -ECANCELED || (ret >= 0 && job->abort)) {
		r.state = SIPHON_STREAM_CANCELLED;
		r.error = ECANCELED;
		msg = job->abort_msg[0] ? job->abort_msg : "stream aborted";
	} else if (ret < 0) {
		r.state = SIPHON_STREAM_FAILED;
		r.error = -ret;
	} else {
		r.state = SIPHON_STREAM_FAILED;
		r.error = EIO;
		msg = "stream stopped before the end";
	}
	if (r.state != SIPHON_STREAM_COMPLETED)
		snprintf(r.message, sizeof(r.message), "%s",
			 msg[0] ? msg : strerror(r.error));

	n = calloc(1, sizeof(*n));
	if (n) {
		n->ev.size = sizeof(n->ev);
		n->ev.kind = r.state == SIPHON_STREAM_COMPLETED
				     ? SIPHON_EVENT_STREAM_COMPLETED
			     : r.state == SIPHON_STREAM_CANCELLED
				     ? SIPHON_EVENT_STREAM_CANCELLED
				     : SIPHON_EVENT_STREAM_FAILED;
		n->ev.error = r.state == SIPHON_STREAM_COMPLETED ? 0 : r.error;
		snprintf(n->ev.path, sizeof(n->ev.path), "%s", d->path);
		snprintf(n->ev.message, sizeof(n->ev.message), "%s", r.message);
		n->ev.bytes_copied = r.progress.bytes_copied;
	}

	pthread_mutex_lock(&dom->lock);
	d->job = NULL;
	d->last = r;
	d->has_last = true;
	dom_push_event_locked(dom, n);
	pthread_cond_broadcast(&dom->job_cond);
	pthread_mutex_unlock(&dom->lock);

	/* Completed: guest reads must stop seeing the dropped layers. */
	edisk_stream_destroy(d->eng, r.state == SIPHON_STREAM_COMPLETED);
	free(job);
}

void stream_job_fail(struct disk *d, int err)
{
	struct stream_job *job = d->job;

	if (!job->err) {
		job->err = err;
		snprintf(job->errmsg, sizeof(job->errmsg), "%s",
			 sx_last_error()[0] ? sx_last_error() : strerror(-err));
	}
	stream_request_abort(job->s);
	/* Paused, it is not pumped: disk_turn() reaps it instead. */
	if (job->paused)
		atomic_store(&job->abort, true);
}

/*
 * The engine paused the stream (err < 0, msg its message): publish it as
 * PAUSED and queue the event. A running step ends with the error, the
 * stream staying open.
 */
static void job_pause(struct disk *d, int err, const char *msg)
{
	struct siphon_domain *dom = d->dom;
	struct stream_job *job = d->job;
	struct disk_cmd *cmd = job->step;
	struct stream_progress p;
	struct event_node *n;

	stream_get_progress(job->s, &p);
	n = calloc(1, sizeof(*n));
	pthread_mutex_lock(&dom->lock);
	job->paused = true;
	job->pause_err = -err;
	snprintf(job->pause_msg, sizeof(job->pause_msg),
		 "%s: stream paused at offset %llu: %s", d->path,
		 (unsigned long long)(p.cur * d->cluster_size), msg);
	if (n) {
		n->ev.size = sizeof(n->ev);
		n->ev.kind = SIPHON_EVENT_STREAM_PAUSED;
		n->ev.error = -err;
		snprintf(n->ev.path, sizeof(n->ev.path), "%s", d->path);
		snprintf(n->ev.message, sizeof(n->ev.message), "%s",
			 job->pause_msg);
		n->ev.bytes_copied = p.bytes_copied;
	}
	dom_push_event_locked(dom, n);
	pthread_mutex_unlock(&dom->lock);
	if (cmd) {
		job->step = NULL;
		stream_set_budget(job->s, 0);
		disk_cmd_finish(cmd, sx_error(err, "%s", job->pause_msg));
	}
}

/* The running step reached its limit, or was aborted, or failed. */
static void step_end(struct disk *d)
{
	struct stream_job *job = d->job;
	struct disk_cmd *cmd = job->step;
	struct stream_progress p;
	int ret;

	job->step = NULL;
	stream_set_budget(job->s, 0);
	sx_error_clear();
	ret = edisk_stream_finish(d->eng);
	if (ret >= 0 && job->abort)
		ret = sx_error(ECANCELED, "%s: stream aborted", d->path);
	if (ret < 0) {
		job_end(d, ret);
		disk_cmd_finish(cmd, ret);
		return;
	}
	stream_get_progress(job->s, &p);
	cmd->cursor = cursor_encode(p.cur, job->tag);
	if (p.finalized)
		job_end(d, 0);
	disk_cmd_finish(cmd, 0);
}

void stream_job_pump(struct disk *d, uint64_t now)
{
	struct stream_job *job = d->job;
	uint64_t wait = 0, limit = job->step ? job->step_limit : job->end;
	const char *msg = NULL;
	int ret;

	if (job->abort)
		stream_request_abort(job->s);
	if (edisk_stream_pump(d->eng, limit, job->abort, now, &wait)) {
		ret = stream_paused(job->s, &msg);
		if (ret < 0) {
			job_pause(d, ret, msg);
			return;
		}
		/* Aborted while pausing: flush and end CANCELLED. */
		if (job->abort && stream_resume(job->s) < 0)
			sx_error_clear();
		if (job->step) {
			step_end(d);
			return;
		}
		sx_error_clear();
		ret = edisk_stream_finish(d->eng);
		job_end(d, ret);
		return;
	}
	if (wait)
		disk_arm_timer(d, wait);
}

void stream_job_reap(struct disk *d)
{
	struct stream_job *job = d->job;

	sx_error_clear();
	if (job->paused && !job->err) {
		/*
		 * What it copied: durable if the device lets us now (it may
		 * also have reached the end just before it paused: job_end()
		 * then reports it COMPLETED).
		 */
		stream_resume(job->s);
		if (edisk_stream_finish(d->eng) < 0)
			snprintf(job->abort_msg, sizeof(job->abort_msg),
				 "stream aborted while paused; its flush "
				 "failed (detach flushes again): %s",
				 sx_last_error());
		sx_error_clear();
	}
	job_end(d, -ECANCELED);
}

static int cmd_start(struct disk *d, struct disk_cmd *cmd)
{
	int ret;

	if (d->job)
		return sx_error(EBUSY, "%s: a stream is already %s on it",
				d->path,
				d->job->continuous ? "running" : "open");
	ret = job_new(d, cmd, true);
	if (ret < 0)
		return ret;
	cmd->cursor = cursor_encode(0, d->job->tag);
	return 0;
}

/* cmd_step(): the step runs on as the job's step. */
#define STEP_STARTED 1

static int cmd_step(struct disk *d, struct disk_cmd *cmd)
{
	struct stream_job *job = d->job;
	struct stream_progress p;
	uint64_t cl;
	int ret;

	if (job && job->continuous)
		return sx_error(EBUSY, "%s: a CONTINUOUS stream is running",
				d->path);
	if (job && job->paused && cmd->cursor)
		return sx_error(EAGAIN, "%s: resume it first", job->pause_msg);
	if (cmd->cursor == 0) {
		if (job)
			return sx_error(EBUSY,
					"%s: an incremental stream is already "
					"open: continue it with its cursor or "
					"abort it",
					d->path);
		ret = job_new(d, cmd, false);
		if (ret < 0)
			return ret;
		job = d->job;
		cmd->cursor = cursor_encode(0, job->tag);
		if (job->end == 0) {
			/* Nothing to copy: this call is also the last. */
			ret = stream_run(job->s, 0, 0);
			job_end(d, ret);
		}
		return ret < 0 ? ret : 0;
	}

	cl = cmd->cursor >> CURSOR_TAG_BITS;
	if (!job || (cmd->cursor & CURSOR_TAG_MASK) != job->tag)
		return sx_error(EINVAL,
				"%s: cursor 0x%llx does not belong to a "
				"stream open on this disk",
				d->path, (unsigned long long)cmd->cursor);
	if (cl > job->end)
		return sx_error(EINVAL, "%s: cursor past the end", d->path);
	stream_get_progress(job->s, &p);
	if (cl > p.cur)
		return sx_error(EINVAL, "%s: cursor ahead of the stream",
				d->path);
	if (job->abort) {
		job_end(d, -ECANCELED);
		return sx_error(ECANCELED, "%s: stream aborted", d->path);
	}
	if (cl < p.cur) {
		ret = stream_seek(job->s, cl);
		if (ret < 0)
			return ret;
	}
	if (cmd->set_bandwidth) {
		pthread_mutex_lock(&d->dom->lock);
		job->speed = cmd->bandwidth;
		stream_set_speed(job->s, cmd->bandwidth);
		pthread_mutex_unlock(&d->dom->lock);
	}
	/* The worker pumps it between guest requests: see step_end(). */
	job->step_limit = cmd->max_clusters < job->end - cl
				  ? cl + cmd->max_clusters
				  : job->end;
	stream_set_budget(job->s, cmd->max_bytes);
	job->step = cmd;
	return STEP_STARTED;
}

static int cmd_resume(struct disk *d)
{
	struct siphon_domain *dom = d->dom;
	struct stream_job *job = d->job;
	int ret;

	if (!job)
		return sx_error(ESRCH, "%s: no stream to resume", d->path);
	if (job->abort)
		return sx_error(ECANCELED, "%s: the stream is being aborted",
				d->path);
	if (!job->paused)
		return sx_error(EINVAL, "%s: the stream is not paused",
				d->path);
	ret = stream_resume(job->s);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&dom->lock);
	job->paused = false;
	job->pause_err = 0;
	job->pause_msg[0] = '\0';
	pthread_mutex_unlock(&dom->lock);
	/* A CONTINUOUS stream: this turn's pumps take it up again. */
	return 0;
}

bool stream_cmd_run(struct disk *d, struct disk_cmd *cmd)
{
	int ret;

	if (cmd->kind == DISK_CMD_STREAM_RESUME)
		ret = cmd_resume(d);
	else if (cmd->kind == DISK_CMD_STREAM_START)
		ret = cmd_start(d, cmd);
	else
		ret = cmd_step(d, cmd);
	if (ret == STEP_STARTED)
		return false;
	cmd->ret = ret;
	return true;
}

/* ---- caller side ---- */

static int check_dom(siphon_domain *dom)
{
	return dom ? 0 : sx_error(EINVAL, "domain is NULL");
}

SIPHON_API int
siphon_block_stream_ex(siphon_domain *dom, const char *path, uint64_t *cursor,
		       unsigned flags,
		       const struct siphon_block_stream_params *params)
{
	struct siphon_block_stream_params prm;
	struct disk_cmd cmd = {0};
	struct disk *d = NULL;
	int ret;

	ret = check_dom(dom);
	if (ret < 0)
		return ret;
	if (flags & ~(unsigned)SIPHON_STREAM_MASK)
		return sx_error(EINVAL, "unknown stream flags 0x%x",
				flags & ~(unsigned)SIPHON_STREAM_MASK);
	ret = dom_check_path(path);
	if (ret < 0)
		return ret;
	ret = dom_copy_opts(&prm, sizeof(prm), params,
			    params ? params->size : 0, sizeof(size_t),
			    "stream params");
	if (ret < 0)
		return ret;
	if (prm.base && prm.base[0] == '\0')
		prm.base = NULL;
	if (prm.queue_depth > 1024 ||
	    (prm.extent_size &&
	     (prm.extent_size < 512 || prm.extent_size > (64u << 20))))
		return sx_error(EINVAL,
				"%s: queue_depth takes 1..1024 and extent_size "
				"512 B..64 MiB",
				path);
	if (prm.on_error > SIPHON_ON_ERROR_PAUSE)
		return sx_error(EINVAL, "%s: unknown on_error %u", path,
				prm.on_error);
	if (!(flags & SIPHON_STREAM_CONTINUOUS) && !cursor)
		return sx_error(EINVAL,
				"%s: incremental stream without a "
				"cursor",
				path);
	ret = dom_get_disk(dom, path, &d);
	if (ret < 0)
		return ret;

	cmd.base = prm.base;
	cmd.bandwidth = prm.bandwidth;
	cmd.queue_depth = prm.queue_depth;
	cmd.extent_size = prm.extent_size;
	cmd.on_error = (int)prm.on_error;
	cmd.set_bandwidth = params != NULL;
	cmd.max_bytes =
		prm.max_bytes ? prm.max_bytes : SIPHON_STREAM_DEFAULT_MAX_BYTES;
	cmd.max_clusters = prm.max_clusters
				   ? prm.max_clusters
				   : SIPHON_STREAM_DEFAULT_MAX_CLUSTERS;
	if (flags & SIPHON_STREAM_CONTINUOUS) {
		cmd.kind = DISK_CMD_STREAM_START;
	} else {
		cmd.kind = DISK_CMD_STREAM_STEP;
		cmd.cursor = *cursor;
	}
	ret = disk_cmd_call(d, &cmd);
	if (ret >= 0 && cursor)
		*cursor = cmd.cursor;
	dom_put_disk(d);
	return ret < 0 ? ret : 0;
}

SIPHON_API int siphon_block_stream(siphon_domain *dom, const char *path,
				   uint64_t *cursor, unsigned flags)
{
	return siphon_block_stream_ex(dom, path, cursor, flags, NULL);
}

SIPHON_API int siphon_block_stream_abort(siphon_domain *dom, const char *path,
					 unsigned flags)
{
	struct disk *d;
	uint64_t id;
	int ret;

	ret = check_dom(dom);
	if (ret < 0)
		return ret;
	if (flags & ~(unsigned)SIPHON_ABORT_MASK)
		return sx_error(EINVAL, "unknown abort flags 0x%x",
				flags & ~(unsigned)SIPHON_ABORT_MASK);
	ret = dom_get_disk(dom, path, &d);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&dom->lock);
	if (!d->job) {
		pthread_mutex_unlock(&dom->lock);
		ret = sx_error(ESRCH, "%s: no stream to abort", path);
		goto out;
	}
	id = d->job->id;
	atomic_store(&d->job->abort, true);
	stream_request_abort(d->job->s);
	pthread_mutex_unlock(&dom->lock);
	disk_wake(d);
	if (flags & SIPHON_ABORT_ASYNC)
		goto out;
	pthread_mutex_lock(&dom->lock);
	while (d->job && d->job->id == id)
		pthread_cond_wait(&dom->job_cond, &dom->lock);
	pthread_mutex_unlock(&dom->lock);
out:
	dom_put_disk(d);
	return ret;
}

SIPHON_API int siphon_block_stream_resume(siphon_domain *dom, const char *path,
					  unsigned flags)
{
	struct disk_cmd cmd = {0};
	struct disk *d;
	int ret;

	ret = check_dom(dom);
	if (ret < 0)
		return ret;
	if (flags)
		return sx_error(EINVAL, "unknown resume flags 0x%x", flags);
	ret = dom_get_disk(dom, path, &d);
	if (ret < 0)
		return ret;
	cmd.kind = DISK_CMD_STREAM_RESUME;
	ret = disk_cmd_call(d, &cmd);
	dom_put_disk(d);
	return ret < 0 ? ret : 0;
}

SIPHON_API int siphon_block_stream_set_speed(siphon_domain *dom,
					     const char *path, uint64_t bps,
					     unsigned flags)
{
	struct disk *d;
	int ret;

	ret = check_dom(dom);
	if (ret < 0)
		return ret;
	if (flags)
		return sx_error(EINVAL, "unknown set_speed flags 0x%x", flags);
	ret = dom_get_disk(dom, path, &d);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&dom->lock);
	if (d->job) {
		d->job->speed = bps;
		stream_set_speed(d->job->s, bps);
	} else {
		ret = -ESRCH;
	}
	pthread_mutex_unlock(&dom->lock);
	if (ret < 0)
		sx_error(ret, "%s: no stream to set the speed of", path);
	dom_put_disk(d);
	return ret;
}

SIPHON_API int
siphon_get_block_stream_info(siphon_domain *dom,
			     struct siphon_block_stream_info *info, unsigned nr,
			     unsigned flags)
{
	struct stream_progress p;
	struct disk *d;
	unsigned count = 0;
	int ret;

	ret = check_dom(dom);
	if (ret < 0)
		return ret;
	if (flags)
		return sx_error(EINVAL, "unknown info flags 0x%x", flags);
	if (!info && nr)
		return sx_error(EINVAL, "info is NULL");
	pthread_mutex_lock(&dom->lock);
	for (d = dom->disks; d; d = d->next) {
		if (!d->job)
			continue;
		if (count < nr) {
			struct siphon_block_stream_info *i = &info[count];

			stream_get_progress(d->job->s, &p);
			memset(i->path, 0, sizeof(i->path));
			snprintf(i->path, sizeof(i->path), "%s", d->path);
			i->cur = cursor_encode(p.cur, d->job->tag);
			i->end = cursor_encode(p.end, d->job->tag);
		}
		count++;
	}
	pthread_mutex_unlock(&dom->lock);
	return (int)count;
}

static void fill_info_ex(struct siphon_block_stream_info_ex *x,
			 const struct disk *d, const struct job_report *r)
{
	memset(x, 0, sizeof(*x));
	x->size = sizeof(*x);
	snprintf(x->path, sizeof(x->path), "%s", d->path);
	snprintf(x->base, sizeof(x->base), "%s", r->base);
	x->state = r->state;
	x->flags = r->continuous ? SIPHON_STREAM_CONTINUOUS : 0;
	x->error = r->error;
	snprintf(x->message, sizeof(x->message), "%s", r->message);
	x->cur = cursor_encode(r->progress.cur, r->tag);
	x->end = cursor_encode(r->progress.end, r->tag);
	x->bytes_copied = r->progress.bytes_copied;
	x->bytes_skipped = r->progress.bytes_skipped;
	x->bytes_zero = r->progress.bytes_zero;
	x->rate = r->state == SIPHON_STREAM_RUNNING ? r->progress.rate : 0;
	x->bandwidth = r->speed;
	x->clusters_done = r->progress.cur;
	x->clusters = r->progress.end;
	x->cluster_size = d->cluster_size;
	x->inflight_bytes = r->progress.inflight_bytes;
	x->window_bytes = r->progress.window_bytes;
	x->request_bytes = r->progress.request_bytes;
	x->device_rate = r->progress.device_rate;
	x->latency_us = r->progress.latency_us;
	x->read_request_bytes = r->progress.read_request_bytes;
	x->write_request_bytes = r->progress.write_request_bytes;
}

SIPHON_API int
siphon_get_block_stream_info_ex(siphon_domain *dom,
				struct siphon_block_stream_info_ex *info,
				unsigned nr, unsigned flags)
{
	struct siphon_block_stream_info_ex x;
	struct job_report r;
	const struct job_report *rp;
	size_t stride = 0;
	struct disk *d;
	unsigned count = 0;
	int ret;

	ret = check_dom(dom);
	if (ret < 0)
		return ret;
	if (flags & ~(unsigned)SIPHON_INFO_MASK)
		return sx_error(EINVAL, "unknown info flags 0x%x",
				flags & ~(unsigned)SIPHON_INFO_MASK);
	if (nr) {
		if (!info)
			return sx_error(EINVAL, "info is NULL");
		stride = info[0].size;
		if (stride < SIPHON_BLOCK_STREAM_INFO_EX_V1_SIZE)
			return sx_error(EINVAL, "info size %zu too small (%zu)",
					stride,
					SIPHON_BLOCK_STREAM_INFO_EX_V1_SIZE);
	}
	pthread_mutex_lock(&dom->lock);
	for (d = dom->disks; d; d = d->next) {
		if (d->job) {
			job_report_running(d->job, &r);
			rp = &r;
		} else if (d->has_last && (flags & SIPHON_INFO_ALL)) {
			rp = &d->last;
		} else {
			continue;
		}
		if (count < nr) {
			fill_info_ex(&x, d, rp);
			/*
			 * A newer caller's struct is longer: leave its tail;
			 * an older one's shorter: fill what it has.
			 */
			x.size = stride < sizeof(x) ? stride : sizeof(x);
			memcpy((char *)info + count * stride, &x, x.size);
		}
		count++;
	}
	pthread_mutex_unlock(&dom->lock);
	return (int)count;
}

SIPHON_API const char *siphon_stream_state_name(int state)
{
	switch (state) {
	case SIPHON_STREAM_RUNNING:
		return "running";
	case SIPHON_STREAM_PAUSED:
		return "paused";
	case SIPHON_STREAM_COMPLETED:
		return "completed";
	case SIPHON_STREAM_CANCELLED:
		return "cancelled";
	case SIPHON_STREAM_FAILED:
		return "failed";
	}
	return "unknown";
}

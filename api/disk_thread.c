/*
 * The per-disk worker: one thread per attached disk that owns all of the
 * disk's I/O (its img chain, its sio_queue, its stream), because the format
 * drivers are not thread safe and a queue belongs to one thread.
 *
 * Other threads reach it through a command list (disk->cmds, under
 * disk->cmd_lock) and an eventfd (disk->cmd_fd). The worker sleeps only in
 * sio_queue_run(), with a SIO_OP_POLL on that eventfd always armed, so a
 * command, an abort or a stop wakes it even while I/O is in flight; a
 * throttled stream with nothing in flight arms a second poll on a timerfd.
 * One turn of the loop is: start guest requests; handle commands; start
 * guest requests whose cluster locks dropped; drive the stream; wait.
 *
 * Guest priority: guest requests are started before anything else in a
 * turn, and while the guest has been active within GUEST_RECENT_NS the
 * stream keeps at most GUEST_STREAM_INFLIGHT extents of at most
 * GUEST_STREAM_EXTENT bytes in flight, so a guest request queues behind
 * little stream I/O on the device; and after each extent it pauses for
 * GUEST_STREAM_GAP_FACTOR times as long as the extent took (at least
 * GUEST_STREAM_GAP_MIN_NS, at most GUEST_STREAM_GAP_MAX_NS): back to back
 * extents, even one at a time, halved the guest's IOPS. The stream keeps a
 * share of the device under any guest load (one extent per gap at least),
 * so it always finishes; with the guest quiet it runs at full depth.
 *
 * When a stream finalizes, the layers it made unnecessary are closed, but
 * only once no guest request is in flight (they may be reading them); new
 * guest requests wait meanwhile (guest_hold).
 *
 * Invariants: the command eventfd is drained before the list is taken, so a
 * command posted after that always leaves the fd readable for the next
 * poll; the worker exits only with no stream job, no guest request in
 * flight or waiting, and both polls reaped, so
 * sio_queue_destroy() never waits for a poll that cannot fire.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "domain.h"
#include "formats/image.h"

/* Names for the polled fds in io/ messages. */
static char cmd_name[] = "(disk command eventfd)";
static char timer_name[] = "(disk timerfd)";

/* The disk whose worker is this thread, if any. */
static _Thread_local struct disk *tls_disk;

/* Guest activity this recent keeps the stream at a low queue depth. */
#define GUEST_RECENT_NS (50ull * 1000 * 1000)
#define GUEST_STREAM_INFLIGHT 1
#define GUEST_STREAM_EXTENT (256u * 1024)
#define GUEST_STREAM_GAP_FACTOR 4
#define GUEST_STREAM_GAP_MIN_NS (2ull * 1000 * 1000)
#define GUEST_STREAM_GAP_MAX_NS (20ull * 1000 * 1000)

bool disk_is_worker(const struct disk *d)
{
	return tls_disk == d;
}

void disk_wake(struct disk *d)
{
	uint64_t one = 1;

	/* Only fails with EAGAIN on a counter at its max: still readable. */
	if (write(d->cmd_fd, &one, sizeof(one)) < 0) {
	}
}

static void drain_fd(int fd)
{
	uint64_t v;

	if (read(fd, &v, sizeof(v)) < 0) {
		/* EAGAIN: nothing to drain */
	}
}

static void cmd_poll_done(struct sio_req *req, int res)
{
	struct disk *d = req->priv;

	(void)res;
	d->cmd_armed = false;
	d->cmd_ready = true;
}

static void timer_poll_done(struct sio_req *req, int res)
{
	struct disk *d = req->priv;

	(void)res;
	d->timer_armed = false;
	drain_fd(d->timer_fd);
}

static int arm_poll(struct disk *d, struct sio_req *req, struct sio_file *f,
		    sio_done_fn done)
{
	memset(req, 0, sizeof(*req));
	req->op = SIO_OP_POLL;
	req->file = f;
	req->done = done;
	req->priv = d;
	return sio_queue_submit(d->q, req);
}

void disk_arm_timer(struct disk *d, uint64_t ns)
{
	struct itimerspec its = {0};

	if (d->timer_armed)
		return;
	if (ns == 0)
		ns = 1;
	its.it_value.tv_sec = (time_t)(ns / 1000000000ull);
	its.it_value.tv_nsec = (long)(ns % 1000000000ull);
	if (timerfd_settime(d->timer_fd, 0, &its, NULL) < 0)
		return;
	if (arm_poll(d, &d->timer_poll, &d->timer_file, timer_poll_done) == 0)
		d->timer_armed = true;
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
	if (tls_disk == d)
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

static void update_cor(struct disk *d)
{
	int mode = atomic_load(&d->cor_mode);

	/* With a stream running, copy-on-read may yield to guest load. */
	guest_set_cor(d->guest,
		      mode == SIPHON_COR_ON ||
			      (mode == SIPHON_COR_AUTO && d->job),
		      d->job != NULL);
}

static void handle_cmds(struct disk *d)
{
	struct disk_cmd *cmd, *next;
	struct guest_req *greq, *gnext;
	bool stop = atomic_load(&d->stop);

	cmd = take_cmds(d, stop, &greq);
	update_cor(d);
	for (; greq; greq = gnext) {
		gnext = greq->next;
		if (stop)
			greq->complete(greq, -ENOENT);
		else
			guest_submit(d->guest, greq);
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
			if (stream_cmd_run(d, cmd))
				disk_cmd_finish(cmd, cmd->ret);
			break;
		case DISK_CMD_GUEST_STATS:
			guest_get_stats(d->guest, &cmd->stats);
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

void disk_swap_chain(struct disk *d, struct img *base)
{
	d->swap_pending = true;
	d->swap_base = base;
	guest_hold(d->guest, true);
}

/* Close the layers between the top and swap_base once nobody reads them. */
static void do_swap(struct disk *d)
{
	struct img *top = d->img, *old = top->backing, *l;
	unsigned depth = 1;

	if (guest_inflight(d->guest))
		return;
	if (old != d->swap_base) {
		for (l = old; l && l->backing != d->swap_base; l = l->backing)
			;
		if (l)
			l->backing = NULL;
		top->backing = d->swap_base;
		img_close(old);
		for (l = top->backing; l; l = l->backing)
			l->depth = depth++;
	}
	d->swap_pending = false;
	guest_hold(d->guest, false);
}

static uint64_t mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void pump_stream(struct disk *d)
{
	bool busy = guest_busy(d->guest, GUEST_RECENT_NS);
	uint64_t now = mono_ns(), gap;

	if (d->pace_inflight && !stream_inflight(d->job->s)) {
		/* The stream's I/O just drained: pause in proportion. */
		d->pace_inflight = false;
		gap = (now - d->pace_t0) * GUEST_STREAM_GAP_FACTOR;
		gap = gap < GUEST_STREAM_GAP_MIN_NS   ? GUEST_STREAM_GAP_MIN_NS
		      : gap > GUEST_STREAM_GAP_MAX_NS ? GUEST_STREAM_GAP_MAX_NS
						      : gap;
		d->pace_next = now + gap;
	}
	if (busy && !d->job->abort && !stream_inflight(d->job->s) &&
	    now < d->pace_next) {
		disk_arm_timer(d, d->pace_next - now);
		return;
	}
	stream_set_limits(d->job->s, busy ? GUEST_STREAM_INFLIGHT : 0,
			  busy ? GUEST_STREAM_EXTENT : 0);
	stream_job_pump(d);
	/* The pump may have ended the job. */
	if (d->job && !d->pace_inflight && stream_inflight(d->job->s)) {
		d->pace_inflight = true;
		d->pace_t0 = now;
	}
}

static void worker_loop(struct disk *d)
{
	int ret;

	for (;;) {
		if (d->cmd_ready) {
			d->cmd_ready = false;
			drain_fd(d->cmd_fd);
			handle_cmds(d);
		}
		if (!d->cmd_armed &&
		    arm_poll(d, &d->cmd_poll, &d->cmd_file, cmd_poll_done) == 0)
			d->cmd_armed = true;
		if (d->swap_pending)
			do_swap(d);
		guest_kick(d->guest);
		if (atomic_load(&d->stop) && d->job)
			atomic_store(&d->job->abort, true);
		if (d->job && d->job->abort && !d->job->continuous &&
		    !d->job->step)
			stream_job_reap(d);
		if (d->job && (d->job->continuous || d->job->step))
			pump_stream(d);
		if (d->swap_pending)
			do_swap(d);
		/* The pump and the swap may have dropped locks or a hold. */
		guest_kick(d->guest);
		if (atomic_load(&d->stop) && !d->job && guest_idle(d->guest) &&
		    !d->swap_pending)
			break;
		ret = sio_queue_run(d->q, 1);
		if (ret < 0 && d->job)
			stream_job_fail(d, ret);
	}
}

/* Reap both polls: make their fds readable and wait for them. */
static void drain_polls(struct disk *d)
{
	struct itimerspec its = {.it_value = {.tv_nsec = 1}};
	unsigned tries = 0;

	while ((d->cmd_armed || d->timer_armed) && tries++ < 1000) {
		if (d->cmd_armed)
			disk_wake(d);
		if (d->timer_armed)
			timerfd_settime(d->timer_fd, 0, &its, NULL);
		sio_queue_run(d->q, 1);
	}
}

static void *disk_main(void *arg)
{
	struct disk *d = arg;
	int ret;

	tls_disk = d;
	/* The ring is made here: it may only be used by its creator. */
	ret = sio_queue_create(d->dom->queue_depth, &d->q);
	if (ret >= 0) {
		ret = guest_create(d->img, d->q, &d->guest);
		if (ret < 0) {
			sio_queue_destroy(d->q);
			d->q = NULL;
		}
	}
	pthread_mutex_lock(&d->cmd_lock);
	d->init_ret = ret;
	if (ret < 0)
		snprintf(d->init_msg, sizeof(d->init_msg), "%s",
			 sx_last_error());
	pthread_cond_broadcast(&d->cmd_cond);
	pthread_mutex_unlock(&d->cmd_lock);
	if (ret < 0)
		return NULL;

	d->cmd_ready = true; /* a command may predate the first poll */
	worker_loop(d);

	/* Refuse commands posted since, then let their callers go. */
	handle_cmds(d);
	drain_polls(d);
	sio_queue_destroy(d->q);
	d->q = NULL;
	guest_destroy(d->guest);
	d->guest = NULL;
	img_close(d->img);
	d->img = NULL;
	return NULL;
}

int disk_start(struct disk *d)
{
	int ret;

	d->cmd_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (d->cmd_fd < 0)
		return sx_error(errno, "eventfd: %s", strerror(errno));
	d->timer_fd =
		timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (d->timer_fd < 0)
		return sx_error(errno, "timerfd: %s", strerror(errno));
	d->cmd_file = (struct sio_file){
		.fd = d->cmd_fd, .path = cmd_name, .align = 1, .mem_align = 1};
	d->timer_file = (struct sio_file){.fd = d->timer_fd,
					  .path = timer_name,
					  .align = 1,
					  .mem_align = 1};
	d->init_ret = 1;
	ret = -pthread_create(&d->thread, NULL, disk_main, d);
	if (ret < 0)
		return sx_error(ret, "%s: cannot start the disk's thread: %s",
				d->path, strerror(-ret));
	pthread_mutex_lock(&d->cmd_lock);
	while (d->init_ret == 1)
		pthread_cond_wait(&d->cmd_cond, &d->cmd_lock);
	ret = d->init_ret;
	pthread_mutex_unlock(&d->cmd_lock);
	if (ret < 0) {
		pthread_join(d->thread, NULL);
		return sx_error(ret, "%s: %s", d->path, d->init_msg);
	}
	return 0;
}

void disk_stop(struct disk *d)
{
	atomic_store(&d->stop, true);
	disk_wake(d);
	pthread_join(d->thread, NULL);
}

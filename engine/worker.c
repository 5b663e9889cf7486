/*
 * The event loop primitive (see worker.h): a sio_queue plus two one-shot
 * polls, one on a wake-up eventfd and one on a timerfd, re-armed by
 * ew_wait() whenever they have fired.
 *
 * Invariants: wake_armed / timer_armed are true exactly while the poll is
 * in the queue; timer_deadline is the absolute time the timerfd is set for
 * while timer_armed; ew_unbind() returns only with both polls reaped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "engine/worker.h"
#include "common/error.h"
#include "io/io.h"

/* Names for the polled fds in io/ messages. */
static char wake_name[] = "(engine wake-up eventfd)";
static char timer_name[] = "(engine timerfd)";

struct ew {
	struct sio_queue *q;
	int wake_fd;
	int timer_fd;
	struct sio_file wake_file, timer_file;
	struct sio_req wake_poll, timer_poll;
	bool wake_armed, timer_armed, woken;
	uint64_t timer_deadline;
};

uint64_t ew_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void drain_fd(int fd)
{
	uint64_t v;

	if (read(fd, &v, sizeof(v)) < 0) {
		/* EAGAIN: nothing to drain */
	}
}

int ew_create(struct ew **out)
{
	struct ew *w = calloc(1, sizeof(*w));
	int ret;

	if (!w)
		return sx_error(ENOMEM, "out of memory");
	w->timer_fd = -1;
	w->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (w->wake_fd < 0) {
		ret = sx_error(errno, "eventfd: %s", strerror(errno));
		goto fail;
	}
	w->timer_fd =
		timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (w->timer_fd < 0) {
		ret = sx_error(errno, "timerfd: %s", strerror(errno));
		goto fail;
	}
	w->wake_file = (struct sio_file){.fd = w->wake_fd,
					 .path = wake_name,
					 .align = 1,
					 .mem_align = 1};
	w->timer_file = (struct sio_file){.fd = w->timer_fd,
					  .path = timer_name,
					  .align = 1,
					  .mem_align = 1};
	*out = w;
	return 0;
fail:
	ew_destroy(w);
	return ret;
}

int ew_bind(struct ew *w, unsigned depth)
{
	int ret = sio_queue_create(depth, &w->q);

	if (ret < 0)
		w->q = NULL;
	/* A wake-up may predate the first poll. */
	w->woken = true;
	return ret;
}

struct sio_queue *ew_queue(struct ew *w)
{
	return w->q;
}

void ew_wake(struct ew *w)
{
	uint64_t one = 1;

	/* Only fails with EAGAIN on a counter at its max: still readable. */
	if (write(w->wake_fd, &one, sizeof(one)) < 0) {
	}
}

bool ew_take_wake(struct ew *w)
{
	if (!w->woken)
		return false;
	w->woken = false;
	drain_fd(w->wake_fd);
	return true;
}

static void wake_poll_done(struct sio_req *req, int res)
{
	struct ew *w = req->priv;

	(void)res;
	w->wake_armed = false;
	w->woken = true;
}

static void timer_poll_done(struct sio_req *req, int res)
{
	struct ew *w = req->priv;

	(void)res;
	w->timer_armed = false;
	drain_fd(w->timer_fd);
}

static int arm_poll(struct ew *w, struct sio_req *req, struct sio_file *f,
		    sio_done_fn done)
{
	memset(req, 0, sizeof(*req));
	req->op = SIO_OP_POLL;
	req->file = f;
	req->done = done;
	req->priv = w;
	return sio_queue_submit(w->q, req);
}

void ew_arm_timer(struct ew *w, uint64_t ns)
{
	struct itimerspec its = {0};
	uint64_t deadline;

	if (ns == 0)
		ns = 1;
	deadline = ew_now() + ns;
	if (w->timer_armed && w->timer_deadline <= deadline)
		return;
	its.it_value.tv_sec = (time_t)(ns / 1000000000ull);
	its.it_value.tv_nsec = (long)(ns % 1000000000ull);
	if (timerfd_settime(w->timer_fd, 0, &its, NULL) < 0)
		return;
	w->timer_deadline = deadline;
	if (w->timer_armed)
		return;
	if (arm_poll(w, &w->timer_poll, &w->timer_file, timer_poll_done) == 0)
		w->timer_armed = true;
}

int ew_wait(struct ew *w)
{
	if (!w->wake_armed &&
	    arm_poll(w, &w->wake_poll, &w->wake_file, wake_poll_done) == 0)
		w->wake_armed = true;
	return sio_queue_run(w->q, 1);
}

void ew_unbind(struct ew *w)
{
	struct itimerspec its = {.it_value = {.tv_nsec = 1}};
	unsigned tries = 0;

	if (!w->q)
		return;
	while ((w->wake_armed || w->timer_armed) && tries++ < 1000) {
		if (w->wake_armed)
			ew_wake(w);
		if (w->timer_armed)
			timerfd_settime(w->timer_fd, 0, &its, NULL);
		sio_queue_run(w->q, 1);
	}
	sio_queue_destroy(w->q);
	w->q = NULL;
}

uint64_t ew_sync_waits(void)
{
	return sio_sync_waits();
}

void ew_destroy(struct ew *w)
{
	if (!w)
		return;
	if (w->wake_fd >= 0)
		close(w->wake_fd);
	if (w->timer_fd >= 0)
		close(w->timer_fd);
	free(w);
}

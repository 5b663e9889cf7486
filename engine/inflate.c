/*
 * The inflater: see inflate.h.
 *
 * Two lists under one mutex: `todo` (owner -> worker, a condition variable
 * wakes the worker) and `done` (worker -> owner, the eventfd wakes the
 * owner's ring). The poll request is armed by the owner whenever jobs are
 * outstanding and none is armed; its callback drains `done`.
 *
 * Invariant: outstanding == jobs in todo + jobs being worked + jobs in done;
 * it only changes on the owner's thread (submit, completion callback).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "inflate.h"

struct job {
	struct job *next;
	struct img *layer;
	uint64_t cluster_off;
	uint64_t from;
	uint64_t len;
	void *dst;
	inflate_done_fn done;
	void *opaque;
	int res;
	char msg[SX_ERROR_MAX];
};

struct inflater {
	struct sio_queue *q;
	pthread_t thread;
	bool started;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct job *todo, **todo_tail;
	struct job *done;
	bool stop;
	unsigned outstanding;
	bool poll_armed;
	struct sio_file efile; /* the eventfd, for SIO_OP_POLL */
	struct sio_req poll;
};

static void *worker(void *arg)
{
	struct inflater *z = arg;
	uint8_t *cbuf = NULL;
	uint32_t cbuf_size = 0;
	struct job *j;
	uint64_t one = 1;

	for (;;) {
		pthread_mutex_lock(&z->lock);
		while (!z->todo && !z->stop)
			pthread_cond_wait(&z->cond, &z->lock);
		j = z->todo;
		if (j) {
			z->todo = j->next;
			if (!z->todo)
				z->todo_tail = &z->todo;
		}
		pthread_mutex_unlock(&z->lock);
		if (!j)
			break; /* stopping, and nothing left */

		if (z->stop) {
			j->res = -ECANCELED;
		} else if (cbuf_size < j->layer->cluster_size) {
			sio_buf_free(cbuf);
			cbuf_size = j->layer->cluster_size;
			cbuf = sio_buf_alloc(cbuf_size);
			if (!cbuf)
				cbuf_size = 0;
		}
		if (!z->stop && !cbuf) {
			j->res = -ENOMEM;
		} else if (!z->stop) {
			j->res = img_read_compressed(j->layer, j->cluster_off,
						     cbuf);
			if (j->res >= 0) {
				memcpy(j->dst, cbuf + j->from, j->len);
				j->res = 0;
			} else {
				/* Messages are per thread: carry it over. */
				snprintf(j->msg, sizeof(j->msg), "%s",
					 sx_last_error());
			}
		}

		pthread_mutex_lock(&z->lock);
		j->next = z->done;
		z->done = j;
		pthread_mutex_unlock(&z->lock);
		/* A full counter cannot happen: the owner drains it. */
		if (write(z->efile.fd, &one, sizeof(one)) < 0)
			continue;
	}
	sio_buf_free(cbuf);
	return NULL;
}

static void arm(struct inflater *z);

/* The eventfd is readable: run the callbacks of the finished jobs. */
static void on_poll(struct sio_req *req, int res)
{
	struct inflater *z = req->priv;
	struct job *list, *j;
	uint64_t v;

	(void)res;
	z->poll_armed = false;
	if (read(z->efile.fd, &v, sizeof(v)) < 0) {
		/* EAGAIN: woken with nothing new (spurious); fine. */
	}
	pthread_mutex_lock(&z->lock);
	list = z->done;
	z->done = NULL;
	pthread_mutex_unlock(&z->lock);
	while ((j = list)) {
		list = j->next;
		z->outstanding--;
		j->done(j->opaque, j->res, j->msg);
		free(j);
	}
	arm(z);
}

static void arm(struct inflater *z)
{
	if (z->poll_armed || !z->outstanding)
		return;
	memset(&z->poll, 0, sizeof(z->poll));
	z->poll.op = SIO_OP_POLL;
	z->poll.file = &z->efile;
	z->poll.done = on_poll;
	z->poll.priv = z;
	if (sio_queue_submit(z->q, &z->poll) == 0)
		z->poll_armed = true;
}

int inflater_create(struct sio_queue *q, struct inflater **out)
{
	struct inflater *z = calloc(1, sizeof(*z));
	int fd;

	if (!z)
		return sx_error(ENOMEM, "inflater: out of memory");
	fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (fd < 0) {
		free(z);
		return sx_error(errno, "inflater: eventfd: %s",
				strerror(errno));
	}
	z->q = q;
	z->efile.fd = fd;
	z->efile.path = "(decompression events)";
	z->efile.align = 1;
	z->efile.mem_align = 1;
	z->todo_tail = &z->todo;
	pthread_mutex_init(&z->lock, NULL);
	pthread_cond_init(&z->cond, NULL);
	*out = z;
	return 0;
}

void inflater_destroy(struct inflater *z)
{
	struct job *j;

	if (!z)
		return;
	if (z->started) {
		pthread_mutex_lock(&z->lock);
		z->stop = true;
		pthread_cond_signal(&z->cond);
		pthread_mutex_unlock(&z->lock);
		pthread_join(z->thread, NULL);
	}
	/* Whatever finished but was never reaped. */
	while ((j = z->done)) {
		z->done = j->next;
		free(j);
	}
	pthread_mutex_destroy(&z->lock);
	pthread_cond_destroy(&z->cond);
	close(z->efile.fd);
	free(z);
}

int inflater_submit(struct inflater *z, struct img *layer, uint64_t cluster_off,
		    uint64_t from, uint64_t len, void *dst,
		    inflate_done_fn done, void *opaque)
{
	struct job *j;
	int ret;

	if (from + len > layer->cluster_size)
		return sx_error(EINVAL, "inflater: range past the cluster");
	if (!z->started) {
		/* The thread starts on first use: most chains compress nothing. */
		ret = pthread_create(&z->thread, NULL, worker, z);
		if (ret)
			return sx_error(ret,
					"inflater: cannot start a thread: %s",
					strerror(ret));
		z->started = true;
	}
	j = calloc(1, sizeof(*j));
	if (!j)
		return sx_error(ENOMEM, "inflater: out of memory");
	*j = (struct job){
		.layer = layer,
		.cluster_off = cluster_off,
		.from = from,
		.len = len,
		.dst = dst,
		.done = done,
		.opaque = opaque,
	};
	pthread_mutex_lock(&z->lock);
	*z->todo_tail = j;
	z->todo_tail = &j->next;
	pthread_cond_signal(&z->cond);
	pthread_mutex_unlock(&z->lock);
	z->outstanding++;
	arm(z);
	return 0;
}

unsigned inflater_outstanding(const struct inflater *z)
{
	return z->outstanding;
}

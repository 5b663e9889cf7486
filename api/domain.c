/*
 * Domains: handles, disk lifetimes and events.
 *
 * A domain is a list of attached disks plus an event queue. Disks are
 * reference counted (see domain.h) so that a call which found a disk can
 * keep using it while another thread detaches it: detach unlinks the disk at
 * once (later calls get -ENOENT), stops its worker, and the last reference
 * frees it.
 *
 * Events: without a callback they queue and the event fd (an eventfd) is
 * readable exactly while the queue is not empty; the counter is written on
 * the first push and drained on the last pop, both under dom->lock, so the
 * two never disagree. With a callback, the domain's event thread pops them
 * and calls it with no lock held, so the callback may call back into the
 * API (restart a stream, detach) without deadlock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "domain.h"

/* The event thread of the domain running on this thread, if any. */
static _Thread_local struct siphon_domain *tls_event_dom;

int dom_check_path(const char *path)
{
	size_t len;

	if (!path)
		return sx_error(EINVAL, "disk path is NULL");
	len = strnlen(path, SIPHON_PATH_MAX);
	if (len >= SIPHON_PATH_MAX)
		return sx_error(ENAMETOOLONG,
				"disk path is %d bytes or longer (limit %d)",
				SIPHON_PATH_MAX, SIPHON_PATH_MAX - 1);
	if (path[0] != '/')
		return sx_error(EINVAL, "%s: disk path is not absolute", path);
	return 0;
}

static struct disk *find_disk(struct siphon_domain *dom, const char *path)
{
	struct disk *d;

	for (d = dom->disks; d; d = d->next)
		if (!strcmp(d->path, path))
			return d;
	return NULL;
}

int dom_get_disk(struct siphon_domain *dom, const char *path, struct disk **out)
{
	struct disk *d;
	int ret;

	ret = dom_check_path(path);
	if (ret < 0)
		return ret;
	pthread_mutex_lock(&dom->lock);
	d = find_disk(dom, path);
	if (d)
		d->refs++;
	pthread_mutex_unlock(&dom->lock);
	if (!d)
		return sx_error(ENOENT, "%s: no such disk attached", path);
	*out = d;
	return 0;
}

static void disk_free(struct disk *d)
{
	edisk_close(d->eng);
	pthread_mutex_destroy(&d->cmd_lock);
	pthread_cond_destroy(&d->cmd_cond);
	free(d->path);
	free(d);
}

void dom_put_disk(struct disk *d)
{
	struct siphon_domain *dom = d->dom;
	bool last;

	pthread_mutex_lock(&dom->lock);
	last = --d->refs == 0;
	pthread_mutex_unlock(&dom->lock);
	if (last)
		disk_free(d);
}

void dom_new_job_ids(struct siphon_domain *dom, uint64_t *id, uint16_t *tag)
{
	*id = ++dom->next_job_id;
	/* Tags only tell streams apart: 0 is the "open" cursor. */
	if (++dom->next_tag == 0)
		dom->next_tag = 1;
	*tag = dom->next_tag;
}

/* ---- events ---- */

void dom_push_event_locked(struct siphon_domain *dom, struct event_node *n)
{
	uint64_t one = 1;

	/* Nowhere to report a lost event; the stream's state says it all. */
	if (!n)
		return;
	n->next = NULL;
	if (!dom->ev_head && !dom->event_cb &&
	    write(dom->event_fd, &one, sizeof(one)) < 0) {
		/* cannot fail: the counter is 0 or 1 */
	}
	*dom->ev_tail = n;
	dom->ev_tail = &n->next;
	pthread_cond_signal(&dom->event_cond);
}

/* Pop under dom->lock. */
static struct event_node *pop_event(struct siphon_domain *dom)
{
	struct event_node *n = dom->ev_head;
	uint64_t v;

	if (!n)
		return NULL;
	dom->ev_head = n->next;
	if (!dom->ev_head) {
		dom->ev_tail = &dom->ev_head;
		if (!dom->event_cb && read(dom->event_fd, &v, sizeof(v)) < 0) {
			/* EAGAIN: already drained */
		}
	}
	return n;
}

static void *event_main(void *arg)
{
	struct siphon_domain *dom = arg;
	struct event_node *n;

	tls_event_dom = dom;
	pthread_mutex_lock(&dom->lock);
	for (;;) {
		n = pop_event(dom);
		if (!n) {
			if (dom->event_stop)
				break;
			pthread_cond_wait(&dom->event_cond, &dom->lock);
			continue;
		}
		pthread_mutex_unlock(&dom->lock);
		dom->event_cb(dom, &n->ev, dom->event_opaque);
		free(n);
		pthread_mutex_lock(&dom->lock);
	}
	pthread_mutex_unlock(&dom->lock);
	return NULL;
}

SIPHON_API int siphon_domain_event_fd(siphon_domain *dom)
{
	if (!dom)
		return sx_error(EINVAL, "domain is NULL");
	return dom->event_fd;
}

SIPHON_API int siphon_domain_next_event(siphon_domain *dom,
					struct siphon_event *ev)
{
	struct event_node *n;
	size_t len;

	if (!dom || !ev)
		return sx_error(EINVAL, "domain or event is NULL");
	if (ev->size < sizeof(struct siphon_event))
		return sx_error(EINVAL, "event size %zu too small (%zu)",
				ev->size, sizeof(struct siphon_event));
	pthread_mutex_lock(&dom->lock);
	n = pop_event(dom);
	pthread_mutex_unlock(&dom->lock);
	if (!n)
		return 0;
	/* A newer caller's struct is longer: leave its tail alone. */
	len = sizeof(n->ev);
	memcpy(ev, &n->ev, len);
	ev->size = len;
	free(n);
	return 1;
}

/* ---- domains ---- */

/*
 * Copy a caller's options struct of any version: shorter ones get zeros for
 * the fields they do not know, longer ones must have zeros in the fields
 * this library does not know.
 */
int dom_copy_opts(void *dst, size_t dst_size, const void *src, size_t src_size,
		  size_t min_size, const char *what)
{
	const unsigned char *p = src;
	size_t i;

	memset(dst, 0, dst_size);
	if (!src)
		return 0;
	if (src_size < min_size)
		return sx_error(EINVAL, "%s: size %zu too small", what,
				src_size);
	for (i = dst_size; i < src_size; i++)
		if (p[i])
			return sx_error(EINVAL,
					"%s: fields unknown to this library "
					"are set",
					what);
	memcpy(dst, src, src_size < dst_size ? src_size : dst_size);
	return 0;
}

/*
 * The worker pool: n workers (0: one per online CPU), threads started on
 * first use. -errno; what was made stays for free_pool().
 */
static int make_pool(struct siphon_domain *dom, unsigned n)
{
	/* Shared by many disks: room for several disks' I/O in the ring. */
	unsigned depth = dom->queue_depth * 4;
	long cpus;
	int ret;

	if (n == 0) {
		cpus = sysconf(_SC_NPROCESSORS_ONLN);
		n = cpus < 1			? 1
		    : cpus > SIPHON_MAX_WORKERS ? SIPHON_MAX_WORKERS
						: (unsigned)cpus;
	}
	if (depth > 4096 || depth < dom->queue_depth)
		depth = dom->queue_depth > 4096 ? dom->queue_depth : 4096;
	dom->workers = calloc(n, sizeof(*dom->workers));
	if (!dom->workers)
		return sx_error(ENOMEM, "out of memory");
	for (; dom->nworkers < n; dom->nworkers++) {
		ret = dworker_new(dom, depth, &dom->workers[dom->nworkers]);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Stop and free the pool: no disk is left on it. */
static void free_pool(struct siphon_domain *dom)
{
	unsigned i;

	for (i = 0; i < dom->nworkers; i++)
		dworker_free(dom->workers[i]);
	free(dom->workers);
	dom->workers = NULL;
	dom->nworkers = 0;
}

SIPHON_API int siphon_domain_create(const struct siphon_domain_opts *opts,
				    siphon_domain **out)
{
	struct siphon_domain_opts o;
	struct siphon_domain *dom = NULL;
	uint16_t seed = 0;
	int ret;

	if (!out)
		return sx_error(EINVAL, "siphon_domain_create: out is NULL");
	ret = dom_copy_opts(&o, sizeof(o), opts, opts ? opts->size : 0,
			    sizeof(size_t), "domain opts");
	if (ret < 0)
		return ret;
	if (o.workers > SIPHON_MAX_WORKERS)
		return sx_error(EINVAL, "domain opts: %u workers: more than %d",
				o.workers, SIPHON_MAX_WORKERS);
	dom = calloc(1, sizeof(*dom));
	if (!dom)
		return sx_error(ENOMEM, "out of memory");
	dom->event_fd = -1;
	pthread_mutex_init(&dom->lock, NULL);
	pthread_cond_init(&dom->job_cond, NULL);
	pthread_cond_init(&dom->event_cond, NULL);
	dom->ev_tail = &dom->ev_head;
	dom->event_cb = o.event_cb;
	dom->event_opaque = o.event_opaque;
	dom->queue_depth =
		o.queue_depth ? o.queue_depth : DISK_DEFAULT_QUEUE_DEPTH;
	dom->stream_buffer_bytes = o.stream_buffer_bytes;
	ret = make_pool(dom, o.workers);
	if (ret < 0)
		goto out;
	/*
	 * Cursor tags start at a random point so that a cursor kept from
	 * another domain (or an earlier run) is most likely refused.
	 */
	if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
		seed = (uint16_t)(time(NULL) ^ getpid());
	dom->next_tag = seed;
	dom->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (dom->event_fd < 0) {
		ret = sx_error(errno, "eventfd: %s", strerror(errno));
		goto out;
	}
	if (dom->event_cb) {
		ret = -pthread_create(&dom->event_thread, NULL, event_main,
				      dom);
		if (ret < 0) {
			sx_error(ret, "cannot start the event thread: %s",
				 strerror(-ret));
			goto out;
		}
		dom->event_thread_started = true;
	}
	*out = dom;
	dom = NULL;
	ret = 0;
out:
	if (dom) {
		free_pool(dom);
		if (dom->event_fd >= 0)
			close(dom->event_fd);
		pthread_cond_destroy(&dom->event_cond);
		pthread_cond_destroy(&dom->job_cond);
		pthread_mutex_destroy(&dom->lock);
		free(dom);
	}
	return ret;
}

SIPHON_API void siphon_domain_close(siphon_domain *dom)
{
	struct disk *d, *list, *next;
	struct event_node *n;

	if (!dom || tls_event_dom == dom)
		return;
	pthread_mutex_lock(&dom->lock);
	list = dom->disks;
	dom->disks = NULL;
	pthread_mutex_unlock(&dom->lock);

	/* Ask every stream to stop first, so that they wind down together. */
	for (d = list; d; d = d->next) {
		atomic_store(&d->stop, true);
		disk_wake(d);
	}
	for (d = list; d; d = next) {
		next = d->next;
		disk_stop(d);
		dom_put_disk(d);
	}

	if (dom->event_thread_started) {
		pthread_mutex_lock(&dom->lock);
		dom->event_stop = true;
		pthread_cond_signal(&dom->event_cond);
		pthread_mutex_unlock(&dom->lock);
		pthread_join(dom->event_thread, NULL);
	}
	free_pool(dom);
	while ((n = dom->ev_head)) {
		dom->ev_head = n->next;
		free(n);
	}
	close(dom->event_fd);
	pthread_cond_destroy(&dom->event_cond);
	pthread_cond_destroy(&dom->job_cond);
	pthread_mutex_destroy(&dom->lock);
	free(dom);
}

/* ---- disks ---- */

SIPHON_API int siphon_disk_attach(siphon_domain *dom, const char *path,
				  const struct siphon_attach_opts *opts)
{
	struct siphon_attach_opts o;
	struct edisk_opts eo;
	struct disk *d = NULL;
	int ret;

	if (!dom)
		return sx_error(EINVAL, "domain is NULL");
	ret = dom_check_path(path);
	if (ret < 0)
		return ret;
	ret = dom_copy_opts(&o, sizeof(o), opts, opts ? opts->size : 0,
			    sizeof(size_t), "attach opts");
	if (ret < 0)
		return ret;
	if (o.flags & ~(unsigned)SIPHON_ATTACH_MASK)
		return sx_error(EINVAL, "%s: unknown attach flags 0x%x", path,
				o.flags & ~(unsigned)SIPHON_ATTACH_MASK);
	if (o.nbd_connections > SIPHON_NBD_MAX_CONNECTIONS)
		return sx_error(
			EINVAL, "%s: %u NBD connections asked for, at most %u",
			path, o.nbd_connections, SIPHON_NBD_MAX_CONNECTIONS);

	d = calloc(1, sizeof(*d));
	if (!d)
		return sx_error(ENOMEM, "out of memory");
	d->dom = dom;
	d->refs = 1;
	d->cmds_tail = &d->cmds;
	d->greqs_tail = &d->greqs;
	pthread_mutex_init(&d->cmd_lock, NULL);
	pthread_cond_init(&d->cmd_cond, NULL);
	d->path = strdup(path);
	if (!d->path) {
		ret = sx_error(ENOMEM, "out of memory");
		goto out;
	}

	/* Refuse a duplicate before opening: the image lock would say less. */
	pthread_mutex_lock(&dom->lock);
	ret = find_disk(dom, path) ? -EEXIST : 0;
	pthread_mutex_unlock(&dom->lock);
	if (ret < 0) {
		sx_error(ret, "%s: disk already attached", path);
		goto out;
	}
	eo = (struct edisk_opts){
		.fmt = o.format,
		.buffered = o.flags & SIPHON_ATTACH_BUFFERED,
		.nbd_reconnect_ms = o.nbd_reconnect_ms,
		.nbd_timeout_ms = o.nbd_timeout_ms,
		.nbd_connections = o.nbd_connections,
	};
	ret = edisk_open(path, &eo, &d->eng);
	if (ret < 0)
		goto out;
	d->size = edisk_size(d->eng);
	d->cluster_size = edisk_cluster_size(d->eng);
	ret = disk_start(d);
	if (ret < 0)
		goto out;

	pthread_mutex_lock(&dom->lock);
	if (find_disk(dom, path)) {
		ret = -EEXIST;
	} else {
		struct disk **pp = &dom->disks;

		while (*pp)
			pp = &(*pp)->next;
		*pp = d;
	}
	pthread_mutex_unlock(&dom->lock);
	if (ret < 0) {
		/* Lost a race with another attach of the same name. */
		sx_error(ret, "%s: disk already attached", path);
		disk_stop(d);
		goto out;
	}
	d = NULL;
out:
	if (d)
		disk_free(d);
	return ret;
}

SIPHON_API int siphon_disk_detach(siphon_domain *dom, const char *path,
				  unsigned flags)
{
	struct disk *d, **pp;
	int ret;

	if (!dom)
		return sx_error(EINVAL, "domain is NULL");
	ret = dom_check_path(path);
	if (ret < 0)
		return ret;
	if (flags)
		return sx_error(EINVAL, "%s: unknown detach flags 0x%x", path,
				flags);
	pthread_mutex_lock(&dom->lock);
	for (pp = &dom->disks; *pp && strcmp((*pp)->path, path);
	     pp = &(*pp)->next)
		;
	d = *pp;
	if (d)
		*pp = d->next;
	pthread_mutex_unlock(&dom->lock);
	if (!d)
		return sx_error(ENOENT, "%s: no such disk attached", path);
	/* The list's reference is ours now. */
	disk_stop(d);
	dom_put_disk(d);
	return 0;
}

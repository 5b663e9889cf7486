/*
 * The event loop primitive of an engine thread: one sio_queue (io_uring),
 * a wake-up eventfd that any thread may signal, and a timer, both polled
 * through the queue so the thread sleeps in one place only (ew_wait()),
 * woken by a completion, a wake-up or the timer.
 *
 * Lifetime: ew_create() on any thread (the wake-up works from then on),
 * ew_bind() on the thread that will run the loop (a queue belongs to one
 * thread), ew_unbind() on that thread when it is done (it reaps both polls
 * first, so the queue never waits for a poll that cannot fire), then
 * ew_destroy() on any thread once nobody can call ew_wake() any more.
 *
 * Invariant: ew_take_wake() drains the eventfd before it reports a wake-up,
 * so a wake after that call always leaves the fd readable for the next
 * ew_wait().
 *
 * Threads: ew_wake() from any thread; the rest on the loop's thread.
 */
#ifndef SIPHON_ENGINE_WORKER_H
#define SIPHON_ENGINE_WORKER_H

#include <stdbool.h>
#include <stdint.h>

struct sio_queue;
struct ew;

/* The fds; no queue yet. -errno with a message. */
int ew_create(struct ew **out);

/* Loop thread: make the queue (depth requests in flight). -errno. */
int ew_bind(struct ew *w, unsigned depth);

/* The loop's queue (NULL before ew_bind()). */
struct sio_queue *ew_queue(struct ew *w);

/* Wake the loop. Any thread, any time between create and destroy. */
void ew_wake(struct ew *w);

/* Loop thread: a wake-up arrived since the last call (or since bind). */
bool ew_take_wake(struct ew *w);

/*
 * Loop thread: make ew_wait() return within ns even with nothing else to
 * do; the earliest of several deadlines wins.
 */
void ew_arm_timer(struct ew *w, uint64_t ns);

/*
 * Loop thread: wait for at least one completion (the polls count). Returns
 * what sio_queue_run() returned: callbacks run, or -errno.
 */
int ew_wait(struct ew *w);

/* Loop thread: reap both polls and destroy the queue. */
void ew_unbind(struct ew *w);

/* Close the fds and free (unbound). NULL ok. */
void ew_destroy(struct ew *w);

/*
 * The calling thread's count of synchronous device round trips (io/io.h
 * sio_sync_waits()), for owners that attribute them (engine/disk.h).
 */
uint64_t ew_sync_waits(void);

/* CLOCK_MONOTONIC in ns: the time the engine passes to its scheduler. */
uint64_t ew_now(void);

#endif

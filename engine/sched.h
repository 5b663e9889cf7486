/*
 * The per-disk scheduler: pure policy for what runs next on a disk, with no
 * I/O, no threads and no clock of its own (every time is passed in, as
 * CLOCK_MONOTONIC nanoseconds).
 *
 * The disk engine (engine/disk.c) feeds it events (a guest request was
 * submitted, the guest's work drained, a stream started or ended, the
 * stream's I/O went in flight or drained, the copy-on-read mode changed)
 * and asks it for decisions:
 *  - the stream's limits now: full depth (0, 0: the stream's own values)
 *    while the guest is quiet, SCHED_STREAM_INFLIGHT extents of at most
 *    SCHED_STREAM_EXTENT bytes when it was busy within SCHED_GUEST_RECENT_NS;
 *  - whether the stream may issue now or must wait until a given time: after
 *    each burst of stream I/O drains, a busy guest gets a gap of
 *    SCHED_GAP_FACTOR times the burst's duration, clamped to
 *    [SCHED_GAP_MIN_NS, SCHED_GAP_MAX_NS]; once it is over the stream issues
 *    again whatever the guest does, so it always finishes;
 *  - copy-on-read: on for SIPHON_COR_ON, or SIPHON_COR_AUTO while a stream
 *    runs; it may yield to guest load only while a stream runs (the stream
 *    copies those clusters anyway).
 *
 * The guest is busy from a submission until the engine reports its work
 * drained (nothing in flight or waiting, copy-on-read included), and for
 * SCHED_GUEST_RECENT_NS after the last submission.
 *
 * Threads: none; the owner serializes calls.
 */
#ifndef SIPHON_ENGINE_SCHED_H
#define SIPHON_ENGINE_SCHED_H

#include <stdbool.h>
#include <stdint.h>

/*
 * Guest activity this recent keeps the stream at a low queue depth. One
 * extent of 64 KiB (one cluster of the default size) at a time: a guest
 * read that queues behind it on the device waits for 64 KiB, not 256 KiB.
 * Measured 2026-12-02 (bench/README.md): 256 KiB gave a streaming p99 of
 * 1.7-2.3x idle on that day's disk, 64 KiB 0.9-1.1x, and the stream still
 * finished within a second of the 256 KiB runs.
 */
#define SCHED_GUEST_RECENT_NS (50ull * 1000 * 1000)
#define SCHED_STREAM_INFLIGHT 1
#define SCHED_STREAM_EXTENT (64u * 1024)
#define SCHED_GAP_FACTOR 4
#define SCHED_GAP_MIN_NS (2ull * 1000 * 1000)
#define SCHED_GAP_MAX_NS (20ull * 1000 * 1000)

/* Copy-on-read modes: the values of SIPHON_COR_AUTO/ON/OFF (siphon.h). */
enum sched_cor_mode {
	SCHED_COR_AUTO = 0,
	SCHED_COR_ON = 1,
	SCHED_COR_OFF = 2,
};

struct sched {
	int cor_mode; /* enum sched_cor_mode */
	bool guest_active; /* submitted since the last drain */
	bool guest_seen; /* guest_last is valid */
	uint64_t guest_last; /* last submission */
	bool stream; /* a stream exists */
	bool stream_io; /* the stream's I/O is in flight ... */
	uint64_t stream_t0; /* ... since then */
	uint64_t stream_next; /* no new stream I/O before (busy guest) */
};

/* Limits for the stream (0: the stream's own value). */
struct sched_limits {
	unsigned max_inflight;
	uint64_t extent_bytes;
};

/* Copy-on-read as guest_set_cor() takes it. */
struct sched_cor {
	bool on;
	bool may_yield;
};

/* A quiet disk: no guest activity, no stream, copy-on-read AUTO. */
void sched_init(struct sched *s);

/* Events. */
/* A guest request was submitted at now. */
void sched_guest_submitted(struct sched *s, uint64_t now);
/* Every guest request submitted so far has completed (all its work). */
void sched_guest_drained(struct sched *s);
void sched_stream_started(struct sched *s);
void sched_stream_ended(struct sched *s);
/* The stream has I/O in flight (from now); repeated calls are no-ops. */
void sched_stream_io_started(struct sched *s, uint64_t now);
/* The stream's I/O drained at now: a busy guest gets its gap. No-op twice. */
void sched_stream_io_drained(struct sched *s, uint64_t now);
/* mode: enum sched_cor_mode; other values are ignored. */
void sched_set_cor_mode(struct sched *s, int mode);

/* Decisions. */
/* The guest counts as busy at now. */
bool sched_guest_busy(const struct sched *s, uint64_t now);
/* The stream's limits at now. */
struct sched_limits sched_stream_limits(const struct sched *s, uint64_t now);
/*
 * Whether the stream may issue new I/O at now. false: not before *until
 * (set only then). An aborting stream may always go on (to wind down).
 */
bool sched_stream_may_issue(const struct sched *s, uint64_t now, bool aborting,
			    uint64_t *until);
/* The copy-on-read setting that follows from the mode and the stream. */
struct sched_cor sched_cor(const struct sched *s);

#endif

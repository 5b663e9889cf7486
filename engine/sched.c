/*
 * The per-disk scheduler (see sched.h): guest first, the stream paced
 * against guest load, copy-on-read from the mode.
 *
 * Invariants: stream_io is true only while a stream exists; stream_next is
 * set only when a burst drains and only ever moves forward in time.
 */
#include "engine/sched.h"

void sched_init(struct sched *s)
{
	*s = (struct sched){.cor_mode = SCHED_COR_AUTO};
}

void sched_guest_submitted(struct sched *s, uint64_t now)
{
	s->guest_active = true;
	s->guest_seen = true;
	s->guest_last = now;
}

void sched_guest_drained(struct sched *s)
{
	s->guest_active = false;
}

void sched_stream_started(struct sched *s)
{
	s->stream = true;
	s->stream_io = false;
	s->stream_next = 0;
}

void sched_stream_ended(struct sched *s)
{
	s->stream = false;
	s->stream_io = false;
}

void sched_stream_io_started(struct sched *s, uint64_t now)
{
	if (!s->stream || s->stream_io)
		return;
	s->stream_io = true;
	s->stream_t0 = now;
}

void sched_stream_io_drained(struct sched *s, uint64_t now)
{
	uint64_t gap;

	if (!s->stream_io)
		return;
	/* The burst just drained: the guest gets a gap in proportion. */
	s->stream_io = false;
	gap = now > s->stream_t0 ? (now - s->stream_t0) * SCHED_GAP_FACTOR : 0;
	if (gap < SCHED_GAP_MIN_NS)
		gap = SCHED_GAP_MIN_NS;
	else if (gap > SCHED_GAP_MAX_NS)
		gap = SCHED_GAP_MAX_NS;
	s->stream_next = now + gap;
}

void sched_set_cor_mode(struct sched *s, int mode)
{
	if (mode == SCHED_COR_AUTO || mode == SCHED_COR_ON ||
	    mode == SCHED_COR_OFF)
		s->cor_mode = mode;
}

bool sched_guest_busy(const struct sched *s, uint64_t now)
{
	if (s->guest_active)
		return true;
	return s->guest_seen && now - s->guest_last < SCHED_GUEST_RECENT_NS;
}

struct sched_limits sched_stream_limits(const struct sched *s, uint64_t now)
{
	struct sched_limits l = {0, 0};

	if (sched_guest_busy(s, now)) {
		l.max_inflight = SCHED_STREAM_INFLIGHT;
		l.extent_bytes = SCHED_STREAM_EXTENT;
	}
	return l;
}

bool sched_stream_may_issue(const struct sched *s, uint64_t now, bool aborting,
			    uint64_t *until)
{
	if (aborting || s->stream_io || now >= s->stream_next ||
	    !sched_guest_busy(s, now))
		return true;
	*until = s->stream_next;
	return false;
}

struct sched_cor sched_cor(const struct sched *s)
{
	struct sched_cor c;

	c.on = s->cor_mode == SCHED_COR_ON ||
	       (s->cor_mode == SCHED_COR_AUTO && s->stream);
	c.may_yield = s->stream;
	return c;
}

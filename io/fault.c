/*
 * Fault injection for tests: rules that make matching reads or writes fail
 * with a chosen errno. See sio_fault_add() in io.h and fault.h.
 *
 * Invariants:
 *  - The rule list is only touched under fault_lock; nr_rules mirrors its
 *    length so that the common case (no rules) costs one atomic load.
 *  - The library never reads the environment: a test adds rules, and the
 *    siphon tool adds those of its SIPHON_FAULT (sio_fault_parse()).
 *  - A rule with count 0 fails every matching request; otherwise it fails
 *    count of them and is removed. A rule with len 0 reaches to end of file.
 *  - A delay rule (delay_ns > 0, no errno) holds the requests it matches
 *    instead of failing them; it counts down like the others. `delayed`
 *    counts the requests held right now, sync and queued.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/error.h"
#include "io/fault.h"
#include "io/io.h"

struct fault_rule {
	enum sio_op op;
	char *suffix;
	uint64_t off;
	uint64_t len; /* 0: to end of file */
	int err; /* positive */
	unsigned count; /* 0: forever */
	unsigned after;
	uint64_t delay_ns; /* a delay rule: hold, do not fail */
	struct fault_rule *next;
};

static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fault_rule *rules;
static atomic_uint nr_rules;
static atomic_uint delayed; /* requests held by a delay rule right now */
static _Atomic uint64_t delays; /* holds ever started */

static const struct {
	const char *name;
	int err;
} errno_names[] = {
	{"EIO", EIO},
	{"ENOSPC", ENOSPC},
	{"EINVAL", EINVAL},
	{"EPERM", EPERM},
	{"EACCES", EACCES},
	{"ENOMEM", ENOMEM},
	{"EAGAIN", EAGAIN},
	{"EINTR", EINTR},
	{"EROFS", EROFS},
	{"EFBIG", EFBIG},
	{"EDQUOT", EDQUOT},
	{"ENXIO", ENXIO},
	{"ENODEV", ENODEV},
	{"EBADF", EBADF},
	{"EBUSY", EBUSY},
	{"EFAULT", EFAULT},
	{"ETIMEDOUT", ETIMEDOUT},
	{"ECANCELED", ECANCELED},
	{"EOPNOTSUPP", EOPNOTSUPP},
	{"ENOTSUP", ENOTSUP},
	{"ESTALE", ESTALE},
	{"EREMOTEIO", EREMOTEIO},
	{"ENODATA", ENODATA},
	{"EOVERFLOW", EOVERFLOW},
	{"EILSEQ", EILSEQ},
	{"ENOENT", ENOENT},
};

static void free_rules(struct fault_rule *r)
{
	struct fault_rule *next;

	for (; r; r = next) {
		next = r->next;
		free(r->suffix);
		free(r);
	}
}

/* Append a list of rules, keeping their order. Caller holds no lock. */
static void append_rules(struct fault_rule *list)
{
	struct fault_rule **pp, *r;
	unsigned n = 0;

	for (r = list; r; r = r->next)
		n++;
	pthread_mutex_lock(&fault_lock);
	for (pp = &rules; *pp; pp = &(*pp)->next)
		;
	*pp = list;
	atomic_fetch_add(&nr_rules, n);
	pthread_mutex_unlock(&fault_lock);
}

static struct fault_rule *new_rule(enum sio_op op, const char *suffix,
				   size_t suffix_len, uint64_t off,
				   uint64_t len, int err, unsigned count,
				   unsigned after)
{
	struct fault_rule *r;

	r = calloc(1, sizeof(*r));
	if (!r)
		return NULL;
	r->suffix = strndup(suffix, suffix_len);
	if (!r->suffix) {
		free(r);
		return NULL;
	}
	r->op = op;
	r->off = off;
	r->len = len;
	r->err = err;
	r->count = count;
	r->after = after;
	return r;
}

static int parse_u64(const char *s, size_t n, uint64_t *out)
{
	char buf[32], *end;
	unsigned long long v;

	if (n == 0 || n >= sizeof(buf) || s[0] == '-' || s[0] == '+')
		return -EINVAL;
	memcpy(buf, s, n);
	buf[n] = '\0';
	errno = 0;
	v = strtoull(buf, &end, 0);
	if (errno || *end)
		return -EINVAL;
	*out = v;
	return 0;
}

static int parse_errno(const char *s, size_t n, int *out)
{
	uint64_t v;
	size_t i;

	for (i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++) {
		if (strlen(errno_names[i].name) == n &&
		    !strncmp(errno_names[i].name, s, n)) {
			*out = errno_names[i].err;
			return 0;
		}
	}
	if (parse_u64(s, n, &v) < 0 || v == 0 || v > 4095)
		return -EINVAL;
	*out = (int)v;
	return 0;
}

/*
 * One "read|write:SUFFIX:OFF:LEN:ERRNO[:COUNT[:AFTER]]" of n bytes at s;
 * ERRNO may instead be "delayMS" (a delay rule of MS milliseconds, 1 to
 * 60000; no AFTER).
 */
static int parse_rule(const char *s, size_t n, struct fault_rule **out)
{
	const char *field[7];
	size_t flen[7];
	unsigned nf = 0;
	const char *p = s, *end = s + n, *colon;
	uint64_t off, len, count = 0, after = 0, ms = 0;
	enum sio_op op;
	int err = 0;

	do {
		colon = memchr(p, ':', (size_t)(end - p));
		field[nf] = p;
		flen[nf] = colon ? (size_t)(colon - p) : (size_t)(end - p);
		nf++;
		if (colon)
			p = colon + 1; /* NULL + 1 is undefined (UBSan) */
	} while (colon && nf < 7);
	if (nf < 5 || colon)
		return -EINVAL;
	if (flen[0] == 4 && !strncmp(field[0], "read", 4))
		op = SIO_OP_READ;
	else if (flen[0] == 5 && !strncmp(field[0], "write", 5))
		op = SIO_OP_WRITE;
	else
		return -EINVAL;
	if (parse_u64(field[2], flen[2], &off) < 0 ||
	    parse_u64(field[3], flen[3], &len) < 0)
		return -EINVAL;
	if (flen[4] > 5 && !strncmp(field[4], "delay", 5)) {
		if (parse_u64(field[4] + 5, flen[4] - 5, &ms) < 0 || !ms ||
		    ms > 60000 || nf > 6)
			return -EINVAL;
	} else if (parse_errno(field[4], flen[4], &err) < 0) {
		return -EINVAL;
	}
	if (nf > 5 &&
	    (parse_u64(field[5], flen[5], &count) < 0 || count > UINT32_MAX))
		return -EINVAL;
	if (nf > 6 &&
	    (parse_u64(field[6], flen[6], &after) < 0 || after > UINT32_MAX))
		return -EINVAL;
	*out = new_rule(op, field[1], flen[1], off, len, err, (unsigned)count,
			(unsigned)after);
	if (*out && ms)
		(*out)->delay_ns = ms * 1000000ull;
	return *out ? 0 : -ENOMEM;
}

static int parse_spec(const char *spec, struct fault_rule **out)
{
	struct fault_rule *head = NULL, **tail = &head, *r;
	const char *p = spec, *semi;
	size_t n;
	int ret = 0;

	while (*p) {
		semi = strchr(p, ';');
		n = semi ? (size_t)(semi - p) : strlen(p);
		if (n) {
			ret = parse_rule(p, n, &r);
			if (ret < 0)
				goto out;
			*tail = r;
			tail = &r->next;
		}
		if (!semi)
			break;
		p = semi + 1;
	}
out:
	if (ret < 0) {
		free_rules(head);
		head = NULL;
	}
	*out = head;
	return ret;
}

int sio_fault_parse(const char *spec)
{
	struct fault_rule *list;
	int ret;

	if (!spec)
		return -EINVAL;
	ret = parse_spec(spec, &list);
	if (ret == 0)
		append_rules(list);
	return ret;
}

int sio_fault_add(enum sio_op op, const char *path_suffix, uint64_t off,
		  uint64_t len, int err, unsigned count, unsigned after)
{
	struct fault_rule *r;

	if ((op != SIO_OP_READ && op != SIO_OP_WRITE) || !path_suffix ||
	    err == 0 || err == INT32_MIN)
		return -EINVAL;
	r = new_rule(op, path_suffix, strlen(path_suffix), off, len, abs(err),
		     count, after);
	if (!r)
		return -ENOMEM;
	append_rules(r);
	return 0;
}

int sio_fault_add_delay(enum sio_op op, const char *path_suffix, uint64_t off,
			uint64_t len, uint64_t delay_ns, unsigned count)
{
	struct fault_rule *r;

	if ((op != SIO_OP_READ && op != SIO_OP_WRITE) || !path_suffix ||
	    delay_ns == 0)
		return -EINVAL;
	r = new_rule(op, path_suffix, strlen(path_suffix), off, len, 0, count,
		     0);
	if (!r)
		return -ENOMEM;
	r->delay_ns = delay_ns;
	append_rules(r);
	return 0;
}

unsigned sio_fault_delayed(void)
{
	return atomic_load(&delayed);
}

uint64_t sio_fault_delays(void)
{
	return atomic_load(&delays);
}

void sio_fault_release(void)
{
	atomic_fetch_sub(&delayed, 1);
}

void sio_fault_clear(void)
{
	struct fault_rule *list;

	pthread_mutex_lock(&fault_lock);
	list = rules;
	rules = NULL;
	atomic_store(&nr_rules, 0);
	pthread_mutex_unlock(&fault_lock);
	free_rules(list);
}

/* off + len, or UINT64_MAX for a rule to end of file or on overflow. */
static uint64_t sat_end(uint64_t off, uint64_t len)
{
	return (len == 0 || off + len < off) ? UINT64_MAX : off + len;
}

static bool rule_matches(const struct fault_rule *r, const char *path,
			 size_t path_len, enum sio_op op, uint64_t off,
			 uint64_t len)
{
	size_t slen = strlen(r->suffix);

	if (r->op != op || slen > path_len ||
	    strcmp(path + path_len - slen, r->suffix))
		return false;
	return off < sat_end(r->off, r->len) && r->off < sat_end(off, len);
}

/*
 * Consume one use of rule r (at *pp), removing it after its last. Returns
 * whether it was removed.
 */
static bool rule_used(struct fault_rule **pp, struct fault_rule *r)
{
	if (!r->count || --r->count)
		return false;
	*pp = r->next;
	free(r->suffix);
	free(r);
	atomic_fetch_sub(&nr_rules, 1);
	return true;
}

int sio_fault_check_delay(const struct sio_file *f, enum sio_op op,
			  uint64_t off, uint64_t len, uint64_t *delay_ns)
{
	struct fault_rule **pp, *r;
	uint64_t delay = 0;
	size_t path_len;
	int err = 0;

	*delay_ns = 0;
	if (len == 0 || atomic_load(&nr_rules) == 0)
		return 0;
	path_len = strlen(f->path);
	pthread_mutex_lock(&fault_lock);
	for (pp = &rules; (r = *pp);) {
		if (!rule_matches(r, f->path, path_len, op, off, len) ||
		    (r->delay_ns && delay)) {
			pp = &r->next;
			continue;
		}
		if (r->after) {
			/* This request passes this rule; later rules decide. */
			r->after--;
			pp = &r->next;
			continue;
		}
		if (r->delay_ns) {
			/* Held, then later rules decide whether it fails. */
			delay = r->delay_ns;
			if (!rule_used(pp, r))
				pp = &r->next;
			continue;
		}
		err = r->err;
		(void)rule_used(pp, r);
		break;
	}
	if (delay && !err) {
		atomic_fetch_add(&delayed, 1);
		atomic_fetch_add(&delays, 1);
		*delay_ns = delay;
	}
	pthread_mutex_unlock(&fault_lock);
	if (err)
		err = sx_error(err,
			       "%s: %s of %" PRIu64 " bytes at offset %" PRIu64
			       ": %s (injected fault)",
			       f->path, op == SIO_OP_READ ? "read" : "write",
			       len, off, strerror(err));
	return err;
}

int sio_fault_check(const struct sio_file *f, enum sio_op op, uint64_t off,
		    uint64_t len)
{
	struct timespec ts;
	uint64_t delay;
	int ret;

	ret = sio_fault_check_delay(f, op, off, len, &delay);
	if (delay) {
		/* A synchronous caller waits: that is what the rule models. */
		ts.tv_sec = (time_t)(delay / 1000000000u);
		ts.tv_nsec = (long)(delay % 1000000000u);
		while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
			;
		sio_fault_release();
	}
	return ret;
}

/*
 * Error reporting without printing.
 *
 * Library code returns -errno. Where a human needs more than strerror() (which
 * path, which field, which feature bit), the failing function also records a
 * message with sx_error(); the message is per thread, like errno, and the last
 * one recorded on a thread wins. Tools print it; the public API hands it out
 * through siphon_get_error().
 */
#ifndef SIPHON_COMMON_ERROR_H
#define SIPHON_COMMON_ERROR_H

#define SX_ERROR_MAX 1024

/*
 * Record a message for this thread and return -abs(err), so a failure reads
 * `return sx_error(-EINVAL, "%s: bad magic", path);`. err must be non-zero.
 */
int sx_error(int err, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* The message recorded last on this thread, "" if none. Never NULL. */
const char *sx_last_error(void);

/* The errno recorded with the last message on this thread (positive), or 0. */
int sx_last_errno(void);

/* Forget this thread's message. */
void sx_error_clear(void);

#endif

/*
 * Per-thread error messages: see error.h. A message is truncated to
 * SX_ERROR_MAX - 1 bytes; it never allocates, so it works under ENOMEM.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "error.h"

static _Thread_local char last_msg[SX_ERROR_MAX];
static _Thread_local int last_errno;

int sx_error(int err, const char *fmt, ...)
{
	va_list ap;

	err = abs(err);
	va_start(ap, fmt);
	vsnprintf(last_msg, sizeof(last_msg), fmt, ap);
	va_end(ap);
	last_errno = err;
	return -err;
}

const char *sx_last_error(void)
{
	return last_msg;
}

int sx_last_errno(void)
{
	return last_errno;
}

void sx_error_clear(void)
{
	last_msg[0] = '\0';
	last_errno = 0;
}

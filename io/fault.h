/*
 * Fault injection, private to io/: the hook that file.c and queue.c call
 * before they issue a read or a write. See sio_fault_add() in io.h.
 */
#ifndef SIPHON_IO_FAULT_H
#define SIPHON_IO_FAULT_H

#include <stdint.h>

#include "io/io.h"

/*
 * 0 when the request may go ahead, or -err when a rule says it fails (the
 * rule's count is consumed). A delay rule that matches makes the calling
 * thread sleep first (the synchronous helpers' view of a slow device). Records a message naming the path. The first
 * call in the process loads SIPHON_FAULT; a malformed SIPHON_FAULT makes
 * every read and write fail with -EINVAL, so a typo cannot pass a test.
 * Thread safe.
 */
int sio_fault_check(const struct sio_file *f, enum sio_op op, uint64_t off,
		    uint64_t len);

/*
 * sio_fault_check() for a caller that holds a delayed request itself: a
 * matching delay rule sets *delay_ns (else 0) instead of sleeping, and the
 * request counts in sio_fault_delayed() until the caller calls
 * sio_fault_release() when the hold ends. Not delayed when it fails.
 */
int sio_fault_check_delay(const struct sio_file *f, enum sio_op op,
			  uint64_t off, uint64_t len, uint64_t *delay_ns);

/* A hold that sio_fault_check_delay() reported is over. */
void sio_fault_release(void);

#endif

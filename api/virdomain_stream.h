/*
 * The block-streaming API of the design proposal (version 3), with its exact
 * names and types, as thin inline wrappers over siphon.h. Opt-in: include
 * this header instead of (or besides) siphon.h; it exports no symbols.
 *
 * virDomainPtr is a siphon domain (siphon_domain_create()), disks are
 * attached with siphon_disk_attach() and named by the path given there.
 *
 * Errors: every function returns -1 on failure and sets errno to the
 * positive errno of the siphon call (see siphon.h for the list per
 * function); siphon_get_error() gives the message, on the calling thread.
 *
 * Incremental streaming and `end`: the first call, with *cursor == 0, opens
 * the disk's incremental stream and returns its start cursor without copying
 * anything; from then on virDomainGetBlockStreamInfo lists the disk with the
 * stream's `end`. Each later call copies a bounded step and advances the
 * cursor; the call that makes *cursor equal `end` finalizes the disk (its
 * backing is dropped) and the disk leaves the info list:
 *
 *	virDomainBlockStreamCursor cur = 0, end;
 *	virDomainBlockStream(dom, path, &cur, 0);	// open: learn end
 *	end = <the entry for path from virDomainGetBlockStreamInfo>.end;
 *	while (cur != end)
 *		if (virDomainBlockStream(dom, path, &cur, 0) < 0)
 *			break;
 *
 * (A disk of zero clusters is finalized by the opening call itself and is
 * then not listed: its cursor is already the end.)
 */
#ifndef VIRDOMAIN_STREAM_H
#define VIRDOMAIN_STREAM_H

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "siphon.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
	VIR_DOMAIN_BLOCK_STREAM_CONTINUOUS = 1,
} virDomainStreamDiskFlags;

#define VIR_DOMAIN_BLOCK_STREAM_PATH_MAX 1024

typedef unsigned long long virDomainBlockStreamCursor;

struct _virDomainBlockStreamInfo {
	char path[VIR_DOMAIN_BLOCK_STREAM_PATH_MAX];
	virDomainBlockStreamCursor cur; /* 0 <= cur <= end; cur/end
					   approximates progress */
	virDomainBlockStreamCursor end; /* final cursor position: completion */
};
typedef struct _virDomainBlockStreamInfo virDomainBlockStreamInfo;
typedef virDomainBlockStreamInfo *virDomainBlockStreamInfoPtr;

typedef siphon_domain *virDomainPtr;

/* -1 with errno set from a negative siphon return; the value otherwise. */
static inline int vir_domain_stream_ret_(int ret)
{
	if (ret < 0) {
		errno = -ret;
		return -1;
	}
	return ret;
}

/*
 * With VIR_DOMAIN_BLOCK_STREAM_CONTINUOUS, start streaming the whole disk in
 * the background (cursor may be NULL); otherwise stream one increment from
 * *cursor and store the position for the next call. 0 on success, -1.
 */
static inline int virDomainBlockStream(virDomainPtr dom, const char *path,
				       virDomainBlockStreamCursor *cursor,
				       unsigned int flags)
{
	uint64_t cur = cursor ? (uint64_t)*cursor : 0;
	int ret;

	ret = siphon_block_stream(dom, path, cursor ? &cur : NULL, flags);
	if (ret >= 0 && cursor)
		*cursor = (virDomainBlockStreamCursor)cur;
	return vir_domain_stream_ret_(ret < 0 ? ret : 0);
}

/* Cancel the disk's stream and wait until it stopped. flags: 0. 0 or -1. */
static inline int virDomainBlockStreamAbort(virDomainPtr dom, const char *path,
					    unsigned int flags)
{
	return vir_domain_stream_ret_(
		siphon_block_stream_abort(dom, path, flags));
}

/*
 * Fill up to nr_results entries for the domain's active streams; return how
 * many were stored (the proposal's contract: at most nr_results), or -1.
 */
static inline int virDomainGetBlockStreamInfo(virDomainPtr dom,
					      virDomainBlockStreamInfoPtr info,
					      unsigned int nr_results,
					      unsigned int flags)
{
	struct siphon_block_stream_info *tmp = NULL;
	int ret, i, n;

	if (nr_results) {
		if (!info)
			return vir_domain_stream_ret_(
				siphon_get_block_stream_info(dom, NULL, 1,
							     flags));
		/* Same layout, different types: copy, do not alias. */
		tmp = (struct siphon_block_stream_info *)calloc(nr_results,
								sizeof(*tmp));
		if (!tmp) {
			errno = ENOMEM;
			return -1;
		}
	}
	ret = siphon_get_block_stream_info(dom, tmp, nr_results, flags);
	if (ret < 0) {
		free(tmp);
		return vir_domain_stream_ret_(ret);
	}
	n = ret < (int)nr_results ? ret : (int)nr_results;
	for (i = 0; i < n; i++) {
		memcpy(info[i].path, tmp[i].path, sizeof(info[i].path));
		info[i].cur = (virDomainBlockStreamCursor)tmp[i].cur;
		info[i].end = (virDomainBlockStreamCursor)tmp[i].end;
	}
	free(tmp);
	return n;
}

#ifdef __cplusplus
}
#endif

#endif

/*
 * api/virdomain_stream.h compiles alone under strict C, with the proposal's
 * names and types exactly.
 */
#include "virdomain_stream.h"

int main(void)
{
	virDomainBlockStreamInfo info;
	virDomainBlockStreamInfoPtr p = &info;
	virDomainBlockStreamCursor cur = 0;
	virDomainStreamDiskFlags f = VIR_DOMAIN_BLOCK_STREAM_CONTINUOUS;
	virDomainPtr dom = 0;
	int (*s)(virDomainPtr, const char *, virDomainBlockStreamCursor *,
		 unsigned int) = virDomainBlockStream;
	int (*a)(virDomainPtr, const char *, unsigned int) =
		virDomainBlockStreamAbort;
	int (*g)(virDomainPtr, virDomainBlockStreamInfoPtr, unsigned int,
		 unsigned int) = virDomainGetBlockStreamInfo;

	(void)dom;
	(void)s;
	(void)a;
	(void)g;
	(void)cur;
	return sizeof(p->path) == VIR_DOMAIN_BLOCK_STREAM_PATH_MAX && f == 1
		       ? 0
		       : 1;
}

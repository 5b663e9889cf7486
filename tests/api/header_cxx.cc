// Both public headers compile from C++ (-pedantic -Wall -Wextra -Werror).
#include "siphon.h"
#include "virdomain_stream.h"

int main()
{
	virDomainBlockStreamInfo info = {};
	siphon_block_stream_info_ex x = {};
	siphon_domain *dom = nullptr;
	int (*s)(virDomainPtr, const char *, virDomainBlockStreamCursor *,
		 unsigned int) = virDomainBlockStream;

	(void)dom;
	(void)s;
	x.size = sizeof(x);
	return info.cur == 0 && x.size == sizeof(x) ? 0 : 1;
}

/*
 * api/siphon.h compiles alone under strict C (-std=c11 -pedantic -Wall
 * -Wextra -Werror): nothing before it, nothing after it but a use of each
 * type so that a broken declaration cannot hide.
 */
#include "siphon.h"

int main(void)
{
	struct siphon_domain_opts o = {sizeof(o), 0, 0, 0, 0, 0};
	struct siphon_block_stream_info i;
	struct siphon_block_stream_info_ex x;
	struct siphon_event e;
	struct siphon_block_stream_params p;
	struct siphon_attach_opts a;
	siphon_domain *dom = 0;

	(void)i;
	(void)x;
	(void)e;
	(void)p;
	(void)a;
	(void)dom;
	return o.size == sizeof(o) && SIPHON_PATH_MAX == 1024 ? 0 : 1;
}

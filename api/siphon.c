/*
 * The public entry points of libsiphon that do not belong to a domain.
 */
#include "siphon.h"
#include "common/error.h"

SIPHON_API int siphon_version(void)
{
	return SIPHON_VERSION_MAJOR * 10000 + SIPHON_VERSION_MINOR * 100 +
	       SIPHON_VERSION_PATCH;
}

SIPHON_API const char *siphon_get_error(void)
{
	return sx_last_error();
}

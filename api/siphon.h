/*
 * siphon — stream disk images from their backing chain into the local image.
 *
 * Public API. Every function returns int: >= 0 on success, -errno on
 * failure. A failing call also records a message for the calling thread,
 * read with siphon_get_error().
 */
#ifndef SIPHON_H
#define SIPHON_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define SIPHON_API __attribute__((visibility("default")))
#else
#define SIPHON_API
#endif

#define SIPHON_VERSION_MAJOR 0
#define SIPHON_VERSION_MINOR 1
#define SIPHON_VERSION_PATCH 0

/*
 * The library's version as MAJOR * 10000 + MINOR * 100 + PATCH. Thread safe.
 */
SIPHON_API int siphon_version(void);

/*
 * The message recorded by the last failing siphon call on this thread ("" if
 * none). The pointer is valid until the next siphon call on this thread.
 * Thread safe: each thread has its own message.
 */
SIPHON_API const char *siphon_get_error(void);

#ifdef __cplusplus
}
#endif

#endif

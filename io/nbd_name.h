/*
 * Names of NBD exports as QEMU writes them in backing file names (issue 12).
 *
 * A backing layer on an NBD server is named, in an overlay's header, by one
 * of the forms QEMU reads and writes:
 *   nbd://HOST[:PORT]/[EXPORT]            TCP (port 10809 by default)
 *   nbd+tcp://HOST[:PORT]/[EXPORT]        the same
 *   nbd+unix:///[EXPORT]?socket=PATH      a Unix socket
 *   json:{...}                            QEMU's pseudo-protocol, an NBD
 *                                         "file" node, flattened or nested
 * Such a name is never resolved relative to the overlay's directory. A name
 * with something this engine does not understand (an unknown query
 * parameter, a TLS option, a driver other than nbd) is refused with a
 * message, never half-understood.
 *
 * Threads: none; pure functions.
 */
#ifndef SIPHON_IO_NBD_NAME_H
#define SIPHON_IO_NBD_NAME_H

#include <stdbool.h>

enum sio_nbd_transport {
	SIO_NBD_TCP,
	SIO_NBD_UNIX,
};

/* Where an export is. Strings are owned (sio_nbd_addr_free()). */
struct sio_nbd_addr {
	enum sio_nbd_transport transport;
	char *host; /* TCP: host name or address (IPv6 without brackets) */
	char *port; /* TCP: decimal port, "10809" when the name had none */
	char *socket; /* UNIX: the socket's path */
	char *export_name; /* "" when the name had none */
};

/*
 * Whether name is an NBD name by its form (nbd:, nbd+tcp:, nbd+unix: or
 * json: prefix), valid or not: such a name is never a local path.
 */
bool sio_nbd_name_is_remote(const char *name);

/*
 * Parse name into *out. Returns 0, -EINVAL with a message (sx_error())
 * saying what is wrong (TLS options say that TLS is not supported yet), or
 * -ENOMEM. *out is untouched on failure; on success the caller frees it
 * with sio_nbd_addr_free(). Also refused: a socket path longer than a
 * sockaddr_un holds (107 bytes) and an export name longer than NBD's 4096.
 */
int sio_nbd_name_parse(const char *name, struct sio_nbd_addr *out);

/*
 * The canonical URI of a (nbd://HOST:PORT/EXPORT, an IPv6 HOST in [...], or
 * nbd+unix:///EXPORT?socket=PATH, percent-encoded where needed): malloc'd,
 * NULL without memory, or when a lacks a field its transport needs (an
 * address sio_nbd_name_parse() filled always has them). Parsing it gives a
 * back. The caller frees it.
 */
char *sio_nbd_addr_uri(const struct sio_nbd_addr *a);

/* Free the strings of a (not a itself). NULL ok. */
void sio_nbd_addr_free(struct sio_nbd_addr *a);

#endif

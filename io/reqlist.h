/*
 * Lists of requests threaded through sio_req._next (a head and a tail),
 * private to io/: the queue's backlog and finished lists, an NBD
 * connection's wait and done lists. A request is on one list at a time.
 */
#ifndef SIPHON_IO_REQLIST_H
#define SIPHON_IO_REQLIST_H

#include <stddef.h>

#include "io/io.h"

/* Append req to the list (head, tail). */
static inline void list_append(struct sio_req **head, struct sio_req **tail,
			       struct sio_req *req)
{
	req->_next = NULL;
	if (*tail)
		(*tail)->_next = req;
	else
		*head = req;
	*tail = req;
}

/* Put req first on the list (head, tail). */
static inline void list_push_front(struct sio_req **head, struct sio_req **tail,
				   struct sio_req *req)
{
	req->_next = *head;
	*head = req;
	if (!*tail)
		*tail = req;
}

/* Unlink and return the list's first request, or NULL. */
static inline struct sio_req *list_pop(struct sio_req **head,
				       struct sio_req **tail)
{
	struct sio_req *req = *head;

	if (req) {
		*head = req->_next;
		if (!*head)
			*tail = NULL;
		req->_next = NULL;
	}
	return req;
}

#endif

/*
 * qemu-compatible OFD image locks: see lock.h.
 *
 * Order matters: the locks are taken first, then the conflicts checked, so
 * two processes racing for the same image cannot both miss each other (each
 * sees at least the other's lock). On a conflict the locks just taken are
 * dropped again.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "common/error.h"
#include "io.h"
#include "lock.h"

#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
#define PERM_BITS 4

static const char *const perm_names[PERM_BITS] = {
	"consistent read",
	"write",
	"write unchanged",
	"resize",
};

static int ofd_lock(int fd, short type, off_t byte)
{
	struct flock fl = {
		.l_type = type,
		.l_whence = SEEK_SET,
		.l_start = byte,
		.l_len = 1,
	};

	if (fcntl(fd, F_OFD_SETLK, &fl) < 0)
		return -errno;
	return 0;
}

/* 1 when another descriptor holds a lock on byte, 0 if not, -errno. */
static int ofd_locked_elsewhere(int fd, off_t byte)
{
	struct flock fl = {
		.l_type = F_WRLCK,
		.l_whence = SEEK_SET,
		.l_start = byte,
		.l_len = 1,
	};

	if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
		return -errno;
	return fl.l_type != F_UNLCK;
}

static bool unsupported(int err)
{
	return err == -EINVAL || err == -ENOLCK || err == -EOPNOTSUPP;
}

/* 0 when nobody else holds byte; else -EBUSY (or -errno) with a message. */
static int check_free(struct sio_file *f, off_t byte, int perm_bit,
		      const char *what)
{
	int ret = ofd_locked_elsewhere(f->fd, byte);

	if (ret > 0)
		return sx_error(
			EBUSY,
			"%s: image is in use: another process %s the \"%s\" permission (a VM, qemu-img or siphon has it open)",
			f->path, what, perm_names[perm_bit]);
	if (ret < 0)
		return sx_error(ret, "%s: cannot test image lock: %s", f->path,
				strerror(-ret));
	return 0;
}

int sio_file_lock(struct sio_file *f, unsigned perm, unsigned unshared)
{
	int i, ret = 0;

	/* An NBD export is the server's to guard; there is no file here. */
	if (f->nbd)
		return 0;

	for (i = 0; i < PERM_BITS && ret == 0; i++) {
		if (perm & (1u << i))
			ret = ofd_lock(f->fd, F_RDLCK, LOCK_PERM_BASE + i);
		if (ret == 0 && (unshared & (1u << i)))
			ret = ofd_lock(f->fd, F_RDLCK, LOCK_SHARED_BASE + i);
	}
	if (ret < 0) {
		if (unsupported(ret))
			return 0;
		ret = sx_error(ret, "%s: cannot take image lock: %s", f->path,
			       strerror(-ret));
		goto undo;
	}
	for (i = 0; i < PERM_BITS && ret == 0; i++) {
		if (perm & (1u << i))
			ret = check_free(f, LOCK_SHARED_BASE + i, i,
					 "refuses to share");
		if (ret == 0 && (unshared & (1u << i)))
			ret = check_free(f, LOCK_PERM_BASE + i, i, "holds");
	}
	if (ret < 0)
		goto undo;
	return 0;
undo:
	for (i = 0; i < PERM_BITS; i++) {
		ofd_lock(f->fd, F_UNLCK, LOCK_PERM_BASE + i);
		ofd_lock(f->fd, F_UNLCK, LOCK_SHARED_BASE + i);
	}
	return ret;
}

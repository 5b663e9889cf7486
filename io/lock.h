/*
 * Image locking that interoperates with qemu.
 *
 * qemu guards images with open-file-description (OFD) byte-range locks:
 * while it holds permission n it keeps a shared lock on byte 100 + n, and
 * while it refuses to share permission n with others it keeps a shared lock
 * on byte 200 + n. A conflict is another descriptor holding the opposite
 * byte: wanting permission n conflicts with someone's 200 + n, refusing n
 * conflicts with someone's 100 + n. Taking the same locks makes qemu and
 * siphon refuse an image the other has open for writing.
 *
 * The locks belong to the open file description, so they go away with the
 * last close of the file and never conflict with the holder's own checks.
 */
#ifndef SIPHON_IO_LOCK_H
#define SIPHON_IO_LOCK_H

struct sio_file;

/* Permission bits, numbered as qemu numbers them. */
enum sio_perm {
	SIO_PERM_CONSISTENT_READ = 1 << 0,
	SIO_PERM_WRITE = 1 << 1,
	SIO_PERM_WRITE_UNCHANGED = 1 << 2,
	SIO_PERM_RESIZE = 1 << 3,
	SIO_PERM_ALL = (1 << 4) - 1,
};

/* What a writer holds and refuses to share (as a qemu writer does). */
#define SIO_LOCK_WRITER_PERM \
	(SIO_PERM_CONSISTENT_READ | SIO_PERM_WRITE | SIO_PERM_RESIZE)
#define SIO_LOCK_WRITER_UNSHARED (SIO_PERM_WRITE | SIO_PERM_RESIZE)
/* What a reader of a backing file holds and refuses to share. */
#define SIO_LOCK_READER_PERM SIO_PERM_CONSISTENT_READ
#define SIO_LOCK_READER_UNSHARED (SIO_PERM_WRITE | SIO_PERM_RESIZE)

/*
 * Take the locks for holding `perm` and refusing `unshared` on f, after
 * checking that nobody else's locks conflict. Returns 0, -EBUSY with a
 * message naming the file and the permission when the image is in use,
 * or -errno. Files whose filesystem refuses OFD locks (-EINVAL, -ENOLCK,
 * -EOPNOTSUPP) are left unlocked, as qemu does, and so are NBD exports
 * (no file here: the server guards its export).
 */
int sio_file_lock(struct sio_file *f, unsigned perm, unsigned unshared);

#endif

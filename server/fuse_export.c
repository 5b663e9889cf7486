/*
 * The FUSE export (fuse_export.h), on libfuse's high-level API.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 35
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "server/fuse_export.h"

#define MAX_FILES 1024
#define BLOCK 512u
#define IO_CHUNK (16u << 20) /* one guest request at most */
#define STATUS_RUNS 256u

struct fx_file {
	char *name;
	siphon_disk *disk;
	uint64_t size;
	bool ro;
	unsigned refs; /* the table's while listed, one per open file */
	pthread_mutex_t rmw; /* unaligned writes, one at a time */
};

struct fuse_export {
	struct fuse *fuse;
	char *mountpoint;
	pthread_t thread;
	bool running;
	nbd_log_fn log;
	void *log_opaque;
	pthread_mutex_t mu; /* files, nfiles, refs */
	struct fx_file *files[MAX_FILES];
	unsigned nfiles;
	time_t t0;
};

#define flog(fx, lv, ...) nbd_logf((fx)->log, (fx)->log_opaque, lv, __VA_ARGS__)

static struct fuse_export *self(void)
{
	return fuse_get_context()->private_data;
}

static void file_put(struct fuse_export *fx, struct fx_file *f)
{
	bool last;

	if (!f)
		return;
	pthread_mutex_lock(&fx->mu);
	last = !--f->refs;
	pthread_mutex_unlock(&fx->mu);
	if (last) {
		siphon_disk_put(f->disk);
		pthread_mutex_destroy(&f->rmw);
		free(f->name);
		free(f);
	}
}

/* "/NAME" -> its file with a reference, or NULL. */
static struct fx_file *lookup(struct fuse_export *fx, const char *path)
{
	struct fx_file *f = NULL;

	if (path[0] != '/')
		return NULL;
	pthread_mutex_lock(&fx->mu);
	for (unsigned i = 0; i < fx->nfiles && !f; i++)
		if (!strcmp(fx->files[i]->name, path + 1))
			f = fx->files[i];
	if (f)
		f->refs++;
	pthread_mutex_unlock(&fx->mu);
	return f;
}

static struct fx_file *opened(struct fuse_file_info *fi)
{
	return (struct fx_file *)(uintptr_t)fi->fh;
}

static int fx_getattr(const char *path, struct stat *st,
		      struct fuse_file_info *fi)
{
	struct fuse_export *fx = self();
	struct fx_file *f;

	(void)fi;
	memset(st, 0, sizeof(*st));
	st->st_uid = getuid();
	st->st_gid = getgid();
	st->st_mtime = st->st_ctime = st->st_atime = fx->t0;
	if (!strcmp(path, "/")) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	}
	f = lookup(fx, path);
	if (!f)
		return -ENOENT;
	st->st_mode = S_IFREG | (f->ro ? 0444 : 0644);
	st->st_nlink = 1;
	st->st_size = (off_t)f->size;
	st->st_blksize = 4096;
	st->st_blocks = (blkcnt_t)((f->size + 511) / 512);
	file_put(fx, f);
	return 0;
}

static int fx_readdir(const char *path, void *buf, fuse_fill_dir_t fill,
		      off_t off, struct fuse_file_info *fi,
		      enum fuse_readdir_flags flags)
{
	struct fuse_export *fx = self();

	(void)off;
	(void)fi;
	(void)flags;
	if (strcmp(path, "/"))
		return -ENOTDIR;
	fill(buf, ".", NULL, 0, 0);
	fill(buf, "..", NULL, 0, 0);
	pthread_mutex_lock(&fx->mu);
	for (unsigned i = 0; i < fx->nfiles; i++)
		fill(buf, fx->files[i]->name, NULL, 0, 0);
	pthread_mutex_unlock(&fx->mu);
	return 0;
}

static int fx_open(const char *path, struct fuse_file_info *fi)
{
	struct fx_file *f = lookup(self(), path);

	if (!f)
		return -ENOENT;
	if (f->ro && (fi->flags & O_ACCMODE) != O_RDONLY) {
		file_put(self(), f);
		return -EROFS;
	}
	fi->fh = (uint64_t)(uintptr_t)f;
	/* The kernel caches pages; a VMM's O_DIRECT goes straight here. */
	fi->keep_cache = 0;
	return 0;
}

static int fx_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	file_put(self(), opened(fi));
	return 0;
}

/* Clip [off, off + *len) to the file: false when nothing is left. */
static bool clip(const struct fx_file *f, off_t off, size_t *len)
{
	if (off < 0 || (uint64_t)off >= f->size)
		return false;
	if (*len > f->size - (uint64_t)off)
		*len = (size_t)(f->size - (uint64_t)off);
	return *len > 0;
}

/* The 512-byte grid around [off, off + len), clipped to the disk. */
static void widen(const struct fx_file *f, uint64_t off, uint64_t len,
		  uint64_t *a, uint64_t *b)
{
	*a = off & ~(uint64_t)(BLOCK - 1);
	*b = (off + len + BLOCK - 1) & ~(uint64_t)(BLOCK - 1);
	if (*b > f->size)
		*b = f->size;
}

static bool aligned(const struct fx_file *f, uint64_t off, uint64_t len)
{
	return !(off % BLOCK) && (!(len % BLOCK) || off + len == f->size);
}

/*
 * The 512-byte blocks around [off, off + len) read into a new buffer
 * (*tmp, from *a): 0 or -errno.
 */
static int read_widened(const struct fx_file *f, uint64_t off, size_t len,
			unsigned flags, uint8_t **tmp, uint64_t *a)
{
	uint64_t b;
	int ret;

	widen(f, off, len, a, &b);
	*tmp = malloc(b - *a);
	if (!*tmp)
		return -ENOMEM;
	ret = siphon_disk_pread(f->disk, *tmp, b - *a, *a, flags);
	if (ret < 0) {
		free(*tmp);
		*tmp = NULL;
	}
	return ret;
}

static int fx_read(const char *path, char *buf, size_t len, off_t off,
		   struct fuse_file_info *fi)
{
	struct fx_file *f = opened(fi);
	uint64_t a;
	uint8_t *tmp;
	int ret;

	(void)path;
	if (!clip(f, off, &len))
		return 0;
	if (len > IO_CHUNK)
		len = IO_CHUNK;
	if (aligned(f, (uint64_t)off, len)) {
		ret = siphon_disk_pread(f->disk, buf, len, (uint64_t)off, 0);
		return ret < 0 ? ret : (int)len;
	}
	ret = read_widened(f, (uint64_t)off, len, 0, &tmp, &a);
	if (ret < 0)
		return ret;
	memcpy(buf, tmp + ((uint64_t)off - a), len);
	free(tmp);
	return (int)len;
}

static int fx_write(const char *path, const char *buf, size_t len, off_t off,
		    struct fuse_file_info *fi)
{
	struct fx_file *f = opened(fi);
	uint64_t a, b;
	uint8_t *tmp;
	int ret;

	(void)path;
	if (f->ro)
		return -EROFS;
	if (off < 0 || (uint64_t)off >= f->size)
		return len ? -ENOSPC : 0;
	if (!clip(f, off, &len))
		return 0;
	if (len > IO_CHUNK)
		len = IO_CHUNK;
	if (aligned(f, (uint64_t)off, len)) {
		ret = siphon_disk_pwrite(f->disk, buf, len, (uint64_t)off, 0);
		return ret < 0 ? ret : (int)len;
	}
	pthread_mutex_lock(&f->rmw);
	ret = read_widened(f, (uint64_t)off, len, SIPHON_IO_NO_COR, &tmp, &a);
	if (ret >= 0) {
		widen(f, (uint64_t)off, len, &a, &b);
		memcpy(tmp + ((uint64_t)off - a), buf, len);
		ret = siphon_disk_pwrite(f->disk, tmp, b - a, a, 0);
		free(tmp);
	}
	pthread_mutex_unlock(&f->rmw);
	return ret < 0 ? ret : (int)len;
}

static int fx_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)path;
	(void)datasync;
	return siphon_disk_flush(opened(fi)->disk, 0);
}

static int fx_flush(const char *path, struct fuse_file_info *fi)
{
	/* close(): nothing to do; fsync makes writes durable. */
	(void)path;
	(void)fi;
	return 0;
}

/*
 * PUNCH_HOLE and ZERO_RANGE: both must read as zeros afterwards, which is
 * write-zeroes (discard leaves partial clusters as they are); the 512-byte
 * blocks cut at the edges are written as zeros.
 */
static int fx_fallocate(const char *path, int mode, off_t off, off_t len,
			struct fuse_file_info *fi)
{
	static const char zeros[2 * BLOCK];
	struct fx_file *f = opened(fi);
	uint64_t a, b, end;
	size_t n = (size_t)len;
	int ret = 0;

	if (f->ro)
		return -EROFS;
	if (off < 0 || len <= 0)
		return -EINVAL;
	/* The file has its size; allocating within it is a no-op. */
	if (!(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)))
		return (uint64_t)off + (uint64_t)len <= f->size ? 0 : -EFBIG;
	if (mode & ~(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE |
		     FALLOC_FL_KEEP_SIZE))
		return -EOPNOTSUPP;
	if (!clip(f, off, &n))
		return 0;
	end = (uint64_t)off + n;
	a = ((uint64_t)off + BLOCK - 1) & ~(uint64_t)(BLOCK - 1);
	b = end == f->size ? end : end & ~(uint64_t)(BLOCK - 1);
	if (b <= a) /* within two blocks: n < 2 * BLOCK */
		return fx_write(path, zeros, n, off, fi) < 0 ? -EIO : 0;
	if (a > (uint64_t)off)
		ret = fx_write(path, zeros, a - (uint64_t)off, off, fi);
	if (ret >= 0 && b < end)
		ret = fx_write(path, zeros, end - b, (off_t)b, fi);
	while (ret >= 0 && a < b) {
		uint64_t step = b - a > IO_CHUNK ? IO_CHUNK : b - a;

		ret = siphon_disk_write_zeroes(f->disk, a, step, 0);
		a += step;
	}
	return ret < 0 ? ret : 0;
}

/* SEEK_DATA / SEEK_HOLE from the chain's block status. */
static off_t fx_lseek(const char *path, off_t off, int whence,
		      struct fuse_file_info *fi)
{
	struct fx_file *f = opened(fi);
	struct siphon_extent ext[STATUS_RUNS];
	uint64_t pos = (uint64_t)off;

	(void)path;
	if (whence != SEEK_DATA && whence != SEEK_HOLE)
		return -EINVAL;
	if (off < 0 || pos >= f->size)
		return -ENXIO;
	while (pos < f->size) {
		uint64_t len = f->size - pos;
		unsigned n = STATUS_RUNS;
		int ret;

		if (len > (1ull << 30))
			len = 1ull << 30;
		ret = siphon_disk_block_status(f->disk, pos, len, 0, ext, &n);
		if (ret < 0)
			return ret;
		for (unsigned i = 0; i < n; i++) {
			bool hole = ext[i].flags & SIPHON_EXTENT_ZERO;

			if (hole == (whence == SEEK_HOLE))
				return (off_t)pos;
			pos += ext[i].len;
		}
	}
	/* No data after off: ENXIO; the end of the file is a hole. */
	return whence == SEEK_DATA ? -ENXIO : (off_t)f->size;
}

static int fx_statfs(const char *path, struct statvfs *st)
{
	(void)path;
	memset(st, 0, sizeof(*st));
	st->f_bsize = 4096;
	st->f_frsize = 4096;
	st->f_namemax = 255;
	return 0;
}

static void *fx_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	(void)conn;
	cfg->use_ino = 0;
	cfg->direct_io = 0;
	/* Sizes never change under the kernel: cache attributes. */
	cfg->attr_timeout = 1;
	cfg->entry_timeout = 1;
	return fuse_get_context()->private_data;
}

static const struct fuse_operations fx_ops = {
	.init = fx_init,
	.getattr = fx_getattr,
	.readdir = fx_readdir,
	.open = fx_open,
	.release = fx_release,
	.read = fx_read,
	.write = fx_write,
	.flush = fx_flush,
	.fsync = fx_fsync,
	.fallocate = fx_fallocate,
	.lseek = fx_lseek,
	.statfs = fx_statfs,
};

static void *loop_thread(void *arg)
{
	struct fuse_export *fx = arg;
	struct fuse_loop_config cfg = {.clone_fd = 0, .max_idle_threads = 8};

	fuse_loop_mt(fx->fuse, &cfg);
	return NULL;
}

int fuse_export_start(const char *mountpoint, nbd_log_fn log, void *opaque,
		      struct fuse_export **out)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	struct fuse_export *fx = calloc(1, sizeof(*fx));
	struct stat st;
	int ret;

	if (!fx)
		return -ENOMEM;
	if (stat(mountpoint, &st) < 0 || !S_ISDIR(st.st_mode)) {
		free(fx);
		return stat(mountpoint, &st) < 0 ? -errno : -ENOTDIR;
	}
	fx->log = log;
	fx->log_opaque = opaque;
	fx->t0 = time(NULL);
	pthread_mutex_init(&fx->mu, NULL);
	fx->mountpoint = strdup(mountpoint);
	if (fuse_opt_add_arg(&args, "siphon") ||
	    fuse_opt_add_arg(&args, "-odefault_permissions") ||
	    fuse_opt_add_arg(&args, "-ofsname=siphon") ||
	    (getuid() == 0 && fuse_opt_add_arg(&args, "-oallow_other"))) {
		fuse_opt_free_args(&args);
		ret = -ENOMEM;
		goto fail;
	}
	fx->fuse = fuse_new(&args, &fx_ops, sizeof(fx_ops), fx);
	fuse_opt_free_args(&args);
	if (!fx->fuse) {
		ret = -EINVAL;
		goto fail;
	}
	if (fuse_mount(fx->fuse, mountpoint) != 0) {
		fuse_destroy(fx->fuse);
		fx->fuse = NULL;
		ret = access("/dev/fuse", R_OK | W_OK) ? -ENODEV : -EPERM;
		goto fail;
	}
	ret = pthread_create(&fx->thread, NULL, loop_thread, fx);
	if (ret) {
		fuse_unmount(fx->fuse);
		fuse_destroy(fx->fuse);
		fx->fuse = NULL;
		ret = -ret;
		goto fail;
	}
	fx->running = true;
	flog(fx, NBD_LOG_INFO, "FUSE file system on %s", mountpoint);
	*out = fx;
	return 0;
fail:
	pthread_mutex_destroy(&fx->mu);
	free(fx->mountpoint);
	free(fx);
	return ret;
}

int fuse_export_add(struct fuse_export *fx, const char *name, siphon_disk *disk,
		    bool read_only)
{
	struct fx_file *f;
	uint64_t size;
	int ret;

	if (!fx || !name || !*name || strchr(name, '/') || !disk)
		return -EINVAL;
	ret = siphon_disk_get_size(disk, &size);
	if (ret < 0)
		return ret;
	f = calloc(1, sizeof(*f));
	if (!f || !(f->name = strdup(name))) {
		free(f);
		return -ENOMEM;
	}
	f->disk = disk;
	f->size = size;
	f->ro = read_only;
	f->refs = 1;
	pthread_mutex_init(&f->rmw, NULL);
	pthread_mutex_lock(&fx->mu);
	ret = fx->nfiles == MAX_FILES ? -ENOSPC : 0;
	for (unsigned i = 0; i < fx->nfiles && !ret; i++)
		if (!strcmp(fx->files[i]->name, name))
			ret = -EEXIST;
	if (!ret)
		fx->files[fx->nfiles++] = f;
	pthread_mutex_unlock(&fx->mu);
	if (ret) {
		pthread_mutex_destroy(&f->rmw);
		free(f->name);
		free(f);
	}
	return ret;
}

int fuse_export_remove(struct fuse_export *fx, const char *name)
{
	struct fx_file *f = NULL;

	if (!fx || !name)
		return -EINVAL;
	pthread_mutex_lock(&fx->mu);
	for (unsigned i = 0; i < fx->nfiles; i++) {
		if (strcmp(fx->files[i]->name, name))
			continue;
		f = fx->files[i];
		fx->files[i] = fx->files[--fx->nfiles];
		break;
	}
	pthread_mutex_unlock(&fx->mu);
	if (!f)
		return -ENOENT;
	file_put(fx, f);
	return 0;
}

void fuse_export_stop(struct fuse_export *fx)
{
	if (!fx)
		return;
	if (fx->running) {
		fuse_exit(fx->fuse);
		/* Unmounting ends the loop's read of /dev/fuse. */
		fuse_unmount(fx->fuse);
		pthread_join(fx->thread, NULL);
		fuse_destroy(fx->fuse);
		flog(fx, NBD_LOG_INFO, "FUSE file system on %s unmounted",
		     fx->mountpoint);
	}
	while (fx->nfiles)
		fuse_export_remove(fx, fx->files[0]->name);
	pthread_mutex_destroy(&fx->mu);
	free(fx->mountpoint);
	free(fx);
}

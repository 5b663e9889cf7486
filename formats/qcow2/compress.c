/*
 * qcow2 compressed clusters: inflate exactly one cluster.
 *
 * The on-disk length of a compressed cluster is only known to the 512-byte
 * sector, so the input usually carries trailing bytes that belong to nothing.
 * Both decoders therefore stop as soon as the output is full and judge
 * success by the output size alone: zlib (raw deflate, window bits -12 as
 * qemu writes it) may end with Z_BUF_ERROR, which is normal here; zstd data is
 * a stream of frames. Producing fewer bytes than a cluster is an error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "common/checked.h"
#include "common/error.h"
#include "formats/image.h"
#include "io/io.h"
#include "qcow2.h"

static int inflate_zlib(const void *src, size_t src_len, void *dst,
			size_t dst_len, const char **why)
{
	z_stream z;
	int zr, ret = 0;

	memset(&z, 0, sizeof(z));
	if (src_len > UINT32_MAX || dst_len > UINT32_MAX) {
		*why = "compressed cluster too large";
		return -EINVAL;
	}
	if (inflateInit2(&z, -12) != Z_OK) {
		*why = "cannot initialise zlib";
		return -ENOMEM;
	}
	z.next_in = (Bytef *)src;
	z.avail_in = (uInt)src_len;
	z.next_out = dst;
	z.avail_out = (uInt)dst_len;
	zr = inflate(&z, Z_FINISH);
	if (zr != Z_STREAM_END && zr != Z_BUF_ERROR) {
		*why = "corrupt deflate data";
		ret = -EIO;
	} else if (z.avail_out != 0) {
		*why = "deflate data inflates to less than one cluster";
		ret = -EIO;
	}
	inflateEnd(&z);
	return ret;
}

static int inflate_zstd(const void *src, size_t src_len, void *dst,
			size_t dst_len, const char **why)
{
	ZSTD_inBuffer in = {src, src_len, 0};
	ZSTD_outBuffer out = {dst, dst_len, 0};
	ZSTD_DCtx *dctx;
	int ret = 0;

	dctx = ZSTD_createDCtx();
	if (!dctx) {
		*why = "cannot create a zstd context";
		return -ENOMEM;
	}
	while (out.pos < out.size) {
		size_t in_pos = in.pos, out_pos = out.pos;
		size_t zr = ZSTD_decompressStream(dctx, &out, &in);

		if (ZSTD_isError(zr)) {
			*why = "corrupt zstd data";
			ret = -EIO;
			break;
		}
		/* No progress: input exhausted (or stuck) before a cluster. */
		if (in.pos == in_pos && out.pos == out_pos) {
			*why = "zstd data decompresses to less than one cluster";
			ret = -EIO;
			break;
		}
	}
	ZSTD_freeDCtx(dctx);
	return ret;
}

int qcow2_decompress(int type, const void *src, size_t src_len, void *dst,
		     size_t dst_len, const char **why)
{
	switch (type) {
	case QCOW2_COMPRESSION_ZLIB:
		return inflate_zlib(src, src_len, dst, dst_len, why);
	case QCOW2_COMPRESSION_ZSTD:
		return inflate_zstd(src, src_len, dst, dst_len, why);
	default:
		*why = "unknown compression type";
		return -ENOTSUP;
	}
}

int qcow2_read_compressed_entry(struct img *img, struct qcow2 *s,
				const struct qcow2_l2e *e, uint64_t off,
				void *buf)
{
	const char *why = "";
	uint8_t *src = NULL;
	uint64_t csize;
	int ret;

	/* The sector count may run past EOF for the last cluster: clip. */
	if (e->coff >= s->file_size) {
		ret = qcow2_refresh_file_size(img, s);
		if (ret)
			return ret;
	}
	if (e->coff >= s->file_size)
		return sx_error(
			-EINVAL,
			"%s: compressed cluster at 0x%llx is beyond the end of the file (guest offset 0x%llx)",
			img->path, (unsigned long long)e->coff,
			(unsigned long long)off);
	csize = sx_min(e->csize, s->file_size - e->coff);

	src = malloc(csize);
	if (!src)
		return -ENOMEM;
	/* On failure sio_pread's message (naming the file) stands. */
	ret = sio_pread(img->file, src, csize, e->coff);
	if (ret)
		goto out;
	ret = qcow2_decompress(s->hdr.compression_type, src, csize, buf,
			       s->cluster_size, &why);
	if (ret)
		ret = sx_error(
			ret,
			"%s: compressed cluster at 0x%llx (guest offset 0x%llx): %s",
			img->path, (unsigned long long)e->coff,
			(unsigned long long)off, why);
out:
	free(src);
	return ret;
}

int qcow2_read_compressed(struct img *img, uint64_t off, void *buf)
{
	struct qcow2 *s = img->priv;
	struct qcow2_l2e e;
	int ret;

	if (off >= img->size)
		return sx_error(
			-EINVAL,
			"%s: compressed read at 0x%llx beyond the image size",
			img->path, (unsigned long long)off);
	pthread_mutex_lock(&s->lock);
	/* The lookup checked e.coff against the file size. */
	ret = qcow2_get_l2e(img, s, off, &e);
	if (!ret && e.type != QCOW2_C_COMPRESSED)
		ret = sx_error(
			-EINVAL,
			"%s: cluster at guest offset 0x%llx is not compressed",
			img->path, (unsigned long long)off);
	/* Under the lock: a writer may move the cluster meanwhile. */
	if (!ret)
		ret = qcow2_read_compressed_entry(img, s, &e, off, buf);
	pthread_mutex_unlock(&s->lock);
	return ret;
}

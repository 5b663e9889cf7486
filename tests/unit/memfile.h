/*
 * Memory files for the format unit tests (io.h sio_mem_create): images
 * that live only in memory, so the tests that exercise formats/ need no
 * io_uring, and snapshots of them on disk for the qemu-img oracle.
 *
 * A test names each memory file by a path in its temp dir. While the
 * memory file is registered, siphon's sio_file_open() of that path opens
 * it; mem_save_all() copies every one to its path as a real file, so that
 * qemu-img (which sees only the real files) judges exactly those bytes.
 * mem_clear() (a Check teardown) destroys them all.
 *
 * Include after testutil.h, from one .c file (the list is per program).
 */
#ifndef SIPHON_TESTS_MEMFILE_H
#define SIPHON_TESTS_MEMFILE_H

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "io/io.h"

#define MEM_FILES_MAX 64

static struct mem_file {
	char *path;
	struct sio_mem *m;
} mem_files[MEM_FILES_MAX];

/* The memory file registered at path by this program, or NULL. */
static inline struct sio_mem *mem_get(const char *path)
{
	unsigned i;

	for (i = 0; i < MEM_FILES_MAX; i++)
		if (mem_files[i].path && !strcmp(mem_files[i].path, path))
			return mem_files[i].m;
	return NULL;
}

/* Destroy memory file i of the list. */
static inline void mem_drop_slot(unsigned i)
{
	sio_mem_destroy(mem_files[i].m);
	free(mem_files[i].path);
	mem_files[i].path = NULL;
	mem_files[i].m = NULL;
}

/* Forget (destroy) the memory file at path, if there is one. */
static inline void mem_drop(const char *path)
{
	unsigned i;

	for (i = 0; i < MEM_FILES_MAX; i++)
		if (mem_files[i].path && !strcmp(mem_files[i].path, path))
			mem_drop_slot(i);
}

/*
 * A memory file at path holding buf[0..len) (len 0: empty), replacing one
 * registered there before (files still open on that one keep it).
 */
static inline struct sio_mem *mem_put(const char *path, const void *buf,
				      size_t len)
{
	unsigned i;
	int ret;

	mem_drop(path);
	for (i = 0; i < MEM_FILES_MAX && mem_files[i].path; i++)
		;
	ck_assert_uint_lt(i, MEM_FILES_MAX);
	ret = sio_mem_create(path, buf, len, &mem_files[i].m);
	ck_assert_msg(ret == 0, "sio_mem_create %s: %d %s", path, ret,
		      sx_last_error());
	mem_files[i].path = strdup(path);
	ck_assert_ptr_nonnull(mem_files[i].path);
	return mem_files[i].m;
}

/* A memory file at path with the bytes of the real file at path. */
static inline struct sio_mem *mem_load(const char *path)
{
	FILE *f = fopen(path, "rb");
	struct sio_mem *m;
	char *buf;
	long len;

	ck_assert_msg(f != NULL, "fopen %s", path);
	ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
	len = ftell(f);
	ck_assert_int_ge(len, 0);
	rewind(f);
	buf = malloc(len ? (size_t)len : 1);
	ck_assert_ptr_nonnull(buf);
	ck_assert_uint_eq(fread(buf, 1, (size_t)len, f), (size_t)len);
	fclose(f);
	m = mem_put(path, buf, (size_t)len);
	free(buf);
	return m;
}

/* Copy every memory file to its path as a real file (for qemu-img). */
static inline void mem_save_all(void)
{
	unsigned i;
	int ret;

	for (i = 0; i < MEM_FILES_MAX; i++) {
		if (!mem_files[i].path)
			continue;
		ret = sio_mem_save(mem_files[i].m, mem_files[i].path);
		ck_assert_msg(ret == 0, "sio_mem_save %s: %d %s",
			      mem_files[i].path, ret, sx_last_error());
	}
}

/* Destroy every memory file of this program. */
static inline void mem_clear(void)
{
	unsigned i;

	for (i = 0; i < MEM_FILES_MAX; i++)
		if (mem_files[i].path)
			mem_drop_slot(i);
}

#endif

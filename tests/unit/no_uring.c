/*
 * no_uring PROGRAM [ARG...]: run PROGRAM on a host that refuses io_uring,
 * as a seccomp filter (or sysctl kernel.io_uring_disabled) makes it, to
 * show that the format unit tests run on memory files without it.
 *
 * A seccomp filter makes io_uring_setup(2) fail with EPERM in PROGRAM and
 * its children. Exit status: PROGRAM's, except that a skip (77) becomes a
 * failure (1): a program run this way claims it needs no io_uring. 77
 * when this host cannot install the filter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__)
#define THIS_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define THIS_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

int main(int argc, char **argv)
{
#ifdef THIS_AUDIT_ARCH
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
			 offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, THIS_AUDIT_ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
			 offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = {
		.len = sizeof(filter) / sizeof(filter[0]),
		.filter = filter,
	};
#endif
	int st;
	pid_t pid;

	if (argc < 2) {
		fprintf(stderr, "usage: no_uring PROGRAM [ARG...]\n");
		return 2;
	}
#ifdef THIS_AUDIT_ARCH
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
		fprintf(stderr,
			"no_uring: cannot install a seccomp filter: "
			"%s: skipping\n",
			strerror(errno));
		return 77;
	}
#else
	fprintf(stderr, "no_uring: no filter for this architecture: "
			"skipping\n");
	return 77;
#endif
	pid = fork();
	if (pid < 0) {
		perror("no_uring: fork");
		return 1;
	}
	if (pid == 0) {
		execv(argv[1], argv + 1);
		perror("no_uring: exec");
		_exit(127);
	}
	if (waitpid(pid, &st, 0) < 0) {
		perror("no_uring: waitpid");
		return 1;
	}
	if (!WIFEXITED(st))
		return 1;
	if (WEXITSTATUS(st) == 77) {
		fprintf(stderr, "no_uring: %s skipped without io_uring\n",
			argv[1]);
		return 1;
	}
	return WEXITSTATUS(st);
}

/*
 * NBD servers for the unit tests: qemu-nbd and nbdkit started on a Unix
 * socket in the test's directory, waited for until the socket accepts,
 * and killed and reaped when the test is done with them, whatever
 * happens: nbd_server_stop() does it on the normal path; an atexit()
 * hook does it when a failed assertion ends the (forked) test process;
 * and each server gets SIGKILL from the kernel when the process that
 * started it dies (PR_SET_PDEATHSIG), should even that be skipped.
 *
 * A server's stdout and stderr go to SOCK.log next to its socket.
 *
 * Include it from a .c file that defines _GNU_SOURCE.
 */
#ifndef SIPHON_TESTS_NBDSERVER_H
#define SIPHON_TESTS_NBDSERVER_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Servers one test may have running at once. */
#define NBD_SERVERS_MAX 8
/* How long a server may take to listen: 3000 polls 10 ms apart. */
#define NBD_SERVER_START_POLLS 3000

struct nbd_server {
	pid_t pid; /* 0: not running */
	char sock[108]; /* sun_path */
};

static pid_t nbd_server_pids[NBD_SERVERS_MAX];
static bool nbd_server_hooked;

/* SIGKILL pid and reap it. */
static inline void nbd_server_kill_pid(pid_t pid)
{
	kill(pid, SIGKILL);
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
}

/* Kill and reap every server still running (atexit). */
static inline void nbd_server_atexit(void)
{
	int i;

	for (i = 0; i < NBD_SERVERS_MAX; i++) {
		if (nbd_server_pids[i] > 0)
			nbd_server_kill_pid(nbd_server_pids[i]);
		nbd_server_pids[i] = 0;
	}
}

/* Remember (on) or forget pid among the running servers. */
static inline void nbd_server_track(pid_t pid, bool on)
{
	int i;

	for (i = 0; i < NBD_SERVERS_MAX; i++) {
		if (on && nbd_server_pids[i] == 0) {
			nbd_server_pids[i] = pid;
			return;
		}
		if (!on && nbd_server_pids[i] == pid) {
			nbd_server_pids[i] = 0;
			return;
		}
	}
}

/* Whether something accepts connections on the Unix socket at path. */
static inline bool nbd_socket_accepts(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	bool ok;
	int fd;

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return false;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
}

/* Kill and reap s's server (if running). Idempotent. */
static inline void nbd_server_stop(struct nbd_server *s)
{
	if (s->pid <= 0)
		return;
	nbd_server_kill_pid(s->pid);
	nbd_server_track(s->pid, false);
	s->pid = 0;
}

/*
 * Start argv[0] (NULL-terminated argv) as a server that listens on the
 * Unix socket sock, and wait until the socket accepts. 0, or -1 with the
 * reason on stderr (the server is not left running).
 */
static inline int nbd_server_start(struct nbd_server *s, const char *sock,
				   char *const argv[])
{
	struct timespec nap = {.tv_nsec = 10 * 1000 * 1000};
	char log[sizeof(s->sock) + 8];
	pid_t parent = getpid(), pid;
	int i, fd, status;

	memset(s, 0, sizeof(*s));
	if (strlen(sock) >= sizeof(s->sock)) {
		fprintf(stderr, "socket path too long: %s\n", sock);
		return -1;
	}
	snprintf(s->sock, sizeof(s->sock), "%s", sock);
	snprintf(log, sizeof(log), "%s.log", sock);
	unlink(sock);
	if (!nbd_server_hooked) {
		atexit(nbd_server_atexit);
		nbd_server_hooked = true;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		perror("fork");
		return -1;
	}
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(127);
		fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		execvp(argv[0], argv);
		_exit(127);
	}
	s->pid = pid;
	nbd_server_track(pid, true);
	for (i = 0; i < NBD_SERVER_START_POLLS; i++) {
		if (nbd_socket_accepts(sock))
			return 0;
		if (waitpid(pid, &status, WNOHANG) == pid) {
			nbd_server_track(pid, false);
			s->pid = 0;
			fprintf(stderr, "%s exited before listening (see %s)\n",
				argv[0], log);
			return -1;
		}
		nanosleep(&nap, NULL);
	}
	fprintf(stderr, "%s never listened on %s\n", argv[0], sock);
	nbd_server_stop(s);
	return -1;
}

/*
 * qemu-nbd exporting the raw file read-only as export "exp" on
 * dir/name, shared by up to 8 clients, surviving their disconnects.
 */
static inline int nbd_server_qemu(struct nbd_server *s, const char *dir,
				  const char *name, const char *file)
{
	char sock[sizeof(s->sock)];
	char *argv[] = {"qemu-nbd", "-k",	  sock, "-x",		"exp",
			"-f",	    "raw",	  "-r", "--persistent", "-e",
			"8",	    (char *)file, NULL};

	snprintf(sock, sizeof(sock), "%s/%s", dir, name);
	return nbd_server_start(s, sock, argv);
}

/*
 * nbdkit in the foreground on dir/name with the arguments args (up to
 * 16, NULL-terminated: filters, the plugin and its parameters).
 */
static inline int nbd_server_nbdkit(struct nbd_server *s, const char *dir,
				    const char *name, const char *const args[])
{
	char sock[sizeof(s->sock)];
	char *argv[24] = {"nbdkit", "-f", "-U", sock};
	int i, n = 4;

	snprintf(sock, sizeof(sock), "%s/%s", dir, name);
	for (i = 0; args[i] && i < 16; i++)
		argv[n++] = (char *)args[i];
	argv[n] = NULL;
	return nbd_server_start(s, sock, argv);
}

/* Whether qemu-nbd and nbdkit are on PATH; prints nothing. */
static inline bool have_nbd_servers(void)
{
	return system("qemu-nbd --version >/dev/null 2>&1 && "
		      "nbdkit --version >/dev/null 2>&1") == 0;
}

#endif

/*
 * The `siphon` command: what every sub-command shares.
 *
 * A command is one struct siphon_cmd in its own cmd_<name>.c, listed in the
 * table in siphon.c; adding a command means adding a file and a table line.
 * Commands return an exit code (enum tool_exit) and print their own errors
 * through tool_fail()/tool_usage(), never exit() themselves.
 */
#ifndef SIPHON_TOOLS_CMD_H
#define SIPHON_TOOLS_CMD_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

enum tool_exit {
	TOOL_OK = 0, /* success */
	TOOL_ERR = 1, /* bad image, I/O error, ... */
	TOOL_USAGE = 2, /* bad command line */
};

enum tool_output {
	TOOL_OUT_HUMAN,
	TOOL_OUT_JSON,
};

struct siphon_cmd {
	const char *name;
	const char *summary; /* one line for `siphon --help` */
	/* argv[0] is the command name; getopt state is fresh. */
	int (*run)(const struct siphon_cmd *cmd, int argc, char **argv);
	/* Full help: usage, options, exit codes. */
	void (*help)(FILE *out);
};

extern const struct siphon_cmd cmd_info;
extern const struct siphon_cmd cmd_map;
extern const struct siphon_cmd cmd_dump;
extern const struct siphon_cmd cmd_stream;
extern const struct siphon_cmd cmd_create;
extern const struct siphon_cmd cmd_rebase;
extern const struct siphon_cmd cmd_io;
extern const struct siphon_cmd cmd_serve;
extern const struct siphon_cmd cmd_ctl;
extern const struct siphon_cmd cmd_check;

/* Text of the exit-code section shared by every command's help. */
extern const char tool_exit_help[];

/*
 * Print "siphon: <message>" for the failure err (negative errno): the
 * recorded sx_error() message when it belongs to err, else strerror. Returns
 * TOOL_ERR.
 */
int tool_fail(int err);

/* Print "siphon CMD: <message>" and a hint to stderr; returns TOOL_USAGE. */
int tool_usage(const struct siphon_cmd *cmd, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * The usage error for getopt's answer c (':' for a missing argument, else
 * an unknown option), naming argv[optind - 1]. Returns TOOL_USAGE.
 */
int tool_bad_option(const struct siphon_cmd *cmd, int c, char **argv);

struct img;

/*
 * The shape of the read-only commands over one image (info, map): parse
 * -f/--format, --output and -h (cmd->help), open IMAGE read-only with its
 * chain, run fn (told whether the top's format was probed), flush stdout,
 * report errors. Returns the exit code.
 */
int tool_run_on_image(const struct siphon_cmd *cmd, int argc, char **argv,
		      int (*fn)(struct img *img, bool probed,
				enum tool_output out));

/*
 * BACKING as every reader of IMAGE resolves it: an absolute name as it is,
 * a relative one from IMAGE's directory. Returns a malloc'd string the
 * caller frees, or NULL when out of memory.
 */
char *tool_resolve_backing(const char *image, const char *backing);

/* Parse --output's argument; false if unknown. */
bool tool_parse_output(const char *arg, enum tool_output *out);

/* Parse --on-error's argument (stop, pause): enum siphon_on_error. */
bool tool_parse_on_error(const char *arg, unsigned *out);

/*
 * Parse a byte count: decimal digits, then optionally one binary suffix
 * (k/K, m/M, g/G, t/T) and "B" or "iB". Returns 0 and *out, or -EINVAL
 * (malformed) / -ERANGE (does not fit in 63 bits); *out untouched then.
 */
int tool_parse_bytes(const char *s, uint64_t *out);

/* "1.5 GiB"-style rendering of a byte count into buf. */
const char *tool_human_size(uint64_t v, char *buf, size_t len);

#endif

/*
 * NBD backing names (nbd_name.h): the URIs and the json:{...} names QEMU
 * writes in backing file fields, parsed into where the export is.
 *
 * What this file keeps:
 *  - Strict: every part of a name is understood or the name is refused
 *    with a message (unknown query parameters and JSON keys included), so
 *    an option we do not implement (TLS, reconnect-delay) is never dropped
 *    silently. TLS options get their own message.
 *  - QEMU's reading is the reference: the export is the URI path after its
 *    first '/', percent-decoded; socket= is the only query parameter; a
 *    json: name is flattened ("a": {"b": 1} is "a.b": 1) before its keys
 *    are read, so the nested, flattened and mixed forms mean the same.
 *  - sio_nbd_addr_uri() writes only what this parser reads back to the same
 *    address (tested as parse(uri(a)) == a).
 *  - Percent-decoding never yields a NUL, and no string out of a JSON name
 *    holds one: every string in the result is a C string, exactly.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>

#include "common/error.h"
#include "common/json_parse.h"
#include "io/nbd_name.h"

#define NBD_DEFAULT_PORT "10809"
#define NBD_MAX_EXPORT 4096 /* the NBD protocol's limit on a name */
#define NAME_SHOWN 160 /* bytes of the name quoted in a message */
#define KEY_MAX 64 /* a flattened json: key; ours are shorter */
#define SOCKET_MAX (sizeof(((struct sockaddr_un *)0)->sun_path) - 1)

/*
 * Record "NBD name "NAME": WHY" and return -EINVAL. The name is cut at
 * NAME_SHOWN bytes, so the reason always fits the message.
 */
static int refuse(const char *name, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static int refuse(const char *name, const char *fmt, ...)
{
	char why[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	return sx_error(-EINVAL, "NBD name \"%.*s%s\": %s", NAME_SHOWN, name,
			strlen(name) > NAME_SHOWN ? "..." : "", why);
}

static int no_memory(void)
{
	return sx_error(-ENOMEM, "NBD name: out of memory");
}

bool sio_nbd_name_is_remote(const char *name)
{
	static const char *const prefixes[] = {
		"nbd:", "nbd+tcp:", "nbd+unix:", "json:"};
	size_t i;

	if (!name)
		return false;
	for (i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++)
		if (!strncmp(name, prefixes[i], strlen(prefixes[i])))
			return true;
	return false;
}

void sio_nbd_addr_free(struct sio_nbd_addr *a)
{
	if (!a)
		return;
	free(a->host);
	free(a->port);
	free(a->socket);
	free(a->export_name);
	a->host = a->port = a->socket = a->export_name = NULL;
}

/* RFC 3986 "unreserved": never needs encoding. */
static bool is_unreserved(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
	       c == '~';
}

/*
 * Whether the n bytes at s are each unreserved, in extra, or a %XX escape
 * that does not decode to NUL. On false, *bad is the offending offset.
 */
static bool uri_chars_ok(const char *s, size_t n, const char *extra,
			 size_t *bad)
{
	unsigned char c;
	size_t i;

	for (i = 0; i < n; i++) {
		c = (unsigned char)s[i];
		if (c == '%') {
			if (n - i < 3 ||
			    sx_hex_digit((unsigned char)s[i + 1]) < 0 ||
			    sx_hex_digit((unsigned char)s[i + 2]) < 0 ||
			    (s[i + 1] == '0' && s[i + 2] == '0')) {
				*bad = i;
				return false;
			}
			i += 2;
		} else if (!is_unreserved(c) && !(c && strchr(extra, c))) {
			*bad = i;
			return false;
		}
	}
	return true;
}

/*
 * The n bytes at s (checked by uri_chars_ok()) percent-decoded into a new C
 * string *out. 0 or -ENOMEM.
 */
static int pct_decode(const char *s, size_t n, char **out)
{
	size_t i, k = 0;
	char *d;

	d = malloc(n + 1);
	if (!d)
		return no_memory();
	for (i = 0; i < n; i++) {
		if (s[i] == '%') {
			d[k++] = (char)(sx_hex_digit((unsigned char)s[i + 1])
						<< 4 |
					sx_hex_digit((unsigned char)s[i + 2]));
			i += 2;
		} else {
			d[k++] = s[i];
		}
	}
	d[k] = '\0';
	*out = d;
	return 0;
}

/*
 * The decimal port in the n bytes at s, 1..65535, into a new normalized
 * string *out ("010" is "10"). 0, -EINVAL (no message) or -ENOMEM.
 */
static int parse_port(const char *s, size_t n, char **out)
{
	unsigned long v = 0;
	char *str;
	size_t i;

	if (!n)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -EINVAL;
		v = v * 10 + (unsigned long)(s[i] - '0');
		if (v > 65535)
			return -EINVAL;
	}
	if (!v)
		return -EINVAL;
	/* asprintf() leaves its pointer undefined on failure. */
	if (asprintf(&str, "%lu", v) < 0)
		return no_memory();
	*out = str;
	return 0;
}

/* The URI's authority (auth, n bytes; TCP) into a->host and a->port. */
static int parse_authority(const char *name, const char *auth, size_t n,
			   struct sio_nbd_addr *a)
{
	const char *host = auth, *port = NULL, *cut;
	size_t host_len, port_len = 0, bad;
	int ret;

	if (!n)
		return refuse(name, "no host (nbd://HOST[:PORT]/EXPORT)");
	if (memchr(auth, '@', n))
		return refuse(name,
			      "user information (USER@) is not supported");
	if (auth[0] == '[') {
		cut = memchr(auth, ']', n);
		if (!cut)
			return refuse(name, "IPv6 address without its ']'");
		host = auth + 1;
		host_len = (size_t)(cut - host);
		if (cut + 1 < auth + n) {
			if (cut[1] != ':')
				return refuse(name, "garbage after ']'");
			port = cut + 2;
		}
		if (!host_len || !memchr(host, ':', host_len) ||
		    !uri_chars_ok(host, host_len, ":", &bad))
			return refuse(name, "bad IPv6 address in [...]");
	} else {
		cut = memchr(auth, ':', n);
		host_len = cut ? (size_t)(cut - auth) : n;
		if (cut)
			port = cut + 1;
		if (!host_len)
			return refuse(name,
				      "no host (nbd://HOST[:PORT]/EXPORT)");
		if (!uri_chars_ok(host, host_len, "!$&'()*+,;=", &bad))
			return refuse(name, "bad character in host at byte %zu",
				      (size_t)(host - name) + bad);
	}
	if (port)
		port_len = (size_t)(auth + n - port);
	ret = pct_decode(host, host_len, &a->host);
	if (ret)
		return ret;
	if (!port)
		a->port = strdup(NBD_DEFAULT_PORT);
	else if (parse_port(port, port_len, &a->port) == -EINVAL)
		return refuse(name, "port \"%.*s\" is not 1..65535",
			      (int)(port_len > 16 ? 16 : port_len), port);
	if (!a->port)
		return no_memory();
	return 0;
}

/*
 * The URI's query (q, n bytes) into a->socket. Only socket= (nbd+unix)
 * exists; tls* get their own message.
 */
static int parse_query(const char *name, const char *q, size_t n,
		       struct sio_nbd_addr *a)
{
	const char *end, *eq;
	char *pname = NULL, *value = NULL;
	size_t len, bad;
	int ret = 0;

	if (memchr(q, ';', n))
		return refuse(name, "';' in the query (write it as %%3B)");
	while (n) {
		end = memchr(q, '&', n);
		len = end ? (size_t)(end - q) : n;
		if (!len) {
			ret = refuse(name, "empty query parameter");
			goto out;
		}
		if (!uri_chars_ok(q, len, "!$'()*+,=:@/?", &bad)) {
			ret = refuse(name,
				     "bad character in the query at byte %zu",
				     (size_t)(q - name) + bad);
			goto out;
		}
		eq = memchr(q, '=', len);
		ret = pct_decode(q, eq ? (size_t)(eq - q) : len, &pname);
		if (ret)
			goto out;
		if (!strncmp(pname, "tls", 3)) {
			ret = refuse(name,
				     "query parameter \"%s\": "
				     "TLS is not supported yet",
				     pname);
			goto out;
		}
		if (strcmp(pname, "socket")) {
			ret = refuse(name, "unknown query parameter \"%s\"",
				     pname);
			goto out;
		}
		if (a->transport != SIO_NBD_UNIX) {
			ret = refuse(name, "socket= is only for nbd+unix:");
			goto out;
		}
		if (a->socket) {
			ret = refuse(name, "socket= given twice");
			goto out;
		}
		if (!eq || eq + 1 == q + len) {
			ret = refuse(name, "socket= without a path");
			goto out;
		}
		ret = pct_decode(eq + 1, (size_t)(q + len - eq - 1), &value);
		if (ret)
			goto out;
		a->socket = value;
		value = NULL;
		free(pname);
		pname = NULL;
		if (!end)
			break;
		n -= len + 1;
		q = end + 1;
		if (!n) {
			ret = refuse(name, "empty query parameter");
			goto out;
		}
	}
out:
	free(pname);
	free(value);
	return ret;
}

/* A socket path or an export name fits what the kernel and NBD take. */
static int check_lengths(const char *name, const struct sio_nbd_addr *a)
{
	if (a->socket && !a->socket[0])
		return refuse(name, "empty socket path");
	if (a->socket && strlen(a->socket) > SOCKET_MAX)
		return refuse(name, "socket path longer than %zu bytes",
			      SOCKET_MAX);
	if (a->host && !a->host[0])
		return refuse(name, "empty host");
	if (strlen(a->export_name) > NBD_MAX_EXPORT)
		return refuse(name, "export name longer than %d bytes",
			      NBD_MAX_EXPORT);
	return 0;
}

/* nbd://, nbd+tcp://, nbd+unix:// into *a (freed by the caller). */
static int parse_uri(const char *name, struct sio_nbd_addr *a)
{
	const char *rest, *auth, *path, *query = NULL, *end;
	size_t auth_len, path_len, bad;
	int ret;

	if (!strncmp(name, "nbd://", 6)) {
		rest = name + 6;
		a->transport = SIO_NBD_TCP;
	} else if (!strncmp(name, "nbd+tcp://", 10)) {
		rest = name + 10;
		a->transport = SIO_NBD_TCP;
	} else if (!strncmp(name, "nbd+unix://", 11)) {
		rest = name + 11;
		a->transport = SIO_NBD_UNIX;
	} else if (!strncmp(name, "nbd:", 4)) {
		return refuse(name, "the legacy nbd:HOST:PORT / nbd:unix:PATH "
				    "syntax is not supported (use "
				    "nbd://HOST:PORT/EXPORT or "
				    "nbd+unix:///EXPORT?socket=PATH)");
	} else {
		return refuse(name, "not nbd://, nbd+tcp:// or nbd+unix:///");
	}
	if (strchr(rest, '#'))
		return refuse(name, "a fragment (#) is not allowed");
	auth = rest;
	auth_len = strcspn(auth, "/?");
	path = auth + auth_len;
	path_len = strcspn(path, "?");
	end = path + path_len;
	if (*end == '?')
		query = end + 1;

	if (a->transport == SIO_NBD_UNIX) {
		if (auth_len)
			return refuse(name, "nbd+unix takes no host "
					    "(nbd+unix:///EXPORT?socket=PATH)");
	} else {
		ret = parse_authority(name, auth, auth_len, a);
		if (ret)
			return ret;
	}

	/* path is "" or starts with '/': the export is what follows. */
	if (path_len) {
		path++;
		path_len--;
	}
	if (!uri_chars_ok(path, path_len, "!$&'()*+,;=:@/", &bad))
		return refuse(name, "bad character in the export at byte %zu",
			      (size_t)(path - name) + bad);
	ret = pct_decode(path, path_len, &a->export_name);
	if (ret)
		return ret;

	if (query) {
		ret = parse_query(name, query, strlen(query), a);
		if (ret)
			return ret;
	}
	if (a->transport == SIO_NBD_UNIX && !a->socket)
		return refuse(name, "nbd+unix without socket=PATH");
	return check_lengths(name, a);
}

/* A json: name, flattened: "file.server.path" -> its (scalar) value. */
struct flat_entry {
	char *key;
	const struct sx_json *v;
	bool used;
};

struct flat {
	struct flat_entry *e;
	size_t n, cap;
};

static void flat_free(struct flat *f)
{
	size_t i;

	for (i = 0; i < f->n; i++)
		free(f->e[i].key);
	free(f->e);
}

/*
 * Add obj's members to f under prefix (QEMU's qdict_flatten): a member
 * whose value is a non-empty object adds its members as "key.member";
 * anything else (an empty object or an array included) is one entry.
 */
static int flatten(const char *name, const struct sx_json *obj,
		   const char *prefix, struct flat *f)
{
	const struct sx_json_member *m;
	struct flat_entry *ne;
	char *key = NULL;
	size_t i, j;
	int ret = 0;

	for (i = 0; i < obj->count; i++) {
		m = &obj->members[i];
		if (strlen(m->key) != m->key_len) {
			ret = refuse(name, "a key holds a NUL");
			goto out;
		}
		/*
		 * No key we know is this long; refusing here also keeps a
		 * hostile name from copying a long prefix into every entry.
		 */
		if (strlen(prefix) + 1 + m->key_len > KEY_MAX) {
			ret = refuse(
				name,
				"unknown or unsupported key \"%s%s%.32s...\"",
				prefix, *prefix ? "." : "", m->key);
			goto out;
		}
		if (asprintf(&key, "%s%s%s", prefix, *prefix ? "." : "",
			     m->key) < 0) {
			key = NULL;
			ret = no_memory();
			goto out;
		}
		if (m->value.type == SX_JSON_OBJECT && m->value.count) {
			ret = flatten(name, &m->value, key, f);
			if (ret)
				goto out;
			free(key);
			key = NULL;
			continue;
		}
		for (j = 0; j < f->n; j++) {
			if (!strcmp(f->e[j].key, key)) {
				ret = refuse(name, "key \"%s\" given twice",
					     key);
				goto out;
			}
		}
		if (f->n == f->cap) {
			ne = realloc(f->e, (f->cap ? f->cap * 2 : 16) *
						   sizeof(*f->e));
			if (!ne) {
				ret = no_memory();
				goto out;
			}
			f->e = ne;
			f->cap = f->cap ? f->cap * 2 : 16;
		}
		f->e[f->n].key = key;
		f->e[f->n].v = &m->value;
		f->e[f->n].used = false;
		f->n++;
		key = NULL;
	}
out:
	free(key);
	return ret;
}

/* The value of key prefix+k in f, marked used, or NULL. */
static const struct sx_json *take(struct flat *f, const char *prefix,
				  const char *k)
{
	size_t i, n = strlen(prefix);

	for (i = 0; i < f->n; i++) {
		if (!strncmp(f->e[i].key, prefix, n) &&
		    !strcmp(f->e[i].key + n, k)) {
			f->e[i].used = true;
			return f->e[i].v;
		}
	}
	return NULL;
}

/* v (the value of key) as a new C string *out. 0, -EINVAL or -ENOMEM. */
static int json_str(const char *name, const char *prefix, const char *key,
		    const struct sx_json *v, char **out)
{
	if (v->type != SX_JSON_STRING)
		return refuse(name, "\"%s%s\" must be a string", prefix, key);
	if (strlen(v->str) != v->len)
		return refuse(name, "\"%s%s\" holds a NUL", prefix, key);
	*out = strdup(v->str);
	return *out ? 0 : no_memory();
}

/* Whether v is the JSON string s. */
static bool json_is(const struct sx_json *v, const char *s)
{
	return v && v->type == SX_JSON_STRING && v->len == strlen(s) &&
	       !memcmp(v->str, s, v->len);
}

/* A port, a JSON string of digits or a number, into a new string. */
static int json_port(const char *name, const char *prefix, const char *key,
		     const struct sx_json *v, char **out)
{
	char *str;
	int64_t n;
	int ret;

	if (v->type == SX_JSON_STRING) {
		ret = parse_port(v->str, v->len, out);
	} else if (v->type == SX_JSON_NUMBER) {
		ret = sx_json_int64(v, &n);
		if (!ret && (n < 1 || n > 65535))
			ret = -EINVAL;
		if (!ret && asprintf(&str, "%d", (int)n) < 0)
			ret = no_memory();
		else if (!ret)
			*out = str;
	} else {
		ret = -EINVAL;
	}
	if (ret == -EINVAL || ret == -ERANGE)
		return refuse(name, "\"%s%s\" is not a port 1..65535", prefix,
			      key);
	return ret;
}

/* The keys of an nbd node (after prefix) QEMU reads, all taken at once. */
struct nbd_keys {
	const struct sx_json *export_name;
	const struct sx_json *type, *path, *host, *port; /* server.* */
	const struct sx_json *lpath, *lhost, *lport; /* legacy */
};

/* The nbd node's keys in k (taken from f) into *a. */
static int nbd_node(const char *name, const char *p, const struct nbd_keys *k,
		    struct sio_nbd_addr *a)
{
	bool server = k->type || k->path || k->host || k->port;
	int ret;

	if (server && (k->lpath || k->lhost || k->lport))
		return refuse(name,
			      "\"%sserver\" and the legacy \"%spath\"/"
			      "\"%shost\"/\"%sport\" are given together",
			      p, p, p, p);
	if (k->lpath && (k->lhost || k->lport))
		return refuse(name,
			      "\"%spath\" and \"%shost\"/\"%sport\" are "
			      "given together",
			      p, p, p);
	if (k->lport && !k->lhost)
		return refuse(name, "\"%sport\" without \"%shost\"", p, p);
	if (server && !k->type)
		return refuse(name, "no \"%sserver.type\"", p);
	if (!server && !k->lpath && !k->lhost)
		return refuse(name,
			      "no server (\"%sserver.type\" and "
			      "\"%sserver.path\" or \"%sserver.host\")",
			      p, p, p);

	if (k->lpath || json_is(k->type, "unix")) {
		a->transport = SIO_NBD_UNIX;
		if (k->host || k->port)
			return refuse(name,
				      "\"%sserver.%s\" with server.type unix",
				      p, k->host ? "host" : "port");
		if (!k->lpath && !k->path)
			return refuse(name, "no \"%sserver.path\"", p);
		ret = k->lpath ? json_str(name, p, "path", k->lpath, &a->socket)
			       : json_str(name, p, "server.path", k->path,
					  &a->socket);
		if (ret)
			return ret;
	} else if (k->lhost || json_is(k->type, "inet")) {
		a->transport = SIO_NBD_TCP;
		if (k->path)
			return refuse(name,
				      "\"%sserver.path\" with server.type inet",
				      p);
		if (!k->lhost && !k->host)
			return refuse(name, "no \"%sserver.host\"", p);
		/* QEMU's InetSocketAddress needs a port; legacy has one. */
		if (!k->lhost && !k->port)
			return refuse(name, "no \"%sserver.port\"", p);
		ret = k->lhost ? json_str(name, p, "host", k->lhost, &a->host)
			       : json_str(name, p, "server.host", k->host,
					  &a->host);
		if (ret)
			return ret;
		if (k->lhost && !k->lport)
			a->port = strdup(NBD_DEFAULT_PORT);
		else if (k->lport)
			ret = json_port(name, p, "port", k->lport, &a->port);
		else
			ret = json_port(name, p, "server.port", k->port,
					&a->port);
		if (ret)
			return ret;
		if (!a->port)
			return no_memory();
	} else if (k->type->type == SX_JSON_STRING) {
		return refuse(
			name,
			"server type \"%s\" is not supported (unix or inet)",
			strlen(k->type->str) == k->type->len ? k->type->str
							     : "?");
	} else {
		return refuse(name, "\"%sserver.type\" must be a string", p);
	}

	if (k->export_name)
		ret = json_str(name, p, "export", k->export_name,
			       &a->export_name);
	else
		ret = (a->export_name = strdup("")) ? 0 : no_memory();
	if (ret)
		return ret;
	return check_lengths(name, a);
}

/*
 * Refuse driver v (the value of key): which driver it names, or that it is
 * not a string. hint: what is supported.
 */
static int bad_driver(const char *name, const char *key,
		      const struct sx_json *v, const char *hint)
{
	if (v->type == SX_JSON_STRING && strlen(v->str) == v->len)
		return refuse(name, "%s \"%s\" is not supported (%s)", key,
			      v->str, hint);
	return refuse(name, "\"%s\" must be a string", key);
}

/* json:{...} into *a (freed by the caller). */
static int parse_json(const char *name, struct sio_nbd_addr *a)
{
	const char *text = name + 5, *p = "file.";
	char msg[SX_ERROR_MAX];
	struct flat f = {0};
	const struct sx_json *drv, *fdrv;
	struct sx_json *root = NULL;
	struct nbd_keys k;
	size_t i;
	int ret;

	ret = sx_json_parse(text, strlen(text), &root);
	if (ret == -EINVAL) {
		/* refuse() reuses this thread's message buffer: copy. */
		snprintf(msg, sizeof(msg), "%s", sx_last_error());
		ret = refuse(name, "%s (counting from after \"json:\")", msg);
	}
	if (ret)
		goto out;
	if (root->type != SX_JSON_OBJECT) {
		ret = refuse(name, "the JSON is not an object");
		goto out;
	}
	ret = flatten(name, root, "", &f);
	if (ret)
		goto out;

	drv = take(&f, "", "driver");
	if (json_is(drv, "nbd")) {
		p = "";
	} else if (drv && !json_is(drv, "raw")) {
		ret = bad_driver(name, "driver", drv,
				 "nbd, or raw over an nbd file");
		goto out;
	}
	if (*p) {
		fdrv = take(&f, p, "driver");
		if (!fdrv) {
			ret = refuse(name,
				     "no \"file.driver\": not an NBD node");
			goto out;
		}
		if (!json_is(fdrv, "nbd")) {
			ret = bad_driver(name, "file.driver", fdrv, "only nbd");
			goto out;
		}
	}
	k.export_name = take(&f, p, "export");
	k.type = take(&f, p, "server.type");
	k.path = take(&f, p, "server.path");
	k.host = take(&f, p, "server.host");
	k.port = take(&f, p, "server.port");
	k.lpath = take(&f, p, "path");
	k.lhost = take(&f, p, "host");
	k.lport = take(&f, p, "port");

	/* Before the values: an option we do not have is the first news. */
	for (i = 0; i < f.n; i++) {
		const char *key = f.e[i].key;
		const char *last = strrchr(key, '.');

		if (f.e[i].used)
			continue;
		last = last ? last + 1 : key;
		if (!strncmp(last, "tls", 3))
			ret = refuse(name, "\"%s\": TLS is not supported yet",
				     key);
		else
			ret = refuse(name, "unknown or unsupported key \"%s\"",
				     key);
		goto out;
	}
	ret = nbd_node(name, p, &k, a);
out:
	flat_free(&f);
	sx_json_free(root);
	return ret;
}

int sio_nbd_name_parse(const char *name, struct sio_nbd_addr *out)
{
	struct sio_nbd_addr a = {0};
	int ret;

	if (!name || !out)
		return sx_error(-EINVAL, "NBD name: no name given");
	if (!strncmp(name, "json:", 5))
		ret = parse_json(name, &a);
	else
		ret = parse_uri(name, &a);
	if (ret)
		goto out;
	*out = a;
	return 0;
out:
	sio_nbd_addr_free(&a);
	return ret;
}

/* Append s to *w, each byte not unreserved nor in keep as %XX. */
static void put_encoded(char **w, const char *s, const char *keep)
{
	static const char hex[] = "0123456789ABCDEF";
	unsigned char c;

	for (; *s; s++) {
		c = (unsigned char)*s;
		if (is_unreserved(c) || strchr(keep, c)) {
			*(*w)++ = (char)c;
		} else {
			*(*w)++ = '%';
			*(*w)++ = hex[c >> 4];
			*(*w)++ = hex[c & 15];
		}
	}
}

static void put_raw(char **w, const char *s)
{
	size_t n = strlen(s);

	memcpy(*w, s, n);
	*w += n;
}

char *sio_nbd_addr_uri(const struct sio_nbd_addr *a)
{
	size_t n;
	char *uri, *w;

	if (!a || !a->export_name)
		return NULL;
	if (a->transport == SIO_NBD_TCP && (!a->host || !a->port))
		return NULL;
	if (a->transport == SIO_NBD_UNIX && !a->socket)
		return NULL;
	if (a->transport != SIO_NBD_TCP && a->transport != SIO_NBD_UNIX)
		return NULL;
	/* Every byte may become three; the fixed parts fit in 32. */
	n = 32 + 3 * strlen(a->export_name);
	if (a->transport == SIO_NBD_TCP)
		n += 3 * strlen(a->host) + strlen(a->port);
	else
		n += 3 * strlen(a->socket);
	uri = malloc(n);
	if (!uri)
		return NULL;
	w = uri;
	if (a->transport == SIO_NBD_TCP) {
		put_raw(&w, "nbd://");
		if (strchr(a->host, ':')) {
			put_raw(&w, "[");
			put_encoded(&w, a->host, ":");
			put_raw(&w, "]");
		} else {
			put_encoded(&w, a->host, "");
		}
		put_raw(&w, ":");
		put_encoded(&w, a->port, "");
		put_raw(&w, "/");
		put_encoded(&w, a->export_name, "/");
	} else {
		put_raw(&w, "nbd+unix:///");
		put_encoded(&w, a->export_name, "/");
		put_raw(&w, "?socket=");
		put_encoded(&w, a->socket, "/");
	}
	*w = '\0';
	return uri;
}

/*
 * Unit tests for io/nbd_name.h: the NBD names QEMU writes in backing file
 * fields, accepted with the fields they name, refused with -EINVAL and a
 * message saying why; the canonical URI parsing back to the same address;
 * and which names count as remote. That QEMU reads these names the same
 * way is checked against qemu-nbd in tests/integration/test_nbd_name.sh.
 */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "common/error.h"
#include "io/nbd_name.h"

#define TCP SIO_NBD_TCP
#define UNIX SIO_NBD_UNIX

struct accepted {
	const char *name;
	enum sio_nbd_transport transport;
	const char *host, *port, *socket, *export_name;
};

static const struct accepted accepted[] = {
	/* URIs */
	{"nbd://localhost/exp", TCP, "localhost", "10809", NULL, "exp"},
	{"nbd://localhost:1234/exp", TCP, "localhost", "1234", NULL, "exp"},
	{"nbd+tcp://example.com:10809/", TCP, "example.com", "10809", NULL, ""},
	{"nbd://h", TCP, "h", "10809", NULL, ""},
	{"nbd://h/", TCP, "h", "10809", NULL, ""},
	{"nbd://h/?", TCP, "h", "10809", NULL, ""},
	{"nbd://h?", TCP, "h", "10809", NULL, ""},
	{"nbd://h:1", TCP, "h", "1", NULL, ""},
	{"nbd://h:010/e", TCP, "h", "10", NULL, "e"},
	{"nbd://h:65535/e", TCP, "h", "65535", NULL, "e"},
	{"nbd://[::1]:10810/a/b", TCP, "::1", "10810", NULL, "a/b"},
	{"nbd://[::1]/x", TCP, "::1", "10809", NULL, "x"},
	{"nbd://[fe80::1%25eth0]:1/e", TCP, "fe80::1%eth0", "1", NULL, "e"},
	{"nbd://192.168.0.1:2/my%20export", TCP, "192.168.0.1", "2", NULL,
	 "my export"},
	{"nbd://h//abs", TCP, "h", "10809", NULL, "/abs"},
	{"nbd://h/a%2Fb%3Fc%23d%25", TCP, "h", "10809", NULL, "a/b?c#d%"},
	{"nbd://h/!$&'()*+,;=:@", TCP, "h", "10809", NULL, "!$&'()*+,;=:@"},
	{"nbd://my-host.example_1~/e", TCP, "my-host.example_1~", "10809", NULL,
	 "e"},
	{"nbd+unix:///exp?socket=/tmp/s.sock", UNIX, NULL, NULL, "/tmp/s.sock",
	 "exp"},
	{"nbd+unix:///?socket=/tmp/s", UNIX, NULL, NULL, "/tmp/s", ""},
	{"nbd+unix://?socket=/tmp/s", UNIX, NULL, NULL, "/tmp/s", ""},
	{"nbd+unix:///e%2Fx?socket=/tmp/a%20b", UNIX, NULL, NULL, "/tmp/a b",
	 "e/x"},
	{"nbd+unix:///%C3%A9?socket=rel/sock", UNIX, NULL, NULL, "rel/sock",
	 "\xc3\xa9"},
	{"nbd+unix:///e?socket=/s%26t%3Dx%3B", UNIX, NULL, NULL, "/s&t=x;",
	 "e"},

	/* json:, flattened */
	{"json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\","
	 "\"file.server.path\":\"/s\",\"file.export\":\"exp\"}",
	 UNIX, NULL, NULL, "/s", "exp"},
	{"json:{\"file.driver\":\"nbd\",\"file.server.type\":\"inet\","
	 "\"file.server.host\":\"h\",\"file.server.port\":\"10809\","
	 "\"file.export\":\"e\"}",
	 TCP, "h", "10809", NULL, "e"},
	{"json:{\"file.driver\":\"nbd\",\"file.server.type\":\"inet\","
	 "\"file.server.host\":\"::1\",\"file.server.port\":10810}",
	 TCP, "::1", "10810", NULL, ""},
	/* nested */
	{"json:{\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
	 "\"path\":\"/s\"},\"export\":\"exp\"}}",
	 UNIX, NULL, NULL, "/s", "exp"},
	{"json: { \"file\" : { \"driver\" : \"nbd\" , \"server\" : { "
	 "\"type\" : \"inet\" , \"host\" : \"h\" , \"port\" : \"07\" } } } ",
	 TCP, "h", "7", NULL, ""},
	/* mixed */
	{"json:{\"file\":{\"driver\":\"nbd\"},\"file.server.type\":\"unix\","
	 "\"file.server\":{\"path\":\"/s\"}}",
	 UNIX, NULL, NULL, "/s", ""},
	/* legacy keys */
	{"json:{\"file.driver\":\"nbd\",\"file.path\":\"/s\","
	 "\"file.export\":\"e\"}",
	 UNIX, NULL, NULL, "/s", "e"},
	{"json:{\"file\":{\"driver\":\"nbd\",\"host\":\"h\"}}", TCP, "h",
	 "10809", NULL, ""},
	{"json:{\"file\":{\"driver\":\"nbd\",\"host\":\"h\",\"port\":99}}", TCP,
	 "h", "99", NULL, ""},
	{"json:{\"file\":{\"driver\":\"nbd\",\"host\":\"h\",\"port\":\"99\"}}",
	 TCP, "h", "99", NULL, ""},
	/* raw over an nbd file; an nbd node itself */
	{"json:{\"driver\":\"raw\",\"file\":{\"driver\":\"nbd\","
	 "\"server\":{\"type\":\"unix\",\"path\":\"/s\"}}}",
	 UNIX, NULL, NULL, "/s", ""},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
	 "\"path\":\"/s\"},\"export\":\"e\"}",
	 UNIX, NULL, NULL, "/s", "e"},
	{"json:{\"driver\":\"nbd\",\"server.type\":\"inet\","
	 "\"server.host\":\"h\",\"server.port\":\"1\"}",
	 TCP, "h", "1", NULL, ""},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\"}", UNIX, NULL, NULL, "/s",
	 ""},
	/* escapes decode */
	{"json:{\"driver\":\"nbd\",\"path\":\"/tmp/\\u00e9\","
	 "\"export\":\"\\ud83d\\ude00 \\\"q\\\"\"}",
	 UNIX, NULL, NULL, "/tmp/\xc3\xa9", "\xf0\x9f\x98\x80 \"q\""},
};

struct rejected {
	const char *name;
	const char *word; /* in the message */
};

static const struct rejected rejected[] = {
	/* not a URI this parser reads */
	{"", "not nbd://"},
	{"http://h/e", "not nbd://"},
	{"nbd:localhost:10809", "legacy"},
	{"nbd:unix:/tmp/s:exportname=e", "legacy"},
	{"nbd+tcp:h", "not nbd://"},
	{"nbd+unix:/e?socket=/s", "not nbd://"},
	{"nbd+rdma://h/e", "not nbd://"},
	{"NBD://h/e", "not nbd://"},
	/* host and port */
	{"nbd:///exp", "no host"},
	{"nbd://:10809/exp", "no host"},
	{"nbd://h:0/e", "port"},
	{"nbd://h:65536/e", "port"},
	{"nbd://h:/e", "port"},
	{"nbd://h:12a/e", "port"},
	{"nbd://h:-1/e", "port"},
	{"nbd://h:99999999999999999999/", "port"},
	{"nbd://h:1:2/", "port"},
	{"nbd://user@h/e", "user information"},
	{"nbd://[::1/e", "]"},
	{"nbd://[::1]x/e", "garbage after ']'"},
	{"nbd://[]/e", "IPv6"},
	{"nbd://[abc]/e", "IPv6"},
	{"nbd://[::1 ]/e", "IPv6"},
	{"nbd://h%00/e", "bad character in host"},
	{"nbd://h h/e", "bad character in host at byte 7"},
	{"nbd://h%2/e", "bad character in host"},
	/* export */
	{"nbd://h/a b", "bad character in the export at byte 9"},
	{"nbd://h/%zz", "bad character in the export"},
	{"nbd://h/%00", "bad character in the export"},
	{"nbd://h/%4", "bad character in the export"},
	{"nbd://h/\xc3\xa9", "bad character in the export"},
	{"nbd://h/e#frag", "fragment"},
	/* query */
	{"nbd://h/e?socket=/s", "only for nbd+unix"},
	{"nbd://h/e?tls-creds=tls0", "TLS is not supported yet"},
	{"nbd+unix:///e?socket=/s&tls-hostname=x", "TLS is not supported yet"},
	{"nbd+unix:///e?tls=on&socket=/s", "TLS is not supported yet"},
	{"nbd+unix:///e?socket=/s&foo=1", "unknown query parameter \"foo\""},
	{"nbd+unix:///e?Socket=/s", "unknown query parameter"},
	{"nbd+unix:///e", "without socket"},
	{"nbd+unix:///e?", "without socket"},
	{"nbd+unix:///e?socket=", "without a path"},
	{"nbd+unix:///e?socket", "without a path"},
	{"nbd+unix:///e?socket=/a&socket=/b", "twice"},
	{"nbd+unix://host/e?socket=/s", "no host"},
	{"nbd+unix://:1/e?socket=/s", "no host"},
	{"nbd+unix:///e?socket=/s&", "empty query parameter"},
	{"nbd+unix:///e?&socket=/s", "empty query parameter"},
	{"nbd+unix:///e?socket=/s;x", "';'"},
	{"nbd+unix:///e?socket=/a b", "bad character in the query"},
	{"nbd+unix:///e?socket=/a%00", "bad character in the query"},
	{"nbd+unix:///e?socket=/a#b", "fragment"},

	/* json: the text */
	{"json:", "JSON"},
	{"json:{", "end of input"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\"", "end of input"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\"}x", "trailing garbage"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"path\":\"/t\"}",
	 "duplicate key"},
	{"json:[1]", "not an object"},
	{"json:\"nbd://h/e\"", "not an object"},
	/* json: drivers */
	{"json:{}", "file.driver"},
	{"json:{\"file\":\"nbd://h/e\"}", "file.driver"},
	{"json:{\"file\":{}}", "file.driver"},
	{"json:{\"file.driver\":\"file\",\"file.filename\":\"/x\"}",
	 "file.driver \"file\" is not supported"},
	{"json:{\"file.driver\":5}", "must be a string"},
	{"json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"nbd\","
	 "\"path\":\"/s\"}}",
	 "driver \"qcow2\""},
	{"json:{\"driver\":5}", "must be a string"},
	{"json:{\"driver\":\"nbd\",\"file.driver\":\"nbd\",\"path\":\"/s\"}",
	 "\"file.driver\""},
	/* json: keys we do not have */
	{"json:{\"file.driver\":\"nbd\",\"file.server.type\":\"unix\","
	 "\"file.server.path\":\"/s\",\"file.tls-creds\":\"t\"}",
	 "\"file.tls-creds\": TLS is not supported yet"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
	 "\"path\":\"/s\"},\"tls-hostname\":\"x\"}",
	 "TLS is not supported yet"},
	{"json:{\"file.driver\":\"nbd\",\"file.path\":\"/s\","
	 "\"file.reconnect-delay\":5}",
	 "\"file.reconnect-delay\""},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"node-name\":\"n\"}",
	 "\"node-name\""},
	{"json:{\"driver\":\"raw\",\"offset\":0,\"file\":{\"driver\":\"nbd\","
	 "\"path\":\"/s\"}}",
	 "\"offset\""},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"server\":{}}",
	 "\"server\""},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
	 "\"path\":\"/s\",\"abstract\":true}}",
	 "\"server.abstract\""},
	{"json:{\"driver\":\"nbd\",\"path\":[\"/s\"]}", "must be a string"},
	/* json: server */
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"host\":\"h\"}",
	 "together"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"port\":1}", "together"},
	{"json:{\"driver\":\"nbd\",\"port\":\"1\"}", "without"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
	 "\"path\":\"/s\"},\"path\":\"/s\"}",
	 "together"},
	{"json:{\"driver\":\"nbd\",\"export\":\"e\"}", "no server"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"path\":\"/s\"}}",
	 "server.type"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"vsock\"}}",
	 "\"vsock\" is not supported"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"fd\"}}",
	 "\"fd\" is not supported"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":1,\"path\":\"/s\"}}",
	 "must be a string"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\"}}",
	 "server.path"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"unix\","
	 "\"path\":\"/s\",\"host\":\"h\"}}",
	 "server.host"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\"}}",
	 "server.port"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"port\":\"1\"}}",
	 "server.host"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":\"1\",\"path\":\"/s\"}}",
	 "server.path"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":\"0\"}}",
	 "port 1..65535"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":70000}}",
	 "port 1..65535"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":1.5}}",
	 "port 1..65535"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":-1}}",
	 "port 1..65535"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":\"nbd\"}}",
	 "port 1..65535"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"h\",\"port\":true}}",
	 "port 1..65535"},
	{"json:{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\","
	 "\"host\":\"\",\"port\":\"1\"}}",
	 "empty host"},
	/* json: values */
	{"json:{\"driver\":\"nbd\",\"path\":5}", "must be a string"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"export\":null}",
	 "must be a string"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\\u0000x\"}", "NUL"},
	{"json:{\"driver\":\"nbd\",\"path\":\"\"}", "empty socket path"},
	{"json:{\"file\":{\"driver\":\"nbd\",\"path\":\"/s\"},"
	 "\"file.path\":\"/t\"}",
	 "\"file.path\" given twice"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"a\\u0000\":1}", "NUL"},
	{"json:{\"driver\":\"nbd\",\"path\":\"/s\",\"file\":{\"server\":{"
	 "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\":1}}}",
	 "unknown or unsupported key \"file.server.aaaa"},
};

static void expect_str(const char *what, const char *name, const char *got,
		       const char *want)
{
	if (!want)
		ck_assert_msg(!got, "%s: %s is \"%s\", want NULL", name, what,
			      got);
	else
		ck_assert_msg(got && !strcmp(got, want),
			      "%s: %s is \"%s\", want \"%s\"", name, what,
			      got ? got : "(null)", want);
}

static void expect_addr(const char *name, const struct sio_nbd_addr *a,
			const struct accepted *c)
{
	ck_assert_msg(a->transport == c->transport, "%s: transport %d", name,
		      a->transport);
	expect_str("host", name, a->host, c->host);
	expect_str("port", name, a->port, c->port);
	expect_str("socket", name, a->socket, c->socket);
	expect_str("export", name, a->export_name, c->export_name);
}

START_TEST(test_accepted)
{
	const struct accepted *c = &accepted[_i];
	struct sio_nbd_addr a;

	sx_error_clear();
	ck_assert_msg(sio_nbd_name_parse(c->name, &a) == 0, "%s: %s", c->name,
		      sx_last_error());
	expect_addr(c->name, &a, c);
	ck_assert(sio_nbd_name_is_remote(c->name));
	sio_nbd_addr_free(&a);
	ck_assert_ptr_null(a.export_name);
	sio_nbd_addr_free(&a);
	sio_nbd_addr_free(NULL);
}
END_TEST

START_TEST(test_rejected)
{
	const struct rejected *c = &rejected[_i];
	struct sio_nbd_addr a, before;
	int ret;

	memset(&a, 0x5a, sizeof(a));
	memcpy(&before, &a, sizeof(a));
	sx_error_clear();
	ret = sio_nbd_name_parse(c->name, &a);
	ck_assert_msg(ret == -EINVAL, "%s: returned %d, want -EINVAL", c->name,
		      ret);
	ck_assert_msg(!memcmp(&a, &before, sizeof(a)),
		      "%s: *out written on failure", c->name);
	ck_assert_msg(strstr(sx_last_error(), c->word),
		      "%s: message \"%s\" lacks \"%s\"", c->name,
		      sx_last_error(), c->word);
	ck_assert_msg(!strncmp(sx_last_error(), "NBD name \"", 10),
		      "%s: message \"%s\" does not quote the name", c->name,
		      sx_last_error());
	ck_assert_int_eq(sx_last_errno(), EINVAL);
}
END_TEST

/* parse(uri(a)) == a, and uri() of that is the same text. */
static void round_trip(const char *name, const struct sio_nbd_addr *a)
{
	struct accepted want = {name,	 a->transport, a->host,
				a->port, a->socket,    a->export_name};
	struct sio_nbd_addr b;
	char *uri, *uri2;

	uri = sio_nbd_addr_uri(a);
	ck_assert_ptr_nonnull(uri);
	ck_assert_msg(sio_nbd_name_parse(uri, &b) == 0, "%s -> %s: %s", name,
		      uri, sx_last_error());
	expect_addr(uri, &b, &want);
	uri2 = sio_nbd_addr_uri(&b);
	ck_assert_ptr_nonnull(uri2);
	ck_assert_str_eq(uri, uri2);
	free(uri2);
	free(uri);
	sio_nbd_addr_free(&b);
}

START_TEST(test_round_trip)
{
	const struct accepted *c = &accepted[_i];
	struct sio_nbd_addr a;

	ck_assert_int_eq(sio_nbd_name_parse(c->name, &a), 0);
	round_trip(c->name, &a);
	sio_nbd_addr_free(&a);
}
END_TEST

START_TEST(test_canonical)
{
	static const struct {
		const char *name, *uri;
	} cases[] = {
		{"nbd://h/e", "nbd://h:10809/e"},
		{"nbd+tcp://h:010", "nbd://h:10/"},
		{"nbd://[::1]/a%20b/c", "nbd://[::1]:10809/a%20b/c"},
		{"nbd://[fe80::1%25eth0]:1/", "nbd://[fe80::1%25eth0]:1/"},
		{"nbd://h/%7e%41", "nbd://h:10809/~A"},
		{"nbd://h/a;b", "nbd://h:10809/a%3Bb"},
		{"nbd+unix://?socket=/tmp/s", "nbd+unix:///?socket=/tmp/s"},
		{"nbd+unix:///e%2Fx?socket=/tmp/a%20b",
		 "nbd+unix:///e/x?socket=/tmp/a%20b"},
		{"json:{\"driver\":\"nbd\",\"path\":\"/s&t=#\","
		 "\"export\":\"a?b\"}",
		 "nbd+unix:///a%3Fb?socket=/s%26t%3D%23"},
		{"json:{\"driver\":\"nbd\",\"host\":\"::1\",\"port\":5}",
		 "nbd://[::1]:5/"},
	};
	struct sio_nbd_addr a;
	size_t i;
	char *uri;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		ck_assert_msg(sio_nbd_name_parse(cases[i].name, &a) == 0,
			      "%s: %s", cases[i].name, sx_last_error());
		uri = sio_nbd_addr_uri(&a);
		ck_assert_ptr_nonnull(uri);
		ck_assert_str_eq(uri, cases[i].uri);
		free(uri);
		sio_nbd_addr_free(&a);
	}
}
END_TEST

/* Addresses no URI above names: every byte value in every field. */
START_TEST(test_round_trip_bytes)
{
	char all[256], host[64] = "h ost[]%@/?#";
	struct sio_nbd_addr a = {0};
	int i;

	for (i = 1; i < 256; i++)
		all[i - 1] = (char)i;
	all[255] = '\0';

	a.transport = SIO_NBD_TCP;
	a.host = host;
	a.port = "65535";
	a.export_name = all;
	round_trip("tcp, every byte", &a);
	a.host = "fe80::1%eth0]";
	round_trip("tcp, ipv6", &a);
	a.export_name = "";
	round_trip("tcp, no export", &a);

	a.transport = SIO_NBD_UNIX;
	a.host = a.port = NULL;
	a.socket = "/tmp/?&=;#% +\x01\x7f\xff";
	a.export_name = all;
	round_trip("unix, every byte", &a);
	a.export_name = "";
	round_trip("unix, no export", &a);

	/* No address, no URI. */
	a.socket = NULL;
	ck_assert_ptr_null(sio_nbd_addr_uri(&a));
	ck_assert_ptr_null(sio_nbd_addr_uri(NULL));
}
END_TEST

START_TEST(test_lengths)
{
	char name[8192], longstr[5000];
	struct sio_nbd_addr a;

	/* The kernel's sun_path holds 107 bytes and a NUL. */
	memset(longstr, 'x', 106);
	longstr[106] = '\0';
	snprintf(name, sizeof(name), "nbd+unix:///e?socket=/%s", longstr);
	ck_assert_int_eq(sio_nbd_name_parse(name, &a), 0);
	ck_assert_uint_eq(strlen(a.socket), 107);
	sio_nbd_addr_free(&a);
	snprintf(name, sizeof(name), "nbd+unix:///e?socket=/%sy", longstr);
	ck_assert_int_eq(sio_nbd_name_parse(name, &a), -EINVAL);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "longer than 107"));

	/* NBD export names are at most 4096 bytes. */
	memset(longstr, 'e', 4096);
	longstr[4096] = '\0';
	snprintf(name, sizeof(name), "nbd://h/%s", longstr);
	ck_assert_int_eq(sio_nbd_name_parse(name, &a), 0);
	sio_nbd_addr_free(&a);
	snprintf(name, sizeof(name), "nbd://h/%se", longstr);
	ck_assert_int_eq(sio_nbd_name_parse(name, &a), -EINVAL);
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "longer than 4096"));
	/* The message quotes a long name cut short. */
	ck_assert_ptr_nonnull(strstr(sx_last_error(), "eee...\": "));
	/* Encoded bytes count once decoded. */
	longstr[4095] = '\0';
	snprintf(name, sizeof(name), "nbd://h/%s%%41", longstr);
	ck_assert_int_eq(sio_nbd_name_parse(name, &a), 0);
	sio_nbd_addr_free(&a);

	ck_assert_int_eq(sio_nbd_name_parse(NULL, &a), -EINVAL);
	ck_assert_int_eq(sio_nbd_name_parse("nbd://h/", NULL), -EINVAL);
}
END_TEST

START_TEST(test_is_remote)
{
	static const char *const remote[] = {
		"nbd://h/e",   "nbd:",	   "nbd:h:1",
		"nbd+tcp://h", "nbd+tcp:", "nbd+unix:///e?socket=/s",
		"nbd+unix:",   "json:{",   "json:",
	};
	static const char *const local[] = {
		"",	   "base.qcow2", "/nbd://x", "./json:{}",
		"NBD://h", "nbd",	 "json",     "nbd+rdma://h",
		"nbd+tcp", "Json:{}",	 " nbd://h", "dir/nbd:x",
	};
	size_t i;

	for (i = 0; i < sizeof(remote) / sizeof(remote[0]); i++)
		ck_assert_msg(sio_nbd_name_is_remote(remote[i]), "%s",
			      remote[i]);
	for (i = 0; i < sizeof(local) / sizeof(local[0]); i++)
		ck_assert_msg(!sio_nbd_name_is_remote(local[i]), "%s",
			      local[i]);
	ck_assert(!sio_nbd_name_is_remote(NULL));
}
END_TEST

/* A small deterministic generator, so a failure replays. */
static unsigned next_rand(unsigned *state)
{
	*state = *state * 1103515245u + 12345u;
	return *state >> 16;
}

/*
 * Every accepted name, mutated at random (bytes replaced, dropped,
 * duplicated, cut): the parser answers 0 or -EINVAL, never anything
 * else, and whatever it accepts comes back the same through its URI.
 * Run under ASan/UBSan, this is a small fuzzer.
 */
START_TEST(test_mutations)
{
	static const char alphabet[] = "%[]:/?&=;#@\\\"{},.0a\x80\xff";
	const char *orig = accepted[_i].name;
	size_t len = strlen(orig), n, pos;
	unsigned state = 0x5eed + (unsigned)_i;
	struct sio_nbd_addr a;
	char buf[1024];
	int round, k, ret;

	ck_assert_uint_lt(len * 2, sizeof(buf));
	for (round = 0; round < 2000; round++) {
		memcpy(buf, orig, len + 1);
		n = len;
		for (k = 0; k < 1 + (int)(next_rand(&state) % 3); k++) {
			pos = next_rand(&state) % (n + 1);
			switch (next_rand(&state) % 4) {
			case 0: /* replace */
				if (pos < n)
					buf[pos] = alphabet[next_rand(&state) %
							    (sizeof(alphabet) -
							     1)];
				break;
			case 1: /* drop */
				if (pos < n) {
					memmove(buf + pos, buf + pos + 1,
						n - pos);
					n--;
				}
				break;
			case 2: /* duplicate */
				if (pos < n && n + 1 < sizeof(buf)) {
					memmove(buf + pos + 1, buf + pos,
						n - pos + 1);
					n++;
				}
				break;
			default: /* cut */
				buf[pos] = '\0';
				n = pos;
				break;
			}
		}
		ret = sio_nbd_name_parse(buf, &a);
		ck_assert_msg(ret == 0 || ret == -EINVAL, "%s: %d", buf, ret);
		if (ret)
			continue;
		round_trip(buf, &a);
		sio_nbd_addr_free(&a);
	}
}
END_TEST

static Suite *nbd_name_suite(void)
{
	Suite *s = suite_create("nbd_name");
	TCase *tc = tcase_create("names");
	int n_ok = (int)(sizeof(accepted) / sizeof(accepted[0]));
	int n_bad = (int)(sizeof(rejected) / sizeof(rejected[0]));

	tcase_add_loop_test(tc, test_accepted, 0, n_ok);
	tcase_add_loop_test(tc, test_rejected, 0, n_bad);
	tcase_add_loop_test(tc, test_round_trip, 0, n_ok);
	tcase_add_loop_test(tc, test_mutations, 0, n_ok);
	tcase_add_test(tc, test_canonical);
	tcase_add_test(tc, test_round_trip_bytes);
	tcase_add_test(tc, test_lengths);
	tcase_add_test(tc, test_is_remote);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return run_suite(nbd_name_suite(), NULL, 0);
}

#!/usr/bin/env python3
"""Seed inputs for the text parsers' fuzz targets, written by hand from
RFC 8259 and from the names QEMU writes (io/nbd_name.h): valid texts of
each form and near misses that each rule of the parsers refuses, one file
each in DIR. Usage: text_seeds.py json|nbd_name DIR"""
import os
import sys

JSON = [
    b'null', b'true', b'false', b'0', b'-12.5e+3', b'9223372036854775807',
    b'-9223372036854775809', b'"a\\u00e9\\ud83d\\ude00\\n\\"\\\\\\/"',
    b'[]', b'{}', b'[1, [2, [3, {"a": [null]}]], "x"]',
    b'{"driver": "nbd", "server": {"type": "unix", "path": "/run/s"},'
    b' "export": "disk"}',
    b'{"file": {"driver": "nbd", "host": "::1", "port": "10809"}}',
    b'{"file.driver": "nbd", "file.server.type": "inet",'
    b' "file.server.host": "example.org", "file.server.port": "10810"}',
    b'{"a": 1, "a": 2}', b'[1,]', b'{"a" 1}', b'"\\ud800"', b'"\xc3\x28"',
    b'"\x01"', b'01', b'1.', b'-', b'[' * 70 + b']' * 70, b'"\\u0000k"',
    b'{"\\u0000": 0}', b' \t\r\n 42 \n', b'1 2', b'nul', b'"\xf4\x90\x80\x80"',
]

NBD = [
    b'nbd://localhost', b'nbd://localhost:10810/disk',
    b'nbd+tcp://192.0.2.1/export%20name', b'nbd://[::1]:10809/',
    b'nbd+unix:///disk?socket=/run/nbd.sock', b'nbd+unix://?socket=/s',
    b'nbd://host/a?tls-creds=x', b'nbd://host:99999/', b'nbd://:1/',
    b'nbd://h/%zz', b'nbd+unix:///e?socket=' + b'p' * 120,
    b'nbd+unix:///e?socket=/s&unknown=1', b'nbd:host:10809',
    b'json:{"file": {"driver": "nbd", "server": {"type": "unix",'
    b' "path": "/run/s"}, "export": "disk"}}',
    b'json:{"file.driver": "nbd", "file.server.type": "inet",'
    b' "file.server.host": "h", "file.server.port": "1", "file.export": ""}',
    b'json:{"driver": "nbd", "host": "h", "port": "10809"}',
    b'json:{"file": {"driver": "file", "filename": "/x"}}', b'json:[]',
    b'json:{"file": {"driver": "nbd", "tls-creds": "t"}}', b'/local/path',
]

kind, d = sys.argv[1], sys.argv[2]
os.makedirs(d, exist_ok=True)
for i, data in enumerate({"json": JSON, "nbd_name": NBD}[kind]):
    with open(os.path.join(d, "%s-%02d" % (kind, i)), "wb") as f:
        f.write(data)

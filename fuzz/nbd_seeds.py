#!/usr/bin/env python3
"""Seed inputs for fuzz_nbd_server: client byte streams written from the
NBD specification (a handshake with each option, then requests of each
command), one file each in the directory given. Usage: nbd_seeds.py DIR"""
import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054


def opt(n, data=b""):
    return struct.pack(">QII", IHAVEOPT, n, len(data)) + data


def go(name=b"disk"):
    return opt(7, struct.pack(">I", len(name)) + name +
               struct.pack(">HH", 1, 3))


def meta(set_, name=b"disk", q=b"base:allocation"):
    return opt(10 if set_ else 9, struct.pack(">I", len(name)) + name +
               struct.pack(">II", 1, len(q)) + q)


def req(cmd, off, ln, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off,
                       ln) + payload


FLAGS = struct.pack(">I", 3)
SEEDS = {
    "list": FLAGS + opt(3) + opt(2),
    "info": FLAGS + opt(6, struct.pack(">I", 4) + b"disk" +
                        struct.pack(">H", 0)) + opt(2),
    "export-name": FLAGS + opt(1, b"disk") + req(0, 0, 4096) + req(2, 0, 0),
    "go-simple": FLAGS + go() + req(0, 512, 4096) +
    req(1, 0, 512, payload=b"\x5a" * 512) + req(3, 0, 0) + req(2, 0, 0),
    "go-structured": FLAGS + opt(8) + meta(False) + meta(True) + go() +
    req(0, 0, 65536, flags=4) + req(7, 0, 1 << 20) +
    req(7, 0, 4096, flags=8) + req(6, 4096, 8192, flags=2) +
    req(4, 65536, 65536) + req(5, 0, 65536) +
    req(1, 1048064, 512, flags=1, payload=b"\xa5" * 512) + req(2, 0, 0),
    "bad": FLAGS + opt(8) + go() + req(0, (1 << 64) - 512, 1024) +
    req(99, 0, 0) + req(0, 0, 1 << 26) + struct.pack(">I", 0xdeadbeef),
}

d = sys.argv[1]
os.makedirs(d, exist_ok=True)
for name, data in SEEDS.items():
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

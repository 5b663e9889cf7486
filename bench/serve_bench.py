#!/usr/bin/env python3
"""`siphon serve` against qemu-storage-daemon's NBD export (issue 13).

One qcow2 image of --size (64 KiB clusters, every cluster allocated with
incompressible data, no backing) is exported on a Unix socket in the bench
directory by each server in turn, and fio's nbd engine measures, for
--secs seconds per run (page cache dropped before each):

  randread   4 KiB random reads, 4 connections (jobs) x QD 8 = 32 in flight
  randwrite  4 KiB random writes, the same shape
  seqread    1 MiB sequential reads, 1 connection, QD 8

Servers:
  siphon       siphon serve IMAGE=disk (O_DIRECT, io_uring; a write is
               answered when the disk completed it)
  siphon-wb    the same with --cache writeback (a write is answered when
               it is handed to the disk, at most 256 / 32 MiB ahead)
  qsd          qemu-storage-daemon --export type=nbd over file + qcow2,
               its default options (the host page cache)
  qsd-direct   the same with cache.direct=on,aio=io_uring

Then, with --stream: a thin overlay over a raw base of the same data,
served by `siphon serve --stream`: the same 4 KiB random reads while the
stream runs, p99 against the same reads on the idle, fully local image
(target: at most 2x), and whether the stream finished.

And siphon serve's memory: peak RSS (VmHWM) with 1, 16 and 64 clients
connected and in transmission (idle).

Medians of --reps. Targets printed: siphon >= 1.2x qsd's IOPS for 4 KiB
random reads and not below qsd anywhere.

Usage: bench/serve_bench.py [--size 1G] [--secs 10] [--reps 3]
       [--siphon build-release/tools/siphon] [--only siphon,qsd,...]
       [--stream] [--json FILE] [--dir /var/tmp/siphon-bench]
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

from benchlib import (MiB, default_siphon, drop_caches, human, make_raw_base,
                      need_tools, parse_size, run)

SERVERS = ("siphon", "siphon-wb", "qsd", "qsd-direct")
# Who is compared with whom: the same write semantics side by side (a
# write answered once on the disk: siphon's default and qsd's
# cache.direct=on; answered from a cache, durable at FLUSH: siphon's
# --cache writeback and qsd's default page cache), and the target
# (qsd's defaults) against each siphon mode.
PAIRS = (("siphon", "qsd-direct"), ("siphon-wb", "qsd"), ("siphon", "qsd"))
JOBS = {
    "randread": ["--rw=randread", "--bs=4k", "--numjobs=4", "--iodepth=8"],
    "randwrite": ["--rw=randwrite", "--bs=4k", "--numjobs=4",
                  "--iodepth=8"],
    "seqread": ["--rw=read", "--bs=1M", "--numjobs=1", "--iodepth=8"],
}


def uri(sock):
    return "nbd+unix:///disk?socket=" + sock


def wait_listen(p, sock, what):
    for _ in range(600):
        if p.poll() is not None:
            raise RuntimeError("%s exited: %s" % (what, p.stderr.read()))
        if os.path.exists(sock):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise RuntimeError("%s never listened on %s" % (what, sock))


def start(kind, siphon, img, sock, extra=()):
    if os.path.exists(sock):
        os.unlink(sock)
    if kind.startswith("siphon"):
        if kind == "siphon-wb":
            extra = ["--cache", "writeback"] + list(extra)
        cmd = [siphon, "serve", "--log-level", "warn", "--listen",
               "unix:" + sock] + list(extra) + [img + "=disk"]
    else:
        f = "driver=file,filename=%s,node-name=f0" % img
        if kind == "qsd-direct":
            f += ",cache.direct=on,aio=io_uring"
        cmd = ["qemu-storage-daemon", "--blockdev", f,
               "--blockdev", "driver=qcow2,file=f0,node-name=d0",
               "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
               "--export", "type=nbd,id=e0,node-name=d0,name=disk,"
               "writable=on"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    wait_listen(p, sock, kind)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def fio(sock, job, secs, size):
    """(IOPS, MiB/s, read p99 in us or None) of one fio run."""
    drop_caches()
    p = run(["fio", "--name=j", "--ioengine=nbd", "--uri=" + uri(sock),
             "--time_based", "--runtime=%d" % secs, "--size=%d" % size,
             "--group_reporting", "--output-format=json"] + JOBS[job])
    rep = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = rep["write"] if job == "randwrite" else rep["read"]
    p99 = None
    pct = side.get("clat_ns", {}).get("percentile", {})
    if "99.000000" in pct:
        p99 = pct["99.000000"] / 1000.0
    return side["iops"], side["bw_bytes"] / MiB, p99


def rss_with_clients(siphon, img, d, counts):
    """Peak RSS (KiB) of siphon serve with n idle clients in transmission."""
    sock = os.path.join(d, "rss.sock")
    out = {}
    for n in counts:
        p = start("siphon", siphon, img, sock,
                  ["--max-connections", str(max(n, 64))])
        conns = []
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.recv(18, socket.MSG_WAITALL)
                name = b"disk"
                s.sendall(struct.pack(">I", 3) + struct.pack(
                    ">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) +
                    struct.pack(">I", len(name)) + name +
                    struct.pack(">H", 0))
                conns.append(s)
            time.sleep(0.5)
            with open("/proc/%d/status" % p.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[n] = int(line.split()[1])
        finally:
            for s in conns:
                s.close()
            stop(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--siphon", default=default_siphon())
    ap.add_argument("--only", default=",".join(SERVERS))
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--dir")
    a = ap.parse_args()
    need_tools("fio", "qemu-img", "qemu-storage-daemon")
    size = parse_size(a.size)
    want = a.only.split(",")
    siphon = os.path.abspath(a.siphon)
    d = tempfile.mkdtemp(prefix="siphon-serve-bench-", dir=a.dir)
    res = {"size": size, "secs": a.secs, "reps": a.reps, "rows": {}}
    try:
        base = os.path.join(d, "base.raw")
        img = os.path.join(d, "img.qcow2")
        print("building a %s image" % human(size), flush=True)
        make_raw_base(base, size)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
             "cluster_size=65536", base, img])
        sock = os.path.join(d, "nbd.sock")
        for rep in range(a.reps):
            for kind in SERVERS:
                if kind not in want:
                    continue
                p = start(kind, siphon, img, sock)
                try:
                    for job in JOBS:
                        iops, mibs, p99 = fio(sock, job, a.secs, size)
                        res["rows"].setdefault(kind, {}).setdefault(
                            job, []).append([iops, mibs, p99])
                        print("  rep %d %-10s %-9s %9.0f IOPS %8.1f MiB/s"
                              "%s" % (rep + 1, kind, job, iops, mibs,
                                      "" if p99 is None else
                                      "  p99 %.0f us" % p99), flush=True)
                finally:
                    rc = stop(p)
                if rc not in (0, -15):
                    print("  note: %s exited %s" % (kind, rc))
        med = {k: {j: [statistics.median(x[i] for x in v)
                       if v[0][i] is not None else None
                       for i in range(3)]
                   for j, v in jobs.items()}
               for k, jobs in res["rows"].items()}
        res["medians"] = med
        print()
        print("%-10s %-9s %10s %10s %10s" % ("server", "job", "IOPS",
                                             "MiB/s", "p99 us"))
        for k, jobs in med.items():
            for j, (iops, mibs, p99) in jobs.items():
                print("%-10s %-9s %10.0f %10.1f %10s" % (
                    k, j, iops, mibs, "-" if p99 is None else
                    "%.0f" % p99))
        for ours, peer in PAIRS:
            if ours not in med or peer not in med:
                continue
            for j in JOBS:
                r = med[ours][j][0] / med[peer][j][0]
                target = 1.2 if j == "randread" else 1.0
                print("%-9s vs %-10s %-9s %5.2fx  (target >= %.1fx%s)"
                      % (ours, peer, j, r, target,
                         "" if r >= target else ": missed"))
        if a.stream and "siphon" in want:
            top = os.path.join(d, "top.qcow2")
            idle = med.get("siphon", {}).get("randread", [0, 0, None])[2]
            p99s, done = [], []
            for rep in range(a.reps):
                if os.path.exists(top):
                    os.unlink(top)
                run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base,
                     "-F", "raw", "-o", "cluster_size=65536", top])
                log = os.path.join(d, "stream.log")
                with open(log, "w") as lf:
                    p = subprocess.Popen(
                        [siphon, "serve", "--stream", "--listen",
                         "unix:" + sock, top + "=disk"],
                        stdout=lf, stderr=subprocess.STDOUT)
                try:
                    wait_listen(p, sock, "siphon serve --stream")
                    _, _, p99 = fio(sock, "randread", a.secs, size)
                    p99s.append(p99)
                    t = time.monotonic()
                    while time.monotonic() - t < 600:
                        if "stream completed" in open(log).read():
                            break
                        time.sleep(0.2)
                finally:
                    stop(p)
                done.append("stream completed" in open(log).read())
                print("  rep %d streaming: randread p99 %.0f us, stream %s"
                      % (rep + 1, p99, "completed" if done[-1]
                         else "NOT completed"), flush=True)
            s99 = statistics.median(p99s)
            res["stream"] = {"p99_us": p99s, "completed": done,
                             "idle_p99_us": idle}
            if idle:
                print("randread p99 while streaming %.0f us, idle %.0f us:"
                      " %.2fx  (target <= 2.0x%s)" % (
                          s99, idle, s99 / idle,
                          "" if s99 / idle <= 2.0 else ": missed"))
            print("streams completed: %d of %d" % (sum(done), len(done)))
        if "siphon" in want:
            rss = rss_with_clients(siphon, img, d, (1, 16, 64))
            res["rss_kib"] = rss
            print("siphon serve peak RSS: " + ", ".join(
                "%d clients %.1f MiB" % (n, k / 1024) for n, k in
                rss.items()))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

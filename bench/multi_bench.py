#!/usr/bin/env python3
"""Many disks streaming at once against one big stream, on the same device.

Builds DISKS overlays of SIZE each (every one a qcow2 over its own raw base
full of incompressible data, nothing local yet) and one overlay of
DISKS x SIZE bytes, then times, each run with a dropped page cache:

  single       `siphon stream` of the big overlay (one disk)
  multi        bench/multi_stream: all DISKS attached to one domain, all
               streaming CONTINUOUS at once (public API only)

Every streamed image is checked with qemu-img compare (against its base) and
qemu-img check. Prints the medians, the aggregate throughput ratio
multi/single (target >= 0.9), the slowest disk's time over the fastest's
(target <= 1.5), multi's peak RSS (target <= 64 MiB + 1 MiB per disk) and
the most threads it had.

Usage: bench/multi_bench.py [--disks 64] [--size 64M] [--reps 3]
       [--workers N] [--dir /var/tmp/siphon-bench] [--build build]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import MiB, drop_caches, parse_size, run


def make_base(path, size):
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def make_top(top, base):
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
         top])


def verify(top, base):
    c = subprocess.run(["qemu-img", "compare", "-q", top, base])
    k = subprocess.run(["qemu-img", "check", "-q", top],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return c.returncode == 0 and k.returncode == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disks", type=int, default=64)
    ap.add_argument("--size", type=parse_size, default=parse_size("64M"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0,
                    help="the domain's worker threads (0: one per CPU)")
    ap.add_argument("--dir", default=os.environ.get(
        "BENCH_DIR", "/var/tmp/siphon-bench"))
    ap.add_argument("--build", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "build"))
    a = ap.parse_args()

    build = os.path.abspath(a.build)
    siphon = os.path.join(build, "tools", "siphon")
    multi = os.path.join(build, "bench", "multi_stream")
    for tool in ("qemu-img",):
        if not shutil.which(tool):
            sys.exit("missing " + tool)
    d = os.path.join(os.path.abspath(a.dir), "multi")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    try:
        bench(a, d, siphon, multi)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench(a, d, siphon, multi):
    wopt = ["--workers", str(a.workers)] if a.workers else []
    total = a.disks * a.size
    print("building %d bases of %d MiB and one of %d MiB" %
          (a.disks, a.size // MiB, total // MiB), flush=True)
    bases = []
    for i in range(a.disks):
        b = os.path.join(d, "base%02d.raw" % i)
        make_base(b, a.size)
        bases.append(b)
    big = os.path.join(d, "big.raw")
    make_base(big, total)
    res = {"single": [], "multi": []}
    spread, rss, threads, own = [], [], [], []
    ok = True
    for rep in range(a.reps):
        print("repetition %d/%d" % (rep + 1, a.reps), flush=True)
        top = os.path.join(d, "big.qcow2")
        make_top(top, big)
        drop_caches()
        t = time.monotonic()
        run([siphon, "stream", "--no-progress", top])
        el = time.monotonic() - t
        good = verify(top, big)
        ok &= good
        res["single"].append(el)
        print("  single %8.3f s%s" % (el, "" if good else "  VERIFY FAILED"),
              flush=True)
        os.unlink(top)

        tops = []
        for i, b in enumerate(bases):
            t_ = os.path.join(d, "top%02d.qcow2" % i)
            make_top(t_, b)
            tops.append(t_)
        drop_caches()
        p = run([multi] + wopt + tops)
        r = json.loads(p.stdout)
        good = all(verify(t_, b) for t_, b in zip(tops, bases))
        ok &= good
        res["multi"].append(r["seconds"])
        per = r["per_disk"]
        spread.append(max(per) / min(per))
        rss.append(r["max_rss_kib"] / 1024)
        threads.append(r["max_threads"])
        own.append(r.get("max_own_threads", -1))
        print("  multi  %8.3f s  slowest/fastest %.2f  rss %.1f MiB  "
              "threads %d%s" % (r["seconds"], spread[-1], rss[-1],
                                threads[-1],
                                "" if good else "  VERIFY FAILED"),
              flush=True)
        for t_ in tops:
            os.unlink(t_)

    s = statistics.median(res["single"])
    m = statistics.median(res["multi"])
    print()
    print("%d disks x %d MiB vs one disk of %d MiB, %d reps (medians)" %
          (a.disks, a.size // MiB, total // MiB, a.reps))
    print("single %8.3f s  %8.1f MiB/s" % (s, total / MiB / s))
    print("multi  %8.3f s  %8.1f MiB/s" % (m, total / MiB / m))
    print("aggregate multi / single: %.2fx  (target >= 0.9x)" % (s / m))
    print("slowest / fastest disk: %.2f  (target <= 1.5)" %
          statistics.median(spread))
    print("peak RSS: %.1f MiB  (target <= %d MiB)" %
          (max(rss), 64 + a.disks))
    print("most threads: %d (without io_uring's kernel workers iou-wrk: %d)"
          % (max(threads), max(own)))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()

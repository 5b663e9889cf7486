#!/usr/bin/env python3
"""Streaming throughput: siphon against qemu and against the device limit.

Builds a chain (raw base full of incompressible data, qcow2 overlay holding
about 10% of the clusters already), then measures in one run, several
repetitions each, with the page cache dropped before every run (when root):

  fio-seq      fio reads the bytes that must move, then writes them (O_DIRECT)
  fio-both     a fio read job and a write job running together
  qsd-stream   qemu-storage-daemon running a QMP block-stream job
  img-rebase   qemu-img rebase -f qcow2 -b '' -t none -T none
  img-convert  qemu-img convert -O qcow2 -t none -T none
  siphon       siphon stream
  siphon-ref   the same with another build (--siphon-ref), e.g. the
               previous commit's, to compare two versions in one run

Every result is checked with qemu-img compare (against the original chain)
and qemu-img check. Prints a table of median seconds, spread, MiB/s and the
ratios the issue sets as targets. With --sparse-tib, also streams a 1 TiB
overlay over a sparse base holding the same amount of data, and reports
siphon's peak resident memory (/usr/bin/time -v) for both cases.

Usage: bench/stream_bench.py [--size 1G] [--cluster-size 64k] [--reps 3]
       [--dir /var/tmp/siphon-bench] [--siphon build/tools/siphon]
       [--sparse-tib] [--siphon-ref OTHER/build/tools/siphon]
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time

from benchlib import MiB, drop_caches, parse_size, run


def qemu_io_script(img, cmds, fmt="qcow2"):
    """Run many qemu-io commands in one process (stdin)."""
    p = subprocess.run(["qemu-io", "-f", fmt, img], input="\n".join(cmds) +
                       "\nquit\n", text=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit("qemu-io failed: " + p.stderr)


def build_chain(d, size, cs, sparse_total=None):
    """Base raw + overlay qcow2 with ~10% of clusters local.

    sparse_total: virtual size of a sparse case; the base then holds `size`
    bytes of data spread in 1 MiB chunks over the whole disk."""
    base = os.path.join(d, "base.raw")
    top = os.path.join(d, "top.pristine.qcow2")
    vsize = sparse_total or size
    chunk = MiB
    with open(base, "wb") as f:
        f.truncate(vsize)
        nchunks = size // chunk
        stride = vsize // nchunks
        for i in range(nchunks):
            f.seek(i * stride)
            f.write(os.urandom(chunk))
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "cluster_size=%d" % cs, "-b", base, "-F", "raw", top])
    # ~10% of the data clusters, spread evenly, written into the overlay
    cmds = []
    nclusters = size // cs
    step = 10
    for i in range(0, nclusters, step):
        if sparse_total:
            off = (i * cs // chunk) * stride + (i * cs) % chunk
        else:
            off = i * cs
        cmds.append("write -P 0x5a %d %d" % (off, cs))
    qemu_io_script(top, cmds)
    return base, top


def fresh_top(d, pristine):
    top = os.path.join(d, "top.qcow2")
    shutil.copyfile(pristine, top)
    return top


def verify(d, top, pristine, base):
    """top (streamed, standalone) must read as the pristine chain."""
    ref = os.path.join(d, "ref.qcow2")
    shutil.copyfile(pristine, ref)
    try:
        c = subprocess.run(["qemu-img", "compare", "-q", top, ref])
        k = subprocess.run(["qemu-img", "check", "-q", top],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return c.returncode == 0 and k.returncode == 0
    finally:
        os.unlink(ref)


def timed(cmd, **kw):
    drop_caches()
    t = time.monotonic()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, **kw)
    el = time.monotonic() - t
    if p.returncode != 0:
        raise RuntimeError("%s failed: %s" % (cmd[0], p.stderr.strip()))
    return el, p


def qmp(sock_path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(sock_path)
            break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                if "error" in msg:
                    raise RuntimeError("QMP %s: %s" % (name, msg["error"]))
                return msg

    def event(name):
        while True:
            msg = json.loads(f.readline())
            if msg.get("event") == name:
                return msg
    return s, cmd, event


def run_qsd(d, top):
    sock = os.path.join(d, "qmp.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    drop_caches()
    p = subprocess.Popen([
        "qemu-storage-daemon",
        "--chardev", "socket,path=%s,server=on,wait=off,id=qmp0" % sock,
        "--monitor", "chardev=qmp0",
        "--blockdev", "driver=file,filename=%s,node-name=file0,"
        "cache.direct=on,aio=io_uring" % top,
        "--blockdev", "driver=qcow2,file=file0,node-name=top0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        s, cmd, event = qmp(sock)
        cmd("qmp_capabilities")
        t = time.monotonic()
        cmd("block-stream", **{"job-id": "s0", "device": "top0"})
        ev = event("BLOCK_JOB_COMPLETED")
        el = time.monotonic() - t
        if "error" in ev.get("data", {}):
            raise RuntimeError("block-stream: " + ev["data"]["error"])
        cmd("quit")
        s.close()
    finally:
        p.wait(timeout=60)
    return el


def fio_times(d, nbytes):
    """Device limit: read nbytes then write nbytes (seq), and both at once."""
    src = os.path.join(d, "fio.src")
    dst = os.path.join(d, "fio.dst")
    with open(src, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(os.urandom(MiB))
    common = ["--ioengine=io_uring", "--direct=1", "--bs=1M",
              "--iodepth=16", "--size=%d" % nbytes, "--end_fsync=1",
              "--output-format=json"]
    drop_caches()
    t = time.monotonic()
    run(["fio", "--name=r", "--rw=read", "--filename=" + src] + common)
    run(["fio", "--name=w", "--rw=write", "--filename=" + dst] + common)
    seq = time.monotonic() - t
    os.unlink(dst)
    drop_caches()
    t = time.monotonic()
    run(["fio", "--name=r", "--rw=read", "--filename=" + src,
         "--name=w", "--rw=write", "--filename=" + dst] + common)
    both = time.monotonic() - t
    os.unlink(dst)
    os.unlink(src)
    return seq, both


def rss_kib(stderr):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) if m else -1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--cluster-size", type=parse_size, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=os.environ.get(
        "BENCH_DIR", "/var/tmp/siphon-bench"))
    ap.add_argument("--siphon", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "build", "tools",
        "siphon"))
    ap.add_argument("--siphon-ref", default="",
                    help="another siphon binary, timed the same way "
                    "(row siphon-ref)")
    ap.add_argument("--sparse-tib", action="store_true",
                    help="also stream a 1 TiB sparse overlay with the same "
                    "amount of data")
    ap.add_argument("--only", default="",
                    help="comma-separated subset of the methods")
    a = ap.parse_args()

    for tool in ("qemu-img", "qemu-io", "qemu-storage-daemon", "fio"):
        if not shutil.which(tool):
            sys.exit("missing %s" % tool)
    d = os.path.join(a.dir, "stream")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    try:
        bench(a, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench(a, d):
    siphon = os.path.abspath(a.siphon)
    base, pristine = build_chain(d, a.size, a.cluster_size)
    moved = a.size - (a.size // a.cluster_size + 9) // 10 * a.cluster_size
    only = set(filter(None, a.only.split(",")))
    results = {}

    def want(name):
        return not only or name in only

    def record(name, secs, ok=True):
        results.setdefault(name, []).append(secs)
        if not ok:
            results.setdefault(name + " (FAILED VERIFY)", []).append(secs)
        print("  %-12s %8.3f s%s" % (name, secs, "" if ok else
                                     "  VERIFY FAILED"), flush=True)

    rss = {}
    for rep in range(a.reps):
        print("repetition %d/%d" % (rep + 1, a.reps), flush=True)
        if want("fio-seq") or want("fio-both"):
            seq, both = fio_times(d, moved)
            record("fio-seq", seq)
            record("fio-both", both)
        if want("qsd-stream"):
            top = fresh_top(d, pristine)
            el = run_qsd(d, top)
            record("qsd-stream", el, verify(d, top, pristine, base))
        if want("img-rebase"):
            top = fresh_top(d, pristine)
            el, _ = timed(["qemu-img", "rebase", "-f", "qcow2", "-b", "",
                           "-t", "none", "-T", "none", top])
            record("img-rebase", el, verify(d, top, pristine, base))
        if want("img-convert"):
            top = fresh_top(d, pristine)
            out = os.path.join(d, "conv.qcow2")
            el, _ = timed(["qemu-img", "convert", "-O", "qcow2", "-t",
                           "none", "-T", "none", top, out])
            record("img-convert", el, verify(d, out, pristine, base))
            os.unlink(out)
        if want("siphon"):
            top = fresh_top(d, pristine)
            el, p = timed(["/usr/bin/time", "-v", siphon, "stream",
                           "--no-progress", top])
            rss["dense"] = max(rss.get("dense", 0), rss_kib(p.stderr))
            record("siphon", el, verify(d, top, pristine, base))
        if a.siphon_ref and want("siphon-ref"):
            top = fresh_top(d, pristine)
            el, p = timed([os.path.abspath(a.siphon_ref), "stream",
                           "--no-progress", top])
            record("siphon-ref", el, verify(d, top, pristine, base))

    if a.sparse_tib and want("siphon"):
        sd = os.path.join(d, "sparse")
        os.makedirs(sd)
        sbase, spristine = build_chain(sd, a.size, a.cluster_size,
                                       sparse_total=1 << 40)
        for rep in range(a.reps):
            top = fresh_top(sd, spristine)
            el, p = timed(["/usr/bin/time", "-v", siphon, "stream",
                           "--no-progress", top])
            rss["sparse-1TiB"] = max(rss.get("sparse-1TiB", 0),
                                     rss_kib(p.stderr))
            record("siphon-1TiB", el, verify(sd, top, spristine, sbase))
        shutil.rmtree(sd)

    print()
    print("size %d MiB, cluster %d KiB, %d MiB to move, %d reps" %
          (a.size // MiB, a.cluster_size // 1024, moved // MiB, a.reps))
    print("%-12s %9s %9s %9s" % ("method", "median s", "spread s", "MiB/s"))
    med = {}
    for name, v in results.items():
        med[name] = statistics.median(v)
        print("%-12s %9.3f %9.3f %9.1f" % (name, med[name], max(v) - min(v),
                                           moved / MiB / med[name]))
    print()
    if "siphon" in med:
        s = med["siphon"]
        for peer, target in (("qsd-stream", 1.5), ("img-rebase", 1.0),
                             ("fio-seq", 0.9), ("fio-both", 0.9),
                             ("siphon-ref", 1.0)):
            if peer in med:
                print("siphon vs %-11s %.2fx  (target >= %.1fx)" %
                      (peer, med[peer] / s, target))
        if "siphon-1TiB" in med:
            print("1 TiB sparse / dense time: %.2fx  (target <= 1.2x)" %
                  (med["siphon-1TiB"] / s))
    for k, v in rss.items():
        print("siphon peak RSS (%s): %.1f MiB  (target < 64 MiB)" %
              (k, v / 1024))
    if any("FAILED" in k for k in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

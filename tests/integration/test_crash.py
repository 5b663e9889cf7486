#!/usr/bin/env python3
"""Crash consistency of siphon's qcow2 write path.

The workload: many full-cluster writes, each with its own pattern byte, to
random cluster runs of a qcow2 overlay that already holds some data, over a
raw backing file full of another pattern (a cluster linked before its data
landed reads zeros, which no write wrote), with a flush every few writes. After any crash every cluster must read either its
initial content or the pattern of one of the writes that covered it, and
`qemu-img check` must exit 0 or 3 (leaked clusters only, never corruption),
and `siphon check` must exit as qemu-img check does. After a kill, the next
writer (`siphon io IMAGE flush`) leaves the image clean: check exits 0.

(a) SIGKILL: `siphon io` runs the workload and is killed at a random moment
    (seeded); the surviving image is checked. The page cache survives a
    process kill, so this covers what an application crash leaves.
(b) Write log (SIPHON_IO_LOG, io/iolog.h): the workload runs once while io/
    records every write and sync it completes. Every prefix of the log that
    ends at a sync is a state the disk may hold after a power failure, and
    so is such a prefix plus any subset of the writes issued before the next
    sync ("torn" variants). Each state is rebuilt from a copy of the initial
    image and checked. The whole log must rebuild siphon's final image.

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77 when
qemu-img/qemu-io are missing.

Usage: test_crash.py [--kills N] [--states N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
import harness  # noqa: E402

KiB = 1024
MiB = 1024 * KiB

CLUSTER = 4 * KiB
SIZE = 16 * MiB
BASE_FILL = 0x01        # every cluster of the backing file
INITIAL = 0x03          # the overlay's own data at the start ...
INITIAL_BYTES = 2 * MiB  # ... in [0, INITIAL_BYTES)

# Record layout of io/iolog.h.
REC = struct.Struct("<4sB3xIIQQ")
OP_WRITE, OP_FSYNC, OP_FDATASYNC, OP_FALLOCATE, OP_TRUNCATE = 2, 3, 4, 5, 100
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 16


def make_workload(rnd: random.Random, nwrites: int, flush_every: int) \
        -> tuple[list[str], dict[int, set[int]]]:
    """Commands and, per cluster, the set of bytes it may hold."""
    nclusters = SIZE // CLUSTER
    allowed = {c: {INITIAL if c * CLUSTER < INITIAL_BYTES else BASE_FILL}
               for c in range(nclusters)}
    cmds = []
    for i in range(nwrites):
        pat = i % 254 + 2
        n = rnd.choice((1, 1, 1, 2, 4, 16))
        # Half the writes land in the first quarter: many overwrites.
        span = nclusters // 4 if rnd.random() < 0.5 else nclusters
        first = rnd.randrange(0, span - n + 1)
        cmds.append(f"write -P 0x{pat:02x} {first * CLUSTER} {n * CLUSTER}")
        for c in range(first, first + n):
            allowed[c].add(pat)
        if (i + 1) % flush_every == 0:
            cmds.append("flush")
    return cmds, allowed


def make_image(path: str) -> None:
    """A qcow2 overlay over a raw file full of BASE_FILL (so that a cluster
    linked before its data was written reads zeros, which no write wrote),
    holding INITIAL in its first INITIAL_BYTES. The backing name is
    relative: copies of the overlay in the same directory share it."""
    base = os.path.join(os.path.dirname(path), "base.raw")
    if not os.path.exists(base):
        corpus.write_raw(base, SIZE, [(0, bytes([BASE_FILL]) * SIZE)])
    corpus.create_qcow2(path, SIZE, f"cluster_size={CLUSTER}", backing=base,
                        backing_fmt="raw", relative=True)
    corpus.qemu_io(path, "qcow2", f"write -P 0x{INITIAL:02x} 0 "
                   f"{INITIAL_BYTES}")


def verify(path: str, allowed: dict[int, set[int]], scratch: str) \
        -> list[str]:
    """qemu-img check 0 or 3, and every cluster an allowed pattern."""
    problems = []
    # A killed process's io_uring is torn down asynchronously by the kernel
    # and holds the image file (and so its OFD locks) until then: give it
    # a moment rather than report "in use".
    for _ in range(100):
        k = harness.run(["qemu-img", "check", "-f", "qcow2", path])
        if k.rc != 1 or "lock" not in k.err:
            break
        time.sleep(0.05)
    # siphon check must classify every crash state as qemu does.
    sc = harness.run([harness.siphon_binary() or "siphon", "check", "-q",
                      "-f", "qcow2", path])
    if sc.rc != k.rc:
        problems.append(f"siphon check exits {sc.rc}, qemu-img check "
                        f"{k.rc}: {sc.out.decode(errors='replace').strip()}"
                        f" {sc.err.strip()}")
    if k.rc not in (0, 3):
        problems.append(f"qemu-img check exit {k.rc}: "
                        f"{k.out.decode(errors='replace').strip()} "
                        f"{k.err.strip()}"[:3000])
        return problems
    raw = os.path.join(scratch, "content.raw")
    c = harness.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                     path, raw])
    if c.rc != 0:
        return problems + [c.describe()]
    with open(raw, "rb") as f:
        data = f.read()
    os.unlink(raw)
    bad = 0
    for cl, ok in allowed.items():
        chunk = data[cl * CLUSTER:(cl + 1) * CLUSTER]
        b = chunk[0]
        if chunk.count(b) != CLUSTER or b not in ok:
            bad += 1
            if bad <= 3:
                kinds = sorted(set(chunk))
                problems.append(f"cluster {cl} (offset {cl * CLUSTER}) "
                                f"holds bytes {[hex(x) for x in kinds[:6]]},"
                                f" allowed {sorted(hex(x) for x in ok)}")
    if bad > 3:
        problems.append(f"... {bad} bad clusters in all")
    return problems


# ---------------------------------------------------------------------------
# (a) SIGKILL at random moments


def run_kills(siphon: str, tmp: str, rep: harness.Report, kills: int,
              seed: int) -> None:
    rnd = random.Random(seed)
    d = os.path.join(tmp, "kill")
    os.mkdir(d)
    init = os.path.join(d, "initial.qcow2")
    make_image(init)
    cmds, allowed = make_workload(random.Random(seed + 1), 1500, 16)
    script = os.path.join(d, "workload.txt")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")

    # Calibrate: a whole run, which must itself end clean.
    img = os.path.join(d, "img.qcow2")
    shutil.copyfile(init, img)
    t0 = time.monotonic()
    r = harness.run([siphon, "io", "-q", "-s", script, img], timeout=300)
    full = time.monotonic() - t0
    problems = [r.describe()] if r.rc != 0 else verify(img, allowed, d)
    if not problems:
        k = harness.run(["qemu-img", "check", "-f", "qcow2", img])
        if k.rc != 0:
            problems.append("a complete run must leave a clean image: " +
                            k.describe())
    rep.emit("kill/complete-run", problems, info=f"{len(cmds)} commands in "
             f"{full:.2f} s")
    if problems:
        return

    for i in range(kills):
        shutil.copyfile(init, img)
        delay = rnd.uniform(0.02, max(0.05, full * 0.95))
        p = subprocess.Popen([siphon, "io", "-q", "-s", script, img],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate()
        state = "killed" if p.returncode == -signal.SIGKILL else \
            f"exited {p.returncode} before the kill"
        problems = verify(img, allowed, d)
        leaks = harness.run(["qemu-img", "check", "-f", "qcow2", img]).rc == 3
        if not problems:
            # The next writer reclaims what the kill leaked.
            r = harness.run([siphon, "io", "-q", img, "flush"])
            k = harness.run(["qemu-img", "check", "-f", "qcow2", img])
            if r.rc != 0 or k.rc != 0:
                problems.append("reopened for writing: " + r.describe() +
                                " then " + k.describe())
            if leaks:
                state += ", leaks reclaimed by the next writer"
        if p.returncode not in (0, -signal.SIGKILL):
            problems.append(f"siphon io exit {p.returncode}: "
                            f"{err.decode(errors='replace')}")
        if problems and os.environ.get("SIPHON_KEEP"):
            keep = os.environ["SIPHON_KEEP"]
            os.makedirs(keep, exist_ok=True)
            shutil.copyfile(img, os.path.join(keep, f"kill-{i}.qcow2"))
            shutil.copyfile(init, os.path.join(keep, "kill-initial.qcow2"))
            shutil.copyfile(script, os.path.join(keep, "kill-workload.txt"))
        rep.emit(f"kill/{i:02d}", problems,
                 info=f"{state} after {delay:.3f} s")
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# (b) write-log replay


def read_log(path: str, image: str) -> list[tuple]:
    """Records for image: (op, mode, off, len, data)."""
    want = os.path.realpath(image)
    out = []
    with open(path, "rb") as f:
        blob = f.read()
    pos = 0
    while pos < len(blob):
        magic, op, mode, plen, off, length = REC.unpack_from(blob, pos)
        if magic != b"SXIO":
            raise ValueError(f"bad record magic at log offset {pos}")
        pos += REC.size
        name = blob[pos:pos + plen].decode()
        pos += plen
        data = b""
        if op == OP_WRITE:
            data = blob[pos:pos + length]
            pos += length
            if len(data) != length:
                raise ValueError("truncated write record")
        if os.path.realpath(name) == want:
            out.append((op, mode, off, length, data))
    return out


def apply(f, rec) -> None:
    op, mode, off, length, data = rec
    if op == OP_WRITE:
        f.seek(off)
        f.write(data)
    elif op == OP_TRUNCATE:
        f.truncate(off)
    elif op == OP_FALLOCATE:
        size = f.seek(0, 2)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            end = min(off + length, size) if mode & FALLOC_FL_KEEP_SIZE \
                else off + length
            if end > off:
                f.seek(off)
                f.write(bytes(end - off))
        elif not mode & FALLOC_FL_KEEP_SIZE and off + length > size:
            f.truncate(off + length)


def rebuild(init: str, out: str, recs: list[tuple]) -> None:
    shutil.copyfile(init, out)
    with open(out, "r+b") as f:
        for r in recs:
            apply(f, r)


def run_log(siphon: str, tmp: str, rep: harness.Report, max_states: int,
            seed: int) -> None:
    rnd = random.Random(seed + 7)
    d = os.path.join(tmp, "log")
    os.mkdir(d)
    init = os.path.join(d, "initial.qcow2")
    img = os.path.join(d, "img.qcow2")
    log = os.path.join(d, "io.log")
    make_image(init)
    shutil.copyfile(init, img)
    cmds, allowed = make_workload(random.Random(seed + 2), 400, 25)
    env = dict(os.environ, SIPHON_IO_LOG=log)
    p = subprocess.run([siphon, "io", "-q", img, *cmds], env=env,
                       capture_output=True, timeout=300)
    if p.returncode != 0:
        rep.emit("log/run", [f"siphon io exit {p.returncode}: "
                             f"{p.stderr.decode(errors='replace')}"])
        return
    try:
        recs = read_log(log, img)
    except (ValueError, struct.error) as e:
        rep.emit("log/parse", [str(e)])
        return
    syncs = [i for i, r in enumerate(recs)
             if r[0] in (OP_FSYNC, OP_FDATASYNC)]
    nwrites = sum(1 for r in recs if r[0] == OP_WRITE)

    # The whole log rebuilds siphon's image byte for byte.
    whole = os.path.join(d, "whole.qcow2")
    rebuild(init, whole, recs)
    with open(whole, "rb") as a, open(img, "rb") as b:
        same = a.read() == b.read()
    rep.emit("log/whole-log-rebuilds-image",
             [] if same else ["replaying the whole log does not give "
                              "siphon's image: the log misses something"],
             info=f"{len(recs)} records: {nwrites} writes, {len(syncs)} "
                  f"syncs")
    if not syncs:
        rep.emit("log/syncs", ["the log holds no sync at all"])
        return

    # Every prefix ending at a sync, or an even sample of them.
    picks = syncs if len(syncs) <= max_states else \
        sorted({syncs[round(i * (len(syncs) - 1) / (max_states - 1))]
                for i in range(max_states)})
    state = os.path.join(d, "state.qcow2")
    passed = failed = 0
    for j in picks:
        nxt = next((s for s in syncs if s > j), len(recs))
        pending = [i for i in range(j + 1, nxt) if recs[i][0] == OP_WRITE]
        variants = [("prefix", recs[:j + 1])]
        for t in range(2 if pending else 0):
            keep = sorted(rnd.sample(pending, rnd.randint(1, len(pending))))
            if t == 0 and len(pending) > 1:
                # The writes before the sync, in issue order, but not all.
                keep = pending[:rnd.randrange(1, len(pending))]
            variants.append((f"torn{t}({len(keep)}/{len(pending)})",
                             recs[:j + 1] + [recs[i] for i in keep]))
        for label, rs in variants:
            rebuild(init, state, rs)
            problems = verify(state, allowed, d)
            name = f"log/sync@{j}-{label}"
            if problems:
                failed += 1
                rep.emit(name, problems)
                if os.environ.get("SIPHON_KEEP"):
                    keep_dir = os.environ["SIPHON_KEEP"]
                    os.makedirs(keep_dir, exist_ok=True)
                    shutil.copyfile(state, os.path.join(
                        keep_dir, f"log-{j}-{label}.qcow2"))
            else:
                passed += 1
                if os.environ.get("VERBOSE"):
                    rep.emit(name, [])
    rep.emit("log/replayed-states", [] if not failed else
             [f"{failed} of {passed + failed} states failed (above)"],
             info=f"{passed} states checked at {len(picks)} of "
                  f"{len(syncs)} syncs")
    shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--states", type=int, default=40)
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="siphon-crash-",
                                     dir=os.environ.get("TMPDIR")) as tmp:
        siphon = harness.preflight(tmp)
        rep = harness.Report()
        run_kills(siphon, tmp, rep, args.kills, args.seed)
        run_log(siphon, tmp, rep, args.states, args.seed)
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Images with internal snapshots, written and streamed by siphon (issue 15).

Each variant is an overlay over a raw base holding two snapshots taken by
qemu-img between qemu-io writes, so the active L1 shares L2 tables and data
clusters with them (COPIED clear). Then:

- write: a seeded workload (allocating and partial-cluster writes,
  write-zeroes, cluster-aligned discards) through `siphon io`. qemu-img
  check exits 0 (no leak, no corruption) and so does siphon check; each
  snapshot, converted with qemu-img convert -l, is byte for byte what it was
  before; the active layer equals the model of what was written (qemu-img
  compare against a raw file) and the image qemu-io makes of the same
  workload on a copy.
- serve: more writes by a real NBD client (qemu-io over `siphon serve` on a
  Unix socket), which go through the engine's guest path (shared clusters
  copied on the copy pipeline, committed replacing them), then the same
  checks.
- stream: `siphon stream` over the result: no backing file left, clean,
  the active layer unchanged, and each snapshot reads as it does when qemu
  flattens the same image (`qemu-img rebase -b ''` on a copy: a snapshot's
  unallocated clusters showed the backing file, gone afterwards in both).
- qemu afterwards: applying, deleting and creating snapshots works and
  leaves a clean image; the applied snapshot reads as it did.
- crash: SIGKILL of a `siphon io` writer after a seeded number (1-9) of
  its commands have completed (each kill checked to land while it still
  runs, on the next command), and of
  `siphon serve` while an NBD client writes (the engine's asynchronous
  copy-on-write), after a seeded number (1-9) of the client's requests
  have been answered (checked to land while both run): qemu-img check
  finds no corruption and the snapshots
  unchanged; the next writer repairs the leaks (qemu-img check exit 0).
- info: `siphon info --output=json` lists the snapshots with qemu-img
  info's fields and values.
- damaged: a snapshot entry pointing past the end of the file makes a
  read-write open fail with a message naming the snapshot table, and the
  image is left as it was; reading still works.

Variants: 64 KiB clusters (v3), 512-byte clusters (one L2 table per 32 KiB
of guest: many shared tables), extended L2, and a compat=0.10 (v2) image.

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77 when
qemu-img, qemu-io or qemu-nbd-free prerequisites are missing.
Usage: test_snapshots.py [-k SUBSTRING] [--seed N]
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import harness

ONLY = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else None
SEED = int(sys.argv[sys.argv.index("--seed") + 1]) \
    if "--seed" in sys.argv else 20261203
SIZE = 4 << 20
WAIT = 60  # bounded waits for the server (never asserted on)

VARIANTS = [
    # name, qemu-img create -o options, cluster size
    ("c64k", "cluster_size=65536", 65536),
    ("c512", "cluster_size=512", 512),
    ("extl2", "cluster_size=65536,extended_l2=on", 65536),
    ("v2", "cluster_size=65536,compat=0.10", 65536),
]


def wanted(name: str) -> bool:
    return ONLY is None or ONLY in name


def sh(argv: list[str], timeout: int = 120) -> harness.Result:
    return harness.run(argv, timeout=timeout)


def must(argv: list[str]) -> None:
    r = sh(argv)
    if r.rc != 0:
        raise RuntimeError(r.describe())


def qemu_io(path: str, cmds: list[str], fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    must(argv + [path])


def read_raw(path: str) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read())


def convert(img: str, out: str, snap: str | None = None) -> bytes:
    argv = ["qemu-img", "convert", "-U", "-O", "raw"]
    if snap:
        argv += ["-l", "snapshot.name=" + snap]
    must(argv + [img, out])
    data = read_raw(out)
    os.unlink(out)
    return bytes(data)


def md5(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


class Workload:
    """A seeded list of siphon io / qemu-io commands and its model."""

    def __init__(self, rng: random.Random, cs: int, v2: bool, n: int):
        self.cmds: list[str] = []
        self.ops: list[tuple] = []
        for i in range(n):
            k = rng.random()
            if k < 0.55:
                # 512-aligned, often partial clusters and across clusters.
                off = rng.randrange(0, SIZE // 512) * 512
                ln = min(rng.choice([512, 4096, cs,
                                     (3 * cs // 2 + 512) // 512 * 512,
                                     100 * 1024]), SIZE - off)
                pat = rng.randrange(1, 255)
                self.cmds.append(f"write -P {pat} {off} {ln}")
                self.ops.append(("w", off, ln, pat))
            elif k < 0.8:
                off = rng.randrange(0, SIZE // 512) * 512
                ln = min(rng.choice([512, cs, 2 * cs, 65536]), SIZE - off)
                self.cmds.append(f"write -z {off} {ln}")
                self.ops.append(("w", off, ln, 0))
            elif not v2:
                # Whole clusters: a zero cluster over the backing file.
                c = rng.randrange(0, SIZE // cs)
                n_cl = rng.choice([1, 2])
                off, ln = c * cs, min(n_cl * cs, SIZE - c * cs)
                self.cmds.append(f"discard {off} {ln}")
                self.ops.append(("w", off, ln, 0))

    def apply(self, model: bytearray) -> None:
        for _, off, ln, pat in self.ops:
            model[off:off + ln] = bytes([pat]) * ln


class Case:
    """One variant: base, overlay, two snapshots, their expected bytes."""

    def __init__(self, tmp: str, name: str, opts: str, cs: int):
        self.name, self.cs = name, cs
        self.v2 = "compat=0.10" in opts
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base.raw")
        self.top = os.path.join(self.dir, "top.qcow2")
        with open(self.base, "wb") as f:
            f.write(random.Random(SEED ^ cs).randbytes(SIZE))
        must(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts,
              "-b", self.base, "-F", "raw", self.top])
        qemu_io(self.top, ["write -P 0x11 0 256k", f"write -P 0x12 {cs} 512",
                           "write -P 0x13 1M 1M", "write -z 3M 128k"])
        must(["qemu-img", "snapshot", "-c", "first", self.top])
        qemu_io(self.top, ["write -P 0x21 64k 64k", "write -P 0x22 1536k 4k",
                           "write -P 0x23 2560k 256k"])
        must(["qemu-img", "snapshot", "-c", "second", self.top])
        qemu_io(self.top, ["write -P 0x31 128k 8k"])
        self.snaps = {s: convert(self.top, self.tmp("s.raw"), s)
                      for s in ("first", "second")}
        self.model = bytearray(convert(self.top, self.tmp("a.raw")))

    def tmp(self, leaf: str) -> str:
        return os.path.join(self.dir, leaf)

    def verify(self, siphon: str, what: str, img: str | None = None,
               model: bytes | None = None) -> list[str]:
        """check clean (qemu and siphon), snapshots kept, active = model."""
        img = img or self.top
        problems = []
        c = sh(["qemu-img", "check", img])
        if c.rc != 0:
            problems.append(f"{what}: qemu-img check exit {c.rc}: "
                            f"{c.out.decode(errors='replace').strip()}")
        c = sh([siphon, "check", img])
        if c.rc != 0:
            problems.append(f"{what}: siphon check exit {c.rc}: "
                            f"{c.out.decode(errors='replace').strip()}")
        for s, want in self.snaps.items():
            got = convert(img, self.tmp("v.raw"), s)
            if got != want:
                first = next(i for i in range(len(want)) if got[i] != want[i])
                problems.append(f"{what}: snapshot {s} changed (first "
                                f"difference at byte {first})")
        want = self.model if model is None else model
        raw = self.tmp("model.raw")
        with open(raw, "wb") as f:
            f.write(want)
        r = sh(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw])
        if r.rc != 0:
            problems.append(f"{what}: active layer differs from the model: "
                            f"{r.out.decode(errors='replace').strip()}")
        os.unlink(raw)
        return problems


def case_write(rep, siphon: str, c: Case, rng: random.Random) -> None:
    wl = Workload(rng, c.cs, c.v2, 60)
    oracle = c.tmp("oracle.qcow2")
    shutil.copyfile(c.top, oracle)
    script = c.tmp("wl.txt")
    with open(script, "w") as f:
        f.write("\n".join(wl.cmds) + "\n")
    r = sh([siphon, "io", "-q", "-s", script, c.top])
    if r.rc != 0:
        rep.emit(f"{c.name}/write", ["siphon io failed", r.describe()])
        return
    wl.apply(c.model)
    problems = c.verify(siphon, "after siphon io")
    qemu_io(oracle, wl.cmds)
    r = sh(["qemu-img", "compare", c.top, oracle])
    if r.rc != 0:
        problems.append("siphon and qemu-io disagree on the same workload: "
                        + r.out.decode(errors="replace").strip())
    os.unlink(oracle)
    rep.emit(f"{c.name}/write", problems, info=f"{len(wl.cmds)} commands")


class Server:
    """`siphon serve` of one image on a Unix socket; stop() whatever
    happens."""

    def __init__(self, siphon: str, c: Case):
        self.sock = c.tmp("serve.sock")
        # A server killed before leaves its socket: waiting for the path
        # would not wait for this one.
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.log = open(c.tmp("serve.log"), "w")
        self.p = subprocess.Popen(
            [siphon, "serve", "--listen", "unix:" + self.sock,
             c.top + "=disk"], stdout=self.log, stderr=subprocess.STDOUT)
        harness.wait_path(self.sock, self.p, WAIT)

    def stop(self) -> int | None:
        try:
            return harness.stop(self.p, WAIT)
        finally:
            self.log.close()


def case_serve(rep, siphon: str, c: Case, rng: random.Random) -> None:
    wl = Workload(rng, c.cs, True, 30)  # NBD trim is advisory: no discards
    srv = Server(siphon, c)
    try:
        if not os.path.exists(srv.sock):
            rep.emit(f"{c.name}/serve", ["siphon serve did not start"])
            return
        argv = ["qemu-io", "-f", "raw"]
        for cmd in wl.cmds:
            argv += ["-c", cmd]
        r = sh(argv + [f"nbd+unix:///disk?socket={srv.sock}"])
    finally:
        rc = srv.stop()
    problems = []
    if r.rc != 0 or b"error" in r.out.lower():
        problems.append("qemu-io over NBD failed: " + r.describe())
    if rc != 0:
        problems.append(f"siphon serve exited {rc} on SIGTERM")
    wl.apply(c.model)
    problems += c.verify(siphon, "after writes over NBD")
    rep.emit(f"{c.name}/serve", problems, info=f"{len(wl.cmds)} commands")


def case_info(rep, siphon: str, c: Case) -> None:
    r = sh([siphon, "info", "--output=json", c.top])
    q = sh(["qemu-img", "info", "--output=json", c.top])
    problems = []
    try:
        got = json.loads(r.out)["chain"][0].get("snapshots")
        want = json.loads(q.out)["snapshots"]
        if got != want:
            problems.append(f"siphon info snapshots {got} != qemu's {want}")
    except (ValueError, KeyError, IndexError) as e:
        problems.append(f"bad JSON ({e}): {r.describe()}")
    h = sh([siphon, "info", c.top]).out.decode(errors="replace")
    for s in ("first", "second"):
        if f" {s} " not in h:
            problems.append(f"siphon info does not list snapshot {s}:\n{h}")
    rep.emit(f"{c.name}/info", problems)


def case_stream(rep, siphon: str, c: Case) -> None:
    oracle = c.tmp("flat.qcow2")
    shutil.copyfile(c.top, oracle)
    must(["qemu-img", "rebase", "-b", "", oracle])
    r = sh([siphon, "stream", c.top])
    problems = []
    if r.rc != 0:
        rep.emit(f"{c.name}/stream", ["siphon stream failed", r.describe()])
        return
    inf = json.loads(sh(["qemu-img", "info", "--output=json",
                         c.top]).out)
    if "backing-filename" in inf:
        problems.append("the backing reference is still there")
    # Snapshots now read as qemu's flattened copy reads them.
    c.snaps = {s: convert(oracle, c.tmp("f.raw"), s) for s in c.snaps}
    problems += c.verify(siphon, "after siphon stream")
    rep.emit(f"{c.name}/stream", problems)
    # qemu can still work with the snapshots.
    problems = []
    for argv in (["qemu-img", "snapshot", "-c", "third", c.top],
                 ["qemu-img", "snapshot", "-d", "second", c.top],
                 ["qemu-img", "snapshot", "-a", "first", c.top]):
        r = sh(argv)
        if r.rc != 0:
            problems.append(r.describe())
    if not problems:
        del c.snaps["second"]
        c.snaps["third"] = bytes(c.model)
        problems = c.verify(siphon, "after qemu-img snapshot -c/-d/-a",
                            model=c.snaps["first"])
    os.unlink(oracle)
    rep.emit(f"{c.name}/qemu-after", problems)


def after_kill(c: Case, k: int, problems: list[str]) -> bool:
    """After kill k: qemu-img check finds no corruption (leaks allowed)
    and the snapshots read as before; False when the image is corrupt."""
    # A killed process's io_uring is torn down asynchronously and holds
    # the file (and its OFD locks) until then: wait for it.
    for _ in range(200):
        r = sh(["qemu-img", "check", c.top])
        if r.rc != 1 or "lock" not in r.err:
            break
        time.sleep(0.05)
    if r.rc not in (0, 3):
        problems.append(f"kill {k}: qemu-img check exit {r.rc}: "
                        + r.out.decode(errors="replace").strip())
        return False
    for s, want in c.snaps.items():
        if convert(c.top, c.tmp("k.raw"), s) != want:
            problems.append(f"kill {k}: snapshot {s} changed")
    return True


def next_writer(siphon: str, c: Case, problems: list[str]) -> None:
    """The writer after the kills repairs what they left (the dirty bit,
    v3; a v2 image has no dirty bit: there, as with qemu, leaks stay until
    a check repairs them), and qemu-img check is clean; what the killed
    writers left is the new active layer."""
    r = sh([siphon, "io", "-q", c.top, "write -P 0x55 0 4k"])
    if r.rc != 0:
        problems.append("the writer after the kills failed: "
                        + r.describe())
    if c.v2:
        r = sh([siphon, "check", "-r", "leaks", c.top])
        if r.rc != 0:
            problems.append("siphon check -r leaks: " + r.describe())
    r = sh(["qemu-img", "check", c.top])
    if r.rc != 0:
        problems.append(f"after the next writer: qemu-img check exit "
                        f"{r.rc}: " + r.out.decode(errors="replace").strip())
    c.model = bytearray(convert(c.top, c.tmp("a.raw")))


def case_crash(rep, siphon: str, c: Case, rng: random.Random) -> None:
    """SIGKILL a writer; the image must hold no corruption and the
    snapshots; a second writer leaves it clean."""
    problems = []
    kills = 0
    for k in range(4):
        wl = Workload(rng, c.cs, c.v2, 200)
        script = c.tmp("crash.txt")
        with open(script, "w") as f:
            for i, cmd in enumerate(wl.cmds):
                f.write(cmd + "\n")
                if i % 20 == 19:
                    f.write("flush\n")
                if i % 10 == 9:
                    f.write("sleep 2\n")
        # Each command's line is printed (and flushed) once it is done:
        # the kill comes after a seeded number of them, inside the first
        # ten (before the first sleep), so it lands while the writer is
        # on the next command, never before the first write or after
        # the last.
        after = rng.randint(1, 9)
        p = subprocess.Popen([siphon, "io", "-s", script, c.top],
                             stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        seen = 0
        try:
            deadline = time.monotonic() + 60
            while seen < after and time.monotonic() < deadline:
                ready, _, _ = select.select([p.stdout], [], [], 1.0)
                if ready:
                    if not p.stdout.readline():
                        break  # the writer ended early
                    seen += 1
            if p.poll() is None and seen == after:
                p.kill()
                kills += 1
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
        if seen != after:
            problems.append(f"kill {k}: the writer printed {seen} lines, "
                            f"not the {after} the kill waits for "
                            f"(exit {p.returncode})")
            break
        if not after_kill(c, k, problems):
            break
    next_writer(siphon, c, problems)
    if kills != 4 and not problems:
        problems.append(f"{kills} of 4 kills landed while the writer ran")
    rep.emit(f"{c.name}/crash", problems, info=f"{kills} kills")


def case_crash_serve(rep, siphon: str, c: Case, rng: random.Random) -> None:
    """SIGKILL `siphon serve` while an NBD client writes (the engine's
    copy-on-write of shared clusters on the copy pipeline), after a seeded
    number (1-9) of the client's requests have been answered, checked to
    land while both still run: no corruption, the snapshots unchanged, and
    the next writer leaves the image clean."""
    problems = []
    kills = 0
    for k in range(2):
        wl = Workload(rng, c.cs, True, 120)
        srv = Server(siphon, c)
        argv = ["qemu-io", "-f", "raw"]
        for i, cmd in enumerate(wl.cmds):
            argv += ["-c", cmd]
            if i % 10 == 9:
                argv += ["-c", "sleep 2000"]
        # qemu-io line-buffers a terminal only: its output goes to a pty,
        # one "... bytes at offset ..." line per request answered.
        after = rng.randint(1, 9)
        master, slave = pty.openpty()
        cl = subprocess.Popen(
            argv + [f"nbd+unix:///disk?socket={srv.sock}"],
            stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        seen = 0
        try:
            buf = b""
            deadline = time.monotonic() + 60
            while seen < after and time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1.0)
                if not ready:
                    continue
                try:
                    data = os.read(master, 4096)
                except OSError:
                    data = b""
                if not data:
                    break  # the client ended early
                buf += data
                seen = buf.count(b" bytes at offset ")
            if seen >= after and cl.poll() is None and srv.p.poll() is None:
                srv.p.kill()
                kills += 1
        finally:
            srv.stop()
            cl.kill()
            cl.wait()
            os.close(master)
        if seen < after:
            problems.append(f"kill {k}: the client reported {seen} "
                            f"requests, not the {after} the kill waits for "
                            f"(exit {cl.returncode})")
            break
        if not after_kill(c, k, problems):
            break
    next_writer(siphon, c, problems)
    if kills != 2 and not problems:
        problems.append(f"{kills} of 2 kills landed while the server and "
                        f"the client ran")
    rep.emit(f"{c.name}/crash-serve", problems, info=f"{kills} kills")


def case_damaged(rep, siphon: str, tmp: str) -> None:
    """A snapshot's L1 offset past the end: writing refused, image kept."""
    p = os.path.join(tmp, "damaged.qcow2")
    must(["qemu-img", "create", "-q", "-f", "qcow2", p, "1M"])
    qemu_io(p, ["write -P 1 0 64k"])
    must(["qemu-img", "snapshot", "-c", "s", p])
    with open(p, "r+b") as f:
        hdr = f.read(72)
        (snap_off,) = struct.unpack(">Q", hdr[64:72])
        f.seek(snap_off)
        f.write(struct.pack(">Q", 1 << 40))  # the snapshot's L1 offset
    before = md5(p)
    r = sh([siphon, "io", "-q", p, "write -P 2 0 4k"])
    problems = []
    if r.rc == 0:
        problems.append("a write to an image with a damaged snapshot table "
                        "was accepted")
    elif "snapshot table" not in r.err:
        problems.append("the refusal does not name the snapshot table: "
                        + r.err.strip())
    if md5(p) != before:
        problems.append("the refused image was modified")
    r = sh([siphon, "io", "-q", p, "read -P 1 0 64k"])
    if r.rc != 0:
        problems.append("reading the image failed: " + r.describe())
    rep.emit("damaged-table", problems)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="siphon-snap-") as tmp:
        siphon = harness.preflight(tmp)
        rep = harness.Report()
        for name, opts, cs in VARIANTS:
            if not wanted(name):
                continue
            rng = random.Random(f"{SEED}-{name}")
            c = Case(tmp, name, opts, cs)
            case_info(rep, siphon, c)
            case_write(rep, siphon, c, rng)
            case_serve(rep, siphon, c, rng)
            case_crash(rep, siphon, c, rng)
            case_crash_serve(rep, siphon, c, rng)
            case_stream(rep, siphon, c)
        if wanted("damaged"):
            case_damaged(rep, siphon, tmp)
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())

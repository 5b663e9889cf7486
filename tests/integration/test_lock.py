#!/usr/bin/env python3
"""Image locks between siphon and qemu.

qemu takes OFD byte-range locks on every image it opens (io/lock.h). siphon
takes the same ones on writable opens, so:

- while an interactive qemu-io holds an image open for writing, siphon
  commands that write it (io, stream, rebase, create over it) fail with exit
  1 and a message containing "in use"; so does writing the backing file of
  an overlay qemu-io has open; read-only siphon commands (info, map,
  io with reads only) still work;
- while siphon holds an image (a `siphon io` that writes then sleeps, a
  rate-limited `siphon stream`), `qemu-io -c 'write ...'` fails with qemu's
  'Failed to get "write" lock'; once siphon exits, qemu can write again.

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77 when
qemu-img/qemu-io are missing.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
import harness  # noqa: E402

MiB = 1024 * 1024
QEMU_LOCK_MSG = 'Failed to get "write" lock'


def read_until(proc: subprocess.Popen, word: bytes, timeout: float) -> bytes:
    """Read proc's stdout until word shows up (or timeout / EOF)."""
    buf = b""
    end = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while word not in buf:
        left = end - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


class QemuIoHolder:
    """An interactive qemu-io with the image open read-write, fed commands
    through a pipe that stays open until close()."""

    def __init__(self, path: str, fmt: str = "qcow2"):
        self.p = subprocess.Popen(["qemu-io", "-f", fmt, path],
                                  stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        self.p.stdin.write(b"write -P 0x5c 0 4k\n")
        self.p.stdin.flush()
        self.ready = b"wrote" in read_until(self.p, b"wrote", 10)

    def close(self) -> None:
        try:
            self.p.stdin.write(b"quit\n")
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.p.stdout.close()


def expect_in_use(r: harness.Result) -> list[str]:
    if r.rc == 1 and "in use" in r.err and r.err.startswith("siphon"):
        return []
    return ["want exit 1 and 'in use': " + r.describe()]


def expect_ok(r: harness.Result) -> list[str]:
    return [] if r.rc == 0 else ["want exit 0: " + r.describe()]


def qemu_write(path: str) -> harness.Result:
    return harness.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 4k",
                        path])


def qemu_write_after_release(path: str) -> harness.Result:
    """qemu_write, retried briefly: a killed process's io_uring is torn
    down asynchronously and may hold the file (and its locks) a moment."""
    for _ in range(40):
        r = qemu_write(path)
        if r.rc == 0 or QEMU_LOCK_MSG not in r.err + r.out.decode(
                errors="replace"):
            break
        time.sleep(0.05)
    return r


def expect_qemu_refused(r: harness.Result) -> list[str]:
    text = r.out.decode(errors="replace") + r.err
    if QEMU_LOCK_MSG in text and b"wrote" not in r.out:
        return []
    return [f"qemu-io must fail with {QEMU_LOCK_MSG!r}: " + r.describe() +
            f"\n  stdout: {r.out[:300]!r}"]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="siphon-lock-") as tmp:
        siphon = harness.preflight(tmp)
        rep = harness.Report()
        base = os.path.join(tmp, "base.qcow2")
        top = os.path.join(tmp, "top.qcow2")
        corpus.create_qcow2(base, 8 * MiB)
        corpus.qemu_io(base, "qcow2", "write -P 0x21 0 8M")
        corpus.create_qcow2(top, 8 * MiB, backing=base)

        # --- qemu-io holds top (and base as its backing file) ---
        h = QemuIoHolder(top)
        try:
            if not h.ready:
                rep.emit("setup/qemu-io-holds-image",
                         ["interactive qemu-io did not open the image"])
                return rep.finish()
            rep.emit("qemu-holds/siphon-io-write", expect_in_use(
                harness.run([siphon, "io", top, "write 0 4k"])))
            rep.emit("qemu-holds/siphon-stream", expect_in_use(
                harness.run([siphon, "stream", "--no-progress", top])))
            rep.emit("qemu-holds/siphon-rebase", expect_in_use(
                harness.run([siphon, "rebase", "-u", "-b", "", top])))
            rep.emit("qemu-holds/siphon-create-over-it", expect_in_use(
                harness.run([siphon, "create", top, "8M"])))
            rep.emit("qemu-holds/siphon-io-write-backing", expect_in_use(
                harness.run([siphon, "io", base, "write 0 4k"])))
            rep.emit("qemu-holds/siphon-info", expect_ok(
                harness.run([siphon, "info", top])))
            rep.emit("qemu-holds/siphon-map", expect_ok(
                harness.run([siphon, "map", top])))
            rep.emit("qemu-holds/siphon-io-read-only", expect_ok(
                harness.run([siphon, "io", top, "read 0 4k"])))
        finally:
            h.close()
        rep.emit("qemu-released/siphon-io-write", expect_ok(
            harness.run([siphon, "io", top, "write -P 0x22 0 4k"])))

        # --- siphon io holds top: write, then sleep ---
        p = subprocess.Popen([siphon, "io", top, "write -P 0x23 0 4k",
                              "sleep 20000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            out = read_until(p, b"wrote", 10)
            if b"wrote" not in out:
                rep.emit("siphon-io-holds/setup",
                         [f"siphon io did not start: {out!r}"])
            else:
                rep.emit("siphon-io-holds/qemu-io-write",
                         expect_qemu_refused(qemu_write(top)))
                rep.emit("siphon-io-holds/siphon-io-write", expect_in_use(
                    harness.run([siphon, "io", top, "write 0 4k"])))
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()
        rep.emit("siphon-io-released/qemu-io-write",
                 expect_ok(qemu_write_after_release(top)))

        # --- siphon stream --speed holds top for a few seconds ---
        p = subprocess.Popen([siphon, "stream", "--speed", "1M",
                              "--output", "json", top],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out = read_until(p, b"progress", 5)
            if p.poll() is not None:
                rep.emit("siphon-stream-holds/setup",
                         [f"siphon stream ended early: exit {p.returncode}"
                          f" {out!r} {p.stderr.read()!r}"])
            else:
                rep.emit("siphon-stream-holds/qemu-io-write",
                         expect_qemu_refused(qemu_write(top)))
        finally:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
        rep.emit("siphon-stream-released/qemu-io-write",
                 expect_ok(qemu_write_after_release(top)))
        k = harness.run(["qemu-img", "check", top])
        rep.emit("after/qemu-img-check", [] if k.rc == 0 else
                 [k.describe()])
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())

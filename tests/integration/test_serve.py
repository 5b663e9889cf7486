#!/usr/bin/env python3
"""`siphon serve`: images exported over NBD to real clients (issue 13).

A three-layer chain (raw base with data, written zeros and a hole; a qcow2
middle layer with data and a zero cluster; a qcow2 top with data) is
served on a Unix socket in the temp dir, and on 127.0.0.1 over TCP:

- nbdinfo sees the export's size, multi-conn, base:allocation and both
  exports (`--list`); the first image is the default export;
- `qemu-img compare` of the export against a raw copy of the chain finds
  them identical, `nbdcopy` copies out the same bytes, and `qemu-img map`
  over NBD (base:allocation) gives every byte the same (data, zero) as
  `qemu-img map` of the chain;
- with `--stream`, qemu-io writes, write-zeroes and discards through the
  export while the stream runs, and fio's nbd engine writes and verifies
  random data over 4 connections; after SIGTERM and a second `serve
  --stream` that finishes, the image has no backing, `qemu-img check`
  is clean, and its content is the model of what the clients wrote;
- a read-only export refuses writes with EPERM;
- bad clients, from a small client written here against the protocol:
  requests past the end, overflowing, too large, with unknown commands or
  flags, block status without the meta context get error replies and
  the connection goes on; bad magic, unknown client flags, an option
  over the limit close that connection only; a handshake that stalls is
  dropped after --handshake-timeout; connections beyond
  --max-connections are refused; through all of it another client still
  reads the right bytes;
- SIGTERM with clients connected exits 0 and leaves a clean image;
- `--cache writeback` with every write held 30 ms at the disk (a
  SIPHON_FAULT delay rule), so that writes are answered long before they
  complete: a read right after a write's reply, on the same connection
  and on another, returns the new bytes (in clusters the top holds and in
  clusters still in the backing), 32 pipelined writes read back after a
  FLUSH on another connection, fio writes and verifies over 4
  connections while a stream runs, and after SIGTERM the image holds
  every answered write (clean, as the export read); a write that fails
  at the disk after its answer (an injected EIO) makes the next FLUSH of
  each connection fail with EIO, once, and is logged; without write-back
  the same write fails itself;
- the control socket and the NBD socket (mode 0600 under umask 0), through `siphon ctl`: info, attach (the
  export appears), stream with a speed, set-speed, the completed event,
  an incremental stream stepped with the cursor to the end (no backing
  left), ENOENT and ESRCH errors, error replies to an unknown command,
  to text that is not JSON and to an over-long line (which also closes
  the connection), detach (the export goes), quit (exit 0, image clean
  and as its chain read);
- the FUSE export (skipped where FUSE cannot mount): the file's size,
  qemu-img compare, SEEK_DATA/SEEK_HOLE at every run of the chain's map,
  unaligned and aligned writes, punch-hole and zero-range, fsync; after
  SIGTERM the mount is gone and the image is the model; read-only refuses
  opening for writing.

Closing line: "N passed, N failed[, N skipped]"; exit 1 on failure, 77
without qemu-img, qemu-io or nbdinfo. Servers are stopped whatever happens.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402
import harness  # noqa: E402

MiB = 1024 * 1024
SIZE = 16 * MiB
WAIT = 60  # bounded waits for servers and logs (never asserted on)

NBD_MAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED, OPT_SET_META = 7, 8, 10
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 2, 3, 7
CMD_WRITE_ZEROES, FLAG_FAST_ZERO = 6, 1 << 4
EPERM, EIO, EINVAL, EOVERFLOW, ENOTSUP = 1, 5, 22, 75, 95


class Server:
    """`siphon serve ARGS`, logging to a file, stopped by stop()."""

    def __init__(self, siphon: str, tmp: str, args: list[str], name: str,
                 env: dict | None = None, umask: int | None = None):
        self.log = os.path.join(tmp, name + ".log")
        self.sock = os.path.join(tmp, name + ".sock")
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.f = open(self.log, "w")
        self.p = subprocess.Popen(
            [siphon, "serve", "--listen", "unix:" + self.sock,
             "--log-level", "debug"] + args,
            stdout=self.f, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})),
            preexec_fn=None if umask is None else lambda: os.umask(umask))
        self.ready = self._wait_sock()

    def _wait_sock(self) -> bool:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            if self.p.poll() is not None:
                return False
            if os.path.exists(self.sock):
                return True
            time.sleep(0.05)
        return False

    def uri(self, export: str = "disk") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def text(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_log(self, word: str) -> bool:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            if word in self.text():
                return True
            if self.p.poll() is not None:
                return word in self.text()
            time.sleep(0.1)
        return False

    def stop(self) -> int | None:
        """SIGTERM; the exit code (None if it had to be killed)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                self.f.close()
                return None
        self.f.close()
        return self.p.returncode


def build_chain(tmp: str) -> tuple[str, str]:
    """The chain's top and a raw copy of its content."""
    base = os.path.join(tmp, "base.raw")
    mid = os.path.join(tmp, "mid.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    corpus.create_raw(base, SIZE)
    corpus.qemu_io(base, "raw", "write -P 0x11 0 4M",
                   "write -z 4M 1M",  # written zeros: data to qemu
                   "write -P 0x12 6M 2M")  # 8M..16M stays a hole
    with open(base, "r+b") as f:
        f.truncate(SIZE)
    corpus.create_qcow2(mid, SIZE, backing=base, backing_fmt="raw")
    corpus.qemu_io(mid, "qcow2", "write -P 0x21 1M 512k",
                   "write -z 6M 256k", "write -P 0x22 9M 1M")
    corpus.create_qcow2(top, SIZE, backing=mid, backing_fmt="qcow2")
    corpus.qemu_io(top, "qcow2", "write -P 0x31 2M 64k",
                   "write -P 0x32 12M 192k")
    expect = os.path.join(tmp, "expect.raw")
    corpus.qemu_img("convert", "-O", "raw", top, expect)
    return top, expect


def byte_map(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """qemu-img map's entries as merged (start, end, data, zero) runs."""
    out: list[tuple[int, int, bool, bool]] = []
    for e in entries:
        s, n = e["start"], e["length"]
        d, z = bool(e["data"]), bool(e["zero"])
        if out and out[-1][1] == s and out[-1][2:] == (d, z):
            out[-1] = (out[-1][0], s + n, d, z)
        else:
            out.append((s, s + n, d, z))
    return out


def qemu_map(target: str, fmt: str) -> list[tuple[int, int, bool, bool]]:
    r = corpus.qemu_img("map", "--output=json", "-U", "-f", fmt, target)
    return byte_map(json.loads(r.stdout))


# ---- a minimal NBD client, from the protocol specification ----

class Client:
    def __init__(self, addr):
        """addr: a Unix socket's path, or (host, port) on 127.0.0.1."""
        if isinstance(addr, tuple):
            self.s = socket.create_connection(addr, WAIT)
        else:
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(addr)
        self.s.settimeout(WAIT)
        self.structured = False

    def recvn(self, n: int) -> bytes:
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return b

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.recvn(18))
        assert magic == NBD_MAGIC and opt == IHAVEOPT
        return flags

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, typ, ln = struct.unpack(">QIII", self.recvn(20))
            assert magic == REP_MAGIC and o == opt, (hex(magic), o)
            replies.append((typ, self.recvn(ln)))
            if typ == 1 or typ & 0x80000000:
                return replies

    def go(self, export: str, structured=True, meta=False) -> int:
        """Handshake up to transmission; the export's size."""
        self.greeting()
        self.s.sendall(struct.pack(">I", 3))
        if structured:
            assert self.option(OPT_STRUCTURED)[-1][0] == 1
            self.structured = True
        name = export.encode()
        if meta:
            q = b"base:allocation"
            r = self.option(OPT_SET_META, struct.pack(">I", len(name)) +
                            name + struct.pack(">II", 1, len(q)) + q)
            assert r[-1][0] == 1 and r[0][0] == 4, r
        r = self.option(OPT_GO, struct.pack(">I", len(name)) + name +
                        struct.pack(">H", 0))
        assert r[-1][0] == 1, r
        size = None
        for typ, d in r:
            if typ == 3 and struct.unpack(">H", d[:2])[0] == 0:
                size = struct.unpack(">Q", d[2:10])[0]
        return size

    def request(self, cmd: int, off: int, ln: int, flags: int = 0,
                cookie: int = 7, payload: bytes = b"") -> None:
        self.s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie,
                                   off, ln) + payload)

    def reply(self) -> tuple[int, int, bytes]:
        """(cookie, error, data) of one reply (all chunks of it)."""
        magic = struct.unpack(">I", self.recvn(4))[0]
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recvn(12))
            return cookie, err, b""
        assert magic == STRUCT_MAGIC, hex(magic)
        data, err = b"", 0
        while True:
            flags, typ, cookie, ln = struct.unpack(">HHQI", self.recvn(16))
            body = self.recvn(ln)
            if typ == 1:
                data += body[8:]
            elif typ & 0x8000:
                err = struct.unpack(">I", body[:4])[0]
            elif typ == 5:
                data += body
            if flags & 1:
                return cookie, err, data
            magic = struct.unpack(">I", self.recvn(4))[0]

    def read(self, off: int, ln: int) -> tuple[int, bytes]:
        self.request(CMD_READ, off, ln)
        _, err, data = self.reply()
        return err, data

    def closed(self) -> bool:
        """The server closed the connection (EOF within the wait)."""
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.s.close()


def expect_err(c: Client, want: int, what: str, **req) -> list[str]:
    c.request(**req)
    try:
        _, err, _ = c.reply()
    except (EOFError, OSError) as e:
        return [f"{what}: no reply ({e!r})"]
    return [] if err == want else [f"{what}: error {err}, want {want}"]


def still_serves(srv: Server, expect: str) -> list[str]:
    with open(expect, "rb") as f:
        want = f.read(MiB)
    c = Client(srv.sock)
    try:
        c.go("disk")
        err, data = c.read(0, MiB)
        c.request(CMD_DISC, 0, 0)
    finally:
        c.close()
    if err or data != want:
        return [f"another client's read: error {err}, "
                f"{'same' if data == want else 'different'} bytes"]
    return []


# ---- cases ----

def case_clients(rep, siphon, tmp, top, expect) -> None:
    second = os.path.join(tmp, "second.qcow2")
    corpus.create_qcow2(second, 2 * MiB)
    srv = Server(siphon, tmp, [top + "=disk", second], "clients")
    try:
        if not srv.ready:
            rep.emit("clients/start", [srv.text()])
            return
        r = harness.run(["nbdinfo", "--json", srv.uri()])
        probs = [r.describe()] if r.rc != 0 else []
        if not probs:
            info = json.loads(r.out)["exports"][0]
            if info.get("export-size") != SIZE:
                probs.append(f"size {info.get('export-size')}")
            if info.get("can_multi_conn") is not True:
                probs.append("no multi-conn")
            if "base:allocation" not in info.get("contexts", []):
                probs.append(f"contexts {info.get('contexts')}")
            if info.get("is_read_only") is not False:
                probs.append("read-only")
        rep.emit("clients/nbdinfo", probs)
        r = harness.run(["nbdinfo", "--list", "--json", srv.uri()])
        names = [] if r.rc else [e["export-name"] for e in
                                 json.loads(r.out)["exports"]]
        rep.emit("clients/nbdinfo-list", [] if names == ["disk",
                                                         "second.qcow2"]
                 else [f"exports {names} {r.describe()}"])
        r = harness.run(["nbdinfo", "--size",
                         f"nbd+unix:///?socket={srv.sock}"])
        rep.emit("clients/default-export",
                 [] if r.rc == 0 and r.out.strip() == str(SIZE).encode()
                 else [r.describe()])
        r = harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                         srv.uri(), expect])
        rep.emit("clients/qemu-img-compare", [] if r.rc == 0 else
                 [r.describe()])
        over_nbd = qemu_map(srv.uri(), "raw")
        chain = qemu_map(top, "qcow2")
        rep.emit("clients/qemu-img-map", [] if over_nbd == chain else
                 [f"over NBD: {over_nbd}", f"chain:    {chain}"])
        out = os.path.join(tmp, "copy.raw")
        r = harness.run(["nbdcopy", srv.uri(), out])
        same = r.rc == 0 and open(out, "rb").read() == \
            open(expect, "rb").read()
        rep.emit("clients/nbdcopy", [] if same else [r.describe()])
        # TCP on 127.0.0.1, asked for explicitly; a read-only export.
        ro = os.path.join(tmp, "ro.qcow2")
        corpus.create_qcow2(ro, 2 * MiB)
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        pnum = port.getsockname()[1]
        port.close()
        tsrv = Server(siphon, tmp, ["--listen", f"tcp:127.0.0.1:{pnum}",
                                    "--read-only", ro + "=s"], "tcp")
        try:
            ok = False
            end = time.monotonic() + WAIT
            while time.monotonic() < end and tsrv.p.poll() is None:
                r = harness.run(["nbdinfo", "--size",
                                 f"nbd://127.0.0.1:{pnum}/s"])
                if r.rc == 0:
                    ok = r.out.strip() == str(2 * MiB).encode()
                    break
                time.sleep(0.1)
            rep.emit("clients/tcp", [] if ok else [tsrv.text()])
            c = Client(("127.0.0.1", pnum))
            c.go("s")
            rep.emit("clients/read-only-write-eperm",
                     expect_err(c, EPERM, "write to a read-only export",
                                cmd=CMD_WRITE, off=0, ln=512,
                                payload=b"y" * 512))
            c.close()
        finally:
            tsrv.stop()
    finally:
        rc = srv.stop()
        rep.emit("clients/sigterm", [] if rc == 0 else
                 [f"exit {rc}", srv.text()])


def case_bad_clients(rep, siphon, tmp, top, expect) -> None:
    srv = Server(siphon, tmp, ["--handshake-timeout", "1",
                               "--max-connections", "4", top + "=disk"],
                 "bad")
    try:
        if not srv.ready:
            rep.emit("bad/start", [srv.text()])
            return
        # Error replies; the connection stays usable.
        c = Client(srv.sock)
        c.go("disk", meta=False)
        probs = []
        probs += expect_err(c, EINVAL, "read past the end", cmd=CMD_READ,
                            off=SIZE - 512, ln=1024)
        probs += expect_err(c, EINVAL, "overflowing read", cmd=CMD_READ,
                            off=(1 << 64) - 512, ln=1024)
        probs += expect_err(c, EINVAL, "read over the maximum",
                            cmd=CMD_READ, off=0, ln=64 * MiB)
        probs += expect_err(c, EINVAL, "unknown command", cmd=99, off=0,
                            ln=512)
        probs += expect_err(c, EINVAL, "unknown flag", cmd=CMD_READ,
                            off=0, ln=512, flags=1 << 9)
        probs += expect_err(c, EINVAL, "block status without the context",
                            cmd=CMD_BLOCK_STATUS, off=0, ln=MiB)
        probs += expect_err(c, EINVAL, "unaligned write", cmd=CMD_WRITE,
                            off=100, ln=512, payload=b"x" * 512)
        err, data = c.read(3, 5)  # unaligned reads are fine
        with open(expect, "rb") as f:
            if err or data != f.read(8)[3:8]:
                probs.append(f"unaligned read: {err} {data!r}")
        probs += expect_err(c, 0, "read after the errors", cmd=CMD_READ,
                            off=0, ln=4096)
        c.s.sendall(b"\xde\xad\xbe\xef" + bytes(24))  # bad magic
        if not c.closed():
            probs.append("bad request magic did not close the connection")
        c.close()
        rep.emit("bad/requests", probs)

        c = Client(srv.sock)
        c.greeting()
        c.s.sendall(struct.pack(">I", 0x80))
        rep.emit("bad/client-flags", [] if c.closed() else
                 ["unknown client flags kept the connection"])
        c.close()

        c = Client(srv.sock)
        c.greeting()
        c.s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 1, 7, 0))
        rep.emit("bad/option-magic", [] if c.closed() else
                 ["bad option magic kept the connection"])
        c.close()

        c = Client(srv.sock)
        c.greeting()
        c.s.sendall(struct.pack(">I", 3) +
                    struct.pack(">QII", IHAVEOPT, 7, 1 << 30))
        rep.emit("bad/option-too-long", [] if c.closed() else
                 ["a 1 GiB option kept the connection"])
        c.close()

        c = Client(srv.sock)
        c.greeting()  # then nothing: dropped after 1 s
        rep.emit("bad/handshake-stall", [] if c.closed() else
                 ["a stalled handshake was not dropped"])
        c.close()

        held = []
        for _ in range(4):
            h = Client(srv.sock)
            h.greeting()
            held.append(h)
        extra = Client(srv.sock)
        refused = extra.closed()
        extra.close()
        for h in held:
            h.close()
        rep.emit("bad/max-connections", [] if refused else
                 ["a fifth connection was served with --max-connections 4"])
        # The held ones are dropped by the handshake timeout meanwhile.
        time.sleep(0.2)
        ok = []
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            try:
                ok = still_serves(srv, expect)
                break
            except (EOFError, OSError):
                time.sleep(0.2)
        rep.emit("bad/others-still-served", ok)
    finally:
        rc = srv.stop()
        rep.emit("bad/sigterm", [] if rc == 0 else [f"exit {rc}",
                                                    srv.text()])


def fio_verify(rep, name: str, fio: str, srv: Server, tmp: str,
               offset: str, size: str) -> None:
    """fio writes random data over 4 connections, job i in [offset + i M,
    + size), and reads it back verified (crc32c)."""
    r = harness.run([fio, "--name=v", "--ioengine=nbd", f"--uri={srv.uri()}",
                     "--rw=randwrite", "--bs=4k", "--iodepth=16",
                     "--numjobs=4", f"--offset={offset}", f"--size={size}",
                     "--offset_increment=1M", "--verify=crc32c",
                     "--do_verify=1", "--group_reporting"],
                    timeout=300, cwd=tmp)
    rep.emit(name, [] if r.rc == 0 else [r.describe(),
                                         r.out.decode()[-2000:]])


def case_stream_writes(rep, siphon, tmp, top, expect) -> None:
    work = os.path.join(tmp, "work.qcow2")
    shutil.copy(top, work)
    model = os.path.join(tmp, "model.raw")
    shutil.copy(expect, model)
    ops = ["write -P 0x77 1M 64k", "write -z 2M 128k",
           "write -P 0x78 9M 4k", "write -P 0x79 15M 1M",
           "discard 13M 64k"]
    # First run: writes while the stream runs (slowly), then SIGTERM.
    srv = Server(siphon, tmp, ["--stream", "--speed", "2M",
                               work + "=disk"], "stream")
    try:
        if not srv.ready:
            rep.emit("stream/start", [srv.text()])
            return
        r = harness.run(["qemu-io", "-f", "raw", srv.uri()] +
                        sum((["-c", o] for o in ops), []))
        corpus.qemu_io(model, "raw", *ops)
        rep.emit("stream/qemu-io-writes",
                 [] if r.rc == 0 and b"error" not in r.out.lower()
                 else [r.describe(), r.out.decode(errors="replace")])
    finally:
        rc = srv.stop()
    # The stream was still running (--speed): stopped, not completed.
    stopped = "stream stopped" in srv.text() and \
        "stream completed" not in srv.text()
    rep.emit("stream/sigterm-mid-stream", [] if rc == 0 and stopped else
             [f"exit {rc}", srv.text()])
    r = harness.run(["qemu-img", "check", work])
    rep.emit("stream/check-after-sigterm", [] if r.rc == 0 else
             [r.describe()])
    # Second run resumes; fio writes and verifies over 4 connections, the
    # export reads as the model, and the stream completes.
    srv = Server(siphon, tmp, ["--stream", "--speed", "8M",
                               work + "=disk"], "stream2")
    try:
        fio = shutil.which("fio")
        if not srv.ready:
            rep.emit("stream/restart", [srv.text()])
            return
        # FAST_ZERO: whole clusters are metadata (done), a partial one
        # would be a write of zeros (ENOTSUP, nothing done).
        c = Client(srv.sock)
        c.go("disk")
        probs = expect_err(c, 0, "fast zero, whole clusters",
                           cmd=CMD_WRITE_ZEROES, off=10 * MiB, ln=65536,
                           flags=FLAG_FAST_ZERO)
        probs += expect_err(c, ENOTSUP, "fast zero, partial cluster",
                            cmd=CMD_WRITE_ZEROES, off=11 * MiB + 512,
                            ln=1024, flags=FLAG_FAST_ZERO)
        c.request(CMD_DISC, 0, 0)
        c.close()
        with open(model, "r+b") as m:
            m.seek(10 * MiB)
            m.write(bytes(65536))
        rep.emit("stream/fast-zero", probs)
        if fio:
            # Random data written and verified in [4M, 8M), which the
            # model then takes from the export.
            fio_verify(rep, "stream/fio-verify", fio, srv, tmp, "4M", "1M")
            part = os.path.join(tmp, "part.raw")
            r2 = harness.run(["nbdcopy", srv.uri(), part])
            if r2.rc == 0:
                with open(part, "rb") as f, open(model, "r+b") as m:
                    f.seek(4 * MiB)
                    m.seek(4 * MiB)
                    m.write(f.read(4 * MiB))
        else:
            rep.emit("stream/fio-verify", [], skip="fio not installed")
        r = harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                         srv.uri(), model])
        rep.emit("stream/compare-while-streaming",
                 [] if r.rc == 0 else [r.describe()])
        done = srv.wait_log("stream completed")
    finally:
        rc = srv.stop()
    rep.emit("stream/resumed-and-completed", [] if done and rc == 0 else
             [f"exit {rc}", srv.text()])
    info = json.loads(corpus.qemu_img("info", "--output=json",
                                      work).stdout)
    r = harness.run(["qemu-img", "check", work])
    c = harness.run(["qemu-img", "compare", "-F", "raw", work, model])
    probs = []
    if "backing-filename" in info:
        probs.append("backing file left: " + info["backing-filename"])
    if r.rc != 0:
        probs.append(r.describe())
    if c.rc != 0:
        probs.append(c.describe())
    rep.emit("stream/flat-clean-and-as-written", probs)


def wb_write(c: Client, off: int, data: bytes, cookie: int = 7) -> int:
    c.request(CMD_WRITE, off, len(data), cookie=cookie, payload=data)
    return c.reply()[1]


def wb_flush(c: Client) -> int:
    c.request(CMD_FLUSH, 0, 0)
    return c.reply()[1]


def case_writeback(rep, siphon, tmp, top, expect) -> None:
    work = os.path.join(tmp, "wb.qcow2")
    shutil.copy(top, work)
    model = os.path.join(tmp, "wb-model.raw")
    shutil.copy(expect, model)
    srv = Server(siphon, tmp, ["--cache", "writeback", "--stream",
                               "--speed", "4M", work + "=disk"], "wb",
                 env={"SIPHON_FAULT": "write:wb.qcow2:0:0:delay30"})
    try:
        if not srv.ready:
            rep.emit("writeback/start", [srv.text()])
            return
        c1, c2 = Client(srv.sock), Client(srv.sock)
        c1.go("disk")
        c2.go("disk")
        probs = []
        written = []
        # 2M: a cluster of the top; 5M, 9M, 14M: still in the backing.
        for i, off in enumerate((2 * MiB, 5 * MiB + 4096, 9 * MiB,
                                 14 * MiB + 65536, 2 * MiB + 8192)):
            data = bytes([0x40 + i]) * (4096 if i % 2 else 65536)
            err = wb_write(c1, off, data)
            reader = c1 if i % 2 else c2
            rerr, back = reader.read(off, len(data))
            written.append((off, data))
            if err or rerr or back != data:
                probs.append(f"write at {off} (err {err}) read back by "
                             f"{'the same' if reader is c1 else 'another'}"
                             f" connection: err {rerr}, "
                             f"{'same' if back == data else 'old'} bytes")
        rep.emit("writeback/read-after-write", probs)
        # 32 writes in a row, every reply, a FLUSH on the other connection,
        # then read back there.
        probs = []
        batch = [(3 * MiB + i * 8192, bytes([0x60 + i]) * 4096)
                 for i in range(32)]
        for i, (off, data) in enumerate(batch):
            c1.request(CMD_WRITE, off, len(data), cookie=100 + i,
                       payload=data)
        errs = [c1.reply()[1] for _ in batch]
        ferr = wb_flush(c2)
        for off, data in batch:
            rerr, back = c2.read(off, len(data))
            if rerr or back != data:
                probs.append(f"pipelined write at {off}: err {rerr}")
        if any(errs) or ferr:
            probs.append(f"write errors {errs}, flush {ferr}")
        written += batch
        rep.emit("writeback/pipelined-then-flush", probs)
        for c in (c1, c2):
            c.request(CMD_DISC, 0, 0)
            c.close()
        with open(model, "r+b") as m:
            for off, data in written:
                m.seek(off)
                m.write(data)
        fio = shutil.which("fio")
        if fio:
            fio_verify(rep, "writeback/fio-verify", fio, srv, tmp, "8M",
                       "512k")
        else:
            rep.emit("writeback/fio-verify", [], skip="fio not installed")
        # What the export reads now is what the image must hold.
        part = os.path.join(tmp, "wb-part.raw")
        r = harness.run(["nbdcopy", srv.uri(), part])
        probs = [] if r.rc == 0 else [r.describe()]
        if r.rc == 0:
            with open(part, "rb") as f, open(model, "r+b") as m:
                f.seek(8 * MiB)
                m.seek(8 * MiB)
                m.write(f.read(4 * MiB))
            r = harness.run(["qemu-img", "compare", "-f", "raw", "-F",
                             "raw", part, model])
            if r.rc != 0:
                probs.append("the export is not the model: " + r.describe())
        rep.emit("writeback/export-as-written", probs)
    finally:
        rc = srv.stop()
    r = harness.run(["qemu-img", "check", work])
    c = harness.run(["qemu-img", "compare", "-F", "raw", work, model])
    rep.emit("writeback/sigterm-keeps-answered-writes",
             [] if rc == 0 and r.rc == 0 and c.rc == 0 else
             [f"exit {rc}", r.describe(), c.describe()])
    case_writeback_error(rep, siphon, tmp)


def case_writeback_error(rep, siphon, tmp) -> None:
    img = os.path.join(tmp, "wbe.qcow2")
    corpus.create_qcow2(img, 4 * MiB)
    corpus.qemu_io(img, "qcow2", "write -P 0x51 0 4M")
    m = json.loads(corpus.qemu_img("map", "--output=json", img).stdout)
    host = next(e["offset"] + MiB - e["start"] for e in m
                if e["start"] <= MiB < e["start"] + e["length"])
    fault = {"SIPHON_FAULT": f"write:wbe.qcow2:{host}:65536:EIO:1"}
    srv = Server(siphon, tmp, ["--cache", "writeback", img + "=disk"],
                 "wbe", env=fault)
    try:
        if not srv.ready:
            rep.emit("writeback/error-start", [srv.text()])
            return
        c1, c2 = Client(srv.sock), Client(srv.sock)
        c1.go("disk")
        c2.go("disk")
        got = [wb_write(c1, MiB, b"\x52" * 4096)]
        got += [wb_flush(c1), wb_flush(c1), wb_flush(c2)]
        c3 = Client(srv.sock)
        c3.go("disk")
        got.append(wb_flush(c3))
        for c in (c1, c2, c3):
            c.close()
        want = [0, EIO, 0, EIO, 0]
        logged = srv.wait_log("acknowledged write")
        rep.emit("writeback/failed-write-reported-by-flush",
                 [] if got == want and logged else
                 [f"write, flush, flush, other flush, new flush: {got}, "
                  f"want {want}", srv.text()])
    finally:
        srv.stop()
    srv = Server(siphon, tmp, [img + "=disk"], "wbe2", env=fault)
    try:
        if not srv.ready:
            rep.emit("writeback/error-start", [srv.text()])
            return
        c1 = Client(srv.sock)
        c1.go("disk")
        got = [wb_write(c1, MiB, b"\x53" * 4096), wb_flush(c1)]
        c1.close()
        rep.emit("writeback/without-it-the-write-fails",
                 [] if got == [EIO, 0] else [f"write, flush: {got}"])
    finally:
        srv.stop()


def ctl(siphon: str, sock: str, *args: str) -> harness.Result:
    return harness.run([siphon, "ctl", sock, *args])


def ctl_json(siphon: str, sock: str, *args: str) -> tuple[dict, str]:
    """The daemon's reply to `siphon ctl --output=json`, and problems."""
    r = harness.run([siphon, "ctl", "--output=json", sock, *args])
    try:
        return json.loads(r.out.decode().splitlines()[0]), ""
    except (ValueError, IndexError):
        return {}, r.describe()


def raw_request(sock: str, data: bytes) -> tuple[list[dict], bool]:
    """Send raw bytes to the control socket: the reply lines, and whether
    the daemon then closed the connection."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(WAIT)
    s.connect(sock)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    buf = b""
    closed = False
    try:
        while True:
            c = s.recv(65536)
            if not c:
                closed = True
                break
            buf += c
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    s.close()
    return [json.loads(x) for x in buf.decode().splitlines() if x], closed


def case_control(rep, siphon, tmp, top, expect) -> None:
    work = os.path.join(tmp, "ctl-a.qcow2")
    shutil.copy(top, work)
    other = os.path.join(tmp, "ctl-b.qcow2")
    corpus.create_qcow2(other, 4 * MiB, backing=os.path.join(tmp, "base.raw"),
                        backing_fmt="raw")
    csock = os.path.join(tmp, "ctl.sock")
    # umask 0: the sockets are 0600 by themselves, whatever the umask.
    srv = Server(siphon, tmp, ["--control", csock, work + "=a"], "control",
                 umask=0)
    ev = None
    try:
        if not srv.ready or not os.path.exists(csock):
            rep.emit("control/start", [srv.text()])
            return
        modes = [os.stat(p).st_mode & 0o777 for p in (csock, srv.sock)]
        rep.emit("control/socket-mode-0600", [] if modes == [0o600] * 2
                 else [f"control, NBD sockets: {list(map(oct, modes))}"])
        r, probs = ctl_json(siphon, csock, "info")
        disks = r.get("disks", [])
        rep.emit("control/info", [probs] if probs else [] if
                 [d["export"] for d in disks] == ["a"] and
                 disks[0]["path"] == work and disks[0]["size"] == SIZE
                 else [json.dumps(r)])
        r, probs = ctl_json(siphon, csock, "attach", other + "=b")
        lst = harness.run(["nbdinfo", "--list", "--json",
                           f"nbd+unix:///?socket={srv.sock}"])
        names = [] if lst.rc else sorted(
            e["export-name"] for e in json.loads(lst.out)["exports"])
        rep.emit("control/attach-exports", [] if r.get("ok") and
                 names == ["a", "b"] else [probs, json.dumps(r),
                                           str(names)])
        ev = subprocess.Popen([siphon, "ctl", "--output=json", csock,
                               "events"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        time.sleep(0.3)
        r, probs = ctl_json(siphon, csock, "stream", "a", "--speed", "1M")
        r2, _ = ctl_json(siphon, csock, "info")
        st = next((d.get("stream", {}) for d in r2.get("disks", [])
                   if d["export"] == "a"), {})
        rep.emit("control/stream-running",
                 [] if r.get("ok") and st.get("state") == "running" and
                 st.get("bandwidth") == MiB else [probs, json.dumps(r2)])
        r, probs = ctl_json(siphon, csock, "set-speed", "a", "0")
        rep.emit("control/set-speed", [] if r.get("ok") else [probs])
        # The event arrives when the stream completes.
        line = b""
        end = time.monotonic() + WAIT
        while time.monotonic() < end and b"completed" not in line:
            # Bounded: never a readline that waits for ever.
            if not select.select([ev.stdout], [], [],
                                 max(0.0, end - time.monotonic()))[0]:
                break
            line = ev.stdout.readline()
            if not line:
                break
        got = json.loads(line) if line.strip() else {}
        rep.emit("control/event-completed",
                 [] if got.get("event") == "completed" and
                 got.get("path") == work else [repr(line)])
        # An increment at a time from the opaque cursor, to the end.
        r, probs = ctl_json(siphon, csock, "stream", "b", "--step", "0")
        cur, steps, probs2 = r.get("cursor"), 0, [probs] if probs else []
        while r.get("ok") and cur != r.get("end") and steps < 10000:
            r, p2 = ctl_json(siphon, csock, "stream", "b", "--step",
                             str(cur))
            cur = r.get("cursor")
            steps += 1
            if p2:
                probs2.append(p2)
        info = json.loads(corpus.qemu_img("info", "-U", "--output=json",
                                          other).stdout)
        if "backing-filename" in info:
            probs2.append("backing left after the last increment")
        rep.emit("control/incremental-to-the-end", probs2,
                 info=f"{steps} steps")
        # Errors: ENOENT, unknown command, not JSON, an over-long line.
        r = ctl(siphon, csock, "abort", "nosuch")
        rep.emit("control/error-enoent", [] if r.rc == 1 and
                 "ENOENT" in r.err else [r.describe()])
        r = ctl(siphon, csock, "abort", "a")
        rep.emit("control/error-esrch", [] if r.rc == 1 and
                 "ESRCH" in r.err else [r.describe()])
        replies, _ = raw_request(csock, b'{"cmd":"frobnicate","id":7}\n'
                                 b'not json\n[1]\n')
        rep.emit("control/error-replies",
                 [] if [(x.get("ok"), x.get("errno"), x.get("id"))
                        for x in replies] ==
                 [(False, "EINVAL", 7), (False, "EINVAL", None),
                  (False, "EINVAL", None)] else [json.dumps(replies)])
        # Exactly the limit without a newline: all read, none left over
        # (so the close is a FIN after the reply, not a reset).
        replies, closed = raw_request(csock, b"{" + b" " * (64 * 1024 - 1))
        rep.emit("control/line-too-long",
                 [] if closed and replies and
                 replies[0].get("errno") == "EINVAL" else
                 [json.dumps(replies), f"closed {closed}"])
        r, probs = ctl_json(siphon, csock, "detach", "b")
        n = harness.run(["nbdinfo", "--size",
                         f"nbd+unix:///b?socket={srv.sock}"])
        rep.emit("control/detach", [] if r.get("ok") and n.rc != 0 else
                 [probs, n.describe()])
        r, probs = ctl_json(siphon, csock, "quit")
        try:
            srv.p.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            pass
        rep.emit("control/quit", [] if r.get("ok") and
                 srv.p.returncode == 0 else [probs, srv.text()])
        c = harness.run(["qemu-img", "check", work])
        c2 = harness.run(["qemu-img", "compare", "-F", "raw", work, expect])
        rep.emit("control/streamed-image", [] if c.rc == 0 and c2.rc == 0
                 else [c.describe(), c2.describe()])
    finally:
        if ev:
            ev.kill()
            ev.wait()
        srv.stop()


def case_fuse(rep, siphon, tmp, top, expect) -> None:
    work = os.path.join(tmp, "fuse.qcow2")
    shutil.copy(top, work)
    model = os.path.join(tmp, "fuse-model.raw")
    shutil.copy(expect, model)
    mnt = os.path.join(tmp, "mnt")
    os.mkdir(mnt)
    srv = Server(siphon, tmp, ["--fuse", mnt, work + "=disk"], "fuse")
    path = os.path.join(mnt, "disk")
    try:
        end = time.monotonic() + WAIT
        while time.monotonic() < end and srv.p.poll() is None and \
                not os.path.exists(path):
            time.sleep(0.05)
        if not os.path.exists(path):
            why = srv.text()
            if "cannot mount a FUSE" in why:
                rep.emit("fuse/mount", [], skip="FUSE unavailable: " +
                         why.strip().splitlines()[-1])
            else:
                rep.emit("fuse/mount", [why])
            return
        st = os.stat(path)
        rep.emit("fuse/file", [] if st.st_size == SIZE else
                 [f"size {st.st_size}"])
        r = harness.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                         path, expect])
        rep.emit("fuse/qemu-img-compare", [] if r.rc == 0 else
                 [r.describe()])
        # SEEK_DATA / SEEK_HOLE at every run of the chain's map.
        probs = []
        runs = qemu_map(top, "qcow2")
        fd = os.open(path, os.O_RDWR)
        try:
            # Runs of zeros are holes to lseek; merged by that alone, the
            # answer from a run's start is the start or the next run's.
            seek_runs = []
            for (a, b, _, zero) in runs:
                if seek_runs and seek_runs[-1][2] == zero:
                    seek_runs[-1][1] = b
                else:
                    seek_runs.append([a, b, zero])
            for (a, b, hole) in seek_runs:
                h = os.lseek(fd, a, os.SEEK_HOLE)
                if h != (a if hole else b):
                    probs.append(f"SEEK_HOLE at {a}: {h} (run [{a}, {b}) "
                                 f"{'hole' if hole else 'data'})")
                try:
                    d = os.lseek(fd, a, os.SEEK_DATA)
                except OSError:
                    d = None  # ENXIO: no data after a
                want = a if not hole else (b if b < SIZE else None)
                if d != want:
                    probs.append(f"SEEK_DATA at {a}: {d}, want {want}")
            rep.emit("fuse/seek-data-hole", probs)
            # Writes, aligned and not, punch-hole and zero-range.
            data = bytes(range(256)) * 256
            with open(model, "r+b") as m:
                for off, buf in ((1000, b"hello"), (3 * MiB, data),
                                 (7 * MiB + 4095, data[:3000])):
                    os.pwrite(fd, buf, off)
                    m.seek(off)
                    m.write(buf)
                for off, ln, flag in ((5 * MiB, 128 * 1024, "-p"),
                                      (6 * MiB + 100, 5000, "-z")):
                    r = harness.run(["fallocate", flag, "-o", str(off),
                                     "-l", str(ln), path])
                    if r.rc != 0:
                        probs.append(r.describe())
                    m.seek(off)
                    m.write(bytes(ln))
            os.fsync(fd)
            back = os.pread(fd, 5, 1000)
            rep.emit("fuse/writes", probs if probs or back == b"hello"
                     else [f"read back {back!r}"])
        finally:
            os.close(fd)
    finally:
        rc = srv.stop()
    rep.emit("fuse/sigterm-unmounts", [] if rc == 0 and
             not os.path.ismount(mnt) else [f"exit {rc}", srv.text()])
    r = harness.run(["qemu-img", "check", work])
    c = harness.run(["qemu-img", "compare", "-F", "raw", work, model])
    rep.emit("fuse/image-as-written", [] if r.rc == 0 and c.rc == 0 else
             [r.describe(), c.describe()])
    # Read-only: writes refused.
    srv = Server(siphon, tmp, ["--read-only", "--fuse", mnt,
                               work + "=disk"], "fuse-ro")
    try:
        end = time.monotonic() + WAIT
        while time.monotonic() < end and srv.p.poll() is None and \
                not os.path.exists(path):
            time.sleep(0.05)
        try:
            os.close(os.open(path, os.O_RDWR))
            refused = False
        except OSError as e:
            refused = e.errno in (13, 30)  # EACCES, EROFS
        rep.emit("fuse/read-only", [] if refused else
                 ["a read-only file opened for writing"])
    finally:
        srv.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="siphon-serve-") as tmp:
        siphon = harness.preflight(tmp)
        for t in ("nbdinfo", "nbdcopy"):
            if not shutil.which(t):
                print(f"SKIP: {t} not found (install libnbd-bin)")
                return harness.SKIP
        rep = harness.Report()
        top, expect = build_chain(tmp)
        case_clients(rep, siphon, tmp, top, expect)
        case_bad_clients(rep, siphon, tmp, top, expect)
        case_stream_writes(rep, siphon, tmp, top, expect)
        case_writeback(rep, siphon, tmp, top, expect)
        case_control(rep, siphon, tmp, top, expect)
        case_fuse(rep, siphon, tmp, top, expect)
        return rep.finish()


if __name__ == "__main__":
    sys.exit(main())

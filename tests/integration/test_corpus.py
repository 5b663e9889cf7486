#!/usr/bin/env python3
"""siphon against qemu on a corpus of valid images (see corpus.py).

For every image in the corpus:
  <name>/map   `siphon map --output=json` is byte-identical to
               `qemu-img map --output=json` (a unified diff on mismatch);
               for qcow2 tops also without -f (format probing);
  <name>/dump  `siphon dump` writes a raw file of the virtual size that
               `qemu-img compare -f raw -F <fmt>` finds equal to the chain,
               and that is sparse (no more allocated than the chain's data);
  <name>/info  `siphon info --output=json` is JSON whose virtual size and
               backing chain length agree with
               `qemu-img info --backing-chain --output=json`.

Exit 0 all passed, 1 any failure, 77 skipped (no qemu-img/qemu-io, or
siphon says io_uring is unavailable). Env: SIPHON (binary), SIPHON_SRC.
Set SIPHON_KEEP=DIR to build the corpus in DIR and keep it.
"""

from __future__ import annotations

import concurrent.futures
import difflib
import json
import os
import sys
import tempfile

import corpus
import harness
from harness import run

# siphon runs from here, not from the image directory, so that backing
# names must be resolved relative to the image that names them.
CWD = "/"


def check_map(siphon: str, e: corpus.Entry) -> list[str]:
    problems = []
    q = run(["qemu-img", "map", "-f", e.fmt, "--output=json", e.top])
    if q.rc != 0:
        return [f"oracle failed: {q.describe()}"]
    variants = [["-f", e.fmt]]
    if e.fmt == "qcow2":
        variants.append([])     # probed
    for opts in variants:
        r = run([siphon, "map", *opts, "--output=json", e.top], cwd=CWD)
        why = r.crashed()
        if why or r.rc != 0:
            problems.append(f"siphon map failed ({why or 'exit ' + str(r.rc)})"
                            f"\n{r.describe()}")
            continue
        if r.out != q.out:
            want = q.out.decode(errors="replace").splitlines(keepends=True)
            got = r.out.decode(errors="replace").splitlines(keepends=True)
            diff = "".join(difflib.unified_diff(
                want, got, "qemu-img map", "siphon map " + " ".join(opts)))
            if not diff:    # differs only in the final newline or bytes
                diff = f"qemu: {q.out[-40:]!r}\nsiphon: {r.out[-40:]!r}"
            if len(diff) > 6000:
                diff = diff[:6000] + "\n[... diff truncated]\n"
            problems.append(f"map output differs ({' '.join(opts) or 'probed'})"
                            f":\n{diff}")
    return problems


def data_bytes(map_json: bytes) -> tuple[int, int]:
    """(bytes with data, number of extents) in a qemu-img map JSON."""
    total = n = 0
    for ext in json.loads(map_json):
        n += 1
        if ext.get("data"):
            total += ext["length"]
    return total, n


def check_dump(siphon: str, e: corpus.Entry, workdir: str) -> list[str]:
    out = os.path.join(workdir, f"dump-{e.name}.raw")
    try:
        r = run([siphon, "dump", "-f", e.fmt, e.top, out], cwd=CWD,
                timeout=120)
        why = r.crashed()
        if why or r.rc != 0:
            return [f"siphon dump failed ({why or 'exit ' + str(r.rc)})\n"
                    f"{r.describe()}"]
        if not os.path.exists(out):
            return [f"siphon dump exited 0 but wrote no {out}"]
        problems = []
        info = run(["qemu-img", "info", "-f", e.fmt, "--output=json", e.top])
        vsize = json.loads(info.out)["virtual-size"]
        st = os.stat(out)
        if st.st_size != vsize:
            problems.append(f"dump size {st.st_size} != virtual size {vsize}")
        c = run(["qemu-img", "compare", "-f", "raw", "-F", e.fmt, out, e.top],
                timeout=120)
        if c.rc != 0:
            problems.append(f"qemu-img compare: exit {c.rc}: "
                            f"{c.out.decode(errors='replace').strip()} "
                            f"{c.err.strip()}")
        m = run(["qemu-img", "map", "-f", e.fmt, "--output=json", e.top])
        if m.rc == 0:
            data, n = data_bytes(m.out)
            limit = data + 1024 * 1024 + 8192 * n
            used = st.st_blocks * 512
            if used > limit:
                problems.append(f"dump not sparse: {used} bytes allocated, "
                                f"chain has {data} bytes of data")
        return problems
    finally:
        if os.path.exists(out):
            os.unlink(out)


def chain_length(doc) -> int | None:
    """Backing chain length (images, top included) from siphon's info JSON,
    tolerating a few shapes: a list like qemu's --backing-chain, a dict
    holding such a list, or nested backing-image objects."""
    if isinstance(doc, list):
        return len(doc)
    if not isinstance(doc, dict):
        return None
    for key in ("backing-chain", "backing_chain", "chain", "images"):
        if isinstance(doc.get(key), list):
            return len(doc[key])
    for key in ("chain-length", "chain_length", "chain-depth", "depth"):
        if isinstance(doc.get(key), int):
            return doc[key]
    for key in ("backing-image", "backing_image", "backing"):
        if isinstance(doc.get(key), dict):
            sub = chain_length(doc[key])
            return None if sub is None else sub + 1
    if not any(k in doc for k in ("backing-filename", "backing_filename",
                                  "backing-file", "backing_file")):
        return 1    # no backing at all
    return None


def virtual_size(doc) -> int | None:
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if isinstance(doc, dict):
        for key in ("virtual-size", "virtual_size", "size"):
            if isinstance(doc.get(key), int):
                return doc[key]
    return None


def check_info(siphon: str, e: corpus.Entry) -> list[str]:
    q = run(["qemu-img", "info", "--backing-chain", "-f", e.fmt,
             "--output=json", e.top])
    if q.rc != 0:
        return [f"oracle failed: {q.describe()}"]
    want = json.loads(q.out)
    r = run([siphon, "info", "-f", e.fmt, "--output=json", e.top], cwd=CWD)
    why = r.crashed()
    if why or r.rc != 0:
        return [f"siphon info failed ({why or 'exit ' + str(r.rc)})\n"
                f"{r.describe()}"]
    try:
        got = json.loads(r.out)
    except ValueError as ex:
        return [f"siphon info output is not JSON: {ex}\n"
                f"{r.out[:500].decode(errors='replace')}"]
    problems = []
    vs = virtual_size(got)
    if vs != want[0]["virtual-size"]:
        problems.append(f"virtual size: siphon {vs}, qemu "
                        f"{want[0]['virtual-size']}")
    n = chain_length(got)
    if n != len(want):
        problems.append(f"chain length: siphon {n}, qemu {len(want)}")
    if problems:
        problems.append("siphon info: " +
                        r.out[:800].decode(errors="replace"))
    return problems


def check_entry(siphon: str, e: corpus.Entry, workdir: str) \
        -> list[tuple[str, list[str]]]:
    return [(f"{e.name}/map", check_map(siphon, e)),
            (f"{e.name}/dump", check_dump(siphon, e, workdir)),
            (f"{e.name}/info", check_info(siphon, e))]


def main() -> int:
    keep = os.environ.get("SIPHON_KEEP")
    with tempfile.TemporaryDirectory(prefix="siphon-it-") as tmp:
        siphon = harness.preflight(tmp)
        root = keep or os.path.join(tmp, "corpus")
        os.makedirs(root, exist_ok=True)
        work = os.path.join(tmp, "work")
        os.makedirs(work)
        report = harness.Report()

        errors: list[str] = []
        entries = corpus.build(root, errors)
        for err in errors:
            report.emit("corpus/" + err.split(":", 1)[0], [err])
        print(f"# corpus: {len(entries)} images in {root}", flush=True)

        jobs = max(2, min(4, os.cpu_count() or 2))
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for results in pool.map(lambda e: check_entry(siphon, e, work),
                                    entries):
                for name, problems in results:
                    report.emit(name, problems)
        return report.finish()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where a benchmark row's time goes: one fio workload against the dittofs plugin (or the
pass-through plugin, the Python ceiling), sampled with py-spy, summarised by function.

    scripts/profile_io.py ROW [--system dittofs|pt] [--size 256M] [--seconds 8]

ROW is one of: seq_fill (1 MiB writes over an empty volume, once), seq_write (1 MiB writes
over a written volume), seq_read (1 MiB reads), first_seq (1 MiB writes right after a snapshot
of the written volume, once), rand_read (4 KiB, QD16). On the pass-through plugin first_seq is a
plain overwrite: it has no snapshots.

py-spy must be on PATH (it is not part of the stack: `pip download py-spy` and unpack the
wheel, or `pip install py-spy` into any environment). The samples cover every thread of the
nbdkit process (idle samples left out, as py-spy does by default); the summary reports each
function's share of the samples of the requests, so "self" adds up to 100% of the time spent
serving them: time in pread/pwrite is I/O with the GIL released, the rest is Python.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from bench_systems import fio  # noqa: E402

PLUGIN = REPO / "plugin" / "plugin.py"
PASSTHROUGH = REPO / "scripts" / "passthrough_plugin.py"
ROWS = {  # row -> (fio rw, block size, queue depth, written first, snapshot first)
    "seq_fill": ("write", "1M", 1, False, False),
    "seq_write": ("write", "1M", 1, True, False),
    "seq_read": ("read", "1M", 1, True, False),
    "first_seq": ("write", "1M", 1, True, True),
    "rand_read": ("randread", "4k", 16, True, False),
}
REQUEST_ENTRY = ("pread (", "pwrite (", "zero (", "flush (", "trim (")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("row", choices=sorted(ROWS))
    ap.add_argument("--system", choices=["dittofs", "pt"], default="dittofs")
    ap.add_argument("--size", default="256M", help="volume size (fio's units)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="by source line, not by function")
    a = ap.parse_args()
    if shutil.which("py-spy") is None:
        print("profile_io: py-spy is not on PATH; see this script's docstring", file=sys.stderr)
        return 2
    size = _bytes(a.size)
    with tempfile.TemporaryDirectory(prefix="dittofs-prof-") as tmp:
        work = Path(tmp)
        img, sock, ctl = work / "pool.img", work / "nbd.sock", work / "ctl.sock"
        if a.system == "dittofs":
            params = [str(PLUGIN), f"disk={img}", f"size={size}", f"control={ctl}"]
        else:
            with open(img, "wb") as f:
                f.truncate(size)
            params = [str(PASSTHROUGH), f"file={img}", "threads=serialize"]
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "python", *params]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        try:
            _wait_for(sock)
            uri = f"nbd+unix:///?socket={sock}"
            rw, bs, qd, written, snapshot = ROWS[a.row]
            if written:  # in full: an overwrite, not a fill
                fio(uri, "write", "1M", 1, size)
            if snapshot and a.system == "dittofs":  # (the pass-through plugin has none)
                subprocess.run(
                    [str(REPO / ".venv" / "bin" / "snapctl"), "--control", str(ctl)]
                    + ["create", "prof"],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            raw = work / "samples.txt"
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--nonblocking",
                    "-p",
                    str(proc.pid),
                    "-r",
                    "500",
                    "-f",
                    "raw",
                    "-o",
                    str(raw),
                ]
                + ["-d", str(int(a.seconds) + 2)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            once = snapshot or not written  # a first write or a fill happens once
            r = fio(uri, rw, bs, qd, size, runtime=None if once else a.seconds)
            spy.wait()
            print(
                f"{a.row} on {a.system}: {r['bw'] / (1 << 20):,.0f} MiB/s over {r['seconds']:.1f} s"
            )
            _summarise(raw, a.top, a.lines)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


def _summarise(raw: Path, top: int, lines: bool) -> None:
    """Self and inclusive shares of the request-serving samples, by function."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f.startswith(REQUEST_ENTRY) for f in frames):
            continue  # another thread: the control server, the ticker, idle
        n = int(count)
        total += n
        own[_short(frames[-1], lines)] += n
        for f in {_short(f, lines) for f in frames}:
            inclusive[f] += n
    if not total:
        print("no request samples (was the workload too short?)")
        return
    print(f"{total} samples in requests")
    print(f"{'self':>6} {'incl':>6}  function")
    for name, n in own.most_common(top):
        print(f"{100 * n / total:5.1f}% {100 * inclusive[name] / total:5.1f}%  {name}")


def _short(frame: str, lines: bool = False) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': lines of one function add up (with
    lines, 'func (file.py:123)')."""
    name, _, where = frame.partition(" (")
    if not where:
        return name or "(native)"
    where = os.path.basename(where.rstrip(")"))
    return f"{name} ({where if lines else where.split(':')[0]})"


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def _wait_for(sock: Path, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"nbdkit did not create {sock} in {limit:.0f} s")
        time.sleep(0.05)
    time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())

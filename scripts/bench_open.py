#!/usr/bin/env python3
"""Open time of a pool, one tree of dittofs against another: how long from Engine.open to the
first 4 KiB read answering, in a fresh process each time, the two trees interleaved.

    scripts/bench_open.py build TREE DISK      # format DISK with TREE's code, then 100
                                               # snapshots, 1,000 blocks written before each
    scripts/bench_open.py compare OLD_TREE OLD_DISK NEW_TREE NEW_DISK [--repeats N]

TREE is a checkout of dittofs (e.g. `git worktree add /tmp/old 0740212`); DISK a block device
(a loop device on a sparse 1 TiB file: `truncate -s 1T f; losetup -f --show f`) or an image.
The open is in-process, so this measures the engine's part (superblock, roots, bitmap, the
deferral window, the tables), not nbdkit's start; bench.py's scale phase has launch-to-read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

BS = 65536
SNAPSHOTS = 100
PER_INTERVAL = 1000

_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from fsimpl.engine import Engine
t = time.perf_counter()
eng = Engine.open(sys.argv[2], claim=False)
buf = bytearray(4096)
eng.read(eng.open_export("live", True), memoryview(buf), 12345 * 65536)
print((time.perf_counter() - t) * 1000)
eng.close()
"""


def build(tree: str, disk: str) -> None:
    sys.path.insert(0, tree)
    from fsimpl.engine import Engine

    Engine.format(disk, block_size=BS)
    eng = Engine.open(disk, claim=False)
    ex = eng.open_export("live", False)
    data = os.urandom(4096)
    nblocks = ex.size // BS
    step = nblocks // PER_INTERVAL
    for s in range(SNAPSHOTS):
        for i in range(PER_INTERVAL):
            eng.write(ex, memoryview(data), ((i * step + s * 7) % nblocks) * BS)
        eng.create_snapshot(f"s{s}")
    eng.close()


def open_ms(tree: str, disk: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, tree, disk], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("tree")
    b.add_argument("disk")
    c = sub.add_parser("compare")
    c.add_argument("old_tree")
    c.add_argument("old_disk")
    c.add_argument("new_tree")
    c.add_argument("new_disk")
    c.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.tree, a.disk)
        return
    old: list[float] = []
    new: list[float] = []
    for _ in range(a.repeats):
        old.append(open_ms(a.old_tree, a.old_disk))
        new.append(open_ms(a.new_tree, a.new_disk))
    mo, mn = statistics.median(old), statistics.median(new)
    print(f"open to first 4 KiB read, median of {a.repeats}: old {mo:.1f} ms, new {mn:.1f} ms")
    print(f"new / old: {mn / mo:.2f}")


if __name__ == "__main__":
    main()

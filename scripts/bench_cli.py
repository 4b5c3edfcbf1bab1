#!/usr/bin/env python3
"""snapctl timings at scale: `list` with 1,000 snapshots, `diff` of 1% of a 64 GiB volume.

    scripts/bench_cli.py [--snapshots 1000] [--volume-size 64G] [--repeats 5]

Starts a real server on a fresh image pool, builds the state through NBD and the control
socket, then times the snapctl commands as a user runs them (wall time of the process,
median of repeats) next to the control-socket call alone.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness import NbdkitServer  # noqa: E402

from fsimpl.client import SocketClient  # noqa: E402


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", type=int, default=1000)
    ap.add_argument("--volume-size", default="64G")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    size = int(args.volume_size[:-1]) << {"G": 30, "M": 20}[args.volume_size[-1]]
    work = Path(tempfile.mkdtemp(prefix="dittofs-bench-cli."))
    try:
        srv = NbdkitServer(work, work / "pool.img", size=str(size)).start()
        h = srv.connect("live")
        ctl = SocketClient(str(srv.control))
        bs = 65536
        nblocks = size // bs
        rng = random.Random(1)
        # diff: snapshot a, change 1% of the blocks (4 KiB into each), snapshot b
        ctl.call("create", {"name": "a"})
        changed = rng.sample(range(nblocks), nblocks // 100)
        for b in changed:
            h.pwrite(os.urandom(4096), b * bs)
        h.flush()
        ctl.call("create", {"name": "b"})
        t_diff_sock = timed(lambda: ctl.call("diff", {"from": "a", "to": "b"}), args.repeats)
        t_diff_cli = timed(lambda: srv.snapctl("diff", "a", "b", "--json"), args.repeats)
        # list: snapshots 3..N, one 4 KiB write between each
        for i in range(args.snapshots - 2):
            h.pwrite(os.urandom(4096), rng.randrange(nblocks) * bs)
            ctl.call("create", {"name": f"s{i:05d}"})
        t_list_sock = timed(lambda: ctl.call("list"), args.repeats)
        t_list_cli = timed(lambda: srv.snapctl("list", "--json"), args.repeats)
        t_create = timed(lambda: ctl.call("create", {"name": f"x{time.time_ns()}"}), args.repeats)
        ctl.close()
        h.shutdown()
        srv.stop()
        print(
            f"dittofs snapctl timings, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
            f"median of {args.repeats}"
        )
        print(
            f"  diff of 1% of {args.volume_size} ({len(changed)} blocks changed): "
            f"snapctl {t_diff_cli * 1000:.0f} ms, control call {t_diff_sock * 1000:.0f} ms"
        )
        print(
            f"  list with {args.snapshots} snapshots: snapctl {t_list_cli * 1000:.0f} ms, "
            f"control call {t_list_sock * 1000:.0f} ms"
        )
        print(f"  create with {args.snapshots} snapshots (control call): {t_create * 1000:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

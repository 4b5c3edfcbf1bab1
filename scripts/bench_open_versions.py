#!/usr/bin/env python3
"""Open time of two versions of dittofs, side by side in one run: launch to first read.

Issue 15 asks that the open of a 1 TiB pool with 100 snapshots take at most twice what it took
before format version 2. Figures from different days on this VM move by more than that (the
references themselves do), so this measures both in one run: each version builds its own pool
with the same workload, in-process (a 1 TiB image, 100 snapshots, 200 scattered 4 KiB writes
before each), then nbdkit serving each pool is launched in turn, interleaved, until a 4 KiB read
of live returns. The older version runs from a git worktree of COMMIT.

    scripts/bench_open_versions.py [--base COMMIT] [--repeats N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_systems  # noqa: E402
from bench_systems import Dittofs  # noqa: E402

BASE = "0740212"  # the last commit before format version 2 (its plan, no code change)
SIZE = 1 << 40

BUILD = """
import os, random, sys
from fsimpl.engine import Engine
eng = Engine.open(sys.argv[1], create_size=SIZE, block_size=65536, claim=False)
ex = eng.open_export("live", False)
rng = random.Random(5)
data = memoryview(os.urandom(4096))
for i in range(100):
    for _ in range(200):
        eng.write(ex, data, rng.randrange(SIZE // 65536) * 65536)
    eng.flush()
    eng.create_snapshot(f"s{i:03d}")
eng.close()
""".replace("SIZE", str(SIZE))


class OldDittofs(Dittofs):
    """The base version's plugin: it has no metadata-copies parameter."""

    def command(self) -> list[str]:
        return [a for a in super().command() if not a.startswith("metadata-copies=")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=BASE, help=f"the older commit (default {BASE})")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where images go (default: $TMPDIR)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dittofs-open.", dir=a.dir))
    tree = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", "-q", str(tree), a.base])
    try:
        versions = {f"base {a.base}": (tree, OldDittofs), "main": (REPO, Dittofs)}
        images = {}
        for name, (root, _) in versions.items():
            img = work / f"{name.split()[0]}.img"
            env = dict(os.environ, PYTHONPATH=str(root))
            # (run from the version's own tree: `python -c` puts the working directory first)
            subprocess.run([sys.executable, "-c", BUILD, str(img)], env=env, cwd=root, check=True)
            images[name] = img
        times: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(a.repeats):
            for name, (root, cls) in versions.items():
                bench_systems.PLUGIN = root / "plugin" / "plugin.py"
                s = cls(work, "move", "serialize")
                s.use(images[name], SIZE)
                times[name].append(s.start(probe=True) * 1000)
                s.stop()
        print(f"open (launch to first 4 KiB read), 1 TiB, 100 snapshots, medians of {a.repeats}")
        for name, t in times.items():
            print(f"  {name:16s} {statistics.median(t):8.1f} ms   {[round(x, 1) for x in t]}")
        base, main_ = (statistics.median(t) for t in times.values())
        verdict = "met" if main_ <= 2 * base else "NOT MET"
        print(f"  {verdict}: main <= 2 x base: {main_ / base:.2f}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)])
        for img in work.glob("*.img"):
            img.unlink()


if __name__ == "__main__":
    main()

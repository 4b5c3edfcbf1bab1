"""scripts/bench.py keeps working: `--quick` on a tiny size runs every phase against every
system and writes a JSON with a positive figure for each workload and each system it applies to.

Performance itself is never asserted here (machines are noisy): the benchmark reports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import REPO, require

sys.path.insert(0, str(REPO / "scripts"))
from bench import CSUM_ROWS, ONE_COPY_ROWS  # noqa: E402

# Which systems each workload applies to: every system for plain I/O, open time and RSS;
# the snapshot-capable ones for snapshot workloads; dittofs alone for its control-socket calls.
ALL = {"file", "pt", "qcow2", "move", "copy"}
SNAP = {"qcow2", "move", "copy"}
DITTOFS = {"move", "copy"}
EXPECTED = {
    "seq_fill": ALL,
    "seq_write": ALL,
    "seq_read": ALL,
    "rand_write": ALL,
    "fsync_write": ALL,
    "rand_read": ALL,
    "first_seq": SNAP,
    "first_rand": SNAP,
    "first_rand_merge": {"move"},
    **{f"csum_{key}": {"move"} for key in CSUM_ROWS},
    **{f"{key}_1copy": DITTOFS for key in ONE_COPY_ROWS},
    "delete_1g_1copy": DITTOFS,
    "delete_1g": SNAP,
    "chain_live_seq": SNAP,
    "chain_old_seq": SNAP,
    "chain_live_rand": SNAP,
    "chain_old_rand": SNAP,
    "diff_cli": SNAP,
    "diff_cmp": SNAP,
    "diff_socket": DITTOFS,
}
SNAPS_ROWS = ("open", "list", "cold", "warm", "live", "rss", "meta", "create", "delete")
SCALED = {"open": ALL, "rss_open": ALL, "rss_busy": ALL, "create": SNAP, "delete": SNAP}


def test_quick_bench_covers_every_workload_and_system(tmp_path: Path) -> None:
    for tool in ("nbdkit", "fio", "qemu-nbd", "qemu-img", "qemu-io", "nbdcopy"):
        require(tool)
    out = tmp_path / "bench.json"
    cp = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench.py"),
            "--quick",
            "--size-scale",
            "0.001",
            "--runtime",
            "0.5",
            "--snapshots",
            "3",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cp.returncode == 0, f"bench failed:\n{cp.stdout}\n{cp.stderr[-4000:]}"
    data = json.loads(out.read_text())
    assert data["errors"] == []
    # the servers of the merge=immediate and checksum=on rows (their figures in the move column)
    assert set(data["systems"]) == ALL | {
        "move-immediate",
        "move-checksum",
        "move-1copy",
        "copy-1copy",
    }
    rows = {w["key"]: w for w in data["workloads"]}

    expected = dict(EXPECTED)
    levels = data["config"]["levels"]
    assert len(levels) == 3 and levels[0] == 0
    for lvl in levels:
        expected[f"create_{lvl}"] = DITTOFS
        expected[f"create_cli_{lvl}"] = SNAP
    sizes = [k.split("_", 1)[1] for k in rows if k.startswith("open_")]
    assert len(sizes) == 3, sizes
    for sk in sizes:
        for prefix, systems in SCALED.items():
            expected[f"{prefix}_{sk}"] = systems

    big = 64 << 30  # above it the snaps phase's pool is sparse, and stops at big_snap_level
    for size in data["config"]["snap_sizes"]:
        for n in data["config"]["snap_levels"]:
            if size > big and n > data["config"]["big_snap_level"]:
                continue
            for what in SNAPS_ROWS:
                expected[f"snaps_{what}_{'big' if size > big else 'vol'}_{n}"] = {"move"}

    assert set(rows) == set(expected), set(rows) ^ set(expected)
    for key, systems in expected.items():
        medians = rows[key]["median"]
        assert set(medians) == systems, (key, medians)
        for sysk, v in medians.items():
            assert v > 0, (key, sysk, v)
        for name, v in rows[key]["ratios"].items():
            assert v > 0, (key, name, v)
    # the printed table has a line per workload
    for w in data["workloads"]:
        assert w["label"] in cp.stdout

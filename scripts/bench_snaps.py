"""The snaps phase of scripts/bench.py: thousands of one-block snapshots (issue 16's table).

A volume is written in full (a sparse pool is not: the 1 TiB row), then snapshots are taken
through the control socket, each after one 4 KiB write at a random place, up to each level of
--snap-levels. At each level the server first merges the partial writes (live idle), then it is
restarted and timed and measured:

* open: from the launch until a 4 KiB read answers (the image's data read once beforehand, so
  the host's page cache is equally warm for every row: see _into_host_cache);
* list: `snapctl list --json` against that fresh server (wall time of the command);
* cold: 4 KiB random reads of the oldest snapshot at QD16 for --cold-runtime s right after;
* warm: the same again, then live the same way (the reference both are compared with);
* RSS of nbdkit after those reads (the plugin's cache= is its default, 64 MiB);
* metadata per snapshot: the metadata blocks that grow with snapshots (the inode and snapshot
  tables, the shadow index and list; both copies), counted with the server stopped, grown since
  the volume was written, divided by the number of snapshots. Not the pool's used bytes: on the
  sparse pool each random write also grows live's own map by a leaf, which is not the
  snapshot's cost (that row read 124-138 KiB per snapshot before);
* create and delete: a snapshot taken after a 4 KiB write, then deleted after another
  (so it owns one block, handed down or freed).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import nbd
from bench_systems import BLOCK, Dittofs, fio, mibs, rss_kib, timed_run

from fsimpl.engine import Engine

# the metadata trees that grow with snapshots (txn.Pool.metadata_trees' names)
SNAPSHOT_TREES = ("inode table", "snapshot table", "shadow index of ", "shadow list of ")

CACHE_MIB = 64  # the plugin's default cache=


def size_label(size: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):g} {unit}"
    return f"{size} bytes"


def snaps(bench: Any) -> None:
    c, res = bench.cfg, bench.res
    m = bench.systems["move"]
    assert isinstance(m, Dittofs)
    for size in c.snap_sizes:
        big = size > (64 << 30)
        levels = [n for n in c.snap_levels if not big or n <= c.big_snap_level]
        tag = size_label(size) + (" sparse" if big else "")
        for n in levels:
            k = f"{'big' if big else 'vol'}_{n}"
            res.row(f"snaps_open_{k}", f"open, {n} snaps, {tag}", "ms", "snaps")
            res.row(f"snaps_list_{k}", "  snapctl list --json, fresh server", "ms", "snaps")
            res.row(
                f"snaps_cold_{k}",
                f"  oldest: 4K rand read QD16, first {c.cold_runtime:g}s",
                "MiB/s",
                "snaps",
            )
            res.row(f"snaps_warm_{k}", "  oldest: 4K rand read QD16, warm", "MiB/s", "snaps")
            res.row(f"snaps_live_{k}", "  live: 4K rand read QD16", "MiB/s", "snaps")
            res.row(
                f"snaps_rss_{k}",
                f"  nbdkit RSS after the reads (cache={CACHE_MIB}M)",
                "MiB",
                "snaps",
            )
            res.row(f"snaps_meta_{k}", "  metadata per one-block snapshot", "KiB", "snaps")
            res.row(f"snaps_create_{k}", "  snap create (socket)", "ms", "snaps")
            res.row(f"snaps_delete_{k}", "  delete of a one-block snap (socket)", "ms", "snaps")
        with bench.phase("snaps", f"{m.label}: {tag} volume, up to {levels[-1]} snapshots"):
            _run_levels(bench, m, size, big, levels)


def _snapshot_metadata(m: Dittofs) -> int:
    """Bytes of the metadata blocks snapshots own, both copies; the server must be stopped."""
    eng = Engine.open(str(m.img), claim=False)
    try:
        pool = eng.core.pool
        trees = [t for name, t in pool.metadata_trees() if name.startswith(SNAPSHOT_TREES)]
        nodes = sum(1 + bool(p.addr1) for t in trees for p, _ in t.all_node_pointers())
        return nodes * pool.block_size
    finally:
        eng.close()


def _run_levels(bench: Any, m: Dittofs, size: int, big: bool, levels: list[int]) -> None:
    c, res = bench.cfg, bench.res
    rng = random.Random(16)
    nblocks = size // BLOCK
    m.make(bench.img(m, f"snaps{size}"), size)
    m.start()
    if not big:
        fio(m.uri(), "write", "1M", 1, size)
    m.flush()
    m.stop()
    base = _snapshot_metadata(m)
    m.start()
    have = 0
    for n in levels:
        h = m.connect()
        buf = bytearray(4096)
        t = time.perf_counter()
        while have < n:  # one 4 KiB write, then a snapshot: each owns one block
            buf[0] = have % 250 + 1
            h.pwrite(buf, rng.randrange(nblocks) * BLOCK + rng.randrange(BLOCK // 4096) * 4096)
            m.snap_create(f"s{have:05d}")
            have += 1
        h.shutdown()
        m.flush()
        _merged(m)
        k = f"{'big' if big else 'vol'}_{n}"
        bench_log(f"snaps: {n} snapshots built in {time.perf_counter() - t:.0f}s")
        m.stop()
        grown = _snapshot_metadata(m) - base
        for _ in range(c.repeats):
            _into_host_cache(m.img)
            res.add(f"snaps_open_{k}", m.key, m.start(probe=True) * 1000)
            res.add(
                f"snaps_list_{k}", m.key, timed_run(m.snapctl("list", "--json"), env=m.env) * 1000
            )
            oldest = m.uri("s00000")
            r = fio(oldest, "randread", "4k", 16, size, runtime=c.cold_runtime)
            res.add(f"snaps_cold_{k}", m.key, mibs(r))
            res.add(
                f"snaps_warm_{k}",
                m.key,
                mibs(fio(oldest, "randread", "4k", 16, size, runtime=c.runtime)),
            )
            res.add(
                f"snaps_live_{k}",
                m.key,
                mibs(fio(m.uri(), "randread", "4k", 16, size, runtime=c.runtime)),
            )
            res.add(f"snaps_rss_{k}", m.key, rss_kib(m.pid())[0] / 1024)
            m.stop()
        res.add(f"snaps_meta_{k}", m.key, grown / have / 1024)
        m.start()
        for j in range(c.repeats):
            _write_one(m, rng, nblocks)
            res.add(f"snaps_create_{k}", m.key, m.snap_create(f"t{j}") * 1000)
            _write_one(m, rng, nblocks)
            res.add(f"snaps_delete_{k}", m.key, m.snap_delete(f"t{j}") * 1000)
    m.remove()


def _into_host_cache(img: Path) -> None:
    """Read the image's data extents once, so that every row finds the host's page cache
    equally warm: otherwise the first rows (the oldest snapshot's) pay for reading it from the
    disk and the last (live's, over the same blocks) find it cached. Cold and warm are about
    the server's own caches."""
    fd = os.open(img, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                return
            stop = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < stop:
                pos += len(os.pread(fd, min(8 << 20, stop - pos), pos))
    finally:
        os.close(fd)


def _merged(m: Dittofs, limit: float = 600.0) -> None:
    """Wait until the server has merged every partial write (it does while live is idle): the
    reads measured next are then not sharing the server with the merges."""
    deadline = time.monotonic() + limit
    while m.call("info")["volumes"][0]["unmerged_blocks"]:  # type: ignore[index]
        if time.monotonic() > deadline:
            raise RuntimeError(f"merges not done after {limit:.0f} s")
        time.sleep(0.5)


def _write_one(m: Dittofs, rng: random.Random, nblocks: int) -> None:
    h: nbd.NBD = m.connect()
    h.pwrite(bytearray(b"\x07" * 4096), rng.randrange(nblocks) * BLOCK)
    h.shutdown()


def bench_log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def snaps_targets(res: Any, cfg: Any, add: Any) -> None:
    """Issue 16's targets at the largest level of the full-size volume."""
    n = max(cfg.snap_levels)
    k = f"vol_{n}"

    def med(key: str) -> float | None:
        r = res.rows.get(key)
        return r.median("move") if r else None

    for what, bound in (("cold", 0.5), ("warm", 0.9)):
        v = res.across(f"snaps_{what}_{k}", f"snaps_live_{k}", "move")
        add(
            f"{what} reads of the oldest of {n} snaps >= {bound} x live",
            v,
            None if v is None else v >= bound,
            fmt2(v),
        )
    for key, bound, unit in (
        (f"snaps_rss_{k}", CACHE_MIB + 64.0, "MiB (cache + 64 MiB)"),
        (f"snaps_meta_{k}", 8.0, "KiB"),
        (f"snaps_list_{k}", 1000.0, "ms"),
        (f"snaps_open_{k}", 1000.0, "ms"),
    ):
        v = med(key)
        add(
            f"{key} <= {bound:g} {unit}",
            v,
            None if v is None else v <= bound,
            f"{fmt2(v)} {unit.split()[0]}",
        )


def fmt2(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"

"""Thousands of snapshots (issue 16): a cold read of the oldest snapshot costs a bounded number
of metadata reads whatever the count, the memory it takes stays inside the cache bound, and a
one-block snapshot costs a few KiB of metadata. Built quickly in-process, read through the
engine with its I/O counted."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from fsimpl.engine import Engine

BS = 65536
SIZE = 64 << 20  # 1,024 blocks
BLOCKS = SIZE // BS
CACHE = 2 << 20  # 32 nodes: far fewer than the pool's metadata blocks
COUNTS = (200, 3000)


def build(path: Path, count: int) -> None:
    """A volume written in full, then count snapshots, each after one 4 KiB write."""
    eng = Engine.open(str(path), create_size=SIZE, block_size=BS, claim=False)
    ex = eng.open_export("live", False)
    for b in range(BLOCKS):
        eng.write(ex, memoryview(bytes([b % 251 + 1]) * BS), b * BS)
    rng = random.Random(count)
    for i in range(count):
        eng.write(ex, memoryview(bytes([i % 249 + 1]) * 4096), rng.randrange(BLOCKS) * BS)
        eng.create_snapshot(f"s{i:05d}")
    eng.close()


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The pools, built once: count -> image."""
    out = {}
    for count in COUNTS:
        out[count] = tmp_path_factory.mktemp("many") / f"p{count}.img"
        build(out[count], count)
    return out


def test_cold_reads_of_the_oldest_snapshot_cost_the_same_at_any_count(
    pools: dict[int, Path],
) -> None:
    reads: dict[int, float] = {}
    worst: dict[int, int] = {}
    meta_per_snap: dict[int, float] = {}
    for count in COUNTS:
        path = pools[count]
        eng = Engine.open(str(path), claim=False, cache_bytes=CACHE)
        try:
            pool = eng.pool
            trees = [t for _, t in pool.metadata_trees()]
            meta = sum(1 + bool(p.addr1) for t in trees for p, _ in t.all_node_pointers())
            meta_per_snap[count] = meta * BS / count
            ex = eng.open_export("live@s00000", True)
            out = memoryview(bytearray(4096))
            rng = random.Random(7)
            total = 0
            for _ in range(300):
                pool.store.drop_cache()  # every read cold: nothing of the index in memory
                before = pool.store.nodes_read
                eng.read(ex, out, rng.randrange(BLOCKS) * BS)
                n = pool.store.nodes_read - before
                total += n
                worst[count] = max(worst.get(count, 0), n)
            reads[count] = total / 300
        finally:
            eng.close()
    small, big = COUNTS
    # one node per level of the shadow index and of live's map (and the next index leaf when
    # the key sought opens it): the same at 15 times the count
    assert worst[big] <= 6, worst
    assert reads[big] <= reads[small] + 1.5, reads
    # each snapshot record, shadow inode and entry, both copies, the tables' partial leaves
    assert meta_per_snap[big] <= 4096, meta_per_snap


def test_reading_thousands_of_snapshots_stays_inside_the_cache_bound(
    pools: dict[int, Path],
) -> None:
    count = COUNTS[-1]
    eng = Engine.open(str(pools[count]), claim=False, cache_bytes=CACHE)
    try:
        rng = random.Random(3)
        out = memoryview(bytearray(4096))
        names = [f"s{i:05d}" for i in range(0, count, count // 50)]
        exports = [eng.open_export(f"live@{n}", True) for n in names]
        tracemalloc.start()
        try:
            start, _ = tracemalloc.get_traced_memory()
            for _ in range(20_000):
                eng.read(rng.choice(exports), out, rng.randrange(BLOCKS) * BS)
            end, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # every node read goes through the bounded cache: what the reads keep is the cache
        # (full now) and nothing that grows with the number of snapshots or blocks read
        assert end - start <= CACHE + (1 << 20), (start, end)
        assert peak - start <= CACHE + (2 << 20), (start, peak)
    finally:
        eng.close()

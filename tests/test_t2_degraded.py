"""A degraded pool (metadata writing depends on is damaged beyond its copies), in-process: what
it refuses beyond exports, since reading past a lost shadow map returns another snapshot's data.

The pool: block 1 of live holds X; enough snapshots to fill the first inode-table leaf, then s1
(its shadow inode the last of that leaf), s2 (the first of the next leaf), live block 1
rewritten to Y (s2 keeps X), s3. Losing the second inode-table leaf loses s2's shadow map, so
s1 (and older) would read Y through the gap: every path that reads s1 must refuse it.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from support.logcheck import BAD_METADATA, HEALED_COPY, OLD_BITMAP_UNREADABLE, READ_ONLY_POOL
from t8_helpers import metadata_blocks

from fsimpl import checker, rewind
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import CorruptMetadata, DittoError, Refused
from fsimpl.layout import INODE_RECORD_SIZE, record_capacity
from fsimpl.txn import Pool, read_superblock

BS = 4096
PER_LEAF = record_capacity(BS, INODE_RECORD_SIZE)


def blk(c: str) -> bytes:
    return c.encode() * BS


def build(path: Path, rollback_in_progress: bool = False) -> None:
    eng = Engine.open(str(path), create_size=1 << 20, block_size=BS, claim=False, metadata_copies=1)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(blk("X")), BS)
    i = 0
    while eng.pool.sb.next_inode < PER_LEAF - 1:
        eng.create_snapshot(f"f{i}")
        i += 1
    eng.create_snapshot("s1")  # its shadow inode: the last of the first leaf
    eng.create_snapshot("s2")  # the first of the second
    eng.write(ex, memoryview(blk("Y")), BS)
    eng.create_snapshot("s3")
    eng.flush()
    if rollback_in_progress:  # committed, not yet run: live reads through s1 meanwhile
        eng.background.run_until_done = lambda *a, **k: None  # type: ignore[method-assign]
        eng.rollback("s1", destroy_newer=True)
    eng.device.close()


def lose_second_inode_leaf(path: Path) -> None:
    blocks, _ = metadata_blocks(path)
    [m] = [
        m for m in blocks if m.tree == "inode table" and m.level == 0 and m.first_key == PER_LEAF
    ]
    with open(path, "r+b") as f:
        f.seek(m.addr * BS)
        f.write(bytes(BS))


def read1(eng: Engine, export: str) -> bytes:
    buf = bytearray(BS)
    eng.read(eng.open_export(export, True), memoryview(buf), BS)
    return bytes(buf)


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL)
def test_send_and_diff_refuse_what_the_gap_cuts(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    build(path)
    eng = Engine.open(str(path), claim=False)
    try:
        assert read1(eng, "live@s1") == blk("X")  # whole: s2's map is there
    finally:
        eng.close()
    lose_second_inode_leaf(path)
    eng = Engine.open(str(path), claim=False)
    try:
        assert "inode table" in eng.pool.damage
        assert read1(eng, "live") == blk("Y")
        for call in (
            lambda: eng.open_export("live@s1", True),
            lambda: eng.send(None, "s1", io.BytesIO()),
            lambda: eng.stream_size(None, "s1"),
            lambda: eng.diff_blocks("s1", None),
        ):
            with pytest.raises(CorruptMetadata, match="cannot be read exactly"):
                call()
    finally:
        eng.device.close()


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL)
def test_live_reading_through_a_cut_rollback_target_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    build(path, rollback_in_progress=True)
    eng = Engine.open(str(path), claim=False)
    try:
        assert read1(eng, "live") == blk("X")  # mid-rollback: live reads through s1
    finally:
        eng.device.close()
    lose_second_inode_leaf(path)
    eng = Engine.open(str(path), claim=False)
    try:
        with pytest.raises(CorruptMetadata, match="cannot be read exactly"):
            eng.open_export("live", True)
    finally:
        eng.device.close()


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL, "simulated write error", "commit failed")
def test_a_reload_that_finds_damage_stops_open_connections(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    build(path)
    eng = Engine.open(str(path), claim=False)
    try:
        snap = eng.open_export("live@s1", True)
        buf = bytearray(BS)
        eng.read(snap, memoryview(buf), BS)
        assert bytes(buf) == blk("X")
        lose_second_inode_leaf(path)  # the disk loses it while serving...

        def fail() -> bool:
            raise DittoError("simulated write error")

        eng.pool.commit = fail  # type: ignore[method-assign]
        eng.pool.sb_dirty = True
        with pytest.raises(DittoError, match="simulated"):
            eng.core.commit()  # ...and a failed commit reloads the pool from disk
        assert "inode table" in eng.pool.damage
        with pytest.raises(CorruptMetadata, match="cannot be read exactly"):
            eng.read(snap, memoryview(buf), BS)  # the open connection, not only new ones
    finally:
        eng.device.close()


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL, HEALED_COPY)
def test_a_degraded_pool_writes_nothing_not_even_a_heal(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = Engine.open(str(path), create_size=1 << 20, block_size=BS, claim=False)
    eng.write(eng.open_export("live", False), memoryview(blk("Q")), 0)
    eng.flush()
    eng.close()
    dev = Device(str(path), readonly=True)
    pool = Pool.open(dev)
    bitmap = next(p for p, _ in pool.allocator.tree.all_node_pointers())
    live_map = next(p for p, _ in pool.volumes[1].live.tree.all_node_pointers())
    dev.close()
    with open(path, "r+b") as f:
        for a in (bitmap.addr0, bitmap.addr1, live_map.addr0):  # the bitmap: both copies
            f.seek(a * BS)
            f.write(bytes(BS))
    before = path.read_bytes()
    eng = Engine.open(str(path), claim=False)
    try:
        assert "free-space bitmap" in eng.pool.damage
        ex = eng.open_export("live", True)
        buf = bytearray(BS)
        eng.read(ex, memoryview(buf), 0)  # from the live map's second copy
        assert bytes(buf) == blk("Q")
        epoch = eng.core.epoch
        eng.flush(ex)  # nothing to commit: the heal waits for a repair
        assert eng.core.epoch == epoch, "the flush reloaded the pool"
    finally:
        eng.close()
    assert path.read_bytes() == before, "a degraded pool wrote"


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL, OLD_BITMAP_UNREADABLE)
def test_the_bitmap_repair_keeps_the_deferral_window_whole(tmp_path: Path) -> None:
    """A repair that rebuilds the bitmap keeps the blocks the window's generations hold (from
    their own bitmaps): a rewind to one of them afterwards reads exactly what it held."""
    path = tmp_path / "pool.img"
    with open(path, "wb") as f:
        f.truncate(4096 * BS)
    dev = Device(str(path))
    dev.lock()
    Pool.format(dev, BS, 1 << 20, False, metadata_copies=1)
    dev.close()
    eng = Engine.open(str(path), claim=False)
    eng.write(eng.open_export("live", False), memoryview(blk("A") * 8), 0)
    eng.flush()
    written = eng.pool.sb.generation
    eng.close()
    eng = Engine.open(str(path), claim=False)
    eng.trim(eng.open_export("live", False), 0, 8 * BS)
    eng.flush()
    eng.close()
    dev = Device(str(path), readonly=True)
    leaf = next(p for p, lvl in Pool.open(dev).allocator.tree.all_node_pointers() if lvl == 0)
    dev.close()
    with open(path, "r+b") as f:
        f.seek(leaf.addr0 * BS)
        f.write(bytes(BS))
    dev = Device(str(path))
    try:
        fixed = checker.repair(dev)
        assert fixed.exit_code == 1, (fixed.fixed, fixed.after.defects)
        assert fixed.fixed[0] == "rebuilt the free-space bitmap from the trees", fixed.fixed
        listed = {g.generation: g for g in rewind.generations(dev)}
        assert listed[written].usable, listed[written]
        pool, _ = rewind.rewind(dev, written)
        buf = bytearray(8 * BS)
        pool.volumes[1].read(pool.ctx, None, memoryview(buf), 0)
        assert bytes(buf) == blk("A") * 8, "the rewound state reads other data"
    finally:
        dev.close()


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL)
def test_rewind_list_marks_degraded_generations_and_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    build(path)
    lose_second_inode_leaf(path)
    dev = Device(str(path))
    try:
        newest = read_superblock(dev).generation
        found = {g.generation: g for g in rewind.generations(dev)}
        assert found[newest].status == "degraded" and "inode table" in found[newest].detail
        older = [g for g in found.values() if g.status == "degraded" and g.generation < newest]
        for g in older:  # generations sharing the lost leaf open degraded too: refused
            with pytest.raises(Refused, match="cannot be opened"):
                rewind.rewind(dev, g.generation)
    finally:
        dev.close()

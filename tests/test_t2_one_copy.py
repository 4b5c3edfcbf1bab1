"""One copy of metadata (format --metadata-copies 1), in-process: damage is detected, never
served.

The pool of support/damage.py (snapshots, a second volume, a clone, a written writable
snapshot, crashed after a flush), formatted with one metadata copy. Every committed metadata
block is damaged, one at a time, four ways. Each time the checker reports it, and the engine
either refuses to open (a table root: the whole table is gone; the refusal names the block)
or opens, degraded and read-only when the damage is in the bitmap or a table; then every
export is read in 64 KiB pieces: each piece is exactly what the export held, or a clean
engine error. Wrong data is never returned. A damaged bitmap is rebuilt from the trees by
check --repair, after which the pool is whole and writable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from support.damage import BS, DAMAGES, build, check, damage, walk_snapshot_entries
from support.logcheck import (
    BAD_METADATA,
    CANNOT_READ_EXACTLY,
    OLD_BITMAP_UNREADABLE,
    READ_ONLY_POOL,
)
from t8_helpers import metadata_blocks

from fsimpl import checker
from fsimpl import layout as L
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import CorruptMetadata, DamagedPool, NotFound

PIECE = 64 << 10


def pieces(eng: Engine, names: list[str]) -> dict[str, list[str | None]]:
    """Each export's 64 KiB pieces: the sha256 of what it reads, None where the read fails
    with a clean engine error; an export that is refused has no pieces."""
    out: dict[str, list[str | None]] = {}
    for name in names:
        try:
            ex = eng.open_export(name, True)
        except (CorruptMetadata, NotFound):
            continue  # refused: a lost name, or a chain a damaged table cut
        got: list[str | None] = []
        for off in range(0, ex.size, PIECE):
            buf = bytearray(min(PIECE, ex.size - off))
            try:
                eng.read(ex, memoryview(buf), off)
            except CorruptMetadata:
                got.append(None)
                continue
            got.append(hashlib.sha256(buf).hexdigest())
        out[name] = got
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str | None]]]:
    path = tmp_path_factory.mktemp("one-copy") / "pristine.img"
    build(path, copies=1)
    eng = Engine.open(str(path), claim=False)
    try:
        names = [n for n, _ in eng.export_names() if not n.endswith("@latest")]
        want = pieces(eng, names)
    finally:
        eng.device.close()
    assert all(None not in p for p in want.values()) and len(want) >= 6, want.keys()
    return path, want


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL, CANNOT_READ_EXACTLY, "both copies")
@pytest.mark.parametrize("how", DAMAGES)
def test_every_block_damaged_is_detected_and_never_served(
    tmp_path: Path, pristine: tuple[Path, dict[str, list[str | None]]], how: str
) -> None:
    base, want = pristine
    blocks, _ = metadata_blocks(base)
    assert len(blocks) >= 20, len(blocks)
    outcomes = {"refused at open": 0, "degraded": 0, "served": 0}
    for m in blocks:
        path = tmp_path / "pool.img"
        path.write_bytes(base.read_bytes())
        damage(path, m, how, blocks)
        report = check(path)
        assert not report.clean and report.fatal, f"{m} ({how}): the checker missed it"
        try:
            eng = Engine.open(str(path), claim=False)
        except CorruptMetadata as e:
            assert f"metadata block {m.addr}" in str(e), f"{m} ({how}): {e}"
            outcomes["refused at open"] += 1
            continue
        degraded = bool(eng.pool.damage)
        try:
            if degraded:
                outcomes["degraded"] += 1
                ex = eng.open_export("live", False)
                with pytest.raises(DamagedPool, match="read-only"):
                    eng.write(ex, memoryview(bytes(BS)), 0)
            else:
                outcomes["served"] += 1
            got = pieces(eng, list(want))
            if m.tree.endswith("shadow list"):  # no read needs it; what walks entries does
                assert got == want, f"{m} ({how}): a read needed the shadow list"
                with pytest.raises(CorruptMetadata, match=f"metadata block {m.addr}"):
                    walk_snapshot_entries(eng)
                continue
        finally:
            eng.device.close()
        assert "live" in got or m.tree == "inode table", f"{m} ({how}): live was refused"
        for name, have in got.items():
            for i, (a, b) in enumerate(zip(have, want[name], strict=True)):
                assert a is None or a == b, f"{m} ({how}): {name} piece {i}: WRONG DATA"
        assert degraded or got != want, f"{m} ({how}): the damage went unnoticed"
    # every path is taken: lost table roots, degraded opens, lazily read map blocks
    assert all(outcomes.values()), outcomes


@pytest.mark.engine_log(BAD_METADATA, READ_ONLY_POOL, OLD_BITMAP_UNREADABLE)
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_bitmap_is_rebuilt_by_repair(
    tmp_path: Path, pristine: tuple[Path, dict[str, list[str | None]]], how: str
) -> None:
    base, want = pristine
    blocks, _ = metadata_blocks(base)
    bitmap = [m for m in blocks if m.btype == L.BT_BITMAP]
    assert bitmap
    for m in bitmap:
        path = tmp_path / "pool.img"
        path.write_bytes(base.read_bytes())
        damage(path, m, how, blocks)
        dev = Device(str(path))
        try:
            fixed = checker.repair(dev)
        finally:
            dev.close()
        assert fixed.exit_code == 1, (m, fixed.fixed, fixed.after.defects)
        assert any("rebuilt the free-space bitmap" in f for f in fixed.fixed), fixed.fixed
        assert check(path).clean
        eng = Engine.open(str(path), claim=False)
        try:
            assert not eng.pool.damage
            assert pieces(eng, list(want)) == want
            ex = eng.open_export("live", False)
            eng.write(ex, memoryview(b"r" * BS * 4), 0)  # allocates: the bitmap is whole
            eng.create_snapshot("after-repair")
            eng.flush()
        finally:
            eng.close()
        assert check(path).clean, m

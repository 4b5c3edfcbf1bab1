"""Two copies of every metadata block (format --metadata-copies 2), in-process.

The pool holds snapshots, a second volume, a clone and a written writable snapshot, and was
left after a flush without a clean close. Every committed metadata block is then damaged, one at
a time, in its first copy, four ways: bytes flipped, zeroed, replaced by an older version of
itself (a lost write: a valid block of the same address and type from an earlier generation),
and replaced by another block's records (a misdirected write). Each time, every export reads
exactly what it held, `info` counts the heal, the next commit rewrites the bad copy from the good
one, and the checker is clean. With both copies damaged, the requests that need the block get a
clean error and everything else is served exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.damage import (
    BS,
    DAMAGES,
    build,
    check,
    damage,
    exports,
    put,
    raw,
    walk_snapshot_entries,
)
from support.logcheck import BAD_METADATA, HEALED_COPY
from t8_helpers import MetaBlock, metadata_blocks

from fsimpl import checker
from fsimpl import layout as L
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import CorruptMetadata


def first_copies(path: Path) -> list[MetaBlock]:
    blocks, _ = metadata_blocks(path)
    return blocks  # the walk lists each node once, at its first copy


def test_every_node_has_two_copies_far_apart(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    build(path, copies=2)
    eng = Engine.open(str(path), claim=False)
    try:
        assert eng.info()["metadata_copies"] == 2
        pairs = []
        for _, tree in eng.pool.metadata_trees():
            pairs += [(p.addr0, p.addr1) for p, _ in tree.all_node_pointers()]
        assert len(pairs) >= 20
        for a, b in pairs:
            assert a != b and raw(path, a) == raw(path, b), (a, b)
            assert abs(a - b) >= 16, f"copies {a} and {b} are neighbours"
    finally:
        eng.close()
    dev = Device(str(path), readonly=True)
    try:
        assert checker.check(dev).clean
    finally:
        dev.close()


@pytest.mark.engine_log(HEALED_COPY, BAD_METADATA)
@pytest.mark.parametrize("how", DAMAGES)
def test_every_block_damaged_in_its_first_copy_is_healed(tmp_path: Path, how: str) -> None:
    pristine = tmp_path / "pristine.img"
    want = build(pristine, copies=2)
    blocks = first_copies(pristine)
    assert len(blocks) >= 20, len(blocks)
    healed = 0
    for m in blocks:
        path = tmp_path / "pool.img"
        path.write_bytes(pristine.read_bytes())
        damage(path, m, how, blocks)
        before = check(path)
        assert [(d.kind, d.fatal, d.healable, d.where) for d in before.defects] == [
            ("bad_copy", False, True, f"block {m.addr}")
        ], f"{m} ({how}): {[d.message for d in before.defects]}"
        eng = Engine.open(str(path), claim=False)
        try:
            assert exports(eng) == want, f"{m} ({how}): an export reads differently"
            walk_snapshot_entries(eng)  # the shadow lists, which no read needs
            info = eng.info()
            assert info["errors"]["healed"] >= 1, f"{m} ({how}): no heal counted"  # type: ignore[index]
            eng.flush()  # the commit rewrites the bad copy
        finally:
            eng.close()
        good = raw(path, m.addr)
        L.open_block(good, m.addr, m.btype)  # the first copy is whole again
        report = check(path)
        assert report.clean, f"{m} ({how}): {[d.message for d in report.defects[:3]]}"
        healed += 1
    assert healed == len(blocks)


@pytest.mark.engine_log(HEALED_COPY, BAD_METADATA)
@pytest.mark.parametrize("copy", [0, 1])
def test_scrub_heals_every_bad_copy_and_repair_does_too(tmp_path: Path, copy: int) -> None:
    """Scrub (in the server: the engine here) heals either copy of any block, read or not;
    check --repair heals it with no server."""
    pristine = tmp_path / "pristine.img"
    want = build(pristine, copies=2)
    blocks = first_copies(pristine)
    for i, m in enumerate(blocks):
        target = (
            m.addr if copy == 0 else L.open_block(raw(pristine, m.addr), m.addr, m.btype).address1
        )
        path = tmp_path / "pool.img"
        path.write_bytes(pristine.read_bytes())
        put(path, target, bytes(BS))
        if i % 2:
            eng = Engine.open(str(path), claim=False)
            try:
                result = eng.scrub()
                assert result["metadata_lost"] == [], m
                opened_heals = eng.info()["errors"]["healed"]  # type: ignore[index]
                assert opened_heals == 1, f"{m}: {result}"
                assert exports(eng) == want
            finally:
                eng.close()
        else:
            dev = Device(str(path))
            try:
                fixed = checker.repair(dev)
            finally:
                dev.close()
            assert fixed.exit_code == 1, (m, fixed.fixed, fixed.after.defects)
            assert fixed.fixed == [
                f"rewrote the bad metadata copy at block {target} from its twin at "
                f"{m.addr if copy else L.open_block(raw(path, m.addr), m.addr, m.btype).address1}"
            ]
        assert check(path).clean, m
        assert raw(path, target) != bytes(BS), m


@pytest.mark.engine_log(BAD_METADATA, "both copies")
def test_both_copies_damaged_is_a_clean_error_and_the_rest_is_served(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.img"
    want = build(pristine, copies=2)
    leaf = next(
        m for m in first_copies(pristine) if m.tree == "vol2 map" and m.btype == L.BT_MAP_LEAF
    )
    path = tmp_path / "pool.img"
    path.write_bytes(pristine.read_bytes())
    second = L.open_block(raw(path, leaf.addr), leaf.addr, leaf.btype).address1
    assert second and second != leaf.addr
    for addr in (leaf.addr, second):
        put(path, addr, bytes(BS))
    eng = Engine.open(str(path), claim=False)
    try:
        ex = eng.open_export("vol2", True)
        with pytest.raises(CorruptMetadata, match="both copies"):
            eng.read(ex, memoryview(bytearray(BS)), leaf.first_key * BS)
        got = exports(eng, skip="vol2")  # vol2's snapshots read through its live map too
        assert got == {k: v for k, v in want.items() if k.split("@")[0] != "vol2"}
    finally:
        eng.device.close()

"""Two copies of every superblock generation, in-process.

Issue 15's finding 2: a commit frees blocks, the pool crashes without a clean close, and then
the newest superblock slot is damaged. With one slot per generation the open fell back to the
previous generation, whose freed blocks had already been reused or punched, and failed (or
would have read reused blocks as its own). Now the newest generation has a second copy in the
other 4 KiB page: the open comes back at the newest generation, with exact data, whichever
single slot is damaged and however.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from support.data import pattern
from support.logcheck import SLOT_UNUSABLE

from fsimpl import checker
from fsimpl import layout as L
from fsimpl.device import Device
from fsimpl.engine import Engine

BS = 4096


def finding_two(path: Path) -> tuple[int, dict[str, str]]:
    """Format, write, snapshot, overwrite, delete the snapshot, flush, crash. Returns the
    newest generation and the sha256 of every export."""
    eng = Engine.open(str(path), create_size=4 << 20, block_size=BS, claim=False)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(pattern(1, 64 * BS)), 0)
    eng.create_snapshot("s1")
    eng.write(ex, memoryview(pattern(2, 64 * BS)), 0)  # moves 64 blocks into s1
    eng.delete_snapshot("s1")  # frees them, and the shadow map's nodes
    eng.write(ex, memoryview(pattern(3, 8 * BS)), 100 * BS)  # reuses freed blocks
    eng.flush()
    gen = eng.pool.sb.generation
    sums = read_all(eng)
    eng.device.close()  # the crash: no clean close
    return gen, sums


def read_all(eng: Engine) -> dict[str, str]:
    out = {}
    for name, _ in eng.export_names():
        ex = eng.open_export(name, True)
        buf = bytearray(ex.size)
        eng.read(ex, memoryview(buf), 0)
        out[name] = hashlib.sha256(buf).hexdigest()
    return out


def damage(path: Path, slot: int, how: str) -> None:
    off = L.SUPERBLOCK_OFFSETS[slot]
    with open(path, "r+b") as f:
        f.seek(off)
        buf = bytearray(f.read(L.SUPERBLOCK_SIZE))
        if how == "flipped":
            for i in range(40, 72):
                buf[i] ^= 0xFF
        else:
            buf = bytearray(L.SUPERBLOCK_SIZE)
        f.seek(off)
        f.write(buf)


@pytest.mark.engine_log(SLOT_UNUSABLE)
@pytest.mark.parametrize("how", ["flipped", "zeroed"])
@pytest.mark.parametrize("slot", range(4))
def test_finding_two_any_single_slot_damaged(tmp_path: Path, slot: int, how: str) -> None:
    pristine = tmp_path / "pristine.img"
    gen, sums = finding_two(pristine)
    path = tmp_path / "pool.img"
    path.write_bytes(pristine.read_bytes())
    damage(path, slot, how)
    dev = Device(str(path), readonly=True)
    try:
        report = checker.check(dev)
    finally:
        dev.close()
    assert [(d.kind, d.fatal, d.where) for d in report.defects] == [
        ("superblock", False, f"superblock slot {slot}")
    ], [d.message for d in report.defects]
    eng = Engine.open(str(path))  # as a server opens it: claims the pool (a commit)...
    try:
        assert eng.pool.sb.generation == gen + 1, "the newest generation was not the one opened"
        assert read_all(eng) == sums
    finally:
        eng.close()  # ...and releases it (another): every slot is rewritten
    dev = Device(str(path), readonly=True)
    try:
        assert checker.check(dev).clean
    finally:
        dev.close()


@pytest.mark.engine_log(SLOT_UNUSABLE)
def test_finding_two_newest_slot_damaged_opens_at_the_newest(tmp_path: Path) -> None:
    """The issue's exact sequence: damage bytes of the newest slot (the one open reads
    first); the open is at the newest generation, and the pool keeps working."""
    path = tmp_path / "pool.img"
    gen, sums = finding_two(path)
    damage(path, L.superblock_slots(gen)[0], "flipped")
    eng = Engine.open(str(path), claim=False)
    try:
        assert eng.pool.sb.generation == gen
        assert read_all(eng) == sums
        ex = eng.open_export("live", False)
        eng.write(ex, memoryview(pattern(4, 4 * BS)), 0)
        eng.flush()
    finally:
        eng.close()
    eng = Engine.open(str(path), claim=False)
    try:
        ex = eng.open_export("live", True)
        buf = bytearray(4 * BS)
        eng.read(ex, memoryview(buf), 0)
        assert bytes(buf) == pattern(4, 4 * BS)
    finally:
        eng.close()

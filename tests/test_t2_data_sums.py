"""Data checksums per 4 KiB unit (format --checksum), in-process.

A pool with data checksums keeps a CRC-32 of every 4 KiB of every data block by physical block
(fsimpl/datasums.py). A 4 KiB read verifies its own 4 KiB; one damaged unit fails the reads
that touch it and no other; the first partial write after a snapshot defers its copy-on-write
(the new block holds only the written units, with their checksums) and reads exactly through
crashes; clones, flatten and writable snapshots keep every copy's checksums; a merge over a
damaged unit goes on and keeps that unit failing; scrub and check find everything clean, or
name the damaged block.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsimpl import checker
from fsimpl import datasums as D
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import CorruptData

BS = 65536
UNIT = 4096
SIZE = 4 << 20


def open_pool(path: Path) -> Engine:
    return Engine.open(str(path), create_size=SIZE, block_size=BS, claim=False, checksums=True)


def read(eng: Engine, export: str, off: int, n: int) -> bytes:
    buf = bytearray(n)
    eng.read(eng.open_export(export, True), memoryview(buf), off)
    return bytes(buf)


def write(eng: Engine, export: str, off: int, data: bytes) -> None:
    eng.write(eng.open_export(export, False), memoryview(data), off)


def addr_of(eng: Engine, block: int, snap: str | None = None) -> int:
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    sid = next(r.id for r in eng.pool.snapshots.values() if r.name == snap) if snap else None
    return vol.resolve_block(sid, block).addr


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def check_clean(path: Path) -> None:
    dev = Device(str(path), readonly=True)
    try:
        report = checker.check(dev)
    finally:
        dev.close()
    assert report.clean, [d.message for d in report.defects[:3]]


@pytest.mark.engine_log(r"failed its checksum in bytes")
def test_a_4k_read_verifies_its_own_4k_and_damage_stays_in_its_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    data = os.urandom(4 * BS)
    write(eng, "live", 0, data)
    eng.flush()
    verified: list[tuple[int, int, int]] = []
    real = D.DataSums.verify

    def spy(self: D.DataSums, addr: int, offset: int, buf: bytes) -> None:
        verified.append((addr, offset, len(buf)))
        real(self, addr, offset, buf)

    monkeypatch.setattr(D.DataSums, "verify", spy)
    assert read(eng, "live", BS + 3 * UNIT, UNIT) == data[BS + 3 * UNIT : BS + 4 * UNIT]
    assert verified == [(addr_of(eng, 1), 3 * UNIT, UNIT)], verified  # one unit, not the block
    victim = addr_of(eng, 2)
    eng.close()
    flip(path, victim * BS + 5 * UNIT + 100)
    eng = open_pool(path)
    try:
        with pytest.raises(CorruptData, match=f"data block {victim} failed its checksum"):
            read(eng, "live", 2 * BS + 5 * UNIT, UNIT)
        with pytest.raises(CorruptData):
            read(eng, "live", 2 * BS, BS)  # the block: it holds the unit
        for unit in (0, 4, 6, 15):  # its other units read exactly
            off = 2 * BS + unit * UNIT
            assert read(eng, "live", off, UNIT) == data[off : off + UNIT]
        found = eng.scrub()
        assert found["bad"] and found["bad"][0]["address"] == victim, found  # type: ignore[index]
    finally:
        eng.close()


@pytest.mark.engine_log(r"failed its checksum in bytes", r"with its damage marked")
def test_first_write_after_a_snapshot_defers_with_checksums(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    old = os.urandom(2 * BS)
    write(eng, "live", 0, old)
    eng.create_snapshot("s1")
    new = os.urandom(2 * UNIT)
    write(eng, "live", 3 * UNIT, new)  # two units of block 0: the rest stays in s1's block
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    e = vol.live.get(0)
    assert e.incomplete and e.base == addr_of(eng, 0, "s1"), e
    want = old[: 3 * UNIT] + new + old[5 * UNIT :]
    assert read(eng, "live", 0, 2 * BS) == want
    assert read(eng, "live@s1", 0, 2 * BS) == old
    eng.flush()
    eng.device.close()  # a crash after the flush: the incomplete block and its sums survive
    check_clean(path)
    eng = open_pool(path)
    try:
        assert read(eng, "live", 0, 2 * BS) == want
        assert read(eng, "live@s1", 0, 2 * BS) == old
        assert eng.scrub()["bad"] == []
        base = addr_of(eng, 0, "s1")
    finally:
        eng.close()
    # damage in the base, outside the valid range: live's reads there fail, inside do not
    flip(path, base * BS + 7 * UNIT + 1)
    eng = open_pool(path)
    try:
        with pytest.raises(CorruptData):
            read(eng, "live", 7 * UNIT, UNIT)
        assert read(eng, "live", 3 * UNIT, 2 * UNIT) == new
        vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
        vol.settle(eng.pool.ctx, 0)  # the merge goes on: it never stops at damage...
        assert not vol.live.get(0).incomplete
        with pytest.raises(CorruptData):  # ...and never gives damaged bytes a fresh checksum
            read(eng, "live", 7 * UNIT, UNIT)
        assert read(eng, "live", 0, 7 * UNIT) == want[: 7 * UNIT]
        assert read(eng, "live", 8 * UNIT, BS - 8 * UNIT) == want[8 * UNIT : BS]
        eng.flush()
    finally:
        eng.device.close()
    eng = open_pool(path)
    try:
        with pytest.raises(CorruptData):  # committed so: still failing after a restart
            read(eng, "live", 7 * UNIT, UNIT)
    finally:
        eng.close()


def test_clone_flatten_and_writable_snapshot_keep_checksums(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    base = os.urandom(8 * BS)
    write(eng, "live", 0, base)
    eng.create_snapshot("s1")
    eng.clone("live@s1", "cl")
    write(eng, "cl", BS + UNIT, b"c" * UNIT)
    eng.flatten("cl")
    eng.create_snapshot("ws", writable=True)
    write(eng, "live@ws", 2 * BS + 2 * UNIT, b"w" * (3 * UNIT))
    write(eng, "live", 2 * BS, b"L" * BS)
    eng.flush()
    want_cl = bytearray(base)
    want_cl[BS + UNIT : BS + 2 * UNIT] = b"c" * UNIT
    want_ws = bytearray(base)
    want_ws[2 * BS + 2 * UNIT : 2 * BS + 5 * UNIT] = b"w" * (3 * UNIT)
    want_live = bytearray(base)
    want_live[2 * BS : 3 * BS] = b"L" * BS
    try:
        assert read(eng, "cl", 0, 8 * BS) == want_cl
        assert read(eng, "live@ws", 0, 8 * BS) == want_ws
        assert read(eng, "live", 0, 8 * BS) == want_live
        assert read(eng, "live@s1", 0, 8 * BS) == base
        result = eng.scrub()
        assert result["bad"] == [] and result["checksums"], result
    finally:
        eng.close()
    check_clean(path)

"""Data checksums per 4 KiB unit (format --checksum), in-process.

A pool with data checksums keeps an XXH3-based checksum of every 4 KiB of every data block by
physical block (fsimpl/datasums.py). A 4 KiB read verifies its own 4 KiB, a run of blocks is
verified in one pass; one damaged unit fails the reads that touch it and no other; the first
partial write after a snapshot defers its copy-on-write, and so does a partial overwrite of
live's own block (the new block holds only the written units, with their checksums), reading
exactly through crashes and never filling the pool; blocks on the in-place list (written since
the last snapshot) are overwritten in place, a FLUSH after that commits nothing, and an open or a
rewind takes their checksums from their data; clones, flatten and writable snapshots keep every
copy's checksums; a merge over a damaged unit goes on and keeps that unit failing; scrub and
check find everything clean, or name the damaged block.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from pathlib import Path

import pytest
import xxhash

from fsimpl import checker, inplace
from fsimpl import datasums as D
from fsimpl.device import Device
from fsimpl.engine import DEFAULT_CACHE_BYTES, Engine
from fsimpl.errors import CorruptData, MissingDependency, NoSpace
from fsimpl.layout import FEATURE_SUMS_XXH3
from fsimpl.txn import Pool

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


def live_entry(eng: Engine, block: int):  # noqa: ANN201
    return eng.pool.volumes[next(iter(eng.pool.volumes))].live.get(block)


class TrackedLive:
    """Live written with random bytes and flushed, and what it must read from then on."""

    def __init__(self, eng: Engine, size: int) -> None:
        self.eng = eng  # (a test that reopens the pool sets the new engine here)
        self.want = bytearray(os.urandom(size))
        write(eng, "live", 0, bytes(self.want))
        eng.flush()

    def reopen(self, path: Path) -> Engine:
        """A clean restart: the in-place list is empty after it (fsimpl/inplace.py)."""
        self.eng.close()
        self.eng = open_pool(path)
        assert self.eng.pool.in_place_list == []
        return self.eng

    def put(self, off: int, n: int) -> int:
        """Write n fresh bytes at off, check that live reads exactly; returns the bytes the
        device was asked to write for it."""
        data = os.urandom(n)
        before = self.eng.device.stats.bytes_written
        write(self.eng, "live", off, data)
        self.want[off : off + n] = data
        assert read(self.eng, "live", 0, len(self.want)) == self.want
        return self.eng.device.stats.bytes_written - before


def test_a_partial_overwrite_of_lives_own_block_writes_only_its_units(tmp_path: Path) -> None:
    """A 4 KiB write into a block live owns that is off the in-place list costs 4 KiB, and no
    committed byte is rewritten in place: the new units go to a new block that keeps the old
    one as its own base; later writes beside them go in place; once a commit has put that block
    on the list, a rewrite of a written unit goes in place too; off it (after a clean restart),
    the rewrite merges first; a merge frees the base."""
    path = tmp_path / "pool.img"
    live = TrackedLive(open_pool(path), 2 * BS)
    eng = live.reopen(path)
    put = live.put
    old = addr_of(eng, 0)
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    assert put(3 * UNIT, UNIT) == UNIT  # one unit written, nothing copied
    e = live_entry(eng, 0)
    assert e.incomplete and e.owns_base and e.base == old, e
    assert (e.valid_lo, e.valid_hi) == (3 * UNIT // 512, 4 * UNIT // 512), e
    assert vol.live.inode.owned_blocks == 2 and vol.live.inode.incomplete_blocks == 1
    assert eng.pool.allocator.is_allocated(old)  # the base: held until the merge
    first = e.addr
    assert put(4 * UNIT, 2 * UNIT) == 2 * UNIT  # beside the valid range: in place, no gap
    assert put(9 * UNIT, UNIT) == 4 * UNIT  # a gap of three units, copied from the base
    e = live_entry(eng, 0)
    assert e.addr == first and (e.valid_lo, e.valid_hi) == (24, 80), e
    eng.flush()
    eng.device.close()  # a crash after the flush: the incomplete block and both sums survive
    check_clean(path)
    eng = live.eng = open_pool(path)
    assert read(eng, "live", 0, 2 * BS) == live.want
    assert first in eng.pool.in_place_list  # written by the last commit's transaction
    assert put(4 * UNIT, UNIT) == UNIT and live_entry(eng, 0) == e  # a committed unit, in place
    eng = live.reopen(path)
    assert put(4 * UNIT, UNIT) > BS // 2  # off the list: the block is merged first
    e = live_entry(eng, 0)
    assert e.owns_base and e.base == first and e.addr not in (first, old), e
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    assert eng.pool.allocator.is_allocated(first)
    vol.settle(eng.pool.ctx, 0)  # the background merge: complete, and the base given back
    e = live_entry(eng, 0)
    assert not e.incomplete and not e.owns_base, e
    assert vol.live.inode.owned_blocks == 2 and vol.live.inode.incomplete_blocks == 0
    assert read(eng, "live", 0, 2 * BS) == live.want
    eng.flush()
    assert eng.scrub()["bad"] == []
    alloc = eng.pool.allocator

    def reusable(b: int) -> bool:
        return not alloc.busy[b >> 3] >> (b & 7) & 1

    assert not alloc.is_allocated(first) and not reusable(first)  # a rewind may still read it
    for _ in range(3):  # past the deferral window
        eng.pool.sb_dirty = True
        eng.flush()
    assert reusable(first) and reusable(old)
    eng = live.reopen(path)
    alloc = eng.pool.allocator
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    assert put(UNIT, UNIT) == UNIT  # incomplete again (owning block 0's current block)...
    base = live_entry(eng, 0).base
    assert put(0, BS) == BS  # ...then written whole: no merge, and both blocks go
    assert not live_entry(eng, 0).incomplete and not alloc.is_allocated(base)
    assert vol.live.inode.incomplete_blocks == 0 and not vol.incomplete
    eng.close()
    check_clean(path)
    eng = open_pool(path)
    try:
        assert read(eng, "live", 0, 2 * BS) == live.want
    finally:
        eng.close()


def test_an_owned_base_goes_with_its_entry(tmp_path: Path) -> None:
    """Trim, rollback and a snapshot's first write each account for the base live owns."""
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    old = os.urandom(4 * BS)
    write(eng, "live", 0, old)
    eng.close()
    eng = open_pool(path)  # a clean restart: off the in-place list
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    for b in range(4):
        write(eng, "live", b * BS + UNIT, os.urandom(UNIT))
    assert all(live_entry(eng, b).owns_base for b in range(4))
    bases = [live_entry(eng, b).base for b in range(4)]
    eng.trim(eng.open_export("live", False), 0, BS)  # block 0: both its blocks freed
    alloc = eng.pool.allocator
    assert not alloc.is_allocated(bases[0]) and alloc.is_allocated(bases[1])
    assert vol.live.inode.owned_blocks == 3
    eng.create_snapshot("s1")  # s1 reads blocks 1-3 through live's incomplete entries
    snap = read(eng, "live@s1", 0, 4 * BS)
    write(eng, "live", BS + 2 * UNIT, os.urandom(UNIT))  # first write: merged, then moved
    assert live_entry(eng, 1).base != live_entry(eng, 2).base
    assert read(eng, "live@s1", 0, 4 * BS) == snap
    write(eng, "live", 3 * BS, os.urandom(BS))  # whole block: the entry and its base go
    eng.rollback("s1")
    assert read(eng, "live", 0, 4 * BS) == snap
    eng.delete_snapshot("s1")
    eng.close()
    check_clean(path)  # every block owned once, none leaked


def test_partial_overwrites_never_fill_the_pool(tmp_path: Path) -> None:
    """Each partial overwrite holds live's old block until its merge. On a full pool the
    write that finds no room merges them and waits out the deferral window, so the writer
    never hears 'pool is full' while its data fits."""
    path = tmp_path / "fixed.img"
    nblocks = 96
    with open(path, "wb") as f:
        f.truncate(nblocks * BS)
    dev = Device(str(path))
    dev.lock()
    pool = Pool.format(dev, BS, nblocks * BS, growable=False, checksums=True)
    eng = Engine(dev, pool, "move", DEFAULT_CACHE_BYTES)
    ex = eng.open_export("live", False)
    want = bytearray()
    with pytest.raises(NoSpace):
        while True:
            block = os.urandom(BS)
            eng.write(ex, memoryview(block), len(want))
            want += block
    eng.trim(ex, len(want) - 4 * BS, 4 * BS)  # room for a few new blocks, not for one each
    want[len(want) - 4 * BS :] = bytes(4 * BS)
    eng.close()
    written = len(want) // BS - 4
    assert written > 36
    eng = open_pool(path)  # a clean restart: every block off the in-place list, so each
    ex = eng.open_export("live", False)  # partial overwrite below keeps its old block
    vol = eng.pool.volumes[next(iter(eng.pool.volumes))]
    for b in range(written):
        unit = os.urandom(UNIT)
        eng.write(ex, memoryview(unit), b * BS + 5 * UNIT)
        want[b * BS + 5 * UNIT : b * BS + 6 * UNIT] = unit
    owning = sum(vol.live.get(b).owns_base for b in range(written))
    assert 0 < owning < written  # some merged
    assert read(eng, "live", 0, len(want)) == want
    eng.close()
    check_clean(path)


@pytest.mark.engine_log(r"failed its checksum in bytes")
def test_a_run_of_blocks_is_read_and_verified_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    data = os.urandom(6 * BS)
    write(eng, "live", 0, data)  # one request: six consecutive blocks on disk
    eng.flush()
    first = addr_of(eng, 0)
    assert [addr_of(eng, b) for b in range(6)] == list(range(first, first + 6))
    verified: list[tuple[int, int, int]] = []
    real = D.DataSums.verify

    def spy(self: D.DataSums, addr: int, offset: int, buf: bytes) -> None:
        verified.append((addr, offset, len(buf)))
        real(self, addr, offset, buf)

    monkeypatch.setattr(D.DataSums, "verify", spy)
    assert read(eng, "live", UNIT, 5 * BS) == data[UNIT : UNIT + 5 * BS]
    assert verified == [(first, UNIT, 5 * BS)], verified
    eng.close()
    flip(path, (first + 3) * BS + 2 * UNIT + 7)
    eng = open_pool(path)
    try:
        with pytest.raises(CorruptData, match=rf"data block {first + 3} failed .* \[8192, 12288\)"):
            read(eng, "live", 0, 6 * BS)
        assert read(eng, "live", 0, 3 * BS) == data[: 3 * BS]  # the blocks before it read
    finally:
        eng.close()


def test_the_unit_checksum_is_xxh3_and_older_pools_keep_crc32(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    data = os.urandom(BS)
    write(eng, "live", 0, data)
    sums = eng.pool.ctx.sums
    assert sums is not None and eng.pool.sb.features & FEATURE_SUMS_XXH3
    want = [xxhash.xxh3_64_intdigest(data[u : u + UNIT]) & 0xFFFFFFFF for u in range(0, BS, UNIT)]
    assert sums._stored(addr_of(eng, 0), 0, BS // UNIT) == struct.pack("<16I", *want)
    assert D.unit_sum_function(False) is zlib.crc32  # a pool without the feature bit
    eng.close()
    monkeypatch.setitem(sys.modules, "xxhash", None)  # not installed
    with pytest.raises(MissingDependency, match=r"apt-get install python3-xxhash"):
        open_pool(path)


def test_blocks_written_since_the_last_commit_are_rewritten_in_place(tmp_path: Path) -> None:
    """No committed generation reads a block allocated in the open transaction, so until the
    commit its units are rewritten where they are."""
    path = tmp_path / "pool.img"
    eng = live_off_the_list(path)
    live = TrackedLive(eng, 0)
    live.want = bytearray(read(eng, "live", 0, BS))
    put = live.put
    assert put(2 * UNIT, UNIT) == UNIT  # a new block, incomplete
    first = live_entry(eng, 0)
    assert put(2 * UNIT, UNIT) == UNIT and live_entry(eng, 0) == first  # same unit, in place
    assert put(0, BS) == BS  # written whole: a new block again...
    whole = live_entry(eng, 0)
    assert whole.addr != first.addr and not whole.incomplete
    assert put(5 * UNIT, UNIT) == UNIT and live_entry(eng, 0) == whole  # ...rewritten in place
    eng.close()


def live_off_the_list(path: Path) -> Engine:
    """A pool whose live blocks 0-1 hold data, restarted cleanly: none is on the in-place
    list, so an overwrite moves."""
    eng = open_pool(path)
    write(eng, "live", 0, os.urandom(2 * BS))
    eng.close()
    eng = open_pool(path)
    assert eng.pool.in_place_list == []
    return eng


def test_the_in_place_list_spares_a_flush_its_commit_and_survives_a_crash(tmp_path: Path) -> None:
    """A commit lists the blocks its transaction wrote (fsimpl/inplace.py); the next one
    overwrites them in place, and a FLUSH after such writes syncs the data without a commit. A
    crash then loses no flushed byte: the open takes those blocks' checksums from their data,
    so an unflushed unit reads old or new, never as corruption, and scrub finds nothing. A
    clean close empties the list, and so does a snapshot: a rewrite then moves."""
    path = tmp_path / "pool.img"
    live = TrackedLive(open_pool(path), 2 * BS)
    eng = live.eng
    put = live.put
    e0, e1 = live_entry(eng, 0), live_entry(eng, 1)
    assert {e0.addr, e1.addr} <= set(eng.pool.in_place_list)
    commits = eng.pool.commits
    assert put(5 * UNIT, UNIT) == UNIT and live_entry(eng, 0) == e0  # 4 KiB, in place
    assert put(BS, BS) == BS and live_entry(eng, 1) == e1  # a whole block, in place
    eng.flush()
    assert eng.pool.commits == commits  # nothing but data to make durable: no commit
    unflushed = os.urandom(UNIT)
    write(eng, "live", 2 * UNIT, unflushed)
    eng.device.close()  # a crash
    check_clean(path)  # (the checker walks the metadata as committed)
    eng = live.eng = open_pool(path)
    got = read(eng, "live", 0, 2 * BS)  # verified against the retaken checksums
    assert got[2 * UNIT : 3 * UNIT] in (live.want[2 * UNIT : 3 * UNIT], unflushed)
    live.want[2 * UNIT : 3 * UNIT] = got[2 * UNIT : 3 * UNIT]
    assert got == live.want
    assert eng.scrub()["bad"] == []
    eng = live.reopen(path)  # a clean close leaves an empty list
    assert put(0, BS) == BS and live_entry(eng, 0).addr != e0.addr  # so the block moves
    eng.flush()
    moved = live_entry(eng, 0)
    assert moved.addr in eng.pool.in_place_list
    assert put(0, UNIT) == UNIT and live_entry(eng, 0) == moved  # listed again: in place
    eng.create_snapshot("s1")
    assert eng.pool.in_place_list == []  # s1 shares every block
    snap = read(eng, "live@s1", 0, 2 * BS)
    assert put(0, UNIT) == UNIT and live_entry(eng, 0).addr != moved.addr  # first write moves
    assert read(eng, "live@s1", 0, 2 * BS) == snap
    eng.close()
    check_clean(path)
    eng = open_pool(path)
    try:
        assert read(eng, "live", 0, 2 * BS) == live.want
        assert eng.scrub()["bad"] == []
    finally:
        eng.close()


def test_a_rewind_retakes_the_blocks_later_generations_overwrote_in_place(tmp_path: Path) -> None:
    """Generations after a rewind's target overwrote blocks of its in-place list in place, so
    they hold data newer than the target's checksums: the rewind retakes them as an open after
    a crash does. Every read verifies (the data is the newer one, as in a pool without
    checksums) and scrub finds nothing."""
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    write(eng, "live", 0, os.urandom(2 * BS))
    eng.flush()
    target = eng.pool.sb.generation
    assert len(eng.pool.in_place_list) == 2
    for block in (0, 1):  # overwritten in place, each in a transaction that then commits
        write(eng, "live", block * BS + UNIT, os.urandom(UNIT))
        eng.pool.sb_dirty = True
        eng.flush()
    assert eng.pool.sb.generation == target + 2  # the target is inside the deferral window
    now = read(eng, "live", 0, 2 * BS)
    eng.device.close()  # a crash: no clean close
    assert Engine.rewind(str(path), target)["rewound_to"] == target
    dev = Device(str(path), readonly=True)
    try:  # the rewind committed the retaken checksums (not left for the next open)
        pool = Pool.open(dev, retake=False)
        vol = next(iter(pool.volumes.values()))
        for block in (0, 1):
            addr = vol.resolve_block(None, block).addr
            assert pool.ctx.sums is not None
            pool.ctx.sums.verify(addr, 0, now[block * BS : (block + 1) * BS])
    finally:
        dev.close()
    eng = open_pool(path)
    try:
        assert read(eng, "live", 0, 2 * BS) == now
        assert eng.scrub()["bad"] == []
    finally:
        eng.close()
    check_clean(path)


def test_the_in_place_list_keeps_the_most_recent_blocks_up_to_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list is the transaction's new blocks, then the listed ones it overwrote, then the
    rest, without what it freed, cut at the bound: a block that falls off moves when next
    overwritten (and is listed again as the new block)."""
    assert inplace.next_list([1, 2, 3], {9, 8}, [3], [2], 4) == [8, 9, 3, 1]
    assert inplace.next_list([1, 2, 3], set(), [], [], 2) == [1, 2]
    monkeypatch.setattr(inplace, "IN_PLACE_BLOCKS", 4)
    path = tmp_path / "pool.img"
    eng = open_pool(path)
    live = TrackedLive(eng, 6 * BS)  # six new blocks in one commit: four are listed
    listed = eng.pool.in_place_list
    assert len(listed) == 4
    off_list = [b for b in range(6) if live_entry(eng, b).addr not in listed]
    assert len(off_list) == 2
    for b in range(6):
        before = live_entry(eng, b).addr
        assert live.put(b * BS, UNIT) == UNIT
        assert (live_entry(eng, b).addr == before) == (b not in off_list)
    eng.flush()
    assert len(eng.pool.in_place_list) == 4
    assert all(live_entry(eng, b).addr in eng.pool.in_place_list for b in off_list)
    eng.close()
    check_clean(path)

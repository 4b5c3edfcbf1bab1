"""Deferred copy-on-write (US 6,748,504, FIG. 13B/13C): a partial first write after a snapshot
writes only its bytes into a new block marked incomplete, with its valid range and the old block
(now the snapshot's) as base. These tests pin each way an incomplete block ends: extended to the
whole block, merged when its base is freed or rewritten, when a newer snapshot takes it, by an
unaligned write, by a trim, in the background, across a crash, and through a real nbdkit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import NbdkitServer
from support.data import ramp
from test_t3_model import assert_checker_clean

from fsimpl.engine import MERGE_IDLE, Engine
from fsimpl.layout import Entry
from fsimpl.volume import Volume

BS = 4096
SIZE = 64 * BS


def pattern(tag: int, n: int = BS) -> bytes:
    return ramp(tag, n)


class Pool:
    """An engine on a fresh image, with a volume written in full (every block live's own)."""

    def __init__(self, path: Path, cow: str = "move", merge: str = "deferred") -> None:
        self.path = path
        self.cow, self.merge = cow, merge
        self.engine = Engine.open(str(path), create_size=SIZE, block_size=BS, cow=cow, merge=merge)
        self.data = bytearray()
        for b in range(SIZE // BS):
            self.data += pattern(b)
        self.write(0, bytes(self.data))

    @property
    def vol(self) -> Volume:
        return self.engine.volume("live")

    def entry(self, b: int) -> Entry:
        return self.vol.live.get(b)

    def write(self, offset: int, data: bytes) -> None:
        self.engine.write(self.engine.open_export("live", False), memoryview(data), offset)

    def read(self, export: str = "live", offset: int = 0, length: int = SIZE) -> bytes:
        buf = bytearray(length)
        self.engine.read(self.engine.open_export(export, True), memoryview(buf), offset)
        return bytes(buf)

    def snapshot(self, name: str) -> bytes:
        self.engine.create_snapshot(name)
        return self.read()

    def reopen(self, crash: bool = False) -> None:
        if crash:
            self.engine.flush()
            self.engine.device.close()  # what kill -9 after a flush leaves
        else:
            self.engine.close()
        self.engine = Engine.open(str(self.path), cow=self.cow, merge=self.merge)

    def close(self) -> None:
        self.engine.close()


@pytest.fixture
def pool(tmp_path: Path):  # noqa: ANN201
    p = Pool(tmp_path / "pool.img")
    yield p
    p.close()


def partial_first_write(p: Pool, b: int, start: int, n: int, tag: int) -> bytes:
    """Write n bytes at start inside block b; returns what live must read afterwards."""
    want = bytearray(p.read())
    data = pattern(tag, n)
    p.write(b * BS + start, data)
    want[b * BS + start : b * BS + start + n] = data
    return bytes(want)


def test_partial_first_write_is_incomplete_and_reads_right(pool: Pool) -> None:
    s1 = pool.snapshot("s1")
    old = pool.entry(3)
    live = partial_first_write(pool, 3, 1024, 512, 90)
    e = pool.entry(3)
    assert e.incomplete and (e.valid_lo, e.valid_hi) == (2, 3) and e.base == old.addr
    assert e.addr != old.addr
    assert pool.vol.shadows[pool.vol.latest].get(3).addr == old.addr  # the snapshot took it
    assert pool.read() == live and pool.read("live@s1") == s1
    # reads that straddle the valid range, and ones wholly outside it
    for off, n in ((1000, 600), (0, 1024), (1536, 2560), (BS - 1, 2), (-10, BS + 20)):
        at = 3 * BS + off
        assert pool.read("live", at, n) == live[at : at + n], (off, n)
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_extension_fills_gaps_from_the_base_and_completes(pool: Pool) -> None:
    pool.snapshot("s1")
    partial_first_write(pool, 5, 2048, 512, 1)
    partial_first_write(pool, 5, 2560, 512, 2)  # adjacent: the range grows
    assert (pool.entry(5).valid_lo, pool.entry(5).valid_hi) == (4, 6)
    live = partial_first_write(pool, 5, 512, 512, 3)  # a gap [1024, 2048) filled from the base
    e = pool.entry(5)
    assert e.incomplete and (e.valid_lo, e.valid_hi) == (1, 6)
    assert pool.read() == live
    live = partial_first_write(pool, 5, 0, 512, 4)
    live = partial_first_write(pool, 5, 3072, 1024, 5)
    assert not pool.entry(5).incomplete and pool.entry(5).base == 0  # whole: complete
    assert pool.vol.live.inode.incomplete_blocks == 0
    assert pool.read() == live
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_deleting_the_base_owner_merges_first(pool: Pool) -> None:
    pool.snapshot("s1")
    live = partial_first_write(pool, 7, 0, 1024, 11)
    assert pool.entry(7).incomplete
    pool.engine.delete_snapshot("s1")  # nothing older relies on the base: it is freed
    assert not pool.entry(7).incomplete
    assert pool.read() == live
    pool.reopen()
    assert pool.read() == live
    assert_checker_clean(pool.path)


def test_base_handed_to_an_older_snapshot_stays_a_base(pool: Pool) -> None:
    s0 = pool.snapshot("s0")
    partial_first_write(pool, 9, 0, BS, 20)  # s0 and s1 differ (block 9), not in block 8
    s1 = pool.snapshot("s1")
    live = partial_first_write(pool, 8, 512, 512, 22)  # base: the block 8 both read
    assert pool.entry(8).incomplete
    pool.engine.delete_snapshot("s1")  # s0 dittos block 8 to s1: it takes the base over
    assert pool.entry(8).incomplete
    assert pool.read() == live and pool.read("live@s0") == s0
    assert s1 != s0
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_a_newer_snapshot_gets_a_whole_block(pool: Pool) -> None:
    s1 = pool.snapshot("s1")
    partial_first_write(pool, 2, 512, 512, 30)
    s2 = pool.snapshot("s2")  # dittos to live's incomplete block
    assert pool.read("live@s2") == s2
    live = partial_first_write(pool, 2, 3072, 512, 31)  # first write after s2: merged first
    taken = pool.vol.shadows[pool.vol.latest].get(2)
    assert not taken.incomplete
    assert pool.entry(2).incomplete and pool.entry(2).base == taken.addr
    assert pool.read() == live and pool.read("live@s2") == s2 and pool.read("live@s1") == s1
    pool.engine.delete_snapshot("s1")
    pool.engine.delete_snapshot("s2")
    assert pool.read() == live
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_unaligned_write_and_trim_of_an_incomplete_block(pool: Pool) -> None:
    s1 = pool.snapshot("s1")
    partial_first_write(pool, 4, 0, 512, 40)
    live = partial_first_write(pool, 4, 700, 33, 41)  # not whole sectors: merged, then in place
    assert not pool.entry(4).incomplete
    partial_first_write(pool, 6, 0, 512, 42)
    pool.engine.trim(pool.engine.open_export("live", False), 6 * BS, BS)
    live = live[: 6 * BS] + bytes(BS) + live[7 * BS :]
    assert pool.read() == live and pool.read("live@s1") == s1
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_rollback_and_copy_on_write_over_incomplete_blocks(tmp_path: Path) -> None:
    p = Pool(tmp_path / "pool.img")
    s1 = p.snapshot("s1")
    partial_first_write(p, 1, 0, 512, 50)
    p.reopen()
    p.cow = "copy"
    p.reopen()  # the same pool served with cow=copy: live's incomplete block stays in place
    s2 = p.snapshot("s2")
    live = partial_first_write(p, 1, 1024, 512, 51)
    assert p.read() == live and p.read("live@s2") == s2 and p.read("live@s1") == s1
    p.engine.rollback("s2")
    assert p.read() == s2
    p.engine.rollback("s1", destroy_newer=True)
    assert p.read() == s1
    p.engine.flush()
    p.close()
    assert_checker_clean(p.path)


def test_crash_keeps_incomplete_blocks_readable(pool: Pool) -> None:
    s1 = pool.snapshot("s1")
    live = b""
    for b in range(0, 40, 3):
        live = partial_first_write(pool, b, (b % 7) * 512, 512 * (1 + b % 3), 60 + b)
    pool.reopen(crash=True)
    assert pool.read() == live and pool.read("live@s1") == s1
    assert pool.vol.live.inode.incomplete_blocks == 14
    assert_checker_clean(pool.path)
    # the background merge finds what the earlier run left by scanning live's map
    pool.engine.core.last_write -= MERGE_IDLE
    while pool.engine.tick():
        pass
    assert pool.vol.live.inode.incomplete_blocks == 0
    assert pool.read() == live and pool.read("live@s1") == s1
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_background_merge_when_idle(pool: Pool) -> None:
    pool.snapshot("s1")
    live = b""
    for b in range(10):
        live = partial_first_write(pool, b, 512, 1024, 70 + b)
    assert pool.vol.live.inode.incomplete_blocks == 10
    pool.engine.tick()  # right after the writes: the merge waits for the pool to be idle
    assert pool.vol.live.inode.incomplete_blocks == 10
    pool.engine.core.last_write -= MERGE_IDLE
    while pool.engine.tick():
        pass
    assert pool.vol.live.inode.incomplete_blocks == 0
    assert pool.read() == live
    pool.engine.flush()
    assert_checker_clean(pool.path)


def test_merge_immediate_never_defers(tmp_path: Path) -> None:
    p = Pool(tmp_path / "pool.img", merge="immediate")
    s1 = p.snapshot("s1")
    live = partial_first_write(p, 3, 512, 512, 80)
    assert not p.entry(3).incomplete
    assert p.read() == live and p.read("live@s1") == s1
    p.close()


def test_writable_snapshot_write_into_the_base(tmp_path: Path) -> None:
    p = Pool(tmp_path / "pool.img")
    p.engine.create_snapshot("s1", writable=True)
    s1 = bytearray(p.read())
    live = partial_first_write(p, 2, 0, 512, 90)
    ex = p.engine.open_export("live@s1", False)
    data = pattern(91, 512)
    p.engine.write(ex, memoryview(data), 2 * BS + 2048)  # s1 rewrites live's base in place
    s1[2 * BS + 2048 : 2 * BS + 2560] = data
    assert p.read() == live and p.read("live@s1") == bytes(s1)
    p.engine.flush()
    p.close()
    assert_checker_clean(p.path)


def test_through_nbdkit_and_check(tmp_path: Path) -> None:
    disk = tmp_path / "pool.img"
    srv = NbdkitServer(tmp_path, disk, size="1M").start()
    try:
        h = srv.connect()
        h.pwrite(bytes(range(256)) * 4096, 0)  # 1 MiB: every 64 KiB block live's own
        h.flush()
        srv.snapctl("create", "s1")
        h.pwrite(b"\xaa" * 4096, 65536 + 8192)  # a 4 KiB first write into a 64 KiB block
        h.flush()
        want = bytearray(bytes(range(256)) * 4096)
        want[65536 + 8192 : 65536 + 12288] = b"\xaa" * 4096
        assert h.pread(1 << 20, 0) == want
        snap = srv.connect("live@s1")
        assert snap.pread(1 << 20, 0) == bytes(range(256)) * 4096
        snap.shutdown()
        report = json.loads(srv.snapctl("check", "--json").stdout)
        assert report["clean"] and report["stats"]["incomplete_blocks"] == 1, report
        h.shutdown()
        deadline = time.monotonic() + 30  # idle: the background merge completes the block
        while time.monotonic() < deadline:
            report = json.loads(srv.snapctl("check", "--json").stdout)
            if report["stats"]["incomplete_blocks"] == 0:
                break
            time.sleep(0.5)
        assert report["clean"] and report["stats"]["incomplete_blocks"] == 0, report
        h = srv.connect()
        assert h.pread(1 << 20, 0) == want
        h.shutdown()
    finally:
        srv.stop()

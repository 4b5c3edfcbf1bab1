"""Unit tests of block maps (fsimpl/blockmap.py) and of how a volume resolves its blocks through
them (fsimpl/volume.py): entries and counters, range scans, leaf moves, ditto vs explicit hole,
and reads through a chain of snapshots (FIG. 10). Pure in-process, no nbdkit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.data import pattern

from fsimpl import layout as L
from fsimpl.allocator import Allocator
from fsimpl.blockmap import BlockMap, set_bits
from fsimpl.device import Device
from fsimpl.engine import Engine, Export
from fsimpl.radix import MetaStore
from fsimpl.volume import Volume

BS = 4096
CAP = L.map_leaf_capacity(BS)


# --- helpers -------------------------------------------------------------------------------------


class MapRig:
    def __init__(self, path: Path) -> None:
        self.dev = Device.create_image(str(path))
        self.dev.truncate(1024 * BS)
        self.store = MetaStore(self.dev, BS, 1 << 20)
        self.alloc = Allocator(self.store, 1024, True)
        self.alloc.format()
        self.dirty: set[BlockMap] = set()

    def new_map(self, ino: int = 5) -> BlockMap:
        rec = L.InodeRecord(ino=ino, kind=L.INODE_VOLUME, volume_ino=ino, size=1 << 30)
        return BlockMap(self.store, rec, self.dirty)

    def reopen(self, m: BlockMap) -> BlockMap:
        """The same map read back through a cold cache from its committed inode."""
        store = MetaStore(self.dev, BS, 1 << 20)
        store.allocate_address = self.alloc.allocate
        store.free_address = self.alloc.free
        rec = L.InodeRecord(**m.inode.__dict__)
        return BlockMap(store, rec, set())


@pytest.fixture
def mrig(tmp_path: Path) -> Iterator[MapRig]:
    r = MapRig(tmp_path / "maps.img")
    yield r
    r.dev.close()


def addr(n: int) -> L.Entry:
    return L.Entry(L.KIND_ADDR, n, 1)


def read_bytes(eng: Engine, ex: Export, off: int, n: int) -> bytes:
    buf = bytearray(n)
    eng.read(ex, memoryview(buf), off)
    return bytes(buf)


def blk(tag: int) -> bytes:
    """A recognisable block: its tag in every 8 bytes."""
    return pattern(tag, BS)


def open_pool(tmp_path: Path, size: int = 4 << 20, **kw: object) -> Engine:
    return Engine.open(str(tmp_path / "pool.img"), create_size=size, block_size=BS, **kw)  # type: ignore[arg-type]


def reopen(eng: Engine, **kw: object) -> Engine:
    path = eng.device.path
    eng.close()
    return Engine.open(path, **kw)  # type: ignore[arg-type]


# --- BlockMap ------------------------------------------------------------------------------------


def test_get_set_clear_and_counters(mrig: MapRig) -> None:
    m = mrig.new_map()
    assert m.get(0) == L.EMPTY_ENTRY and m.get(10**6) == L.EMPTY_ENTRY
    assert m.is_empty()
    assert m.set(3, addr(100)) == L.EMPTY_ENTRY
    assert m in mrig.dirty
    assert (m.inode.entry_count, m.inode.owned_blocks) == (1, 1)
    assert m.set(4, L.Entry(L.KIND_HOLE)) == L.EMPTY_ENTRY
    assert (m.inode.entry_count, m.inode.owned_blocks) == (2, 1)  # a hole owns no block
    assert m.set(5, L.Entry(L.KIND_NONE, birth=9)) == L.EMPTY_ENTRY  # non-empty, owns nothing
    assert (m.inode.entry_count, m.inode.owned_blocks) == (3, 1)
    assert m.set(3, addr(101)) == addr(100)  # replacing keeps the counts
    assert (m.inode.entry_count, m.inode.owned_blocks) == (3, 1)
    assert m.set(4, addr(102)) == L.Entry(L.KIND_HOLE)  # hole -> block
    assert (m.inode.entry_count, m.inode.owned_blocks) == (3, 2)
    assert m.set(CAP * 7 + 1, addr(103)) == L.EMPTY_ENTRY  # another leaf
    assert (m.inode.entry_count, m.inode.owned_blocks) == (4, 3)
    assert m.clear(3) == addr(101)
    assert m.clear(3) == L.EMPTY_ENTRY
    assert (m.inode.entry_count, m.inode.owned_blocks) == (3, 2)
    assert m.get(4) == addr(102) and m.get(5) == L.Entry(L.KIND_NONE, birth=9)
    assert m.get(CAP * 7 + 1) == addr(103)
    assert not m.is_empty()


def test_entries_in_and_iter_entries_across_leaves(mrig: MapRig) -> None:
    m = mrig.new_map()
    blocks = [0, 1, CAP - 1, CAP, CAP + 5, 3 * CAP + 2, 600 * CAP + 9]
    for i, b in enumerate(blocks):
        m.set(b, addr(1000 + i))
    want = {b: addr(1000 + i) for i, b in enumerate(blocks)}
    assert list(m.iter_entries()) == sorted(want.items())
    assert list(m.iter_entries(CAP)) == [(b, want[b]) for b in blocks if b >= CAP]
    assert list(m.iter_entries(CAP + 6)) == [(b, want[b]) for b in blocks if b >= CAP + 6]
    assert list(m.entries_in(1, CAP)) == [(1, want[1]), (CAP - 1, want[CAP - 1]), (CAP, want[CAP])]
    assert list(m.entries_in(2, CAP - 3)) == []
    assert list(m.entries_in(0, 10**6)) == sorted(want.items())
    assert list(m.entries_in(600 * CAP + 9, 1)) == [(600 * CAP + 9, want[600 * CAP + 9])]
    assert list(m.leaf_numbers()) == [0, 1, 3, 600]
    assert list(m.leaf_numbers(2)) == [3, 600]
    # a range across leaves, absent ones included, is each block's entry in turn
    for first, count in ((0, 3 * CAP + 5), (CAP - 2, 4), (2 * CAP, CAP), (600 * CAP + 8, 3)):
        assert m.get_range(first, count) == [m.get(b) for b in range(first, first + count)]


def test_leaf_mask_tracks_changes_of_a_loaded_leaf(mrig: MapRig) -> None:
    m = mrig.new_map()
    for b in (2, 7, 100):
        m.set(b, addr(50 + b))
    m.commit()
    m2 = mrig.reopen(m)
    node = m2.tree.leaf(0)
    assert node is not None and node.mask is None
    assert list(set_bits(m2.leaf_mask(node))) == [2, 7, 100]
    m2.set(7, L.EMPTY_ENTRY)
    m2.set(9, L.Entry(L.KIND_HOLE))
    m2.set(2, addr(1))  # replace: mask unchanged
    node = m2.tree.leaf(0)
    assert node is not None
    assert list(set_bits(m2.leaf_mask(node))) == [2, 9, 100]
    assert [b for b, _ in m2.entries_in(0, CAP)] == [2, 9, 100]
    assert list(set_bits(0b1011001)) == [0, 3, 4, 6]


def test_commit_and_reopen_round_trip(mrig: MapRig) -> None:
    m = mrig.new_map()
    want = {}
    for i in range(0, 5000, 7):
        e = addr(10_000 + i) if i % 3 else L.Entry(L.KIND_HOLE)
        m.set(i, e)
        want[i] = e
    m.commit()
    assert not m.dirty
    assert m.inode.root == m.tree.root_addr and m.inode.height == m.tree.height == 1
    m2 = mrig.reopen(m)
    assert dict(m2.iter_entries()) == want
    assert m2.inode.entry_count == len(want)
    assert m2.inode.owned_blocks == sum(1 for e in want.values() if e.kind == L.KIND_ADDR)
    # clearing everything and committing leaves an empty map with no blocks
    for b in want:
        m.clear(b)
    m.commit()
    assert m.inode.root == 0 and m.inode.height == 0 and m.is_empty()


def test_detach_attach_moves_counters(mrig: MapRig) -> None:
    a = mrig.new_map(5)
    b = mrig.new_map(6)
    a.set(1, addr(11))
    a.set(CAP + 1, addr(12))
    a.set(CAP + 2, L.Entry(L.KIND_HOLE))
    a.set(CAP + 3, addr(13))
    b.set(0, addr(20))
    node = a.detach_leaf(1)
    assert node is not None
    assert (a.inode.entry_count, a.inode.owned_blocks) == (1, 1)
    b.attach_leaf(1, node)
    assert (b.inode.entry_count, b.inode.owned_blocks) == (4, 3)
    assert b.get(CAP + 2) == L.Entry(L.KIND_HOLE) and b.get(CAP + 3) == addr(13)
    assert a.get(CAP + 1) == L.EMPTY_ENTRY
    assert a.detach_leaf(9) is None
    a.commit()
    b.commit()
    b2 = mrig.reopen(b)
    assert dict(b2.iter_entries()) == {
        0: addr(20),
        CAP + 1: addr(12),
        CAP + 2: L.Entry(L.KIND_HOLE),
        CAP + 3: addr(13),
    }


# --- volumes: ditto, explicit holes, chains -----------------------------------------------------


def test_ditto_vs_explicit_hole(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(blk(1)), 0)  # block 0 has data, block 3 is a hole
    eng.create_snapshot("s1")
    vol = eng.volume("live")
    sid = eng.snapshot("s1").id
    shadow = vol.shadows[sid]
    assert shadow.is_empty()  # a new snapshot is all ditto
    eng.write(ex, memoryview(blk(2)), 3 * BS)  # into the hole
    eng.write(ex, memoryview(blk(3)), 0)  # over data
    # the snapshot recorded "this was a hole" explicitly, and preserved block 0
    assert shadow.get(3).kind == L.KIND_HOLE
    assert shadow.get(0).kind == L.KIND_ADDR
    assert shadow.get(1) == L.EMPTY_ENTRY  # untouched: still ditto
    s1 = eng.open_export("live@s1", True)
    assert read_bytes(eng, s1, 3 * BS, BS) == bytes(BS)  # no leak of later data
    assert read_bytes(eng, s1, 0, BS) == blk(1)
    assert read_bytes(eng, ex, 3 * BS, BS) == blk(2)
    assert read_bytes(eng, ex, 0, BS) == blk(3)
    # extents agree: the snapshot sees a hole at block 3
    runs = eng.extents(s1, 0, 4 * BS)
    assert runs == [(0, BS, False), (BS, 3 * BS, True)]
    assert eng.extents(ex, 0, 4 * BS) == [(0, BS, False), (BS, 2 * BS, True), (3 * BS, BS, False)]
    # and the same after a reopen
    eng = reopen(eng)
    s1 = eng.open_export("live@s1", True)
    ex = eng.open_export("live", True)
    assert read_bytes(eng, s1, 0, 4 * BS) == blk(1) + bytes(3 * BS)
    assert read_bytes(eng, ex, 0, 4 * BS) == blk(3) + bytes(2 * BS) + blk(2)
    eng.close()


def test_hole_at_an_older_snapshot_resolves_through_newer_ones(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    eng.create_snapshot("s1")  # block 7 a hole
    eng.create_snapshot("s2")  # still a hole
    eng.write(ex, memoryview(blk(9)), 7 * BS)
    vol = eng.volume("live")
    s1id, s2id = eng.snapshot("s1").id, eng.snapshot("s2").id
    assert vol.shadows[s1id].get(7) == L.EMPTY_ENTRY  # s1 says ditto ...
    assert vol.shadows[s2id].get(7).kind == L.KIND_HOLE  # ... s2 says hole
    assert vol.resolve_block(s1id, 7).kind == L.KIND_HOLE
    for name in ("s1", "s2"):
        assert read_bytes(eng, eng.open_export(f"live@{name}", True), 7 * BS, BS) == bytes(BS)
    # a partial write into a hole merges with zeros
    eng.write(ex, memoryview(b"abc"), 20 * BS + 100)
    assert read_bytes(eng, ex, 20 * BS, BS) == bytes(100) + b"abc" + bytes(BS - 103)
    eng.close()


def _fig10_scenario(eng: Engine) -> tuple[dict[str, dict[int, int]], dict[int, int]]:
    """Generations of an 8-block volume; returns the expected tag of each block per snapshot
    and for live. Tag 0 is an unallocated block."""
    ex = eng.open_export("live", False)
    cur = {b: 0 for b in range(8)}

    def put(b: int, tag: int) -> None:
        eng.write(ex, memoryview(blk(tag)), b * BS)
        cur[b] = tag

    snaps: dict[str, dict[int, int]] = {}
    for b in range(6):  # blocks 6, 7 stay holes for a while
        put(b, 100 + b)
    changes = [{1, 2}, {2, 3, 6}, {3, 4}, {0, 4, 7}]
    for gen, blocks in enumerate(changes, start=1):
        eng.create_snapshot(f"s{gen}")
        snaps[f"s{gen}"] = dict(cur)
        for b in sorted(blocks):
            put(b, 100 * (gen + 1) + b)
    return snaps, cur


def _check_reads(eng: Engine, snaps: dict[str, dict[int, int]], live: dict[int, int]) -> None:
    views = {**{f"live@{n}": m for n, m in snaps.items()}, "live": live}
    for name, model in views.items():
        ex = eng.open_export(name, True)
        got = read_bytes(eng, ex, 0, 8 * BS)
        want = b"".join(blk(t) if t else bytes(BS) for _, t in sorted(model.items()))
        for b in range(8):
            assert got[b * BS : (b + 1) * BS] == want[b * BS : (b + 1) * BS], (name, b)
        # block by block through resolve_block agrees with the range read
        vol = eng.volume("live")
        for b in range(8):
            e = vol.resolve_block(ex.snap_id, b)
            assert (e.kind == L.KIND_ADDR) == (model[b] != 0), (name, b)


def test_read_through_a_chain_of_snapshots_fig10(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    snaps, live = _fig10_scenario(eng)
    assert snaps["s1"] == {0: 100, 1: 101, 2: 102, 3: 103, 4: 104, 5: 105, 6: 0, 7: 0}
    _check_reads(eng, snaps, live)
    vol = eng.volume("live")
    ids = {n: eng.snapshot(n).id for n in snaps}
    sh = {n: vol.shadows[i] for n, i in ids.items()}
    # where each answer comes from (the first real entry walking s1, s2, ..., live):
    # block 4 of s1: s1 and s2 hold ditto, s3 holds the original block (first changed
    # after s3); block 3 of s1 and s2 is s2's (first changed after s2)
    assert sh["s1"].get(4) == L.EMPTY_ENTRY and sh["s2"].get(4) == L.EMPTY_ENTRY
    assert sh["s3"].get(4).kind == L.KIND_ADDR
    assert vol.resolve_block(ids["s1"], 4) == sh["s3"].get(4)
    assert vol.resolve_block(ids["s2"], 4) == sh["s3"].get(4)
    assert vol.resolve_block(ids["s1"], 3) == sh["s2"].get(3) != sh["s3"].get(3)
    assert vol.resolve_block(ids["s3"], 3) == sh["s3"].get(3)
    # block 2 of s1 is s1's own (changed right after s1); s2's version is s2's own
    assert vol.resolve_block(ids["s1"], 2) == sh["s1"].get(2) != sh["s2"].get(2)
    # block 5 never changed: every snapshot reads live's block
    for i in ids.values():
        assert vol.resolve_block(i, 5) == vol.live.get(5)
    # block 6 was a hole until after s2: s1 dittos to s2's explicit hole
    assert sh["s2"].get(6).kind == L.KIND_HOLE and sh["s1"].get(6) == L.EMPTY_ENTRY
    # block 7: hole in s1..s4, filled after s4
    assert sh["s4"].get(7).kind == L.KIND_HOLE
    assert vol.resolve_range(ids["s1"], 0, 8) == [vol.resolve_block(ids["s1"], b) for b in range(8)]
    # entries are owned once: no block address appears in two maps
    maps = [vol.live, *sh.values()]
    addrs = [e.addr for m in maps for _, e in m.iter_entries() if e.kind == L.KIND_ADDR]
    assert len(addrs) == len(set(addrs))
    eng = reopen(eng)
    _check_reads(eng, snaps, live)
    eng.close()


def test_fig10_chain_under_copy_on_write(tmp_path: Path) -> None:
    eng = open_pool(tmp_path, cow="copy")
    snaps, live = _fig10_scenario(eng)
    _check_reads(eng, snaps, live)
    vol = eng.volume("live")
    # copy-on-write keeps live's blocks where they were
    assert vol.live.get(5).addr == vol.live.get(4).addr + 1 == vol.live.get(3).addr + 2
    eng = reopen(eng, cow="copy")
    _check_reads(eng, snaps, live)
    eng.close()


def test_diff_blocks_lists_exactly_the_changed_ranges(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    snaps, live = _fig10_scenario(eng)
    del snaps, live
    assert eng.diff_blocks("s1", "s2") == [(BS, 2 * BS)]  # blocks 1, 2
    assert eng.diff_blocks("s2", "s3") == [(2 * BS, 2 * BS), (6 * BS, BS)]
    assert eng.diff_blocks("s1", "s3") == [(BS, 3 * BS), (6 * BS, BS)]
    assert eng.diff_blocks("s4", None) == [(0, BS), (4 * BS, BS), (7 * BS, BS)]
    assert eng.diff_blocks("s1", None) == [(0, 5 * BS), (6 * BS, 2 * BS)]
    eng.close()


def test_resolve_range_matches_resolve_block_on_random_history(tmp_path: Path) -> None:
    import random

    rnd = random.Random(4)
    eng = open_pool(tmp_path, size=2 << 20)
    ex = eng.open_export("live", False)
    nblocks = 400  # spans three map leaves
    for gen in range(6):
        for _ in range(60):
            b = rnd.randrange(nblocks)
            if rnd.random() < 0.2:
                eng.trim(ex, b * BS, BS)
            else:
                eng.write(ex, memoryview(os.urandom(BS)), b * BS)
        eng.create_snapshot(f"g{gen}")
    vol: Volume = eng.volume("live")
    for sid in [*vol.chain, None]:
        rng = vol.resolve_range(sid, 0, nblocks)
        assert rng == [vol.resolve_block(sid, b) for b in range(nblocks)]
        sub = vol.resolve_range(sid, CAP - 3, CAP + 6)
        assert sub == rng[CAP - 3 : 2 * CAP + 3]
    eng.close()

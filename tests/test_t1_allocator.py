"""Unit tests of the allocator (fsimpl/allocator.py) and of the copy-on-write radix trees and
their metadata cache (fsimpl/radix.py). Pure in-process on image files under tmp_path."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fsimpl import layout as L
from fsimpl.allocator import Allocator
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import NoSpace
from fsimpl.radix import MetaStore, Node, RadixTree
from fsimpl.txn import DEFAULT_CACHE_BYTES, Pool

BS = 4096
FIRST = L.first_data_block(BS)
MAP_CAP = L.map_leaf_capacity(BS)
FAN = L.interior_fanout(BS)
BITS = L.bitmap_bits_per_block(BS)


# --- helpers -------------------------------------------------------------------------------------


class Rig:
    """A device, a metadata store and an allocator on a fresh image file."""

    def __init__(
        self,
        path: Path,
        capacity: int,
        growable: bool = True,
        reserve: int = 0,
        cache_bytes: int = 1 << 20,
    ) -> None:
        self.path = path
        self.dev = Device.create_image(str(path))
        self.dev.truncate(capacity * BS)
        self.store = MetaStore(self.dev, BS, cache_bytes)
        self.alloc = Allocator(self.store, capacity, growable, reserve)
        self.alloc.format()

    def commit(self) -> list[int]:
        """What a pool commit does for the allocator: write the bitmap, release pending."""
        self.alloc.commit()
        self.store.generation += 1
        return self.alloc.release_pending(self.store.generation - 1)

    def fresh_store(self, cache_bytes: int = 1 << 20) -> MetaStore:
        """A second store over the same device with an empty cache (a reopen)."""
        store = MetaStore(self.dev, BS, cache_bytes)
        store.allocate_address = self.alloc.allocate
        store.free_address = self.alloc.free
        return store


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "pool.img", 4096)
    yield r
    r.dev.close()


def busy(alloc: Allocator, b: int) -> bool:
    return bool(alloc.busy[b >> 3] >> (b & 7) & 1)


def allocated_set(alloc: Allocator) -> set[int]:
    return {b for b in range(alloc.capacity) if alloc.is_allocated(b)}


def mark(node: Node, tag: int) -> None:
    """Give a map leaf recognisable contents (and a non-zero count, so commit keeps it)."""
    L.write_entry(node.buf, 0, L.Entry(L.KIND_ADDR, tag, tag & 0xFFFF))
    L.write_entry(node.buf, MAP_CAP - 1, L.Entry(L.KIND_HOLE, 0, tag & 0xFFFF))
    node.count = 2


def tag_of(node: Node | None) -> int | None:
    if node is None:
        return None
    e = L.read_entry(node.buf, 0)
    assert e.kind == L.KIND_ADDR
    assert L.read_entry(node.buf, MAP_CAP - 1) == L.Entry(L.KIND_HOLE, 0, e.addr & 0xFFFF)
    return e.addr


def new_tree(
    store: MetaStore, owner: int = 7, root: L.BlockPointer = L.NO_POINTER, height: int = 0
) -> RadixTree:
    return RadixTree(store, owner, L.BT_MAP_LEAF, MAP_CAP, root, height)


def build(tree: RadixTree, leaves: list[int]) -> None:
    for n in leaves:
        mark(tree.leaf_for_write(n), 1000 + n)


def contents(tree: RadixTree) -> dict[int, int | None]:
    return {n: tag_of(node) for n, node in tree.iter_leaves()}


# --- allocator: allocate and free ----------------------------------------------------------------


def test_format_marks_only_the_superblock_area(rig: Rig) -> None:
    a = rig.alloc
    assert a.used_blocks == FIRST == 2
    assert a.free_count == 4096 - FIRST
    assert allocated_set(a) == set(range(FIRST))


def test_allocate_hands_out_distinct_free_blocks(rig: Rig) -> None:
    a = rig.alloc
    got = [a.allocate() for _ in range(100)]
    assert got == list(range(FIRST, FIRST + 100))
    assert a.used_blocks == FIRST + 100
    assert all(a.is_allocated(b) for b in got)
    assert not a.is_allocated(FIRST + 100)


def test_freed_blocks_are_not_reused_before_commit(rig: Rig) -> None:
    a = rig.alloc
    got = [a.allocate() for _ in range(50)]
    freed = got[10:20]
    a.free_many(freed)
    assert a.used_blocks == FIRST + 40
    assert all(not a.is_allocated(b) for b in freed)  # gone from the next commit's state
    assert all(busy(a, b) for b in freed)  # but still off-limits
    assert sorted(a.pending) == freed
    # even scanning from the start of the disk, allocation steps over them
    a.cursor = 0
    more = [a.allocate() for _ in range(200)]
    assert not set(more) & set(freed)
    assert min(more) == FIRST + 50
    # the commit that frees them keeps them DEFER_GENERATIONS more commits (the generations
    # before the newest stay whole, for a rewind)...
    assert rig.commit() == []
    assert a.pending == [] and a.waiting == len(freed)
    assert all(busy(a, b) for b in freed)
    for _ in range(L.DEFER_GENERATIONS - 1):
        assert rig.commit() == []
    # ...then they are allocatable, lowest first
    released = rig.commit()
    assert sorted(released) == freed
    assert a.waiting == 0
    assert all(not busy(a, b) for b in freed)
    again = [a.allocate() for _ in range(10)]
    assert again == freed


def test_double_free_is_caught(rig: Rig) -> None:
    a = rig.alloc
    b = a.allocate()
    a.free(b)
    with pytest.raises(AssertionError):
        a.free(b)


def test_non_growable_pool_raises_nospace_when_full(tmp_path: Path) -> None:
    r = Rig(tmp_path / "fixed.img", 40, growable=False, reserve=8)
    a = r.alloc
    data = []
    with pytest.raises(NoSpace):
        for _ in range(100):
            data.extend(a.allocate_many(1))
    # data allocations stop with `reserve` blocks left, for metadata
    assert len(data) == 40 - FIRST - 8
    assert a.free_count == 8
    meta = []
    with pytest.raises(NoSpace):
        for _ in range(100):
            meta.append(a.allocate())
    assert len(meta) == 8
    assert a.free_count == 0
    assert a.capacity == 40
    assert len(set(data + meta)) == 38
    # a freed block is still not available until a commit releases it
    a.free(data[0])
    with pytest.raises(NoSpace):
        a.allocate()
    r.dev.close()


def test_growable_allocator_grows_capacity(tmp_path: Path) -> None:
    r = Rig(tmp_path / "grow.img", 40, growable=True)
    a = r.alloc
    got = a.allocate_many(500)
    assert len(set(got)) == 500
    assert a.capacity >= 500 + FIRST
    assert a.grown
    assert a.used_blocks == 500 + FIRST
    assert max(got) < a.capacity
    assert got == list(range(FIRST, FIRST + 500))  # growing keeps allocation contiguous
    r.dev.close()


def test_bitmap_on_disk_equals_memory_after_commit(tmp_path: Path) -> None:
    # three bitmap leaves (and an interior node above them)
    cap = 2 * BITS + 1003  # not a multiple of 8: the tail bits of the last byte matter
    r = Rig(tmp_path / "bm.img", cap)
    a = r.alloc
    got = [a.allocate() for _ in range(3000)]
    for b in (BITS - 3, BITS, BITS + 17, 2 * BITS + 5, cap - 1):  # reach every leaf
        a.cursor = b
        got.append(a.allocate())
    a.free_many(got[100:900:3])
    r.commit()
    assert a.tree.height == 1
    assert len(list(a.tree.iter_leaves())) == 3
    b2 = Allocator(r.fresh_store(), cap, True)
    b2.load(a.tree.root, a.tree.height)
    assert b2.state == a.state
    assert b2.busy == b2.state
    assert b2.free_count == a.free_count
    assert b2.used_blocks == a.used_blocks
    assert allocated_set(b2) == allocated_set(a)
    # the bitmap tree's own blocks are recorded as in use
    for addr, _level in a.tree.all_node_addresses():
        assert b2.is_allocated(addr)
    r.dev.close()


def test_bitmap_of_a_pool_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = Engine.open(str(path), create_size=16 << 20, block_size=BS)
    ex = eng.open_export("live", False)
    blob = os.urandom(64 * BS)
    eng.write(ex, memoryview(blob), 0)
    eng.create_snapshot("s1")
    eng.write(ex, memoryview(blob[::-1]), 16 * BS)
    eng.trim(ex, 40 * BS, 8 * BS)
    eng.write(ex, memoryview(blob), 2000 * BS)
    eng.flush()
    alloc = eng.pool.allocator
    mem_state, mem_used, cap = bytes(alloc.state), alloc.used_blocks, alloc.capacity
    assert alloc.pending == []  # nothing pending after a commit...
    assert alloc.waiting  # ...but the trim and the CoW freed blocks the window still keeps
    eng.close()
    waiting = bytes(alloc.busy)
    dev = Device(str(path), readonly=True)
    pool = Pool.open(dev)
    assert pool.allocator.capacity == cap
    # close() committed the in-use record only: the bitmap is the same
    assert bytes(pool.allocator.state) == mem_state
    assert pool.allocator.used_blocks == mem_used == pool.sb.used_blocks
    # and the deferral window is rebuilt from the ring's bitmaps: blocks the last generations
    # reference wait again (not those a transaction allocated and freed before committing)
    again = int.from_bytes(pool.allocator.busy, "little")
    assert again & ~int.from_bytes(waiting, "little") == 0
    assert pool.allocator.waiting > 0
    dev.close()


def test_metadata_blocks_freed_by_cow_are_not_reused_before_commit(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = Engine.open(str(path), create_size=16 << 20, block_size=BS, metadata_copies=1)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(b"x" * BS), 0)
    eng.flush()
    pool = eng.pool
    alloc = pool.allocator
    old_meta = {a for a, _ in pool.volumes[1].live.tree.all_node_addresses()}
    old_meta |= {a for a, _ in pool.inodes.tree.all_node_addresses()}
    old_meta |= {a for a, _ in alloc.tree.all_node_addresses()}
    assert old_meta
    # a change CoWs the live map leaf: its committed block is freed into the transaction
    eng.write(ex, memoryview(b"y" * BS), BS)
    freed_now = set(alloc.pending)
    assert freed_now and freed_now <= old_meta
    for b in freed_now:
        assert not alloc.is_allocated(b) and busy(alloc, b)
    # allocate data from the bottom of the disk: the freed metadata blocks are skipped
    alloc.cursor = 0
    for i in range(2, 60):
        eng.write(ex, memoryview(bytes([i]) * BS), i * BS)
    live = pool.volumes[1].live
    data_addrs = {e.addr for _, e in live.iter_entries()}
    assert not data_addrs & freed_now
    # the committed state (still on disk) is intact: the old leaf still reads block 0 only
    eng.flush()
    assert all(busy(alloc, b) for b in freed_now)  # the deferral window keeps them...
    assert eng.core.make_room()  # ...until two more commits (or space runs low)
    assert all(not busy(alloc, b) for b in freed_now)  # reusable now
    # ... and actually reused by the next allocations from the bottom
    alloc.cursor = 0
    eng.write(ex, memoryview(b"z" * (len(freed_now) + 4) * BS), 100 * BS)
    data_addrs = {e.addr for _, e in live.iter_entries()}
    assert freed_now <= data_addrs
    buf = bytearray(BS)
    eng.read(ex, memoryview(buf), 0)
    assert buf == b"x" * BS
    eng.close()


def test_engine_on_fixed_size_pool_reports_nospace(tmp_path: Path) -> None:
    path = tmp_path / "fixed.img"
    nblocks = 64
    with open(path, "wb") as f:
        f.truncate(nblocks * BS)
    dev = Device(str(path))
    dev.lock()
    pool = Pool.format(dev, BS, 1 << 20, growable=False)
    eng = Engine(dev, pool, "move", DEFAULT_CACHE_BYTES)
    assert not pool.sb.growable and pool.allocator.capacity == nblocks
    ex = eng.open_export("live", False)
    written = 0
    with pytest.raises(NoSpace):
        for i in range(256):
            eng.write(ex, memoryview(bytes([i + 1]) * BS), i * BS)
            written += 1
    assert 0 < written < nblocks
    # the reserve is left for metadata: what was written commits and reads back
    eng.flush()
    assert path.stat().st_size == nblocks * BS  # never grown
    buf = bytearray(BS)
    for i in range(written):
        eng.read(ex, memoryview(buf), i * BS)
        assert buf == bytes([i + 1]) * BS
    # trimming makes room again (after the commit that frees the blocks)
    eng.trim(ex, 0, 4 * BS)
    eng.flush()
    eng.write(ex, memoryview(b"n" * BS), written * BS)
    eng.close()


def test_fixed_pool_filled_in_one_transaction_still_commits(tmp_path: Path) -> None:
    """The metadata reserve must cover the commit of the transaction that filled the pool:
    writes that were accepted (no NoSpace) must survive the flush that follows. Here one
    transaction writes a 1000-block pool full, touching 6 block-map leaves (plus an interior
    node, the inode-table leaf and the bitmap leaf: 9 metadata blocks > the 8 reserved)."""
    path = tmp_path / "fixed.img"
    nblocks = 1000
    with open(path, "wb") as f:
        f.truncate(nblocks * BS)
    dev = Device(str(path))
    dev.lock()
    pool = Pool.format(dev, BS, nblocks * BS, growable=False)
    eng = Engine(dev, pool, "move", DEFAULT_CACHE_BYTES)
    ex = eng.open_export("live", False)
    written = 0
    with pytest.raises(NoSpace):
        for i in range(nblocks):
            eng.write(ex, memoryview(bytes([i % 250 + 1]) * BS), i * BS)
            written += 1
    assert written > 6 * MAP_CAP - MAP_CAP  # the transaction spans several map leaves
    eng.flush()  # fails today: NoSpace from the commit, and the engine drops every write
    buf = bytearray(BS)
    for i in (0, written // 2, written - 1):
        eng.read(ex, memoryview(buf), i * BS)
        assert buf == bytes([i % 250 + 1]) * BS
    eng.close()


def test_bitmap_grows_past_one_leaf_during_commit(tmp_path: Path) -> None:
    """A growable pool filled to the last block of its first bitmap leaf: the commit's own
    reservation grows the pool, adds a bitmap leaf and an interior node above the two."""
    r = Rig(tmp_path / "g.img", BITS - 1, growable=True)
    a = r.alloc
    while a.free_count:
        a.allocate()
    assert a.tree.height == 0 and a.capacity == BITS - 1
    r.commit()
    assert a.capacity > BITS
    assert a.tree.height == 1
    assert len(list(a.tree.iter_leaves())) == 2
    b2 = Allocator(r.fresh_store(), a.capacity, True)
    b2.load(a.tree.root, a.tree.height)
    assert b2.state == a.state
    assert b2.free_count == a.free_count == a.capacity - a.used_blocks
    r.dev.close()


# --- radix trees ---------------------------------------------------------------------------------


def test_tree_grows_in_height_and_keeps_its_leaves(rig: Rig) -> None:
    t = new_tree(rig.store)
    assert t.is_empty and t.leaf(0) is None and list(t.iter_leaves()) == []
    steps = [(0, 0), (1, 1), (FAN - 1, 1), (FAN, 2), (FAN * FAN - 1, 2), (FAN * FAN, 3)]
    present: list[int] = []
    for leaf_no, height in steps:
        mark(t.leaf_for_write(leaf_no), 1000 + leaf_no)
        present.append(leaf_no)
        assert t.height == height, leaf_no
        for n in present:
            assert tag_of(t.leaf(n)) == 1000 + n
        assert [n for n, _ in t.iter_leaves()] == present
        assert t.leaf(2) is None and t.leaf(FAN + 1) is None
    assert t.leaf(FAN**3) is None  # past what the tree spans
    assert [n for n, _ in t.iter_leaves(FAN)] == [FAN, FAN * FAN - 1, FAN * FAN]
    assert [n for n, _ in t.iter_leaves(FAN * FAN)] == [FAN * FAN]
    assert [n for n, _ in t.iter_leaves(FAN * FAN + 1)] == []
    # the same leaf object comes back for a second write
    assert t.leaf_for_write(FAN) is t.leaf(FAN)


def test_tree_commit_and_reopen_with_many_leaves(rig: Rig) -> None:
    t = new_tree(rig.store)
    leaves = list(range(0, 1200)) + [FAN * 3 + 1, FAN * FAN + 5, FAN * FAN * 2 + FAN + 7]
    leaves = sorted(set(leaves))
    build(t, leaves)
    assert t.height == 3
    n_dirty = t.count_dirty()
    before = rig.store.nodes_written
    t.commit()
    assert not t.is_dirty and t.root_node is None and t.root_addr
    nodes = list(t.all_node_addresses())
    assert rig.store.nodes_written - before == len(nodes) == n_dirty
    assert sum(1 for _, level in nodes if level == 0) == len(leaves)
    assert len({a for a, _ in nodes}) == len(nodes)
    assert all(rig.alloc.is_allocated(a) for a, _ in nodes)
    # reopen through a cold cache
    store2 = rig.fresh_store()
    t2 = new_tree(store2, root=t.root, height=t.height)
    assert contents(t2) == {n: 1000 + n for n in leaves}
    assert store2.nodes_read == len(nodes)
    assert tag_of(t2.leaf(FAN * FAN + 5)) == 1000 + FAN * FAN + 5
    assert t2.leaf(1200) is None and t2.leaf(FAN * FAN + 6) is None


def test_tree_change_after_commit_is_copy_on_write(rig: Rig) -> None:
    t = new_tree(rig.store)
    build(t, [0, 1, FAN + 2])
    t.commit()
    rig.commit()
    root1, h1 = t.root, t.height
    old_nodes = {a for a, _ in t.all_node_addresses()}
    leaf1_addr = t.leaf(1).addr  # type: ignore[union-attr]
    mark(t.leaf_for_write(1), 77)  # CoW: the leaf and the interior path above it
    assert leaf1_addr in rig.alloc.pending
    assert t.root_addr == 0 and t.is_dirty
    t.commit()
    new_nodes = {a for a, _ in t.all_node_addresses()}
    # the path to leaf 1 was rewritten elsewhere; untouched subtrees are shared
    assert leaf1_addr not in new_nodes
    assert root1.addr0 not in new_nodes
    assert h1 == 2
    # shared: leaf 0, and the untouched subtree (interior + leaf FAN + 2); rewritten: root,
    # the interior above leaves 0 and 1, and leaf 1
    assert len(old_nodes & new_nodes) == 3
    assert len(old_nodes - new_nodes) == 3
    # the committed (old) tree is still readable intact until its blocks are released
    old = new_tree(rig.fresh_store(), root=root1, height=h1)
    assert contents(old) == {0: 1000, 1: 1001, FAN + 2: 1000 + FAN + 2}
    assert contents(new_tree(rig.fresh_store(), root=t.root, height=t.height)) == {
        0: 1000,
        1: 77,
        FAN + 2: 1000 + FAN + 2,
    }
    old_bitmap = {x for x, _ in rig.alloc.tree.all_node_addresses()}
    assert rig.commit() == []  # the deferral window keeps them two more commits
    assert rig.commit() == []
    released = rig.commit()
    # released: the replaced tree nodes, plus the bitmap's own previous blocks
    assert set(released) == (old_nodes - new_nodes) | old_bitmap


def test_tree_detach_and_attach_leaf(rig: Rig) -> None:
    a = new_tree(rig.store, owner=7)
    b = new_tree(rig.store, owner=8)
    build(a, [0, 3, 600])
    build(b, [0])
    a.commit()
    b.commit()
    rig.commit()
    used0 = rig.alloc.used_blocks
    n_before = len(list(a.all_node_addresses())) + len(list(b.all_node_addresses()))
    node = a.detach_leaf(600)
    assert node is not None and node.dirty
    assert tag_of(node) == 1600
    assert a.leaf(600) is None
    assert a.detach_leaf(600) is None  # already gone
    assert a.detach_leaf(5) is None  # never there
    b.attach_leaf(600, node)
    assert tag_of(b.leaf(600)) == 1600
    with pytest.raises(AssertionError):
        b.attach_leaf(0, rig.store.new_node(0))  # b already has leaf 0
    a.commit()
    b.commit()
    rig.commit()
    store2 = rig.fresh_store()
    a2 = new_tree(store2, 7, a.root, a.height)
    b2 = new_tree(store2, 8, b.root, b.height)
    assert contents(a2) == {0: 1000, 3: 1003}
    assert contents(b2) == {0: 1000, 600: 1600}
    hdr = L.open_block(
        rig.dev.pread(BS, b2.leaf(600).addr * BS),
        b2.leaf(600).addr,  # type: ignore[union-attr]
        L.BT_MAP_LEAF,
    )
    assert hdr.owner == 8  # rewritten under its new tree
    # accounting: exactly the nodes of both trees (plus the bitmap, of constant size) are used
    nodes = [x for x, _ in a.all_node_addresses()] + [x for x, _ in b.all_node_addresses()]
    assert len(set(nodes)) == len(nodes)
    bitmap_nodes = len(list(rig.alloc.tree.all_node_addresses()))
    assert rig.alloc.used_blocks == FIRST + bitmap_nodes + len(nodes)
    # moving a leaf allocates nothing new: a's CoW'd path and b's new path replace old blocks
    assert rig.alloc.used_blocks - used0 == len(nodes) - n_before


def test_tree_detach_only_leaf_of_height_zero_tree(rig: Rig) -> None:
    t = new_tree(rig.store)
    build(t, [0])
    t.commit()
    addr = t.root_addr
    assert t.height == 0 and addr
    node = t.detach_leaf(0)
    assert node is not None and tag_of(node) == 1000
    assert t.is_empty
    assert addr in rig.alloc.pending
    t.commit()
    assert t.root_addr == 0 and t.height == 0
    other = new_tree(rig.store, owner=9)
    other.attach_leaf(5, node)
    other.commit()
    assert contents(new_tree(rig.fresh_store(), 9, other.root, other.height)) == {5: 1000}


def _used_after_commit(r: Rig) -> int:
    r.commit()
    return r.alloc.used_blocks


def test_free_all_returns_every_node(rig: Rig) -> None:
    base = _used_after_commit(rig)
    t = new_tree(rig.store)
    build(t, list(range(0, 700)) + [FAN * FAN + 1])
    t.commit()
    n_nodes = len(list(t.all_node_addresses()))
    assert _used_after_commit(rig) == base + n_nodes
    addrs = {a for a, _ in t.all_node_addresses()}
    freed = t.free_all()
    assert freed == n_nodes
    assert t.is_empty and t.height == 0
    assert _used_after_commit(rig) == base
    assert not any(rig.alloc.is_allocated(a) for a in addrs)


def test_free_all_of_a_partly_dirty_tree(rig: Rig) -> None:
    base = _used_after_commit(rig)
    t = new_tree(rig.store)
    build(t, list(range(0, 400)))
    t.commit()
    assert _used_after_commit(rig) > base
    # dirty some leaves, add new ones, then throw the whole tree away uncommitted
    build(t, [5, 6, 399, 1000, FAN * 2])
    t.free_all()
    assert t.is_empty
    assert _used_after_commit(rig) == base


def test_metastore_cache_is_bounded_and_reads_through(rig: Rig) -> None:
    t = new_tree(rig.store)
    build(t, list(range(100)))
    t.commit()
    store2 = rig.fresh_store(cache_bytes=16 * BS)
    assert store2.cache_limit == 16
    t2 = new_tree(store2, root=t.root, height=t.height)
    for _ in range(2):
        assert contents(t2) == {n: 1000 + n for n in range(100)}
        assert len(store2.cache) <= 16
    assert store2.nodes_read >= 2 * 100  # evicted leaves were read again
    # a warm cache reads nothing
    store3 = rig.fresh_store()
    t3 = new_tree(store3, root=t.root, height=t.height)
    contents(t3)
    n = store3.nodes_read
    contents(t3)
    assert store3.nodes_read == n == 101


def _fixed_pool(path: Path, nblocks: int) -> Engine:
    with open(path, "wb") as f:
        f.truncate(nblocks * BS)
    dev = Device(str(path))
    dev.lock()
    pool = Pool.format(dev, BS, 4 << 20, growable=False)  # a volume larger than the pool
    return Engine(dev, pool, "move", DEFAULT_CACHE_BYTES)


def _fill_then_free(eng: Engine, start: int) -> None:
    """Fill live from block start until the pool is full, then trim that back and flush: the
    space a next change needs is in the deferral window only (freed by the last commit)."""
    ex = eng.open_export("live", False)
    filled = start
    with pytest.raises(NoSpace):
        while True:
            eng.write(ex, memoryview(os.urandom(BS)), filled * BS)
            filled += 1
    eng.trim(ex, start * BS, (filled - start) * BS)
    eng.flush()


def test_flatten_on_a_full_pool_waits_out_the_deferral_window(tmp_path: Path) -> None:
    """A flatten that finds no room lets the frees waiting in the deferral window expire
    (as a write does), instead of failing while the pool has the space."""
    keep = 120
    eng = _fixed_pool(tmp_path / "flatten.img", 400)
    kept = os.urandom(keep * BS)
    eng.write(eng.open_export("live", False), memoryview(kept), 0)
    eng.create_snapshot("s")
    eng.clone("live@s", "c")
    _fill_then_free(eng, keep)
    alloc = eng.pool.allocator
    assert alloc.available < keep <= alloc.waiting  # room only once the window expires
    eng.flatten("c")
    assert eng.volume("c").origin is None
    buf = bytearray(keep * BS)
    eng.read(eng.open_export("c", True), memoryview(buf), 0)
    assert buf == kept
    eng.delete_snapshot("s")  # nothing depends on s any more
    eng.close()


def test_receive_on_a_full_pool_waits_out_the_deferral_window(tmp_path: Path) -> None:
    keep = 120
    source = Engine.open(str(tmp_path / "src.img"), create_size=1 << 20, block_size=BS, claim=False)
    data = os.urandom(keep * BS)
    source.write(source.open_export("live", False), memoryview(data), 0)
    source.create_snapshot("s")
    stream = io.BytesIO()
    source.send(None, "s", stream)
    source.close()
    eng = _fixed_pool(tmp_path / "target.img", 400)
    _fill_then_free(eng, 0)
    alloc = eng.pool.allocator
    assert alloc.available < keep <= alloc.waiting
    stream.seek(0)
    eng.receive(stream, force=True)
    buf = bytearray(keep * BS)
    eng.read(eng.open_export("live@s", True), memoryview(buf), 0)
    assert buf == data
    eng.close()

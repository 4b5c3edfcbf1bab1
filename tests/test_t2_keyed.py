"""Keyed trees (fsimpl/keyed.py): a randomized model against a sorted dict, the B+tree's
invariants after every batch, reopening from the committed root, both metadata copies, and
bounded reads per lookup whatever the number of keys."""

from __future__ import annotations

import bisect
import random
from pathlib import Path

import pytest

from fsimpl.allocator import Allocator
from fsimpl.device import Device
from fsimpl.errors import CorruptMetadata
from fsimpl.keyed import KeyedTree
from fsimpl.layout import (
    BT_KEYED_INTERIOR,
    BT_KEYED_LEAF,
    HEADER,
    KEY_SIZE,
    BlockHeader,
    BlockPointer,
    keyed_fanout,
    keyed_interior_records,
    keyed_leaf_capacity,
    keyed_leaf_records,
    pack_key,
    unpack_key,
)
from fsimpl.radix import MetaStore

BS = 4096
VALUE = 12
OWNER = 77


class Rig:
    """A device, a metadata store with an allocator, and commits as a pool makes them."""

    def __init__(self, path: Path, copies: int = 1, capacity: int = 1 << 14) -> None:
        self.dev = Device.create_image(str(path))
        self.dev.truncate(capacity * BS)
        self.store = self.new_store()
        self.store.copies = copies
        self.alloc = Allocator(self.store, capacity, growable=False)
        self.alloc.format()
        self.commit()

    def new_store(self) -> MetaStore:
        return MetaStore(self.dev, BS, 1 << 20)

    def commit(self, *trees: KeyedTree) -> None:
        for tree in trees:
            tree.commit()
        self.alloc.commit()
        self.store.generation += 1
        self.alloc.release_pending(self.store.generation - 1)

    def reopen(self, tree: KeyedTree) -> KeyedTree:
        """The committed tree as a fresh open reads it (an empty cache)."""
        store = self.new_store()
        store.allocate_address = self.alloc.allocate
        store.free_address = self.alloc.free
        return KeyedTree(store, OWNER, VALUE, tree.root, tree.height)


def key(n: int) -> bytes:
    return pack_key(n >> 20, n & 0xFFFFF)


def value(n: int, salt: int = 0) -> bytes:
    return ((n * 2654435761 + salt) & ((1 << 96) - 1)).to_bytes(VALUE, "little")


def check_shape(tree: KeyedTree) -> None:
    """Every leaf at the same depth, keys sorted and inside their parent's bounds, no node
    over capacity, no node empty but an empty root: read from disk (tree committed)."""
    assert not tree.is_dirty
    if tree.root.addr0 == 0:
        assert tree.height == 0
        return
    store = tree.store
    leaf_cap = keyed_leaf_capacity(BS, VALUE)
    fan = keyed_fanout(BS)

    def walk(ptr: BlockPointer, level: int, lo: bytes, hi: bytes | None) -> int:
        btype = BT_KEYED_LEAF if level == 0 else BT_KEYED_INTERIOR
        node = store.load(ptr, btype, level)
        assert node.level == level
        if level == 0:
            keys, _ = keyed_leaf_records(node.buf, VALUE, node.count)
            assert 0 < len(keys) <= leaf_cap
            assert keys == sorted(keys) and len(set(keys)) == len(keys)
            assert keys[0] >= lo and (hi is None or keys[-1] < hi)
            return len(keys)
        bounds, kids = keyed_interior_records(node.buf, node.count)
        assert 0 < len(bounds) <= fan and bounds == sorted(bounds)
        assert len(bounds) >= 2 or ptr != tree.root  # a one-child root gives way
        total = 0
        assert bounds[0] >= lo
        for i, kid in enumerate(kids):
            child_lo = bounds[i]
            child_hi = bounds[i + 1] if i + 1 < len(bounds) else hi
            total += walk(kid, level - 1, child_lo, child_hi)
        return total

    walk(tree.root, tree.height, b"", None)


def test_keys_pack_in_numeric_order() -> None:
    pairs = [(0, 0), (0, 1), (0, 1 << 63), (1, 0), (5, 7), (1 << 47, 3), ((1 << 64) - 1, 9)]
    packed = [pack_key(a, b) for a, b in pairs]
    assert packed == sorted(packed) and all(len(k) == KEY_SIZE for k in packed)
    assert [unpack_key(k) for k in packed] == pairs


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_match_a_sorted_dict(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    rig = Rig(tmp_path / "pool.img")
    baseline = rig.alloc.free_count
    tree = KeyedTree(rig.store, OWNER, VALUE)
    model: dict[bytes, bytes] = {}
    universe = 40_000  # enough for three levels at 4 KiB nodes (144 records, 84 children)
    tallest = 0
    for batch in range(24):
        for _ in range(rng.choice([50, 1500, 9000])):
            n = rng.randrange(universe)
            k = key(n)
            r = rng.random()
            if r < 0.55 - 0.3 * (batch % 4 == 3):  # every fourth batch mostly deletes
                v = value(n, batch)
                assert tree.put(k, v) == model.get(k)
                model[k] = v
            else:
                assert tree.delete(k) == model.pop(k, None)
        # reads inside the transaction (dirty nodes) and after commit (clean nodes)
        for phase in ("dirty", "clean"):
            if phase == "clean":
                rig.commit(tree)
                check_shape(tree)
                tallest = max(tallest, tree.height)
            ordered = sorted(model)
            for _ in range(60):
                probe = key(rng.randrange(universe + 10))
                assert tree.get(probe) == model.get(probe)
                i = bisect.bisect_left(ordered, probe)
                want = (ordered[i], model[ordered[i]]) if i < len(ordered) else None
                assert tree.ceiling(probe) == want
                a, b = sorted((rng.randrange(universe), rng.randrange(universe)))
                got = list(tree.items(key(a), key(b)))
                span = ordered[
                    bisect.bisect_left(ordered, key(a)) : bisect.bisect_left(ordered, key(b))
                ]
                assert got == [(k, model[k]) for k in span]
            if phase == "clean":
                assert list(tree.items()) == [(k, model[k]) for k in ordered]
        if batch % 8 == 7:
            tree = rig.reopen(tree)  # the committed tree alone is the whole truth
            rig.store = tree.store
            assert list(tree.items()) == sorted(model.items())
    assert tallest >= 2
    # emptied, the tree gives every block back
    for k in list(model):
        assert tree.delete(k) == model.pop(k)
    rig.commit(tree)
    assert tree.is_empty and tree.height == 0
    rig.commit()
    rig.commit()
    assert rig.alloc.free_count == baseline


def test_every_committed_node_is_allocated_and_nothing_leaks(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "pool.img")
    baseline = rig.alloc.free_count
    tree = KeyedTree(rig.store, OWNER, VALUE)
    for n in range(3000):
        tree.put(key(n * 7), value(n))
    rig.commit(tree)
    for n in range(0, 3000, 3):
        tree.delete(key(n * 7))
    rig.commit(tree)
    nodes = [p.addr0 for p, _ in tree.all_node_pointers()]
    assert len(nodes) == len(set(nodes))
    assert all(rig.alloc.is_allocated(a) for a in nodes)
    rig.commit()
    rig.commit()  # the deferral window passes: what the tree freed is free again
    assert rig.alloc.free_count == baseline - len(nodes)
    assert tree.free_all() == len(nodes)
    rig.commit()
    rig.commit()
    rig.commit()
    assert rig.alloc.free_count == baseline


def test_a_lookup_reads_one_node_per_level_whatever_the_count(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "pool.img", capacity=1 << 16)
    tree = KeyedTree(rig.store, OWNER, VALUE)
    reads: dict[int, int] = {}
    heights: dict[int, int] = {}
    done = 0
    for count in (1_000, 10_000, 60_000):
        for n in range(done, count):
            tree.put(key(n * 3), value(n))
        done = count
        rig.commit(tree)
        heights[count] = tree.height
        cold = rig.reopen(tree)
        rng = random.Random(count)
        for _ in range(20):
            cold.store.drop_cache()
            before = cold.store.nodes_read
            n = rng.randrange(count)
            assert cold.ceiling(key(n * 3 - 1)) == (key(n * 3), value(n))
            reads[count] = max(reads.get(count, 0), cold.store.nodes_read - before)
    # one node per level, and the next leaf when the key found opens it
    assert all(reads[c] <= heights[c] + 2 for c in reads), (reads, heights)
    assert heights[60_000] <= 2 and reads[60_000] <= 4, (reads, heights)


def test_a_lookup_in_a_remembered_leaf_reads_no_interior_node(tmp_path: Path) -> None:
    """The warm path of a snapshot read: once a leaf's key range is known, a lookup in it goes
    straight to the cached leaf, even with every interior node evicted; and a change to the
    tree forgets the ranges (its nodes move), with lookups exact throughout."""
    rig = Rig(tmp_path / "pool.img", capacity=1 << 16)
    tree = KeyedTree(rig.store, OWNER, VALUE)
    for n in range(10_000):
        tree.put(key(n * 3), value(n))
    rig.commit(tree)
    assert tree.height >= 2
    probes = [n * 3 for n in range(1, 10_000, 250)]  # fewer leaves than are remembered
    for n in probes:
        assert tree.ceiling(key(n - 1)) == (key(n), value(n // 3))
    interior = [a for a, node in rig.store.cache.items() if node.level > 0]
    for a in interior:
        del rig.store.cache[a]
    before = rig.store.nodes_read
    for n in probes:
        assert tree.ceiling(key(n - 1)) == (key(n), value(n // 3))
        assert tree.get(key(n)) == value(n // 3)
        assert tree.get(key(n + 1)) is None
    assert rig.store.nodes_read == before, "a remembered leaf was reached through its parents"
    # a change moves the leaves: the ranges are forgotten, and lookups stay exact
    for n in probes:
        tree.put(key(n + 1), value(n, 1))
    rig.commit(tree)
    for n in probes:
        assert tree.ceiling(key(n + 1)) == (key(n + 1), value(n, 1))
        assert tree.get(key(n)) == value(n // 3)


def test_a_bad_first_copy_is_served_from_the_second(tmp_path: Path) -> None:
    rig = Rig(tmp_path / "pool.img", copies=2)
    tree = KeyedTree(rig.store, OWNER, VALUE)
    for n in range(1500):
        tree.put(key(n), value(n))
    rig.commit(tree)
    leaves = [p for p, level in tree.all_node_pointers() if level == 0]
    assert all(p.addr1 and p.addr1 != p.addr0 for p in leaves)
    victim = leaves[len(leaves) // 2]
    rig.dev.pwrite(b"\xff" * 100, victim.addr0 * BS + 200)
    cold = rig.reopen(tree)
    assert list(cold.items()) == [(key(n), value(n)) for n in range(1500)]
    assert cold.store.healed == 1 and victim.addr0 in cold.store.heals


def test_an_older_version_of_a_node_is_never_used(tmp_path: Path) -> None:
    """A lost write: the device kept an older, valid-looking node where the newer one should
    be. The parent's pointer names the version, so the read refuses it."""
    rig = Rig(tmp_path / "pool.img")
    tree = KeyedTree(rig.store, OWNER, VALUE)
    for n in range(1500):
        tree.put(key(n), value(n))
    rig.commit(tree)
    old = {p.addr0: rig.dev.pread(BS, p.addr0 * BS) for p, lv in tree.all_node_pointers()}
    tree.put(key(700), value(700, 1))
    rig.commit(tree)
    (leaf,) = [p for p, level in tree.all_node_pointers() if level == 0 and p.addr0 not in old]
    # the device kept what the leaf held before the change (the old version of that leaf)
    headers = {a: BlockHeader(*HEADER.unpack_from(buf, 0)[1:]) for a, buf in old.items()}
    was = next(
        buf
        for a, buf in old.items()
        if headers[a].btype == BT_KEYED_LEAF
        and key(700) in keyed_leaf_records(buf, VALUE, headers[a].records)[0]
    )
    rig.dev.pwrite(was, leaf.addr0 * BS)
    cold = rig.reopen(tree)
    assert cold.get(key(10)) == value(10)  # other leaves read as before
    with pytest.raises(CorruptMetadata):
        cold.get(key(700))

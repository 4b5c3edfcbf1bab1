"""Unit tests of the on-disk format (fsimpl/layout.py) and of the checks it makes when a pool is
opened or read: checksums, self-addresses, block types, format versions, feature bits, and the
fall-back from a torn newest superblock to the other slot. Pure in-process, no nbdkit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.faults import SUPERBLOCK_WRITE, FaultyDevice, PowerCut
from support.logcheck import COMMIT_FAILED, SLOT_UNUSABLE

from fsimpl import layout as L
from fsimpl.engine import Engine
from fsimpl.errors import (
    CorruptMetadata,
    DamagedPool,
    ExportGone,
    NotAPool,
    PoolTruncated,
    UnsupportedFormat,
)
from fsimpl.txn import DEFAULT_CACHE_BYTES, Pool

BS = 4096


# --- helpers -------------------------------------------------------------------------------------


def make_engine(path: Path, size: int = 4 << 20, **kw: object) -> Engine:
    """One metadata copy: these tests damage a block and expect the damage to be seen (two
    copies heal it: tests/test_t2_metadata_copies.py)."""
    kw.setdefault("metadata_copies", 1)
    return Engine.open(str(path), create_size=size, block_size=BS, **kw)  # type: ignore[arg-type]


def read_bytes(eng: Engine, ex: object, off: int, n: int) -> bytes:
    buf = bytearray(n)
    eng.read(ex, memoryview(buf), off)  # type: ignore[arg-type]
    return bytes(buf)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xA5]))


def read_raw(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_raw(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def raw_superblocks(path: Path) -> list[L.Superblock]:
    out = []
    for off in L.SUPERBLOCK_OFFSETS:
        out.append(L.unpack_superblock(read_raw(path, off, L.SUPERBLOCK_SIZE), "slot"))
    return out


def full_superblock() -> L.Superblock:
    """A superblock with every field away from its default."""
    return L.Superblock(
        generation=0x1122334455,
        block_size=65536,
        capacity_blocks=123456789,
        pool_guid=bytes(range(16)),
        created_ns=1_700_000_000_123_456_789,
        growable=True,
        features=L.FEATURE_DATA_CHECKSUMS,
        next_inode=77,
        next_snap_id=91,
        used_blocks=4242,
        inode_root=1001,
        inode_height=2,
        snap_root=1002,
        snap_height=1,
        bitmap_root=1003,
        bitmap_height=3,
        reserve_blocks=64,
        snapshot_min_free=128,
        role=L.ROLE_STANDBY,
        inuse_pid=31337,
        inuse_since_ns=1_700_000_001_000_000_000,
        inuse_host="host-a.example",
        peer="tcp://10.0.0.2:4242",
        last_common_guid=bytes(range(100, 116)),
    )


# --- superblock -----------------------------------------------------------------------------------


def test_superblock_round_trip_every_field() -> None:
    sb = full_superblock()
    raw = L.pack_superblock(sb)
    assert len(raw) == L.SUPERBLOCK_SIZE
    assert raw[4:12] == L.MAGIC
    back = L.unpack_superblock(raw, "test")
    assert back == sb
    # a default superblock round-trips too
    small = L.Superblock(
        generation=1, block_size=4096, capacity_blocks=10, pool_guid=bytes(16), created_ns=0
    )
    assert L.unpack_superblock(L.pack_superblock(small), "t") == small


def test_superblock_long_strings_are_truncated_not_overflowing() -> None:
    sb = full_superblock()
    sb.inuse_host = "h" * 100
    sb.peer = "p" * 300
    back = L.unpack_superblock(L.pack_superblock(sb), "t")
    assert back.inuse_host == "h" * 64
    assert back.peer == "p" * 256
    assert back.last_common_guid == sb.last_common_guid


@pytest.mark.parametrize("offset", [0, 3, 12, 20, 30, 200, 400, 2000, 2047])
def test_superblock_checksum_detects_a_flipped_byte(offset: int) -> None:
    raw = bytearray(L.pack_superblock(full_superblock()))
    raw[offset] ^= 0x10
    with pytest.raises(CorruptMetadata) as ei:
        L.unpack_superblock(bytes(raw), "disk.img")
    assert ei.value.block_type == "superblock"
    assert "disk.img" in str(ei.value)


def test_superblock_bad_magic_and_short_buffer_are_not_a_pool() -> None:
    raw = bytearray(L.pack_superblock(full_superblock()))
    raw[5] ^= 1  # inside the magic
    with pytest.raises(NotAPool):
        L.unpack_superblock(bytes(raw), "x")
    with pytest.raises(NotAPool):
        L.unpack_superblock(bytes(L.SUPERBLOCK_SIZE), "x")
    with pytest.raises(NotAPool):
        L.unpack_superblock(bytes(100), "x")


def test_superblock_unknown_version_is_unsupported() -> None:
    sb = full_superblock()
    sb.version = L.FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormat) as ei:
        L.unpack_superblock(L.pack_superblock(sb), "x")
    assert str(L.FORMAT_VERSION + 1) in str(ei.value)
    sb.version = 0
    with pytest.raises(UnsupportedFormat):
        L.unpack_superblock(L.pack_superblock(sb), "x")


def test_superblock_unknown_feature_bits_are_unsupported() -> None:
    sb = full_superblock()
    sb.features = L.FEATURE_DATA_CHECKSUMS | (1 << 9)
    with pytest.raises(UnsupportedFormat) as ei:
        L.unpack_superblock(L.pack_superblock(sb), "x")
    assert "0x200" in str(ei.value)
    sb.features = 1 << 31
    with pytest.raises(UnsupportedFormat):
        L.unpack_superblock(L.pack_superblock(sb), "x")
    sb.features = L.KNOWN_FEATURES  # every known bit is fine
    assert L.unpack_superblock(L.pack_superblock(sb), "x").features == L.KNOWN_FEATURES


# --- block sizes and capacities -------------------------------------------------------------------


def test_block_size_rules_and_capacities() -> None:
    for ok in (4096, 8192, 65536, 1 << 20):
        L.check_block_size(ok)
    for bad in (0, 512, 2048, 4097, 12288, 2 << 20):
        with pytest.raises(ValueError):
            L.check_block_size(bad)
    assert L.first_data_block(4096) == 2
    assert L.first_data_block(8192) == 1
    assert L.first_data_block(65536) == 1
    assert L.interior_fanout(4096) == (4096 - 64) // 32 == 126  # block pointers of 32 bytes
    assert L.interior_fanout(4096, version=1) == (4096 - 64) // 8 == 504
    assert L.map_leaf_capacity(4096) == (4096 - 64) // 24 == 168
    assert L.record_capacity(4096, L.INODE_RECORD_SIZE) == 15
    assert L.record_capacity(4096, L.SNAP_RECORD_SIZE) == 7
    assert L.bitmap_bits_per_block(4096) == (4096 - 64) * 8


# --- records --------------------------------------------------------------------------------------


def test_map_entry_round_trip_and_neighbours_untouched() -> None:
    buf = bytearray(BS)
    cap = L.map_leaf_capacity(BS)
    entries = {
        0: L.Entry(L.KIND_ADDR, 12345, 7),
        1: L.Entry(L.KIND_HOLE),
        2: L.Entry(L.KIND_NONE, 0, 99),  # "unallocated, changed since the latest snapshot"
        # incomplete: the base block where a complete entry keeps its checksum
        5: L.Entry(L.KIND_ADDR, L.ADDR_MASK, 0xFFFFFFFF, L.ENTRY_INCOMPLETE, 3, 8, 0, 1 << 47),
        6: L.Entry(L.KIND_ADDR, 77, 2, 0, 0, 0, 0xDEADBEEF),
        cap - 1: L.Entry(L.KIND_ADDR, 1, 1, 0xFE, 0xFFFF, 0xFFFF, 0xFFFFFFFF),
    }
    for i, e in entries.items():
        L.write_entry(buf, i, e)
    for i in range(cap):
        want = entries.get(i, L.EMPTY_ENTRY)
        assert L.read_entry(buf, i) == want, i
        assert L.entry_is_empty(buf, i) == (want == L.EMPTY_ENTRY)
    # read in ranges (what a large request reads), the same entries one by one
    for lo, hi in ((0, cap), (0, 1), (4, 7), (cap - 2, cap), (3, 3)):
        assert L.read_entries(buf, lo, hi) == [L.read_entry(buf, i) for i in range(lo, hi)]
    assert bytes(buf[: L.HEADER_SIZE]) == bytes(L.HEADER_SIZE)  # header left alone
    # the last entry ends inside the block
    assert L.HEADER_SIZE + L.ENTRY_SIZE * cap <= BS
    # clearing an entry makes it empty again
    L.write_entry(buf, 5, L.EMPTY_ENTRY)
    assert L.entry_is_empty(buf, 5)
    assert L.read_entry(buf, 0) == entries[0]


def full_inode(index: int) -> L.InodeRecord:
    return L.InodeRecord(
        ino=1000 + index,
        kind=L.INODE_SHADOW if index % 2 else L.INODE_VOLUME,
        volume_ino=3 + index,
        snap_id=17 + index,
        size=(1 << 40) + index,
        root=55555 + index,
        height=3,
        owned_blocks=777 + index,
        entry_count=888 + index,
        created_ns=1_600_000_000_000_000_000 + index,
        flags=0x5A,
        op=L.OP_ROLLBACK,
        op_target=19 + index,
        origin_vol=4 + index,
        origin_snap=21 + index,
        incarnation=9 + index,
        referenced_blocks=321 + index,
        name=f"vol{index}-" + "x" * 40,
    )


def test_inode_record_round_trip_every_slot() -> None:
    cap = L.record_capacity(BS, L.INODE_RECORD_SIZE)
    buf = bytearray(BS)
    recs = {i: full_inode(i) for i in range(cap) if i != 4}
    for i, r in recs.items():
        L.write_inode(buf, i, r)
    for i in range(cap):
        assert L.read_inode(buf, i) == recs.get(i)
    # a 64-character name survives, and a cleared slot reads as free
    r = full_inode(0)
    r.name = "n" * 64
    L.write_inode(buf, 0, r)
    assert L.read_inode(buf, 0) == r
    L.write_inode(buf, 3, None)
    assert L.read_inode(buf, 3) is None
    assert L.read_inode(buf, 2) == recs[2]


def test_snapshot_record_round_trip_with_holds() -> None:
    cap = L.record_capacity(BS, L.SNAP_RECORD_SIZE)
    buf = bytearray(BS)
    recs: dict[int, L.SnapshotRecord] = {}
    for i in range(cap):
        recs[i] = L.SnapshotRecord(
            id=(1 << 40) + i,
            guid=bytes([i]) * 16,
            name=f"snap-{i}" + "y" * 50,
            created_ns=1_650_000_000_000_000_000 + i,
            state=L.SNAP_DELETING if i % 2 else L.SNAP_ACTIVE,
            flags=L.SNAPF_WRITABLE | L.SNAPF_REPLICATION,
            covered=i + 1,
            holds=[f"tag{j}-" + "z" * 20 for j in range(i % (L.MAX_HOLDS + 1))],
        )
        L.write_snapshot(buf, i, recs[i])
    for i in range(cap):
        assert L.read_snapshot(buf, i) == recs[i]
    full = L.SnapshotRecord(
        id=7, guid=b"g" * 16, name="full", created_ns=1, holds=["t" * 32] * L.MAX_HOLDS
    )
    L.write_snapshot(buf, 1, full)
    assert L.read_snapshot(buf, 1) == full
    L.write_snapshot(buf, 2, None)
    assert L.read_snapshot(buf, 2) is None
    assert L.read_snapshot(buf, 3) == recs[3]


def test_pointers_round_trip() -> None:
    buf = bytearray(BS)
    fan = L.interior_fanout(BS)

    def ptr(slot: int) -> L.BlockPointer:
        return L.BlockPointer((slot + 1) * 1_000_003, slot + 7, (1 << 40) + slot, 0xDEADBEEF - slot)

    for slot in (0, 1, fan // 2, fan - 1):
        L.set_pointer(buf, slot, ptr(slot))
    for slot in range(fan):
        want = ptr(slot) if slot in (0, 1, fan // 2, fan - 1) else L.NO_POINTER
        assert L.get_pointer(buf, slot) == want
    assert L.child_pointers(buf, fan) == [L.get_pointer(buf, s) for s in range(fan)]


# --- metadata block header: seal and verify -------------------------------------------------------


def sealed(btype: int = L.BT_MAP_LEAF, address: int = 4711) -> bytearray:
    buf = bytearray(BS)
    L.write_entry(buf, 3, L.Entry(L.KIND_ADDR, 99, 2))
    L.seal_block(buf, btype, address, generation=12, owner=5, level=0, count=1, key_base=168)
    return buf


@pytest.mark.parametrize(
    "btype",
    [L.BT_INTERIOR, L.BT_MAP_LEAF, L.BT_INODE_LEAF, L.BT_SNAP_LEAF, L.BT_BITMAP],
)
def test_seal_and_open_block_round_trip(btype: int) -> None:
    buf = sealed(btype, 4711)
    hdr = L.open_block(buf, 4711, btype)
    assert hdr == L.BlockHeader(btype, 1, 4711, 12, 5, 0, 1, 168, 0)
    assert L.read_entry(buf, 3) == L.Entry(L.KIND_ADDR, 99, 2)  # payload untouched


@pytest.mark.parametrize("offset", [0, 2, 4, 8, 16, 40, 63, 64, 1000, BS - 1])
def test_open_block_detects_a_flipped_byte(offset: int) -> None:
    buf = sealed(L.BT_MAP_LEAF, 4711)
    buf[offset] ^= 0x01
    with pytest.raises(CorruptMetadata) as ei:
        L.open_block(buf, 4711, L.BT_MAP_LEAF)
    assert ei.value.address == 4711
    assert ei.value.block_type == "block-map leaf"
    assert "4711" in str(ei.value)


def test_open_block_detects_misdirected_write() -> None:
    buf = sealed(L.BT_INODE_LEAF, 100)
    with pytest.raises(CorruptMetadata) as ei:
        L.open_block(buf, 101, L.BT_INODE_LEAF)
    assert ei.value.address == 101
    assert ei.value.block_type == "inode-table leaf"
    assert "claims address 100" in str(ei.value)


def test_open_block_detects_wrong_type() -> None:
    buf = sealed(L.BT_SNAP_LEAF, 100)
    with pytest.raises(CorruptMetadata) as ei:
        L.open_block(buf, 100, L.BT_MAP_LEAF)
    assert ei.value.address == 100
    assert ei.value.block_type == "block-map leaf"
    assert "snapshot-table leaf" in str(ei.value)


def test_open_block_rejects_zeros_and_a_superblock() -> None:
    with pytest.raises(CorruptMetadata):
        L.open_block(bytearray(BS), 9, L.BT_BITMAP)
    # a superblock is not a metadata block, even at the right place
    raw = bytearray(L.pack_superblock(full_superblock()))
    with pytest.raises(CorruptMetadata):
        L.open_block(raw, 0, L.BT_INTERIOR)


# --- the checks on a real pool --------------------------------------------------------------------


def _pool_with_two_map_leaves(tmp_path: Path) -> tuple[Path, int, int, bytes]:
    """A pool whose live map has leaves 0 and 1; returns (path, leaf0 addr, leaf1 addr, data)."""
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    ex = eng.open_export("live", False)
    data = os.urandom(BS)
    cap = L.map_leaf_capacity(BS)
    eng.write(ex, memoryview(data), 0)
    eng.write(ex, memoryview(data[::-1]), cap * BS)
    eng.flush()
    tree = eng.volume("live").live.tree
    assert tree.height == 1
    leaves = {}
    for leaf_no in (0, 1):
        node = tree.leaf(leaf_no)
        assert node is not None and not node.dirty
        leaves[leaf_no] = node.addr
    eng.close()
    return path, leaves[0], leaves[1], data


def test_pool_reads_back_after_reopen(tmp_path: Path) -> None:
    path, _, _, data = _pool_with_two_map_leaves(tmp_path)
    eng = Engine.open(str(path))
    ex = eng.open_export("live", True)
    cap = L.map_leaf_capacity(BS)
    assert read_bytes(eng, ex, 0, BS) == data
    assert read_bytes(eng, ex, cap * BS, BS) == data[::-1]
    assert eng.pool.block_size == BS
    eng.close()


def test_flipped_byte_in_map_leaf_is_reported_with_address(tmp_path: Path) -> None:
    path, leaf0, leaf1, _ = _pool_with_two_map_leaves(tmp_path)
    flip_byte(path, leaf1 * BS + 500)
    eng = Engine.open(str(path))  # map leaves are read lazily: the pool opens
    ex = eng.open_export("live", True)
    assert len(read_bytes(eng, ex, 0, BS)) == BS  # leaf 0 is fine
    cap = L.map_leaf_capacity(BS)
    with pytest.raises(CorruptMetadata) as ei:
        read_bytes(eng, ex, cap * BS, BS)
    assert ei.value.address == leaf1
    assert ei.value.block_type == "block-map leaf"
    assert str(leaf1) in str(ei.value)
    eng.close()


@pytest.mark.parametrize("damage", ["older-version", "misdirected"])
def test_a_lost_or_misdirected_write_is_caught_by_the_pointer(tmp_path: Path, damage: str) -> None:
    """A block that is valid on its own (good checksum, right type, right address) but not the
    version its parent points to: the device lost the newest write to it (an older version of
    the node is there), or took a write meant for another block. Version 1 read it as good."""
    path, leaf0, leaf1, _ = _pool_with_two_map_leaves(tmp_path)
    raw = bytearray(read_raw(path, leaf1 * BS, BS))
    hdr = L.open_block(raw, leaf1, L.BT_MAP_LEAF)
    if damage == "older-version":  # same address, an earlier generation, different records
        L.write_entry(raw, 5, L.Entry(L.KIND_ADDR, 4242, 1))
        generation = hdr.generation - 1
    else:  # another leaf's records, resealed as if written here
        raw[L.HEADER_SIZE :] = read_raw(path, leaf0 * BS, BS)[L.HEADER_SIZE :]
        generation = hdr.generation
    L.seal_block(raw, L.BT_MAP_LEAF, leaf1, generation, hdr.owner, 0, hdr.records, hdr.key_base)
    L.open_block(raw, leaf1, L.BT_MAP_LEAF)  # valid on its own
    write_raw(path, leaf1 * BS, bytes(raw))
    eng = Engine.open(str(path))
    ex = eng.open_export("live", True)
    assert len(read_bytes(eng, ex, 0, BS)) == BS  # leaf 0 is fine
    with pytest.raises(CorruptMetadata, match="not the version its parent points to") as ei:
        read_bytes(eng, ex, L.map_leaf_capacity(BS) * BS, BS)
    assert ei.value.address == leaf1 and ei.value.block_type == "block-map leaf"
    eng.close()


def test_flipped_byte_in_interior_node_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(b"a" * BS), 0)
    eng.write(ex, memoryview(b"b" * BS), 200 * BS)
    eng.flush()
    tree = eng.volume("live").live.tree
    root = tree.root_addr
    assert tree.height == 1 and root
    eng.close()
    flip_byte(path, root * BS + 70)
    eng = Engine.open(str(path))
    ex = eng.open_export("live", True)
    with pytest.raises(CorruptMetadata) as ei:
        read_bytes(eng, ex, 0, BS)
    assert ei.value.address == root
    assert ei.value.block_type == "interior node"
    eng.close()


def _committed_root(eng: Engine, which: str) -> int:
    pool = eng.pool
    return {
        "inode": pool.inodes.root.addr0,
        "snap": pool.snaptab.root.addr0,
        "bitmap": pool.allocator.tree.root_addr,
    }[which]


@pytest.mark.parametrize(
    ("which", "tname"),
    [
        ("inode", "inode-table leaf"),
        ("snap", "snapshot-table leaf"),
    ],
)
def test_flipped_byte_in_table_root_fails_open(tmp_path: Path, which: str, tname: str) -> None:
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(b"q" * BS), 0)
    eng.create_snapshot("s1")
    addr = _committed_root(eng, which)
    assert addr > 1
    assert eng.pool.sb.inode_height == eng.pool.sb.snap_height == eng.pool.sb.bitmap_height == 0
    eng.close()
    flip_byte(path, addr * BS + BS - 7)
    with pytest.raises(CorruptMetadata) as ei:
        Engine.open(str(path))
    assert ei.value.address == addr
    assert ei.value.block_type == tname
    assert "snapctl check" in str(ei.value)
    # undo the damage: the pool opens again (the failed open released its lock)
    flip_byte(path, addr * BS + BS - 7)
    eng = Engine.open(str(path))
    assert read_bytes(eng, eng.open_export("live@s1", True), 0, BS) == b"q" * BS
    eng.close()


@pytest.mark.engine_log("the pool is read-only")
def test_flipped_byte_in_the_bitmap_opens_read_only(tmp_path: Path) -> None:
    """The bitmap can be rebuilt from the trees (check --repair): its damage costs writing,
    not reading."""
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(b"q" * BS), 0)
    eng.create_snapshot("s1")
    addr = _committed_root(eng, "bitmap")
    eng.close()
    flip_byte(path, addr * BS + BS - 7)
    eng = Engine.open(str(path))  # claims nothing: the in-use record is not written either
    try:
        assert "free-space bitmap" in (eng.info()["read_only_reason"] or "")
        assert read_bytes(eng, eng.open_export("live@s1", True), 0, BS) == b"q" * BS
        with pytest.raises(DamagedPool, match=f"metadata block {addr}"):
            eng.write(eng.open_export("live", False), memoryview(b"w" * BS), 0)
        with pytest.raises(DamagedPool, match="check --repair"):
            eng.create_snapshot("s2")
        assert [s.name for s in eng.list_snapshots()] == ["s1"]
    finally:
        eng.close()


def test_misdirected_write_of_a_valid_block_is_detected(tmp_path: Path) -> None:
    path, leaf0, leaf1, _ = _pool_with_two_map_leaves(tmp_path)
    # a valid block-map leaf lands at the address of another block-map leaf
    write_raw(path, leaf1 * BS, read_raw(path, leaf0 * BS, BS))
    eng = Engine.open(str(path))
    ex = eng.open_export("live", True)
    cap = L.map_leaf_capacity(BS)
    with pytest.raises(CorruptMetadata) as ei:
        read_bytes(eng, ex, cap * BS, BS)
    assert ei.value.address == leaf1
    assert ei.value.block_type == "block-map leaf"
    assert f"claims address {leaf0}" in str(ei.value)
    eng.close()


def test_block_of_wrong_type_is_detected(tmp_path: Path) -> None:
    path, leaf0, leaf1, _ = _pool_with_two_map_leaves(tmp_path)
    # a perfectly sealed inode-table leaf, with the right address, where a map leaf should be
    buf = bytearray(BS)
    L.write_inode(buf, 0, full_inode(0))
    L.seal_block(buf, L.BT_INODE_LEAF, leaf1, 3, L.OWNER_INODE_TABLE, 0, 1, 0)
    write_raw(path, leaf1 * BS, bytes(buf))
    eng = Engine.open(str(path))
    ex = eng.open_export("live", True)
    cap = L.map_leaf_capacity(BS)
    with pytest.raises(CorruptMetadata) as ei:
        read_bytes(eng, ex, cap * BS, BS)
    assert ei.value.address == leaf1
    assert ei.value.block_type == "block-map leaf"
    assert "inode-table leaf" in str(ei.value)
    eng.close()


def _newest_slot(path: Path) -> tuple[int, int]:
    """(offset of the first slot of the highest generation, that generation)."""
    sbs = raw_superblocks(path)
    gen = max(s.generation for s in sbs)
    return L.SUPERBLOCK_OFFSETS[L.superblock_slots(gen)[0]], gen


def _other_generation_slot(off: int) -> int:
    """The offset of a slot of the generation before the one at off (the other parity)."""
    return L.SUPERBLOCK_OFFSETS[1 - L.SUPERBLOCK_OFFSETS.index(off) % 2]


def test_every_generation_is_in_two_slots_in_different_pages(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    gen = eng.pool.sb.generation
    eng.close()
    sbs = raw_superblocks(path)
    newest = max(s.generation for s in sbs)
    assert newest >= gen
    for slot, s in enumerate(sbs):
        assert slot in L.superblock_slots(s.generation)
        assert s.generation == newest - (0 if slot % 2 == newest % 2 else 1)
    first, second = L.superblock_slots(newest)
    assert L.SUPERBLOCK_OFFSETS[first] // 4096 != L.SUPERBLOCK_OFFSETS[second] // 4096
    # the ring remembers the generations before the newest, newest first
    ring = L.unpack_ring(sbs[first])
    assert [e.generation for e in ring] == list(range(newest - 1, max(0, newest - 9), -1))


def test_unknown_version_on_disk_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    make_engine(path).close()
    off, _ = _newest_slot(path)
    sb = L.unpack_superblock(read_raw(path, off, L.SUPERBLOCK_SIZE), "x")
    sb.version = 99
    write_raw(path, off, L.pack_superblock(sb))
    with pytest.raises(UnsupportedFormat):
        Engine.open(str(path))
    # even when the newer-format slot is the OLDER generation: never fall back past it
    other = _other_generation_slot(off)
    sb = L.unpack_superblock(read_raw(path, other, L.SUPERBLOCK_SIZE), "x")
    write_raw(path, off, L.pack_superblock(sb))  # both slots version 1 again, same state
    sb.generation -= 1
    sb.features |= 1 << 7
    write_raw(path, other, L.pack_superblock(sb))
    with pytest.raises(UnsupportedFormat) as ei:
        Engine.open(str(path))
    assert "0x80" in str(ei.value)


def test_unknown_feature_bits_on_disk_refuse_to_open(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    make_engine(path).close()
    off, _ = _newest_slot(path)
    sb = L.unpack_superblock(read_raw(path, off, L.SUPERBLOCK_SIZE), "x")
    sb.features = 1 << 20
    write_raw(path, off, L.pack_superblock(sb))
    with pytest.raises(UnsupportedFormat):
        Engine.open(str(path))


@pytest.mark.engine_log(SLOT_UNUSABLE)
def test_a_damaged_copy_of_the_newest_superblock_is_served_by_the_other(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    ex = eng.open_export("live", False)
    data = os.urandom(3 * BS)
    eng.write(ex, memoryview(data), 5 * BS)
    eng.flush()
    eng.close()  # releases the in-use record: a superblock-only commit, gen N+1
    off, gen = _newest_slot(path)
    for slot in L.superblock_slots(gen):  # either copy
        image = tmp_path / f"copy{slot}.img"
        image.write_bytes(path.read_bytes())
        flip_byte(image, L.SUPERBLOCK_OFFSETS[slot] + 300)
        eng = Engine.open(str(image), claim=False)
        assert eng.pool.sb.generation == gen
        assert eng.pool.superblock_problems and eng.pool.superblock_problems[0][0] == slot
        ex = eng.open_export("live", True)
        assert read_bytes(eng, ex, 5 * BS, 3 * BS) == data
        eng.close()


def test_both_copies_of_the_newest_superblock_damaged_is_refused(tmp_path: Path) -> None:
    """Not a silent fall back to the generation before: that would drop acknowledged writes.
    The refusal names the newest usable generation and the rewind command; nothing is written."""
    path = tmp_path / "pool.img"
    make_engine(path).close()
    off, gen = _newest_slot(path)
    for slot in L.superblock_slots(gen):
        flip_byte(path, L.SUPERBLOCK_OFFSETS[slot] + 300)
    before = path.read_bytes()
    with pytest.raises(CorruptMetadata) as ei:
        Engine.open(str(path))
    msg = str(ei.value)
    assert f"generation {gen - 1}, the newest one left" in msg, msg
    assert "rewind --list" in msg and f"rewind {gen - 1} --yes" in msg, msg
    assert path.read_bytes() == before


@pytest.mark.engine_log(COMMIT_FAILED, SLOT_UNUSABLE)
def test_torn_superblock_write_opens_at_previous_generation(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    make_engine(path, size=8 << 20).close()
    dev = FaultyDevice(str(path))
    dev.lock()
    eng = Engine(dev, Pool.open(dev), "move", DEFAULT_CACHE_BYTES)
    ex = eng.open_export("live", False)
    a = os.urandom(2 * BS)
    eng.write(ex, memoryview(a), 0)
    eng.flush()
    gen_a = eng.pool.sb.generation
    used_a = eng.pool.allocator.used_blocks

    # transaction N+1: new data in a hole, a trim, more data; its superblock write is torn
    b = os.urandom(4 * BS)
    eng.write(ex, memoryview(b), 40 * BS)
    eng.trim(ex, BS, BS)
    # only its first 24 bytes (the new checksum, magic, version, features and half the
    # generation) reach the disk; the rest of the slot still holds the superblock two
    # generations back; then the power goes
    dev.fail("write", where=SUPERBLOCK_WRITE, torn=24, error=PowerCut)
    with pytest.raises(PowerCut):
        eng.flush()
    assert dev.failures == 1
    # the engine fell back to what is durable
    assert eng.pool.sb.generation == gen_a
    # the connection that wrote the lost changes is told so on every request...
    with pytest.raises(ExportGone):
        read_bytes(eng, ex, 0, 2 * BS)
    with pytest.raises(ExportGone):
        eng.flush(ex)
    # ...and a new one sees the durable state
    ex = eng.open_export("live", False)
    assert read_bytes(eng, ex, 0, 2 * BS) == a
    assert read_bytes(eng, ex, 40 * BS, 4 * BS) == bytes(4 * BS)
    dev.close()

    # the torn slot fails its checksum, its twin still holds generation N - 1 (the write never
    # reached it), and generation N's two copies win
    raw = [read_raw(path, o, L.SUPERBLOCK_SIZE) for o in L.SUPERBLOCK_OFFSETS]
    torn_slot, twin = L.superblock_slots(gen_a + 1)
    with pytest.raises(CorruptMetadata):
        L.unpack_superblock(raw[torn_slot], "torn")
    assert L.unpack_superblock(raw[twin], "old").generation == gen_a - 1
    for slot in L.superblock_slots(gen_a):
        assert L.unpack_superblock(raw[slot], "ok").generation == gen_a
    eng = Engine.open(str(path), claim=False)
    assert eng.pool.sb.generation == gen_a
    assert eng.pool.allocator.used_blocks == used_a
    ex = eng.open_export("live", False)
    assert read_bytes(eng, ex, 0, 2 * BS) == a
    assert read_bytes(eng, ex, 40 * BS, 4 * BS) == bytes(4 * BS)
    # and it goes on working from there: the next commit overwrites the torn slot
    eng.write(ex, memoryview(b), 40 * BS)
    eng.flush()
    assert eng.pool.sb.generation == gen_a + 1
    eng.close()
    eng = Engine.open(str(path), claim=False)
    ex = eng.open_export("live", True)
    assert read_bytes(eng, ex, 40 * BS, 4 * BS) == b
    assert read_bytes(eng, ex, 0, 2 * BS) == a
    eng.close()


def test_both_superblocks_corrupt_is_an_error_not_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    make_engine(path).close()
    for off in L.SUPERBLOCK_OFFSETS:
        flip_byte(path, off + 300)
    with pytest.raises(CorruptMetadata) as ei:
        Engine.open(str(path))
    assert ei.value.block_type == "superblock"
    assert ei.value.address == 0


@pytest.mark.engine_log(SLOT_UNUSABLE)
def test_older_slot_corrupt_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    eng = make_engine(path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(b"k" * BS), 0)
    eng.close()
    off, gen = _newest_slot(path)
    other = _other_generation_slot(off)
    flip_byte(path, other + 1000)
    eng = Engine.open(str(path), claim=False)
    assert eng.pool.sb.generation == gen
    assert read_bytes(eng, eng.open_export("live", True), 0, BS) == b"k" * BS
    eng.close()


def test_not_a_pool_and_truncated_pool(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    with pytest.raises(NotAPool):
        Engine.open(str(zeros))
    path = tmp_path / "pool.img"
    make_engine(path).close()
    size = path.stat().st_size
    os.truncate(path, size - BS)
    with pytest.raises(PoolTruncated):
        Engine.open(str(path))

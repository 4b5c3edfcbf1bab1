"""Upgrading a pool of an older format version in place: `snapctl upgrade DISK`.

Version 1 differs from version 2 only in its metadata trees' interior nodes (bare 8-byte
addresses there, block pointers with the child's generation and checksum here) and in fields
version 2 added where version 1 kept zeros. Leaves are the same: same header size, same
records. So an upgrade reads every tree of the old pool leaf by leaf, writes each leaf's records
into a new tree of the current version (every node at a fresh address: copy-on-write), except
the snapshots' shadow maps, whose entries move into their volume's shadow index (version 2
keeps no tree per snapshot); then it frees the old nodes and commits, which writes the new
superblock. Data blocks are not touched (a pool
with data checksums has them read once, to move their checksums from the map entries to the
per-4 KiB checksum tree). Until that superblock is durable the old pool is intact; a crash
leaves one or the other, whole.
"""

from __future__ import annotations

import dataclasses
import zlib

from .blockmap import BlockMap, inode_root
from .device import Device
from .errors import NotFound, Refused
from .layout import (
    BT_BITMAP,
    BT_MAP_LEAF,
    ENTRY_SIZE,
    FORMAT_VERSION,
    HEADER_SIZE,
    KIND_ADDR,
    OWNER_BITMAP,
    map_leaf_capacity,
    nonzero_records,
    pack_ring,
    read_entry,
)
from .opening import lock
from .radix import MetaStore, RadixTree
from .shadow_index import ShadowIndex, ShadowMap
from .txn import Pool, read_superblock, refuse_if_in_use, write_superblock

UPGRADE_CACHE_BYTES = 16 << 20


def upgrade_disk(path: str) -> dict[str, object]:
    """Upgrade the pool on path to FORMAT_VERSION (no server may be running)."""
    try:
        device = Device(path)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    try:
        lock(device)
        old = read_superblock(device)
        refuse_if_in_use(old, path, "stop it first: 'snapctl upgrade' needs the disk alone")
        if old.version == FORMAT_VERSION:
            raise Refused(f"{path} already holds a version {FORMAT_VERSION} pool: nothing to do")
        pool = Pool.open(device, UPGRADE_CACHE_BYTES, upgrading=True)
        moved = _rewrite_trees(pool)
        damaged = _data_sums_from_v1(pool) if pool.ctx.checksums else []
        pool.sb.version = FORMAT_VERSION
        pool.sb_dirty = True
        # version 1 slots are 4 KiB, one per page, generation % 2: keep the newest one whole
        # until a version 2 copy is durable in the other page
        pool.superblock_last_page = old.generation % 2
        pool.commit()
        # the other slots get the same state one generation lower, as format does, so no
        # superblock of the old version is left to fall back to
        twin = dataclasses.replace(pool.sb, generation=pool.sb.generation - 1, ring=pack_ring([]))
        write_superblock(device, twin)
        device.sync()
        return {
            "disk": path,
            "from_version": old.version,
            "to_version": FORMAT_VERSION,
            "metadata_blocks_rewritten": moved,
            "damaged_data_blocks": damaged,
            "generation": pool.sb.generation,
        }
    finally:
        device.close()


def _rewrite_trees(pool: Pool) -> int:
    """Every tree of pool, re-written by a store of the current version. Returns the number of
    old metadata blocks freed."""
    old_store = pool.store
    store = MetaStore(pool.device, pool.block_size, UPGRADE_CACHE_BYTES, FORMAT_VERSION)
    store.generation = old_store.generation
    store.allocate_address = old_store.allocate_address
    store.free_address = old_store.free_address
    maps = [vol.live for vol in pool.volumes.values()]
    old_nodes: list[int] = []

    def rewritten(tree: RadixTree) -> RadixTree:
        new = RadixTree(store, tree.owner, tree.leaf_type, tree.leaf_capacity)
        for leaf_no, node in tree.iter_leaves():
            leaf = new.leaf_for_write(leaf_no)
            leaf.buf[HEADER_SIZE:] = node.buf[HEADER_SIZE:]
            leaf.count = node.count
        old_nodes.extend(a for a, _ in tree.all_node_addresses())
        return new

    _shadows_into_index(pool, old_store, store, old_nodes)
    pool.inodes.tree = rewritten(pool.inodes.tree)
    pool.snaptab.tree = rewritten(pool.snaptab.tree)
    for m in maps:
        m.tree = rewritten(m.tree)
        inode = m.inode  # its root is the new tree's, set when the map commits
        inode.root = inode.root1 = inode.root_gen = inode.root_csum = inode.height = 0
        pool.dirty_maps.add(m)
        pool.touch_inode(inode)  # every inode record is rewritten: map roots are pointers now
    alloc = pool.allocator
    old_nodes.extend(a for a, _ in alloc.tree.all_node_addresses())
    alloc.store = store
    alloc.tree = RadixTree(store, OWNER_BITMAP, BT_BITMAP, alloc.bits_per_leaf)
    leaves = (alloc.capacity + alloc.bits_per_leaf - 1) // alloc.bits_per_leaf
    alloc.dirty_leaves.update(range(leaves))
    pool.store = store
    for addr in old_nodes:
        alloc.free(addr)  # allocatable once the upgrade commit is durable
    return len(old_nodes)


def _shadows_into_index(
    pool: Pool, old_store: MetaStore, store: MetaStore, old_nodes: list[int]
) -> None:
    """Version 1 kept each snapshot's shadow entries in a radix tree of its own; version 2 keeps
    all of a volume's in its shadow index (shadow_index.py), which the open made empty."""
    cap = map_leaf_capacity(pool.block_size)
    for vol in pool.volumes.values():
        if vol.shadow_index is None:
            continue
        index = ShadowIndex(store, *vol.shadow_index.inodes, pool.dirty_maps)
        vol.shadow_index = index
        for sid, shadow in vol.shadows.items():
            shadow.index = index
            rec = shadow.inode  # its counters stay: the same entries, moved
            tree = RadixTree(old_store, rec.ino, BT_MAP_LEAF, cap, inode_root(rec), rec.height)
            for leaf_no, node in tree.iter_leaves():
                for i in nonzero_records(node.buf, ENTRY_SIZE):
                    index.put(sid, leaf_no * cap + i, read_entry(node.buf, i))
            old_nodes.extend(a for a, _ in tree.all_node_addresses())
            rec.root = rec.root1 = rec.root_gen = rec.root_csum = rec.height = 0
            pool.touch_inode(rec)


def _data_sums_from_v1(pool: Pool) -> list[int]:
    """Version 1 kept one CRC-32 per data block in its map entry; version 2 keeps one per 4 KiB
    unit, by physical block (datasums.py). Each block is read and verified against its old CRC
    and its units' checksums written. A block that fails keeps failing: its units get checksums
    that cannot match, so reads of it are errors as they were, never unverified data. Returns
    those blocks."""
    sums = pool.create_data_sums()
    bs = pool.block_size
    damaged: list[int] = []
    for vol in pool.volumes.values():
        maps: list[BlockMap | ShadowMap] = [vol.live, *vol.shadows.values()]
        for m in maps:
            blocks = -(-m.inode.size // bs)
            for b, e in list(m.entries_in(0, blocks)):
                if e.kind != KIND_ADDR:
                    continue
                data = pool.device.pread(bs, e.addr * bs)
                sums.set(e.addr, 0, data)
                if zlib.crc32(data) != e.csum:
                    damaged.append(e.addr)
                    sums.poison(e.addr)
                m.set(b, e._replace(csum=0))  # version 2 keeps the tail zero
    return damaged

"""The shadow index: every shadow entry of one volume's snapshots, and each snapshot's view of it.

A volume's snapshots keep their shadow entries (FIG. 4's shadow inodes' contents) in two keyed
trees (keyed.py), each the map of an inode of the volume's:

* the index (inode kind 5), keyed by (block, snapshot id), holding the map entry. Reading block
  b of snapshot S is one descent to the first key at or after (b, S): if it names block b, its
  snapshot is the oldest at least as new as S that has an entry there, which is FIG. 10's
  answer, else live serves b. Its cost does not depend on the number of snapshots.
* the list (inode kind 6), keyed by (snapshot id, block), without values: one snapshot's own
  entries in block order, for what walks them (delete, rollback, diff, send, flatten).

Both change together, entry by entry, in the same transaction. A `ShadowMap` is one snapshot's
view of them with a block map's interface (blockmap.py), and keeps the snapshot's shadow inode
counters exact, so space accounting stays O(1) to read.
"""

from __future__ import annotations

from collections.abc import Iterator

from .blockmap import InodeTree, commit_inode_tree, inode_root
from .keyed import KeyedTree
from .layout import (
    EMPTY_ENTRY,
    ENTRY_SIZE,
    KIND_ADDR,
    Entry,
    InodeRecord,
    entry_bytes,
    entry_from_bytes,
    pack_key,
    unpack_key,
)
from .radix import MetaStore

_LAST_BLOCK = (1 << 64) - 1


class IndexTree:
    """A keyed tree that is an inode's map (what a commit writes when it changed)."""

    def __init__(self, store: MetaStore, inode: InodeRecord, value_size: int) -> None:
        self.inode = inode
        self.tree = KeyedTree(store, inode.ino, value_size, inode_root(inode), inode.height)

    def commit(self) -> None:
        commit_inode_tree(self.tree, self.inode)


class ShadowIndex:
    """The two trees of one volume's shadow entries."""

    def __init__(
        self,
        store: MetaStore,
        index: InodeRecord,
        listing: InodeRecord,
        dirty: set[InodeTree],
    ) -> None:
        self.by_block = IndexTree(store, index, ENTRY_SIZE)
        self.by_snap = IndexTree(store, listing, 0)
        self.dirty = dirty
        self.version = 0  # bumped on every change: keys caches derived from the entries

    @property
    def inodes(self) -> tuple[InodeRecord, InodeRecord]:
        return self.by_block.inode, self.by_snap.inode

    @property
    def height(self) -> int:
        """The taller tree's interior levels (what a change may dirty, with its leaf)."""
        return max(self.by_block.tree.height, self.by_snap.tree.height)

    def room(self, count: int) -> int:
        """Metadata nodes a change of count consecutive blocks' entries may dirty, in both
        trees: the leaves such a key range spans (each at least a quarter full), a split each,
        and the path above them."""
        leaves = 1 + count // max(1, self.by_block.tree.leaf_capacity // 4)
        return 2 * (2 * leaves + self.height + 1)

    def serving(self, snap_id: int, block: int) -> tuple[int, Entry] | None:
        """The snapshot whose entry serves block when snap_id is read, with that entry (None:
        no snapshot at least as new as snap_id has one, so live does)."""
        found = self.by_block.tree.ceiling(pack_key(block, snap_id))
        if found is None:
            return None
        b, sid = unpack_key(found[0])
        if b != block:
            return None
        return sid, entry_from_bytes(found[1])

    def get(self, snap_id: int, block: int) -> Entry:
        raw = self.by_block.tree.get(pack_key(block, snap_id))
        return EMPTY_ENTRY if raw is None else entry_from_bytes(raw)

    def put(self, snap_id: int, block: int, e: Entry) -> Entry:
        """Store snap_id's entry for block (EMPTY_ENTRY removes it); returns the old one."""
        key = pack_key(block, snap_id)
        listed = pack_key(snap_id, block)
        if e == EMPTY_ENTRY:
            raw = self.by_block.tree.delete(key)
            if raw is None:
                return EMPTY_ENTRY
            self.by_snap.tree.delete(listed)
        else:
            raw = self.by_block.tree.put(key, entry_bytes(e))
            if raw is None:
                self.by_snap.tree.put(listed, b"")
        self.dirty.add(self.by_block)
        self.dirty.add(self.by_snap)
        self.version += 1
        return EMPTY_ENTRY if raw is None else entry_from_bytes(raw)

    def blocks(self, snap_id: int, first: int = 0, end: int = _LAST_BLOCK) -> Iterator[int]:
        """Blocks in [first, end) where snap_id has an entry, in order. Don't change the
        trees meanwhile."""
        for key, _ in self.by_snap.tree.items(pack_key(snap_id, first), pack_key(snap_id, end)):
            yield unpack_key(key)[1]

    def entries(
        self, snap_id: int, first: int = 0, end: int = _LAST_BLOCK
    ) -> Iterator[tuple[int, Entry]]:
        """(block, entry) of snap_id's entries in [first, end), in block order."""
        for b in self.blocks(snap_id, first, end):
            yield b, self.get(snap_id, b)

    def all_entries(self) -> Iterator[tuple[int, int, Entry]]:
        """(block, snapshot id, entry) of every entry, by block then snapshot."""
        for key, raw in self.by_block.tree.items():
            b, sid = unpack_key(key)
            yield b, sid, entry_from_bytes(raw)

    def is_listed(self, snap_id: int, block: int) -> bool:
        return self.by_snap.tree.get(pack_key(snap_id, block)) is not None

    def all_listed(self) -> Iterator[tuple[int, int]]:
        """(snapshot id, block) of every entry the list holds."""
        for key, _ in self.by_snap.tree.items():
            yield unpack_key(key)

    def free_all(self) -> None:
        """Free both trees' nodes (every entry already disposed of)."""
        for t in (self.by_block, self.by_snap):
            t.tree.free_all()
            t.inode.root = t.inode.root1 = t.inode.root_gen = t.inode.root_csum = 0
            t.inode.height = 0
            self.dirty.discard(t)


class ShadowMap:
    """One snapshot's shadow entries on one volume: a block map's reading and writing
    interface over the volume's shadow index, with the snapshot's shadow inode counters."""

    def __init__(self, index: ShadowIndex, inode: InodeRecord, dirty: set[InodeTree]) -> None:
        self.index = index
        self.inode = inode  # the shadow inode: size, counters; no tree of its own
        self.dirty_maps = dirty
        self.version = 0  # bumped on every change: keys caches derived from the entries

    @property
    def snap_id(self) -> int:
        return self.inode.snap_id

    def get(self, block: int) -> Entry:
        return self.index.get(self.inode.snap_id, block)

    def set(self, block: int, e: Entry) -> Entry:
        """Store e for block; returns the entry it replaced. Keeps the inode's counters."""
        old = self.index.put(self.inode.snap_id, block, e)
        self.dirty_maps.add(self)
        self.version += 1
        inode = self.inode
        inode.entry_count += (e != EMPTY_ENTRY) - (old != EMPTY_ENTRY)
        inode.owned_blocks += (e.kind == KIND_ADDR) - (old.kind == KIND_ADDR)
        inode.incomplete_blocks += e.incomplete - old.incomplete
        return old

    def clear(self, block: int) -> Entry:
        return self.set(block, EMPTY_ENTRY)

    def entries_in(self, first: int, count: int) -> Iterator[tuple[int, Entry]]:
        """Non-empty entries with block numbers in [first, first + count), in order."""
        return self.index.entries(self.inode.snap_id, first, first + count)

    def iter_entries(self, start: int = 0) -> Iterator[tuple[int, Entry]]:
        """Every non-empty entry from block `start` on. Don't change the map meanwhile."""
        return self.index.entries(self.inode.snap_id, start)

    def is_empty(self) -> bool:
        """Whether the snapshot holds no entry, from the list itself (not the counter: what
        empties a snapshot before its records go must leave nothing behind in the index)."""
        return next(self.index.blocks(self.inode.snap_id), None) is None

    def commit(self) -> None:
        """Nothing of its own to write: its entries are the index's, its counters the shadow
        inode's (which the transaction writes for every map it committed)."""

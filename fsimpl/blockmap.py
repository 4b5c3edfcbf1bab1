"""Block maps: a volume's live map, as entries in a radix tree (and a snapshot's shadow map in a
version 1 pool being upgraded; version 2 keeps those in the shadow index, shadow_index.py).

A map translates a logical block number to an `Entry` (layout.py). Absent leaves read as
`EMPTY_ENTRY`: unallocated in a live map, DITTO in a shadow map. The map keeps its inode's
counters (entries in use, data blocks owned) exact as entries change, so space accounting is
O(1) to read. Each leaf carries a cached bitmask of its non-empty slots, so scanning a range
for entries (snapshot reads, diff) skips empty stretches without decoding them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .layout import (
    BT_MAP_LEAF,
    EMPTY_ENTRY,
    ENTRY_SIZE,
    KIND_ADDR,
    BlockPointer,
    Entry,
    InodeRecord,
    map_leaf_capacity,
    nonzero_records,
    read_entries,
    read_entry,
    write_entry,
)
from .radix import MetaStore, Node, RadixTree


class InodeTree(Protocol):
    """A tree an inode points at (a block map, the data checksums, the in-place list): what a
    commit writes for each one the transaction changed."""

    inode: InodeRecord

    def commit(self) -> None: ...


class BlockMap:
    def __init__(self, store: MetaStore, inode: InodeRecord, dirty: set[InodeTree]) -> None:
        self.inode = inode
        self.dirty_maps = dirty  # the transaction's set of maps to write at commit
        self.version = 0  # bumped on every change: keys caches derived from the entries
        self.capacity = map_leaf_capacity(store.block_size)
        self.tree = RadixTree(
            store, inode.ino, BT_MAP_LEAF, self.capacity, inode_root(inode), inode.height
        )

    # --- reading ------------------------------------------------------------------------------

    def get(self, block: int) -> Entry:
        leaf_no, index = divmod(block, self.capacity)
        node = self.tree.leaf(leaf_no)
        if node is None:
            return EMPTY_ENTRY
        return read_entry(node.buf, index)

    def get_range(self, first: int, count: int) -> list[Entry]:
        """The entries of blocks [first, first + count), leaf by leaf."""
        cap = self.capacity
        out: list[Entry] = []
        block, end = first, first + count
        while block < end:
            leaf_no, index = divmod(block, cap)
            n = min(cap - index, end - block)
            node = self.tree.leaf(leaf_no)
            if node is None:
                out.extend([EMPTY_ENTRY] * n)
            else:
                out.extend(read_entries(node.buf, index, index + n))
            block += n
        return out

    def leaf_mask(self, node: Node) -> int:
        """Bitmask of the leaf's non-empty slots (bit i = slot i), computed once per load."""
        mask = node.mask
        if mask is None:
            mask = 0
            if node.count:
                for i in nonzero_records(node.buf, ENTRY_SIZE):
                    mask |= 1 << i
            node.mask = mask
        return mask

    def entries_in(self, first: int, count: int) -> Iterator[tuple[int, Entry]]:
        """Non-empty entries with block numbers in [first, first + count), in order."""
        cap = self.capacity
        end = first + count
        leaf_no = first // cap
        while leaf_no * cap < end:
            node = self.tree.leaf(leaf_no)
            if node is not None and node.count:
                base = leaf_no * cap
                lo = max(first - base, 0)
                hi = min(end - base, cap)
                window = self.leaf_mask(node) & (((1 << (hi - lo)) - 1) << lo)
                for i in set_bits(window):
                    yield base + i, read_entry(node.buf, i)
            leaf_no += 1

    def iter_entries(self, start: int = 0) -> Iterator[tuple[int, Entry]]:
        """Every non-empty entry from block `start` on. Don't mutate the map meanwhile."""
        cap = self.capacity
        for leaf_no, node in self.tree.iter_leaves(start // cap):
            if not node.count:
                continue
            base = leaf_no * cap
            mask = self.leaf_mask(node)
            if base < start:
                mask &= ~((1 << (start - base)) - 1)
            for i in set_bits(mask):
                yield base + i, read_entry(node.buf, i)

    def leaf_numbers(self, start_leaf: int = 0) -> Iterator[int]:
        for leaf_no, _ in self.tree.iter_leaves(start_leaf):
            yield leaf_no

    # --- writing ------------------------------------------------------------------------------

    def set(self, block: int, e: Entry) -> Entry:
        """Store e for block; returns the entry it replaced. Keeps the inode's counters."""
        leaf_no, index = divmod(block, self.capacity)
        node = self.tree.leaf_for_write(leaf_no)
        self.dirty_maps.add(self)
        self.version += 1
        old = read_entry(node.buf, index)
        write_entry(node.buf, index, e)
        was_empty = old == EMPTY_ENTRY
        now_empty = e == EMPTY_ENTRY
        inode = self.inode
        if was_empty != now_empty:
            delta = 1 if was_empty else -1
            node.count += delta
            inode.entry_count += delta
            if node.mask is not None:
                node.mask ^= 1 << index
        inode.owned_blocks += (e.kind == KIND_ADDR) - (old.kind == KIND_ADDR)
        inode.incomplete_blocks += e.incomplete - old.incomplete
        return old

    def clear(self, block: int) -> Entry:
        return self.set(block, EMPTY_ENTRY)

    def detach_leaf(self, leaf_no: int) -> Node | None:
        node = self.tree.detach_leaf(leaf_no)
        self.dirty_maps.add(self)
        self.version += 1
        if node is not None:
            self._account_leaf(node, -1)
        return node

    def attach_leaf(self, leaf_no: int, node: Node) -> None:
        self.tree.attach_leaf(leaf_no, node)
        self.dirty_maps.add(self)
        self.version += 1
        self._account_leaf(node, +1)

    def _account_leaf(self, node: Node, sign: int) -> None:
        entries = [read_entry(node.buf, i) for i in set_bits(self.leaf_mask(node))]
        self.inode.entry_count += sign * node.count
        self.inode.owned_blocks += sign * sum(e.kind == KIND_ADDR for e in entries)
        self.inode.incomplete_blocks += sign * sum(e.incomplete for e in entries)

    def is_empty(self) -> bool:
        return self.inode.entry_count == 0

    def commit(self) -> None:
        commit_inode_tree(self.tree, self.inode)

    @property
    def dirty(self) -> bool:
        return self.tree.is_dirty


def inode_root(inode: InodeRecord) -> BlockPointer:
    """The pointer to the root of an inode's tree (a block map, or the data checksums)."""
    return BlockPointer(inode.root, inode.root1, inode.root_gen, inode.root_csum)


class RootedTree(Protocol):
    """A tree of metadata blocks that an inode points at (radix or keyed)."""

    root: BlockPointer
    height: int

    def commit(self) -> None: ...


def commit_inode_tree(tree: RootedTree, inode: InodeRecord) -> None:
    """Write an inode's dirty tree; its record then points at the new root."""
    tree.commit()
    inode.root, inode.root1, inode.root_gen, inode.root_csum = tree.root
    inode.height = tree.height


def set_bits(mask: int) -> Iterator[int]:
    """Indices of the set bits of mask, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low

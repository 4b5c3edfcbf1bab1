"""Record tables: the inode table and the snapshot table, fixed-size records keyed by number.

Both are radix trees (radix.py) whose leaves hold records; a record slot of zeros is free. The
tables are small (one record per volume, per snapshot and per snapshot-of-a-volume), so the
engine reads them whole at open and writes back only the records it changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import CorruptMetadata
from .layout import (
    BT_INODE_LEAF,
    BT_SNAP_LEAF,
    INODE_RECORD_SIZE,
    NO_POINTER,
    OWNER_INODE_TABLE,
    OWNER_SNAP_TABLE,
    SNAP_RECORD_SIZE,
    BlockPointer,
    InodeRecord,
    SnapshotRecord,
    read_inode,
    read_snapshot,
    record_capacity,
    write_inode,
    write_snapshot,
)
from .radix import MetaStore, RadixTree

R = TypeVar("R")


class RecordTable(Generic[R]):
    def __init__(
        self,
        store: MetaStore,
        owner: int,
        leaf_type: int,
        record_size: int,
        reader: Callable[[bytearray, int], R | None],
        writer: Callable[[bytearray, int, R | None], None],
        root: BlockPointer = NO_POINTER,
        height: int = 0,
    ) -> None:
        self.capacity = record_capacity(store.block_size, record_size)
        self.tree = RadixTree(store, owner, leaf_type, self.capacity, root, height)
        self._read = reader
        self._write = writer

    def get(self, key: int) -> R | None:
        leaf_no, index = divmod(key, self.capacity)
        node = self.tree.leaf(leaf_no)
        return None if node is None else self._read(node.buf, index)

    def put(self, key: int, record: R | None) -> None:
        leaf_no, index = divmod(key, self.capacity)
        node = self.tree.leaf_for_write(leaf_no)
        was = self._read(node.buf, index) is not None
        self._write(node.buf, index, record)
        node.count += (record is not None) - was

    def delete(self, key: int) -> None:
        self.put(key, None)

    def items(
        self, skip: Callable[[CorruptMetadata], None] | None = None
    ) -> Iterator[tuple[int, R]]:
        """Every record in key order; with skip, the records of unreadable leaves are left out
        (see RadixTree.iter_leaves)."""
        for leaf_no, node in self.tree.iter_leaves(skip=skip):
            base = leaf_no * self.capacity
            for i in range(self.capacity):
                rec = self._read(node.buf, i)
                if rec is not None:
                    yield base + i, rec

    def commit(self) -> None:
        self.tree.commit()

    @property
    def root(self) -> BlockPointer:
        return self.tree.root

    @property
    def height(self) -> int:
        return self.tree.height


def inode_table(
    store: MetaStore, root: BlockPointer = NO_POINTER, height: int = 0
) -> RecordTable[InodeRecord]:
    return RecordTable(
        store,
        OWNER_INODE_TABLE,
        BT_INODE_LEAF,
        INODE_RECORD_SIZE,
        read_inode,
        write_inode,
        root,
        height,
    )


def snapshot_table(
    store: MetaStore, root: BlockPointer = NO_POINTER, height: int = 0
) -> RecordTable[SnapshotRecord]:
    return RecordTable(
        store,
        OWNER_SNAP_TABLE,
        BT_SNAP_LEAF,
        SNAP_RECORD_SIZE,
        read_snapshot,
        write_snapshot,
        root,
        height,
    )

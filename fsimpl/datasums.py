"""Data checksums: a CRC-32 of every 4 KiB unit of every data block, by physical block number.

A pool formatted with data checksums keeps them in one tree of data-checksum leaves, the map of
its checksum inode (layout: DATA CHECKSUMS). Keyed by where the bytes lie rather than by which
map points at them, a checksum never moves when an entry does (move-on-write, a delete handing
blocks to an older snapshot, a clone's flatten copying a block takes the copy's own), and a read
verifies only the units it touches: a 4 KiB read costs one 4 KiB CRC, not the block's.

Crash safety is the transaction's: a unit's checksum changes in the same commit as the entry
that makes the unit readable, and data is only written where no committed entry reads it (a new
block, or the free part of an incomplete one), so the committed checksums always describe what
the committed maps read.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from .blockmap import commit_inode_tree, inode_root
from .errors import CorruptData
from .layout import (
    BT_SUMS_LEAF,
    HEADER_SIZE,
    SUM_SIZE,
    SUM_UNIT,
    InodeRecord,
    sum_units,
    sums_leaf_capacity,
)
from .radix import MetaStore, RadixTree


class DataSums:
    def __init__(self, store: MetaStore, inode: InodeRecord, dirty: set[Any]) -> None:
        self.inode = inode
        self.dirty_maps = dirty  # the transaction's maps to write at commit (as BlockMap's)
        self.block_size = store.block_size
        self.units = sum_units(store.block_size)
        self.record = SUM_SIZE * self.units
        self.capacity = sums_leaf_capacity(store.block_size)
        self.tree = RadixTree(
            store, inode.ino, BT_SUMS_LEAF, self.capacity, inode_root(inode), inode.height
        )

    def _where(self, addr: int, unit: int) -> tuple[int, int]:
        leaf_no, index = divmod(addr, self.capacity)
        return leaf_no, HEADER_SIZE + index * self.record + unit * SUM_SIZE

    def set(self, addr: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Data written at byte offset (a unit boundary) of block addr, whole units of it."""
        assert offset % SUM_UNIT == 0 and len(data) % SUM_UNIT == 0, (offset, len(data))
        n = len(data) // SUM_UNIT
        leaf_no, at = self._where(addr, offset // SUM_UNIT)
        node = self.tree.leaf_for_write(leaf_no)
        view = memoryview(data)
        crcs = [zlib.crc32(view[i * SUM_UNIT : (i + 1) * SUM_UNIT]) for i in range(n)]
        struct.pack_into(f"<{n}I", node.buf, at, *crcs)
        node.count = 1  # a leaf is never emptied: a stale record is harmless
        self.dirty_maps.add(self)

    def poison(self, addr: int, offset: int = 0, length: int | None = None) -> None:
        """The units [offset, offset + length) of block addr (all by default) fail from now
        on: data known bad (an upgrade found it failing its old checksum, a copy took a
        damaged unit), so no read serves it unverified. Call after set() for those units."""
        length = self.block_size - offset if length is None else length
        leaf_no, at = self._where(addr, offset // SUM_UNIT)
        node = self.tree.leaf_for_write(leaf_no)
        for off in range(at, at + length // SUM_UNIT * SUM_SIZE, SUM_SIZE):
            node.buf[off : off + SUM_SIZE] = bytes(b ^ 0xFF for b in node.buf[off : off + SUM_SIZE])
        node.count = 1
        self.dirty_maps.add(self)

    def copy(self, src: int, dst: int) -> None:
        """Block dst now holds block src's bytes (a copy made without changing them)."""
        leaf_no, at = self._where(src, 0)
        node = self.tree.leaf(leaf_no)
        record = bytes(node.buf[at : at + self.record]) if node else bytes(self.record)
        leaf_no, at = self._where(dst, 0)
        out = self.tree.leaf_for_write(leaf_no)
        out.buf[at : at + self.record] = record
        out.count = 1
        self.dirty_maps.add(self)

    def verify(self, addr: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Raise CorruptData unless data (whole units at byte offset of block addr) matches
        its checksums."""
        n = len(data) // SUM_UNIT
        first = offset // SUM_UNIT
        leaf_no, at = self._where(addr, first)
        node = self.tree.leaf(leaf_no)
        stored = struct.unpack_from(f"<{n}I", node.buf, at) if node else (0,) * n
        view = memoryview(data)
        for i in range(n):
            got = zlib.crc32(view[i * SUM_UNIT : (i + 1) * SUM_UNIT])
            if got != stored[i]:
                unit = first + i
                raise CorruptData(
                    f"data block {addr} failed its checksum in bytes "
                    f"[{unit * SUM_UNIT}, {(unit + 1) * SUM_UNIT}) (stored {stored[i]:#010x}, "
                    f"read {got:#010x}); run 'snapctl scrub' to find every damaged block"
                )

    def commit(self) -> None:
        commit_inode_tree(self.tree, self.inode)

    @property
    def dirty(self) -> bool:
        return self.tree.is_dirty

"""Data checksums: a 32-bit checksum of every 4 KiB unit of every data block, by physical block.

The checksum is the low half of the unit's XXH3-64 (superblock feature FEATURE_SUMS_XXH3; the
python3-xxhash package, imported only by pools that keep data checksums): hashing is most of
what a verified read costs beyond an unverified one, and XXH3 runs about three times as fast as
zlib's CRC-32 here. Pools made before the feature keep CRC-32s and read as they were.

A pool formatted with data checksums keeps them in one tree of data-checksum leaves, the map of
its checksum inode (layout: DATA CHECKSUMS). Keyed by where the bytes lie rather than by which
map points at them, a checksum never moves when an entry does (move-on-write, a delete handing
blocks to an older snapshot, a clone's flatten copying a block takes the copy's own), and a read
verifies only the units it touches: a 4 KiB read costs one 4 KiB CRC, not the block's.

Crash safety is the transaction's: a unit's checksum changes in the same commit as the entry
that makes the unit readable, and data is only written where no committed entry reads it (a new
block, or the free part of an incomplete one), so the committed checksums always describe what
the committed maps read. The one exception is bounded and recorded: the blocks on the committed
in-place list (inplace.py) are overwritten in place, and an open takes their checksums from
their data.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

from .blockmap import InodeTree, commit_inode_tree, inode_root
from .errors import CorruptData, MissingDependency
from .layout import (
    BT_SUMS_LEAF,
    HEADER_SIZE,
    SUM_SIZE,
    SUM_UNIT,
    InodeRecord,
    pack_unit_sums,
    put_unit_sum,
    sum_units,
    sums_leaf_capacity,
    unit_sum_at,
    unpack_unit_sums,
)
from .radix import MetaStore, Node, RadixTree


class DataSums:
    def __init__(
        self, store: MetaStore, inode: InodeRecord, dirty: set[InodeTree], xxh3: bool = True
    ) -> None:
        self.inode = inode
        self.unit_sum = unit_sum_function(xxh3)
        self.many_sums = many_sums_function(xxh3)
        self.dirty_maps = dirty  # the transaction's maps to write at commit (as BlockMap's)
        # set(lagging=True) was called since the last commit: changed checksums of blocks on the
        # in-place list (inplace.py), which any commit writes but a FLUSH need not
        self.lagging = False
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

    def set(
        self, addr: int, offset: int, data: bytes | bytearray | memoryview, lagging: bool = False
    ) -> None:
        """Data written at byte offset (a unit boundary) of block addr, whole units of it.
        lagging: a block on the in-place list, whose checksums an open after a crash takes
        from its data, so they need not be committed before a FLUSH returns."""
        assert offset % SUM_UNIT == 0 and len(data) % SUM_UNIT == 0, (offset, len(data))
        if len(data) == SUM_UNIT:  # a 4 KiB write: one unit, stored without packing
            leaf_no, at = self._where(addr, offset // SUM_UNIT)
            node = self.tree.leaf_for_write(leaf_no)
            put_unit_sum(node.buf, at, self.unit_sum(data))
            self._changed(node, lagging)
            return
        self._store(addr, offset, _sums(data, self.unit_sum, self.many_sums), lagging)

    def set_units(
        self, addr: int, offset: int, units: list[memoryview], lagging: bool = False
    ) -> None:
        """set() for 4 KiB units that follow each other from byte offset of block addr on,
        into the next blocks (pieces of a run written at once), hashed and stored as one."""
        self._store(addr, offset, pack_unit_sums(self.many_sums(units), len(units)), lagging)

    def _store(self, addr: int, offset: int, packed: bytes, lagging: bool = False) -> None:
        """Packed checksums from unit offset // SUM_UNIT of block addr on (running on into
        the next blocks, and leaves, if longer)."""
        per_leaf = self.capacity * self.units
        unit = addr * self.units + offset // SUM_UNIT
        pos = 0
        while pos < len(packed):
            leaf_no, index = divmod(unit, per_leaf)
            take = min(len(packed) - pos, (per_leaf - index) * SUM_SIZE)
            node = self.tree.leaf_for_write(leaf_no)
            at = HEADER_SIZE + index * SUM_SIZE
            node.buf[at : at + take] = packed[pos : pos + take]
            self._changed(node, lagging)
            unit += take // SUM_SIZE
            pos += take

    def _changed(self, node: Node, lagging: bool) -> None:
        node.count = 1  # a leaf is never emptied: a stale record is harmless
        if lagging:
            self.lagging = True
        else:
            self.dirty_maps.add(self)

    def _stored(self, addr: int, offset: int, n: int) -> bytes:
        """The packed checksums of n units from byte offset of block addr on; offset may run
        past the block (and the units across leaves): a run of consecutive blocks."""
        if offset + n * SUM_UNIT <= self.block_size:  # the common case: one block
            leaf_no, at = self._where(addr, offset // SUM_UNIT)
            node = self.tree.leaf(leaf_no)
            return bytes(node.buf[at : at + n * SUM_SIZE]) if node else bytes(n * SUM_SIZE)
        per_leaf = self.capacity * self.units
        unit = addr * self.units + offset // SUM_UNIT
        out = bytearray()
        while n:
            leaf_no, index = divmod(unit, per_leaf)
            take = min(n, per_leaf - index)
            node = self.tree.leaf(leaf_no)
            at = HEADER_SIZE + index * SUM_SIZE
            out += node.buf[at : at + take * SUM_SIZE] if node else bytes(take * SUM_SIZE)
            unit += take
            n -= take
        return bytes(out)

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
        """Raise CorruptData unless data (whole units at byte offset of block addr, running on
        into the next blocks if it is longer) matches its checksums."""
        if len(data) == SUM_UNIT:  # a 4 KiB read: one unit, compared without packing
            leaf_no, at = self._where(addr, offset // SUM_UNIT)
            node = self.tree.leaf(leaf_no)
            if node is not None and self.unit_sum(data) == unit_sum_at(node.buf, at):
                return
        got = _sums(data, self.unit_sum, self.many_sums)
        stored = self._stored(addr, offset, len(got) // SUM_SIZE)
        if got != stored:
            raise _mismatches(self.units, addr, offset, stored, got)[0][1]

    def take(
        self, src: int, dst: int, offset: int, data: bytes | bytearray | memoryview
    ) -> list[tuple[int, CorruptData]]:
        """Data copied unchanged from block src to block dst, whole units at byte offset: dst
        gets the data's checksums, computed once. Returns the units (byte offset, error) that
        failed src's checksums (the caller marks them in dst: see poison)."""
        got = _sums(data, self.unit_sum, self.many_sums)
        self._store(dst, offset, got)
        stored = self._stored(src, offset, len(got) // SUM_SIZE)
        return [] if got == stored else _mismatches(self.units, src, offset, stored, got)

    def commit(self) -> None:
        commit_inode_tree(self.tree, self.inode)
        self.lagging = False

    @property
    def dirty(self) -> bool:
        return self.tree.is_dirty


UnitSum = Callable[[bytes | bytearray | memoryview], int]
ManySums = Callable[[list[memoryview]], Iterable[int]]
_LOW32 = (0xFFFFFFFF).__and__


def _xxh3_64() -> Callable[[bytes | bytearray | memoryview], int]:
    try:
        import xxhash  # a dependency only pools with data checksums need
    except ImportError:
        raise MissingDependency(
            "this pool keeps data checksums, which need the python3-xxhash package: install "
            "it ('apt-get install python3-xxhash', or run scripts/setup.sh)"
        ) from None
    return xxhash.xxh3_64_intdigest


def unit_sum_function(xxh3: bool) -> UnitSum:
    """The 32-bit checksum of one unit: XXH3-64's low half, or (older pools) CRC-32."""
    if not xxh3:
        return zlib.crc32
    xxh3_64 = _xxh3_64()
    return lambda unit: xxh3_64(unit) & 0xFFFFFFFF


def many_sums_function(xxh3: bool) -> ManySums:
    """unit_sum of each of many units, without a Python call per unit (a 1 MiB request has
    256: the calls would cost a third as much as the hashing)."""
    if not xxh3:
        return lambda units: map(zlib.crc32, units)
    xxh3_64 = _xxh3_64()
    return lambda units: map(_LOW32, map(xxh3_64, units))


def _sums(data: bytes | bytearray | memoryview, unit_sum: UnitSum, many: ManySums) -> bytes:
    """The packed checksums of whole units of data."""
    view = memoryview(data)
    n = len(view)
    if n == SUM_UNIT:  # a 4 KiB request: the common case
        return pack_unit_sums((unit_sum(view),), 1)
    units = [view[i : i + SUM_UNIT] for i in range(0, n, SUM_UNIT)]
    return pack_unit_sums(many(units), len(units))


def _mismatches(
    units: int, addr: int, offset: int, stored: bytes, got: bytes
) -> list[tuple[int, CorruptData]]:
    """Each unit whose checksum differs: its byte offset from block addr's start, and an error
    naming its block and bytes (a run of blocks: the units past the first block are the next
    blocks')."""
    errors = []
    pairs = zip(unpack_unit_sums(stored), unpack_unit_sums(got), strict=True)
    for i, (want, have) in enumerate(pairs):
        if want != have:
            block, unit = divmod(offset // SUM_UNIT + i, units)
            message = (
                f"data block {addr + block} failed its checksum in bytes "
                f"[{unit * SUM_UNIT}, {(unit + 1) * SUM_UNIT}) (stored {want:#010x}, "
                f"read {have:#010x}); run 'snapctl scrub' to find every damaged block"
            )
            errors.append((offset + i * SUM_UNIT, CorruptData(message)))
    return errors

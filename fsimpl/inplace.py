"""The in-place list: live's own data blocks that a pool with data checksums may overwrite in
place, kept in the committed state, and how an open squares their checksums with their data.

Without checksums, a block live owns outright is overwritten in place: a crash leaves old or new
bytes there, which NBD allows for writes not yet flushed. With checksums the same write puts new
bytes under the committed checksum until the next commit, and a crash in between would read as
corruption. So every commit records a bounded list of blocks (the ones the transaction wrote,
most recent first): the next transaction may overwrite exactly those in place, keeping their new
checksums in memory, and an open of that commit takes their checksums from what they hold before
it serves anything. A FLUSH then needs the data synced, not a commit; an overwrite costs its own
bytes, not a new block and the metadata to point at it. Blocks outside the list still move on
write (and join the list at the next commit).

The price, as in dm-integrity's bitmap mode: damage that strikes one of these blocks in the
window between the commit and the crash is taken as data. A clean close records an empty list,
so a clean restart retakes nothing; a snapshot empties it too (its blocks are shared from then).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .blockmap import InodeTree, commit_inode_tree, inode_root
from .datasums import DataSums
from .device import Device
from .errors import DittoError
from .layout import (
    BT_IN_PLACE_LEAF,
    InodeRecord,
    in_place_leaf_capacity,
    pack_block_numbers,
    unpack_block_numbers,
)
from .radix import MetaStore, RadixTree

log = logging.getLogger("dittofs")

# At most this many blocks, and this many bytes of them: what an open after a crash reads
IN_PLACE_BLOCKS = 16384
IN_PLACE_BYTES = 1 << 30
RETAKE_RUN = 1 << 20  # bytes read at a time when retaking checksums


def in_place_limit(block_size: int) -> int:
    return min(IN_PLACE_BLOCKS, IN_PLACE_BYTES // block_size)


class InPlaceList:
    """The in-place inode's map: the committed list, and the next commit's."""

    def __init__(self, store: MetaStore, inode: InodeRecord, dirty: set[InodeTree]) -> None:
        self.inode = inode
        self.dirty_maps = dirty  # the transaction's maps to write at commit (as BlockMap's)
        self.capacity = in_place_leaf_capacity(store.block_size)
        self.tree = RadixTree(
            store, inode.ino, BT_IN_PLACE_LEAF, self.capacity, inode_root(inode), inode.height
        )

    def load(self) -> list[int]:
        """The list as committed (CorruptMetadata if a leaf of it is unreadable)."""
        blocks: list[int] = []
        n = self.inode.size
        leaf_no = 0
        while len(blocks) < n:
            take = min(self.capacity, n - len(blocks))
            node = self.tree.leaf(leaf_no)
            blocks += unpack_block_numbers(node.buf, take) if node else [0] * take
            leaf_no += 1
        return [b for b in blocks if b]

    def record(self, blocks: list[int]) -> None:
        """blocks become the list the next commit writes (leaves past its end are stale)."""
        for i in range(0, len(blocks), self.capacity):
            chunk = blocks[i : i + self.capacity]
            node = self.tree.leaf_for_write(i // self.capacity)
            pack_block_numbers(node.buf, chunk)
            node.count = len(chunk)
        self.inode.size = len(blocks)
        self.dirty_maps.add(self)

    def commit(self) -> None:
        commit_inode_tree(self.tree, self.inode)

    @property
    def dirty(self) -> bool:
        return self.tree.is_dirty


def next_list(
    committed: list[int],
    fresh: Iterable[int],
    rewritten: Iterable[int],
    freed: Iterable[int],
    limit: int,
) -> list[int]:
    """The list a commit records: the blocks this transaction allocated, then the committed
    ones it overwrote, then the rest of the committed list, without the ones it freed, at
    most limit (the least recently written drop off)."""
    gone = set(freed)
    out: dict[int, None] = {}
    for source in (sorted(fresh), rewritten, committed):
        for b in source:
            if b not in gone:
                out.setdefault(b, None)
                if len(out) >= limit:
                    return list(out)
    return list(out)


def retake_sums(device: Device, sums: DataSums, blocks: Iterable[int], path: str) -> int:
    """Take the checksums of blocks from the bytes they hold, in memory (the next commit writes
    them): they may have been overwritten in place after the commit that listed them. A block
    that cannot be read keeps its checksum (a read of it fails the same way). Returns how many
    blocks were retaken."""
    bs = sums.block_size
    per_run = max(1, RETAKE_RUN // bs)
    done = 0
    for first, count in _runs(sorted(set(blocks)), per_run):
        try:
            data = memoryview(device.pread(count * bs, first * bs))
        except DittoError as e:
            log.warning(
                "%s: blocks %d-%d could not be read to retake their checksums: %s",
                path,
                first,
                first + count - 1,
                e,
            )
            continue
        for i in range(count):
            sums.set(first + i, 0, data[i * bs : (i + 1) * bs], lagging=True)
        done += count
    return done


def _runs(blocks: list[int], longest: int) -> list[tuple[int, int]]:
    """Sorted block numbers as (first, count) runs of consecutive blocks, each at most
    longest."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b and runs[-1][1] < longest:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs

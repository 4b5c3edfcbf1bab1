"""The allocator: which blocks of the pool are in use, for data and metadata alike.

The whole bitmap lives in memory (2 MiB for 1 TiB of 64 KiB blocks) as two arrays:
* `busy`   - what allocation must avoid: in use now, or freed by the open transaction;
* `state`  - what the next commit records: in use now.
A block freed in the open transaction is clear in `state` but stays set in `busy` until that
transaction commits, because the committed metadata may still point at it (ARCHITECTURE.md §3).
After the commit the freed blocks become allocatable and are handed back to the host (punched
out of an image file, discarded on a device).

On disk the bitmap is a radix tree of bitmap blocks. Writing it allocates blocks, which changes
the bitmap: `commit()` first reserves exactly the blocks the tree needs (repeating until no new
bitmap block turns dirty), then serialises `state` and writes the tree into the reserved blocks.

A growable pool (an image file) extends its capacity instead of failing when it runs out.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable

from .errors import CorruptMetadata, NoSpace
from .layout import (
    BT_BITMAP,
    DEFER_GENERATIONS,
    HEADER_SIZE,
    OWNER_BITMAP,
    BlockPointer,
    bitmap_bits_per_block,
    first_data_block,
)
from .radix import MetaStore, RadixTree

COPY_DISTANCE = 16  # blocks: the least distance between two copies of a metadata block
_NOT_FULL = re.compile(b"[^\xff]")
_NOT_EMPTY = re.compile(b"[^\x00]")
_FULL = (
    "the pool is full: delete snapshots ('snapctl delete') or trim unused space in the "
    "volume to free blocks"
)


class Allocator:
    def __init__(
        self,
        store: MetaStore,
        capacity_blocks: int,
        growable: bool,
        reserve_blocks: int = 0,
    ) -> None:
        self.store = store
        self.block_size = store.block_size
        self.bits_per_leaf = bitmap_bits_per_block(self.block_size)
        self.capacity = capacity_blocks
        self.growable = growable
        self.reserve = reserve_blocks
        nbytes = (capacity_blocks + 7) // 8
        self.busy = bytearray(nbytes)
        self.state = bytearray(nbytes)
        self.pending: list[int] = []  # freed in the open transaction
        # freed by a durable commit but kept from reuse (still set in busy) until
        # DEFER_GENERATIONS more commits: (the generation that freed them, the blocks)
        self.deferred: deque[tuple[int, list[int]]] = deque()
        self.deferred_blocks = 0
        self.dirty_leaves: set[int] = set()
        # data blocks allocated or freed in the open transaction (what a FLUSH must commit);
        # a metadata node's copy-on-write frees its old address too, but always beside a
        # changed tree that says so itself
        self.changed = False
        self.free_count = capacity_blocks
        self.cursor = 0
        self.tree = RadixTree(store, OWNER_BITMAP, BT_BITMAP, self.bits_per_leaf)
        self.grown = False
        self.damaged = False  # the on-disk bitmap could not be read (refuse_all)
        self.keep_backed: set[int] = set()  # freed metadata addresses: never punched
        self.commit_need: Callable[[], int] = lambda: 0  # set by the transaction layer
        store.allocate_address = self.allocate
        store.free_address = self.free_metadata
        store.allocate_far = self.allocate_far

    # --- setup --------------------------------------------------------------------------------

    def format(self) -> None:
        """A new pool: only the superblock area is in use."""
        for b in range(first_data_block(self.block_size)):
            self._set(b)
        self._mark_tail()
        self.dirty_leaves.update(range(self._leaf_count()))

    def load(self, root: BlockPointer, height: int) -> None:
        self.tree = RadixTree(self.store, OWNER_BITMAP, BT_BITMAP, self.bits_per_leaf, root, height)
        leaf_bytes = self.bits_per_leaf // 8
        for leaf_no, node in self.tree.iter_leaves():
            start = leaf_no * leaf_bytes
            if start >= len(self.state):
                break
            chunk = node.buf[HEADER_SIZE : HEADER_SIZE + min(leaf_bytes, len(self.state) - start)]
            self.state[start : start + len(chunk)] = chunk
        self.busy[:] = self.state
        self._mark_tail()
        self.free_count = self.capacity - self._count_set(self.state, self.capacity)

    def refuse_all(self) -> None:
        """The bitmap on disk cannot be read: nothing is allocatable (a degraded pool is read
        only, and must never allocate against damaged metadata)."""
        self.busy[:] = b"\xff" * len(self.busy)
        self.state[:] = self.busy
        self.free_count = 0
        self.damaged = True

    def rebuild(self, owned: bytearray) -> int:
        """check --repair of a damaged bitmap: the state becomes exactly what the trees own
        (the checker's walk), written as a new tree at the next commit. The old tree's nodes
        were owned by the walk, so they stay busy until that commit (a crash before it leaves
        the old state as it was) and are freed by it. Returns the blocks now in use."""
        old: list[int] = []
        try:
            for ptr, _ in self.tree.all_node_pointers():
                old += [a for a in (ptr.addr0, ptr.addr1) if a]
        except CorruptMetadata:
            pass  # what hangs under a damaged interior node was not owned by the walk either
        self.state[:] = owned
        for b in range(first_data_block(self.block_size)):
            self.state[b >> 3] |= 1 << (b & 7)
        self.busy[:] = self.state
        self._mark_tail()
        self.free_count = self.capacity - self._count_set(self.state, self.capacity)
        self.tree = RadixTree(self.store, OWNER_BITMAP, BT_BITMAP, self.bits_per_leaf)
        self.dirty_leaves.update(range(self._leaf_count()))
        self.changed = True
        self.pending.clear()
        self.deferred.clear()
        self.deferred_blocks = 0
        self.damaged = False
        for b in old:
            if self.is_allocated(b):
                self.free(b)
        return self.used_blocks

    def _leaf_count(self) -> int:
        return (self.capacity + self.bits_per_leaf - 1) // self.bits_per_leaf

    def _mark_tail(self) -> None:
        """Bits past the capacity in the last byte are permanently in use."""
        for b in range(self.capacity, len(self.state) * 8):
            self.state[b >> 3] |= 1 << (b & 7)
            self.busy[b >> 3] |= 1 << (b & 7)

    @staticmethod
    def _count_set(bits: bytearray, capacity: int) -> int:
        full = capacity // 8
        n = int.from_bytes(bits[:full], "little").bit_count()
        for b in range(full * 8, capacity):
            if bits[b >> 3] >> (b & 7) & 1:
                n += 1
        return n

    # --- allocation ---------------------------------------------------------------------------

    def _set(self, b: int) -> None:
        m = 1 << (b & 7)
        self.busy[b >> 3] |= m
        self.state[b >> 3] |= m
        self.free_count -= 1
        self.dirty_leaves.add(b // self.bits_per_leaf)

    def is_allocated(self, b: int) -> bool:
        return bool(self.state[b >> 3] >> (b & 7) & 1)

    @property
    def available(self) -> int:
        """Blocks allocatable before the next commit (freed ones wait for it)."""
        return self.free_count - self.waiting

    @property
    def waiting(self) -> int:
        """Blocks freed but not yet reusable: the open transaction's, and the deferral
        window's (they keep the last generations whole, for a rewind)."""
        return len(self.pending) + self.deferred_blocks

    def room_for_data(self, n: int, headroom: int) -> bool:
        """May n data blocks be taken, when the request dirties up to headroom more metadata
        nodes? Data leaves the static `reserve` (snapshot delete and rollback on a full pool)
        plus what committing the open transaction will take, so a commit always fits."""
        if self.growable:
            return True
        return self.available - n >= self.reserve + self.commit_need() + headroom

    def tight(self) -> bool:
        """The open transaction has eaten into the reserve: commit before it grows further."""
        return not self.growable and self.available < self.reserve + self.commit_need()

    def allocate(self) -> int:
        """One free block (metadata, or data already admitted by room_for_data)."""
        b = self._find_free()
        if b < 0:
            if not self.growable:
                raise NoSpace(_FULL)
            self._grow(max(256, self.capacity // 4))
            b = self._find_free()
        self._set(b)
        self.cursor = b + 1
        self.changed = True
        return b

    def allocate_far(self, near: int) -> int:
        """One free block for the second copy of a metadata block, far from `near` so that one
        damaged region does not take both: a quarter of the pool away where there is room,
        else at least COPY_DISTANCE blocks (an image file grows for it, as allocate would); a
        nearly full device takes any free block rather than keep no second copy."""
        b = -1
        for span in (max(COPY_DISTANCE, self.capacity // 4), COPY_DISTANCE):
            b = self._find_free_away(near, span)
            if b >= 0:
                break
        if b < 0 and self.growable:
            self._grow(max(256, self.capacity // 4))
            b = self._find_free_away(near, COPY_DISTANCE)
        if b < 0:
            b = self._find_free()
        if b < 0:
            raise NoSpace(_FULL)
        self._set(b)
        return b

    def _find_free_away(self, near: int, span: int) -> int:
        """The first free block at least span blocks from near (above it first)."""
        above = (near + span + 7) >> 3  # byte bounds rounded inward: the distance is exact
        below = max(0, near - span + 1) >> 3
        return self._find_free_in((above, len(self.busy)), (0, below))

    def allocate_many(self, n: int, headroom: int = 0) -> list[int]:
        """n data blocks, or none (NoSpace) if they do not fit beside the room kept for
        metadata (see room_for_data)."""
        if not self.room_for_data(n, headroom):
            raise NoSpace(_FULL)
        got: list[int] = []
        try:
            for _ in range(n):
                got.append(self.allocate())
        except BaseException:
            self.unallocate(got)
            raise
        return got

    def unallocate(self, blocks: list[int]) -> None:
        """Take back blocks allocated in the open transaction that nothing references yet: they
        are free in the committed state, so they are reusable at once."""
        for b in blocks:
            m = 1 << (b & 7)
            self.state[b >> 3] &= ~m
            self.busy[b >> 3] &= ~m
            self.free_count += 1
            self.dirty_leaves.add(b // self.bits_per_leaf)

    def _find_free(self) -> int:
        return self._find_free_in((self.cursor >> 3, len(self.busy)), (0, self.cursor >> 3))

    def _find_free_in(self, *ranges: tuple[int, int]) -> int:
        """The first free block in the byte ranges [start, end) of the bitmap, in order."""
        for start, end in ranges:
            m = _NOT_FULL.search(self.busy, start, end) if start < end else None
            while m is not None:
                i = m.start()
                byte = self.busy[i]
                for bit in range(8):
                    if not byte >> bit & 1:
                        b = i * 8 + bit
                        if b < self.capacity:
                            return b
                m = _NOT_FULL.search(self.busy, i + 1, end)
        return -1

    def _grow(self, extra: int) -> None:
        old = self.capacity
        self.capacity = old + extra
        nbytes = (self.capacity + 7) // 8
        # the old tail bits were "beyond capacity"; they are real blocks now
        for b in range(old, min(len(self.state) * 8, self.capacity)):
            self.state[b >> 3] &= ~(1 << (b & 7))
            self.busy[b >> 3] &= ~(1 << (b & 7))
        self.state.extend(bytes(nbytes - len(self.state)))
        self.busy.extend(bytes(nbytes - len(self.busy)))
        self._mark_tail()
        self.free_count += extra
        self.dirty_leaves.update(range(old // self.bits_per_leaf, self._leaf_count()))
        self.grown = True
        self.changed = True

    def free(self, b: int) -> None:
        """Release a block; it becomes allocatable once the open transaction commits."""
        self._release(b)
        self.changed = True

    def _release(self, b: int) -> None:
        m = 1 << (b & 7)
        assert self.state[b >> 3] & m, f"block {b} freed twice"
        self.state[b >> 3] &= ~m
        self.pending.append(b)
        self.free_count += 1
        self.dirty_leaves.add(b // self.bits_per_leaf)

    def free_metadata(self, b: int) -> None:
        """A metadata node's old address (copy-on-write): freed like any block, but not
        punched out when it becomes reusable. Commits reuse these first (the cursor returns to
        them), so an image file keeps the room its commits churn through, and a commit still
        fits when the host file system is full (a trim's frees wait out the deferral window
        before they give the host anything back)."""
        self._release(b)
        self.keep_backed.add(b)

    def free_many(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            self.free(b)

    @property
    def used_blocks(self) -> int:
        return self.capacity - self.free_count

    # --- commit -------------------------------------------------------------------------------

    def commit(self) -> None:
        """Write the bitmap tree for the state as it is now (called last in a commit)."""
        reserved: list[int] = []
        prepared: set[int] = set()
        while True:
            todo = self.dirty_leaves - prepared
            for leaf_no in sorted(todo):
                self.tree.leaf_for_write(leaf_no)  # may free old addresses: more dirty leaves
                prepared.add(leaf_no)
            need = self.tree.count_dirty() * self.store.copies
            while len(reserved) < need:
                first = self.allocate()
                reserved.append(first)
                if self.store.copies > 1:
                    reserved.append(self.allocate_far(first))
            if not (self.dirty_leaves - prepared) and len(reserved) == need:
                break
        leaf_bytes = self.bits_per_leaf // 8
        for leaf_no in prepared:
            node = self.tree.leaf_for_write(leaf_no)
            start = leaf_no * leaf_bytes
            chunk = self.state[start : start + leaf_bytes]
            node.buf[HEADER_SIZE : HEADER_SIZE + len(chunk)] = chunk
            node.buf[HEADER_SIZE + len(chunk) :] = bytes(leaf_bytes - len(chunk))
            node.count = 1
        reserved.reverse()  # hand out in ascending order: the tree lands contiguously
        self.tree.commit(allocate=reserved.pop, keep_empty=True)
        assert not reserved
        self.dirty_leaves.clear()
        self.changed = False

    def release_pending(self, generation: int) -> list[int]:
        """After commit `generation` is durable: its frees enter the deferral window, and the
        frees of commit generation - DEFER_GENERATIONS become allocatable. Returns those (see
        to_punch): no generation in the window loses a block it references."""
        if self.pending:
            self.deferred.append((generation, self.pending))
            self.deferred_blocks += len(self.pending)
            self.pending = []
        freed: list[int] = []
        while self.deferred and self.deferred[0][0] <= generation - DEFER_GENERATIONS:
            _, blocks = self.deferred.popleft()
            self.deferred_blocks -= len(blocks)
            freed.extend(blocks)
        for b in freed:
            self.busy[b >> 3] &= ~(1 << (b & 7))
        if freed:
            self.cursor = min(self.cursor, min(freed))
        return freed

    def to_punch(self, released: list[int]) -> list[int]:
        """Of the blocks release_pending made reusable, those to punch out of the host: all
        but freed metadata addresses (free_metadata)."""
        if not self.keep_backed:
            return released
        punch = [b for b in released if b not in self.keep_backed]
        self.keep_backed.difference_update(released)
        return punch

    def mark_in_use(self, blocks: Iterable[int]) -> None:
        """Blocks the free map wrongly calls free (check --repair): in use again, and out of
        the deferral window (which would otherwise release and punch them)."""
        todo = set(blocks)
        for b in todo:
            m = 1 << (b & 7)
            if not self.state[b >> 3] & m:
                self.state[b >> 3] |= m
                self.free_count -= 1
            self.busy[b >> 3] |= m
            self.dirty_leaves.add(b // self.bits_per_leaf)
            self.changed = True
        for i, (gen, waiting) in enumerate(self.deferred):
            kept = [b for b in waiting if b not in todo]
            self.deferred_blocks -= len(waiting) - len(kept)
            self.deferred[i] = (gen, kept)

    def defer_from(self, older: RadixTree, generation: int) -> int:
        """At open: blocks a committed bitmap of the deferral window marks allocated and the
        newest one calls free were freed by a recent commit; keep them from reuse as if commit
        `generation` had freed them (at worst a little longer than needed). Returns how many."""
        leaf_bytes = self.bits_per_leaf // 8
        blocks: list[int] = []
        for leaf_no, node in older.iter_leaves():
            start = leaf_no * leaf_bytes
            if start >= len(self.busy):
                break
            n = min(leaf_bytes, len(self.busy) - start)
            if node.buf[HEADER_SIZE : HEADER_SIZE + n] == self.busy[start : start + n]:
                continue  # most leaves: nothing changed between the two generations
            was = int.from_bytes(node.buf[HEADER_SIZE : HEADER_SIZE + n], "little")
            extra = was & ~int.from_bytes(self.busy[start : start + n], "little")
            if not extra:
                continue
            # (byte by byte: peeling bits off a leaf-sized integer costs a pass per bit)
            raw = extra.to_bytes(n, "little")
            base = start * 8
            for m in _NOT_EMPTY.finditer(raw):
                i, v = m.start(), raw[m.start()]
                blocks.extend(base + i * 8 + bit for bit in range(8) if v >> bit & 1)
        blocks = [b for b in blocks if b < self.capacity]
        for b in blocks:
            self.busy[b >> 3] |= 1 << (b & 7)
        if blocks:
            self.deferred.append((generation, blocks))
            self.deferred_blocks += len(blocks)
        return len(blocks)

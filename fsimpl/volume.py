"""A volume: its live map, the shadow maps of the snapshots that cover it, and the data path.

Reading block b of snapshot S walks S's shadow map, then each newer snapshot's, then live, and
takes the first real entry (FIG. 10): DITTO (an empty entry) means "look one newer". An explicit
HOLE entry reads zeros: it records that b was unallocated when S was taken, so data written
there later does not leak into S.

Ownership is unique: each data block belongs to the live map or to exactly one shadow map.
`birth` on a live entry is the pool's next snapshot id when live last changed the block, so
"still shared with the volume's latest snapshot?" is one comparison (invariant 3):
    shared  <=>  latest != 0 and entry.birth <= latest
The first write to a shared block preserves it for the latest snapshot:
* move-on-write (default): the old block is handed, untouched, to the latest snapshot's shadow
  map and the new data goes to a fresh block. A partial write either merges the old contents
  (merge=immediate) or, by default, defers the merge (US 6,748,504, FIG. 13B/13C): only the
  new bytes are written and live's entry is *incomplete*, with the valid range and the old
  block as its base. Later writes extend the range; the rest is merged in when the range is
  whole, when the base is about to be freed or rewritten (`settle`), when the block is shared
  with a newer snapshot, or in the background when the pool is idle;
* copy-on-write (FIG. 13A): the old contents are copied to a fresh block for the snapshot, the
  copy and its map entry are committed, then live is overwritten in place. All first writes of
  one request share one commit.

The birth test says "maybe shared"; the latest snapshot's own entry settles it: a snapshot that
was written (writable snapshots) holds entries live never handed it, and then live's block is
not needed by any snapshot. A shadow entry keeps the birth the data had in live, so a rollback
restores exact births (and with them the sharing test for every older snapshot).

A clone is a volume with an origin (a snapshot of another volume): its never-written blocks
(live NONE) read the origin's view, a trimmed block is an explicit HOLE, and a snapshot of the
clone preserves "the origin's view" as an ORIGIN entry. A block that moves from a snapshot to live
keeps birth <= latest, so it is never overwritten in place before it is committed as live's.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .allocator import Allocator
from .blockmap import BlockMap
from .datasums import DataSums
from .device import Device
from .errors import CorruptData, CorruptMetadata
from .layout import (
    EMPTY_ENTRY,
    ENTRY_INCOMPLETE,
    ENTRY_OWN_BASE,
    KIND_ADDR,
    KIND_HOLE,
    KIND_NONE,
    KIND_ORIGIN,
    SECTOR,
    SUM_UNIT,
    Entry,
    InodeRecord,
)
from .shadow_index import ShadowIndex, ShadowMap

log = logging.getLogger("dittofs")

COW_MOVE = "move"
COW_COPY = "copy"
MERGE_DEFERRED = "deferred"  # a partial first write leaves an incomplete block (default)
MERGE_IMMEDIATE = "immediate"  # a partial first write reads the old block and merges at once


@dataclass
class DataContext:
    """What the data path needs from the pool below it and the transaction above it."""

    device: Device
    allocator: Allocator
    block_size: int
    birth: Callable[[], int]  # the pool's next snapshot id
    commit: Callable[[], object]  # make everything so far durable (copy-on-write ordering)
    checksums: bool = False  # data checksums per 4 KiB unit (format option): see `sums`
    sums: DataSums | None = None  # where they are (None with checksums on: its inode is lost)
    # with checksums: live's data blocks allocated in the open transaction. No committed
    # generation reads them, so they may be rewritten in place (the commit empties it)
    fresh: set[int] = field(default_factory=set)
    # with checksums: live's blocks the committed in-place list lets this transaction overwrite
    # in place (inplace.py: an open after a crash takes their checksums from their data), and
    # those it has overwritten so far (they stay on the next commit's list)
    in_place: frozenset[int] = frozenset()
    rewritten: set[int] = field(default_factory=set)

    def rewritable(self, addr: int) -> bool:
        """May block addr, live's own, be overwritten in place (with checksums)?"""
        return addr in self.fresh or addr in self.in_place


class Volume:
    def __init__(self, inode: InodeRecord, live: BlockMap) -> None:
        self.inode = inode
        self.live = live
        self.chain: list[int] = []  # ids of snapshots covering this volume, oldest first
        self.shadows: dict[int, ShadowMap] = {}
        self.shadow_index: ShadowIndex | None = None  # made by the volume's first snapshot
        # snapshot id -> ((its map version, older id, older map version), unique blocks)
        self.unique_cache: dict[int, tuple[tuple[int, int, int], int]] = {}
        # every snapshot's unique blocks, as of a shadow index version and chain (snapshots.py)
        self.unique_all: tuple[tuple[int, int, tuple[int, ...]], dict[int, int]] | None = None
        self.origin: Volume | None = None  # a clone's origin volume (inode.origin_snap: its snap)
        self.writable: set[int] = set()  # snapshots of this volume exported read-write
        # incomplete blocks waiting for the background merge: the ones this process made, and
        # the ones an earlier run left, found by scanning live's map from scan_leaf on
        self.incomplete: set[int] = set()
        self.scan_leaf = 0
        self.scanned_all = False  # a whole pass found none (the count was stale): stop looking

    @property
    def name(self) -> str:
        return self.inode.name

    @property
    def ino(self) -> int:
        return self.inode.ino

    @property
    def latest(self) -> int:
        """Id of the snapshot that receives preserved blocks (0: none)."""
        return self.inode.snap_id

    def add_shadow(self, snap_id: int, shadow: ShadowMap) -> None:
        bisect.insort(self.chain, snap_id)
        self.shadows[snap_id] = shadow

    def remove_shadow(self, snap_id: int) -> None:
        self.chain.remove(snap_id)
        del self.shadows[snap_id]
        self.unique_cache.pop(snap_id, None)

    def older_than(self, snap_id: int) -> int:
        """The next older snapshot of this volume (0: none)."""
        i = bisect.bisect_left(self.chain, snap_id)
        return self.chain[i - 1] if i > 0 else 0

    # --- resolution ---------------------------------------------------------------------------

    def resolve_block(self, snap_id: int | None, block: int) -> Entry:
        """The entry that says where block's data is, as seen from snapshot snap_id (None:
        live): the first real entry of the chain (FIG. 10). Anything but ADDR reads zeros."""
        return self.resolve_range(snap_id, block, 1)[0]

    def resolve_range(self, snap_id: int | None, first: int, count: int) -> list[Entry]:
        """Where each block of [first, first + count) is, seen from snap_id (None: live);
        for a clone, blocks it never wrote resolve in its origin snapshot."""
        entries = self._own_range(snap_id, first, count)
        if self.origin is None:
            return entries
        need = [i for i, e in enumerate(entries) if e.kind in (KIND_NONE, KIND_ORIGIN)]
        if need:
            lo, hi = need[0], need[-1]
            limit = self.origin_blocks
            sub = self.origin.resolve_range(self.inode.origin_snap, first + lo, hi - lo + 1)
            for i in need:
                entries[i] = sub[i - lo] if first + i < limit else EMPTY_ENTRY
        return entries

    @property
    def origin_blocks(self) -> int:
        """Blocks of the origin snapshot a clone can see (beyond them it reads zeros)."""
        assert self.origin is not None
        size = self.origin.shadows[self.inode.origin_snap].inode.size
        bs = self.live.tree.store.block_size
        return (size + bs - 1) // bs

    def _own_range(self, snap_id: int | None, first: int, count: int) -> list[Entry]:
        if snap_id is None or self.shadow_index is None:
            return self.live_range(first, count)
        own = self._own_entry
        return [own(snap_id, b) for b in range(first, first + count)]

    def _own_entry(self, snap_id: int, block: int) -> Entry:
        """What snap_id reads at block, this volume alone (its origin aside): the entry of the
        oldest snapshot at least as new that has one (FIG. 10's walk, one index lookup), else
        live's."""
        assert self.shadow_index is not None
        found = self.shadow_index.serving(snap_id, block)
        return found[1] if found is not None else self.live.get(block)

    def live_range(self, first: int, count: int) -> list[Entry]:
        return self.live.get_range(first, count)

    # --- reads --------------------------------------------------------------------------------

    def read(self, ctx: DataContext, snap_id: int | None, out: memoryview, offset: int) -> None:
        bs = ctx.block_size
        length = len(out)
        first = offset // bs
        last = (offset + length - 1) // bs
        if first == last and self.origin is None:
            # the common small read, without the general machinery
            if snap_id is None or self.shadow_index is None:
                e = self.live.get(first)
            else:
                e = self._own_entry(snap_id, first)
            if e.kind != KIND_ADDR:
                out[:] = bytes(length)
            elif ctx.checksums:
                read_verified_into(ctx, e, out, offset - first * bs)
            else:
                read_view_into(ctx, e, out, offset - first * bs)
            return
        entries = self.resolve_range(snap_id, first, last - first + 1)
        if ctx.checksums:
            self._read_verified(ctx, entries, first, out, offset)
            return
        addr = contiguous_run(entries, None)
        if addr is not None:  # the common large read: one run on disk, one pread
            ctx.device.pread_into(out, addr * bs + offset - first * bs)
            return
        pos = 0
        run_disk = run_pos = run_len = 0
        pread_into = ctx.device.pread_into
        for i, e in enumerate(entries):
            b = first + i
            start = offset + pos - b * bs
            n = min(bs - start, length - pos)
            if e.kind == KIND_ADDR and not e.flags:
                disk = e.addr * bs + start
                if run_len and run_disk + run_len == disk and run_pos + run_len == pos:
                    run_len += n
                else:
                    if run_len:
                        pread_into(out[run_pos : run_pos + run_len], run_disk)
                    run_disk, run_pos, run_len = disk, pos, n
            elif e.kind == KIND_ADDR:
                read_view_into(ctx, e, out[pos : pos + n], start)
            else:
                out[pos : pos + n] = bytes(n)
            pos += n
        if run_len:
            pread_into(out[run_pos : run_pos + run_len], run_disk)

    def _read_verified(
        self, ctx: DataContext, entries: list[Entry], first: int, out: memoryview, offset: int
    ) -> None:
        """Every 4 KiB unit read verified against its checksum; complete blocks consecutive on
        disk are read and verified as one run."""
        bs = ctx.block_size
        sums = data_sums(ctx)
        pos = 0
        # the run so far: run_len bytes from byte run_start of block run_addr, for out[run_pos:]
        run_addr = run_start = run_pos = run_len = 0
        for i, e in enumerate(entries):
            b = first + i
            start = offset + pos - b * bs
            n = min(bs - start, len(out) - pos)
            if e.kind == KIND_ADDR and not e.flags:
                if (
                    run_len
                    and run_addr * bs + run_start + run_len == e.addr * bs + start
                    and run_pos + run_len == pos
                ):
                    run_len += n
                else:
                    if run_len:
                        read_units_verified(
                            ctx, sums, run_addr, run_start, out[run_pos : run_pos + run_len]
                        )
                    run_addr, run_start, run_pos, run_len = e.addr, start, pos, n
            elif e.kind == KIND_ADDR:
                read_verified_into(ctx, e, out[pos : pos + n], start)
            else:
                out[pos : pos + n] = bytes(n)
            pos += n
        if run_len:
            read_units_verified(ctx, sums, run_addr, run_start, out[run_pos : run_pos + run_len])

    def extents(
        self, snap_id: int | None, offset: int, length: int, block_size: int
    ) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) runs covering [offset, offset + length)."""
        first = offset // block_size
        last = (offset + length - 1) // block_size
        runs: list[tuple[int, int, bool]] = []
        for i, e in enumerate(self.resolve_range(snap_id, first, last - first + 1)):
            b = first + i
            start = max(offset, b * block_size)
            end = min(offset + length, (b + 1) * block_size)
            hole = e.kind != KIND_ADDR
            if runs and runs[-1][2] == hole:
                o, n, _ = runs[-1]
                runs[-1] = (o, n + end - start, hole)
            else:
                runs.append((start, end - start, hole))
        return runs

    # --- writes -------------------------------------------------------------------------------

    def _headroom(self, first: int, last: int) -> int:
        """Metadata nodes a change of blocks [first, last] may dirty: the leaves it spans in
        live, with their paths (one more level if a tree grows), and the shadow index's."""
        cap = self.live.capacity
        leaves = last // cap - first // cap + 1
        room = 2 * leaves * (self.live.tree.height + 2)
        if self.shadow_index is not None and self.inode.snap_id:
            room += self.shadow_index.room(last - first + 1)
        return room

    def _shared(self, b: int, e: Entry, latest: int) -> bool:
        """Does the latest snapshot still need live's current view of block b? The birth test,
        settled by the snapshot's own entry (a written snapshot may already have one)."""
        return latest != 0 and e.birth <= latest and self.shadows[latest].get(b) == EMPTY_ENTRY

    def _preserved(self, b: int, e: Entry) -> Entry:
        """The shadow entry that keeps live's current view of block b for a snapshot."""
        assert not e.incomplete, "an incomplete block is settled before a snapshot takes it"
        if e.kind == KIND_ADDR:
            return Entry(KIND_ADDR, e.addr, e.birth)
        if (
            e.kind == KIND_NONE
            and self.origin is not None
            and self.resolve_range(None, b, 1)[0].kind == KIND_ADDR
        ):
            return Entry(KIND_ORIGIN, 0, e.birth)  # the clone showed its origin's data there
        return Entry(KIND_HOLE, 0, e.birth)

    def _base_into(self, ctx: DataContext, b: int, buf: bytearray) -> None:
        """Fill buf with what block b of live reads now, when live has no block of its own
        (zeros, or a clone's origin data)."""
        if self.origin is not None:
            e = self.resolve_range(None, b, 1)[0]
            if e.kind == KIND_ADDR:
                read_for_merge(ctx, e, memoryview(buf), 0)

    # --- deferred merges ----------------------------------------------------------------------

    def settle(self, ctx: DataContext, b: int) -> Entry:
        """Complete live's block b if it is incomplete: copy the bytes outside its valid range
        from the base into it. Those bytes are unused under the committed entry, so writing them
        is invisible until the completed entry commits (after the data, like any remap)."""
        e = self.live.get(b)
        self.incomplete.discard(b)
        if not e.incomplete:
            return e
        bs = ctx.block_size
        lo, hi = e.valid_lo * SECTOR, e.valid_hi * SECTOR
        base = Entry(KIND_ADDR, e.base)
        for a, z in ((0, lo), (hi, bs)):
            if a < z:
                copy_units(ctx, base, e.addr, a, z)
        done = Entry(KIND_ADDR, e.addr, e.birth)
        self.live.set(b, done)
        if e.owns_base:
            ctx.allocator.free(e.base)  # deferred: the committed entry may still read it
        return done

    def settle_base(self, ctx: DataContext, b: int, addr: int) -> None:
        """Block addr (a snapshot's block b) is about to be freed or rewritten: complete live's
        block b first if addr is its base."""
        if not self.live.inode.incomplete_blocks:
            return  # the common case, without reading live's map
        e = self.live.get(b)
        if e.incomplete and e.base == addr:
            self.settle(ctx, b)

    def settle_range(self, ctx: DataContext, first: int, count: int) -> None:
        """Complete every incomplete live block in [first, first + count)."""
        if not self.live.inode.incomplete_blocks:
            return
        for b, e in self.live.entries_in(first, count):
            if e.incomplete:
                self.settle(ctx, b)

    def own_base_blocks(self) -> list[int]:
        """Live's known incomplete blocks (this run's, and those the background scan found)
        that own their base: each merge (settle) frees a block. Never a scan of the map: a
        full pool's writes ask for this."""
        get = self.live.get
        return [b for b in self.incomplete if get(b).owns_base]

    def find_incomplete(self, stop: Callable[[], bool]) -> None:
        """Scan live's map for incomplete blocks an earlier run left (its inode counts them),
        a leaf at a time from scan_leaf on, until some are found or stop() says enough."""
        if not self.live.inode.incomplete_blocks or self.scanned_all:
            return
        cap = self.live.capacity
        whole_pass = self.scan_leaf == 0
        for leaf_no in self.live.leaf_numbers(self.scan_leaf):  # lazily: most calls stop early
            for b, e in self.live.entries_in(leaf_no * cap, cap):
                if e.incomplete:
                    self.incomplete.add(b)
            self.scan_leaf = leaf_no + 1
            if self.incomplete or stop():
                return
        self.scan_leaf = 0  # wrapped round: blocks written meanwhile are in the set already
        self.scanned_all = whole_pass

    def _extend(
        self, ctx: DataContext, e: Entry, start: int, n: int, writes: list[tuple[int, memoryview]]
    ) -> Entry:
        """An aligned write of n bytes at start into live's own incomplete block: the valid
        range grows to cover it, a gap between the two filled from the base."""
        bs = ctx.block_size
        lo, hi = e.valid_lo * SECTOR, e.valid_hi * SECTOR
        end = start + n
        gap = (end, lo) if end < lo else (hi, start) if start > hi else None
        if gap is not None:
            a, z = gap
            writes.append((e.addr * bs + a, memoryview(ctx.device.pread(z - a, e.base * bs + a))))
        lo, hi = min(lo, start), max(hi, end)
        if lo == 0 and hi == bs:
            return Entry(KIND_ADDR, e.addr, e.birth)
        return e._replace(valid_lo=lo // SECTOR, valid_hi=hi // SECTOR)

    # --- writes -------------------------------------------------------------------------------

    def write(
        self, ctx: DataContext, data: memoryview, offset: int, cow: str, defer: bool = False
    ) -> None:
        """Write data at offset. The blocks it needs are allocated first and written before any
        map changes, so a failed write leaves the maps (and every other byte) as they were.
        defer: a partial first write of a shared block defers the merge (move-on-write only)."""
        bs = ctx.block_size
        first = offset // bs
        last = (offset + len(data) - 1) // bs
        latest = self.inode.snap_id
        # the unit a deferred (partial) write keeps whole: a sector, or with data checksums a
        # checksummed unit (an incomplete block's valid range is whole units then)
        grain = SUM_UNIT if ctx.checksums else SECTOR
        aligned = offset % grain == 0 and len(data) % grain == 0
        if first == last:
            e = self.live.get(first)
            if e.kind == KIND_ADDR:
                start = offset - first * bs
                owned = not (latest and e.birth <= latest)
                if owned and not ctx.checksums and not e.flags:
                    # live owns the block outright: the common small overwrite, in place
                    ctx.device.pwrite(data, e.addr * bs + start)
                    return
                if owned and ctx.checksums and aligned and not e.flags and ctx.rewritable(e.addr):
                    write_in_place(ctx, e.addr, start, data)  # the same, on the in-place list
                    return
                if (
                    owned
                    and ctx.checksums
                    and aligned
                    and len(data) < bs
                    and (defer or ctx.rewritable(e.addr))
                ):
                    self._overwrite_units(ctx, first, e, data, start)
                    return
                if (
                    not owned
                    and not e.flags
                    and defer
                    and cow == COW_MOVE
                    and aligned
                    and self._deferred_first_write(ctx, first, e, data, start)
                ):
                    return
        elif not ctx.checksums:
            addr = contiguous_run(self.live.get_range(first, last - first + 1), latest)
            if addr is not None:
                # live owns every block outright, one run on disk: the common large overwrite,
                # in place with one pwrite (what the single-block case above does per block)
                ctx.device.pwrite(data, addr * bs + offset - first * bs)
                return
        if cow == COW_COPY and latest and not ctx.checksums:
            # (with data checksums a shared block is never overwritten in place, so nothing
            # needs copying aside first: shared blocks move to the snapshot as under cow=move)
            self._preserve_by_copy(ctx, first, last)
        entries = self.live_range(first, last - first + 1)
        end = offset + len(data)
        for i, e in enumerate(entries):
            b = first + i
            whole = offset <= b * bs and (b + 1) * bs <= end  # nothing of the old block stays
            if e.incomplete and (
                self._shared(b, e, latest) or (not whole and (not aligned or ctx.checksums))
            ):
                # a snapshot takes only whole blocks; an unaligned write cannot extend a range;
                # with checksums an incomplete block's committed units are not rewritten in place
                entries[i] = self.settle(ctx, b)
        defer = defer and aligned and cow == COW_MOVE
        shared = [self._shared(first + i, e, latest) for i, e in enumerate(entries)]
        # With data checksums a block goes in place only if the in-place list allows it: an
        # overwrite in place would put new data under the committed checksum until the commit,
        # and a crash then would read as corruption what NBD allows to read as old or new, unless
        # the open knows to take the block's checksums from its data (inplace.py). Any other
        # block moves (the old one is freed at the commit, untouched until then).
        in_place = [
            e.kind == KIND_ADDR
            and not sh
            and (not ctx.checksums or (aligned and not e.incomplete and ctx.rewritable(e.addr)))
            for e, sh in zip(entries, shared, strict=True)
        ]
        moves = in_place.count(False)
        fresh = ctx.allocator.allocate_many(moves, self._headroom(first, last))
        if ctx.checksums:
            ctx.fresh.update(fresh)
        writes: list[tuple[int, memoryview]] = []  # (disk offset, data), coalesced below
        remap: list[tuple[int, Entry, bool, Entry]] = []  # block, old entry, shared, new entry
        resum: list[tuple[int, Entry]] = []  # in-place blocks with their new entry
        summed: list[tuple[int, int, memoryview]] = []  # with checksums: block, at, bytes
        birth = ctx.birth()
        try:
            pos = 0
            for i, e in enumerate(entries):
                b = first + i
                start = offset + pos - b * bs
                n = min(bs - start, len(data) - pos)
                chunk = data[pos : pos + n]
                pos += n
                if in_place[i]:
                    writes.append((e.addr * bs + start, chunk))  # live's own: in place
                    if ctx.checksums:
                        summed.append((e.addr, start, chunk))
                    elif e.incomplete:
                        resum.append((b, self._extend(ctx, e, start, n, writes)))
                    continue
                new = fresh[len(remap)]
                if n < bs and defer and e.kind == KIND_ADDR and shared[i]:
                    # the old block stays whole for the snapshot; live's reads outside the new
                    # bytes go to it until the merge
                    writes.append((new * bs + start, chunk))
                    if ctx.checksums:
                        summed.append((new, start, chunk))
                    lo, hi = start // SECTOR, (start + n) // SECTOR
                    part = Entry(KIND_ADDR, new, birth, ENTRY_INCOMPLETE, lo, hi, base=e.addr)
                    remap.append((b, e, shared[i], part))
                    continue
                if n == bs:
                    block: memoryview = chunk
                else:
                    merged = bytearray(bs)
                    if e.kind == KIND_ADDR:  # the old contents around the new bytes
                        read_for_merge(ctx, e, memoryview(merged), 0)
                    elif e.kind == KIND_NONE:
                        self._base_into(ctx, b, merged)
                    merged[start : start + n] = chunk
                    block = memoryview(merged)
                writes.append((new * bs, block))
                if ctx.checksums:
                    summed.append((new, 0, block))
                remap.append((b, e, shared[i], Entry(KIND_ADDR, new, birth)))
            write_coalesced(ctx.device, writes)
        except BaseException:
            ctx.allocator.unallocate(fresh)
            raise
        if summed:
            note_written(ctx, summed)
        for b, e, was_shared, now in remap:
            if was_shared:  # first write since the snapshot
                self.shadows[latest].set(b, self._preserved(b, e))
            else:  # live's own block, rewritten elsewhere (checksums)
                for blk in e.blocks:
                    ctx.allocator.free(blk)
            self.live.set(b, now)
            if now.incomplete:
                self.incomplete.add(b)
            else:  # (an incomplete block written whole: its merge is moot)
                self.incomplete.discard(b)
        for b, e in resum:
            self.live.set(b, e)
            if not e.incomplete:
                self.incomplete.discard(b)

    def _deferred_first_write(
        self, ctx: DataContext, b: int, e: Entry, data: memoryview, start: int
    ) -> bool:
        """The common first write after a snapshot, a few sectors into one shared block, without
        the general machinery: the snapshot takes the block, live gets a new incomplete one
        with just these bytes. False if the block turns out not to be shared after all."""
        latest = self.inode.snap_id
        shadow = self.shadows[latest]
        if shadow.get(b) != EMPTY_ENTRY or len(data) == ctx.block_size:
            return False
        new = ctx.allocator.allocate_many(1, self._headroom(b, b))
        try:
            ctx.device.pwrite(data, new[0] * ctx.block_size + start)
        except BaseException:
            ctx.allocator.unallocate(new)
            raise
        if ctx.checksums:
            data_sums(ctx).set(new[0], start, data)
            ctx.fresh.add(new[0])
        shadow.set(b, Entry(KIND_ADDR, e.addr, e.birth))
        lo, hi = start // SECTOR, (start + len(data)) // SECTOR
        self.live.set(
            b, Entry(KIND_ADDR, new[0], ctx.birth(), ENTRY_INCOMPLETE, lo, hi, base=e.addr)
        )
        self.incomplete.add(b)
        return True

    def _overwrite_units(
        self, ctx: DataContext, b: int, e: Entry, data: memoryview, start: int
    ) -> None:
        """With data checksums, whole 4 KiB units written into part of a block live owns
        outright. They are written where they belong if no committed entry reads them there
        (a block allocated since the last commit, ctx.fresh, or the free part of an incomplete
        block: the gap to its valid range copied from the base) or the in-place list allows
        it. Otherwise the block becomes incomplete: the new units in a new block, the rest
        still read from the old one, which the entry owns (ENTRY_OWN_BASE) until a merge frees
        it. So a 4 KiB write costs 4 KiB, not a block, and no committed byte is rewritten in
        place except on the list."""
        bs = ctx.block_size
        end = start + len(data)
        sums = data_sums(ctx)
        rewritable = ctx.rewritable(e.addr)  # nothing committed reads it, or the list allows
        if e.incomplete or rewritable:
            lo, hi = e.valid_lo * SECTOR, e.valid_hi * SECTOR
            if e.incomplete and start < hi and lo < end and not rewritable:
                e = self.settle(ctx, b)  # rewrites units the committed entry may read
            else:
                write_in_place(ctx, e.addr, start, data)
                if not e.incomplete:
                    return
                gap = (end, lo) if end < lo else (hi, start) if start > hi else None
                if gap is not None:
                    copy_units(ctx, Entry(KIND_ADDR, e.base), e.addr, *gap)
                lo, hi = min(lo, start), max(hi, end)
                if lo == 0 and hi == bs:
                    self.live.set(b, Entry(KIND_ADDR, e.addr, e.birth))
                    self.incomplete.discard(b)
                    if e.owns_base:
                        ctx.allocator.free(e.base)
                else:
                    self.live.set(b, e._replace(valid_lo=lo // SECTOR, valid_hi=hi // SECTOR))
                return
        new = ctx.allocator.allocate_many(1, self._headroom(b, b))[0]
        try:
            ctx.device.pwrite(data, new * bs + start)
        except BaseException:
            ctx.allocator.unallocate([new])
            raise
        ctx.fresh.add(new)
        sums.set(new, start, data)
        flags = ENTRY_INCOMPLETE | ENTRY_OWN_BASE
        lo, hi = start // SECTOR, end // SECTOR
        self.live.set(b, Entry(KIND_ADDR, new, ctx.birth(), flags, lo, hi, base=e.addr))
        self.incomplete.add(b)

    def _preserve_by_copy(self, ctx: DataContext, first: int, last: int) -> None:
        """FIG. 13A for every shared block in [first, last]: copy it aside for the latest
        snapshot and commit, so the in-place overwrite that follows cannot reach a snapshot."""
        latest = self.inode.snap_id
        shadow = self.shadows[latest]
        entries = self.live_range(first, last - first + 1)
        shared = [
            (first + i, e) for i, e in enumerate(entries) if self._shared(first + i, e, latest)
        ]
        if not shared:
            return
        to_copy = [(b, e) for b, e in shared if e.kind == KIND_ADDR]
        copies = ctx.allocator.allocate_many(len(to_copy), self._headroom(first, last))
        try:
            for (_, e), copy in zip(to_copy, copies, strict=True):
                copy_block(ctx, e, copy)
        except BaseException:
            ctx.allocator.unallocate(copies)
            raise
        birth = ctx.birth()
        copy_of = dict(zip((b for b, _ in to_copy), copies, strict=True))
        for b, e in shared:
            if e.kind == KIND_ADDR:  # the copy is whole even if live's block is incomplete
                shadow.set(b, Entry(KIND_ADDR, copy_of[b], e.birth))
                self.live.set(b, e._replace(birth=birth))
            else:  # nothing to copy: the snapshot records a hole, or the clone's origin view
                shadow.set(b, self._preserved(b, e))
                self.live.set(b, e._replace(birth=birth))
        if copies:
            ctx.commit()

    def deallocate(self, ctx: DataContext, first: int, count: int) -> None:
        """Make whole blocks [first, first + count) read zeros and give their space back (trim,
        zero). A clone visits every block: a never-written one showed its origin's data."""
        latest = self.inode.snap_id
        birth = ctx.birth()
        live = self.live
        clone = self.origin is not None
        if clone:
            blocks = list(
                zip(range(first, first + count), self.live_range(first, count), strict=True)
            )
        else:
            blocks = list(live.entries_in(first, count))
        # what live holds afterwards: "reads zeros" (a clone needs HOLE: NONE is its origin)
        zero_kind = KIND_HOLE if clone else KIND_NONE
        for b, e in blocks:
            reads_zero = e.kind == KIND_HOLE or (e.kind == KIND_NONE and not clone)
            if reads_zero:
                if not clone and latest == 0 and e != EMPTY_ENTRY:
                    live.clear(b)  # no snapshot needs to know it ever changed
                continue  # the view does not change: nothing to preserve or free
            if self._shared(b, e, latest):
                if e.incomplete:
                    e = self.settle(ctx, b)
                self.shadows[latest].set(b, self._preserved(b, e))
                live.set(b, Entry(zero_kind, 0, birth))
                continue
            self.incomplete.discard(b)
            for blk in e.blocks:  # (a base live owns goes with it; a snapshot's stays)
                ctx.allocator.free(blk)
            if latest == 0 and not clone:
                live.clear(b)
            else:  # keep the birth: it still says whether b changed since the latest snapshot
                live.set(b, Entry(zero_kind, 0, e.birth))


def write_in_place(ctx: DataContext, addr: int, start: int, data: memoryview) -> None:
    """With checksums: whole units of data written at byte start of block addr, live's own and
    rewritable (DataContext.rewritable), with their checksums."""
    ctx.device.pwrite(data, addr * ctx.block_size + start)
    note_in_place(ctx, addr, start, data)


def note_in_place(ctx: DataContext, addr: int, start: int, data: memoryview) -> None:
    """The checksums of data just written in place. For a block on the committed in-place list
    they lag: an open after a crash retakes them, so a FLUSH need not commit them."""
    lagging = addr not in ctx.fresh
    if lagging:
        ctx.rewritten.add(addr)
    data_sums(ctx).set(addr, start, data, lagging=lagging)


def note_written(ctx: DataContext, pieces: list[tuple[int, int, memoryview]]) -> None:
    """The checksums of whole units just written, as (block, byte start, bytes): a run of
    pieces that continue each other on disk is hashed and stored as one. A block that was
    not allocated in this transaction is on the in-place list: its checksums lag (see
    note_in_place)."""
    sums = data_sums(ctx)
    bs = ctx.block_size
    fresh = ctx.fresh
    first = 0
    for i in range(1, len(pieces) + 1):
        if i < len(pieces):
            (a, s, d), (b, t, _) = pieces[i - 1], pieces[i]
            if b == a + 1 and s + len(d) == bs and t == 0 and (a in fresh) == (b in fresh):
                continue
        run = pieces[first:i]
        addr, start, _ = run[0]
        lagging = addr not in fresh
        if lagging:
            ctx.rewritten.update(a for a, _, _ in run)
        units = [d[u : u + SUM_UNIT] for _, _, d in run for u in range(0, len(d), SUM_UNIT)]
        sums.set_units(addr, start, units, lagging)
        first = i


def read_view_into(ctx: DataContext, e: Entry, out: memoryview, start: int) -> None:
    """Bytes [start, start + len(out)) of the block an ADDR entry describes: an incomplete
    block's valid range from its own block, the rest from its base."""
    bs = ctx.block_size
    if not e.flags & ENTRY_INCOMPLETE:
        ctx.device.pread_into(out, e.addr * bs + start)
        return
    for a, z, addr in pieces_of(e, start, start + len(out)):
        ctx.device.pread_into(out[a - start : z - start], addr * bs + a)


def pieces_of(e: Entry, start: int, end: int) -> list[tuple[int, int, int]]:
    """Where bytes [start, end) of what the ADDR entry e reads lie, as (from, to, block): its
    own block, or for an incomplete entry the valid range there and the rest in its base."""
    if not e.flags & ENTRY_INCOMPLETE:
        return [(start, end, e.addr)]
    lo, hi = e.valid_lo * SECTOR, e.valid_hi * SECTOR
    pieces = [
        (start, min(end, lo), e.base),
        (max(start, lo), min(end, hi), e.addr),
        (max(start, hi), end, e.base),
    ]
    return [(a, z, addr) for a, z, addr in pieces if a < z]


def data_sums(ctx: DataContext) -> DataSums:
    """The pool's data checksums; a pool that keeps them but lost their inode (a degraded
    open) cannot verify, so it serves no data rather than unverified data."""
    if ctx.sums is None:
        raise CorruptMetadata(
            "the pool's data checksums are in a damaged inode-table leaf, so no data can be "
            "verified; run 'snapctl check'",
            -1,
            "inode-table leaf",
        )
    return ctx.sums


def read_verified_into(ctx: DataContext, e: Entry, out: memoryview, start: int) -> None:
    """read_view_into, each 4 KiB unit the bytes touch verified against its checksum: never
    wrong data, an error naming the block and the bytes instead. An incomplete entry's valid
    range is whole units of its own block, the rest is its base's."""
    sums = data_sums(ctx)
    if not e.flags & ENTRY_INCOMPLETE:
        read_units_verified(ctx, sums, e.addr, start, out)
        return
    for a, z, addr in pieces_of(e, start, start + len(out)):
        read_units_verified(ctx, sums, addr, a, out[a - start : z - start])


def read_units_verified(
    ctx: DataContext, sums: DataSums, addr: int, start: int, target: memoryview
) -> None:
    """Bytes from byte start of block addr on into target (running on into the next blocks
    when it is longer: a run of consecutive blocks, read and verified as one), every 4 KiB
    unit they touch verified."""
    bs = ctx.block_size
    end = start + len(target)
    ua, uz = start - start % SUM_UNIT, -(-end // SUM_UNIT) * SUM_UNIT
    if ua == start and uz == end:  # whole units: straight into the caller's buffer
        ctx.device.pread_into(target, addr * bs + start)
        units: bytes | bytearray | memoryview = target
    else:
        units = ctx.device.pread(uz - ua, addr * bs + ua)
    try:
        sums.verify(addr, ua, units)
    except CorruptData:
        ctx.device.stats.checksum_errors += 1
        raise
    if units is not target:
        target[:] = memoryview(units)[start - ua : end - ua]


def read_block(ctx: DataContext, e: Entry) -> bytearray:
    """The whole block an ADDR entry describes (unverified)."""
    buf = bytearray(ctx.block_size)
    read_view_into(ctx, e, memoryview(buf), 0)
    return buf


def read_checked(ctx: DataContext, e: Entry) -> bytearray:
    """The whole block of an ADDR entry, verified unit by unit when the pool keeps checksums:
    never wrong data, an error naming the block instead."""
    if not ctx.checksums:
        return read_block(ctx, e)
    buf = bytearray(ctx.block_size)
    read_verified_into(ctx, e, memoryview(buf), 0)
    return buf


def read_for_merge(ctx: DataContext, e: Entry, out: memoryview, start: int) -> None:
    """Old bytes a write keeps beside its new ones: verified with checksums on, so a damaged
    unit is never given a fresh checksum."""
    if ctx.checksums:
        read_verified_into(ctx, e, out, start)
    else:
        read_view_into(ctx, e, out, start)


def copy_block(ctx: DataContext, e: Entry, dst: int) -> None:
    """Block dst takes a copy of what the ADDR entry e reads (see copy_units)."""
    copy_units(ctx, e, dst, 0, ctx.block_size)


def copy_units(ctx: DataContext, src: Entry, dst: int, a: int, z: int) -> None:
    """Bytes [a, z) of what the ADDR entry src reads, written at the same place in block dst,
    with their checksums. A damaged unit is copied as it is and its checksum poisoned in dst,
    so its reads keep failing: the background work that copies (merges, a clone's flatten, a
    writable snapshot's copies for older ones) never stops at damage, and never launders it."""
    bs = ctx.block_size
    buf = bytearray(z - a)
    read_view_into(ctx, src, memoryview(buf), a)
    ctx.device.pwrite(buf, dst * bs + a)
    if not ctx.checksums:
        return
    sums = data_sums(ctx)
    view = memoryview(buf)
    for ra, rz, home in pieces_of(src, a, z):  # home: the block whose checksums apply
        for u, err in sums.take(home, dst, ra, view[ra - a : rz - a]):
            ctx.device.stats.checksum_errors += 1
            sums.poison(dst, u, SUM_UNIT)
            log.warning("%s; copied to block %d with its damage marked", err, dst)


def contiguous_run(entries: list[Entry], newer_than: int | None) -> int | None:
    """The first block's address when every entry is a plain block (no flags: complete, of
    this volume) and they follow one another on disk; else None. newer_than: every block must
    also be born after that snapshot (live owns it outright: no snapshot shares it)."""
    first = entries[0]
    if first.kind != KIND_ADDR:
        return None
    addr = first.addr
    for i, e in enumerate(entries):
        if e.kind != KIND_ADDR or e.flags or e.addr != addr + i:
            return None
        if newer_than and e.birth <= newer_than:
            return None
    return addr


def write_coalesced(device: Device, writes: list[tuple[int, memoryview]]) -> None:
    """Issue writes, merging neighbours that are contiguous both on disk and in memory."""
    i = 0
    while i < len(writes):
        disk, chunk = writes[i]
        parts = [chunk]
        end = disk + len(chunk)
        j = i + 1
        while j < len(writes) and writes[j][0] == end:
            parts.append(writes[j][1])
            end += len(writes[j][1])
            j += 1
        for k in range(0, len(parts), 512):  # below IOV_MAX
            batch = parts[k : k + 512]
            if len(batch) == 1:
                device.pwrite(batch[0], disk)
            else:
                device.pwritev(batch, disk)
            disk += sum(len(p) for p in batch)
        i = j

"""Snapshot lifecycle on one volume: delete push-down, rollback, diff and space accounting.

Every operation here costs in proportion to the entries of the snapshots it touches, never to the
volume's size, and the long ones (delete, rollback) work a batch at a time up to a deadline so the
engine lock is never held long (nor the open transaction grown past what a commit can hold);
the state between two steps is consistent and committable:

* delete S: for each entry of S at block b, the next older snapshot P relied on it exactly when
  P holds DITTO at b; then the entry moves to P, otherwise its block is freed. Between steps, P
  reads through S's remaining entries.
* rollback to S (S newest): S's entries move back to live with the births they had there (so
  shared with S again), live's replaced blocks are freed, and S ends empty: live == S.
* diff S..T: the blocks that may differ are exactly the entries of the snapshots in [S, T)
  (invariant 4), so it never reads data.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from itertools import islice

from .blockmap import BlockMap
from .errors import NoSpace
from .layout import EMPTY_ENTRY, KIND_ADDR, KIND_HOLE, KIND_NONE, KIND_ORIGIN, Entry
from .shadow_index import ShadowMap
from .volume import DataContext, Volume, copy_block

BATCH = 256  # entries a long operation takes between two looks at its deadline


def delete_step(ctx: DataContext, vol: Volume, snap_id: int, stop: Callable[[], bool]) -> bool:
    """Push snapshot snap_id's entries down to the next older snapshot or free their blocks,
    a batch at a time, until done (returns True: the snapshot has no entries left) or stop()
    says enough."""
    shadow = vol.shadows[snap_id]
    older_id = vol.older_than(snap_id)
    older = vol.shadows[older_id] if older_id else None
    while not shadow.is_empty():
        for b, e in list(islice(shadow.iter_entries(), BATCH)):
            if older is not None and older.get(b) == EMPTY_ENTRY:
                older.set(b, e)
            elif e.kind == KIND_ADDR:
                vol.settle_base(ctx, b, e.addr)
                ctx.allocator.free(e.addr)
            shadow.clear(b)
        if stop():
            return shadow.is_empty()
    return True


def rollback_step(ctx: DataContext, vol: Volume, snap_id: int, stop: Callable[[], bool]) -> bool:
    """Move snapshot snap_id's entries back into live, freeing the blocks they replace. Returns
    True when done (the snapshot is empty and live reads exactly what it held)."""
    shadow = vol.shadows[snap_id]
    live = vol.live
    while not shadow.is_empty():
        for b, e in list(islice(shadow.iter_entries(), BATCH)):
            cur = live.get(b)
            for blk in cur.blocks:  # (a base live owns goes too; a snapshot's base is S's)
                ctx.allocator.free(blk)
            # the entry kept the data's birth in live, so sharing with every older snapshot
            # is exact again
            if e.kind == KIND_ADDR:
                live.set(b, Entry(KIND_ADDR, e.addr, e.birth))
            elif e.kind == KIND_HOLE and vol.origin is not None:
                live.set(b, Entry(KIND_HOLE, 0, e.birth))  # a clone's NONE would read origin
            else:  # a hole of a plain volume, or a clone's origin view
                live.set(b, Entry(KIND_NONE, 0, e.birth))
            shadow.clear(b)
        if stop():
            return shadow.is_empty()
    return True


def changed_blocks(vol: Volume, from_id: int, to_id: int | None) -> list[int]:
    """Blocks that may differ between snapshot from_id and snapshot to_id (None: live), sorted.
    Cost: the entries of the snapshots in between."""
    ids = [s for s in vol.chain if s >= from_id and (to_id is None or s < to_id)]
    blocks: set[int] = set()
    for sid in ids:
        blocks.update(b for b, _ in vol.shadows[sid].iter_entries())
    return sorted(blocks)


def block_runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """(first, count) runs of consecutive block numbers."""
    start = prev = -2
    for b in blocks:
        if b != prev + 1:
            if start >= 0:
                yield start, prev - start + 1
            start = b
        prev = b
    if start >= 0:
        yield start, prev - start + 1


def unique_blocks(vol: Volume, snap_id: int) -> int:
    """Data blocks that deleting snap_id alone would free on this volume: its own blocks that
    the next older snapshot does not rely on. Cached until either map changes."""
    shadow = vol.shadows[snap_id]
    older_id = vol.older_than(snap_id)
    if not older_id:
        return shadow.inode.owned_blocks
    older = vol.shadows[older_id]
    key = (shadow.version, older_id, older.version)
    hit = vol.unique_cache.get(snap_id)
    if hit is not None and hit[0] == key:
        return hit[1]
    n = sum(
        1 for b, e in shadow.iter_entries() if e.kind == KIND_ADDR and older.get(b) != EMPTY_ENTRY
    )
    vol.unique_cache[snap_id] = (key, n)
    return n


def unique_blocks_all(vol: Volume) -> dict[int, int]:
    """unique_blocks of every snapshot of vol, in one pass over the shadow index: by block,
    then snapshot, so an entry's next older snapshot's entry at the same block, if it has one,
    is the entry just before it. Cached until the index or the chain changes."""
    index = vol.shadow_index
    if index is None:
        return {}
    key = (id(index), index.version, tuple(vol.chain))  # (an emptied snapshot's delete
    if vol.unique_all is not None and vol.unique_all[0] == key:  # changes only the chain)
        return vol.unique_all[1]
    older = dict(zip(vol.chain[1:], vol.chain[:-1], strict=True))
    counts = dict.fromkeys(vol.chain, 0)
    prev = (-1, 0)
    for b, sid, e in index.all_entries():
        if e.kind == KIND_ADDR and (sid not in older or prev == (b, older[sid])):
            counts[sid] = counts.get(sid, 0) + 1
        prev = (b, sid)
    vol.unique_all = (key, counts)
    return counts


def range_freed(vol: Volume, span: list[int]) -> int:
    """Blocks freed by deleting the consecutive snapshots span (oldest first) of vol: all their
    own blocks, except, per block, the oldest entry when the next older snapshot relies on it."""
    owned = sum(vol.shadows[s].inode.owned_blocks for s in span)
    older_id = vol.older_than(span[0])
    if not older_id:
        return owned
    older = vol.shadows[older_id]
    oldest: dict[int, int] = {}  # block -> kind of the oldest entry in the span
    for s in span:
        for b, e in vol.shadows[s].iter_entries():
            oldest.setdefault(b, e.kind)
    handed = sum(
        1 for b, kind in oldest.items() if kind == KIND_ADDR and older.get(b) == EMPTY_ENTRY
    )
    return owned - handed


def freed_by_deleting(vol: Volume, gone: set[int]) -> int:
    """Blocks freed once every snapshot in gone is deleted: each run of consecutive deleted
    snapshots hands at most one entry per block to the survivor below it."""
    chain = vol.chain
    # where the deleted ones sit in the chain: found by bisection, so the cost follows the
    # deletes, not the number of snapshots
    places = sorted(
        i
        for s, i in ((s, bisect.bisect_left(chain, s)) for s in gone)
        if i < len(chain) and chain[i] == s
    )
    total = 0
    start = 0
    for k, i in enumerate(places):
        if k + 1 < len(places) and places[k + 1] == i + 1:
            continue  # the run goes on
        run = chain[places[start] : i + 1]
        total += unique_blocks(vol, run[0]) if len(run) == 1 else range_freed(vol, run)
        start = k + 1
    return total


def free_map_step(ctx: DataContext, m: BlockMap, stop: Callable[[], bool]) -> bool:
    """Free every block live's map owns, leaf by leaf (a volume being deleted). True when
    empty."""
    cap = m.capacity
    for leaf_no in list(m.leaf_numbers()):
        for _, e in list(m.entries_in(leaf_no * cap, cap)):
            for blk in e.blocks:
                ctx.allocator.free(blk)
        m.detach_leaf(leaf_no)
        if stop():
            return m.is_empty()
    return True


def free_shadow_step(ctx: DataContext, m: ShadowMap, stop: Callable[[], bool]) -> bool:
    """Free every block a snapshot's map owns, a batch at a time (a volume being deleted).
    True when empty."""
    while not m.is_empty():
        for b, e in list(islice(m.iter_entries(), BATCH)):
            for blk in e.blocks:
                ctx.allocator.free(blk)
            m.clear(b)
        if stop():
            return m.is_empty()
    return True


def flatten_step(ctx: DataContext, vol: Volume, cursor: int, stop: Callable[[], bool]) -> int:
    """Copy a clone's origin data into blocks of its own, from block cursor on: live blocks it
    never wrote, and its snapshots' ORIGIN entries. Returns the next cursor; the clone is
    independent once the cursor reaches the origin's size. Raises NoSpace only if it could
    copy nothing."""
    assert vol.origin is not None
    start = cursor
    end = vol.origin_blocks
    step = vol.live.capacity
    while cursor < end:
        count = min(step, end - cursor)
        origin_view = vol.origin.resolve_range(vol.inode.origin_snap, cursor, count)
        todo: list[tuple[int, BlockMap | ShadowMap, Entry]] = []
        for i, e in enumerate(vol.live_range(cursor, count)):
            if e.kind == KIND_NONE:
                todo.append((i, vol.live, e))
        for sid in vol.chain:
            for b, e in vol.shadows[sid].entries_in(cursor, count):
                if e.kind == KIND_ORIGIN:
                    todo.append((b - cursor, vol.shadows[sid], e))
        data = [(i, m, e) for i, m, e in todo if origin_view[i].kind == KIND_ADDR]
        try:
            copies = ctx.allocator.allocate_many(len(data), 2 * len(vol.chain) + 8)
        except NoSpace:
            if cursor == start:
                raise  # nothing done: the caller may make room and run the step again
            break  # keep what this step did; the next one starts here
        try:
            for (i, _, _), c in zip(data, copies, strict=True):
                copy_block(ctx, origin_view[i], c)
        except BaseException:
            ctx.allocator.unallocate(copies)
            raise
        copied = {(i, id(m)): c for (i, m, _), c in zip(data, copies, strict=True)}
        for i, m, e in todo:
            own = copied.get((i, id(m)))
            if own is not None:
                m.set(cursor + i, Entry(KIND_ADDR, own, e.birth))
            elif m is not vol.live:
                m.set(cursor + i, Entry(KIND_HOLE, 0, e.birth))  # the origin read zeros there
        cursor += count
        if stop():
            break
    return cursor

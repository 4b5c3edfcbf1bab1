"""Writable snapshots (US 7,085,785): writing into snapshot S without changing any other view.

Before block b of S changes, every older snapshot that reads b through S must keep what it
reads. Only the next older snapshot P can do so directly (anything older either has its own
entry or dittos to P), so P gets an entry for b first:
* S owns a block for b: that block moves to P untouched, S gets a new one;
* S has an explicit entry without a block (HOLE, ORIGIN): P gets the same entry;
* S dittos (its view comes from a newer snapshot, live or a clone's origin): P gets a copy of
  that view (a block owned elsewhere cannot be shared: ownership stays unique).
Then S's view changes: in place when S already owns the block and nobody relies on it (never on
a pool with data checksums: the new data goes to a new block, the old one is freed at the
commit), else in a new block holding the old view merged with the new bytes. Newer snapshots
and live never look at older snapshots, so they are untouched by construction.

An entry written into S carries birth = S's id (its data is S's own, older than no snapshot
that reads it). Live's first-write test checks the latest snapshot's entry (volume.py), so a
written latest snapshot never receives a second entry for the same block.
"""

from __future__ import annotations

from .layout import EMPTY_ENTRY, KIND_ADDR, KIND_HOLE, KIND_NONE, KIND_ORIGIN, Entry
from .volume import DataContext, Volume, copy_block, data_sums, read_for_merge, write_coalesced


def _plan(vol: Volume, sid: int, first: int, count: int) -> tuple[list[Entry], list[Entry]]:
    """S's own entries and S's current views of blocks [first, first + count)."""
    shadow = vol.shadows[sid]
    own = [shadow.get(b) for b in range(first, first + count)]
    return own, vol.resolve_range(sid, first, count)


def _room(vol: Volume, sid: int, count: int) -> int:
    """Metadata nodes the change may dirty: what the entries of S and of the next older
    snapshot for count blocks span in the shadow index."""
    index = vol.shadows[sid].index
    return 2 * index.room(count)


def write_snapshot(ctx: DataContext, vol: Volume, sid: int, data: memoryview, offset: int) -> None:
    """Write data into snapshot sid of vol at offset."""
    bs = ctx.block_size
    first = offset // bs
    last = (offset + len(data) - 1) // bs
    count = last - first + 1
    vol.settle_range(ctx, first, count)  # a snapshot's block may be live's base
    shadow = vol.shadows[sid]
    older_id = vol.older_than(sid)
    older = vol.shadows[older_id] if older_id else None
    own, views = _plan(vol, sid, first, count)
    relied = [older is not None and older.get(first + i) == EMPTY_ENTRY for i in range(count)]
    # with data checksums a snapshot's block is never rewritten in place (the in-place list,
    # inplace.py, holds live's blocks only)
    in_place = [
        own[i].kind == KIND_ADDR and not relied[i] and not ctx.checksums for i in range(count)
    ]
    copies_needed = [
        i
        for i in range(count)
        if relied[i] and own[i] == EMPTY_ENTRY and views[i].kind == KIND_ADDR
    ]
    fresh = ctx.allocator.allocate_many(
        count - sum(in_place) + len(copies_needed), _room(vol, sid, count)
    )
    new_for = fresh[: count - sum(in_place)]
    copy_for = dict(zip(copies_needed, fresh[count - sum(in_place) :], strict=True))
    writes: list[tuple[int, memoryview]] = []
    remap: list[tuple[int, int]] = []  # (index, new block for S)
    try:
        for i, c in copy_for.items():  # older snapshots keep the view they relied on
            copy_block(ctx, views[i], c)
        pos = 0
        for i in range(count):
            b = first + i
            start = offset + pos - b * bs
            n = min(bs - start, len(data) - pos)
            chunk = data[pos : pos + n]
            pos += n
            if in_place[i]:
                writes.append((own[i].addr * bs + start, chunk))
                continue
            new = new_for[len(remap)]
            if n == bs:
                block: memoryview = chunk
            else:
                merged = bytearray(bs)
                if views[i].kind == KIND_ADDR:
                    read_for_merge(ctx, views[i], memoryview(merged), 0)
                merged[start : start + n] = chunk
                block = memoryview(merged)
            writes.append((new * bs, block))
            if ctx.checksums:
                data_sums(ctx).set(new, 0, block)
            remap.append((i, new))
        write_coalesced(ctx.device, writes)
    except BaseException:
        ctx.allocator.unallocate(fresh)
        raise
    for i, new in remap:
        b = first + i
        if relied[i]:
            assert older is not None
            e = own[i]
            if e.kind in (KIND_ADDR, KIND_HOLE, KIND_ORIGIN):
                older.set(b, e)  # its block or explicit entry moves down, untouched
            elif i in copy_for:
                older.set(b, Entry(KIND_ADDR, copy_for[i], views[i].birth))
            else:  # the view was a hole (or beyond a clone's origin)
                older.set(b, Entry(KIND_HOLE, 0, views[i].birth))
        elif own[i].kind == KIND_ADDR:  # S's own block, rewritten elsewhere (checksums)
            ctx.allocator.free(own[i].addr)
        shadow.set(b, Entry(KIND_ADDR, new, sid))


def deallocate_snapshot(ctx: DataContext, vol: Volume, sid: int, first: int, count: int) -> None:
    """Whole blocks [first, first + count) of snapshot sid read zeros from now on (trim, zero),
    older snapshots keeping what they read."""
    vol.settle_range(ctx, first, count)  # a snapshot's block may be live's base
    shadow = vol.shadows[sid]
    older_id = vol.older_than(sid)
    older = vol.shadows[older_id] if older_id else None
    own, views = _plan(vol, sid, first, count)
    todo = [i for i in range(count) if views[i].kind == KIND_ADDR or own[i].kind == KIND_ORIGIN]
    relied = {i: older is not None and older.get(first + i) == EMPTY_ENTRY for i in todo}
    copies_needed = [i for i in todo if relied[i] and own[i] == EMPTY_ENTRY]
    copies = ctx.allocator.allocate_many(len(copies_needed), _room(vol, sid, count))
    try:
        for i, c in zip(copies_needed, copies, strict=True):
            copy_block(ctx, views[i], c)
    except BaseException:
        ctx.allocator.unallocate(copies)
        raise
    copy_for = dict(zip(copies_needed, copies, strict=True))
    for i in todo:
        b = first + i
        e = own[i]
        if relied[i]:
            assert older is not None
            if e.kind != KIND_NONE:
                older.set(b, e)
            else:
                older.set(b, Entry(KIND_ADDR, copy_for[i], views[i].birth))
        elif e.kind == KIND_ADDR:
            ctx.allocator.free(e.addr)
        shadow.set(b, Entry(KIND_HOLE, 0, sid))

"""Exports and the request path: what an NBD connection opens, and its reads and writes.

An export name is resolved once, at connect (`VOLUME`, `VOLUME@SNAPSHOT`, `VOLUME@latest`), into
an `Export` the connection keeps. Every request re-checks it against the pool under the engine
lock: a deleted snapshot, a deleted volume or a replaced live (rollback, failed commit, role
change) turns into ExportGone for that connection, never into another view's data. The commit
policy of requests lives here too: FLUSH and FUA make everything durable, a full pool retries
once after a commit (which returns freed blocks and the commit reserve).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import writable
from .core import EngineCore
from .errors import DamagedPool, ExportGone, NotFound, OutOfRange, ReadOnlyExport
from .layout import (
    KIND_ADDR,
    OP_DELETE,
    OP_FLATTEN,
    OP_NONE,
    OP_RECEIVE,
    OP_ROLLBACK,
    SNAP_ACTIVE,
    SnapshotRecord,
)
from .names import DEFAULT_VOLUME, LATEST, parse_export
from .volume import Volume

EXTENTS_MAX_BLOCKS = 1 << 16


@dataclass
class Export:
    """What one NBD connection opened: a volume, or one snapshot of it, fixed at connect."""

    name: str
    volume_ino: int
    snap_id: int | None
    readonly: bool
    incarnation: int
    size: int
    description: str
    client: bool = False  # counted in EngineCore.connections
    failures: int = 0  # EngineCore.failures when it was opened


class ExportRequests:
    def __init__(self, core: EngineCore) -> None:
        self.core = core

    # --- resolving ----------------------------------------------------------------------------

    def export_names(self) -> list[tuple[str, str]]:
        """(export name, description) for every export, for list_exports."""
        core = self.core
        with core.lock:
            pool = core.pool
            out: list[tuple[str, str]] = []
            for vol in sorted(pool.volumes.values(), key=lambda v: v.ino):
                if vol.inode.op == OP_DELETE:
                    continue
                out.append((vol.name, f"volume {vol.name} ({vol.inode.size} bytes, read-write)"))
                latest = core.latest_of(vol)
                if latest is not None:
                    out.append(
                        (f"{vol.name}@{LATEST}", f"newest snapshot of {vol.name}: {latest.name}")
                    )
                for sid in vol.chain:
                    rec = pool.snapshots[sid]
                    if rec.state == SNAP_ACTIVE:
                        out.append((f"{vol.name}@{rec.name}", describe_snapshot(rec, vol)))
            return out

    def open_export(self, name: str, readonly: bool, client: bool = False) -> Export:
        """Resolve an export name for a connection. client=True counts it as a connected client
        of the volume (rollback refuses while there are any); close it with close_export."""
        core = self.core
        with core.lock:
            parsed = parse_export(name)
            vol = core.volume(parsed.volume)
            readonly = readonly or core.is_standby() or bool(core.pool.damage)
            if parsed.snapshot is None:
                core.require_readable(vol)
                if client:
                    core.connections[vol.ino] = core.connections.get(vol.ino, 0) + 1
                return Export(
                    name or DEFAULT_VOLUME,
                    vol.ino,
                    None,
                    readonly,
                    vol.inode.incarnation,
                    vol.inode.size,
                    f"volume {vol.name} ({'read-only' if readonly else 'read-write'})",
                    client,
                    core.failures,
                )
            if parsed.snapshot == LATEST:
                rec = core.latest_of(vol)
                if rec is None:
                    raise NotFound(
                        f"'{vol.name}@{LATEST}' names nothing yet: volume {vol.name} has no "
                        "snapshots; create one with 'snapctl create NAME'"
                    )
            else:
                rec = core.snapshot(parsed.snapshot)
                core.require_readable(vol, rec)  # (a lost shadow map must not say "covers")
                core.require_covers(vol, rec)
            core.require_readable(vol, rec)
            shadow = vol.shadows[rec.id]
            return Export(
                name,
                vol.ino,
                rec.id,
                readonly or rec.id not in vol.writable,
                vol.inode.incarnation,
                shadow.inode.size,
                describe_snapshot(rec, vol),
                failures=core.failures,
            )

    def close_export(self, ex: Export) -> None:
        """A connection ended (counted for rollback's busy check)."""
        core = self.core
        with core.lock:
            if ex.client and core.connections.get(ex.volume_ino):
                core.connections[ex.volume_ino] -= 1
                ex.client = False

    def _volume_for(self, ex: Export) -> Volume:
        core = self.core
        core.usable()
        vol = core.pool.volumes.get(ex.volume_ino)
        if vol is None:
            raise ExportGone(f"export {ex.name}: its volume was deleted; reconnect")
        if ex.snap_id is not None:
            rec = core.pool.snapshots.get(ex.snap_id)
            if rec is None or rec.state != SNAP_ACTIVE:
                raise ExportGone(
                    f"export {ex.name}: the snapshot was deleted while this connection was "
                    "open; reconnect to another export"
                )
        elif vol.inode.incarnation != ex.incarnation:
            raise ExportGone(
                f"export {ex.name}: the volume changed under this connection (a rollback or "
                "a role change); reconnect to see it"
            )
        if ex.failures != core.failures and (ex.snap_id is None or ex.snap_id in vol.writable):
            raise ExportGone(
                f"export {ex.name}: a commit failed after this connection opened and the pool "
                "went back to its last durable state, so writes not yet flushed may be gone; "
                "reconnect to see what is durable"
            )
        if core.pool.damage:  # a reload may have found damage since the connection opened
            core.require_readable(vol, core.pool.snapshots.get(ex.snap_id or 0))
        return vol

    @staticmethod
    def _view(vol: Volume, ex: Export) -> int | None:
        """The snapshot an export reads (None: live). While a rollback runs, live is a mix of
        old and restored blocks, so it reads through the target snapshot, exact at every step."""
        if ex.snap_id is None and vol.inode.op in (OP_ROLLBACK, OP_RECEIVE):
            return vol.inode.op_target or None
        return ex.snap_id

    @staticmethod
    def _range(ex: Export, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > ex.size:
            raise OutOfRange(
                f"export {ex.name}: request [{offset}, {offset + length}) is past its end "
                f"({ex.size} bytes)"
            )

    def _writable(self, ex: Export) -> Volume:
        core = self.core
        vol = self._volume_for(ex)
        if core.is_standby():
            if core.handing_over:
                raise ReadOnlyExport(
                    f"export {ex.name} is read-only: this pool is handing the primary role to "
                    "its peer (standby failback)"
                )
            raise ReadOnlyExport(
                f"export {ex.name} is read-only: this pool is a standby (fed by its primary)"
                + (
                    " and was superseded: 'snapctl standby demote'"
                    if core.pool.sb.superseded
                    else "; 'snapctl standby promote' makes it writable"
                )
            )
        if core.pool.read_only_reason:
            raise DamagedPool(f"export {ex.name}: {core.pool.read_only_reason}")
        if ex.readonly or (ex.snap_id is not None and ex.snap_id not in vol.writable):
            raise ReadOnlyExport(
                f"export {ex.name} is read-only"
                + (
                    " (a snapshot: make it writable with 'snapctl set NAME writable=on')"
                    if ex.snap_id is not None
                    else ""
                )
            )
        if vol.inode.op not in (OP_NONE, OP_FLATTEN):  # a flatten runs online
            raise ReadOnlyExport(
                f"export {ex.name}: a rollback or delete of this volume is in progress; wait"
            )
        return vol

    # --- requests -----------------------------------------------------------------------------

    def read(self, ex: Export, out: memoryview, offset: int) -> None:
        if not len(out):
            return
        core = self.core
        with core.lock:
            vol = self._volume_for(ex)
            self._range(ex, offset, len(out))
            vol.read(core.pool.ctx, self._view(vol, ex), out, offset)

    def _put(self, vol: Volume, ex: Export, data: memoryview, offset: int) -> None:
        """Write into the volume or, for a writable snapshot export, into the snapshot."""
        core = self.core
        if ex.snap_id is None:
            core.last_write = time.monotonic()
            vol.write(core.pool.ctx, data, offset, core.cow, core.defer_merge)
        else:
            writable.write_snapshot(core.pool.ctx, vol, ex.snap_id, data, offset)

    def write(self, ex: Export, data: memoryview, offset: int, fua: bool = False) -> None:
        core = self.core
        with core.lock:
            vol = self._writable(ex)
            self._range(ex, offset, len(data))
            if len(data):
                core.making_room(lambda: self._put(vol, ex, data, offset))
            if fua:
                core.make_durable()

    def flush(self, ex: Export | None = None) -> None:
        """NBD FLUSH: everything written before it survives a crash. A connection whose writes
        were lost to a failed commit gets an error here rather than a false success."""
        core = self.core
        with core.lock:
            if ex is not None:
                self._volume_for(ex)
            core.make_durable()

    def trim(self, ex: Export, offset: int, length: int, fua: bool = False) -> None:
        """Deallocate the whole blocks inside the range (partial blocks keep their data)."""
        core = self.core
        with core.lock:
            vol = self._writable(ex)
            self._range(ex, offset, length)
            bs = core.pool.block_size
            self._deallocate(vol, ex, -(-offset // bs), (offset + length) // bs)
            if fua:
                core.make_durable()

    def _deallocate(self, vol: Volume, ex: Export, first: int, end: int) -> None:
        """Blocks [first, end) read zeros and give their space back, in chunks of one map leaf,
        committing whenever the transaction grows into the reserve (a commit must fit)."""
        core = self.core
        chunk = vol.live.capacity
        for start in range(first, end, chunk):
            n = min(chunk, end - start)
            if ex.snap_id is None:
                vol.deallocate(core.pool.ctx, start, n)
            else:
                writable.deallocate_snapshot(core.pool.ctx, vol, ex.snap_id, start, n)
            core.keep_commit_room()

    def zero(
        self, ex: Export, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        """Make the range read zeros: whole blocks are deallocated when the client allows
        (may_trim), else written; partial blocks get zeros unless they read zeros already."""
        core = self.core
        with core.lock:
            vol = self._writable(ex)
            self._range(ex, offset, length)
            bs = core.pool.block_size
            first = -(-offset // bs)
            end = (offset + length) // bs
            if end > first and may_trim:
                self._deallocate(vol, ex, first, end)
            view = self._view(vol, ex)
            pos, stop = offset, offset + length
            while pos < stop:
                block = pos // bs
                n = min((block + 1) * bs, stop) - pos
                if n == bs and may_trim:
                    pos = end * bs  # the whole blocks were deallocated above
                    continue
                if n < bs and vol.resolve_block(view, block).kind != KIND_ADDR:
                    pos += n  # reads zeros already
                    continue
                n = min(stop - pos, 64 * bs) if n == bs else n
                zeros = memoryview(bytes(n))
                core.making_room(lambda: self._put(vol, ex, zeros, pos))  # noqa: B023
                pos += n
            if fua:
                core.make_durable()

    def extents(self, ex: Export, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) runs from offset; may cover less than length."""
        core = self.core
        with core.lock:
            vol = self._volume_for(ex)
            self._range(ex, offset, length)
            bs = core.pool.block_size
            length = min(length, EXTENTS_MAX_BLOCKS * bs - offset % bs)
            return vol.extents(self._view(vol, ex), offset, length, bs)


def describe_snapshot(rec: SnapshotRecord, vol: Volume) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.created_ns / 1e9))
    mode = "read-write" if rec.id in vol.writable else "read-only"
    return f"snapshot {rec.name} of {vol.name}, taken {when} ({mode})"

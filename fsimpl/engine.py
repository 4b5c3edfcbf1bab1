"""The engine facade: one open pool, its exports, and every operation the edges may ask for.

The nbdkit plugin and the control server call only this module. It owns the engine lock (every
public method takes it, so the engine is correct under any nbdkit thread model and beside the
control thread), the commit policy (on FLUSH, on FUA, on every snapshot operation, and at most
`COMMIT_INTERVAL` seconds after a change), name resolution of exports and snapshots, and the
long operations, which run in steps of at most `STEP_SECONDS` with the lock released between
steps. A deleted snapshot disappears at once; its blocks are reclaimed by those steps, resumed
after a crash by whoever opens the pool next.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from . import snapshots as snapops
from . import writable
from .checker import check
from .device import Device
from .errors import (
    DittoError,
    ExportGone,
    InvalidArgument,
    NoSpace,
    NotFound,
    OutOfRange,
    PoolBusy,
    ReadOnlyExport,
    Refused,
)
from .layout import (
    DEFAULT_BLOCK_SIZE,
    KIND_ADDR,
    OP_DELETE,
    OP_FLATTEN,
    OP_NONE,
    OP_RECEIVE,
    OP_ROLLBACK,
    ROLE_STANDBY,
    SNAP_ACTIVE,
    SUPERBLOCK_OFFSETS,
    SnapshotRecord,
    check_block_size,
)
from .management import Progress, SnapshotManagement
from .names import DEFAULT_VOLUME, LATEST, check_name, parse_export
from .probe import detect_signature
from .replication import ReplicationOps
from .rundir import pid_alive
from .txn import DEFAULT_CACHE_BYTES, Pool, read_superblock, refuse_if_in_use
from .volume import COW_COPY, COW_MOVE, MERGE_DEFERRED, MERGE_IMMEDIATE, Volume, read_checked
from .volume_mgmt import VolumeManagement

log = logging.getLogger("dittofs")

COMMIT_INTERVAL = 5.0
MERGE_IDLE = 1.0  # seconds without live writes before deferred merges run in the background
STEP_SECONDS = 0.02
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
    client: bool = False  # counted in Engine.connections


class Engine(SnapshotManagement, VolumeManagement, ReplicationOps):
    def __init__(
        self, device: Device, pool: Pool, cow: str, cache_bytes: int, merge: str = MERGE_DEFERRED
    ) -> None:
        if cow not in (COW_MOVE, COW_COPY):
            raise InvalidArgument(f"cow={cow}: use cow=move or cow=copy")
        if merge not in (MERGE_DEFERRED, MERGE_IMMEDIATE):
            raise InvalidArgument(f"merge={merge}: use merge=deferred or merge=immediate")
        self.device = device
        self.pool = pool
        pool.ctx.commit = self._commit  # copy-on-write commits get the reload-on-failure path
        self.cow = cow
        self.defer_merge = merge == MERGE_DEFERRED
        self.last_write = 0.0  # monotonic time of the last live write (background merges wait)
        self.cache_bytes = cache_bytes
        self.lock = threading.RLock()
        self.last_commit = time.monotonic()
        self.claimed_pid = 0
        self.connections: dict[int, int] = {}  # volume ino -> open connections to the volume
        self.epoch = 0  # bumped whenever the pool is reloaded from disk
        self.pins: dict[int, int] = {}  # snapshot id -> streams being sent from it
        self.endpoint: Any = None  # the standby replication endpoint, when this process runs one
        self.failed = False

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        *,
        cow: str = COW_MOVE,
        merge: str = MERGE_DEFERRED,
        create_size: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        claim: bool = True,
        checksums: bool = False,
    ) -> Engine:
        """Open (with create_size and a missing path: create) the pool on path, exclusively."""
        if create_size is not None and not os.path.exists(path):
            _check_size(create_size)
            try:
                check_block_size(block_size)
            except ValueError as e:
                raise InvalidArgument(f"block-size={block_size}: {e}") from None
            try:
                device = Device.create_image(path)
            except FileNotFoundError:
                raise NotFound(f"cannot create {path}: its directory does not exist") from None
            except OSError as e:
                raise DittoError(f"cannot create {path}: {e.strerror}") from None
            try:
                device.lock()
                pool = Pool.format(device, block_size, create_size, True, cache_bytes, checksums)
            except BaseException:
                device.close()
                os.unlink(path)
                raise
        else:
            try:
                device = Device(path)
            except FileNotFoundError:
                raise NotFound(
                    f"{path} does not exist; give size=SIZE to create an image file there"
                ) from None
            except OSError as e:
                raise DittoError(f"cannot open {path}: {e.strerror}") from None
            try:
                _lock(device)
                pool = Pool.open(device, cache_bytes)
                refuse_if_in_use(pool.sb, path, "stop it first")
                for slot, problem in pool.superblock_problems:
                    log.warning(
                        "%s: superblock slot %d (byte %d, type superblock) is unusable: %s; the "
                        "other slot serves; run 'snapctl check' (--repair rewrites it)",
                        path,
                        slot,
                        SUPERBLOCK_OFFSETS[slot],
                        problem,
                    )
            except BaseException:
                device.close()
                raise
        try:
            engine = cls(device, pool, cow, cache_bytes, merge)
        except BaseException:
            device.close()
            raise
        if claim:
            engine.claim(os.getpid())
        return engine

    @staticmethod
    def format(
        path: str,
        size: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        force: bool = False,
        checksums: bool = False,
    ) -> dict[str, object]:
        """Make a pool on path: a new image file (size required), an existing file, or a block
        device (live defaults to the device's size; thin either way). Refuses a disk that holds
        a file system, a partition table or a pool unless force."""
        if size is not None:
            _check_size(size)
        try:
            check_block_size(block_size)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        created = not os.path.exists(path)
        if created and size is None:
            raise InvalidArgument(
                f"{path} does not exist: give --size to create an image file there"
            )
        try:
            device = Device.create_image(path) if created else Device(path)
        except FileNotFoundError:
            raise NotFound(f"cannot create {path}: its directory does not exist") from None
        except OSError as e:
            raise DittoError(f"cannot open {path}: {e.strerror}") from None
        try:
            _lock(device)
            found = None if created else detect_signature(device)
            if found and not force:
                raise Refused(
                    f"{path} holds {found}; formatting would destroy it. Add --force if "
                    "that is what you want"
                )
            if size is None:
                size = device.size()
                if size <= 0:
                    raise InvalidArgument(f"{path} is empty: give --size for the live volume")
            pool = Pool.format(
                device, block_size, size, not device.is_block_device, checksums=checksums
            )
            return {
                "disk": path,
                "block_size": block_size,
                "live_size": size,
                "capacity_bytes": pool.allocator.capacity * block_size,
                "growable": pool.sb.growable,
                "checksums": checksums,
                "pool_guid": pool.sb.pool_guid.hex(),
            }
        except BaseException:
            device.close()
            if created:
                os.unlink(path)
            raise
        finally:
            device.close()

    def claim(self, pid: int) -> None:
        """Record this process in the pool's in-use record (and commit it)."""
        with self.lock:
            self.pool.set_inuse(pid)
            self._commit()
            self.claimed_pid = pid

    def close(self) -> None:
        with self.lock:
            if self.device.fd < 0:
                return
            try:
                if self.claimed_pid:
                    self.pool.set_inuse(0)
                self._commit()
            finally:
                self.device.close()

    # --- commit policy ------------------------------------------------------------------------

    def _usable(self) -> None:
        if self.failed:
            raise DittoError(
                "the pool could not be reloaded after a failed commit; nothing is served until "
                "the server is restarted (then run 'snapctl check')"
            )

    def _commit(self) -> bool:
        self._usable()
        try:
            done = self.pool.commit()
        except BaseException as e:
            # The open transaction is unusable after a failed commit: fall back to what is
            # durable, so nothing half-written is ever served, and make every connection to a
            # volume fail from now on (its unflushed writes are gone; it must know).
            log.error("commit failed (%s); reverting to the last durable state", e)
            self._reload()
            for vol in self.pool.volumes.values():
                vol.inode.incarnation += 1
                self.pool.touch_inode(vol.inode)
            raise
        self.last_commit = time.monotonic()
        return done

    def _reload(self) -> None:
        pid = self.pool.sb.inuse_pid
        try:
            self.pool = Pool.open(self.device, self.cache_bytes)
        except BaseException:
            self.failed = True  # nothing trustworthy is in memory: refuse everything
            raise
        self.pool.ctx.commit = self._commit
        self.pool.sb.inuse_pid = pid
        self.epoch += 1

    def abort(self) -> None:
        """Drop every metadata change since the last commit. (Data written in place into blocks
        live already owned stays written: NBD allows either for unflushed writes.)"""
        with self.lock:
            self._reload()

    def flush(self, ex: Export | None = None) -> None:
        """NBD FLUSH: everything written before it survives a crash. A connection whose writes
        were lost to a failed commit gets an error here rather than a false success."""
        with self.lock:
            if ex is not None:
                self._volume_for(ex)
            self._make_durable()

    def commit_now(self) -> int:
        """Make everything written so far durable; returns the committed generation."""
        with self.lock:
            self._make_durable()
            return self.pool.sb.generation

    def _make_durable(self) -> None:
        """Everything written so far survives a crash: commit, or just sync the data."""
        if not self._commit():
            self.device.sync()

    def tick(self) -> bool:
        """Periodic work: commit a change older than COMMIT_INTERVAL, and take one step of a
        pending delete or rollback. Returns True while background work remains."""
        with self.lock:
            self._usable()
            more = self._background_step()
            if not more and time.monotonic() - self.last_write >= MERGE_IDLE:
                more = self._merge_step()
            if self.pool.is_dirty and time.monotonic() - self.last_commit >= COMMIT_INTERVAL:
                self._commit()
            return more

    # --- exports ------------------------------------------------------------------------------

    def volume(self, name: str) -> Volume:
        self._usable()
        for vol in self.pool.volumes.values():
            if vol.name == name and vol.inode.op != OP_DELETE:
                return vol
        raise NotFound(f"no volume named '{name}' in this pool; 'snapctl volume list' shows them")

    def snapshot(self, name: str) -> SnapshotRecord:
        self._usable()
        check_name(name)
        for rec in self.pool.snapshots.values():
            if rec.name == name and rec.state == SNAP_ACTIVE:
                return rec
        raise NotFound(f"no snapshot named '{name}'; 'snapctl list' shows the snapshots")

    def _latest_of(self, vol: Volume) -> SnapshotRecord | None:
        for sid in reversed(vol.chain):
            rec = self.pool.snapshots[sid]
            if rec.state == SNAP_ACTIVE:
                return rec
        return None

    def export_names(self) -> list[tuple[str, str]]:
        """(export name, description) for every export, for list_exports."""
        with self.lock:
            out: list[tuple[str, str]] = []
            for vol in sorted(self.pool.volumes.values(), key=lambda v: v.ino):
                if vol.inode.op == OP_DELETE:
                    continue
                out.append((vol.name, f"volume {vol.name} ({vol.inode.size} bytes, read-write)"))
                latest = self._latest_of(vol)
                if latest is not None:
                    out.append(
                        (f"{vol.name}@{LATEST}", f"newest snapshot of {vol.name}: {latest.name}")
                    )
                for sid in vol.chain:
                    rec = self.pool.snapshots[sid]
                    if rec.state == SNAP_ACTIVE:
                        out.append((f"{vol.name}@{rec.name}", _describe_snapshot(rec, vol)))
            return out

    def open_export(self, name: str, readonly: bool, client: bool = False) -> Export:
        """Resolve an export name for a connection. client=True counts it as a connected client
        of the volume (rollback refuses while there are any); close it with close_export."""
        with self.lock:
            parsed = parse_export(name)
            vol = self.volume(parsed.volume)
            readonly = readonly or self._is_standby()
            if parsed.snapshot is None:
                if client:
                    self.connections[vol.ino] = self.connections.get(vol.ino, 0) + 1
                return Export(
                    name or DEFAULT_VOLUME,
                    vol.ino,
                    None,
                    readonly,
                    vol.inode.incarnation,
                    vol.inode.size,
                    f"volume {vol.name} ({'read-only' if readonly else 'read-write'})",
                    client,
                )
            if parsed.snapshot == LATEST:
                rec = self._latest_of(vol)
                if rec is None:
                    raise NotFound(
                        f"'{vol.name}@{LATEST}' names nothing yet: volume {vol.name} has no "
                        "snapshots; create one with 'snapctl create NAME'"
                    )
            else:
                rec = self.snapshot(parsed.snapshot)
                if rec.id not in vol.shadows:
                    raise NotFound(f"snapshot '{rec.name}' does not cover volume {vol.name}")
            shadow = vol.shadows[rec.id]
            return Export(
                name,
                vol.ino,
                rec.id,
                readonly or rec.id not in vol.writable,
                vol.inode.incarnation,
                shadow.inode.size,
                _describe_snapshot(rec, vol),
            )

    def close_export(self, ex: Export) -> None:
        """A connection ended (counted for rollback's busy check)."""
        with self.lock:
            if ex.client and self.connections.get(ex.volume_ino):
                self.connections[ex.volume_ino] -= 1
                ex.client = False

    def _volume_for(self, ex: Export) -> Volume:
        self._usable()
        vol = self.pool.volumes.get(ex.volume_ino)
        if vol is None:
            raise ExportGone(f"export {ex.name}: its volume was deleted; reconnect")
        if ex.snap_id is not None:
            rec = self.pool.snapshots.get(ex.snap_id)
            if rec is None or rec.state != SNAP_ACTIVE:
                raise ExportGone(
                    f"export {ex.name}: the snapshot was deleted while this connection was "
                    "open; reconnect to another export"
                )
        elif vol.inode.incarnation != ex.incarnation:
            raise ExportGone(
                f"export {ex.name}: the volume changed under this connection (a rollback, or "
                "a failed commit that reverted unflushed writes); reconnect to see it"
            )
        return vol

    @staticmethod
    def _view(vol: Volume, ex: Export) -> int | None:
        """The snapshot an export reads (None: live). While a rollback runs, live is a mix of
        old and restored blocks, so it reads through the target snapshot, exact at every step."""
        if ex.snap_id is None and vol.inode.op in (OP_ROLLBACK, OP_RECEIVE):
            return vol.inode.op_target or None
        return ex.snap_id

    def _range(self, ex: Export, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > ex.size:
            raise OutOfRange(
                f"export {ex.name}: request [{offset}, {offset + length}) is past its end "
                f"({ex.size} bytes)"
            )

    def _is_standby(self) -> bool:
        sb = self.pool.sb
        return sb.role == ROLE_STANDBY or bool(sb.superseded)

    def _writable(self, ex: Export) -> Volume:
        vol = self._volume_for(ex)
        if self._is_standby():
            raise ReadOnlyExport(
                f"export {ex.name} is read-only: this pool is a standby (fed by its primary)"
                + (
                    " and was superseded: 'snapctl standby demote'"
                    if self.pool.sb.superseded
                    else "; 'snapctl standby promote' makes it writable"
                )
            )
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
        with self.lock:
            vol = self._volume_for(ex)
            self._range(ex, offset, len(out))
            vol.read(self.pool.ctx, self._view(vol, ex), out, offset)

    def _put(self, vol: Volume, ex: Export, data: memoryview, offset: int) -> None:
        """Write into the volume or, for a writable snapshot export, into the snapshot."""
        if ex.snap_id is None:
            self.last_write = time.monotonic()
            vol.write(self.pool.ctx, data, offset, self.cow, self.defer_merge)
        else:
            writable.write_snapshot(self.pool.ctx, vol, ex.snap_id, data, offset)

    def write(self, ex: Export, data: memoryview, offset: int, fua: bool = False) -> None:
        with self.lock:
            vol = self._writable(ex)
            self._range(ex, offset, len(data))
            if len(data):
                try:
                    self._put(vol, ex, data, offset)
                except NoSpace:
                    # Blocks freed since the last commit, and the room kept for committing,
                    # come back with a commit; if the pool is still full, the writer hears it.
                    if not self._commit():
                        raise
                    self._put(vol, ex, data, offset)
            if fua:
                self._make_durable()

    def trim(self, ex: Export, offset: int, length: int, fua: bool = False) -> None:
        """Deallocate the whole blocks inside the range (partial blocks keep their data)."""
        with self.lock:
            vol = self._writable(ex)
            self._range(ex, offset, length)
            bs = self.pool.block_size
            self._deallocate(vol, ex, -(-offset // bs), (offset + length) // bs)
            if fua:
                self._make_durable()

    def _deallocate(self, vol: Volume, ex: Export, first: int, end: int) -> None:
        """Blocks [first, end) read zeros and give their space back, in chunks of one map leaf,
        committing whenever the transaction grows into the reserve (a commit must fit)."""
        chunk = vol.live.capacity
        for start in range(first, end, chunk):
            n = min(chunk, end - start)
            if ex.snap_id is None:
                vol.deallocate(self.pool.ctx, start, n)
            else:
                writable.deallocate_snapshot(self.pool.ctx, vol, ex.snap_id, start, n)
            self._keep_commit_room()

    def zero(
        self, ex: Export, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        """Make the range read zeros: whole blocks are deallocated when the client allows
        (may_trim), else written; partial blocks get zeros unless they read zeros already."""
        with self.lock:
            vol = self._writable(ex)
            self._range(ex, offset, length)
            bs = self.pool.block_size
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
                self._put(vol, ex, memoryview(bytes(n)), pos)
                pos += n
            if fua:
                self._make_durable()

    def extents(self, ex: Export, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_hole) runs from offset; may cover less than length."""
        with self.lock:
            vol = self._volume_for(ex)
            self._range(ex, offset, length)
            bs = self.pool.block_size
            length = min(length, EXTENTS_MAX_BLOCKS * bs - offset % bs)
            return vol.extents(self._view(vol, ex), offset, length, bs)

    # --- checking ---------------------------------------------------------------------------

    def check_committed(self) -> dict[str, object]:
        """Commit, then verify the committed state on disk (checker.py), under the lock."""
        with self.lock:
            self._commit()
            report = check(self.device)
            return {
                "clean": report.clean,
                "fatal": len(report.fatal),
                "defects": [asdict(d) for d in report.defects],
                "stats": report.stats,
            }

    def scrub(self, progress: Progress | None = None) -> dict[str, object]:
        """Read every data block the pool holds (live and every snapshot) and, on a pool with
        data checksums, verify each against its CRC. The lock is taken per block."""
        with self.lock:
            maps = [
                (f"{v.name}@{self.pool.snapshots[s].name}" if s else v.name, v.ino, s)
                for v in self.pool.volumes.values()
                for s in [0, *v.chain]
            ]
            total = sum(
                (v.shadows[s] if s else v.live).inode.owned_blocks
                for v in self.pool.volumes.values()
                for s in [0, *v.chain]
            )
            checksums = self.pool.ctx.checksums
        done = 0
        bad: list[dict[str, object]] = []
        for label, ino, sid in maps:
            with self.lock:
                vol = self.pool.volumes.get(ino)
                m = None if vol is None else (vol.shadows.get(sid) if sid else vol.live)
                todo = (
                    []
                    if m is None
                    else [(b, e) for b, e in m.iter_entries() if e.kind == KIND_ADDR]
                )
            for b, e in todo:
                with self.lock:
                    if m is None or m.get(b) != e:
                        continue  # changed meanwhile: what it holds now is read elsewhere
                    try:
                        read_checked(self.pool.ctx, e)
                    except DittoError as err:
                        bad.append({"map": label, "block": b, "address": e.addr, "error": str(err)})
                done += 1
                if progress and done % 256 == 0:
                    progress(done, total)
        return {
            "blocks": done,
            "bytes": done * self.pool.block_size,
            "checksums": checksums,
            "bad": bad,
        }

    # --- background work ---------------------------------------------------------------------

    def _run_steps(
        self, busy: Callable[[], bool], progress: Progress | None, left: Callable[[], int]
    ) -> None:
        """Run background steps until busy() turns false, releasing the lock between steps.
        busy and left are re-evaluated under the lock against the current pool (it may have
        been reloaded); progress is reported outside the lock, so a slow reader of it never
        stalls requests."""
        total = -1
        while True:
            with self.lock:
                if not busy():
                    break
                if not self._background_step() and busy():
                    break  # nothing left that could end the wait: the caller re-checks
                remaining = left() if progress else 0
            if progress:
                total = max(total, remaining)
                progress(total - remaining, total)
            time.sleep(0)  # let request threads take the lock

    def _step_budget(self) -> Callable[[], bool]:
        """When a background step must stop: after STEP_SECONDS, or once it has dirtied as much
        metadata as a commit on a full pool is sure to find room for."""
        pool = self.pool
        deadline = time.monotonic() + STEP_SECONDS
        start = pool.store.dirty_nodes
        limit = max(8, pool.allocator.reserve // 2) if not pool.sb.growable else 1 << 30

        def stop() -> bool:
            return time.monotonic() >= deadline or pool.store.dirty_nodes - start >= limit

        return stop

    def _background_step(self) -> bool:
        """One bounded step: pending deletes first (a rollback waits for the newer snapshots
        it destroys), then rollbacks. Caller holds the lock. True while work remains."""
        pool = self.pool
        stop = self._step_budget()
        # a snapshot that clones still read waits for them (they go first in a recursive
        # volume delete), so no committed state ever has a clone without its origin
        pending = [
            s
            for s in pool.pending_deletes()
            if not any(pool.clones_of(v, s) for v in pool.covering(s))
        ]
        if pending:
            sid = pending[0]
            done = all(snapops.delete_step(pool.ctx, v, sid, stop) for v in pool.covering(sid))
            if done:
                pool.finish_delete(sid)
            self._keep_commit_room()
            return True
        for vol in list(pool.volumes.values()):
            op = vol.inode.op
            if op == OP_ROLLBACK:
                sid = vol.inode.op_target
                if snapops.rollback_step(pool.ctx, vol, sid, stop):
                    pool.finish_rollback(vol, sid)
                    self._commit()
            elif op == OP_DELETE:
                if pool.clones_of(vol):
                    continue  # its clones go first
                # live first: its incomplete blocks point into the snapshots' blocks
                maps = [vol.live] + [vol.shadows[s] for s in vol.chain]
                if all(snapops.free_map_step(pool.ctx, m, stop) for m in maps):
                    pool.finish_volume_delete(vol)
                    self._commit()
            elif op == OP_FLATTEN:
                vol.inode.op_target = snapops.flatten_step(pool.ctx, vol, vol.inode.op_target, stop)
                pool.touch_inode(vol.inode)
                if vol.inode.op_target >= vol.origin_blocks:
                    vol.inode.op = OP_NONE
                    vol.inode.op_target = vol.inode.origin_vol = vol.inode.origin_snap = 0
                    vol.origin = None
                    self._commit()
            else:
                continue
            self._keep_commit_room()
            return True
        return False

    def _merge_step(self) -> bool:
        """Complete deferred merges while the pool is idle, a bounded batch at a time. True
        while incomplete blocks remain."""
        stop = self._step_budget()
        for vol in self.pool.volumes.values():
            if vol.inode.op != OP_NONE:
                continue  # being rolled back, deleted, flattened or received: not now
            if not vol.incomplete:
                vol.find_incomplete(stop)
            while vol.incomplete and not stop():
                vol.settle(self.pool.ctx, next(iter(vol.incomplete)))
        self._keep_commit_room()
        return any(
            v.inode.op == OP_NONE and v.live.inode.incomplete_blocks and not v.scanned_all
            for v in self.pool.volumes.values()
        )

    def _keep_commit_room(self) -> None:
        """Commit now if the open transaction has eaten into the reserve: a commit must always
        fit in what is left."""
        if self.pool.allocator.tight():
            self._commit()


def _describe_snapshot(rec: SnapshotRecord, vol: Volume) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.created_ns / 1e9))
    mode = "read-write" if rec.id in vol.writable else "read-only"
    return f"snapshot {rec.name} of {vol.name}, taken {when} ({mode})"


MAX_EXPORT_SIZE = (1 << 63) - 1  # NBD sizes are signed 64-bit


def _check_size(size: int) -> None:
    if size <= 0:
        raise InvalidArgument(f"size {size}: the live volume needs a size > 0")
    if size > MAX_EXPORT_SIZE:
        raise InvalidArgument(
            f"size {size} is larger than NBD can export ({MAX_EXPORT_SIZE} bytes)"
        )


def _lock(device: Device) -> None:
    """Take the disk's lock; when it is held, name the holder from the pool's in-use record
    (the lock itself may carry the PID of a parent that forked the server and exited)."""
    try:
        device.lock()
    except PoolBusy as e:
        try:
            pid = read_superblock(device).inuse_pid
        except DittoError:
            raise e from None
        if pid and pid_alive(pid):
            raise PoolBusy(
                f"{device.path} is in use by process {pid}; stop that server (or use "
                "'snapctl -d DISK ...', which talks to it) instead of opening the pool twice"
            ) from None
        raise

"""The engine core: one open pool, its lock, its commit and what every operation module shares.

`EngineCore` owns
* the engine lock: every operation takes it (an RLock, so one operation may call another), which
  makes the engine correct under any nbdkit thread model and beside the control thread;
* the open pool and its commit, with the failure path: a failed commit reverts to what is
  durable and fails every connection whose unflushed writes that dropped;
* the bounded steps long operations are cut into (`step_budget`, `keep_commit_room`);
* the registry of connected clients and of snapshots pinned by streams being sent;
* name resolution: volumes and snapshots by name or GUID.

The operation modules (exports, snapshot_ops, volume_ops, replication, roles, background,
pool_ops) each receive the core and reach the pool only through it. None holds state another
module reads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .device import Device
from .errors import (
    CorruptMetadata,
    DamagedPool,
    DittoError,
    InvalidArgument,
    NoSpace,
    NotFound,
    Refused,
)
from .layout import (
    DEFER_GENERATIONS,
    OP_DELETE,
    OP_FLATTEN,
    OP_NONE,
    OP_RECEIVE,
    OP_ROLLBACK,
    ROLE_STANDBY,
    SNAP_ACTIVE,
    SnapshotRecord,
)
from .names import check_name
from .opening import read_only_disk
from .txn import Pool
from .volume import COW_COPY, COW_MOVE, MERGE_DEFERRED, MERGE_IMMEDIATE, Volume

T = TypeVar("T")

log = logging.getLogger("dittofs")

MAKE_ROOM_MERGES = 256  # merges a write that found the pool full may wait for

Progress = Callable[[int, int], None]  # (done, total) of a long operation

COMMIT_INTERVAL = 5.0  # seconds a change may wait before the ticker commits it
STEP_SECONDS = 0.02  # longest a background step holds the lock


class EngineCore:
    def __init__(
        self, device: Device, pool: Pool, cow: str, cache_bytes: int, merge: str = MERGE_DEFERRED
    ) -> None:
        if cow not in (COW_MOVE, COW_COPY):
            raise InvalidArgument(f"cow={cow}: use cow=move or cow=copy")
        if merge not in (MERGE_DEFERRED, MERGE_IMMEDIATE):
            raise InvalidArgument(f"merge={merge}: use merge=deferred or merge=immediate")
        self.device = device
        self.pool = pool
        pool.ctx.commit = self.commit  # copy-on-write commits get the reload-on-failure path
        self.cow = cow
        self.defer_merge = merge == MERGE_DEFERRED
        self.cache_bytes = cache_bytes
        self.lock = threading.RLock()
        self.last_commit = time.monotonic()
        self.last_write = 0.0  # monotonic time of the last live write (background merges wait)
        self.claimed_pid = 0
        self.connections: dict[int, int] = {}  # volume ino -> open client connections
        self.pins: dict[int, int] = {}  # snapshot id -> streams being sent from it
        self.epoch = 0  # bumped whenever the pool is reloaded from disk
        self.failed = False
        # failed commits so far. A connection remembers the count it opened at; once it moves,
        # the connection's unflushed writes may be gone and it is told. Never reset: a reload
        # from disk cannot bring a failure back to a count a connection already saw.
        self.failures = 0
        # a failback in progress: live is read-only until the peer holds the final snapshot.
        # Kept in memory only, so a crash in the middle brings the pool back a primary.
        self.handing_over = False
        self.endpoint: Any = None  # the standby replication endpoint, when this process runs one
        # the background scrub (scrub.py): its rate clock and what it found, since this process
        # started it (its position and counters are in the superblock)
        self.started_scrub = 0.0
        self.scrubbed_since_start = 0
        self.scrub_found: list[str] = []

    # --- the pool's lifetime ------------------------------------------------------------------

    def claim(self, pid: int) -> None:
        """Record this process in the pool's in-use record (and commit it). A degraded pool
        is not written at all: the device lock alone keeps a second server out."""
        with self.lock:
            if self.pool.read_only_reason:
                log.warning("%s: %s", self.device.path, self.pool.read_only_reason)
                return
            self.pool.set_inuse(pid)
            self.commit()
            self.claimed_pid = pid

    def close(self) -> None:
        with self.lock:
            if self.device.fd < 0:
                return
            try:
                if self.claimed_pid:
                    self.pool.set_inuse(0)
                if not self.pool.damage:
                    self.pool.forget_in_place()  # nothing for the next open to retake
                    self.commit()
            finally:
                self.device.close()

    def usable(self) -> None:
        if self.failed:
            raise DittoError(
                "the pool could not be reloaded after a failed commit; nothing is served until "
                "the server is restarted (then run 'snapctl check')"
            )

    # --- commit -------------------------------------------------------------------------------

    def commit(self) -> bool:
        """Make the open transaction durable. Caller holds the lock. On failure the open
        transaction is unusable: fall back to what is durable, so nothing half-written is ever
        served, and make every connection to a volume fail from now on (its unflushed writes
        are gone; it must know)."""
        self.usable()
        if self.device.read_only_device and self.pool.is_dirty:
            self.reload()  # what cannot be written is dropped; nothing was acknowledged
            raise read_only_disk(self.device.path)
        if self.pool.damage and self.pool.is_dirty:
            reason = self.pool.read_only_reason or ""
            self.reload()  # the same: a degraded pool takes no change
            raise DamagedPool(reason)
        try:
            done = self.pool.commit()
        except BaseException as e:
            self.failures += 1
            log.error(
                "commit failed (%s); reverting to the last durable state. Every connection "
                "to %s opened before now fails until it reconnects (its unflushed writes are "
                "gone)",
                e,
                self.reverted_exports(),
            )
            self.reload()
            raise
        self.last_commit = time.monotonic()
        return done

    def reload(self) -> None:
        """Drop the open transaction: the pool as it was at the last commit."""
        pid = self.pool.sb.inuse_pid
        try:
            self.pool = Pool.open(self.device, self.cache_bytes)
        except BaseException:
            self.failed = True  # nothing trustworthy is in memory: refuse everything
            raise
        self.pool.ctx.commit = self.commit
        self.pool.sb.inuse_pid = pid
        self.epoch += 1

    def make_durable(self) -> None:
        """Everything written so far survives a crash: commit, or just sync the data (which
        is all that writes in place need, on the in-place list too: inplace.py)."""
        if not self.pool.is_dirty or not self.commit():
            self.device.sync()

    def commit_if_due(self) -> None:
        """Commit a change older than COMMIT_INTERVAL (the ticker's bound on loss)."""
        if self.pool.is_pending and time.monotonic() - self.last_commit >= COMMIT_INTERVAL:
            self.commit()

    def make_room(self) -> bool:
        """Short of space: merge the incomplete blocks that hold a base of their own, then
        commit until the frees waiting in the deferral window are reusable (this gives up the
        rewind window, which is what space pressure must take first). False when there was
        nothing to give back."""
        alloc = self.pool.allocator
        settled = 0
        for vol in self.pool.volumes.values():
            if vol.inode.op != OP_NONE:
                continue
            # partial overwrites that kept live's old block as their base give it back: a
            # bounded batch (the write waits for it), in steps a commit on a full pool fits
            todo = vol.own_base_blocks()[:MAKE_ROOM_MERGES]
            while todo:
                stop = self.step_budget()
                while todo:
                    vol.settle(self.pool.ctx, todo.pop())
                    settled += 1
                    if stop():
                        break
                self.commit()
        if not settled and not alloc.waiting and not self.pool.is_dirty:
            return False
        for _ in range(DEFER_GENERATIONS + 1):
            if not self.pool.allocator.waiting and not self.pool.is_dirty:
                break
            self.pool.sb_dirty = True
            self.commit()
        return True

    def making_room(self, change: Callable[[], T]) -> T:
        """Run change; if the pool has no room for it, make room (merges, and commits that let
        the deferral window's frees expire) and run it once more. change must leave nothing
        behind when it raises NoSpace (allocations are taken whole or not at all). Every
        writer goes through here: live and snapshot writes, receive, flatten."""
        try:
            return change()
        except NoSpace:
            if not self.make_room():
                raise
            return change()

    def keep_commit_room(self) -> None:
        """Commit now if the open transaction has eaten into the reserve: a commit must always
        fit in what is left."""
        if self.pool.allocator.tight():
            self.commit()

    def step_budget(self) -> Callable[[], bool]:
        """When a bounded step must stop: after STEP_SECONDS, or once it has dirtied as much
        metadata as a commit on a full pool is sure to find room for."""
        pool = self.pool
        deadline = time.monotonic() + STEP_SECONDS
        start = pool.store.dirty_nodes
        limit = max(8, pool.allocator.reserve // 2) if not pool.sb.growable else 1 << 30

        def stop() -> bool:
            return time.monotonic() >= deadline or pool.store.dirty_nodes - start >= limit

        return stop

    # --- space --------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Space new data can still take: the pool's free blocks, and for an image file also
        what the file system under it has left."""
        pool = self.pool
        free = pool.allocator.available * pool.block_size
        if pool.sb.growable:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.device.path)) or ".")
            free += st.f_bavail * st.f_frsize
        return free

    def check_snapshot_room(self) -> None:
        """Refuse a new snapshot below the pool's snapshot-min-free (live writes go on)."""
        minimum = self.pool.sb.snapshot_min_free * self.pool.block_size
        if not minimum:
            return
        if self.free_bytes() < minimum:
            self.make_room()  # the deferral window's frees count: pressure gives up rewind first
        if self.free_bytes() < minimum:
            raise Refused(
                f"only {self.free_bytes()} bytes are free, below the {minimum} kept for new "
                "snapshots (live writes go on): delete snapshots, or lower the minimum with "
                "'snapctl tune snapshot-min-free=SIZE'"
            )

    # --- names --------------------------------------------------------------------------------

    def volume(self, name: str) -> Volume:
        self.usable()
        for vol in self.pool.volumes.values():
            if vol.name == name and vol.inode.op != OP_DELETE:
                return vol
        raise NotFound(
            f"no volume named '{name}' in this pool; 'snapctl volume list' shows them"
            + self._lost_note("inode table", "volume")
        )

    def snapshot(self, name: str) -> SnapshotRecord:
        self.usable()
        check_name(name)
        for rec in self.pool.snapshots.values():
            if rec.name == name and rec.state == SNAP_ACTIVE:
                return rec
        raise NotFound(
            f"no snapshot named '{name}'; 'snapctl list' shows the snapshots"
            + self._lost_note("snapshot table", "snapshot")
        )

    def _lost_note(self, table: str, what: str) -> str:
        """A name not found in a degraded pool may be one its damaged table lost."""
        if table not in self.pool.damage:
            return ""
        return (
            f" (the {table} is damaged, so a {what} in its lost part cannot be named: "
            f"{self.pool.read_only_reason})"
        )

    def snapshot_by_guid(self, guid: bytes) -> SnapshotRecord:
        for rec in self.pool.snapshots.values():
            if rec.guid == guid and rec.state == SNAP_ACTIVE:
                return rec
        raise NotFound(f"no snapshot with GUID {guid.hex()} in this pool")

    def active_snapshots(self) -> list[SnapshotRecord]:
        """Every active snapshot, oldest first."""
        return sorted(
            (r for r in self.pool.snapshots.values() if r.state == SNAP_ACTIVE),
            key=lambda r: r.id,
        )

    def latest_of(self, vol: Volume) -> SnapshotRecord | None:
        for sid in reversed(vol.chain):
            rec = self.pool.snapshots[sid]
            if rec.state == SNAP_ACTIVE:
                return rec
        return None

    def require_readable(self, vol: Volume, rec: SnapshotRecord | None = None) -> None:
        """Refuse a volume or snapshot that a degraded open found it cannot read exactly (its
        chain passes through a damaged table): a clean error, never wrong data."""
        pool = self.pool
        if not pool.damage:
            return
        why = pool.unreadable_volumes.get(vol.ino)
        # live in the middle of a rollback or a receive reads through the target snapshot
        pending = vol.inode.op in (OP_ROLLBACK, OP_RECEIVE) and vol.inode.op_target
        through = rec.id if rec is not None else vol.inode.op_target if pending else 0
        if (
            why is None
            and through
            and (through <= pool.unreadable_below or through not in vol.shadows)
        ):
            why = "a snapshot map it reads through is in a damaged table"
        if why is not None:
            what = f"{vol.name}@{rec.name}" if rec is not None else vol.name
            reason = pool.read_only_reason or ""
            raise CorruptMetadata(
                f"{what} cannot be read exactly: {why}. {reason[:1].upper()}{reason[1:]}",
                -1,
                "table",
            )

    def require_covers(self, vol: Volume, rec: SnapshotRecord) -> None:
        """Refuse a snapshot that does not cover the volume."""
        if rec.id not in vol.shadows:
            raise NotFound(f"snapshot '{rec.name}' does not cover volume {vol.name}")

    @staticmethod
    def busy_with(vol: Volume) -> str:
        """What the volume's pending operation is, for a refusal that must wait for it."""
        return {
            OP_ROLLBACK: "being rolled back",
            OP_DELETE: "being deleted",
            OP_FLATTEN: "being flattened",
            OP_RECEIVE: "receiving a replication stream (resume it with 'snapctl send "
            "--resume', or discard it with 'snapctl receive --abort')",
        }.get(vol.inode.op, "busy")

    def is_standby(self) -> bool:
        """Live is read-only: a standby, a superseded primary, or one handing its role over."""
        sb = self.pool.sb
        return sb.role == ROLE_STANDBY or bool(sb.superseded) or self.handing_over

    def reverted_exports(self) -> str:
        """What a failed commit reverts: every volume, and every writable snapshot (read-only
        snapshots never change, so their connections go on)."""
        names = [v.name for v in self.pool.volumes.values()]
        for vol in self.pool.volumes.values():
            names += [f"{vol.name}@{self.pool.snapshots[s].name}" for s in sorted(vol.writable)]
        return ", ".join(names) or "no export"

    def fail_connections(self) -> None:
        """Every connection to a volume gets ExportGone from its next request on (a role
        change). Caller holds the lock and commits."""
        for vol in self.pool.volumes.values():
            vol.inode.incarnation += 1
            self.pool.touch_inode(vol.inode)


class OperationModule:
    """Base of the operation modules: the core they share, with its pool and lock at hand (the
    pool object changes when a failed commit reloads it, so it is always read through the
    core)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    @property
    def pool(self) -> Pool:
        return self.core.pool

    @property
    def lock(self) -> threading.RLock:
        return self.core.lock

"""The engine facade: the one object the nbdkit plugin, the control plane and snapctl call.

`Engine` composes the engine core (core.py: lock, pool, commit, names, connections) with one
operation module per domain and delegates each public method to the module that owns it:

    exports.py        export names, connections, the request path (read, write, flush, ...)
    snapshot_ops.py   create, rename, holds, delete, prune, rollback, diff, space, list, set
    volume_ops.py     volumes, clones, flatten, promote
    replication.py    replication streams: send, receive, resume, abort
    roles.py          standby roles and replication snapshots (standby.py drives them)
    background.py     bounded steps of long operations, deferred merges, periodic commits
    pool_ops.py       info, tune, commit, check, scrub

Opening and formatting a disk is opening.py. Nothing here decides anything: a new operation
belongs in its module, with one delegating method here (and, for snapctl, a declaration in
operations.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .background import MERGE_IDLE, BackgroundWork
from .core import STEP_SECONDS, EngineCore, Progress
from .device import Device
from .exports import Export, ExportRequests
from .layout import DEFAULT_BLOCK_SIZE, DEFAULT_METADATA_COPIES, SnapshotRecord
from .names import DEFAULT_VOLUME
from .opening import format_disk, open_pool, rewind_disk, rewind_list
from .pool_ops import PoolOps
from .replication import ByteSink, ByteSource, ReplicationStreams
from .roles import StandbyRoles
from .scrub import Scrub
from .snapshot_ops import DEFAULT_HOLD_TAG, SnapshotInfo, SnapshotOps
from .txn import DEFAULT_CACHE_BYTES, Pool
from .upgrade import upgrade_disk
from .volume import COW_MOVE, MERGE_DEFERRED, Volume
from .volume_ops import VolumeOps

__all__ = ["MERGE_IDLE", "STEP_SECONDS", "Engine", "Export", "Progress"]


class Engine:
    def __init__(
        self, device: Device, pool: Pool, cow: str, cache_bytes: int, merge: str = MERGE_DEFERRED
    ) -> None:
        self.core = EngineCore(device, pool, cow, cache_bytes, merge)
        self.background = BackgroundWork(self.core)
        self.exports = ExportRequests(self.core)
        self.snapshots = SnapshotOps(self.core, self.background)
        self.volumes = VolumeOps(self.core, self.background)
        self.replication = ReplicationStreams(self.core, self.snapshots)
        self.roles = StandbyRoles(self.core, self.snapshots)
        self.pool_ops = PoolOps(self.core)
        self.scrubber = Scrub(self.core)

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
        serve: bool = False,
        metadata_copies: int = DEFAULT_METADATA_COPIES,
        rewind: int | None = None,
    ) -> Engine:
        """Open (with create_size and a missing path: create) the pool on path, exclusively.
        serve (implied by claim): the caller will write to it, so a read-only device is refused
        at once."""
        device, pool = open_pool(
            path,
            create_size=create_size,
            block_size=block_size,
            cache_bytes=cache_bytes,
            checksums=checksums,
            serve=serve or claim,
            metadata_copies=metadata_copies,
            rewind=rewind,
        )
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
        metadata_copies: int = DEFAULT_METADATA_COPIES,
    ) -> dict[str, object]:
        """Make a pool on path (opening.format_disk)."""
        return format_disk(path, size, block_size, force, checksums, metadata_copies)

    @staticmethod
    def upgrade(path: str) -> dict[str, object]:
        """Upgrade the pool on path to this release's format version (upgrade.py)."""
        return upgrade_disk(path)

    @staticmethod
    def rewind_list(path: str) -> list[dict[str, object]]:
        """The generations the pool on path can be opened at (rewind.py)."""
        return rewind_list(path)

    @staticmethod
    def rewind(path: str, generation: int) -> dict[str, object]:
        """Open the pool on path at generation, committed as its newest (rewind.py)."""
        return rewind_disk(path, generation)

    def claim(self, pid: int) -> None:
        self.core.claim(pid)

    def close(self) -> None:
        self.core.close()

    def abort(self) -> None:
        """Drop every metadata change since the last commit. (Data written in place into blocks
        live already owned stays written: NBD allows either for unflushed writes.)"""
        with self.core.lock:
            self.core.reload()

    # --- the core's state, for the edges and the tests ------------------------------------------

    @property
    def device(self) -> Device:
        return self.core.device

    @property
    def pool(self) -> Pool:
        return self.core.pool

    @property
    def lock(self) -> threading.RLock:
        return self.core.lock

    @property
    def cow(self) -> str:
        return self.core.cow

    @property
    def connections(self) -> dict[int, int]:
        return self.core.connections

    @property
    def endpoint(self) -> Any:
        return self.core.endpoint

    @endpoint.setter
    def endpoint(self, value: Any) -> None:
        self.core.endpoint = value

    def volume(self, name: str) -> Volume:
        return self.core.volume(name)

    def snapshot(self, name: str) -> SnapshotRecord:
        return self.core.snapshot(name)

    def snapshot_by_guid(self, guid: bytes) -> SnapshotRecord:
        return self.core.snapshot_by_guid(guid)

    def free_bytes(self) -> int:
        return self.core.free_bytes()

    # --- exports and requests (exports.py) ------------------------------------------------------

    def export_names(self) -> list[tuple[str, str]]:
        return self.exports.export_names()

    def open_export(self, name: str, readonly: bool, client: bool = False) -> Export:
        return self.exports.open_export(name, readonly, client)

    def close_export(self, ex: Export) -> None:
        self.exports.close_export(ex)

    def read(self, ex: Export, out: memoryview, offset: int) -> None:
        self.exports.read(ex, out, offset)

    def write(self, ex: Export, data: memoryview, offset: int, fua: bool = False) -> None:
        self.exports.write(ex, data, offset, fua)

    def flush(self, ex: Export | None = None) -> None:
        self.exports.flush(ex)

    def trim(self, ex: Export, offset: int, length: int, fua: bool = False) -> None:
        self.exports.trim(ex, offset, length, fua)

    def zero(
        self, ex: Export, offset: int, length: int, fua: bool = False, may_trim: bool = True
    ) -> None:
        self.exports.zero(ex, offset, length, fua, may_trim)

    def extents(self, ex: Export, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self.exports.extents(ex, offset, length)

    # --- background work (background.py) ------------------------------------------------------

    def tick(self, merges: bool = True) -> bool:
        if self.core.pool.damage:
            return False  # a degraded pool changes nothing (txn.Pool._damaged)
        more = self.background.tick(merges)
        with self.core.lock:
            return self.scrubber.step() or more

    # --- snapshots (snapshot_ops.py) ------------------------------------------------------------

    def create_snapshot(
        self,
        name: str,
        volumes: list[str] | None = None,
        writable: bool = False,
        replication: bool = False,
    ) -> SnapshotInfo:
        return self.snapshots.create_snapshot(name, volumes, writable, replication)

    def rename_snapshot(self, old: str, new: str) -> None:
        self.snapshots.rename_snapshot(old, new)

    def hold(self, name: str, tag: str = DEFAULT_HOLD_TAG) -> list[str]:
        return self.snapshots.hold(name, tag)

    def release(self, name: str, tag: str = DEFAULT_HOLD_TAG) -> list[str]:
        return self.snapshots.release(name, tag)

    def delete_snapshots(
        self,
        names: list[str],
        progress: Progress | None = None,
        dry_run: bool = False,
        if_exists: bool = False,
    ) -> list[dict[str, Any]]:
        return self.snapshots.delete_snapshots(names, progress, dry_run, if_exists)

    def delete_snapshot(
        self, name: str, progress: Progress | None = None, dry_run: bool = False
    ) -> int:
        return self.snapshots.delete_snapshot(name, progress, dry_run)

    def prune(
        self,
        keep_last: int,
        keep_hourly: int = 0,
        keep_daily: int = 0,
        prefix: str = "",
        dry_run: bool = False,
    ) -> list[dict[str, Any]]:
        return self.snapshots.prune(keep_last, keep_hourly, keep_daily, prefix, dry_run)

    def rollback(
        self,
        name: str,
        volume: str = DEFAULT_VOLUME,
        destroy_newer: bool = False,
        force: bool = False,
        progress: Progress | None = None,
    ) -> list[str]:
        return self.snapshots.rollback(name, volume, destroy_newer, force, progress)

    def diff_blocks(
        self, from_name: str, to_name: str | None, volume: str = DEFAULT_VOLUME
    ) -> list[tuple[int, int]]:
        return self.snapshots.diff_blocks(from_name, to_name, volume)

    def space(
        self, from_name: str | None = None, to_name: str | None = None, volume: str = DEFAULT_VOLUME
    ) -> dict[str, Any]:
        return self.snapshots.space(from_name, to_name, volume)

    def list_snapshots(self) -> list[SnapshotInfo]:
        return self.snapshots.list_snapshots()

    def snapshot_names(self) -> list[str]:
        return self.snapshots.snapshot_names()

    def set_writable(self, name: str, on: bool) -> None:
        self.snapshots.set_writable(name, on)

    # --- volumes and clones (volume_ops.py) ---------------------------------------------------

    def create_volume(self, name: str, size: int) -> dict[str, Any]:
        return self.volumes.create_volume(name, size)

    def list_volumes(self) -> list[dict[str, Any]]:
        return self.volumes.list_volumes()

    def resize_volume(self, name: str, size: int, force: bool = False) -> dict[str, Any]:
        return self.volumes.resize_volume(name, size, force)

    def delete_volume(
        self, name: str, recursive: bool = False, progress: Progress | None = None
    ) -> list[str]:
        return self.volumes.delete_volume(name, recursive, progress)

    def clone(self, source: str, name: str) -> dict[str, Any]:
        return self.volumes.clone(source, name)

    def flatten(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        return self.volumes.flatten(name, progress)

    def promote(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        return self.volumes.promote(name, progress)

    # --- replication streams (replication.py) --------------------------------------------------

    def stream_size(self, from_name: str | None, to_name: str) -> dict[str, int]:
        return self.replication.stream_size(from_name, to_name)

    def send(
        self,
        from_name: str | None,
        to_name: str,
        sink: ByteSink,
        mac_key: bytes | None = None,
        resume: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, int]:
        return self.replication.send(from_name, to_name, sink, mac_key, resume, progress)

    def receive(
        self,
        source: ByteSource,
        mac_key: bytes | None = None,
        force: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        return self.replication.receive(source, mac_key, force, progress)

    def resume_token(self) -> str | None:
        return self.replication.resume_token()

    def abort_receive(self) -> dict[str, Any]:
        return self.replication.abort_receive()

    # --- the pool (pool_ops.py) ---------------------------------------------------------------

    def info(self) -> dict[str, object]:
        return self.pool_ops.info()

    def tune(self, snapshot_min_free: int | None = None) -> dict[str, int]:
        return self.pool_ops.tune(snapshot_min_free)

    def commit_now(self) -> int:
        return self.pool_ops.commit_now()

    def check_committed(self) -> dict[str, object]:
        return self.pool_ops.check_committed()

    def scrub_start(self, rate: int = 0) -> dict[str, object]:
        return self.scrubber.start(rate)

    def scrub_stop(self) -> dict[str, object]:
        return self.scrubber.stop()

    def scrub_status(self) -> dict[str, object]:
        return self.scrubber.status()

    def scrub(self, progress: Progress | None = None) -> dict[str, object]:
        return self.pool_ops.scrub(progress)

"""Snapshot operations: create, rename, holds, delete, prune, rollback, diff, space, listing.

Every operation validates everything before it changes anything, so a refused command leaves the
pool byte-identical; every change commits before it returns. Deletes and rollbacks are recorded
and committed first, then run in bounded background steps (background.py). Space figures come
from the shadow maps and their counters, never from data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import retention
from . import snapshots as snapops
from .background import BackgroundWork
from .core import EngineCore, OperationModule, Progress
from .errors import InvalidArgument, InvalidName, NameTaken, NotFound, Refused
from .layout import (
    HOLD_TAG_MAX,
    MAX_HOLDS,
    OP_DELETE,
    OP_FLATTEN,
    OP_NONE,
    OP_ROLLBACK,
    SNAP_ACTIVE,
    SNAPF_REPLICATION,
    SNAPF_WRITABLE,
    SnapshotRecord,
)
from .names import DEFAULT_VOLUME, check_name

DEFAULT_HOLD_TAG = "hold"


@dataclass
class SnapshotInfo:
    name: str
    id: int
    guid: str
    created_ns: int
    volumes: list[str]
    used_bytes: int
    referenced_bytes: int
    written_bytes: int
    holds: list[str]


def check_tag(tag: str) -> str:
    if not (1 <= len(tag) <= HOLD_TAG_MAX):
        raise InvalidName(f"a hold tag is 1-{HOLD_TAG_MAX} characters; '{tag[:40]}' is not")
    try:
        check_name(tag, "hold tag")
    except InvalidName as e:
        if tag != "latest":
            raise InvalidName(str(e).replace("hold tag name", "hold tag")) from None
    return tag


class SnapshotOps(OperationModule):
    def __init__(self, core: EngineCore, background: BackgroundWork) -> None:
        super().__init__(core)
        self.background = background

    # --- create, rename, holds ----------------------------------------------------------------

    def _name_free(self, name: str) -> None:
        check_name(name)
        if any(r.name == name and r.state == SNAP_ACTIVE for r in self.pool.snapshots.values()):
            raise NameTaken(f"a snapshot named '{name}' already exists; pick another name")

    def create_snapshot(
        self,
        name: str,
        volumes: list[str] | None = None,
        writable: bool = False,
        replication: bool = False,
    ) -> SnapshotInfo:
        """A new snapshot of the volumes (all of them by default, in one transaction: one point
        in time for all, a consistency group); writable snapshots export read-write."""
        with self.lock:
            self._name_free(name)
            if volumes:
                vols = [self.core.volume(v) for v in dict.fromkeys(volumes)]
            else:
                vols = sorted(
                    (v for v in self.pool.volumes.values() if v.inode.op != OP_DELETE),
                    key=lambda v: v.ino,
                )
            for vol in vols:
                if vol.inode.op not in (OP_NONE, OP_FLATTEN):
                    raise Refused(
                        f"volume {vol.name} is {self.core.busy_with(vol)}; try again after"
                    )
            self.core.check_snapshot_room()
            flags = (SNAPF_WRITABLE if writable else 0) | (SNAPF_REPLICATION if replication else 0)
            rec = self.pool.create_snapshot(name, vols, flags)
            if writable:
                for vol in vols:
                    vol.writable.add(rec.id)
            self.core.commit()
            return self._info(rec)

    def rename_snapshot(self, old: str, new: str) -> None:
        with self.lock:
            rec = self.core.snapshot(old)
            self._name_free(new)
            rec.name = new
            self.pool.touch_snapshot(rec)
            self.core.commit()

    def hold(self, name: str, tag: str = DEFAULT_HOLD_TAG) -> list[str]:
        """Protect a snapshot from delete, prune and rollback --destroy-newer."""
        with self.lock:
            rec = self.core.snapshot(name)
            check_tag(tag)
            if tag in rec.holds:
                raise NameTaken(f"snapshot '{name}' already has a hold tagged '{tag}'")
            if len(rec.holds) >= MAX_HOLDS:
                raise Refused(
                    f"snapshot '{name}' already has {MAX_HOLDS} holds, the most a "
                    "snapshot can carry; release one first"
                )
            rec.holds.append(tag)
            self.pool.touch_snapshot(rec)
            self.core.commit()
            return list(rec.holds)

    def release(self, name: str, tag: str = DEFAULT_HOLD_TAG) -> list[str]:
        with self.lock:
            rec = self.core.snapshot(name)
            if tag not in rec.holds:
                held = ", ".join(rec.holds) or "none"
                raise NotFound(f"snapshot '{name}' has no hold tagged '{tag}' (holds: {held})")
            rec.holds.remove(tag)
            self.pool.touch_snapshot(rec)
            self.core.commit()
            return list(rec.holds)

    # --- delete and prune ---------------------------------------------------------------------

    def _deletable(self, rec: SnapshotRecord) -> None:
        if self.core.pins.get(rec.id):
            raise Refused(f"snapshot '{rec.name}' is being sent; try again when the send ends")
        for vol in self.pool.volumes.values():
            if vol.inode.op == OP_ROLLBACK and vol.inode.op_target == rec.id:
                raise Refused(
                    f"volume {vol.name} is being rolled back to '{rec.name}'; wait for it"
                )
        clones = [
            c.name for v in self.pool.covering(rec.id) for c in self.pool.clones_of(v, rec.id)
        ]
        if clones:
            raise Refused(
                f"snapshot '{rec.name}' has clones ({', '.join(clones)}); flatten them "
                "('snapctl flatten NAME') or delete them first"
            )
        if rec.holds:
            raise Refused(
                f"snapshot '{rec.name}' is held ({', '.join(rec.holds)}); release the holds "
                f"with 'snapctl release {rec.name} --tag TAG' first"
            )

    def delete_snapshots(
        self,
        names: list[str],
        progress: Progress | None = None,
        dry_run: bool = False,
        if_exists: bool = False,
    ) -> list[dict[str, Any]]:
        """Delete snapshots, all or none: every name is checked (exists, not held, not a
        rollback target) before anything changes. Each result says the data bytes its delete
        frees, in the order given (a later one may free blocks only an earlier one relied on).
        Readers of a deleted snapshot get ExportGone from the moment it is marked."""
        with self.lock:
            by_name: dict[str, dict[str, Any]] = {}
            recs: list[SnapshotRecord] = []
            for name in dict.fromkeys(names):
                try:
                    rec = self.core.snapshot(name)
                except NotFound:
                    if not if_exists:
                        raise
                    by_name[name] = {
                        "name": name,
                        "missing": True,
                        "deleted": False,
                        "freed_bytes": 0,
                    }
                    continue
                self._deletable(rec)
                recs.append(rec)
            freed = self._freed_in_order([r.id for r in recs])
            for rec, n in zip(recs, freed, strict=True):
                by_name[rec.name] = {
                    "name": rec.name,
                    "missing": False,
                    "deleted": not dry_run,
                    "freed_bytes": n * self.pool.block_size,
                }
            results = [by_name[n] for n in dict.fromkeys(names)]
            if dry_run or not recs:
                return results
            for rec in recs:
                self.pool.mark_deleting(rec)
            self.core.commit()
        ids = [r.id for r in recs]
        self.background.run_until_done(
            lambda: any(s in self.pool.snapshots for s in ids),
            progress,
            lambda: sum(
                v.shadows[s].inode.entry_count
                for s in ids
                if s in self.pool.snapshots
                for v in self.pool.covering(s)
            ),
        )
        with self.lock:
            self.core.commit()
        return results

    def delete_snapshot(
        self, name: str, progress: Progress | None = None, dry_run: bool = False
    ) -> int:
        """Delete one snapshot; returns the data bytes freed (dry_run: that would be)."""
        result = self.delete_snapshots([name], progress, dry_run)
        return int(result[0]["freed_bytes"])

    def _freed_in_order(self, ids: list[int]) -> list[int]:
        """Blocks each delete in turn frees, given the snapshots already being deleted."""
        out = [0] * len(ids)
        pool = self.pool
        deleting = set(pool.pending_deletes())
        for vol in pool.volumes.values():
            gone = {s for s in deleting if s in vol.shadows}
            before = snapops.freed_by_deleting(vol, gone)
            for i, sid in enumerate(ids):
                if sid in vol.shadows:
                    gone.add(sid)
                    after = snapops.freed_by_deleting(vol, gone)
                    out[i] += after - before
                    before = after
        return out

    def prune(
        self,
        keep_last: int,
        keep_hourly: int = 0,
        keep_daily: int = 0,
        prefix: str = "",
        dry_run: bool = False,
    ) -> list[dict[str, Any]]:
        """Apply a retention policy (retention.py); held snapshots are never deleted."""
        if keep_last < 0 or keep_hourly < 0 or keep_daily < 0:
            raise InvalidArgument("--keep-* counts must not be negative")
        with self.lock:
            candidates = [
                retention.Candidate(r.name, r.created_ns, list(r.holds))
                for r in self.pool.snapshots.values()
                if r.state == SNAP_ACTIVE
            ]
            verdicts = retention.plan(candidates, keep_last, keep_hourly, keep_daily, prefix)
        doomed = [v.name for v in verdicts if not v.keep]
        freed = {
            r["name"]: r["freed_bytes"] for r in self.delete_snapshots(doomed, dry_run=dry_run)
        }
        out = [
            {
                "name": v.name,
                "keep": v.keep,
                "reasons": v.reasons,
                "freed_bytes": freed.get(v.name, 0),
            }
            for v in verdicts
        ]
        return out

    # --- rollback -----------------------------------------------------------------------------

    def rollback(
        self,
        name: str,
        volume: str = DEFAULT_VOLUME,
        destroy_newer: bool = False,
        force: bool = False,
        progress: Progress | None = None,
        release_holds: bool = False,
        with_change: Callable[[], None] | None = None,
    ) -> list[str]:
        """Make the volume read exactly what snapshot name held (the patent's restore). Newer
        snapshots must go first (destroy_newer does it); connected clients must be gone unless
        force, after which their requests fail until they reconnect. Returns the names of the
        snapshots destroyed.

        For role changes (roles.py), which must be all or nothing across a crash:
        release_holds drops the newer snapshots' holds instead of refusing, and with_change
        makes another change to the pool; both commit in the one transaction that starts the
        rollback."""
        with self.lock:
            rec = self.core.snapshot(name)
            vol = self.core.volume(volume)
            self.core.require_covers(vol, rec)
            if vol.inode.op != OP_NONE:
                raise Refused(f"volume {vol.name} is already being rolled back; wait for it")
            newer = [
                self.pool.snapshots[s]
                for s in vol.chain
                if s > rec.id and self.pool.snapshots[s].state == SNAP_ACTIVE
            ]
            if newer and not destroy_newer:
                raise Refused(
                    f"snapshots newer than '{name}' exist ({', '.join(r.name for r in newer)}); "
                    "delete them first, or add --destroy-newer"
                )
            held = [r for r in newer if r.holds]
            if held and release_holds:
                for r in held:
                    r.holds.clear()
                    self.pool.touch_snapshot(r)
            elif held:
                raise Refused(
                    "newer snapshots are held and cannot be destroyed: "
                    + ", ".join(f"{r.name} ({', '.join(r.holds)})" for r in held)
                )
            for r in newer:
                self._deletable(r)  # a cloned one cannot go either
            clients = self.core.connections.get(vol.ino, 0)
            if clients and not force:
                raise Refused(
                    f"volume {vol.name} has {clients} client connection(s); disconnect them "
                    "first, or add --force (their requests then fail until they reconnect)"
                )
            # One transaction marks the newer snapshots for deletion and the volume for
            # rollback: from here on it completes even across a crash, nothing can be created
            # on the volume meanwhile, and live reads through the target (exports._view).
            for r in newer:
                self.pool.mark_deleting(r)
            vol.inode.op = OP_ROLLBACK
            vol.inode.op_target = rec.id
            vol.inode.incarnation += 1
            self.pool.touch_inode(vol.inode)
            if with_change is not None:
                with_change()
            self.core.commit()
            ino, sid = vol.ino, rec.id

        def busy() -> bool:
            v = self.pool.volumes.get(ino)
            return v is not None and v.inode.op == OP_ROLLBACK and v.inode.op_target == sid

        def left() -> int:
            v = self.pool.volumes[ino]
            newer_left = sum(v.shadows[s].inode.entry_count for s in v.chain if s > sid)
            return newer_left + v.shadows[sid].inode.entry_count

        self.background.run_until_done(busy, progress, left)
        with self.lock:
            self.core.commit()
        return [r.name for r in newer]

    # --- diff and space -----------------------------------------------------------------------

    def diff_blocks(
        self, from_name: str, to_name: str | None, volume: str = DEFAULT_VOLUME
    ) -> list[tuple[int, int]]:
        """Byte ranges (offset, length) that may differ between two snapshots (to: None =
        live), from the shadow maps alone."""
        with self.lock:
            vol = self.core.volume(volume)
            a = self.core.snapshot(from_name)
            b = self.core.snapshot(to_name) if to_name else None
            self.core.require_readable(vol)
            for r in (a, b):
                if r is not None:
                    self.core.require_readable(vol, r)
                    self.core.require_covers(vol, r)
            if b is not None and b.id < a.id:
                raise InvalidArgument(f"'{from_name}' must be older than '{to_name}': swap them")
            if b is not None and b.id == a.id:
                return []  # a snapshot never differs from itself
            bs = self.pool.block_size
            size = vol.shadows[b.id].inode.size if b else vol.inode.size
            blocks = snapops.changed_blocks(vol, a.id, b.id if b else None)
            return [
                (f * bs, min(n * bs, size - f * bs))
                for f, n in snapops.block_runs(blocks)
                if f * bs < size
            ]

    def space(
        self,
        from_name: str | None = None,
        to_name: str | None = None,
        volume: str = DEFAULT_VOLUME,
    ) -> dict[str, Any]:
        """Space per snapshot and live; with a range FROM..TO, what deleting it all would free."""
        with self.lock:
            vol = self.core.volume(volume)
            bs = self.pool.block_size
            active = [s for s in vol.chain if self.pool.snapshots[s].state == SNAP_ACTIVE]
            rows = [
                {
                    "name": self.pool.snapshots[s].name,
                    "used_bytes": snapops.unique_blocks(vol, s) * bs,
                    "owned_bytes": vol.shadows[s].inode.owned_blocks * bs,
                }
                for s in active
            ]
            result: dict[str, Any] = {
                "volume": vol.name,
                "snapshots": rows,
                "live_bytes": vol.inode.owned_blocks * bs,
                "snapshots_bytes": sum(vol.shadows[s].inode.owned_blocks for s in vol.chain) * bs,
            }
            if from_name is not None:
                a = self.core.snapshot(from_name)
                b = self.core.snapshot(to_name) if to_name else a
                if b.id < a.id:
                    raise InvalidArgument(f"'{from_name}' must not be newer than '{to_name}'")
                span = [s for s in active if a.id <= s <= b.id]
                if a.id not in span or b.id not in span:
                    raise NotFound(f"the range must name snapshots of volume {vol.name}")
                result["range"] = {
                    "from": a.name,
                    "to": b.name,
                    "snapshots": [self.pool.snapshots[s].name for s in span],
                    "freed_bytes": snapops.range_freed(vol, span) * bs,
                }
            return result

    # --- listing ------------------------------------------------------------------------------

    def list_snapshots(self) -> list[SnapshotInfo]:
        with self.lock:
            # every snapshot's unique blocks in one pass per volume, not one walk each
            unique = {v.ino: snapops.unique_blocks_all(v) for v in self.pool.volumes.values()}
            return [
                self._info(r, unique)
                for r in sorted(self.pool.snapshots.values(), key=lambda r: r.id)
                if r.state == SNAP_ACTIVE
            ]

    def snapshot_names(self) -> list[str]:
        with self.lock:
            return sorted(r.name for r in self.pool.snapshots.values() if r.state == SNAP_ACTIVE)

    def _info(
        self, rec: SnapshotRecord, unique: dict[int, dict[int, int]] | None = None
    ) -> SnapshotInfo:
        bs = self.pool.block_size
        vols = self.pool.covering(rec.id)
        used = referenced = written = 0
        for vol in vols:
            shadow = vol.shadows[rec.id]
            if unique is not None:
                used += unique[vol.ino].get(rec.id, 0)
            else:
                used += snapops.unique_blocks(vol, rec.id)
            referenced += shadow.inode.referenced_blocks
            older = vol.older_than(rec.id)
            # blocks changed between the previous snapshot and this one: the previous one's
            # entries (data it preserved, and holes that got data)
            written += (
                vol.shadows[older].inode.entry_count if older else shadow.inode.referenced_blocks
            )
        return SnapshotInfo(
            name=rec.name,
            id=rec.id,
            guid=rec.guid.hex(),
            created_ns=rec.created_ns,
            volumes=[v.name for v in vols],
            used_bytes=used * bs,
            referenced_bytes=referenced * bs,
            written_bytes=written * bs,
            holds=list(rec.holds),
        )

    # --- properties ---------------------------------------------------------------------------

    def set_writable(self, name: str, on: bool) -> None:
        """Make snapshot name writable (its exports become read-write) or read-only again."""
        with self.lock:
            rec = self.core.snapshot(name)
            vols = self.pool.covering(rec.id)
            if on:
                clones = [c.name for v in vols for c in self.pool.clones_of(v, rec.id)]
                if clones:
                    raise Refused(
                        f"snapshot '{name}' has clones ({', '.join(clones)}), which read it; "
                        "a writable snapshot would change under them"
                    )
                rec.flags |= SNAPF_WRITABLE
            else:
                rec.flags &= ~SNAPF_WRITABLE
            for v in vols:
                if on:
                    v.writable.add(rec.id)
                else:
                    v.writable.discard(rec.id)
            self.pool.touch_snapshot(rec)
            self.core.commit()

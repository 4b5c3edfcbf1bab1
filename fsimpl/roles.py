"""Standby roles, pool side: the role, the peer and the last common snapshot, and the
replication snapshots that keep primary and standby in step (FIG. 15A-15D).

The superblock records the role (`none`, `primary`, `standby`), the peer's address, whether the
peer has superseded this pool, and the GUID of the newest snapshot both pools hold. Every change
here commits before it returns. The network side (the endpoint, the peer protocol and the
attach, sync, promote, demote and failback sequences) is standby.py, which changes the pool only
through these methods and the engine's public operations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .core import EngineCore, OperationModule
from .errors import DittoError, NotFound, Refused
from .layout import ROLE_NAMES, ROLE_PRIMARY, ROLE_STANDBY, SNAPF_REPLICATION
from .snapshot_ops import SnapshotOps

REPLICATION_HOLD = "replication"


@dataclass(frozen=True)
class RoleState:
    pool_guid: bytes
    role: int
    peer: str
    superseded: bool
    last_common_guid: bytes

    @property
    def is_live_primary(self) -> bool:
        return self.role == ROLE_PRIMARY and not self.superseded


class StandbyRoles(OperationModule):
    def __init__(self, core: EngineCore, snapshots: SnapshotOps) -> None:
        super().__init__(core)
        self.snapshots = snapshots

    def state(self) -> RoleState:
        with self.lock:
            sb = self.pool.sb
            return RoleState(
                sb.pool_guid, sb.role, sb.peer, bool(sb.superseded), sb.last_common_guid
            )

    def status(self) -> dict[str, Any]:
        """What a peer (or `standby status`) learns of this pool."""
        with self.lock:
            sb = self.pool.sb
            snaps = self.core.active_snapshots()
            common = next((r for r in snaps if r.guid == sb.last_common_guid), None)
            return {
                "pool_guid": sb.pool_guid.hex(),
                "role": ROLE_NAMES.get(sb.role, "?"),
                "peer": sb.peer,
                "superseded": bool(sb.superseded),
                "snapshots": [
                    {"name": r.name, "guid": r.guid.hex(), "created_ns": r.created_ns}
                    for r in snaps
                ],
                "last_common": common.name if common else None,
                "last_common_guid": sb.last_common_guid.hex() if common else None,
                "last_common_created_ns": common.created_ns if common else None,
                "live_has_data": any(v.inode.owned_blocks for v in self.pool.volumes.values()),
            }

    def set_role(self, role: int, peer: str | None = None, superseded: bool = False) -> None:
        with self.lock:
            sb = self.pool.sb
            sb.role = role
            if peer is not None:
                sb.peer = peer
            sb.superseded = int(superseded)
            self.pool.sb_dirty = True
            self.core.commit()

    def set_last_common(self, guid: bytes) -> None:
        with self.lock:
            self.pool.sb.last_common_guid = guid
            self.pool.sb_dirty = True
            self.core.commit()

    def begin_handover(self, force: bool) -> str:
        """Failback's first step (FIG. 15D): live turns read-only, so the final snapshot is
        final, and every writer's connection fails from now on. In memory only: a crash before
        end_handover leaves the pool the primary it was. Returns the peer's address."""
        with self.lock:
            sb = self.pool.sb
            if sb.role != ROLE_PRIMARY or not sb.peer:
                raise Refused("only a primary with a standby can fail back")
            writers = sum(self.core.connections.values())
            if writers and not force:
                raise Refused(
                    f"live has {writers} client connection(s): stop them, or add --force "
                    "(live turns read-only first)"
                )
            self.core.handing_over = True
            self.core.fail_connections()
            return sb.peer

    def end_handover(self, handed: bool) -> None:
        """Failback's last step: the peer is primary now (handed: this pool becomes its
        standby, one commit), or the handover failed (this pool stays primary)."""
        with self.lock:
            self.core.handing_over = False
            if handed:
                self.set_role(ROLE_STANDBY)

    def change_role_restoring(
        self, role: int, restore: str | None, newer_too: bool = False
    ) -> list[str]:
        """Become role with live restored to snapshot `restore` (promote: the last complete
        snapshot; demote: the last one the peer holds, destroying the newer ones and their
        holds), all in one transaction: after a crash the pool is wholly in its old role or
        wholly in the new one. Returns the snapshots destroyed."""

        def to_role() -> None:
            sb = self.pool.sb
            sb.role = role
            sb.superseded = 0
            self.pool.sb_dirty = True

        if restore is None:
            with self.lock:
                to_role()
                self.core.commit()
            return []
        return self.snapshots.rollback(
            restore,
            destroy_newer=newer_too,
            force=True,
            release_holds=newer_too,
            with_change=to_role,
        )

    # --- replication snapshots ------------------------------------------------------------------

    def newest_common(self, peer_guids: set[str]) -> str | None:
        """Our newest snapshot whose GUID the peer also holds."""
        with self.lock:
            ours = reversed(self.core.active_snapshots())
            return next((r.name for r in ours if r.guid.hex() in peer_guids), None)

    def hold_for_replication(self, name: str) -> None:
        with self.lock:
            if REPLICATION_HOLD not in self.core.snapshot(name).holds:
                self.snapshots.hold(name, REPLICATION_HOLD)

    def new_replication_snapshot(self) -> str:
        """A held snapshot of every volume, named repl-DATE-TIME (made unique)."""
        name = time.strftime("repl-%Y%m%d-%H%M%S", time.gmtime())
        with self.lock:
            taken = {r.name for r in self.pool.snapshots.values()}
            n, base = 1, name
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            self.snapshots.create_snapshot(name, replication=True)
            self.hold_for_replication(name)
        return name

    def retire_older(self, keep: bytes) -> list[str]:
        """Release and delete the replication snapshots older than the common one `keep`."""
        with self.lock:
            try:
                kept = self.core.snapshot_by_guid(keep)
            except NotFound:
                return []
            old = [
                r
                for r in self.core.active_snapshots()
                if r.flags & SNAPF_REPLICATION and r.id < kept.id
            ]
            names = [r.name for r in old]
            for r in old:
                if REPLICATION_HOLD in r.holds:
                    self.snapshots.release(r.name, REPLICATION_HOLD)
        gone = []
        for name in names:
            try:
                if not self.core.snapshot(name).holds:
                    self.snapshots.delete_snapshot(name)
                    gone.append(name)
            except DittoError:
                pass  # held by the user, or cloned: it stays, which is what they asked for
        return gone

"""Volume operations: several volumes per pool, clones, flatten and promote.

A pool holds any number of volumes (`live` is only the default one); each is exported as NAME
and NAME@SNAPSHOT. A clone is a volume whose never-written blocks read a snapshot of another
volume: creating it is O(1), the snapshot it depends on cannot be deleted while it exists, and
`flatten` (or `promote`) copies what it still reads from there so it stands alone. Long
operations (volume delete, flatten) are persistent operations on the volume's inode, run in
bounded background steps and resumed after a crash.
"""

from __future__ import annotations

from typing import Any

from .background import BackgroundWork
from .core import EngineCore, OperationModule, Progress
from .errors import InvalidArgument, NameTaken, Refused
from .layout import KIND_ADDR, OP_DELETE, OP_FLATTEN, OP_NONE, SNAP_ACTIVE, SNAPF_WRITABLE
from .names import check_name, parse_export
from .volume import Volume


class VolumeOps(OperationModule):
    def __init__(self, core: EngineCore, background: BackgroundWork) -> None:
        super().__init__(core)
        self.background = background

    # --- create, list, resize -----------------------------------------------------------------

    def _volume_name_free(self, name: str) -> None:
        check_name(name, "volume")
        if any(v.name == name for v in self.pool.volumes.values()):
            raise NameTaken(f"a volume named '{name}' already exists; pick another name")

    def create_volume(self, name: str, size: int) -> dict[str, Any]:
        if size <= 0:
            raise InvalidArgument(f"size {size}: a volume needs a size > 0")
        with self.lock:
            self._volume_name_free(name)
            vol = self.pool.create_volume(name, size)
            self.core.commit()
            return self._volume_json(vol)

    def list_volumes(self) -> list[dict[str, Any]]:
        with self.lock:
            vols = sorted(self.pool.volumes.values(), key=lambda v: v.ino)
            return [self._volume_json(v) for v in vols if v.inode.op != OP_DELETE]

    def _volume_json(self, vol: Volume) -> dict[str, Any]:
        bs = self.pool.block_size
        origin = None
        if vol.origin is not None:
            origin = f"{vol.origin.name}@{self.pool.snapshots[vol.inode.origin_snap].name}"
        active = [s for s in vol.chain if self.pool.snapshots[s].state == SNAP_ACTIVE]
        return {
            "name": vol.name,
            "size_bytes": vol.inode.size,
            "allocated_bytes": vol.inode.owned_blocks * bs,
            "snapshots": len(active),
            "origin": origin,
            "clones": [c.name for c in self.pool.clones_of(vol)],
            "flattening": vol.inode.op == OP_FLATTEN,
            "connections": self.core.connections.get(vol.ino, 0),
        }

    def resize_volume(self, name: str, size: int, force: bool = False) -> dict[str, Any]:
        """Grow a volume (new space reads zeros); shrink only with force, and only past space
        it does not use."""
        if size <= 0:
            raise InvalidArgument(f"size {size}: a volume needs a size > 0")
        with self.lock:
            vol = self.core.volume(name)
            if vol.inode.op not in (OP_NONE,):
                raise Refused(f"volume {name} is busy (rollback, delete or flatten); wait")
            old = vol.inode.size
            if size < old:
                if not force:
                    raise Refused(
                        f"shrinking {name} from {old} to {size} bytes cuts off its end; add "
                        "--force if that space is unused"
                    )
                self._shrink(vol, size)
            vol.inode.size = size
            self.pool.touch_inode(vol.inode)
            self.core.commit()
            return self._volume_json(vol)

    def _shrink(self, vol: Volume, size: int) -> None:
        bs = self.pool.block_size
        end = (vol.inode.size + bs - 1) // bs
        first_cut = size // bs
        view = vol.resolve_range(None, first_cut, max(0, end - first_cut))
        used = [first_cut + i for i, e in enumerate(view) if e.kind == KIND_ADDR]
        past = [b for b in used if b * bs >= size]
        if past:
            raise Refused(
                f"volume {vol.name} holds data at offset {past[0] * bs}, past the new size "
                f"{size}; trim it first (blkdiscard / fstrim) or pick a larger size"
            )
        if size % bs and used and used[0] == first_cut:
            tail = bytearray(bs - size % bs)
            vol.read(self.pool.ctx, None, memoryview(tail), size)
            if any(tail):
                raise Refused(
                    f"volume {vol.name} holds data between {size} and {first_cut * bs + bs}, "
                    "past the new size; trim it first or pick a larger size"
                )

    # --- delete -------------------------------------------------------------------------------

    def delete_volume(
        self, name: str, recursive: bool = False, progress: Progress | None = None
    ) -> list[str]:
        """Delete a volume; with recursive, also its snapshots and clones (refused while it has
        any, otherwise, or while any of them is held or has clients). Returns what went."""
        with self.lock:
            vol = self.core.volume(name)
            doomed = self._with_clones(vol)
            gone: list[str] = []
            for v in doomed:
                if v.inode.op not in (OP_NONE, OP_FLATTEN):
                    raise Refused(f"volume {v.name} is busy (rollback or delete); wait")
                if self.core.connections.get(v.ino):
                    raise Refused(
                        f"volume {v.name} has {self.core.connections[v.ino]} client connection(s); "
                        "disconnect them first"
                    )
                snaps = [self.pool.snapshots[s] for s in v.chain]
                active = [r for r in snaps if r.state == SNAP_ACTIVE]
                if active and not recursive:
                    raise Refused(
                        f"volume {v.name} has snapshots ({', '.join(r.name for r in active)}); "
                        "delete them first, or add --recursive"
                    )
                held = [r for r in active if r.holds and r.covered == 1]
                if held:
                    raise Refused(
                        "held snapshots would go: "
                        + ", ".join(f"{r.name} ({', '.join(r.holds)})" for r in held)
                    )
            if len(doomed) > 1 and not recursive:
                raise Refused(
                    f"volume {name} has clones ({', '.join(v.name for v in doomed[1:])}); "
                    "flatten them or add --recursive"
                )
            for v in doomed:
                for sid in v.chain:
                    rec = self.pool.snapshots[sid]
                    if rec.state == SNAP_ACTIVE and rec.covered == 1:
                        self.pool.mark_deleting(rec)
                        gone.append(f"{v.name}@{rec.name}")
                v.inode.op = OP_DELETE
                v.inode.op_target = 0
                v.inode.incarnation += 1
                self.pool.touch_inode(v.inode)
                gone.append(v.name)
            self.core.commit()
            inos = [v.ino for v in doomed]

        def left() -> int:
            total = 0
            for ino in inos:
                v = self.pool.volumes.get(ino)
                if v is not None:
                    total += v.inode.entry_count
                    total += sum(v.shadows[s].inode.entry_count for s in v.chain)
            return total

        self.background.run_until_done(
            lambda: any(i in self.pool.volumes for i in inos), progress, left
        )
        with self.lock:
            self.core.commit()
        return gone

    def _with_clones(self, vol: Volume) -> list[Volume]:
        out = [vol]
        for v in out:
            out.extend(c for c in self.pool.clones_of(v) if c not in out)
        return out

    # --- clones ----------------------------------------------------------------------------------

    def clone(self, source: str, name: str) -> dict[str, Any]:
        """A new volume that reads source (VOL@SNAP) until written: O(1)."""
        with self.lock:
            parsed = parse_export(source)
            if parsed.snapshot is None:
                raise InvalidArgument(f"clone from a snapshot: VOLUME@SNAPSHOT, not '{source}'")
            vol = self.core.volume(parsed.volume)
            rec = self.core.snapshot(parsed.snapshot)
            self.core.require_covers(vol, rec)
            if rec.flags & SNAPF_WRITABLE:
                raise Refused(
                    f"snapshot '{rec.name}' is writable, so a clone of it would change under "
                    f"it; make it read-only first ('snapctl set {rec.name} writable=off')"
                )
            self._volume_name_free(name)
            size = vol.shadows[rec.id].inode.size
            new = self.pool.create_volume(name, size, origin=vol, origin_snap=rec.id)
            self.core.commit()
            return self._volume_json(new)

    def flatten(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        """Copy what a clone still reads from its origin into blocks of its own; afterwards it
        depends on nothing (its origin snapshot may be deleted). Runs online."""
        with self.lock:
            vol = self.core.volume(name)
            if vol.origin is None:
                raise InvalidArgument(f"volume {name} is not a clone: nothing to flatten")
            if vol.inode.op == OP_NONE:
                vol.inode.op = OP_FLATTEN
                vol.inode.op_target = 0
                self.pool.touch_inode(vol.inode)
                self.core.commit()
            elif vol.inode.op != OP_FLATTEN:
                raise Refused(f"volume {name} is busy (rollback or delete); wait")
            ino = vol.ino
            total = vol.origin_blocks

        def busy() -> bool:
            v = self.pool.volumes.get(ino)
            return v is not None and v.inode.op == OP_FLATTEN

        def left() -> int:
            v = self.pool.volumes.get(ino)
            return max(0, total - v.inode.op_target) if v is not None else 0

        self.background.run_until_done(busy, progress, left)
        with self.lock:
            self.core.commit()
            return self._volume_json(self.core.volume(name))

    def promote(self, name: str, progress: Progress | None = None) -> dict[str, Any]:
        """Make a clone stand on its own so its origin (snapshot and volume) can be deleted.

        In ZFS, promote moves the origin's older snapshots under the clone without copying.
        dittofs gives every block exactly one owner (no reference counts), so the blocks the
        clone shares with its origin cannot change hands while the origin still reads them:
        promote copies them, as flatten does, and then the origin is free to go."""
        return self.flatten(name, progress)

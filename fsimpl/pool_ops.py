"""Pool-wide operations: what the pool is (info), its settings (tune), and its checks: the
checker over the committed state, and scrub, which reads and verifies every data block.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from .checker import check
from .core import OperationModule, Progress
from .errors import DittoError, InvalidArgument
from .layout import FORMAT_VERSION, KIND_ADDR, ROLE_NAMES, SNAP_ACTIVE
from .volume import read_checked


class PoolOps(OperationModule):
    def info(self) -> dict[str, object]:
        with self.lock:
            pool = self.pool
            sb = pool.sb
            bs = pool.block_size
            active = [r for r in pool.snapshots.values() if r.state == SNAP_ACTIVE]
            stats = self.core.device.stats
            return {
                "disk": self.core.device.path,
                "format_version": FORMAT_VERSION,
                "pool_guid": sb.pool_guid.hex(),
                "block_size": bs,
                "capacity_bytes": pool.allocator.capacity * bs,
                "growable": sb.growable,
                "used_bytes": pool.allocator.used_blocks * bs,
                "free_bytes": pool.allocator.free_count * bs,
                "host_allocated_bytes": self.core.device.allocated_bytes(),
                "generation": sb.generation,
                "volumes": [
                    {
                        "name": v.name,
                        "size_bytes": v.inode.size,
                        "allocated_bytes": v.inode.owned_blocks * bs,
                        "snapshots": sum(
                            1 for s in v.chain if pool.snapshots[s].state == SNAP_ACTIVE
                        ),
                        "connections": self.core.connections.get(v.ino, 0),
                    }
                    for v in sorted(pool.volumes.values(), key=lambda v: v.ino)
                ],
                "snapshot_count": len(active),
                "newest_snapshot": max(active, key=lambda r: r.id).name if active else None,
                "pending_deletes": len(pool.pending_deletes()),
                "role": ROLE_NAMES.get(sb.role, str(sb.role)),
                "peer": sb.peer or None,
                "last_common": next(
                    (r.name for r in active if r.guid == sb.last_common_guid), None
                ),
                "superseded": bool(sb.superseded),
                "cow": self.core.cow,
                "snapshot_min_free": sb.snapshot_min_free * bs,
                "server_pid": sb.inuse_pid,
                "errors": {
                    "read": stats.read_errors,
                    "write": stats.write_errors,
                    "checksum": stats.checksum_errors,
                    "failed_commits": self.core.failures,
                },
                "time": time.time(),
            }

    def tune(self, snapshot_min_free: int | None = None) -> dict[str, int]:
        """Pool settings: the free space below which new snapshots are refused."""
        with self.lock:
            if snapshot_min_free is not None:
                if snapshot_min_free < 0:
                    raise InvalidArgument("snapshot-min-free must not be negative")
                bs = self.pool.block_size
                self.pool.sb.snapshot_min_free = -(-snapshot_min_free // bs)
                self.pool.sb_dirty = True
                self.core.commit()
            return {
                "snapshot_min_free": self.pool.sb.snapshot_min_free * self.pool.block_size,
                "free_bytes": self.core.free_bytes(),
            }

    def commit_now(self) -> int:
        """Make everything written so far durable; returns the committed generation."""
        with self.lock:
            self.core.make_durable()
            return self.pool.sb.generation

    def check_committed(self) -> dict[str, object]:
        """Commit, then verify the committed state on disk (checker.py), under the lock."""
        with self.lock:
            self.core.commit()
            report = check(self.core.device)
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
            pool = self.pool
            maps = [
                (f"{v.name}@{pool.snapshots[s].name}" if s else v.name, v.ino, s)
                for v in pool.volumes.values()
                for s in [0, *v.chain]
            ]
            total = sum(
                (v.shadows[s] if s else v.live).inode.owned_blocks
                for v in pool.volumes.values()
                for s in [0, *v.chain]
            )
            checksums = pool.ctx.checksums
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

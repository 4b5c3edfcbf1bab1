"""Pool-wide operations: what the pool is (info), its settings (tune), and its checks: the
checker over the committed state, and scrub, which reads and verifies every data block.
"""

from __future__ import annotations

import time

from .checker import check, report_json
from .core import OperationModule, Progress
from .errors import DamagedPool, DittoError, InvalidArgument
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
                "free_bytes": pool.allocator.available * bs,
                "deferred_free_bytes": pool.allocator.waiting * bs,
                "host_allocated_bytes": self.core.device.allocated_bytes(),
                "generation": sb.generation,
                "volumes": [
                    {
                        "name": v.name,
                        "size_bytes": v.inode.size,
                        "allocated_bytes": v.inode.owned_blocks * bs,
                        # partial writes whose merge is still to come (idle time does it)
                        "unmerged_blocks": v.live.inode.incomplete_blocks,
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
                    "healed": pool.store.healed,
                },
                "metadata_copies": pool.store.copies,
                "read_only_reason": pool.read_only_reason,
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
            degraded = bool(self.pool.damage)  # read-only: it cannot commit, nor heal
            if not degraded:
                self.core.commit()
            result = check(self.core.device)
            slots = sum(1 for d in result.defects if d.kind == "superblock")
            if slots and not degraded:  # two commits rewrite every slot: heal, look again
                for _ in range(2):
                    self.pool.sb_dirty = True
                    self.core.commit()
                result = check(self.core.device)
            report = report_json(result)
            report["healed"] = 0 if degraded else self.pool.store.healed + slots
            return report

    def scrub(self, progress: Progress | None = None) -> dict[str, object]:
        """Verify both copies of every metadata block, healing a bad copy from its good twin
        (rewritten by the commit that ends the pass); then read every data block the pool holds
        (live and every snapshot) and, on a pool with data checksums, verify each against its
        CRC. The lock is taken per tree and per data block."""
        if self.pool.read_only_reason:  # it heals by committing
            raise DamagedPool(self.pool.read_only_reason)
        metadata = self._scrub_metadata()
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
            **metadata,
        }

    def _scrub_metadata(self) -> dict[str, object]:
        with self.lock:
            names = [name for name, _ in self.pool.metadata_trees()]
        nodes = healed = 0
        lost: list[dict[str, object]] = []
        for name in names:
            with self.lock:  # a tree is small next to the data; it cannot change under us
                tree = dict(self.pool.metadata_trees()).get(name)
                if tree is None or tree.is_dirty:
                    continue  # gone, or changing: its new nodes are written whole
                store = tree.store
                try:
                    for ptr, level in tree.all_node_pointers():
                        nodes += 1
                        btype = tree.block_type(level)
                        bad = store.bad_copies(ptr, btype)
                        copies = [a for a in (ptr.addr0, ptr.addr1) if a]
                        if len(bad) == len(copies):
                            lost.append({"tree": name, "address": ptr.addr0, "error": bad[0][1]})
                        elif bad and bad[0][0] not in store.heals:
                            addr, problem = bad[0]
                            good = ptr.addr1 if addr == ptr.addr0 else ptr.addr0
                            data = self.core.device.pread(store.block_size, good * store.block_size)
                            store.queue_heal(addr, good, bytes(data), f"scrub: {problem}; its twin")
                            healed += 1
                except DittoError as e:  # an interior node with no good copy: its subtree
                    lost.append({"tree": name, "address": -1, "error": str(e)})
        with self.lock:
            self.core.commit()  # writes the healed copies
        return {"metadata_blocks": nodes, "metadata_healed": healed, "metadata_lost": lost}

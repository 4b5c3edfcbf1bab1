"""The checker: verifies a pool's committed state against every invariant of ARCHITECTURE.md.

`check(device)` loads the state the newest valid superblock describes (nothing uncommitted) and
runs ordered passes, each collecting defects rather than stopping at the first:

  superblocks   both slots: checksum, magic, version; a bad slot is repairable from the good one
  tables        inode and snapshot tables: every node's checksum, type and self-address; records
                that point at missing volumes or snapshots; duplicate names; ids in range
  maps          every block-map node and entry: kinds valid for live or shadow maps, addresses
                inside the pool, per-inode counters exact
  ownership     every allocated block owned exactly once (a map entry, or a metadata node);
                owned-but-free is fatal, allocated-but-unowned is a leak (non-fatal)
  sharing       invariant 3 per volume: live changed b since the latest snapshot L exactly when
                L (or a newer snapshot still being deleted) holds an entry for b

A defect is fatal when data could be read wrong or lost; leaks only waste space.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .device import Device
from .errors import CorruptMetadata, DittoError, NotAPool, UnsupportedFormat
from .layout import (
    KIND_ADDR,
    KIND_HOLE,
    KIND_NONE,
    KIND_ORIGIN,
    OP_ROLLBACK,
    SNAP_ACTIVE,
    SNAP_DELETING,
    SUPERBLOCK_OFFSETS,
    SUPERBLOCK_SIZE,
    InodeRecord,
    first_data_block,
    unpack_superblock,
)
from .txn import Pool
from .volume import Volume


@dataclass
class Defect:
    kind: str  # stable identifier, e.g. "leak", "double_owner", "checksum"
    fatal: bool
    where: str
    message: str


@dataclass
class CheckReport:
    defects: list[Defect] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.defects

    @property
    def fatal(self) -> list[Defect]:
        return [d for d in self.defects if d.fatal]

    @property
    def leaks(self) -> list[Defect]:
        return [d for d in self.defects if d.kind == "leak"]

    def add(self, kind: str, fatal: bool, where: str, message: str) -> None:
        self.defects.append(Defect(kind, fatal, where, message))


def check(device: Device) -> CheckReport:
    """Check the committed state on device. Raises only for a disk that is not a pool."""
    report = CheckReport()
    _check_superblocks(device, report)
    try:
        pool = Pool.open(device, cache_bytes=8 << 20)
    except (NotAPool, UnsupportedFormat):
        raise
    except CorruptMetadata as e:
        report.add("corrupt", True, f"block {e.address}", str(e))
        return report
    except DittoError as e:
        report.add("unreadable", True, "pool", str(e))
        return report
    _Walker(pool, report).run()
    return report


def _check_superblocks(device: Device, report: CheckReport) -> None:
    raw = device.pread(2 * SUPERBLOCK_SIZE, 0)
    for slot, off in enumerate(SUPERBLOCK_OFFSETS):
        try:
            unpack_superblock(raw[off : off + SUPERBLOCK_SIZE], device.path)
        except CorruptMetadata as e:
            report.add("superblock", False, f"superblock slot {slot}", str(e))
        except NotAPool:
            pass  # judged by the open that follows


class _Walker:
    def __init__(self, pool: Pool, report: CheckReport) -> None:
        self.pool = pool
        self.report = report
        self.capacity = pool.allocator.capacity
        self.owned = bytearray((self.capacity + 7) // 8)

    def run(self) -> None:
        try:
            self._own_metadata()
            self._check_tables()
            for vol in self.pool.volumes.values():
                self._check_volume(vol)
            self._check_ownership()
        except CorruptMetadata as e:
            self.report.add("corrupt", True, f"block {e.address} ({e.block_type})", str(e))

    def _own(self, block: int, owner: str) -> None:
        if block < first_data_block(self.pool.block_size) or block >= self.capacity:
            self.report.add(
                "bad_address",
                True,
                owner,
                f"{owner} points at block {block}, "
                f"outside the pool (capacity {self.capacity} blocks)",
            )
            return
        byte, bit = block >> 3, 1 << (block & 7)
        if self.owned[byte] & bit:
            self.report.add(
                "double_owner",
                True,
                f"block {block}",
                f"block {block} is owned by {owner} and by another map or node",
            )
            return
        self.owned[byte] |= bit

    def _own_metadata(self) -> None:
        pool = self.pool
        trees = [
            ("inode table", pool.inodes.tree),
            ("snapshot table", pool.snaptab.tree),
            ("free-space bitmap", pool.allocator.tree),
        ]
        for vol in pool.volumes.values():
            trees.append((f"volume {vol.name} map", vol.live.tree))
            for sid, shadow in vol.shadows.items():
                trees.append((f"snapshot {sid} map of {vol.name}", shadow.tree))
        n = 0
        for what, tree in trees:
            for addr, _level in tree.all_node_addresses():
                self._own(addr, f"{what} node")
                n += 1
        self.report.stats["metadata_blocks"] = n

    def _check_tables(self) -> None:
        pool = self.pool
        sb = pool.sb
        names: dict[str, int] = {}
        for sid, rec in pool.snapshots.items():
            where = f"snapshot {sid} ({rec.name})"
            if sid >= sb.next_snap_id:
                self.report.add(
                    "bad_id", True, where, f"{where}: id beyond next id {sb.next_snap_id}"
                )
            if rec.state not in (SNAP_ACTIVE, SNAP_DELETING):
                self.report.add("bad_state", True, where, f"{where}: unknown state {rec.state}")
            covered = len(pool.covering(sid))
            if rec.state == SNAP_ACTIVE:
                if rec.name in names:
                    self.report.add(
                        "duplicate_name",
                        True,
                        where,
                        f"{where}: name also used by snapshot {names[rec.name]}",
                    )
                names[rec.name] = sid
                if covered == 0:
                    self.report.add("empty_snapshot", True, where, f"{where} covers no volume")
            if covered != rec.covered:
                self.report.add(
                    "coverage",
                    True,
                    where,
                    f"{where}: records {rec.covered} volumes, has {covered}",
                )
        vnames: set[str] = set()
        for vol in pool.volumes.values():
            if vol.name in vnames:
                self.report.add(
                    "duplicate_name",
                    True,
                    f"volume {vol.name}",
                    f"two volumes are named {vol.name}",
                )
            vnames.add(vol.name)
            if vol.inode.ino >= sb.next_inode:
                self.report.add("bad_id", True, f"volume {vol.name}", "inode beyond next inode")
            if vol.inode.op == OP_ROLLBACK and vol.inode.op_target not in vol.shadows:
                self.report.add(
                    "bad_rollback",
                    True,
                    f"volume {vol.name}",
                    "a rollback targets a snapshot the volume does not have",
                )
        self.report.stats["snapshots"] = len(pool.snapshots)
        self.report.stats["volumes"] = len(pool.volumes)

    def _check_volume(self, vol: Volume) -> None:
        pool = self.pool
        next_id = pool.sb.next_snap_id
        owned = entries = 0
        births: dict[int, int] = {}
        for b, e in vol.live.iter_entries():
            entries += 1
            where = f"volume {vol.name} block {b}"
            if e.kind == KIND_ADDR:
                owned += 1
                self._own(e.addr, where)
            elif e.kind != KIND_NONE and not (e.kind == KIND_HOLE and vol.origin is not None):
                self.report.add("bad_entry", True, where, f"{where}: live entry of kind {e.kind}")
            if e.birth > next_id:
                self.report.add(
                    "bad_birth",
                    True,
                    where,
                    f"{where}: birth {e.birth} is beyond next id {next_id}",
                )
            births[b] = e.birth
        self._counters(f"volume {vol.name}", vol.live.inode, owned, entries)

        latest = vol.inode.snap_id
        active = [s for s in vol.chain if pool.snapshots[s].state == SNAP_ACTIVE]
        expect = max(active, default=0)
        if latest != expect:
            self.report.add(
                "latest",
                True,
                f"volume {vol.name}",
                f"volume {vol.name} records latest snapshot {latest}, "
                f"the newest active one is {expect}",
            )
        recent: set[int] = set()  # blocks with an entry in the latest or a newer snapshot
        for sid in vol.chain:
            shadow = vol.shadows[sid]
            owned = entries = 0
            for b, e in shadow.iter_entries():
                entries += 1
                where = f"snapshot {sid} of {vol.name} block {b}"
                if e.kind == KIND_ADDR:
                    owned += 1
                    self._own(e.addr, where)
                elif e.kind != KIND_HOLE and not (e.kind == KIND_ORIGIN and vol.origin):
                    self.report.add(
                        "bad_entry", True, where, f"{where}: shadow entry of kind {e.kind}"
                    )
                if e.birth > sid:  # it preserves data live held when the snapshot was taken
                    self.report.add(
                        "bad_birth",
                        True,
                        where,
                        f"{where}: preserved data born at {e.birth}, after the snapshot was taken",
                    )
                if latest and sid >= latest:
                    recent.add(b)
            self._counters(f"snapshot {sid} of {vol.name}", shadow.inode, owned, entries)
        if latest and vol.inode.op != OP_ROLLBACK:
            self._check_sharing(vol, latest, births, recent)

    def _check_sharing(
        self, vol: Volume, latest: int, births: dict[int, int], recent: set[int]
    ) -> None:
        """Invariant 3, the direction that protects snapshots: live changed b since the latest
        snapshot (birth > latest) => the latest (or a newer one being deleted) holds an entry
        for b. The converse no longer holds once a snapshot has been written (writable
        snapshots hold entries live never handed them); the write path checks the latest
        snapshot's entry, so such entries are harmless."""
        bad = 0
        for b, birth in births.items():
            if birth > latest and b not in recent:
                bad += 1
                if bad <= 5:
                    self.report.add(
                        "sharing",
                        True,
                        f"volume {vol.name} block {b}",
                        f"volume {vol.name} block {b}: live birth {birth}, latest snapshot "
                        f"{latest}, entry in latest-or-newer: {b in recent}",
                    )
        if bad > 5:
            self.report.add(
                "sharing",
                True,
                f"volume {vol.name}",
                f"... {bad - 5} more sharing defects on volume {vol.name}",
            )

    def _counters(self, what: str, inode: InodeRecord, owned: int, entries: int) -> None:
        rec_owned = inode.owned_blocks
        rec_entries = inode.entry_count
        if rec_owned != owned or rec_entries != entries:
            self.report.add(
                "counters",
                False,
                what,
                f"{what}: records {rec_owned} blocks / {rec_entries} entries, "
                f"has {owned} / {entries}",
            )

    def _check_ownership(self) -> None:
        alloc = self.pool.allocator
        leaks = missing = 0
        first = first_data_block(self.pool.block_size)
        for byte in range(len(self.owned)):
            o = self.owned[byte]
            a = alloc.state[byte]
            if o == a:
                continue
            for bit in range(8):
                b = byte * 8 + bit
                if b >= self.capacity or b < first:
                    continue
                ob, ab = o >> bit & 1, a >> bit & 1
                if ob and not ab:
                    missing += 1
                    if missing <= 5:
                        self.report.add(
                            "owned_free",
                            True,
                            f"block {b}",
                            f"block {b} is in use but the free map says free",
                        )
                elif ab and not ob:
                    leaks += 1
        if leaks:
            self.report.add(
                "leak",
                False,
                "free map",
                f"{leaks} blocks are allocated but owned by nothing (leaked space)",
            )
        used = self.pool.allocator.used_blocks
        if self.pool.sb.used_blocks != used:
            self.report.add(
                "counters",
                False,
                "superblock",
                f"superblock records {self.pool.sb.used_blocks} used blocks, "
                f"the free map has {used}",
            )
        self.report.stats["owned_blocks"] = sum(int(x).bit_count() for x in self.owned)
        self.report.stats["leaked_blocks"] = leaks
        self.report.stats["capacity_blocks"] = self.capacity

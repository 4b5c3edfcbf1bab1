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

`repair(device)` (snapctl check --repair, with no server running) fixes what can be fixed
without guessing, as one ordinary copy-on-write commit (a new superblock generation):

  superblock slot   a slot that fails its checksum, holds no superblock, or is stale (another
                    pool's, or not the newest one's predecessor) is rewritten by the commit,
                    which always lands in the slot that is not the newest valid one
  free map          leaked blocks (allocated, owned by nothing) are freed; blocks in use that
                    the free map calls free are marked allocated; the superblock's count follows
  counters          per-inode block and entry counts are set to what the maps hold

The free map is only touched when every map and table was read: with an unreadable metadata
block the set of owned blocks is unknown, and freeing on a guess could free live data. Anything
else (unreadable blocks, double owners, broken sharing) is reported as left uncorrected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .device import Device
from .errors import (
    CorruptMetadata,
    DittoError,
    NotAPool,
    NotFound,
    UnsupportedFormat,
)
from .layout import (
    BLOCK_TYPE_NAMES,
    BT_SUPER,
    KIND_ADDR,
    KIND_HOLE,
    KIND_NONE,
    KIND_ORIGIN,
    OP_ROLLBACK,
    RESERVED_BYTES,
    SECTOR,
    SNAP_ACTIVE,
    SNAP_DELETING,
    SUM_UNIT,
    SUPERBLOCK_OFFSETS,
    BlockPointer,
    Entry,
    InodeRecord,
    Superblock,
    first_data_block,
    unpack_superblock,
)
from .radix import MetadataTree
from .shadow_index import ShadowMap
from .txn import Pool, read_superblock, refuse_if_in_use
from .volume import Volume


@dataclass
class Defect:
    kind: str  # stable identifier, e.g. "leak", "double_owner", "checksum"
    fatal: bool
    where: str
    message: str
    healable: bool = False  # a bad copy whose twin is good: the server heals it on read


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

    @property
    def healable(self) -> list[Defect]:
        return [d for d in self.defects if d.healable]

    def add(self, kind: str, fatal: bool, where: str, message: str, healable: bool = False) -> None:
        self.defects.append(Defect(kind, fatal, where, message, healable))


CHECK_CACHE_BYTES = 8 << 20


def report_json(report: CheckReport) -> dict[str, Any]:
    """The shape the control op "check" answers with (and snapctl check --json prints)."""
    return {
        "clean": report.clean,
        "fatal": len(report.fatal),
        "healable": len(report.healable),
        "defects": [asdict(d) for d in report.defects],
        "stats": report.stats,
    }


def _corrupt_where(e: CorruptMetadata) -> str:
    if e.address >= 0:
        return f"block {e.address} ({e.block_type})" if e.block_type else f"block {e.address}"
    return e.block_type or "metadata"


def _strip_hint(message: str) -> str:
    """A block's error says "run 'snapctl check'": pointless inside the check's own report."""
    for hint in ("; run 'snapctl check'", " (run 'snapctl check' for details)"):
        message = message.replace(hint, "")
    return message


def check(device: Device) -> CheckReport:
    """Check the committed state on device. Raises only for a disk that is not a pool (or one
    of a format this code does not read)."""
    report = CheckReport()
    _check_superblocks(device, report)
    try:
        pool = Pool.open(device, cache_bytes=CHECK_CACHE_BYTES, retake=False)
    except (NotAPool, UnsupportedFormat):
        raise
    except CorruptMetadata as e:
        report.add("corrupt", True, _corrupt_where(e), _strip_hint(str(e)))
        return report
    except DittoError as e:
        report.add("unreadable", True, "pool", str(e))
        return report
    _Walker(pool, report).run()
    return report


def check_state(pool: Pool) -> CheckReport:
    """The checker's walk over the state an open pool holds (a rewind's candidate): every
    metadata block of every tree, ownership and counters; not the superblock slots."""
    report = CheckReport()
    _Walker(pool, report).run()
    return report


def _check_superblocks(device: Device, report: CheckReport) -> None:
    """Every slot must hold a valid superblock of this pool: the newest generation in its two
    slots, its predecessor in the other two. A bad slot is never fatal while a copy of the
    newest generation is good (the open that follows judges the rest) and always repairable:
    the next two commits rewrite every slot."""
    raw = device.pread(RESERVED_BYTES, 0)
    tname = BLOCK_TYPE_NAMES[BT_SUPER]
    found: dict[int, Superblock] = {}
    problems: dict[int, str] = {}
    for slot, off in enumerate(SUPERBLOCK_OFFSETS):
        try:
            found[slot] = unpack_superblock(raw[off:], device.path)
        except CorruptMetadata:
            problems[slot] = "fails its checksum (a torn or corrupted write)"
        except NotAPool:
            problems[slot] = "holds no superblock (zeroed or overwritten)"
        except UnsupportedFormat:
            return  # judged by the open that follows
    if not found:
        return  # the open that follows says why the pool cannot be used
    newest = max(found.values(), key=lambda s: s.generation)
    if newest.version == 1:
        return  # refused by the open that follows, with the way to upgrade
    for slot, sb in found.items():
        want = newest.generation - (0 if slot % 2 == newest.generation % 2 else 1)
        if sb.pool_guid != newest.pool_guid or sb.block_size != newest.block_size:
            problems[slot] = "is stale: it belongs to another pool that was on this disk"
        elif sb.generation != want:
            problems[slot] = (
                f"is stale: generation {sb.generation}, where it should hold generation {want}"
            )
    for slot, problem in sorted(problems.items()):
        off = SUPERBLOCK_OFFSETS[slot]
        report.add(
            "superblock",
            False,
            f"superblock slot {slot}",
            f"superblock slot {slot} (byte {off}, {tname}) {problem}; a copy of the newest "
            f"generation ({newest.generation}) is good and 'snapctl check --repair' rewrites "
            "this one",
            healable=True,
        )


class _Walker:
    def __init__(self, pool: Pool, report: CheckReport) -> None:
        self.pool = pool
        self.report = report
        self.capacity = pool.allocator.capacity
        self.owned = bytearray((self.capacity + 7) // 8)
        # False once a metadata block could not be read: the owned set is then incomplete, so
        # nothing may be concluded (or repaired) about free space
        self.complete = True
        self.corrupt: set[int] = set()
        self.bad_counters: list[tuple[InodeRecord, int, int, int]] = []
        self.leaked: list[int] = []  # allocated, owned by nothing (known when complete)
        self.bad_copies: dict[int, int] = {}  # a bad copy's address -> its good twin's
        self.owned_free: list[int] = []  # owned, but free in the free map

    def run(self) -> None:
        damage = self.pool.damage
        for what, e in damage.items():  # a degraded open: what it could not read
            self.corrupt.add(e.address)
            hint = (
                "; 'snapctl check --repair' rebuilds it from the trees"
                if what == "free-space bitmap"
                else "; the pool is served read-only, with the snapshots it can read exactly"
            )
            self.report.add("corrupt", True, _corrupt_where(e), _strip_hint(str(e)) + hint)
        # what the trees own is still known with only the bitmap damaged (a repair rebuilds
        # the bitmap from it); a damaged table hides owners
        self.complete = not (damage.keys() - {"free-space bitmap"})
        self._guard("metadata trees", self._own_metadata)
        self._check_tables()
        for vol in self.pool.volumes.values():
            self._check_volume(vol)
        if self.complete and not damage:
            self._check_ownership()
        else:
            self.report.stats["ownership_checked"] = 0

    def _guard(self, what: str, fn: Callable[[], None]) -> bool:
        """Run one pass over a structure; an unreadable metadata block in it is reported (once
        per block) and ends that pass only. False when it did."""
        try:
            fn()
            return True
        except CorruptMetadata as e:
            # the bitmap's own nodes own nothing but themselves: under a damaged one, the
            # rest of the walk still knows every owner
            self.complete &= what == "free-space bitmap"
            if e.address not in self.corrupt:
                self.corrupt.add(e.address)
                self.report.add(
                    "corrupt", True, _corrupt_where(e), f"{what}: {_strip_hint(str(e))}"
                )
            return False

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
        n = 0
        for what, tree in self.pool.metadata_trees():

            def walk(what: str = what, tree: MetadataTree = tree) -> None:
                nonlocal n
                for ptr, level in tree.all_node_pointers():
                    for addr in (ptr.addr0, ptr.addr1):
                        if addr:
                            self._own(addr, f"{what} node")
                            n += 1
                    self._verify_copies(what, tree, ptr, level)

            self._guard(what, walk)
        self.report.stats["metadata_blocks"] = n

    def _verify_copies(self, what: str, tree: MetadataTree, ptr: BlockPointer, level: int) -> None:
        """Each copy of a node on its own. One bad copy beside a good one is healable damage
        (reads use the good one; the server rewrites the bad one when it meets it, scrub or
        check --repair at once); both bad is fatal, reported by the pass that needs the node."""
        if not ptr.addr1:
            return  # one copy: the walks that read the node judge it
        bad = tree.store.bad_copies(ptr, tree.block_type(level))
        if len(bad) != 1:
            return
        addr, problem = bad[0]
        twin = ptr.addr1 if addr == ptr.addr0 else ptr.addr0
        self.bad_copies[addr] = twin
        self.report.add(
            "bad_copy",
            False,
            f"block {addr}",
            f"{what}: {_strip_hint(problem)}; its other copy at block {twin} is good, so "
            "nothing is lost: the server heals it when it reads it, and 'snapctl scrub' or "
            "'snapctl check --repair' rewrites it now",
            healable=True,
        )

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
        births: dict[int, int] = {}
        incomplete: list[tuple[int, Entry]] = []

        def walk_live() -> None:
            owned = entries = 0
            for b, e in vol.live.iter_entries():
                entries += 1
                where = f"volume {vol.name} block {b}"
                if e.kind == KIND_ADDR:
                    owned += 1  # (the inode counts what the map addresses, not a base too)
                    for blk in e.blocks:  # its block, and a base it owns
                        self._own(blk, where)
                    if e.incomplete:
                        incomplete.append((b, e))
                elif e.kind not in (KIND_NONE, KIND_HOLE):  # HOLE: a trimmed block of a clone
                    self.report.add(
                        "bad_entry", True, where, f"{where}: live entry of kind {e.kind}"
                    )
                if e.birth > next_id:
                    self.report.add(
                        "bad_birth",
                        True,
                        where,
                        f"{where}: birth {e.birth} is beyond next id {next_id}",
                    )
                births[b] = e.birth
            self._counters(f"volume {vol.name}", vol.live.inode, owned, entries, len(incomplete))

        live_ok = self._guard(f"volume {vol.name}'s map", walk_live)

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
        shadows_ok = True
        for sid in vol.chain:
            shadow = vol.shadows[sid]

            def walk_shadow(sid: int = sid, shadow: ShadowMap = shadow) -> None:
                owned = entries = 0
                for b, e in shadow.iter_entries():
                    entries += 1
                    where = f"snapshot {sid} of {vol.name} block {b}"
                    if e.kind == KIND_ADDR:
                        owned += 1
                        self._own(e.addr, where)
                        if e.incomplete:
                            self.report.add(
                                "bad_entry", True, where, f"{where}: incomplete shadow entry"
                            )
                    elif e.kind != KIND_HOLE and not (e.kind == KIND_ORIGIN and vol.origin):
                        self.report.add(
                            "bad_entry", True, where, f"{where}: shadow entry of kind {e.kind}"
                        )
                    if e.birth > sid:  # it preserves data live held when the snapshot was taken
                        self.report.add(
                            "bad_birth",
                            True,
                            where,
                            f"{where}: preserved data born at {e.birth}, after the snapshot "
                            "was taken",
                        )
                    if latest and sid >= latest:
                        recent.add(b)
                self._counters(f"snapshot {sid} of {vol.name}", shadow.inode, owned, entries)

            name = pool.snapshots[sid].name
            shadows_ok &= self._guard(f"snapshot {sid} ({name})'s map of {vol.name}", walk_shadow)
        if vol.shadow_index is not None:
            shadows_ok &= self._guard(
                f"shadow index of {vol.name}", lambda: self._check_shadow_index(vol)
            )
        if latest and vol.inode.op != OP_ROLLBACK and live_ok and shadows_ok:
            self._check_sharing(vol, latest, births, recent)
        if live_ok and shadows_ok:
            self._check_incomplete(vol, incomplete)
        self.report.stats["incomplete_blocks"] = self.report.stats.get(
            "incomplete_blocks", 0
        ) + len(incomplete)

    def _check_shadow_index(self, vol: Volume) -> None:
        """The index and the list hold the same entries, each of a snapshot of this volume:
        an entry only the index holds is read but never walked (a delete would leave it), one
        only the list holds is walked but never read. Each index entry is looked up in the
        list, and the counts compared."""
        index = vol.shadow_index
        assert index is not None
        chain = set(vol.chain)
        indexed = listed = 0
        for b, sid, _ in index.all_entries():
            indexed += 1
            where = f"shadow index of {vol.name}, snapshot {sid} block {b}"
            if sid not in chain:
                self.report.add(
                    "shadow_index", True, where, f"{where}: no such snapshot of {vol.name}"
                )
            elif not index.is_listed(sid, b):
                self.report.add(
                    "shadow_index", True, where, f"{where}: the shadow list does not hold it"
                )
        for _ in index.all_listed():
            listed += 1
        if listed != indexed:
            self.report.add(
                "shadow_index",
                True,
                f"shadow list of {vol.name}",
                f"shadow list of {vol.name}: {listed} entries, the index {indexed}",
            )

    def _check_incomplete(self, vol: Volume, incomplete: list[tuple[int, Entry]]) -> None:
        """A deferred merge's block: a valid range that is a proper part of the block, and a
        base that a snapshot of the same volume owns at the same block number, or that the
        entry owns itself (ENTRY_OWN_BASE: owned with it above)."""
        sectors = self.pool.block_size // SECTOR
        for b, e in incomplete:
            where = f"volume {vol.name} block {b}"
            unit = SUM_UNIT // SECTOR if self.pool.ctx.checksums else 1
            if not 0 <= e.valid_lo < e.valid_hi <= sectors or e.valid_hi - e.valid_lo == sectors:
                problem = f"incomplete block with valid sectors [{e.valid_lo}, {e.valid_hi})"
            elif e.valid_lo % unit or e.valid_hi % unit:  # each unit has its own checksum
                problem = (
                    f"incomplete block with valid sectors [{e.valid_lo}, {e.valid_hi}), not "
                    "whole 4 KiB units in a pool with data checksums"
                )
            elif e.owns_base and not self.pool.ctx.checksums:
                problem = "incomplete block owning its base in a pool without data checksums"
            elif not e.owns_base and not any(
                o.kind == KIND_ADDR and o.addr == e.base
                for o in (vol.shadows[s].get(b) for s in vol.chain)
            ):
                problem = f"incomplete block whose base {e.base} no snapshot of the volume owns"
            else:
                continue
            self.report.add("bad_incomplete", True, where, f"{where}: {problem}")

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

    def _counters(
        self, what: str, inode: InodeRecord, owned: int, entries: int, incomplete: int = 0
    ) -> None:
        rec = (inode.owned_blocks, inode.entry_count, inode.incomplete_blocks)
        if rec != (owned, entries, incomplete):
            self.bad_counters.append((inode, owned, entries, incomplete))
            self.report.add(
                "counters",
                # too low an incomplete count would let a merge be skipped: not just a statistic
                inode.incomplete_blocks < incomplete,
                what,
                f"{what}: records {rec[0]} blocks / {rec[1]} entries / {rec[2]} incomplete, "
                f"has {owned} / {entries} / {incomplete}",
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
                    self.owned_free.append(b)
                    if missing <= 5:
                        self.report.add(
                            "owned_free",
                            True,
                            f"block {b}",
                            f"block {b} is in use but the free map says free",
                        )
                elif ab and not ob:
                    leaks += 1
                    self.leaked.append(b)
        if missing > 5:
            self.report.add(
                "owned_free",
                True,
                "free map",
                f"... {missing - 5} more blocks in use that the free map says free",
            )
        if leaks:
            shown = ", ".join(str(b) for b in self.leaked[:8]) + (", ..." if leaks > 8 else "")
            self.report.add(
                "leak",
                False,
                "free map",
                f"{leaks} blocks are allocated but owned by nothing (leaked space: blocks "
                f"{shown}); harmless, the pool can be served; 'snapctl check --repair' with "
                "the server stopped frees them",
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


# --- repair -------------------------------------------------------------------------------------


@dataclass
class RepairReport:
    before: CheckReport  # what the check found
    fixed: list[str]  # what the repair commit changed, one line each
    after: CheckReport  # the check of the repaired pool

    @property
    def exit_code(self) -> int:
        """fsck's: 0 nothing wrong, 1 everything found was corrected, 4 something is left."""
        if self.before.clean:
            return 0
        return 1 if self.after.clean else 4

    def json(self) -> dict[str, Any]:
        return {
            "clean": self.before.clean,
            "repaired": bool(self.fixed),
            "fixed": self.fixed,
            "defects": [asdict(d) for d in self.before.defects],
            "remaining": [asdict(d) for d in self.after.defects],
            "stats": self.after.stats,
            "exit_code": self.exit_code,
        }


def repair(device: Device) -> RepairReport:
    """Check the pool on device (opened read-write, locked, with no server using it) and fix
    what can be fixed without guessing, in one copy-on-write commit; then check again.

    Raises NotAPool / UnsupportedFormat like check(); a pool that cannot be opened at all
    (both superblocks bad, a table unreadable) is left untouched and reported as it is."""
    before = check(device)
    if before.clean:
        return RepairReport(before, [], before)
    try:
        pool = Pool.open(device, cache_bytes=CHECK_CACHE_BYTES, retake=False)
    except DittoError:
        return RepairReport(before, [], before)  # nothing can be fixed safely
    walker = _Walker(pool, CheckReport())
    walker.run()
    fixed: list[str] = []
    ownership = [d for d in walker.report.defects if d.kind in ("double_owner", "bad_address")]
    if walker.complete and not ownership and "free-space bitmap" in pool.damage:
        pool.allocator.rebuild(walker.owned)
        del pool.damage["free-space bitmap"]
        # the deferral window's generations keep their blocks (from their own bitmaps): a
        # rewind to them stays exact, and a crash during the repair leaves them whole
        pool._load_deferred()
        pool.sb_dirty = True
        fixed.append("rebuilt the free-space bitmap from the trees")
    if pool.damage:
        return RepairReport(before, [], before)  # a damaged table: nothing is safe to change
    if walker.complete:
        alloc = pool.allocator
        sb_used = pool.sb.used_blocks
        count_wrong = sb_used != alloc.used_blocks  # wrong before the fixes below change it
        for b in walker.leaked:
            alloc.free(b)  # reusable (and punched out) once the repair commit is durable
        alloc.mark_in_use(walker.owned_free)
        if walker.leaked:
            fixed.append(f"freed {len(walker.leaked)} leaked blocks")
        if walker.owned_free:
            fixed.append(
                f"marked {len(walker.owned_free)} blocks in use that the free map called free"
            )
        for inode, owned, entries, incomplete in walker.bad_counters:
            fixed.append(
                f"inode {inode.ino}: block count {inode.owned_blocks} -> {owned}, entry count "
                f"{inode.entry_count} -> {entries}, incomplete count "
                f"{inode.incomplete_blocks} -> {incomplete}"
            )
            inode.owned_blocks = owned
            inode.entry_count = entries
            inode.incomplete_blocks = incomplete
            pool.touch_inode(inode)
        if count_wrong:
            fixed.append(f"superblock used-block count {sb_used} -> {alloc.used_blocks}")
            pool.sb_dirty = True
    for bad, twin in walker.bad_copies.items():
        pool.store.heals[bad] = bytes(device.pread(pool.block_size, twin * pool.block_size))
        fixed.append(f"rewrote the bad metadata copy at block {bad} from its twin at {twin}")
    slots = [d for d in before.defects if d.kind == "superblock"]
    for d in slots:
        fixed.append(f"rewrote {d.where} from the good one")
    if slots:
        pool.sb_dirty = True
    if fixed:
        pool.commit()
    if slots:  # the second commit rewrites the other generation's two slots
        pool.sb_dirty = True
        pool.commit()
    after = check(device)
    return RepairReport(before, fixed, after)


# --- a pool with no server ----------------------------------------------------------------------


def _refuse_if_in_use(device: Device) -> None:
    """The lock on this path is ours, but the pool's in-use record may name a live server that
    reached the same disk through another path (a second loop device, another host)."""
    try:
        sb = read_superblock(device)
    except CorruptMetadata:
        return  # no superblock to say so; the check reports why
    refuse_if_in_use(sb, device.path, "check it through that server, or stop it first")


def _open_disk(path: str, readonly: bool) -> Device:
    try:
        device = Device(path, readonly=readonly)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except OSError as e:
        raise DittoError(
            f"cannot open {path}{'' if readonly else ' for writing'}: {e.strerror}"
        ) from None
    try:
        device.lock()
        _refuse_if_in_use(device)
    except BaseException:
        device.close()
        raise
    return device


def check_disk(path: str) -> CheckReport:
    """check() of the pool on path with no server running: opened read-only under the pool's
    lock, so checking never changes a byte (and works on a read-only disk)."""
    device = _open_disk(path, readonly=True)
    try:
        return check(device)
    finally:
        device.close()


def repair_disk(path: str) -> RepairReport:
    """repair() of the pool on path with no server running, under the pool's lock."""
    device = _open_disk(path, readonly=False)
    try:
        return repair(device)
    finally:
        device.close()

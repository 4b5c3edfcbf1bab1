"""Transactions: the pool's in-memory state above one committed superblock, and its commit.

A `Pool` is everything reachable from the superblock it was opened at, plus the changes of the
one open transaction. A commit makes the changes durable in a single atomic step:

    1. write every dirty map tree, then the inode and snapshot tables, then the bitmap, each node
       at a freshly allocated block (copy-on-write: committed blocks are never overwritten);
    2. sync the device (data written by requests included);
    3. write the superblock with generation + 1 into its first slot, sync, then into its
       second slot (layout.superblock_slots; made durable by the next sync);
    4. only now let blocks freed by the transaction be allocated again, and punch them out.

A crash before step 3 completes leaves the previous superblock, and every block it reaches,
intact; a torn superblock fails its checksum and the previous generation's copies win.
`abort()` drops the open transaction by reloading the committed state.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import replace

from .allocator import Allocator
from .blockmap import BlockMap, InodeTree
from .datasums import DataSums
from .device import Device
from .errors import (
    CorruptMetadata,
    DamagedPool,
    NotAPool,
    PoolBusy,
    PoolTruncated,
    UnsupportedFormat,
)
from .inplace import InPlaceList, in_place_limit, next_list, retake_sums
from .layout import (
    BT_BITMAP,
    DEFAULT_METADATA_COPIES,
    DEFER_GENERATIONS,
    FEATURE_DATA_CHECKSUMS,
    FEATURE_SUMS_XXH3,
    FORMAT_VERSION,
    INODE_CHECKSUMS,
    INODE_IN_PLACE,
    INODE_SHADOW,
    INODE_SHADOW_INDEX,
    INODE_SHADOW_LIST,
    INODE_VOLUME,
    OP_DELETE,
    OP_NONE,
    OWNER_BITMAP,
    RESERVED_BYTES,
    SNAP_ACTIVE,
    SNAP_DELETING,
    SNAPF_WRITABLE,
    SUPERBLOCK_OFFSETS,
    SUPERBLOCK_SIZE,
    InodeRecord,
    RootEntry,
    SnapshotRecord,
    Superblock,
    check_block_size,
    first_data_block,
    in_place_leaf_capacity,
    pack_ring,
    pack_superblock,
    root_entry,
    root_fields,
    root_pointer,
    superblock_slots,
    unpack_ring,
    unpack_superblock,
)
from .radix import MetadataTree, MetaStore, RadixTree
from .rundir import pid_alive
from .shadow_index import ShadowIndex, ShadowMap
from .tables import inode_table, snapshot_table
from .volume import DataContext, Volume

log = logging.getLogger("dittofs")

DEFAULT_CACHE_BYTES = 64 << 20
IMAGE_INITIAL_BLOCKS = 64


def _reserve(capacity: int) -> int:
    """Blocks kept for metadata on a full pool (ZFS keeps a "slop" for the same reason): enough
    for snapshot delete and rollback to run and for a commit to fit after any bounded step."""
    return max(16, min(capacity // 8, max(64, capacity // 256)))


def refuse_if_in_use(sb: Superblock, path: str, advice: str) -> None:
    """The pool's in-use record names a live server (on this host, or any other host) that may
    have reached the same disk through another path: refuse, saying who, and `advice`."""
    if not sb.inuse_pid or sb.inuse_pid == os.getpid():
        return
    host = socket.gethostname()
    if sb.inuse_host == host and not pid_alive(sb.inuse_pid):
        return  # a crashed server's stale record
    where = "" if sb.inuse_host == host else f" on host {sb.inuse_host}"
    raise PoolBusy(
        f"{path} is in use by process {sb.inuse_pid}{where} (perhaps through another path "
        f"to the same disk); {advice}"
    )


def read_superblock(device: Device) -> Superblock:
    """The newest generation with a valid superblock copy."""
    return read_superblocks(device)[0]


def read_superblocks(
    device: Device, strict: bool = True
) -> tuple[Superblock, list[tuple[int, str]]]:
    """The newest generation with a valid copy, and what is wrong with the other slots (if
    anything is: (slot, problem)). Refuses (CorruptMetadata, naming the newest usable generation
    and `snapctl rewind`) when both slots of one parity are unusable: the generation they held
    may have been newer than any left, and opening an older one silently would drop
    acknowledged writes. strict=False: the newest valid copy anyway (for a rewind)."""
    raw = device.pread(RESERVED_BYTES, 0)
    found: dict[int, Superblock] = {}
    errors: list[Exception] = []
    problems: list[tuple[int, str]] = []
    for slot, off in enumerate(SUPERBLOCK_OFFSETS):
        try:
            found[slot] = unpack_superblock(raw[off:], device.path)
        except UnsupportedFormat:
            raise  # never fall back to an older slot of a pool a newer release has touched
        except (NotAPool, CorruptMetadata) as e:
            errors.append(e)
            problems.append((slot, str(e)))
    if not found:
        if any(isinstance(e, CorruptMetadata) for e in errors):
            raise CorruptMetadata(
                f"{device.path}: every superblock copy fails its checksum; the pool cannot be "
                "opened (run 'snapctl check' for details)",
                0,
                "superblock",
            )
        raise NotAPool(
            f"{device.path} holds no dittofs pool; make one with 'snapctl format {device.path}' "
            "(or start nbdkit with size=SIZE on a path that does not exist yet)"
        )
    newest = max(found.values(), key=lambda s: s.generation)
    if newest.version == 1:  # two 4 KiB slots, one per generation (the other two: inside them)
        problems = [(slot, why) for slot, why in problems if slot in (0, 2)]
        return newest, problems
    for parity in (0, 1) if strict else ():
        pair = (parity, 2 + parity)
        if all(slot not in found for slot in pair) and newest.generation % 2 != parity:
            raise CorruptMetadata(
                f"{device.path}: both copies of a superblock generation (slots {pair[0]} and "
                f"{pair[1]}) are damaged, and it may have been newer than generation "
                f"{newest.generation}, the newest one left (committed "
                f"{commit_time(newest.commit_ns)}). Nothing was opened or changed. "
                f"'snapctl -d {device.path} rewind --list' shows the usable generations; "
                f"'snapctl -d {device.path} rewind {newest.generation} --yes' opens the pool "
                "there",
                0,
                "superblock",
            )
    return newest, problems


def commit_time(ns: int) -> str:
    """A commit time as messages and listings show it."""
    if not ns:
        return "at an unrecorded time"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9))


def write_superblock(device: Device, sb: Superblock, last_page: int = 1) -> None:
    """Both copies of sb's generation, the second page only once the first is durable (so a
    torn write can damage one page at most). The caller has synced what sb points to. The
    second copy is made durable by the next sync (the next commit's first step, or close).
    last_page 0: write the first page's copy last (an upgrade keeps the newest version 1
    superblock, which spans page 0, whole until the new one is durable elsewhere)."""
    first, second = superblock_slots(sb.generation)
    if last_page == 0:
        first, second = second, first
    data = pack_superblock(sb)
    device.pwrite(data, SUPERBLOCK_OFFSETS[first])
    device.sync()
    device.pwrite(data, SUPERBLOCK_OFFSETS[second])


class Pool:
    def __init__(self, device: Device, sb: Superblock, cache_bytes: int) -> None:
        self.device = device
        self.sb = sb
        self.block_size = sb.block_size
        self.store = MetaStore(device, sb.block_size, cache_bytes, sb.version)
        self.store.copies = max(1, sb.metadata_copies)
        self.store.report = lambda message: log.warning("%s", message)
        self.store.generation = sb.generation + 1
        self.allocator = Allocator(self.store, sb.capacity_blocks, sb.growable, sb.reserve_blocks)
        self.inodes = inode_table(self.store, root_pointer(sb, "inode"), sb.inode_height)
        self.snaptab = snapshot_table(self.store, root_pointer(sb, "snap"), sb.snap_height)
        self.volumes: dict[int, Volume] = {}
        self.snapshots: dict[int, SnapshotRecord] = {}
        # ids of the snapshots being deleted (state SNAP_DELETING): what pending_deletes() lists
        # at every tick, kept here rather than found by a look at every record
        self.deleting: set[int] = set()
        self.dirty_maps: set[InodeTree] = set()
        self.dirty_inodes: dict[int, InodeRecord | None] = {}
        self.dirty_snaps: dict[int, SnapshotRecord | None] = {}
        self.sb_dirty = False
        self.ctx = DataContext(
            device=device,
            allocator=self.allocator,
            block_size=sb.block_size,
            birth=lambda: self.sb.next_snap_id,
            commit=self.commit,
            checksums=bool(sb.features & FEATURE_DATA_CHECKSUMS),
        )
        self.commits = 0
        self.allocator.commit_need = self._commit_need
        self.superblock_problems: list[tuple[int, str]] = []  # found at open: (slot, why)
        self.superblock_last_page = 1  # see write_superblock
        # after a rewind: the generation rewound to, first in the next commit's ring (in place
        # of the superblock's own, which names a generation whose state was discarded)
        self.ring_head: RootEntry | None = None
        # a degraded open (_damaged): what could not be read, by table; the snapshots at or
        # below unreadable_below and the volumes in unreadable_volumes are refused, the rest
        # served read-only
        self.damage: dict[str, CorruptMetadata] = {}
        self.unreadable_below = 0
        self.unreadable_volumes: dict[int, str] = {}
        # with data checksums: the in-place list (inplace.py) as committed; the commit after a
        # snapshot or at a clean close records it empty (in_place_reset)
        self.in_place: InPlaceList | None = None
        self.in_place_list: list[int] = []
        self.in_place_reset = False
        self.in_place_capacity = in_place_leaf_capacity(sb.block_size)

    # --- open and format ----------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        device: Device,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        upgrading: bool = False,
        retake: bool = True,
    ) -> Pool:
        """The pool on device, as its newest superblock describes it. A pool of an older format
        version is refused, with the way to upgrade it, unless upgrading (upgrade.py reads it
        to write it anew). retake=False: the committed state as it is, for a walk of its
        metadata (the checker), without retaking the in-place list's checksums."""
        sb, problems = read_superblocks(device)
        if sb.version != FORMAT_VERSION and not upgrading:
            raise UnsupportedFormat(
                f"{device.path} holds a pool of format version {sb.version}; this dittofs "
                f"serves version {FORMAT_VERSION}. Upgrade it in place with 'snapctl upgrade "
                f"{device.path}' (with no server running; data is not rewritten)"
            )
        need = sb.capacity_blocks * sb.block_size
        have = device.size()
        if have < need:
            raise PoolTruncated(
                f"{device.path} is {have} bytes but its pool spans {need}: the image was "
                "truncated or the device shrank; restore it, or run 'snapctl check'"
            )
        pool = cls(device, sb, cache_bytes)
        pool.superblock_problems = problems
        pool._load()
        if retake:
            pool.retake_in_place()
        return pool

    def _load_deferred(self) -> None:
        """The deferral window across a restart: what the bitmaps of the last
        DEFER_GENERATIONS generations (from the root ring) hold that the newest one frees."""
        for entry in unpack_ring(self.sb)[:DEFER_GENERATIONS]:
            older = RadixTree(
                self.store,
                OWNER_BITMAP,
                BT_BITMAP,
                self.allocator.bits_per_leaf,
                root_pointer(entry, "bitmap"),
                entry.bitmap_height,
            )
            try:
                self.allocator.defer_from(older, self.sb.generation)
            except CorruptMetadata as e:
                log.warning(
                    "%s: the free-space bitmap of generation %d cannot be read (%s): its "
                    "blocks may be reused, so a rewind to it or before is not guaranteed",
                    self.device.path,
                    entry.generation,
                    e,
                )

    def restore_second_copy(self) -> None:
        """A crash after a commit's first superblock copy was durable, or damage since, can
        leave the newest generation with one good copy: write the other now, before anything
        else (the caller has made sure no other process serves the pool). The slot holds
        nothing any state relies on, so a torn write here costs nothing."""
        if self.device.readonly or self.device.read_only_device or self.damage:
            return  # (a degraded pool is written by nothing: read-only until repaired)
        bad = {slot for slot, _ in self.superblock_problems}
        raw = self.device.pread(RESERVED_BYTES, 0)
        data = pack_superblock(self.sb)
        for slot in superblock_slots(self.sb.generation):
            off = SUPERBLOCK_OFFSETS[slot]
            if slot in bad or raw[off : off + SUPERBLOCK_SIZE] != data:
                self.device.pwrite(data, off)
                self.device.sync()
                self.store.healed += slot in bad  # damage healed (not a crash's stale copy)

    @classmethod
    def format(
        cls,
        device: Device,
        block_size: int,
        live_size: int,
        growable: bool,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        checksums: bool = False,
        metadata_copies: int = DEFAULT_METADATA_COPIES,
    ) -> Pool:
        check_block_size(block_size)
        if metadata_copies not in (1, 2):
            raise ValueError(f"metadata copies: {metadata_copies}; use 1 or 2")
        first = first_data_block(block_size)
        if growable:
            capacity = first + IMAGE_INITIAL_BLOCKS
        else:
            capacity = device.size() // block_size
            if capacity < first + 16:
                raise PoolTruncated(
                    f"{device.path} is too small for a pool of {block_size}-byte blocks "
                    f"(it needs at least {(first + 16) * block_size} bytes)"
                )
        sb = Superblock(
            generation=0,
            block_size=block_size,
            capacity_blocks=capacity,
            pool_guid=uuid.uuid4().bytes,
            created_ns=time.time_ns(),
            growable=growable,
            features=FEATURE_DATA_CHECKSUMS | FEATURE_SUMS_XXH3 if checksums else 0,
            reserve_blocks=0 if growable else _reserve(capacity),
            metadata_copies=metadata_copies,
        )
        # Every slot is wiped first: a power cut during a re-format must not bring back the
        # pool that was there, whose blocks the new one is about to overwrite.
        device.pwrite(bytes(RESERVED_BYTES), 0)
        device.sync()
        pool = cls(device, sb, cache_bytes)
        pool.allocator.format()
        if growable:
            device.truncate(capacity * block_size)
        pool.create_volume("live", live_size)
        if checksums:
            pool.create_data_sums()
        pool.commit()
        # The other slots get the same state one generation lower (with an empty ring), so
        # every slot holds a superblock of this pool.
        old = replace(pool.sb, generation=pool.sb.generation - 1, ring=pack_ring([]))
        write_superblock(device, old)
        device.sync()
        return pool

    def _load(self) -> None:
        sb = self.sb
        try:
            self.allocator.load(root_pointer(sb, "bitmap"), sb.bitmap_height)
        except CorruptMetadata as e:
            self._damaged("free-space bitmap", e)
            self.allocator.refuse_all()
        else:
            self._load_deferred()
        # An unreadable table root loses the whole table: that refuses the open (naming the
        # newest usable generation: opening._open_newest). Below the root, a damaged node
        # loses its records only, and the pool opens degraded.
        self.inodes.tree.load_root()
        self.snaptab.tree.load_root()
        shadows: list[InodeRecord] = []
        index_parts: dict[int, dict[int, InodeRecord]] = {}
        for _, rec in self.inodes.items(skip=lambda e: self._damaged("inode table", e)):
            if rec.kind == INODE_VOLUME:
                self.volumes[rec.ino] = Volume(rec, BlockMap(self.store, rec, self.dirty_maps))
            elif rec.kind == INODE_SHADOW:
                shadows.append(rec)
            elif rec.kind == INODE_CHECKSUMS:
                xxh3 = bool(sb.features & FEATURE_SUMS_XXH3)
                self.ctx.sums = DataSums(self.store, rec, self.dirty_maps, xxh3)
            elif rec.kind == INODE_IN_PLACE:
                self.in_place = InPlaceList(self.store, rec, self.dirty_maps)
            elif rec.kind in (INODE_SHADOW_INDEX, INODE_SHADOW_LIST):
                index_parts.setdefault(rec.volume_ino, {})[rec.kind] = rec
        self._load_in_place()
        for _, snap in self.snaptab.items(skip=lambda e: self._damaged("snapshot table", e)):
            self.snapshots[snap.id] = snap
            if snap.state == SNAP_DELETING:
                self.deleting.add(snap.id)
        tables_damaged = {"inode table", "snapshot table"} & set(self.damage)
        if tables_damaged:
            self._bound_damage(shadows, tables_damaged)
        for vino, parts in index_parts.items():
            vol = self.volumes.get(vino)
            if vol is None or len(parts) != 2:
                if tables_damaged:
                    continue
                raise CorruptMetadata(
                    f"the shadow index inodes of volume inode {vino} are incomplete or belong "
                    "to no volume; run 'snapctl check'",
                    -1,
                    "inode-table leaf",
                )
            index, listing = parts[INODE_SHADOW_INDEX], parts[INODE_SHADOW_LIST]
            vol.shadow_index = ShadowIndex(self.store, index, listing, self.dirty_maps)
        for rec in shadows:
            vol = self.volumes.get(rec.volume_ino)
            if tables_damaged and (vol is None or rec.snap_id not in self.snapshots):
                continue  # its chain is cut: _bound_damage refused what read through it
            if vol is None or rec.snap_id not in self.snapshots:
                raise CorruptMetadata(
                    f"shadow inode {rec.ino} belongs to a missing volume or snapshot; "
                    "run 'snapctl check'",
                    -1,
                    "inode-table leaf",
                )
            held_in = vol.shadow_index
            if self.store.version < 2:  # its entries are still in a tree of its own, which
                held_in = held_in or self._new_shadow_index(vol)  # upgrade.py moves in here
            elif held_in is None:
                if tables_damaged:
                    continue
                raise CorruptMetadata(
                    f"snapshot {rec.snap_id} of volume {vol.name} has no shadow index; run "
                    "'snapctl check'",
                    -1,
                    "inode-table leaf",
                )
            vol.add_shadow(rec.snap_id, ShadowMap(held_in, rec, self.dirty_maps))
            if self.snapshots[rec.snap_id].flags & SNAPF_WRITABLE:
                vol.writable.add(rec.snap_id)
        for vol in self.volumes.values():
            if vol.inode.origin_vol:
                origin = self.volumes.get(vol.inode.origin_vol)
                if vol.inode.op == OP_DELETE and (
                    origin is None or vol.inode.origin_snap not in origin.shadows
                ):
                    continue  # going anyway: it will never be read again
                if tables_damaged and (
                    origin is None or vol.inode.origin_snap <= self.unreadable_below
                ):
                    self.unreadable_volumes[vol.ino] = "its origin's metadata is damaged"
                    continue
                if origin is None or vol.inode.origin_snap not in origin.shadows:
                    raise CorruptMetadata(
                        f"clone {vol.name} has a missing origin; run 'snapctl check'",
                        -1,
                        "inode-table leaf",
                    )
                vol.origin = origin
        changed = tables_damaged and bool(self.unreadable_volumes)
        while changed:  # a clone of an unreadable clone reads through it
            changed = False
            for vol in self.volumes.values():
                origin = vol.origin
                if (
                    origin is not None
                    and origin.ino in self.unreadable_volumes
                    and vol.ino not in self.unreadable_volumes
                ):
                    self.unreadable_volumes[vol.ino] = "its origin's metadata is damaged"
                    changed = True

    def _load_in_place(self) -> None:
        if self.in_place is None:
            return
        try:
            self.in_place_list = self.in_place.load()
        except CorruptMetadata as e:
            # Every copy of a list leaf is bad: blocks overwritten in place after the commit
            # may fail their checksums. That is detected on read (never wrong data), and writes
            # are still safe: the next commit records a new list.
            log.warning(
                "%s: the in-place list is unreadable (%s): a block overwritten in place just "
                "before the pool stopped may fail its checksum when read; run 'snapctl scrub'",
                self.device.path,
                e,
            )
        self.ctx.in_place = frozenset(self.in_place_list)

    def retake_in_place(self) -> int:
        """Take the checksums of the blocks on the committed in-place list from their data:
        the transaction after that commit may have overwritten them in place. In memory; the
        next commit writes them. Returns how many blocks were retaken."""
        if not self.in_place_list or self.ctx.sums is None:
            return 0
        done = retake_sums(self.device, self.ctx.sums, self.in_place_list, self.device.path)
        log.info(
            "%s: %d blocks may have been overwritten in place when the pool stopped; their "
            "checksums are taken from their data",
            self.device.path,
            done,
        )
        return done

    def forget_in_place(self) -> None:
        """No block may be overwritten in place from now on, and the next commit records an
        empty in-place list: a snapshot shares live's blocks, a clean close leaves nothing for
        the next open to retake."""
        self.ctx.in_place = frozenset()
        self.in_place_reset = True

    def _damaged(self, what: str, e: CorruptMetadata) -> None:
        """Metadata that writing depends on is unreadable (every copy): the pool opens
        degraded, read-only, with what can still be read exactly."""
        self.damage.setdefault(what, e)

    def _bound_damage(self, shadows: list[InodeRecord], damaged: set[str]) -> None:
        """Which snapshots a damaged table makes unreadable. A snapshot reads through every
        newer one's shadow map (ditto), so a shadow map that is lost, or whose record is,
        makes that snapshot and every older one unreadable: reading past the gap would
        return the wrong data. With both tables damaged a snapshot can vanish whole, unseen,
        so none is read."""
        if damaged == {"inode table", "snapshot table"}:
            self.unreadable_below = 1 << 64
            return
        found: dict[int, int] = {}
        for rec in shadows:
            if rec.volume_ino in self.volumes:
                found[rec.snap_id] = found.get(rec.snap_id, 0) + 1
        cut = [sid for sid, rec in self.snapshots.items() if found.get(sid, 0) < rec.covered]
        cut += [sid for sid in found if sid not in self.snapshots]
        self.unreadable_below = max(cut, default=0)

    @property
    def read_only_reason(self) -> str | None:
        """Why this pool may not be written (degraded open), or None."""
        if not self.damage:
            return None
        what = "; ".join(f"the {k}: {str(e).split('; run ')[0]}" for k, e in self.damage.items())
        return (
            f"the pool is read-only: metadata it needs for writing is damaged beyond its "
            f"copies ({what}). Everything that can be read exactly is served; stop the server "
            "and run 'snapctl check --repair' (it rebuilds a free-space bitmap from the trees), "
            "or 'snapctl rewind --list'"
        )

    # --- changes ------------------------------------------------------------------------------

    def touch_inode(self, rec: InodeRecord) -> None:
        self.dirty_inodes[rec.ino] = rec

    def touch_snapshot(self, rec: SnapshotRecord) -> None:
        self.dirty_snaps[rec.id] = rec

    def _new_ino(self) -> int:
        ino = self.sb.next_inode
        self.sb.next_inode += 1
        return ino

    def create_data_sums(self) -> DataSums:
        """The checksum inode of a pool with data checksums (format, upgrade)."""
        ino = self._new_ino()
        rec = InodeRecord(kind=INODE_CHECKSUMS, ino=ino, volume_ino=ino, created_ns=time.time_ns())
        self.sb.features |= FEATURE_SUMS_XXH3
        self.ctx.sums = DataSums(self.store, rec, self.dirty_maps, xxh3=True)
        self.touch_inode(rec)
        return self.ctx.sums

    def _new_shadow_index(self, vol: Volume) -> ShadowIndex:
        """The volume's shadow index, made empty (by its first snapshot)."""
        now = time.time_ns()
        index, listing = (
            InodeRecord(ino=self._new_ino(), kind=kind, volume_ino=vol.ino, created_ns=now)
            for kind in (INODE_SHADOW_INDEX, INODE_SHADOW_LIST)
        )
        vol.shadow_index = ShadowIndex(self.store, index, listing, self.dirty_maps)
        self.touch_inode(index)
        self.touch_inode(listing)
        return vol.shadow_index

    def create_volume(
        self, name: str, size: int, origin: Volume | None = None, origin_snap: int = 0
    ) -> Volume:
        """A new, empty volume; with origin, a clone reading through origin@origin_snap."""
        ino = self._new_ino()
        rec = InodeRecord(
            ino=ino,
            kind=INODE_VOLUME,
            volume_ino=ino,
            size=size,
            created_ns=time.time_ns(),
            name=name,
            origin_vol=origin.ino if origin else 0,
            origin_snap=origin_snap if origin else 0,
        )
        vol = Volume(rec, BlockMap(self.store, rec, self.dirty_maps))
        vol.origin = origin
        self.volumes[ino] = vol
        self.touch_inode(rec)
        return vol

    def create_snapshot(
        self, name: str, vols: list[Volume], flags: int = 0, guid: bytes | None = None
    ) -> SnapshotRecord:
        """A new, empty snapshot of vols: O(len(vols)) whatever their size. (A received
        snapshot keeps the sender's GUID.)"""
        sid = self.sb.next_snap_id
        self.sb.next_snap_id += 1
        now = time.time_ns()
        rec = SnapshotRecord(
            id=sid,
            guid=guid or uuid.uuid4().bytes,
            name=name,
            created_ns=now,
            flags=flags,
            covered=len(vols),
        )
        for vol in vols:
            shadow = InodeRecord(
                ino=self._new_ino(),
                kind=INODE_SHADOW,
                volume_ino=vol.ino,
                snap_id=sid,
                size=vol.inode.size,
                created_ns=now,
                referenced_blocks=vol.inode.owned_blocks,
            )
            index = vol.shadow_index or self._new_shadow_index(vol)
            vol.add_shadow(sid, ShadowMap(index, shadow, self.dirty_maps))
            vol.inode.snap_id = sid
            self.touch_inode(shadow)
            self.touch_inode(vol.inode)
        self.forget_in_place()
        self.snapshots[sid] = rec
        self.touch_snapshot(rec)
        return rec

    def covering(self, sid: int) -> list[Volume]:
        return [v for v in self.volumes.values() if sid in v.shadows]

    def mark_deleting(self, rec: SnapshotRecord) -> None:
        """Step one of a delete: the snapshot disappears from view; its blocks are reclaimed
        afterwards by `reclaim_step` (and after a crash, on the next open)."""
        rec.state = SNAP_DELETING
        self.deleting.add(rec.id)
        self.touch_snapshot(rec)
        for vol in self.covering(rec.id):
            if vol.inode.snap_id == rec.id:
                # the newest other active snapshot: from the top of the (ascending) chain, so
                # it costs the snapshots above it, not the whole chain
                vol.inode.snap_id = next(
                    (
                        s
                        for s in reversed(vol.chain)
                        if s != rec.id and self.snapshots[s].state == SNAP_ACTIVE
                    ),
                    0,
                )
                self.touch_inode(vol.inode)

    def pending_deletes(self) -> list[int]:
        return sorted(self.deleting)

    def finish_delete(self, sid: int) -> None:
        """Every covered volume's shadow map is empty: drop the records."""
        for vol in self.covering(sid):
            self._drop_shadow(vol, sid)
        del self.snapshots[sid]
        self.deleting.discard(sid)
        self.dirty_snaps[sid] = None

    def _drop_shadow(self, vol: Volume, sid: int) -> None:
        shadow = vol.shadows[sid]  # emptied by the steps that end here (snapshots.py)
        self.dirty_maps.discard(shadow)
        vol.remove_shadow(sid)
        vol.writable.discard(sid)
        self.dirty_inodes[shadow.inode.ino] = None

    def finish_volume_delete(self, vol: Volume) -> None:
        """The volume's maps are empty: drop it, its shadows, and snapshots left covering
        nothing."""
        for sid in list(vol.chain):
            self._drop_shadow(vol, sid)
            rec = self.snapshots[sid]
            rec.covered -= 1
            if rec.covered <= 0:
                del self.snapshots[sid]
                self.deleting.discard(sid)
                self.dirty_snaps[sid] = None
            else:
                self.touch_snapshot(rec)
        vol.live.tree.free_all()
        self.dirty_maps.discard(vol.live)
        if vol.shadow_index is not None:
            vol.shadow_index.free_all()
            for part in vol.shadow_index.inodes:
                self.dirty_inodes[part.ino] = None
        del self.volumes[vol.ino]
        self.dirty_inodes[vol.ino] = None

    def clones_of(self, vol: Volume, sid: int | None = None) -> list[Volume]:
        """Volumes cloned from vol (from its snapshot sid, if given)."""
        return [
            v
            for v in self.volumes.values()
            if v.origin is vol and (sid is None or v.inode.origin_snap == sid)
        ]

    def finish_rollback(self, vol: Volume, sid: int) -> None:
        vol.inode.op = OP_NONE
        vol.inode.op_target = 0
        vol.inode.size = vol.shadows[sid].inode.size
        self.touch_inode(vol.inode)

    def set_inuse(self, pid: int) -> None:
        self.sb.inuse_pid = pid
        self.sb.inuse_host = socket.gethostname() if pid else ""
        self.sb.inuse_since_ns = time.time_ns() if pid else 0
        self.sb_dirty = True

    # --- commit -------------------------------------------------------------------------------

    def _commit_need(self) -> int:
        """An upper bound on the blocks the next commit allocates: every dirty node, the table
        paths the dirty records will dirty, and the bitmap blocks with their paths."""
        tables = (self.inodes.height + 2) * (1 + len(self.dirty_inodes) + len(self.dirty_maps))
        tables += (self.snaptab.height + 2) * (1 + len(self.dirty_snaps))
        bitmap = (len(self.allocator.dirty_leaves) + 2) * (self.allocator.tree.height + 2)
        in_place = 0
        if self.ctx.checksums:  # the list the commit records, whole
            listed = len(self.in_place_list) + len(self.ctx.fresh)
            leaves = -(-min(listed, in_place_limit(self.block_size)) // self.in_place_capacity)
            in_place = leaves + 2 if leaves else 0
        return (self.store.dirty_nodes + tables + bitmap + in_place) * self.store.copies

    def metadata_trees(self) -> list[tuple[str, MetadataTree]]:
        """Every metadata tree of the committed state, named for messages."""
        trees: list[tuple[str, MetadataTree]] = [
            ("inode table", self.inodes.tree),
            ("snapshot table", self.snaptab.tree),
            ("free-space bitmap", self.allocator.tree),
        ]
        if self.ctx.sums is not None:
            trees.append(("data checksums", self.ctx.sums.tree))
        if self.in_place is not None:
            trees.append(("in-place list", self.in_place.tree))
        for vol in self.volumes.values():
            trees.append((f"volume {vol.name} map", vol.live.tree))
            if vol.shadow_index is not None:
                trees.append((f"shadow index of {vol.name}", vol.shadow_index.by_block.tree))
                trees.append((f"shadow list of {vol.name}", vol.shadow_index.by_snap.tree))
        return trees

    @property
    def is_dirty(self) -> bool:
        return bool(
            self.dirty_maps
            or self.dirty_inodes
            or self.dirty_snaps
            or self.allocator.changed
            or self.sb_dirty
            or (self.store.heals and not self.damage)  # a degraded pool writes nothing
        )

    @property
    def is_pending(self) -> bool:
        """Anything for a commit to write: is_dirty (what a FLUSH must commit), or checksums
        of blocks overwritten in place, or an in-place list to empty (what a FLUSH need not:
        an open after a crash retakes them from the data)."""
        if self.is_dirty:
            return True
        if self.damage or self.device.readonly or self.device.read_only_device:
            return False  # (checksums retaken at open stay in memory)
        sums = self.ctx.sums
        return (sums is not None and sums.lagging) or (
            self.in_place_reset and bool(self.in_place_list)
        )

    def _next_in_place(self) -> list[int]:
        """The in-place list this commit records (inplace.py), written if it changed."""
        ctx = self.ctx
        if not ctx.checksums or ctx.sums is None:
            return []
        if self.in_place_reset:
            blocks: list[int] = []
        else:
            blocks = next_list(
                self.in_place_list,
                ctx.fresh,
                ctx.rewritten,
                self.allocator.pending,
                in_place_limit(self.block_size),
            )
        if blocks != self.in_place_list:
            if self.in_place is None:
                ino = self._new_ino()
                rec = InodeRecord(
                    kind=INODE_IN_PLACE, ino=ino, volume_ino=ino, created_ns=time.time_ns()
                )
                self.in_place = InPlaceList(self.store, rec, self.dirty_maps)
                self.touch_inode(rec)
            self.in_place.record(blocks)
        if ctx.sums.lagging:
            self.dirty_maps.add(ctx.sums)
        return blocks

    def commit(self) -> bool:
        """Make the open transaction durable. Returns False if there was nothing to commit."""
        if not self.is_pending:
            return False
        if self.damage:  # callers refuse first; this is the guarantee
            raise DamagedPool(self.read_only_reason or "")
        in_place = self._next_in_place()
        for m in self.dirty_maps:
            m.commit()
            if m.inode.ino not in self.dirty_inodes or self.dirty_inodes[m.inode.ino]:
                self.dirty_inodes[m.inode.ino] = m.inode
        for ino, rec in self.dirty_inodes.items():
            self.inodes.put(ino, rec)
        self.inodes.commit()
        for sid, srec in self.dirty_snaps.items():
            self.snaptab.put(sid, srec)
        self.snaptab.commit()
        self.allocator.commit()
        self.store.write_heals()  # bad copies found since the last commit, rewritten

        # The new superblock is built aside: the in-memory one changes only once the new one
        # is durable, so a failed commit never skips a generation into the slot of the last
        # good superblock.
        sb = replace(
            self.sb,
            generation=self.sb.generation + 1,
            **root_fields("inode", self.inodes.root),
            inode_height=self.inodes.height,
            **root_fields("snap", self.snaptab.root),
            snap_height=self.snaptab.height,
            **root_fields("bitmap", self.allocator.tree.root),
            bitmap_height=self.allocator.tree.height,
            used_blocks=self.allocator.used_blocks,
            capacity_blocks=self.allocator.capacity,
            commit_ns=time.time_ns(),
            ring=pack_ring([self.ring_head or root_entry(self.sb), *unpack_ring(self.sb)]),
        )
        if sb.capacity_blocks != self.sb.capacity_blocks:
            self.device.truncate(sb.capacity_blocks * self.block_size)
        self.device.sync()
        write_superblock(self.device, sb, self.superblock_last_page)
        self.sb = sb
        self.ctx.fresh.clear()  # committed now: on the in-place list, or moved when rewritten
        self.ctx.rewritten.clear()
        self.in_place_list = in_place
        self.ctx.in_place = frozenset(in_place)
        self.in_place_reset = False
        self.ring_head = None
        self.allocator.grown = False

        self.store.generation = sb.generation + 1
        self.store.dirty_nodes = 0
        self.dirty_maps.clear()
        self.dirty_inodes.clear()
        self.dirty_snaps.clear()
        self.sb_dirty = False
        self.commits += 1
        self._discard(self.allocator.to_punch(self.allocator.release_pending(sb.generation)))
        return True

    def _discard(self, freed: list[int]) -> None:
        bs = self.block_size
        freed.sort()
        start = prev = -2
        for b in freed + [-10]:
            if b != prev + 1:
                if start >= 0:
                    self.device.discard(start * bs, (prev - start + 1) * bs)
                start = b
            prev = b

"""The on-disk format: every struct layout, constant and checksum of a dittofs pool.

Nothing outside this module packs or unpacks bytes. Every struct is declared by field name
(records.py): a record is a dataclass whose fields carry their struct code and meaning, a packed
struct is a `Layout` of named rows; either way one declaration gives the struct, its packing, and
its table in docs/format.md (`python -m fsimpl.layout` prints them; a test keeps the document
equal to it). Format version 2:

    byte 0        superblock slot 0 (2 KiB)    generation g: slot g % 2, then slot 2 + g % 2
    byte 2048     superblock slot 1 (2 KiB)    (two copies, in different 4 KiB pages); the
    byte 4096     superblock slot 2 (2 KiB)    newest generation with a valid copy wins, and
    byte 6144     superblock slot 3 (2 KiB)    each keeps a ring of the 8 before it (rewind)
    block N..     metadata and data blocks, one allocator for both (block size B, 4 KiB - 1 MiB)

Every metadata block starts with a 64-byte header: a CRC-32 of everything after the checksum
field, XORed with a salt per block type (so verifying a block also classifies it), the type, the
block's own address (a misdirected write is caught), the generation that wrote it, the owning tree
and the first key it covers. Records inside blocks are fixed size:

    map entry      24 bytes  one logical block of a volume or a snapshot's shadow map
    inode record  256 bytes  a volume (live map) or a shadow inode (one snapshot of one volume)
    snapshot      512 bytes  the snapshot table: id, GUID, name, time, state, holds

Fields reserved for later work are part of version 1 (zero until used): per-entry *incomplete*
flag and valid range (deferred copy-on-write), a data checksum per entry, holds, GUIDs, the
volumes a snapshot covers with their sizes (one shadow inode each), clone origins, the pool's role,
peer and last common snapshot, and an in-use record (host, PID) for multihost protection.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import hmac
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import CorruptMetadata, NotAPool, UnsupportedFormat
from .records import REQUIRED, Layout, RecordCodec, ondisk, reserved

MAGIC = b"DITTOFS\x00"
FORMAT_VERSION = 2
# Versions this code reads only to upgrade them (snapctl upgrade): a version 1 pool's interior
# nodes hold bare 8-byte addresses instead of block pointers; every other record is a prefix
# of its version 2 form.
UPGRADABLE_VERSIONS = (1,)

# Four superblock slots of 2 KiB in the first 8 KiB. Generation g is written to slot g % 2 (the
# first 4 KiB page) and then to slot 2 + g % 2 (the second page): two copies of every generation
# in different sectors, the two newest generations kept. Only one page is ever being written
# (a sync separates them), so a torn write, even a device's read-modify-write of a whole 4 KiB
# sector, can take at most the slots of one page.
SUPERBLOCK_SIZE = 2048
SUPERBLOCK_OFFSETS = (0, 2048, 4096, 6144)
RESERVED_BYTES = 8192  # the slots; the first block after them is the first allocatable one
# Version 1 kept one 4 KiB slot per generation, at 0 and 4096 (generation % 2).
SUPERBLOCK_V1_SIZE = 4096
SUPERBLOCK_V1_OFFSETS = (0, 4096)
DEFAULT_METADATA_COPIES = 2  # every metadata block written twice, far apart (format)
ROOT_RING = 8  # committed roots every superblock remembers: the rewindable history
DEFER_GENERATIONS = 2  # a block freed by commit g is reused only after commit g + 2: whole

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 65536

# Feature flags (superblock `features`): a pool with a bit this code does not know is refused.
FEATURE_DATA_CHECKSUMS = 1 << 0
# The data checksum of a unit is the low 32 bits of its XXH3-64 (python3-xxhash), about three
# times as fast as zlib's CRC-32 here; without the bit (pools made before it) a CRC-32.
FEATURE_SUMS_XXH3 = 1 << 1
KNOWN_FEATURES = FEATURE_DATA_CHECKSUMS | FEATURE_SUMS_XXH3

ROLE_NONE, ROLE_PRIMARY, ROLE_STANDBY = 0, 1, 2
ROLE_NAMES = {ROLE_NONE: "none", ROLE_PRIMARY: "primary", ROLE_STANDBY: "standby"}


def superblock_slots(generation: int) -> tuple[int, int]:
    """The two slots (indexes into SUPERBLOCK_OFFSETS) of a generation, in write order."""
    return generation % 2, 2 + generation % 2


def first_data_block(block_size: int) -> int:
    """The first block number not covered by the superblock slots."""
    return (RESERVED_BYTES + block_size - 1) // block_size


def check_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(
            f"block size {block_size} is not a power of two between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
        )


# --- checksums ---------------------------------------------------------------------------------

BT_SUPER = 0x5B
BT_INTERIOR = 1
BT_MAP_LEAF = 2
BT_INODE_LEAF = 3
BT_SNAP_LEAF = 4
BT_BITMAP = 5
BT_SUMS_LEAF = 6
BT_IN_PLACE_LEAF = 7
BT_KEYED_INTERIOR = 8
BT_KEYED_LEAF = 9

BLOCK_TYPE_NAMES = {
    BT_SUPER: "superblock",
    BT_INTERIOR: "interior node",
    BT_MAP_LEAF: "block-map leaf",
    BT_INODE_LEAF: "inode-table leaf",
    BT_SNAP_LEAF: "snapshot-table leaf",
    BT_BITMAP: "free-space bitmap",
    BT_SUMS_LEAF: "data-checksum leaf",
    BT_IN_PLACE_LEAF: "in-place block list leaf",
    BT_KEYED_INTERIOR: "keyed interior node",
    BT_KEYED_LEAF: "keyed leaf",
}

_SALT = {
    BT_SUPER: 0x7E1F3C01,
    BT_INTERIOR: 0x1D170A02,
    BT_MAP_LEAF: 0x2B5E9903,
    BT_INODE_LEAF: 0x36A1C404,
    BT_SNAP_LEAF: 0x4C0FFE05,
    BT_BITMAP: 0x5A3D1706,
    BT_SUMS_LEAF: 0x63C42A07,
    BT_IN_PLACE_LEAF: 0x7A5E0B08,
    BT_KEYED_INTERIOR: 0x0B7EE109,
    BT_KEYED_LEAF: 0x1EAF5E0A,
}


def _crc(buf: bytes | bytearray | memoryview, btype: int) -> int:
    return (zlib.crc32(memoryview(buf)[4:]) ^ _SALT[btype]) & 0xFFFFFFFF


# --- superblock --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Superblock:
    checksum: int = ondisk(
        "I", "CRC-32 of the rest of the slot (4..2048; version 1: 4..4096), salted", hidden=True
    )
    magic: bytes = ondisk("8s", "`DITTOFS\\0`", MAGIC, hidden=True)
    version: int = ondisk("I", "format version", FORMAT_VERSION)
    features: int = ondisk(
        "I", "feature bits; a pool with a bit this code does not know is refused"
    )
    generation: int = ondisk("Q", "commit generation; its slots are g % 2 and 2 + g % 2")
    block_size: int = ondisk("I", "block size in bytes")
    growable: bool = ondisk("B", "an image file that grows on demand", False)
    role: int = ondisk("B", "standby role: 0 none, 1 primary, 2 standby", ROLE_NONE)
    inode_height: int = ondisk("B", "inode table: interior levels")
    snap_height: int = ondisk("B", "snapshot table: interior levels")
    bitmap_height: int = ondisk("B", "free-space bitmap: interior levels")
    capacity_blocks: int = ondisk("Q", "blocks the pool spans", pad_before=3)
    pool_guid: bytes = ondisk("16s", "the pool's GUID", bytes(16))
    created_ns: int = ondisk("Q", "formatted (ns since the epoch)")
    next_inode: int = ondisk("Q", "next inode number", 1)
    next_snap_id: int = ondisk("Q", "next snapshot id (also the birth of live changes)", 1)
    used_blocks: int = ondisk("Q", "blocks allocated (data and metadata)")
    inode_root: int = ondisk("Q", "inode table root block (0: empty)")
    snap_root: int = ondisk("Q", "snapshot table root block (0: empty)")
    bitmap_root: int = ondisk("Q", "free-space bitmap root block")
    reserve_blocks: int = ondisk("Q", "blocks kept for metadata on a full pool")
    snapshot_min_free: int = ondisk("Q", "free blocks below which new snapshots are refused")
    inuse_pid: int = ondisk("I", "in use: the serving process (0: none)")
    inuse_since_ns: int = ondisk("Q", "in use: since (ns)", pad_before=4)
    inuse_host: str = ondisk("64s", "in use: host name", "")
    peer: str = ondisk("256s", "standby: the peer's address", "")
    last_common_guid: bytes = ondisk("16s", "standby: GUID of the last common snapshot", bytes(16))
    recv_to_guid: bytes = ondisk(
        "16s", "receive in progress: GUID of the snapshot being received (zeros: none)", bytes(16)
    )
    recv_from_guid: bytes = ondisk(
        "16s", "receive in progress: GUID of its base (zeros: a full stream)", bytes(16)
    )
    recv_records: int = ondisk("Q", "receive in progress: stream records applied and committed")
    recv_name: str = ondisk("64s", "receive in progress: name of the snapshot being received", "")
    superseded: int = ondisk("B", "standby: the peer answered as primary since (1: superseded)")
    # version 2: the roots are block pointers (second copy, generation, checksum of the root)
    inode_root1: int = ondisk("Q", "inode table root: second copy (0: one copy)")
    inode_root_gen: int = ondisk("Q", "inode table root: the generation that wrote it")
    inode_root_csum: int = ondisk("I", "inode table root: its checksum")
    snap_root1: int = ondisk("Q", "snapshot table root: second copy")
    snap_root_gen: int = ondisk("Q", "snapshot table root: the generation that wrote it")
    snap_root_csum: int = ondisk("I", "snapshot table root: its checksum")
    bitmap_root1: int = ondisk("Q", "free-space bitmap root: second copy")
    bitmap_root_gen: int = ondisk("Q", "free-space bitmap root: the generation that wrote it")
    bitmap_root_csum: int = ondisk("I", "free-space bitmap root: its checksum")
    metadata_copies: int = ondisk("B", "copies of every metadata block: 1 or 2 (0: 1)")
    commit_ns: int = ondisk("Q", "when this generation was committed (ns since the epoch)")
    rewound_to: int = ondisk("Q", "the generation the pool was last rewound to (0: never)")
    rewound_at: int = ondisk("Q", "the generation that rewind committed")
    scrub_state: int = ondisk("B", "scrub: 0 never run, 1 running, 2 stopped, 3 finished")
    scrub_pass: int = ondisk("B", "scrub: 0 metadata, 1 data")
    scrub_item: int = ondisk("Q", "scrub: the tree (metadata) or map (data) it is at", pad_before=6)
    scrub_key: int = ondisk("Q", "scrub: the next node (metadata) or block (data) in it")
    scrub_rate: int = ondisk("Q", "scrub: bytes per second (0: as fast as it can)")
    scrub_started_ns: int = ondisk("Q", "scrub: when this scrub started")
    scrub_ended_ns: int = ondisk("Q", "scrub: when it finished or was stopped")
    scrub_bytes: int = ondisk("Q", "scrub: bytes verified so far")
    scrub_healed: int = ondisk("Q", "scrub: bad copies healed")
    scrub_errors: int = ondisk("Q", "scrub: blocks found damaged beyond healing")
    ring: bytes = ondisk(
        f"{ROOT_RING * 128}s",
        f"the {ROOT_RING} generations committed before this one, newest first (root ring "
        "entries, below)",
        bytes(ROOT_RING * 128),
    )


SUPERBLOCK_CODEC = RecordCodec(Superblock, "superblock slot", SUPERBLOCK_SIZE, reserved_tail=274)
# Version 1 slots: 4 KiB, the same fields (those version 2 added read as zero there).
SUPERBLOCK_V1_CODEC = RecordCodec(
    Superblock, "superblock slot, version 1", SUPERBLOCK_V1_SIZE, reserved_tail=2322
)
_VERSION_AT = 12  # the version word follows the checksum and the magic


@dataclass(kw_only=True)
class RootEntry:
    """One committed generation as the root ring keeps it: enough to open the pool there."""

    generation: int = ondisk("Q", "the generation (0: an empty entry)")
    commit_ns: int = ondisk("Q", "when it was committed (ns since the epoch)")
    used_blocks: int = ondisk("Q", "blocks allocated then")
    capacity_blocks: int = ondisk("Q", "blocks the pool spanned then")
    inode_root: int = ondisk("Q", "inode table root: first copy")
    inode_root1: int = ondisk("Q", "inode table root: second copy")
    inode_root_gen: int = ondisk("Q", "inode table root: its generation")
    inode_root_csum: int = ondisk("I", "inode table root: its checksum")
    snap_root: int = ondisk("Q", "snapshot table root: first copy", pad_before=4)
    snap_root1: int = ondisk("Q", "snapshot table root: second copy")
    snap_root_gen: int = ondisk("Q", "snapshot table root: its generation")
    snap_root_csum: int = ondisk("I", "snapshot table root: its checksum")
    bitmap_root: int = ondisk("Q", "free-space bitmap root: first copy", pad_before=4)
    bitmap_root1: int = ondisk("Q", "free-space bitmap root: second copy")
    bitmap_root_gen: int = ondisk("Q", "free-space bitmap root: its generation")
    bitmap_root_csum: int = ondisk("I", "free-space bitmap root: its checksum")
    inode_height: int = ondisk("B", "inode table: interior levels")
    snap_height: int = ondisk("B", "snapshot table: interior levels")
    bitmap_height: int = ondisk("B", "free-space bitmap: interior levels")


ROOT_ENTRY_CODEC = RecordCodec(RootEntry, "root ring entry", 128, reserved_tail=1)
RING_FIELDS = tuple(f.name for f in dataclasses.fields(RootEntry))


def root_entry(sb: Superblock) -> RootEntry:
    """The ring entry that remembers sb's generation."""
    return RootEntry(**{name: getattr(sb, name) for name in RING_FIELDS})


def unpack_ring(sb: Superblock) -> list[RootEntry]:
    """sb's ring, newest first, without empty entries."""
    entries = (ROOT_ENTRY_CODEC.unpack_from(sb.ring, i * 128) for i in range(ROOT_RING))
    return [e for e in entries if e.generation]


def pack_ring(entries: list[RootEntry]) -> bytes:
    buf = bytearray(ROOT_RING * 128)
    for i, e in enumerate(entries[:ROOT_RING]):
        ROOT_ENTRY_CODEC.pack_into(buf, i * 128, e)
    return bytes(buf)


def pack_superblock(sb: Superblock) -> bytes:
    buf = bytearray(SUPERBLOCK_SIZE)
    SUPERBLOCK_CODEC.pack_into(buf, 0, sb)
    _CHECKSUM.pack_into(buf, 0, _crc(buf, BT_SUPER))
    return bytes(buf)


def unpack_superblock(buf: bytes | bytearray, where: str) -> Superblock:
    """Decode one superblock slot (version 2, or a version 1 one of 4 KiB); raise NotAPool /
    UnsupportedFormat / CorruptMetadata."""
    if len(buf) < SUPERBLOCK_SIZE:
        raise NotAPool(f"{where}: too short to hold a dittofs superblock")
    if bytes(buf[4:12]) != MAGIC:
        raise NotAPool(f"{where}: no dittofs superblock (magic {bytes(buf[4:12])!r})")
    size, codec = SUPERBLOCK_SIZE, SUPERBLOCK_CODEC
    if int.from_bytes(buf[_VERSION_AT : _VERSION_AT + 4], "little") == 1:
        if len(buf) < SUPERBLOCK_V1_SIZE:
            raise NotAPool(f"{where}: too short to hold a version 1 superblock")
        size, codec = SUPERBLOCK_V1_SIZE, SUPERBLOCK_V1_CODEC
    if _CHECKSUM.unpack_from(buf, 0)[0] != _crc(memoryview(buf)[:size], BT_SUPER):
        raise CorruptMetadata(f"{where}: superblock checksum mismatch", -1, "superblock")
    sb = codec.unpack_from(buf, 0)
    if sb.version != FORMAT_VERSION and sb.version not in UPGRADABLE_VERSIONS:
        raise UnsupportedFormat(
            f"{where}: pool format version {sb.version} is not supported by this dittofs "
            f"(it reads version {FORMAT_VERSION}); use the dittofs release that made it"
        )
    if sb.features & ~KNOWN_FEATURES:
        raise UnsupportedFormat(
            f"{where}: pool uses features {sb.features & ~KNOWN_FEATURES:#x} unknown to this "
            "dittofs"
        )
    return sb


# --- metadata block header ---------------------------------------------------------------------

HEADER_SIZE = 64
HEADER_LAYOUT = Layout(
    "metadata block header",
    HEADER_SIZE,
    [
        ("checksum", "I", "CRC-32 of bytes 4..B of the block, XORed with its type's salt"),
        ("btype", "H", "block type (below)"),
        ("version", "H", "layout version of this block type (1)"),
        ("address", "Q", "the block's own address: a misdirected write is caught"),
        ("generation", "Q", "the generation that wrote it"),
        ("owner", "Q", "the owning inode, or a pool-wide tree's id (below)"),
        ("level", "B", "0 for a leaf, else interior levels below it"),
        reserved(3),
        ("records", "I", "records in use"),
        ("key_base", "Q", "the first key the block covers"),
        ("address1", "Q", "the second copy's address (0: one copy)"),
        reserved(8),
    ],
)
HEADER = HEADER_LAYOUT.struct
_CHECKSUM = Layout("checksum word", 4, [("checksum", "I", "salted CRC-32")]).struct

# Owners of the pool-wide trees (inode numbers start at 1, so these never collide).
OWNER_INODE_TABLE = 1 << 62
OWNER_SNAP_TABLE = (1 << 62) + 1
OWNER_BITMAP = (1 << 62) + 2


class BlockHeader(NamedTuple):
    """A verified header, as HEADER_LAYOUT declares it (without the checksum)."""

    btype: int
    version: int
    address: int
    generation: int
    owner: int
    level: int
    records: int
    key_base: int
    address1: int


assert list(BlockHeader._fields) == HEADER_LAYOUT.names[1:]


def seal_block(
    buf: bytearray,
    btype: int,
    address: int,
    generation: int,
    owner: int,
    level: int,
    count: int,
    key_base: int,
    address1: int = 0,
) -> int:
    """Write the header and checksum into a metadata block buffer, in place; returns the
    checksum, which the pointer to the block carries."""
    HEADER.pack_into(
        buf, 0, 0, btype, 1, address, generation, owner, level, count, key_base, address1
    )
    crc = _crc(buf, btype)
    _CHECKSUM.pack_into(buf, 0, crc)
    return crc


def open_block(
    buf: bytes | bytearray,
    address: int,
    expect_type: int,
    pointer: BlockPointer | None = None,
) -> BlockHeader:
    """Verify a metadata block read from `address`: checksum, type and self-address, and, given
    the pointer that led to it, that it is the very version the pointer names (generation and
    checksum): an older, valid-looking block left by a lost write is caught here."""
    checksum, *fields = HEADER.unpack_from(buf, 0)
    hdr = BlockHeader(*fields)
    btype = hdr.btype
    tname = BLOCK_TYPE_NAMES.get(expect_type, str(expect_type))
    if btype not in _SALT or checksum != _crc(buf, btype):
        raise CorruptMetadata(
            f"metadata block {address} ({tname}) failed its checksum; run 'snapctl check'",
            address,
            tname,
        )
    if btype != expect_type:
        raise CorruptMetadata(
            f"metadata block {address} should be a {tname} but is a "
            f"{BLOCK_TYPE_NAMES.get(btype, btype)}; run 'snapctl check'",
            address,
            tname,
        )
    if hdr.address != address and not (hdr.address1 and hdr.address1 == address):
        raise CorruptMetadata(
            f"metadata block {address} ({tname}) claims address {hdr.address}: a misdirected "
            "write; run 'snapctl check'",
            address,
            tname,
        )
    if (
        pointer is not None
        and pointer.generation
        and (hdr.generation != pointer.generation or checksum != pointer.checksum)
    ):
        raise CorruptMetadata(
            f"metadata block {address} ({tname}) is not the version its parent points to "
            f"(generation {hdr.generation}, checksum {checksum:#010x}; expected generation "
            f"{pointer.generation}, checksum {pointer.checksum:#010x}): a lost or misdirected "
            "write; run 'snapctl check'",
            address,
            tname,
        )
    return hdr


_NONZERO = re.compile(b"[^\x00]")


def nonzero_records(buf: bytes | bytearray, record_size: int, first: int = 0) -> list[int]:
    """Indices (from first) of the records after the header that hold any nonzero byte. One
    C-level search per record found, so sparse blocks cost little."""
    found: list[int] = []
    search = _NONZERO.search
    pos = HEADER_SIZE + first * record_size
    while True:
        m = search(buf, pos)
        if m is None:
            return found
        i = (m.start() - HEADER_SIZE) // record_size
        if HEADER_SIZE + (i + 1) * record_size > len(buf):
            return found  # padding after the last whole record
        found.append(i)
        pos = HEADER_SIZE + (i + 1) * record_size


POINTER_SIZE = 32
POINTER_LAYOUT = Layout(
    "block pointer",
    POINTER_SIZE,
    [
        ("addr0", "Q", "the child's first copy (0: an absent subtree, all records zero)"),
        ("addr1", "Q", "the child's second copy (0: one copy)"),
        ("generation", "Q", "the generation that wrote the child"),
        ("checksum", "I", "the child's salted CRC-32, as its header holds it"),
        reserved(4),
    ],
)
POINTER = POINTER_LAYOUT.struct
POINTER_V1_LAYOUT = Layout(
    "version 1 interior node slot",
    8,
    [("child", "Q", "the child's address (read only by snapctl upgrade)")],
)


class BlockPointer(NamedTuple):
    """Where a metadata block is and which version of it: an interior slot, a root."""

    addr0: int
    addr1: int = 0
    generation: int = 0  # 0: not verifiable (a version 1 pool being upgraded)
    checksum: int = 0


NO_POINTER = BlockPointer(0)
assert list(BlockPointer._fields) == POINTER_LAYOUT.names
ROOTS = ("inode", "snap", "bitmap")  # the superblock's three roots


def root_pointer(sb: Superblock | RootEntry, which: str) -> BlockPointer:
    """The root of the inode table, the snapshot table or the bitmap, as a superblock (or a
    ring entry) holds it."""
    return BlockPointer(
        getattr(sb, f"{which}_root"),
        getattr(sb, f"{which}_root1"),
        getattr(sb, f"{which}_root_gen"),
        getattr(sb, f"{which}_root_csum"),
    )


def root_fields(which: str, p: BlockPointer) -> dict[str, Any]:
    """Superblock fields that store p as the root `which` (for dataclasses.replace)."""
    return {
        f"{which}_root": p.addr0,
        f"{which}_root1": p.addr1,
        f"{which}_root_gen": p.generation,
        f"{which}_root_csum": p.checksum,
    }


def pointer_size(version: int) -> int:
    return POINTER_SIZE if version >= 2 else POINTER_V1_LAYOUT.size


def interior_fanout(block_size: int, version: int = FORMAT_VERSION) -> int:
    return (block_size - HEADER_SIZE) // pointer_size(version)


def get_pointer(buf: bytes | bytearray, slot: int) -> BlockPointer:
    a0, a1, gen, crc = POINTER.unpack_from(buf, HEADER_SIZE + POINTER_SIZE * slot)
    return BlockPointer(a0, a1, gen, crc)


def set_pointer(buf: bytearray, slot: int, p: BlockPointer) -> None:
    POINTER.pack_into(buf, HEADER_SIZE + POINTER_SIZE * slot, *p)


def get_pointer_v1(buf: bytes | bytearray, slot: int) -> BlockPointer:
    return BlockPointer(int(POINTER_V1_LAYOUT.struct.unpack_from(buf, HEADER_SIZE + 8 * slot)[0]))


def set_pointer_v1(buf: bytearray, slot: int, p: BlockPointer) -> None:
    raise AssertionError("version 1 pools are only read (to upgrade them), never written")


def child_pointers(buf: bytes | bytearray, fanout: int) -> list[BlockPointer]:
    """Every slot of a version 2 interior node, in order (NO_POINTER where absent)."""
    words = _array(fanout, "QQQI4x").unpack_from(buf, HEADER_SIZE)
    return [BlockPointer(*words[i : i + 4]) for i in range(0, len(words), 4)]


@functools.lru_cache(maxsize=16)
def _array(fanout: int, code: str) -> struct.Struct:
    return struct.Struct("<" + code * fanout)


# --- block-map entries -------------------------------------------------------------------------

# kind: in a live map NONE = never written: zeros, or for a clone the origin snapshot's data;
# in a shadow map NONE = DITTO ("look in the next newer snapshot, then live"). HOLE = explicitly
# zero (a snapshot taken while the block was unallocated; a trimmed block of a clone). ADDR =
# data at `addr`. ORIGIN (shadow maps of clones) = the clone's origin snapshot's data.
KIND_NONE = 0
KIND_ADDR = 1
KIND_HOLE = 2
KIND_ORIGIN = 3

# Deferred copy-on-write (US 6,748,504): a partial first write after a snapshot leaves live's
# new block *incomplete*: only sectors [valid_lo, valid_hi) are in it, the rest of the block
# still reads from `base`, the old block the latest snapshot took. Only live maps hold
# incomplete entries (in pools with data checksums the valid range is whole 4 KiB units, each
# with its checksum at `addr`; the rest is checked against the base's).
ENTRY_INCOMPLETE = 0x01
# With data checksums a block is never rewritten where a committed entry reads it, so a partial
# overwrite of a block live owns outright also leaves an incomplete entry: the new units in a
# new block, the rest still in live's old block, which this flag says the entry owns (freed
# when the entry completes or goes) rather than the latest snapshot. The inode's owned_blocks
# counts entries, not such bases: a base is a merge still to do (incomplete_blocks), as the
# volume's size in blocks is what its map addresses.
ENTRY_OWN_BASE = 0x02
SECTOR = 512  # unit of the valid range

ENTRY_SIZE = 24
MAP_ENTRY_LAYOUT = Layout(
    "map entry",
    ENTRY_SIZE,
    [
        ("word", "Q", "address (bits 0-47), kind (bits 48-55), flags (bits 56-63)"),
        (
            "birth",
            "I",
            "pool.next_snap_id when live last changed the block (the O(1) sharing test); a "
            "shadow entry keeps the birth the preserved data had in live",
        ),
        ("valid_lo", "H", "incomplete entries: valid range start, in 512-byte sectors"),
        ("valid_hi", "H", "incomplete entries: valid range end"),
        (
            "tail",
            "Q",
            "incomplete entries: the base block; complete entries: zero (version 1 kept the "
            "data's CRC-32 here; version 2 keeps data checksums per 4 KiB, by physical block)",
        ),
    ],
)
MAP_ENTRY = MAP_ENTRY_LAYOUT.struct
ADDR_MASK = (1 << 48) - 1


class Entry(NamedTuple):
    kind: int
    addr: int = 0
    birth: int = 0
    flags: int = 0
    valid_lo: int = 0
    valid_hi: int = 0
    csum: int = 0
    base: int = 0  # incomplete entries: the block the bytes outside the valid range are in

    @property
    def incomplete(self) -> bool:
        return bool(self.flags & ENTRY_INCOMPLETE)

    @property
    def owns_base(self) -> bool:
        return bool(self.flags & ENTRY_OWN_BASE)

    @property
    def blocks(self) -> tuple[int, ...]:
        """The data blocks this entry owns: its own, and the base it owns (ENTRY_OWN_BASE)."""
        if self.kind != KIND_ADDR:
            return ()
        return (self.addr, self.base) if self.flags & ENTRY_OWN_BASE else (self.addr,)


EMPTY_ENTRY = Entry(KIND_NONE)
_ZERO_ENTRY = bytes(ENTRY_SIZE)


def map_leaf_capacity(block_size: int) -> int:
    return (block_size - HEADER_SIZE) // ENTRY_SIZE


def read_entry(buf: bytes | bytearray, index: int) -> Entry:
    word, birth, lo, hi, tail = MAP_ENTRY.unpack_from(buf, HEADER_SIZE + ENTRY_SIZE * index)
    flags = word >> 56
    if flags & ENTRY_INCOMPLETE:
        return Entry((word >> 48) & 0xFF, word & ADDR_MASK, birth, flags, lo, hi, 0, tail)
    return Entry((word >> 48) & 0xFF, word & ADDR_MASK, birth, flags, lo, hi, tail & 0xFFFFFFFF)


def read_entries(buf: bytes | bytearray, lo: int, hi: int) -> list[Entry]:
    """Entries lo..hi-1 of a map leaf, as read_entry reads each (one pass over the bytes: a
    1 MiB request reads sixteen at once)."""
    out: list[Entry] = []
    add = out.append
    view = memoryview(buf)[HEADER_SIZE + ENTRY_SIZE * lo : HEADER_SIZE + ENTRY_SIZE * hi]
    for word, birth, vlo, vhi, tail in MAP_ENTRY.iter_unpack(view):
        flags = word >> 56
        if flags & ENTRY_INCOMPLETE:
            add(Entry((word >> 48) & 0xFF, word & ADDR_MASK, birth, flags, vlo, vhi, 0, tail))
        else:
            kind, addr = (word >> 48) & 0xFF, word & ADDR_MASK
            add(Entry(kind, addr, birth, flags, vlo, vhi, tail & 0xFFFFFFFF))
    return out


def write_entry(buf: bytearray, index: int, e: Entry) -> None:
    MAP_ENTRY.pack_into(
        buf,
        HEADER_SIZE + ENTRY_SIZE * index,
        (e.addr & ADDR_MASK) | (e.kind << 48) | (e.flags << 56),
        e.birth,
        e.valid_lo,
        e.valid_hi,
        e.base if e.flags & ENTRY_INCOMPLETE else e.csum,
    )


def entry_bytes(e: Entry) -> bytes:
    """An entry as a map leaf or the shadow index stores it."""
    buf = bytearray(HEADER_SIZE + ENTRY_SIZE)
    write_entry(buf, 0, e)
    return bytes(buf[HEADER_SIZE:])


def entry_from_bytes(raw: bytes) -> Entry:
    word, birth, lo, hi, tail = MAP_ENTRY.unpack(raw)
    flags = word >> 56
    if flags & ENTRY_INCOMPLETE:
        return Entry((word >> 48) & 0xFF, word & ADDR_MASK, birth, flags, lo, hi, 0, tail)
    return Entry((word >> 48) & 0xFF, word & ADDR_MASK, birth, flags, lo, hi, tail & 0xFFFFFFFF)


def entry_is_empty(buf: bytes | bytearray, index: int) -> bool:
    off = HEADER_SIZE + ENTRY_SIZE * index
    return buf[off : off + ENTRY_SIZE] == _ZERO_ENTRY


# --- data checksums ----------------------------------------------------------------------------

# A pool with data checksums keeps a 32-bit checksum (FEATURE_SUMS_XXH3) of every 4 KiB unit
# of every data block, keyed by the block's physical number: the checksum belongs to the bytes
# where they lie, so an entry that moves between maps (move-on-write, a delete handing blocks to
# an older snapshot) never touches it, and a 4 KiB read verifies just its own 4 KiB. A unit's
# checksum is written in the same commit as the map entry that makes the unit readable; a unit
# no committed entry reads (the free part of an incomplete block, a freed block) may hold
# anything.
SUM_UNIT = 4096
SUM_SIZE = 4  # XXH3-64's low half, or a CRC-32


def sum_units(block_size: int) -> int:
    """Checksummed units per data block."""
    return block_size // SUM_UNIT


_UNIT_SUM = struct.Struct("<I")


@functools.lru_cache(maxsize=64)
def _unit_sums(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}I")


def pack_unit_sums(sums: Iterable[int], n: int) -> bytes:
    """n unit checksums as a data-checksum leaf keeps them (little-endian u32, unit order)."""
    return _unit_sums(n).pack(*sums)


def unit_sum_at(buf: bytes | bytearray, at: int) -> int:
    """The unit checksum at byte offset at of a data-checksum leaf."""
    return int(_UNIT_SUM.unpack_from(buf, at)[0])


def put_unit_sum(buf: bytearray, at: int, value: int) -> None:
    _UNIT_SUM.pack_into(buf, at, value)


def unpack_unit_sums(packed: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(packed) // SUM_SIZE}I", packed)


def sums_leaf_capacity(block_size: int) -> int:
    """Data blocks one data-checksum leaf covers."""
    return (block_size - HEADER_SIZE) // (SUM_SIZE * sum_units(block_size))


# --- in-place blocks --------------------------------------------------------------------------

# A pool with data checksums records, in every commit, the data blocks the next transaction may
# overwrite in place (live's own, recently written: inplace.py). An open after a crash takes
# their checksums from what they hold. The list is the map of the in-place inode: leaves of
# little-endian u64 block numbers, in order, the inode's `size` their count.
BLOCK_NUMBER_SIZE = 8


def in_place_leaf_capacity(block_size: int) -> int:
    """Block numbers one in-place list leaf holds."""
    return (block_size - HEADER_SIZE) // BLOCK_NUMBER_SIZE


def pack_block_numbers(buf: bytearray, blocks: list[int]) -> None:
    """Write blocks into a leaf's buffer after its header."""
    struct.pack_into(f"<{len(blocks)}Q", buf, HEADER_SIZE, *blocks)


def unpack_block_numbers(buf: bytes | bytearray, n: int) -> list[int]:
    """The first n block numbers of a leaf."""
    return list(struct.unpack_from(f"<{n}Q", buf, HEADER_SIZE))


# --- keyed trees ------------------------------------------------------------------------------

# A keyed tree (keyed.py) is a copy-on-write B+tree of sorted records with 16-byte keys. Keys are
# stored big-endian, so that comparing the bytes compares the numbers: a node is searched where
# it lies in the cache, without decoding it. A leaf holds `records` pairs of key and value (a
# fixed size per tree); an interior node holds `records` pairs of key (a lower bound of every key
# under the child; the first child's is its least key when written) and block pointer.
KEY_SIZE = 16


def keyed_leaf_capacity(block_size: int, value_size: int) -> int:
    """Records one keyed leaf holds."""
    return (block_size - HEADER_SIZE) // (KEY_SIZE + value_size)


def keyed_fanout(block_size: int) -> int:
    """Children one keyed interior node holds."""
    return (block_size - HEADER_SIZE) // (KEY_SIZE + POINTER_SIZE)


def pack_key(high: int, low: int) -> bytes:
    """A key ordered by high, then low (two unsigned 64-bit numbers)."""
    return ((high << 64) | low).to_bytes(KEY_SIZE, "big")


def unpack_key(key: bytes) -> tuple[int, int]:
    n = int.from_bytes(key, "big")
    return n >> 64, n & 0xFFFFFFFFFFFFFFFF


def keyed_key_at(buf: bytes | bytearray, record_size: int, i: int) -> bytes:
    """The key of record i of a keyed node (leaf or interior)."""
    off = HEADER_SIZE + record_size * i
    return bytes(buf[off : off + KEY_SIZE])


@functools.lru_cache(maxsize=32)
def _key_slices(record_size: int, block_size: int) -> list[slice]:
    """Where each record's key lies in a keyed node of block_size bytes."""
    n = (block_size - HEADER_SIZE) // record_size
    return [
        slice(HEADER_SIZE + record_size * i, HEADER_SIZE + record_size * i + KEY_SIZE)
        for i in range(n)
    ]


def keyed_search(buf: bytes | bytearray, record_size: int, n: int, key: bytes) -> int:
    """The index of the first of the node's n records whose key is not below key (n: none).
    A binary search in C: the node's own slicing is the key function."""
    key_at: Callable[[slice], bytes] = buf.__getitem__  # type: ignore[assignment]
    return bisect.bisect_left(_key_slices(record_size, len(buf)), key, 0, n, key=key_at)


def keyed_leaf_records(
    buf: bytes | bytearray, value_size: int, n: int
) -> tuple[list[bytes], list[bytes]]:
    """A keyed leaf's n keys and values, in order."""
    rs = KEY_SIZE + value_size
    body = bytes(buf[HEADER_SIZE : HEADER_SIZE + rs * n])
    keys = [body[i : i + KEY_SIZE] for i in range(0, len(body), rs)]
    values = [body[i + KEY_SIZE : i + rs] for i in range(0, len(body), rs)]
    return keys, values


def keyed_value_at(buf: bytes | bytearray, value_size: int, i: int) -> bytes:
    off = HEADER_SIZE + (KEY_SIZE + value_size) * i + KEY_SIZE
    return bytes(buf[off : off + value_size])


def keyed_interior_records(
    buf: bytes | bytearray, n: int
) -> tuple[list[bytes], list[BlockPointer]]:
    """A keyed interior node's n keys and child pointers, in order."""
    rs = KEY_SIZE + POINTER_SIZE
    keys: list[bytes] = []
    pointers: list[BlockPointer] = []
    for i in range(n):
        off = HEADER_SIZE + rs * i
        keys.append(bytes(buf[off : off + KEY_SIZE]))
        pointers.append(BlockPointer(*POINTER.unpack_from(buf, off + KEY_SIZE)))
    return keys, pointers


def keyed_pointer_at(buf: bytes | bytearray, i: int) -> BlockPointer:
    a0, a1, gen, crc = POINTER.unpack_from(
        buf, HEADER_SIZE + (KEY_SIZE + POINTER_SIZE) * i + KEY_SIZE
    )
    return BlockPointer(a0, a1, gen, crc)


def pack_keyed_leaf(buf: bytearray, keys: list[bytes], values: list[bytes]) -> None:
    """Write a keyed leaf's records after its header, zeroing what follows them."""
    body = b"".join(k + v for k, v in zip(keys, values, strict=True))
    buf[HEADER_SIZE : HEADER_SIZE + len(body)] = body
    buf[HEADER_SIZE + len(body) :] = bytes(len(buf) - HEADER_SIZE - len(body))


def pack_keyed_interior(buf: bytearray, keys: list[bytes], pointers: list[BlockPointer]) -> None:
    body = b"".join(k + POINTER.pack(*p) for k, p in zip(keys, pointers, strict=True))
    buf[HEADER_SIZE : HEADER_SIZE + len(body)] = body
    buf[HEADER_SIZE + len(body) :] = bytes(len(buf) - HEADER_SIZE - len(body))


# --- inode records -----------------------------------------------------------------------------

INODE_VOLUME = 1
INODE_SHADOW = 2
# the pool's data checksums (pools with FEATURE_DATA_CHECKSUMS): one per pool, its map a tree of
# data-checksum leaves keyed by physical block number (DATA CHECKSUMS below)
INODE_CHECKSUMS = 3
# the blocks the transaction after a commit may overwrite in place (pools with data checksums; one
# per pool, made by the first commit that has some): its map a tree of in-place list leaves
INODE_IN_PLACE = 4
# a volume's shadow index (docs/snapshot-index-plan.md): every shadow entry of its snapshots, a
# keyed tree of (block, snapshot id) -> map entry; made by the volume's first snapshot
INODE_SHADOW_INDEX = 5
# the same entries listed by snapshot: a keyed tree of (snapshot id, block), no values
INODE_SHADOW_LIST = 6

INODE_RECORD_SIZE = 256

OP_NONE = 0
OP_ROLLBACK = 1  # live is being restored to op_target
OP_DELETE = 2  # the volume (and its shadows) are being freed
OP_FLATTEN = 3  # a clone is copying its origin's blocks (op_target: next block to look at)
OP_RECEIVE = 4  # a replication stream is being applied (op_target: the base snapshot, read
#                 by the volume's exports meanwhile; 0 for a full stream)


@dataclass(kw_only=True)
class InodeRecord:
    kind: int = ondisk(
        "B",
        "1 a volume, 2 a shadow inode (one snapshot of one volume), 3 data checksums, 4 the "
        "in-place list, 5 a volume's shadow index, 6 its shadow list; 0 free",
        REQUIRED,
    )
    flags: int = ondisk("B", "flags (none defined)")
    height: int = ondisk("B", "map tree: interior levels")
    op: int = ondisk(
        "I", "pending operation (OP_*: rollback, delete, flatten, receive)", pad_before=1
    )
    ino: int = ondisk("Q", "inode number", REQUIRED)
    volume_ino: int = ondisk("Q", "the volume (a shadow's volume; a volume's own number)", REQUIRED)
    snap_id: int = ondisk("Q", "shadow: its snapshot id; volume: its latest snapshot (0: none)")
    size: int = ondisk("Q", "bytes (a shadow: the volume's size when the snapshot was taken)")
    root: int = ondisk("Q", "map root block (0: an empty map: all ditto, or all unallocated)")
    owned_blocks: int = ondisk("Q", "data blocks this map addresses (an owned base not counted)")
    entry_count: int = ondisk("Q", "non-empty entries")
    created_ns: int = ondisk("Q", "created (ns since the epoch)")
    origin_vol: int = ondisk("Q", "clone origin: volume inode")
    origin_snap: int = ondisk("Q", "clone origin: snapshot id")
    op_target: int = ondisk("Q", "the pending operation's target (e.g. the rollback's snapshot)")
    incarnation: int = ondisk("Q", "bumped when live is replaced, so old connections notice")
    referenced_blocks: int = ondisk("Q", "shadow: data blocks its view referenced when taken")
    name: str = ondisk("64s", "volume name (volumes only)", "")
    incomplete_blocks: int = ondisk("Q", "incomplete entries in the map (0: none to look for)")
    # version 2: the map root is a block pointer
    root1: int = ondisk("Q", "map root: second copy (0: one copy)")
    root_gen: int = ondisk("Q", "map root: the generation that wrote it")
    root_csum: int = ondisk("I", "map root: its checksum")


INODE_CODEC = RecordCodec(InodeRecord, "inode record", INODE_RECORD_SIZE, reserved_tail=52)
_INODE_KIND = INODE_CODEC.layout.offset_of("kind")


def record_capacity(block_size: int, record_size: int) -> int:
    return (block_size - HEADER_SIZE) // record_size


def read_inode(buf: bytes | bytearray, index: int) -> InodeRecord | None:
    off = HEADER_SIZE + INODE_RECORD_SIZE * index
    if buf[off + _INODE_KIND] == 0:
        return None
    return INODE_CODEC.unpack_from(buf, off)


def write_inode(buf: bytearray, index: int, r: InodeRecord | None) -> None:
    off = HEADER_SIZE + INODE_RECORD_SIZE * index
    if r is None:
        buf[off : off + INODE_RECORD_SIZE] = bytes(INODE_RECORD_SIZE)
        return
    INODE_CODEC.pack_into(buf, off, r)


# --- snapshot records --------------------------------------------------------------------------

SNAP_ACTIVE = 1
SNAP_DELETING = 2  # marked for deletion; its blocks are being handed down or freed

SNAPF_WRITABLE = 0x01
SNAPF_REPLICATION = 0x02

MAX_HOLDS = 8
HOLD_TAG_MAX = 32

SNAP_RECORD_SIZE = 512


@dataclass(kw_only=True)
class SnapshotRecord:
    id: int = ondisk("Q", "ordinal id, pool-wide, never reused", REQUIRED)
    guid: bytes = ondisk("16s", "random GUID: the identity replication compares", REQUIRED)
    created_ns: int = ondisk("Q", "created (ns since the epoch)", REQUIRED)
    state: int = ondisk("B", "1 active, 2 being deleted; 0 marks a free slot", SNAP_ACTIVE)
    flags: int = ondisk("B", "SNAPF_*: 0x01 writable, 0x02 made by replication")
    hold_count: int = ondisk("B", "number of holds", hidden=True, count_of="holds")
    covered: int = ondisk("I", "volumes covered (one shadow inode each)", pad_before=1)
    name: str = ondisk("64s", "name", REQUIRED)
    holds: list[str] = ondisk("32s", "hold tags", [], repeat=MAX_HOLDS)


SNAPSHOT_CODEC = RecordCodec(SnapshotRecord, "snapshot record", SNAP_RECORD_SIZE, reserved_tail=152)
_SNAP_STATE = SNAPSHOT_CODEC.layout.offset_of("state")


def read_snapshot(buf: bytes | bytearray, index: int) -> SnapshotRecord | None:
    off = HEADER_SIZE + SNAP_RECORD_SIZE * index
    if buf[off + _SNAP_STATE] == 0:
        return None
    return SNAPSHOT_CODEC.unpack_from(buf, off)


def write_snapshot(buf: bytearray, index: int, r: SnapshotRecord | None) -> None:
    off = HEADER_SIZE + SNAP_RECORD_SIZE * index
    if r is None:
        buf[off : off + SNAP_RECORD_SIZE] = bytes(SNAP_RECORD_SIZE)
        return
    SNAPSHOT_CODEC.pack_into(buf, off, r)


# --- free-space bitmap -------------------------------------------------------------------------


def bitmap_bits_per_block(block_size: int) -> int:
    return (block_size - HEADER_SIZE) * 8


# --- replication streams -----------------------------------------------------------------------
#
# A stream is a sequence of records: a 24-byte header (magic, type, flags, payload length,
# sequence number), the payload, then a CRC-32 of header and payload and, when the stream is
# keyed, an HMAC-SHA256 of the same bytes. BEGIN and END carry JSON (self-describing and
# versioned); DATA carries whole blocks of one volume; HOLE a run of blocks that read zeros.

STREAM_MAGIC = b"DSTR"
STREAM_VERSION = 1
REC_BEGIN, REC_DATA, REC_HOLE, REC_END = 1, 2, 3, 4
RECF_MAC = 0x01
MAC_SIZE = 32
MAX_RECORD_PAYLOAD = (1 << 20) + 64

STREAM_HEADER_LAYOUT = Layout(
    "stream record header",
    24,
    [
        ("magic", "4s", "`DSTR`"),
        ("rtype", "H", "1 BEGIN, 2 DATA, 3 HOLE, 4 END"),
        ("flags", "H", "0x01: an HMAC-SHA256 follows the trailer"),
        ("length", "I", "payload bytes"),
        ("seq", "Q", "record number, from 0 (BEGIN)"),
        reserved(4),
    ],
)
STREAM_TRAILER_LAYOUT = Layout(
    "stream record trailer", 4, [("crc", "I", "CRC-32 of header and payload")]
)
DATA_HEAD_LAYOUT = Layout(
    "DATA record payload head (whole blocks follow)",
    16,
    [
        ("volume", "I", "index into BEGIN's volumes"),
        ("first", "Q", "first block"),
        ("count", "I", "blocks that follow"),
    ],
)
HOLE_BODY_LAYOUT = Layout(
    "HOLE record payload",
    20,
    [
        ("volume", "I", "index into BEGIN's volumes"),
        ("first", "Q", "first block"),
        ("count", "Q", "blocks that read zeros"),
    ],
)
STREAM_HEADER = STREAM_HEADER_LAYOUT.struct
STREAM_TRAILER = STREAM_TRAILER_LAYOUT.struct
DATA_HEAD = DATA_HEAD_LAYOUT.struct
HOLE_BODY = HOLE_BODY_LAYOUT.struct


class StreamRecord(NamedTuple):
    rtype: int
    seq: int
    payload: bytes


def pack_record(rtype: int, seq: int, payload: bytes, mac_key: bytes | None) -> bytes:
    flags = RECF_MAC if mac_key else 0
    head = STREAM_HEADER.pack(STREAM_MAGIC, rtype, flags, len(payload), seq)
    body = head + payload
    out = body + STREAM_TRAILER.pack(zlib.crc32(body) & 0xFFFFFFFF)
    if mac_key:
        out += hmac.new(mac_key, body, hashlib.sha256).digest()
    return out


def unpack_record_header(head: bytes) -> tuple[int, int, int, int]:
    """(type, flags, payload length, sequence) of a record header; ValueError if malformed."""
    magic, rtype, flags, length, seq = STREAM_HEADER.unpack(head)
    if magic != STREAM_MAGIC:
        raise ValueError("not a dittofs stream record (bad magic)")
    if length > MAX_RECORD_PAYLOAD:
        raise ValueError(f"record payload of {length} bytes is larger than any dittofs writes")
    return rtype, flags, length, seq


def check_record(
    head: bytes, payload: bytes, trailer: bytes, mac: bytes, mac_key: bytes | None
) -> None:
    """Verify a record's CRC and MAC; ValueError naming what failed."""
    body = head + payload
    (crc,) = STREAM_TRAILER.unpack(trailer)
    if crc != zlib.crc32(body) & 0xFFFFFFFF:
        raise ValueError("record checksum mismatch (corrupted stream)")
    if mac_key is not None:
        want = hmac.new(mac_key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(want, mac):
            raise ValueError("record MAC mismatch (wrong key or tampered stream)")


def pack_data_head(vol_index: int, first: int, count: int) -> bytes:
    return DATA_HEAD.pack(vol_index, first, count)


def unpack_data_head(payload: bytes) -> tuple[int, int, int]:
    v, f, n = DATA_HEAD.unpack_from(payload, 0)
    return int(v), int(f), int(n)


def pack_hole(vol_index: int, first: int, count: int) -> bytes:
    return HOLE_BODY.pack(vol_index, first, count)


def unpack_hole(payload: bytes) -> tuple[int, int, int]:
    v, f, n = HOLE_BODY.unpack(payload)
    return int(v), int(f), int(n)


# --- the format, described -------------------------------------------------------------------

LAYOUTS: tuple[Layout, ...] = (
    SUPERBLOCK_CODEC.layout,
    ROOT_ENTRY_CODEC.layout,
    HEADER_LAYOUT,
    POINTER_LAYOUT,
    MAP_ENTRY_LAYOUT,
    INODE_CODEC.layout,
    SNAPSHOT_CODEC.layout,
    STREAM_HEADER_LAYOUT,
    STREAM_TRAILER_LAYOUT,
    DATA_HEAD_LAYOUT,
    HOLE_BODY_LAYOUT,
)


def describe_format() -> str:
    """Every declared struct and the codes stored in them, as the markdown of docs/format.md's
    generated part."""
    parts = [layout.markdown() for layout in LAYOUTS]
    rows = "\n".join(
        f"| {t} | {name} | `{_SALT[t]:#010x}` |" for t, name in BLOCK_TYPE_NAMES.items()
    )
    parts.append(
        "### Block types\n\n| type | block | checksum salt |\n|---:|---|---|\n" + rows + "\n"
    )
    codes = {
        "map entry kind": {
            KIND_NONE: "none: unallocated in live, DITTO in a shadow map",
            KIND_ADDR: "data at `addr`",
            KIND_HOLE: "explicitly zero",
            KIND_ORIGIN: "a clone's origin snapshot's data (shadow maps of clones)",
        },
        "map entry flags": {
            ENTRY_INCOMPLETE: "incomplete: only [valid_lo, valid_hi) is here",
            ENTRY_OWN_BASE: "the base is live's own old block, not a snapshot's (freed with it)",
        },
        "inode kind": {
            INODE_VOLUME: "a volume",
            INODE_SHADOW: "a shadow inode",
            INODE_CHECKSUMS: "the pool's data checksums",
            INODE_IN_PLACE: "the blocks the next transaction may overwrite in place",
        },
        "inode op": {
            OP_NONE: "none",
            OP_ROLLBACK: "rollback to op_target",
            OP_DELETE: "volume delete",
            OP_FLATTEN: "flatten (op_target: next block)",
            OP_RECEIVE: "receive (op_target: the base snapshot)",
        },
        "snapshot state": {SNAP_ACTIVE: "active", SNAP_DELETING: "being deleted"},
        "snapshot flags": {SNAPF_WRITABLE: "writable", SNAPF_REPLICATION: "made by replication"},
        "tree owner": {
            OWNER_INODE_TABLE: "the inode table",
            OWNER_SNAP_TABLE: "the snapshot table",
            OWNER_BITMAP: "the free-space bitmap",
        },
        "superblock features": {
            FEATURE_DATA_CHECKSUMS: "data checksums",
            FEATURE_SUMS_XXH3: "data checksums are XXH3-64's low 32 bits (else CRC-32)",
        },
        "role": ROLE_NAMES,
    }
    table = ["### Codes", "", "| field | value | meaning |", "|---|---:|---|"]
    for what, values in codes.items():
        table += [f"| {what} | {v} | {meaning} |" for v, meaning in values.items()]
    parts.append("\n".join(table) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(describe_format(), end="")

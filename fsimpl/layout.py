"""The on-disk format: every struct layout, constant and checksum of a dittofs pool.

Nothing outside this module packs or unpacks bytes. Format version 1:

    byte 0        superblock slot 0 (4 KiB)    the valid slot with the highest generation wins
    byte 4096     superblock slot 1 (4 KiB)    slot = generation % 2
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

import hashlib
import hmac
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import CorruptMetadata, NotAPool, UnsupportedFormat

MAGIC = b"DITTOFS\x00"
FORMAT_VERSION = 1

SUPERBLOCK_SIZE = 4096
SUPERBLOCK_OFFSETS = (0, 4096)
RESERVED_BYTES = 8192  # both slots; the first block after them is the first allocatable one

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 65536

# Feature flags (superblock `features`): a pool with a bit this code does not know is refused.
FEATURE_DATA_CHECKSUMS = 1 << 0
KNOWN_FEATURES = FEATURE_DATA_CHECKSUMS

ROLE_NONE, ROLE_PRIMARY, ROLE_STANDBY = 0, 1, 2
ROLE_NAMES = {ROLE_NONE: "none", ROLE_PRIMARY: "primary", ROLE_STANDBY: "standby"}


def first_data_block(block_size: int) -> int:
    """The first block number not covered by the two superblock slots."""
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

BLOCK_TYPE_NAMES = {
    BT_SUPER: "superblock",
    BT_INTERIOR: "interior node",
    BT_MAP_LEAF: "block-map leaf",
    BT_INODE_LEAF: "inode-table leaf",
    BT_SNAP_LEAF: "snapshot-table leaf",
    BT_BITMAP: "free-space bitmap",
}

_SALT = {
    BT_SUPER: 0x7E1F3C01,
    BT_INTERIOR: 0x1D170A02,
    BT_MAP_LEAF: 0x2B5E9903,
    BT_INODE_LEAF: 0x36A1C404,
    BT_SNAP_LEAF: 0x4C0FFE05,
    BT_BITMAP: 0x5A3D1706,
}


def _crc(buf: bytes | bytearray | memoryview, btype: int) -> int:
    return (zlib.crc32(memoryview(buf)[4:]) ^ _SALT[btype]) & 0xFFFFFFFF


# --- superblock --------------------------------------------------------------------------------

_SUPER = struct.Struct(
    "<I"  # checksum of bytes [4:4096], salted
    "8s"  # magic
    "I"  # format version
    "I"  # features (incompatible: refuse if unknown)
    "Q"  # generation
    "I"  # block size
    "B"  # growable (an image file that grows on demand)
    "B"  # role
    "B"  # inode tree height
    "B"  # snapshot tree height
    "B"  # bitmap tree height
    "3x"
    "Q"  # capacity in blocks
    "16s"  # pool GUID
    "Q"  # created (ns since epoch)
    "Q"  # next inode number
    "Q"  # next snapshot id
    "Q"  # used blocks (allocated, data and metadata)
    "Q"  # inode tree root
    "Q"  # snapshot tree root
    "Q"  # bitmap tree root
    "Q"  # reserve blocks kept for metadata on a full pool
    "Q"  # minimum free blocks below which new snapshots are refused
    "I"  # in-use: PID
    "4x"
    "Q"  # in-use: since (ns)
    "64s"  # in-use: host name
    "256s"  # peer address (standby)
    "16s"  # last common snapshot GUID (standby)
    "16s"  # receive in progress: GUID of the snapshot being received (zeros: none)
    "16s"  # receive in progress: GUID of its base snapshot (zeros: a full stream)
    "Q"  # receive in progress: stream records applied and committed
    "64s"  # receive in progress: name of the snapshot being received
    "B"  # peer answered as primary since we were superseded (standby protocol)
)
assert _SUPER.size <= SUPERBLOCK_SIZE


@dataclass
class Superblock:
    generation: int
    block_size: int
    capacity_blocks: int
    pool_guid: bytes
    created_ns: int
    growable: bool = False
    features: int = 0
    next_inode: int = 1
    next_snap_id: int = 1
    used_blocks: int = 0
    inode_root: int = 0
    inode_height: int = 0
    snap_root: int = 0
    snap_height: int = 0
    bitmap_root: int = 0
    bitmap_height: int = 0
    reserve_blocks: int = 0
    snapshot_min_free: int = 0
    role: int = ROLE_NONE
    inuse_pid: int = 0
    inuse_since_ns: int = 0
    inuse_host: str = ""
    peer: str = ""
    last_common_guid: bytes = bytes(16)
    recv_to_guid: bytes = bytes(16)
    recv_from_guid: bytes = bytes(16)
    recv_records: int = 0
    recv_name: str = ""
    superseded: int = 0
    version: int = FORMAT_VERSION


def pack_superblock(sb: Superblock) -> bytes:
    buf = bytearray(SUPERBLOCK_SIZE)
    _SUPER.pack_into(
        buf,
        0,
        0,
        MAGIC,
        sb.version,
        sb.features,
        sb.generation,
        sb.block_size,
        int(sb.growable),
        sb.role,
        sb.inode_height,
        sb.snap_height,
        sb.bitmap_height,
        sb.capacity_blocks,
        sb.pool_guid,
        sb.created_ns,
        sb.next_inode,
        sb.next_snap_id,
        sb.used_blocks,
        sb.inode_root,
        sb.snap_root,
        sb.bitmap_root,
        sb.reserve_blocks,
        sb.snapshot_min_free,
        sb.inuse_pid,
        sb.inuse_since_ns,
        sb.inuse_host.encode()[:64],
        sb.peer.encode()[:256],
        sb.last_common_guid,
        sb.recv_to_guid,
        sb.recv_from_guid,
        sb.recv_records,
        sb.recv_name.encode()[:64],
        sb.superseded,
    )
    struct.pack_into("<I", buf, 0, _crc(buf, BT_SUPER))
    return bytes(buf)


def unpack_superblock(buf: bytes | bytearray, where: str) -> Superblock:
    """Decode one superblock slot; raise NotAPool / UnsupportedFormat / CorruptMetadata."""
    if len(buf) < SUPERBLOCK_SIZE:
        raise NotAPool(f"{where}: too short to hold a dittofs superblock")
    f = _SUPER.unpack_from(buf, 0)
    if f[1] != MAGIC:
        raise NotAPool(f"{where}: no dittofs superblock (magic {f[1][:8]!r})")
    if f[0] != _crc(buf[:SUPERBLOCK_SIZE], BT_SUPER):
        raise CorruptMetadata(f"{where}: superblock checksum mismatch", -1, "superblock")
    if f[2] != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"{where}: pool format version {f[2]} is not supported by this dittofs "
            f"(it reads version {FORMAT_VERSION}); use the dittofs release that made it"
        )
    if f[3] & ~KNOWN_FEATURES:
        raise UnsupportedFormat(
            f"{where}: pool uses features {f[3] & ~KNOWN_FEATURES:#x} unknown to this dittofs"
        )
    return Superblock(
        version=f[2],
        features=f[3],
        generation=f[4],
        block_size=f[5],
        growable=bool(f[6]),
        role=f[7],
        inode_height=f[8],
        snap_height=f[9],
        bitmap_height=f[10],
        capacity_blocks=f[11],
        pool_guid=f[12],
        created_ns=f[13],
        next_inode=f[14],
        next_snap_id=f[15],
        used_blocks=f[16],
        inode_root=f[17],
        snap_root=f[18],
        bitmap_root=f[19],
        reserve_blocks=f[20],
        snapshot_min_free=f[21],
        inuse_pid=f[22],
        inuse_since_ns=f[23],
        inuse_host=f[24].rstrip(b"\0").decode(errors="replace"),
        peer=f[25].rstrip(b"\0").decode(errors="replace"),
        last_common_guid=f[26],
        recv_to_guid=f[27],
        recv_from_guid=f[28],
        recv_records=f[29],
        recv_name=f[30].rstrip(b"\0").decode(errors="replace"),
        superseded=f[31],
    )


# --- metadata block header ---------------------------------------------------------------------

HEADER = struct.Struct(
    "<I"  # checksum of bytes [4:B], salted by type
    "H"  # block type
    "H"  # layout version of this block type
    "Q"  # own address (block number)
    "Q"  # generation that wrote it
    "Q"  # owner: inode number, or a tree id for pool-wide trees
    "B"  # level (0 = leaf)
    "3x"
    "I"  # records in use
    "Q"  # first key covered
)
HEADER_SIZE = 64
assert HEADER.size <= HEADER_SIZE

# Owners of the pool-wide trees (inode numbers start at 1, so these never collide).
OWNER_INODE_TABLE = 1 << 62
OWNER_SNAP_TABLE = (1 << 62) + 1
OWNER_BITMAP = (1 << 62) + 2


class BlockHeader(NamedTuple):
    btype: int
    version: int
    address: int
    generation: int
    owner: int
    level: int
    records: int
    key_base: int


def seal_block(
    buf: bytearray,
    btype: int,
    address: int,
    generation: int,
    owner: int,
    level: int,
    count: int,
    key_base: int,
) -> None:
    """Write the header and checksum into a metadata block buffer, in place."""
    HEADER.pack_into(buf, 0, 0, btype, 1, address, generation, owner, level, count, key_base)
    struct.pack_into("<I", buf, 0, _crc(buf, btype))


def open_block(buf: bytes | bytearray, address: int, expect_type: int) -> BlockHeader:
    """Verify a metadata block read from `address`: checksum, type and self-address."""
    f = HEADER.unpack_from(buf, 0)
    btype = f[1]
    tname = BLOCK_TYPE_NAMES.get(expect_type, str(expect_type))
    if btype not in _SALT or f[0] != _crc(buf, btype):
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
    if f[3] != address:
        raise CorruptMetadata(
            f"metadata block {address} ({tname}) claims address {f[3]}: a misdirected "
            "write; run 'snapctl check'",
            address,
            tname,
        )
    return BlockHeader(btype, f[2], f[3], f[4], f[5], f[6], f[7], f[8])


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


def interior_fanout(block_size: int) -> int:
    return (block_size - HEADER_SIZE) // 8


POINTER = struct.Struct("<Q")


def get_pointer(buf: bytes | bytearray, slot: int) -> int:
    return int(POINTER.unpack_from(buf, HEADER_SIZE + 8 * slot)[0])


def set_pointer(buf: bytearray, slot: int, address: int) -> None:
    POINTER.pack_into(buf, HEADER_SIZE + 8 * slot, address)


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
# incomplete entries, never in pools with data checksums (a CRC needs the whole block).
ENTRY_INCOMPLETE = 0x01
SECTOR = 512  # unit of the valid range

MAP_ENTRY = struct.Struct(
    "<Q"  # addr (bits 0-47) | kind (48-55) | flags (56-63)
    "I"  # birth: pool.next_snap_id when live last changed this block (the O(1) sharing test);
    # a shadow entry keeps the birth the preserved data had in live
    "H"  # valid range start, sectors (incomplete entries)
    "H"  # valid range end
    "Q"  # complete entries: data checksum in the low 32 bits (pools formatted with data
    # checksums); incomplete entries: the base block
)
ENTRY_SIZE = 24
assert MAP_ENTRY.size == ENTRY_SIZE
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


def entry_is_empty(buf: bytes | bytearray, index: int) -> bool:
    off = HEADER_SIZE + ENTRY_SIZE * index
    return buf[off : off + ENTRY_SIZE] == _ZERO_ENTRY


# --- inode records -----------------------------------------------------------------------------

INODE_VOLUME = 1
INODE_SHADOW = 2

INODE_RECORD = struct.Struct(
    "<B"  # kind (0 = free slot)
    "B"  # flags
    "B"  # map tree height
    "x"
    "I"  # pending operation (OP_*)
    "Q"  # inode number
    "Q"  # volume inode (a shadow's volume; a volume's own number)
    "Q"  # shadow: its snapshot id; volume: id of its latest snapshot (0 = none)
    "Q"  # size in bytes (a shadow: the volume's size when the snapshot was taken)
    "Q"  # map root block (0 = empty map: all ditto / all unallocated)
    "Q"  # data blocks this map owns
    "Q"  # non-empty entries
    "Q"  # created (ns)
    "Q"  # clone origin: volume inode
    "Q"  # clone origin: snapshot id
    "Q"  # pending operation's target (e.g. the snapshot a rollback restores)
    "Q"  # incarnation: bumped when live is replaced (rollback), so old connections notice
    "Q"  # shadow: data blocks the snapshot's view referenced when it was taken
    "64s"  # volume name (volumes only)
    "Q"  # incomplete entries in the map (deferred merges; 0: none to look for)
)
INODE_RECORD_SIZE = 256
assert INODE_RECORD.size <= INODE_RECORD_SIZE

OP_NONE = 0
OP_ROLLBACK = 1  # live is being restored to op_target
OP_DELETE = 2  # the volume (and its shadows) are being freed
OP_FLATTEN = 3  # a clone is copying its origin's blocks (op_target: next block to look at)
OP_RECEIVE = 4  # a replication stream is being applied (op_target: the base snapshot, read
#                 by the volume's exports meanwhile; 0 for a full stream)


@dataclass
class InodeRecord:
    ino: int
    kind: int
    volume_ino: int
    snap_id: int = 0
    size: int = 0
    root: int = 0
    height: int = 0
    owned_blocks: int = 0
    entry_count: int = 0
    created_ns: int = 0
    flags: int = 0
    op: int = OP_NONE
    op_target: int = 0
    origin_vol: int = 0
    origin_snap: int = 0
    incarnation: int = 0
    referenced_blocks: int = 0
    name: str = ""
    incomplete_blocks: int = 0


def record_capacity(block_size: int, record_size: int) -> int:
    return (block_size - HEADER_SIZE) // record_size


def read_inode(buf: bytes | bytearray, index: int) -> InodeRecord | None:
    f = INODE_RECORD.unpack_from(buf, HEADER_SIZE + INODE_RECORD_SIZE * index)
    if f[0] == 0:
        return None
    return InodeRecord(
        kind=f[0],
        flags=f[1],
        height=f[2],
        op=f[3],
        ino=f[4],
        volume_ino=f[5],
        snap_id=f[6],
        size=f[7],
        root=f[8],
        owned_blocks=f[9],
        entry_count=f[10],
        created_ns=f[11],
        origin_vol=f[12],
        origin_snap=f[13],
        op_target=f[14],
        incarnation=f[15],
        referenced_blocks=f[16],
        name=f[17].rstrip(b"\0").decode(),
        incomplete_blocks=f[18],
    )


def write_inode(buf: bytearray, index: int, r: InodeRecord | None) -> None:
    off = HEADER_SIZE + INODE_RECORD_SIZE * index
    if r is None:
        buf[off : off + INODE_RECORD_SIZE] = bytes(INODE_RECORD_SIZE)
        return
    INODE_RECORD.pack_into(
        buf,
        off,
        r.kind,
        r.flags,
        r.height,
        r.op,
        r.ino,
        r.volume_ino,
        r.snap_id,
        r.size,
        r.root,
        r.owned_blocks,
        r.entry_count,
        r.created_ns,
        r.origin_vol,
        r.origin_snap,
        r.op_target,
        r.incarnation,
        r.referenced_blocks,
        r.name.encode(),
        r.incomplete_blocks,
    )


# --- snapshot records --------------------------------------------------------------------------

SNAP_ACTIVE = 1
SNAP_DELETING = 2  # marked for deletion; its blocks are being handed down or freed

SNAPF_WRITABLE = 0x01
SNAPF_REPLICATION = 0x02

MAX_HOLDS = 8
HOLD_TAG_MAX = 32

SNAP_RECORD = struct.Struct(
    "<Q"  # id (ordinal, pool-wide, never reused)
    "16s"  # GUID (random; the identity that replication compares)
    "Q"  # created (ns)
    "B"  # state
    "B"  # flags
    "B"  # number of holds
    "x"
    "I"  # volumes covered
    "64s" + "32s" * MAX_HOLDS  # name  # hold tags
)
SNAP_RECORD_SIZE = 512
assert SNAP_RECORD.size <= SNAP_RECORD_SIZE


@dataclass
class SnapshotRecord:
    id: int
    guid: bytes
    name: str
    created_ns: int
    state: int = SNAP_ACTIVE
    flags: int = 0
    covered: int = 0
    holds: list[str] = field(default_factory=list)


def read_snapshot(buf: bytes | bytearray, index: int) -> SnapshotRecord | None:
    f = SNAP_RECORD.unpack_from(buf, HEADER_SIZE + SNAP_RECORD_SIZE * index)
    if f[3] == 0:
        return None
    nholds = min(f[5], MAX_HOLDS)
    return SnapshotRecord(
        id=f[0],
        guid=f[1],
        created_ns=f[2],
        state=f[3],
        flags=f[4],
        covered=f[6],
        name=f[7].rstrip(b"\0").decode(),
        holds=[t.rstrip(b"\0").decode() for t in f[8 : 8 + nholds]],
    )


def write_snapshot(buf: bytearray, index: int, r: SnapshotRecord | None) -> None:
    off = HEADER_SIZE + SNAP_RECORD_SIZE * index
    if r is None:
        buf[off : off + SNAP_RECORD_SIZE] = bytes(SNAP_RECORD_SIZE)
        return
    holds = [t.encode() for t in r.holds[:MAX_HOLDS]]
    holds += [b""] * (MAX_HOLDS - len(holds))
    SNAP_RECORD.pack_into(
        buf,
        off,
        r.id,
        r.guid,
        r.created_ns,
        r.state,
        r.flags,
        len(r.holds),
        r.covered,
        r.name.encode(),
        *holds,
    )


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

STREAM_HEADER = struct.Struct("<4sHHIQ4x")  # magic, type, flags, payload length, sequence
STREAM_TRAILER = struct.Struct("<I")  # CRC-32 of header + payload
DATA_HEAD = struct.Struct("<IQI")  # volume index, first block, blocks
HOLE_BODY = struct.Struct("<IQQ")  # volume index, first block, blocks
assert STREAM_HEADER.size == 24


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

"""Shared helpers of the reliability and security tests (tests/test_t8_*.py).

* self-describing data: every 512-byte sector a client writes names its client, slot, sequence
  number and sector index and is filled from them, so after a crash each sector read back is
  either zeros (never written) or proves exactly which write it came from — a lost flushed
  write or a sector of garbage cannot pass for good data;
* the metadata blocks of a pool by type (for corruption tests), found through the engine's own
  trees, and byte flipping;
* loop devices and a raw control-socket client, always released by name or PID.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
from harness import require
from support.nbdclose import disconnect

from fsimpl.checker import CheckReport, check
from fsimpl.device import Device
from fsimpl.keyed import KeyedTree
from fsimpl.layout import (
    BT_INTERIOR,
    HEADER,
    RESERVED_BYTES,
    SUPERBLOCK_OFFSETS,
    BlockHeader,
    Superblock,
    child_pointers,
    pack_superblock,
    unpack_superblock,
)
from fsimpl.radix import RadixTree
from fsimpl.txn import Pool

SECTOR = 512
_SECTOR_HEAD = struct.Struct("<8sIIQI")  # magic, client, slot, seq, sector index
_MAGIC = b"DTFSTEST"


# --- self-describing data --------------------------------------------------------------------


def sector(client: int, slot: int, seq: int, index: int) -> bytes:
    head = _SECTOR_HEAD.pack(_MAGIC, client, slot, seq, index)
    fill = hashlib.blake2b(head, digest_size=64).digest()
    return head + (fill * (SECTOR // 64))[: SECTOR - len(head)]


def slot_data(client: int, slot: int, seq: int, slot_size: int) -> bytes:
    return b"".join(sector(client, slot, seq, i) for i in range(slot_size // SECTOR))


_ZERO_SECTOR = bytes(SECTOR)


def parse_sector(buf: bytes) -> tuple[int, int, int, int] | None:
    """(client, slot, seq, index) of a valid sector; (0, 0, 0, 0) for zeros; None: garbage."""
    if buf == _ZERO_SECTOR:
        return (0, 0, 0, 0)
    magic, client, slot, seq, index = _SECTOR_HEAD.unpack_from(buf)
    if magic != _MAGIC or buf != sector(client, slot, seq, index):
        return None
    return (client, slot, seq, index)


def check_slot(buf: bytes, client: int, slot: int, lo: int, hi: int, what: str) -> list[int]:
    """Every sector of one slot's data is a whole sector of a write of this slot with a
    sequence number in [lo, hi] (0 = never written: zeros). Returns the seqs found; raises
    AssertionError naming the first bad sector."""
    seqs = []
    for i in range(len(buf) // SECTOR):
        got = parse_sector(buf[i * SECTOR : (i + 1) * SECTOR])
        where = f"{what}: slot {slot} of client {client}, sector {i}"
        assert got is not None, f"{where}: garbage (no write ever put these bytes there)"
        c, s, seq, idx = got
        if seq == 0:
            assert lo == 0, f"{where}: zeros, but write {lo} of it was flushed"
        else:
            assert (c, s, idx) == (client, slot, i), (
                f"{where}: holds sector {idx} of slot {s} of client {c} (misplaced data)"
            )
            assert lo <= seq <= hi, f"{where}: holds write {seq}, expected one in [{lo}, {hi}]" + (
                " (a flushed write was lost)" if seq < lo else ""
            )
        seqs.append(seq)
    return seqs


# --- the checker -------------------------------------------------------------------------------


def check_image(path: Path | str) -> CheckReport:
    dev = Device(str(path), readonly=True)
    try:
        return check(dev)
    finally:
        dev.close()


def describe(report: CheckReport) -> str:
    return "; ".join(
        f"[{d.kind}{' FATAL' if d.fatal else ''} @ {d.where}] {d.message}"
        for d in report.defects[:8]
    )


def assert_check_clean(path: Path | str, why: str = "") -> None:
    report = check_image(path)
    assert report.clean, f"{why}: the checker found: {describe(report)}"


# --- metadata blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class MetaBlock:
    btype: int  # a layout.BT_* (BT_SUPER for a superblock slot: addr is then the slot)
    addr: int
    level: int
    tree: str  # which tree: "inode table", "snapshot table", "bitmap", "live map",
    # "live shadow index" (by block), "live shadow list" (by snapshot)
    first_key: int  # the first leaf-record number it covers (leaves of maps: first block;
    # keyed nodes: their first key's high half, a block in the index, a snapshot in the list)


def _keyed_blocks(tree: KeyedTree, name: str) -> Iterator[MetaBlock]:
    """A keyed tree's nodes; first_key: the block number of the node's first key."""
    for ptr, level in tree.all_node_pointers():
        node = tree.store.load(ptr, tree.block_type(level), level)
        first = BlockHeader(*HEADER.unpack_from(node.buf, 0)[1:]).key_base
        yield MetaBlock(tree.block_type(level), ptr.addr0, level, name, first)


def _tree_blocks(tree: RadixTree, name: str) -> Iterator[MetaBlock]:
    if not tree.root_addr:
        return
    fan = tree.fanout
    stack = [(tree.root, tree.height, 0)]
    while stack:
        ptr, level, leaf_base = stack.pop()
        btype = tree.leaf_type if level == 0 else BT_INTERIOR
        yield MetaBlock(btype, ptr.addr0, level, name, leaf_base * tree.leaf_capacity)
        if level:
            node = tree.store.load(ptr, BT_INTERIOR, level)
            span = fan ** (level - 1)
            for slot, child in enumerate(child_pointers(node.buf, fan)):
                if child.addr0:
                    stack.append((child, level - 1, leaf_base + slot * span))


def metadata_blocks(path: Path | str) -> tuple[list[MetaBlock], Superblock]:
    """Every committed metadata block of the pool on path, and its newest superblock."""
    dev = Device(str(path), readonly=True)
    try:
        pool = Pool.open(dev, cache_bytes=8 << 20)
        out = list(_tree_blocks(pool.inodes.tree, "inode table"))
        out += _tree_blocks(pool.snaptab.tree, "snapshot table")
        out += _tree_blocks(pool.allocator.tree, "bitmap")
        for vol in pool.volumes.values():
            out += _tree_blocks(vol.live.tree, f"{vol.name} map")
            if vol.shadow_index is not None:
                out += _keyed_blocks(vol.shadow_index.by_block.tree, f"{vol.name} shadow index")
                out += _keyed_blocks(vol.shadow_index.by_snap.tree, f"{vol.name} shadow list")
        return out, pool.sb
    finally:
        dev.close()


def flip_bytes(path: Path | str, offset: int, count: int = 8) -> None:
    """Invert count bytes at offset (in the middle of a block's records: its checksum fails)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())


def read_slots(path: Path | str) -> list[Superblock | Exception]:
    with open(path, "rb") as f:
        raw = f.read(RESERVED_BYTES)
    out: list[Superblock | Exception] = []
    for off in SUPERBLOCK_OFFSETS:
        try:
            out.append(unpack_superblock(raw[off:], str(path)))
        except Exception as e:  # noqa: BLE001 - reported to the caller as the slot's state
            out.append(e)
    return out


def write_slot(path: Path | str, slot: int, sb: Superblock) -> None:
    """Write a superblock (checksummed by layout's own packer) into slot."""
    with open(path, "r+b") as f:
        f.seek(SUPERBLOCK_OFFSETS[slot])
        f.write(pack_superblock(sb))
        f.flush()
        os.fsync(f.fileno())


def newest_slot(path: Path | str) -> tuple[int, Superblock]:
    """The first valid slot of the newest generation (the one open reads), and its content."""
    slots = read_slots(path)
    good = [(i, s) for i, s in enumerate(slots) if isinstance(s, Superblock)]
    assert good, f"{path}: no valid superblock"
    return max(good, key=lambda t: t[1].generation)


# --- NBD ------------------------------------------------------------------------------------------


def nbd_errno(e: nbd.Error) -> int | None:
    code = e.errno
    if isinstance(code, int):
        return code
    return getattr(errno, str(code), None) if code else None


close_quietly = disconnect  # (support.nbdclose: a connection already dropped goes away)


# --- loop devices ----------------------------------------------------------------------------


class LoopDevices:
    """Loop devices made by one test; detach_all() releases each by its name."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def attach(self, image: Path | str, *extra: str) -> str:
        cp = subprocess.run(
            [require("losetup"), "--find", "--show", *extra, str(image)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cp.returncode == 0, f"losetup {extra} {image} failed: {cp.stderr}"
        dev = cp.stdout.strip()
        self.made.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        if dev in self.made:
            subprocess.run([require("losetup"), "-d", dev], capture_output=True, timeout=30)
            self.made.remove(dev)

    def detach_all(self) -> None:
        for dev in list(reversed(self.made)):
            self.detach(dev)


# --- the control socket, raw -----------------------------------------------------------------


class RawControl:
    """A control-socket connection that sends exactly the bytes it is given."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, op: str, args: dict[str, Any] | None = None, rid: Any = 1) -> Any:
        msg = {"v": 1, "id": rid, "op": op, "args": args or {}}
        self.send(json.dumps(msg).encode() + b"\n")
        return self.reply()

    def reply(self) -> dict[str, Any] | None:
        """The next non-progress line as JSON; None when the server closed the connection."""
        while True:
            while b"\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    return None
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            msg: dict[str, Any] = json.loads(line)
            if "progress" not in msg:
                return msg

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()

"""A pool to damage, for the metadata-copies tests: snapshots, a second volume, a clone and a
written writable snapshot, left after a flush without a clean close; and the four ways a
metadata block is damaged (bytes flipped, zeroed, an older version of itself: a lost write,
another block of its type: a misdirected write)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from t8_helpers import MetaBlock

from fsimpl import checker
from fsimpl import layout as L
from fsimpl.device import Device
from fsimpl.engine import Engine

from . import history
from .data import pattern

DAMAGES = ["flipped", "zeroed", "older-version", "misdirected"]

BS = 4096
SIZE = 8 << 20


def build(path: Path, copies: int) -> dict[str, str]:
    """The pool; returns the sha256 of every export."""
    eng = Engine.open(
        str(path), create_size=SIZE, block_size=BS, claim=False, metadata_copies=copies
    )

    def write(export: str, tag: int, first: int, blocks: int) -> None:
        ex = eng.open_export(export, False)
        eng.write(ex, memoryview(pattern(tag, blocks * BS)), first * BS)

    for i in range(0, 2000, 61):  # spread: several map leaves and an interior level
        write("live", i + 1, i, 3)
    eng.create_snapshot("s1")
    for i in range(20, 2000, 250):  # the snapshot's shadow map spans leaves too
        write("live", 90 + i, i, 4)
    eng.create_volume("vol2", SIZE)
    for i in range(0, 2000, 300):
        write("vol2", 91 + i, i, 5)
    eng.create_snapshot("s2")
    eng.clone("live@s1", "cl")
    write("cl", 92, 5, 5)
    eng.create_snapshot("ws", ["vol2"], writable=True)
    write("vol2@ws", 93, 3, 4)
    eng.flush()
    sums = exports(eng)
    eng.device.close()  # a crash after the flush: no clean close
    return sums


def exports(eng: Engine, skip: str | None = None) -> dict[str, str]:
    """The sha256 of every export (but those of volume `skip`)."""
    return {
        name: hashlib.sha256(data).hexdigest() for name, data in history.exports(eng, skip).items()
    }


def check(path: Path) -> checker.CheckReport:
    """The checker on the pool at path, opened read-only."""
    dev = Device(str(path), readonly=True)
    try:
        return checker.check(dev)
    finally:
        dev.close()


def raw(path: Path, block: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(block * BS)
        return bytearray(f.read(BS))


def put(path: Path, block: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(block * BS)
        f.write(data)


def damage(path: Path, m: MetaBlock, how: str, others: list[MetaBlock]) -> None:
    buf = raw(path, m.addr)
    hdr = L.open_block(buf, m.addr, m.btype)
    if how == "flipped":
        for i in range(200, 232):
            buf[i] ^= 0xFF
    elif how == "zeroed":
        buf = bytearray(BS)
    elif how == "older-version":  # valid on its own: same address, an earlier generation
        buf[-1] ^= 0x5A
        L.seal_block(
            buf, m.btype, m.addr, hdr.generation - 1, hdr.owner, hdr.level, hdr.records,
            hdr.key_base, hdr.address1,
        )  # fmt: skip
    else:  # misdirected: another block of the same type landed here
        same = [o for o in others if o.btype == m.btype and o.addr != m.addr]
        other = (same or [o for o in others if o.addr != m.addr])[0]
        buf = raw(path, other.addr)
    put(path, m.addr, bytes(buf))


def walk_snapshot_entries(eng: Engine) -> None:
    """Walk every snapshot's own entries (what delete, diff and send read: the shadow lists,
    which no read of an export needs): a diff from each volume's oldest snapshot to live."""
    for vol in list(eng.pool.volumes.values()):
        if vol.chain:
            oldest = eng.pool.snapshots[vol.chain[0]].name
            eng.diff_blocks(oldest, None, vol.name)

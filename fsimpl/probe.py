"""Recognise what a disk already holds, so `format` never destroys data silently.

Only well-known signatures at fixed offsets are checked (what blkid would say first): a dittofs
pool, ext2/3/4, XFS, Btrfs, LUKS, swap, and DOS/GPT partition tables.
"""

from __future__ import annotations

from .device import Device
from .layout import MAGIC, SUPERBLOCK_OFFSETS

_SIGNATURES: list[tuple[str, int, bytes]] = [
    *[("a dittofs pool", offset + 4, MAGIC) for offset in SUPERBLOCK_OFFSETS],
    ("an ext2/3/4 file system", 1080, b"\x53\xef"),
    ("an XFS file system", 0, b"XFSB"),
    ("a Btrfs file system", 65600, b"_BHRfS_M"),
    ("a LUKS volume", 0, b"LUKS\xba\xbe"),
    ("a swap area", 4086, b"SWAPSPACE2"),
    ("a GPT partition table", 512, b"EFI PART"),
]


def detect_signature(device: Device) -> str | None:
    """A description of what the disk holds, or None if nothing known is found."""
    size = device.size()
    head = device.pread(min(size, 65600 + 8), 0) if size else bytearray()
    for what, offset, magic in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and any(head[446:510]):
        return "a DOS partition table"
    return None

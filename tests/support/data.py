"""Recognisable data and hashes.

`pattern(tag, n)` is n bytes that say which write made them: a test that reads back the wrong
block sees the wrong tag, not merely "different bytes". The sha256 helpers stream, so an image
of any size hashes in constant memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

MiB = 1 << 20


def pattern(tag: int, n: int) -> bytes:
    """n bytes made of tag's 8-byte little-endian form, repeated (n need not be a multiple)."""
    unit = tag.to_bytes(8, "little")
    return (unit * (n // 8 + 1))[:n]


def ramp(tag: int, n: int) -> bytes:
    """n bytes that differ from byte to byte as well as from tag to tag (catches a read at
    the wrong offset inside a block, which pattern() cannot)."""
    return bytes((tag * 31 + i) & 0xFF for i in range(n))


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256_export(handle: Any, size: int | None = None) -> str:
    """sha256 of an NBD export read whole through a libnbd handle."""
    size = handle.get_size() if size is None else size
    h = hashlib.sha256()
    for off in range(0, size, MiB):
        h.update(handle.pread(min(MiB, size - off), off))
    return h.hexdigest()

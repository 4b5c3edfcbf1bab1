"""Sizes as people write them: '64K', '10G', '1.5T', '4096' (binary units, as nbdkit and zfs).

The one parser for the plugin's parameters and snapctl's options, so both accept the same
spellings and refuse the rest with the same message.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str, what: str = "") -> int:
    """Bytes in text; InvalidArgument (naming `what`, e.g. 'size=') when it is not a size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidArgument(
            f"{what}'{text}' is not a size: use a number with K, M, G or T (64K, 20G)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])

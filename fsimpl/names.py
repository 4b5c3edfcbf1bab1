"""Names: the rules for snapshot and volume names, and the parsing of NBD export names.

Export names are `VOLUME` (read-write; `live` is the default volume) and `VOLUME@SNAPSHOT`
(read-only), with `VOLUME@latest` naming the newest snapshot of the volume when a client
connects. Names are 1-64 characters of [A-Za-z0-9._-] and do not start with '.' or '-', so they
are safe in file names, shell words and URLs; '@' and '%' never occur in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidName

DEFAULT_VOLUME = "live"
LATEST = "latest"
MAX_NAME = 64

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def check_name(name: str, what: str = "snapshot") -> str:
    """Validate a snapshot or volume name; raise InvalidName saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise InvalidName(f"a {what} name must not be empty")
    if len(name) > MAX_NAME:
        raise InvalidName(f"{what} name is {len(name)} characters long; the limit is {MAX_NAME}")
    if not _NAME.fullmatch(name):
        shown = name.encode("unicode_escape").decode()[:80]
        raise InvalidName(
            f"invalid {what} name '{shown}': use letters, digits, '.', '_' and '-', "
            "not starting with '.' or '-'"
        )
    if name == LATEST:
        raise InvalidName(f"'{LATEST}' is reserved: it names the newest snapshot of a volume")
    return name


@dataclass(frozen=True)
class ExportName:
    volume: str
    snapshot: str | None  # None: the volume itself; LATEST: the newest snapshot


def parse_export(name: str) -> ExportName:
    if name == "":
        return ExportName(DEFAULT_VOLUME, None)
    volume, sep, snap = name.partition("@")
    if not sep:
        check_name(volume, "volume")
        return ExportName(volume, None)
    check_name(volume, "volume")
    if snap != LATEST:
        check_name(snap, "snapshot")
    return ExportName(volume, snap)

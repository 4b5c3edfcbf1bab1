"""Fixed-size records declared by field name: the machinery layout.py declares the format with.

A record is declared once, as a dataclass whose stored fields say how they are stored, and
a codec made from it:

    @dataclass(kw_only=True)
    class InodeRecord:
        kind: int = ondisk("B", "1 volume, 2 shadow inode; 0 marks a free slot")
        ...

    INODE_CODEC = RecordCodec(InodeRecord, "inode record", size=256, reserved_tail=72)

The declaration drives everything else: the struct format (fields in declaration order, little
endian, no implicit alignment), `pack_into` / `unpack_from`, the offsets and the table in
docs/format.md. The packed size must equal the record's size exactly (fields plus `reserved`
trailing zero bytes), so a field added without taking its bytes from the reserve fails at import
instead of shifting every field after it.

Structs that are not records of their own (a block header, a map entry packed into bit fields,
a stream record header) are declared as a `Layout`: the same rows, without a dataclass. Their
hot-path accessors in layout.py use the layout's precompiled `struct`.

Stored types follow the annotation: `int` and `bytes` as they are, `bool` as 0/1, `str` as
NUL-padded UTF-8 (an over-long value is cut at the field's width), `list[str]` as `repeat`
NUL-padded strings with a separate count field (`count_of`). A field may be `hidden`: stored
but not a constructor argument nor part of equality (a checksum, a magic number, a count).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Column:
    """One stored field: its name ('' for reserved bytes), struct code, meaning, offset."""

    name: str
    code: str
    meaning: str
    offset: int = 0

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.code)


def reserved(nbytes: int, meaning: str = "reserved, zero") -> tuple[str, str, str]:
    return ("", f"{nbytes}x", meaning)


class Layout:
    """A struct declared by named rows, packed exactly into `size` bytes."""

    def __init__(self, title: str, size: int, rows: Iterable[tuple[str, str, str]]) -> None:
        self.title = title
        self.size = size
        columns: list[Column] = []
        offset = 0
        for name, code, meaning in rows:
            col = Column(name, code, meaning, offset)
            offset += col.size
            columns.append(col)
        self.columns = columns
        self.struct = struct.Struct("<" + "".join(c.code for c in columns))
        if self.struct.size != size:
            raise AssertionError(
                f"{title}: the declared fields pack into {self.struct.size} bytes, but the "
                f"record is {size} bytes on disk; take new fields' bytes from the reserve"
            )
        self.names = [c.name for c in columns if c.name]

    def offset_of(self, name: str) -> int:
        for c in self.columns:
            if c.name == name:
                return c.offset
        raise KeyError(name)

    def markdown(self) -> str:
        """The layout as a table for docs/format.md."""
        lines = [
            f"### {self.title} ({self.size} bytes)",
            "",
            "| offset | size | field | code | meaning |",
            "|---:|---:|---|---|---|",
        ]
        for c in self.columns:
            name = f"`{c.name}`" if c.name else "–"
            meaning = c.meaning.replace("|", "\\|")
            lines.append(f"| {c.offset} | {c.size} | {name} | `{c.code}` | {meaning} |")
        return "\n".join(lines) + "\n"


# --- records as dataclasses ----------------------------------------------------------------------


REQUIRED: Any = dataclasses.MISSING


def ondisk(
    code: str,
    meaning: str,
    default: Any = 0,
    *,
    pad_before: int = 0,
    hidden: bool = False,
    repeat: int = 1,
    count_of: str = "",
) -> Any:
    """Declare a stored dataclass field: its struct code and what it means on disk. A field
    without a default (default=REQUIRED) must be given to the constructor."""
    meta = {
        "code": code,
        "meaning": meaning,
        "pad_before": pad_before,
        "repeat": repeat,
        "count_of": count_of,
    }
    if default is REQUIRED:
        return dataclasses.field(metadata=meta)
    if isinstance(default, list):
        return dataclasses.field(default_factory=list, metadata=meta)
    if hidden:
        return dataclasses.field(
            default=default, init=False, repr=False, compare=False, metadata=meta
        )
    return dataclasses.field(default=default, metadata=meta)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


class RecordCodec(Generic[R]):
    """Pack and unpack one dataclass record, as its field declarations say.

    The two functions are generated from the declarations (as dataclasses generates __init__),
    so a record costs one struct call and one constructor call, as hand-written code would."""

    def __init__(self, cls: type[R], title: str, size: int, reserved_tail: int) -> None:
        self.cls = cls
        rows: list[tuple[str, str, str]] = []
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        # where each field's values sit in the unpacked tuple
        index: dict[str, int] = {}
        i = 0
        for f in fields:
            meta = f.metadata
            if "code" not in meta:
                raise AssertionError(f"{title}: field {f.name} does not say how it is stored")
            if meta["pad_before"]:
                rows.append(reserved(meta["pad_before"]))
            rows.append((f.name, meta["code"] * meta["repeat"], meta["meaning"]))
            index[f.name] = i
            i += meta["repeat"]
        if reserved_tail:
            rows.append(reserved(reserved_tail))
        self.layout = Layout(title, size, rows)
        packed: list[str] = []
        args: list[str] = []
        later: list[str] = []
        counts = {f.metadata["count_of"]: f.name for f in fields if f.metadata["count_of"]}
        for f in fields:
            meta, name, kind, at = f.metadata, f.name, str(f.type), index[f.name]
            if meta["count_of"]:
                packed.append(f"len(r.{meta['count_of']})")
                value = f"v[{at}]"
            elif kind == "str":
                packed.append(f"r.{name}.encode()")
                value = f"_text(v[{at}])"
            elif kind == "bool":
                packed.append(f"int(r.{name})")
                value = f"bool(v[{at}])"
            elif kind == "list[str]":
                n = meta["repeat"]
                packed.append(f"*_padded(r.{name}, {n})")
                end = f"{at + n}"
                if name in counts:  # only the tags in use are decoded
                    end = f"{at} + min(v[{index[counts[name]]}], {n})"
                value = f"[_text(x) for x in v[{at}:{end}]]"
            elif kind in ("int", "bytes"):
                packed.append(f"r.{name}")
                value = f"v[{at}]"
            else:
                raise AssertionError(f"{title}: records cannot store a {kind} ({name})")
            if f.init:
                args.append(f"{name}={value}")
            else:
                later.append(f"    rec.{name} = {value}\n")
        source = (
            "def pack_into(buf, offset, r):\n"
            f"    _pack_into(buf, offset, {', '.join(packed)})\n"
            "def unpack_from(buf, offset=0):\n"
            "    v = _unpack_from(buf, offset)\n"
            f"    rec = _cls({', '.join(args)})\n" + "".join(later) + "    return rec\n"
        )
        scope: dict[str, Any] = {
            "_pack_into": self.layout.struct.pack_into,
            "_unpack_from": self.layout.struct.unpack_from,
            "_cls": cls,
            "_text": _text,
            "_padded": _padded,
        }
        exec(compile(source, f"<record {title}>", "exec"), scope)
        self.pack_into: Callable[[bytearray, int, R], None] = scope["pack_into"]
        self.unpack_from: Callable[[bytes | bytearray | memoryview, int], R] = scope["unpack_from"]

    def pack(self, rec: R) -> bytes:
        buf = bytearray(self.layout.size)
        self.pack_into(buf, 0, rec)
        return bytes(buf)


def _padded(items: list[str], n: int) -> list[bytes]:
    out = [t.encode() for t in items[:n]]
    return out + [b""] * (n - len(out))

"""Recording a device's I/O: every write, sync, discard and truncate, in the order performed.

`RecordingDevice` performs each operation on the real file and then logs it: into `ops` while
`recording` (crashsim.py replays them as power cuts), and, when `log_path` is set, appended to a
file (the nbdkit plugin script tests/recording_plugin.py sets it from $DITTOFS_RECORD, so a real
server's I/O can be replayed too). An operation is logged only once it completed, a sync only
once it returned: a client that holds an acknowledgement knows everything that led to it is
already in the log.

File record: kind (1 write, 2 sync, 3 discard, 4 truncate), offset, length (u64 each), then for
a write `length` bytes of data, appended with one write(2). A kill -9 may leave the last record
incomplete; `read_log` drops it.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fsimpl.device import Device
from fsimpl.layout import SUPERBLOCK_OFFSETS, SUPERBLOCK_SIZE

RECORD = struct.Struct("<BQQ")  # the test log's own format, not the pool's
KINDS = {1: "write", 2: "sync", 3: "discard", 4: "truncate"}
CODES = {v: k for k, v in KINDS.items()}


@dataclass(slots=True)
class Op:
    kind: str  # "write" | "sync" | "discard" | "truncate"
    offset: int = 0
    data: bytes = b""
    length: int = 0  # discard: bytes; truncate: the new size
    tag: int = 0  # the harness's model state when the operation was issued
    call: int = 0  # the harness call that issued it

    @property
    def is_superblock(self) -> bool:
        return (
            self.kind == "write"
            and self.offset in SUPERBLOCK_OFFSETS
            and len(self.data) == SUPERBLOCK_SIZE
        )

    def __repr__(self) -> str:
        if self.kind == "write":
            what = "superblock" if self.is_superblock else "write"
            return f"{what}@{self.offset}+{len(self.data)}"
        if self.kind == "discard":
            return f"discard@{self.offset}+{self.length}"
        if self.kind == "truncate":
            return f"truncate({self.length})"
        return "sync"


class RecordingDevice(Device):
    """A Device that logs every write, sync, discard and truncate it performs, in order."""

    log_path: str | None = None  # every instance also appends to this file when set
    _log_fd = -1
    _log_lock = threading.Lock()

    def __init__(self, path: str, readonly: bool = False) -> None:
        super().__init__(path, readonly)
        self.ops: list[Op] = []
        self.recording = False
        self.base = b""
        self.tag = 0
        self.call = 0
        self._in_pwritev = False
        # called before each sync while recording: a test pairs each flush point with what
        # else in the world (a peer pool) was true at that moment
        self.before_sync: Callable[[], None] | None = None

    def start_recording(self) -> None:
        """From now on log everything into ops; `base` is the image as it is at this moment."""
        with open(self.path, "rb") as f:
            self.base = f.read()
        self.ops = []
        self.recording = True

    def _log(self, op: Op) -> None:
        if self.recording:
            op.tag = self.tag
            op.call = self.call
            self.ops.append(op)
        if self.log_path is not None:
            self._append(op)

    def _append(self, op: Op) -> None:
        cls = RecordingDevice
        length = len(op.data) if op.kind == "write" else op.length
        rec = RECORD.pack(CODES[op.kind], op.offset, length) + op.data
        with cls._log_lock:
            if cls._log_fd < 0:
                assert self.log_path is not None
                cls._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            done = 0
            while done < len(rec):
                done += os.write(cls._log_fd, rec[done:])

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        super().pwrite(data, offset)
        if not self._in_pwritev:
            self._log(Op("write", offset, bytes(data)))

    def pwritev(self, parts: list[memoryview], offset: int) -> None:
        self._in_pwritev = True  # a short pwritev finishes through pwrite: log it once
        try:
            super().pwritev(parts, offset)
        finally:
            self._in_pwritev = False
        self._log(Op("write", offset, b"".join(parts)))

    def sync(self) -> None:
        if self.recording and self.before_sync is not None:
            self.before_sync()
        super().sync()
        self._log(Op("sync"))  # logged once it returned: a completed flush point

    def discard(self, offset: int, length: int) -> None:
        super().discard(offset, length)
        if not self.readonly and length > 0:
            self._log(Op("discard", offset, length=length))

    def truncate(self, size: int) -> None:
        super().truncate(size)
        self._log(Op("truncate", length=size))


def read_log(path: Path) -> tuple[list[Op], list[int]]:
    """The ops of a log file and the file position after each (a torn last record dropped)."""
    raw = path.read_bytes()
    ops: list[Op] = []
    ends: list[int] = []
    pos = 0
    while pos + RECORD.size <= len(raw):
        code, offset, length = RECORD.unpack_from(raw, pos)
        kind = KINDS[code]
        end = pos + RECORD.size + (length if kind == "write" else 0)
        if end > len(raw):
            break
        if kind == "write":
            ops.append(Op("write", offset, raw[pos + RECORD.size : end]))
        elif kind == "discard":
            ops.append(Op("discard", offset, length=length))
        else:
            ops.append(Op(kind, length=length))
        ends.append(end)
        pos = end
    return ops, ends

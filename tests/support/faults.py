"""A device that fails on demand: failing reads, writes or syncs, by block or by count.

    dev = FaultyDevice(path)
    dev.fail("write", block=7)                       # every write touching block 7 fails
    dev.fail("sync", count=1)                        # the next sync fails once
    dev.fail("write", count=1, where=SUPERBLOCK_WRITE, torn=24, error=PowerCut)
                                                     # the next superblock write: 24 bytes reach
                                                     # the disk, then the power goes

A failure raises what the real Device raises for that errno (EIO: a DittoError naming the
operation and offset, "Input/output error"; ENOSPC: NoSpace), unless `error` names an exception
to raise instead (a power cut). `torn` lets the first bytes of a failing write reach the disk
first. Faults apply in the order they were added; a spent one (its count used up) is dropped.
Every failure is counted in `dev.failures`, so a test can assert that its fault actually fired.

Inside a real nbdkit (plugin parameter `faults=PATH`, accepted only when the test environment
sets DITTOFS_TEST_FAULTS=1), the faults come from the JSON file PATH, re-read whenever it
changes: a list of {"op", "count", "block", "block_size", "skip", "torn", "errno"}. Writing the
file arms them; each failure is appended to PATH + ".fired" as one line, so the test can see it
fired.
"""

from __future__ import annotations

import errno as errnos
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from fsimpl.device import Device
from fsimpl.errors import DittoError, NoSpace
from fsimpl.layout import SUPERBLOCK_OFFSETS, SUPERBLOCK_SIZE

Where = Callable[[int, int], bool]  # (offset, length) -> does the fault apply


class PowerCut(Exception):
    """The power went: raised by a fault in place of an I/O error."""


def SUPERBLOCK_WRITE(offset: int, length: int) -> bool:  # noqa: N802 - a constant predicate
    return offset in SUPERBLOCK_OFFSETS and length == SUPERBLOCK_SIZE


@dataclass
class Fault:
    op: str  # "read" | "write" | "sync"
    count: int | None  # failures left (None: forever)
    block: int | None = None  # only requests touching this block (of block_size bytes)
    block_size: int = 4096
    skip: int = 0  # matching requests let through before the first failure
    where: Where | None = None
    torn: int | None = None  # a failing write's first bytes that reach the disk anyway
    error: type[BaseException] | None = None
    errno: str = "EIO"  # what the device reports: EIO, or ENOSPC (a full host file system)

    def matches(self, op: str, offset: int, length: int) -> bool:
        if op != self.op:
            return False
        if self.block is not None and op != "sync":
            first, last = (
                offset // self.block_size,
                (offset + max(length, 1) - 1) // self.block_size,
            )
            if not first <= self.block <= last:
                return False
        return self.where is None or self.where(offset, length)


class FaultyDevice(Device):
    def __init__(self, path: str, readonly: bool = False) -> None:
        super().__init__(path, readonly)
        self.faults: list[Fault] = []
        self.failures = 0

    def fail(
        self,
        op: str,
        *,
        count: int | None = 1,
        block: int | None = None,
        block_size: int = 4096,
        skip: int = 0,
        where: Where | None = None,
        torn: int | None = None,
        error: type[BaseException] | None = None,
        errno: str = "EIO",
    ) -> Fault:
        """Fail `op` ("read", "write" or "sync"): the next `count` matching requests (None:
        every one), after letting `skip` through."""
        assert op in ("read", "write", "sync"), op
        assert errno in ("EIO", "ENOSPC"), errno
        fault = Fault(op, count, block, block_size, skip, where, torn, error, errno)
        self.faults.append(fault)
        return fault

    def heal(self) -> None:
        self.faults.clear()

    def _check(self, op: str, offset: int, length: int) -> Fault | None:
        for fault in self.faults:
            if not fault.matches(op, offset, length):
                continue
            if fault.skip:
                fault.skip -= 1
                return None
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
            self.failures += 1
            return fault
        return None

    def _raise(self, fault: Fault, what: str) -> None:
        self._fired(fault, what)
        if fault.op == "read":  # counted as the real device counts its errors
            self.stats.read_errors += 1
        else:
            self.stats.write_errors += 1
        if fault.error is not None:
            raise fault.error(f"injected: {what}")
        if fault.errno == "ENOSPC":
            raise NoSpace(f"{what}: no space left on the device holding the pool (injected)")
        raise DittoError(f"{what}: {os.strerror(errnos.EIO)} (injected)")

    def _fired(self, fault: Fault, what: str) -> None:
        """Hook for the file-armed variant."""

    def pread_into(self, buf: bytearray | memoryview, offset: int) -> None:
        fault = self._check("read", offset, len(buf))
        if fault:
            self._raise(fault, f"read of {self.path} at offset {offset}")
        super().pread_into(buf, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        fault = self._check("write", offset, len(data))
        if fault:
            if fault.torn:
                super().pwrite(bytes(data)[: fault.torn], offset)
            self._raise(fault, f"write to {self.path} at offset {offset}")
        super().pwrite(data, offset)

    def pwritev(self, parts: list[memoryview], offset: int) -> None:
        fault = self._check("write", offset, sum(len(p) for p in parts))
        if fault:
            if fault.torn:
                super().pwrite(b"".join(parts)[: fault.torn], offset)
            self._raise(fault, f"write to {self.path} at offset {offset}")
        super().pwritev(parts, offset)

    def sync(self) -> None:
        fault = self._check("sync", 0, 0)
        if fault:
            self._raise(fault, f"fsync of {self.path}")
        super().sync()


class FileArmedFaultyDevice(FaultyDevice):
    """A FaultyDevice whose faults come from a JSON file (see the module docstring): what the
    nbdkit plugin's test-only `faults=PATH` parameter opens disks with."""

    spec_path = ""  # set by the plugin before the pool is opened

    def __init__(self, path: str, readonly: bool = False) -> None:
        super().__init__(path, readonly)
        self._seen: tuple[int, int] | None = None

    def _check(self, op: str, offset: int, length: int) -> Fault | None:
        self._reload()
        return super()._check(op, offset, length)

    def _reload(self) -> None:
        try:
            st = os.stat(self.spec_path)
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return
        self._seen = stamp
        with open(self.spec_path) as f:
            specs = json.load(f)
        self.faults = [
            Fault(
                s["op"],
                s.get("count", 1),
                s.get("block"),
                s.get("block_size", 4096),
                s.get("skip", 0),
                torn=s.get("torn"),
                errno=s.get("errno", "EIO"),
            )
            for s in specs
        ]

    def _fired(self, fault: Fault, what: str) -> None:
        with open(self.spec_path + ".fired", "a") as f:
            f.write(f"{fault.op} {fault.errno}: {what}\n")

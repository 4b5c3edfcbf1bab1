"""A device that fails on demand: failing reads, writes or syncs, by block or by count.

    dev = FaultyDevice(path)
    dev.fail("write", block=7)                       # every write touching block 7 fails
    dev.fail("sync", count=1)                        # the next sync fails once
    dev.fail("write", count=1, where=SUPERBLOCK_WRITE, torn=24, error=PowerCut)
                                                     # the next superblock write: 24 bytes reach
                                                     # the disk, then the power goes

A failure raises what the real Device raises for an I/O error (a DittoError naming the operation
and offset, "Input/output error"), unless `error` names an exception to raise instead (a power
cut). `torn` lets the first bytes of a failing write reach the disk first. Faults apply in the
order they were added; a spent one (its count used up) is dropped. Every failure is counted in
`dev.failures`, so a test can assert that its fault actually fired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fsimpl.device import Device
from fsimpl.errors import DittoError
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
    ) -> Fault:
        """Fail `op` ("read", "write" or "sync"): the next `count` matching requests (None:
        every one), after letting `skip` through."""
        assert op in ("read", "write", "sync"), op
        fault = Fault(op, count, block, block_size, skip, where, torn, error)
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
        if fault.error is not None:
            raise fault.error(f"injected: {what}")
        raise DittoError(f"{what}: Input/output error (injected)")

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

"""The device: the one object through which every byte of a pool is read or written.

A device is an image file or a block device. It probes the size, reads (short reads past the end
of an image file are zeros: a sparse file that has not grown there yet), writes, syncs, gives
freed ranges back to the host (a punched hole in a file, a discard on a device) and takes the
exclusive lock. It counts its I/O, so tests can show what an operation costs without timing it,
and tests may wrap it (fault injection, power-cut recording) because nothing else touches the fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from .errors import DittoError, NoSpace, PoolBusy

_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKROGET = 0x125E
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


@dataclass
class IOStats:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    syncs: int = 0
    discards: int = 0
    # errors since open, as zpool status counts them: the device failed a read or a write (or
    # sync), or what it returned failed its checksum (counted by whoever verified it)
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0

    def snapshot(self) -> IOStats:
        return IOStats(**self.__dict__)

    def since(self, before: IOStats) -> IOStats:
        return IOStats(**{k: v - getattr(before, k) for k, v in self.__dict__.items()})


def _os_error(e: OSError, what: str) -> DittoError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: no space left on the device holding the pool")
    return DittoError(f"{what}: {e.strerror}")


class Device:
    """An open image file or block device."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except IsADirectoryError:
            raise DittoError(f"{path} is a directory, not a disk or image file") from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if not (self.is_block_device or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise DittoError(f"{path} is neither a regular file nor a block device")
        # A read-only block device opens read-write and fails only at the first write; ask it.
        self.read_only_device = self.is_block_device and _read_only(self.fd)
        self.stats = IOStats()
        self._locked = False

    @classmethod
    def create_image(cls, path: str) -> Device:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return cls(path)

    # --- size ---------------------------------------------------------------------------------

    def size(self) -> int:
        if self.is_block_device:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("<Q", buf)[0])
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        """Set an image file's length (the pool's capacity); no-op on a block device."""
        if not self.is_block_device:
            try:
                os.ftruncate(self.fd, size)
            except OSError as e:
                self.stats.write_errors += 1
                raise _os_error(e, f"resize of {self.path}") from e

    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the opened node: what the lock is keyed on."""
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    # --- I/O ----------------------------------------------------------------------------------

    def pread_into(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf)
        want = len(view)
        try:
            got = os.preadv(self.fd, [view], offset)  # the common case: all of it at once
        except OSError:
            got = 0  # the loop below retries and reports it
        if got == want:
            self.stats.reads += 1
            self.stats.bytes_read += want
            return
        while got < want:
            try:
                n = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as e:
                self.stats.read_errors += 1
                raise DittoError(
                    f"read of {self.path} at offset {offset + got} failed: {e.strerror}"
                ) from e
            if n == 0:  # past the end of an image file: never written, reads as zeros
                if self.is_block_device:
                    self.stats.read_errors += 1
                    raise DittoError(
                        f"short read from {self.path} at offset {offset + got}: "
                        "the device is smaller than the pool"
                    )
                view[got:] = bytes(want - got)
                break
            got += n
        self.stats.reads += 1
        self.stats.bytes_read += want

    def pread(self, length: int, offset: int) -> bytearray:
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return buf

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as e:
            self.stats.write_errors += 1
            raise _os_error(e, f"write to {self.path} at offset {offset}") from e
        self.stats.writes += 1
        self.stats.bytes_written += len(view)

    def pwritev(self, parts: list[memoryview], offset: int) -> None:
        """Write several buffers back to back, as one system call where the kernel allows."""
        total = sum(len(p) for p in parts)
        try:
            done = os.pwritev(self.fd, parts, offset)
        except OSError as e:
            self.stats.write_errors += 1
            raise _os_error(e, f"write to {self.path} at offset {offset}") from e
        if done < total:  # short write: finish the rest piece by piece
            self.pwrite(b"".join(parts)[done:], offset + done)
            self.stats.writes -= 1
        self.stats.writes += 1
        self.stats.bytes_written += total

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.stats.write_errors += 1
            raise _os_error(e, f"fsync of {self.path}") from e
        self.stats.syncs += 1

    def discard(self, offset: int, length: int) -> None:
        """Give a freed range back to the host. Best effort: the data there is garbage anyway."""
        if self.readonly or length <= 0:
            return
        self.stats.discards += 1
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("<QQ", offset, length))
            except OSError:
                pass  # devices without discard simply keep the blocks
            return
        _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def allocated_bytes(self) -> int:
        """Bytes the host really stores for an image file (st_blocks); device size otherwise."""
        if self.is_block_device:
            return self.size()
        return os.fstat(self.fd).st_blocks * 512

    # --- exclusive lock -----------------------------------------------------------------------

    def lock(self) -> None:
        """Take the pool's exclusive lock, or raise PoolBusy naming the holder's PID."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(*self.identity())
            who = f"process {holder}" if holder else "another process"
            raise PoolBusy(
                f"{self.path} is in use by {who}; stop that server (or use "
                "'snapctl -d DISK ...', which talks to it) instead of opening the pool twice"
            ) from None
        self._locked = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor also drops the flock
            self.fd = -1


def _read_only(fd: int) -> bool:
    try:
        buf = fcntl.ioctl(fd, _BLKROGET, b"\0" * 4)
    except OSError:
        return False
    return bool(struct.unpack("<i", buf)[0])


def lock_holder(dev: int, ino: int) -> int:
    """PID of the process holding a flock on (dev, ino), from /proc/locks; 0 if unknown."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK  ADVISORY  WRITE 3036 fe:00:2146449 0 EOF" (blocked waiters have "->")
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    return int(parts[4])
    except OSError:
        pass
    return 0

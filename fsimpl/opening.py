"""Opening and formatting a pool: the one place a disk becomes a `Pool`, or a `Pool` is made.

Both take the disk's exclusive lock first (two servers never open one disk), translate the
operating system's errors into engine errors that say what to do, and leave nothing behind on
failure: a device they opened is closed, an image file they created is removed.
"""

from __future__ import annotations

import logging
import os

from .device import Device
from .errors import (
    CorruptMetadata,
    DittoError,
    InvalidArgument,
    NotFound,
    PoolBusy,
    ReadOnlyDisk,
    Refused,
)
from .layout import DEFAULT_METADATA_COPIES, SUPERBLOCK_OFFSETS, check_block_size
from .probe import detect_signature
from .rewind import generations, newest_usable
from .rewind import rewind as rewind_pool
from .rundir import pid_alive
from .txn import Pool, commit_time, read_superblock, read_superblocks, refuse_if_in_use

log = logging.getLogger("dittofs")

MAX_EXPORT_SIZE = (1 << 63) - 1  # NBD sizes are signed 64-bit


def open_pool(
    path: str,
    *,
    create_size: int | None,
    block_size: int,
    cache_bytes: int,
    checksums: bool,
    serve: bool = False,
    metadata_copies: int = DEFAULT_METADATA_COPIES,
    rewind: int | None = None,
) -> tuple[Device, Pool]:
    """The pool on path, exclusively; with create_size and a missing path, a new image file.
    serve: the caller will write (serve it, claim it): a read-only device is refused now, with
    one clear line, rather than at its first commit. rewind: open it at that generation of
    its history, committed as the newest (rewind.py)."""
    if create_size is not None and not os.path.exists(path):
        check_size(create_size)
        _check_block_size(block_size, f"block-size={block_size}: ")
        check_copies(metadata_copies, "metadata-copies=")
        device = _device(path, create=True)
        try:
            device.lock()
            return device, Pool.format(
                device, block_size, create_size, True, cache_bytes, checksums, metadata_copies
            )
        except BaseException:
            device.close()
            os.unlink(path)
            raise
    device = _device(path, create=False)
    try:
        lock(device)
        if serve and device.read_only_device:
            raise read_only_disk(path)
        if rewind is not None:
            refuse_if_in_use(read_superblocks(device, strict=False)[0], path, "stop it first")
            pool, report = rewind_pool(device, rewind)
            log.warning("%s: rewind=%d: %s", path, rewind, report["summary"])
            return device, pool
        pool = _open_newest(device, cache_bytes)
        refuse_if_in_use(pool.sb, path, "stop it first")
        pool.restore_second_copy()
        for slot, problem in pool.superblock_problems:
            log.warning(
                "%s: superblock slot %d (byte %d, type superblock) is unusable: %s; the "
                "other copies serve; run 'snapctl check' (--repair rewrites it)",
                path,
                slot,
                SUPERBLOCK_OFFSETS[slot],
                problem,
            )
        return device, pool
    except BaseException:
        device.close()
        raise


def _open_newest(device: Device, cache_bytes: int) -> Pool:
    """Pool.open; when the newest state cannot be read, the refusal names the newest
    generation that can (the way out: a rewind)."""
    try:
        return Pool.open(device, cache_bytes)
    except CorruptMetadata as e:
        if "rewind" in str(e):
            raise
        usable = newest_usable(device)
        path = device.path
        if usable is None or usable.status == "newest":
            raise
        raise CorruptMetadata(
            f"{e}. The newest state cannot be opened; the newest usable generation is "
            f"{usable.generation} (committed {commit_time(usable.commit_ns)}): 'snapctl -d {path} "
            f"rewind --list' shows the choices, 'snapctl -d {path} rewind {usable.generation} "
            "--yes' opens the pool there (what was committed after it is discarded)",
            e.address,
            e.block_type,
        ) from None


def rewind_list(path: str) -> list[dict[str, object]]:
    """`snapctl rewind --list`: the generations the pool on path can be opened at."""
    device = _device(path, create=False)
    try:
        lock(device)
        refuse_if_in_use(read_superblocks(device, strict=False)[0], path, "stop it first")
        return [g.json() for g in generations(device)]
    finally:
        device.close()


def rewind_disk(path: str, generation: int) -> dict[str, object]:
    """`snapctl rewind GEN --yes`: open the pool on path at GEN, committed as its newest."""
    device = _device(path, create=False)
    try:
        lock(device)
        if device.read_only_device:
            raise read_only_disk(path)
        refuse_if_in_use(read_superblocks(device, strict=False)[0], path, "stop it first")
        return rewind_pool(device, generation)[1]
    finally:
        device.close()


def format_disk(
    path: str,
    size: int | None,
    block_size: int,
    force: bool,
    checksums: bool,
    metadata_copies: int = DEFAULT_METADATA_COPIES,
) -> dict[str, object]:
    """Make a pool on path: a new image file (size required), an existing file, or a block
    device (live defaults to the device's size; thin either way). Refuses a disk that holds
    a file system, a partition table or a pool unless force."""
    if size is not None:
        check_size(size)
    _check_block_size(block_size, "")
    check_copies(metadata_copies, "--metadata-copies ")
    created = not os.path.exists(path)
    if created and size is None:
        raise InvalidArgument(f"{path} does not exist: give --size to create an image file there")
    device = _device(path, create=created)
    try:
        lock(device)
        found = None if created else detect_signature(device)
        if found and not force:
            raise Refused(
                f"{path} holds {found}; formatting would destroy it. Add --force if "
                "that is what you want"
            )
        if size is None:
            size = device.size()
            if size <= 0:
                raise InvalidArgument(f"{path} is empty: give --size for the live volume")
        pool = Pool.format(
            device,
            block_size,
            size,
            not device.is_block_device,
            checksums=checksums,
            metadata_copies=metadata_copies,
        )
        return {
            "disk": path,
            "block_size": block_size,
            "live_size": size,
            "capacity_bytes": pool.allocator.capacity * block_size,
            "growable": pool.sb.growable,
            "checksums": checksums,
            "metadata_copies": metadata_copies,
            "pool_guid": pool.sb.pool_guid.hex(),
        }
    except BaseException:
        device.close()
        if created:
            os.unlink(path)
        raise
    finally:
        device.close()


def read_only_disk(path: str) -> ReadOnlyDisk:
    return ReadOnlyDisk(
        f"{path} is a read-only device: dittofs writes to a pool it serves or changes; make it "
        "writable (blockdev --setrw, or losetup without -r), or only read it with "
        f"'snapctl -d {path} info', 'list' or 'check'"
    )


def _device(path: str, create: bool) -> Device:
    """Open (or create) the disk, with the operating system's errors said as engine errors."""
    try:
        return Device.create_image(path) if create else Device(path)
    except FileNotFoundError:
        if create:
            raise NotFound(f"cannot create {path}: its directory does not exist") from None
        raise NotFound(
            f"{path} does not exist; give size=SIZE to create an image file there"
        ) from None
    except OSError as e:
        verb = "create" if create else "open"
        raise DittoError(f"cannot {verb} {path}: {e.strerror}") from None


def _check_block_size(block_size: int, prefix: str) -> None:
    try:
        check_block_size(block_size)
    except ValueError as e:
        raise InvalidArgument(f"{prefix}{e}") from None


def check_copies(copies: int, prefix: str) -> None:
    if copies not in (1, 2):
        raise InvalidArgument(f"{prefix}{copies}: a pool keeps 1 or 2 copies of its metadata")


def check_size(size: int) -> None:
    if size <= 0:
        raise InvalidArgument(f"size {size}: the live volume needs a size > 0")
    if size > MAX_EXPORT_SIZE:
        raise InvalidArgument(
            f"size {size} is larger than NBD can export ({MAX_EXPORT_SIZE} bytes)"
        )


def lock(device: Device) -> None:
    """Take the disk's lock; when it is held, name the holder from the pool's in-use record
    (the lock itself may carry the PID of a parent that forked the server and exited)."""
    try:
        device.lock()
    except PoolBusy as e:
        try:
            pid = read_superblock(device).inuse_pid
        except DittoError:
            raise e from None
        if pid and pid_alive(pid):
            raise PoolBusy(
                f"{device.path} is in use by process {pid}; stop that server (or use "
                "'snapctl -d DISK ...', which talks to it) instead of opening the pool twice"
            ) from None
        raise

"""Power-cut simulation: rebuild the disk as a power cut leaves it, from a record of its I/O.

The record is support.iolog's: a `RecordingDevice` logs, in order, each write (pwrite and
pwritev, as offset + bytes), sync, discard and truncate it performed. Each logged sync is a
*flush point*: it completed, so everything issued before it is durable.

`Replayer` rebuilds images from the log, starting from the image as it was when recording
began. A `CrashPlan` names flush point k (k completed syncs: every operation before the k-th
sync is applied) and then some of the operations issued after that sync and before the next
(the *epoch* k): a prefix, a random subset, a reordered subset, and torn writes (a write cut at
a 512- or 4096-byte boundary, or only some of its sectors; superblock writes included, and
those also at 64-byte boundaries, since the superblock record fits in its first sector).

Discards (punched holes) are modelled both ways: `discard_zeroes=True` makes the range read
zeros, False leaves the old data in place (a device that ignores discard). The engine discards
only blocks freed by a commit that is already durable, so either must be fine.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from support.iolog import Op

from fsimpl.errors import DittoError
from fsimpl.layout import (
    SUPERBLOCK_OFFSETS,
    SUPERBLOCK_SIZE,
    superblock_slots,
    unpack_superblock,
)

SECTOR = 512
PAGE = 4096
SUPERBLOCK_TEAR = 64  # superblock writes are also torn inside a sector

# A write torn into pieces: the (start, end) ranges of its bytes, relative to its offset, that
# reached the disk. None: the whole write did.
Ranges = list[tuple[int, int]] | None


# --- crash plans ---------------------------------------------------------------------------------


@dataclass
class CrashPlan:
    """Flush point k, plus the epoch-k operations that reached the disk, in the order applied."""

    k: int
    kept: list[tuple[int, Ranges]] = field(default_factory=list)  # (op index, torn ranges)
    discard_zeroes: bool = True
    kind: str = "clean"  # clean | prefix | subset | reorder | torn
    tear_unit: int = 0  # 512 or 4096 (64 for a superblock) when a write is torn

    @property
    def torn(self) -> bool:
        return any(r is not None for _, r in self.kept)

    @property
    def reordered(self) -> bool:
        idx = [i for i, _ in self.kept]
        return idx != sorted(idx)

    def describe(self, ops: list[Op] | None = None) -> str:
        parts = []
        for i, ranges in self.kept:
            what = f"#{i}" + (f" {ops[i]!r}" if ops else "")
            if ranges is not None:
                what += " torn, kept bytes " + ",".join(f"[{a},{b})" for a, b in ranges)
            parts.append(what)
        kept = "; ".join(parts) if parts else "none"
        return (
            f"flush point {self.k} ({self.kind}, discard "
            f"{'zeroes' if self.discard_zeroes else 'keeps data'}), epoch ops kept in order "
            f"applied: {kept}"
        )


def _apply(img: bytearray, op: Op, ranges: Ranges, discard_zeroes: bool) -> None:
    if op.kind == "write":
        end = op.offset + len(op.data)
        if end > len(img):
            img.extend(bytes(end - len(img)))
        if ranges is None:
            img[op.offset : end] = op.data
        else:
            for a, b in ranges:
                img[op.offset + a : op.offset + b] = op.data[a:b]
    elif op.kind == "discard":
        if discard_zeroes:
            end = min(op.offset + op.length, len(img))
            if end > op.offset:
                img[op.offset : end] = bytes(end - op.offset)
    elif op.kind == "truncate":
        if op.length < len(img):
            del img[op.length :]
        else:
            img.extend(bytes(op.length - len(img)))


def pieces(op: Op, unit: int) -> list[tuple[int, int]]:
    """A write's bytes split at absolute multiples of unit, as ranges relative to its offset."""
    out = []
    start = op.offset
    end = op.offset + len(op.data)
    while start < end:
        stop = min((start // unit + 1) * unit, end)
        out.append((start - op.offset, stop - op.offset))
        start = stop
    return out


def tear(op: Op, unit: int, rng: random.Random) -> Ranges:
    """A torn version of a write: a prefix cut at a unit boundary (mostly), or a random strict
    subset of its unit-sized pieces. None when the write fits in one piece (it cannot tear)."""
    ps = pieces(op, unit)
    if len(ps) < 2:
        return None
    if rng.random() < 0.7:
        cut = rng.randrange(1, len(ps))  # keep pieces [0, cut)
        return [(ps[0][0], ps[cut - 1][1])]
    keep = [p for p in ps if rng.random() < 0.5]
    if not keep or len(keep) == len(ps):
        keep = ps[1:] if rng.random() < 0.5 else ps[:-1]
    return keep


class Replayer:
    """Rebuilds crash images from a recording (base image + operation log)."""

    def __init__(self, base: bytes, ops: list[Op]) -> None:
        self.base = base
        self.ops = ops
        self.sync_at = [i for i, op in enumerate(ops) if op.kind == "sync"]
        self._cache: dict[bool, tuple[int, bytearray]] = {}

    @property
    def flush_points(self) -> int:
        """Flush points are 0 (no sync completed) .. len(sync_at)."""
        return len(self.sync_at) + 1

    def durable_end(self, k: int) -> int:
        """Index of the first operation not made durable by flush point k."""
        return self.sync_at[k - 1] if k else 0

    def epoch(self, k: int) -> range:
        """Operations issued after the k-th sync and before the next (or the end)."""
        start = self.sync_at[k - 1] + 1 if k else 0
        end = self.sync_at[k] if k < len(self.sync_at) else len(self.ops)
        return range(start, end)

    def durable(self, k: int, discard_zeroes: bool = True) -> bytearray:
        """A fresh copy of the image at flush point k. Cheap when k only grows."""
        cached = self._cache.get(discard_zeroes)
        if cached is None or cached[0] > k:
            at, img = 0, bytearray(self.base)
        else:
            at, img = cached
        for i in range(self.durable_end(at), self.durable_end(k)):
            _apply(img, self.ops[i], None, discard_zeroes)
        self._cache[discard_zeroes] = (k, img)
        return bytearray(img)

    def build(self, plan: CrashPlan) -> bytearray:
        img = self.durable(plan.k, plan.discard_zeroes)
        for i, ranges in plan.kept:
            _apply(img, self.ops[i], ranges, plan.discard_zeroes)
        return img

    # --- sampling -----------------------------------------------------------------------------

    def sample(
        self, k: int, rng: random.Random, extra: int = 3, returns: set[int] | None = None
    ) -> list[CrashPlan]:
        """Crash plans at flush point k: the clean cut, then prefixes, subsets, reorderings and
        torn writes of epoch k (about `extra` of them, more when it holds a superblock write).

        `returns` holds the op indices at which a flush or FUA request had returned (the first
        op issued after it): for each inside the epoch, a plan loses everything before it and
        keeps what follows, so a request that returned without a sync is caught."""
        dz = rng.random() < 0.5
        plans = [CrashPlan(k, [], dz, "clean")]
        epoch = [i for i in self.epoch(k) if self.ops[i].kind != "sync"]
        if not epoch:
            return plans
        n = len(epoch)
        whole = [(i, None) for i in epoch]
        sbs = [i for i in epoch if self.ops[i].is_superblock]
        if sbs:  # the commit point itself: kept, lost, torn
            sb = sbs[0]
            others = [(i, None) for i in epoch if i != sb]
            plans.append(CrashPlan(k, whole, not dz, "prefix" if n > 1 else "subset"))
            if others:
                plans.append(CrashPlan(k, others, dz, "subset"))
            # At 512 bytes a tear keeps or loses the first sector, which holds the whole
            # superblock record; at 64 bytes (a device that does not write a sector atomically,
            # what the two slots are for) the record itself is cut and must fail its checksum.
            for unit in (SECTOR, SECTOR, SUPERBLOCK_TEAR):
                if unit == SUPERBLOCK_TEAR:  # cut inside the first sector, either side kept
                    cut = SUPERBLOCK_TEAR * rng.randrange(1, SECTOR // SUPERBLOCK_TEAR)
                    r = [(0, cut)] if rng.random() < 0.5 else [(cut, SUPERBLOCK_SIZE)]
                else:
                    r = tear(self.ops[sb], unit, rng)
                kept = [(i, r if i == sb else None) for i in epoch]
                plans.append(CrashPlan(k, kept, rng.random() < 0.5, "torn", unit))
        for p in sorted(returns or ()):
            if epoch[0] < p <= epoch[-1]:
                kept = [(i, None) for i in epoch if i >= p]
                plans.append(CrashPlan(k, kept, rng.random() < 0.5, "subset"))
        for _ in range(extra):
            dz = rng.random() < 0.5
            roll = rng.random()
            if roll < 0.3 and n > 1:
                j = rng.randrange(1, n)
                plans.append(CrashPlan(k, whole[:j], dz, "prefix"))
            elif roll < 0.55:
                kept = [(i, None) for i in epoch if rng.random() < 0.5]
                if kept and len(kept) < n:
                    plans.append(CrashPlan(k, kept, dz, "subset"))
            elif roll < 0.7 and n > 1:
                kept = [(i, None) for i in epoch if rng.random() < 0.7]
                if len(kept) >= 2:
                    rng.shuffle(kept)
                    plans.append(CrashPlan(k, kept, dz, "reorder"))
            else:
                writes = [i for i in epoch if self.ops[i].kind == "write"]
                unit = rng.choice((SECTOR, PAGE))
                tearable = [i for i in writes if len(pieces(self.ops[i], unit)) > 1]
                if not tearable:
                    unit = SECTOR
                    tearable = [i for i in writes if len(pieces(self.ops[i], unit)) > 1]
                if not tearable:
                    continue
                w = rng.choice(tearable)
                if rng.random() < 0.5:  # everything before w, w torn, nothing after
                    kept = [(i, None) for i in epoch if i < w]
                else:  # a random subset around it
                    kept = [(i, None) for i in epoch if i != w and rng.random() < 0.5]
                kept.append((w, tear(self.ops[w], unit, rng)))
                kept.sort()
                plans.append(CrashPlan(k, kept, dz, "torn", unit))
        return plans


def suspect_slots(rp: Replayer, plan: CrashPlan, img: bytes | bytearray) -> set[int]:
    """Superblock slots a crash may leave torn or stale (a repairable defect, nothing else):
    those whose last write issued before the crash was not durable and did not land whole, and
    the two slots of the newest generation on the image (its second copy goes out after the
    sync that made the first durable, so the crash may come before it)."""
    ops = rp.ops
    durable_end = rp.durable_end(plan.k)
    issued = max([i + 1 for i, _ in plan.kept] + [rp.epoch(plan.k).stop])
    last_write: dict[int, int] = {}
    for i in range(issued):
        if ops[i].is_superblock:
            last_write[SUPERBLOCK_OFFSETS.index(ops[i].offset)] = i
    out = set()
    for slot, i in last_write.items():
        op = ops[i]
        if i >= durable_end and img[op.offset : op.offset + SUPERBLOCK_SIZE] != op.data:
            out.add(slot)
    generations = []
    for off in SUPERBLOCK_OFFSETS:
        try:
            generations.append(unpack_superblock(bytes(img[off : off + 4096]), "image").generation)
        except DittoError:
            pass
    if generations:
        out.update(superblock_slots(max(generations)))
    return out


def write_image(img: bytes | bytearray, path: str) -> None:
    """Write a rebuilt image to path (replacing what was there)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(img)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)

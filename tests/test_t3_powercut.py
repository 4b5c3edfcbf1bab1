"""Power-cut replay: every flush point of a random workload, and torn/reordered/partial epochs
after it, rebuilt as a disk image and opened, checked and read back against the model.

A workload (writes partial and whole, trims, zeroes, flushes, FUA, snapshot create / delete /
rollback) runs in-process on a tiny pool over a `RecordingDevice`. The harness tags every
recorded operation with the model state it was issued in, so each superblock write (a commit)
is tied to the model state it makes durable, and the last sync of each flush/FUA request to
the state that request acknowledged. For each crash image (tests/crashsim.py):

* `Pool.open` succeeds at exactly the expected generation: the last superblock made durable by
  a completed sync, or the next one when the cut fell after its superblock write reached the
  disk intact (a torn or lost superblock write must leave the previous generation);
* `check()` is clean (no fatal defects and no leaks), before and after recovery work;
* the snapshots are exactly those of that durable state and read exactly their model data
  (both before a pending delete or rollback resumes and after it finished);
* live holds, in every byte, a value it held at some time between the durable state (the later
  of the durable commit and the last completed flush/FUA) and the crash: every write
  acknowledged before the last completed flush reads back unless a later write changed it.

A failure names the seed, the flush point and which epoch writes were kept or torn; rerun one
seed with DITTOFS_SEED=N. DITTOFS_POWERCUT_OPS scales the workload length.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crashsim import CrashPlan, Replayer, suspect_slots, write_image
from model import Model
from support.iolog import Op, RecordingDevice

from fsimpl.checker import CheckReport, check
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import CorruptMetadata, NotAPool
from fsimpl.layout import (
    OP_NONE,
    SECTOR,
    SUPERBLOCK_OFFSETS,
    SUPERBLOCK_SIZE,
    Superblock,
    unpack_superblock,
)
from fsimpl.txn import Pool

BS = 4096
SEEDS = [int(os.environ["DITTOFS_SEED"])] if "DITTOFS_SEED" in os.environ else [11, 12, 13, 14, 15]
OPS = int(os.environ.get("DITTOFS_POWERCUT_OPS", "110"))
MAX_SNAPS = 4
TOTALS: Counter[str] = Counter()

_ZERO_TO_ONE = bytes([1] + [0] * 255)  # bytes.translate table: 0 -> 1, anything else -> 0


def _equal_mask(a: bytes, b: bytes) -> int:
    """An integer whose byte i is 1 where a[i] == b[i], 0 elsewhere (C speed, no numpy)."""
    x = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return int.from_bytes(x.translate(_ZERO_TO_ONE), "little")


# --- the recorded workload -------------------------------------------------------------------


@dataclass
class Recording:
    """A workload run over a RecordingDevice, with the model state behind every operation."""

    seed: int
    cow: str
    size: int
    growable: bool
    ops: list[Op] = field(default_factory=list)
    base: bytes = b""
    log: list[str] = field(default_factory=list)  # one line per harness call
    muts: list[tuple[int, bytes]] = field(default_factory=list)  # state i -> i+1: live[a:] = b
    orders: list[tuple[str, ...]] = field(default_factory=lambda: [()])  # snapshots per state
    lives: dict[int, bytes] = field(default_factory=dict)  # live per state (where needed)
    snaps: dict[str, bytes] = field(default_factory=dict)  # every snapshot ever taken
    flush_state: dict[int, int] = field(default_factory=dict)  # sync op index -> acked state
    flush_end: dict[int, int] = field(default_factory=dict)  # op index after the request -> same

    def live_at(self, state: int) -> bytes:
        if state in self.lives:
            return self.lives[state]
        start = max(s for s in self.lives if s <= state)
        live = bytearray(self.lives[start])
        for a, b in self.muts[start:state]:
            live[a : a + len(b)] = b
        return bytes(live)


class Harness:
    """Drives the engine and the model together, tagging the device's log with model states."""

    def __init__(
        self, path: Path, seed: int, cow: str, size: int, growable: bool, checksums: bool = False
    ) -> None:
        # data checksums on 16 KiB blocks: 4 KiB writes are partial, deferred with checksums
        self.bs = bs = 16384 if checksums else BS
        self.grain = 4096 if checksums else SECTOR  # what a deferred partial write keeps whole
        self.rec = Recording(seed, cow, size, growable)
        self.rng = random.Random(seed)
        if growable:
            Device.create_image(str(path)).close()
        else:  # a fixed-size "disk": room for live and MAX_SNAPS full snapshots, plus metadata
            with open(path, "wb") as f:
                f.truncate((MAX_SNAPS + 2) * size + 64 * bs)
        self.dev = RecordingDevice(str(path))
        self.dev.lock()
        pool = Pool.format(self.dev, bs, size, growable, cache_bytes=8 << 20, checksums=checksums)
        self.engine = Engine(self.dev, pool, cow, 8 << 20)
        self.model = Model(size, bs)
        self.state = 0
        self.recent: list[tuple[int, int]] = []  # spans written lately
        self.rec.lives[0] = bytes(self.model.live)
        self.dev.start_recording()
        self.ex = self.engine.open_export("live", False)

    # --- state bookkeeping ----------------------------------------------------------------

    def _new_state(self, a: int, b: bytes) -> None:
        self.rec.muts.append((a, bytes(b)))
        self.rec.orders.append(tuple(self.model.order))
        self.state += 1

    def _begin(self, line: str) -> int:
        self.dev.call += 1
        self.dev.tag = self.state
        self.rec.log.append(f"[call {self.dev.call}, state {self.state}] {line}")
        return len(self.dev.ops)

    def _end(self, first: int, flush: bool, fua_post: int | None = None) -> None:
        """After a call: keep live for every state a commit or sync was tagged with; for a
        flush or FUA request, its last sync acknowledges the state after it (and its final
        commit, when no data write followed it, made that state durable)."""
        ops = self.dev.ops
        mine = range(first, len(ops))
        if fua_post is not None:
            sbs = [i for i in mine if ops[i].is_superblock]
            if sbs and not any(ops[i].kind == "write" for i in range(sbs[-1] + 1, len(ops))):
                ops[sbs[-1]].tag = fua_post
        for i in mine:
            if ops[i].kind == "sync" or ops[i].is_superblock:
                self.rec.lives.setdefault(ops[i].tag, bytes(self.rec.live_at(ops[i].tag)))
        if flush:
            syncs = [i for i in mine if ops[i].kind == "sync"]
            if syncs:  # acknowledged once its last sync completed...
                self.rec.flush_state[syncs[-1]] = self.state
            # ...and certainly by any crash after the request returned
            self.rec.flush_end[len(ops)] = self.state

    # --- operations -------------------------------------------------------------------------

    def _span(self, max_blocks: int) -> tuple[int, int]:
        size, rng = self.model.size, self.rng
        if self.recent and rng.random() < 0.35:  # again where live wrote lately: in place
            off, n = rng.choice(self.recent)
            if rng.random() < 0.5:
                a = rng.randrange(off, off + n)
                off, n = a, rng.randrange(1, off + n - a + 1)
            return off, n
        bs, grain = self.bs, self.grain
        if rng.random() < 0.4:  # whole blocks
            first = rng.randrange(0, size // bs)
            n = rng.randrange(1, min(max_blocks, size // bs - first) + 1)
            return first * bs, n * bs
        if rng.random() < 0.4:  # whole sectors (units): partial first writes defer their merge
            off = rng.randrange(0, size // grain) * grain
            n = rng.randrange(1, min(max_blocks * bs, size - off) // grain + 1) * grain
            return off, n
        off = rng.randrange(0, size - 1)
        return off, rng.randrange(1, min(max_blocks * bs, size - off) + 1)

    def _data_op(self, kind: str, off: int, n: int, fua: bool) -> None:
        m = self.model
        first = self._begin(f"{kind} {off} {n}{' fua' if fua else ''}")
        if kind == "write":
            self.recent = (self.recent + [(off, n)])[-6:]
            data = self.rng.randbytes(n)
            self.engine.write(self.ex, memoryview(data), off, fua=fua)
        elif kind == "zero":
            self.engine.zero(self.ex, off, n, fua=fua)
        else:
            self.engine.trim(self.ex, off, n, fua=fua)
        # the calls are tagged with the state before the request (a copy-on-write commit inside
        # it precedes the request's data); FUA's own commit is retagged to the state after it
        self.rec.lives.setdefault(self.state, bytes(m.live))
        if kind == "write":
            m.write(off, data)
            self._new_state(off, data)
        elif kind == "zero":
            m.zero(off, n)
            self._new_state(off, bytes(n))
        else:
            m.trim(off, n)
            bs = self.bs
            a, b = -(-off // bs) * bs, (off + n) // bs * bs
            self._new_state(a, bytes(max(0, b - a)))
        if fua:
            self.rec.lives[self.state] = bytes(m.live)
        self._end(first, fua, self.state if fua else None)

    def step(self, i: int) -> None:
        m, rng = self.model, self.rng
        r = rng.random()
        if r < 0.40:
            self._data_op("write", *self._span(3), fua=rng.random() < 0.15)
        elif r < 0.47:
            self._data_op("zero", *self._span(4), fua=rng.random() < 0.1)
        elif r < 0.54:
            self._data_op("trim", *self._span(4), fua=rng.random() < 0.1)
        elif r < 0.66:
            first = self._begin("flush")
            self.engine.flush()
            self._end(first, True)
        elif r < 0.76 and len(m.order) < MAX_SNAPS:
            name = f"s{i}"
            m.create(name)
            self.rec.snaps[name] = m.snaps[name]
            self._new_state(0, b"")
            first = self._begin(f"create {name}")
            self.engine.create_snapshot(name)
            self._end(first, True)
        elif r < 0.85 and m.order:
            name = rng.choice(m.order)
            m.delete(name)
            self._new_state(0, b"")
            first = self._begin(f"delete {name}")
            self.engine.delete_snapshot(name)
            self._end(first, True)
        elif r < 0.91 and m.order:
            name = m.order[-1]
            m.rollback(name)
            self._new_state(0, bytes(m.live))
            first = self._begin(f"rollback {name}")
            close_export(self.engine, self.ex)  # rollback wants no client connected to live
            self.engine.rollback(name)
            self.ex = self.engine.open_export("live", False)  # a new incarnation
            self._end(first, True)
        else:
            self._data_op("write", *self._span(1), fua=False)

    def run(self, n: int) -> Recording:
        for i in range(n):
            self.step(i)
        # the run's own state must match the model before anything is replayed
        buf = read_export(self.engine, "live", self.model.size)
        assert buf == self.model.live, f"seed {self.rec.seed}: live differs before any crash"
        self.rec.ops = self.dev.ops
        self.rec.base = self.dev.base
        self.dev.recording = False
        self.dev.close()
        return self.rec


# --- verification of one crash image ---------------------------------------------------------


class Verifier:
    def __init__(self, rec: Recording, scratch: Path) -> None:
        self.rec = rec
        self.rp = Replayer(rec.base, rec.ops)
        self.path = str(scratch)
        self.seen: set[bytes] = set()
        self.counts: Counter[str] = Counter()
        base_sb = read_superblock_bytes(rec.base)
        # per op index: (generation, state) of the newest superblock written before it
        self.commit_before: list[tuple[int, int]] = []
        cur = (base_sb.generation, 0)
        for op in rec.ops:
            self.commit_before.append(cur)
            if op.is_superblock:
                cur = (unpack_superblock(op.data, "log").generation, op.tag)
        self.commit_before.append(cur)
        # per op index: the state acknowledged by the newest flush whose sync precedes it
        self.acked_before: list[int] = []
        acked = 0
        for i, _op in enumerate(rec.ops):
            self.acked_before.append(acked)
            acked = max(acked, rec.flush_state.get(i, 0))
        self.acked_before.append(acked)

    def expected(self, plan: CrashPlan, img: bytearray) -> tuple[int, int, int, str, set[int]]:
        """(generation, base state, end state, why, torn superblock slots) for the image that
        plan built."""
        rec, rp = self.rec, self.rp
        end = rp.durable_end(plan.k)
        gen, g_state = self.commit_before[end]
        why = f"generation {gen} durable at flush point {plan.k}"
        torn_slots: set[int] = set()
        for i, _ in plan.kept:
            op = rec.ops[i]
            if not op.is_superblock:
                continue
            if img[op.offset : op.offset + SUPERBLOCK_SIZE] == op.data:
                gen, g_state = unpack_superblock(op.data, "log").generation, op.tag
                why = f"superblock #{i} (generation {gen}) reached the disk intact"
            else:  # torn: that slot may fail its checksum (a repairable defect), nothing else
                torn_slots.add(SUPERBLOCK_OFFSETS.index(op.offset))
                why += f"; superblock #{i} torn"
        # sync k-1 completed, so its own flush (if it was one) is acknowledged too; and a
        # request that returned before a kept operation was issued is acknowledged
        acked = self.acked_before[end + 1] if plan.k else 0
        latest_op = max([i for i, _ in plan.kept] + [end])
        torn_slots |= suspect_slots(rp, plan, img)
        acked = max([acked] + [s for p, s in rec.flush_end.items() if p <= latest_op])
        base = max(g_state, acked)
        last = max([rec.ops[i].tag for i, _ in plan.kept] + [rec.ops[end].tag if plan.k else 0])
        top = min(len(rec.muts), max(last + 1, base))
        return gen, base, top, why, torn_slots

    def verify(self, plan: CrashPlan) -> bool:
        """Replay plan, open and check the result. False: an image already verified."""
        img = self.rp.build(plan)
        digest = hashlib.blake2b(img, digest_size=16).digest()
        if digest in self.seen:
            self.counts["duplicate"] += 1
            return False
        self.seen.add(digest)
        gen, base, top, why, torn_slots = self.expected(plan, img)
        write_image(img, self.path)
        try:
            self._verify_image(gen, base, top, why, torn_slots)
        except Exception as e:
            rec = self.rec
            ops = rec.ops
            lo = self.rp.durable_end(plan.k)
            calls = sorted({ops[i].call for i, _ in plan.kept} | ({ops[lo].call} if lo else set()))
            raise AssertionError(
                f"seed {rec.seed} cow={rec.cow} size={rec.size} growable={rec.growable}: "
                f"{type(e).__name__}: {e}\n  crash at {plan.describe(ops)}\n"
                f"  expected: {why}; model states {base}..{top}\n"
                f"  calls around the cut: "
                + " | ".join(rec.log[c - 1] for c in calls if 0 < c <= len(rec.log))
                + "\n  the calls before: "
                + " | ".join(rec.log[max(0, calls[0] - 8) : calls[0] - 1] if calls else [])
            ) from e
        self.counts["states"] += 1
        self.counts[plan.kind] += 1
        if plan.torn:
            self.counts[f"torn@{plan.tear_unit}"] += 1
            if any(self.rec.ops[i].is_superblock for i, r in plan.kept if r is not None):
                self.counts["torn superblock"] += 1
        if plan.reordered:
            self.counts["reordered"] += 1
        if plan.kept:
            self.counts["with epoch writes"] += 1
        return True

    def _verify_image(self, gen: int, base: int, top: int, why: str, torn: set[int]) -> None:
        rec = self.rec
        if check_image(self.path, torn):
            self.counts["torn superblock slot flagged"] += 1
        dev = Device(self.path)
        try:
            pool = Pool.open(dev, cache_bytes=8 << 20)
            assert pool.sb.generation == gen, (
                f"opened generation {pool.sb.generation}, expected {gen} ({why})"
            )
            engine = Engine(dev, pool, rec.cow, 8 << 20)
            want = rec.orders[base]
            got = tuple(s.name for s in engine.list_snapshots())
            assert got == want, f"snapshots {got}, expected {want} (model state {base})"
            self._check_snapshots(engine, want)
            busy = bool(pool.pending_deletes()) or any(
                v.inode.op != OP_NONE for v in pool.volumes.values()
            )
            if busy:  # resume the interrupted delete or rollback, as a restarted server would
                self.counts["recovery resumed"] += 1
                while engine.tick():
                    pass
                engine.flush()
                self._check_snapshots(engine, want)
            self._check_live(engine, base, top)
        finally:
            dev.close()
        if busy:  # recovery committed: a torn slot is rewritten when its generation comes
            check_image(self.path, torn)

    def _check_snapshots(self, engine: Engine, names: tuple[str, ...]) -> None:
        for name in names:
            got = read_export(engine, f"live@{name}", self.rec.size)
            want = self.rec.snaps[name]
            if got != want:
                bad = next(i for i in range(len(want)) if got[i] != want[i])
                raise AssertionError(
                    f"snapshot {name} differs from what it held, first at byte {bad} "
                    f"(block {bad // BS})"
                )

    def _check_live(self, engine: Engine, base: int, top: int) -> None:
        """Every byte of live holds a value it had at some model state in [base, top]."""
        got = read_export(engine, "live", self.rec.size)
        want = self.rec.live_at(base)
        if got == want:
            return
        ok = _equal_mask(got, want)
        for a, b in self.rec.muts[base:top]:
            if b:
                m = _equal_mask(got[a : a + len(b)], b)
                ok |= m << (8 * a)
        full = int.from_bytes(b"\x01" * len(got), "little")
        if ok != full:
            missing = (ok ^ full).to_bytes(len(got), "little")
            bad = missing.index(1)
            raise AssertionError(
                f"live byte {bad} (block {bad // BS}) reads {got[bad]:#x}, a value it never held "
                f"between model state {base} (durable) and {top} (the crash): expected "
                f"{want[bad]:#x} or a later write's; first differing blocks: "
                + str(sorted({i // BS for i in range(len(got)) if missing[i]})[:8])
            )


def read_superblock_bytes(image: bytes) -> Superblock:
    found = []
    for off in SUPERBLOCK_OFFSETS:
        try:
            found.append(unpack_superblock(image[off : off + SUPERBLOCK_SIZE], "base"))
        except (NotAPool, CorruptMetadata):
            pass
    return max(found, key=lambda s: s.generation)


def check_image(path: str, torn_slots: set[int]) -> bool:
    """Run the checker; it must find nothing, except that a superblock slot whose write was torn
    may fail its checksum (non-fatal: the other slot serves). Returns True if that was seen."""
    dev = Device(path, readonly=True)
    try:
        report = check(dev)
    finally:
        dev.close()
    allowed = {f"superblock slot {s}" for s in torn_slots}
    bad = [d for d in report.defects if not (d.kind == "superblock" and d.where in allowed)]
    assert not bad, "checker found: " + describe(report)
    return len(bad) < len(report.defects)


def describe(report: CheckReport) -> str:
    return "; ".join(
        f"[{d.kind}{' FATAL' if d.fatal else ''}] {d.message}" for d in report.defects[:6]
    )


def read_export(engine: Engine, name: str, size: int) -> bytes:
    buf = bytearray(size)
    ex = engine.open_export(name, True)
    try:
        engine.read(ex, memoryview(buf), 0)
    finally:
        close_export(engine, ex)
    return bytes(buf)


def close_export(engine: Engine, ex: object) -> None:
    close = getattr(engine, "close_export", None)  # engines that count connections
    if close is not None:
        close(ex)


# --- the tests -------------------------------------------------------------------------------


def run_powercut(
    tmp_path: Path, seed: int, cow: str, size: int, growable: bool, checksums: bool
) -> Counter[str]:
    t0 = time.monotonic()
    rec = Harness(tmp_path / "pool.img", seed, cow, size, growable, checksums).run(OPS)
    v = Verifier(rec, tmp_path / "crash.img")
    rng = random.Random(seed * 7919 + (cow == "copy"))
    plans: list[CrashPlan] = []
    others: list[CrashPlan] = []
    for k in range(v.rp.flush_points):
        sampled = v.rp.sample(k, rng, returns=set(rec.flush_end))
        plans.append(sampled[0])
        others.extend(sampled[1:])
    # every clean cut first: it is the strictest reading of an image that a full epoch repeats
    for plan in plans + others:
        v.verify(plan)
    c = v.counts
    c["flush points"] = v.rp.flush_points
    c["recorded ops"] = len(rec.ops)
    c["commits"] = sum(1 for op in rec.ops if op.is_superblock)
    dt = time.monotonic() - t0
    print(
        f"\npowercut seed={seed} cow={cow} size={size >> 10}KiB growable={growable} "
        f"checksums={checksums}: "
        f"{summary(c)}; {dt:.1f}s"
    )
    TOTALS.update(c)
    return c


def summary(c: Counter[str]) -> str:
    return (
        f"{c['states']} crash states ({c['clean']} clean, {c['prefix']} prefix, "
        f"{c['subset']} subset, {c['reorder']} reorder, {c['torn']} torn "
        f"[{c['torn@512']} at 512 B, {c['torn@4096']} at 4 KiB, {c['torn@64']} at 64 B; "
        f"{c['torn superblock']} of a superblock, {c['torn superblock slot flagged']} left a "
        f"bad slot]; {c['reordered']} out of order, {c['with epoch writes']} with writes "
        f"after the flush point), {c['duplicate']} duplicate images skipped, "
        f"{c['recovery resumed']} resumed a delete/rollback; {c['flush points']} flush "
        f"points, {c['commits']} commits, {c['recorded ops']} recorded ops"
    )


CONFIGS = [  # (cow, live size, growable image, data checksums)
    ("move", 256 << 10, True, False),
    ("copy", 256 << 10, True, False),
    ("move", 512 << 10, False, False),
    ("copy", 512 << 10, False, False),
    ("move", 1 << 20, True, False),
    ("copy", 1 << 20, True, False),
    ("move", 512 << 10, False, True),
    ("copy", 256 << 10, True, True),
]
MIN_STATES_PER_CASE = 150
# the figure the closing notes quote: all cases of the default seeds, in one run
MIN_TOTAL_STATES = 10_000 if "DITTOFS_SEED" not in os.environ and OPS >= 110 else 0
RUNS: list[str] = []


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("cow", "size", "growable", "checksums"),
    CONFIGS,
    ids=[
        f"{c}-{s >> 10}k-{'grow' if g else 'fixed'}{'-csum' if k else ''}" for c, s, g, k in CONFIGS
    ],
)
def test_powercut_replay(
    tmp_path: Path, seed: int, cow: str, size: int, growable: bool, checksums: bool
) -> None:
    c = run_powercut(tmp_path, seed, cow, size, growable, checksums)
    assert c["states"] >= MIN_STATES_PER_CASE, summary(c)
    assert c["torn"] and c["subset"] and c["reorder"], summary(c)
    RUNS.append(f"{seed}-{cow}-{size}-{growable}-{checksums}")


def test_powercut_totals() -> None:
    """Runs last in this module: every case above ran, and together they replayed at least
    MIN_TOTAL_STATES crash states, every one verified (a loss fails its case)."""
    assert len(RUNS) == len(SEEDS) * len(CONFIGS), (
        f"only {len(RUNS)} of {len(SEEDS) * len(CONFIGS)} replays ran: run the whole module"
    )
    print(f"\npowercut totals: {summary(TOTALS)}")
    assert TOTALS["states"] >= MIN_TOTAL_STATES, summary(TOTALS)

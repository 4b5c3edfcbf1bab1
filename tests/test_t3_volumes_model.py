"""Randomized model test of several volumes, group and subset snapshots, writable snapshots and
clones, in process against the engine (issue 8).

The model is the specification:
* every volume is a bytearray (its live view);
* a snapshot is, per volume it covers, a copy of that volume when it was taken; a writable
  snapshot's copies receive the writes made into VOL@SNAP, and nothing else ever changes them;
* a clone starts as a copy of its origin snapshot's view and is a volume like any other;
* trim makes the whole blocks inside the range read zeros; zero makes the whole range read zeros.

The workload mixes writes, trims and zeroes on every volume and into writable snapshots (through
`engine.open_export("VOL@SNAP", False)`), group snapshots and --volume subsets (some writable),
set writable=on/off, snapshot deletes (a snapshot with clones must be refused, naming them, and
change nothing), clones of read-only snapshots (of writable ones: refused), flatten and promote,
volume create / resize (grow; shrink with force only past unused blocks) / delete (refused with
snapshots or clones unless recursive), rollback of a volume to its newest snapshot (sometimes to
an older one with destroy_newer), flushes, restarts and crashes after a flush. Every few dozen
operations EVERY export (each volume, each VOL@SNAP, each VOL@latest) is compared with the model,
so a write into a writable snapshot that changed any older snapshot, newer snapshot or live is
caught; `diff` between any two views of a volume must name every block that differs; and every
few hundred operations the checker must find the committed state clean. A failure prints the
seed and cow mode; rerun one seed with DITTOFS_SEED=N.

Then the long operations (snapshot delete, volume delete --recursive, flatten, rollback), which
run in steps with the engine lock released in between, on volumes of several map leaves: a
crash after every step (with and without a commit first), and client writes between the steps.
Last, minimal reproductions of the defects these tests found.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fsimpl.checker import check
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import DittoError, InvalidArgument, Refused
from fsimpl.layout import SECTOR

BS = 4096
SEEDS = [int(os.environ["DITTOFS_SEED"])] if "DITTOFS_SEED" in os.environ else [11, 12, 13, 14]
OPS = 2000
CHECK_EVERY = 40
CHECKER_EVERY = 300
MAX_VOLUMES = 7
MAX_SNAPSHOTS = 12


def checker_clean(path: str) -> None:
    dev = Device(path, readonly=True)
    try:
        report = check(dev)
    finally:
        dev.close()
    assert report.clean, "checker found: " + "; ".join(d.message for d in report.defects[:5])


def first_difference(got: bytes, want: bytes) -> str:
    if len(got) != len(want):
        return f"size {len(got)}, model says {len(want)}"
    bad = next(i for i in range(len(want)) if got[i] != want[i])
    return (
        f"first at byte {bad} (block {bad // BS}): {got[bad : bad + 8].hex()} instead of "
        f"{want[bad : bad + 8].hex()}"
    )


# --- the model -------------------------------------------------------------------------------


@dataclass
class MSnap:
    writable: bool
    data: dict[str, bytearray]  # covered volume -> its view (ordered as covered)


@dataclass
class VModel:
    vols: dict[str, bytearray] = field(default_factory=dict)
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)  # clone -> (vol, snap)
    snaps: dict[str, MSnap] = field(default_factory=dict)  # creation order, oldest first

    def exports(self) -> dict[str, bytes | bytearray]:
        """Every export name and what it must read."""
        out: dict[str, bytes | bytearray] = dict(self.vols)
        for name, s in self.snaps.items():
            for v, data in s.data.items():
                out[f"{v}@{name}"] = data
        for v in self.vols:
            latest = self.newest(v)
            if latest is not None:
                out[f"{v}@latest"] = self.snaps[latest].data[v]
        return out

    def covering(self, vol: str) -> list[str]:
        return [n for n, s in self.snaps.items() if vol in s.data]

    def newest(self, vol: str) -> str | None:
        cov = self.covering(vol)
        return cov[-1] if cov else None

    def clones_of_snapshot(self, snap: str) -> list[str]:
        return [c for c, (_, s) in self.origin.items() if s == snap]

    def with_clones(self, vol: str) -> list[str]:
        out = [vol]
        for v in out:
            out.extend(c for c, (o, _) in self.origin.items() if o == v and c not in out)
        return out


def apply_io(buf: bytearray, kind: str, off: int, n: int, data: bytes | None) -> None:
    if kind == "write":
        assert data is not None
        buf[off : off + n] = data
    elif kind == "zero":
        buf[off : off + n] = bytes(n)
    else:  # trim: whole blocks only
        first = -(-off // BS) * BS
        end = (off + n) // BS * BS
        if end > first:
            buf[first:end] = bytes(end - first)


def read_export(engine: Engine, export: str, offset: int = 0, length: int | None = None) -> bytes:
    ex = engine.open_export(export, True)
    if length is None:
        length = ex.size - offset
    buf = bytearray(length)
    engine.read(ex, memoryview(buf), offset)
    return bytes(buf)


def verify(engine: Engine, m: VModel, when: str = "") -> None:
    """Every export reads exactly the model; the export list, the volumes' sizes and origins,
    the snapshots' coverage and their writable flags match it too."""
    exports = m.exports()
    listed = {n for n, _ in engine.export_names()}
    assert listed == set(exports), (
        f"export list {when}: extra {sorted(listed - set(exports))}, "
        f"missing {sorted(set(exports) - listed)}"
    )
    for name, want in exports.items():
        got = read_export(engine, name)
        assert got == want, f"{name} differs from the model {when}: {first_difference(got, want)}"
    vols = {v["name"]: v for v in engine.list_volumes()}
    assert set(vols) == set(m.vols), (sorted(vols), sorted(m.vols))
    for name, v in vols.items():
        o = m.origin.get(name)
        assert v["origin"] == (f"{o[0]}@{o[1]}" if o else None), (name, v)
        assert v["size_bytes"] == len(m.vols[name]), (name, v)
    snaps = {s.name: sorted(s.volumes) for s in engine.list_snapshots()}
    assert snaps == {n: sorted(s.data) for n, s in m.snaps.items()}
    for name, s in m.snaps.items():
        for v in s.data:
            assert engine.open_export(f"{v}@{name}", False).readonly is not s.writable
    check_diffs(engine, m, when)


def check_diffs(engine: Engine, m: VModel, when: str) -> None:
    """diff (from the maps alone) names every block that really differs between two views of
    a volume, written snapshots included (invariant 4)."""
    for v, live in m.vols.items():
        views: list[tuple[str | None, bytes | bytearray]] = [
            (n, m.snaps[n].data[v]) for n in m.covering(v)
        ]
        views.append((None, live))
        # each view against the next newer one and against live (diff S -> T is the union of
        # the consecutive diffs between them, so these cover every pair)
        pairs = [(views[i], views[i + 1]) for i in range(len(views) - 1)]
        pairs += [(x, views[-1]) for x in views[:-2]]
        for (a, da), (b, db) in pairs:
            assert a is not None
            size = min(len(da), len(db))
            differ = {
                k // BS
                for k in range(0, size, BS)
                if da[k : min(k + BS, size)] != db[k : min(k + BS, size)]
            }
            if not differ:
                continue
            listed: set[int] = set()
            for off, n in engine.diff_blocks(a, b, volume=v):
                listed.update(range(off // BS, -(-(off + n) // BS)))
            missing = sorted(differ - listed)
            assert not missing, (
                f"diff {v}@{a} -> {b or 'live'} {when} misses blocks that differ: {missing}"
            )


# --- the run ---------------------------------------------------------------------------------


class Run:
    def __init__(self, path: Path, cow: str, seed: int) -> None:
        self.path = str(path)
        self.cow = cow
        self.rng = random.Random(seed)
        self.log: list[str] = []
        self.serial = 0
        live_size = 48 * BS
        self.engine = Engine.open(self.path, create_size=live_size, block_size=BS, cow=cow)
        self.m = VModel()
        self.m.vols["live"] = bytearray(live_size)
        self.counts: dict[str, int] = {}
        self.defects: list[str] = []  # what the checker found, and when

    # --- helpers ------------------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.log.append(what)
        key = what.split()[0]
        self.counts[key] = self.counts.get(key, 0) + 1

    def read(self, export: str, offset: int = 0, length: int | None = None) -> bytes:
        return read_export(self.engine, export, offset, length)

    def span(self, size: int, max_len: int) -> tuple[int, int]:
        rng = self.rng
        if rng.random() < 0.3 and size >= BS:  # block-aligned, sometimes several blocks
            blocks = size // BS
            first = rng.randrange(0, blocks)
            n = rng.randrange(1, min(6, blocks - first) + 1)
            return first * BS, n * BS
        if rng.random() < 0.35 and size >= SECTOR:  # whole sectors: deferred merges
            off = rng.randrange(0, size // SECTOR) * SECTOR
            n = rng.randrange(1, min(max_len, size - off) // SECTOR + 1) * SECTOR
            return off, n
        off = rng.randrange(0, size)
        return off, rng.randrange(1, min(max_len, size - off) + 1)

    def expect_refused(self, what: str, fn, *names: str) -> None:  # noqa: ANN001
        """fn must raise Refused naming every one of names, and change nothing."""
        with pytest.raises(Refused) as info:
            fn()
        for n in names:
            assert n in str(info.value), f"{what}: the refusal does not name {n}: {info.value}"
        self.check_all(f"after the refused {what}")

    def volume_size_choice(self) -> int:
        blocks = self.rng.randrange(4, 33)
        extra = self.rng.choice([0, 0, 0, self.rng.randrange(1, BS)])
        return blocks * BS + extra

    # --- operations ---------------------------------------------------------------------------

    def op_io_volume(self) -> None:
        v = self.rng.choice(list(self.m.vols))
        self._io(v, self.m.vols[v])

    def op_io_snapshot(self) -> None:
        targets = [
            (s, v) for s, ms in self.m.snaps.items() if ms.writable for v in ms.data
        ]  # every (writable snapshot, volume it covers)
        if not targets:
            return self.op_io_volume()
        s, v = self.rng.choice(targets)
        self._io(f"{v}@{s}", self.m.snaps[s].data[v])

    def _io(self, export: str, buf: bytearray) -> None:
        kind = self.rng.choices(["write", "zero", "trim"], [6, 2, 2])[0]
        off, n = self.span(len(buf), 3 * BS if kind == "write" else 5 * BS)
        self.note(f"{kind} {export} {off} {n}")
        ex = self.engine.open_export(export, False)
        assert not ex.readonly, f"{export} should be writable"
        data = None
        if kind == "write":
            data = self.rng.randbytes(n)
            self.engine.write(ex, memoryview(data), off)
        elif kind == "zero":
            self.engine.zero(ex, off, n)
        else:
            self.engine.trim(ex, off, n)
        apply_io(buf, kind, off, n, data)

    def op_create(self) -> None:
        if len(self.m.snaps) >= MAX_SNAPSHOTS:
            return self.op_delete()
        self.serial += 1
        name = f"s{self.serial}"
        writable = self.rng.random() < 0.35
        vols = None
        if self.rng.random() < 0.4:  # a subset (--volume V ...)
            k = self.rng.randrange(1, len(self.m.vols) + 1)
            vols = self.rng.sample(list(self.m.vols), k)
        self.note(f"create {name} volumes={vols} writable={writable}")
        info = self.engine.create_snapshot(name, vols, writable)
        covered = vols if vols is not None else list(self.m.vols)
        assert sorted(info.volumes) == sorted(covered), (info.volumes, covered)
        self.m.snaps[name] = MSnap(writable, {v: bytearray(self.m.vols[v]) for v in covered})

    def op_delete(self) -> None:
        if not self.m.snaps:
            return
        name = self.rng.choice(list(self.m.snaps))
        clones = self.m.clones_of_snapshot(name)
        if clones:
            self.note(f"delete {name} (refused: clones {clones})")
            self.expect_refused(
                f"delete of {name}", lambda: self.engine.delete_snapshot(name), *clones
            )
            return
        self.note(f"delete {name}")
        self.engine.delete_snapshot(name)
        del self.m.snaps[name]

    def op_set_writable(self) -> None:
        if not self.m.snaps:
            return
        name = self.rng.choice(list(self.m.snaps))
        on = not self.m.snaps[name].writable
        clones = self.m.clones_of_snapshot(name)
        if on and clones:
            self.note(f"set {name} writable=on (refused: clones {clones})")
            self.expect_refused(
                f"writable=on of {name}", lambda: self.engine.set_writable(name, True), *clones
            )
            return
        self.note(f"set {name} writable={'on' if on else 'off'}")
        self.engine.set_writable(name, on)
        self.m.snaps[name].writable = on
        for v in self.m.snaps[name].data:
            assert self.engine.open_export(f"{v}@{name}", False).readonly is not on

    def op_clone(self) -> None:
        pairs = [(s, v) for s, ms in self.m.snaps.items() for v in ms.data]
        if not pairs or len(self.m.vols) >= MAX_VOLUMES:
            return
        s, v = self.rng.choice(pairs)
        self.serial += 1
        name = f"c{self.serial}"
        if self.m.snaps[s].writable:
            self.note(f"clone {v}@{s} {name} (refused: writable)")
            self.expect_refused(
                f"clone of writable {v}@{s}", lambda: self.engine.clone(f"{v}@{s}", name)
            )
            return
        self.note(f"clone {v}@{s} {name}")
        info = self.engine.clone(f"{v}@{s}", name)
        assert info["origin"] == f"{v}@{s}", info
        self.m.vols[name] = bytearray(self.m.snaps[s].data[v])
        self.m.origin[name] = (v, s)

    def op_flatten(self) -> None:
        if not self.m.origin:
            if self.rng.random() < 0.2:
                v = self.rng.choice(list(self.m.vols))
                self.note(f"flatten {v} (not a clone: refused)")
                with pytest.raises(InvalidArgument):
                    self.engine.flatten(v)
            return
        c = self.rng.choice(list(self.m.origin))
        verb = self.rng.choice(["flatten", "promote"])
        self.note(f"{verb} {c}")
        info = getattr(self.engine, verb)(c)
        assert info["origin"] is None, info
        del self.m.origin[c]

    def op_volume_create(self) -> None:
        if len(self.m.vols) >= MAX_VOLUMES:
            return
        self.serial += 1
        name = f"v{self.serial}"
        size = self.volume_size_choice()
        self.note(f"volume-create {name} {size}")
        info = self.engine.create_volume(name, size)
        assert info["size_bytes"] == size
        self.m.vols[name] = bytearray(size)

    def op_resize(self) -> None:
        v = self.rng.choice(list(self.m.vols))
        buf = self.m.vols[v]
        old = len(buf)
        if (self.rng.random() < 0.65 or old <= BS) and old < 64 * BS:
            new = old + self.rng.randrange(1, 8 * BS)
            self.note(f"resize {v} {old} -> {new}")
            self.engine.resize_volume(v, new)
            buf.extend(bytes(new - old))
            return
        new = self.rng.randrange(BS // 2, old)
        if self.rng.random() < 0.2:
            self.note(f"resize {v} {old} -> {new} without force (refused)")
            self.expect_refused(
                f"shrink of {v} without force", lambda: self.engine.resize_volume(v, new)
            )
            return
        # Blocks wholly past the new size that hold data must make the shrink fail; blocks
        # that read zeros may still be allocated, so a refusal is allowed for them too.
        cut = -(-new // BS) * BS
        must_refuse = any(buf[cut:])
        try:
            self.engine.resize_volume(v, new, force=True)
        except Refused:
            self.note(f"resize {v} {old} -> {new} --force (refused)")
            self.check_all(f"after the refused shrink of {v}")
            return
        self.note(f"resize {v} {old} -> {new} --force")
        assert not must_refuse, f"shrinking {v} to {new} dropped data past {cut}"
        del buf[new:]

    def op_volume_delete(self) -> None:
        v = self.rng.choice(list(self.m.vols))
        doomed = self.m.with_clones(v)
        if len(doomed) >= len(self.m.vols):
            return  # keep at least one volume
        busy = bool(self.m.covering(v)) or len(doomed) > 1
        if busy and self.rng.random() < 0.3:
            self.note(f"volume-delete {v} (refused: snapshots or clones)")
            self.expect_refused(f"delete of volume {v}", lambda: self.engine.delete_volume(v))
            return
        self.note(f"volume-delete {v} --recursive (goes: {doomed})")
        gone = self.engine.delete_volume(v, recursive=True)
        assert set(doomed) <= set(gone), (doomed, gone)
        for d in doomed:
            del self.m.vols[d]
            self.m.origin.pop(d, None)
        for name in list(self.m.snaps):
            s = self.m.snaps[name]
            for d in doomed:
                s.data.pop(d, None)
            if not s.data:
                del self.m.snaps[name]

    def op_rollback(self) -> None:
        vols = [v for v in self.m.vols if self.m.covering(v)]
        if not vols:
            return
        v = self.rng.choice(vols)
        cov = self.m.covering(v)
        if self.rng.random() < 0.8 or len(cov) == 1:
            target = cov[-1]
            self.note(f"rollback {v} to {target}")
            self.engine.rollback(target, volume=v, force=True)
            self.m.vols[v] = bytearray(self.m.snaps[target].data[v])
            return
        # an older one, destroying every newer snapshot of the volume (whole snapshots)
        target = self.rng.choice(cov[:-1])
        newer = cov[cov.index(target) + 1 :]
        blocked = [c for n in newer for c in self.m.clones_of_snapshot(n)]
        if blocked:
            self.note(f"rollback {v} to {target} --destroy-newer (refused: clones {blocked})")
            self.expect_refused(
                f"rollback of {v} to {target}",
                lambda: self.engine.rollback(target, volume=v, destroy_newer=True, force=True),
            )
            return
        self.note(f"rollback {v} to {target} --destroy-newer (goes: {newer})")
        gone = self.engine.rollback(target, volume=v, destroy_newer=True, force=True)
        assert sorted(gone) == sorted(newer), (gone, newer)
        for n in newer:
            del self.m.snaps[n]
        self.m.vols[v] = bytearray(self.m.snaps[target].data[v])

    def op_flush(self) -> None:
        self.note("flush")
        self.engine.flush()

    def op_restart(self) -> None:
        self.note("restart")
        self.engine.close()
        self.engine = Engine.open(self.path, cow=self.cow)

    def op_crash(self) -> None:
        self.note("crash-after-flush")
        self.engine.flush()
        self.engine.device.close()  # no commit, no in-use cleanup: what kill -9 leaves
        self.engine = Engine.open(self.path, cow=self.cow)

    def op_read(self) -> None:
        exports = self.m.exports()
        name = self.rng.choice(list(exports))
        want = exports[name]
        off, n = self.span(len(want), 6 * BS)
        got = self.read(name, off, n)
        part = want[off : off + n]
        assert got == part, f"{name} [{off}, +{n}) differs: {first_difference(got, part)}"

    OPS = [
        ("op_io_volume", 30),
        ("op_io_snapshot", 18),
        ("op_create", 8),
        ("op_delete", 5),
        ("op_set_writable", 2),
        ("op_clone", 4),
        ("op_flatten", 2),
        ("op_volume_create", 2),
        ("op_resize", 3),
        ("op_volume_delete", 2),
        ("op_rollback", 4),
        ("op_flush", 2),
        ("op_restart", 1),
        ("op_crash", 1),
        ("op_read", 8),
    ]

    def step(self) -> None:
        names, weights = zip(*self.OPS, strict=True)
        getattr(self, self.rng.choices(names, weights)[0])()

    # --- verification -------------------------------------------------------------------------

    def check_all(self, when: str = "") -> None:
        verify(self.engine, self.m, when)

    def checker(self, when: str) -> None:
        """The checker on the committed state. A defect is recorded with the ops before it and
        the run goes on, so that the data comparisons still cover the whole workload; the test
        fails at the end with every recorded defect."""
        self.engine.flush()
        try:
            checker_clean(self.path)
        except AssertionError as e:
            last = "\n    ".join(self.log[-8:])
            self.defects.append(f"{when}: {e}\n  last ops:\n    {last}")


@pytest.mark.parametrize("cow", ["move", "copy"])
@pytest.mark.parametrize("seed", SEEDS)
def test_volumes_model(tmp_path: Path, cow: str, seed: int) -> None:
    run = Run(tmp_path / "pool.img", cow, seed)
    try:
        for i in range(1, OPS + 1):
            run.step()
            if i % CHECK_EVERY == 0:
                run.check_all(f"after op {i}")
            if i % CHECKER_EVERY == 0:
                run.checker(f"after op {i}")
        run.check_all("at the end")
        run.checker("at the end")
        run.engine.close()
        run.engine = Engine.open(run.path, cow=cow)
        run.check_all("after the final reopen")
        run.engine.close()
    except Exception as e:
        last = "\n  ".join(run.log[-15:])
        found = "".join(f"\nearlier, the checker {d}" for d in run.defects[:2])
        raise AssertionError(
            f"seed {seed} cow={cow} (rerun: DITTOFS_SEED={seed}): {type(e).__name__}: {e}\n"
            f"last ops:\n  {last}{found}"
        ) from e
    assert not run.defects, (
        f"seed {seed} cow={cow} (rerun: DITTOFS_SEED={seed}): every export read right, but the "
        f"checker found defects {len(run.defects)} time(s); the first:\n{run.defects[0]}"
    )
    # The workload must really have exercised what it claims to.
    for op in ("write", "create", "clone", "rollback", "volume-create", "resize"):
        assert run.counts.get(op, 0) > 0, f"seed {seed}: no '{op}' ran: {run.counts}"
    snapshot_io = sum(
        1
        for line in run.log
        if line.split()[0] in ("write", "zero", "trim") and "@" in line.split()[1]
    )
    assert snapshot_io > 20, f"seed {seed}: only {snapshot_io} writes into writable snapshots"


# --- crashes inside the long operations --------------------------------------------------------
#
# Snapshot delete, volume delete --recursive, flatten and rollback run in bounded background
# steps with the engine lock released in between; the state between two steps is committable
# (nbdkit's ticker commits it every few seconds) and a crash may come at any point. With
# STEP_SECONDS = 0 every step does one map leaf of live or one batch of a snapshot's entries
# (STEP_ENTRIES), and the progress callback, called between
# steps, "crashes" (the device is closed without a commit, as kill -9 leaves it), after
# committing first in the variant that plays the ticker. Reopened, the pool must finish the
# operation by itself (engine.tick) and read exactly what the finished operation promises.

LONG_BLOCKS = 400  # three map leaves of 168 entries at 4 KiB blocks: several steps per map
STEP_ENTRIES = 16  # a snapshot's entries a step takes: several steps per snapshot


class Crash(Exception):
    """Raised from a progress callback: the process dies there."""


class CrashAfter:
    """A progress callback (called between two steps) that crashes after `steps` calls,
    committing first when told to (as nbdkit's ticker may between any two steps)."""

    def __init__(self, engine: Engine, steps: int, commit_first: bool) -> None:
        self.engine = engine
        self.steps = steps
        self.commit_first = commit_first
        self.calls = 0

    def __call__(self, done: int, total: int) -> None:
        self.calls += 1
        if self.calls > self.steps:
            if self.commit_first:
                with self.engine.lock:
                    self.engine.core.commit()
            raise Crash


class Meanwhile:
    """A progress callback that plays the clients between two steps: a few writes and trims
    into one of `writable` (mirrored in the model), and a read of `fixed` (VOL, SNAP), a
    volume being rolled back, which must read SNAP's view at every step."""

    def __init__(
        self,
        engine: Engine,
        model: VModel,
        writable: list[str],
        fixed: tuple[str, str] | None,
        rng: random.Random,
    ) -> None:
        self.engine = engine
        self.model = model
        self.writable = writable
        self.fixed = fixed
        self.rng = rng
        self.steps = 0

    def __call__(self, done: int, total: int) -> None:
        self.steps += 1
        _scatter(self.engine, self.model, self.rng.choice(self.writable), self.rng, 3)
        if self.fixed is not None:
            vol, snap = self.fixed
            got = read_export(self.engine, vol)
            want = self.model.snaps[snap].data[vol]
            assert got == want, (
                f"{vol} during its rollback to {snap}, after step {self.steps}: "
                f"{first_difference(got, want)}"
            )


def _scatter(engine: Engine, m: VModel, export: str, rng: random.Random, count: int) -> None:
    """Writes and trims spread over the whole export (every map leaf gets entries)."""
    vol, _, snap = export.partition("@")
    buf = m.snaps[snap].data[vol] if snap else m.vols[vol]
    for _ in range(count):
        off = rng.randrange(0, len(buf) - BS)
        n = rng.randrange(1, 2 * BS)
        n = min(n, len(buf) - off)
        kind = rng.choices(["write", "trim"], [4, 1])[0]
        ex = engine.open_export(export, False)
        data = rng.randbytes(n) if kind == "write" else None
        if data is not None:
            engine.write(ex, memoryview(data), off)
        else:
            engine.trim(ex, off, n)
        apply_io(buf, kind, off, n, data)


def _base_pool(path: Path, cow: str) -> VModel:
    """live and v (400 blocks each), group, writable and --volume snapshots, written snapshot
    data, a clone with its own snapshot and trims, a second clone; committed and closed."""
    rng = random.Random(f"long-ops-{cow}")
    size = LONG_BLOCKS * BS
    m = VModel()
    m.vols["live"] = bytearray(size)
    engine = Engine.open(str(path), create_size=size, block_size=BS, cow=cow)
    engine.create_volume("v", size)
    m.vols["v"] = bytearray(size)

    def snap(name: str, vols: list[str] | None = None, writable: bool = False) -> None:
        engine.create_snapshot(name, vols, writable)
        covered = vols or list(m.vols)
        m.snaps[name] = MSnap(writable, {x: bytearray(m.vols[x]) for x in covered})

    for export in ("live", "v"):
        _scatter(engine, m, export, rng, 90)
    data = rng.randbytes(8 * BS)  # what clone c reads through until it trims it
    engine.write(engine.open_export("v", False), memoryview(data), 0)
    apply_io(m.vols["v"], "write", 0, 8 * BS, data)
    snap("s1")
    for export in ("live", "v"):
        _scatter(engine, m, export, rng, 36)
    snap("s2", writable=True)
    for export in ("live", "v", "live@s2", "v@s2"):
        _scatter(engine, m, export, rng, 36)
    snap("s3", ["v"])
    _scatter(engine, m, "v", rng, 36)
    engine.clone("v@s1", "c")
    m.vols["c"] = bytearray(m.snaps["s1"].data["v"])
    m.origin["c"] = ("v", "s1")
    _scatter(engine, m, "c", rng, 36)
    engine.trim(engine.open_export("c", False), 0, 8 * BS)  # explicit holes over the origin
    apply_io(m.vols["c"], "trim", 0, 8 * BS, None)
    snap("t1", ["c"])
    _scatter(engine, m, "c", rng, 36)
    data = rng.randbytes(4 * BS)  # t1 preserves some of those holes
    engine.write(engine.open_export("c", False), memoryview(data), 2 * BS)
    apply_io(m.vols["c"], "write", 2 * BS, 4 * BS, data)
    engine.clone("live@s1", "d")
    m.vols["d"] = bytearray(m.snaps["s1"].data["live"])
    m.origin["d"] = ("live", "s1")
    _scatter(engine, m, "d", rng, 20)
    verify(engine, m, "in the base pool")
    engine.close()
    return m


def _after(m: VModel, op: str) -> VModel:
    """The model once op has completed."""
    m = VModel(
        {k: bytearray(b) for k, b in m.vols.items()},
        dict(m.origin),
        {
            n: MSnap(s.writable, {k: bytearray(b) for k, b in s.data.items()})
            for n, s in m.snaps.items()
        },
    )
    if op == "delete s2":
        del m.snaps["s2"]
    elif op == "delete s3 t1":
        del m.snaps["s3"], m.snaps["t1"]
    elif op == "volume delete v --recursive":
        for d in ("v", "c"):
            del m.vols[d]
            m.origin.pop(d, None)
        del m.snaps["s3"], m.snaps["t1"]
        for s in m.snaps.values():
            s.data.pop("v", None)
    elif op == "flatten c":
        del m.origin["c"]
    elif op == "rollback live to s1 --destroy-newer":
        del m.snaps["s2"]
        m.vols["live"] = bytearray(m.snaps["s1"].data["live"])
    elif op == "rollback c to t1":
        m.vols["c"] = bytearray(m.snaps["t1"].data["c"])
    else:
        raise AssertionError(op)
    return m


def _start(engine: Engine, op: str, progress) -> None:  # noqa: ANN001
    if op == "delete s2":
        engine.delete_snapshots(["s2"], progress)
    elif op == "delete s3 t1":
        engine.delete_snapshots(["s3", "t1"], progress)
    elif op == "volume delete v --recursive":
        engine.delete_volume("v", recursive=True, progress=progress)
    elif op == "flatten c":
        engine.flatten("c", progress)
    elif op == "rollback live to s1 --destroy-newer":
        engine.rollback("s1", "live", destroy_newer=True, force=True, progress=progress)
    elif op == "rollback c to t1":
        engine.rollback("t1", "c", force=True, progress=progress)


LONG_OPS = [
    "delete s2",
    "delete s3 t1",
    "volume delete v --recursive",
    "flatten c",
    "rollback live to s1 --destroy-newer",
    "rollback c to t1",
]


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_crash_inside_long_operations(tmp_path: Path, cow: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("fsimpl.core.STEP_SECONDS", 0.0)
    monkeypatch.setattr("fsimpl.snapshots.BATCH", STEP_ENTRIES)
    base = tmp_path / "base.img"
    m0 = _base_pool(base, cow)
    work = tmp_path / "work.img"
    failures: list[str] = []
    tried = 0
    for op in LONG_OPS:
        want = _after(m0, op)
        for commit_first in (False, True):
            k = 0
            while True:
                work.unlink(missing_ok=True)  # (truncating a sparse image is slower)
                work.write_bytes(base.read_bytes())
                engine = Engine.open(str(work), cow=cow)
                progress = CrashAfter(engine, k, commit_first)
                crashed = False
                try:
                    _start(engine, op, progress)
                except Crash:
                    crashed = True
                engine.device.close()  # kill -9: no commit
                where = f"{op}, crash after step {k + 1}" + (" (committed)" if commit_first else "")
                if not crashed:
                    break  # the operation needed fewer steps than k + 1
                tried += 1
                try:
                    engine = Engine.open(str(work), cow=cow)
                    try:
                        for _ in range(10_000):
                            if not engine.tick():
                                break
                        verify(engine, want, f"after {where} and recovery")
                    finally:
                        engine.close()
                    checker_clean(str(work))
                except (AssertionError, DittoError) as e:
                    failures.append(f"{where}: {type(e).__name__}: {str(e)[:300]}")
                    break  # later crash points of this op would mostly repeat it
                k += 1
    assert tried > 2 * len(LONG_OPS), f"only {tried} crash points were reached"
    assert not failures, f"cow={cow}: {len(failures)} crash points failed:\n" + "\n".join(failures)


# --- regressions found by the tests above, minimised --------------------------------------------


def test_rollback_of_a_clone_keeps_its_trimmed_blocks(tmp_path: Path) -> None:
    """A clone's trimmed block is an explicit hole hiding the origin's data. A snapshot of the
    clone preserves that hole; rolling the clone back to the snapshot must bring the hole
    back, not the origin's data (ORIGIN entries, not HOLE ones, mean "read the origin")."""
    engine = Engine.open(str(tmp_path / "pool.img"), create_size=16 * BS, block_size=BS)
    engine.write(engine.open_export("live", False), memoryview(b"A" * BS), 0)
    engine.create_snapshot("s1")
    engine.clone("live@s1", "c")
    engine.trim(engine.open_export("c", False), 0, BS)  # c reads zeros at block 0
    engine.create_snapshot("t1", ["c"])
    engine.write(engine.open_export("c", False), memoryview(b"B" * BS), 0)
    assert read_export(engine, "c@t1", 0, 4) == bytes(4)
    engine.rollback("t1", volume="c", force=True)
    assert read_export(engine, "c", 0, 4) == bytes(4), "the rollback brought the origin's data back"
    engine.close()


def test_flattened_clone_with_trimmed_blocks_checks_clean(tmp_path: Path) -> None:
    """Flatten leaves a former clone's explicit holes (live entries of kind HOLE) in place;
    the checker must not call a pool that reads correctly corrupt, or flatten must turn them
    into plain unallocated entries."""
    path = tmp_path / "pool.img"
    engine = Engine.open(str(path), create_size=16 * BS, block_size=BS)
    engine.write(engine.open_export("live", False), memoryview(b"A" * BS), 0)
    engine.create_snapshot("s1")
    engine.clone("live@s1", "c")
    engine.trim(engine.open_export("c", False), 0, BS)
    engine.flatten("c")
    assert read_export(engine, "c", 0, 4) == bytes(4)
    engine.close()
    checker_clean(str(path))


# Which exports clients may write while each long operation runs, and which volume must read
# a fixed view meanwhile (a volume being rolled back reads through its target snapshot).
ONLINE = {
    "delete s2": (["live", "v", "c", "d"], None),
    "delete s3 t1": (["live", "v", "c", "d", "live@s2", "v@s2"], None),
    "volume delete v --recursive": (["live", "d", "live@s2"], None),
    "flatten c": (["c", "live", "v", "d", "v@s2"], None),
    "rollback live to s1 --destroy-newer": (["v", "c", "d"], ("live", "s1")),
    "rollback c to t1": (["live", "v", "d", "live@s2"], ("c", "t1")),
}


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_io_between_steps_of_long_operations(tmp_path: Path, cow: str, monkeypatch) -> None:  # noqa: ANN001
    """Clients keep writing (and a volume being rolled back keeps being read) between the
    steps of every long operation: the finished operation and every write must both show."""
    monkeypatch.setattr("fsimpl.core.STEP_SECONDS", 0.0)
    monkeypatch.setattr("fsimpl.snapshots.BATCH", STEP_ENTRIES)
    base = tmp_path / "base.img"
    m0 = _base_pool(base, cow)
    work = tmp_path / "work.img"
    rng = random.Random(f"online-{cow}")
    failures: list[str] = []
    for op in LONG_OPS:
        want = _after(m0, op)
        writable, fixed = ONLINE[op]
        work.unlink(missing_ok=True)
        work.write_bytes(base.read_bytes())
        engine = Engine.open(str(work), cow=cow)
        progress = Meanwhile(engine, want, writable, fixed, rng)
        try:
            _start(engine, op, progress)
            verify(engine, want, f"after {op} with writes between its {progress.steps} steps")
            engine.close()
            checker_clean(str(work))
        except (AssertionError, DittoError) as e:
            failures.append(f"{op}: {type(e).__name__}: {str(e)[:300]}")
            engine.device.close()
            continue
        assert progress.steps > 1, f"{op} ran in one step: nothing was interleaved"
    assert not failures, f"cow={cow}: {len(failures)} operations failed:\n" + "\n".join(failures)

"""Power cuts inside every long operation: the pool comes back wholly before or wholly after it.

Each scenario prepares a pool in-process (every kind of export it needs, committed), records
the I/O of one operation run to its end over a support.iolog RecordingDevice, and replays the
record as crash images (tests/crashsim.py): the clean cut at every flush point, prefixes,
subsets, reorderings and torn writes of what followed it, discards that zero or keep data. For
each image:

* the checker finds nothing (a superblock slot whose write was torn may fail its checksum: the
  other slot serves);
* the pool opens, and once the work a restarted server resumes (a pending delete, rollback,
  flatten or volume delete) has run, every export, the snapshots, the volumes and the role read
  exactly as before the operation or exactly as after it, never a mix; where the operation
  writes data (into a writable snapshot) each sector may read old or new, as NBD allows for
  writes that were not flushed;
* the pool goes on working: what was interrupted can be finished (a receive is aborted and sent
  again), then a snapshot, a write and a flush succeed and the checker is clean.

Every scenario runs with data checksums off and on. Figures (asserted): at least
MIN_STATES_PER_CASE distinct crash states per case, and the total over all of them (see it with
-s).
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from crashsim import CrashPlan, Replayer, suspect_slots, write_image
from support.data import pattern
from support.iolog import RecordingDevice
from support.logcheck import SLOT_UNUSABLE

from fsimpl import checker
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.txn import Pool

BS = 4096
SIZE = 256 << 10
MIN_STATES_PER_CASE = 4  # an operation of one commit gives few distinct images
MIN_TOTAL_STATES = 450
SAMPLES = 6  # rounds of sampling per flush point (duplicate images are verified once)
TOTALS: Counter[str] = Counter()


@dataclass
class Scenario:
    name: str
    prepare: Callable[[Engine], None]  # the state before (committed by the harness)
    run: Callable[[Engine], None]  # the operation
    writes_data: str = ""  # an export the operation writes: its sectors may be old or new
    finish: Callable[[Engine], None] | None = None  # completes what a crash left half done
    leaks_before: bool = False  # the state before has leaked blocks (check --repair)
    min_states: int = MIN_STATES_PER_CASE  # distinct crash states it must reach (asserted)


def write(eng: Engine, export: str, tag: int, first: int, blocks: int) -> None:
    ex = eng.open_export(export, False)
    eng.write(ex, memoryview(pattern(tag, blocks * BS)), first * BS)


def base(eng: Engine) -> None:
    """live with data and two snapshots, a second volume, a clone, a writable snapshot."""
    write(eng, "live", 1, 0, 24)
    eng.create_snapshot("s1")
    write(eng, "live", 2, 4, 8)
    eng.create_volume("vol2", SIZE)
    write(eng, "vol2", 3, 0, 12)
    eng.create_snapshot("s2")
    write(eng, "live", 4, 10, 6)
    write(eng, "vol2", 5, 2, 3)
    eng.clone("live@s1", "cl")
    write(eng, "cl", 6, 1, 2)
    eng.create_snapshot("ws", ["vol2"], writable=True)


def _stream(eng: Engine, base_name: str | None, to: str) -> bytes:
    sink = io.BytesIO()
    eng.send(base_name, to, sink)
    return sink.getvalue()


def prepare_receive(eng: Engine) -> None:
    """This pool holds r1 received from a source pool; the source's r1 -> r2 stream waits."""
    src_path = Path(eng.device.path).with_name("source.img")
    src = Engine.open(str(src_path), create_size=SIZE, block_size=BS, claim=False)
    write(src, "live", 7, 0, 16)
    src.create_snapshot("r1")
    write(src, "live", 8, 5, 9)
    src.create_snapshot("r2")
    full, incremental = _stream(src, None, "r1"), _stream(src, "r1", "r2")
    src.close()
    eng.receive(io.BytesIO(full), force=True)
    Path(str(src_path) + ".stream").write_bytes(incremental)


def run_receive(eng: Engine) -> None:
    stream = Path(eng.device.path).with_name("source.img.stream").read_bytes()
    eng.receive(io.BytesIO(stream))


def finish_receive(eng: Engine) -> None:
    """After a crash: a broken-off receive is discarded and the stream sent again."""
    if eng.resume_token() is not None:
        eng.abort_receive()
    if "r2" not in eng.snapshot_names():
        src = Path(str(Path(eng.device.path).parent / "pool.img"))
        stream = src.with_name("source.img.stream").read_bytes()
        eng.receive(io.BytesIO(stream))


def prepare_leaks(eng: Engine) -> None:
    """base, plus blocks allocated and committed that nothing references (a lost reference)."""
    base(eng)
    for _ in range(5):
        eng.pool.allocator.allocate()
    eng.core.commit()


def run_repair(eng: Engine) -> None:
    """check --repair on the disk (what snapctl runs with the server stopped)."""
    report = checker.repair(eng.device)
    assert report.fixed, "the repair fixed nothing"
    eng.abort()  # the engine reads the repaired pool


def finish_repair(eng: Engine) -> None:
    if checker.check(eng.device).stats.get("leaked_blocks"):
        run_repair(eng)


SCENARIOS = [
    Scenario("create", base, lambda e: e.create_snapshot("new"), min_states=8),
    Scenario("delete", base, lambda e: e.delete_snapshot("s2"), min_states=24),
    Scenario(
        "rollback", base, lambda e: e.rollback("s1", destroy_newer=True, force=True), min_states=25
    ),
    Scenario("clone", base, lambda e: e.clone("live@s2", "cl2"), min_states=6),
    Scenario("flatten", base, lambda e: e.flatten("cl"), min_states=25),
    Scenario(
        "writable-snapshot-writes",
        base,
        lambda e: (write(e, "vol2@ws", 9, 0, 5), write(e, "vol2@ws", 10, 20, 3)),
        writes_data="vol2@ws",
        min_states=20,
    ),
    Scenario("receive", prepare_receive, run_receive, finish=finish_receive, min_states=27),
    Scenario("volume-delete", base, lambda e: e.delete_volume("cl", recursive=True), min_states=18),
    Scenario("volume-grow", base, lambda e: e.resize_volume("vol2", 2 * SIZE), min_states=6),
    Scenario(
        "volume-shrink",
        base,
        lambda e: e.resize_volume("live", SIZE // 2, force=True),
        min_states=6,
    ),
    Scenario(
        "check-repair",
        prepare_leaks,
        run_repair,
        finish=finish_repair,
        leaks_before=True,
        min_states=4,
    ),
]


def settle(eng: Engine) -> None:
    """What a restarted server does on its own: resume pending work, then commit."""
    while eng.tick():
        pass
    eng.flush()


def state(eng: Engine) -> dict[str, Any]:
    """Everything a user sees of the pool: every export's bytes, the exports with their
    descriptions, the snapshots, the volumes, the role."""
    exports: dict[str, bytes] = {}
    for name, _ in eng.export_names():
        if name.endswith("@latest"):
            continue
        ex = eng.open_export(name, True)
        buf = bytearray(ex.size)
        eng.read(ex, memoryview(buf), 0)
        exports[name] = bytes(buf)
    role = eng.roles.state()
    leaked = checker.check(eng.device).stats.get("leaked_blocks", 0)  # the committed state
    return {
        "leaked": leaked,
        "exports": exports,
        "names": eng.export_names(),
        "snapshots": [(s.name, s.volumes, s.holds) for s in eng.list_snapshots()],
        "volumes": [
            {k: v for k, v in vol.items() if k != "connections"} for vol in eng.list_volumes()
        ],
        "role": (role.role, role.peer, role.superseded, role.last_common_guid),
    }


def same_but_data(got: dict[str, Any], want: dict[str, Any]) -> bool:
    meta = ("names", "snapshots", "volumes", "role", "leaked")
    return all(got[k] == want[k] for k in meta) and set(got["exports"]) == set(want["exports"])


def old_or_new_sectors(got: bytes, old: bytes, new: bytes) -> bool:
    return len(got) == len(old) == len(new) and all(
        got[s : s + 512] in (old[s : s + 512], new[s : s + 512]) for s in range(0, len(got), 512)
    )


class Case:
    def __init__(self, tmp_path: Path, scenario: Scenario, checksums: bool, seed: int) -> None:
        self.sc = scenario
        self.path = tmp_path / "pool.img"
        self.crash = tmp_path / "crash.img"
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        Device.create_image(str(self.path)).close()
        dev = RecordingDevice(str(self.path))
        dev.lock()
        pool = Pool.format(dev, BS, SIZE, True, cache_bytes=8 << 20, checksums=checksums)
        eng = Engine(dev, pool, "move", 8 << 20)
        scenario.prepare(eng)
        settle(eng)
        self.before = state(eng)
        dev.start_recording()
        scenario.run(eng)
        settle(eng)
        self.after = state(eng)
        dev.recording = False
        self.ops = dev.ops
        self.base = dev.base
        eng.close()
        assert self.before != self.after, f"{scenario.name}: the operation changed nothing"
        self.rp = Replayer(self.base, self.ops)

    def replay(self) -> Counter[str]:
        seen: set[bytes] = set()
        plans = [
            plan
            for k in range(self.rp.flush_points)
            for _ in range(SAMPLES)
            for plan in self.rp.sample(k, self.rng, extra=4)
        ]
        for plan in plans:
            if True:
                img = self.rp.build(plan)
                digest = hashlib.blake2b(img, digest_size=16).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                try:
                    self.verify(plan, img)
                except Exception as e:
                    raise AssertionError(
                        f"{self.sc.name}: {type(e).__name__}: {e}\n  crash at "
                        f"{plan.describe(self.ops)}"
                    ) from e
                self.counts["states"] += 1
                self.counts[plan.kind] += 1
        return self.counts

    def verify(self, plan: CrashPlan, img: bytearray) -> None:
        torn = suspect_slots(self.rp, plan, img)
        write_image(img, str(self.crash))
        assert_checks_clean(self.crash, torn, leaks=self.sc.leaks_before)
        eng = Engine.open(str(self.crash), claim=False)
        try:
            settle(eng)
            got = state(eng)
            if got == self.before:
                self.counts["before"] += 1
            elif got == self.after:
                self.counts["after"] += 1
            else:
                self.mixed(got)
            # and it goes on working
            if self.sc.finish is not None:
                self.sc.finish(eng)
                settle(eng)
                assert state(eng) == self.after, "finishing the operation did not complete it"
            eng.create_snapshot("after-crash")
            write(eng, "live", 99, 0, 2)
            eng.flush()
        finally:
            eng.close()
        assert_checks_clean(self.crash, set())

    def mixed(self, got: dict[str, Any]) -> None:
        """Neither before nor after: allowed only for the sectors of the export the operation
        writes, each old or new."""
        name = self.sc.writes_data
        assert name, "the pool is neither as before the operation nor as after it"
        want = self.after
        assert same_but_data(got, want) or same_but_data(got, self.before), (
            "the snapshots, volumes or role are neither as before nor as after"
        )
        for export, data in got["exports"].items():
            old, new = self.before["exports"][export], want["exports"][export]
            if export == name:
                assert old_or_new_sectors(data, old, new), f"{export}: a sector reads neither"
            else:
                assert data in (old, new), f"{export} is neither as before nor as after"
        self.counts["sectors old or new"] += 1


def assert_checks_clean(path: Path, torn_slots: set[int], leaks: bool = False) -> None:
    """Nothing wrong, but a torn superblock slot (and, before a repair, the leaks it fixes)."""
    dev = Device(str(path), readonly=True)
    try:
        report = checker.check(dev)
    finally:
        dev.close()
    allowed = {f"superblock slot {s}" for s in torn_slots}
    bad = [
        d
        for d in report.defects
        if not (d.kind == "superblock" and d.where in allowed) and not (leaks and d.kind == "leak")
    ]
    assert not bad, "checker: " + "; ".join(d.message for d in bad[:5])


@pytest.mark.engine_log(SLOT_UNUSABLE)  # a torn superblock write: the other slot serves
@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "csum"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_power_cut_inside(tmp_path: Path, scenario: Scenario, checksums: bool) -> None:
    case = Case(tmp_path, scenario, checksums, seed=len(scenario.name) * 31 + checksums)
    counts = case.replay()
    TOTALS.update(counts)
    TOTALS["cases"] += 1
    print(f"\n{scenario.name} checksums={checksums}: {dict(counts)}")
    assert counts["states"] >= scenario.min_states, dict(counts)
    assert counts["before"] and counts["after"], f"not both sides were reached: {dict(counts)}"


def test_power_cut_totals() -> None:
    """Runs last in this module: every case ran; their crash states, in all."""
    assert TOTALS["cases"] == 2 * len(SCENARIOS), "run the whole module"
    print(f"\npower cuts inside long operations: {dict(TOTALS)}")
    assert TOTALS["states"] >= MIN_TOTAL_STATES, dict(TOTALS)

"""Power cuts inside the standby role changes, one pool at a time, its peer's state fixed.

Two pools in this process, each with its replication endpoint on 127.0.0.1: A the primary, B
its standby, attached and synced. One role change runs with the pool it changes recorded
(support.iolog): promote on B (its primary lost), demote on A (an old primary rejoining after B
was promoted), failback on A (handing the primary role to B). Each crash image of the recorded
pool (tests/crashsim.py: clean cuts, prefixes, subsets, reorderings, torn writes) is opened beside
its peer as the peer was at that moment (its image, taken quiescent when the recorded pool began
each sync: what the peer had done by then, and nothing the crash could not have seen), and:

* the checker finds nothing but a torn superblock slot;
* the crashed pool is wholly in its state before the operation or wholly in its state after
  it: its role, live's bytes and its snapshots (replication snapshots aside: a sync that
  completed inside a failback is a finished sync of its own);
* the role change then completes from there: promote again, or the old primary learns it was
  superseded and demotes, and the new primary's next sync reaches it.

Data checksums off and on. Figures asserted: crash states per case, and both sides reached.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from crashsim import Replayer, suspect_slots, write_image
from harness import free_port
from support.data import pattern
from support.iolog import RecordingDevice
from support.logcheck import COMMIT_FAILED, SLOT_UNUSABLE

from fsimpl import checker, standby
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.errors import Refused
from fsimpl.layout import ROLE_NAMES
from fsimpl.txn import Pool

BS = 4096
SIZE = 256 << 10
IDENTITY = "dittofs"
KEY = os.urandom(32)
MIN_TOTAL_STATES = 160
TOTALS: Counter[str] = Counter()


class Side:
    """One pool: its image, its engine and its endpoint on a fixed loopback port."""

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.address = f"127.0.0.1:{port}"
        self.engine: Engine | None = None
        self.endpoint: standby.ReplicationEndpoint | None = None

    def open(self, engine: Engine | None = None) -> Engine:
        self.engine = engine or Engine.open(str(self.path), claim=False)
        self.endpoint = standby.ReplicationEndpoint(self.engine, self.address, IDENTITY, KEY)
        self.endpoint.start()
        self.engine.endpoint = self.endpoint
        return self.engine

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
            self.endpoint = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def write(eng: Engine, tag: int, first: int, blocks: int) -> None:
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(pattern(tag, blocks * BS)), first * BS)
    eng.flush()


def settle(eng: Engine) -> None:
    while eng.tick():
        pass
    eng.flush()


def role_state(eng: Engine) -> dict[str, Any]:
    """What the role change must leave whole: the role, live's bytes, the user's snapshots."""
    st = eng.roles.state()
    ex = eng.open_export("live", True)
    buf = bytearray(ex.size)
    eng.read(ex, memoryview(buf), 0)
    return {
        "role": ROLE_NAMES[st.role],
        "superseded": st.superseded,
        "live": hashlib.sha256(buf).hexdigest(),
        "snapshots": [s.name for s in eng.list_snapshots() if not s.name.startswith("repl-")],
    }


@dataclass
class Scenario:
    name: str
    crashed: str  # "A" or "B": the pool whose I/O is recorded and cut
    setup: Callable[[Engine, Engine, Side, Side], None]  # after attach, before the operation
    run: Callable[[Engine, Side], None]  # the operation on the crashed pool
    complete: Callable[[Engine, Engine, Side], None]  # after a crash: finish, then sync
    want_after: str  # the crashed pool's role once it is done
    min_states: int  # distinct crash states it must reach (asserted)


def _promote_setup(a: Engine, b: Engine, sa: Side, sb: Side) -> None:
    sa.close()  # the primary is lost


def _promote_complete(crashed: Engine, peer: Engine, side: Side) -> None:
    if not crashed.roles.state().is_live_primary:
        standby.promote(crashed, IDENTITY, KEY, force=True)
    write(crashed, 40, 0, 2)  # writable: it is the primary


def _demote_setup(a: Engine, b: Engine, sa: Side, sb: Side) -> None:
    standby.promote(b, IDENTITY, KEY, force=True)  # B took over while A was away...
    write(b, 20, 3, 4)
    write(a, 21, 8, 6)  # ...and A went on: a diverged live
    a.create_snapshot("diverged")
    a.hold("diverged", "keep")


def _rejoin(crashed: Engine, peer: Engine, side: Side) -> None:
    """The crashed pool rejoins as the standby; the primary's next sync reaches it."""
    st = crashed.roles.state()
    if st.is_live_primary:
        with pytest.raises(Refused, match="superseded|has become primary"):
            standby.sync(crashed, IDENTITY, KEY)  # it learns its peer took over
    if crashed.roles.state().role != 2:  # not yet a standby
        standby.demote(crashed, IDENTITY, KEY)
    standby.sync(peer, IDENTITY, KEY)
    assert role_state(crashed)["live"] == role_state(peer)["live"], "the sync did not arrive"


def _failback_setup(a: Engine, b: Engine, sa: Side, sb: Side) -> None:
    write(a, 30, 2, 5)


def _finish_failback(crashed: Engine, peer: Engine, side: Side) -> None:
    """A failback cut short: if the peer took the role, this pool rejoins it; if it did not,
    the failback runs again. Either way the peer's next sync reaches it."""
    if crashed.roles.state().is_live_primary and not peer.roles.state().is_live_primary:
        standby.failback(crashed, IDENTITY, KEY, side.address)
    _rejoin(crashed, peer, side)


SCENARIOS = [
    Scenario(
        "promote",
        "B",
        _promote_setup,
        lambda e, s: standby.promote(e, IDENTITY, KEY, force=True),
        _promote_complete,
        "primary",
        12,
    ),
    Scenario(
        "demote",
        "A",
        _demote_setup,
        lambda e, s: standby.demote(e, IDENTITY, KEY),
        _rejoin,
        "standby",
        15,
    ),
    Scenario(
        "failback",
        "A",
        _failback_setup,
        lambda e, s: standby.failback(e, IDENTITY, KEY, s.address),
        _finish_failback,
        "standby",
        45,
    ),
]


class Case:
    def __init__(self, tmp: Path, sc: Scenario, checksums: bool) -> None:
        self.sc, self.tmp = sc, tmp
        self.rng = random.Random(len(sc.name) * 17 + checksums)
        self.counts: Counter[str] = Counter()
        self.sides = {"A": Side(tmp / "a.img", free_port()), "B": Side(tmp / "b.img", free_port())}
        crashed, peer = self.sides[sc.crashed], self.sides["B" if sc.crashed == "A" else "A"]
        self.crashed, self.peer = crashed, peer
        engines: dict[str, Engine] = {}
        for name, side in self.sides.items():
            Device.create_image(str(side.path)).close()
            dev = RecordingDevice(str(side.path))
            dev.lock()
            pool = Pool.format(dev, BS, SIZE, True, cache_bytes=8 << 20, checksums=checksums)
            engines[name] = side.open(Engine(dev, pool, "move", 8 << 20))
        a, b = engines["A"], engines["B"]
        write(a, 1, 0, 16)
        standby.attach(a, self.sides["B"].address, IDENTITY, KEY, self.sides["A"].address)
        write(a, 2, 4, 4)
        standby.sync(a, IDENTITY, KEY)
        sc.setup(a, b, self.sides["A"], self.sides["B"])
        eng = engines[sc.crashed]
        settle(eng)
        self.before = role_state(eng)
        dev = eng.device
        assert isinstance(dev, RecordingDevice)
        dev.start_recording()
        self.peer_at: list[bytes] = []  # the peer's image when the k-th sync began
        peer_engine = engines["B" if sc.crashed == "A" else "A"]

        def capture() -> None:
            with peer_engine.lock:  # the peer between two of its operations
                self.peer_at.append(peer.path.read_bytes())

        dev.before_sync = capture
        sc.run(eng, crashed)
        settle(eng)
        dev.recording = False
        self.after = role_state(eng)
        assert self.after["role"] == sc.want_after, self.after
        self.ops, self.base = dev.ops, dev.base
        for side in self.sides.values():
            side.close()
        self.peer_at.append(self.peer.path.read_bytes())  # after the last flush point
        self.rp = Replayer(self.base, self.ops)

    def replay(self) -> Counter[str]:
        seen: set[bytes] = set()
        plans = [
            p
            for k in range(self.rp.flush_points)
            for _ in range(4)
            for p in self.rp.sample(k, self.rng)
        ]
        for plan in plans:
            img = self.rp.build(plan)
            digest = hashlib.blake2b(img, digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            torn = suspect_slots(self.rp, plan, img)
            peer = self.peer_at[min(plan.k, len(self.peer_at) - 1)]
            try:
                self.verify(img, torn, peer)
            except Exception as e:
                raise AssertionError(
                    f"{self.sc.name}: {type(e).__name__}: {e}\n  crash at {plan.describe(self.ops)}"
                ) from e
            self.counts["states"] += 1
            self.counts[plan.kind] += 1
        return self.counts

    def verify(self, img: bytearray, torn: set[int], peer_image: bytes) -> None:
        write_image(img, str(self.crashed.path))
        self.peer.path.write_bytes(peer_image)
        assert_checks_clean(self.crashed.path, torn)
        crashed = self.crashed.open()
        peer = self.peer.open()
        try:
            settle(crashed)
            got = role_state(crashed)
            if got == self.before:
                self.counts["before"] += 1
            elif got == self.after:
                self.counts["after"] += 1
            else:
                raise AssertionError(
                    f"neither before nor after: {got}\n  before {self.before}\n  after {self.after}"
                )
            self.sc.complete(crashed, peer, self.crashed)
            assert role_state(crashed)["role"] == self.sc.want_after
        finally:
            self.crashed.close()
            self.peer.close()
        assert_checks_clean(self.crashed.path, set())


def assert_checks_clean(path: Path, torn_slots: set[int]) -> None:
    dev = Device(str(path), readonly=True)
    try:
        report = checker.check(dev)
    finally:
        dev.close()
    allowed = {f"superblock slot {s}" for s in torn_slots}
    bad = [d for d in report.defects if not (d.kind == "superblock" and d.where in allowed)]
    assert not bad, "checker: " + "; ".join(d.message for d in bad[:5])


@pytest.mark.engine_log(SLOT_UNUSABLE, COMMIT_FAILED)
@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "csum"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_power_cut_inside_a_role_change(
    tmp_path: Path, scenario: Scenario, checksums: bool
) -> None:
    case = Case(tmp_path, scenario, checksums)
    counts = case.replay()
    shutil.rmtree(tmp_path, ignore_errors=True)
    TOTALS.update(counts)
    TOTALS["cases"] += 1
    print(f"\n{scenario.name} checksums={checksums}: {dict(counts)}")
    assert counts["states"] >= scenario.min_states, dict(counts)
    assert counts["before"] and counts["after"], f"not both sides reached: {dict(counts)}"


def test_power_cut_role_totals() -> None:
    """Runs last in this module: every case ran; their crash states, in all."""
    assert TOTALS["cases"] == 2 * len(SCENARIOS), "run the whole module"
    print(f"\npower cuts inside role changes: {dict(TOTALS)}")
    assert TOTALS["states"] >= MIN_TOTAL_STATES, dict(TOTALS)

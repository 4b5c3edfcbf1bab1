"""Power cuts through a real nbdkit: record the I/O of a real server under real load, rebuild the
disk as a power cut would leave it at sampled points, and open each crash image with a real
nbdkit restart.

The server runs tests/recording_plugin.py (plugin/plugin.py over a device that logs every
write, sync, discard and truncate to a file). Three libnbd clients write self-describing slots
and flush, some writes with FUA; a fourth thread creates and deletes snapshots on the control
socket. Every acknowledgement a client receives is stamped with the log's size at that moment:
the ops that led to it are in the log before that position, so a crash image cut after the
k-th completed sync must honour every acknowledgement whose position held at most k syncs.

tests/crashsim.py's Replayer cuts the log: the clean cut at a flush point, prefixes, subsets,
reorderings and torn writes of the operations after it (superblock writes torn too). For each
crash image (CRASH_STATES per run, deduplicated):

* the checker finds nothing, except that a superblock slot whose write was torn may fail its
  checksum;
* a real nbdkit opens it; every sector of live holds a whole sector of a write of that slot no
  older than the newest one acknowledged as durable (FLUSH or FUA) at that point;
* every snapshot whose create was acknowledged exists unless a delete had been sent, every
  snapshot whose delete was acknowledged is gone, nothing unknown appears, and each snapshot
  reads within what it could hold when it was taken.

Run once per first-write policy (cow=move, cow=copy); DITTOFS_CRASH_STATES sets the count
per run.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from crashsim import CrashPlan, Replayer, suspect_slots, write_image
from harness import REPO, NbdkitServer
from support.iolog import read_log
from support.logcheck import SLOT_UNUSABLE
from t8_helpers import check_image, close_quietly, describe
from t8_load import Snap, Snapshotter, Writer, unexplained, verify_export

from fsimpl.client import SocketClient

CRASH_STATES = int(os.environ.get("DITTOFS_CRASH_STATES", "130"))  # per cow mode
SIZE = 1 << 20
CLIENTS = 3
SLOTS = 64  # per client: 768 KiB written, the last 256 KiB never
LOAD_SECONDS = 2.0


class RecordingServer(NbdkitServer):
    def __init__(self, *args: object, record: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.env["DITTOFS_RECORD"] = str(record)

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index(str(REPO / "plugin" / "plugin.py"))
        cmd[i] = str(REPO / "tests" / "recording_plugin.py")
        return cmd


@pytest.mark.engine_log(SLOT_UNUSABLE)
@pytest.mark.parametrize("cow", ["move", "copy"])
def test_power_cuts_through_a_real_nbdkit(tmp_path: Path, cow: str) -> None:
    t0 = time.monotonic()
    rng = random.Random(int(os.environ.get("DITTOFS_SEED", "31")) + (cow == "copy"))
    disk = tmp_path / "pool.img"
    log = tmp_path / "io.log"
    # the base image: a new pool (4 KiB blocks, so the log stays small), served once
    prep = NbdkitServer(tmp_path, disk, size=str(SIZE), params={"block-size": "4K"}, name="prep")
    prep.start()
    prep.stop()
    base = disk.read_bytes()

    srv = RecordingServer(tmp_path, disk, cow=cow, name="rec", record=log)
    writers = [Writer(c + 1, SLOTS) for c in range(CLIENTS)]
    snaps: dict[str, Snap] = {}

    def mark() -> int:
        return os.stat(log).st_size

    try:
        srv.start()
        stop, killed = threading.Event(), threading.Event()
        handles = [srv.connect("live") for _ in writers]
        shot = Snapshotter(srv, writers, snaps, mark=mark)
        shot.killed = killed
        threads = [
            threading.Thread(
                target=w.run, args=(h, random.Random(rng.random()), stop, mark, killed)
            )
            for w, h in zip(writers, handles, strict=True)
        ]
        threads.append(threading.Thread(target=shot.run, args=(random.Random(7), stop, 0)))
        for t in threads:
            t.start()
        time.sleep(LOAD_SECONDS)
        killed.set()
        srv.kill()  # the power cut itself may come at any point: the replay picks them
        stop.set()
        for t in threads:
            t.join(30)
        for h in handles:
            close_quietly(h)
        bad = unexplained([f for w in writers for f in w.failures] + shot.failures)
        assert not bad, f"errors under load not caused by the kill: {bad[:5]}"
    finally:
        srv.kill()

    ops, ends = read_log(log)
    rp = Replayer(base, ops)
    sync_ends = [ends[i] for i in rp.sync_at]  # log position after each completed sync

    def syncs_before(pos: int) -> int:
        """Completed syncs recorded at or before log position pos."""
        return bisect.bisect_right(sync_ends, pos)

    # floors per flush point: the newest acknowledgement each client can rely on
    events = sorted(
        (syncs_before(pos), w.cid - 1, floor) for w in writers for pos, floor in w.events
    )
    hi = [list(w.issued) for w in writers]

    # Sample plans at up to 2 * CRASH_STATES flush points, drop those that build an image
    # already seen (many cuts give the same disk), then keep CRASH_STATES of them at random.
    sampled: list[CrashPlan] = []
    points = sorted(rng.sample(range(rp.flush_points), min(rp.flush_points, 2 * CRASH_STATES)))
    for k in points:
        sampled += rp.sample(k, rng, extra=1)
    last = rp.flush_points - 1
    sampled.append(CrashPlan(last, [(i, None) for i in rp.epoch(last)], kind="prefix"))
    sampled.sort(key=lambda p: p.k)
    seen: set[bytes] = set()
    plans: list[CrashPlan] = []
    for plan in sampled:
        digest = hashlib.blake2b(rp.build(plan), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            plans.append(plan)
    duplicates = len(sampled) - len(plans)
    if len(plans) > CRASH_STATES:
        keep = set(rng.sample(range(len(plans)), CRASH_STATES))
        plans = [p for i, p in enumerate(plans) if i in keep]

    crash = tmp_path / "crash.img"
    counts: Counter[str] = Counter()
    counts["duplicate"] = duplicates
    floor = [[0] * SLOTS for _ in writers]
    ev = 0
    for n, plan in enumerate(plans):
        while ev < len(events) and events[ev][0] <= plan.k:
            _, c, f = events[ev]
            floor[c] = [max(a, b) for a, b in zip(floor[c], f, strict=True)]
            ev += 1
        img = rp.build(plan)
        write_image(img, str(crash))
        why = f"crash state {n}: {plan.describe()}"
        # the end of the last op this image holds, as a log position
        last = max([i for i, _ in plan.kept] + [rp.sync_at[plan.k - 1] if plan.k else -1])
        end_pos = ends[last] if last >= 0 else 0

        torn = {f"superblock slot {slot}" for slot in suspect_slots(rp, plan, img)}
        report = check_image(crash)
        bad = [d for d in report.defects if not (d.kind == "superblock" and d.where in torn)]
        assert not bad, f"{why}: the checker found: {describe(report)}"
        counts["torn slot"] += len(report.defects) - len(bad)

        opened = NbdkitServer(tmp_path, crash, cow=cow, name="crash")
        try:
            opened.start()
            verify_export(opened, "live", floor, hi, f"{why}: live", SIZE, whole_slots=False)
            ctl = SocketClient(str(opened.control), timeout=30)
            try:
                present = {s["name"] for s in ctl.call("list")}
            finally:
                ctl.close()
            for name, snap in snaps.items():
                durable = snap.created_at >= 0 and syncs_before(snap.created_at) <= plan.k
                undeleted = snap.delete_sent < 0 or end_pos <= snap.delete_sent
                if durable and undeleted:
                    assert name in present, f"{why}: snapshot {name} (create answered) is gone"
                if snap.deleted_at >= 0 and syncs_before(snap.deleted_at) <= plan.k:
                    assert name not in present, f"{why}: deleted snapshot {name} is back"
            assert present <= set(snaps), f"{why}: unknown snapshots {present - set(snaps)}"
            for name in sorted(present):
                snap = snaps[name]
                assert snap.hi is not None
                verify_export(
                    opened, f"live@{name}", snap.lo, snap.hi, f"{why}: {name}", SIZE, False
                )
                counts["snapshot reads"] += 1
        finally:
            opened.kill()
        counts["states"] += 1
        counts[plan.kind] += 1
    dt = time.monotonic() - t0
    print(
        f"\npower cuts through nbdkit (cow={cow}): {counts['states']} crash states opened "
        "by a real nbdkit "
        f"({counts['clean']} clean cuts, {counts['prefix']} prefix, {counts['subset']} subset, "
        f"{counts['reorder']} reorder, {counts['torn']} torn; {counts['torn slot']} torn "
        f"superblock slots flagged; {counts['duplicate']} duplicates skipped), "
        f"{counts['snapshot reads']} snapshot reads verified; from {len(ops)} recorded ops, "
        f"{rp.flush_points} flush points, {sum(w.writes for w in writers)} writes, "
        f"{sum(w.flushes for w in writers)} flushes, {shot.counts['created']} snapshots "
        f"created, {shot.counts['deleted']} deleted; {dt:.1f}s"
    )
    assert counts["states"] >= min(CRASH_STATES, 100), "too few distinct crash states"
    assert counts["torn"] and counts["subset"]
    shutil.rmtree(tmp_path / "run", ignore_errors=True)

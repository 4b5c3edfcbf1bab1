"""kill -9 under load: writers on several NBD connections, snapshots created and deleted on the
control socket, and the server killed at a random moment, over and over (ROUNDS times).

Each writer owns a range of 4 KiB slots of live and writes self-describing sectors
(tests/t8_helpers.py: client, slot, sequence number), sometimes several slots at once,
sometimes with FUA, and flushes at random. Per slot it tracks the newest write a FLUSH or FUA
made durable (the floor), the newest write that completed, and the newest one issued. A
snapshot thread creates and deletes snapshots, recording for each the writes that had
completed before the request was sent and those issued by the time the answer came.

After every kill -9 the pool on disk is checked in-process (clean: no defect at all, leaks
included); then the server restarts and every slot of live must hold whole sectors of one write
of that slot between its floor and the newest issued (nothing flushed is lost, nothing is
garbage), every snapshot whose create was answered must exist and read within its bounds, every
snapshot whose delete was answered must be gone, and nothing else may appear. Rounds alternate
cow=move / cow=copy and the serialize / parallel thread models. DITTOFS_KILL_ROUNDS overrides
the count.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

from harness import NbdkitServer
from t8_helpers import check_image, close_quietly, describe
from t8_load import Snap, Snapshotter, Writer, unexplained, verify_export

from fsimpl.client import SocketClient

ROUNDS = int(os.environ.get("DITTOFS_KILL_ROUNDS", "110"))
MIN_ROUNDS = 100 if "DITTOFS_KILL_ROUNDS" not in os.environ else ROUNDS
SLOT = 4096
SIZE = 2 << 20
CLIENTS = 3
SLOTS = 128  # per client: 512 KiB each, the last 512 KiB of live is never written
MODES = [("move", "serialize"), ("copy", "parallel"), ("move", "parallel"), ("copy", "serialize")]


def test_kill_minus_9_under_load(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("DITTOFS_SEED", "8")))
    disk = tmp_path / "pool.img"
    writers = [Writer(c + 1, SLOTS) for c in range(CLIENTS)]
    snaps: dict[str, Snap] = {}
    totals: Counter[str] = Counter()
    srv: NbdkitServer | None = None
    t0 = time.monotonic()
    try:
        for r in range(ROUNDS):
            cow, threads = MODES[r % len(MODES)]
            srv = NbdkitServer(
                tmp_path,
                disk,
                size=str(SIZE),
                cow=cow,
                params={"threads": threads},
                name=f"r{r % 2}",
            )
            srv.start()
            why = f"round {r} (cow={cow}, threads={threads}, after kill -9 #{r})"
            if r:
                verify_round(srv, writers, snaps, why, totals, check_online=r % 10 == 0)

            stop, killed = threading.Event(), threading.Event()
            handles = [srv.connect("live") for _ in writers]
            shot = Snapshotter(srv, writers, snaps)
            shot.killed = killed
            threads_ = [
                threading.Thread(
                    target=w.run, args=(h, random.Random(rng.random()), stop, None, killed)
                )
                for w, h in zip(writers, handles, strict=True)
            ]
            threads_.append(
                threading.Thread(target=shot.run, args=(random.Random(rng.random()), stop, r))
            )
            for t in threads_:
                t.start()
            time.sleep(rng.uniform(0.05, 0.35))
            killed.set()
            srv.kill()  # SIGKILL, at whatever the server was doing
            stop.set()
            for t in threads_:
                t.join(30)
                assert not t.is_alive(), f"{why}: a client hung after the kill"
            failures = [f for w in writers for f in w.failures] + shot.failures
            bad = unexplained(failures)
            assert not bad, f"{why}: errors not caused by the kill: {bad[:5]}"
            totals["cut errors"] += len(failures)
            for w in writers:
                w.failures.clear()
            for h in handles:
                close_quietly(h)
            totals.update(shot.counts)
            totals["kills"] += 1

            report = check_image(disk)
            # a kill between a commit's two superblock copies leaves the second one stale: a
            # healable defect (the next open rewrites it), and the only one allowed
            bad = [
                d for d in report.defects if not (d.kind == "superblock" and "stale" in d.message)
            ]
            assert not bad, f"{why}: the checker after kill -9: {describe(report)}"
            totals["stale second superblock copy"] += len(report.defects) - len(bad)
            totals["checks"] += 1
        srv = NbdkitServer(tmp_path, disk, name="final")
        srv.start()
        verify_round(srv, writers, snaps, "after the last kill", totals, check_online=True)
        srv.stop()
    finally:
        if srv is not None:
            srv.kill()
    totals["writes"] = sum(w.writes for w in writers)
    totals["flushes"] = sum(w.flushes for w in writers)
    print(
        f"\nkill -9 under load: {totals['kills']} kills, {totals['checks']} clean checks, "
        f"{totals['writes']} writes, {totals['flushes']} flushes, {totals['created']} "
        f"snapshots created, {totals['deleted']} deleted, {totals['verified_snaps']} snapshot "
        f"reads verified, {totals['unflushed_kept']} unflushed slots survived, "
        f"{totals['unflushed_lost']} rolled back to their floor, {totals['cut errors']} "
        f"errors from the cut connections and none other; {time.monotonic() - t0:.1f}s"
    )
    assert totals["kills"] == ROUNDS >= MIN_ROUNDS, totals
    assert totals["checks"] == ROUNDS, totals
    assert totals["created"] and totals["deleted"] and totals["flushes"]


def verify_round(
    srv: NbdkitServer,
    writers: list[Writer],
    snaps: dict[str, Snap],
    why: str,
    totals: Counter[str],
    check_online: bool,
) -> None:
    lo = [w.floor for w in writers]
    hi = [w.issued for w in writers]
    seqs = verify_export(srv, "live", lo, hi, why, SIZE)
    for w, got in zip(writers, seqs, strict=True):
        for s in range(SLOTS):
            if w.issued[s] > w.floor[s]:
                totals["unflushed_kept" if got[s] > w.floor[s] else "unflushed_lost"] += 1
        w.settle(got)

    c = SocketClient(str(srv.control), timeout=30)
    try:
        present = {s["name"] for s in c.call("list")}
        if check_online:
            report = c.call("check")
            assert report["clean"], f"{why}: check through the server: {report['defects'][:5]}"
    finally:
        c.close()
    for name, snap in list(snaps.items()):
        if snap.state == "acked":
            assert name in present, f"{why}: snapshot {name} (create answered) is gone"
        if snap.state == "deleted":
            assert name not in present, f"{why}: snapshot {name} (delete answered) is back"
            del snaps[name]
            continue
        if name not in present:  # an unanswered create that did not happen, or delete that did
            del snaps[name]
            continue
        snap.state = "acked"
    unknown = present - set(snaps)
    assert not unknown, f"{why}: snapshots nobody created: {unknown}"
    for name in sorted(present):
        snap = snaps[name]
        assert snap.hi is not None
        verify_export(srv, f"live@{name}", snap.lo, snap.hi, f"{why}: snapshot {name}", SIZE)
        totals["verified_snaps"] += 1

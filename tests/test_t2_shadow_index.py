"""The shadow index (fsimpl/shadow_index.py) answers FIG. 10's walk with one descent. Changed
entry by entry by every write, trim, snapshot create, delete, rollback and restart, it must
agree with the walk itself for every snapshot and every block, and its two trees (by block, by
snapshot) must hold the same entries, and the one-pass count of every snapshot's unique blocks
must agree with each snapshot's own, and what deleting any set of snapshots would free must be
what a walk of the whole chain, run by run, finds."""

from __future__ import annotations

import random
from pathlib import Path

from model import Model, Workload
from test_t3_model import EngineTarget

from fsimpl.layout import EMPTY_ENTRY
from fsimpl.snapshots import freed_by_deleting, range_freed, unique_blocks, unique_blocks_all
from fsimpl.volume import Volume


def walk(vol: Volume, snap_id: int, block: int) -> int:
    """FIG. 10 literally: the first snapshot from snap_id on with an entry (0: live)."""
    for sid in vol.chain:
        if sid >= snap_id and vol.shadows[sid].get(block) != EMPTY_ENTRY:
            return sid
    return 0


def freed_walking_the_chain(vol: Volume, gone: set[int]) -> int:
    """Blocks freed by deleting gone: every run of consecutive deleted snapshots, found by
    walking the whole chain (what freed_by_deleting finds by bisection)."""
    total = 0
    run: list[int] = []
    for sid in [*vol.chain, 0]:
        if sid in gone:
            run.append(sid)
        elif run:
            total += unique_blocks(vol, run[0]) if len(run) == 1 else range_freed(vol, run)
            run = []
    return total


def test_index_agrees_with_the_walk(tmp_path: Path) -> None:
    size = 1 << 20
    target = EngineTarget(tmp_path / "pool.img", size, "move")
    wl = Workload(Model(size, 4096), target, random.Random(11))
    compared = 0
    for i in range(1, 2001):
        wl.step()
        if i % 100 == 0:
            vol = target.engine.volume("live")
            index = vol.shadow_index
            if index is None:
                continue
            blocks = size // 4096
            for sid in vol.chain:
                for b in range(blocks):
                    found = index.serving(sid, b)
                    assert (found[0] if found else 0) == walk(vol, sid, b), (sid, b, wl.log[-8:])
                    compared += 1
            # both trees hold the same entries, each of a snapshot of this volume, and each
            # snapshot's counter counts its own
            by_block = {(sid, b) for b, sid, _ in index.all_entries()}
            assert by_block == set(index.all_listed())
            assert {sid for sid, _ in by_block} <= set(vol.chain)
            unique = unique_blocks_all(vol)  # what list shows, in one pass
            for sid in vol.chain:
                own = sum(1 for s, _ in by_block if s == sid)
                assert vol.shadows[sid].inode.entry_count == own
                assert unique.get(sid, 0) == unique_blocks(vol, sid), sid
            rng = random.Random(i)
            for _ in range(20):  # sets with runs of neighbours, and ones with gaps
                gone = {sid for sid in vol.chain if rng.random() < rng.choice([0.2, 0.5, 0.9])}
                # ids of no snapshot of this volume (gone, or another volume's): ignored
                gone |= {n for n in range(1, max(vol.chain) + 9) if n not in vol.shadows}
                assert freed_by_deleting(vol, gone) == freed_walking_the_chain(vol, gone)
            wl.check_all()
    assert compared > 10_000  # the workload kept snapshots around to compare

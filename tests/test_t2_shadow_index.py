"""The shadow index (fsimpl/shadow_index.py) answers FIG. 10's walk with one descent. Changed
entry by entry by every write, trim, snapshot create, delete, rollback and restart, it must
agree with the walk itself for every snapshot and every block, and its two trees (by block, by
snapshot) must hold the same entries, and the one-pass count of every snapshot's unique blocks
must agree with each snapshot's own."""

from __future__ import annotations

import random
from pathlib import Path

from model import Model, Workload
from test_t3_model import EngineTarget

from fsimpl.layout import EMPTY_ENTRY
from fsimpl.snapshots import unique_blocks, unique_blocks_all
from fsimpl.volume import Volume


def walk(vol: Volume, snap_id: int, block: int) -> int:
    """FIG. 10 literally: the first snapshot from snap_id on with an entry (0: live)."""
    for sid in vol.chain:
        if sid >= snap_id and vol.shadows[sid].get(block) != EMPTY_ENTRY:
            return sid
    return 0


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
            wl.check_all()
    assert compared > 10_000  # the workload kept snapshots around to compare

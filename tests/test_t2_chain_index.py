"""The chain index (fsimpl/chain_index.py) answers FIG. 10's walk with one bisect. Kept exact
by the shadow maps through every write, trim, snapshot create, delete, rollback and restart,
it must agree with the walk itself for every snapshot and every block."""

from __future__ import annotations

import random
from pathlib import Path

from model import Model, Workload
from test_t3_model import EngineTarget

from fsimpl.layout import EMPTY_ENTRY
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
            blocks = size // 4096
            for sid in vol.chain:
                for b in range(blocks):
                    assert vol.index.serving(sid, b) == walk(vol, sid, b), (sid, b, wl.log[-8:])
                    compared += 1
            wl.check_all()
    assert compared > 10_000  # the workload kept snapshots around to compare
    target.engine.close()

"""Background work: the long operations' bounded steps, deferred merges and the periodic commit.

Long operations (snapshot delete, rollback, volume delete, flatten) are recorded in the pool
first (a snapshot marked deleting, a volume's pending op) and committed, so they complete even
across a crash: whoever opens the pool next resumes them here. Each step runs under the engine
lock for at most STEP_SECONDS (or as much metadata as a commit on a full pool is sure to fit),
then releases it so requests go on. Deferred merges of incomplete blocks run only while live
is idle for MERGE_IDLE seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import snapshots as snapops
from .core import EngineCore, Progress
from .layout import OP_DELETE, OP_FLATTEN, OP_NONE, OP_ROLLBACK

MERGE_IDLE = 1.0  # seconds without live writes before deferred merges run in the background


class BackgroundWork:
    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def tick(self, merges: bool = True) -> bool:
        """Periodic work: take one step of a pending delete or rollback (else of the deferred
        merges, when live is idle and merges is true), and commit a change older than
        COMMIT_INTERVAL. Returns True while background work remains."""
        core = self.core
        with core.lock:
            core.usable()
            more = self.step()
            if merges and not more and time.monotonic() - core.last_write >= MERGE_IDLE:
                more = self.merge_step()
            core.commit_if_due()
            return more

    def run_until_done(
        self, busy: Callable[[], bool], progress: Progress | None, left: Callable[[], int]
    ) -> None:
        """Run steps until busy() turns false, releasing the lock between steps. busy and left
        are re-evaluated under the lock against the current pool (it may have been reloaded);
        progress is reported outside the lock, so a slow reader of it never stalls requests."""
        core = self.core
        total = -1
        while True:
            with core.lock:
                if not busy():
                    break
                if not self.step() and busy():
                    break  # nothing left that could end the wait: the caller re-checks
                remaining = left() if progress else 0
            if progress:
                total = max(total, remaining)
                progress(total - remaining, total)
            time.sleep(0)  # let request threads take the lock

    def step(self) -> bool:
        """One bounded step: pending deletes first (a rollback waits for the newer snapshots
        it destroys), then rollbacks, volume deletes and flattens. Caller holds the lock. True
        while work remains."""
        core = self.core
        pool = core.pool
        stop = core.step_budget()
        # a snapshot that clones still read waits for them (they go first in a recursive
        # volume delete), so no committed state ever has a clone without its origin
        pending = [
            s
            for s in pool.pending_deletes()
            if not any(pool.clones_of(v, s) for v in pool.covering(s))
        ]
        if pending:
            sid = pending[0]
            done = all(snapops.delete_step(pool.ctx, v, sid, stop) for v in pool.covering(sid))
            if done:
                pool.finish_delete(sid)
            core.keep_commit_room()
            return True
        for vol in list(pool.volumes.values()):
            op = vol.inode.op
            if op == OP_ROLLBACK:
                sid = vol.inode.op_target
                if snapops.rollback_step(pool.ctx, vol, sid, stop):
                    pool.finish_rollback(vol, sid)
                    core.commit()
            elif op == OP_DELETE:
                if pool.clones_of(vol):
                    continue  # its clones go first
                # live first: its incomplete blocks point into the snapshots' blocks
                if snapops.free_map_step(pool.ctx, vol.live, stop) and all(
                    snapops.free_shadow_step(pool.ctx, vol.shadows[s], stop) for s in vol.chain
                ):
                    pool.finish_volume_delete(vol)
                    core.commit()
            elif op == OP_FLATTEN:
                # a step takes its copies whole or not at all, so a full pool can make room
                # (merges, expired deferred frees) and run it again
                target = vol.inode.op_target
                vol.inode.op_target = core.making_room(
                    lambda: snapops.flatten_step(pool.ctx, vol, target, stop)  # noqa: B023
                )
                pool.touch_inode(vol.inode)
                if vol.inode.op_target >= vol.origin_blocks:
                    vol.inode.op = OP_NONE
                    vol.inode.op_target = vol.inode.origin_vol = vol.inode.origin_snap = 0
                    vol.origin = None
                    core.commit()
            else:
                continue
            core.keep_commit_room()
            return True
        return False

    def merge_step(self) -> bool:
        """Complete deferred merges while the pool is idle, a bounded batch at a time. True
        while incomplete blocks remain."""
        core = self.core
        stop = core.step_budget()
        for vol in core.pool.volumes.values():
            if vol.inode.op != OP_NONE:
                continue  # being rolled back, deleted, flattened or received: not now
            if not vol.incomplete:
                vol.find_incomplete(stop)
            while vol.incomplete and not stop():
                vol.settle(core.pool.ctx, next(iter(vol.incomplete)))
        core.keep_commit_room()
        return any(
            v.inode.op == OP_NONE and v.live.inode.incomplete_blocks and not v.scanned_all
            for v in core.pool.volumes.values()
        )

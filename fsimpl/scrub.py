"""Scrub as background work in the server: resumable, rate-limited, with status and stop.

A scrub makes two passes. The metadata pass verifies both copies of every node of every
metadata tree, queueing a bad copy beside a good one for rewriting at the next commit (the
heal) and counting a node with no good copy as an error. The data pass reads every data block
of live and of every snapshot and, on a pool with data checksums, verifies it.

The work is done in bounded steps by the server's ticker, each under the engine lock for a few
milliseconds, so requests are never held up for long. Where the scrub is (pass, tree or map,
node or block), its rate and its counters live in the superblock: the ticker's periodic commits
save them, so a scrub stopped by `scrub --stop`, or by a restart or a crash, resumes close to
where it was. Trees and maps are taken in a stable order (by name, by inode and snapshot id);
whatever changed meanwhile is verified as it is then.
"""

from __future__ import annotations

import time

from .core import OperationModule
from .errors import DamagedPool, DittoError, Refused
from .layout import KIND_ADDR
from .volume import read_checked

IDLE, RUNNING, STOPPED, FINISHED = 0, 1, 2, 3
STATE_NAMES = {IDLE: "never run", RUNNING: "running", STOPPED: "stopped", FINISHED: "finished"}
STEP_NODES = 64  # metadata nodes per step
STEP_BLOCKS = 32  # data blocks per step


class Scrub(OperationModule):
    def start(self, rate: int = 0) -> dict[str, object]:
        """Start a scrub, or resume a stopped one (rate: bytes per second, 0 unlimited)."""
        with self.lock:
            sb = self.pool.sb
            if self.pool.read_only_reason:  # it heals by committing
                raise DamagedPool(self.pool.read_only_reason)
            if sb.scrub_state == RUNNING:
                raise Refused(
                    "a scrub is already running: 'snapctl scrub --status' shows it, "
                    "'snapctl scrub --stop' stops it"
                )
            if sb.scrub_state != STOPPED:  # a new scrub (a stopped one resumes)
                sb.scrub_pass = sb.scrub_item = sb.scrub_key = 0
                sb.scrub_bytes = sb.scrub_healed = sb.scrub_errors = 0
                sb.scrub_started_ns = time.time_ns()
                sb.scrub_ended_ns = 0
            sb.scrub_state = RUNNING
            sb.scrub_rate = rate
            self.core.started_scrub = time.monotonic()
            self.core.scrubbed_since_start = 0
            self.pool.sb_dirty = True
            self.core.commit()
            return self.status()

    def stop(self) -> dict[str, object]:
        with self.lock:
            sb = self.pool.sb
            if sb.scrub_state != RUNNING:
                raise Refused("no scrub is running ('snapctl scrub' starts one)")
            sb.scrub_state = STOPPED
            sb.scrub_ended_ns = time.time_ns()
            self.pool.sb_dirty = True
            self.core.commit()
            return self.status()

    def status(self) -> dict[str, object]:
        with self.lock:
            sb = self.pool.sb
            return {
                "state": STATE_NAMES.get(sb.scrub_state, "?"),
                "pass": "metadata" if sb.scrub_pass == 0 else "data",
                "rate": sb.scrub_rate,
                "started_ns": sb.scrub_started_ns,
                "ended_ns": sb.scrub_ended_ns,
                "bytes": sb.scrub_bytes,
                "healed": sb.scrub_healed,
                "errors": sb.scrub_errors,
                "checksums": self.pool.ctx.checksums,
                "found": list(self.core.scrub_found),
            }

    def step(self) -> bool:
        """One bounded step of a running scrub (the ticker's; caller holds the lock). True
        while it runs and is not waiting for its rate."""
        sb = self.pool.sb
        if sb.scrub_state != RUNNING:
            return False
        if not self.core.started_scrub:  # resumed after a restart
            self.core.started_scrub = time.monotonic()
        if sb.scrub_rate:
            elapsed = time.monotonic() - self.core.started_scrub
            if self.core.scrubbed_since_start > sb.scrub_rate * elapsed:
                return False  # ahead of the rate: wait for the next tick
        before = sb.scrub_bytes
        if sb.scrub_pass == 0:
            self._metadata_step()
        else:
            self._data_step()
        self.core.scrubbed_since_start += sb.scrub_bytes - before
        self.pool.sb_dirty = True  # the position: saved by the ticker's periodic commit
        return sb.scrub_state == RUNNING

    def _metadata_step(self) -> None:
        pool, sb = self.pool, self.pool.sb
        trees = sorted(pool.metadata_trees(), key=lambda t: t[0])
        if sb.scrub_item >= len(trees):
            sb.scrub_pass, sb.scrub_item, sb.scrub_key = 1, 0, 0
            return
        name, tree = trees[sb.scrub_item]
        if tree.is_dirty:  # the walk reads committed nodes: commit the changes first
            self.core.commit()
        store = tree.store
        done = 0
        try:
            for i, (ptr, level) in enumerate(tree.all_node_pointers()):
                if i < sb.scrub_key:
                    continue
                if done == STEP_NODES:
                    sb.scrub_key = i
                    return
                done += 1
                sb.scrub_bytes += store.block_size * (2 if ptr.addr1 else 1)
                bad = store.bad_copies(ptr, tree.block_type(level))
                copies = 2 if ptr.addr1 else 1
                if len(bad) == copies:
                    sb.scrub_errors += 1
                    self._found(f"{name}: {bad[0][1]}")
                elif bad and bad[0][0] not in store.heals:
                    addr, problem = bad[0]
                    good = ptr.addr1 if addr == ptr.addr0 else ptr.addr0
                    data = self.core.device.pread(store.block_size, good * store.block_size)
                    store.queue_heal(addr, good, bytes(data), f"scrub: {problem}; its twin")
                    sb.scrub_healed += 1
        except DittoError as e:  # an interior node with no good copy: the rest of this tree
            sb.scrub_errors += 1
            self._found(f"{name}: {e}")
        sb.scrub_item, sb.scrub_key = sb.scrub_item + 1, 0

    def _data_step(self) -> None:
        pool, sb = self.pool, self.pool.sb
        maps = sorted(
            ((v.ino, sid, v) for v in pool.volumes.values() for sid in [0, *v.chain]),
            key=lambda t: (t[0], t[1]),
        )
        if sb.scrub_item >= len(maps):
            sb.scrub_state, sb.scrub_ended_ns = FINISHED, time.time_ns()
            return
        _, sid, vol = maps[sb.scrub_item]
        m = vol.shadows[sid] if sid else vol.live
        label = f"{vol.name}@{pool.snapshots[sid].name}" if sid else vol.name
        done = 0
        for b, e in m.iter_entries(sb.scrub_key):
            if done == STEP_BLOCKS:
                sb.scrub_key = b
                return
            if e.kind != KIND_ADDR:
                continue
            done += 1
            sb.scrub_bytes += pool.block_size
            try:
                read_checked(pool.ctx, e)
            except DittoError as err:
                sb.scrub_errors += 1
                self._found(f"{label} block {b}: {err}")
        sb.scrub_item, sb.scrub_key = sb.scrub_item + 1, 0

    def _found(self, what: str) -> None:
        found = self.core.scrub_found
        if len(found) < 100:  # the first ones; the count is in the superblock
            found.append(what)

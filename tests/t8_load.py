"""The load of the crash tests (test_t8_killload.py, test_t8_powercut_nbdkit.py): writers that
own ranges of self-describing 4 KiB slots of live and know, per slot, which write a FLUSH or FUA
made durable; a snapshot thread that knows what each snapshot it created may hold. `mark`, when
given, returns the current position in the server's I/O log, so a crash image cut from that log
can be told which acknowledgements it must honour.

Nothing swallows an error: each one is recorded with whether the server had already been killed
(`killed`, set by the test just before the kill). `unexplained()` lists those a test must fail
on: any error before the kill, and after it any that is not the cut connection itself."""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nbd
from harness import NbdkitServer
from t8_helpers import check_slot, close_quietly, slot_data

from fsimpl.client import SocketClient
from fsimpl.errors import DittoError

SLOT = 4096
MAX_SNAPS = 3
Mark = Callable[[], int] | None
CUT = {"ECONNRESET", "EPIPE", "ENOTCONN", "ESHUTDOWN", "ECONNREFUSED", "ENOENT"}


def cut_connection(e: BaseException) -> bool:
    """Is this what a client sees when the server dies under it (and nothing else)?"""
    if isinstance(e, nbd.Error):
        code = e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno or 0, "")
        return code in CUT or (code == "EINVAL" and "invalid state: DEAD" in str(e))
    if isinstance(e, OSError):  # the control socket
        return e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNREFUSED, errno.ENOENT)
    # a control request cut in the middle: the client says it lost or could not reach the server
    said = str(e)
    return any(
        m in said for m in ("closed the connection", "cannot reach the pool's server", "lost the")
    )


@dataclass
class Failure:
    after_kill: bool
    error: BaseException


def unexplained(failures: list[Failure]) -> list[str]:
    return [
        f"{'after' if f.after_kill else 'BEFORE'} the kill: {type(f.error).__name__}: {f.error}"
        for f in failures
        if not (f.after_kill and cut_connection(f.error))
    ]


@dataclass
class Writer:
    cid: int  # 1-based: client 0 would be indistinguishable from zeros
    slots: int
    floor: list[int] = field(default_factory=list)  # durable (flush / FUA)
    done: list[int] = field(default_factory=list)  # write returned
    issued: list[int] = field(default_factory=list)  # write sent
    next_seq: int = 1
    writes: int = 0
    flushes: int = 0
    # (log position once the acknowledgement was received, the floor it established)
    events: list[tuple[int, list[int]]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.floor = [0] * self.slots
        self.done = [0] * self.slots
        self.issued = [0] * self.slots

    def base(self) -> int:
        return (self.cid - 1) * self.slots * SLOT

    def run(
        self,
        h: nbd.NBD,
        rng: random.Random,
        stop: threading.Event,
        mark: Mark = None,
        killed: threading.Event | None = None,
    ) -> None:
        try:
            while not stop.is_set():
                k = rng.choice((1, 1, 1, 2, 4))
                first = rng.randrange(self.slots - k + 1)
                seq = self.next_seq
                self.next_seq += 1
                data = b"".join(slot_data(self.cid, first + i, seq, SLOT) for i in range(k))
                for i in range(k):
                    self.issued[first + i] = seq
                fua = rng.random() < 0.1
                h.pwrite(data, self.base() + first * SLOT, nbd.CMD_FLAG_FUA if fua else 0)
                self.writes += 1
                for i in range(k):
                    self.done[first + i] = seq
                    if fua:
                        self.floor[first + i] = seq
                if fua and mark:
                    self.events.append((mark(), list(self.floor)))
                if rng.random() < 0.2:
                    acked = list(self.done)
                    h.flush()
                    self.flushes += 1
                    self.floor = [max(a, b) for a, b in zip(self.floor, acked, strict=True)]
                    if mark:
                        self.events.append((mark(), list(self.floor)))
        except nbd.Error as e:  # recorded, never swallowed: the test decides
            self.failures.append(Failure(killed is None or killed.is_set(), e))

    def settle(self, seqs: list[int]) -> None:
        """After a restart: what the slots hold now is the committed state."""
        self.floor = list(seqs)
        self.done = list(seqs)
        self.issued = list(seqs)


@dataclass
class Snap:
    lo: list[list[int]]  # per writer, per slot: completed before the create was sent
    hi: list[list[int]] | None  # issued when the answer came (None: not answered yet)
    state: str  # "acked" | "creating" (unanswered) | "deleting" (unanswered) | "deleted"
    created_at: int = -1  # log position once the create was answered (-1: it was not)
    delete_sent: int = -1  # log position when the delete was sent
    deleted_at: int = -1  # log position once the delete was answered


class Snapshotter:
    def __init__(
        self,
        srv: NbdkitServer,
        writers: list[Writer],
        snaps: dict[str, Snap],
        mark: Mark = None,
        max_snaps: int = MAX_SNAPS,
    ) -> None:
        self.srv = srv
        self.mark = mark or (lambda: -1)
        self.max_snaps = max_snaps
        self.writers = writers
        self.snaps = snaps
        self.serial = 0
        self.counts: Counter[str] = Counter()
        self.failures: list[Failure] = []
        self.killed: threading.Event | None = None

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        c = SocketClient(str(self.srv.control), timeout=20)
        try:
            return c.call(op, args)
        finally:
            c.close()

    def run(self, rng: random.Random, stop: threading.Event, round_no: int) -> None:
        try:
            while not stop.is_set():
                time.sleep(rng.uniform(0.01, 0.08))
                live = [n for n, s in self.snaps.items() if s.state == "acked"]
                if len(live) < self.max_snaps and (not live or rng.random() < 0.6):
                    self.serial += 1
                    name = f"k{round_no}-{self.serial}"
                    snap = Snap([list(w.done) for w in self.writers], None, "creating")
                    self.snaps[name] = snap
                    self._call("create", {"name": name})
                    snap.created_at = self.mark()
                    snap.hi = [list(w.issued) for w in self.writers]
                    snap.state = "acked"
                    self.counts["created"] += 1
                elif live:
                    name = rng.choice(live)
                    self.snaps[name].state = "deleting"
                    self.snaps[name].delete_sent = self.mark()
                    self._call("delete", {"name": name})
                    self.snaps[name].deleted_at = self.mark()
                    self.snaps[name].state = "deleted"
                    self.counts["deleted"] += 1
        except (DittoError, OSError) as e:  # the request in flight stays unanswered
            self.failures.append(Failure(self.killed is None or self.killed.is_set(), e))
        for snap in self.snaps.values():
            if snap.hi is None:  # an unanswered create: bounded by what was ever issued
                snap.hi = [list(w.issued) for w in self.writers]


def verify_export(
    srv: NbdkitServer,
    export: str,
    lo: list[list[int]],
    hi: list[list[int]],
    why: str,
    size: int,
    whole_slots: bool = True,
) -> list[list[int]]:
    """Read export whole: every slot of every writer within [lo, hi] (whole_slots: one write
    per slot, as kill -9 leaves it; else sector by sector, as a power cut may), and the part
    no writer owns all zeros. Returns the newest write found per slot."""
    h = srv.connect(export)
    try:
        buf = h.pread(size, 0)
    finally:
        close_quietly(h)
    seqs: list[list[int]] = []
    slots = len(lo[0])
    for c in range(len(lo)):
        base = c * slots * SLOT
        per: list[int] = []
        for s in range(slots):
            got = check_slot(
                buf[base + s * SLOT : base + (s + 1) * SLOT],
                c + 1,
                s,
                lo[c][s],
                hi[c][s],
                f"{why}: {export}",
            )
            if whole_slots:  # a 4 KiB slot is one page of one write: kill -9 cannot tear it
                assert len(set(got)) == 1, f"{why}: {export}: slot {s} mixes writes {got}"
            per.append(max(got))
        seqs.append(per)
    tail = buf[len(lo) * slots * SLOT :]
    assert tail == bytes(len(tail)), f"{why}: {export}: the never-written tail is not zeros"
    return seqs

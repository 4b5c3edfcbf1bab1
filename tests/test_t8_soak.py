"""Soak: several NBD clients at once on live and on snapshots, while snapshots are created and
deleted and every read is verified, for SOAK_SECONDS (DITTOFS_SOAK_SECONDS overrides).

* 3 writers, each on its own connection to live and its own third of it: random writes
  (partial blocks included), read-backs compared with the model, flushes, now and then a trim;
* 3 snapshot readers: each opens a random snapshot (or live@latest), reads random ranges and
  compares them with what the snapshot held; a read may fail (EIO) only once the snapshot's
  delete has been sent;
* a manager on the control socket: creates a snapshot every ~0.4 s (writers paused for that
  instant, so the model of the snapshot is exact), deletes the oldest beyond 4, and runs
  'check' through the server every ~10 s (clean every time).

At the end every export is read whole and compared, the pool is checked on disk, and the
server's RSS (VmRSS) must not grow by more than 10%: the median of the last WINDOW samples
against the median of the first WINDOW after the warm-up. Medians, because one sample swings by
a few per cent with the garbage collector and the allocator's arenas, and a leak does not.
"""

from __future__ import annotations

import errno
import os
import random
import statistics
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import nbd
import pytest
from harness import NbdkitServer
from support.logcheck import NO_SUCH_SNAPSHOT, SNAPSHOT_GONE
from t8_helpers import assert_check_clean, close_quietly, nbd_errno

from fsimpl.client import SocketClient

SOAK_SECONDS = float(os.environ.get("DITTOFS_SOAK_SECONDS", "70"))
WARMUP = min(15.0, SOAK_SECONDS / 4)
WINDOW = 8  # RSS samples (one a second) in each median
SIZE = 6 << 20
WRITERS = 3
READERS = 3
KEEP = 4


class RWLock:
    """Writers of data share it; taking a snapshot holds it alone (writer-preferring)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.shared = 0
        self.exclusive = False

    def acquire_shared(self) -> None:
        with self.cond:
            while self.exclusive:
                self.cond.wait()
            self.shared += 1

    def release_shared(self) -> None:
        with self.cond:
            self.shared -= 1
            self.cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self.cond:
            while self.exclusive:
                self.cond.wait()
            self.exclusive = True
            while self.shared:
                self.cond.wait()

    def release_exclusive(self) -> None:
        with self.cond:
            self.exclusive = False
            self.cond.notify_all()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Soak:
    def __init__(self, srv: NbdkitServer, seed: int) -> None:
        self.srv = srv
        self.rng = random.Random(seed)
        self.live = bytearray(SIZE)
        self.snaps: dict[str, bytes] = {}  # name -> what it holds
        self.order: list[str] = []  # oldest first
        self.doomed: set[str] = set()  # delete sent
        self.meta = threading.Lock()  # guards snaps / order / doomed
        self.lock = RWLock()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.counts: Counter[str] = Counter()

    def fail(self, what: str) -> None:
        self.errors.append(what)
        self.stop.set()

    def guarded(self, name: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - any error of any thread fails the soak
            self.fail(f"{name}: {traceback.format_exc()}")

    def writer(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        region = SIZE // WRITERS
        base = i * region
        h = self.srv.connect("live")
        try:
            while not self.stop.is_set():
                n = rng.choice((512, 4096, 65536, 100_000, 200_000))
                off = base + rng.randrange(0, region - n)
                if rng.random() < 0.05:  # trim whole blocks: they read zeros after
                    first = -(-off // 65536) * 65536
                    end = (off + n) // 65536 * 65536
                    if end > first:
                        self.lock.acquire_shared()
                        try:
                            h.trim(end - first, first)
                            self.live[first:end] = bytes(end - first)
                        finally:
                            self.lock.release_shared()
                        self.counts["trims"] += 1
                    continue
                data = rng.randbytes(n)
                self.lock.acquire_shared()
                try:
                    h.pwrite(data, off)
                    self.live[off : off + n] = data
                finally:
                    self.lock.release_shared()
                self.counts["writes"] += 1
                a = base + rng.randrange(0, region - 65536)
                got = h.pread(65536, a)
                if got != self.live[a : a + 65536]:
                    self.fail(f"writer {i}: live read back wrong data at {a}")
                    return
                self.counts["live reads"] += 1
                if rng.random() < 0.1:
                    h.flush()
                    self.counts["flushes"] += 1
        finally:
            close_quietly(h)

    def reader(self, i: int) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            with self.meta:
                names = [n for n in self.order if n not in self.doomed]
                if not names:
                    name = None
                elif rng.random() < 0.2:
                    name = "latest"
                else:
                    name = rng.choice(names)
                want = self.snaps[names[-1] if name == "latest" else name] if name else None
            if name is None or want is None:
                time.sleep(0.05)
                continue
            try:
                h = self.srv.connect(f"live@{name}")
            except nbd.Error:
                if name != "latest" and name in self.doomed:
                    continue  # deleted between the choice and the connect
                raise
            try:
                if name == "latest":  # the newest when it connected: one of the known ones
                    off = rng.randrange(0, SIZE - 65536)
                    got = h.pread(65536, off)
                    for _ in range(50):  # (a snapshot just made is recorded a moment later)
                        with self.meta:
                            cands = [self.snaps[n][off : off + 65536] for n in self.order]
                        if got in cands:
                            break
                        time.sleep(0.1)
                    else:
                        self.fail(f"reader {i}: live@latest reads no snapshot's data at {off}")
                        return
                    close_quietly(h)
                    self.counts["latest opens"] += 1
                    continue
                for _ in range(rng.randrange(5, 30)):
                    n = rng.choice((4096, 65536, 300_000))
                    off = rng.randrange(0, SIZE - n)
                    try:
                        got = h.pread(n, off)
                    except nbd.Error as e:
                        if name in self.doomed and nbd_errno(e) == errno.EIO:
                            self.counts["reads of deleted snapshots refused"] += 1
                            break
                        raise
                    if got != want[off : off + n]:
                        self.fail(f"reader {i}: snapshot {name} read wrong data at {off}")
                        return
                    self.counts["snapshot reads"] += 1
            finally:
                close_quietly(h)

    def manager(self) -> None:
        rng = random.Random(self.rng.random())
        serial = 0
        last_check = time.monotonic()
        while not self.stop.is_set():
            time.sleep(rng.uniform(0.2, 0.6))
            serial += 1
            name = f"soak-{serial}"
            self.lock.acquire_exclusive()
            try:
                c = SocketClient(str(self.srv.control), timeout=60)
                try:
                    c.call("create", {"name": name})
                finally:
                    c.close()
                with self.meta:
                    self.snaps[name] = bytes(self.live)
                    self.order.append(name)
            finally:
                self.lock.release_exclusive()
            self.counts["created"] += 1
            while len(self.order) > KEEP:
                with self.meta:
                    old = self.order[0]
                    self.doomed.add(old)
                c = SocketClient(str(self.srv.control), timeout=60)
                try:
                    c.call("delete", {"name": old})
                finally:
                    c.close()
                with self.meta:
                    self.order.remove(old)
                self.counts["deleted"] += 1
            if time.monotonic() - last_check > 10:
                c = SocketClient(str(self.srv.control), timeout=120)
                try:
                    report = c.call("check")
                finally:
                    c.close()
                if not report["clean"]:
                    self.fail(f"check through the server: {report['defects'][:5]}")
                self.counts["online checks"] += 1
                last_check = time.monotonic()


@pytest.mark.engine_log(SNAPSHOT_GONE, NO_SUCH_SNAPSHOT)  # opened just after its delete
def test_soak(tmp_path: Path) -> None:
    srv = NbdkitServer(
        tmp_path, tmp_path / "pool.img", size=str(SIZE), params={"threads": "parallel"}
    )
    try:
        srv.start()
        soak = Soak(srv, seed=int(os.environ.get("DITTOFS_SEED", "77")))
        threads = [
            threading.Thread(target=soak.guarded, args=(f"writer {i}", soak.writer, i))
            for i in range(WRITERS)
        ]
        threads += [
            threading.Thread(target=soak.guarded, args=(f"reader {i}", soak.reader, i))
            for i in range(READERS)
        ]
        threads.append(threading.Thread(target=soak.guarded, args=("manager", soak.manager)))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        samples: list[tuple[float, int]] = []
        while time.monotonic() - t0 < SOAK_SECONDS and not soak.stop.is_set():
            time.sleep(1.0)
            samples.append((time.monotonic() - t0, rss_kib(srv.pid)))
        soak.stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a soak client hung"
        assert not soak.errors, "\n".join(soak.errors[:3])
        duration = time.monotonic() - t0

        # everything, whole, at the end
        h = srv.connect("live")
        h.flush()
        assert h.pread(SIZE, 0) == soak.live, "live differs from the model at the end"
        close_quietly(h)
        for name in soak.order:
            h = srv.connect(f"live@{name}")
            assert h.pread(SIZE, 0) == soak.snaps[name], f"snapshot {name} differs at the end"
            close_quietly(h)
        srv.stop()
        assert_check_clean(srv.disk, "after the soak")
    finally:
        srv.kill()

    c = soak.counts
    peak = max(r for _, r in samples)
    after_warmup = [r for t, r in samples if t >= WARMUP]
    assert len(after_warmup) >= 2 * WINDOW, (
        f"the soak ended with {len(after_warmup)} RSS samples after its warm-up; "
        f"it needs {2 * WINDOW} (raise DITTOFS_SOAK_SECONDS)"
    )
    warm = int(statistics.median(after_warmup[:WINDOW]))
    final = int(statistics.median(after_warmup[-WINDOW:]))
    print(
        f"\nsoak: {duration:.0f}s, {WRITERS} writers on live + {READERS} snapshot readers + "
        f"1 manager; {c['writes']} writes, {c['trims']} trims, {c['flushes']} flushes, "
        f"{c['live reads']} live read-backs, {c['snapshot reads']} snapshot reads, "
        f"{c['latest opens']} live@latest opens, {c['reads of deleted snapshots refused']} reads "
        f"of deleted snapshots refused (EIO), {c['created']} snapshots created, {c['deleted']} "
        f"deleted, {c['online checks']} online checks; RSS median {warm} KiB just after the "
        f"{WARMUP:.0f}s warm-up, {final} KiB at the end ({100 * (final - warm) / warm:+.1f}%), "
        f"peak {peak} KiB"
    )
    assert c["writes"] and c["snapshot reads"] and c["created"] and c["deleted"]
    assert final <= warm * 1.10, (
        f"server RSS (median of {WINDOW} samples) grew from {warm} KiB after warm-up to "
        f"{final} KiB at the end "
        f"(+{100 * (final - warm) / warm:.1f}%, limit 10%): samples {samples}"
    )

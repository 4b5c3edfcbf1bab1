"""A full pool: a pool on a small fixed-size device (a loop device on a 16 MiB file, formatted
with 'snapctl format /dev/loopN'), served by a real nbdkit, filled until writes fail.

* filling returns ENOSPC to the writer; the failed write changes nothing, the server keeps
  serving, every acknowledged byte reads back, and 'snapctl check' is clean;
* a snapshot can still be taken, and deleted, on the full pool; deleting one that holds data
  frees its space (the pool's free bytes grow by what it held) and writes succeed again;
* a rollback on a full pool works and frees the space of what it replaced.
"""

from __future__ import annotations

import errno
import json
import random
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from harness import NbdkitServer, run_snapctl
from t8_helpers import LoopDevices, close_quietly, nbd_errno

SIZE = 16 << 20  # the device; live is as big (thin: it can never all be written)
CHUNK = 1 << 20
# what a full pool still calls free: its reserve (2 MiB of this 16 MiB device: snapshot delete
# and rollback must run), room for one commit of two metadata copies, and the metadata a write
# may dirty (live's map, the shadow index and list: Volume._headroom)
NEARLY_FULL = 4 * CHUNK + CHUNK // 2


@pytest.fixture
def loops() -> Iterator[LoopDevices]:
    made = LoopDevices()
    yield made
    made.detach_all()


def info(srv: NbdkitServer) -> dict[str, int]:
    data: dict[str, int] = json.loads(srv.snapctl("info", "--json").stdout)
    return data


def check_clean(srv: NbdkitServer, why: str) -> None:
    cp = srv.snapctl("check", check=False)
    assert cp.returncode == 0, f"{why}: check exit {cp.returncode}: {cp.stdout}{cp.stderr}"


def enospc(h: nbd.NBD, data: bytes, off: int) -> bool:
    """Write; True if the pool answered ENOSPC (any other error fails the test)."""
    try:
        h.pwrite(data, off)
        return False
    except nbd.Error as e:
        assert nbd_errno(e) == errno.ENOSPC, f"write at {off}: {e}"
        return True


def assert_reads(h: nbd.NBD, model: bytearray, why: str) -> None:
    for off in range(0, len(model), 4 * CHUNK):
        got = h.pread(4 * CHUNK, off)
        if got != model[off : off + 4 * CHUNK]:
            bad = next(i for i in range(len(got)) if got[i] != model[off + i])
            pytest.fail(f"{why}: live differs at byte {off + bad}")


@pytest.mark.engine_log(r"the pool is full")
@pytest.mark.parametrize("cow", ["move", "copy"])
def test_full_pool(servers, loops: LoopDevices, tmp_path: Path, cow: str) -> None:
    rng = random.Random(3)
    image = tmp_path / "small.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    dev = loops.attach(image)
    srv = servers(disk=Path(dev), cow=cow)
    cp = run_snapctl(Path(dev), "format", dev, env=srv.env)
    assert cp.returncode == 0, cp.stderr
    srv.start()
    h = srv.connect("live")
    live = bytearray(SIZE)

    # 1. half of live, then a snapshot that shares it
    half = SIZE // 2
    a = rng.randbytes(half)
    h.pwrite(a, 0)
    h.flush()
    live[:half] = a
    srv.snapctl("create", "s1")
    s1 = bytes(live)

    # 2. overwrite it: every first write preserves a block for s1, until the pool is full
    failed_at = None
    for off in range(0, half, CHUNK):
        data = rng.randbytes(CHUNK)
        if enospc(h, data, off):
            failed_at = off
            break
        h.flush()
        live[off : off + CHUNK] = data
    assert failed_at is not None, "the pool never filled"
    assert failed_at >= CHUNK, "nothing could be overwritten at all"
    # what is left takes single blocks, until not even one fits
    bs = 65536
    for off in range(failed_at, half, bs):
        data = rng.randbytes(4096)
        if enospc(h, data, off + 8192):
            break
        live[off + 8192 : off + 8192 + 4096] = data
    else:
        pytest.fail("single-block writes never filled the pool")
    # more writes fail the same way, fresh blocks and shared ones alike; nothing changes
    assert enospc(h, rng.randbytes(CHUNK), half + CHUNK)
    assert enospc(h, rng.randbytes(100), half - 100)
    h.flush()  # a flush on a full pool still commits
    assert srv.proc is not None and srv.proc.poll() is None, "the server died on a full pool"
    assert_reads(h, live, "full pool")
    s = srv.connect("live@s1")
    assert s.pread(half, 0) == s1[:half], "s1 changed on the full pool"
    close_quietly(s)
    full = info(srv)
    assert full["free_bytes"] < NEARLY_FULL, full
    # a full pool refuses writes with ENOSPC; that is no failed commit and no device error
    errors = {"read": 0, "write": 0, "checksum": 0, "failed_commits": 0, "healed": 0}
    assert full["errors"] == errors, full
    check_clean(srv, "on the full pool")

    # 3. a snapshot can be taken and deleted on the full pool
    srv.snapctl("create", "s2")
    srv.snapctl("delete", "s2")
    # delete s1, which holds the overwritten data: its space comes back
    srv.snapctl("delete", "s1")
    # (it waits in the deferral window, apart from free space, until a write needs it)
    after = info(srv)
    freed = reclaimable(after) - reclaimable(full)
    assert freed >= failed_at, f"deleting s1 freed {freed} bytes, it held {failed_at}"
    assert after["deferred_free_bytes"] >= failed_at, after
    data = rng.randbytes(CHUNK)
    h.pwrite(data, failed_at)  # the write that failed now succeeds
    h.flush()
    live[failed_at : failed_at + CHUNK] = data
    assert_reads(h, live, "after deleting s1")
    check_clean(srv, "after deleting s1")

    # 4. fill again behind a new snapshot, then roll back to it on the full pool
    srv.snapctl("create", "s3")
    s3 = bytes(live)
    stopped = None
    for off in range(0, SIZE, CHUNK):
        data = rng.randbytes(CHUNK)
        if enospc(h, data, off):
            stopped = off
            break
        live[off : off + CHUNK] = data
    assert stopped is not None, "the pool did not fill a second time"
    for off in range(stopped, SIZE, 65536):
        data = rng.randbytes(4096)
        if enospc(h, data, off):
            break
        live[off : off + 4096] = data
    h.flush()
    before = reclaimable(info(srv))
    assert before < NEARLY_FULL, before
    close_quietly(h)  # rollback wants no client on live
    srv.snapctl("rollback", "s3", "--yes")
    h = srv.connect("live")
    assert_reads(h, bytearray(s3), "after the rollback on a full pool")
    assert reclaimable(info(srv)) > before + CHUNK, "the rollback freed nothing"
    check_clean(srv, "after the rollback")
    data = rng.randbytes(CHUNK)
    h.pwrite(data, SIZE - CHUNK)  # writes succeed again
    h.flush()
    close_quietly(h)
    srv.stop()
    cp = run_snapctl(Path(dev), "check", "--repair", env=srv.env)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def reclaimable(pool_info: dict[str, int]) -> int:
    """Free space, and what the deferral window hands back as soon as a write needs it."""
    return pool_info["free_bytes"] + pool_info["deferred_free_bytes"]

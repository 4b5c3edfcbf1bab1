"""Device errors and failed commits through a real nbdkit, with the disk failing on purpose.

The server runs plugin/plugin.py with the test-only parameter `faults=SPEC` (accepted because
the test sets DITTOFS_TEST_FAULTS=1): its disk is support.faults' FileArmedFaultyDevice, armed
by writing SPEC. Cases:

* a failed commit (its first sync fails), for every kind of export (live, a second volume, a
  clone, a writable snapshot), after one failure and after two in a row: the connection with
  unflushed writes gets EIO on its next request and on every FLUSH, never success; every
  connection to a volume or a writable snapshot opened before it is told too; a read-only
  snapshot's connection goes on; after a reconnect each reads its durable state;
* EIO reading a data block fails that request only; the others are served; the log has one
  line naming the export and the offset, and `info` counts a read error; EIO reading a
  block-map leaf fails the requests that need it, and the leaf reads again once the disk does;
* EIO or ENOSPC from the device while a commit writes metadata is a failed commit;
* an image file on a full host file system (a small tmpfs): the writer is told, the server
  goes on serving once there is room, and every acknowledged FLUSH survives a restart.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from harness import NbdkitServer, require
from support.data import pattern
from support.logcheck import COMMIT_FAILED, HEALED_COPY
from t8_helpers import close_quietly, metadata_blocks, nbd_errno

from fsimpl.engine import Engine
from fsimpl.layout import BT_MAP_LEAF

BS = 4096
SIZE = 1 << 20
KINDS = ["live", "vol2", "clone", "live@ws"]
REVERTED = r"a commit failed after this connection opened"
INJECTED = r"\(injected\)"


class FaultyServer:
    """A served pool whose disk fails when SPEC says so."""

    def __init__(self, servers: Any, tmp_path: Path, **kw: Any) -> None:
        self.spec = tmp_path / "faults.json"
        self.srv: NbdkitServer = servers(
            params={"faults": str(self.spec), **kw.pop("params", {})}, **kw
        )
        self.srv.env["DITTOFS_TEST_FAULTS"] = "1"

    def arm(self, *faults: dict[str, Any]) -> None:
        tmp = self.spec.with_suffix(".tmp")
        tmp.write_text(json.dumps(list(faults)))
        os.replace(tmp, self.spec)  # a new inode and mtime: the device re-reads it

    def fired(self) -> list[str]:
        path = Path(str(self.spec) + ".fired")
        return path.read_text().splitlines() if path.exists() else []

    def info(self) -> dict[str, Any]:
        return json.loads(self.srv.snapctl("info", "--json").stdout)


def expect_errno(code: int, fn: Any, *args: Any) -> None:
    with pytest.raises(nbd.Error) as ei:
        fn(*args)
    assert nbd_errno(ei.value) == code, f"{fn.__name__}: {ei.value}"


@pytest.fixture
def kinds_pool(servers: Any, tmp_path: Path) -> Iterator[tuple[FaultyServer, dict[str, bytes]]]:
    fs = FaultyServer(servers, tmp_path, size=str(SIZE), params={"block-size": "4K"})
    srv = fs.srv.start()
    srv.snapctl("volume", "create", "vol2", "--size", str(SIZE))
    durable: dict[str, bytes] = {}
    for i, name in enumerate(("live", "vol2")):
        h = srv.connect(name)
        h.pwrite(pattern(i + 1, 4 * BS), 0)
        h.flush()
        close_quietly(h)
    srv.snapctl("create", "s0")
    srv.snapctl("clone", "live@s0", "clone")
    srv.snapctl("create", "ws", "--volume", "live", "--writable")
    for i, name in enumerate(KINDS):
        h = srv.connect(name)
        h.pwrite(pattern(10 + i, 2 * BS), BS)
        h.flush()
        durable[name] = h.pread(4 * BS, 0)
        close_quietly(h)
    yield fs, durable


def old_or_new(got: bytes, durable: bytes, lost: list[tuple[int, bytes]], what: str) -> None:
    """Each 512-byte sector reads its durable content or one of the lost writes to it."""
    for s in range(0, len(got), 512):
        allowed = [durable[s : s + 512]]
        allowed += [d[s - o : s - o + 512] for o, d in lost if o <= s < o + len(d)]
        assert got[s : s + 512] in allowed, f"{what}: sector at {s} reads neither old nor new"


def assert_told(h: nbd.NBD, what: str) -> None:
    for _ in range(2):
        expect_errno(errno.EIO, h.pread, 512, 0)
        expect_errno(errno.EIO, h.flush)  # never a false success, however often it asks


def fail_a_commit(fs: FaultyServer, via: nbd.NBD) -> None:
    before = len(fs.fired())
    fs.arm({"op": "sync", "count": 1})
    expect_errno(errno.EIO, via.flush)
    assert len(fs.fired()) == before + 1, fs.fired()
    fs.arm()  # spent; disarmed for good (a restarted server reads the file afresh)


@pytest.mark.engine_log(COMMIT_FAILED, REVERTED, INJECTED)
@pytest.mark.parametrize("kind", KINDS)
def test_failed_commit_tells_every_connection(kinds_pool: Any, kind: str) -> None:
    fs, durable = kinds_pool
    srv = fs.srv
    conns = {name: srv.connect(name) for name in KINDS}
    snap = srv.connect("live@s0")
    snap_data = snap.pread(4 * BS, 0)
    lost = [(0, pattern(99, 3 * BS))]
    conns[kind].pwrite(lost[0][1], 0)  # unflushed
    fail_a_commit(fs, conns[kind])
    for name, h in conns.items():
        assert_told(h, name)
        close_quietly(h)
    assert snap.pread(4 * BS, 0) == snap_data  # read-only snapshots never changed
    snap.flush()
    close_quietly(snap)
    errors = fs.info()["errors"]
    assert errors["failed_commits"] == 1 and errors["write"] == 1, errors
    for name in KINDS:
        h = srv.connect(name)
        old_or_new(h.pread(4 * BS, 0), durable[name], lost if name == kind else [], name)
        h.pwrite(pattern(50, BS), 0)
        h.flush()
        close_quietly(h)
    srv.restart()
    h = srv.connect(kind)
    assert h.pread(BS, 0) == pattern(50, BS)
    close_quietly(h)
    assert srv.snapctl("check").returncode == 0


@pytest.mark.engine_log(COMMIT_FAILED, REVERTED, INJECTED)
@pytest.mark.parametrize("kind", KINDS)
def test_two_failed_commits_in_a_row(kinds_pool: Any, kind: str) -> None:
    fs, durable = kinds_pool
    srv = fs.srv
    first = srv.connect(kind)
    lost = [(0, pattern(97, BS))]
    first.pwrite(lost[0][1], 0)
    fail_a_commit(fs, srv.connect("live"))
    between = srv.connect(kind)  # opened between the failures, no successful commit since
    old_or_new(between.pread(4 * BS, 0), durable[kind], lost, kind)
    lost.append((0, pattern(98, 2 * BS)))
    between.pwrite(lost[1][1], 0)
    fail_a_commit(fs, srv.connect("vol2" if kind != "vol2" else "live"))
    assert fs.info()["errors"]["failed_commits"] == 2
    assert_told(between, kind)
    assert_told(first, kind)
    again = srv.connect(kind)
    old_or_new(again.pread(4 * BS, 0), durable[kind], lost, kind)
    for h in (first, between, again):
        close_quietly(h)


def _data_block(disk: Path, block: int) -> int:
    """Where live's block is on the disk, read offline before the server starts."""
    eng = Engine.open(str(disk), claim=False)
    try:
        return eng.volume("live").live.get(block).addr
    finally:
        eng.device.close()


@pytest.mark.engine_log(r"export live, read at offset \d+, length \d+: read of .* \(injected\)")
def test_a_data_read_error_fails_that_request_only(servers: Any, tmp_path: Path) -> None:
    fs = FaultyServer(servers, tmp_path, size=str(SIZE), params={"block-size": "4K"})
    srv = fs.srv.start()
    h = srv.connect("live")
    h.pwrite(pattern(7, 8 * BS), 0)
    h.flush()
    close_quietly(h)
    srv.stop()
    addr = _data_block(srv.disk, 2)
    fs.arm({"op": "read", "count": None, "block": addr, "block_size": BS})
    srv.start()
    h = srv.connect("live")
    expect_errno(errno.EIO, h.pread, BS, 2 * BS)
    expect_errno(errno.EIO, h.pread, 3 * BS, BS)
    for b in (0, 1, 3, 7):  # every other block is served
        assert h.pread(BS, b * BS) == pattern(7, 8 * BS)[b * BS : (b + 1) * BS]
    h.pwrite(pattern(8, BS), 5 * BS)  # and writes go on
    h.flush()
    log = [line for line in srv.log().splitlines() if "error:" in line]
    assert len(log) == 2 and all("export live, read at offset" in line for line in log), log
    assert fs.info()["errors"]["read"] == 2
    fs.arm()
    assert h.pread(BS, 2 * BS) == pattern(7, 8 * BS)[2 * BS : 3 * BS]  # healed: it was the disk
    close_quietly(h)


@pytest.mark.engine_log(COMMIT_FAILED, REVERTED, INJECTED, r"no space left")
@pytest.mark.parametrize("code", ["EIO", "ENOSPC"])
def test_a_write_error_while_committing_is_a_failed_commit(
    servers: Any, tmp_path: Path, code: str
) -> None:
    fs = FaultyServer(servers, tmp_path, size=str(SIZE), params={"block-size": "4K"})
    srv = fs.srv.start()
    h = srv.connect("live")
    h.pwrite(pattern(1, 4 * BS), 0)
    h.flush()
    h.pwrite(pattern(2, 4 * BS), 8 * BS)  # unflushed: the next commit writes its map leaf
    fs.arm({"op": "write", "count": 1, "errno": code})
    expect_errno(errno.ENOSPC if code == "ENOSPC" else errno.EIO, h.flush)
    assert len(fs.fired()) == 1
    fs.arm()
    assert_told(h, "live")
    close_quietly(h)
    errors = fs.info()["errors"]
    assert errors["failed_commits"] == 1 and errors["write"] == 1, errors
    h = srv.connect("live")
    assert h.pread(4 * BS, 0) == pattern(1, 4 * BS)
    assert h.pread(4 * BS, 8 * BS) == bytes(4 * BS)  # new blocks: the lost write is gone
    h.pwrite(pattern(3, BS), 8 * BS)
    h.flush()
    close_quietly(h)
    srv.restart()
    h = srv.connect("live")
    assert h.pread(BS, 8 * BS) == pattern(3, BS)
    close_quietly(h)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a host file system that fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(
        [require("mount"), "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run([require("umount"), "-l", str(mnt)], check=False)


@pytest.mark.engine_log(COMMIT_FAILED, REVERTED, r"no space left on the device")
def test_an_image_on_a_full_host_file_system(servers: Any, small_fs: Path) -> None:
    srv = servers(disk=small_fs / "pool.img", size="64M", params={"block-size": "64K"}).start()
    h = srv.connect("live")
    acked: dict[int, bytes] = {}
    off, chunk = 0, 1 << 20
    refused = 0
    while off < (64 << 20):  # fill until the host file system refuses
        data = pattern(off // chunk + 1, chunk)
        try:
            h.pwrite(data, off)
            h.flush()
        except nbd.Error as e:
            assert nbd_errno(e) in (errno.ENOSPC, errno.EIO), e
            refused += 1
            break
        acked[off] = data
        off += chunk
    assert refused == 1 and len(acked) >= 8, (refused, len(acked))
    close_quietly(h)
    h = srv.connect("live")
    for o in list(acked)[-4:]:  # the server still serves: trimming gives the host room back
        h.trim(chunk, o)
        del acked[o]
    h.flush()
    for o, data in acked.items():
        assert h.pread(len(data), o) == data, f"acknowledged data at {o} lost"
    close_quietly(h)
    srv.restart()
    h = srv.connect("live")
    for o, data in acked.items():
        assert h.pread(len(data), o) == data, f"acknowledged data at {o} lost after a restart"
    close_quietly(h)
    assert srv.snapctl("check").returncode == 0


@pytest.mark.engine_log(r"export live, (read|write) at offset \d+, length \d+: read of .*injected")
def test_a_metadata_read_error_fails_the_requests_that_need_it(
    servers: Any, tmp_path: Path
) -> None:
    """A block-map leaf the disk cannot read: requests through it fail with EIO, the rest of
    the pool is served, and once the disk reads again so does the leaf (nothing was cached
    wrong, nothing was marked bad)."""
    fs = FaultyServer(  # one copy: the error must show (two: the next test)
        servers, tmp_path, size=str(SIZE), params={"block-size": "4K", "metadata-copies": "1"}
    )
    srv = fs.srv.start()
    srv.snapctl("volume", "create", "vol2", "--size", str(SIZE))
    for name, tag in (("live", 1), ("vol2", 2)):
        h = srv.connect(name)
        h.pwrite(pattern(tag, 16 * BS), 0)
        h.flush()
        close_quietly(h)
    srv.stop()
    blocks, _ = metadata_blocks(srv.disk)
    leaf = next(b for b in blocks if b.tree == "live map" and b.btype == BT_MAP_LEAF)
    fs.arm({"op": "read", "count": None, "block": leaf.addr, "block_size": BS})
    srv.start()  # the leaf is read on first use, not at open
    h = srv.connect("live")
    expect_errno(errno.EIO, h.pread, BS, 0)
    expect_errno(errno.EIO, h.pwrite, pattern(3, BS), 0)
    v = srv.connect("vol2")
    assert v.pread(16 * BS, 0) == pattern(2, 16 * BS)  # another volume's map: served
    close_quietly(v)
    assert fs.info()["errors"]["read"] >= 2
    fs.arm()
    assert h.pread(16 * BS, 0) == pattern(1, 16 * BS)
    close_quietly(h)


@pytest.mark.engine_log(HEALED_COPY)
def test_a_read_error_on_one_metadata_copy_is_served_from_the_other(
    servers: Any, tmp_path: Path
) -> None:
    """Two copies (the default): the disk failing to read a block-map leaf's first copy costs
    nothing. The second copy serves, the heal is logged and counted, and once the disk
    writes again the commit rewrites the first copy, which then reads by itself."""
    fs = FaultyServer(servers, tmp_path, size=str(SIZE), params={"block-size": "4K"})
    srv = fs.srv.start()
    h = srv.connect("live")
    h.pwrite(pattern(1, 16 * BS), 0)
    h.flush()
    close_quietly(h)
    srv.stop()
    blocks, _ = metadata_blocks(srv.disk)
    leaf = next(b for b in blocks if b.tree == "live map" and b.btype == BT_MAP_LEAF)
    fs.arm({"op": "read", "count": 1, "block": leaf.addr, "block_size": BS})
    srv.start()
    h = srv.connect("live")
    assert h.pread(16 * BS, 0) == pattern(1, 16 * BS)
    h.pwrite(pattern(2, BS), 0)
    h.flush()  # the commit rewrites the first copy from the second
    close_quietly(h)
    info = fs.info()
    assert info["errors"]["read"] == 1 and info["errors"]["healed"] == 1, info
    assert fs.fired(), "the fault never fired"
    srv.stop()
    fs.arm()
    assert srv.snapctl("check").returncode == 0

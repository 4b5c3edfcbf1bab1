"""Data checksums (format --checksum): every data block's CRC-32 is kept in its map entry,
verified on every read; scrub reads and verifies every block. A damaged block is an error
naming it, never wrong data."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import nbd
import pytest
from model import Model, Workload
from test_t3_model import EngineTarget

from fsimpl import checker
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.txn import Pool


class ChecksumTarget(EngineTarget):
    def __init__(self, path: Path, size: int, cow: str) -> None:
        self.path = str(path)
        self.cow = cow
        self.engine = Engine.open(
            self.path, create_size=size, block_size=4096, cow=cow, checksums=True
        )


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_model_with_checksums_and_a_clean_scrub(tmp_path: Path, cow: str) -> None:
    target = ChecksumTarget(tmp_path / "pool.img", 1 << 20, cow)
    wl = Workload(Model(1 << 20, 4096), target, random.Random(7))
    for i in range(1, 1501):
        wl.step()
        if i % 300 == 0:
            wl.check_all()  # every read verified every block it touched
    wl.check_all()
    report = target.engine.scrub()
    assert report["checksums"] and report["bad"] == [] and report["blocks"] > 0, report
    target.engine.close()


def _address_of(disk: Path, block: int, snapshot: str | None = None) -> int:
    dev = Device(str(disk), readonly=True)
    try:
        pool = Pool.open(dev)
        vol = next(v for v in pool.volumes.values() if v.name == "live")
        sid = None
        if snapshot:
            sid = next(r.id for r in pool.snapshots.values() if r.name == snapshot)
        return vol.resolve_block(sid, block).addr
    finally:
        dev.close()


@pytest.mark.engine_log(r"data block \d+ failed its checksum")
def test_a_damaged_block_is_an_error_and_scrub_names_it(servers, tmp_path: Path) -> None:  # noqa: ANN001
    disk = tmp_path / "pool.img"
    srv = servers(disk, size="16M", params={"checksum": "on"}).start()
    h = srv.connect("live")
    data = random.Random(3).randbytes(8 * 65536)
    h.pwrite(data, 0)
    h.flush()
    srv.snapctl("create", "s1")
    h.pwrite(b"new" * 1000, 3 * 65536 + 17)  # a partial in-place-able write after s1
    h.flush()
    assert srv.snapctl("scrub", "--wait").returncode == 0
    del h
    srv.stop()
    bs = 65536
    victim = _address_of(disk, 5)  # block 5: shared by live and s1
    with open(disk, "r+b") as f:
        f.seek(victim * bs + 1234)
        byte = f.read(1)
        f.seek(victim * bs + 1234)
        f.write(bytes([byte[0] ^ 0xFF]))
    srv.start()
    for export in ("live", "live@s1"):
        c = srv.connect(export)
        with pytest.raises(nbd.Error) as err:
            c.pread(4096, 5 * bs)  # the 4 KiB unit the damage is in
        assert err.value.errno in (5, None) or "Input/output" in str(err.value)
        with pytest.raises(nbd.Error):
            c.pread(100, 5 * bs + 1200)  # a few bytes of it: the unit is verified whole
        # each unit is verified on its own: the block's others read exactly
        assert c.pread(bs - 4096, 5 * bs + 4096) == data[5 * bs + 4096 : 6 * bs]
        assert c.pread(bs, 4 * bs) == data[4 * bs : 5 * bs]  # the others read fine
        assert c.pread(bs, 6 * bs) == data[6 * bs : 7 * bs]
    assert "failed its checksum" in srv.log()
    cp = srv.snapctl("scrub", "--wait", "--json", check=False)
    assert cp.returncode == 4, cp.stderr
    report = json.loads(cp.stdout)
    assert report["state"] == "finished" and report["errors"] == 1, report  # shared: one entry
    assert any(f"data block {victim}" in what for what in report["found"]), report


def _own_base_entries(disk: Path) -> int:
    """Live's incomplete entries that own their base: partial overwrites not merged yet."""
    dev = Device(str(disk), readonly=True)
    try:
        pool = Pool.open(dev)
        vol = next(v for v in pool.volumes.values() if v.name == "live")
        return sum(e.owns_base for _, e in vol.live.iter_entries())
    finally:
        dev.close()


def test_small_overwrites_survive_kill_and_merge_when_idle(servers, tmp_path: Path) -> None:  # noqa: ANN001
    """4 KiB overwrites of live's own blocks through nbdkit after a clean restart (so no
    block is on the in-place list: each first overwrite leaves an incomplete block that owns
    the old one as its base, and the later ones go in place once a commit has listed it), a
    kill -9 after a flush, then the idle merge."""
    disk = tmp_path / "pool.img"
    srv = servers(disk, size="16M", params={"checksum": "on"}).start()
    rng = random.Random(11)
    size = 64 * 65536
    model = bytearray(rng.randbytes(size))
    h = srv.connect("live")
    h.pwrite(bytes(model), 0)
    h.flush()
    h.shutdown()
    srv.stop()  # a clean stop empties the in-place list
    srv.start()
    h = srv.connect("live")
    for i in range(1, 401):
        off = rng.randrange(size // 4096) * 4096
        n = min(4096 * rng.randint(1, 3), size - off)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off : off + n] = data
        if i % 100 == 0:
            h.flush()
            assert h.pread(size, 0) == model, f"live differs after {i} writes"
    h.flush()
    srv.kill()  # right after the flush: the server had no idle second to merge in
    own = _own_base_entries(disk)
    assert own >= 20, f"only {own} live entries own their base: the path did not run"
    report = checker.check(Device(str(disk), readonly=True))
    assert report.clean, [d.message for d in report.defects[:3]]
    srv.start()
    h = srv.connect("live")
    assert h.pread(size, 0) == model, "live differs after kill -9 and restart"
    deadline = time.monotonic() + 60  # the merges run after a second without writes
    unmerged = own
    while unmerged and time.monotonic() < deadline:
        time.sleep(0.5)
        unmerged = json.loads(srv.snapctl("info", "--json").stdout)["volumes"][0]["unmerged_blocks"]
    assert unmerged == 0, f"{unmerged} blocks still unmerged after a minute idle"
    assert h.pread(size, 0) == model
    h.shutdown()
    srv.stop()
    assert _own_base_entries(disk) == 0, "the idle merges left incomplete blocks"
    report = checker.check(Device(str(disk), readonly=True))
    assert report.clean, [d.message for d in report.defects[:3]]

"""The test support package does what the tests rely on: faults fire where and when asked, the
recorder's file replays what the device did, and the engine-log watch catches an undeclared
warning or error, in-process and in a real nbdkit's log, and lets a declared one pass."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import nbd
import pytest
from support.data import pattern, ramp, sha256_export, sha256_file
from support.faults import SUPERBLOCK_WRITE, FaultyDevice, PowerCut
from support.iolog import RecordingDevice, read_log
from support.logcheck import EngineLogWatch, log_entries
from support.snapctl import snapctl, snapctl_json

from fsimpl.errors import DittoError
from fsimpl.layout import SUPERBLOCK_SIZE


def _image(tmp_path: Path, size: int = 1 << 20) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_faults_by_count_by_block_and_after_skips(tmp_path: Path) -> None:
    dev = FaultyDevice(str(_image(tmp_path)))
    dev.fail("write", count=2, skip=1)
    dev.pwrite(b"a" * 512, 0)  # skipped
    for _ in range(2):
        with pytest.raises(DittoError, match="Input/output error"):
            dev.pwrite(b"b" * 512, 0)
    dev.pwrite(b"c" * 512, 0)  # spent
    assert dev.pread(512, 0) == b"c" * 512

    dev.fail("read", count=None, block=3, block_size=4096)
    assert dev.pread(4096, 2 * 4096) == bytes(4096)  # block 2: untouched
    for off, n in ((3 * 4096, 1), (2 * 4096, 4097), (3 * 4096 + 4000, 96)):
        with pytest.raises(DittoError):
            dev.pread(n, off)
    dev.heal()
    dev.pread(4096, 3 * 4096)

    dev.fail("sync")
    with pytest.raises(DittoError, match="fsync"):
        dev.sync()
    dev.sync()
    assert dev.failures == 2 + 3 + 1
    dev.close()


def test_a_torn_superblock_write_then_a_power_cut(tmp_path: Path) -> None:
    dev = FaultyDevice(str(_image(tmp_path)))
    dev.fail("write", where=SUPERBLOCK_WRITE, torn=24, error=PowerCut)
    dev.pwrite(b"x" * 4096, 8192)  # not a superblock slot
    with pytest.raises(PowerCut):
        dev.pwrite(b"S" * SUPERBLOCK_SIZE, 4096)
    assert dev.pread(SUPERBLOCK_SIZE, 4096) == b"S" * 24 + bytes(SUPERBLOCK_SIZE - 24)
    dev.close()


def test_recorder_file_replays_what_the_device_did(tmp_path: Path) -> None:
    log = tmp_path / "io.log"
    path = _image(tmp_path)
    RecordingDevice.log_path = str(log)
    try:
        dev = RecordingDevice(str(path))
        dev.start_recording()
        dev.pwrite(pattern(1, 4096), 0)
        dev.pwritev([memoryview(ramp(2, 512)), memoryview(ramp(3, 512))], 8192)
        dev.sync()
        dev.discard(0, 4096)
        dev.truncate(2 << 20)
        dev.close()
    finally:
        RecordingDevice.log_path = None
        if RecordingDevice._log_fd >= 0:
            os.close(RecordingDevice._log_fd)
            RecordingDevice._log_fd = -1
    ops, ends = read_log(log)
    assert [repr(o) for o in ops] == [repr(o) for o in dev.ops]
    assert [o.kind for o in ops] == ["write", "write", "sync", "discard", "truncate"]
    assert ops[1].data == ramp(2, 512) + ramp(3, 512) and ops[4].length == 2 << 20
    assert ends[-1] == log.stat().st_size
    # a record cut by a kill -9 is dropped, the ones before it kept
    with open(log, "ab") as f:
        f.write(b"\x01" + bytes(10))
    assert len(read_log(log)[0]) == 5


def test_data_helpers(tmp_path: Path) -> None:
    assert pattern(7, 20) == (7).to_bytes(8, "little") * 2 + (7).to_bytes(8, "little")[:4]
    assert ramp(1, 4) != ramp(2, 4) and len(set(ramp(1, 256))) == 256
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_log_entries_group_a_traceback_with_its_line() -> None:
    text = (
        "nbdkit: dittofs: error: no snapshot named 'x'\n"
        "nbdkit: python[2]: error: /p/plugin.py: open: error: Traceback (most recent call last):\n"
        '   File "/p/plugin.py", line 1, in open\n'
        " RuntimeError: no snapshot named 'x'\n"
        "nbdkit: debug: something harmless\n"
    )
    entries = log_entries(text)
    assert len(entries) == 3
    assert entries[1].endswith("RuntimeError: no snapshot named 'x'")


@pytest.mark.engine_log("deliberate warning for the watch")
def test_watch_catches_an_undeclared_in_process_warning() -> None:
    watch = EngineLogWatch()
    watch.start()
    logging.getLogger("dittofs").warning("deliberate warning for the watch")
    assert watch.stop() == ["in-process engine: warning: deliberate warning for the watch"]

    watch = EngineLogWatch()
    watch.expect("deliberate")
    watch.start()
    logging.getLogger("dittofs").warning("deliberate warning for the watch")
    assert watch.stop() == []


@pytest.mark.engine_log(r"no snapshot named 'nope'")
def test_watch_reads_the_log_of_a_real_nbdkit(servers, tmp_path: Path) -> None:  # noqa: ANN001
    srv = servers(size="4M").start()
    watch = EngineLogWatch()
    watch.start()
    with pytest.raises(nbd.Error):
        srv.connect("live@nope")
    h = srv.connect("live")
    assert sha256_export(h) == hashlib.sha256(bytes(4 << 20)).hexdigest()
    h.shutdown()
    unexpected = watch.stop()
    assert len(unexpected) == 1, unexpected  # one line, no traceback
    assert unexpected[0].startswith(f"{srv.logfile.name}: nbdkit: python[")
    assert "open: error: export 'live@nope': no snapshot named 'nope'" in unexpected[0]


def test_snapctl_runner(tmp_path: Path) -> None:
    disk = tmp_path / "pool.img"
    snapctl("format", str(disk), "--size", "4M", check=True)
    assert snapctl_json("info", disk=disk)["format_version"] >= 1
    bad = snapctl("create", "a/b", disk=disk)
    assert bad.returncode == 2 and bad.stderr.startswith("snapctl: ")
    with pytest.raises(AssertionError, match="snapctl -d .* create a/b -> 2"):
        snapctl("create", "a/b", disk=disk, check=True)

"""A table of damaged and foreign pools, bad disks and bad parameters, each given to a real
nbdkit: every one is refused with exactly one line of output, that line carries the engine's
message and its code (`[not_a_pool]`), nbdkit exits non-zero, no Python traceback is printed,
and the disk is left exactly as it was."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import PLUGIN, NbdkitServer, require
from support.data import sha256_file
from t8_helpers import LoopDevices, flip_bytes, metadata_blocks, newest_slot, write_slot

from fsimpl.layout import BT_INODE_LEAF, SUPERBLOCK_OFFSETS, SUPERBLOCK_SIZE

SIZE = 4 << 20


@dataclass
class Case:
    name: str
    code: str  # the engine error code the one line ends with
    words: str  # what the message must say
    make: Callable[[Path, LoopDevices], tuple[str, list[str]]]  # -> (disk, extra parameters)


def _pool(tmp: Path) -> Path:
    """A pool with data and a snapshot, made and closed by a real server."""
    srv = NbdkitServer(  # one metadata copy: a damaged block must refuse the start
        tmp, tmp / "pool.img", size=str(SIZE), name="maker", params={"metadata-copies": "1"}
    ).start()
    h = srv.connect("live")
    h.pwrite(os.urandom(1 << 20), 0)
    h.flush()
    srv.snapctl("create", "s1")
    h.shutdown()
    srv.stop()
    return tmp / "pool.img"


def _zeros(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    (tmp / "zeros.img").write_bytes(bytes(SIZE))
    return str(tmp / "zeros.img"), []


def _random(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    (tmp / "random.img").write_bytes(random.Random(5).randbytes(SIZE))
    return str(tmp / "random.img"), []


def _ext4(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    img = tmp / "ext4.img"
    img.write_bytes(bytes(SIZE))
    subprocess.run([require("mkfs.ext4"), "-q", "-F", str(img)], check=True, timeout=60)
    return str(img), []


def _truncated(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    disk = _pool(tmp)
    with open(disk, "r+b") as f:
        f.truncate(disk.stat().st_size // 2)
    return str(disk), []


def _newer_version(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    disk = _pool(tmp)
    slot, sb = newest_slot(disk)
    sb.version = 99
    write_slot(disk, slot, sb)
    return str(disk), []


def _unknown_feature(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    disk = _pool(tmp)
    slot, sb = newest_slot(disk)
    sb.features |= 1 << 20
    write_slot(disk, slot, sb)
    return str(disk), []


def _damaged_inode_leaf(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    disk = _pool(tmp)
    blocks, sb = metadata_blocks(disk)
    leaf = next(b for b in blocks if b.btype == BT_INODE_LEAF)
    flip_bytes(disk, leaf.addr * sb.block_size + 200)
    return str(disk), []


def _every_superblock(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    disk = _pool(tmp)
    for off in SUPERBLOCK_OFFSETS:
        flip_bytes(disk, off + SUPERBLOCK_SIZE // 2)
    return str(disk), []


def _missing(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    return str(tmp / "nowhere.img"), []


def _directory(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
    (tmp / "adir").mkdir()
    return str(tmp / "adir"), []


def _param(extra: list[str]) -> Callable[[Path, LoopDevices], tuple[str, list[str]]]:
    def make(tmp: Path, _: LoopDevices) -> tuple[str, list[str]]:
        return str(_pool(tmp)), extra

    return make


def _read_only_device(tmp: Path, loops: LoopDevices) -> tuple[str, list[str]]:
    return loops.attach(_pool(tmp), "--read-only"), []


CASES = [
    Case("zeros", "not_a_pool", "holds no dittofs pool", _zeros),
    Case("random-bytes", "not_a_pool", "holds no dittofs pool", _random),
    Case("ext4", "not_a_pool", "holds no dittofs pool", _ext4),
    Case("truncated", "truncated", "but its pool spans", _truncated),
    Case("newer-version", "unsupported_format", "format version 99", _newer_version),
    Case("unknown-feature", "unsupported_format", "unknown to this dittofs", _unknown_feature),
    Case(
        "damaged-inode-leaf",
        "corrupt",
        "(inode-table leaf) failed its checksum",
        _damaged_inode_leaf,
    ),  # fmt: skip
    Case("every-superblock", "corrupt", "every superblock copy fails", _every_superblock),
    Case("missing-disk", "not_found", "does not exist; give size=SIZE", _missing),
    Case("directory", "failed", "is a directory", _directory),
    Case(
        "unknown-parameter",
        "invalid_argument",
        "unknown parameter 'colour'",
        _param(["colour=blue"]),
    ),  # fmt: skip
    Case("bad-size", "invalid_argument", "'12Q' is not a size", _param(["cache=12Q"])),
    Case("bad-cow", "invalid_argument", "cow=sideways", _param(["cow=sideways"])),
    Case("bad-merge", "invalid_argument", "merge=later", _param(["merge=later"])),
    Case("read-only-device", "read_only_disk", "is a read-only device", _read_only_device),
    Case(
        "faults-outside-tests",
        "invalid_argument",
        "test-only parameter",
        _param(["faults=/nonexistent.json"]),
    ),  # fmt: skip
]


@pytest.fixture
def loops() -> Iterator[LoopDevices]:
    made = LoopDevices()
    yield made
    made.detach_all()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_at_start_with_one_line(case: Case, tmp_path: Path, loops: LoopDevices) -> None:
    disk, extra = case.make(tmp_path, loops)
    before = sha256_file(disk) if os.path.isfile(disk) or disk.startswith("/dev/") else None
    cmd = [
        require("nbdkit"),
        "-f",
        "-U",
        str(tmp_path / "nbd.sock"),
        "python",
        str(PLUGIN),
        f"disk={disk}",
        f"control={tmp_path / 'ctl.sock'}",
        *extra,
    ]
    env = {**os.environ, "DITTOFS_RUNDIR": str(tmp_path / "run")}
    env.pop("DITTOFS_TEST_FAULTS", None)
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    out = (cp.stdout + cp.stderr).strip()
    assert cp.returncode != 0, f"{case.name}: nbdkit served it:\n{out}"
    assert "Traceback" not in out, f"{case.name}: a traceback:\n{out}"
    lines = out.splitlines()
    assert len(lines) == 1, f"{case.name}: {len(lines)} lines, not one:\n{out}"
    assert lines[0].endswith(f"[{case.code}]"), f"{case.name}: not its code:\n{out}"
    assert case.words in lines[0], f"{case.name}: {case.words!r} not said:\n{out}"
    if before is not None:
        assert sha256_file(disk) == before, f"{case.name}: the refusal changed the disk"
    assert not (tmp_path / "nbd.sock").exists() and not (tmp_path / "ctl.sock").exists()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_the_table_covers_every_start_refusal_code() -> None:
    codes = {c.code for c in CASES}
    assert {
        "not_a_pool",
        "truncated",
        "unsupported_format",
        "corrupt",
        "not_found",
        "invalid_argument",
        "read_only_disk",
    } <= codes

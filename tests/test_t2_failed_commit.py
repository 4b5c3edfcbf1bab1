"""A failed commit, in-process, for every kind of export: live, a second volume, a clone and a
writable snapshot, after one failed commit and after two in a row.

The rule is NBD's: a connection is never told "success" for writes that are gone. After a
commit fails, the pool goes back to its last durable state; every connection to an export
whose content that reverted (every volume, every writable snapshot) gets an error on every
request, its FLUSH included, until it reconnects; a new connection reads the durable state;
read-only snapshots never change, so their connections go on. "The durable state" is NBD's: a
sector the lost writes touched reads either its durable content or what was written to it
(a block live owned outright is overwritten in place), never anything else.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.data import pattern
from support.faults import FaultyDevice
from support.logcheck import COMMIT_FAILED

from fsimpl.engine import Engine, Export
from fsimpl.errors import DittoError, ExportGone
from fsimpl.txn import DEFAULT_CACHE_BYTES, Pool

BS = 4096
SIZE = 1 << 20
KINDS = ["live", "vol2", "clone", "live@ws"]
REVERTED = r"a commit failed after this connection opened"


def read(eng: Engine, ex: Export, off: int = 0, n: int = 4 * BS) -> bytes:
    buf = bytearray(n)
    eng.read(ex, memoryview(buf), off)
    return bytes(buf)


def pool(tmp_path: Path) -> tuple[Engine, FaultyDevice, dict[str, bytes]]:
    """Every kind of export, each with durable data of its own; returns what each reads."""
    path = tmp_path / "pool.img"
    Engine.open(str(path), create_size=SIZE, block_size=BS, claim=False).close()
    dev = FaultyDevice(str(path))
    dev.lock()
    eng = Engine(dev, Pool.open(dev), "move", DEFAULT_CACHE_BYTES)
    eng.create_volume("vol2", SIZE)
    for i, name in enumerate(("live", "vol2")):
        eng.write(eng.open_export(name, False), memoryview(pattern(i + 1, 4 * BS)), 0)
    eng.create_snapshot("s0")
    eng.clone("live@s0", "clone")
    eng.create_snapshot("ws", ["live"], writable=True)
    durable = {}
    for i, name in enumerate(KINDS):
        ex = eng.open_export(name, False)
        eng.write(ex, memoryview(pattern(10 + i, 2 * BS)), BS)
        eng.flush(ex)
        durable[name] = read(eng, ex)
    durable["live@s0"] = read(eng, eng.open_export("live@s0", True))
    return eng, dev, durable


def old_or_new(got: bytes, durable: bytes, lost: list[tuple[int, bytes]], what: str) -> None:
    """Each 512-byte sector reads its durable content or one of the lost writes to it."""
    for s in range(0, len(got), 512):
        sector = got[s : s + 512]
        allowed = [durable[s : s + 512]]
        allowed += [
            data[s - off : s - off + 512] for off, data in lost if off <= s < off + len(data)
        ]
        assert sector in allowed, f"{what}: sector at {s} reads neither old nor new data"


def fail_a_commit(eng: Engine, dev: FaultyDevice, via: Export) -> None:
    """The next commit fails at its first sync: its FLUSH is an error, never success."""
    dev.fail("sync")
    with pytest.raises(DittoError, match="injected"):
        eng.flush(via)
    assert dev.failures >= 1


def assert_told(eng: Engine, ex: Export, what: str) -> None:
    with pytest.raises(ExportGone, match=REVERTED):
        read(eng, ex)
    with pytest.raises(ExportGone, match=REVERTED):
        eng.flush(ex)
    with pytest.raises(ExportGone, match=REVERTED):
        eng.write(ex, memoryview(b"x" * 512), 0)
    with pytest.raises(ExportGone, match=REVERTED):
        eng.flush(ex)  # and again: it never turns into a success


@pytest.mark.engine_log(COMMIT_FAILED)
@pytest.mark.parametrize("kind", KINDS)
def test_one_failed_commit(tmp_path: Path, kind: str) -> None:
    eng, dev, durable = pool(tmp_path)
    conns = {name: eng.open_export(name, False) for name in KINDS}
    snap = eng.open_export("live@s0", True)
    ex = conns[kind]
    lost = [(0, pattern(99, 3 * BS))]
    eng.write(ex, memoryview(lost[0][1]), 0)  # unflushed
    fail_a_commit(eng, dev, ex)
    assert eng.info()["errors"]["failed_commits"] == 1  # type: ignore[index]
    for name, conn in conns.items():  # every export whose content went back is told
        assert_told(eng, conn, name)
    assert read(eng, snap) == durable["live@s0"]  # a read-only snapshot never changed
    eng.flush(snap)
    for name in KINDS:  # a new connection reads what is durable, and works
        again = eng.open_export(name, False)
        old_or_new(read(eng, again), durable[name], lost if name == kind else [], name)
        eng.write(again, memoryview(pattern(50, BS)), 0)
        eng.flush(again)
    eng.close()
    eng = Engine.open(str(tmp_path / "pool.img"), claim=False)
    assert read(eng, eng.open_export(kind, True), 0, BS) == pattern(50, BS)
    eng.close()


@pytest.mark.engine_log(COMMIT_FAILED)
@pytest.mark.parametrize("kind", KINDS)
def test_two_failed_commits_in_a_row(tmp_path: Path, kind: str) -> None:
    eng, dev, durable = pool(tmp_path)
    first = eng.open_export(kind, False)
    lost = [(0, pattern(97, BS))]
    eng.write(first, memoryview(lost[0][1]), 0)
    fail_a_commit(eng, dev, eng.open_export("live", False))
    # opened between the two failures, with no successful commit in between
    between = eng.open_export(kind, False)
    old_or_new(read(eng, between), durable[kind], lost, kind)
    lost.append((0, pattern(98, 2 * BS)))
    eng.write(between, memoryview(lost[1][1]), 0)  # unflushed
    other = eng.open_export("vol2" if kind != "vol2" else "live", False)
    fail_a_commit(eng, dev, other)
    assert eng.info()["errors"]["failed_commits"] == 2  # type: ignore[index]
    assert_told(eng, between, kind)
    assert_told(eng, first, kind)
    again = eng.open_export(kind, False)
    old_or_new(read(eng, again), durable[kind], lost, kind)
    eng.close()

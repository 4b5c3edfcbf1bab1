"""Randomized model tests: thousands of writes, zeroes, trims, snapshot creates, deletes,
rollbacks, restarts and kill -9 after flush, every export compared with an in-memory model.

Runs in-process against the engine (many ops, the checker after every few hundred) and through
a real nbdkit (libnbd client, control socket, real kill -9). A failure prints the seed; rerun one
seed with DITTOFS_SEED=N.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from model import Model, Workload

from fsimpl.checker import check
from fsimpl.client import SocketClient
from fsimpl.device import Device
from fsimpl.engine import Engine

SEEDS = [int(os.environ["DITTOFS_SEED"])] if "DITTOFS_SEED" in os.environ else [1, 2, 3]


def assert_checker_clean(path: Path) -> None:
    dev = Device(str(path), readonly=True)
    try:
        report = check(dev)
    finally:
        dev.close()
    assert report.clean, "checker found: " + "; ".join(d.message for d in report.defects[:5])


class EngineTarget:
    """The engine in this process; a crash closes the file without committing."""

    def __init__(
        self, path: Path, size: int, cow: str, checksums: bool = False, block_size: int = 4096
    ) -> None:
        self.path = str(path)
        self.cow = cow
        self.engine = Engine.open(
            self.path, create_size=size, block_size=block_size, cow=cow, checksums=checksums
        )

    def _live(self):  # noqa: ANN202
        return self.engine.open_export("live", False)

    def write(self, offset: int, data: bytes) -> None:
        self.engine.write(self._live(), memoryview(data), offset)

    def zero(self, offset: int, length: int) -> None:
        self.engine.zero(self._live(), offset, length)

    def trim(self, offset: int, length: int) -> None:
        self.engine.trim(self._live(), offset, length)

    def flush(self) -> None:
        self.engine.flush()

    def create(self, name: str) -> None:
        self.engine.create_snapshot(name)

    def delete(self, name: str) -> None:
        self.engine.delete_snapshot(name)

    def rollback(self, name: str) -> None:
        self.engine.rollback(name)

    def restart(self) -> None:
        self.engine.close()
        self.engine = Engine.open(self.path, cow=self.cow)

    def crash_after_flush(self) -> None:
        self.engine.flush()
        self.engine.device.close()  # no commit, no in-use cleanup: what kill -9 leaves
        self.engine = Engine.open(self.path, cow=self.cow)

    def read(self, export: str, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.engine.read(self.engine.open_export(export, True), memoryview(buf), offset)
        return bytes(buf)


# data checksums on 16 KiB blocks: four checksummed units a block, so 4 KiB writes are partial
# (deferred copy-on-write with checksums, unit-by-unit verification)
IN_PROCESS = [("move", False, 4096), ("copy", False, 4096), ("move", True, 16384)]


@pytest.mark.parametrize(
    ("cow", "checksums", "block_size"),
    IN_PROCESS,
    ids=[f"{c}{'-csum' if k else ''}-{b >> 10}k" for c, k, b in IN_PROCESS],
)
@pytest.mark.parametrize("seed", SEEDS)
def test_model_in_process(
    tmp_path: Path, cow: str, checksums: bool, block_size: int, seed: int
) -> None:
    size = 1 << 20
    target = EngineTarget(tmp_path / "pool.img", size, cow, checksums, block_size)
    wl = Workload(
        Model(size, block_size), target, random.Random(seed), grain=4096 if checksums else 512
    )
    try:
        for i in range(1, 3001):
            wl.step()
            if i % 300 == 0:
                wl.check_all()
            if i % 1000 == 0:
                target.engine.flush()
                assert_checker_clean(tmp_path / "pool.img")
        wl.check_all()
        target.engine.close()
        assert_checker_clean(tmp_path / "pool.img")
    except AssertionError as e:
        raise AssertionError(f"seed {seed} cow={cow}: {e}") from None


class NbdTarget:
    """A real nbdkit server: libnbd for data, the control socket for snapshots."""

    def __init__(self, srv) -> None:  # noqa: ANN001
        self.srv = srv
        self.handles: dict[str, object] = {}
        self.ctl: SocketClient | None = None

    def _h(self, export: str):  # noqa: ANN202
        h = self.handles.get(export)
        if h is None:
            h = self.handles[export] = self.srv.connect(export)
        return h

    def _client(self) -> SocketClient:
        if self.ctl is None:
            self.ctl = SocketClient(str(self.srv.control))
        return self.ctl

    def _drop(self) -> None:
        for h in self.handles.values():
            h.shutdown() if hasattr(h, "shutdown") else None  # noqa: B018
        self.handles.clear()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None

    def write(self, offset: int, data: bytes) -> None:
        self._h("live").pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self._h("live").zero(length, offset)

    def trim(self, offset: int, length: int) -> None:
        self._h("live").trim(length, offset)

    def flush(self) -> None:
        self._h("live").flush()

    def create(self, name: str) -> None:
        self._client().call("create", {"name": name})

    def delete(self, name: str) -> None:
        self._client().call("delete", {"name": name})
        self.handles.pop(f"live@{name}", None)

    def rollback(self, name: str) -> None:
        self._client().call("rollback", {"name": name, "force": True})
        self.handles.pop("live", None)  # its requests fail until it reconnects

    def restart(self) -> None:
        self._drop()
        self.srv.restart()

    def crash_after_flush(self) -> None:
        self.flush()
        self._drop()
        self.srv.kill()
        self.srv.start()

    def read(self, export: str, offset: int, length: int) -> bytes:
        return bytes(self._h(export).pread(length, offset))


@pytest.mark.parametrize(("cow", "threads"), [("move", "serialize"), ("copy", "parallel")])
def test_model_through_nbdkit(servers, tmp_path: Path, cow: str, threads: str) -> None:  # noqa: ANN001
    seed = SEEDS[0] + 100
    size = 2 << 20
    params = {"block-size": "4096", "threads": threads}
    srv = servers(size=str(size), cow=cow, params=params).start()
    target = NbdTarget(srv)
    wl = Workload(Model(size, 4096), target, random.Random(seed))
    try:
        for i in range(1, 1501):
            wl.step()
            if i % 250 == 0:
                wl.check_all()
        wl.check_all()
        target._drop()
        srv.stop()
        assert_checker_clean(tmp_path / "pool.img")
    except AssertionError as e:
        msg = f"seed {seed} cow={cow}: {e}\nserver log:\n{srv.log()[-3000:]}"
        raise AssertionError(msg) from None

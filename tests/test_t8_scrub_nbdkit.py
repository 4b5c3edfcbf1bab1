"""Scrub as background work in a real server: rate-limited, stopped and resumed, surviving a
restart and a kill -9, healing bad metadata copies nothing had read.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from harness import NbdkitServer
from support.logcheck import HEALED_COPY
from support.snapctl import snapctl
from t8_helpers import close_quietly, flip_bytes, metadata_blocks

BS = 4096
SIZE = 8 << 20
RATE = 2 << 20  # bytes per second: the pool's ~9 MiB take a few seconds


def status(srv: NbdkitServer) -> dict[str, object]:
    return json.loads(srv.snapctl("scrub", "--status", "--json").stdout)


def wait_for(srv: NbdkitServer, want: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(srv)
        if st["state"] == want:
            return st
        assert time.monotonic() < deadline, f"the scrub never became {want}: {st}"
        time.sleep(0.1)


@pytest.fixture
def pool(servers, tmp_path: Path) -> tuple[Path, list[int]]:
    """A pool (two metadata copies) with data and snapshots, three of whose shadow index nodes
    have their first copy damaged. Returns the image and the damaged addresses."""
    image = tmp_path / "pool.img"
    srv = servers(image, size=str(SIZE), params={"block-size": "4K"}).start()
    rng = random.Random(8)
    h = srv.connect("live")
    h.pwrite(rng.randbytes(SIZE), 0)
    h.flush()
    for i in range(3):
        srv.snapctl("create", f"s{i}")
        for _ in range(40):
            h.pwrite(rng.randbytes(BS), rng.randrange(SIZE // BS) * BS)
        h.flush()
    close_quietly(h)
    assert srv.stop() == 0
    blocks, _ = metadata_blocks(image)
    leaves = [m for m in blocks if " shadow " in m.tree][:3]  # what no read of live needs
    assert len(leaves) == 3, blocks
    for m in leaves:
        flip_bytes(image, m.addr * BS + 500, 64)
    return image, [m.addr for m in leaves]


@pytest.mark.engine_log(HEALED_COPY)
def test_scrub_is_rate_limited_stops_resumes_and_survives_a_restart(servers, pool) -> None:  # noqa: ANN001
    image, damaged = pool
    srv: NbdkitServer = servers(image).start()
    assert status(srv)["state"] == "never run"
    t0 = time.monotonic()
    started = json.loads(srv.snapctl("scrub", "--rate", str(RATE), "--json").stdout)
    assert started["state"] == "running" and started["rate"] == RATE
    time.sleep(1.5)
    st = status(srv)
    assert st["state"] == "running", st
    # the rate holds: about RATE per second so far (one step of slack)
    assert 0 < int(st["bytes"]) <= RATE * (time.monotonic() - t0) + 256 * BS, st
    stopped = json.loads(srv.snapctl("scrub", "--stop", "--json").stdout)
    assert stopped["state"] == "stopped"
    done_before = int(stopped["bytes"])
    time.sleep(0.5)
    assert status(srv)["bytes"] == done_before, "a stopped scrub went on"
    cp = srv.snapctl("scrub", "--stop", check=False)
    assert cp.returncode == 4 and "no scrub is running" in cp.stderr, cp.stderr

    # a restart keeps where it was
    assert srv.stop() == 0
    srv.start()
    st = status(srv)
    assert st["state"] == "stopped" and st["bytes"] == done_before, st
    assert st["started_ns"] == stopped["started_ns"]
    # resumed (no rate: as fast as it can), it finishes from there, not from the start
    final = json.loads(srv.snapctl("scrub", "--wait", "--json").stdout)
    assert final["state"] == "finished", final
    assert final["started_ns"] == stopped["started_ns"], "the resumed scrub started anew"
    assert 1 <= int(final["healed"]) <= len(damaged), final  # (the server heals what it reads)
    assert final["errors"] == 0, final
    assert int(final["bytes"]) >= SIZE, final
    log = srv.log()
    for addr in damaged:
        assert f"metadata block {addr} " in log, f"the heal of block {addr} was not logged"
    assert srv.stop() == 0
    cp = snapctl("check", disk=image, env=srv.env)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.engine_log(HEALED_COPY)
def test_a_running_scrub_resumes_after_kill_minus_9(servers, pool) -> None:  # noqa: ANN001
    image, damaged = pool
    srv: NbdkitServer = servers(image).start()
    srv.snapctl("scrub", "--rate", str(RATE // 2))  # ~9 MiB: about 9 s
    time.sleep(6.5)  # past the ticker's periodic commit (5 s), which saves the position
    before = status(srv)
    assert before["state"] == "running" and int(before["bytes"]) > 0, before
    srv.kill()
    srv.start()
    st = status(srv)
    assert st["state"] == "running", st  # it goes on by itself
    assert st["started_ns"] == before["started_ns"]
    assert int(st["bytes"]) > 0, st
    final = wait_for(srv, "finished")
    assert final["errors"] == 0 and int(final["healed"]) >= 1, final
    assert srv.stop() == 0
    assert snapctl("check", disk=image, env=srv.env).returncode == 0

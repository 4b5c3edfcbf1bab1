"""Smoke test of the whole stack through a real nbdkit: write, snapshot, read both."""

from __future__ import annotations

import json
from pathlib import Path


def test_snapshot_reads_old_data(servers, tmp_path: Path) -> None:
    srv = servers(size="64M").start()
    live = srv.connect("live")
    live.pwrite(b"one" * 5000, 70000)
    live.flush()
    srv.snapctl("create", "s1")
    live.pwrite(b"two" * 5000, 70000)
    snap = srv.connect("live@s1")
    assert snap.pread(15000, 70000) == b"one" * 5000
    assert live.pread(15000, 70000) == b"two" * 5000
    assert snap.is_read_only()


def test_trim_gives_space_back_to_the_host(servers, tmp_path: Path) -> None:
    """Freed blocks are punched out of the image file: a thin image shrinks again."""
    srv = servers(size="64M").start()
    live = srv.connect("live")
    for off in range(0, 32 << 20, 1 << 20):
        live.pwrite(b"\xa5" * (1 << 20), off)
    live.flush()
    full = (tmp_path / "pool.img").stat().st_blocks * 512
    assert full >= 32 << 20
    live.trim(32 << 20, 0)
    live.flush()
    # the freed space waits in the deferral window (the last two generations stay whole)...
    info = json.loads(srv.snapctl("info", "--json").stdout)
    assert info["deferred_free_bytes"] >= 30 << 20, info
    waiting = (tmp_path / "pool.img").stat().st_blocks * 512
    assert waiting >= full - (1 << 20), (full, waiting)
    # ...and is punched out of the image once two more commits have passed
    for i in range(2):
        live.pwrite(bytes([i + 1]) * 4096, (40 + i) << 20)  # a new block: a commit
        live.flush()
    after = (tmp_path / "pool.img").stat().st_blocks * 512
    assert after < full - (30 << 20), (full, after)
    assert live.pread(4096, 5 << 20) == bytes(4096)

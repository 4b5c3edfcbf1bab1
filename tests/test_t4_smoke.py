"""Smoke test of the whole stack through a real nbdkit: write, snapshot, read both."""

from __future__ import annotations

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

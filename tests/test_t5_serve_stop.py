"""`snapctl serve` stops promptly even with an idle client connected, losing nothing.

nbdkit 1.32 waits for a connected client's next request before it exits on SIGTERM; the serve
supervisor commits the pool through the control socket after a grace period and ends nbdkit.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import nbd
from harness import SNAPCTL
from support.snapctl import snapctl

from fsimpl.checker import check
from fsimpl.device import Device


def test_serve_stops_with_an_idle_client_and_keeps_its_writes(servers, tmp_path: Path) -> None:  # noqa: ANN001
    env = {**os.environ, "DITTOFS_RUNDIR": str(tmp_path / "run")}
    disk, sock = tmp_path / "pool.img", tmp_path / "nbd.sock"
    snapctl("format", str(disk), "--size", "64M", env=env, check=True)
    sup = subprocess.Popen(
        [str(SNAPCTL), "serve", str(disk), "--socket", str(sock)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # serving once serve says so (its first line, how to connect): the socket alone can
        # appear while the pool is still opening, when a SIGTERM means "stop starting"
        assert sup.stdout is not None
        ready, _, _ = select.select([sup.stdout], [], [], 20)
        assert ready, "snapctl serve did not report ready within 20 s"
        assert sup.stdout.readline(), "snapctl serve exited while starting"
        assert sock.exists()
        h = nbd.NBD()
        h.set_export_name("live")
        h.connect_unix(str(sock))
        data = os.urandom(1 << 20)
        h.pwrite(data, 4096)  # acknowledged, never flushed
        t0 = time.monotonic()
        sup.send_signal(signal.SIGTERM)
        rc = sup.wait(30)
        took = time.monotonic() - t0
        assert rc == 0, sup.stdout.read()
        assert took < 15, f"serve took {took:.1f}s to stop with an idle client"
        del h
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    dev = Device(str(disk), readonly=True)
    try:
        assert check(dev).clean
    finally:
        dev.close()
    # the acknowledged write was committed before nbdkit went: a new server reads it
    srv = servers(disk).start()
    assert srv.connect("live").pread(1 << 20, 4096) == data

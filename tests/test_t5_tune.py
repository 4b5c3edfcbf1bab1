"""snapshot-min-free: below the free space the user sets, new snapshots are refused while live
writes go on; deleting a snapshot (or lowering the minimum) lets snapshots be taken again."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness import run_snapctl
from support.nbdclose import disconnect
from t8_helpers import LoopDevices


def test_snapshot_min_free_refuses_snapshots_not_writes(servers, tmp_path: Path) -> None:  # noqa: ANN001
    image = tmp_path / "dev.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    loops = LoopDevices()
    try:
        dev = loops.attach(image)
        env = {**os.environ, "DITTOFS_RUNDIR": str(tmp_path / "run")}
        cp = run_snapctl(Path(dev), "format", dev, "--block-size", "64K", env=env)
        assert cp.returncode == 0, cp.stderr
        srv = servers(Path(dev)).start()
        srv.snapctl("tune", "snapshot-min-free=20M")
        assert json.loads(srv.snapctl("info", "--json").stdout)["snapshot_min_free"] == 20 << 20
        h = srv.connect("live")
        h.pwrite(os.urandom(8 << 20), 0)
        h.flush()
        srv.snapctl("create", "s1")  # still above the minimum
        h.pwrite(os.urandom(8 << 20), 0)  # the snapshot keeps the old 8M: free drops below
        h.flush()
        refused = srv.snapctl("create", "s2", check=False)
        assert refused.returncode == 4, refused.stderr
        assert "snapshot-min-free" in refused.stderr and "live writes go on" in refused.stderr
        h.pwrite(os.urandom(1 << 20), 20 << 20)  # live writes still succeed
        h.flush()
        srv.snapctl("delete", "s1")  # frees the 8M the snapshot held
        srv.snapctl("create", "s2")
        srv.snapctl("tune", "snapshot-min-free=0")
        srv.snapctl("create", "s3")
        assert [s["name"] for s in json.loads(srv.snapctl("list", "--json").stdout)] == [
            "s2",
            "s3",
        ]
        disconnect(h)
        srv.stop()
        assert run_snapctl(Path(dev), "check", env=env).returncode == 0
    finally:
        loops.detach_all()

"""Rewind through the real tools: nbdkit refuses a pool whose newest state is unreadable,
naming the newest usable generation; `snapctl rewind --list` shows the history; nbdkit with
`rewind=GEN` serves that generation; asking for the same rewind again is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import NbdkitServer
from support.history import REWOUND, build, same_as_at
from support.logcheck import BAD_METADATA
from support.snapctl import snapctl
from t8_helpers import close_quietly, metadata_blocks

BS = 4096


def serve_all(srv: NbdkitServer, names: list[str]) -> dict[str, bytes]:
    out = {}
    for name in names:
        h = srv.connect(name)
        try:
            out[name] = h.pread(h.get_size(), 0)
        finally:
            close_quietly(h)
    return out


@pytest.mark.engine_log(BAD_METADATA, REWOUND)
def test_rewind_through_nbdkit_and_snapctl(servers, tmp_path: Path) -> None:
    image = tmp_path / "pool.img"
    history = build(image)
    newest = max(history)
    blocks, sb = metadata_blocks(image)
    root = next(m for m in blocks if m.tree == "inode table" and m.level == sb.inode_height)
    with open(image, "r+b") as f:  # the newest state's inode table root: gone
        f.seek(root.addr * BS)
        f.write(bytes(BS))

    srv: NbdkitServer = servers(image)
    with pytest.raises(RuntimeError, match="nbdkit exited with"):
        srv.start()
    log = srv.log()
    assert f"newest usable generation is {newest - 1}" in log, log[-1500:]
    assert f"rewind {newest - 1} --yes" in log, log[-1500:]

    cp = snapctl("rewind", "--list", "--json", disk=image, env=srv.env)
    assert cp.returncode == 0, cp.stderr
    listed = json.loads(cp.stdout)
    assert listed[0]["generation"] == newest and listed[0]["status"] == "unusable", listed[0]
    assert [g["status"] for g in listed[1:3]] == ["whole", "whole"], listed[:3]
    cp = snapctl("rewind", "--list", disk=image, env=srv.env)
    assert f"{newest - 1}" in cp.stdout and "whole" in cp.stdout, cp.stdout
    cp = snapctl("rewind", str(newest - 1), disk=image, env=srv.env)
    assert cp.returncode == 4 and "--yes" in cp.stderr, cp.stderr  # nothing without --yes

    rewound = servers(image, params={"rewind": str(newest - 1)}).start()
    same_as_at(serve_all(rewound, sorted(history[newest - 1])), history, newest - 1)
    h = rewound.connect("live")
    h.pwrite(b"after the rewind" * 256, 0)
    h.flush()
    close_quietly(h)
    info = json.loads(rewound.snapctl("info", "--json").stdout)
    assert info["generation"] > newest
    assert rewound.stop() == 0

    again = servers(image, params={"rewind": str(newest - 1)})
    with pytest.raises(RuntimeError, match="nbdkit exited with"):
        again.start()
    assert f"already rewound to generation {newest - 1}" in again.log(), again.log()[-1500:]

    plain = servers(image).start()  # what it moved on to
    h = plain.connect("live")
    assert h.pread(4096, 0) == b"after the rewind" * 256
    close_quietly(h)
    assert plain.stop() == 0
    assert snapctl("check", disk=image, env=plain.env).returncode == 0

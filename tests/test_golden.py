"""Golden pools: images an earlier release wrote (tests/golden/) upgrade and read identically.

The version 1 images are refused as they are (by snapctl and by nbdkit, one line saying how to
upgrade), upgraded in place by `snapctl upgrade`, and then checked twice: by snapctl in direct
mode (no server: the engine opens the disk itself), then through a real nbdkit, where every
export is read with libnbd and hashed, and the export list with its descriptions, `list`,
`info` and `volume list` are compared with what the release that wrote the image recorded. A
change to the on-disk records, or an upgrade, that misreads any field of an old pool fails
here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import nbd
import pytest
from harness import PLUGIN, NbdkitServer, require, run_snapctl

from fsimpl.layout import FORMAT_VERSION

GOLDEN = Path(__file__).resolve().parent / "golden"
IMAGES = sorted(p.name.removesuffix(".img.gz") for p in GOLDEN.glob("*.img.gz"))
MiB = 1 << 20

# what differs from one opening to the next by nature: where the image is, who serves it, when
VOLATILE_INFO = {
    "disk",
    "generation",
    "host_allocated_bytes",
    "time",
    "server_pid",
    "mode",
    "control_socket",
    "nbd",
    "format_version",  # checked apart: an upgraded pool is of the current version
    # an upgrade rewrites the metadata elsewhere (an image file grows for it): the pool's
    # space figures move; every volume's and snapshot's stay exact
    "capacity_bytes",
    "used_bytes",
    "free_bytes",
}


def same_info(got: Any, recorded: Any, where: str = "info") -> None:
    """Every field the old release recorded reads the same (volatile ones aside), in nested
    records too (each volume's); fields added since (error counters, a volume's unmerged
    blocks) may come on top."""
    if isinstance(recorded, dict):
        assert isinstance(got, dict), f"{where}: {got!r}, recorded {recorded!r}"
        for key, value in recorded.items():
            if key not in VOLATILE_INFO:
                assert key in got, f"{where} lost the field {key!r}"
                same_info(got[key], value, f"{where} {key}")
    elif isinstance(recorded, list):
        assert isinstance(got, list) and len(got) == len(recorded), (
            f"{where}: {got!r}, recorded {recorded!r}"
        )
        for i, (g, r) in enumerate(zip(got, recorded, strict=True)):
            same_info(g, r, f"{where}[{i}]")
    else:
        assert got == recorded, f"{where}: {got!r}, recorded {recorded!r}"


def unpack(stem: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    img = tmp_path / f"{stem}.img"
    img.write_bytes(gzip.decompress((GOLDEN / f"{stem}.img.gz").read_bytes()))
    facts = json.loads((GOLDEN / f"{stem}.json").read_text())
    assert hashlib.sha256(img.read_bytes()).hexdigest() == facts["image_sha256"]
    return img, facts


def snapctl_json(disk: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    cp = run_snapctl(disk, *args, "--json", env=env)
    assert cp.returncode == 0, f"snapctl {' '.join(args)}: {cp.stdout}{cp.stderr}"
    return json.loads(cp.stdout)


def test_golden_images_exist() -> None:
    assert {"pool-v1-default", "pool-v1-checksums"} <= set(IMAGES)


def refused_until_upgraded(img: Path, tmp_path: Path) -> None:
    """An older format: snapctl and nbdkit refuse it, saying how to upgrade; upgrade does."""
    cp = run_snapctl(img, "list")
    assert cp.returncode == 1 and f"snapctl upgrade {img}" in cp.stderr, cp.stderr
    out = subprocess.run(
        [require("nbdkit"), "-f", "-U", str(tmp_path / "s.sock"), "python", str(PLUGIN),
         f"disk={img}", f"control={tmp_path / 'c.sock'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, lines
    assert "snapctl upgrade" in lines[0] and lines[0].endswith("[unsupported_format]"), lines
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    assert before == json.loads((GOLDEN / f"{img.stem}.json").read_text())["image_sha256"]
    cp = run_snapctl(img, "upgrade", str(img), "--json")
    assert cp.returncode == 0, cp.stderr
    up = json.loads(cp.stdout)
    assert up["from_version"] == 1 and up["to_version"] == FORMAT_VERSION, up
    again = run_snapctl(img, "upgrade", str(img))
    assert again.returncode == 4 and "nothing to do" in again.stderr, again.stderr


@pytest.mark.parametrize("stem", IMAGES)
def test_golden_pool_reads_identically(stem: str, tmp_path: Path, servers: Any) -> None:
    img, facts = unpack(stem, tmp_path)
    if "-v1-" in stem:
        refused_until_upgraded(img, tmp_path)

    # direct mode: the engine in snapctl's own process
    assert snapctl_json(img, "list") == facts["list"]
    info = snapctl_json(img, "info")
    assert info["format_version"] == FORMAT_VERSION
    same_info(info, facts["info"])
    assert snapctl_json(img, "volume", "list") == facts["volume_list"]

    srv: NbdkitServer = servers(img).start()
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(srv.sock))
    listed: list[dict[str, str]] = []
    h.opt_list(lambda name, desc: listed.append({"name": name, "description": desc}) or 0)
    h.opt_abort()
    assert listed == facts["export_names"]

    for name, want in facts["exports"].items():
        c = srv.connect(name)
        try:
            digest = hashlib.sha256()
            size = c.get_size()
            for off in range(0, size, MiB):
                digest.update(c.pread(min(MiB, size - off), off))
            assert digest.hexdigest() == want, f"export {name} reads differently"
        finally:
            c.shutdown()
    assert snapctl_json(img, "list", env=srv.env) == facts["list"]
    info = snapctl_json(img, "info", env=srv.env)
    assert info["mode"] == "server"
    same_info(info, facts["info"])
    assert snapctl_json(img, "volume", "list", env=srv.env) == facts["volume_list"]
    report = snapctl_json(img, "check", env=srv.env)
    assert report["clean"], report

"""Bad input through a real nbdkit and snapctl: every case gives a clear error that says what
is wrong (and, where there is one, what to do), and leaves the disk exactly as it was."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import nbd
import pytest
from harness import NbdkitServer, require, run_snapctl
from support.data import sha256_file as sha256
from support.logcheck import IN_USE, NO_SUCH_SNAPSHOT, NO_SUCH_VOLUME, NOT_A_POOL, POOL_SPANS_MORE

from fsimpl.device import Device
from fsimpl.txn import read_superblock

SIZE = 4 << 20


def refuses_to_start(srv: NbdkitServer) -> str:
    """Start must fail, nbdkit must have exited non-zero; returns the server's log."""
    with pytest.raises(RuntimeError, match="nbdkit exited with"):
        srv.start()
    assert srv.proc is not None and srv.proc.returncode not in (None, 0)
    return srv.log()


def snapctl(disk: Path, *args: str, env: dict[str, str]) -> tuple[int, str]:
    cp = run_snapctl(disk, *args, env=env)
    return cp.returncode, cp.stdout + cp.stderr


def quiesce(srv: NbdkitServer) -> None:
    """Make the running server's disk stable: everything committed."""
    h = srv.connect("live")
    h.flush()
    h.shutdown()


# --- disks that hold no pool -----------------------------------------------------------------


def check_not_a_pool(servers, disk: Path) -> None:
    before = sha256(disk)
    size = disk.stat().st_size

    log = refuses_to_start(servers(disk=disk))
    assert "holds no dittofs pool" in log, log
    assert f"snapctl format {disk}" in log, f"log does not say how to format:\n{log}"

    # size= on an existing disk never formats it over.
    log = refuses_to_start(servers(disk=disk, size="4M"))
    assert "holds no dittofs pool" in log, log

    srv = servers(disk=disk)
    rc, out = snapctl(disk, "info", env=srv.env)
    assert rc == 3, f"snapctl info exit {rc}: {out}"
    assert "holds no dittofs pool" in out and "snapctl format" in out, out
    assert "Traceback" not in out, out
    rc, out = snapctl(disk, "create", "s1", env=srv.env)
    assert rc == 3 and "holds no dittofs pool" in out, (rc, out)

    assert sha256(disk) == before, f"{disk} changed"
    assert disk.stat().st_size == size


@pytest.mark.engine_log(NOT_A_POOL)
def test_random_bytes_are_not_a_pool(servers, tmp_path: Path) -> None:
    disk = tmp_path / "random.img"
    disk.write_bytes(random.Random(7).randbytes(SIZE))
    check_not_a_pool(servers, disk)


@pytest.mark.engine_log(NOT_A_POOL)
def test_ext4_image_is_not_a_pool_and_format_refuses_it(servers, tmp_path: Path) -> None:
    disk = tmp_path / "ext4.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        [require("mkfs.ext4"), "-F", "-q", str(disk)], check=True, capture_output=True, timeout=60
    )
    check_not_a_pool(servers, disk)

    before = sha256(disk)
    env = servers(disk=disk).env
    for extra in ((), ("--size", "8M"), ("--block-size", "4K")):
        rc, out = snapctl(disk, "format", str(disk), *extra, env=env)
        assert rc == 4, f"format {extra} exit {rc}: {out}"
        assert "ext2/3/4 file system" in out and "--force" in out, out
        assert "Traceback" not in out, out
    assert sha256(disk) == before, "a refused format changed the disk"

    # Control: with --force it is formatted, and then it serves.
    rc, out = snapctl(disk, "format", str(disk), "--force", env=env)
    assert rc == 0, out
    srv = servers(disk=disk).start()
    assert srv.connect("live").get_size() == 16 << 20


@pytest.mark.engine_log(POOL_SPANS_MORE)
def test_truncated_image_is_refused(servers, tmp_path: Path) -> None:
    srv = servers(size="64M").start()
    h = srv.connect("live")
    rng = random.Random(3)
    for off in range(0, 8 << 20, 1 << 20):
        h.pwrite(rng.randbytes(300_000), off + 12345)
    h.flush()
    srv.snapctl("create", "s1")
    h.pwrite(rng.randbytes(2 << 20), 100)
    h.flush()
    h.shutdown()
    srv.stop()

    disk = srv.disk
    full = disk.stat().st_size
    os.truncate(disk, full // 2)
    before = sha256(disk)

    log = refuses_to_start(servers(disk=disk))
    assert "truncated" in log, log
    assert f"{full // 2} bytes" in log, f"log does not give the size found:\n{log}"
    rc, out = snapctl(disk, "info", env=srv.env)
    assert rc != 0 and "truncated" in out, (rc, out)
    assert "Traceback" not in out, out

    assert sha256(disk) == before and disk.stat().st_size == full // 2, "a refusal changed it"


# --- bad export names ------------------------------------------------------------------------


@pytest.mark.engine_log(
    r"names nothing yet",
    r"name must not be empty",
    r"invalid (snapshot|volume) name",
    NO_SUCH_SNAPSHOT,
    NO_SUCH_VOLUME,
    r"characters long; the limit is",
)
def test_bad_export_names(servers) -> None:
    srv = servers(size=str(SIZE)).start()
    keep = srv.connect("live")
    keep.pwrite(b"A" * 70000, 65000)
    keep.flush()

    def refused(export: str, *words: str) -> None:
        mark = len(srv.log())
        with pytest.raises(nbd.Error) as ei:
            srv.connect(export)
        assert export in ei.value.string or "export" in ei.value.string, ei.value.string
        new = srv.log()[mark:]
        for w in words:
            assert w in new, f"export {export!r}: log does not say {w!r}:\n{new}"
        assert srv.proc is not None and srv.proc.poll() is None, "the server died"

    refused("live@latest", "has no snapshots", "snapctl create")
    srv.snapctl("create", "s1")
    keep.pwrite(b"B" * 70000, 65000)
    keep.flush()
    before = sha256(srv.disk)

    refused("live@nosuch", "no snapshot named 'nosuch'", "snapctl list")
    refused("live@", "must not be empty")
    refused("foo", "no volume named 'foo'")
    refused("live@../x", "invalid snapshot name", "../x")
    refused("live@s1@s1", "invalid snapshot name")
    refused("live@" + "x" * 300, "limit is 64")
    refused("../live", "invalid volume name")

    # The server keeps serving: an old connection, new ones, snapshots.
    assert keep.pread(70000, 65000) == b"B" * 70000
    assert srv.connect("live").pread(70000, 65000) == b"B" * 70000
    s1 = srv.connect("live@s1")
    assert s1.pread(70000, 65000) == b"A" * 70000
    assert srv.connect("live@latest").pread(10, 65000) == b"A" * 10
    assert srv.connect("").pread(10, 65000) == b"B" * 10  # the default export is live
    keep.shutdown()
    s1.shutdown()
    assert sha256(srv.disk) == before


# --- bad snapshot names ----------------------------------------------------------------------

BAD_NAMES = [
    ("latest", ["reserved", "newest snapshot"]),
    (".hidden", ["invalid snapshot name", "not starting with '.' or '-'"]),
    ("-x", ["invalid snapshot name", "not starting with '.' or '-'"]),
    ("a/b", ["invalid snapshot name", "letters, digits"]),
    ("a@b", ["invalid snapshot name", "letters, digits"]),
    ("a%b", ["invalid snapshot name", "letters, digits"]),
    ("x" * 65, ["65 characters", "limit is 64"]),
    ("", ["must not be empty"]),
]


def test_bad_snapshot_names(servers) -> None:
    srv = servers(size=str(SIZE)).start()
    srv.snapctl("create", "keep")
    quiesce(srv)
    before = sha256(srv.disk)

    for name, words in BAD_NAMES:
        cp = srv.snapctl("create", "--", name, check=False)
        out = cp.stdout + cp.stderr
        assert cp.returncode == 2, f"create {name!r}: exit {cp.returncode}: {out}"
        for w in words:
            assert w in out, f"create {name!r}: message lacks {w!r}: {out}"
        assert "Traceback" not in out, out
    # Without '--', '-x' is an unknown option: still a usage error that says so.
    cp = srv.snapctl("create", "-x", check=False)
    assert cp.returncode == 2 and "no such option" in cp.stderr.lower(), cp.stderr

    cp = srv.snapctl("create", "keep", check=False)
    assert cp.returncode == 4, cp
    assert "already exists" in cp.stderr and "keep" in cp.stderr, cp.stderr
    assert sha256(srv.disk) == before, "a refused create changed the disk"
    snaps = json.loads(srv.snapctl("list", "--json").stdout)
    assert [s["name"] for s in snaps] == ["keep"]

    # The longest valid name is fine.
    srv.snapctl("create", "y" * 64)
    snaps = json.loads(srv.snapctl("list", "--json").stdout)
    assert [s["name"] for s in snaps] == ["keep", "y" * 64]


def test_bad_snapshot_names_direct_mode(servers) -> None:
    """With no server, snapctl opens the disk itself: the same refusals, the same exit codes,
    and a refused command must leave the disk as it was."""
    srv = servers(size=str(SIZE)).start()
    srv.snapctl("create", "keep")
    srv.stop()
    changed: list[str] = []
    for name, words in (BAD_NAMES[0], BAD_NAMES[3], BAD_NAMES[6], BAD_NAMES[7]):
        before = sha256(srv.disk)
        rc, out = snapctl(srv.disk, "create", "--", name, env=srv.env)
        assert rc == 2 and all(w in out for w in words), (name, rc, out)
        if sha256(srv.disk) != before:
            changed.append(f"create {name!r}")
    before = sha256(srv.disk)
    rc, out = snapctl(srv.disk, "create", "keep", env=srv.env)
    assert rc == 4 and "already exists" in out, (rc, out)
    if sha256(srv.disk) != before:
        changed.append("create 'keep' (duplicate)")
    before = sha256(srv.disk)
    info = json.loads(run_snapctl(srv.disk, "info", "--json", env=srv.env).stdout)
    assert info["mode"] == "direct" and info["snapshot_count"] == 1, info
    if sha256(srv.disk) != before:
        changed.append("info (read-only)")
    assert not changed, (
        "in direct mode these refused or read-only snapctl commands rewrote the disk "
        f"(the in-use claim and release commit new superblocks): {changed}"
    )


# --- one server per disk ---------------------------------------------------------------------


@pytest.mark.engine_log(IN_USE)
def test_second_server_on_same_disk(servers, tmp_path: Path) -> None:
    first = servers(size=str(SIZE)).start()
    h = first.connect("live")
    h.pwrite(b"first" * 1000, 4096)
    h.flush()

    info = json.loads(first.snapctl("info", "--json").stdout)
    assert info["mode"] == "server", info
    assert info["server_pid"] == first.pid, (info["server_pid"], first.pid)

    # snapctl goes through the server: the new snapshot is an export at once.
    first.snapctl("create", "via-server")
    assert first.connect("live@via-server").pread(5000, 4096) == b"first" * 1000
    quiesce(first)
    before = sha256(first.disk)

    log = refuses_to_start(servers(disk=first.disk))
    assert "in use" in log and f"process {first.pid}" in log, log

    # Through another path to the same file (a hard link), too.
    link = tmp_path / "alias.img"
    os.link(first.disk, link)
    log = refuses_to_start(servers(disk=link))
    assert "in use" in log and f"process {first.pid}" in log, log

    assert sha256(first.disk) == before
    assert h.pread(5000, 4096) == b"first" * 1000, "the first server stopped serving"
    h.shutdown()
    first.stop()
    dev = Device(str(first.disk), readonly=True)
    try:
        assert read_superblock(dev).inuse_pid == 0, "a clean stop left the in-use record set"
    finally:
        dev.close()
    info = json.loads(run_snapctl(first.disk, "info", "--json", env=first.env).stdout)
    assert info["mode"] == "direct" and info["server_pid"] != first.pid, info


# --- creating a new image --------------------------------------------------------------------


@pytest.mark.engine_log(r"does not exist; give size=SIZE", r"needs a size > 0")
def test_size_zero_and_missing_disk(servers, tmp_path: Path) -> None:
    disk = tmp_path / "new.img"
    log = refuses_to_start(servers(disk=disk, size="0"))
    assert "size > 0" in log or "size=0" in log, log
    assert not disk.exists(), "a refused size=0 left a file behind"

    rc, out = snapctl(disk, "format", str(disk), "--size", "0", env=os.environ.copy())
    assert rc == 2 and "size > 0" in out, (rc, out)
    assert not disk.exists()

    log = refuses_to_start(servers(disk=disk))
    assert "does not exist" in log and "size=SIZE" in log, log
    assert not disk.exists()

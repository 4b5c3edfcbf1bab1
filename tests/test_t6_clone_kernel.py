"""T6: the kernel mounts a clone read-write (issue 8), through a real nbdkit.

ext4 is made on `live` through the kernel and gets files; `snapctl create s1` runs while the
file system is frozen, `snapctl clone live@s1 c1` makes a clone of it, and live then changes.
The clone, attached read-write (nbdfuse + loop here; nbd-client where /dev/nbd0 exists) and
mounted, must show the snapshot's files byte for byte and pass `e2fsck -fn`; files changed,
added and deleted in the clone must not appear in live (mounted at the same time) nor in
live@s1. The clone is then flattened online and s1 deleted, and everything is attached afresh
(no page cache left) and checked again. Nothing may be left mounted, attached or running.
Needs root; never skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from kernel import KernelExport, require_kernel_tools, run, tool

from fsimpl.checker import check
from fsimpl.device import Device

MiB = 1 << 20


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file (and 'dir' for every directory) under root, by relative path."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = "dir"
        for f in filenames:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.normpath(os.path.join(rel, f))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def e2fsck_clean(device: str) -> None:
    cp = run("e2fsck", "-fn", device, check=False)
    assert cp.returncode == 0, (
        f"e2fsck -fn {device} exited {cp.returncode}:\n{cp.stdout}{cp.stderr}"
    )


def sync_fs(mnt: Path) -> None:
    """Write the file system back (FUSE fsync -> NBD FLUSH); a global sync(2)."""
    assert mnt.is_dir()
    os.sync()


def assert_nothing_left(tmp_path: Path, *exports: KernelExport) -> None:
    for k in exports:
        assert k.leftovers() == [], f"{k.export}: {k.leftovers()}"
    base = os.path.realpath(tmp_path)
    with open("/proc/mounts") as f:
        assert [m for m in f if base in m] == []
    losetup = run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").stdout
    assert [line for line in losetup.splitlines() if base in line] == []


@pytest.mark.slow
def test_kernel_mount_of_a_clone(servers, tmp_path: Path) -> None:  # noqa: ANN001
    require_kernel_tools()
    for t in ("mkfs.ext4", "e2fsck", "fsfreeze"):
        tool(t)
    rng = random.Random("t6-clone")
    srv = servers(size="128M").start()

    live = KernelExport(srv.sock, "live", tmp_path / "k-live")
    clone = KernelExport(srv.sock, "c1", tmp_path / "k-c1")
    snap = KernelExport(srv.sock, "live@s1", tmp_path / "k-s1", readonly=True)
    with live:
        run("mkfs.ext4", "-q", "-F", live.device)
        mnt = live.mount()
        write(mnt / "big.bin", rng.randbytes(3 * MiB))
        for i in range(30):
            write(mnt / "docs" / f"d{i:02d}.txt", rng.randbytes(rng.randrange(0, 9000)))
        write(mnt / "etc" / "config", b"version = 1\n")
        sync_fs(mnt)
        at_s1 = tree(mnt)

        run("fsfreeze", "-f", str(mnt))
        try:
            srv.snapctl("create", "s1")
        finally:
            run("fsfreeze", "-u", str(mnt))
        srv.snapctl("clone", "live@s1", "c1")
        vols = {v["name"]: v for v in json.loads(srv.snapctl("volume", "list", "--json").stdout)}
        assert vols["c1"]["origin"] == "live@s1", vols

        # live moves on after the snapshot
        write(mnt / "etc" / "config", b"version = 2 (live)\n")
        with open(mnt / "big.bin", "r+b") as f:
            f.seek(MiB)
            f.write(rng.randbytes(MiB))
        (mnt / "docs" / "d05.txt").unlink()
        write(mnt / "live-only.txt", b"written to live after s1\n")
        sync_fs(mnt)
        live_tree = tree(mnt)

        # --- the clone, read-write through the kernel, while live stays mounted -------------
        with clone:
            assert run("blockdev", "--getro", clone.device).stdout.strip() == "0"
            e2fsck_clean(clone.device)  # the snapshot was frozen: the clone's ext4 is clean
            cmnt = clone.mount()
            assert tree(cmnt) == at_s1, "the clone does not show the snapshot's files"
            # change it: overwrite in place, append, delete, add
            with open(cmnt / "big.bin", "r+b") as f:
                f.seek(MiB // 2)
                f.write(rng.randbytes(2 * MiB))
            with open(cmnt / "docs" / "d01.txt", "ab") as f:
                f.write(b"appended in the clone\n")
            write(cmnt / "etc" / "config", b"version = 2 (clone)\n")
            for i in range(20, 30):
                (cmnt / "docs" / f"d{i:02d}.txt").unlink()
            write(cmnt / "clone-only" / "new.bin", rng.randbytes(MiB + 123))
            sync_fs(cmnt)
            clone_tree = tree(cmnt)
            assert clone_tree != at_s1
            assert tree(mnt) == live_tree, "changes in the clone reached live"

            # the snapshot, read-only, shows neither live's nor the clone's changes
            with snap:
                e2fsck_clean(snap.device)
                assert tree(snap.mount()) == at_s1
            assert snap.leftovers() == []

            # flatten runs online (the clone stays mounted); then s1 can go
            srv.snapctl("flatten", "c1")
            srv.snapctl("delete", "s1")
            assert tree(cmnt) == clone_tree
            clone.unmount()
            e2fsck_clean(clone.device)
        assert clone.leftovers() == []
        assert tree(mnt) == live_tree
        live.unmount()
        e2fsck_clean(live.device)
    assert_nothing_left(tmp_path, live, clone, snap)

    # --- afresh: every byte now comes from the server ---------------------------------------
    live2 = KernelExport(srv.sock, "live", tmp_path / "k-live2")
    clone2 = KernelExport(srv.sock, "c1", tmp_path / "k-c1b", readonly=True)
    with live2, clone2:
        e2fsck_clean(clone2.device)
        assert tree(clone2.mount()) == clone_tree
        assert tree(live2.mount()) == live_tree
    assert_nothing_left(tmp_path, live, clone, snap, live2, clone2)

    vols = {v["name"]: v for v in json.loads(srv.snapctl("volume", "list", "--json").stdout)}
    assert vols["c1"]["origin"] is None and set(vols) == {"live", "c1"}, vols
    assert srv.stop() == 0, srv.log()
    dev = Device(str(srv.disk), readonly=True)
    try:
        report = check(dev)
    finally:
        dev.close()
    assert report.clean, "checker found: " + "; ".join(d.message for d in report.defects[:5])

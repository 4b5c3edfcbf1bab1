"""T6: the kernel mounts ext4 on `live` and on a snapshot of it, through a real nbdkit.

live is attached as a block device (nbdfuse + loop here; nbd-client where /dev/nbd0 exists),
gets ext4 and files; `snapctl create s1` runs while the file system is frozen; then files on
live change. live@s1, attached read-only and mounted `ro,noload`, must show the old files byte
for byte and pass `e2fsck -fn`, while live shows the new ones. s2 is taken after the changes
with only a sync (no freeze). Everything is then detached and attached afresh (no page cache
left from the first attach) and checked again. Nothing may be left mounted, attached or
running. Needs root; never skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import pytest
from kernel import KernelExport, require_kernel_tools, run, tool

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
            h = hashlib.sha256()
            with open(os.path.join(dirpath, f), "rb") as fh:
                while chunk := fh.read(MiB):
                    h.update(chunk)
            out[os.path.normpath(os.path.join(rel, f))] = h.hexdigest()
    return out


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def e2fsck_clean(device: str) -> None:
    """e2fsck -fn (read-only, forced) finds nothing to fix."""
    cp = run("e2fsck", "-fn", device, check=False)
    assert cp.returncode == 0, (
        f"e2fsck -fn {device} exited {cp.returncode}:\n{cp.stdout}{cp.stderr}"
    )


def sync_fs(mnt: Path) -> None:
    """Write the file system back (data, journal commit, device cache flush: FUSE fsync ->
    NBD FLUSH). A global sync(2): Python has no syncfs, and nothing else here is dirty."""
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
@pytest.mark.parametrize("cow", ["move", "copy"])
def test_kernel_ext4_snapshot(servers, tmp_path: Path, cow: str) -> None:
    require_kernel_tools()
    for t in ("mkfs.ext4", "e2fsck", "fsfreeze"):
        tool(t)
    rng = random.Random(f"t6-{cow}")
    srv = servers(size="256M", cow=cow).start()

    # --- live: mkfs, files, snapshot while frozen, then changes -----------------------------
    live = KernelExport(srv.sock, "live", tmp_path / "k-live")
    snap = KernelExport(srv.sock, "live@s1", tmp_path / "k-s1", readonly=True)
    with live:
        run("mkfs.ext4", "-q", "-F", live.device)
        mnt = live.mount()
        write(mnt / "big1.bin", rng.randbytes(3 * MiB))
        write(mnt / "big2.bin", rng.randbytes(2 * MiB + 12345))
        for i in range(40):
            write(mnt / "small" / f"f{i:02d}.txt", rng.randbytes(rng.randrange(0, 6000)))
        write(mnt / "etc" / "config", b"version = 1\n")
        write(mnt / "empty", b"")
        sync_fs(mnt)
        before = tree(mnt)

        run("fsfreeze", "-f", str(mnt))
        try:
            srv.snapctl("create", "s1")
        finally:
            run("fsfreeze", "-u", str(mnt))

        # Overwrite in place (the snapshot shares these blocks), append, delete, add.
        with open(mnt / "big1.bin", "r+b") as f:
            f.seek(MiB - 100)
            f.write(rng.randbytes(MiB + 200))
        with open(mnt / "small" / "f03.txt", "ab") as f:
            f.write(b"appended after s1\n")
        write(mnt / "etc" / "config", b"version = 2\n")
        (mnt / "big2.bin").unlink()
        for i in range(10, 20):
            (mnt / "small" / f"f{i:02d}.txt").unlink()
        write(mnt / "new.bin", rng.randbytes(2 * MiB))
        write(mnt / "newdir" / "hello.txt", b"hello from after the snapshot\n")
        sync_fs(mnt)
        after = tree(mnt)
        assert after != before
        # s2: not frozen, only synced: crash-consistent, so it is read with ro,noload (its
        # journal may still say "needs recovery"; e2fsck -fn is only required of s1).
        srv.snapctl("create", "s2")
        at_s2 = after

        # --- the snapshot through the kernel, while live stays mounted ----------------------
        with snap:
            e2fsck_clean(snap.device)
            smnt = snap.mount(options="ro,noload")
            assert tree(smnt) == before
            assert tree(mnt) == after
            # The kernel sees a read-only device and a read-only file system.
            assert run("blockdev", "--getro", snap.device).stdout.strip() == "1"
            with pytest.raises(OSError):
                write(smnt / "nope", b"x")
        assert snap.leftovers() == []

        # More changes to live while no snapshot is attached: they must reach neither s1 nor s2.
        with open(mnt / "new.bin", "r+b") as f:
            f.write(rng.randbytes(MiB))
        with open(mnt / "big1.bin", "r+b") as f:
            f.write(rng.randbytes(4096))
        sync_fs(mnt)
        after = tree(mnt)
        live.unmount()
        e2fsck_clean(live.device)
    assert_nothing_left(tmp_path, live, snap)

    # --- both again from scratch: every byte now comes from the server ----------------------
    live2 = KernelExport(srv.sock, "live", tmp_path / "k-live2")
    snap2 = KernelExport(srv.sock, "live@s1", tmp_path / "k-s1b", readonly=True)
    s2 = KernelExport(srv.sock, "live@s2", tmp_path / "k-s2", readonly=True)
    with live2, snap2, s2:
        e2fsck_clean(live2.device)
        e2fsck_clean(snap2.device)
        assert tree(live2.mount()) == after
        assert tree(snap2.mount()) == before
        assert tree(s2.mount(options="ro,noload")) == at_s2
    assert_nothing_left(tmp_path, live, snap, live2, snap2, s2)

    listed = json.loads(srv.snapctl("list", "--json").stdout)
    assert [s["name"] for s in listed] == ["s1", "s2"]
    assert srv.stop() == 0, srv.log()

"""Two metadata copies through nbdkit: one damaged block at a time, a sample of at least 20.

The pool (format --metadata-copies 2, 4 KiB blocks) is built through a real server: snapshots,
a clone, a written writable snapshot, then a flush and kill -9 (no clean close). For each
sampled block, in turn flipped, zeroed, replaced by an older version of itself (a lost write) and
replaced by another block of the same type (a misdirected write), in its first or second copy:

* `snapctl check` on the disk names the block as healable damage, not fatal, and exits 4;
* the server starts and every export reads exactly what it held (libnbd, whole exports);
* `snapctl scrub` reports no lost metadata; `snapctl check` through the server then exits 1
  (damage found, all healed) and the server's log says which block was healed;
* after a clean stop, `snapctl check` on the disk is clean (exit 0).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from harness import NbdkitServer, snapctl
from support.logcheck import BAD_METADATA, HEALED_COPY, SLOT_UNUSABLE
from t8_helpers import MetaBlock, close_quietly, metadata_blocks

from fsimpl import layout as L

BS = 4096
SIZE = 4 << 20
SAMPLE = 20
WAYS = ["flipped", "zeroed", "older-version", "misdirected"]


@dataclass
class Built:
    image: Path
    older: Path  # the same pool one commit earlier: where lost writes come from
    sums: dict[str, str]  # export -> sha256 of what it reads
    sizes: dict[str, int]
    blocks: list[MetaBlock]


def read_all(srv: NbdkitServer, export: str) -> tuple[str, int]:
    h = srv.connect(export)
    try:
        size = h.get_size()
        digest = hashlib.sha256()
        for off in range(0, size, 1 << 20):
            digest.update(h.pread(min(1 << 20, size - off), off))
        return digest.hexdigest(), size
    finally:
        close_quietly(h)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    work = tmp_path_factory.mktemp("copies-base")
    image = work / "pool.img"
    snapctl(
        "format", str(image), "--size", str(SIZE), "--block-size", "4K", "--metadata-copies", "2",
        check=True,
    )  # fmt: skip
    srv = NbdkitServer(work, image)
    try:
        srv.start()
        rng = random.Random(15)
        h = srv.connect("live")
        for b in range(0, SIZE // BS, 37):  # several map leaves and an interior level
            h.pwrite(rng.randbytes(2 * BS), b * BS)
        h.flush()
        srv.snapctl("create", "s1")
        for b in range(5, SIZE // BS, 3):  # s1's entries: several shadow index leaves
            h.pwrite(rng.randbytes(BS), b * BS)
        h.flush()
        srv.snapctl("volume", "create", "vol2", "--size", "1M")
        srv.snapctl("create", "s2")
        srv.snapctl("clone", "live@s1", "cl")
        srv.snapctl("create", "ws", "--volume", "vol2", "--writable")
        close_quietly(h)
        for export in ("cl", "vol2@ws"):
            h = srv.connect(export)
            h.pwrite(rng.randbytes(3 * BS), 2 * BS)
            h.flush()
            close_quietly(h)
        older = work / "older.img"
        shutil.copyfile(image, older)  # an earlier generation of every block rewritten below
        h = srv.connect("live")
        for b in range(9, SIZE // BS, 53):
            h.pwrite(rng.randbytes(BS), b * BS)
        h.flush()
        close_quietly(h)
        srv.snapctl("create", "s3")
        sums, sizes = {}, {}
        for name in export_names(srv):
            sums[name], sizes[name] = read_all(srv, name)
        srv.kill()  # a crash after the flush: no clean close
    finally:
        srv.kill()
    blocks, _ = metadata_blocks(image)
    yield Built(image, older, sums, sizes, blocks)


def export_names(srv: NbdkitServer) -> list[str]:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(srv.sock))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    h.opt_abort()
    return [n for n in names if not n.endswith("@latest")]


def raw(path: Path, block: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(block * BS)
        return f.read(BS)


def put(path: Path, block: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(block * BS)
        f.write(data)


def damage(built: Built, image: Path, m: MetaBlock, target: int, how: str) -> None:
    buf = bytearray(raw(image, target))
    if how == "flipped":
        for i in range(300, 340):
            buf[i] ^= 0xFF
    elif how == "zeroed":
        buf = bytearray(BS)
    elif how == "older-version":  # what the address held before: the write never happened
        buf = bytearray(raw(built.older, target))
        if buf == raw(image, target):  # unchanged since: forge an older generation of it
            hdr = L.open_block(buf, target, m.btype)
            buf[-1] ^= 0x5A
            L.seal_block(
                buf, m.btype, hdr.address, hdr.generation - 1, hdr.owner, hdr.level,
                hdr.records, hdr.key_base, hdr.address1,
            )  # fmt: skip
    else:  # misdirected: a write meant for another block of the same type landed here
        other = next(o for o in built.blocks if o.btype == m.btype and o.addr != m.addr)
        buf = bytearray(raw(image, other.addr))
    put(image, target, bytes(buf))


def sample(built: Built) -> list[tuple[MetaBlock, int, str]]:
    """At least SAMPLE (block, copy, damage) cases: every block type and tree first, then
    random blocks; the damage and the copy rotate."""
    rng = random.Random(20)
    seen: set[tuple[int, str]] = set()
    picked: list[MetaBlock] = []
    for m in built.blocks:
        if (m.btype, m.tree) not in seen:
            seen.add((m.btype, m.tree))
            picked.append(m)
    rest = [m for m in built.blocks if m not in picked]
    picked += rng.sample(rest, max(0, SAMPLE - len(picked)))
    out = []
    for i, m in enumerate(picked):
        how = WAYS[i % len(WAYS)]
        if how == "misdirected" and not any(
            o.btype == m.btype and o.addr != m.addr for o in built.blocks
        ):
            how = WAYS[(i + 1) % len(WAYS)]  # the only block of its type: nothing to mistake
        out.append((m, i % 2, how))
    return out


def test_the_sample_is_large_enough(built: Built) -> None:
    assert len(built.blocks) >= SAMPLE
    assert len(sample(built)) >= SAMPLE
    kinds = {m.btype for m, _, _ in sample(built)}
    assert {
        L.BT_INTERIOR,
        L.BT_MAP_LEAF,
        L.BT_INODE_LEAF,
        L.BT_SNAP_LEAF,
        L.BT_BITMAP,
        L.BT_KEYED_INTERIOR,
        L.BT_KEYED_LEAF,
    } <= kinds


@pytest.mark.engine_log(HEALED_COPY, BAD_METADATA)
@pytest.mark.parametrize("case", range(SAMPLE))
def test_one_damaged_copy_through_nbdkit(built: Built, servers, tmp_path: Path, case: int) -> None:
    m, copy, how = sample(built)[case]
    image = tmp_path / "pool.img"
    shutil.copyfile(built.image, image)
    target = m.addr if copy == 0 else L.open_block(raw(image, m.addr), m.addr, m.btype).address1
    damage(built, image, m, target, how)
    label = f"{m.tree} {L.BLOCK_TYPE_NAMES[m.btype]} at {target} (copy {copy}, {how})"

    srv: NbdkitServer = servers(image)
    cp = snapctl("check", "--json", disk=image, env=srv.env)
    report = json.loads(cp.stdout)
    assert cp.returncode == 4 and report["fatal"] == 0 and report["healable"] == 1, (label, report)
    assert report["defects"][0]["where"] == f"block {target}", (label, report)

    srv.start()
    for name, want in built.sums.items():
        assert read_all(srv, name) == (want, built.sizes[name]), f"{label}: {name} reads wrong"
    scrub = json.loads(srv.snapctl("scrub", "--wait", "--json").stdout)
    assert scrub["state"] == "finished" and scrub["errors"] == 0, (label, scrub)
    cp = srv.snapctl("check", "--json", check=False)
    after = json.loads(cp.stdout)
    assert cp.returncode == 1 and after["clean"] and after["healed"] == 1, (label, after)
    assert f"metadata block {target} " in srv.log(), f"{label}: the heal was not logged"
    assert srv.stop() == 0
    cp = snapctl("check", disk=image, env=srv.env)
    assert cp.returncode == 0, f"{label}: {cp.stdout}{cp.stderr}"


@pytest.mark.engine_log(SLOT_UNUSABLE)
@pytest.mark.parametrize("slot", range(4))
def test_one_damaged_superblock_slot_through_nbdkit(
    built: Built, servers, tmp_path: Path, slot: int
) -> None:
    """Each of the four slots (both copies of the two newest generations), one at a time."""
    image = tmp_path / "pool.img"
    shutil.copyfile(built.image, image)
    off = L.SUPERBLOCK_OFFSETS[slot]
    with open(image, "r+b") as f:
        f.seek(off + 64)
        old = f.read(32)
        f.seek(off + 64)
        f.write(bytes(b ^ 0xFF for b in old))
    srv: NbdkitServer = servers(image)
    cp = snapctl("check", "--json", disk=image, env=srv.env)
    report = json.loads(cp.stdout)
    assert cp.returncode == 4 and report["fatal"] == 0 and report["healable"] == 1, report
    assert report["defects"][0]["where"] == f"superblock slot {slot}", report

    srv.start()
    for name, want in built.sums.items():
        assert read_all(srv, name) == (want, built.sizes[name]), f"slot {slot}: {name}"
    cp = srv.snapctl("check", "--json", check=False)
    after = json.loads(cp.stdout)
    assert cp.returncode in (0, 1) and after["clean"], after  # 0: the claim commits healed it
    assert srv.stop() == 0
    assert snapctl("check", disk=image, env=srv.env).returncode == 0

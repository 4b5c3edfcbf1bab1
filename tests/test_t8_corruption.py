"""Corruption: for every metadata block type, flip bytes in one block of a real pool.

The pool (4 KiB blocks, 2 MiB live, 16 snapshots) is built once through nbdkit so that every
tree has an interior level: the live map (4 leaves), the inode table (17 inodes, 15 per leaf)
and the snapshot table (16 records, 7 per leaf). Each case corrupts one block of a copy:

* a table's root (an interior node here): the server refuses to start, naming the block's
  address and type and pointing at 'snapctl check';
* a table leaf or the bitmap (metadata writing depends on, with its only copy): the server
  starts read-only, saying so; every export it serves reads exactly, the snapshots a lost table
  leaf cuts from the chain are refused; writes and changes are refused; 'check --repair'
  rebuilds a damaged bitmap from the trees;
* a block read lazily (block maps, the shadow index): the server serves; every read that
  needs the block fails with EIO and is logged with the address and type, every other read
  returns exactly the data the model holds — never wrong data;
* the newest superblock slot: the older slot serves, every export reads exactly its data;
* 'snapctl check' (through the running server, and on the disk) reports the block with its
  address and type and exits 4; 'check --repair' fixes a superblock slot or the bitmap, and
  otherwise leaves the disk byte-identical and exits 4.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from harness import NbdkitServer, run_snapctl
from support.data import sha256_file as sha256
from support.logcheck import (
    BAD_METADATA,
    CANNOT_READ_EXACTLY,
    READ_ONLY_POOL,
    READ_ONLY_REQUEST,
    SLOT_UNUSABLE,
)
from t8_helpers import (
    MetaBlock,
    close_quietly,
    flip_bytes,
    metadata_blocks,
    nbd_errno,
    newest_slot,
)

from fsimpl.layout import (
    BLOCK_TYPE_NAMES,
    BT_BITMAP,
    BT_INODE_LEAF,
    BT_INTERIOR,
    BT_KEYED_LEAF,
    BT_MAP_LEAF,
    BT_SNAP_LEAF,
    BT_SUPER,
    SUPERBLOCK_OFFSETS,
    map_leaf_capacity,
)

BS = 4096
SIZE = 2 << 20
NBLOCKS = SIZE // BS
LEAF = map_leaf_capacity(BS)  # blocks one map leaf covers
NSNAPS = 16


@dataclass
class Built:
    image: Path
    model: dict[str, bytes]  # export -> what it reads
    blocks: list[MetaBlock]
    generation: int


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    work = tmp_path_factory.mktemp("corrupt-base")
    srv = NbdkitServer(  # one metadata copy: the damage must show (two: test_t8_copies_nbdkit)
        work, work / "pool.img", size=str(SIZE), params={"block-size": "4K", "metadata-copies": "1"}
    )
    try:
        srv.start()
        rng = random.Random(2024)
        live = bytearray(rng.randbytes(SIZE))
        h = srv.connect("live")
        h.pwrite(bytes(live), 0)
        model: dict[str, bytes] = {}
        for i in range(1, NSNAPS + 1):
            h.flush()
            srv.snapctl("create", f"s{i}")
            model[f"live@s{i}"] = bytes(live)
            for _ in range(24):  # moves blocks into s{i}'s shadow map, across all leaves
                b = rng.randrange(NBLOCKS)
                data = rng.randbytes(BS)
                h.pwrite(data, b * BS)
                live[b * BS : (b + 1) * BS] = data
        h.flush()
        close_quietly(h)
        model["live"] = bytes(live)
        srv.stop()
    finally:
        srv.kill()
    blocks, sb = metadata_blocks(srv.disk)
    yield Built(srv.disk, model, blocks, sb.generation)


def pick(built: Built, btype: int, tree: str, level: int | None = None, nth: int = 0) -> MetaBlock:
    found = [
        m
        for m in built.blocks
        if m.btype == btype and m.tree == tree and (level is None or m.level == level)
    ]
    found.sort(key=lambda m: m.first_key)
    assert len(found) > nth, f"the pool has no {BLOCK_TYPE_NAMES[btype]} #{nth} in the {tree}"
    return found[nth]


# --- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    choose: Callable[[Built], MetaBlock]
    at_open: bool  # the server needs the block to open the pool
    # export -> blocks whose reads must fail (None: any subset of the given range may fail)
    failing: Callable[[MetaBlock], dict[str, set[int] | None]]
    misdirect: bool = False  # instead of flipping bytes, copy another block of its type over it
    # metadata writing depends on (a table leaf, the bitmap): the server serves read-only
    # what it can read exactly, and refuses the rest
    degraded: bool = False


def _leaf_range(m: MetaBlock) -> set[int]:
    return set(range(m.first_key, min(m.first_key + LEAF, NBLOCKS)))


def _index_leaf_range(built: Built, m: MetaBlock) -> set[int]:
    """The blocks whose lookups a shadow index leaf may answer: from the previous leaf's
    first key's block (a key between two leaves is sought in either) to the next leaf's."""
    firsts = sorted(o.first_key for o in built.blocks if o.tree == m.tree and o.level == 0)
    before = [f for f in firsts if f < m.first_key]
    after = [f for f in firsts if f > m.first_key]
    return set(range(before[-1] if before else 0, after[0] + 1 if after else NBLOCKS))


def NONE(m: MetaBlock) -> dict[str, set[int] | None]:  # noqa: N802 - a constant in CASES
    return {}  # (the server refuses to open: no reads)


CASES = [
    Case(
        "superblock-slot",
        lambda b: MetaBlock(BT_SUPER, newest_slot(b.image)[0], 0, "superblock", 0),
        False,
        lambda m: {},
    ),
    Case(
        "interior-live-map",
        lambda b: pick(b, BT_INTERIOR, "live map"),
        False,
        lambda m: {"live": set(range(NBLOCKS)), "*": None},
    ),
    Case("interior-inode-table", lambda b: pick(b, BT_INTERIOR, "inode table"), True, lambda m: {}),
    Case(
        "interior-snapshot-table",
        lambda b: pick(b, BT_INTERIOR, "snapshot table"),
        True,
        NONE,
    ),
    Case(
        "map-leaf-live",
        lambda b: pick(b, BT_MAP_LEAF, "live map", nth=1),
        False,
        lambda m: {"live": _leaf_range(m), "*": None},
    ),
    Case(
        "map-leaf-live-misdirected",
        lambda b: pick(b, BT_MAP_LEAF, "live map", nth=2),
        False,
        lambda m: {"live": _leaf_range(m), "*": None},
        misdirect=True,
    ),
    Case(
        "shadow-index-leaf",
        lambda b: pick(b, BT_KEYED_LEAF, "live shadow index", nth=0),
        False,
        lambda m: {"live": set(), "*": None},  # snapshots' reads in its key range fail
    ),
    Case(
        "inode-table-leaf",
        lambda b: pick(b, BT_INODE_LEAF, "inode table", nth=1),
        False,
        NONE,
        degraded=True,
    ),
    Case(
        "snapshot-table-leaf",
        lambda b: pick(b, BT_SNAP_LEAF, "snapshot table", nth=2),
        False,
        NONE,
        degraded=True,
    ),
    Case("bitmap", lambda b: pick(b, BT_BITMAP, "bitmap"), False, NONE, degraded=True),
]


def corrupt(image: Path, m: MetaBlock, built: Built, misdirect: bool) -> str:
    """Damage block m in image; returns the words the reports must contain."""
    if m.btype == BT_SUPER:
        off = SUPERBLOCK_OFFSETS[m.addr]
        flip_bytes(image, off + 48)
        return f"superblock slot {m.addr} (byte {off}, superblock)"
    if misdirect:  # a write meant for another block of this tree landed here
        other = next(o for o in built.blocks if o.tree == m.tree and o.btype == m.btype and o != m)
        with open(image, "r+b") as f:
            f.seek(other.addr * BS)
            data = f.read(BS)
            f.seek(m.addr * BS)
            f.write(data)
        return f"block {m.addr} ({BLOCK_TYPE_NAMES[m.btype]})"
    flip_bytes(image, m.addr * BS + 1000, 16)
    return f"block {m.addr} ({BLOCK_TYPE_NAMES[m.btype]})"


def read_export(srv: NbdkitServer, export: str, want: bytes) -> set[int]:
    """Read the whole export; returns the blocks whose reads failed with EIO. Any other error,
    or any data that differs from want, fails the test."""
    failed: set[int] = set()
    h = srv.connect(export)
    try:
        chunk = LEAF * BS
        for off in range(0, SIZE, chunk):
            n = min(chunk, SIZE - off)
            try:
                got = h.pread(n, off)
            except nbd.Error as e:
                assert nbd_errno(e) == errno.EIO, f"{export} at {off}: {e}"
                for b in range(off // BS, (off + n) // BS):  # find which blocks
                    try:
                        one = h.pread(BS, b * BS)
                    except nbd.Error as e2:
                        assert nbd_errno(e2) == errno.EIO, f"{export} block {b}: {e2}"
                        failed.add(b)
                        continue
                    assert one == want[b * BS : (b + 1) * BS], f"{export} block {b}: wrong data"
                continue
            if got != want[off : off + n]:
                bad = next(i for i in range(n) if got[i] != want[off + i])
                pytest.fail(f"{export}: WRONG DATA at byte {off + bad} (block {(off + bad) // BS})")
    finally:
        close_quietly(h)
    return failed


def snapctl_check(srv: NbdkitServer, *args: str) -> subprocess.CompletedProcess[str]:
    return run_snapctl(srv.disk, "check", *args, env=srv.env)


@pytest.mark.engine_log(
    BAD_METADATA, SLOT_UNUSABLE, READ_ONLY_POOL, CANNOT_READ_EXACTLY, READ_ONLY_REQUEST
)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corrupt_metadata_block(built: Built, servers, tmp_path: Path, case: Case) -> None:
    image = tmp_path / "pool.img"
    shutil.copyfile(built.image, image)
    m = case.choose(built)
    words = corrupt(image, m, built, case.misdirect)
    tname = BLOCK_TYPE_NAMES[m.btype]
    srv = servers(disk=image)

    # snapctl check on the disk: the block, its address and type; exit 4; nothing written
    before = sha256(image)
    cp = snapctl_check(srv)
    assert cp.returncode == 4, f"{case.name}: check exit {cp.returncode}\n{cp.stdout}{cp.stderr}"
    assert words in cp.stdout, f"{case.name}: {words!r} not in the report:\n{cp.stdout}"
    if case.misdirect:
        assert "claims address" in cp.stdout, cp.stdout
    report = json.loads(snapctl_check(srv, "--json").stdout)
    assert any(words in d["message"] or words in d["where"] for d in report["defects"]), report
    assert sha256(image) == before, "check changed the disk"

    if case.degraded:
        serve_degraded(srv, built, m, case, words)
    elif case.at_open:
        with pytest.raises(RuntimeError, match="nbdkit exited with"):
            srv.start()
        log = srv.log()
        for w in (f"metadata block {m.addr}", tname, "snapctl check"):
            assert w in log, f"{case.name}: the refusal does not say {w!r}:\n{log}"
    else:
        srv.start()
        expect = case.failing(m)
        eio: dict[str, set[int]] = {}
        for export, want in built.model.items():
            eio[export] = read_export(srv, export, want)
        assert srv.proc is not None and srv.proc.poll() is None, "the server died"
        for export, failed in eio.items():
            if export in expect:
                allowed = expect[export]
                assert failed == allowed, (
                    f"{case.name}: {export}: reads failed for blocks "
                    f"{sorted(failed)[:10]}..., expected exactly {sorted(allowed or ())[:10]}..."
                )
            elif "*" in expect or (
                "older" in expect and export.startswith("live@s") and int(export[6:]) < 8
            ):
                scope = (
                    _leaf_range(m)
                    if m.btype == BT_MAP_LEAF
                    else _index_leaf_range(built, m)
                    if m.btype == BT_KEYED_LEAF
                    else set(range(NBLOCKS))
                )
                assert failed <= scope, f"{case.name}: {export} failed outside the block's range"
            else:
                assert not failed, f"{case.name}: {export} failed reads {sorted(failed)[:10]}"
        if expect:
            log = srv.log()
            assert f"metadata block {m.addr} ({tname})" in log, (
                f"{case.name}: the EIO was not logged with the block's address and type:\n"
                + log[-2000:]
            )
        if case.name == "map-leaf-live":
            h = srv.connect("live")
            try:
                bad = min(_leaf_range(m)) * BS
                with pytest.raises(nbd.Error) as ei:
                    h.pwrite(b"x" * BS, bad)  # a write needing the block fails too...
                assert nbd_errno(ei.value) == errno.EIO, ei.value
                h.pwrite(b"y" * BS, 0)  # ...a write elsewhere, and a flush, succeed
                h.flush()
                assert h.pread(BS, 0) == b"y" * BS
            finally:
                close_quietly(h)
        # check through the running server's control socket reports the same block
        cp = snapctl_check(srv)
        # (a bad superblock slot: the server's commits rewrite it, and check says so: exit 1)
        assert cp.returncode == (1 if m.btype == BT_SUPER else 4), cp.stdout + cp.stderr
        if m.btype != BT_SUPER:
            assert words in cp.stdout, f"{case.name}: through the server:\n{cp.stdout}"
        srv.stop()

    before = sha256(image)
    cp = snapctl_check(srv, "--repair")
    if m.btype == BT_BITMAP:
        # rebuilt from the trees: the pool is whole and writable again
        assert cp.returncode == 1, f"repair exit {cp.returncode}\n{cp.stdout}{cp.stderr}"
        assert "rebuilt the free-space bitmap from the trees" in cp.stdout, cp.stdout
        assert snapctl_check(srv).returncode == 0
        srv.start()
        for export, want in built.model.items():
            assert not read_export(srv, export, want), export
        h = srv.connect("live")
        try:
            h.pwrite(b"z" * BS, 0)
            h.flush()
            assert h.pread(BS, 0) == b"z" * BS
        finally:
            close_quietly(h)
        srv.stop()
        assert snapctl_check(srv).returncode == 0
    elif m.btype == BT_SUPER:
        # the server's commits already rewrote the slot: nothing left to repair (a repair
        # with no server in between: test_bad_superblock_slot_repaired_without_a_server)
        assert cp.returncode == 0, cp.stdout + cp.stderr
    else:
        assert cp.returncode == 4, f"{case.name}: repair exit {cp.returncode}\n{cp.stdout}"
        assert "not fixed" in cp.stdout and "nothing was changed" in cp.stdout, cp.stdout
        assert sha256(image) == before, f"{case.name}: a repair that fixed nothing wrote"


def serve_degraded(srv: NbdkitServer, built: Built, m: MetaBlock, case: Case, words: str) -> None:
    """The server starts read-only, saying why; every export it serves reads exactly; the
    snapshots it refuses are those a damaged table cuts from the chain (a prefix: a snapshot
    reads through every newer one); writes and changes are refused."""
    srv.start()
    log = srv.log()
    assert "the pool is read-only" in log and f"metadata block {m.addr}" in log, log[-2000:]
    refused: list[str] = []
    for export, want in built.model.items():
        try:
            failed = read_export(srv, export, want)
        except nbd.Error:
            refused.append(export)
            continue
        assert not failed, f"{case.name}: {export} failed reads {sorted(failed)[:10]}"
    assert "live" not in refused
    ids = sorted(int(e[6:]) for e in refused)
    assert ids == list(range(1, len(ids) + 1)), f"{case.name}: refused {refused}: not a prefix"
    if m.btype == BT_BITMAP:
        assert not refused, refused
    else:
        assert refused, f"{case.name}: a lost table leaf refused no snapshot"
        assert "cannot be read exactly" in srv.log()
    h = srv.connect("live")
    try:
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * BS, 0)
    finally:
        close_quietly(h)
    cp = srv.snapctl("create", "more", check=False)
    assert cp.returncode == 4 and "read-only" in cp.stderr, cp.stderr
    info = json.loads(srv.snapctl("info", "--json").stdout)
    assert "damaged" in info["read_only_reason"], info
    cp = snapctl_check(srv)
    assert cp.returncode == 4 and words in cp.stdout, cp.stdout + cp.stderr
    srv.stop()


def test_bad_superblock_slot_repaired_without_a_server(built: Built, tmp_path: Path) -> None:
    image = tmp_path / "pool.img"
    shutil.copyfile(built.image, image)
    slot = newest_slot(image)[0]
    flip_bytes(image, SUPERBLOCK_OFFSETS[slot] + 48)
    env = {**os.environ, "DITTOFS_RUNDIR": str(tmp_path / "run")}
    cp = run_snapctl(image, "check", "--repair", env=env)
    assert cp.returncode == 1 and f"rewrote superblock slot {slot}" in cp.stdout, cp.stdout
    cp = run_snapctl(image, "check", env=env)
    assert cp.returncode == 0, cp.stdout


@pytest.mark.engine_log(SLOT_UNUSABLE)
def test_server_reports_a_bad_superblock_slot(built: Built, servers, tmp_path: Path) -> None:
    """The issue asks the server, too, to report a bad block with its address and type. A bad
    superblock slot is not fatal (the other slot serves), but it should be logged at open."""
    image = tmp_path / "pool.img"
    shutil.copyfile(built.image, image)
    slot = newest_slot(image)[0]
    flip_bytes(image, SUPERBLOCK_OFFSETS[slot] + 48)
    srv = servers(disk=image).start()
    for export in ("live", "live@s1", f"live@s{NSNAPS}"):
        assert read_export(srv, export, built.model[export]) == set()
    log = srv.log()
    assert "superblock" in log and ("slot" in log or str(SUPERBLOCK_OFFSETS[slot]) in log), (
        "the server opened a pool whose newest superblock slot fails its checksum and said "
        f"nothing about it (expected a warning naming slot {slot} at byte "
        f"{SUPERBLOCK_OFFSETS[slot]}, type superblock, and 'snapctl check'):\n{log}"
    )

"""snapctl check --repair: fsck's exit codes (0 clean, 1 corrected, 4 left, 8 could not run),
the two-run contract (a second run after a repair finds nothing), leaks that never stop a pool
from being served, and repairs that are ordinary commits (a new superblock generation, every
byte of data and every snapshot as it was).

Damage is made the way it happens: leaked blocks are allocated in a transaction that commits
them but references them from nothing; a free-map mismatch and wrong counters are committed by
a pool whose in-memory state was altered; superblock slots are flipped, zeroed, or replaced by
another pool's.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from harness import NbdkitServer, run_snapctl
from support.data import sha256_file as sha256
from support.logcheck import SLOT_UNUSABLE
from t8_helpers import (
    assert_check_clean,
    check_image,
    close_quietly,
    describe,
    flip_bytes,
    newest_slot,
    read_slots,
    write_slot,
)

from fsimpl.checker import repair
from fsimpl.device import Device
from fsimpl.engine import Engine
from fsimpl.layout import KIND_ADDR, SUPERBLOCK_OFFSETS, SUPERBLOCK_SIZE, Superblock
from fsimpl.txn import Pool

BS = 4096
SIZE = 2 << 20


def snapctl(srv: NbdkitServer, *args: str) -> subprocess.CompletedProcess[str]:
    return run_snapctl(srv.disk, *args, env=srv.env)


def out(cp: subprocess.CompletedProcess[str]) -> str:
    return f"exit {cp.returncode}\n{cp.stdout}{cp.stderr}"


def make_pool(servers, rng: random.Random) -> tuple[NbdkitServer, dict[str, bytes]]:
    """A served pool with data in live and two snapshots; returns it stopped, and the model."""
    srv = servers(size=str(SIZE), params={"block-size": "4K"}).start()
    h = srv.connect("live")
    live = bytearray(SIZE)
    model: dict[str, bytes] = {}
    for gen in range(3):
        for _ in range(12):
            off = rng.randrange(0, SIZE - 20000)
            data = rng.randbytes(rng.randrange(1, 20000))
            h.pwrite(data, off)
            live[off : off + len(data)] = data
        h.flush()
        if gen < 2:
            srv.snapctl("create", f"s{gen}")
            model[f"live@s{gen}"] = bytes(live)
    model["live"] = bytes(live)
    close_quietly(h)
    srv.stop()
    return srv, model


def verify_served(srv: NbdkitServer, model: dict[str, bytes], why: str) -> None:
    for export, want in model.items():
        h = srv.connect(export)
        try:
            got = h.pread(SIZE, 0)
        finally:
            close_quietly(h)
        assert got == want, f"{why}: {export} does not read what it held"


def open_pool(path: Path) -> tuple[Device, Pool]:
    dev = Device(str(path))
    dev.lock()
    return dev, Pool.open(dev)


def leak(path: Path, n: int) -> list[int]:
    """Commit n allocated blocks that nothing references (what a lost reference leaves)."""
    dev, pool = open_pool(path)
    try:
        blocks = [pool.allocator.allocate() for _ in range(n)]
        pool.commit()
        return blocks
    finally:
        dev.close()


# --- leaks ---------------------------------------------------------------------------------------


def test_leaks_are_harmless_served_and_repaired_twice(servers) -> None:
    srv, model = make_pool(servers, random.Random(5))
    leaked = leak(srv.disk, 7)

    cp = snapctl(srv, "check")
    assert cp.returncode == 4, out(cp)
    assert "7 blocks are allocated but owned by nothing" in cp.stdout, out(cp)
    assert "ERROR" not in cp.stdout and "harmless" in cp.stdout, out(cp)
    report = json.loads(snapctl(srv, "check", "--json").stdout)
    assert report["fatal"] == 0 and [d["kind"] for d in report["defects"]] == ["leak"], report
    assert report["stats"]["leaked_blocks"] == 7

    # A pool with leaks opens, serves, takes writes and snapshots; its check through the
    # server reports the same leak, nothing else.
    srv.start()
    verify_served(srv, model, "with 7 leaked blocks")
    h = srv.connect("live")
    h.pwrite(b"after-leak" * 1000, 12345)
    h.flush()
    close_quietly(h)
    live = bytearray(model["live"])
    live[12345 : 12345 + 10000] = b"after-leak" * 1000
    model["live"] = bytes(live)
    srv.snapctl("create", "s-leaky")
    model["live@s-leaky"] = model["live"]
    cp = snapctl(srv, "check", "--json")
    assert cp.returncode == 4, out(cp)
    kinds = [d["kind"] for d in json.loads(cp.stdout)["defects"]]
    assert kinds == ["leak"], out(cp)

    # --repair refuses while the server runs, and says what to do; nothing changes.
    h = srv.connect("live")
    h.flush()
    close_quietly(h)
    before = sha256(srv.disk)
    cp = snapctl(srv, "check", "--repair")
    assert cp.returncode == 8, out(cp)
    assert "Stop the server first" in cp.stderr and f"process {srv.pid}" in cp.stderr, out(cp)
    assert sha256(srv.disk) == before, "a refused repair changed the disk"
    srv.stop()

    # check alone never writes
    before = sha256(srv.disk)
    assert snapctl(srv, "check").returncode == 4
    assert sha256(srv.disk) == before, "check without --repair changed the disk"

    gen_before = newest_slot(srv.disk)[1].generation
    cp = snapctl(srv, "check", "--repair")
    assert cp.returncode == 1, out(cp)
    assert "fixed: freed 7 leaked blocks" in cp.stdout and "now clean" in cp.stdout, out(cp)
    assert newest_slot(srv.disk)[1].generation == gen_before + 1, "a repair is one commit"
    for b in leaked:  # the freed blocks are free in the committed free map
        dev = Device(str(srv.disk), readonly=True)
        try:
            assert not Pool.open(dev).allocator.is_allocated(b), f"block {b} still allocated"
        finally:
            dev.close()

    # the two-run contract
    cp = snapctl(srv, "check", "--repair")
    assert cp.returncode == 0 and "nothing to repair" in cp.stdout, out(cp)
    cp = snapctl(srv, "check")
    assert cp.returncode == 0 and cp.stdout.startswith("clean"), out(cp)
    srv.start()
    verify_served(srv, model, "after the repair")


# --- free map and counters -------------------------------------------------------------------


def test_free_map_mismatch_and_counters_are_repaired(servers) -> None:
    srv, model = make_pool(servers, random.Random(6))
    dev, pool = open_pool(srv.disk)
    try:
        vol = next(iter(pool.volumes.values()))
        addrs = [e.addr for _, e in vol.live.iter_entries() if e.kind == KIND_ADDR][:3]
        alloc = pool.allocator
        for b in addrs:  # blocks live uses, committed as free: the next write could take them
            m = 1 << (b & 7)
            alloc.state[b >> 3] &= ~m
            alloc.free_count += 1
            alloc.dirty_leaves.add(b // alloc.bits_per_leaf)
        vol.inode.owned_blocks += 5
        vol.inode.entry_count -= 1
        pool.touch_inode(vol.inode)
        pool.commit()
    finally:
        dev.close()
    # and the superblock's used-block count, in the newest slot (checksummed again)
    slot, sb = newest_slot(srv.disk)
    write_slot(srv.disk, slot, replace(sb, used_blocks=sb.used_blocks + 11))

    report = check_image(srv.disk)
    kinds = sorted(d.kind for d in report.defects)
    assert kinds == ["counters", "counters", "owned_free", "owned_free", "owned_free"], describe(
        report
    )
    assert all(f"block {b}" in describe(report) for b in addrs), describe(report)
    cp = snapctl(srv, "check")
    assert cp.returncode == 4 and "ERROR: block" in cp.stdout, out(cp)

    cp = snapctl(srv, "check", "--repair")
    assert cp.returncode == 1, out(cp)
    for words in (
        "marked 3 blocks in use that the free map called free",
        f"inode {vol.inode.ino}: block count",
        "superblock used-block count",
    ):
        assert words in cp.stdout, f"{words!r} missing:\n{out(cp)}"
    assert snapctl(srv, "check", "--repair").returncode == 0
    assert_check_clean(srv.disk, "after the repair")
    srv.start()
    verify_served(srv, model, "after repairing the free map")
    # the blocks are really protected now: fill the pool's free space and re-read everything
    h = srv.connect("live")
    rng = random.Random(9)
    live = bytearray(model["live"])
    for off in range(0, SIZE, 256 << 10):
        data = rng.randbytes(256 << 10)
        h.pwrite(data, off)
        live[off : off + len(data)] = data
    h.flush()
    close_quietly(h)
    model["live"] = bytes(live)
    verify_served(srv, model, "after overwriting live on the repaired pool")


# --- superblock slots ------------------------------------------------------------------------


def _other_pool_superblock(tmp_path: Path) -> Superblock:
    other = tmp_path / "other.img"
    Engine.format(str(other), size=SIZE, block_size=BS)
    return newest_slot(other)[1]


@pytest.mark.engine_log(SLOT_UNUSABLE)
@pytest.mark.parametrize("damage", ["newest-flipped", "older-flipped", "older-zeroed", "stale"])
def test_bad_superblock_slot_is_rewritten(servers, tmp_path: Path, damage: str) -> None:
    srv, model = make_pool(servers, random.Random(7))
    newest, sb = newest_slot(srv.disk)
    older = 1 - newest
    if damage == "newest-flipped":
        bad = newest
        flip_bytes(srv.disk, SUPERBLOCK_OFFSETS[bad] + 40)
    elif damage == "older-flipped":
        bad = older
        flip_bytes(srv.disk, SUPERBLOCK_OFFSETS[bad] + 100)
    elif damage == "older-zeroed":
        bad = older
        with open(srv.disk, "r+b") as f:
            f.seek(SUPERBLOCK_OFFSETS[bad])
            f.write(bytes(SUPERBLOCK_SIZE))
    else:  # a slot left by another pool that was on this disk (older generation)
        bad = older
        write_slot(srv.disk, bad, replace(_other_pool_superblock(tmp_path), generation=0))

    cp = snapctl(srv, "check", "--json")
    assert cp.returncode == 4, out(cp)
    defects = json.loads(cp.stdout)["defects"]
    assert [(d["kind"], d["fatal"], d["where"]) for d in defects] == [
        ("superblock", False, f"superblock slot {bad}")
    ], defects
    msg = defects[0]["message"]
    assert f"byte {SUPERBLOCK_OFFSETS[bad]}" in msg and "superblock" in msg, msg

    # A copy serves, from a good slot, exactly what it held; its commits (claim, release)
    # write every slot, so serving alone heals it.
    copy = tmp_path / "copy.img"
    shutil.copyfile(srv.disk, copy)
    other = servers(disk=copy).start()
    verify_served(other, model, f"with superblock slot {bad} {damage}")
    other.stop()
    assert_check_clean(copy, "after serving (two commits rewrote both slots)")

    cp = snapctl(srv, "check", "--repair")
    assert cp.returncode == 1, out(cp)
    assert f"rewrote superblock slot {bad}" in cp.stdout, out(cp)
    slots = read_slots(srv.disk)
    assert all(isinstance(s, Superblock) for s in slots), slots
    gens = sorted(s.generation for s in slots if isinstance(s, Superblock))
    assert gens == [gens[0]] * 2 + [gens[0] + 1] * 2, f"not two copies of two generations: {gens}"
    guids = {s.pool_guid for s in slots if isinstance(s, Superblock)}
    assert guids == {sb.pool_guid}, "a slot still belongs to another pool"
    assert snapctl(srv, "check", "--repair").returncode == 0
    srv.start()
    verify_served(srv, model, "after rewriting the slot")


# --- what check --repair cannot run on -------------------------------------------------------


def test_repair_and_check_operational_errors(servers, tmp_path: Path) -> None:
    env = servers(disk=tmp_path / "none.img").env
    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(1).randbytes(1 << 20))
    before = sha256(junk)
    for args in (("check",), ("check", "--repair"), ("check", "--json")):
        cp = run_snapctl(junk, *args, env=env)
        assert cp.returncode == 8, out(cp)
        assert "holds no dittofs pool" in cp.stderr and "Traceback" not in cp.stderr, out(cp)
    assert sha256(junk) == before
    cp = run_snapctl(tmp_path / "missing.img", "check", "--repair", env=env)
    assert cp.returncode == 8 and "does not exist" in cp.stderr, out(cp)
    assert not (tmp_path / "missing.img").exists()


# --- in-process: random damage, repaired, data intact ------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_damage_repaired_in_one_commit(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "pool.img"
    Engine.format(str(path), size=SIZE, block_size=BS)
    eng = Engine.open(str(path), claim=False)
    ex = eng.open_export("live", False)
    live = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    for i in range(6):
        for _ in range(10):
            off = rng.randrange(0, SIZE - 9000)
            data = rng.randbytes(rng.randrange(1, 9000))
            eng.write(ex, memoryview(data), off)
            live[off : off + len(data)] = data
        if rng.random() < 0.3:
            eng.trim(ex, rng.randrange(0, SIZE // 2), rng.randrange(1, SIZE // 2))
            buf = bytearray(SIZE)
            eng.read(ex, memoryview(buf), 0)
            live[:] = buf
        eng.create_snapshot(f"s{i}")
        snaps[f"s{i}"] = bytes(live)
    eng.delete_snapshot("s2")
    del snaps["s2"]
    while eng.tick():
        pass
    eng.flush()
    eng.close_export(ex)
    eng.close()
    assert_check_clean(path, "before the damage")

    dev, pool = open_pool(path)
    try:
        alloc = pool.allocator
        nleak = rng.randrange(1, 20)
        for _ in range(nleak):
            alloc.allocate()
        vols = list(pool.volumes.values())
        owned = [e.addr for v in vols for _, e in v.live.iter_entries() if e.kind == KIND_ADDR]
        for b in rng.sample(owned, 2):
            alloc.state[b >> 3] &= ~(1 << (b & 7))
            alloc.free_count += 1
            alloc.dirty_leaves.add(b // alloc.bits_per_leaf)
        shadow = next(iter(vols[0].shadows.values()))
        shadow.inode.owned_blocks += 1
        pool.touch_inode(shadow.inode)
        pool.commit()
    finally:
        dev.close()
    # the older slot (the newest one holds the damage: losing it would hide the damage)
    flip_bytes(path, SUPERBLOCK_OFFSETS[1 - newest_slot(path)[0]] + 200)

    dev = Device(str(path))
    dev.lock()
    try:
        result = repair(dev)
    finally:
        dev.close()
    kinds = {d.kind for d in result.before.defects}
    assert {"leak", "owned_free", "counters", "superblock"} <= kinds, describe(result.before)
    assert result.after.clean, describe(result.after)
    assert result.exit_code == 1
    dev = Device(str(path))
    dev.lock()
    try:
        again = repair(dev)
    finally:
        dev.close()
    assert again.exit_code == 0 and not again.fixed, again.fixed

    eng = Engine.open(str(path), claim=False)
    try:
        for name, want in [("live", bytes(live))] + [(f"live@{n}", d) for n, d in snaps.items()]:
            e = eng.open_export(name, True)
            buf = bytearray(SIZE)
            eng.read(e, memoryview(buf), 0)
            assert buf == want, f"seed {seed}: {name} changed by the repair"
    finally:
        eng.close()

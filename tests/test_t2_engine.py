"""Unit tests of the engine facade (fsimpl/engine.py) over the whole in-process stack: snapshot
delete (oldest, middle, newest) with exact space accounting, abort of the open transaction,
partial writes under move-on-write and copy-on-write, trim/zero, rollback, and what snapshot
operations cost in device I/O (counted, never timed). Pure in-process, no nbdkit."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
from support.data import pattern
from support.faults import FaultyDevice

from fsimpl import layout as L
from fsimpl.engine import Engine, Export
from fsimpl.errors import DittoError, ExportGone, NotFound, OutOfRange, ReadOnlyExport, Refused
from fsimpl.txn import DEFAULT_CACHE_BYTES, Pool

BS = 4096
CAP = L.map_leaf_capacity(BS)


# --- helpers -------------------------------------------------------------------------------------


def open_pool(tmp_path: Path, size: int = 2 << 20, name: str = "pool.img", **kw: object) -> Engine:
    return Engine.open(str(tmp_path / name), create_size=size, block_size=BS, **kw)  # type: ignore[arg-type]


def reopen(eng: Engine, **kw: object) -> Engine:
    path = eng.device.path
    cow = eng.cow
    eng.close()
    return Engine.open(path, cow=cow, **kw)  # type: ignore[arg-type]


def read_bytes(eng: Engine, ex: Export, off: int, n: int) -> bytes:
    buf = bytearray(n)
    eng.read(ex, memoryview(buf), off)
    return bytes(buf)


def blk(tag: int) -> bytes:
    return pattern(tag, BS)


def data_addrs(eng: Engine) -> dict[int, str]:
    """Every data block referenced by a map -> which map ('live' or the snapshot name).
    Asserts that no block is referenced twice (unique ownership)."""
    pool = eng.pool
    owner: dict[int, str] = {}
    for vol in pool.volumes.values():
        maps = [(vol.name, vol.live)] + [
            (pool.snapshots[sid].name, vol.shadows[sid]) for sid in vol.chain
        ]
        for name, m in maps:
            n_addr = n_entries = 0
            for _, e in m.iter_entries():
                n_entries += 1
                if e.kind == L.KIND_ADDR:
                    n_addr += 1
                    assert e.addr not in owner, f"block {e.addr} in {owner[e.addr]} and {name}"
                    owner[e.addr] = name
            assert m.inode.owned_blocks == n_addr, name
            assert m.inode.entry_count == n_entries, name
    return owner


def meta_addrs(eng: Engine) -> set[int]:
    pool = eng.pool
    out: list[int] = []
    for _, t in pool.metadata_trees():
        for p, _ in t.all_node_pointers():
            out.extend(a for a in (p.addr0, p.addr1) if a)
    assert len(out) == len(set(out)), "a metadata block is in two trees"
    return set(out)


def check_ownership(eng: Engine) -> tuple[dict[int, str], set[int]]:
    """Invariant 1 on a committed pool: every allocated block is owned exactly once, by a map
    (data) or by the metadata; the free map is the complement."""
    eng.flush()
    pool = eng.pool
    alloc = pool.allocator
    data = data_addrs(eng)
    meta = meta_addrs(eng)
    assert not set(data) & meta
    reserved = set(range(L.first_data_block(BS)))
    allocated = {b for b in range(alloc.capacity) if alloc.is_allocated(b)}
    assert allocated - reserved - meta - set(data) == set(), "leaked blocks"
    assert (set(data) | meta) - allocated == set(), "referenced blocks marked free"
    assert alloc.used_blocks == len(allocated)
    assert alloc.pending == []  # nothing pending after a commit; what waits is the window's
    waiting = bytearray(alloc.state)
    for _, blocks in alloc.deferred:
        for b in blocks:
            assert not alloc.is_allocated(b), f"block {b} is in use and waiting to be freed"
            waiting[b >> 3] |= 1 << (b & 7)
    assert alloc.busy == waiting
    if not pool.pending_deletes():
        check_sharing(eng)
    return data, meta


def check_sharing(eng: Engine) -> None:
    """Invariant 3: the latest snapshot holds an entry for b <=> live changed b since it
    (live's entry has a birth newer than the snapshot)."""
    for vol in eng.pool.volumes.values():
        latest = vol.inode.snap_id
        if not latest:
            continue
        shadow = vol.shadows[latest]
        blocks = {b for b, _ in vol.live.iter_entries()} | {b for b, _ in shadow.iter_entries()}
        for b in blocks:
            has_entry = shadow.get(b) != L.EMPTY_ENTRY
            assert has_entry == (vol.live.get(b).birth > latest), (b, vol.live.get(b))


class Model:
    """What every export must read: live and each snapshot, as plain bytes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.live = bytearray(size)
        self.snaps: dict[str, bytes] = {}

    def write(self, off: int, data: bytes) -> None:
        self.live[off : off + len(data)] = data

    def trim(self, off: int, n: int) -> None:
        first = -(-off // BS) * BS
        end = (off + n) // BS * BS
        if end > first:
            self.live[first:end] = bytes(end - first)

    def zero(self, off: int, n: int) -> None:
        self.live[off : off + n] = bytes(n)

    def verify(self, eng: Engine) -> None:
        views = {"live": bytes(self.live), **{f"live@{k}": v for k, v in self.snaps.items()}}
        for name, want in views.items():
            ex = eng.open_export(name, True)
            got = read_bytes(eng, ex, 0, self.size)
            if got != want:
                bad = next(i for i in range(self.size) if got[i] != want[i])
                raise AssertionError(f"{name} differs first at byte {bad} (block {bad // BS})")
        names = {s.name for s in eng.list_snapshots()}
        assert names == set(self.snaps)

    def spot_check(self, eng: Engine, rnd: random.Random, count: int = 20) -> None:
        """Reads of random length at random offsets, in every export."""
        views = {"live": bytes(self.live), **{f"live@{k}": v for k, v in self.snaps.items()}}
        for name, want in views.items():
            ex = eng.open_export(name, True)
            for _ in range(count):
                off = rnd.randrange(self.size)
                n = min(self.size - off, rnd.choice([1, 7, 512, BS - 1, BS + 3, 9 * BS + 1]))
                assert read_bytes(eng, ex, off, n) == want[off : off + n], (name, off, n)


class Driver:
    """Applies operations to an engine and to the model at once. It also tracks what is
    durable: live as of the last commit, and the blocks changed since (for crash checks)."""

    def __init__(self, eng: Engine, size: int) -> None:
        self.eng = eng
        self.model = Model(size)
        self.ex = eng.open_export("live", False)
        self.committed = bytes(self.model.live)
        self.touched: set[int] = set()
        self.crashes = 0
        self.aborts = 0
        self.cache_bytes = 64 << 20

    def _commit_mark(self) -> tuple[int, int]:
        return id(self.eng.pool), self.eng.pool.commits

    def _request(self, op: str, off: int, n: int, data: bytes = b"") -> None:
        mark = self._commit_mark()
        if op == "write":
            self.eng.write(self.ex, memoryview(data), off)
        else:
            getattr(self.eng, op)(self.ex, off, n)
        blocks = set(range(off // BS, (off + max(n, 1) - 1) // BS + 1))
        if self._commit_mark() != mark:  # copy-on-write committed inside the request
            self.committed = bytes(self.model.live)
            self.touched = set()
        self.touched |= blocks

    def _committed_now(self) -> None:
        self.committed = bytes(self.model.live)
        self.touched = set()

    def write(self, off: int, data: bytes) -> None:
        self._request("write", off, len(data), data)
        self.model.write(off, data)

    def trim(self, off: int, n: int) -> None:
        self._request("trim", off, n)
        self.model.trim(off, n)

    def zero(self, off: int, n: int) -> None:
        self._request("zero", off, n)
        self.model.zero(off, n)

    def flush(self) -> None:
        self.eng.flush()
        self._committed_now()

    def snapshot(self, name: str) -> None:
        self.eng.create_snapshot(name)
        self.model.snaps[name] = bytes(self.model.live)
        self._committed_now()

    def delete(self, name: str) -> None:
        self.eng.delete_snapshot(name)
        del self.model.snaps[name]
        self._committed_now()

    def rollback(self, name: str) -> None:
        self.eng.rollback(name)
        self.model.live[:] = self.model.snaps[name]
        self.ex = self.eng.open_export("live", False)
        self._committed_now()

    def reopen(self) -> None:
        self.eng = reopen(self.eng, cache_bytes=self.cache_bytes)
        self.ex = self.eng.open_export("live", False)
        self._committed_now()

    def crash(self) -> None:
        """Lose power: drop the open transaction without committing, then open again.
        Snapshots must read exactly what they held; live blocks untouched since the last
        commit read what was committed; touched blocks may read either version."""
        path, cow = self.eng.device.path, self.eng.cow
        self.eng.device.close()
        self.crashes += 1
        self.eng = Engine.open(path, cow=cow, cache_bytes=self.cache_bytes)
        self._after_loss()

    def abort(self) -> None:
        """Engine.abort(): the same promise as a power cut, without one."""
        self.eng.abort()
        self.aborts += 1
        assert not self.eng.pool.is_dirty
        self._after_loss()

    def _after_loss(self) -> None:
        self.ex = self.eng.open_export("live", False)
        got = read_bytes(self.eng, self.ex, 0, self.model.size)
        for b in range(self.model.size // BS):
            if b not in self.touched:
                assert got[b * BS : (b + 1) * BS] == self.committed[b * BS : (b + 1) * BS], b
        self.model.live[:] = got  # whatever the touched blocks hold now is the new truth
        self._committed_now()
        self.verify()

    def verify(self) -> None:
        self.model.verify(self.eng)


def history(drv: Driver, rnd: random.Random, nblocks: int, gens: int) -> None:
    """Whole-block writes, trims and hole fills over several snapshot generations."""
    for b in range(0, nblocks, 2):
        drv.write(b * BS, blk(b + 1))
    for g in range(1, gens + 1):
        drv.snapshot(f"s{g}")
        for _ in range(nblocks // 4):
            b = rnd.randrange(nblocks)
            if rnd.random() < 0.15:
                drv.trim(b * BS, BS * rnd.randint(1, 3))
            else:
                drv.write(b * BS, blk(1000 * g + b))


# --- delete --------------------------------------------------------------------------------------


def _expected_freed(eng: Engine, name: str) -> tuple[set[int], set[int]]:
    """(blocks a delete of `name` must free, blocks it must hand to the next older snapshot)."""
    vol = eng.volume("live")
    sid = eng.snapshot(name).id
    shadow = vol.shadows[sid]
    older_id = vol.older_than(sid)
    older = vol.shadows[older_id] if older_id else None
    freed, moved = set(), set()
    for b, e in shadow.iter_entries():
        if e.kind != L.KIND_ADDR:
            continue
        if older is not None and older.get(b) == L.EMPTY_ENTRY:
            moved.add(e.addr)
        else:
            freed.add(e.addr)
    return freed, moved


def _delete_and_check(drv: Driver, name: str) -> None:
    eng = drv.eng
    data0, meta0 = check_ownership(eng)
    used0 = eng.pool.allocator.used_blocks
    freed, moved = _expected_freed(eng, name)
    older = eng.volume("live").older_than(eng.snapshot(name).id)
    older_name = eng.pool.snapshots[older].name if older else None
    info = {i.name: i for i in eng.list_snapshots()}
    assert info[name].used_bytes == len(freed) * BS  # what the delete will free
    freed_bytes = eng.delete_snapshot(name)
    del drv.model.snaps[name]
    drv._committed_now()
    data1, meta1 = check_ownership(eng)
    assert freed_bytes == len(freed) * BS  # data blocks (the map's own metadata comes on top)
    assert set(data1) == set(data0) - freed  # exactly these blocks were freed ...
    for a in moved:  # ... and the others went to the next older snapshot
        assert data1[a] == older_name
    assert not any(eng.pool.allocator.is_allocated(a) for a in freed)
    assert eng.pool.allocator.used_blocks == used0 - len(freed) - len(meta0) + len(meta1)
    drv.verify()


@pytest.mark.parametrize("which", ["oldest", "middle", "newest"])
def test_delete_one_snapshot_keeps_the_rest_exact(tmp_path: Path, which: str) -> None:
    nblocks = 400  # three map leaves
    drv = Driver(open_pool(tmp_path), nblocks * BS)
    history(drv, random.Random(11), nblocks, gens=4)
    drv.verify()
    name = {"oldest": "s1", "middle": "s3", "newest": "s4"}[which]
    freed, moved = _expected_freed(drv.eng, name)
    assert freed  # every choice frees something in this history ...
    if which != "oldest":
        assert moved  # ... and, with an older snapshot, hands some down
    _delete_and_check(drv, name)
    # the survivors still work after a reopen, and live keeps changing without touching them
    drv.reopen()
    drv.verify()
    for b in range(0, nblocks, 5):
        drv.write(b * BS + 7, b"after-delete")
    drv.verify()
    check_ownership(drv.eng)
    drv.eng.close()


@pytest.mark.parametrize("order", [(1, 2, 3, 4), (4, 3, 2, 1), (2, 4, 1, 3), (3, 1, 4, 2)])
def test_delete_every_snapshot_in_any_order(tmp_path: Path, order: tuple[int, ...]) -> None:
    nblocks = 200
    drv = Driver(open_pool(tmp_path), nblocks * BS)
    history(drv, random.Random(sum(order)), nblocks, gens=4)
    for g in order:
        _delete_and_check(drv, f"s{g}")
    # nothing but live is left: its blocks, the metadata and the superblock area are all used
    data, meta = check_ownership(drv.eng)
    assert set(data.values()) <= {"live"}
    live = drv.eng.volume("live").live
    assert len(data) == live.inode.owned_blocks
    assert drv.eng.pool.allocator.used_blocks == len(data) + len(meta) + L.first_data_block(BS)
    assert drv.eng.volume("live").chain == []
    drv.eng.close()


def test_deleted_snapshot_is_gone_for_readers(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(blk(1)), 0)
    eng.create_snapshot("s1")
    eng.write(ex, memoryview(blk(2)), 0)
    snap = eng.open_export("live@s1", True)
    latest = eng.open_export("live@latest", True)
    assert latest.snap_id == snap.snap_id
    freed = eng.delete_snapshot("s1")
    assert freed >= BS  # at least the one preserved block
    for e in (snap, latest):
        with pytest.raises(ExportGone):
            read_bytes(eng, e, 0, BS)
    with pytest.raises(NotFound):
        eng.open_export("live@s1", True)
    with pytest.raises(NotFound):
        eng.open_export("live@latest", True)
    eng.close()


@pytest.mark.parametrize("which", ["s1", "s2", "s3"])
def test_delete_in_background_steps_while_live_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    """A delete reclaims one leaf per step (STEP_SECONDS = 0); between steps the pool is used:
    writes, trims, a new snapshot, a reopen. Every other export stays exact throughout."""
    import fsimpl.core as engine_mod
    import fsimpl.snapshots as snapshots_mod

    monkeypatch.setattr(engine_mod, "STEP_SECONDS", 0.0)
    nblocks = 900
    drv = Driver(open_pool(tmp_path, size=4 << 20), nblocks * BS)
    rnd = random.Random(21)
    history(drv, rnd, nblocks, gens=3)
    eng = drv.eng
    rec = eng.snapshot(which)
    sid = rec.id
    monkeypatch.setattr(snapshots_mod, "BATCH", 16)  # entries per step
    batches = -(-eng.volume("live").shadows[sid].inode.entry_count // 16)
    assert batches >= 4
    eng.pool.mark_deleting(rec)  # what delete_snapshot does first ...
    drv.flush()  # ... and commits
    del drv.model.snaps[which]
    drv.verify()
    steps = 0
    while sid in drv.eng.pool.snapshots:
        assert drv.eng.tick() or sid not in drv.eng.pool.snapshots
        steps += 1
        for _ in range(5):
            b = rnd.randrange(nblocks)
            if rnd.random() < 0.2:
                drv.trim(b * BS, BS)
            else:
                drv.write(b * BS + rnd.randrange(BS), os.urandom(rnd.randint(1, 2 * BS)))
        if steps == 2:
            drv.snapshot("mid")
        if steps == 3:
            drv.reopen()  # the pending delete survives and resumes
            assert sid in drv.eng.pool.snapshots
            assert drv.eng.pool.pending_deletes() == [sid]
        drv.verify()
        assert steps < 100
    assert steps >= batches - 1
    data, _ = check_ownership(drv.eng)
    assert which not in set(data.values())
    drv.reopen()
    drv.verify()
    drv.eng.close()


# --- abort ---------------------------------------------------------------------------------------


def test_abort_drops_changes_since_last_commit(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    for b in range(8):
        eng.write(ex, memoryview(blk(b + 1)), b * BS)
    eng.create_snapshot("s1")  # commits; every live block is now shared with s1
    eng.write(ex, memoryview(blk(50)), 20 * BS)
    eng.flush()
    committed = read_bytes(eng, ex, 0, 32 * BS)
    data0, meta0 = check_ownership(eng)
    used0 = eng.pool.allocator.used_blocks
    gen0 = eng.pool.sb.generation

    # the open transaction: move-on-write of shared blocks, a fill of a hole, trims, a zero
    eng.write(ex, memoryview(blk(90) * 2), 2 * BS)
    eng.write(ex, memoryview(b"partial"), 5 * BS + 33)
    eng.write(ex, memoryview(blk(91)), 30 * BS)
    eng.trim(ex, 6 * BS, 2 * BS)
    eng.zero(ex, 0, BS)
    assert eng.pool.is_dirty
    assert read_bytes(eng, ex, 2 * BS, BS) == blk(90)

    eng.abort()
    assert not eng.pool.is_dirty
    assert eng.pool.sb.generation == gen0
    ex = eng.open_export("live", False)
    assert read_bytes(eng, ex, 0, 32 * BS) == committed
    assert read_bytes(eng, eng.open_export("live@s1", True), 0, 8 * BS) == b"".join(
        blk(b + 1) for b in range(8)
    )
    data1, meta1 = check_ownership(eng)
    assert data1 == data0 and meta1 == meta0
    assert eng.pool.allocator.used_blocks == used0
    # still fully usable, and the snapshot is still protected
    eng.write(ex, memoryview(blk(77)), 3 * BS)
    assert read_bytes(eng, eng.open_export("live@s1", True), 3 * BS, BS) == blk(4)
    eng = reopen(eng)
    ex = eng.open_export("live", True)
    assert read_bytes(eng, ex, 3 * BS, BS) == blk(77)
    assert read_bytes(eng, ex, 20 * BS, BS) == blk(50)
    eng.close()


def test_abort_of_snapshot_free_changes_and_reopen(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(os.urandom(10 * BS)), 0)
    eng.flush()
    committed = read_bytes(eng, ex, 0, 64 * BS)
    eng.write(ex, memoryview(os.urandom(20 * BS)), 40 * BS)  # new blocks
    eng.trim(ex, 0, 4 * BS)  # frees committed blocks (pending)
    eng.abort()
    ex = eng.open_export("live", False)
    assert read_bytes(eng, ex, 0, 64 * BS) == committed
    check_ownership(eng)
    eng = reopen(eng)
    assert read_bytes(eng, eng.open_export("live", True), 0, 64 * BS) == committed
    eng.close()


# --- partial writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_partial_writes_at_odd_offsets_merge(tmp_path: Path, cow: str) -> None:
    size = 64 * BS
    drv = Driver(open_pool(tmp_path, cow=cow), size)
    assert drv.eng.cow == cow
    # into holes, then over unshared data, then over data shared with a snapshot
    drv.write(1, b"A")
    drv.write(BS - 3, b"BBBBBB")  # crosses blocks 0 | 1
    drv.write(3 * BS + 100, os.urandom(2 * BS + 5))  # partial, whole, partial
    drv.verify()
    drv.write(3 * BS + 101, b"C" * 10)
    drv.snapshot("s1")
    drv.write(BS - 1, b"DD")  # shared blocks 0 and 1, one byte each
    drv.write(4 * BS + 17, os.urandom(BS))  # shared blocks 4 | 5
    drv.write(40 * BS + 4095, b"E")  # last byte of a hole block
    drv.verify()
    drv.snapshot("s2")
    rnd = random.Random(7 if cow == "move" else 8)
    for i in range(120):
        off = rnd.randrange(size - 1)
        n = rnd.choice([1, 2, 3, 511, 512, 513, BS - 1, BS + 1, 3 * BS + 7])
        n = min(n, size - off)
        drv.write(off, os.urandom(n))
        if i % 40 == 39:
            drv.snapshot(f"r{i}")
    drv.verify()
    check_ownership(drv.eng)
    drv.reopen()
    drv.verify()
    drv.eng.close()


def test_copy_on_write_keeps_live_in_place_and_commits_the_copy(tmp_path: Path) -> None:
    eng = open_pool(tmp_path, cow="copy")
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(blk(1) + blk(2)), 0)
    eng.create_snapshot("s1")
    vol = eng.volume("live")
    before = (vol.live.get(0).addr, vol.live.get(1).addr)
    commits = eng.pool.commits
    eng.write(ex, memoryview(b"xyz"), BS - 1)  # first writes to two shared blocks
    assert eng.pool.commits == commits + 1  # one commit for the whole request's copies
    assert (vol.live.get(0).addr, vol.live.get(1).addr) == before  # overwritten in place
    sid = eng.snapshot("s1").id
    assert vol.shadows[sid].get(0).kind == L.KIND_ADDR
    assert vol.shadows[sid].get(0).addr not in before
    eng.write(ex, memoryview(b"q"), 5)  # no longer shared: no copy, no commit
    assert eng.pool.commits == commits + 1
    s1 = eng.open_export("live@s1", True)
    assert read_bytes(eng, s1, 0, 2 * BS) == blk(1) + blk(2)
    want = bytearray(blk(1) + blk(2))
    want[BS - 1 : BS + 2] = b"xyz"
    want[5:6] = b"q"
    assert read_bytes(eng, ex, 0, 2 * BS) == bytes(want)
    eng.close()


# --- trim and zero -------------------------------------------------------------------------------


def test_trim_returns_space_without_snapshots(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(os.urandom(32 * BS)), 0)
    data0, meta0 = check_ownership(eng)
    used0 = eng.pool.allocator.used_blocks
    host0 = eng.device.allocated_bytes()
    # blocks 8..15 whole; the partial blocks at both ends keep their data
    eng.trim(ex, 8 * BS - 100, 8 * BS + 200)
    assert read_bytes(eng, ex, 8 * BS, 8 * BS) == bytes(8 * BS)
    data1, meta1 = check_ownership(eng)
    assert len(data0) - len(data1) == 8
    assert eng.pool.allocator.used_blocks == used0 - 8 - len(meta0) + len(meta1)
    assert eng.volume("live").live.inode.owned_blocks == 24
    # the 8 data blocks are punched out of the image once the deferral window lets them go
    assert eng.pool.allocator.waiting >= 8
    eng.core.make_room()
    with open(tmp_path / "pool.img", "rb") as f:
        for b in set(data0) - set(data1):
            try:
                nxt = os.lseek(f.fileno(), b * BS, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but holes to the end
                continue
            assert nxt >= (b + 1) * BS, f"trimmed data block {b} still takes host space"
    assert eng.device.allocated_bytes() < host0
    runs = eng.extents(ex, 0, 32 * BS)
    assert runs == [(0, 8 * BS, False), (8 * BS, 8 * BS, True), (16 * BS, 16 * BS, False)]
    eng.close()


def test_trim_partial_block_keeps_data(tmp_path: Path) -> None:
    eng = open_pool(tmp_path)
    ex = eng.open_export("live", False)
    data = os.urandom(2 * BS)
    eng.write(ex, memoryview(data), 0)
    eng.trim(ex, 10, BS)  # no whole block inside
    assert read_bytes(eng, ex, 0, 2 * BS) == data
    assert eng.volume("live").live.inode.owned_blocks == 2
    eng.close()


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_zero_reads_zeros_and_frees_whole_blocks(tmp_path: Path, cow: str) -> None:
    eng = open_pool(tmp_path, cow=cow)
    ex = eng.open_export("live", False)
    data = os.urandom(16 * BS)
    eng.write(ex, memoryview(data), 0)
    eng.flush()
    owned0 = eng.volume("live").live.inode.owned_blocks
    eng.zero(ex, 2 * BS + 10, 6 * BS)  # partial 2, whole 3..7, partial 8
    want = bytearray(data)
    want[2 * BS + 10 : 8 * BS + 10] = bytes(6 * BS)
    assert read_bytes(eng, ex, 0, 16 * BS) == bytes(want)
    assert eng.volume("live").live.inode.owned_blocks == owned0 - 5
    eng.zero(ex, 12 * BS + 5, 20)  # inside one block
    want[12 * BS + 5 : 12 * BS + 25] = bytes(20)
    assert read_bytes(eng, ex, 0, 16 * BS) == bytes(want)
    check_ownership(eng)
    eng = reopen(eng)
    assert read_bytes(eng, eng.open_export("live", True), 0, 16 * BS) == bytes(want)
    eng.close()


@pytest.mark.parametrize("cow", ["move", "copy"])
@pytest.mark.parametrize("op", ["trim", "zero"])
def test_trim_and_zero_with_snapshot_keep_the_snapshot(tmp_path: Path, cow: str, op: str) -> None:
    eng = open_pool(tmp_path, cow=cow)
    ex = eng.open_export("live", False)
    data = os.urandom(16 * BS)
    eng.write(ex, memoryview(data), 0)
    eng.create_snapshot("s1")
    eng.write(ex, memoryview(blk(5) * 2), 20 * BS)  # after the snapshot: live's own
    data0, _ = check_ownership(eng)
    getattr(eng, op)(ex, 4 * BS, 8 * BS)  # shared blocks 4..11
    getattr(eng, op)(ex, 20 * BS, 2 * BS)  # unshared blocks 20, 21
    assert read_bytes(eng, ex, 4 * BS, 8 * BS) == bytes(8 * BS)
    assert read_bytes(eng, ex, 20 * BS, 2 * BS) == bytes(2 * BS)
    s1 = eng.open_export("live@s1", True)
    assert read_bytes(eng, s1, 0, 16 * BS) == data
    assert read_bytes(eng, s1, 20 * BS, 2 * BS) == bytes(2 * BS)
    data1, _ = check_ownership(eng)
    # shared blocks were handed to the snapshot (no space back), unshared ones freed
    assert all(data0[a] == "live" for a in set(data0) - set(data1))
    assert len(data0) - len(data1) == 2
    assert sum(1 for o in data1.values() if o == "s1") == 8
    # deleting the snapshot returns the trimmed blocks' space
    eng.delete_snapshot("s1")
    data2, _ = check_ownership(eng)
    assert len(data2) == len(data1) - 8
    assert read_bytes(eng, ex, 0, 16 * BS) == data[: 4 * BS] + bytes(8 * BS) + data[12 * BS :]
    eng.close()


def test_trimmed_block_rewritten_after_new_snapshot(tmp_path: Path) -> None:
    drv = Driver(open_pool(tmp_path), 32 * BS)
    drv.write(5 * BS, blk(1))
    drv.snapshot("s1")
    drv.trim(5 * BS, BS)  # s1 takes the block; live: unallocated, changed since s1
    drv.snapshot("s2")  # s2 sees a hole at block 5
    drv.write(5 * BS, blk(2))
    drv.verify()
    vol = drv.eng.volume("live")
    assert vol.shadows[drv.eng.snapshot("s2").id].get(5).kind == L.KIND_HOLE
    drv.trim(5 * BS, BS)  # unshared now: freed
    drv.write(5 * BS + 1, b"x")
    drv.verify()
    _delete_and_check(drv, "s2")
    _delete_and_check(drv, "s1")
    drv.eng.close()


# --- rollback ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_rollback_restores_live_exactly(tmp_path: Path, cow: str) -> None:
    nblocks = 300
    drv = Driver(open_pool(tmp_path, cow=cow), nblocks * BS)
    history(drv, random.Random(5), nblocks, gens=2)
    eng = drv.eng
    with pytest.raises(Refused):
        eng.rollback("s1")  # s2 is newer
    drv.verify()  # a refused rollback changed nothing
    old_ex = drv.ex
    data0, meta0 = check_ownership(eng)
    used0 = eng.pool.allocator.used_blocks
    vol = eng.volume("live")
    sid = eng.snapshot("s2").id
    # live's blocks that s2 has an entry for are replaced, hence freed
    replaced = {
        vol.live.get(b).addr
        for b, _ in vol.shadows[sid].iter_entries()
        if vol.live.get(b).kind == L.KIND_ADDR
    }
    drv.rollback("s2")
    with pytest.raises(ExportGone):
        read_bytes(eng, old_ex, 0, BS)
    drv.verify()
    data1, meta1 = check_ownership(eng)
    assert set(data1) == set(data0) - replaced
    assert eng.pool.allocator.used_blocks == used0 - len(replaced) - len(meta0) + len(meta1)
    assert vol.shadows[sid].is_empty()  # s2 == live now: all ditto
    # writes after the rollback preserve s2 again
    for b in range(0, nblocks, 3):
        drv.write(b * BS + 11, b"post-rollback")
    drv.verify()
    # roll back again, further: s2 first, then s1
    drv.delete("s2")
    drv.rollback("s1")
    drv.verify()
    check_ownership(drv.eng)
    drv.reopen()
    drv.verify()
    drv.eng.close()


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_older_snapshot_survives_rollback_delete_and_overwrite(tmp_path: Path, cow: str) -> None:
    """s1 relies on s2 for blocks first changed after s2; a rollback to s2 hands those blocks
    back to live; after s2 is deleted, s1 relies on live's blocks, which must not be
    overwritten in place."""
    drv = Driver(open_pool(tmp_path, cow=cow), 16 * BS)
    for b in range(16):
        drv.write(b * BS, blk(b + 1))
    drv.snapshot("s1")
    drv.write(0, blk(100))  # changed between s1 and s2: s1 owns the original
    drv.snapshot("s2")
    for b in range(1, 8):  # first changed after s2: s2 owns the originals, s1 dittos to s2
        drv.write(b * BS, blk(200 + b))
    drv.rollback("s2")
    drv.verify()
    drv.delete("s2")
    drv.verify()
    for b in range(16):
        drv.write(b * BS + 100, b"overwrite")
    drv.verify()
    drv.write(0, os.urandom(16 * BS))
    drv.verify()
    check_ownership(drv.eng)
    drv.reopen()
    drv.verify()
    drv.eng.close()


def test_rollback_with_nothing_changed_is_a_no_op(tmp_path: Path) -> None:
    drv = Driver(open_pool(tmp_path), 16 * BS)
    drv.write(0, os.urandom(16 * BS))
    drv.snapshot("s1")
    data0, _ = check_ownership(drv.eng)
    drv.rollback("s1")
    data1, _ = check_ownership(drv.eng)
    assert data1 == data0
    drv.verify()
    drv.eng.close()


def test_volume_size_not_a_multiple_of_the_block_size(tmp_path: Path) -> None:
    size = 10 * BS + 1234
    drv = Driver(open_pool(tmp_path, size=size), size)
    assert drv.ex.size == size
    drv.write(0, os.urandom(size))
    drv.snapshot("s1")
    assert drv.eng.open_export("live@s1", True).size == size
    drv.write(size - 100, b"Z" * 100)  # the partial last block, shared: merged
    drv.verify()
    drv.zero(9 * BS + 5, size - (9 * BS + 5))  # to the end
    drv.trim(2 * BS, size - 2 * BS)  # the partial last block keeps its (zero) data
    drv.verify()
    with pytest.raises(OutOfRange):
        drv.eng.write(drv.ex, memoryview(b"xx"), size - 1)
    drv.reopen()
    drv.verify()
    check_ownership(drv.eng)
    drv.eng.close()


def test_live_read_during_a_stepped_rollback_is_never_a_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback runs in steps (one leaf per step with STEP_SECONDS = 0) and releases the
    engine lock between them, so a client may connect to live meanwhile. What it reads must
    be the snapshot's content (the state the rollback makes) or an error; never half of the
    old live and half of the snapshot."""
    import fsimpl.core as engine_mod
    import fsimpl.snapshots as snapshots_mod

    monkeypatch.setattr(engine_mod, "STEP_SECONDS", 0.0)
    monkeypatch.setattr(snapshots_mod, "BATCH", 16)  # entries per step
    nblocks = 900
    drv = Driver(open_pool(tmp_path, size=4 << 20), nblocks * BS)
    for b in range(nblocks):
        drv.write(b * BS, blk(b + 1))
    drv.snapshot("s1")
    for b in range(0, nblocks, 3):
        drv.write(b * BS, blk(5000 + b))
    eng = drv.eng
    vol = eng.volume("live")
    rec = eng.snapshot("s1")
    # the first half of Engine.rollback: mark the volume, commit; the steps follow
    vol.inode.op = L.OP_ROLLBACK
    vol.inode.op_target = rec.id
    vol.inode.incarnation += 1
    eng.pool.touch_inode(vol.inode)
    eng.flush()
    want = drv.model.snaps["s1"]
    seen: list[str] = []
    while vol.inode.op == L.OP_ROLLBACK:
        eng.tick()
        try:
            ex = eng.open_export("live", True)
            got = read_bytes(eng, ex, 0, nblocks * BS)
        except DittoError as e:
            seen.append(type(e).__name__)
            continue
        if got == want:
            seen.append("snapshot")
            continue
        mixed = sum(
            got[b * BS : (b + 1) * BS] != want[b * BS : (b + 1) * BS] for b in range(nblocks)
        )
        seen.append(f"mix: {mixed} blocks not yet rolled back")
    drv.model.live[:] = want
    drv.ex = eng.open_export("live", False)
    drv.verify()
    assert len(seen) >= 4
    assert all(not s.startswith("mix") for s in seen), seen


# --- device errors ------------------------------------------------------------------------------


def _engine_on_failing_device(tmp_path: Path, cow: str) -> tuple[Engine, FaultyDevice]:
    path = tmp_path / "pool.img"
    open_pool(tmp_path).close()
    dev = FaultyDevice(str(path))
    dev.lock()
    return Engine(dev, Pool.open(dev), cow, DEFAULT_CACHE_BYTES), dev


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_failed_partial_write_leaves_the_rest_of_the_block_alone(tmp_path: Path, cow: str) -> None:
    """A 1-byte write to a block shared with a snapshot fails at the disk. The request fails;
    its one byte is undefined, but the other 4095 bytes of the block must still read what they
    held, the snapshot must be intact, and no block may leak."""
    eng, dev = _engine_on_failing_device(tmp_path, cow)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(blk(1)), 0)
    eng.create_snapshot("s1")
    dev.fail("write")  # the next write: an EIO from the disk
    with pytest.raises(DittoError):
        eng.write(ex, memoryview(b"X"), 5)
    assert dev.failures == 1
    got = read_bytes(eng, ex, 0, BS)
    want = blk(1)
    assert read_bytes(eng, eng.open_export("live@s1", True), 0, BS) == want
    assert got[:5] == want[:5] and got[6:] == want[6:]  # move: the whole block reads zeros
    check_ownership(eng)  # copy: the allocated copy block leaks
    eng.close()


# --- exports -------------------------------------------------------------------------------------


def test_read_only_and_out_of_range_requests(tmp_path: Path) -> None:
    eng = open_pool(tmp_path, size=8 * BS)
    ex = eng.open_export("live", False)
    ro = eng.open_export("live", True)
    eng.create_snapshot("s1")
    snap = eng.open_export("live@s1", True)
    for e in (ro, snap):
        with pytest.raises(ReadOnlyExport):
            eng.write(e, memoryview(b"x"), 0)
        with pytest.raises(ReadOnlyExport):
            eng.trim(e, 0, BS)
        with pytest.raises(ReadOnlyExport):
            eng.zero(e, 0, BS)
    with pytest.raises(OutOfRange):
        eng.write(ex, memoryview(b"xy"), 8 * BS - 1)
    with pytest.raises(OutOfRange):
        read_bytes(eng, ex, 8 * BS, 1)
    with pytest.raises(OutOfRange):
        eng.trim(ex, -1, 2)
    eng.write(ex, memoryview(b"z"), 8 * BS - 1)  # the last byte is fine
    assert read_bytes(eng, ex, 8 * BS - 1, 1) == b"z"
    assert read_bytes(eng, snap, 8 * BS - 1, 1) == b"\0"
    eng.close()


# --- randomized model check ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cow", "seed", "cache_bytes"),
    [
        ("move", 1, 64 << 20),
        ("move", 2, 64 << 20),
        ("copy", 3, 64 << 20),
        ("move", 4, 16 * BS),
        ("copy", 5, 16 * BS),
    ],
)
def test_random_operations_match_the_model(
    tmp_path: Path, cow: str, seed: int, cache_bytes: int
) -> None:
    """Random requests and snapshot operations, with reopens and power cuts, against the
    model; a 16-block metadata cache forces evictions everywhere."""
    rnd = random.Random(seed)
    nblocks = 400
    size = nblocks * BS
    drv = Driver(open_pool(tmp_path, size=size, cow=cow, cache_bytes=cache_bytes), size)
    drv.cache_bytes = cache_bytes
    counter = itertools.count()
    for step in range(400):
        r = rnd.random()
        off = rnd.randrange(size)
        n = min(size - off, rnd.choice([1, 100, BS, BS + 1, 5 * BS, 20 * BS]))
        if r < 0.55:
            drv.write(off, os.urandom(n))
        elif r < 0.65:
            drv.trim(off, n)
        elif r < 0.72:
            drv.zero(off, n)
        elif r < 0.80 and len(drv.model.snaps) < 6:
            drv.snapshot(f"x{next(counter)}")
        elif r < 0.86 and drv.model.snaps:
            drv.delete(rnd.choice(sorted(drv.model.snaps)))
        elif r < 0.89 and drv.model.snaps:
            newest = max(drv.model.snaps, key=lambda s: drv.eng.snapshot(s).id)
            drv.rollback(newest)
        elif r < 0.92:
            drv.flush()
        elif r < 0.94:
            drv.reopen()
        elif r < 0.96:
            drv.crash()
        elif r < 0.98:
            drv.abort()
        if step % 50 == 49:
            drv.verify()
            drv.model.spot_check(drv.eng, rnd)
            check_ownership(drv.eng)
            drv._committed_now()
    drv.verify()
    check_ownership(drv.eng)
    assert drv.crashes >= 3 and drv.aborts >= 3
    drv.eng.close()


# --- I/O costs (counted, not timed) --------------------------------------------------------------


def _filled_pool(tmp_path: Path, mib: int, name: str) -> Engine:
    # one metadata copy: the bounds below count nodes once (two copies write each twice; the
    # benchmark compares the two)
    eng = open_pool(tmp_path, size=mib << 20, name=name, metadata_copies=1)
    ex = eng.open_export("live", False)
    chunk = os.urandom(1 << 20)
    for i in range(mib):
        eng.write(ex, memoryview(chunk), i << 20)
    eng.flush()
    assert eng.volume("live").live.inode.owned_blocks == (mib << 20) // BS
    return eng


def _cost(eng: Engine, op: object) -> tuple[int, int, int, int, int]:
    """(device reads, device writes, syncs, metadata nodes read, metadata nodes written)."""
    st = eng.device.stats.snapshot()
    store = eng.pool.store
    nr, nw = store.nodes_read, store.nodes_written
    op()  # type: ignore[operator]
    d = eng.device.stats.since(st)
    store = eng.pool.store
    return d.reads, d.writes, d.syncs, store.nodes_read - nr, store.nodes_written - nw


def test_snapshot_create_costs_the_same_on_tiny_and_large_volumes(tmp_path: Path) -> None:
    costs = {}
    for mib in (1, 64):
        eng = _filled_pool(tmp_path, mib, f"p{mib}.img")
        first = _cost(eng, lambda e=eng: e.create_snapshot("s1"))
        # and the next one, after live changed a little
        ex = eng.open_export("live", False)
        eng.write(ex, memoryview(blk(1)), 0)
        eng.flush()
        second = _cost(eng, lambda e=eng: e.create_snapshot("s2"))
        costs[mib] = (first, second)
        assert eng.pool.allocator.capacity > (mib << 20) // BS
        eng.close()
    assert costs[1] == costs[64]
    (reads, writes, syncs, nread, nwritten), _ = costs[64]
    assert writes <= 7  # a few table and bitmap blocks, and the superblock's two copies
    assert reads == 0 and nread == 0
    assert syncs == 2
    assert nwritten == writes - 2  # everything but the superblock copies is a metadata node


def _delete_cost(tmp_path: Path, mib: int, own: int, contiguous: bool) -> tuple[int, ...]:
    """Cost of deleting a snapshot that owns `own` blocks of a fully written volume of `mib`
    MiB, measured from a cold cache (the pool reopened)."""
    name = f"d{mib}_{own}_{int(contiguous)}.img"
    eng = _filled_pool(tmp_path, mib, name)
    eng.create_snapshot("a")
    ex = eng.open_export("live", False)
    nblocks = (mib << 20) // BS
    step = 1 if contiguous else nblocks // own
    for k in range(own):
        eng.write(ex, memoryview(blk(k)), k * step * BS)
    eng.flush()
    sid = eng.snapshot("a").id
    assert eng.volume("live").shadows[sid].inode.owned_blocks == own
    eng = reopen(eng)
    used0 = eng.pool.allocator.used_blocks
    cost = _cost(eng, lambda: eng.delete_snapshot("a"))
    data, meta = check_ownership(eng)
    assert len(data) == nblocks  # exactly the snapshot's own blocks were freed
    assert eng.pool.allocator.used_blocks <= used0 - own
    eng.close()
    return cost


def test_delete_cost_follows_the_snapshots_own_blocks(tmp_path: Path) -> None:
    small_vol = _delete_cost(tmp_path, 2, 4, contiguous=True)
    big_vol = _delete_cost(tmp_path, 32, 4, contiguous=True)
    # a snapshot owning 4 blocks: the same few I/Os whatever the volume size
    assert big_vol == small_vol
    reads, writes, _, nread, _ = big_vol
    assert reads + writes <= 12
    assert nread <= 2  # its one leaf (and nothing of the volume's 8192-entry map)
    # owning more blocks costs more: one leaf read per 168 entries owned
    many = _delete_cost(tmp_path, 32, 1600, contiguous=True)
    leaves = -(-1600 // CAP)
    assert many[3] >= leaves
    assert many[0] > big_vol[0]
    assert many[4] == big_vol[4]  # the writes stay constant: freed leaves are not rewritten
    # spread out, 4 owned blocks touch at most 4 leaves even on the big volume
    spread = _delete_cost(tmp_path, 32, 4, contiguous=False)
    assert spread[3] <= 4 + 1
    assert spread[3] < many[3]


def test_delete_of_middle_snapshot_costs_its_own_blocks(tmp_path: Path) -> None:
    """Pushing entries down reads the older snapshot's map only where the deleted one has
    entries: a 32 MiB volume with a few changes per generation deletes with a few I/Os."""
    eng = _filled_pool(tmp_path, 32, "mid.img")
    ex = eng.open_export("live", False)
    for g in range(3):
        eng.create_snapshot(f"g{g}")
        for k in range(3):
            eng.write(ex, memoryview(blk(g * 10 + k)), (1000 * g + 7 * k) * BS)
    eng.flush()
    g0 = eng.open_export("live@g0", True)
    g2 = eng.open_export("live@g2", True)
    spots = [(1000 * g + 7 * k) * BS for g in range(3) for k in range(3)]
    before = {(e.name, o): read_bytes(eng, e, o, BS) for e in (g0, g2) for o in spots}
    sid = eng.snapshot("g1").id
    vol = eng.volume("live")
    assert vol.shadows[vol.older_than(sid)].get(1000) == L.EMPTY_ENTRY  # g0 relies on g1 there
    eng = reopen(eng)
    reads, writes, _, nread, nwritten = _cost(eng, lambda: eng.delete_snapshot("g1"))
    assert nread <= 4  # the shadow index's and the shadow list's nodes on the way
    assert reads + writes <= 16
    check_ownership(eng)
    g0 = eng.open_export("live@g0", True)
    g2 = eng.open_export("live@g2", True)
    after = {(e.name, o): read_bytes(eng, e, o, BS) for e in (g0, g2) for o in spots}
    assert after == before
    eng.close()

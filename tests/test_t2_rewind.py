"""The rewindable history: the deferral window, the root ring, and the rewind, in-process.

A pool goes through a dozen commits, each changing data, taking or deleting snapshots (so every
commit frees blocks), and records what every export held at each generation. Then:

* the two generations before the newest are whole: a rewind to either reads exactly what the
  pool held then, whatever the allocator did since (the freed blocks waited);
* older ring entries are offered only after their metadata verifies; one whose metadata has
  been overwritten since is listed unusable and a rewind to it is refused;
* when the newest state cannot be read, the open is refused with the newest usable generation
  named, and a rewind there serves it;
* a rewind happens once: asking for the same rewind again after the pool has moved on is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.data import pattern
from support.history import REWOUND, build, exports, same_as_at
from support.logcheck import BAD_METADATA, HEALED_COPY
from t8_helpers import metadata_blocks

from fsimpl import layout as L
from fsimpl.engine import Engine
from fsimpl.errors import CorruptMetadata, DittoError, Refused

BS = 4096


def test_the_deferral_window_is_whole(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.img"
    history = build(pristine)
    newest = max(history)
    assert "live@keep" in history[newest - 2]
    listed = Engine.rewind_list(str(pristine))
    assert [g["generation"] for g in listed][:3] == [newest, newest - 1, newest - 2]
    assert [g["status"] for g in listed][:3] == ["newest", "whole", "whole"], listed
    assert len(listed) == 1 + L.ROOT_RING
    for back in (1, 2):
        path = tmp_path / f"back{back}.img"
        shutil.copyfile(pristine, path)
        target = newest - back
        result = Engine.rewind(str(path), target)
        assert result["rewound_to"] == target and result["generation"] == newest + 1
        assert [d["generation"] for d in result["discarded_generations"]] == list(
            range(newest, target, -1)
        )
        eng = Engine.open(str(path), claim=False)
        try:
            same_as_at(exports(eng), history, target)
            assert eng.pool.sb.rewound_to == target
            eng.check_committed()["clean"] or pytest.fail(f"rewind to {target}: not clean")
        finally:
            eng.close()


def test_older_entries_are_verified_before_they_are_offered(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.img"
    history = build(pristine)
    newest = max(history)
    listed = {g["generation"]: g for g in Engine.rewind_list(str(pristine))}
    older = [g for gen, g in listed.items() if gen < newest - L.DEFER_GENERATIONS]
    assert older and all(g["status"] in ("verified", "unusable") for g in older), older
    usable = [g["generation"] for g in older if g["status"] == "verified"]
    unusable = [g["generation"] for g in older if g["status"] == "unusable"]
    # the history above reuses freed blocks at once beyond the window: some entries are gone
    assert unusable, f"every old entry verified: {older}"
    for gen in unusable:
        path = tmp_path / f"u{gen}.img"
        shutil.copyfile(pristine, path)
        before = path.read_bytes()
        with pytest.raises(Refused, match=f"generation {gen} cannot be opened"):
            Engine.rewind(str(path), gen)
        assert path.read_bytes() == before, "a refused rewind wrote"
    for gen in usable:  # a verified one opens, and its metadata is whole
        path = tmp_path / f"v{gen}.img"
        shutil.copyfile(pristine, path)
        Engine.rewind(str(path), gen)
        eng = Engine.open(str(path), claim=False)
        try:
            report = eng.check_committed()
            assert report["fatal"] == 0, report
        finally:
            eng.close()


@pytest.mark.engine_log(BAD_METADATA, REWOUND)
def test_unreadable_newest_state_names_the_newest_usable_generation(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    history = build(path)
    newest = max(history)
    blocks, sb = metadata_blocks(path)
    root = next(m for m in blocks if m.tree == "inode table" and m.level == sb.inode_height)
    assert root.addr == sb.inode_root
    with open(path, "r+b") as f:  # the newest inode table root, zeroed (one copy: lost)
        f.seek(root.addr * BS)
        f.write(bytes(BS))
    before = path.read_bytes()
    with pytest.raises(CorruptMetadata) as ei:
        Engine.open(str(path), claim=False)
    msg = str(ei.value)
    assert f"metadata block {root.addr}" in msg, msg
    assert f"newest usable generation is {newest - 1}" in msg, msg
    assert "rewind --list" in msg and f"rewind {newest - 1} --yes" in msg, msg
    assert path.read_bytes() == before, "a refused open wrote"
    # the plugin's way: open with rewind=GEN
    eng = Engine.open(str(path), claim=False, rewind=newest - 1)
    try:
        same_as_at(exports(eng), history, newest - 1)
    finally:
        eng.close()


@pytest.mark.engine_log(REWOUND)
def test_a_rewind_happens_once(tmp_path: Path) -> None:
    path = tmp_path / "pool.img"
    history = build(path)
    newest = max(history)
    eng = Engine.open(str(path), claim=False, rewind=newest - 2)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(pattern(99, BS)), 0)  # the pool moves on
    eng.flush()
    eng.close()
    with pytest.raises(Refused, match=f"already rewound to generation {newest - 2}"):
        Engine.open(str(path), claim=False, rewind=newest - 2)
    with pytest.raises(DittoError, match="nothing to rewind"):
        Engine.rewind(str(path), newest + 50)
    eng = Engine.open(str(path), claim=False)  # a plain open serves what it moved on to
    try:
        ex = eng.open_export("live", True)
        buf = bytearray(BS)
        eng.read(ex, memoryview(buf), 0)
        assert bytes(buf) == pattern(99, BS)
    finally:
        eng.close()


# (listing opens the ring's older generations, whose blocks were reused: their reads are
# logged, served from a second copy not yet reused)
@pytest.mark.engine_log(BAD_METADATA, HEALED_COPY, r"should be a")
def test_a_root_every_generation_shares_lost_is_a_clean_refusal(tmp_path: Path) -> None:
    """Commits that left the inode table alone share its root block with the generations
    before them: losing both its copies makes every one of them unusable. The listing says
    so, and the open's refusal (which looks for the newest usable generation, without the
    deep walk) is a clean error: nothing crashes, nothing is written."""
    path = tmp_path / "pool.img"
    eng = Engine.open(str(path), create_size=1 << 20, block_size=BS, claim=False)
    eng.write(eng.open_export("live", False), memoryview(pattern(1, BS)), 0)
    eng.flush()
    for i in range(6):  # commits of the superblock alone: every one shares the tables
        eng.tune(snapshot_min_free=(i + 1) * BS)
    root = eng.pool.inodes.root
    eng.close()
    with open(path, "r+b") as f:
        for addr in (root.addr0, root.addr1):
            f.seek(addr * BS)
            f.write(bytes(BS))
    before = path.read_bytes()
    listed = Engine.rewind_list(str(path))
    assert {g["status"] for g in listed[:6]} == {"unusable"}, listed  # the tune commits
    with pytest.raises(CorruptMetadata, match=f"metadata block {root.addr0}"):
        Engine.open(str(path), claim=False)
    assert path.read_bytes() == before

"""A pool with a recorded history, for the rewind tests: what every export read at each
generation, and what a rewind to one of them must read."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsimpl.engine import Engine

from .data import pattern

BS = 4096
REWOUND = r"rewind=\d+: opened at generation"


def exports(eng: Engine, skip: str | None = None) -> dict[str, bytes]:
    """What every export reads (but those of volume `skip`), live@latest aside."""
    out = {}
    for name, _ in eng.export_names():
        if name.endswith("@latest") or name.split("@")[0] == skip:
            continue
        ex = eng.open_export(name, True)
        buf = bytearray(ex.size)
        eng.read(ex, memoryview(buf), 0)
        out[name] = bytes(buf)
    return out


def same_as_at(got: dict[str, bytes], history: dict[int, dict[str, bytes]], gen: int) -> None:
    """What a rewind to gen must read: every snapshot exactly as at gen (snapshot blocks are
    never written in place); a volume, block by block, what it held at gen or what a later
    generation wrote in place (live data is overwritten in place when no snapshot shares it,
    as in any block device: the rewind brings back the pool's structure, and no data from
    before gen)."""
    want = history[gen]
    assert sorted(got) == sorted(want), f"rewind to {gen}: other exports"
    later = [h for g, h in sorted(history.items()) if g >= gen]
    for name, data in got.items():
        if "@" in name:
            assert data == want[name], f"rewind to {gen}: snapshot {name} differs"
            continue
        for off in range(0, len(data), BS):
            block = data[off : off + BS]
            if not any(h.get(name, b"")[off : off + BS] == block for h in later):
                pytest.fail(f"rewind to {gen}: {name} block {off // BS} holds data it never had")


def build(path: Path, copies: int = 1) -> dict[int, dict[str, bytes]]:
    """The pool's history: generation -> what every export read then. Left crashed."""
    eng = Engine.open(
        str(path), create_size=2 << 20, block_size=BS, claim=False, metadata_copies=copies
    )
    ex = eng.open_export("live", False)
    history: dict[int, dict[str, str]] = {}
    for step in range(14):
        gen = eng.pool.sb.generation
        eng.write(ex, memoryview(pattern(step + 1, 24 * BS)), (step % 4) * 24 * BS)
        if step % 3 == 0 and step < 9:
            eng.create_snapshot(f"s{step}")
        if step % 3 == 2 and step < 9:
            eng.delete_snapshot(f"s{step - 2}")  # frees what it held
        if step == 7:
            eng.create_snapshot("keep")  # live writes after it move blocks into it
        eng.trim(ex, ((step + 2) % 4) * 24 * BS, 8 * BS)  # and so does this
        eng.flush()
        history[eng.pool.sb.generation] = exports(eng)
        if step >= 9:  # the last steps commit once each: every generation is recorded
            assert eng.pool.sb.generation == gen + 1
    eng.device.close()  # a crash: no clean close
    return history

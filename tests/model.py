"""An in-memory model of a pool's exports, and a random workload that drives both.

The model is the specification: live is a bytearray; a snapshot is a frozen copy of live when it
was taken. Trim deallocates whole blocks only (they read zeros) and leaves partial blocks alone,
which is what dittofs promises. Every operation is applied to the model and to the system under
test through a small `Target` interface, so the same workload runs in-process and through nbdkit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Target(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def create(self, name: str) -> None: ...
    def delete(self, name: str) -> None: ...
    def rollback(self, name: str) -> None: ...
    def restart(self) -> None: ...
    def crash_after_flush(self) -> None: ...
    def read(self, export: str, offset: int, length: int) -> bytes: ...


@dataclass
class Model:
    size: int
    block_size: int
    live: bytearray = field(init=False)
    snaps: dict[str, bytes] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # snapshot names, oldest first

    def __post_init__(self) -> None:
        self.live = bytearray(self.size)

    def write(self, offset: int, data: bytes) -> None:
        self.live[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.live[offset : offset + length] = bytes(length)

    def trim(self, offset: int, length: int) -> None:
        bs = self.block_size
        first = -(-offset // bs) * bs
        end = (offset + length) // bs * bs
        if end > first:
            self.live[first:end] = bytes(end - first)

    def create(self, name: str) -> None:
        self.snaps[name] = bytes(self.live)
        self.order.append(name)

    def delete(self, name: str) -> None:
        del self.snaps[name]
        self.order.remove(name)

    def rollback(self, name: str) -> None:
        self.live[:] = self.snaps[name]


@dataclass
class Workload:
    """Random operations with weights; `run` applies them to model and target alike."""

    model: Model
    target: Target
    rng: random.Random
    log: list[str] = field(default_factory=list)
    serial: int = 0
    verify: Callable[[], None] | None = None
    grain: int = 512  # the alignment of the partial writes that defer their merge

    def _span(self, max_len: int) -> tuple[int, int]:
        size = self.model.size
        bs = self.model.block_size
        if self.rng.random() < 0.3:  # block-aligned, sometimes many blocks
            first = self.rng.randrange(0, size // bs)
            n = self.rng.randrange(1, min(8, size // bs - first) + 1)
            return first * bs, n * bs
        if self.rng.random() < 0.35:  # whole sectors: partial first writes defer their merge
            grain = self.grain  # (with data checksums: whole 4 KiB units)
            off = self.rng.randrange(0, size // grain) * grain
            n = self.rng.randrange(1, min(max_len, size - off) // grain + 1) * grain
            return off, n
        off = self.rng.randrange(0, size - 1)
        return off, self.rng.randrange(1, min(max_len, size - off) + 1)

    def step(self) -> None:
        m, t, rng = self.model, self.target, self.rng
        self.serial += 1
        r = rng.random()
        if r < 0.45:
            off, n = self._span(3 * m.block_size)
            data = rng.randbytes(n)
            self.log.append(f"write {off} {n}")
            t.write(off, data)
            m.write(off, data)
        elif r < 0.52:
            off, n = self._span(4 * m.block_size)
            self.log.append(f"zero {off} {n}")
            t.zero(off, n)
            m.zero(off, n)
        elif r < 0.59:
            off, n = self._span(4 * m.block_size)
            self.log.append(f"trim {off} {n}")
            t.trim(off, n)
            m.trim(off, n)
        elif r < 0.67:
            name = f"s{self.serial}"
            self.log.append(f"create {name}")
            t.create(name)
            m.create(name)
        elif r < 0.74 and m.order:
            name = rng.choice(m.order)
            self.log.append(f"delete {name}")
            t.delete(name)
            m.delete(name)
        elif r < 0.77 and m.order:
            name = m.order[-1]
            self.log.append(f"rollback {name}")
            t.rollback(name)
            m.rollback(name)
        elif r < 0.80:
            self.log.append("flush")
            t.flush()
        elif r < 0.82:
            self.log.append("restart")
            t.restart()
        elif r < 0.84:
            self.log.append("crash after flush")
            t.crash_after_flush()
        else:
            self.check_random_read()

    def check_random_read(self) -> None:
        m = self.model
        names = ["live"] + [f"live@{n}" for n in m.order]
        export = self.rng.choice(names)
        off, n = self._span(5 * m.block_size)
        want = (m.live if export == "live" else m.snaps[export[5:]])[off : off + n]
        got = self.target.read(export, off, n)
        assert got == want, (
            f"{export} [{off}, +{n}) differs from the model; last ops: {self.log[-12:]}"
        )

    def check_all(self) -> None:
        m = self.model
        exports = [("live", m.live)] + [(f"live@{n}", m.snaps[n]) for n in m.order]
        for export, want in exports:
            got = self.target.read(export, 0, m.size)
            if got != want:
                bad = next(i for i in range(m.size) if got[i] != want[i])
                raise AssertionError(
                    f"{export} differs from the model first at byte {bad} (block "
                    f"{bad // m.block_size}); last ops: {self.log[-12:]}"
                )

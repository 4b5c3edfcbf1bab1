#!/usr/bin/env python3
"""Side-by-side benchmark of dittofs against nbdkit file, a pass-through Python plugin and
qemu-nbd serving qcow2 with internal snapshots: every workload, every system, one run.

    scripts/bench.py [--quick] [--size-scale F] [--repeats N] [--json FILE] [--plot FILE.png]
                     [--only io,chain,create,diff,scale,snaps] [--dir DIR]

Systems: `nbdkit file` on a raw image (the C ceiling), scripts/passthrough_plugin.py (the
Python ceiling), qemu-nbd on qcow2 (snapshots with `qemu-img snapshot -c`, qemu-nbd stopped and
restarted around it since it locks the image), dittofs cow=move and cow=copy. All serve on Unix
sockets; the clients are fio's nbd engine, libnbd and nbdcopy; every image lives in --dir.

Workloads (full sizes; --size-scale multiplies every size, --quick shrinks sizes and counts):
  io      sequential write (empty volume, then overwrite) and read, 1 MiB requests over 1 GiB;
          4 KiB random write and read at QD16 for --runtime s on blocks live owns, and 4 KiB
          random writes at QD1 with a FLUSH after each (fsync-heavy); first write
          after a snapshot of the fully written volume: sequential 1 MiB, then 4 KiB at QD16
          into every 64 KiB block once in random order (a fio replay log); delete of the
          snapshot the sequential first write left owning 1 GiB. The same rows again on
          pools formatted with one metadata copy (the default keeps two): the second copy's
          cost.
  chain   100 snapshots, each 1% of the blocks changed from the next: sequential 1 MiB and
          4 KiB QD16 random reads of the oldest versus live.
  create  snapshot create on a 1 TiB sparse pool with 0, 100 and 1,000 snapshots: median of
          100 creates through the control socket (each deleted again untimed), snapctl's wall
          time beside it; qcow2: `qemu-img snapshot -c` wall time.
  diff    8 GiB volume written in full, snapshot, 1% of the blocks changed, snapshot:
          `snapctl diff` (and the control call) versus finding every difference between the
          two states as raw images (made with nbdcopy) with `qemu-img compare` (it stops at
          the first mismatch, so it is resumed after each one) and, for reference, one
          qemu-img compare pass over identical images (the floor of any full compare).
  scale   pools of 1 GiB, 64 GiB and 1 TiB with 100 snapshots and 10% of the blocks written
          (4 KiB into each, a strided fio job per snapshot interval): time until a 4 KiB read
          answers after launching the server, its VmRSS then and after --rss-runtime s of
          4 KiB random reads over the whole volume, snapshot create time, and delete time of a
          snapshot owning 1,024 blocks (64 MiB). The written fraction is lowered where the
          image would exceed --max-image (a 4 KiB write allocates a whole 64 KiB block in
          dittofs and in qcow2); the row label says the fraction used.
  snaps   dittofs alone: 100, 1,000 and 10,000 snapshots of a 1 GiB volume written in full,
          each taken after one 4 KiB write, and up to 1,000 on a 1 TiB sparse pool: open and
          `snapctl list --json` times of a fresh server, 4 KiB QD16 random reads of the oldest
          snapshot cold (the first --cold-runtime s) and warm against live, nbdkit's RSS,
          metadata per snapshot, create and delete (scripts/bench_snaps.py).

Prints one table (rows: workloads; columns: each system, then the ratios dittofs/pass-through
and dittofs/qcow2 of the row's figure), then the issue's targets with the measured figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_snaps  # noqa: E402
from bench_systems import (  # noqa: E402
    BLOCK,
    Dittofs,
    Qcow2,
    System,
    apply_writes,
    fio,
    make_systems,
    mibs,
    rss_kib,
    timed_run,
    write_iolog,
)

GiB, MiB, TiB = 1 << 30, 1 << 20, 1 << 40
SYSTEMS = ["file", "pt", "qcow2", "move", "copy"]
# io rows measured again on pools with one metadata copy (the default keeps two)
ONE_COPY_ROWS = {
    "seq_fill": "seq write 1M, empty volume",
    "seq_write": "seq write 1M, overwrite",
    "seq_read": "seq read 1M",
    "rand_write": "4K random write QD16, steady",
    "rand_read": "4K random read QD16",
    "fsync_write": "4K random write QD1, FLUSH after each",
    "first_seq": "first write after snap: seq 1M",
    "first_rand": "first write after snap: 4K rand QD16",
}
# io rows measured again on a pool with data checksums (cow=move)
CSUM_ROWS = dict(ONE_COPY_ROWS)
SNAP_SYSTEMS = ["qcow2", "move", "copy"]
DITTOFS = ["move", "copy"]
PHASES = ["io", "chain", "create", "diff", "scale", "snaps"]


@dataclass
class Config:
    scale: float = 1.0
    quick: bool = False
    repeats: int = 3
    runtime: float = 10.0
    rss_runtime: float = 5.0
    io_size: int = GiB
    diff_size: int = 8 * GiB
    create_pool: int = TiB
    pool_sizes: list[int] = field(default_factory=lambda: [GiB, 64 * GiB, TiB])
    levels: list[int] = field(default_factory=lambda: [0, 100, 1000])
    creates: int = 100
    cli_creates: int = 20
    scale_creates: int = 20
    chain: int = 100
    scale_snaps: int = 100
    written: float = 0.10
    delete_blocks: int = 1024
    max_image: int = 24 * GiB
    threads: str = "serialize"
    snap_levels: list[int] = field(default_factory=lambda: [100, 1000, 10000])
    snap_sizes: list[int] = field(default_factory=lambda: [GiB, TiB])
    big_snap_level: int = 1000  # the sparse pool's rows stop here
    cold_runtime: float = 10.0

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Config:
        c = cls()
        scale = a.size_scale if a.size_scale is not None else (1 / 64 if a.quick else 1.0)
        c.scale, c.quick, c.threads = scale, a.quick, a.threads
        if a.quick:
            c.repeats, c.runtime, c.rss_runtime = 1, 1.5, 0.5
            c.creates, c.cli_creates, c.scale_creates = 10, 3, 5
        n = a.snapshots if a.snapshots is not None else (10 if a.quick else 100)
        c.chain = c.scale_snaps = n
        c.levels = [0, n, 10 * n]
        if a.repeats is not None:
            c.repeats = a.repeats
        if a.runtime is not None:
            c.runtime = a.runtime
            c.rss_runtime = min(c.rss_runtime, a.runtime)
        c.max_image = parse_size(a.max_image)
        if a.pool_sizes:
            c.pool_sizes = [parse_size(x) for x in a.pool_sizes.split(",")]
        if a.quick:
            c.snap_levels, c.snap_sizes, c.big_snap_level, c.cold_runtime = [10, 100], [GiB], 0, 1.5
        if a.snap_levels:
            c.snap_levels = [int(x) for x in a.snap_levels.split(",")]
        if a.snap_sizes:
            c.snap_sizes = [parse_size(x) for x in a.snap_sizes.split(",")]

        def sz(n: int) -> int:  # scaled, whole MiB, at least 4 MiB
            return max(4 * MiB, int(n * scale) // MiB * MiB)

        c.io_size, c.diff_size, c.create_pool = sz(c.io_size), sz(c.diff_size), sz(c.create_pool)
        c.pool_sizes = [sz(s) for s in c.pool_sizes]
        c.snap_sizes = [sz(s) for s in c.snap_sizes]
        return c


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": TiB}
    s = s.strip().upper().rstrip("B").rstrip("I")
    return int(float(s[:-1]) * units[s[-1]]) if s[-1] in units else int(s)


def human(n: int) -> str:
    for unit, div in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n >> 10} KiB"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str  # MiB/s, ms, MiB
    better: str  # higher or lower
    group: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def median(self, sysk: str) -> float | None:
        vals = self.samples.get(sysk)
        return statistics.median(vals) if vals else None


class Results:
    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.errors: list[dict[str, str]] = []
        self.load: list[tuple[str, float]] = []

    def row(self, key: str, label: str, unit: str, group: str, note: str = "") -> Row:
        if key not in self.rows:
            better = "higher" if unit == "MiB/s" else "lower"
            self.rows[key] = Row(key, label, unit, better, group, note=note)
        return self.rows[key]

    def add(self, key: str, sysk: str, value: float) -> None:
        self.rows[key].samples.setdefault(sysk, []).append(value)

    def across(self, num: str, den: str, sysk: str) -> float | None:
        """One system's figure in row num over its figure in row den."""
        a, b = self.rows.get(num), self.rows.get(den)
        x = a.median(sysk) if a else None
        y = b.median(sysk) if b else None
        return x / y if x is not None and y else None

    def ratio(self, key: str, num: str, den: str) -> float | None:
        r = self.rows.get(key)
        if r is None:
            return None
        a, b = r.median(num), r.median(den)
        return a / b if a is not None and b else None


# --- phases ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        self.res = Results()
        self.systems = {s.key: s for s in make_systems(work, cfg.threads)}
        # the read-and-merge path deferred copy-on-write replaces, for its one row
        self.immediate = Dittofs(work, "move", cfg.threads, merge="immediate")
        self.systems[self.immediate.key] = self.immediate
        # what data checksums cost (a pool formatted with them), for their rows
        self.checksummed = Dittofs(work, "move", cfg.threads, checksum=True)
        self.systems[self.checksummed.key] = self.checksummed
        # what the second metadata copy costs: the same rows on pools keeping one
        self.one_copy = {cow: Dittofs(work, cow, cfg.threads, copies=1) for cow in ("move", "copy")}
        for s in self.one_copy.values():
            self.systems[s.key] = s
        self.rng = random.Random(20261125)

    def sample_load(self, where: str) -> None:
        self.res.load.append((where, os.getloadavg()[0]))

    @contextlib.contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        log(f"{name}: {what}")
        self.sample_load(f"{name} {what} start")
        try:
            yield
        except Exception as e:  # noqa: BLE001 - record it, stop the servers, go on
            log(f"{name}: {what} FAILED: {e}")
            self.res.errors.append({"phase": name, "what": what, "error": traceback.format_exc()})
            traceback.clear_frames(e.__traceback__)  # drop NBD handles the frames still hold
            gc.collect()
        finally:
            for s in self.systems.values():
                with contextlib.suppress(Exception):
                    s.remove()
            for p in self.work.glob("*.raw"):
                p.unlink()

    def img(self, s: System, tag: str) -> Path:
        return self.work / f"{tag}.{s.key}.{s.kind}"

    # io: sequential and random, steady state, first write after a snapshot, delete 1 GiB

    def io(self) -> None:
        c, res = self.cfg, self.res
        size = c.io_size
        sz = human(size)
        res.row("seq_fill", f"seq write 1M, empty volume ({sz})", "MiB/s", "io")
        res.row("seq_write", f"seq write 1M, overwrite ({sz})", "MiB/s", "io")
        res.row("seq_read", f"seq read 1M ({sz})", "MiB/s", "io")
        res.row("rand_write", "4K random write QD16, steady", "MiB/s", "io")
        res.row("rand_read", "4K random read QD16", "MiB/s", "io")
        res.row(
            "fsync_write",
            "4K random write QD1, FLUSH after each",
            "MiB/s",
            "io",
            note="fsync-heavy: every write is made durable before the next is sent",
        )
        res.row("first_seq", "first write after snap: seq 1M", "MiB/s", "first")
        res.row("first_rand", "first write after snap: 4K rand QD16", "MiB/s", "first")
        res.row(
            "first_rand_merge",
            "  same, merge=immediate (read and merge)",
            "MiB/s",
            "first",
            note="merge=immediate: the old block is read and merged at the first write; "
            "deferred (default): only the new bytes are written, merged later",
        )
        res.row("delete_1g", f"delete snapshot owning {sz}", "ms", "first")
        note = "a pool with data checksums (format --checksum): an XXH3-based checksum per "
        note += "4 KiB, verified on every read; shown in the move column, to set against the rows "
        note += "above"
        for key, label in CSUM_ROWS.items():
            res.row(f"csum_{key}", f"  checksum=on: {label}", "MiB/s", "csum", note)
            note = ""
        note = "pools formatted with one metadata copy (the default keeps two): shown in the "
        note += "move and copy columns, to set against the rows above"
        for key, label in ONE_COPY_ROWS.items():
            res.row(f"{key}_1copy", f"  metadata-copies=1: {label}", "MiB/s", "copies", note)
            note = ""
        res.row(
            "delete_1g_1copy", f"  metadata-copies=1: delete snapshot owning {sz}", "ms", "copies"
        )
        for rep in range(c.repeats):
            for key in SYSTEMS + [f"{cow}-1copy" for cow in self.one_copy]:
                s = self.systems[key]
                col = key.removesuffix("-1copy")
                one = "_1copy" if key.endswith("-1copy") else ""
                with self.phase("io", f"{s.label} repeat {rep + 1}/{c.repeats}"):
                    s.make(self.img(s, "io"), size)
                    s.start()
                    uri = s.uri()
                    res.add("seq_fill" + one, col, mibs(fio(uri, "write", "1M", 1, size)))
                    s.flush()
                    res.add("seq_write" + one, col, mibs(fio(uri, "write", "1M", 1, size)))
                    s.flush()
                    res.add("seq_read" + one, col, mibs(fio(uri, "read", "1M", 1, size)))
                    r = fio(uri, "randwrite", "4k", 16, size, runtime=c.runtime)
                    res.add("rand_write" + one, col, mibs(r))
                    s.flush()
                    r = fio(uri, "randread", "4k", 16, size, runtime=c.runtime)
                    res.add("rand_read" + one, col, mibs(r))
                    r = fio(uri, "randwrite", "4k", 1, size, runtime=c.runtime, fsync=1)
                    res.add("fsync_write" + one, col, mibs(r))
                    if not s.snapshots:
                        continue
                    s.snap_create("first-seq")
                    res.add("first_seq" + one, col, mibs(fio(s.uri(), "write", "1M", 1, size)))
                    s.flush()
                    res.add("delete_1g" + one, col, s.snap_delete("first-seq") * 1000)
                    res.add("first_rand" + one, col, self.first_rand(s, size))
                    s.flush()
            s = self.immediate
            with self.phase("io", f"{s.label} repeat {rep + 1}/{c.repeats}"):
                s.make(self.img(s, "io"), size)
                s.start()
                fio(s.uri(), "write", "1M", 1, size)
                s.flush()
                res.add("first_rand_merge", "move", self.first_rand(s, size))
                s.flush()
            s = self.checksummed
            with self.phase("io", f"{s.label} repeat {rep + 1}/{c.repeats}"):
                s.make(self.img(s, "io"), size)
                s.start()
                uri = s.uri()
                res.add("csum_seq_fill", "move", mibs(fio(uri, "write", "1M", 1, size)))
                s.flush()
                res.add("csum_seq_write", "move", mibs(fio(uri, "write", "1M", 1, size)))
                s.flush()
                res.add("csum_seq_read", "move", mibs(fio(uri, "read", "1M", 1, size)))
                r = fio(uri, "randwrite", "4k", 16, size, runtime=c.runtime)
                res.add("csum_rand_write", "move", mibs(r))
                s.flush()
                r = fio(uri, "randread", "4k", 16, size, runtime=c.runtime)
                res.add("csum_rand_read", "move", mibs(r))
                r = fio(uri, "randwrite", "4k", 1, size, runtime=c.runtime, fsync=1)
                res.add("csum_fsync_write", "move", mibs(r))
                s.snap_create("first-seq")
                res.add("csum_first_seq", "move", mibs(fio(s.uri(), "write", "1M", 1, size)))
                s.flush()
                res.add("csum_first_rand", "move", self.first_rand(s, size))
                s.flush()

    def first_rand(self, s: System, size: int) -> float:
        """MiB/s of 4 KiB writes at QD16 into every block once, in random order, right after a
        snapshot of the fully written volume: each is a first write."""
        s.snap_create("first-rand")
        order = list(range(size // BLOCK))
        self.rng.shuffle(order)
        iolog = write_iolog(self.work / "first.iolog", [b * BLOCK for b in order], 4096)
        return mibs(fio(s.uri(), "", "4k", 16, size, iolog=iolog))

    # chain: the oldest of N snapshots, each 1% changed from the next, versus live

    def chain(self) -> None:
        c, res = self.cfg, self.res
        n = c.chain
        res.row("chain_live_seq", f"live seq read 1M ({n} snaps)", "MiB/s", "chain")
        res.row("chain_old_seq", f"oldest of {n} snaps: seq read 1M", "MiB/s", "chain")
        res.row("chain_live_rand", f"live 4K rand read QD16 ({n} snaps)", "MiB/s", "chain")
        res.row("chain_old_rand", f"oldest of {n} snaps: 4K rand read QD16", "MiB/s", "chain")
        size = c.io_size
        nblocks = size // BLOCK
        for key in SNAP_SYSTEMS:
            s = self.systems[key]
            with self.phase("chain", f"{s.label}: build {n} snapshots"):
                s.make(self.img(s, "chain"), size)
                s.start()
                fio(s.uri(), "write", "1M", 1, size)
                s.flush()
                if isinstance(s, Qcow2):
                    s.stop()  # qemu-io writes between the qemu-img snapshots
                for k in range(n):
                    s.snap_create(f"c{k:04d}")
                    blocks = self.rng.sample(range(nblocks), max(1, nblocks // 100))
                    apply_writes(s, [(b * BLOCK, BLOCK, k % 250 + 1) for b in blocks])
                log(f"chain: {s.label}: reading")
                for _ in range(c.repeats):
                    for snap, tag in ((None, "live"), ("c0000", "old")):
                        uri = s.serve_snapshot(snap)
                        res.add(f"chain_{tag}_seq", key, mibs(fio(uri, "read", "1M", 1, size)))
                        r = fio(uri, "randread", "4k", 16, size, runtime=c.runtime)
                        res.add(f"chain_{tag}_rand", key, mibs(r))

    # create: snapshot create time on a big sparse pool with 0, 100, 1000 snapshots

    def create(self) -> None:
        c, res = self.cfg, self.res
        psz = human(c.create_pool)
        for lvl in c.levels:
            res.row(f"create_{lvl}", f"snap create, {psz}, {lvl} snaps: socket", "ms", "create")
            res.row(
                f"create_cli_{lvl}",
                "  same, command wall time",
                "ms",
                "create",
                note="" if lvl else "qcow2: qemu-img snapshot -c; dittofs: snapctl create",
            )
        nblocks = c.create_pool // BLOCK
        for key in SNAP_SYSTEMS:
            s = self.systems[key]
            with self.phase("create", f"{s.label}: {psz} pool"):
                s.make(self.img(s, "create"), c.create_pool)
                if not isinstance(s, Qcow2):
                    s.start()
                have = 0
                for lvl in c.levels:
                    while have < lvl:  # one 4 KiB write between snapshots: none is empty
                        b = self.rng.randrange(nblocks)
                        apply_writes(s, [(b * BLOCK, 4096, have % 250 + 1)])
                        s.snap_create(f"b{have:05d}")
                        have += 1
                    log(f"create: {s.label}: {lvl} snapshots, timing")
                    for j in range(c.creates):
                        dt = s.snap_create(f"t{j}")
                        res.add(
                            f"create_cli_{lvl}" if key == "qcow2" else f"create_{lvl}",
                            key,
                            dt * 1000,
                        )
                        s.snap_delete(f"t{j}")
                    if isinstance(s, Dittofs):
                        for j in range(c.cli_creates):
                            res.add(f"create_cli_{lvl}", key, s.snap_create_cli(f"u{j}") * 1000)
                            s.snap_delete(f"u{j}")

    # diff: snapctl diff of 1% of an 8 GiB volume versus comparing the two states in full

    def diff(self) -> None:
        c, res = self.cfg, self.res
        size = c.diff_size
        sz = human(size)
        res.row("diff_cli", f"diff 1% of {sz}: snapctl | qemu-img compare", "ms", "diff")
        res.row("diff_cmp", "  same vs one qemu-img compare pass", "ms", "diff")
        res.row("diff_socket", "  diff: control call only", "ms", "diff")
        nblocks = size // BLOCK
        compared = False
        for key in DITTOFS:
            s = self.systems[key]
            assert isinstance(s, Dittofs)
            with self.phase("diff", f"{s.label}: {sz} volume"):
                s.make(self.img(s, "diff"), size)
                s.start()
                fio(s.uri(), "write", "1M", 1, size)
                s.flush()
                s.snap_create("a")
                changed = self.rng.sample(range(nblocks), max(1, nblocks // 100))
                apply_writes(s, [(b * BLOCK + 4096 * (b % 16), 4096, 0x5A) for b in changed])
                s.snap_create("b")
                for _ in range(c.repeats):
                    dt, nranges = s.diff_socket("a", "b")
                    res.add("diff_socket", key, dt * 1000)
                    dt = s.diff_cli("a", "b")
                    res.add("diff_cli", key, dt * 1000)
                    res.add("diff_cmp", key, dt * 1000)
                if not compared:
                    res.rows["diff_cli"].note = f"{len(changed)} blocks changed, {nranges} ranges"
                if compared:
                    continue
                log("diff: nbdcopy of both states, full compares")
                raws = []
                for snap in ("a", "b"):
                    raw = self.work / f"{snap}.raw"
                    subprocess.run(["nbdcopy", s.uri(snap), str(raw)], check=True)
                    raws.append(raw)
                for _ in range(c.repeats):
                    dt, found = full_compare(raws[0], raws[1], size)
                    res.add("diff_cli", "qcow2", dt * 1000)
                    one = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raws[0])]
                    res.add("diff_cmp", "qcow2", timed_run([*one, str(raws[0])]) * 1000)
                res.rows["diff_cli"].note += f"; qemu-img compare found {found} (runs: {found + 1})"
                compared = True

    # scale: open time, RSS, create, delete at growing pool sizes

    def scale(self) -> None:
        for size in self.cfg.pool_sizes:
            self.scale_one(size)

    def scale_one(self, size: int) -> None:
        c, res = self.cfg, self.res
        nblocks = size // BLOCK
        stride = max(round(1 / c.written), math.ceil(nblocks * BLOCK / c.max_image))
        nwritten = math.ceil(nblocks / stride)
        frac = 100 / stride
        tag = f"{human(size)}, {c.scale_snaps} snaps, {frac:.3g}% written"
        sk = human(size).replace(" ", "")
        own = max(1, min(c.delete_blocks, nwritten // 2))
        res.row(f"open_{sk}", f"open (launch to 1st read), {tag}", "ms", "scale")
        res.row(f"rss_open_{sk}", f"RSS after open, {human(size)}", "MiB", "scale")
        res.row(
            f"rss_busy_{sk}",
            f"RSS after {c.rss_runtime:g}s 4K rand reads, {human(size)}",
            "MiB",
            "scale",
        )
        res.row(f"create_{sk}", f"snap create, {human(size)} (socket | qemu-img)", "ms", "scale")
        res.row(
            f"delete_{sk}", f"delete snap owning {human(own * BLOCK)}, {human(size)}", "ms", "scale"
        )
        per = math.ceil(nblocks / c.scale_snaps / stride) * stride  # blocks per interval

        def build(s: System, snapshots: bool) -> None:
            s.start()
            for i in range(c.scale_snaps):
                first = i * per
                if first < nblocks:
                    count = math.ceil((min(first + per, nblocks) - first) / stride)
                    fio(
                        s.uri(),
                        f"write:{stride * BLOCK - 4096}",
                        "4k",
                        16,
                        min(per, nblocks - first) * BLOCK,
                        offset=first * BLOCK,
                        number_ios=count,
                    )
                if snapshots:
                    s.snap_create(f"s{i:04d}")
            s.flush()
            s.stop()

        def open_rss(s: System) -> None:
            for _ in range(c.repeats):
                res.add(f"open_{sk}", s.key, s.start(probe=True) * 1000)
                res.add(f"rss_open_{sk}", s.key, rss_kib(s.pid())[0] / 1024)
                fio(s.uri(), "randread", "4k", 16, size, runtime=c.rss_runtime)
                res.add(f"rss_busy_{sk}", s.key, rss_kib(s.pid())[0] / 1024)
                s.stop()

        def create_delete(s: System) -> None:
            if isinstance(s, Qcow2):
                s.stop()
            else:
                s.start()
            for j in range(c.scale_creates):
                res.add(f"create_{sk}", s.key, s.snap_create(f"t{j}") * 1000)
                s.snap_delete(f"t{j}")
            targets = [k * stride for k in range(own)]
            if not s.running:
                s.start()
            for rep in range(c.repeats):
                s.snap_create("own")
                apply_writes(s, [(b * BLOCK, 4096, rep + 1) for b in targets])
                res.add(f"delete_{sk}", s.key, s.snap_delete("own") * 1000)
            s.stop()

        raw = self.work / f"scale.{sk}.raw.img"
        with self.phase("scale", f"{human(size)}: raw image for file and pass-through"):
            f = self.systems["file"]
            f.make(raw, size)
            build(f, False)
            for key in ("file", "pt"):
                s = self.systems[key]
                s.img, s.size = raw, size
                open_rss(s)
            raw.unlink()
        q = self.systems["qcow2"]
        with self.phase("scale", f"{human(size)}: qcow2"):
            q.make(self.img(q, f"scale.{sk}"), size)
            build(q, True)
            open_rss(q)
            create_delete(q)
        with self.phase("scale", f"{human(size)}: dittofs pool"):
            m, cp = self.systems["move"], self.systems["copy"]
            assert isinstance(m, Dittofs) and isinstance(cp, Dittofs)
            pool = self.img(m, f"scale.{sk}")
            m.make(pool, size)
            t = time.perf_counter()
            build(m, True)
            log(
                f"scale: dittofs build took {time.perf_counter() - t:.0f}s "
                f"({nwritten} blocks written, image {pool.stat().st_blocks * 512 / GiB:.1f} GiB)"
            )
            cp.use(pool, size)
            for s in (m, cp):
                open_rss(s)
            for s in (m, cp):
                create_delete(s)
            m.remove()

    # snaps: thousands of one-block snapshots (scripts/bench_snaps.py)

    def snaps(self) -> None:
        bench_snaps.snaps(self)

    def run(self, phases: list[str]) -> None:
        for p in PHASES:
            if p in phases:
                getattr(self, p)()
        self.sample_load("end")


def full_compare(a: Path, b: Path, size: int) -> tuple[float, int]:
    """Find every difference between two raw images with qemu-img compare: it stops at the
    first mismatch, so resume from the next 64 KiB boundary until the end (image-opts windows).
    Returns (seconds, mismatches found)."""
    off, found = 0, 0
    t = time.perf_counter()
    while off < size:
        if off == 0:
            cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)]
        else:
            opts = f"driver=raw,offset={off},size={size - off},file.filename="
            cmd = ["qemu-img", "compare", "--image-opts", opts + str(a), opts + str(b)]
        cp = subprocess.run(cmd, capture_output=True, text=True)
        if cp.returncode == 0:
            break
        m = re.search(r"mismatch at offset (\d+)", cp.stdout + cp.stderr)
        if cp.returncode != 1 or not m:
            raise RuntimeError(f"qemu-img compare failed: {cp.stdout}{cp.stderr}")
        found += 1
        off = (off + int(m.group(1))) // BLOCK * BLOCK + BLOCK
    return time.perf_counter() - t, found


# --- report ----------------------------------------------------------------------------------

RATIOS = [("move", "pt"), ("copy", "pt"), ("move", "qcow2"), ("copy", "qcow2")]


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}"


def table(res: Results, labels: dict[str, str]) -> str:
    w = max(len(r.label) for r in res.rows.values()) + 1
    heads = [
        "file (C)",
        "pass-thru",
        "qcow2",
        "move",
        "copy",
        "move/pt",
        "copy/pt",
        "move/qcow2",
        "copy/qcow2",
    ]
    lines = [f"{'workload':<{w}}{'unit':>6}" + "".join(f"{h:>11}" for h in heads)]
    for r in res.rows.values():
        cells = [fmt(r.median(k)) for k in SYSTEMS]
        cells += [fmt(res.ratio(r.key, a, b)) for a, b in RATIOS]
        lines.append(f"{r.label:<{w}}{r.unit:>6}" + "".join(f"{x:>11}" for x in cells))
    return "\n".join(lines)


def targets(res: Results, cfg: Config) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []

    def add(text: str, value: float | None, ok: bool | None, shown: str) -> None:
        out.append({"target": text, "value": value, "met": ok, "shown": shown})

    def ratio_target(text: str, key: str, num: str, den: str, bound: float, ge: bool) -> None:
        v = res.ratio(key, num, den)
        ok = None if v is None else (v >= bound if ge else v <= bound)
        add(text, v, ok, fmt(v))

    for cow in DITTOFS:
        for key in ONE_COPY_ROWS:  # what the second metadata copy may cost
            bound = (
                0.75 if key == "fsync_write" or (key.startswith("first") and cow == "copy") else 0.9
            )
            v = res.across(key, f"{key}_1copy", cow)
            add(
                f"{key} cow={cow}, 2 metadata copies >= {bound:.2f} x 1 copy",
                v,
                None if v is None else v >= bound,
                fmt(v),
            )
        if cow == "move":
            for key in CSUM_ROWS:  # what data checksums may cost
                v = res.across(f"csum_{key}", key, cow)
                add(
                    f"{key} cow={cow}, checksum=on >= 0.85 x off",
                    v,
                    None if v is None else v >= 0.85,
                    fmt(v),
                )
        v = res.across("delete_1g", "delete_1g_1copy", cow)  # ms: 2 copies over 1
        add(
            f"delete cow={cow}, 2 metadata copies <= 1.25 x 1 copy",
            v,
            None if v is None else v <= 1.25,
            fmt(v),
        )
        for key in ("seq_write", "seq_read"):
            ratio_target(f"{key} cow={cow} >= 0.90 x pass-through", key, cow, "pt", 0.9, True)
        for key in ("rand_write", "rand_read"):
            ratio_target(f"{key} cow={cow} >= 0.80 x pass-through", key, cow, "pt", 0.8, True)
        for key in ("first_seq", "first_rand"):
            ratio_target(f"{key} cow={cow} >= 5 x qcow2", key, cow, "qcow2", 5.0, True)
            steady = "seq_write" if key == "first_seq" else "rand_write"
            v = res.across(key, steady, cow)
            add(
                f"{key} cow={cow} >= 0.60 x own {steady}",
                v,
                None if v is None else v >= 0.6,
                fmt(v),
            )
        for kind in ("seq", "rand"):
            v = res.across(f"chain_old_{kind}", f"chain_live_{kind}", cow)
            add(
                f"oldest of {cfg.chain} {kind} read cow={cow} >= 0.80 x live",
                v,
                None if v is None else v >= 0.8,
                fmt(v),
            )
        for lvl in cfg.levels:
            r = res.rows.get(f"create_{lvl}")
            v = r.median(cow) if r else None
            add(
                f"create at {human(cfg.create_pool)} with {lvl} snaps cow={cow} <= 20 ms",
                v,
                None if v is None else v <= 20,
                f"{fmt(v)} ms",
            )
        ratio_target(
            f"diff cow={cow} <= 0.05 x full compare (qemu-img)",
            "diff_cli",
            cow,
            "qcow2",
            0.05,
            False,
        )
        big = human(cfg.pool_sizes[-1]).replace(" ", "")  # (the scale phase's largest pool)
        for key, bound, unit in (
            (f"rss_busy_{big}", 200e6 / MiB, "MiB (200 MB)"),
            (f"open_{big}", 1000.0, "ms"),
        ):
            r = res.rows.get(key)
            v = r.median(cow) if r else None
            add(
                f"{key} cow={cow} <= {bound:.0f} {unit}",
                v,
                None if v is None else v <= bound,
                f"{fmt(v)} {unit.split()[0]}",
            )
    bench_snaps.snaps_targets(res, cfg, add)
    return out


def plot(res: Results, labels: dict[str, str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit(
            "bench: --plot needs matplotlib, which dittofs does not install by default: "
            "run `.venv/bin/pip install -e '.[plot]'` (or `pip install matplotlib`)"
        )
    rows = [r for r in res.rows.values() if any(r.samples.values())]
    ncols = 4
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.6 * nrows), squeeze=False)
    colors = {
        "file": "#7f7f7f",
        "pt": "#bcbd22",
        "qcow2": "#1f77b4",
        "move": "#d62728",
        "copy": "#ff7f0e",
    }
    for ax, r in zip(axes.flat, rows, strict=False):
        keys = [k for k in SYSTEMS if r.median(k) is not None]
        vals = [r.median(k) for k in keys]
        ax.bar(range(len(keys)), vals, color=[colors[k] for k in keys])
        ax.set_xticks(range(len(keys)), [k for k in keys], fontsize=8)
        ax.set_title(r.label.strip(), fontsize=8)
        ax.set_ylabel(f"{r.unit} ({r.better} is better)", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in SYSTEMS]
    fig.legend(handles, [labels[k] for k in SYSTEMS], loc="upper center", ncol=5, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.6 * nrows)))
    fig.savefig(path, dpi=90)


def engine_state() -> dict[str, object]:
    """Which engine is measured: the commit, the engine files changed from it, and a digest of
    the engine's sources (compared at the end: a run whose engine changed midway says so)."""
    repo = Path(__file__).resolve().parent.parent
    files = sorted([*repo.glob("fsimpl/*.py"), repo / "plugin" / "plugin.py"])
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]

    def git(*a: str) -> str:
        cp = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True)
        return cp.stdout.strip() if cp.returncode == 0 else "?"

    dirty = [
        ln.split(maxsplit=1)[-1]
        for ln in git("status", "--porcelain", "fsimpl", "plugin").splitlines()
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": dirty, "digest": digest}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="sizes /64, one repeat, 1.5 s random jobs, fewer snapshots (< 3 min)",
    )
    ap.add_argument(
        "--size-scale",
        type=float,
        default=None,
        help="multiply every size by this (default 1; 1/64 with --quick)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="repeats per figure (default 3)")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per random I/O job")
    ap.add_argument(
        "--snapshots",
        type=int,
        default=None,
        help="N: chain of N, scale pools with N, creates timed at 0, N, 10N (default 100; 10 "
        "with --quick)",
    )
    ap.add_argument(
        "--threads",
        default="serialize",
        choices=["serialize", "parallel"],
        help="nbdkit thread model of the Python plugins (dittofs's default)",
    )
    ap.add_argument(
        "--max-image",
        default="24G",
        help="largest scale-phase image; the written fraction drops to fit",
    )
    ap.add_argument(
        "--pool-sizes",
        default=None,
        help="comma list of the scale phase's pool sizes (default 1G,64G,1T)",
    )
    ap.add_argument(
        "--snap-levels",
        default=None,
        help="comma list of the snaps phase's snapshot counts (default 100,1000,10000)",
    )
    ap.add_argument(
        "--snap-sizes",
        default=None,
        help="comma list of the snaps phase's volume sizes (default 1G,1T; above 64 GiB the "
        "pool is sparse and stops at 1,000 snapshots)",
    )
    ap.add_argument("--only", default=",".join(PHASES), help="comma list of phases to run")
    ap.add_argument("--dir", default=None, help="where images go (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="bar chart (matplotlib)")
    args = ap.parse_args()
    phases = [p for p in args.only.split(",") if p]
    for p in phases:
        if p not in PHASES:
            sys.exit(f"bench: unknown phase {p}; phases: {','.join(PHASES)}")
    if args.plot:  # fail before a long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit(
                "bench: --plot needs matplotlib, which dittofs does not install by default: "
                "run `.venv/bin/pip install -e '.[plot]'` (or drop --plot)"
            )
    for tool in ("nbdkit", "fio", "qemu-nbd", "qemu-img", "qemu-io", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is not installed: run scripts/setup.sh")
    cfg = Config.from_args(args)
    work = Path(tempfile.mkdtemp(prefix="dittofs-bench.", dir=args.dir))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    engine = engine_state()
    bench = Bench(cfg, work)
    try:
        bench.run(phases)
    finally:
        for s in bench.systems.values():
            with contextlib.suppress(Exception):
                s.stop()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    engine_end = engine_state()
    res = bench.res
    labels = {k: s.label for k, s in bench.systems.items()}
    loads = [v for _, v in res.load]
    machine = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_min": min(loads) if loads else None,
        "load_max": max(loads) if loads else None,
    }
    print(
        f"dittofs benchmark, {started}, {machine['cpus']} CPUs, "
        f"{'quick, ' if cfg.quick else ''}size scale {cfg.scale:g}, median of {cfg.repeats}, "
        f"nbdkit thread model {cfg.threads}; load average {fmt(machine['load_min'])}"
        f"-{fmt(machine['load_max'])}; {elapsed:.0f} s"
    )
    mod = f" + changes to {', '.join(engine['modified'])}" if engine["modified"] else ""
    print(f"engine: commit {engine['commit']}{mod} (sources {engine['digest']})")
    if engine_end["digest"] != engine["digest"]:
        print(
            f"WARNING: the engine's sources changed during the run "
            f"({engine['digest']} -> {engine_end['digest']}): figures mix two versions"
        )
    print(table(res, labels))
    print(
        "ratios: dittofs / other of the row's figure (MiB/s: higher is better for dittofs; "
        "ms and MiB: lower is)"
    )
    notes = [f"{r.label.strip()}: {r.note}" for r in res.rows.values() if r.note]
    for n in notes:
        print(f"note: {n}")
    tg = targets(res, cfg)
    print("\ntargets (issue 6):")
    for t in tg:
        if t["value"] is None:
            continue
        mark = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]  # type: ignore[index]
        print(f"  {mark:<8}{t['target']}: {t['shown']}")
    if res.errors:
        print(f"\n{len(res.errors)} phase(s) failed:")
        for e in res.errors:
            print(f"  {e['phase']}: {e['what']}: {e['error'].strip().splitlines()[-1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": started,
                    "elapsed_s": elapsed,
                    "machine": machine,
                    "engine": engine,
                    "engine_at_end": engine_end,
                    "config": asdict(cfg),
                    "systems": labels,
                    "workloads": [
                        {
                            "key": r.key,
                            "label": r.label.strip(),
                            "unit": r.unit,
                            "better": r.better,
                            "group": r.group,
                            "note": r.note,
                            "median": {k: r.median(k) for k in SYSTEMS if r.median(k) is not None},
                            "samples": r.samples,
                            "ratios": {
                                f"{a}/{b}": v
                                for a, b in RATIOS
                                if (v := res.ratio(r.key, a, b)) is not None
                            },
                        }
                        for r in res.rows.values()
                    ],
                    "targets": tg,
                    "load": res.load,
                    "errors": res.errors,
                },
                f,
                indent=1,
            )
    if args.plot:
        plot(res, labels, args.plot)
    if res.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()

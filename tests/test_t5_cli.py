"""T5: snapctl end to end, through a real nbdkit server and in direct mode.

Every test taking the `pool` fixture runs twice: once with the pool served by a real nbdkit
(snapctl talks to it over the control socket) and once in direct mode (the server is stopped
cleanly before every snapctl call, so snapctl opens the disk itself). Data always goes in and
comes out through NBD (the server is started again for that in direct mode), and an in-test
model of every write says what each export must read, which blocks each snapshot owns and what
deleting snapshots must free. Errors are checked for their exit code and their form: one line on
stderr starting with "snapctl: ", no traceback (unless --debug).
"""

from __future__ import annotations

import json
import os
import pty
import random
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbd
import pytest
from harness import NbdkitServer, require
from support.data import sha256_file as sha256
from support.logcheck import NO_SUCH_SNAPSHOT, SNAPSHOT_GONE, VOLUME_CHANGED
from support.nbdclose import disconnect
from support.snapctl import shown as show
from support.snapctl import snapctl, snapctl_json

from fsimpl.engine import Engine

KIB = 1024
MIB = 1 << 20
BS = 64 * KIB  # the default block size
SIZE = 64 * MIB  # the live volume: 1024 blocks
NBLOCKS = SIZE // BS
FIELDS = {
    "name",
    "id",
    "guid",
    "created",
    "created_ns",
    "volumes",
    "used_bytes",
    "referenced_bytes",
    "written_bytes",
    "holds",
}
COMMANDS = [
    "format",
    "info",
    "create",
    "list",
    "delete",
    "rename",
    "hold",
    "release",
    "rollback",
    "diff",
    "du",
    "prune",
]


# --- running snapctl -------------------------------------------------------------------------


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DITTOFS_DISK"}
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    """snapctl with exactly these arguments; stdin is never a terminal unless given one."""
    return snapctl(*args, env=env if env is not None else base_env(), stdin=stdin, timeout=60)


def assert_error(cp: subprocess.CompletedProcess[str], rc: int, *needles: str) -> str:
    """A failed command: exit code rc, one line on stderr "snapctl: ...", no traceback."""
    assert cp.returncode == rc, show(cp)
    assert "Traceback" not in cp.stderr, show(cp)
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapctl: "), (
        f"the error is not one 'snapctl: ' line:\n{show(cp)}"
    )
    for n in needles:
        assert n in lines[0], f"{n!r} not in the error:\n{show(cp)}"
    return lines[0]


close = disconnect  # (support.nbdclose)


def assert_same(actual: bytes, expected: bytes | bytearray, what: str) -> None:
    """Compare whole exports; on mismatch say where, never dump megabytes."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} bytes, want {len(expected)}"
    if actual == expected:
        return
    bad = [
        b
        for b in range(NBLOCKS)
        if actual[b * BS : (b + 1) * BS] != expected[b * BS : (b + 1) * BS]
    ]
    first = next(i for i in range(bad[0] * BS, (bad[0] + 1) * BS) if actual[i] != expected[i])
    pytest.fail(
        f"{what}: differs from the model first at offset {first} (block {first // BS}); "
        f"blocks that differ: {bad[:20]}"
    )


def blocks_of(offset: int, length: int) -> set[int]:
    return set(range(offset // BS, (offset + length - 1) // BS + 1))


# --- the pool under test, and its model ------------------------------------------------------


@dataclass
class Event:
    kind: str  # "snap" or "write"
    name: str = ""
    blocks: frozenset[int] = frozenset()


@dataclass(repr=False)  # no megabytes in pytest's failure reports
class Snap:
    data: bytes
    alloc: frozenset[int]


@dataclass(repr=False)
class Pool:
    """A pool on tmp/pool.img, served ("server") or opened by snapctl itself ("direct")."""

    mode: str
    srv: NbdkitServer
    rng: random.Random
    model: bytearray = field(default_factory=lambda: bytearray(SIZE))
    alloc: set[int] = field(default_factory=set)
    log: list[Event] = field(default_factory=list)
    snaps: dict[str, Snap] = field(default_factory=dict)
    handles: list[nbd.NBD] = field(default_factory=list)
    live_handle: nbd.NBD | None = None

    def __repr__(self) -> str:
        return f"Pool({self.mode}, snapshots {self.order()})"

    @property
    def disk(self) -> Path:
        return self.srv.disk

    @property
    def env(self) -> dict[str, str]:
        return base_env(DITTOFS_RUNDIR=self.srv.env["DITTOFS_RUNDIR"])

    # servers and NBD connections

    def running(self) -> bool:
        return self.srv.proc is not None and self.srv.proc.poll() is None

    def up(self) -> None:
        if not self.running():
            self.srv.start()

    def quiesce(self) -> None:
        """Disconnect every client and stop the server cleanly (it commits and closes)."""
        for h in self.handles:
            close(h)
        self.handles.clear()
        self.live_handle = None
        if self.running():
            assert self.srv.stop() == 0, self.srv.log()

    def connect(self, export: str = "live") -> nbd.NBD:
        self.up()
        h = self.srv.connect(export)
        self.handles.append(h)
        return h

    def drop(self, h: nbd.NBD) -> None:
        close(h)
        if h in self.handles:
            self.handles.remove(h)
        if h is self.live_handle:
            self.live_handle = None

    def live(self) -> nbd.NBD:
        if self.live_handle is None or not self.running():
            self.live_handle = self.connect("live")
        return self.live_handle

    def read(self, export: str = "live") -> bytes:
        h = self.connect(export)
        try:
            assert h.get_size() == SIZE, f"{export}: size {h.get_size()}"
            out = bytearray()
            for off in range(0, SIZE, 4 * MIB):
                out += h.pread(4 * MIB, off)
            return bytes(out)
        finally:
            self.drop(h)

    def check_export(self, export: str, what: str) -> None:
        want = self.model if export == "live" else self.snaps[export.split("@", 1)[1]].data
        assert_same(self.read(export), want, f"{what}: {export}")

    # writes (always through NBD), recorded in the model

    def write(self, offset: int, data: bytes, same: bool = False) -> set[int]:
        blocks = blocks_of(offset, len(data))
        before = {b: bytes(self.model[b * BS : (b + 1) * BS]) for b in blocks}
        h = self.live()
        h.pwrite(data, offset)
        h.flush()
        self.model[offset : offset + len(data)] = data
        if not same:  # the test's own design: every write changes every block it touches
            for b in blocks:
                assert self.model[b * BS : (b + 1) * BS] != before[b], f"write left {b} as is"
        self.alloc |= blocks
        self.log.append(Event("write", blocks=frozenset(blocks)))
        return blocks

    def data(self, n: int) -> bytes:
        return self.rng.randbytes(n).replace(b"\0", b"\1")

    def scribble(self, offset: int, n: int) -> set[int]:
        return self.write(offset, self.data(n))

    def flip(self, offset: int) -> set[int]:
        return self.write(offset, bytes([self.model[offset] ^ 0xA5]))

    def rewrite(self, offset: int, n: int) -> set[int]:
        """Write back the very bytes that are there (touches the blocks, changes nothing)."""
        return self.write(offset, bytes(self.model[offset : offset + n]), same=True)

    def zero(self, block: int, count: int = 1) -> set[int]:
        h = self.live()
        h.zero(count * BS, block * BS)
        h.flush()
        self.model[block * BS : (block + count) * BS] = bytes(count * BS)
        blocks = set(range(block, block + count))
        self.alloc -= blocks
        self.log.append(Event("write", blocks=frozenset(blocks)))
        return blocks

    # snapctl

    def run(
        self,
        *args: str,
        rc: int = 0,
        disk: bool = True,
        stdin: Any = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """snapctl -d DISK ARGS, through the server or directly; checks the exit code, and
        for a failure the one-line form of the error."""
        if self.mode == "direct":
            self.quiesce()
        else:
            self.up()
        cp = run_cli(
            *(["-d", str(self.disk)] if disk else []), *args, env=env or self.env, stdin=stdin
        )
        if rc == 0:
            assert cp.returncode == 0, show(cp)
            assert "Traceback" not in cp.stderr, show(cp)
        else:
            assert_error(cp, rc)
        return cp

    def json(self, *args: str) -> Any:
        cp = self.run(*args, "--json")
        try:
            return json.loads(cp.stdout)
        except ValueError:
            pytest.fail(f"not JSON:\n{show(cp)}")

    def tty_run(self, answer: str, *args: str, rc: int) -> subprocess.CompletedProcess[str]:
        """snapctl with a terminal on stdin that answers `answer`."""
        master, slave = pty.openpty()
        try:
            os.write(master, answer.encode() + b"\n")
            return self.run(*args, rc=rc, stdin=slave)
        finally:
            os.close(master)
            os.close(slave)

    def create(self, name: str, *extra: str) -> dict[str, Any]:
        info: dict[str, Any] = self.json("create", name, *extra)
        assert info["name"] == name, info
        self.snaps[name] = Snap(bytes(self.model), frozenset(self.alloc))
        self.log.append(Event("snap", name))
        return info

    def list(self) -> list[dict[str, Any]]:
        snaps: list[dict[str, Any]] = self.json("list")
        return snaps

    def names(self) -> list[str]:
        return [s["name"] for s in self.list()]

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.json("info")
        return info

    def disk_hash(self) -> str:
        """sha256 of the disk; the pool must be closed (direct mode only)."""
        assert self.mode == "direct"
        self.quiesce()
        return sha256(self.disk)

    # model bookkeeping

    def deleted(self, *names: str) -> None:
        for n in names:
            del self.snaps[n]
        self.log = [e for e in self.log if not (e.kind == "snap" and e.name in names)]

    def renamed(self, old: str, new: str) -> None:
        self.snaps[new] = self.snaps.pop(old)
        for e in self.log:
            if e.kind == "snap" and e.name == old:
                e.name = new

    def rolled_back(self, name: str) -> list[str]:
        """live is snapshot name again; the snapshots newer than it are gone."""
        i = self.order().index(name)
        gone = self.order()[i + 1 :]
        cut = next(k for k, e in enumerate(self.log) if e.kind == "snap" and e.name == name)
        self.log = self.log[: cut + 1]
        for n in gone:
            del self.snaps[n]
        self.model = bytearray(self.snaps[name].data)
        self.alloc = set(self.snaps[name].alloc)
        if self.live_handle is not None:  # its connection now only gets errors
            self.drop(self.live_handle)
        return gone

    # the model's space figures (ditto: a block overwritten after snapshot s, when s saw data
    # there, is owned by s; deleting a snapshot hands to the next older one what it relies on)

    def order(self, without: tuple[str, ...] = ()) -> list[str]:
        return [e.name for e in self.log if e.kind == "snap" and e.name not in without]

    def touched(self, a: str | None, b: str | None) -> set[int]:
        """Blocks written after snapshot a (None: from the start) and before b (None: now)."""
        idx = {e.name: i for i, e in enumerate(self.log) if e.kind == "snap"}
        lo = idx[a] if a else -1
        hi = idx[b] if b else len(self.log)
        out: set[int] = set()
        for e in self.log[lo + 1 : hi]:
            if e.kind == "write":
                out |= e.blocks
        return out

    def _neighbours(self, s: str, without: tuple[str, ...]) -> tuple[str | None, str | None]:
        order = self.order(without)
        i = order.index(s)
        return (order[i - 1] if i else None), (order[i + 1] if i + 1 < len(order) else None)

    def owned(self, s: str, without: tuple[str, ...] = ()) -> set[int]:
        _, nxt = self._neighbours(s, without)
        return set(self.snaps[s].alloc) & self.touched(s, nxt)

    def used(self, s: str) -> set[int]:
        prev, _ = self._neighbours(s, ())
        own = self.owned(s)
        return own if prev is None else own & self.touched(prev, s)

    def written(self, s: str) -> set[int]:
        """Data in s's view written since the previous snapshot (all of it for the first)."""
        prev, _ = self._neighbours(s, ())
        alloc = set(self.snaps[s].alloc)
        return alloc if prev is None else alloc & self.touched(prev, s)

    def snapshots_blocks(self, without: tuple[str, ...] = ()) -> int:
        return sum(len(self.owned(s, without)) for s in self.order(without))


@pytest.fixture(scope="module")
def empty_pool_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A freshly formatted 64M pool (formatted once; each test gets a copy)."""
    disk = tmp_path_factory.mktemp("template") / "pool.img"
    cp = run_cli("format", str(disk), "--size", "64M")
    assert cp.returncode == 0, show(cp)
    return disk.read_bytes()


@pytest.fixture(params=["server", "direct"])
def pool(
    request: pytest.FixtureRequest, servers: Any, tmp_path: Path, empty_pool_image: bytes
) -> Iterator[Pool]:
    disk = tmp_path / "pool.img"
    disk.write_bytes(empty_pool_image)
    disk.chmod(0o600)
    srv = servers(disk)
    p = Pool(request.param, srv, random.Random(f"t5-{request.node.name}"))
    if p.mode == "server":
        srv.start()
    yield p
    for h in p.handles:
        close(h)
    p.handles.clear()
    if p.running():
        try:
            srv.stop()
        finally:
            srv.kill()


def history(p: Pool) -> dict[str, set[int]]:
    """Three snapshots s1 s2 s3 and changes after each, at odd offsets, across block
    boundaries, into holes, up to the last byte; one identical rewrite (block 11) and one
    block zeroed (9). Returns the blocks touched after each snapshot."""
    p.scribble(0, 12 * BS)  # blocks 0-11
    p.scribble(SIZE - BS, BS)  # the last block
    p.create("s1")
    t1 = set()
    t1 |= p.scribble(BS - 7, 100)  # blocks 0 and 1
    t1 |= p.flip(3 * BS + 12345)  # one byte of block 3
    t1 |= p.scribble(5 * BS - 100, 2 * BS)  # blocks 4, 5, 6
    t1 |= p.scribble(9 * BS, BS)  # one whole aligned block
    t1 |= p.scribble(SIZE - 3, 3)  # the last 3 bytes
    t1 |= p.scribble(20 * BS + 777, 10)  # into a hole
    t1 |= p.rewrite(11 * BS + 5, 50)  # identical data
    p.create("s2")
    t2 = set()
    t2 |= p.zero(9)  # written in s1..s2, now zeros
    t2 |= p.scribble(BS + 30000, 70000)  # blocks 1 and 2
    t2 |= p.scribble(30 * BS + 1, 1)  # one byte into a hole
    p.create("s3")
    t3 = set()
    t3 |= p.scribble(2 * BS + 4000, 5)
    t3 |= p.scribble(41 * BS - 1, 2)  # blocks 40 and 41
    return {"s1": t1, "s2": t2, "s3": t3}


# --- help ------------------------------------------------------------------------------------


def data_used(pool: Pool) -> int:
    """Data blocks in the pool (live and every snapshot), in bytes: what deletes give back.
    (The maps' own metadata blocks come on top and are not promised by freed_bytes.)"""
    du = pool.json("du")
    return du["live_bytes"] + du["snapshots_bytes"]


def test_help_of_every_command_has_an_example() -> None:
    cp = run_cli("--help")
    assert cp.returncode == 0, show(cp)
    assert re.search(r"^\s*Example: snapctl ", cp.stdout, re.M), cp.stdout
    listed = re.findall(r"^  (\w[\w-]*)\s", cp.stdout.split("Commands:", 1)[1], re.M)
    assert set(COMMANDS) <= set(listed), f"commands in --help: {listed}"
    assert run_cli("-h").stdout == cp.stdout
    for cmd in listed:  # every command, including those added later (serve, attach...)
        cp = run_cli(cmd, "--help")
        assert cp.returncode == 0 and cp.stderr == "", show(cp)
        assert re.search(rf"^\s*Examples?: snapctl .*\b{cmd}\b", cp.stdout, re.M), (
            f"no 'Example:' line in 'snapctl {cmd} --help':\n{cp.stdout}"
        )
    cp = run_cli("-d", "/nonexistent", "delete", "-h")
    assert cp.returncode == 0 and "Example: snapctl" in cp.stdout, show(cp)


# --- errors that need no pool ----------------------------------------------------------------


def test_usage_errors_are_one_line() -> None:
    """click's own usage errors (unknown option or command, missing argument, bad value) exit
    2, and like every other error are one 'snapctl: ' line."""
    for args in (
        ("list", "--bogus"),
        ("create",),
        ("delete",),
        ("frobnicate",),
        ("prune", "--keep-last", "-1"),
        ("prune",),
    ):
        cp = run_cli("-d", "/nonexistent/pool.img", *args)
        assert cp.returncode == 2, show(cp)
        assert "Traceback" not in cp.stderr, show(cp)
    for args in (("list", "--bogus"), ("prune",)):
        assert_error(run_cli("-d", "/nonexistent/pool.img", *args), 2)


def test_errors_opening_the_disk(tmp_path: Path) -> None:
    """3: no pool given, a missing disk, a disk with no pool; 1: a directory, a truncated or
    corrupt pool. --debug adds the traceback; DITTOFS_DISK stands in for -d."""
    assert_error(run_cli("list"), 3, "-d DISK", "DITTOFS_DISK")
    assert_error(run_cli("-d", str(tmp_path / "missing.img"), "list"), 3, "does not exist")
    junk = tmp_path / "junk.img"
    junk.write_bytes(random.Random(1).randbytes(MIB))
    assert_error(run_cli("-d", str(junk), "info"), 3, "no dittofs pool")
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    assert_error(run_cli("-d", str(empty), "list"), 3, "no dittofs pool")
    assert_error(run_cli("-d", str(tmp_path), "list"), 1, "is a directory")

    disk = tmp_path / "pool.img"
    cp = run_cli("format", str(disk), "--size", "64M")
    assert cp.returncode == 0, show(cp)
    cp = run_cli("list", env=base_env(DITTOFS_DISK=str(disk)))
    assert cp.returncode == 0 and cp.stdout.splitlines() == [
        "NAME\tID\tCREATED\tUSED\tREFER\tWRITTEN\tHOLDS"
    ], show(cp)

    truncated = tmp_path / "truncated.img"
    truncated.write_bytes(disk.read_bytes()[: 1 * MIB])
    assert_error(run_cli("-d", str(truncated), "list"), 1, "truncated")

    corrupt = tmp_path / "corrupt.img"
    raw = bytearray(disk.read_bytes())
    for sb in (0, 2048, 4096, 6144):  # every superblock copy: a byte after the magic
        raw[sb + 40] ^= 0xFF
    corrupt.write_bytes(raw)
    before = sha256(corrupt)
    line = assert_error(run_cli("-d", str(corrupt), "list"), 1, "checksum")
    cp = run_cli("--debug", "-d", str(corrupt), "list")
    assert cp.returncode == 1, show(cp)
    assert "Traceback (most recent call last)" in cp.stderr, show(cp)
    assert cp.stderr.splitlines()[-1] == line, show(cp)
    assert sha256(corrupt) == before


def test_format_refuses_other_data_and_bad_sizes(tmp_path: Path) -> None:
    require("mkfs.ext4")
    ext4 = tmp_path / "ext4.img"
    with open(ext4, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True, capture_output=True)
    before = sha256(ext4)
    assert_error(run_cli("format", str(ext4)), 4, "ext2/3/4", "--force")
    assert_error(run_cli("format", str(ext4), "--size", "8M"), 4, "ext2/3/4")
    assert sha256(ext4) == before
    cp = run_cli("format", str(ext4), "--force", "--json")
    assert cp.returncode == 0, show(cp)
    r = json.loads(cp.stdout)
    assert r["block_size"] == BS and r["live_size"] == 16 * MIB and r["growable"] is True, r
    cp = run_cli("-d", str(ext4), "list", "--json")
    assert cp.returncode == 0 and json.loads(cp.stdout) == [], show(cp)

    new = tmp_path / "new.img"
    for args, needle in (
        (("--size", "12Q"), "not a size"),
        (("--size", "0"), "size > 0"),
        ((), "--size"),
        (("--size", "64M", "--block-size", "lots"), "not a size"),
    ):
        assert_error(run_cli("format", str(new), *args), 2, needle)
        assert not new.exists(), f"format {args} left {new} behind"
    cp = run_cli("format", str(new), "--size", "8M", "--block-size", "4K", "--json")
    assert cp.returncode == 0, show(cp)
    assert json.loads(cp.stdout)["block_size"] == 4096
    cp = run_cli("-d", str(new), "info", "--json")
    assert json.loads(cp.stdout)["block_size"] == 4096, show(cp)


@pytest.mark.parametrize(
    "case,rc",
    [("block-size-3000", 2), ("missing-directory", 3), ("a-directory", 1)],
)
def test_format_errors_are_one_line(tmp_path: Path, case: str, rc: int) -> None:
    """A block size that is not a power of two is a usage error (2); an image in a missing
    directory is not found (3); a directory fails (1); each as one line, not a traceback."""
    new = tmp_path / "new.img"
    args = {
        "block-size-3000": (str(new), "--size", "64M", "--block-size", "3000"),
        "missing-directory": (str(tmp_path / "no" / "such" / "p.img"), "--size", "64M"),
        "a-directory": (str(tmp_path), "--force"),
    }[case]
    assert_error(run_cli("format", *args), rc)
    assert not new.exists()


# --- format, info ----------------------------------------------------------------------------


def test_format_an_existing_pool(pool: Pool) -> None:
    """Server mode: the served disk is busy, --force or not. Direct: refused without
    --force (naming the pool), byte for byte unchanged; with --force, a new empty pool."""
    pool.scribble(0, 3 * BS)
    pool.create("keep")
    if pool.mode == "server":
        for extra in ((), ("--force",)):
            cp = pool.run("format", str(pool.disk), "--size", "64M", *extra, rc=4, disk=False)
            assert "in use by process" in cp.stderr, show(cp)
        assert pool.names() == ["keep"]
        pool.check_export("live", "after refused formats")
        pool.check_export("live@keep", "after refused formats")
        return
    before = pool.disk_hash()
    cp = pool.run("format", str(pool.disk), "--size", "64M", rc=4, disk=False)
    assert "a dittofs pool" in cp.stderr and "--force" in cp.stderr, show(cp)
    assert pool.disk_hash() == before
    cp = pool.run("format", str(pool.disk), "--size", "32M", "--force", "--json", disk=False)
    r = json.loads(cp.stdout)
    assert r["live_size"] == 32 * MIB and r["block_size"] == BS, r
    assert pool.list() == []
    info = pool.info()
    assert info["volumes"][0]["size_bytes"] == 32 * MIB and info["snapshot_count"] == 0
    h = pool.connect("live")
    assert h.get_size() == 32 * MIB and h.pread(3 * BS, 0) == bytes(3 * BS)


def test_info(pool: Pool) -> None:
    pool.scribble(BS + 1, 2 * BS)  # blocks 1-3
    pool.create("a")
    pool.scribble(BS, 1)  # block 1 moves to a
    info = pool.info()
    assert info["mode"] == pool.mode
    assert info["block_size"] == BS and info["snapshot_count"] == 1, info
    assert info["newest_snapshot"] == "a"
    total = info["used_bytes"] + info["deferred_free_bytes"] + info["free_bytes"]
    assert total == info["capacity_bytes"], info
    assert info["used_bytes"] >= 4 * BS, info  # 3 live blocks + 1 of a, plus metadata
    vol = info["volumes"][0]
    assert vol["name"] == "live" and vol["size_bytes"] == SIZE and vol["snapshots"] == 1
    assert vol["allocated_bytes"] == 3 * BS, vol
    text = pool.run("info").stdout
    assert re.search(r"^block size\s+64K$", text, re.M), text
    assert re.search(r"^snapshots\s+1$", text, re.M), text
    if pool.mode == "server":
        assert info["server_pid"] == pool.srv.pid
        assert info["control_socket"] == str(pool.srv.control)
        assert re.search(rf"^server\s+pid {pool.srv.pid}$", text, re.M), text
    else:
        assert re.search(r"^server\s+none \(opened directly\)$", text, re.M), text
    # DITTOFS_DISK instead of -d; another path to the same disk finds the same server
    cp = pool.run("info", "--json", disk=False, env={**pool.env, "DITTOFS_DISK": str(pool.disk)})
    assert json.loads(cp.stdout)["mode"] == pool.mode
    link = pool.disk.with_name("link.img")
    link.symlink_to(pool.disk)
    cp = pool.run("-d", str(link), "info", "--json", disk=False)
    assert json.loads(cp.stdout)["mode"] == pool.mode
    if pool.mode == "server":  # a crashed server (kill -9): snapctl opens the disk itself
        pool.srv.kill()
        cp = run_cli("-d", str(pool.disk), "info", "--json", env=pool.env)
        assert cp.returncode == 0, show(cp)
        info = json.loads(cp.stdout)
        assert info["mode"] == "direct" and info["snapshot_count"] == 1, info


# --- list ------------------------------------------------------------------------------------


def test_list_json_and_columns(pool: Pool) -> None:
    assert pool.list() == []
    pool.scribble(0, 8 * BS)  # blocks 0-7
    l1 = pool.create("l1")
    pool.scribble(0, 3 * BS)  # 0-2: l1 owns 3, all unique
    pool.create("l2", "--volume", "live")
    pool.scribble(0, 2 * BS)  # 0-1: l2 owns 2, unique (l1 saw other data)
    pool.create("l3")
    for b in (0, 4, 5, 6):  # l3 owns 4, only block 0 unique (l2 relies on 4-6)
        pool.flip(b * BS + 7)
    used = {"l1": 3 * BS, "l2": 2 * BS, "l3": 1 * BS}

    assert set(l1) == FIELDS and l1["volumes"] == ["live"], l1
    snaps = pool.list()
    assert [s["name"] for s in snaps] == ["l1", "l2", "l3"]
    assert len({s["guid"] for s in snaps}) == 3
    assert [s["id"] for s in snaps] == sorted(s["id"] for s in snaps)
    for s in snaps:
        assert set(s) == FIELDS, s
        assert re.fullmatch(r"[0-9a-f]{32}", s["guid"]), s
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s["created"]), s
        created = datetime.strptime(s["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert int(created.timestamp()) == s["created_ns"] // 10**9, s
        assert abs(s["created_ns"] / 1e9 - time.time()) < 600, s
        assert s["volumes"] == ["live"] and s["holds"] == [], s
        assert s["used_bytes"] == used[s["name"]], s
        assert s["used_bytes"] == len(pool.used(s["name"])) * BS, s
        assert s["referenced_bytes"] == 8 * BS, s
        assert s["written_bytes"] == len(pool.written(s["name"])) * BS, s
    assert [s["written_bytes"] for s in snaps] == [8 * BS, 3 * BS, 2 * BS]
    assert snaps[0]["created_ns"] <= snaps[1]["created_ns"] <= snaps[2]["created_ns"]
    by_name = {s["name"]: s for s in snaps}
    pool.run("hold", "l2", "--tag", "b")
    pool.run("hold", "l2", "--tag", "a")

    # piped: a header, then tab-separated rows; human sizes
    lines = pool.run("list").stdout.splitlines()
    assert lines[0].split("\t") == ["NAME", "ID", "CREATED", "USED", "REFER", "WRITTEN", "HOLDS"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == ["l1", "l2", "l3"]
    assert [r[3] for r in rows] == ["192K", "128K", "64K"], rows
    assert [r[4] for r in rows] == ["512K"] * 3 and [r[6] for r in rows] == ["-", "b,a", "-"]

    # -H -p: no header, exact bytes and epoch seconds
    rows = [line.split("\t") for line in pool.run("list", "-H", "-p").stdout.splitlines()]
    assert len(rows) == 3 and all(len(r) == 7 for r in rows), rows
    for r in rows:
        s = by_name[r[0]]
        assert r[1] == str(s["id"]) and r[2] == str(s["created_ns"] // 10**9), r
        assert r[3:6] == [str(s["used_bytes"]), str(s["referenced_bytes"]), str(s["written_bytes"])]

    # -o picks and orders columns; -s / -S sort
    def table(*args: str) -> list[list[str]]:
        return [
            line.split("\t") for line in pool.run("list", "-H", "-p", *args).stdout.splitlines()
        ]

    assert table("-o", "used,name,guid") == [
        [str(by_name[n]["used_bytes"]), n, by_name[n]["guid"]] for n in ("l1", "l2", "l3")
    ]
    assert [r[0] for r in table("-o", "name", "-s", "used")] == ["l3", "l2", "l1"]
    assert [r[0] for r in table("-o", "name", "-S", "used")] == ["l1", "l2", "l3"]
    assert [r[0] for r in table("-o", "name", "-S", "name")] == ["l3", "l2", "l1"]
    assert [r[0] for r in table("-o", "name", "-S", "id")] == ["l3", "l2", "l1"]
    assert table("-o", "holds,volumes", "-s", "name") == [
        ["-", "live"],
        ["b,a", "live"],
        ["-", "live"],
    ]
    header = pool.run("list", "-o", "written,name").stdout.splitlines()[0]
    assert header == "WRITTEN\tNAME"
    assert [s["name"] for s in pool.json("list", "-s", "used")] == ["l3", "l2", "l1"]

    for args in (("-o", "name,bogus"), ("-s", "size"), ("-S", "nope")):
        cp = pool.run("list", *args, rc=2)
        assert "unknown column" in cp.stderr and cp.stdout == "", show(cp)


def test_list_written_counts_new_data(pool: Pool) -> None:
    """written = the data changed between the previous snapshot and this one: data written
    into blocks that were holes counts as much as data overwritten."""
    pool.scribble(0, 4 * BS)  # blocks 0-3
    pool.create("w1")
    pool.scribble(0, BS)  # overwrites block 0
    pool.scribble(10 * BS, 2 * BS)  # new data in blocks 10, 11
    pool.create("w2")
    snaps = {s["name"]: s for s in pool.list()}
    assert snaps["w1"]["written_bytes"] == 4 * BS
    assert snaps["w2"]["referenced_bytes"] == 6 * BS
    assert snaps["w2"]["written_bytes"] == len(pool.written("w2")) * BS == 3 * BS, snaps["w2"]


# --- the error table -------------------------------------------------------------------------


def test_exit_codes(pool: Pool, tmp_path: Path) -> None:
    """Every refused or failed command exits with its code, as one line, and changes nothing
    (direct mode: the disk stays byte-identical)."""
    pool.scribble(0, 2 * BS)
    pool.create("s1")
    pool.scribble(0, BS)
    pool.create("s2")
    pool.run("hold", "s2", "--tag", "keep")
    before = pool.list()
    if pool.mode == "direct":
        digest = pool.disk_hash()
    cases: list[tuple[int, tuple[str, ...], str]] = [
        # 2: bad names, bad arguments, no confirmation without a terminal
        (2, ("create", ".hidden"), "invalid snapshot name"),
        (2, ("create", "has%percent"), "invalid snapshot name"),
        (2, ("create", "latest"), "reserved"),
        (2, ("create", "x" * 65), "limit is 64"),
        (2, ("rename", "s1", "bad/name"), "invalid snapshot name"),
        (2, ("hold", "s1", "--tag", "t" * 33), "hold tag"),
        (2, ("rollback", "s2"), "--yes"),
        (2, ("rollback", "s1", "--destroy-newer"), "--yes"),
        (2, ("diff", "s2", "s1"), "older"),
        (2, ("du", "s2%s1"), "newer"),
        (2, ("du", "s1%"), "FROM%TO"),
        # 3: not found
        (3, ("delete", "nosuch"), "no snapshot named 'nosuch'"),
        (3, ("rename", "nosuch", "other"), "nosuch"),
        (3, ("hold", "nosuch"), "nosuch"),
        (3, ("release", "nosuch"), "nosuch"),
        (3, ("release", "s2", "--tag", "other"), "no hold tagged 'other'"),
        (3, ("rollback", "nosuch", "--yes"), "nosuch"),
        (3, ("rollback", "nosuch"), "nosuch"),
        (3, ("rollback", "s1", "--volume", "vol9", "--yes"), "vol9"),
        (3, ("diff", "nosuch"), "nosuch"),
        (3, ("diff", "s1", "--volume", "vol9"), "vol9"),
        (3, ("du", "nosuch%s2"), "nosuch"),
        (3, ("du", "--volume", "vol9"), "vol9"),
        (3, ("create", "s3", "--volume", "vol9"), "vol9"),
        # 4: refused
        (4, ("create", "s1"), "already exists"),
        (4, ("rename", "s1", "s2"), "already exists"),
        (4, ("hold", "s2", "--tag", "keep"), "already has a hold"),
        (4, ("delete", "s2"), "held (keep)"),
        (4, ("rollback", "s1", "--yes"), "newer than 's1'"),
        (4, ("rollback", "s1", "--yes", "--destroy-newer", "--force"), "s2 (keep)"),
    ]
    for rc, args, needle in cases:
        cp = pool.run(*args, rc=rc)
        assert needle in cp.stderr, f"{needle!r} not in:\n{show(cp)}"
    # 1: the server cannot be reached (an explicit control socket that is not listening)
    dead = tmp_path / "dead.sock"
    dead.write_bytes(b"")
    cp = pool.run("--control", str(dead), "list", rc=1)
    assert "cannot reach the pool's server" in cp.stderr
    # --debug shows the traceback, then the same one line
    cp = run_cli("--debug", "-d", str(pool.disk), "delete", "nosuch", env=pool.env)
    assert cp.returncode == 3 and "Traceback (most recent call last)" in cp.stderr, show(cp)
    assert cp.stderr.splitlines()[-1].startswith("snapctl: no snapshot named 'nosuch'")

    assert pool.list() == before
    if pool.mode == "direct":
        assert pool.disk_hash() == digest
    pool.check_export("live", "after the refused commands")
    pool.check_export("live@s1", "after the refused commands")


# --- diff ------------------------------------------------------------------------------------


def check_diff(p: Pool, frm: str, to: str | None, text: bool = False) -> set[int]:
    """diff FROM [TO] --json against the data read through NBD: block-aligned, coalesced
    ranges that cover every changed byte and only blocks that were written."""
    d = p.json("diff", frm, *([to] if to else []))
    old = p.read(f"live@{frm}")
    assert_same(old, p.snaps[frm].data, f"diff {frm} {to}: live@{frm}")
    new = p.read(f"live@{to}" if to else "live")
    assert_same(new, p.snaps[to].data if to else p.model, f"diff {frm} {to}: {to or 'live'}")
    assert (d["from"], d["to"], d["volume"]) == (frm, to or "live", "live"), d
    ranges = [(r["offset"], r["length"]) for r in d["ranges"]]
    end = -1
    for off, n in ranges:
        assert off % BS == 0 and n > 0 and off + n <= SIZE, ranges
        assert n % BS == 0 or off + n == SIZE, ranges
        assert off > end, f"ranges overlap, touch or are unsorted: {ranges}"
        end = off + n
    assert d["changed_bytes"] == sum(n for _, n in ranges), d
    reported = {b for off, n in ranges for b in range(off // BS, (off + n) // BS)}
    changed = {
        b for b in range(NBLOCKS) if old[b * BS : (b + 1) * BS] != new[b * BS : (b + 1) * BS]
    }
    for b in changed:  # every changed byte lies inside a reported range
        lo, hi = b * BS, (b + 1) * BS
        first = next(i for i in range(lo, hi) if old[i] != new[i])
        last = next(i for i in range(hi - 1, lo - 1, -1) if old[i] != new[i])
        for x in (first, last):
            assert any(off <= x < off + n for off, n in ranges), (
                f"diff {frm} {to}: byte {x} (block {b}) changed but is in no range {ranges}"
            )
    written = p.touched(frm, to)
    assert reported <= written, (
        f"diff {frm} {to}: blocks {sorted(reported - written)} reported, never written"
    )
    if text:  # the same ranges, then the summary
        lines = p.run("diff", frm, *([to] if to else [])).stdout.splitlines()
        assert [tuple(map(int, line.split("\t"))) for line in lines[:-1]] == ranges, lines
        assert lines[-1].endswith(f"in {len(ranges)} range(s) between {frm} and {to or 'live'}")
    return reported


def test_diff_against_nbd_data(pool: Pool) -> None:
    t = history(pool)
    # the writes were designed so that exactly these blocks differ, block 11 aside
    assert t["s1"] == {0, 1, 3, 4, 5, 6, 9, 11, 20, NBLOCKS - 1}
    assert t["s2"] == {1, 2, 9, 30} and t["s3"] == {2, 40, 41}
    for frm, to, want in (
        ("s1", "s2", t["s1"] - {11}),
        ("s2", "s3", t["s2"]),
        ("s1", "s3", (t["s1"] | t["s2"]) - {11}),
        ("s3", None, t["s3"]),
        ("s2", None, t["s2"] | t["s3"]),
        ("s1", None, (t["s1"] | t["s2"] | t["s3"]) - {11}),
    ):
        reported = check_diff(pool, frm, to, text=to is None)
        assert want <= reported <= want | {11}, (frm, to, sorted(reported), sorted(want))
    # a snapshot compared with itself, or live unchanged since the newest snapshot
    pool.create("s4")
    d = pool.json("diff", "s4")
    assert d["ranges"] == [] and d["changed_bytes"] == 0, d
    assert pool.run("diff", "s4").stdout.splitlines()[-1].startswith("0B changed in 0 range(s)")


# --- du and delete ---------------------------------------------------------------------------


def check_du(p: Pool) -> dict[str, Any]:
    du = p.json("du")
    snaps = {s["name"]: s for s in p.list()}
    assert [r["name"] for r in du["snapshots"]] == p.order() == list(snaps), du
    for r in du["snapshots"]:
        assert r["owned_bytes"] == len(p.owned(r["name"])) * BS, (r, sorted(p.owned(r["name"])))
        assert r["used_bytes"] == len(p.used(r["name"])) * BS, (r, sorted(p.used(r["name"])))
        assert r["used_bytes"] == snaps[r["name"]]["used_bytes"], (r, snaps[r["name"]])
        assert snaps[r["name"]]["referenced_bytes"] == len(p.snaps[r["name"]].alloc) * BS
    assert du["live_bytes"] == len(p.alloc) * BS, du
    assert du["snapshots_bytes"] == p.snapshots_blocks() * BS, du
    assert du["volume"] == "live" and "range" not in du
    return du


def test_du_and_delete_of_a_range(pool: Pool) -> None:
    history(pool)
    pool.create("s4")
    pool.scribble(50 * BS, BS)  # s4 owns nothing: 50 was a hole
    check_du(pool)

    # text form with -p
    text = pool.run("du", "-p", "s2%s3").stdout.splitlines()
    du = pool.json("du", "s2%s3")
    assert text[0].split("\t") == ["NAME", "USED", "OWNED"]
    rows = [line.split("\t") for line in text[1:-2]]
    assert rows[:-1] == [
        [r["name"], str(r["used_bytes"]), str(r["owned_bytes"])] for r in du["snapshots"]
    ]
    assert rows[-1] == ["<live>", str(du["live_bytes"]), str(du["live_bytes"])]
    assert text[-2] == f"snapshots hold {du['snapshots_bytes']} in all"
    rng = du["range"]
    assert (rng["from"], rng["to"], rng["snapshots"]) == ("s2", "s3", ["s2", "s3"]), rng
    assert text[-1] == f"deleting s2 through s3 (2 snapshots) would free {rng['freed_bytes']}"
    model_freed = (pool.snapshots_blocks() - pool.snapshots_blocks(("s2", "s3"))) * BS
    assert rng["freed_bytes"] == model_freed, (rng, model_freed)
    # one snapshot: what deleting it alone frees, its used
    one = pool.json("du", "s3")["range"]
    s3 = next(s for s in pool.list() if s["name"] == "s3")
    assert one["snapshots"] == ["s3"] and one["freed_bytes"] == s3["used_bytes"], (one, s3)

    used_before = data_used(pool)
    res = pool.json("delete", "s2", "s3")
    assert [(r["name"], r["deleted"]) for r in res] == [("s2", True), ("s3", True)], res
    pool.deleted("s2", "s3")
    freed = sum(r["freed_bytes"] for r in res)
    used_after = data_used(pool)
    assert pool.names() == ["s1", "s4"]
    check_du(pool)
    for export in ("live", "live@s1", "live@s4"):
        pool.check_export(export, "after deleting s2 and s3")
    check_diff(pool, "s1", "s4")  # s1 took over what it relied on from s2 and s3
    assert freed == used_before - used_after, (res, used_before, used_after)
    # what du promised is what delete reports and what the pool gave back
    assert freed == rng["freed_bytes"], (
        f"du s2%s3 said {rng['freed_bytes']} would be freed; delete reported {res} "
        f"(data in the pool went down by {used_before - used_after})"
    )


@pytest.mark.engine_log(NO_SUCH_SNAPSHOT, SNAPSHOT_GONE)
def test_delete_dry_run_and_if_exists(pool: Pool) -> None:
    history(pool)
    before_list = pool.list()
    before_info = pool.info()
    before_data = data_used(pool)
    if pool.mode == "direct":
        digest = pool.disk_hash()

    dry = pool.json("delete", "-n", "s2")
    assert dry == [
        {"name": "s2", "missing": False, "deleted": False, "freed_bytes": dry[0]["freed_bytes"]}
    ]
    s2 = next(s for s in before_list if s["name"] == "s2")
    assert dry[0]["freed_bytes"] == s2["used_bytes"] == len(pool.used("s2")) * BS, (dry, s2)
    text = pool.run("delete", "--dry-run", "s2", "s1").stdout.splitlines()
    assert text[0].startswith("would delete s2, free ") and text[1].startswith("would delete s1")
    dry2 = pool.json("delete", "--dry-run", "--if-exists", "gone1", "s1", "gone2")
    assert [(r["name"], r["deleted"]) for r in dry2] == [
        ("gone1", False),
        ("s1", False),
        ("gone2", False),
    ]
    assert dry2[0]["freed_bytes"] == dry2[2]["freed_bytes"] == 0
    cp = pool.run("delete", "--if-exists", "gone1")
    assert cp.stdout.strip() == "gone1: no such snapshot (skipped)", show(cp)
    assert pool.json("delete", "--if-exists", "gone1") == [
        {"name": "gone1", "missing": True, "deleted": False, "freed_bytes": 0}
    ]
    # nothing changed: not the snapshots, not the space, not one byte of the disk
    assert pool.list() == before_list
    assert pool.info()["used_bytes"] == before_info["used_bytes"]
    if pool.mode == "direct":
        assert pool.disk_hash() == digest
    for export in ("live", "live@s1", "live@s2", "live@s3"):
        pool.check_export(export, "after dry runs")

    # the real delete, with a reader of s2 connected (server mode: it gets errors, no data)
    reader = pool.connect("live@s2") if pool.mode == "server" else None
    if reader is not None:
        assert reader.pread(BS, 0) == pool.snaps["s2"].data[:BS]
    res = pool.json("delete", "--if-exists", "s2", "gone3")
    assert [(r["name"], r["deleted"]) for r in res] == [("s2", True), ("gone3", False)], res
    pool.deleted("s2")
    if reader is not None:
        with pytest.raises(nbd.Error):
            reader.pread(BS, 0)
        pool.drop(reader)
    with pytest.raises(nbd.Error):
        pool.connect("live@s2")
    assert pool.names() == ["s1", "s3"]
    assert data_used(pool) == before_data - res[0]["freed_bytes"]
    for export in ("live", "live@s1", "live@s3"):
        pool.check_export(export, "after deleting s2")
    # the dry run said what the delete then did
    assert res[0]["freed_bytes"] == dry[0]["freed_bytes"], (
        f"delete -n s2 said {dry[0]['freed_bytes']}, delete s2 freed {res[0]['freed_bytes']}"
    )


def test_delete_dry_run_of_several(pool: Pool) -> None:
    """delete -n A B reports, per name, what delete A B then frees (deleting A first changes
    what B frees)."""
    history(pool)
    dry = pool.json("delete", "-n", "s1", "s2")
    res = pool.json("delete", "s1", "s2")
    assert [r["freed_bytes"] for r in dry] == [r["freed_bytes"] for r in res], (dry, res)


# --- rename, hold, release -------------------------------------------------------------------


@pytest.mark.engine_log(NO_SUCH_SNAPSHOT)
def test_rename(pool: Pool) -> None:
    pool.scribble(0, 2 * BS)
    a = pool.create("r1")
    pool.scribble(0, BS)
    b = pool.create("r2")
    pool.scribble(BS, BS)
    reader = pool.connect("live@r2") if pool.mode == "server" else None
    assert pool.run("rename", "r1", "old-1").stdout.strip() == "renamed r1 to old-1"
    pool.renamed("r1", "old-1")
    pool.run("rename", "r2", "r2.b")
    pool.renamed("r2", "r2.b")
    snaps = pool.list()
    assert [(s["name"], s["id"]) for s in snaps] == [("old-1", a["id"]), ("r2.b", b["id"])]
    assert snaps[0]["guid"] == a["guid"] and snaps[0]["created_ns"] == a["created_ns"]
    if reader is not None:  # an open connection keeps working across the rename
        assert reader.pread(2 * BS, 0) == pool.snaps["r2.b"].data[: 2 * BS]
        pool.drop(reader)
    for export in ("live", "live@old-1", "live@r2.b"):
        pool.check_export(export, "after rename")
    with pytest.raises(nbd.Error):
        pool.connect("live@r1")
    assert pool.json("diff", "old-1", "r2.b")["ranges"] == [{"offset": 0, "length": BS}]


def test_hold_and_release(pool: Pool) -> None:
    pool.scribble(0, BS)
    pool.create("h1")
    pool.scribble(0, BS)
    pool.create("h2")
    assert pool.run("hold", "h1").stdout.strip() == "h1: held (hold)"
    assert pool.run("hold", "h1", "--tag", "backup").stdout.strip() == "h1: held (hold, backup)"
    assert pool.list()[0]["holds"] == ["hold", "backup"]
    pool.run("hold", "h1", "--tag", "backup", rc=4)
    for i in range(3, 9):
        pool.run("hold", "h1", "--tag", f"t{i}")
    tags = ["hold", "backup", *(f"t{i}" for i in range(3, 9))]
    assert [s["holds"] for s in pool.list()] == [tags, []]
    cp = pool.run("hold", "h1", "--tag", "t9", rc=4)
    assert "8 holds" in cp.stderr and "release one" in cp.stderr, show(cp)
    cp = pool.run("delete", "h1", rc=4)
    assert f"held ({', '.join(tags)})" in cp.stderr, show(cp)
    assert "snapctl release h1 --tag" in cp.stderr, show(cp)
    cp = pool.run("release", "h1", "--tag", "t9", rc=3)
    assert "no hold tagged 't9'" in cp.stderr, show(cp)
    out = pool.run("release", "h1").stdout.strip()
    assert out == f"h1: released 'hold' (still held: {', '.join(tags[1:])})", out
    assert pool.list()[0]["holds"] == tags[1:]
    pool.run("release", "h1", rc=3)  # 'hold' is no longer held
    # several names, one held: exit 4 naming it; what was said to be deleted is gone
    pool.scribble(0, BS)
    pool.create("h3")
    cp = pool.run("delete", "h3", "h1", rc=4)
    assert "'h1' is held" in cp.stderr, show(cp)
    if "h3" in pool.names():
        assert "deleted h3" not in cp.stdout, show(cp)
    else:
        assert cp.stdout.startswith("deleted h3, freed "), show(cp)
        pool.deleted("h3")
    # released, a snapshot can be deleted again
    pool.run("hold", "h2", "--tag", "x")
    pool.run("delete", "h2", rc=4)
    assert pool.run("release", "h2", "--tag", "x").stdout.strip() == "h2: released 'x'"
    pool.run("delete", "h2")
    pool.deleted("h2")
    assert [(s["name"], s["holds"]) for s in pool.list() if s["name"] != "h3"] == [("h1", tags[1:])]
    pool.check_export("live@h1", "held snapshot")


# --- rollback --------------------------------------------------------------------------------


@pytest.mark.engine_log(NO_SUCH_SNAPSHOT, VOLUME_CHANGED)
def test_rollback(pool: Pool) -> None:
    history(pool)
    server = pool.mode == "server"
    live = pool.live() if server else None  # a connected client (server mode)

    # refusals change nothing
    cp = pool.run("rollback", "s1", "--yes", "--force", rc=4)
    assert "newer than 's1' exist (s2, s3)" in cp.stderr and "--destroy-newer" in cp.stderr
    cp = pool.run("rollback", "s1", "--destroy-newer", rc=2)  # no terminal, no --yes
    assert "destroying s2, s3" in cp.stderr and "--yes" in cp.stderr, show(cp)
    cp = pool.tty_run("n", "rollback", "s3", "--force", rc=4)
    assert "rollback cancelled" in cp.stderr and "Roll back live to s3" in cp.stdout, show(cp)
    pool.run("hold", "s3", "--tag", "keep")
    cp = pool.run("rollback", "s1", "--yes", "--destroy-newer", "--force", rc=4)
    assert "s3 (keep)" in cp.stderr, show(cp)
    pool.run("release", "s3", "--tag", "keep")
    if server:
        cp = pool.run("rollback", "s3", "--yes", rc=4)
        assert "1 client connection(s)" in cp.stderr and "--force" in cp.stderr, show(cp)
        assert live is not None and live.pread(BS, 2 * BS) == pool.model[2 * BS : 3 * BS]
    assert pool.names() == ["s1", "s2", "s3"]
    pool.check_export("live", "after refused rollbacks")

    # rollback to the newest snapshot: live reads s3 again; the old connection gets errors
    cp = pool.run("rollback", "s3", "--volume", "live", "--yes", *(["--force"] * server))
    assert cp.stdout.strip() == "rolled live back to s3", show(cp)
    if live is not None:
        with pytest.raises(nbd.Error):
            live.pread(BS, 0)
        with pytest.raises(nbd.Error):
            live.pwrite(b"x" * 512, 0)
    assert pool.rolled_back("s3") == []  # (drops the old connection)
    for export in ("live", "live@s1", "live@s2", "live@s3"):
        pool.check_export(export, "after rollback to s3")
    assert pool.json("diff", "s3", "--volume", "live")["ranges"] == []
    assert pool.names() == ["s1", "s2", "s3"]
    assert pool.json("du", "--volume", "live")["snapshots"][-1]["owned_bytes"] == 0

    # new writes after the rollback; then roll back over s3 with a terminal saying yes
    after = pool.scribble(7 * BS + 3, 3 * BS) | pool.flip(40 * BS)
    assert check_diff(pool, "s3", None) == after
    cp = pool.tty_run("y", "rollback", "s2", "--destroy-newer", "--force", rc=0)
    assert "destroying s3" in cp.stdout and "destroyed s3" in cp.stdout, show(cp)
    assert pool.rolled_back("s2") == ["s3"]
    assert pool.names() == ["s1", "s2"]
    for export in ("live", "live@s1", "live@s2"):
        pool.check_export(export, "after rollback to s2")
    with pytest.raises(nbd.Error):
        pool.connect("live@s3")

    # and all the way back with --destroy-newer --yes
    pool.scribble(3, 100)
    pool.create("s5")
    pool.flip(SIZE - 1)
    cp = pool.run("rollback", "s1", "--destroy-newer", "-y", "--force")
    assert cp.stdout.strip() == "rolled live back to s1; destroyed s2, s5", show(cp)
    assert pool.rolled_back("s1") == ["s2", "s5"]
    assert pool.names() == ["s1"]
    for export in ("live", "live@s1"):
        pool.check_export(export, "after rollback to s1")
    check_du(pool)
    written = pool.scribble(BS * 33 + 1, 10)
    assert check_diff(pool, "s1", None) == written
    pool.check_export("live", "after writing on the rolled back live")


# --- prune -----------------------------------------------------------------------------------


def test_prune(pool: Pool) -> None:
    for i, name in enumerate(("a1", "a2", "a3", "a4", "b1", "a5")):
        pool.scribble(i * BS, 2 * BS)
        pool.create(name)
    pool.flip(5 * BS)
    pool.run("hold", "a1", "--tag", "keep")
    before_list = pool.list()
    used = data_used(pool)
    if pool.mode == "direct":
        digest = pool.disk_hash()

    dry = pool.json("prune", "--keep-last", "2", "--prefix", "a", "--dry-run")
    assert [v["name"] for v in dry] == ["a5", "a4", "a3", "a2", "a1"]  # newest first; no b1
    for v in dry:
        assert set(v) == {"name", "keep", "reasons", "freed_bytes"}, v
    verdicts = {v["name"]: (v["keep"], v["reasons"]) for v in dry}
    assert verdicts == {
        "a5": (True, ["one of the last 2 (#1)"]),
        "a4": (True, ["one of the last 2 (#2)"]),
        "a3": (False, ["kept by no rule"]),
        "a2": (False, ["kept by no rule"]),
        "a1": (True, ["held (keep)"]),
    }
    assert all(v["freed_bytes"] == 0 for v in dry if v["keep"])
    text = pool.run("prune", "--keep-last", "2", "--prefix", "a", "-n").stdout.splitlines()
    assert text[0] == "keep    a5: one of the last 2 (#1)"
    assert text[2].startswith("would delete a3: kept by no rule, ")
    assert text[-1] == "would delete 2 of 5 snapshot(s)"
    hourly = pool.json("prune", "--keep-last", "0", "--keep-hourly", "1", "-n", "--prefix", "a")
    daily = pool.json("prune", "--keep-last", "0", "--keep-daily", "1", "-n", "--prefix", "a")
    a5 = next(s for s in before_list if s["name"] == "a5")
    t = time.gmtime(a5["created_ns"] / 1e9)
    assert hourly[0] == {
        "name": "a5",
        "keep": True,
        "reasons": [time.strftime("hourly %Y-%m-%dT%H:00Z", t)],
        "freed_bytes": 0,
    }
    assert daily[0]["reasons"] == [time.strftime("daily %Y-%m-%d", t)] and daily[0]["keep"]
    for plan in (hourly, daily):
        assert {v["name"]: v["keep"] for v in plan[1:]} == {
            "a4": False,
            "a3": False,
            "a2": False,
            "a1": True,
        }
    assert pool.json("prune", "--keep-last", "0", "--prefix", "zzz") == []
    assert pool.run("prune", "--keep-last", "0", "--prefix", "zzz").stdout.strip() == (
        "deleted 0 of 0 snapshot(s)"
    )
    # the dry runs deleted nothing
    assert pool.list() == before_list and data_used(pool) == used
    if pool.mode == "direct":
        assert pool.disk_hash() == digest

    real = pool.json("prune", "--keep-last", "2", "--prefix", "a")
    assert [(v["name"], v["keep"], v["reasons"]) for v in real] == [
        (v["name"], v["keep"], v["reasons"]) for v in dry
    ]
    pool.deleted("a3", "a2")
    assert pool.names() == ["a1", "a4", "b1", "a5"]
    assert data_used(pool) == used - sum(v["freed_bytes"] for v in real)
    for export in ("live", "live@a1", "live@a4", "live@b1", "live@a5"):
        pool.check_export(export, "after prune")

    # everything unheld goes with --keep-last 0, whatever the prefix
    out = pool.run("prune", "--keep-last", "0").stdout.splitlines()
    assert out[-1] == "deleted 3 of 4 snapshot(s)" and "keep    a1: held (keep)" in out
    pool.deleted("a4", "b1", "a5")
    assert pool.names() == ["a1"]
    for args in (("--keep-last", "-1"), ("--keep-hourly", "2"), ("--keep-last", "x")):
        cp = run_cli("-d", str(pool.disk), "prune", *args, env=pool.env)
        assert cp.returncode == 2 and "Traceback" not in cp.stderr, show(cp)
    pool.check_export("live@a1", "after prune --keep-last 0")


# --- create --freeze -------------------------------------------------------------------------


@pytest.fixture
def ext4_mount(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A small ext4 image on a loop device, mounted in tmp; always unmounted and detached."""
    for t in ("mkfs.ext4", "losetup", "mount", "umount", "fsfreeze"):
        require(t)
    img = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert loop.startswith("/dev/loop"), loop
    request.addfinalizer(
        lambda: subprocess.run(["losetup", "-d", loop], check=True, capture_output=True)
    )
    subprocess.run(["mount", loop, str(mnt)], check=True, capture_output=True)

    def unmount() -> None:
        subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)

    request.addfinalizer(unmount)
    return mnt


def assert_thawed(mnt: Path, tag: str) -> None:
    """A write with fsync completes: the file system is not frozen."""
    probe = mnt / f"probe-{tag}"
    p = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={probe}", "bs=4096", "count=4", "conv=fsync", "status=none"]
    )
    try:
        rc = p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], capture_output=True)
        p.wait(timeout=60)
        pytest.fail(f"{mnt} was left frozen ({tag})")
    assert rc == 0 and probe.stat().st_size == 16384


def test_create_freeze(pool: Pool, ext4_mount: Path, tmp_path: Path) -> None:
    mnt = str(ext4_mount)
    pool.scribble(0, BS)
    snap = pool.create("f1", "--freeze", mnt)
    assert set(snap) == FIELDS
    assert_thawed(ext4_mount, "after create")
    out = pool.run("create", "f2", "--freeze", mnt).stdout.strip()
    assert out == f"created snapshot f2 (id {snap['id'] + 1})", out
    assert_thawed(ext4_mount, "after create f2")
    cp = pool.run("create", "f1", "--freeze", mnt, rc=4)
    assert "already exists" in cp.stderr, show(cp)
    assert_thawed(ext4_mount, "after a failed create")
    # freezing the second one fails: the first is thawed again, no snapshot is made
    cp = pool.run("create", "f3", "--freeze", mnt, "--freeze", str(tmp_path / "nope"), rc=4)
    assert "cannot freeze" in cp.stderr, show(cp)
    assert_thawed(ext4_mount, "after a failed freeze")
    cp = pool.run("create", "f3", "--freeze", mnt, "--freeze", mnt, rc=4)
    assert "cannot freeze" in cp.stderr, show(cp)
    assert_thawed(ext4_mount, "after freezing twice")
    cp = run_cli("-d", str(tmp_path / "nopool.img"), "create", "f4", "--freeze", mnt)
    assert_error(cp, 3)
    assert_thawed(ext4_mount, "after a missing pool")
    assert pool.names() == ["f1", "f2"]


def test_direct_mode_leaves_deferred_merges_to_the_server(tmp_path: Path) -> None:
    """snapctl without a server runs no deferred merges: a command that only reads leaves a
    pool with unmerged blocks byte-identical (merging every incomplete block of a large pool
    is a server's idle work, not a side effect of `list`)."""
    disk = tmp_path / "pool.img"
    eng = Engine.open(str(disk), create_size=SIZE, block_size=BS, claim=False)
    ex = eng.open_export("live", False)
    eng.write(ex, memoryview(os.urandom(SIZE)), 0)
    eng.create_snapshot("s1")
    for b in range(0, SIZE // BS, 3):  # first writes after the snapshot: incomplete blocks
        eng.write(ex, memoryview(os.urandom(4096)), b * BS + 8192)
    eng.close()
    unmerged = snapctl_json("info", disk=disk)["volumes"][0]["unmerged_blocks"]
    assert unmerged == len(range(0, SIZE // BS, 3)), unmerged
    digest = sha256(disk)
    for args in (("list",), ("info",), ("diff", "s1")):
        snapctl(*args, disk=disk, check=True)
        assert sha256(disk) == digest, f"snapctl {' '.join(args)} changed the disk"
    assert snapctl_json("info", disk=disk)["volumes"][0]["unmerged_blocks"] == unmerged


def test_list_of_thousands_of_snapshots_through_the_server(servers: Any, tmp_path: Path) -> None:
    """A listing longer than a request may be (1 MiB) still reaches snapctl whole."""
    disk = tmp_path / "many.img"
    eng = Engine.open(str(disk), create_size=1 << 20, block_size=4096, claim=False)
    count = 5000
    for i in range(count):
        eng.create_snapshot(f"nightly-2026-12-07-{i:05d}")
    eng.close()
    srv = servers(disk).start()
    cp = srv.snapctl("list", "--json")
    assert len(cp.stdout) > 1 << 20, len(cp.stdout)  # past what one request may be
    names = [s["name"] for s in json.loads(cp.stdout)]
    assert names == [f"nightly-2026-12-07-{i:05d}" for i in range(count)]
    assert srv.stop() == 0

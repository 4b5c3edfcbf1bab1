"""T10: standby pools (FIG. 15A-15D) across two network namespaces, and the streams under them.

Two "hosts" are two network namespaces joined by a veth pair (tests/netns.py: 10.77.0.1 and
10.77.0.2), each running its own dittofs server (nbdkit inside the namespace, a Unix-socket NBD
export, its own DITTOFS_RUNDIR) with its replication endpoint listening on its veth address; every
snapctl command runs inside its host's namespace, so the pools reach each other only over the
veth pair. The test reads exports with libnbd and mounts them through the kernel (nbdfuse + loop,
tests/kernel.py) from the root namespace over the Unix sockets.

* The whole cycle: 15A attach and several syncs while a kernel-mounted ext4 on A's live is
  written (frozen for each sync; also `sync --every` while it is being written); A is killed with
  kill -9 holding changes it never sent -> 15B promote on B -> writes on the new primary -> 15C A
  returns, its sync is refused as superseded and its live turns read-only, it demotes with
  --save-diverged and B's `standby attach` catches it up -> 15D failback. At every stage both
  pools are compared byte for byte with what the last common snapshot held, and the diverged
  stream file, received into a scratch pool at the common snapshot, rebuilds exactly what A held
  when it was killed (and covers exactly the blocks A had changed).
* Interrupted streams: a truncated stream file stops with a resume hint and leaves the target at
  its last complete snapshot; `send --resume TOKEN | receive` completes it. A real transfer cut
  in the middle (the receiving server killed mid-sync) is followed by a sync that succeeds.
* Refusals: a wrong key (attach, sync, promote, a raw unauthenticated client) changes nothing on
  either pool; a corrupted record is refused, keeps its progress, and `receive --abort` returns
  the target exactly to its base; a stream on the wrong base (or out of order, or with the wrong
  MAC key) is refused.
* Figures for the closing note: stream size versus the change, and sync throughput across the
  namespaces; printed to the terminal and written to t10-figures.json in the test's directory.

Needs root, `ip` with network namespaces, nbdkit, nbdfuse, losetup; never skips.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest
from harness import SNAPCTL, NbdkitServer
from kernel import KernelExport, require_kernel_tools, run, tool
from netns import Host, TwoHosts
from support.logcheck import READ_ONLY_REQUEST
from support.nbdclose import disconnect
from support.snapctl import shown as show
from support.snapctl import snapctl

from fsimpl.layout import (
    DATA_HEAD,
    HOLE_BODY,
    MAC_SIZE,
    REC_DATA,
    REC_HOLE,
    RECF_MAC,
    STREAM_HEADER,
    STREAM_TRAILER,
)

KIB = 1024
MIB = 1 << 20
BS = 64 * KIB  # the default block size
VOL = "64M"
VOL_BYTES = 64 * MIB
EXIT_REFUSED = 4


# --- keys, commands, transcript ----------------------------------------------------------------


def make_key(path: Path, identity: str = "dittofs") -> Path:
    path.write_text(f"{identity}:{os.urandom(32).hex()}\n")
    path.chmod(0o600)
    return path


class Transcript:
    """Every snapctl command a test ran, with its output; written out at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.lines: list[str] = []
        self.base = str(tmp_path)

    def note(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def add(self, who: str, args: tuple[str, ...], cp: subprocess.CompletedProcess[str]) -> None:
        lines = [f"{who}$ snapctl {' '.join(args)}   [exit {cp.returncode}]"]
        lines += [f"    {line}" for line in (cp.stdout + cp.stderr).strip().splitlines()]
        self.lines += [line.replace(self.base, "$T") for line in lines]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def sc(
    h: Host, *args: str, rc: int = 0, log: Transcript | None = None
) -> subprocess.CompletedProcess[str]:
    """snapctl on host h (inside its namespace); its exit code must be rc."""
    cp = h.snapctl(*args, check=False)
    if log is not None:
        log.add(h.label, args, cp)
    assert cp.returncode == rc, f"expected exit {rc}:\n{show(cp)}"
    if rc:
        assert "Traceback" not in cp.stderr, show(cp)
    return cp


def sj(h: Host, *args: str, log: Transcript | None = None) -> Any:
    """snapctl ... --json on host h: its parsed output."""
    return json.loads(sc(h, *args, "--json", log=log).stdout)


def error_line(cp: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A refused command says so in one 'snapctl: ' line on stderr."""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapctl: "), show(cp)
    for n in needles:
        assert n in lines[0], f"{n!r} not in the error:\n{show(cp)}"
    return lines[0]


def serve(h: Host, key: Path, log: Transcript | None = None) -> None:
    out = sc(h, "standby", "serve", "--listen", h.endpoint, "--key-file", str(key), log=log)
    assert "inside its server" in out.stdout, show(out)


def boot(h: Host, key: Path, log: Transcript | None = None, size: str = VOL) -> None:
    """Format the host's pool, start its server in its namespace, start its endpoint."""
    h.format(size)
    h.start()
    serve(h, key, log)


def format_pool(disk: Path, size: str = VOL) -> None:
    """A pool in the root namespace (a scratch pool, or one side of a stream-file test)."""
    snapctl("format", str(disk), "--size", size, check=True)


def role(h: Host) -> dict[str, Any]:
    st: dict[str, Any] = sj(h, "standby", "status")
    return st


def snap_names(h: Host) -> list[str]:
    return [s["name"] for s in sj(h, "list")]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --- reading exports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An export's content: its sha256 and one digest per MiB (to say where two differ)."""

    sha: str
    chunks: tuple[str, ...]


close = disconnect  # (support.nbdclose)


def image(srv: NbdkitServer, export: str = "live") -> Image:
    h = srv.connect(export)
    try:
        size = h.get_size()
        whole = hashlib.sha256()
        chunks = []
        for off in range(0, size, MIB):
            buf = h.pread(min(MIB, size - off), off)
            whole.update(buf)
            chunks.append(hashlib.sha256(buf).hexdigest()[:16])
    finally:
        close(h)
    return Image(whole.hexdigest(), tuple(chunks))


def same(actual: Image, expected: Image, what: str) -> None:
    if actual == expected:
        return
    bad = [
        i for i, (x, y) in enumerate(zip(actual.chunks, expected.chunks, strict=False)) if x != y
    ]
    raise AssertionError(
        f"{what}: the data differs (MiB {bad[:16]}{' ...' if len(bad) > 16 else ''}; "
        f"{len(actual.chunks)} vs {len(expected.chunks)} MiB)"
    )


def write_blocks(srv: NbdkitServer, blocks: list[int], rng: random.Random, length: int = BS) -> int:
    """Random data into each block (length bytes at its start), flushed; returns the bytes."""
    h = srv.connect()
    try:
        for b in blocks:
            h.pwrite(rng.randbytes(length), b * BS)
        h.flush()
    finally:
        close(h)
    return len(blocks) * length


def write_range(srv: NbdkitServer, offset: int, data: bytes) -> None:
    h = srv.connect()
    try:
        for off in range(0, len(data), 4 * MIB):
            h.pwrite(data[off : off + 4 * MIB], offset + off)
        h.flush()
    finally:
        close(h)


def assert_read_only(srv: NbdkitServer, what: str) -> None:
    """New connections to live are read-only, and a write is refused."""
    h = srv.connect("live")
    try:
        assert h.is_read_only(), f"{what}: live is offered read-write"
        with pytest.raises(nbd.Error):
            h.set_strict_mode(0)
            h.pwrite(b"x" * 4096, 0)
    finally:
        close(h)


def assert_writable(srv: NbdkitServer, what: str) -> None:
    h = srv.connect("live")
    try:
        assert not h.is_read_only(), f"{what}: live is offered read-only"
    finally:
        close(h)


# --- streams --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    offset: int  # of the record in the stream
    size: int  # header + payload + trailer (+ MAC)
    rtype: int
    seq: int
    first: int = 0  # DATA and HOLE: the blocks they cover
    count: int = 0


def records(data: bytes) -> list[Rec]:
    """The records of a stream (layout.py's framing), to cut, flip or count them."""
    out = []
    off = 0
    while off < len(data):
        _magic, rtype, flags, length, seq = STREAM_HEADER.unpack_from(data, off)
        size = STREAM_HEADER.size + length + STREAM_TRAILER.size
        size += MAC_SIZE if flags & RECF_MAC else 0
        first = count = 0
        body = off + STREAM_HEADER.size
        if rtype == REC_DATA:
            _vol, first, count = DATA_HEAD.unpack_from(data, body)
        elif rtype == REC_HOLE:
            _vol, first, count = HOLE_BODY.unpack_from(data, body)
        out.append(Rec(off, size, rtype, seq, first, count))
        off += size
    assert off == len(data), "the stream ends inside a record"
    return out


def covered(recs: list[Rec]) -> set[int]:
    return {
        b
        for r in recs
        if r.rtype in (REC_DATA, REC_HOLE)
        for b in range(r.first, r.first + r.count)
    }


def ranges_to_blocks(ranges: list[dict[str, int]]) -> set[int]:
    return {
        b
        for r in ranges
        for b in range(r["offset"] // BS, (r["offset"] + r["length"] + BS - 1) // BS)
    }


def token_records(token: str) -> int:
    return int(json.loads(base64.urlsafe_b64decode(token.encode()))["records"])


def pipe(
    src: NbdkitServer, send_args: list[str], dst: NbdkitServer, recv_args: list[str]
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """snapctl -d SRC send ... | snapctl -d DST receive ...: both processes' results."""
    sender = subprocess.Popen(
        [str(SNAPCTL), "-d", str(src.disk), "send", *send_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=src.env,
    )
    assert sender.stdout is not None and sender.stderr is not None
    receiver = subprocess.run(
        [str(SNAPCTL), "-d", str(dst.disk), "receive", *recv_args],
        stdin=sender.stdout,
        capture_output=True,
        text=True,
        env=dst.env,
        timeout=120,
    )
    sender.stdout.close()
    err = sender.stderr.read().decode()
    sender.stderr.close()
    rc = sender.wait(60)
    return subprocess.CompletedProcess(sender.args, rc, "", err), receiver


# --- files in a mounted file system ---------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (lost+found aside), by relative path."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.relpath(dirpath, root) == ".":
            dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def churn(mnt: Path, rng: random.Random, tag: str, files: int = 6) -> None:
    """New files, an overwrite in place, an append and a delete: a little of everything."""
    d = mnt / tag
    d.mkdir(exist_ok=True)
    for i in range(files):
        (d / f"f{i}.bin").write_bytes(rng.randbytes(rng.randrange(4 * KIB, 700 * KIB)))
    olds = sorted(p for p in mnt.rglob("*.bin") if p.parent != d)
    if olds:
        victim = rng.choice(olds)
        with open(victim, "r+b") as f:
            f.write(rng.randbytes(min(victim.stat().st_size, 40 * KIB)))
        with open(rng.choice(olds), "ab") as f:
            f.write(rng.randbytes(9000))
        gone = rng.choice(olds)
        if gone != victim:
            gone.unlink()


class Frozen:
    """fsfreeze -f for the block (the snapshot taken inside is a clean file system)."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt

    def __enter__(self) -> Frozen:
        os.sync()
        run("fsfreeze", "-f", str(self.mnt))
        return self

    def __exit__(self, *exc: object) -> None:
        run("fsfreeze", "-u", str(self.mnt), check=False)


def assert_no_mounts_left(tmp_path: Path, *exports: KernelExport) -> None:
    for k in exports:
        assert k.leftovers() == [], f"{k.export}: {k.leftovers()}"
    base = os.path.realpath(tmp_path)
    with open("/proc/mounts") as f:
        assert [m for m in f if base in m] == []
    losetup = run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").stdout
    assert [line for line in losetup.splitlines() if base in line] == []


def publish(name: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Write a result file into the test's directory and show it on the terminal (even
    without -s)."""
    (tmp_path / name).write_text(text)
    with capsys.disabled():
        sys.stderr.write(f"\n--- {name} ({tmp_path / name}) ---\n{text}")
        sys.stderr.flush()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def net(tmp_path: Path) -> Iterator[TwoHosts]:
    """Two hosts (namespaces + veth pair), removed by name at the end, even on failure."""
    with TwoHosts(tmp_path, "t10") as n:
        yield n


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return make_key(tmp_path / "repl.psk")


# === the whole cycle: FIG. 15A -> kill -9 -> 15B -> 15C -> 15D ====================================


@pytest.mark.engine_log(READ_ONLY_REQUEST)
@pytest.mark.slow
def test_failover_and_failback_cycle(
    net: TwoHosts, key: Path, tmp_path: Path, servers: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    require_kernel_tools()
    for t in ("mkfs.ext4", "e2fsck", "fsfreeze"):
        tool(t)
    rng = random.Random("t10-cycle")
    a, b = net.a, net.b
    log = Transcript(tmp_path)
    K = ("--key-file", str(key))
    log.note(f"A = {a.netns} ({a.endpoint}), B = {b.netns} ({b.endpoint}), joined by a veth pair")
    boot(a, key, log)
    boot(b, key, log)
    kexports: list[KernelExport] = []

    def kernel(h: Host, name: str) -> KernelExport:
        k = KernelExport(h.sock, "live", tmp_path / f"k-{name}")
        kexports.append(k)
        return k

    # --- FIG. 15A: ext4 on A's live, attach, several syncs while it is written --------------------
    ka = kernel(a, "a1")
    with ka:
        run("mkfs.ext4", "-q", "-F", ka.device)
        mnt = ka.mount()
        churn(mnt, rng, "gen0", files=10)
        with Frozen(mnt):
            at_attach = image(a.server)
            r = sj(a, "standby", "attach", b.endpoint, *K, log=log)
        assert r["base"] is None and r["peer"] == b.endpoint, r
        common = r["snapshot"]
        for h in (a, b):
            same(image(h.server, f"live@{common}"), at_attach, f"{h.label}: {common}")
        same(image(b.server), at_attach, "B's live after attach")
        assert (role(a)["role"], role(b)["role"]) == ("primary", "standby")
        assert role(b)["peer"] == a.endpoint and role(a)["peer"] == b.endpoint
        sc(b, "standby", "status", log=log)
        assert_read_only(b.server, "the standby")

        # While A answers as a live primary, B refuses to promote itself.
        cp = sc(b, "standby", "promote", *K, rc=EXIT_REFUSED, log=log)
        error_line(cp, "still answers")
        assert role(b)["role"] == "standby"

        for rnd in range(1, 4):
            churn(mnt, rng, f"gen{rnd}")
            with Frozen(mnt):
                held = image(a.server)
                lag = role(a)["lag_bytes"]
                r = sj(a, "standby", "sync", *K, log=log)
                assert role(a)["lag_bytes"] == 0  # (the thaw writes the superblock again)
            assert r["base"] == common, r
            assert lag > 0, "standby status shows no lag after changes"
            common = r["snapshot"]
            for h in (a, b):
                same(image(h.server, f"live@{common}"), held, f"{h.label}: {common}")
            same(image(b.server), held, f"B's live after sync {rnd}")
            # Only the newest replication snapshot is left on both sides, held.
            for h in (a, b):
                snaps = sj(h, "list")
                assert [s["name"] for s in snaps] == [common], (h.label, snaps)
                assert snaps[0]["holds"] == ["replication"], snaps
            assert sj(a, "list")[0]["guid"] == sj(b, "list")[0]["guid"]

        # `sync --every` while the file system is being written (crash-consistent snapshots).
        lines: list[str] = []
        every = subprocess.Popen(
            a.exec_args(
                str(SNAPCTL), "-d", str(a.disk), "standby", "sync", "--every", "1s", "--json", *K
            ),
            env=a.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        stdout = every.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")))
        reader.start()
        try:
            deadline = time.monotonic() + 40
            n = 0
            while len(lines) < 3 and every.poll() is None and time.monotonic() < deadline:
                churn(mnt, rng, f"every{n}", files=2)
                n += 1
                time.sleep(0.3)
        finally:
            every.send_signal(signal.SIGTERM)
            every.wait(20)
            reader.join(10)
        err = every.stderr.read() if every.stderr else ""
        assert len(lines) >= 3, f"sync --every made {len(lines)} rounds: {lines} {err}"
        rounds = [json.loads(line) for line in lines]
        log.note(f"sync --every 1s ran {len(rounds)} rounds while ext4 on A was written")
        for prev, cur in zip(rounds, rounds[1:], strict=False):
            assert cur["base"] == prev["snapshot"], rounds

        # The server finishes a round the client was waiting for: wait until both pools hold
        # the same single replication snapshot, and still do a moment later.
        def settled() -> bool:
            names = snap_names(a)
            if len(names) != 1 or snap_names(b) != names:
                return False
            time.sleep(0.5)
            return snap_names(a) == names == snap_names(b)

        wait_for(settled, "the last round of sync --every")
        common = role(a)["last_common"]
        assert snap_names(a) == [common]
        same(image(b.server, f"live@{common}"), image(a.server, f"live@{common}"), common)

        with Frozen(mnt):
            at_common = image(a.server)
            last_tree = tree(mnt)
            r = sj(a, "standby", "sync", *K, log=log)
        common = r["snapshot"]
        for h in (a, b):
            same(image(h.server, f"live@{common}"), at_common, f"{h.label}: {common}")

        # --- changes A never sends; then A dies with kill -9 ----------------------------------
        churn(mnt, rng, "unsent", files=5)
        (mnt / "unsent" / "note.txt").write_text("written on A after the last sync\n")
        with Frozen(mnt):
            a_tip = image(a.server)
            a_tree = tree(mnt)
            a_diff = sj(a, "diff", common)
            assert a_diff["changed_bytes"] > 0
            log.note(f"A holds {a_diff['changed_bytes']} bytes beyond {common}; kill -9 A")
            a.server.kill()
        # (the thaw and the unmount now fail their writes: the server is gone)
    assert ka.leftovers() == []
    same(image(b.server), at_common, "B's live while A is down")

    # --- FIG. 15B: promote B ----------------------------------------------------------------------
    out = sc(b, "standby", "promote", *K, log=log).stdout
    assert common in out, out
    st = role(b)
    assert st["role"] == "primary" and not st["superseded"], st
    sc(b, "standby", "status", log=log)
    same(image(b.server), at_common, "B's live after promote")
    assert_writable(b.server, "the promoted standby")

    kb = kernel(b, "b1")
    with kb:
        run("e2fsck", "-fn", kb.device)  # taken frozen: a clean file system
        mnt = kb.mount()
        assert tree(mnt) == last_tree, "B's live is not what the last common snapshot held"
        churn(mnt, rng, "on-b", files=6)
        (mnt / "on-b" / "note.txt").write_text("written on B while it was the primary\n")
        os.sync()
        b_tree = tree(mnt)
    assert kb.leftovers() == []
    b_tip = image(b.server)
    assert b_tip != at_common

    # --- FIG. 15C: A returns, learns it was superseded, demotes, catches up -----------------------
    log.note("A restarts (its server and endpoint)")
    a.start()
    serve(a, key, log)
    sc(a, "standby", "status", log=log)  # it does not know yet
    same(image(a.server), a_tip, "A's live after kill -9 and restart (flushed data)")
    cp = sc(a, "standby", "sync", *K, rc=EXIT_REFUSED, log=log)
    error_line(cp, "superseded")
    st = role(a)
    assert st["superseded"], st
    sc(a, "standby", "status", log=log)
    assert_read_only(a.server, "the superseded old primary")
    cp = sc(a, "standby", "attach", b.endpoint, *K, rc=EXIT_REFUSED, log=log)
    error_line(cp, "superseded")
    same(image(a.server), a_tip, "A's live after its refused sync")
    same(image(b.server), b_tip, "B's live after A's refused sync")

    diverged = tmp_path / "a-diverged.stream"
    out = sc(a, "standby", "demote", "--save-diverged", str(diverged), *K, log=log).stdout
    assert common in out and str(diverged) in out, out
    st = role(a)
    assert st["role"] == "standby" and not st["superseded"] and st["last_common"] == common, st
    sc(a, "standby", "status", log=log)
    assert snap_names(a) == [common]
    same(image(a.server), at_common, "A's live after demote")
    assert_read_only(a.server, "the demoted old primary")

    # The diverged stream holds exactly A's unsent change: it covers the blocks A had changed
    # since the common snapshot, and on a pool at that snapshot it rebuilds A's live byte for byte.
    recs = records(diverged.read_bytes())
    assert covered(recs) == ranges_to_blocks(a_diff["ranges"])
    scratch = servers(disk=tmp_path / "scratch.img")
    format_pool(scratch.disk)
    scratch.start()
    base_file = tmp_path / "common.stream"
    sc(b, "send", common, "-o", str(base_file))
    scratch.snapctl("receive", "-i", str(base_file))
    same(image(scratch, f"live@{common}"), at_common, "scratch pool at the common snapshot")
    got = json.loads(scratch.snapctl("receive", "-i", str(diverged), "--json").stdout)
    same(image(scratch, f"live@{got['name']}"), a_tip, "the diverged stream on the common base")
    same(image(scratch), a_tip, "the scratch pool's live")
    rebuilt = KernelExport(scratch.sock, f"live@{got['name']}", tmp_path / "k-div", readonly=True)
    kexports.append(rebuilt)
    with rebuilt:
        assert tree(rebuilt.mount()) == a_tree, "the diverged stream misses files A held"
    log.note(f"the diverged stream ({diverged.stat().st_size} bytes) rebuilds A's lost change")

    r = sj(b, "standby", "attach", a.endpoint, *K, log=log)
    assert r["base"] == common, f"the catch-up did not start at the common snapshot: {r}"
    common = r["snapshot"]
    for h in (a, b):
        same(image(h.server, f"live@{common}"), b_tip, f"{h.label}: {common}")
    same(image(a.server), b_tip, "A's live after catching up")
    assert (role(a)["role"], role(b)["role"]) == ("standby", "primary")
    assert role(a)["peer"] == b.endpoint

    # --- FIG. 15D: failback -----------------------------------------------------------------------
    wait_for(lambda: sj(b, "info")["volumes"][0]["connections"] == 0, "B's clients to go")
    writer = b.server.connect("live")
    try:
        cp = sc(b, "standby", "failback", *K, rc=EXIT_REFUSED, log=log)
        error_line(cp, "connection")
        assert role(b)["role"] == "primary"
    finally:
        close(writer)
    wait_for(lambda: sj(b, "info")["volumes"][0]["connections"] == 0, "B's writer to go")
    out = sc(b, "standby", "failback", *K, log=log).stdout
    sa, sb_ = role(a), role(b)
    assert (sa["role"], sb_["role"]) == ("primary", "standby"), (sa, sb_)
    assert sa["last_common"] == sb_["last_common"] and sa["last_common"] in out
    final = sa["last_common"]
    for h in (a, b):
        sc(h, "standby", "status", log=log)
    for h in (a, b):
        same(image(h.server, f"live@{final}"), b_tip, f"{h.label}: {final}")
        same(image(h.server), b_tip, f"{h.label}'s live after failback")
    assert_writable(a.server, "A, primary again")
    assert_read_only(b.server, "B, standby again")

    ka2 = kernel(a, "a2")
    with ka2:
        mnt = ka2.mount()
        assert tree(mnt) == b_tree, "A after failback lacks what was written on B"
        (mnt / "back-on-a.txt").write_text("A is the primary again\n")
        with Frozen(mnt):
            held = image(a.server)
            r = sj(a, "standby", "sync", *K, log=log)
    assert r["base"] == final
    same(image(b.server), held, "B's live after the first sync since failback")
    for h in (a, b):
        sc(h, "check", log=log)
    assert_no_mounts_left(tmp_path, *kexports)
    publish("failover-transcript.txt", log.text(), tmp_path, capsys)


# === interrupted streams ==========================================================================


@pytest.fixture
def pair(servers: Any, tmp_path: Path) -> tuple[NbdkitServer, NbdkitServer]:
    """Two pools in the root namespace (stream files and pipes need no network)."""
    out = []
    for name in ("src", "dst"):
        disk = tmp_path / f"{name}.img"
        format_pool(disk)
        out.append(servers(disk=disk).start())
    return out[0], out[1]


def scattered(rng: random.Random, n: int, lo: int = 0, hi: int = VOL_BYTES // BS) -> list[int]:
    """n distinct even blocks in [lo, hi): no two adjacent, so each is a record of its own."""
    return sorted(2 * b for b in rng.sample(range((lo + 1) // 2, hi // 2), n))


def snapshots(srv: NbdkitServer) -> list[tuple[str, str, int]]:
    """Name, GUID and creation time of every snapshot (space figures move with live)."""
    listed = json.loads(srv.snapctl("list", "--json").stdout)
    return [(s["name"], s["guid"], s["created_ns"]) for s in listed]


def test_truncated_stream_resumes(pair: tuple[NbdkitServer, NbdkitServer], tmp_path: Path) -> None:
    src, dst = pair
    rng = random.Random("t10-resume")
    write_range(src, 0, rng.randbytes(8 * MIB))
    src.snapctl("create", "s1")
    full = tmp_path / "s1.stream"
    src.snapctl("send", "s1", "-o", str(full))
    dst.snapctl("receive", "-i", str(full))
    base = image(dst, "live@s1")
    same(base, image(src, "live@s1"), "s1")
    write_blocks(src, scattered(rng, 300), rng)  # 300 DATA records of one block each
    src.snapctl("create", "s2")
    want = image(src, "live@s2")
    stream = tmp_path / "s1-s2.stream"
    src.snapctl("send", "--from", "s1", "s2", "-o", str(stream))
    data = stream.read_bytes()
    recs = records(data)
    assert len(recs) == 302
    cut = recs[200].offset + recs[200].size // 2  # in the middle of record 200
    part = tmp_path / "cut.stream"
    part.write_bytes(data[:cut])

    cp = dst.snapctl("receive", "-i", str(part), check=False)
    assert cp.returncode != 0, show(cp)
    msg = error_line(cp, "stopped at record 200", "--resume")
    assert "last complete snapshot" in msg
    # The target stays at s1: no s2, live and live@s1 still read s1.
    assert [s["name"] for s in json.loads(dst.snapctl("list", "--json").stdout)] == ["s1"]
    same(image(dst), base, "live during the interrupted receive")
    same(image(dst, "live@s1"), base, "s1 during the interrupted receive")
    token = dst.snapctl("receive", "--resume-token").stdout.strip()
    assert token_records(token) == 200
    # Another stream is refused while this receive waits for its rest.
    write_blocks(src, [1001], rng)
    src.snapctl("create", "s3")
    other = tmp_path / "s1-s3.stream"
    src.snapctl("send", "--from", "s1", "s3", "-o", str(other))
    cp = dst.snapctl("receive", "-i", str(other), check=False)
    error_line(cp, "another receive ('s2') is in progress")
    same(image(dst), base, "live after a refused other stream")
    assert token_records(dst.snapctl("receive", "--resume-token").stdout.strip()) == 200

    sent, got = pipe(src, ["--resume", token], dst, [])
    assert sent.returncode == 0 and got.returncode == 0, (show(sent), show(got))
    assert "received snapshot s2" in got.stdout, show(got)
    assert "sent 102 records" in sent.stderr, show(sent)  # only the rest (records 200..301)
    assert [s["name"] for s in json.loads(dst.snapctl("list", "--json").stdout)] == ["s1", "s2"]
    guids = [
        {s["name"]: s["guid"] for s in json.loads(p.snapctl("list", "--json").stdout)}
        for p in (src, dst)
    ]
    assert {n: guids[0][n] for n in ("s1", "s2")} == guids[1]
    same(image(dst, "live@s2"), want, "s2 after resuming")
    same(image(dst), want, "live after resuming")
    same(image(dst, "live@s1"), base, "s1 after resuming")
    assert dst.snapctl("receive", "--resume-token", check=False).returncode != 0
    dst.snapctl("check")


def test_sync_cut_mid_transfer_then_syncs(net: TwoHosts, key: Path) -> None:
    """The receiving server is killed (kill -9) while a sync streams over the veth pair: the
    sync fails, the standby stays at its last complete snapshot, and a later sync succeeds
    with both pools identical."""
    a, b = net.a, net.b
    K = ("--key-file", str(key))
    rng = random.Random("t10-cut")
    boot(a, key)
    boot(b, key)
    write_range(a.server, 0, rng.randbytes(4 * MIB))
    common = sj(a, "standby", "attach", b.endpoint, *K)["snapshot"]
    at_common = image(b.server)
    write_blocks(a.server, scattered(rng, 400), rng)  # 400 records, 25 MiB on the wire
    want_live = image(a.server)
    # Slow A's end of the link so the stream is still flowing when the standby dies.
    a.run("tc", "qdisc", "add", "dev", a.iface, "root", "tbf", "rate", "40mbit",
          "burst", "32kbit", "latency", "400ms")  # fmt: skip
    sync = subprocess.Popen(
        a.exec_args(str(SNAPCTL), "-d", str(a.disk), "standby", "sync", *K),
        env=a.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def receiving() -> bool:
            cp = b.snapctl("receive", "--resume-token", check=False)
            return cp.returncode == 0 and token_records(cp.stdout.strip()) > 64

        wait_for(receiving, "B to commit progress of the receive", timeout=60)
        b.server.kill()
        out, err = sync.communicate(timeout=90)
    finally:
        if sync.poll() is None:
            sync.kill()
            sync.wait()
    assert sync.returncode != 0, f"the cut sync succeeded?\n{out}{err}"
    a.run("tc", "qdisc", "del", "dev", a.iface, "root")

    b.start()
    serve(b, key)
    same(image(b.server), at_common, "B's live after the cut")
    assert snap_names(b) == [common]
    # The next sync must go through by itself (resuming, or starting over). Should it be
    # refused, the remedy its message names is applied so the rest is still checked, and the
    # test fails at the end.
    problems = []
    cp = a.snapctl("standby", "sync", "--json", *K, check=False)
    if cp.returncode != 0:
        problems.append(f"the first sync after the cut was refused:\n{show(cp)}")
        same(image(b.server), at_common, "B's live after the refused sync")
        sc(b, "receive", "--abort")
        cp = sc(a, "standby", "sync", "--json", *K)
    r = json.loads(cp.stdout)
    assert r["base"] == common, r
    newest = r["snapshot"]
    same(image(b.server, f"live@{newest}"), want_live, "the standby after the next sync")
    same(image(a.server, f"live@{newest}"), want_live, "the primary's snapshot")
    same(image(b.server), want_live, "B's live after the next sync")
    assert snap_names(a) == snap_names(b) == [newest]
    for h in (a, b):
        sc(h, "check")
    assert not problems, "\n".join(problems)


# === refusals =====================================================================================


def pool_state(h: Host) -> dict[str, Any]:
    """What must not change: snapshots, role, peer, exports' data, the disk's bytes."""
    st = role(h)
    for k in ("lag_seconds",):
        st.pop(k)
    return {
        "list": sj(h, "list"),
        "status": st,
        "live": image(h.server),
        "disk": hashlib.sha256(h.disk.read_bytes()).hexdigest(),
    }


@pytest.mark.engine_log(READ_ONLY_REQUEST)
def test_wrong_key_is_refused(net: TwoHosts, key: Path, tmp_path: Path) -> None:
    a, b = net.a, net.b
    K = ("--key-file", str(key))
    other = make_key(tmp_path / "other.psk")
    W = ("--key-file", str(other))
    rng = random.Random("t10-key")
    boot(a, key)
    boot(b, key)
    write_range(a.server, 0, rng.randbytes(2 * MIB))
    sj(a, "standby", "attach", b.endpoint, *K)
    write_blocks(a.server, [100, 200], rng)
    time.sleep(1.5)  # let the servers' periodic commit run before the disks are hashed
    before = {h.label: pool_state(h) for h in (a, b)}

    cp = sc(a, "standby", "attach", b.endpoint, *W, rc=EXIT_REFUSED)
    error_line(cp, "replication key")
    cp = sc(a, "standby", "sync", *W, rc=EXIT_REFUSED)
    error_line(cp, "replication key")
    # An unauthenticated client that guesses at the handshake and then sends a request.
    probe = (
        "import os, socket\n"
        f"s = socket.create_connection(('{b.addr}', {b.endpoint.split(':')[1]}), timeout=10)\n"
        "try:\n"
        "    s.sendall(os.urandom(32)); s.recv(64); s.sendall(os.urandom(32))\n"
        "    s.sendall(b'\\x10\\0\\0\\0' + bytes(8) + b'{\"op\": \"status\"}' + bytes(32))\n"
        "    print(repr(s.recv(100)) if s.recv(1, socket.MSG_PEEK) else 'closed')\n"
        "except (ConnectionResetError, BrokenPipeError):\n"
        "    print('closed')\n"
    )
    out = a.run(sys.executable, "-c", probe).stdout.strip()
    assert out == "closed", f"the endpoint answered an unauthenticated client: {out}"
    time.sleep(1.5)
    after = {h.label: pool_state(h) for h in (a, b)}
    for h in ("a", "b"):
        for k in before[h]:
            assert after[h][k] == before[h][k], f"{h}: {k} changed after refused connections"
    # The standby given the wrong key must not take the primary's refusal for its death: the
    # primary answered (it just could not authenticate the caller), so promoting would make two
    # primaries.
    cp = sc(b, "standby", "promote", *W, rc=EXIT_REFUSED)
    error_line(cp)
    assert role(b)["role"] == "standby"
    assert_read_only(b.server, "the standby after a promote with the wrong key")
    assert sj(a, "standby", "sync", *K)["base"] == before["a"]["status"]["last_common"]


def test_corrupted_record_is_refused_and_abort_restores(
    pair: tuple[NbdkitServer, NbdkitServer], tmp_path: Path
) -> None:
    src, dst = pair
    rng = random.Random("t10-corrupt")
    write_range(src, 0, rng.randbytes(6 * MIB))
    src.snapctl("create", "s1")
    full = tmp_path / "s1.stream"
    src.snapctl("send", "s1", "-o", str(full))
    dst.snapctl("receive", "-i", str(full))
    base = image(dst)
    listed = snapshots(dst)
    write_blocks(src, scattered(rng, 200), rng)
    src.snapctl("create", "s2")
    stream = tmp_path / "s2.stream"
    src.snapctl("send", "--from", "s1", "s2", "-o", str(stream))
    data = bytearray(stream.read_bytes())
    recs = records(bytes(data))
    victim = recs[150]
    assert victim.rtype == REC_DATA
    data[victim.offset + STREAM_HEADER.size + DATA_HEAD.size + 1000] ^= 0x40
    bad = tmp_path / "flipped.stream"
    bad.write_bytes(bytes(data))

    cp = dst.snapctl("receive", "-i", str(bad), check=False)
    assert cp.returncode != 0
    error_line(cp, "stopped at record 150", "checksum")
    assert snapshots(dst) == listed
    same(image(dst), base, "live after the corrupted record")
    token = dst.snapctl("receive", "--resume-token").stdout.strip()
    assert token_records(token) == 150  # records 1..149 are kept
    assert "discarded" in dst.snapctl("receive", "--abort").stdout
    same(image(dst), base, "live after receive --abort")
    diff = json.loads(dst.snapctl("diff", "s1", "--json").stdout)
    assert diff["changed_bytes"] == 0, f"live differs from s1 after --abort: {diff}"
    assert snapshots(dst) == listed
    assert dst.snapctl("receive", "--resume-token", check=False).returncode != 0
    dst.snapctl("check")
    # The intact stream is then received whole.
    dst.snapctl("receive", "-i", str(stream))
    same(image(dst), image(src, "live@s2"), "the intact stream after the abort")


def test_wrong_base_and_order_and_mac_are_refused(
    pair: tuple[NbdkitServer, NbdkitServer], tmp_path: Path
) -> None:
    src, dst = pair
    rng = random.Random("t10-base")
    key = make_key(tmp_path / "k.psk")
    other = make_key(tmp_path / "other.psk")
    write_range(src, 0, rng.randbytes(2 * MIB))
    for name in ("s1", "s2", "s3"):
        write_blocks(src, scattered(rng, 8, 64, 512), rng)
        src.snapctl("create", name)
    f1, f12, f13, f23 = (tmp_path / f"{n}.stream" for n in ("s1", "s12", "s13", "s23"))
    src.snapctl("send", "s1", "-o", str(f1))
    src.snapctl("send", "--from", "s1", "s2", "-o", str(f12), "--key-file", str(key))
    src.snapctl("send", "--from", "s1", "s3", "-o", str(f13))
    src.snapctl("send", "--from", "s2", "s3", "-o", str(f23))
    dst.snapctl("receive", "-i", str(f1))

    def unchanged(what: str, names: list[str]) -> None:
        assert [s["name"] for s in json.loads(dst.snapctl("list", "--json").stdout)] == names
        same(image(dst), image(src, f"live@{names[-1]}"), what)
        assert dst.snapctl("receive", "--resume-token", check=False).returncode != 0, what

    # A stream whose base this pool does not have.
    cp = dst.snapctl("receive", "-i", str(f23), check=False)
    error_line(cp, "base snapshot 's2'", "not in this pool")
    unchanged("after a stream on a missing base", ["s1"])
    # A MAC'd stream: without the key, and with another key.
    cp = dst.snapctl("receive", "-i", str(f12), "--key-file", str(other), check=False)
    assert cp.returncode != 0, show(cp)
    error_line(cp)
    dst.snapctl("receive", "--abort", check=False)
    unchanged("after a stream with another key", ["s1"])
    dst.snapctl("receive", "-i", str(f12), "--key-file", str(key))
    unchanged("after s1->s2", ["s1", "s2"])
    # The stream's base s1 is not the target's newest snapshot (s2).
    cp = dst.snapctl("receive", "-i", str(f13), check=False)
    error_line(cp, "not the newest snapshot")
    unchanged("after a stream on an older base", ["s1", "s2"])
    # Records out of order: two DATA records swapped.
    data = f23.read_bytes()
    recs = records(data)
    r1, r2 = recs[2], recs[3]
    swapped = (
        data[: r1.offset]
        + data[r2.offset : r2.offset + r2.size]
        + data[r1.offset : r1.offset + r1.size]
        + data[r2.offset + r2.size :]
    )
    (tmp_path / "swapped.stream").write_bytes(swapped)
    cp = dst.snapctl("receive", "-i", str(tmp_path / "swapped.stream"), check=False)
    error_line(cp, "out of order")
    same(image(dst), image(src, "live@s2"), "live after an out-of-order stream")
    dst.snapctl("receive", "--abort")
    unchanged("after aborting the out-of-order stream", ["s1", "s2"])
    dst.snapctl("receive", "-i", str(f23))
    unchanged("after s2->s3", ["s1", "s2", "s3"])
    dst.snapctl("check")


# === figures: stream size versus the change; sync throughput across the namespaces ================


def test_stream_size_and_sync_throughput(
    net: TwoHosts, key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = net.a, net.b
    K = ("--key-file", str(key))
    rng = random.Random("t10-figures")
    size = 256 * MIB  # room for a sync of 128 MiB
    boot(a, key, size=str(size))
    boot(b, key, size=str(size))
    figures: dict[str, Any] = {"volume_bytes": size, "block_size": BS}

    def stream_of(frm: str, to: str) -> dict[str, Any]:
        """`send -n`'s estimate and the size of the real stream file."""
        est = sj(a, "send", "-n", "--from", frm, to)
        path = tmp_path / f"{frm}-{to}.stream"
        sc(a, "send", "--from", frm, to, "-o", str(path))
        return {**est, "file_bytes": path.stat().st_size}

    def ratio(fig: dict[str, Any]) -> None:
        fig["stream_per_changed_byte"] = round(fig["file_bytes"] / fig["changed_bytes"], 3)

    # Initial contents: 32 MiB of data, sent whole by attach.
    initial = rng.randbytes(32 * MIB)
    write_range(a.server, 0, initial)
    t0 = time.monotonic()
    r = sj(a, "standby", "attach", b.endpoint, *K)
    figures["attach_full"] = {"data_bytes": len(initial), "wall_seconds": time.monotonic() - t0}

    sc(a, "create", "m0")
    # 1% of the volume rewritten as whole blocks, scattered.
    nblk = size // 100 // BS  # 40 blocks
    changed = write_blocks(a.server, scattered(rng, nblk, 0, size // BS), rng)
    sc(a, "create", "m1")
    s = stream_of("m0", "m1")
    figures["one_percent_whole_blocks"] = {"changed_bytes": changed, **s}
    ratio(figures["one_percent_whole_blocks"])
    assert s["data_bytes"] == changed
    assert changed <= s["file_bytes"] <= changed + 4 * KIB + 64 * s["records"]
    # 1% of the volume's bytes, as 4 KiB writes in distinct blocks: a stream carries blocks.
    n4k = size // 100 // (4 * KIB)  # 655 writes
    changed4k = write_blocks(a.server, scattered(rng, n4k, 0, size // BS), rng, 4 * KIB)
    sc(a, "create", "m2")
    s = stream_of("m1", "m2")
    figures["one_percent_as_4k_writes"] = {"changed_bytes": changed4k, **s}
    ratio(figures["one_percent_as_4k_writes"])
    assert s["data_bytes"] == n4k * BS
    # An unchanged snapshot: a tiny stream.
    sc(a, "create", "m3")
    s = stream_of("m2", "m3")
    figures["unchanged"] = {"changed_bytes": 0, **s}
    assert s["file_bytes"] < 2 * KIB and s["data_bytes"] == 0
    # 16 MiB trimmed: it travels as holes.
    h = a.server.connect()
    try:
        h.trim(16 * MIB, 8 * MIB)
        h.flush()
    finally:
        close(h)
    sc(a, "create", "m4")
    s = stream_of("m3", "m4")
    figures["trim_16MiB"] = {"trimmed_bytes": 16 * MIB, **s}
    assert s["data_bytes"] == 0 and s["hole_blocks"] == 16 * MIB // BS
    assert s["file_bytes"] < 2 * KIB

    # Sync throughput: N MiB changed (contiguous), one sync across the veth pair; three rounds
    # of each size, the median reported. `seconds` is the server's time from the stream's
    # first byte to the standby's acknowledgement; wall adds snapctl's own start and the
    # snapshot.
    for n in (8, 32, 128):
        rounds = []
        for _ in range(3):
            off = rng.randrange(0, (size - n * MIB) // BS) * BS
            write_range(a.server, off, rng.randbytes(n * MIB))
            t0 = time.monotonic()
            r = sj(a, "standby", "sync", *K)
            rounds.append((r["seconds"], time.monotonic() - t0))
        server_s = sorted(x for x, _ in rounds)[1]
        wall_s = sorted(w for _, w in rounds)[1]
        figures[f"sync_{n}MiB"] = {
            "changed_bytes": n * MIB,
            "server_seconds": [x for x, _ in rounds],
            "wall_seconds": [round(w, 3) for _, w in rounds],
            "median_MB_per_s_server": round(n * MIB / 1e6 / max(server_s, 1e-6), 1),
            "median_MB_per_s_wall": round(n * MIB / 1e6 / wall_s, 1),
        }
        same(image(b.server), image(a.server, f"live@{r['snapshot']}"), f"the {n} MiB syncs")
    # A 1% change (whole blocks, scattered) synced over the wire.
    write_blocks(a.server, scattered(rng, nblk, 0, size // BS), rng)
    t0 = time.monotonic()
    r = sj(a, "standby", "sync", *K)
    figures["sync_one_percent"] = {
        "changed_bytes": nblk * BS,
        "server_seconds": r["seconds"],
        "wall_seconds": round(time.monotonic() - t0, 3),
    }
    same(image(b.server), image(a.server), "after the 1% sync")
    figures["attach_full"]["wall_seconds"] = round(figures["attach_full"]["wall_seconds"], 3)
    publish("t10-figures.json", json.dumps(figures, indent=2) + "\n", tmp_path, capsys)

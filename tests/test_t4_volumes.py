"""Several volumes, group and subset snapshots, writable snapshots and clones through a real
nbdkit (issue 8), with libnbd clients, the control socket and snapctl.

Each test keeps a model (one bytearray per export) and compares whole exports with it. Covered:
per-volume isolation; `nbdinfo --list` (every volume, VOL@SNAP only where SNAP covers VOL,
VOL@latest); a group snapshot taken while a client writes a counter to two volumes is one point
in time; a writable snapshot exported read-write; clones (read-through, divergence, surviving
the origin's other snapshots, refusal to delete the origin snapshot, flatten, promote); volume
resize; restart and kill -9 after flush; snapctl's exit codes for the volume commands.
"""

from __future__ import annotations

import errno
import json
import random
import struct
import subprocess
import threading
import time
from pathlib import Path

import nbd
import pytest
from harness import NbdkitServer, require, run_snapctl
from support.logcheck import NO_SUCH_SNAPSHOT, NO_SUCH_VOLUME
from support.nbdclose import disconnect

from fsimpl.checker import check
from fsimpl.client import SocketClient
from fsimpl.device import Device

BS = 4096
KIB = 1024
LIVE = 1 << 20
PARAMS = {"block-size": str(BS)}


# --- helpers ---------------------------------------------------------------------------------


close = disconnect  # (support.nbdclose)


def read_all(h: nbd.NBD) -> bytes:
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, 1 << 20):
        out += h.pread(min(1 << 20, size - off), off)
    return bytes(out)


def assert_same(actual: bytes, expected: bytes | bytearray, what: str) -> None:
    """Compare two whole exports; on a mismatch say where, never dump the data."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} bytes, want {len(expected)}"
    if actual == expected:
        return
    first = next(i for i in range(len(actual)) if actual[i] != expected[i])
    pytest.fail(
        f"{what}: differs first at offset {first} (block {first // BS}); read "
        f"{actual[first : first + 16].hex()} want {bytes(expected[first : first + 16]).hex()}"
    )


def verify(srv: NbdkitServer, model: dict[str, bytearray], why: str) -> None:
    """Every export of the model reads exactly its bytes."""
    for export, want in model.items():
        h = srv.connect(export)
        try:
            assert_same(read_all(h), want, f"{why}: {export}")
        finally:
            close(h)


def expect_errno(code: int, what: str, fn, *args) -> None:  # noqa: ANN001
    with pytest.raises(nbd.Error) as ei:
        fn(*args)
    got = ei.value.errno
    got = errno.errorcode.get(got, str(got)) if isinstance(got, int) else str(got)
    assert got == errno.errorcode[code], f"{what}: got {got} ({ei.value.string})"


def nbdinfo_list(srv: NbdkitServer) -> dict[str, dict[str, object]]:
    cp = subprocess.run(
        [require("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={srv.sock}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cp.returncode == 0, f"nbdinfo --list failed: {cp.stderr}"
    return {e["export-name"]: e for e in json.loads(cp.stdout)["exports"]}


def volumes(srv: NbdkitServer) -> dict[str, dict[str, object]]:
    return {v["name"]: v for v in json.loads(srv.snapctl("volume", "list", "--json").stdout)}


def snapshots(srv: NbdkitServer) -> dict[str, list[str]]:
    return {
        s["name"]: sorted(s["volumes"]) for s in json.loads(srv.snapctl("list", "--json").stdout)
    }


def checker_clean(path: Path) -> None:
    dev = Device(str(path), readonly=True)
    try:
        report = check(dev)
    finally:
        dev.close()
    assert report.clean, "checker found: " + "; ".join(d.message for d in report.defects[:5])


class Writer:
    """One connection per export, writes mirrored into the model."""

    def __init__(self, srv: NbdkitServer, model: dict[str, bytearray], rng: random.Random) -> None:
        self.srv = srv
        self.model = model
        self.rng = rng
        self.handles: dict[str, nbd.NBD] = {}

    def h(self, export: str) -> nbd.NBD:
        if export not in self.handles:
            self.handles[export] = self.srv.connect(export)
        return self.handles[export]

    def write(self, export: str, off: int, data: bytes) -> None:
        self.h(export).pwrite(data, off)
        self.model[export][off : off + len(data)] = data

    def scatter(self, export: str, count: int, max_len: int = 3 * BS) -> None:
        size = len(self.model[export])
        for _ in range(count):
            off = self.rng.randrange(0, size - 1)
            n = self.rng.randrange(1, min(max_len, size - off) + 1)
            self.write(export, off, self.rng.randbytes(n))

    def trim(self, export: str, off: int, n: int) -> None:
        self.h(export).trim(n, off)
        first, end = -(-off // BS) * BS, (off + n) // BS * BS
        if end > first:
            self.model[export][first:end] = bytes(end - first)

    def zero(self, export: str, off: int, n: int) -> None:
        self.h(export).zero(n, off)
        self.model[export][off : off + n] = bytes(n)

    def flush(self) -> None:
        for h in self.handles.values():
            h.flush()

    def drop(self, export: str | None = None) -> None:
        for name in [export] if export else list(self.handles):
            h = self.handles.pop(name, None)
            if h is not None:
                close(h)


def start(servers, cow: str = "move", threads: str = "serialize") -> NbdkitServer:  # noqa: ANN001
    return servers(size=str(LIVE), cow=cow, params={**PARAMS, "threads": threads}).start()


# --- isolation and listing -------------------------------------------------------------------


@pytest.mark.engine_log(NO_SUCH_SNAPSHOT, NO_SUCH_VOLUME, r"snapshot '[^']*' does not cover volume")
def test_volumes_are_isolated_and_listed(servers) -> None:  # noqa: ANN001
    srv = start(servers)
    srv.snapctl("volume", "create", "a", "--size", "512K")
    srv.snapctl("volume", "create", "b", "--size", "768K")
    vols = volumes(srv)
    assert {n: v["size_bytes"] for n, v in vols.items()} == {
        "live": LIVE,
        "a": 512 * KIB,
        "b": 768 * KIB,
    }
    model = {"live": bytearray(LIVE), "a": bytearray(512 * KIB), "b": bytearray(768 * KIB)}
    w = Writer(srv, model, random.Random("isolation"))
    # Interleaved writes, trims and zeroes at the same offsets of every volume.
    for i in range(60):
        for export in ("live", "a", "b"):
            off = (i * 7919) % (len(model[export]) - 3 * BS)
            w.write(export, off, bytes([ord(export[0]) + i % 7]) * (BS + i * 13))
    w.scatter("a", 40)
    w.trim("a", 0, 64 * KIB)
    w.zero("b", 10 * KIB, 30 * KIB)
    w.flush()
    verify(srv, model, "after interleaved writes")
    for export in ("live", "a", "b"):  # sizes are per volume
        assert w.h(export).get_size() == len(model[export])

    srv.snapctl("create", "g1")  # every volume, one point in time
    srv.snapctl("create", "sub", "--volume", "a", "--volume", "b")
    srv.snapctl("create", "lonly", "--volume", "live")
    assert snapshots(srv) == {"g1": ["a", "b", "live"], "sub": ["a", "b"], "lonly": ["live"]}
    expect = {
        "live",
        "a",
        "b",
        "live@g1",
        "a@g1",
        "b@g1",
        "a@sub",
        "b@sub",
        "live@lonly",
        "live@latest",
        "a@latest",
        "b@latest",
    }
    ex = nbdinfo_list(srv)
    assert set(ex) == expect, sorted(ex)
    for name, e in ex.items():
        vol = name.split("@")[0]
        assert e["export-size"] == len(model[vol]), name
        assert e["is_read_only"] == ("@" in name), name
        assert e.get("description"), f"{name} has no description"
    assert "lonly" in str(ex["live@latest"]["description"])
    assert "sub" in str(ex["a@latest"]["description"])
    assert "sub" in str(ex["b@latest"]["description"])
    for bad in ("live@sub", "a@lonly", "b@lonly", "nosuch", "nosuch@g1", "a@nosuch"):
        with pytest.raises(nbd.Error):
            srv.connect(bad)

    frozen = {f"{v}@g1": bytearray(model[v]) for v in ("live", "a", "b")}
    frozen.update({f"{v}@sub": bytearray(model[v]) for v in ("a", "b")})
    frozen["live@lonly"] = bytearray(model["live"])
    w.scatter("a", 30)
    w.scatter("b", 30)
    w.scatter("live", 30)
    w.flush()
    verify(srv, {**model, **frozen}, "after writes that follow the snapshots")
    w.drop()

    # A volume created now is in no existing snapshot; a snapshot of it alone is listed.
    srv.snapctl("volume", "create", "late", "--size", "64K")
    ex = nbdinfo_list(srv)
    assert "late" in ex and not any(n.startswith("late@") for n in ex), sorted(ex)
    srv.snapctl("create", "g2")
    assert set(nbdinfo_list(srv)) == expect | {
        "late",
        "late@g2",
        "late@latest",
        "live@g2",
        "a@g2",
        "b@g2",
    }
    # and a deleted volume disappears from the list with its snapshots' views of it
    srv.snapctl("volume", "delete", "b", "--recursive")
    ex = nbdinfo_list(srv)
    assert not any(n.split("@")[0] == "b" for n in ex), sorted(ex)
    assert snapshots(srv) == {
        "g1": ["a", "live"],
        "sub": ["a"],
        "lonly": ["live"],
        "g2": ["a", "late", "live"],
    }
    del model["b"]
    for k in [k for k in frozen if k.startswith("b@")]:
        del frozen[k]
    verify(srv, {**model, **frozen}, "after deleting volume b")
    srv.stop()
    checker_clean(srv.disk)


# --- a group snapshot is one point in time ---------------------------------------------------


@pytest.mark.parametrize("threads", ["serialize", "parallel"])
def test_group_snapshot_is_one_point_in_time(servers, threads: str) -> None:  # noqa: ANN001
    """A writer does, in lockstep on two connections, write counter k to volume live, then k
    to volume b; meanwhile snapshots are taken through the control socket, of every volume
    and of exactly those two (--volume live --volume b). In every snapshot live - b is 0 or 1:
    a snapshot that caught the volumes at different moments would show other gaps."""
    srv = start(servers, threads=threads)
    srv.snapctl("volume", "create", "b", "--size", "256K")
    ha, hb = srv.connect("live"), srv.connect("b")
    stop = threading.Event()
    written = [0]
    errors: list[BaseException] = []

    def block(k: int) -> bytes:
        return struct.pack("<Q", k) * (BS // 8)

    def writer() -> None:
        try:
            k = 0
            while not stop.is_set():
                k += 1
                ha.pwrite(block(k), 0)
                hb.pwrite(block(k), 0)
                written[0] = k
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    names: list[str] = []
    rng = random.Random(threads)
    try:
        with SocketClient(str(srv.control), timeout=30) as ctl:
            while written[0] < 5 and t.is_alive():
                time.sleep(0.001)
            for i in range(40):
                name = f"g{i}"
                args = {"name": name}
                if i % 2:
                    args["volumes"] = ["live", "b"]
                ctl.call("create", args)
                names.append(name)
                time.sleep(rng.uniform(0, 0.01))
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive(), "the writer did not stop"
    assert not errors, f"the writer failed: {errors[0]!r}"
    close(ha)
    close(hb)

    seen: list[tuple[int, int]] = []
    for name in names:
        pair = []
        for vol in ("live", "b"):
            h = srv.connect(f"{vol}@{name}")
            data = h.pread(BS, 0)
            close(h)
            assert data == data[:8] * (BS // 8), f"{vol}@{name}: a torn block"
            pair.append(struct.unpack("<Q", data[:8])[0])
        seen.append((pair[0], pair[1]))
    gaps = [(n, a, b) for n, (a, b) in zip(names, seen, strict=True) if a - b not in (0, 1)]
    assert not gaps, f"snapshots that are not one point in time (name, live, b): {gaps}"
    values = [a for a, _ in seen]
    assert values == sorted(values), f"snapshots went back in time: {values}"
    assert len(set(values)) > 10, f"the writer hardly ran during the snapshots: {seen}"
    srv.stop()
    checker_clean(srv.disk)


# --- writable snapshots ----------------------------------------------------------------------


@pytest.mark.engine_log(r"export live@s2 is read-only \(a snapshot")
@pytest.mark.parametrize("cow", ["move", "copy"])
def test_writable_snapshot_is_exported_read_write(servers, cow: str) -> None:  # noqa: ANN001
    srv = start(servers, cow)
    model = {"live": bytearray(LIVE)}
    w = Writer(srv, model, random.Random(f"writable-{cow}"))
    w.scatter("live", 80)
    w.flush()
    srv.snapctl("create", "s1")
    model["live@s1"] = bytearray(model["live"])
    w.scatter("live", 40)
    w.flush()
    srv.snapctl("create", "s2", "--writable")
    model["live@s2"] = bytearray(model["live"])
    w.scatter("live", 40)
    w.flush()
    srv.snapctl("create", "s3")
    model["live@s3"] = bytearray(model["live"])
    w.scatter("live", 20)
    w.flush()

    ex = nbdinfo_list(srv)
    assert ex["live@s2"]["is_read_only"] is False, ex["live@s2"]
    assert "read-write" in str(ex["live@s2"]["description"])
    assert ex["live@s1"]["is_read_only"] is True and ex["live@s3"]["is_read_only"] is True

    # Writes, trims and zeroes into live@s2, through its own connection.
    h2 = w.h("live@s2")
    assert not h2.is_read_only()
    w.scatter("live@s2", 60)
    w.trim("live@s2", 8 * BS, 16 * BS)
    w.zero("live@s2", 100 * BS + 17, 3 * BS)
    w.write("live@s2", 200 * BS - 5, b"fua write" * 100)
    h2.pwrite(b"F" * 3000, 50 * BS + 7, nbd.CMD_FLAG_FUA)
    model["live@s2"][50 * BS + 7 : 50 * BS + 7 + 3000] = b"F" * 3000
    w.flush()
    verify(srv, model, "after writing into live@s2")  # s1, s3 and live unchanged
    # and more live writes after it: s2 keeps its own data
    w.scatter("live", 30)
    w.flush()
    verify(srv, model, "after live writes that follow")

    # A read-only snapshot refuses writes; the live@latest of a writable newest snapshot is
    # its own export name, but s3 is the newest here.
    h1 = w.h("live@s1")
    assert h1.is_read_only()
    expect_errno(errno.EPERM, "write to live@s1", h1.pwrite, b"x", 0)
    w.drop("live@s1")

    # writable=off: new connections are read-only; the open one gets EPERM per request.
    srv.snapctl("set", "s2", "writable=off")
    expect_errno(errno.EPERM, "open live@s2 after writable=off", h2.pwrite, b"y" * 10, 0)
    w.drop("live@s2")
    h = srv.connect("live@s2")
    assert h.is_read_only()
    close(h)
    assert nbdinfo_list(srv)["live@s2"]["is_read_only"] is True
    verify(srv, model, "after writable=off")

    # writable=on of an older snapshot: writing s1 keeps s2, s3 and live as they are.
    srv.snapctl("set", "s1", "writable=on")
    w.scatter("live@s1", 40)
    w.trim("live@s1", 0, 32 * BS)
    w.flush()
    verify(srv, model, "after writing into live@s1")
    w.drop()
    srv.stop()
    checker_clean(srv.disk)


# --- clones ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_clone_lifecycle(servers, cow: str) -> None:  # noqa: ANN001
    srv = start(servers, cow)
    model = {"live": bytearray(LIVE)}
    w = Writer(srv, model, random.Random(f"clone-{cow}"))
    snaps: dict[str, bytearray] = {}
    for name in ("s1", "s2", "s3"):
        w.scatter("live", 50)
        w.flush()
        srv.snapctl("create", name)
        snaps[name] = bytearray(model["live"])
    w.scatter("live", 30)
    w.flush()
    for name, data in snaps.items():
        model[f"live@{name}"] = data

    srv.snapctl("clone", "live@s2", "c")
    model["c"] = bytearray(snaps["s2"])
    assert volumes(srv)["c"]["origin"] == "live@s2"
    assert "c" in volumes(srv)["live"]["clones"]
    assert "c" in nbdinfo_list(srv)
    verify(srv, model, "a new clone reads its origin")  # read-through

    w.scatter("c", 60)
    w.trim("c", 16 * BS, 32 * BS)
    w.zero("c", 70 * BS + 100, 2 * BS)
    w.scatter("live", 30)
    w.flush()
    verify(srv, model, "clone and live diverge")

    # The origin's other snapshots may go; the clone and live@s2 stay as they are.
    srv.snapctl("delete", "s1")
    srv.snapctl("delete", "s3")
    del model["live@s1"], model["live@s3"]
    verify(srv, model, "after deleting the origin's other snapshots")

    # The origin snapshot itself is refused while the clone needs it, naming the clone.
    cp = srv.snapctl("delete", "s2", check=False)
    assert cp.returncode == 4, cp.stdout + cp.stderr
    assert "c" in cp.stderr.split(":", 1)[1] and "flatten" in cp.stderr, cp.stderr
    verify(srv, model, "after the refused delete")

    # A snapshot of the clone, then flatten (online, with the clone connected): s2 may go.
    srv.snapctl("create", "t1", "--volume", "c")
    model["c@t1"] = bytearray(model["c"])
    w.scatter("c", 20)
    w.flush()
    srv.snapctl("flatten", "c")
    assert volumes(srv)["c"]["origin"] is None
    w.scatter("c", 20)
    w.flush()
    verify(srv, model, "after flatten")
    srv.snapctl("delete", "s2")
    del model["live@s2"]
    verify(srv, model, "after deleting the former origin snapshot")

    # promote: a clone of another volume's snapshot; afterwards the origin volume may go.
    srv.snapctl("volume", "create", "o", "--size", "256K")
    model["o"] = bytearray(256 * KIB)
    w.scatter("o", 40)
    w.flush()
    srv.snapctl("create", "os", "--volume", "o")
    srv.snapctl("clone", "o@os", "p")
    model["p"] = bytearray(model["o"])
    w.scatter("p", 20)
    w.scatter("o", 20)
    w.flush()
    cp = srv.snapctl("volume", "delete", "o", check=False)  # it has a snapshot and a clone
    assert cp.returncode == 4, cp.stdout + cp.stderr
    verify(srv, model, "before promote")
    srv.snapctl("promote", "p")
    assert volumes(srv)["p"]["origin"] is None
    w.drop()
    srv.snapctl("volume", "delete", "o", "--recursive")
    del model["o"]
    assert set(volumes(srv)) == {"live", "c", "p"}
    verify(srv, model, "after promote and deleting the origin volume")
    srv.stop()
    checker_clean(srv.disk)


# --- resize ----------------------------------------------------------------------------------


def test_volume_resize(servers) -> None:  # noqa: ANN001
    srv = start(servers)
    srv.snapctl("volume", "create", "v", "--size", "256K")
    model = {"v": bytearray(256 * KIB)}
    w = Writer(srv, model, random.Random("resize"))
    w.write("v", 256 * KIB - 5000, b"tail" * 1250)
    w.write("v", 0, b"head" * 1000)
    w.flush()
    old = w.h("v")
    srv.snapctl("create", "before")
    model["v@before"] = bytearray(model["v"])

    srv.snapctl("volume", "resize", "v", "512K")
    assert volumes(srv)["v"]["size_bytes"] == 512 * KIB
    assert old.get_size() == 256 * KIB  # a connection keeps the size it opened with
    model["v"].extend(bytes(256 * KIB))
    w.drop()
    verify(srv, model, "after growing v")  # new space reads zeros; the snapshot keeps 256K
    assert nbdinfo_list(srv)["v"]["export-size"] == 512 * KIB
    w.write("v", 512 * KIB - 100, b"z" * 100)
    w.flush()

    # Shrinking: refused without --force, and with --force while data lies past the end.
    for args in (("512K",), ("128K",), ("128K", "--force")):
        cp = srv.snapctl("volume", "resize", "v", *args, check=False)
        if args == ("512K",):
            assert cp.returncode == 0, cp.stderr  # same size: nothing to do
            continue
        assert cp.returncode == 4, (args, cp.stdout, cp.stderr)
    cp = srv.snapctl("volume", "resize", "v", "128K", "--force", check=False)
    assert "offset" in cp.stderr and "trim" in cp.stderr, cp.stderr
    verify(srv, model, "after refused shrinks")
    # Trim everything past 128K, then the shrink goes through; growing again shows zeros.
    w.trim("v", 128 * KIB, 384 * KIB)
    w.flush()
    w.drop()
    srv.snapctl("volume", "resize", "v", "128K", "--force")
    del model["v"][128 * KIB :]
    verify(srv, model, "after the shrink")
    srv.snapctl("volume", "resize", "v", "300K")
    model["v"].extend(bytes(300 * KIB - 128 * KIB))
    verify(srv, model, "after growing again")
    srv.stop()
    checker_clean(srv.disk)


# --- restart and kill -9 ---------------------------------------------------------------------


@pytest.mark.parametrize("cow", ["move", "copy"])
def test_restart_and_kill9_keep_volumes_clones_and_writable_data(servers, cow: str) -> None:  # noqa: ANN001
    srv = start(servers, cow)
    srv.snapctl("volume", "create", "a", "--size", "512K")
    srv.snapctl("volume", "create", "b", "--size", "300K")
    model = {"live": bytearray(LIVE), "a": bytearray(512 * KIB), "b": bytearray(300 * KIB)}
    w = Writer(srv, model, random.Random(f"restart-{cow}"))
    for v in ("live", "a", "b"):
        w.scatter(v, 40)
    w.flush()
    srv.snapctl("create", "g")
    for v in ("live", "a", "b"):
        model[f"{v}@g"] = bytearray(model[v])
        w.scatter(v, 20)
    w.flush()
    srv.snapctl("create", "w", "--writable", "--volume", "a")
    model["a@w"] = bytearray(model["a"])
    w.scatter("a", 20)
    w.scatter("a@w", 30)
    w.trim("a@w", 4 * BS, 8 * BS)
    srv.snapctl("clone", "b@g", "c")
    model["c"] = bytearray(model["b@g"])
    w.scatter("c", 30)
    w.flush()
    srv.snapctl("create", "t", "--volume", "c")
    model["c@t"] = bytearray(model["c"])
    w.scatter("c", 20)
    w.scatter("b", 20)
    w.flush()
    verify(srv, model, "before the crash")

    def state() -> tuple[object, ...]:
        vols = {n: (v["size_bytes"], v["origin"]) for n, v in volumes(srv).items()}
        ex = {n: e["is_read_only"] for n, e in nbdinfo_list(srv).items()}
        return vols, snapshots(srv), ex

    before = state()
    assert before[1] == {"g": ["a", "b", "live"], "w": ["a"], "t": ["c"]}
    assert before[2]["a@w"] is False

    w.drop()
    srv.kill()  # kill -9 after the flushes
    srv.start()
    assert state() == before
    verify(srv, model, "after kill -9")
    # still fully working: write into the writable snapshot and the clone, flush, kill again
    w.scatter("a@w", 10)
    w.scatter("c", 10)
    w.flush()
    w.drop()
    srv.kill()
    srv.start()
    verify(srv, model, "after the second kill -9")
    srv.restart()
    assert state() == before
    verify(srv, model, "after a clean restart")
    # the clone can still be flattened and its origin snapshot deleted afterwards
    srv.snapctl("flatten", "c")
    srv.snapctl("delete", "g")
    for v in ("live", "a", "b"):
        del model[f"{v}@g"]
    verify(srv, model, "after flatten and deleting the origin snapshot")
    srv.kill()
    srv.start()
    verify(srv, model, "after flatten and kill -9")
    srv.stop()
    checker_clean(srv.disk)


# --- snapctl exit codes ----------------------------------------------------------------------


def test_volume_commands_exit_codes(servers) -> None:  # noqa: ANN001
    srv = start(servers)

    def rc(*args: str) -> subprocess.CompletedProcess[str]:
        cp = srv.snapctl(*args, check=False)
        assert "Traceback" not in cp.stderr, cp.stderr
        return cp

    def expect(code: int, *args: str) -> str:
        cp = rc(*args)
        assert cp.returncode == code, (
            f"snapctl {' '.join(args)} -> {cp.returncode}, want {code}:\n{cp.stdout}{cp.stderr}"
        )
        if code:
            assert cp.stderr.startswith("snapctl"), cp.stderr
        return cp.stdout + cp.stderr

    out = expect(0, "volume", "create", "a", "--size", "1M")
    assert "a" in out
    expect(4, "volume", "create", "a", "--size", "1M")  # duplicate volume
    expect(4, "volume", "create", "live", "--size", "1M")
    expect(2, "volume", "create", "bad/name", "--size", "1M")
    expect(2, "volume", "create", "z", "--size", "0")
    expect(2, "volume", "create", "z")  # --size is required

    expect(3, "volume", "resize", "nosuch", "1M")  # unknown volume
    expect(3, "volume", "delete", "nosuch")
    expect(3, "flatten", "nosuch")
    expect(3, "promote", "nosuch")
    expect(3, "clone", "nosuch@s1", "x")
    expect(3, "create", "sx", "--volume", "nosuch")

    expect(4, "volume", "resize", "a", "512K")  # shrink without --force
    expect(0, "volume", "resize", "a", "2M")

    expect(0, "create", "s1", "--volume", "a")
    out = expect(4, "volume", "delete", "a")  # has snapshots, no --recursive
    assert "s1" in out and "--recursive" in out, out
    expect(3, "clone", "live@s1", "x")  # s1 does not cover live
    expect(0, "clone", "a@s1", "ca")
    out = expect(4, "delete", "s1")  # has a clone
    assert "ca" in out, out
    out = expect(4, "set", "s1", "writable=on")  # has a clone
    assert "ca" in out, out
    expect(2, "clone", "a", "x")  # not VOLUME@SNAPSHOT
    expect(2, "flatten", "a")  # not a clone
    expect(4, "clone", "a@s1", "ca")  # the name is taken

    expect(0, "create", "w", "--writable", "--volume", "live")
    out = expect(4, "clone", "live@w", "cw")  # clone of a writable snapshot
    assert "writable=off" in out, out
    expect(2, "set", "w", "writable=maybe")  # bad settings
    expect(2, "set", "w", "color=red")
    expect(2, "set", "w", "writable")
    expect(3, "set", "nosuch", "writable=on")
    expect(0, "set", "w", "writable=off")
    expect(0, "clone", "live@w", "cw")

    listed = json.loads(expect(0, "volume", "list", "--json"))
    assert [v["name"] for v in listed] == ["live", "a", "ca", "cw"], listed
    by = {v["name"]: v for v in listed}
    assert by["ca"]["origin"] == "a@s1" and by["a"]["clones"] == ["ca"]
    assert by["a"]["size_bytes"] == 2 << 20 and by["a"]["snapshots"] == 1
    table = expect(0, "volume", "list", "-H", "-p")
    rows = [line.split("\t") for line in table.splitlines()]
    assert [r[0] for r in rows] == ["live", "a", "ca", "cw"], table
    assert rows[1][1] == str(2 << 20) and rows[2][4] == "a@s1", rows

    expect(0, "promote", "ca")
    expect(0, "delete", "s1")
    expect(0, "volume", "delete", "ca")
    expect(3, "volume", "delete", "ca")
    expect(0, "volume", "delete", "a")  # no snapshots, no clones left
    expect(0, "flatten", "cw")
    expect(0, "volume", "delete", "cw")
    assert [v["name"] for v in json.loads(expect(0, "volume", "list", "--json"))] == ["live"]
    srv.stop()

    # With no server running, snapctl opens the pool itself: the same commands work.
    cp = run_snapctl(srv.disk, "volume", "create", "d", "--size", "64K", env=srv.env)
    assert cp.returncode == 0, cp.stderr
    cp = run_snapctl(srv.disk, "volume", "create", "d", "--size", "64K", env=srv.env)
    assert cp.returncode == 4, cp.stderr
    cp = run_snapctl(srv.disk, "volume", "list", "--json", env=srv.env)
    assert [v["name"] for v in json.loads(cp.stdout)] == ["live", "d"], cp.stdout
    checker_clean(srv.disk)

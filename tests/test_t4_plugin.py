"""Integration tests of the plugin through a real nbdkit and libnbd clients.

Every test runs once per first-write policy (cow=move and cow=copy). An in-test model (one
bytearray per export) says exactly what each export must read; whole exports are compared, and
a mismatch reports the first differing offset instead of a multi-megabyte diff.
"""

from __future__ import annotations

import errno
import json
import random
import re
import subprocess
import threading
from collections.abc import Callable

import nbd
import pytest
from harness import NbdkitServer, require
from support.logcheck import NO_SUCH_SNAPSHOT, READ_ONLY_REQUEST, SNAPSHOT_GONE
from support.nbdclose import disconnect

BS = 64 * 1024  # the default block size (asserted in test_nbdinfo_lists_exports)
SIZE = 4 << 20  # 64 blocks: small enough to compare every export whole, every time
KIB = 1024

pytestmark = pytest.mark.parametrize("cow", ["move", "copy"])


# --- helpers ---------------------------------------------------------------------------------


def assert_same(actual: bytes, expected: bytes | bytearray, what: str) -> None:
    """Compare two whole exports; on mismatch say where, never dump megabytes."""
    assert len(actual) == len(expected), f"{what}: read {len(actual)} bytes, want {len(expected)}"
    if actual == expected:
        return
    first = next(i for i in range(len(actual)) if actual[i] != expected[i])
    bad_blocks = sorted(
        {
            b
            for b in range(len(actual) // BS)
            if actual[b * BS : (b + 1) * BS] != expected[b * BS : (b + 1) * BS]
        }
    )
    pytest.fail(
        f"{what}: differs from the model first at offset {first} (block {first // BS}, "
        f"+{first % BS}); blocks that differ: {bad_blocks}; read "
        f"{bytes(actual[first : first + 16]).hex()} "
        f"want {bytes(expected[first : first + 16]).hex()}"
    )


close = disconnect  # (support.nbdclose)


def read_all(h: nbd.NBD) -> bytes:
    out = bytearray()
    step = 1 << 20
    for off in range(0, SIZE, step):
        out += h.pread(step, off)
    return bytes(out)


def verify(srv: NbdkitServer, model: dict[str, bytearray], latest: str, why: str) -> None:
    """Every export in the model, and live@latest (= model[latest]), reads exactly its data."""
    for export, want in [*model.items(), ("live@latest", model[f"live@{latest}"])]:
        h = srv.connect(export)
        try:
            assert h.get_size() == SIZE, f"{why}: {export} has size {h.get_size()}"
            assert h.is_read_only() == (export != "live"), f"{why}: {export} read-only flag"
            assert_same(read_all(h), want, f"{why}: {export}")
        finally:
            close(h)


def errno_name(e: nbd.Error) -> str:
    """The errno of a libnbd error as a name ('EPERM'); python-libnbd gives the name."""
    code = e.errno
    return errno.errorcode.get(code, str(code)) if isinstance(code, int) else str(code)


def expect_errno(code: int, what: str, fn: Callable[..., object], *args: object) -> nbd.Error:
    """fn(*args) must fail with nbd.Error carrying errno code."""
    with pytest.raises(nbd.Error) as ei:
        fn(*args)
    got = errno_name(ei.value)
    assert got == errno.errorcode[code], (
        f"{what}: expected {errno.errorcode[code]}, got {got} ({ei.value.string})"
    )
    return ei.value


def assert_clean_log(srv: NbdkitServer, *expected: str) -> None:
    """Every error the plugin logged is one the test provoked (one of the expected phrases)."""
    bad = [
        line
        for line in srv.log().splitlines()
        if ("dittofs:" in line and "error" in line) or "background work failed" in line
        if not any(x in line for x in expected)
    ]
    assert not bad, "unexpected errors in the server log:\n" + "\n".join(bad[:20])


def write(h: nbd.NBD, live: bytearray, offset: int, data: bytes, flags: int = 0) -> None:
    h.pwrite(data, offset, flags)
    live[offset : offset + len(data)] = data


def generation(h: nbd.NBD, live: bytearray, rng: random.Random, g: int) -> None:
    """One generation of writes across block boundaries, at odd offsets, of every size."""
    shift = 2 * g + 1
    write(h, live, BS - 7 + g, rng.randbytes(100 * KIB))  # 100 KiB across blocks 0-2
    for off in (1 + shift, BS - 1, BS, 3 * BS + shift, SIZE - 1):  # single bytes
        write(h, live, off, rng.randbytes(1))
    write(h, live, 5 * BS - 100 - g, rng.randbytes(2 * BS))  # spans blocks 4, 5 and 6
    write(h, live, (9 + g % 3) * BS, rng.randbytes(BS))  # one whole aligned block
    blk = rng.randrange(12, 30)
    write(h, live, blk * BS + rng.randrange(1, BS, 2), rng.randbytes(rng.randrange(1, 3000)))
    write(h, live, 31 * BS - 3, rng.randbytes(7))  # a few bytes across a boundary


def _collector(got: list[list[int]]) -> Callable[[str, int, list[int], int], int]:
    def cb(meta: str, off: int, entries: list[int], err: int) -> int:
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            got.append(list(entries))
        return 0

    return cb


def extents(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of base:allocation over [offset, offset + length)."""
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        got: list[list[int]] = []
        h.block_status(end - pos, pos, _collector(got))
        assert got and got[0], f"no base:allocation extents at offset {pos}"
        for i in range(0, len(got[0]), 2):
            n = min(got[0][i], end - pos)
            assert n > 0, f"empty extent at {pos}: {got[0]}"
            out.append((pos, n, got[0][i + 1]))
            pos += n
            if pos >= end:
                break
    return out


def block_flags(h: nbd.NBD, first: int, count: int) -> dict[int, int]:
    """Per block, the AND of the base:allocation flags of every extent overlapping it (a block
    is a hole only if all of it is reported as one)."""
    flags: dict[int, int] = {}
    for off, n, fl in extents(h, first * BS, count * BS):
        for b in range(off // BS, (off + n - 1) // BS + 1):
            flags[b] = flags.get(b, fl) & fl
    return flags


# --- the lifecycle: generations, snapshots, latest, delete; restart; kill -9 ------------------


def snapshot_round(
    srv: NbdkitServer,
    model: dict[str, bytearray],
    rng: random.Random,
    names: tuple[str, str, str],
    hole_block: int,
    why: str,
) -> None:
    """Generation A, snapshot a, generation B (into a region untouched before a), snapshot b,
    generation C; check every export; EPERM on snapshots; live@latest keeps what it opened;
    delete the middle snapshot b under an open connection."""
    a, b, c = names
    live = model["live"]
    h = srv.connect("live")
    try:
        generation(h, live, rng, 1)
        srv.snapctl("create", a)
        model[f"live@{a}"] = bytearray(live)

        generation(h, live, rng, 2)
        hole = hole_block * BS + 4099
        assert not any(live[hole : hole + 100 * KIB]), "hole region must be fresh"
        write(h, live, hole, rng.randbytes(100 * KIB))
        srv.snapctl("create", b)
        model[f"live@{b}"] = bytearray(live)

        generation(h, live, rng, 3)
        h.flush()
    finally:
        close(h)
    verify(srv, model, b, f"{why}: after {a}, {b}")

    # A hole written after snapshot a reads zeros in a (and its block is a hole there).
    sa = srv.connect(f"live@{a}")
    try:
        assert sa.pread(100 * KIB, hole) == bytes(100 * KIB), f"{why}: hole leaked into {a}"
        fl = block_flags(sa, hole_block, 3)
        holes = nbd.STATE_HOLE | nbd.STATE_ZERO
        assert all(f & holes == holes for f in fl.values()), f"{why}: hole in {a}: {fl}"
    finally:
        close(sa)

    check_readonly(srv, model, b, why)

    # live@latest keeps the snapshot it opened when a newer one is created.
    old_latest = srv.connect("live@latest")
    deleted = srv.connect(f"live@{b}")
    try:
        assert_same(read_all(old_latest), model[f"live@{b}"], f"{why}: live@latest before {c}")
        srv.snapctl("create", c)
        model[f"live@{c}"] = bytearray(live)
        assert_same(read_all(old_latest), model[f"live@{b}"], f"{why}: old live@latest after {c}")
        new_latest = srv.connect("live@latest")
        try:
            assert_same(read_all(new_latest), model[f"live@{c}"], f"{why}: new live@latest")
        finally:
            close(new_latest)

        # Delete the middle snapshot: neighbours exact, its readers get EIO, never data.
        srv.snapctl("delete", b)
        del model[f"live@{b}"]
        for conn, what in ((deleted, f"live@{b}"), (old_latest, "live@latest (was b)")):
            for off, n in ((0, 4096), (hole, 100 * KIB), (SIZE - 512, 512)):
                expect_errno(errno.EIO, f"{why}: read deleted {what}", conn.pread, n, off)
    finally:
        close(old_latest)
        close(deleted)
    assert re.search(
        rf"export live@{b}, read at offset \d+, length \d+: the snapshot was deleted while "
        "this connection was open",
        srv.log(),
    )
    with pytest.raises(nbd.Error):
        srv.connect(f"live@{b}")
    verify(srv, model, c, f"{why}: after deleting {b}")


def check_readonly(srv: NbdkitServer, model: dict[str, bytearray], latest: str, why: str) -> None:
    """Writes, trims and zeroes to snapshot exports fail with EPERM even without libnbd's
    client-side checks, and change nothing."""
    for export in [e for e in model if e != "live"] + ["live@latest"]:
        h = srv.connect(export, strict=False)
        try:
            assert h.is_read_only()
            expect_errno(errno.EPERM, f"{why}: {export}", h.pwrite, b"X" * 5000, BS - 100)
            expect_errno(errno.EPERM, export, h.pwrite, b"Y", 0, nbd.CMD_FLAG_FUA)
            expect_errno(errno.EPERM, f"{why}: trim {export}", h.trim, BS, 0)
            expect_errno(errno.EPERM, f"{why}: zero {export}", h.zero, BS, 2 * BS)
            h.flush()  # harmless on a read-only export
        finally:
            close(h)
    verify(srv, model, latest, f"{why}: after rejected writes")


@pytest.mark.engine_log(SNAPSHOT_GONE, READ_ONLY_REQUEST, NO_SUCH_SNAPSHOT)
def test_generations_snapshots_restart_and_crash(servers, cow: str) -> None:
    rng = random.Random(f"lifecycle-{cow}")
    srv = servers(size=str(SIZE), cow=cow).start()
    model: dict[str, bytearray] = {"live": bytearray(SIZE)}

    snapshot_round(srv, model, rng, ("s1", "s2", "s3"), 34, "fresh")

    srv.restart()  # clean shutdown (SIGTERM) and start
    verify(srv, model, "s3", "after restart")
    with pytest.raises(nbd.Error):
        srv.connect("live@s2")
    check_readonly(srv, model, "s3", "after restart")
    snapshot_round(srv, model, rng, ("r1", "r2", "r3"), 42, "after restart")

    # kill -9 after a flush: everything flushed (or written with FUA) is there.
    h = srv.connect("live")
    generation(h, model["live"], rng, 4)
    h.flush()
    write(h, model["live"], 2 * BS + 3, rng.randbytes(3 * BS), nbd.CMD_FLAG_FUA)
    srv.kill()
    close(h)
    srv.start()
    verify(srv, model, "r3", "after kill -9")
    check_readonly(srv, model, "r3", "after kill -9")
    snapshot_round(srv, model, rng, ("k1", "k2", "k3"), 50, "after kill -9")
    srv.kill()
    srv.start()
    verify(srv, model, "k3", "after a second kill -9")
    assert_clean_log(srv, "was deleted while this connection was open", "no snapshot named")


def test_crash_never_changes_a_snapshot(servers, cow: str) -> None:
    """Writes never flushed may be lost at a kill -9, but each block reads old or new data,
    and the snapshot taken before them reads exactly what it held (copy-on-write must make the
    copy durable before overwriting a shared block in place)."""
    rng = random.Random(f"crash-{cow}")
    srv = servers(size=str(SIZE), cow=cow).start()
    live = bytearray(SIZE)
    h = srv.connect("live")
    write(h, live, 0, rng.randbytes(24 * BS))
    h.flush()
    srv.snapctl("create", "before")
    snap = bytes(live)
    old = bytes(live)
    pieces = [(BS - 5, 10), (3 * BS, BS), (5 * BS + 17, 2 * BS), (9 * BS - 1, 1), (20 * BS, 3 * BS)]
    for off, n in pieces:  # unflushed first writes to shared blocks
        write(h, live, off, rng.randbytes(n))
    srv.kill()
    close(h)
    srv.start()
    s = srv.connect("live@before")
    assert_same(read_all(s), snap, "snapshot after kill -9 with unflushed writes")
    hl = srv.connect("live")
    got = read_all(hl)
    close(hl)
    close(s)
    for b in range(SIZE // BS):
        blk = slice(b * BS, (b + 1) * BS)
        assert got[blk] in (old[blk], bytes(live[blk])), f"live block {b} is neither old nor new"


# --- trim, zero, extents ---------------------------------------------------------------------


def test_trim_zero_and_block_status(servers, cow: str) -> None:
    rng = random.Random(f"trim-{cow}")
    srv = servers(size=str(SIZE), cow=cow).start()
    live = bytearray(SIZE)
    h = srv.connect("live")
    write(h, live, 0, rng.randbytes(16 * BS))
    write(h, live, SIZE - 3 * BS, rng.randbytes(3 * BS))
    h.flush()
    srv.snapctl("create", "s1")
    s1 = bytes(live)
    write(h, live, 14 * BS, rng.randbytes(2 * BS))  # blocks 14, 15 now owned by live

    h.trim(2 * BS, 2 * BS)  # blocks 2, 3 (shared with s1)
    live[2 * BS : 4 * BS] = bytes(2 * BS)
    h.trim(2 * BS + 2000, 6 * BS - 1000)  # whole blocks 6, 7; partial edges
    edge_a, edge_b = (6 * BS - 1000, 6 * BS), (8 * BS, 8 * BS + 1000)
    live[6 * BS : 8 * BS] = bytes(2 * BS)
    h.trim(2 * BS, 14 * BS)  # blocks 14, 15 (owned by live: freed)
    live[14 * BS : 16 * BS] = bytes(2 * BS)
    h.zero(2 * BS, 10 * BS + 777)  # zeroes exactly, whole block 11 deallocated
    live[10 * BS + 777 : 12 * BS + 777] = bytes(2 * BS)
    h.zero(100, 13 * BS + 5, nbd.CMD_FLAG_FUA)  # inside one block
    live[13 * BS + 5 : 13 * BS + 105] = bytes(100)
    h.zero(BS, 40 * BS, nbd.CMD_FLAG_FAST_ZERO)  # a hole stays a hole
    h.zero(3 * BS - 1, SIZE - 3 * BS + 1, nbd.CMD_FLAG_NO_HOLE)  # to the very end
    live[SIZE - 3 * BS + 1 :] = bytes(3 * BS - 1)
    h.flush()

    def check(why: str) -> None:
        hl = srv.connect("live")
        got = read_all(hl)
        # Trimmed partial edges have unspecified contents (NBD): old data or zeros.
        for lo, hi in (edge_a, edge_b):
            assert got[lo:hi] in (bytes(live[lo:hi]), bytes(hi - lo)), f"{why}: trim edge {lo}"
            live[lo:hi] = got[lo:hi]
        assert_same(got, live, f"{why}: live after trim/zero")
        fl = block_flags(hl, 0, SIZE // BS)
        for b in (2, 3, 6, 7, 14, 15, 40):
            assert fl[b] & nbd.STATE_HOLE and fl[b] & nbd.STATE_ZERO, f"{why}: block {b}: {fl[b]}"
        assert fl[11] & nbd.STATE_ZERO, f"{why}: zeroed block 11 not reported zero: {fl[11]}"
        for b in (0, 1, 4, 5, 8, 9, 12):
            assert not fl[b] & nbd.STATE_HOLE, f"{why}: data block {b} reported as hole"
        for b in range(17, 40):
            assert fl[b] & nbd.STATE_HOLE, f"{why}: never-written block {b}: {fl[b]}"
        close(hl)
        hs = srv.connect("live@s1")
        assert_same(read_all(hs), s1, f"{why}: s1 after trim/zero of live")
        fs = block_flags(hs, 0, SIZE // BS)
        for b in range(16):
            assert not fs[b] & nbd.STATE_HOLE, f"{why}: s1 block {b} reported as hole"
        for b in range(SIZE // BS - 3, SIZE // BS):
            assert not fs[b] & nbd.STATE_HOLE, f"{why}: s1 block {b} reported as hole"
        for b in range(16, SIZE // BS - 3):
            assert fs[b] & nbd.STATE_HOLE, f"{why}: s1 block {b} should be a hole: {fs[b]}"
        close(hs)

    check("running")
    close(h)
    srv.restart()
    check("after restart")
    assert_clean_log(srv)


# --- several clients at once -----------------------------------------------------------------


def test_concurrent_clients(servers, cow: str) -> None:
    rng = random.Random(f"conc-{cow}")
    srv = servers(size=str(SIZE), cow=cow).start()
    live = bytearray(SIZE)
    h = srv.connect("live")
    write(h, live, 0, rng.randbytes(SIZE))
    h.flush()
    srv.snapctl("create", "s1")
    s1 = bytes(live)
    write(h, live, 7 * BS + 1, rng.randbytes(20 * BS))
    h.flush()
    srv.snapctl("create", "s2")
    s2 = bytes(live)
    close(h)

    split = SIZE // 2 + 12345  # mid-block: both writers touch block 32
    regions = [(0, split), (split, SIZE)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(i: int) -> None:
        lo, hi = regions[i]
        r = random.Random(f"w{i}-{cow}")
        c = srv.connect("live")
        try:
            for k in range(150):
                n = r.choice([1, 511, BS // 2, BS + 3, 2 * BS + 1])
                off = r.randrange(lo, hi - n) if k % 10 else (split - n if i == 0 else split)
                data = r.randbytes(n)
                c.pwrite(data, off)
                live[off : off + n] = data  # disjoint regions: no lock needed
                if k % 50 == 49:
                    c.flush()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            close(c)

    def reader(export: str, want: bytes) -> None:
        r = random.Random(export)
        c = srv.connect(export)
        try:
            while not stop.is_set():
                off = r.randrange(0, SIZE - 3 * BS)
                n = r.randrange(1, 3 * BS)
                got = c.pread(n, off)
                if got != want[off : off + n]:
                    raise AssertionError(
                        f"{export}: wrong data at [{off}, {off + n}) during writes"
                    )
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            close(c)

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    readers = [
        threading.Thread(target=reader, args=(e, w))
        for e, w in (("live@s1", s1), ("live@s2", s2), ("live@latest", s2), ("live@s1", s1))
    ]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(60)
    assert not any(t.is_alive() for t in writers + readers), "a client thread hung"
    assert not errors, f"client errors: {errors}"

    model = {"live": live, "live@s1": bytearray(s1), "live@s2": bytearray(s2)}
    verify(srv, model, "s2", "after concurrent clients")
    c = srv.connect("live")
    c.flush()
    close(c)
    srv.kill()
    srv.start()
    verify(srv, model, "s2", "concurrent clients, after flush and kill -9")
    assert_clean_log(srv)


# --- nbdinfo --list --------------------------------------------------------------------------


def nbdinfo_list(srv: NbdkitServer) -> dict[str, dict[str, object]]:
    cp = subprocess.run(
        [require("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={srv.sock}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cp.returncode == 0, f"nbdinfo --list failed: {cp.stderr}"
    return {e["export-name"]: e for e in json.loads(cp.stdout)["exports"]}


def test_nbdinfo_lists_exports(servers, cow: str) -> None:
    srv = servers(size=str(SIZE), cow=cow).start()
    info = json.loads(srv.snapctl("info", "--json").stdout)
    assert info["block_size"] == BS and info["cow"] == cow
    h = srv.connect("live")
    h.pwrite(b"a" * 1000, 0)
    srv.snapctl("create", "s1")
    h.pwrite(b"b" * 1000, 0)
    srv.snapctl("create", "s2")
    close(h)

    ex = nbdinfo_list(srv)
    assert set(ex) == {"live", "live@s1", "live@s2", "live@latest"}, sorted(ex)
    for name, e in ex.items():
        desc = str(e.get("description", ""))
        assert e["export-size"] == SIZE, name
        assert e["is_read_only"] == (name != "live"), name
        assert desc, f"{name} has no description"
        if name == "live":
            assert "read-write" in desc and e["can_trim"] and e["can_zero"], e
        else:
            assert "read-only" in desc or "newest" in desc, (name, desc)
    assert "s1" in str(ex["live@s1"]["description"])
    assert "s2" in str(ex["live@s2"]["description"])
    assert "s2" in str(ex["live@latest"]["description"]), ex["live@latest"]

    # The plain listing too, as a person would run it.
    cp = subprocess.run(
        [require("nbdinfo"), "--list", f"nbd+unix:///?socket={srv.sock}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cp.returncode == 0, cp.stderr
    for name in ex:
        assert f'export="{name}"' in cp.stdout
    assert cp.stdout.count("description:") == 4, cp.stdout

    srv.snapctl("delete", "s2")
    ex = nbdinfo_list(srv)
    assert set(ex) == {"live", "live@s1", "live@latest"}, sorted(ex)
    assert "s1" in str(ex["live@latest"]["description"]), ex["live@latest"]

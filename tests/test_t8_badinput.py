"""Bad input, part two (tests/test_t4_badinput.py has random bytes, ext4, a truncated image,
bad export names, bad snapshot names through the CLI, two servers on one file, size=0): each
case here gets a clear error and leaves the disk byte-identical (sha256 before and after).

| input                                         | answered by                                   |
|-----------------------------------------------|-----------------------------------------------|
| a pool from a newer format version / feature  | server refuses; info 1; check, repair 8       |
| an image smaller than its superblock says     | server refuses (both sizes named); check 4    |
| a device smaller than the pool (loop sizelimit)| server refuses                               |
| a read-only disk: `losetup -r`, `chattr +i`   | server refuses; create fails; check works (0) |
| malformed, oversized, unknown control messages| `protocol` / `invalid_argument` replies      |
| snapshot names with / @ % NUL newline 10,000  | `invalid_name` on the socket, exit 2 in CLI   |
| the same pool through a second loop device    | refused by the in-use record (server, CLI)    |
| sizes that do not fit the disk or NBD         | format refuses; plugin refuses                |
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from harness import NbdkitServer, require, run_snapctl
from support.data import sha256_file as sha256
from support.logcheck import COMMIT_FAILED, IN_USE, POOL_SPANS_MORE
from t8_helpers import (
    LoopDevices,
    RawControl,
    close_quietly,
    newest_slot,
    write_slot,
)

from fsimpl.layout import FORMAT_VERSION

SIZE = 4 << 20


@pytest.fixture
def loops() -> Iterator[LoopDevices]:
    made = LoopDevices()
    yield made
    made.detach_all()


def refuses_to_start(srv: NbdkitServer) -> str:
    with pytest.raises(RuntimeError, match="nbdkit exited with"):
        srv.start()
    assert srv.proc is not None and srv.proc.returncode not in (None, 0)
    return srv.log()


def cli(disk: Path | str, *args: str, env: dict[str, str]) -> tuple[int, str]:
    cp = run_snapctl(Path(disk), *args, env=env)
    text = cp.stdout + cp.stderr
    assert "Traceback" not in text, f"snapctl {args}: a traceback:\n{text}"
    return cp.returncode, text


def served_pool(servers, **kw: object) -> NbdkitServer:
    """A pool with data and a snapshot, served and then stopped cleanly."""
    srv = servers(size=str(SIZE), **kw).start()
    h = srv.connect("live")
    h.pwrite(b"payload!" * 8192, 100_000)
    h.flush()
    srv.snapctl("create", "s1")
    close_quietly(h)
    srv.stop()
    return srv


def quiesce(srv: NbdkitServer) -> None:
    h = srv.connect("live")
    h.flush()
    close_quietly(h)


# --- format versions -------------------------------------------------------------------------


@pytest.mark.engine_log(r"format version \d+ is not supported", r"features 0x[0-9a-f]+ unknown")
@pytest.mark.parametrize("field", ["version", "features"])
def test_newer_format_is_refused(servers, field: str) -> None:
    srv = served_pool(servers)
    slot, sb = newest_slot(srv.disk)
    if field == "version":
        write_slot(srv.disk, slot, replace(sb, version=FORMAT_VERSION + 1))
        words = [f"format version {FORMAT_VERSION + 1} is not supported", "release"]
    else:
        write_slot(srv.disk, slot, replace(sb, features=1 << 17))
        words = ["uses features 0x20000 unknown to this dittofs"]
    before = sha256(srv.disk)

    log = refuses_to_start(servers(disk=srv.disk))
    assert all(w in log for w in words), log
    rc, text = cli(srv.disk, "info", env=srv.env)
    assert rc == 1 and all(w in text for w in words), text
    for args in (("check",), ("check", "--repair"), ("check", "--json")):
        rc, text = cli(srv.disk, *args, env=srv.env)
        assert rc == 8 and all(w in text for w in words), (args, rc, text)
    rc, text = cli(srv.disk, "create", "s2", env=srv.env)
    assert rc == 1 and words[0] in text, text
    assert sha256(srv.disk) == before, "a refused newer-format pool was changed"


# --- a disk smaller than its pool ------------------------------------------------------------


@pytest.mark.engine_log(POOL_SPANS_MORE)
def test_image_smaller_than_its_superblock_says(servers) -> None:
    srv = served_pool(servers)
    slot, sb = newest_slot(srv.disk)
    # the newest valid slot is what the engine reads
    write_slot(srv.disk, slot, replace(sb, capacity_blocks=sb.capacity_blocks * 4))
    have = srv.disk.stat().st_size
    need = sb.capacity_blocks * 4 * sb.block_size
    before = sha256(srv.disk)
    log = refuses_to_start(servers(disk=srv.disk))
    assert f"is {have} bytes but its pool spans {need}" in log, log
    rc, text = cli(srv.disk, "check", env=srv.env)
    assert rc == 4 and f"spans {need}" in text, text
    rc, text = cli(srv.disk, "check", "--repair", env=srv.env)
    assert rc == 4 and "nothing was changed" in text, text
    rc, text = cli(srv.disk, "info", env=srv.env)
    assert rc == 1 and "truncated" in text, text
    assert sha256(srv.disk) == before and srv.disk.stat().st_size == have


@pytest.mark.engine_log(POOL_SPANS_MORE)
def test_device_smaller_than_its_pool(servers, loops: LoopDevices, tmp_path: Path) -> None:
    image = tmp_path / "dev.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    dev = loops.attach(image)
    env = servers(disk=tmp_path / "x").env
    rc, text = cli(dev, "format", dev, "--block-size", "64K", env=env)
    assert rc == 0, text
    loops.detach(dev)
    before = sha256(image)
    small = loops.attach(image, "--sizelimit", str(8 << 20))
    log = refuses_to_start(servers(disk=Path(small)))
    assert f"{small} is {8 << 20} bytes but its pool spans {16 << 20}" in log, log
    rc, text = cli(small, "check", env=env)
    assert rc == 4 and f"spans {16 << 20}" in text, text
    loops.detach(small)
    assert sha256(image) == before


# --- read-only disks ---------------------------------------------------------------------------


@pytest.mark.engine_log(COMMIT_FAILED)
def test_read_only_loop_device(servers, loops: LoopDevices) -> None:
    srv = served_pool(servers)
    before = sha256(srv.disk)
    dev = loops.attach(srv.disk, "--read-only")
    ro = servers(disk=Path(dev))
    log = refuses_to_start(ro)
    assert dev in log and ("Operation not permitted" in log or "read-only" in log), log
    rc, text = cli(dev, "create", "s2", env=ro.env)
    assert rc != 0 and ("Operation not permitted" in text or "read-only" in text), text
    # checking needs no writes: it works on a read-only disk
    rc, text = cli(dev, "check", env=ro.env)
    assert rc == 0 and text.startswith("clean"), text
    rc, text = cli(dev, "info", "--json", env=ro.env)
    assert rc == 0 and json.loads(text)["snapshot_count"] == 1, text
    loops.detach(dev)
    assert sha256(srv.disk) == before


@pytest.mark.engine_log(r"cannot open .*: Operation not permitted")
def test_immutable_image_file(servers) -> None:
    srv = served_pool(servers)
    before = sha256(srv.disk)
    chattr = require("chattr")
    subprocess.run([chattr, "+i", str(srv.disk)], check=True, timeout=30)
    try:
        log = refuses_to_start(servers(disk=srv.disk))
        assert f"cannot open {srv.disk}: Operation not permitted" in log, log
        rc, text = cli(srv.disk, "check", env=srv.env)
        assert rc == 0, text
        rc, text = cli(srv.disk, "check", "--repair", env=srv.env)
        assert rc == 8 and "cannot open" in text and "for writing" in text, text
        rc, text = cli(srv.disk, "create", "s2", env=srv.env)
        assert rc == 1 and "Operation not permitted" in text, text
    finally:
        subprocess.run([chattr, "-i", str(srv.disk)], check=True, timeout=30)
    assert sha256(srv.disk) == before


# --- the control socket ------------------------------------------------------------------------

MALFORMED: list[tuple[bytes, str, str]] = [
    (b"not json at all\n", "protocol", "one JSON object per line"),
    (b"[1, 2, 3]\n", "protocol", "must be a JSON object"),
    (b'"create"\n', "protocol", "must be a JSON object"),
    (b"\xff\xfe\xfd\n", "protocol", "one JSON object per line"),
    (b'{"v": 1, "id": 1, "op": "hel\x00lo"}\n', "protocol", "one JSON object per line"),
    (b'{"v": 2, "id": 1, "op": "hello"}\n', "protocol", "protocol version 2 not supported"),
    (b'{"id": 1, "op": "hello"}\n', "protocol", "protocol version None not supported"),
    (b'{"v": 1, "id": 1}\n', "protocol", "'op' must be a string"),
    (b'{"v": 1, "id": 1, "op": 7}\n', "protocol", "'op' must be a string"),
    (b'{"v": 1, "id": 1, "op": "create", "args": [1]}\n', "protocol", "'args' an object"),
    (b'{"v": 1, "id": 1, "op": "create", "args": {"name": 5}}\n', "invalid_argument", "string"),
    (b'{"v": 1, "id": 1, "op": "create", "args": {}}\n', "invalid_argument", "string"),
    (b'{"v": 1, "id": 1, "op": "delete", "args": {"names": "s1"}}\n', "invalid_argument", "list"),
    (b'{"v":1,"id":1,"op":"prune","args":{"keep_last":-1}}\n', "invalid_argument", ">= 0"),
    (b'{"v":1,"id":1,"op":"prune","args":{"keep_last":1e999}}\n', "invalid_argument", ">= 0"),
    (
        b'{"v":1,"id":1,"op":"rollback","args":{"name":"s1","force":"yes"}}\n',
        "invalid_argument",
        "true or false",
    ),  # noqa: E501
    (
        b'{"v":1,"id":1,"op":"prune","args":{"keep_last":' + b"9" * 5000 + b"}}\n",
        "protocol",
        "JSON",
    ),  # noqa: E501
    (b'{"v": 1, "id": 1, "op": "format"}\n', "protocol", "unknown operation 'format'"),
    (b'{"v": 1, "id": 1, "op": "__init__"}\n', "protocol", "unknown operation"),
    (b'{"v": 1, "id": 1, "op": ""}\n', "protocol", "unknown operation"),
]


def test_malformed_control_messages(servers) -> None:
    srv = served_pool(servers).start()
    quiesce(srv)
    before = sha256(srv.disk)
    for raw, code, words in MALFORMED:
        c = RawControl(srv.control)
        try:
            c.send(raw)
            reply = c.reply()
            assert reply is not None, f"{raw[:60]!r}: the server closed without a reply"
            assert reply["ok"] is False and reply["error"]["code"] == code, (raw[:60], reply)
            assert words in reply["error"]["message"], (raw[:60], reply)
            assert len(json.dumps(reply)) < 2000, f"{raw[:60]!r}: the reply echoes the input"
            # the connection stays usable after a bad line
            ok = c.request("hello")
            assert ok is not None and ok["ok"] and ok["result"]["pid"] == srv.pid, ok
        finally:
            c.close()

    # several requests in one write are answered in order; the ids are echoed whatever they are
    c = RawControl(srv.control)
    ids = [1, "two", {"three": [3]}, None]
    c.send(b"".join(json.dumps({"v": 1, "id": i, "op": "hello"}).encode() + b"\n" for i in ids))
    assert [(r or {}).get("id") for r in (c.reply() for _ in ids)] == ids
    c.close()

    # oversized: a line past 1 MiB (with or without its newline) is refused and closed
    for tail in (b"\n", b""):
        c = RawControl(srv.control)
        big = b'{"v": 1, "id": 1, "op": "hello", "pad": "' + b"x" * (1 << 20) + b'"}' + tail
        try:
            c.send(big)
        except (BrokenPipeError, ConnectionResetError) as e:
            # the server refused before the whole line arrived and closed: the reply and the
            # close are what the assertions below check
            print(f"oversized line cut while sending: {e!r}")
        reply = c.reply()
        assert reply is not None and reply["error"]["code"] == "protocol", reply
        assert "longer than 1048576 bytes" in reply["error"]["message"], reply
        assert c.closed_by_server(), "an oversized message did not close the connection"
        c.close()

    # a client that sends half a line and goes away
    c = RawControl(srv.control)
    c.send(b'{"v": 1, "id": 1, "op": "crea')
    c.close()

    c = RawControl(srv.control)
    listed = c.request("list")
    assert listed is not None and [s["name"] for s in listed["result"]] == ["s1"], listed
    c.close()
    h = srv.connect("live@s1")
    assert h.pread(65536, 100_000) == (b"payload!" * 8192)
    close_quietly(h)
    assert srv.proc is not None and srv.proc.poll() is None
    assert sha256(srv.disk) == before, "malformed control messages changed the disk"


def test_hostile_control_messages_get_bounded_protocol_errors(servers) -> None:
    """Two messages the control server answers badly (fsimpl/control.py):
    * deep nesting: json.loads raises RecursionError, not ValueError, so a malformed line is
      answered as the server's own internal error (code 'failed') instead of 'protocol';
    * an unknown operation's name is echoed whole in the error (up to 1 MiB on one line)."""
    srv = servers(size=str(SIZE)).start()
    quiesce(srv)
    before = sha256(srv.disk)
    problems = []
    for label, raw in (
        ("200,000 nested arrays", b"[" * 200_000 + b"\n"),
        ("a 100,000-character op", b'{"v": 1, "id": 1, "op": "' + b"x" * 100_000 + b'"}\n'),
    ):
        c = RawControl(srv.control)
        try:
            c.send(raw)
            reply = c.reply()
            assert reply is not None and reply["ok"] is False, (label, reply)
            assert c.request("hello") is not None, f"{label}: the connection broke"
        finally:
            c.close()
        err = reply["error"]
        if err["code"] != "protocol":
            problems.append(f"{label}: code {err['code']!r}: {err['message'][:160]}")
        if len(err["message"]) > 1000:
            problems.append(f"{label}: the error message is {len(err['message'])} characters")
    assert srv.proc is not None and srv.proc.poll() is None
    assert sha256(srv.disk) == before
    assert not problems, "\n".join(problems)


BAD = {
    "slash": "a/b",
    "at": "a@b",
    "percent": "a%2fb",
    "nul": "a\x00b",
    "newline": "a\nb",
    "carriage-return": "a\rb",
    "trailing-newline": "good\n",
    "10000-chars": "x" * 10_000,
    "dotdot": "..",
    "space": "a b",
    "non-ascii": "caf\u00e9",
}


def test_bad_snapshot_names_on_the_control_socket(servers) -> None:
    srv = served_pool(servers).start()
    quiesce(srv)
    before = sha256(srv.disk)
    c = RawControl(srv.control)
    try:
        for label, name in BAD.items():
            for op, args in (
                ("create", {"name": name}),
                ("rename", {"old": "s1", "new": name}),
                ("rename", {"old": name, "new": "fine"}),
                ("delete", {"name": name}),
                ("delete", {"names": ["s1", name]}),  # all or nothing: s1 stays
                ("hold", {"name": name}),
                ("rollback", {"name": name, "force": True}),
                ("diff", {"from": name}),
            ):
                reply = c.request(op, args)
                assert reply is not None and reply["ok"] is False, (label, op, reply)
                err = reply["error"]
                assert err["code"] == "invalid_name" and err["exit_code"] == 2, (label, op, err)
                msg = err["message"]
                assert "\n" not in msg and "\x00" not in msg and "\r" not in msg, (label, msg)
                assert len(msg) < 400, f"{label}: the error echoes the whole name"
                if label == "10000-chars":
                    assert "10000 characters long; the limit is 64" in msg, msg
                else:
                    assert "invalid snapshot name" in msg, (label, msg)
        listed = c.request("list")
        assert listed is not None and [s["name"] for s in listed["result"]] == ["s1"], listed
    finally:
        c.close()
    assert sha256(srv.disk) == before, "refused names changed the disk"

    # and through snapctl (argv cannot hold a NUL; everything else can)
    for label, name in BAD.items():
        if "\x00" in name:
            continue
        cp = srv.snapctl("create", "--", name, check=False)
        assert cp.returncode == 2, (label, cp.returncode, cp.stderr)
        lines = cp.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("snapctl: "), (label, cp.stderr)
        cp = srv.snapctl("rename", "s1", "--", name, check=False)
        assert cp.returncode == 2, (label, cp.returncode, cp.stderr)
    quiesce(srv)
    assert sha256(srv.disk) == before


# --- the same pool through a second path -------------------------------------------------------


@pytest.mark.engine_log(IN_USE)
def test_same_pool_through_a_second_loop_device(servers, loops: LoopDevices) -> None:
    srv = served_pool(servers)
    first = loops.attach(srv.disk)
    second = loops.attach(srv.disk)
    a = servers(disk=Path(first)).start()
    h = a.connect("live")
    h.pwrite(b"first-path" * 100, 0)
    h.flush()
    before = sha256(srv.disk)

    b = servers(disk=Path(second))
    log = refuses_to_start(b)
    assert f"in use by process {a.pid}" in log and "another path" in log, log
    for args, want in ((("info",), 4), (("create", "x"), 4), (("check",), 8)):
        rc, text = cli(second, *args, env=b.env)
        assert rc == want, (args, rc, text)
        assert f"in use by process {a.pid}" in text, (args, text)
    rc, text = cli(second, "check", "--repair", env=b.env)
    assert rc == 8 and f"in use by process {a.pid}" in text, text

    assert h.pread(1000, 0) == b"first-path" * 100, "the first server stopped serving"
    assert sha256(srv.disk) == before, "a refused second path changed the disk"
    close_quietly(h)
    a.stop()
    # once the first server is gone, the second path opens the same pool
    c = servers(disk=Path(second)).start()
    h = c.connect("live")
    assert h.pread(1000, 0) == b"first-path" * 100
    close_quietly(h)
    c.stop()


# --- sizes -------------------------------------------------------------------------------------


def test_sizes_that_do_not_fit_the_disk(servers, loops: LoopDevices, tmp_path: Path) -> None:
    env = servers(disk=tmp_path / "x").env
    tiny_img = tmp_path / "tiny.img"
    with open(tiny_img, "wb") as f:
        f.truncate(96 << 10)
    tiny = loops.attach(tiny_img)
    before = sha256(tiny_img)
    for extra in ((), ("--size", "1G"), ("--block-size", "64K", "--size", "40K")):
        rc, text = cli(tiny, "format", tiny, *extra, env=env)
        assert rc == 1 and "too small for a pool" in text and "it needs at least" in text, text
    mid_img = tmp_path / "mid.img"
    with open(mid_img, "wb") as f:
        f.truncate(4 << 20)
    mid = loops.attach(mid_img)
    rc, text = cli(mid, "format", mid, "--block-size", "1M", env=env)
    assert rc == 1 and "too small for a pool of 1048576-byte blocks" in text, text
    for bad in ("2M", "3K", "0", "1000"):
        rc, text = cli(mid, "format", mid, "--block-size", bad, env=env)
        assert rc == 2 and "block size" in text, (bad, text)
    assert sha256(tiny_img) == before

    # the plugin: size= beyond the largest NBD export, and not a size at all
    for size in (str(1 << 63), "99999999999999999999999", "-5", "12Q"):
        disk = tmp_path / "new.img"
        log = refuses_to_start(servers(disk=disk, size=size))
        assert "size" in log, log
        assert not disk.exists(), f"size={size}: a refused create left a file"


def test_format_refuses_sizes_nbd_cannot_export(servers, tmp_path: Path) -> None:
    """NBD sizes are below 2^63: a larger live volume can be formatted but never served
    (nbdkit: 'int too big to convert'), and 2^64 and up end in a traceback (struct.error)."""
    env = servers(disk=tmp_path / "x").env
    problems = []
    for size in (str(1 << 63), str(1 << 64), "99999999999999999999999"):
        disk = tmp_path / "big.img"
        cp = run_snapctl(disk, "format", str(disk), "--size", size, env=env)
        text = cp.stdout + cp.stderr
        if cp.returncode != 2 or "Traceback" in text or disk.exists():
            problems.append(
                f"--size {size}: exit {cp.returncode}, file left: {disk.exists()}, "
                + (text.strip().splitlines() or ["(no output)"])[-1]
            )
        if disk.exists():
            os.unlink(disk)
    assert not problems, "snapctl format accepts sizes NBD cannot export:\n" + "\n".join(problems)
